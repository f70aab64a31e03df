"""engine/bus/backend.py: what the bus backends share, with a backend that answers at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from engine.bus.backend import BusBackend, CallbackGuard
from engine.bus.base import Bus, PublishDone, Update
from engine.bus.tasks import TaskHealth
from engine.errors import BusError, BusRefused, BusUnavailable


class Answering(BusBackend):
    """`publish` answers from the loop with what it was given (rule 1's only input)."""

    def __init__(self, answer: Sequence[int] | BusError) -> None:
        self.answer = answer
        self.health = TaskHealth()

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        asyncio.get_running_loop().call_soon(done, self.answer)


def test_publish_wait_resolves_with_the_positions_as_a_list() -> None:
    bus = Answering((5, 6))
    assert asyncio.run(bus.publish_wait([Update("t", "k", b"\x01")])) == [5, 6]


@pytest.mark.parametrize(
    "error", [BusUnavailable("down"), BusRefused("too_large", "big"), BusError("bad")]
)
def test_publish_wait_raises_the_error_publish_reported(error: BusError) -> None:
    bus = Answering(error)
    with pytest.raises(type(error)) as info:
        asyncio.run(bus.publish_wait([Update("t", "k", b"\x01")]))
    assert info.value is error


def test_the_optional_figures_have_their_documented_defaults() -> None:
    """Rule 3: a backend that cannot tell says so the documented way."""
    bus = Answering(())
    assert bus.bus_stats() == {}
    assert bus.shard_lags_ms() is None
    assert bus.last_entry_age_ms() is None
    assert bus.tasks_down() == []
    bus.health.down.update({"publisher", "link"})
    assert bus.tasks_down() == ["link", "publisher"]


def test_a_failing_callback_is_logged_and_goes_no_further(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rule 2: the guard logs with the backend's logger and line."""
    guard = CallbackGuard(logging.getLogger("engine.bus.test"), "bus: a test callback failed")
    got: list[object] = []

    def boom(result: object) -> None:
        raise RuntimeError("the caller's bug")

    with caplog.at_level(logging.ERROR, logger="engine.bus.test"):
        guard(boom, [1])
        guard(got.append, [2])
    assert got == [[2]]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("engine.bus.test", "bus: a test callback failed")
    ]


def test_both_backends_are_bus_backends() -> None:
    from engine.bus.local import LocalBus
    from engine.bus.redis_streams import RedisBus

    for cls in (LocalBus, RedisBus):
        assert issubclass(cls, BusBackend)
    bus: Bus = LocalBus("/nonexistent/hub.sock")  # mypy: LocalBus satisfies the Protocol
    assert bus.shard_lags_ms() is None
