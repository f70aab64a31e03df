"""What every bus backend's client shares (`LocalBus`, `RedisBus`).

Rules:

1. A backend implements `publish` (callback style, never waiting); the
   awaited form, `publish_wait`, is written once here in terms of it, so the
   two cannot drift: it resolves with the positions or raises the `BusError`
   the callback got, and its bound is `publish`'s (every backend calls `done`
   within its `publish_timeout_s`, engine/bus/base.py guarantee 7).
2. A caller's callback runs through a `CallbackGuard`: an exception it raises
   is logged (with the backend's logger and line) and goes no further, so a
   failing caller cannot break the loop that settles the other requests.
3. The optional figures of `Bus` (`bus_stats`, `shard_lags_ms`,
   `last_entry_age_ms`, `tasks_down`) have their documented defaults here; a
   backend overrides the ones it can tell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from engine.bus.base import PublishDone, Update
from engine.bus.tasks import TaskHealth
from engine.errors import BusError


class CallbackGuard:
    """Calls a reply callback, logging (never raising) what it raises (rule 2).

    One instance per backend module (the log line names the backend's logger),
    called like a function: `loop.call_soon(guard, done, result)`.
    """

    __slots__ = ("_log", "_message")

    def __init__(self, log: logging.Logger, message: str) -> None:
        self._log = log
        self._message = message

    def __call__(self, callback: Callable[[Any], None], result: Any) -> None:
        try:
            callback(result)
        except Exception:
            self._log.exception(self._message)


class BusBackend:
    """The shared part of a `Bus` client: `publish_wait` and the defaults of
    the optional figures (rules 1 and 3). A subclass implements the rest of
    `engine.bus.base.Bus`."""

    # Restarts and the tasks down right now (engine/bus/tasks.py): set by the subclass.
    health: TaskHealth

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        raise NotImplementedError

    async def publish_wait(self, updates: Sequence[Update]) -> list[int]:
        """`publish`, awaited: the positions, or raises `BusUnavailable` / `BusError`."""
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

        def done(result: Sequence[int] | BusError) -> None:
            if fut.done():
                return
            if isinstance(result, BusError):
                fut.set_exception(result)
            else:
                fut.set_result(list(result))

        self.publish(updates, done)
        return await fut

    def bus_stats(self) -> dict[str, int]:
        """Counters of the client's failure modes, for metrics. Default: none."""
        return {}

    def shard_lags_ms(self) -> list[float] | None:
        """Each shard's lag in ms. Default: None (the backend cannot tell per shard)."""
        return None

    def last_entry_age_ms(self) -> float | None:
        """Milliseconds since the client last received an entry. Default: None (not tracked)."""
        return None

    def tasks_down(self) -> list[str]:
        """The background tasks down right now, sorted (engine/bus/tasks.py rule 2)."""
        return sorted(self.health.down)
