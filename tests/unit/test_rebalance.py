"""POST /rebalance: parsing and the per-worker shedding plan (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.admin.http import HttpError, RebalanceRequest, parse_rebalance, plan_shedding


def test_parse_accepts_a_target_or_a_fraction() -> None:
    assert parse_rebalance(b'{"connections": 100}') == RebalanceRequest(connections=100)
    assert parse_rebalance(b'{"fraction": 0.25}') == RebalanceRequest(fraction=0.25)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b"{}", b'{"connections": -1}', b'{"connections": 1.5}', b'{"connections": true}',
     b'{"fraction": 0}', b'{"fraction": 1.5}', b'{"fraction": "a"}', b'{"connections": 1, "fraction": 0.5}',
     b'{"conections": 1}'],
)  # fmt: skip
def test_parse_refuses_anything_else_with_400(body: bytes) -> None:
    with pytest.raises(HttpError) as exc:
        parse_rebalance(body)
    assert exc.value.status == 400


def test_plan_takes_the_excess_in_proportion() -> None:
    assert plan_shedding({1: 600, 2: 400}, RebalanceRequest(connections=500)) == {1: 300, 2: 200}
    assert plan_shedding({1: 10, 2: 0}, RebalanceRequest(fraction=0.5)) == {1: 5}
    assert plan_shedding({1: 10, 2: 10}, RebalanceRequest(connections=50)) == {}
    assert plan_shedding({}, RebalanceRequest(fraction=1.0)) == {}


@given(
    st.dictionaries(st.integers(1, 8), st.integers(0, 10_000), min_size=1, max_size=8),
    st.integers(0, 100_000),
)
def test_plan_sheds_exactly_the_excess_never_more_than_held(
    conns: dict[int, int], target: int
) -> None:
    plan = plan_shedding(conns, RebalanceRequest(connections=target))
    assert sum(plan.values()) == max(0, sum(conns.values()) - target)
    assert all(0 < n <= conns[s] for s, n in plan.items())
