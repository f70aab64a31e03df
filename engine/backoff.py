"""Retry delays: exponential backoff with jitter, and a streak of failures.

PURE: no clock, no randomness, no I/O. Callers pass `now` (any monotonic
seconds) and `rand` (a float in [0, 1)), so every delay is reproducible in a
test. The supervisor uses it to respawn workers, the bus clients to restart
their tasks and reconnect, the clients to reconnect.

Rules:
1. A delay is never below `min_ms` and never above `max_ms`.
2. The ceiling grows by `factor` per consecutive failure; the delay is drawn
   uniformly between the floor and that ceiling ("full jitter" above a floor),
   so processes or clients that failed together do not retry together.
3. A streak ends when the thing that failed has since run for `stable_s`:
   the next failure is treated as the first one again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter above a floor.

    Attempt 0 (the first retry) waits `min_ms`; attempt n waits a uniform draw
    in [min_ms, min(max_ms, base * factor**n)], where base is `min_ms` (or 1 ms
    when `min_ms` is 0, so the ceiling can grow at all).
    """

    min_ms: float
    max_ms: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_ms) and self.min_ms >= 0):
            raise ValueError(f"min_ms must be a finite number >= 0, got {self.min_ms!r}")
        if not (math.isfinite(self.max_ms) and self.max_ms >= self.min_ms):
            raise ValueError(f"max_ms must be finite and >= min_ms, got {self.max_ms!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ValueError(f"factor must be a finite number >= 1, got {self.factor!r}")

    def ceiling_ms(self, attempt: int) -> float:
        """The largest delay of retry number `attempt` (0-based), capped at `max_ms`."""
        if attempt <= 0:
            return self.min_ms
        base = self.min_ms if self.min_ms > 0 else 1.0
        try:
            grown = base * self.factor**attempt
        except OverflowError:  # a long outage: the cap was reached long ago
            return self.max_ms
        return min(self.max_ms, max(self.min_ms, grown))

    def delay_ms(self, attempt: int, rand: float) -> float:
        """The delay before retry number `attempt` (0-based); `rand` is in [0, 1).

        The result lies in [min_ms, ceiling_ms(attempt)]. Out-of-range `rand`
        values are clamped rather than trusted.
        """
        cap = self.ceiling_ms(attempt)
        r = min(max(rand, 0.0), 1.0)
        return self.min_ms + r * (cap - self.min_ms)


class FailureStreak:
    """Consecutive failures of one retried thing (a worker slot, a connection).

    Call `record_success(now)` when it starts working (a worker booted, a client
    connected) and `record_failure(now)` when it stops or fails to start. If it
    had been working for at least `stable_s` when it failed, the streak restarts
    at one failure. `next_delay_ms` is the delay before the next retry.

    Not thread-safe; meant to be owned by one loop.
    """

    __slots__ = ("_up_since", "backoff", "failures", "stable_s")

    def __init__(self, backoff: Backoff, stable_s: float = 30.0) -> None:
        self.backoff = backoff
        self.stable_s = stable_s
        self.failures = 0
        self._up_since: float | None = None

    def record_success(self, now: float) -> None:
        """It works as of `now` (the streak ends if it keeps working for `stable_s`)."""
        if self._up_since is None:
            self._up_since = now

    def record_failure(self, now: float) -> None:
        """It failed (or stopped) at `now`: the streak grows by one."""
        if self._up_since is not None and now - self._up_since >= self.stable_s:
            self.failures = 0
        self._up_since = None
        self.failures += 1

    def next_delay_ms(self, rand: float) -> float:
        """The delay before the next retry: `min_ms` after the first failure, then growing."""
        return self.backoff.delay_ms(max(self.failures - 1, 0), rand)

    def reset(self) -> None:
        """Forget every failure (e.g. after an operator asked for a restart)."""
        self.failures = 0
        self._up_since = None
