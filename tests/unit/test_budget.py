"""The send budget and slow-consumer policy (engine/fanout/budget.py).

The property: a connection that writes only what `admits` lets through never
holds more than max(budget, its largest frame) unsent bytes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.fanout.budget import admits, slow_expired, watermarks

BUDGET = 1000


def test_an_empty_buffer_admits_a_frame_larger_than_the_budget() -> None:
    assert admits(0, BUDGET * 10, BUDGET)
    assert admits(0, 1, 0)  # even with a zero budget, one frame at a time goes out


def test_a_frame_that_fills_the_budget_exactly_is_admitted() -> None:
    assert admits(600, 400, BUDGET)
    assert admits(1, BUDGET - 1, BUDGET)


def test_a_frame_one_byte_over_the_budget_is_refused() -> None:
    assert not admits(600, 401, BUDGET)
    assert not admits(1, BUDGET, BUDGET)
    assert not admits(BUDGET, 1, BUDGET)
    assert not admits(BUDGET + 5, 1, BUDGET)  # already over (a big frame went out alone)


def test_an_empty_frame_fits_while_under_the_budget() -> None:
    assert admits(BUDGET, 0, BUDGET)
    assert not admits(BUDGET + 1, 0, BUDGET)


def test_watermarks_pause_at_half_the_budget_and_resume_at_an_eighth() -> None:
    assert watermarks(BUDGET) == (BUDGET // 2, BUDGET // 8)
    assert watermarks(1_048_576) == (524_288, 131_072)
    assert watermarks(7) == (3, 0)
    assert watermarks(0) == (0, 0)
    for budget in (8, 1000, 65_536, 10**9):
        high, low = watermarks(budget)
        assert 0 <= low < high <= budget  # a paused transport still holds under the budget


def test_a_connection_that_is_not_paused_never_expires() -> None:
    assert not slow_expired(None, 1e12, 0.0)
    assert not slow_expired(None, 100.0, 5.0)


def test_a_paused_connection_expires_at_the_timeout_exactly() -> None:
    assert not slow_expired(100.0, 104.999, 5.0)
    assert slow_expired(100.0, 105.0, 5.0)
    assert slow_expired(100.0, 1000.0, 5.0)


def test_a_zero_timeout_expires_at_once() -> None:
    assert slow_expired(100.0, 100.0, 0.0)


def test_a_clock_that_went_backwards_does_not_expire() -> None:
    assert not slow_expired(100.0, 99.0, 5.0)


@given(
    budget=st.integers(0, 5000),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("frame"), st.integers(0, 8000)),
            st.tuples(st.just("drain"), st.integers(0, 8000)),
        ),
        max_size=60,
    ),
)
def test_the_buffer_never_exceeds_the_budget_or_one_frame(
    budget: int, steps: list[tuple[str, int]]
) -> None:
    buffered = 0
    biggest = 0
    for op, n in steps:
        if op == "frame":
            if admits(buffered, n, budget):
                buffered += n
                biggest = max(biggest, n)
                assert buffered <= max(budget, n)
            else:
                assert buffered > 0  # an empty buffer always admits
        else:
            buffered = max(0, buffered - n)
        assert buffered <= max(budget, biggest)
