"""engine/admin/http.py: the whole-body msgpack reader of /publish (one decode in
C, then a walk that slices `data`) gives the field-by-field reader's answer to
every body it accepts, and hands every other body to it."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.admin import http

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from(["topic", "key", "data", "extra", "items"])
field_values = st.one_of(st.sampled_from(["t", "k", "a b", ""]), values)
items = st.dictionaries(names, field_values, max_size=4)
good_items = st.fixed_dictionaries(
    {"topic": st.sampled_from(["t", "u.1"]), "key": st.sampled_from(["k", "x"]), "data": values}
)
bodies = st.one_of(
    items,
    good_items,
    st.fixed_dictionaries({"items": st.lists(st.one_of(good_items, items), max_size=4)}),
    values,
)


def _answer(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        request = parse(body, 3)
    except http.HttpError as exc:
        return "error", (exc.status, exc.error, exc.message, exc.topic)
    return "ok", request


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_whole_body_reader_agrees_with_the_field_reader(doc: Any) -> None:
    body = msgpack.packb(doc, use_bin_type=True)
    fast = http._parse_msgpack_whole(body, 3)
    slow = _answer(http._parse_msgpack_fields, body)
    if fast is not None:
        assert slow == ("ok", fast)
        for update in fast.updates:  # `data` is the publisher's bytes (rule 3)
            assert update.data in body
    assert _answer(http._parse_msgpack, body) == slow


def test_duplicate_field_and_non_string_names_take_the_field_reader() -> None:
    dup = b"\x83\xa5topic\xa1t\xa3key\xa1k\xa5topic\xa1u"  # {"topic","key","topic"}
    assert http._parse_msgpack_whole(dup, 3) is None
    with_int = msgpack.packb({"topic": "t", "key": "k", "data": 1, 1: 2})
    assert http._parse_msgpack_whole(with_int, 3) is None
    ok = msgpack.packb({"topic": "t", "key": "k", "data": [1, {"a": 2}]})
    fast = http._parse_msgpack_whole(ok, 3)
    assert fast is not None and fast.updates[0].data == msgpack.packb([1, {"a": 2}])
