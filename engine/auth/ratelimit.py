"""Per-connection rate limiting, abuse detection, per-IP connection counting,
upgrade attempts per second. PURE: the time is an argument (`now`, seconds,
any monotonic origin).

Rules this module owns:

1. Token bucket: a connection may send `rate` messages per second on average,
   with bursts of up to `2 * rate` (`limits.messages_per_s`). A message that
   finds the bucket empty is refused (`err rate_limited`, not processed).
2. Abuse: time is cut into one-second intervals starting at the connection's
   first message. A connection that sent more than `3 * rate` messages in every
   interval for `abuse_window_s` consecutive seconds is abusive (close 4029).
   An interval at or below `3 * rate`, or a silent second, restarts the count.
   Detection therefore happens between `abuse_window_s` and
   `abuse_window_s + 1` seconds after the abuse began.
3. Refusals are answered sparingly: at most one `err rate_limited` per
   interval (`RATE_LIMITED` then `REFUSED_QUIET`), so an abusive client
   cannot make the engine write one reply per message it sends.
4. Past `3 * rate` messages in an interval, refusals say `PAUSE`: the shell
   stops reading the connection until `resume_at` (the next interval), so
   the kernel and TCP flow control hold the rest back. An abusive connection
   thus costs the engine about `3 * rate` messages a second however fast it
   sends, and its next interval again starts over the threshold (rule 2 still
   sees it).
5. State per connection is a few numbers (`RateLimiter` is slotted); the
   per-IP table holds one entry per IP with a live connection.
6. Every inbound frame is one message here: data frames, each continuation
   of a fragmented message, pings and pongs (the shell calls `admit` once per
   frame, close frames aside). A frame flood is thus throttled and closed by
   rules 1-4 like a message flood, whatever the frames hold.
7. Upgrade attempts (`UpgradeLimiter`): per client IP, at most
   `per_ip_per_s` in each one-second window (`UPGRADE_IP_LIMITED`, HTTP 429),
   checked first so that one address cannot spend the worker's budget; then
   per worker, a token bucket of `per_s` a second with a burst of one
   second's worth (`UPGRADE_BUSY`, HTTP 503). 0 turns either off. The per-IP
   table holds the addresses of the current window only, at most
   `MAX_WINDOW_IPS` of them (a new address past that is `UPGRADE_BUSY`).
"""

from __future__ import annotations

from typing import Final

ADMITTED: Final = 0
RATE_LIMITED: Final = 1  # refused: answer `err rate_limited`
REFUSED_QUIET: Final = 2  # refused: already answered this interval, drop silently
ABUSIVE: Final = 3  # close the connection with 4029
PAUSE: Final = 4  # refused, and over 3x the rate: stop reading until `resume_at`

ABUSE_FACTOR: Final = 3.0


class RateLimiter:
    """Token bucket plus abuse detector for one connection (rules 1-3)."""

    __slots__ = ("_answered", "_count", "_interval", "_stamp", "_streak", "_tokens", "policy")

    def __init__(self, policy: RatePolicy, now: float) -> None:
        self.policy = policy
        self._tokens = policy.burst
        self._stamp = now
        self._interval = now  # start of the current one-second interval
        self._count = 0  # messages in the current interval
        self._streak: float | None = None  # start of the current run of abusive intervals
        self._answered = False  # an err was sent in the current interval

    def admit(self, now: float) -> int:
        """Account one inbound message; ADMITTED, RATE_LIMITED, REFUSED_QUIET or ABUSIVE."""
        p = self.policy
        elapsed = now - self._interval
        if elapsed >= 1.0:
            if self._count > p.abuse_threshold and elapsed < 2.0:
                if self._streak is None:
                    self._streak = self._interval
                self._interval += 1.0
            else:
                self._streak = None
                self._interval = now
            self._count = 0
            self._answered = False
            if self._streak is not None and self._interval - self._streak >= p.window_s:
                return ABUSIVE
        self._count += 1
        tokens = self._tokens + (now - self._stamp) * p.rate
        self._stamp = now
        if tokens > p.burst:
            tokens = p.burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return ADMITTED
        self._tokens = tokens
        if not self._answered:
            self._answered = True
            return RATE_LIMITED
        if self._count > p.abuse_threshold:
            return PAUSE
        return REFUSED_QUIET

    @property
    def resume_at(self) -> float:
        """When the current interval ends (after a `PAUSE`, resume reading then)."""
        return self._interval + 1.0


class RatePolicy:
    """The shared settings of every connection's `RateLimiter` (one per worker)."""

    __slots__ = ("abuse_threshold", "burst", "rate", "window_s")

    def __init__(self, messages_per_s: float, abuse_window_s: float) -> None:
        if messages_per_s <= 0 or abuse_window_s <= 0:
            raise ValueError("messages_per_s and abuse_window_s must be > 0")
        self.rate = float(messages_per_s)
        self.burst = 2.0 * self.rate
        self.abuse_threshold = ABUSE_FACTOR * self.rate
        self.window_s = float(abuse_window_s)


UPGRADE_ADMITTED: Final = 0
UPGRADE_BUSY: Final = 1  # the worker is over upgrades_per_s: 503
UPGRADE_IP_LIMITED: Final = 2  # this IP is over upgrades_per_ip_per_s: 429

MAX_WINDOW_IPS: Final = 65_536  # addresses in one window's table (~6 MB at most)


class UpgradeLimiter:
    """Upgrade attempts per second, per worker and per client IP (rule 7)."""

    __slots__ = ("_ips", "_stamp", "_tokens", "_window", "burst", "per_ip", "rate")

    def __init__(self, per_s: float, per_ip_per_s: int, now: float) -> None:
        if per_s < 0 or per_ip_per_s < 0:
            raise ValueError("per_s and per_ip_per_s must be >= 0")
        self.rate = float(per_s)
        self.burst = max(1.0, self.rate)
        self.per_ip = per_ip_per_s
        self._tokens = self.burst
        self._stamp = now
        self._window = now
        self._ips: dict[str, int] = {}

    def admit(self, ip: str, now: float) -> int:
        """Account one upgrade attempt from `ip`: UPGRADE_ADMITTED, UPGRADE_BUSY
        or UPGRADE_IP_LIMITED. A refused attempt still counts for its IP."""
        if self.per_ip:
            if now - self._window >= 1.0:
                self._window = now
                self._ips = {}  # a new table: a cleared dict would keep its peak size
            n = self._ips.get(ip)
            if n is None:
                if len(self._ips) >= MAX_WINDOW_IPS:
                    return UPGRADE_BUSY
                n = 0
            self._ips[ip] = n + 1
            if n >= self.per_ip:
                return UPGRADE_IP_LIMITED
        if self.rate:
            tokens = self._tokens + (now - self._stamp) * self.rate
            self._stamp = now
            if tokens > self.burst:
                tokens = self.burst
            if tokens < 1.0:
                self._tokens = tokens
                return UPGRADE_BUSY
            self._tokens = tokens - 1.0
        return UPGRADE_ADMITTED


class IpCounter:
    """Live connections per client IP, capped at `limit` (0 = no cap)."""

    __slots__ = ("counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def allows(self, ip: str) -> bool:
        """Whether one more connection from `ip` is within the cap."""
        return not self.limit or self.counts.get(ip, 0) < self.limit

    def add(self, ip: str) -> None:
        self.counts[ip] = self.counts.get(ip, 0) + 1

    def remove(self, ip: str) -> None:
        n = self.counts.get(ip, 0) - 1
        if n > 0:
            self.counts[ip] = n
        else:
            self.counts.pop(ip, None)
