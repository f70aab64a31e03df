"""engine/admin/http.py: the whole-body msgpack reader of /publish (one decode in
C; `data` re-encoded when the body is its own re-encoding, else sliced out by a
walk) gives the field-by-field reader's answer to every body it accepts, and
hands every other body to it."""

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
    st.floats(allow_nan=False, width=32),  # packable as float32 too
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
@given(bodies, st.booleans())
def test_whole_body_reader_agrees_with_the_field_reader(doc: Any, single_float: bool) -> None:
    # float32 is not what msgpack-python writes by default: the body is then
    # not its own re-encoding and `data` is sliced out by the walk
    body = msgpack.packb(doc, use_bin_type=True, use_single_float=single_float)
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
    # a non-minimal encoding of data (int 1 as uint64) is kept byte for byte
    odd = b"\x83\xa5topic\xa1t\xa3key\xa1k\xa4data\xcf" + (1).to_bytes(8, "big")
    fast = http._parse_msgpack_whole(odd, 3)
    assert fast is not None and fast.updates[0].data == b"\xcf" + (1).to_bytes(8, "big")


def test_deep_data_takes_the_field_reader_which_names_it() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    body = msgpack.packb({"items": [{"topic": "t", "key": "k", "data": deep}]})
    assert http._parse_msgpack_whole(body, 3) is None
    kind, (status, _, message, _) = _answer(http._parse_msgpack, body)
    assert (kind, status) == ("error", 400) and "items[0].data" in message
