"""`fanout bench`'s snapshot check (loadtest/bench/subscriber.py `_check_snapshots`):
each counting client resubscribes and its re-sent snaps are compared with the final
values; a snap sent before the server had applied the finals is asked for again,
and a client whose snaps never match is reported, not waited for forever."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from loadtest.bench import subscriber
from loadtest.client import CountingSink

FINALS = {"t": {"k": 2, "j": 5}}


class Client:
    """A counting client whose server sends stale snaps (`k` = 1) `stale` times first."""

    def __init__(self, stale: int) -> None:
        self.views: dict[str, dict[str, Any]] = {"t": {}}
        self.closed = self.slow = self.ready = False
        self.stale = stale
        self.asked = 0

    def resubscribe(self, sink: Any) -> None:
        self.asked += 1
        k = 1 if self.asked <= self.stale else 2
        sink.message(self, {"op": "snap", "topic": "t", "items": {"k": [k, 0], "j": [5, 0]}}, 0, 0)
        self.ready = True


class Proc:
    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.sink = CountingSink()

    def is_probe(self, client: Any) -> bool:
        return False

    async def wait_ready(self, clients: Sequence[Any], timeout_s: float) -> float:
        return 0.0


def test_stale_snaps_are_asked_for_again_until_they_hold_the_finals() -> None:
    clients = [Client(0), Client(1), Client(3)]
    result = asyncio.run(subscriber._check_snapshots(Proc(clients), FINALS, 10.0))  # type: ignore[arg-type]
    assert (result["clients"], result["matched"], result["rounds"]) == (3, 3, 4)
    assert [c.asked for c in clients] == [1, 2, 4]  # only the unmatched ones ask again


def test_snaps_that_never_match_are_reported_within_the_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(subscriber, "SNAPSHOT_MIN_WAIT_S", 1.2)
    monkeypatch.setattr(subscriber, "SNAPSHOT_RETRY_S", 0.1)
    clients = [Client(0), Client(10_000)]
    result = asyncio.run(subscriber._check_snapshots(Proc(clients), FINALS, 0.0))  # type: ignore[arg-type]
    assert (result["clients"], result["matched"]) == (2, 1)
    assert 5 <= clients[1].asked <= 13  # asked again every 0.1 s for ~1.2 s, then given up
