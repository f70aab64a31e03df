"""Properties of the wire codec (engine/protocol/codec.py), checked with hypothesis.

1. A publisher's `data` comes out of `decode_request` as its exact bytes, and
   reaches a subscriber's decoder as the same value after splicing into `upd`.
2. `decode_request` on any input returns a request or raises
   `RemoteProtocolError` with a protocol error code: never anything else.
3. Positions round trip through their wire form and order as (ms, seq).

Example counts follow the active hypothesis profile (tests/conftest.py), with
a floor of 300 here: `HYPOTHESIS_PROFILE=fuzz` runs far more.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codes import ErrorCode
from engine.errors import RemoteProtocolError
from engine.protocol.codec import (
    KNOWN_OPS,
    Auth,
    Ping,
    Pub,
    Sub,
    Unsub,
    build_snap,
    build_upd,
    decode_frame,
    decode_request,
    format_pos,
    make_pos,
    map_header,
    pack_item,
    pack_str,
    parse_pos,
    valid_topic,
)

ERROR_CODES = frozenset(v for k, v in vars(ErrorCode).items() if k.isupper())
MAX_TOPICS = 4

examples = settings(
    max_examples=max(300, settings().max_examples),  # settings(): the loaded profile
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pack(obj: object, **options: Any) -> bytes:
    out: bytes = msgpack.packb(obj, **options)
    return out


# -- strategies -----------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    st.builds(
        msgpack.Timestamp,
        st.integers(min_value=-(2**40), max_value=2**40),
        st.integers(min_value=0, max_value=999_999_999),
    ),
)
map_keys = st.one_of(st.text(max_size=10), st.integers(-(2**63), 2**64 - 1))

# Any msgpack value a publisher may send (NaN aside: it is not equal to itself,
# and the byte-exact tests below cover it through non-canonical encodings).
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(map_keys, inner, max_size=4),
    ),
    max_leaves=12,
)

# How a publisher may have encoded it: bin as bin or as old-style raw. (float32
# encodings are in the unit tests: most doubles overflow use_single_float.)
packer_options = st.fixed_dictionaries({}, optional={"use_bin_type": st.booleans()})

topic_names = st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)
wire_positions = st.builds(
    lambda ms, seq: f"{ms}-{seq}", st.integers(0, 10**15 - 1), st.integers(0, 2**32 - 1)
)
# Out of range on either side (16-digit MS, SEQ over 32 bits) about half the time.
odd_positions = st.builds(
    lambda ms, seq: f"{ms}-{seq}", st.integers(0, 2 * 10**15), st.integers(0, 2**33)
)

# A valid value for each field of a request (protocol.md section 3) ...
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(0, 2**53 - 1),
    "topics": st.lists(topic_names, min_size=1, max_size=MAX_TOPICS),
    "topic": topic_names,
    "key": st.text(min_size=1, max_size=8),
    "data": values,
    "since": st.dictionaries(
        topic_names,
        st.tuples(st.text(max_size=4), wire_positions).map(list),
        max_size=3,
    ),
    "max_hz": st.one_of(st.floats(min_value=0.01, max_value=1e6), st.integers(1, 1000)),
    "token": st.text(max_size=12),
}
OP_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # op: (required, optional)
    "sub": (("topics",), ("id", "since", "max_hz")),
    "unsub": (("topics",), ("id",)),
    "pub": (("topic", "data"), ("id", "key")),
    "ping": ((), ("id",)),
    "auth": (("token",), ("id",)),
}
# ... and values that are wrong for some field, or right for another.
ODD: st.SearchStrategy[Any] = st.one_of(
    scalars,
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(
        [True, False, -1, 0, 2**53, math.nan, math.inf, -math.inf, "", "a b", "x" * 201]
    ),
    st.lists(st.one_of(topic_names, scalars), max_size=MAX_TOPICS + 2),
    st.lists(st.one_of(topic_names, st.text(max_size=4)), min_size=1, max_size=MAX_TOPICS + 2),
    st.dictionaries(
        st.one_of(topic_names, st.text(max_size=4)),
        st.one_of(
            scalars,
            odd_positions,
            st.tuples(st.text(max_size=4), odd_positions).map(list),
        ),
        max_size=3,
    ),
    st.sampled_from(sorted(KNOWN_OPS)),
)


@st.composite
def request_shaped(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request of some op, then maybe a few fields dropped, spoiled or added."""
    op = draw(st.sampled_from(sorted(OP_FIELDS)))
    required, optional = OP_FIELDS[op]
    fields: dict[str, Any] = {"op": op}
    for name in required + tuple(n for n in optional if draw(st.booleans())):
        fields[name] = draw(GOOD[name])
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["op", *GOOD, "extra"]))
        action = draw(st.sampled_from(["drop", "spoil", "spoil", "swap"]))
        if action == "drop":
            fields.pop(name, None)
        elif action == "spoil":
            fields[name] = draw(ODD)
        else:  # a valid value of another field
            fields[name] = draw(st.sampled_from(list(GOOD.values())).flatmap(lambda s: s))
    return fields


any_topic = st.one_of(topic_names, st.text(max_size=5), st.sampled_from(["", "a b", "x" * 201]))
topic_requests = st.one_of(
    st.fixed_dictionaries(
        {
            "op": st.sampled_from(["sub", "unsub"]),
            "topics": st.lists(any_topic, max_size=MAX_TOPICS + 3),
        },
        optional={"id": GOOD["id"]},
    ),
    st.fixed_dictionaries(
        {"op": st.just("pub"), "topic": any_topic, "data": scalars}, optional={"id": GOOD["id"]}
    ),
)

messages = st.one_of(
    request_shaped(),
    topic_requests,
    # maps with arbitrary field names
    st.dictionaries(
        st.one_of(st.text(max_size=8), map_keys, st.binary(max_size=4)), values, max_size=5
    ),
    # not maps at all
    values,
)


def check_outcome(payload: bytes, fields: object = None) -> None:
    """`decode_request` returns a well-formed request or refuses with a protocol code."""
    try:
        req = decode_request(payload, MAX_TOPICS)
    except RemoteProtocolError as exc:
        assert exc.code in ERROR_CODES
        assert isinstance(exc.message, str)
        if exc.code == ErrorCode.BAD_TOPIC:
            assert exc.topic is not None
        if exc.topic is not None:
            assert isinstance(exc.topic, str)
            assert len(exc.topic) <= 200
        if exc.request_id is not None:
            assert isinstance(exc.request_id, int)
            assert 0 <= exc.request_id < 2**53
            if isinstance(fields, dict):
                assert exc.request_id == fields.get("id")
        if exc.code == ErrorCode.UNKNOWN_OP and isinstance(fields, dict):
            assert fields.get("op") not in KNOWN_OPS
        return
    assert isinstance(req, Sub | Unsub | Pub | Ping | Auth)
    assert req.id is None or (type(req.id) is int and 0 <= req.id < 2**53)
    if isinstance(fields, dict):
        assert req.id == fields.get("id")
    if isinstance(req, Sub | Unsub):
        assert 1 <= len(req.topics) <= MAX_TOPICS
        assert len(set(req.topics)) == len(req.topics)
        assert all(valid_topic(t) for t in req.topics)
    if isinstance(req, Sub):
        assert req.max_hz is None or (
            isinstance(req.max_hz, float) and 0 < req.max_hz < float("inf")
        )
        for topic, (epoch, pos) in req.since.items():
            assert isinstance(topic, str)
            assert isinstance(epoch, str)
            assert parse_pos(format_pos(pos)) == pos
    if isinstance(req, Pub):
        assert valid_topic(req.topic)
        assert req.key is None or (isinstance(req.key, str) and req.key)
        assert type(req.data) is bytes
        assert payload.count(req.data) >= 1
        if isinstance(fields, dict):
            # packb is deterministic: the value packed alone gives the bytes it had in the map
            assert req.data == pack(fields["data"])
    if isinstance(req, Auth):
        assert isinstance(req.token, str)


# -- 1. data round trip ---------------------------------------------------------------------


@examples
@given(
    value=values, options=packer_options, key=st.one_of(st.none(), st.text(min_size=1, max_size=10))
)
def test_pub_data_is_the_publishers_bytes(
    value: object, options: dict[str, bool], key: str | None
) -> None:
    data = pack(value, **options)
    fields: list[bytes] = [pack("op"), pack("pub"), pack("topic"), pack("t"), pack("data"), data]
    if key is not None:
        fields += [pack("key"), pack(key)]
    payload = map_header(len(fields) // 2) + b"".join(fields)
    try:  # the oracle: what a client's decoder makes of the value (codec rule 5)
        msgpack.unpackb(data, raw=False, strict_map_key=False)
    except UnicodeDecodeError:  # bin packed as an old-style raw str: not UTF-8
        with pytest.raises(RemoteProtocolError) as info:
            decode_request(payload, MAX_TOPICS)
        assert info.value.code == ErrorCode.BAD_REQUEST and "UTF-8" in info.value.message
        return
    req = decode_request(payload, MAX_TOPICS)
    assert isinstance(req, Pub)
    assert req.data == data
    assert req.key == key


@examples
@given(value=values)
def test_spliced_data_reaches_subscribers_as_the_published_value(value: object) -> None:
    req = decode_request(pack({"op": "pub", "topic": "t", "key": "k", "data": value}), MAX_TOPICS)
    assert isinstance(req, Pub)
    upd = build_upd(pack_str("t"), make_pos(1_700_000_000_000, 1), [pack_item("k", req.data)])
    snap = build_snap(pack_str("t"), "e", 5, True, [pack_item("k", req.data)])
    expected = msgpack.unpackb(pack(value), strict_map_key=False)
    first, second = decode_frame(upd + snap)
    assert first["items"] == {"k": expected}
    assert second["items"] == {"k": expected}


@examples
@given(st.dictionaries(st.text(max_size=12), scalars, max_size=20), st.integers(0, 2**80))
def test_upd_items_round_trip(items: dict[str, object], pos: int) -> None:
    frame = build_upd(pack_str("topic"), pos, [pack_item(k, pack(v)) for k, v in items.items()])
    (msg,) = decode_frame(frame)
    assert msg == {
        "op": "upd",
        "topic": "topic",
        "pos": format_pos(pos),
        "items": {k: msgpack.unpackb(pack(v), strict_map_key=False) for k, v in items.items()},
    }


# -- 2. never any other exception -------------------------------------------------------------


@examples
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_request_or_a_protocol_error(payload: bytes) -> None:
    check_outcome(payload)


@examples
@given(st.binary(max_size=200), st.integers(0, 15))
def test_arbitrary_bytes_after_a_map_header(body: bytes, n: int) -> None:
    check_outcome(map_header(n) + body)


@examples
@given(messages)
def test_arbitrary_msgpack_objects_are_a_request_or_a_protocol_error(fields: object) -> None:
    check_outcome(pack(fields), fields)


@examples
@given(messages, st.data())
def test_mutated_messages_are_a_request_or_a_protocol_error(
    fields: object, data: st.DataObject
) -> None:
    payload = bytearray(pack(fields))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        at = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if action == "flip" and payload:
            payload[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=5))
        elif action == "delete" and payload:
            del payload[at]
        elif action == "cut":
            del payload[at:]
    check_outcome(bytes(payload))


@examples
@given(messages, st.binary(min_size=1, max_size=10))
def test_trailing_bytes_are_always_refused(fields: object, tail: bytes) -> None:
    try:
        decode_request(pack(fields) + tail, MAX_TOPICS)
    except RemoteProtocolError as exc:
        assert exc.code in ERROR_CODES
    else:
        raise AssertionError("a message with trailing bytes was accepted")


# -- 3. positions -------------------------------------------------------------------------------

ms_values = st.integers(min_value=0, max_value=10**15 - 1)
seq_values = st.integers(min_value=0, max_value=2**32 - 1)


@examples
@given(ms_values, seq_values)
def test_positions_round_trip(ms: int, seq: int) -> None:
    pos = make_pos(ms, seq)
    assert format_pos(pos) == f"{ms}-{seq}"
    assert parse_pos(format_pos(pos)) == pos


@examples
@given(ms_values, seq_values, ms_values, seq_values)
def test_position_order_is_ms_seq_order(ms1: int, seq1: int, ms2: int, seq2: int) -> None:
    a, b = make_pos(ms1, seq1), make_pos(ms2, seq2)
    assert (a < b) == ((ms1, seq1) < (ms2, seq2))
    assert (a == b) == ((ms1, seq1) == (ms2, seq2))


@examples
@given(st.text(max_size=30))
def test_parse_pos_accepts_only_the_wire_form(text: str) -> None:
    try:
        pos = parse_pos(text)
    except RemoteProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
    else:
        ms, _, seq = text.partition("-")
        assert format_pos(pos) == f"{int(ms)}-{int(seq)}"
        assert text.isascii()
