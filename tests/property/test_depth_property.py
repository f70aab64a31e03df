"""`nested_deeper_than` (engine/protocol/codec.py rule 5) agrees with the
definition: a scalar is depth 0, a list or dict one more than its deepest child."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engine.protocol.codec import MAX_DATA_DEPTH, nested_deeper_than

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=20), st.dictionaries(st.text(max_size=2), inner, max_size=20)
    ),
    max_leaves=200,
)


def depth(value: Any) -> int:
    if type(value) is list:
        return 1 + max((depth(v) for v in value), default=0)
    if type(value) is dict:
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


@given(values, st.integers(min_value=0, max_value=8))
def test_it_says_whether_the_depth_is_over_the_limit(value: Any, limit: int) -> None:
    assert nested_deeper_than(value, limit) is (depth(value) > limit)


@given(
    st.integers(min_value=0, max_value=3 * MAX_DATA_DEPTH), st.integers(min_value=1, max_value=40)
)
def test_a_deep_value_among_many_shallow_ones_is_found(n: int, width: int) -> None:
    deep: Any = 1
    for i in range(n):
        deep = [deep] if i % 2 else {"k": deep}
    batch = [{"topic": "t", "data": [1, 2]} for _ in range(width)] + [{"data": deep}]
    assert nested_deeper_than(batch, MAX_DATA_DEPTH + 2) is (n + 2 > MAX_DATA_DEPTH + 2)
