from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.backoff import Backoff, FailureStreak


def test_first_retry_waits_the_floor() -> None:
    b = Backoff(100, 10_000)
    assert b.delay_ms(0, 0.0) == 100
    assert b.delay_ms(0, 0.999) == 100


def test_ceiling_doubles_then_caps() -> None:
    b = Backoff(100, 1_000)
    assert [b.ceiling_ms(n) for n in range(6)] == [100, 200, 400, 800, 1_000, 1_000]


def test_jitter_spans_floor_to_ceiling() -> None:
    b = Backoff(100, 10_000)
    assert b.delay_ms(3, 0.0) == 100
    assert b.delay_ms(3, 0.5) == pytest.approx(100 + 0.5 * 700)
    assert b.delay_ms(3, 0.9999) == pytest.approx(800, rel=1e-3)


def test_huge_attempt_is_capped_not_an_overflow() -> None:
    b = Backoff(100, 5_000, factor=3.0)
    assert b.ceiling_ms(100_000) == 5_000
    assert b.delay_ms(100_000, 0.0) == 100


def test_zero_floor_still_grows() -> None:
    b = Backoff(0, 1_000)
    assert b.ceiling_ms(0) == 0
    assert b.ceiling_ms(4) == 16


def test_out_of_range_rand_is_clamped() -> None:
    b = Backoff(100, 1_000)
    assert b.delay_ms(5, -3.0) == 100
    assert b.delay_ms(5, 7.0) == 1_000


@pytest.mark.parametrize(
    ("min_ms", "max_ms", "factor"),
    [(-1, 10, 2.0), (10, 5, 2.0), (1, 10, 0.5), (float("nan"), 10, 2.0), (1, float("inf"), 2.0)],
)
def test_bad_parameters_are_refused(min_ms: float, max_ms: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(min_ms, max_ms, factor)


@given(
    min_ms=st.floats(0, 10_000),
    extra_ms=st.floats(0, 100_000),
    factor=st.floats(1.0, 10.0),
    attempt=st.integers(-5, 10_000),
    rand=st.floats(0.0, 1.0, exclude_max=True),
)
def test_delay_always_within_bounds(
    min_ms: float, extra_ms: float, factor: float, attempt: int, rand: float
) -> None:
    b = Backoff(min_ms, min_ms + extra_ms, factor)
    delay = b.delay_ms(attempt, rand)
    assert min_ms <= delay <= b.ceiling_ms(attempt) <= min_ms + extra_ms


@given(st.integers(0, 200))
def test_ceiling_never_shrinks(attempt: int) -> None:
    b = Backoff(50, 60_000, 1.7)
    assert b.ceiling_ms(attempt) <= b.ceiling_ms(attempt + 1)


def test_streak_grows_with_consecutive_failures() -> None:
    s = FailureStreak(Backoff(100, 10_000), stable_s=30)
    ceilings = []
    for t in range(5):
        s.record_failure(float(t))
        ceilings.append(s.next_delay_ms(0.9999999))
    assert s.failures == 5
    assert ceilings == pytest.approx([100, 200, 400, 800, 1_600], rel=1e-4)


def test_short_success_does_not_end_the_streak() -> None:
    s = FailureStreak(Backoff(100, 10_000), stable_s=30)
    s.record_failure(0.0)
    s.record_success(1.0)
    s.record_failure(5.0)  # ran 4 s: not stable
    assert s.failures == 2


def test_stable_run_ends_the_streak() -> None:
    s = FailureStreak(Backoff(100, 10_000), stable_s=30)
    for t in range(4):
        s.record_failure(float(t))
    s.record_success(10.0)
    s.record_success(20.0)  # a later success does not move the start of the run
    s.record_failure(40.0)  # ran 30 s
    assert s.failures == 1
    assert s.next_delay_ms(0.99) == 100


def test_success_restarts_the_clock_only_after_a_failure() -> None:
    s = FailureStreak(Backoff(100, 10_000), stable_s=30)
    s.record_success(0.0)
    s.record_failure(10.0)
    s.record_success(20.0)
    s.record_failure(45.0)  # 25 s since the last start: still a streak
    assert s.failures == 2


def test_reset_forgets_failures() -> None:
    s = FailureStreak(Backoff(100, 10_000))
    s.record_failure(0.0)
    s.record_failure(1.0)
    s.reset()
    assert s.failures == 0
    assert s.next_delay_ms(0.5) == 100
