"""Supervision of a bus client's background tasks (link, reader, publisher).

Rules:

1. A supervised task that raises (anything but cancellation) is logged with
   its traceback, counted in `TaskHealth.restarts` under its name, marked
   down, and started again after a backoff (`engine.backoff`:
   100 ms, growing to 5 s while it keeps failing within `stable_s` of its
   start). It is never left dead: the failure of one publish batch, or a bug
   in a reader, costs a restart, not the bus.
2. While a task is down (between its failure and its restart),
   `TaskHealth.down` names it; the bus clients report `connected = False`
   then, so `/readyz` fails and publishes fail fast with `BusUnavailable`
   instead of queueing behind a dead task.
3. A task that returns normally is done (the client is closing): no restart.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final

from engine.backoff import Backoff, FailureStreak

log = logging.getLogger(__name__)

RESTART_BACKOFF: Final = Backoff(min_ms=100, max_ms=5000)
STABLE_S: Final = 10.0


class TaskHealth:
    """Restarts per task name since start, and the tasks down right now."""

    __slots__ = ("down", "restarts")

    def __init__(self) -> None:
        self.restarts: dict[str, int] = {}
        self.down: set[str] = set()

    @property
    def ok(self) -> bool:
        return not self.down

    def total_restarts(self) -> int:
        return sum(self.restarts.values())


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    health: TaskHealth,
    *,
    backoff: Backoff = RESTART_BACKOFF,
    stable_s: float = STABLE_S,
) -> None:
    """Run `run()` until it returns, restarting it when it raises (rules 1-3)."""
    loop = asyncio.get_running_loop()
    streak = FailureStreak(backoff, stable_s=stable_s)
    while True:
        streak.record_success(loop.time())
        try:
            await run()
            return
        except Exception:
            log.exception("bus: task %s failed; restarting it", name)
        health.restarts[name] = health.restarts.get(name, 0) + 1
        health.down.add(name)
        streak.record_failure(loop.time())
        try:
            await asyncio.sleep(streak.next_delay_ms(random.random()) / 1000.0)
        finally:
            health.down.discard(name)
