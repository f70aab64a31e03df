"""engine/auth/ratelimit.py: the token bucket, the abuse detector, the per-IP counter."""

from __future__ import annotations

import pytest

from engine.auth.ratelimit import (
    ABUSIVE,
    ADMITTED,
    PAUSE,
    RATE_LIMITED,
    REFUSED_QUIET,
    IpCounter,
    RateLimiter,
    RatePolicy,
)


def run(limiter: RateLimiter, per_s: float, seconds: float, t0: float = 0.0) -> list[int]:
    out = []
    n = int(per_s * seconds)
    for i in range(n):
        v = limiter.admit(t0 + i / per_s)
        out.append(v)
        if v == ABUSIVE:
            break
    return out


def test_burst_of_twice_the_rate_then_the_rate() -> None:
    lim = RateLimiter(RatePolicy(10, 5), 0.0)
    verdicts = [lim.admit(0.0) for _ in range(25)]
    assert verdicts[:20] == [ADMITTED] * 20
    assert verdicts[20] == RATE_LIMITED  # answered once ...
    assert set(verdicts[21:]) == {REFUSED_QUIET}  # ... then quietly for the rest of the second
    assert lim.admit(0.1) == ADMITTED  # refilled one token (10/s)
    assert lim.admit(0.1) == REFUSED_QUIET


def test_at_the_rate_everything_is_admitted_for_ever() -> None:
    lim = RateLimiter(RatePolicy(10, 2), 0.0)
    assert set(run(lim, 10, 60)) == {ADMITTED}


def test_sustained_abuse_is_detected_after_the_window() -> None:
    lim = RateLimiter(RatePolicy(10, 3), 0.0)
    verdicts = run(lim, 100, 10)  # 10x the limit
    assert verdicts[-1] == ABUSIVE
    assert RATE_LIMITED in verdicts  # throttled first
    assert PAUSE in verdicts  # and, past 3x in a second, not read for the rest of it
    seconds = len(verdicts) / 100
    assert 3.0 <= seconds <= 4.01


def test_two_times_the_rate_is_throttled_but_never_abusive() -> None:
    lim = RateLimiter(RatePolicy(10, 2), 0.0)
    verdicts = run(lim, 25, 30)
    assert ABUSIVE not in verdicts and PAUSE not in verdicts and RATE_LIMITED in verdicts


def test_pause_lasts_until_the_next_interval_and_abuse_is_still_seen() -> None:
    """What the worker does with PAUSE: read nothing until `resume_at`, then
    read the backlog TCP held back (it arrives at once)."""
    lim = RateLimiter(RatePolicy(10, 3), 0.0)
    t, verdicts = 0.0, []
    while t < 10 and ABUSIVE not in verdicts:
        v = lim.admit(t)
        verdicts.append(v)
        t = max(t, lim.resume_at + 0.001) if v == PAUSE else t + 0.001
    assert verdicts[-1] == ABUSIVE and 3.0 <= t <= 4.1
    # it read about 3x the rate per second, however fast the client sent
    assert len(verdicts) <= 4 * (3 * 10 + 2)


def test_a_pause_restarts_the_abuse_count() -> None:
    lim = RateLimiter(RatePolicy(10, 3), 0.0)
    for start in (0.0, 5.0, 10.0, 15.0):  # 2.5 s of abuse, then 2.5 s of silence
        assert ABUSIVE not in run(lim, 100, 2.5, start)


@pytest.mark.parametrize(("rate", "window"), [(0, 1), (1, 0), (-1, 1)])
def test_policy_needs_positive_settings(rate: float, window: float) -> None:
    with pytest.raises(ValueError):
        RatePolicy(rate, window)


def test_ip_counter() -> None:
    c = IpCounter(2)
    assert c.allows("a")
    c.add("a")
    c.add("a")
    assert not c.allows("a") and c.allows("b")
    c.remove("a")
    assert c.allows("a")
    c.remove("a")
    c.remove("a")  # extra removes are harmless
    assert c.counts == {}
    unlimited = IpCounter(0)
    for _ in range(1000):
        unlimited.add("a")
    assert unlimited.allows("a")
