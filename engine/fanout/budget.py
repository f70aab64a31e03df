"""Send budget and slow-consumer policy. PURE: no I/O.

The budget is the server's view of a browser's `bufferedAmount`: bytes handed
to the socket and not yet written (`fanout.max_buffer_bytes`).

Rules:
1. A frame is admitted when nothing is buffered (so a frame larger than the
   budget can still go out, alone), or when it fits under the budget with what
   is buffered. So the buffer never exceeds max(budget, one frame).
2. A refused frame is not queued anywhere: the fan-out core remembers the
   connection's last delivered position per topic instead (overflow policy
   "conflate": memory per slow client is bounded by its subscriptions).
3. A connection is slow from the moment its transport pauses (over half the
   budget) or a frame is refused, until its buffer drains (below an eighth).
   A connection that stays slow longer than
   `fanout.slow_client_timeout_s` is closed with 4008 (overflow policy "evict").
"""

from __future__ import annotations


def admits(buffered: int, frame_bytes: int, budget: int) -> bool:
    """Whether a frame of `frame_bytes` may be written with `buffered` bytes queued."""
    return buffered == 0 or buffered + frame_bytes <= budget


def watermarks(budget: int) -> tuple[int, int]:
    """(high, low) write-buffer limits for a transport.

    Over `high` (half the budget) the transport pauses and the connection counts
    as slow: it is sent nothing new, so what it holds stays under the budget.
    Below `low` (an eighth) it resumes and gets its catch-up."""
    return budget // 2, budget // 8


def slow_expired(paused_since: float | None, now: float, timeout_s: float) -> bool:
    """Whether a connection paused since `paused_since` has been over budget too long."""
    return paused_since is not None and now - paused_since >= timeout_s
