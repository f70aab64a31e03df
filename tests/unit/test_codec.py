"""The wire codec (engine/protocol/codec.py) against protocol.md sections 1, 3 and 4.

Client messages are fed whole, cut short at every byte, and with trailing
bytes; every refusal is checked for the code and request id a client would
receive in its `err`.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from engine.codes import ErrorCode
from engine.errors import RemoteProtocolError
from engine.protocol.codec import (
    CLIENT_MAX_DEPTH,
    MAX_DATA_DEPTH,
    NIL,
    Auth,
    Ping,
    Pub,
    Request,
    Sub,
    Unsub,
    ack,
    array_header,
    bounded_unpacker,
    build_evt,
    build_gap,
    build_snap,
    build_stream_snap,
    build_upd,
    bye,
    container_at,
    data_problem,
    decode_frame,
    decode_request,
    decode_server_frame,
    err,
    format_pos,
    hello,
    iter_items,
    make_pos,
    map_header,
    nested_deeper_than,
    pack_event,
    pack_item,
    pack_str,
    parse_pos,
    pong,
    read_raw,
    utf8_problem,
    valid_topic,
)
from engine.protocol.codec import Undecodable as UndecodableValue

MAX_TOPICS = 8
NOW_MS = 1_700_000_000_123  # a realistic wall-clock millisecond: positions exceed 64 bits


def pack(obj: object, **options: Any) -> bytes:
    out: bytes = msgpack.packb(obj, **options)
    return out


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, strict_map_key=False)


def decode(fields: object, max_topics: int = MAX_TOPICS) -> Request:
    return decode_request(pack(fields), max_topics)


def refusal(payload: bytes, max_topics: int = MAX_TOPICS) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_request(payload, max_topics)
    return info.value


def refused(fields: object, max_topics: int = MAX_TOPICS) -> RemoteProtocolError:
    return refusal(pack(fields), max_topics)


def pub_payload(data: bytes, *, first: bool = False) -> bytes:
    """A `pub` message whose `data` value is exactly `data` (however it was encoded)."""
    head = pack("op") + pack("pub") + pack("topic") + pack("t") + pack("key") + pack("k")
    if first:
        return map_header(4) + pack("data") + data + head
    return map_header(4) + head + pack("data") + data


# -- valid requests --------------------------------------------------------------------


def test_sub_with_topics_only() -> None:
    assert decode({"op": "sub", "topics": ["prices.fx", "scores"]}) == Sub(
        None, ("prices.fx", "scores"), {}, None
    )


def test_sub_with_id_since_and_max_hz() -> None:
    req = decode(
        {
            "op": "sub",
            "id": 7,
            "topics": ["prices.fx", "scores"],
            "since": {"prices.fx": ["ep-1", f"{NOW_MS}-3"], "scores": ["ep-1", "0-0"]},
            "max_hz": 2.5,
        }
    )
    assert req == Sub(
        7,
        ("prices.fx", "scores"),
        {"prices.fx": ("ep-1", make_pos(NOW_MS, 3)), "scores": ("ep-1", 0)},
        2.5,
    )


def test_sub_integer_max_hz_becomes_float() -> None:
    req = decode({"op": "sub", "topics": ["a"], "max_hz": 10})
    assert isinstance(req, Sub)
    assert req.max_hz == 10.0
    assert isinstance(req.max_hz, float)


def test_sub_drops_repeated_topics_keeping_order() -> None:
    req = decode({"op": "sub", "topics": ["b", "a", "b", "c", "a"]})
    assert isinstance(req, Sub)
    assert req.topics == ("b", "a", "c")


def test_sub_with_nil_since_and_nil_max_hz_is_as_if_absent() -> None:
    assert decode({"op": "sub", "topics": ["a"], "since": None, "max_hz": None}) == Sub(
        None, ("a",), {}, None
    )


def test_unsub() -> None:
    assert decode({"op": "unsub", "id": 3, "topics": ["a", "b"]}) == Unsub(3, ("a", "b"))


def test_pub_with_key() -> None:
    req = decode({"op": "pub", "id": 9, "topic": "prices.fx", "key": "EURUSD", "data": 1.0842})
    assert req == Pub(9, "prices.fx", "EURUSD", pack(1.0842))


def test_pub_without_key() -> None:
    assert decode({"op": "pub", "topic": "events", "data": "x"}) == Pub(
        None, "events", None, pack("x")
    )


def test_pub_with_nil_data_is_a_deletion() -> None:
    req = decode({"op": "pub", "topic": "t", "key": "k", "data": None})
    assert isinstance(req, Pub)
    assert req.data == NIL


def test_ping() -> None:
    assert decode({"op": "ping"}) == Ping(None)
    assert decode({"op": "ping", "id": 4}) == Ping(4)


def test_auth() -> None:
    assert decode({"op": "auth", "id": 1, "token": "a.b.c"}) == Auth(1, "a.b.c")


@pytest.mark.parametrize("rid", [0, 1, 127, 2**16, 2**32, 2**53 - 1])
def test_id_is_echoed(rid: int) -> None:
    assert decode({"op": "ping", "id": rid}) == Ping(rid)


def test_field_order_does_not_matter() -> None:
    payload = map_header(3) + pack("id") + pack(5) + pack("topics") + pack(["a"])
    payload += pack("op") + pack("unsub")
    assert decode_request(payload, MAX_TOPICS) == Unsub(5, ("a",))


def test_unknown_fields_are_ignored() -> None:
    assert decode({"op": "ping", "id": 2, "trace": {"x": [1, 2]}, "v": 1}) == Ping(2)


@pytest.mark.parametrize(
    "name",
    ["a", "A" * 200, "prices.fx", "user:42", "a-b_c.d:e", "0", "...", "-", "Z9"],
)
def test_valid_topic_names(name: str) -> None:
    assert valid_topic(name)
    assert decode({"op": "sub", "topics": [name]}) == Sub(None, (name,), {}, None)


def test_exactly_max_topics_is_accepted() -> None:
    topics = [f"t{i}" for i in range(MAX_TOPICS)]
    req = decode({"op": "sub", "topics": topics})
    assert isinstance(req, Sub)
    assert req.topics == tuple(topics)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_payload_as_any_buffer_gives_pub_data_as_bytes(kind: type) -> None:
    raw = pack({"op": "pub", "topic": "t", "key": "k", "data": [1, "two", b"3"]})
    req = decode_request(kind(raw), MAX_TOPICS)
    assert isinstance(req, Pub)
    # bytes, not a view: a picows frame buffer is only valid inside on_ws_frame.
    assert type(req.data) is bytes
    assert req.data == pack([1, "two", b"3"])


# -- Pub.data is the publisher's bytes, exactly --------------------------------------------

DATA_VALUES: list[object] = [
    None,
    True,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    -0.0,
    math.inf,
    "",
    "héllo wörld ✓",
    b"",
    b"\x00\xff\xc0",
    [],
    {},
    [1, [2, [3, [4]]]],
    {"a": {"b": {"c": [1, 2.5, None, b"x"]}}},
    {1: "int key", "s": 2},
    msgpack.ExtType(5, b"xyz"),
    msgpack.ExtType(127, b""),
    msgpack.Timestamp(1_700_000_000, 5),
    "x" * 70_000,
    list(range(20)),
]


@pytest.mark.parametrize("value", DATA_VALUES, ids=repr)
@pytest.mark.parametrize("first", [False, True], ids=["data-last", "data-first"])
def test_pub_data_is_exactly_the_packed_value(value: object, first: bool) -> None:
    data = pack(value)
    req = decode_request(pub_payload(data, first=first), MAX_TOPICS)
    assert isinstance(req, Pub)
    assert req.data == data
    assert (req.topic, req.key) == ("t", "k")


def test_pub_data_bytes_equal_those_inside_the_packed_map() -> None:
    value = {"bid": 1.0842, "ask": 1.0844, "depth": [[1, 2], [3, 4]], "raw": b"\x01"}
    whole = pack({"op": "pub", "topic": "t", "key": "k", "data": value})
    req = decode_request(whole, MAX_TOPICS)
    assert isinstance(req, Pub)
    assert whole.endswith(req.data)
    assert req.data == pack(value)


@pytest.mark.parametrize(
    "data",
    [
        pack(1.5, use_single_float=True),  # float32
        pack(b"old raw", use_bin_type=False),  # raw str without bin type
        b"\xcf" + (1).to_bytes(8, "big"),  # 1 as uint64: not the shortest form
        b"\xd9\x01a",  # "a" as str8
        b"\xdc\x00\x01\x01",  # [1] as array16
        b"\xde\x00\x00",  # {} as map16
        b"\xcb" + bytes.fromhex("7ff8000000000001"),  # a NaN with a payload
        b"\xd6\xff" + (1).to_bytes(4, "big"),  # timestamp32 ext
    ],
    ids=repr,
)
def test_pub_data_keeps_non_canonical_encodings(data: bytes) -> None:
    req = decode_request(pub_payload(data), MAX_TOPICS)
    assert isinstance(req, Pub)
    assert req.data == data


def test_pub_data_spliced_into_upd_reaches_subscribers_intact() -> None:
    value = {"a": [1, 2.5, None, b"\x00"], "n": msgpack.ExtType(3, b"e")}
    req = decode(
        {"op": "pub", "topic": "prices.fx", "key": "EURUSD", "data": value},
    )
    assert isinstance(req, Pub)
    frame = build_upd(pack_str(req.topic), make_pos(NOW_MS, 0), [pack_item("EURUSD", req.data)])
    assert req.data in frame
    assert decode_frame(frame)[0]["items"] == {"EURUSD": value}


# -- refusals: not a map, truncated, trailing bytes -------------------------------------


@pytest.mark.parametrize(
    "payload",
    [pack([1, 2]), pack(["op", "ping"]), pack(1), pack("ping"), pack(None), pack(True), pack(b"x")],
    ids=["array", "array-of-pairs", "int", "str", "nil", "bool", "bin"],
)
def test_not_a_map_is_bad_request(payload: bytes) -> None:
    exc = refusal(payload)
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id is None


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\xff", b"\x81\xc1\xc0"])
def test_empty_or_undecodable_bytes_are_bad_request(payload: bytes) -> None:
    assert refusal(payload).code == ErrorCode.BAD_REQUEST


VALID_MESSAGES = [
    {"op": "sub", "id": 1, "topics": ["a", "b"], "since": {"a": ["e", "1-2"]}, "max_hz": 5.0},
    {"op": "pub", "id": 2, "topic": "t", "key": "k", "data": {"x": [1, b"y", 2.5]}},
    {"op": "ping", "id": 3},
    {"op": "auth", "token": "tok"},
]


@pytest.mark.parametrize("fields", VALID_MESSAGES, ids=lambda f: f["op"])
def test_every_truncation_is_bad_request(fields: dict[str, Any]) -> None:
    whole = pack(fields)
    decode_request(whole, MAX_TOPICS)  # the whole message is fine
    for cut in range(len(whole)):
        exc = refusal(whole[:cut])
        assert exc.code == ErrorCode.BAD_REQUEST, cut


@pytest.mark.parametrize("fields", VALID_MESSAGES, ids=lambda f: f["op"])
@pytest.mark.parametrize("tail", [b"\x00", b"\xc0", b"\x80", b"\xff\xff", b"garbage"])
def test_trailing_bytes_are_bad_request(fields: dict[str, Any], tail: bytes) -> None:
    exc = refusal(pack(fields) + tail)
    assert exc.code == ErrorCode.BAD_REQUEST


def test_two_messages_in_one_frame_are_bad_request() -> None:
    one = pack({"op": "ping", "id": 1})
    exc = refusal(one + pack({"op": "ping", "id": 2}))
    assert exc.code == ErrorCode.BAD_REQUEST
    assert "one message per frame" in exc.message


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_trailing_bytes_are_refused_whatever_the_buffer_type(kind: type) -> None:
    payload = pack({"op": "pub", "topic": "t", "data": 1}) + b"\x01"
    with pytest.raises(RemoteProtocolError) as info:
        decode_request(kind(payload), MAX_TOPICS)
    assert info.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "payload",
    [
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4G pairs, none present
        b"\x81\xa2op\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\x81\xa2op\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\x81\xa2op\xdd\xff\xff\xff\xff",  # array32 claiming 4G elements
        b"\x81\xa4data\xdf\xff\xff\xff\xff",  # data: map32 claiming 4G pairs
        b"\x81\xa4data\xc9\xff\xff\xff\xff\x05",  # data: ext32 claiming 4 GiB
    ],
    ids=repr,
)
def test_lengths_beyond_the_frame_are_bad_request(payload: bytes) -> None:
    assert refusal(payload).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("field", ["x", "data"])
def test_deep_nesting_is_bad_request(field: str) -> None:
    payload = b"\x82" + pack("op") + pack("ping") + pack(field) + b"\x91" * 5000 + b"\xc0"
    assert refusal(payload).code == ErrorCode.BAD_REQUEST


def test_nesting_a_publisher_may_use_is_accepted() -> None:
    value = nested(MAX_DATA_DEPTH, None)
    req = decode({"op": "pub", "topic": "t", "data": value})
    assert isinstance(req, Pub)
    assert req.data == pack(value)


def nested(depth: int, leaf: object = 1) -> object:
    """`leaf` inside `depth` arrays (depth 0: the leaf itself)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


BAD_UTF8 = b"\xed\xa0\x80"  # U+D800 encoded as a character: not UTF-8


def with_bytes(value: object, marker: str, raw: bytes) -> bytes:
    """`value` packed, with the str `marker` replaced by a str of the bytes `raw`."""
    packed = pack(value)
    assert packed.count(pack(marker)) == 1
    return packed.replace(pack(marker), bytes([0xA0 | len(raw)]) + raw)


# -- rule 5: only values every client can decode ---------------------------------------


def test_the_nesting_limit_is_32_and_clients_decode_it_inside_a_message() -> None:
    assert MAX_DATA_DEPTH == 32
    assert CLIENT_MAX_DEPTH == MAX_DATA_DEPTH + 3  # message map, items, [pos, data]


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("s", 0), ([], 1), ({}, 1), ([1], 1), ({"a": []}, 2), ([[{}]], 3), ({1: [[]]}, 3)],
    ids=repr,
)
def test_nested_deeper_than_counts_arrays_and_maps(value: object, depth: int) -> None:
    assert not nested_deeper_than(value, depth)
    if depth:
        assert nested_deeper_than(value, depth - 1)


def test_nested_deeper_than_needs_no_recursion() -> None:
    assert nested_deeper_than(nested(100_000), MAX_DATA_DEPTH)


@pytest.mark.parametrize(
    "value", [*DATA_VALUES, nested(MAX_DATA_DEPTH), nested(MAX_DATA_DEPTH - 1, {})], ids=repr
)
def test_data_every_client_decodes_passes(value: object) -> None:
    assert data_problem(pack(value)) is None


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (pack(nested(MAX_DATA_DEPTH + 1)), "32"),
        (pack(nested(MAX_DATA_DEPTH, {})), "32"),  # an empty map one level too deep
        (pack({"a": nested(MAX_DATA_DEPTH)}), "32"),
        (pack(nested(1000)), "32"),
        (b"\x91" * 5000 + b"\x01", "32"),  # past msgpack's own stack
        (with_bytes(["S"], "S", BAD_UTF8), "UTF-8"),
        (with_bytes({"K": 1}, "K", BAD_UTF8), "UTF-8"),  # a map key
        (with_bytes({"a": {"b": ["x", "S"]}}, "S", b"\xff"), "UTF-8"),
        (b"\x81\x91\x01\x02", "map key"),  # [1] as a map key
        (b"\xd6\xff\x00\x00", "msgpack"),  # a timestamp ext of a bad size: malformed
    ],
    ids=repr,
)
def test_data_a_client_cannot_decode_is_refused_saying_why(data: bytes, words: str) -> None:
    problem = data_problem(data)
    assert problem is not None and words in problem


def test_a_lone_surrogate_is_named() -> None:
    assert utf8_problem("é€𝄞 fine") is None
    problem = utf8_problem("ok\ud83d")
    assert problem is not None and "U+D83D" in problem and "UTF-8" in problem


def test_pub_of_data_too_deep_is_bad_request_naming_the_limit() -> None:
    exc = refused({"op": "pub", "id": 4, "topic": "t", "key": "k", "data": nested(33)})
    assert exc.code == ErrorCode.BAD_REQUEST and exc.request_id == 4 and exc.topic == "t"
    assert "'data'" in exc.message and "32" in exc.message


def test_pub_of_data_not_utf8_is_bad_request() -> None:
    payload = with_bytes(
        {"op": "pub", "id": 5, "topic": "t", "key": "k", "data": {"S": 1}}, "S", BAD_UTF8
    )
    exc = refusal(payload)
    assert exc.code == ErrorCode.BAD_REQUEST and exc.request_id == 5
    assert "'data'" in exc.message and "UTF-8" in exc.message


def test_a_string_field_not_utf8_is_bad_request_naming_it() -> None:
    payload = with_bytes(
        {"id": 6, "op": "pub", "topic": "t", "key": "KEY", "data": 1}, "KEY", BAD_UTF8
    )
    exc = refusal(payload)
    assert exc.code == ErrorCode.BAD_REQUEST and exc.request_id == 6
    assert "'key'" in exc.message and "UTF-8" in exc.message


# -- rule 5: a client decoding what it can -----------------------------------------------


def test_a_good_frame_decodes_as_decode_frame_does() -> None:
    frame = b"".join(
        [
            ack(1),
            build_upd(
                pack_str("t"), make_pos(5, 0), [pack_item("k", pack(nested(MAX_DATA_DEPTH)))]
            ),
            build_evt(pack_str("s"), [pack_event(make_pos(6, 1), pack({1: [b"x"]}))]),
        ]
    )
    assert decode_server_frame(frame) == decode_frame(frame)


def test_values_a_client_cannot_decode_become_undecodable_and_the_rest_is_kept() -> None:
    bad = with_bytes({"a": "S"}, "S", BAD_UTF8)
    deep = pack(nested(MAX_DATA_DEPTH + 1))
    frame = b"".join(
        [
            build_upd(
                pack_str("t"),
                make_pos(1, 0),
                [
                    pack_item("a", pack(1)),
                    pack_item("bad", bad),
                    pack_item("deep", deep),
                    pack_item("z", NIL),
                ],
            ),
            build_evt(
                pack_str("s"),
                [pack_event(make_pos(2, 0), bad), pack_event(make_pos(2, 1), pack("ok"))],
            ),
            build_stream_snap(
                pack_str("s"), "e", make_pos(2, 1), True, [pack_event(make_pos(2, 0), deep)]
            ),
            build_snap(pack_str("t"), "e", make_pos(1, 0), True, [pack_item("deep", deep)]),
            pong(3, 7),
        ]
    )
    upd, evt, ssnap, snap, pong_msg = decode_server_frame(frame)
    assert upd["op"] == "upd" and upd["pos"] == "1-0"
    assert upd["items"]["a"] == 1 and upd["items"]["z"] is None
    assert (
        isinstance(upd["items"]["bad"], UndecodableValue) and "UTF-8" in upd["items"]["bad"].reason
    )
    assert (
        isinstance(upd["items"]["deep"], UndecodableValue) and "32" in upd["items"]["deep"].reason
    )
    assert evt["items"][0][0] == "2-0" and isinstance(evt["items"][0][1], UndecodableValue)
    assert evt["items"][1] == ["2-1", "ok"]
    assert isinstance(ssnap["items"][0][1], UndecodableValue) and ssnap["full"] is True
    assert isinstance(snap["items"]["deep"], UndecodableValue)
    assert pong_msg == {"op": "pong", "id": 3, "ts": 7}


def test_a_too_deep_value_in_a_decodable_frame_is_undecodable_too() -> None:
    frame = build_upd(pack_str("t"), make_pos(1, 0), [pack_item("deep", pack(nested(40)))])
    (upd,) = decode_server_frame(frame)
    assert isinstance(upd["items"]["deep"], UndecodableValue)
    assert decode_server_frame(frame, limit=40)[0]["items"]["deep"] == nested(40)


@pytest.mark.parametrize("op", ["upd", "snap", "evt"])
def test_only_the_value_past_the_limit_is_undecodable_among_many_at_the_limit(op: str) -> None:
    # the whole message is judged in one pass first (codec `_mark_deep`): a value
    # exactly at the limit beside one just past it must still be told apart
    values = {f"k{i}": nested(8 if i != 7 else 9) for i in range(20)}
    if op == "evt":
        items: Any = [[f"{i}-0", v] for i, v in enumerate(values.values())]
    else:
        items = values
    frame = msgpack.packb({"op": op, "topic": "t", "pos": [1, 0], "items": items})
    (msg,) = decode_server_frame(frame, limit=8)
    got = [v for _, v in msg["items"]] if op == "evt" else list(msg["items"].values())
    assert [isinstance(v, UndecodableValue) for v in got] == [i == 7 for i in range(20)]
    assert got[0] == nested(8)
    (msg,) = decode_server_frame(frame, limit=9)  # all within a limit of 9: none marked
    got = [v for _, v in msg["items"]] if op == "evt" else list(msg["items"].values())
    assert not any(isinstance(v, UndecodableValue) for v in got)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x91\x01",  # a message that is not a map
        b"\xc1",  # an unknown type byte
        pack({"op": "upd", "items": {"k": 1}})[:-1]
        + b"\xc1",  # ... inside a value: no length to skip
        b"\x81" + with_bytes("S", "S", BAD_UTF8) + pack(1),  # a field name that is not UTF-8
        b"\x82\xa2op\xa3upd\xa5items\xde\x00\x01\x91\x01\x01",  # [1] as an item key
    ],
    ids=repr,
)
def test_a_broken_frame_is_a_value_error(frame: bytes) -> None:
    with pytest.raises(ValueError):
        decode_server_frame(frame)


def test_every_truncation_of_a_frame_with_a_bad_value_is_a_value_error() -> None:
    bad = with_bytes(["S"], "S", BAD_UTF8)
    frame = build_upd(
        pack_str("t"), make_pos(1, 0), [pack_item("k", bad), pack_item("n", pack(nested(40)))]
    )
    assert decode_server_frame(b"") == []
    for n in range(1, len(frame)):
        with pytest.raises(ValueError):
            decode_server_frame(frame[:n])


# -- refusals: fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pack({1: "x", "op": "ping"}),
        pack({b"op": "ping"}, use_bin_type=True),
        pack({None: 1, "op": "ping"}),
        pack({1.5: 1, "op": "ping"}),
    ],
    ids=["int", "bin", "nil", "float"],
)
def test_non_string_field_names_are_bad_request(payload: bytes) -> None:
    assert refusal(payload).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("op", [None, 1, True, b"sub", ["sub"], {"op": "sub"}])
def test_missing_or_ill_typed_op_is_bad_request_with_id(op: object) -> None:
    fields: dict[str, object] = {"id": 11, "topics": ["a"]}
    if op is not None:
        fields["op"] = op
    exc = refused(fields)
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 11


@pytest.mark.parametrize("op", ["subscribe", "SUB", "Ping", "", "upd", "snap", "hello", "ack"])
def test_unknown_op(op: str) -> None:
    exc = refused({"op": op, "id": 12})
    assert exc.code == ErrorCode.UNKNOWN_OP
    assert exc.request_id == 12


def test_unknown_op_without_id() -> None:
    exc = refused({"op": "nope"})
    assert exc.code == ErrorCode.UNKNOWN_OP
    assert exc.request_id is None


BAD_TOPICS = [
    "",
    "a" * 201,
    "a b",
    " a",
    "a\n",
    "prïces",
    "价格",
    "a/b",
    "a*",
    "a>",
    "a\x00b",
    "\uff41",  # fullwidth letter a
]


@pytest.mark.parametrize("name", BAD_TOPICS, ids=repr)
def test_bad_topic_in_sub_names_the_topic(name: str) -> None:
    assert not valid_topic(name)
    exc = refused({"op": "sub", "id": 21, "topics": ["ok", name]})
    assert exc.code == ErrorCode.BAD_TOPIC
    assert exc.request_id == 21
    assert exc.topic == name[:200]  # echoed, bounded


@pytest.mark.parametrize("name", BAD_TOPICS, ids=repr)
def test_bad_topic_in_unsub_names_the_topic(name: str) -> None:
    exc = refused({"op": "unsub", "id": 22, "topics": [name]})
    assert exc.code == ErrorCode.BAD_TOPIC
    assert exc.request_id == 22
    assert exc.topic == name[:200]


@pytest.mark.parametrize("name", BAD_TOPICS, ids=repr)
def test_bad_topic_in_pub_names_the_topic(name: str) -> None:
    exc = refused({"op": "pub", "id": 23, "topic": name, "key": "k", "data": 1})
    assert exc.code == ErrorCode.BAD_TOPIC
    assert exc.request_id == 23
    assert exc.topic == name[:200]


def test_sub_names_the_first_refused_topic() -> None:
    exc = refused({"op": "sub", "topics": ["ok", "bad one", "bad/two"]})
    assert exc.code == ErrorCode.BAD_TOPIC
    assert exc.topic == "bad one"


def test_a_very_long_bad_topic_is_echoed_bounded() -> None:
    exc = refused({"op": "sub", "topics": ["x" * 10_000]})
    assert exc.code == ErrorCode.BAD_TOPIC
    assert exc.topic is not None
    assert len(exc.topic) <= 200
    assert len(exc.message) < 200


@pytest.mark.parametrize("op", ["sub", "unsub"])
@pytest.mark.parametrize(
    "topics",
    [None, "a", [], {"a": 1}, [1], ["a", None], [b"a"], [["a"]]],
    ids=repr,
)
def test_ill_typed_topics_are_bad_request(op: str, topics: object) -> None:
    fields: dict[str, object] = {"op": op, "id": 31}
    if topics is not None:
        fields["topics"] = topics
    exc = refused(fields)
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 31


@pytest.mark.parametrize("op", ["sub", "unsub"])
def test_too_many_topics(op: str) -> None:
    exc = refused({"op": op, "id": 32, "topics": [f"t{i}" for i in range(4)]}, max_topics=3)
    assert exc.code == ErrorCode.TOO_MANY_TOPICS
    assert exc.request_id == 32


@pytest.mark.parametrize(
    "since",
    [
        [],
        "1-2",
        1,
        {"a": "1-2"},
        {"a": ["e"]},
        {"a": ["e", "1-2", "x"]},
        {"a": ["e", 5]},
        {"a": [1, "1-2"]},
        {"a": [None, "1-2"]},
        {"a": ["e", "nope"]},
        {"a": ["e", "1-4294967296"]},
        {"a": None},
    ],
    ids=repr,
)
def test_ill_typed_since_is_bad_request(since: object) -> None:
    exc = refused({"op": "sub", "id": 41, "topics": ["a"], "since": since})
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 41


def test_since_with_a_bin_key_is_bad_request() -> None:
    # strict_map_key lets bin keys through the unpacker; a topic name is a str.
    exc = refused({"op": "sub", "id": 42, "topics": ["a"], "since": {b"a": ["e", "1-2"]}})
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 42


def test_since_with_a_bad_position_names_the_topic() -> None:
    exc = refused({"op": "sub", "id": 43, "topics": ["a"], "since": {"a": ["e", "x-1"]}})
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.topic == "a"
    assert exc.request_id == 43


@pytest.mark.parametrize(
    "max_hz",
    [True, False, 0, 0.0, -0.0, -1, -0.5, math.nan, math.inf, -math.inf, "5", [5], b"5"],
    ids=repr,
)
def test_ill_typed_max_hz_is_bad_request(max_hz: object) -> None:
    exc = refused({"op": "sub", "id": 51, "topics": ["a"], "max_hz": max_hz})
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 51


@pytest.mark.parametrize(
    "rid",
    [-1, -(2**63), True, False, 1.5, 1.0, 2**53, 2**64 - 1, "1", b"1", [1], {"id": 1}],
    ids=repr,
)
def test_ill_typed_id_is_bad_request_without_echo(rid: object) -> None:
    exc = refused({"op": "ping", "id": rid})
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id is None  # an unreadable id is not echoed


@pytest.mark.parametrize(
    ("fields", "topic"),
    [
        ({"op": "pub", "key": "k", "data": 1}, None),
        ({"op": "pub", "topic": 5, "key": "k", "data": 1}, None),
        ({"op": "pub", "topic": b"t", "key": "k", "data": 1}, None),
        ({"op": "pub", "topic": "t", "key": "k"}, "t"),
        ({"op": "pub", "topic": "t", "key": "", "data": 1}, "t"),
        ({"op": "pub", "topic": "t", "key": 5, "data": 1}, "t"),
        ({"op": "pub", "topic": "t", "key": b"k", "data": 1}, "t"),
    ],
    ids=["no-topic", "int-topic", "bin-topic", "no-data", "empty-key", "int-key", "bin-key"],
)
def test_ill_typed_pub_is_bad_request(fields: dict[str, object], topic: str | None) -> None:
    exc = refused({**fields, "id": 61})
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 61
    assert exc.topic == topic


@pytest.mark.parametrize("token", [None, 5, b"tok", ["tok"]], ids=repr)
def test_auth_without_a_string_token_is_bad_request(token: object) -> None:
    fields: dict[str, object] = {"op": "auth", "id": 71}
    if token is not None:
        fields["token"] = token
    exc = refused(fields)
    assert exc.code == ErrorCode.BAD_REQUEST
    assert exc.request_id == 71


# -- positions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "seq", "text"),
    [
        (0, 0, "0-0"),
        (0, 1, "0-1"),
        (1, 0, "1-0"),
        (NOW_MS, 7, f"{NOW_MS}-7"),
        (10**15 - 1, 2**32 - 1, f"{10**15 - 1}-{2**32 - 1}"),
    ],
)
def test_positions_format_and_parse_back(ms: int, seq: int, text: str) -> None:
    pos = make_pos(ms, seq)
    assert format_pos(pos) == text
    assert parse_pos(text) == pos


def test_zero_position_is_0_0() -> None:
    assert format_pos(0) == "0-0"
    assert parse_pos("0-0") == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1-",
        "-1",
        "1--2",
        "1-2-3",
        "a-b",
        "0x1-2",
        "+1-2",
        "1-+2",
        " 1-2",
        "1-2 ",
        "1-2\n",
        "1.0-2",
        "1_000-2",
        "1-4294967296",  # SEQ beyond 32 bits
        "1234567890123456-0",  # MS beyond 15 digits
        "1-12345678901",  # SEQ beyond 10 digits
        "\u0661-\u0662",  # Arabic-Indic digits: int() would accept them
        "\uff11-\uff12",  # fullwidth digits
        "1*",
    ],
    ids=repr,
)
def test_bad_position_text_is_bad_request(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_pos(text)
    assert info.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("value", [None, 1, 1.5, b"1-2", ["1", "2"], [1, 2]], ids=repr)
def test_non_string_position_is_bad_request(value: object) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_pos(value)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_position_order_is_ms_then_seq() -> None:
    pairs = [
        (0, 0),
        (0, 1),
        (0, 2**32 - 1),
        (1, 0),
        (1, 5),
        (NOW_MS, 0),
        (NOW_MS, 1),
        (NOW_MS + 1, 0),
    ]
    positions = [make_pos(ms, seq) for ms, seq in pairs]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


# -- server -> client -----------------------------------------------------------------------


def test_upd_decodes_to_the_documented_map() -> None:
    pos = make_pos(NOW_MS, 2)
    frame = build_upd(
        pack_str("prices.fx"),
        pos,
        iter_items([("EURUSD", pack(1.0842)), ("GBPUSD", NIL), ("USDJPY", pack({"b": 150}))]),
    )
    assert decode_frame(frame) == [
        {
            "op": "upd",
            "topic": "prices.fx",
            "pos": f"{NOW_MS}-2",
            "items": {"EURUSD": 1.0842, "GBPUSD": None, "USDJPY": {"b": 150}},
        }
    ]


def test_upd_splices_value_bytes_unchanged() -> None:
    data = pack(1.5, use_single_float=True)  # float32: a re-encoder would widen it
    frame = build_upd(pack_str("t"), 1, [pack_item("k", data)])
    assert frame.endswith(pack("k") + data)


def test_upd_with_no_items() -> None:
    assert decode_frame(build_upd(pack_str("t"), 0, [])) == [
        {"op": "upd", "topic": "t", "pos": "0-0", "items": {}}
    ]


@pytest.mark.parametrize("full", [True, False])
def test_snap_decodes_to_the_documented_map(full: bool) -> None:
    items = [pack_item("a", pack([1, 2])), pack_item("b", NIL if not full else pack("x"))]
    frame = build_snap(pack_str("scores"), "epoch-9", make_pos(NOW_MS, 0), full, items)
    assert decode_frame(frame) == [
        {
            "op": "snap",
            "topic": "scores",
            "epoch": "epoch-9",
            "pos": f"{NOW_MS}-0",
            "full": full,
            "items": {"a": [1, 2], "b": "x" if full else None},
        }
    ]


def test_evt_decodes_to_the_documented_map_with_events_in_order() -> None:
    p1, p2 = make_pos(NOW_MS, 0), make_pos(NOW_MS, 1)
    frame = build_evt(pack_str("trades"), [pack_event(p1, pack({"px": 1})), pack_event(p2, NIL)])
    assert decode_frame(frame) == [
        {
            "op": "evt",
            "topic": "trades",
            "items": [[f"{NOW_MS}-0", {"px": 1}], [f"{NOW_MS}-1", None]],
        }
    ]


def test_evt_splices_event_bytes_unchanged() -> None:
    data = pack(1.5, use_single_float=True)
    frame = build_evt(pack_str("t"), [pack_event(7, data)])
    assert frame.endswith(pack("0-7") + data)


@pytest.mark.parametrize("n", [15, 16, 65535, 65536])
def test_evt_with_many_events_crosses_array_header_sizes(n: int) -> None:
    (msg,) = decode_frame(build_evt(pack_str("t"), [pack_event(i, pack(i)) for i in range(n)]))
    assert msg["items"] == [[f"0-{i}", i] for i in range(n)]


def test_gap_decodes_to_the_documented_map() -> None:
    frame = build_gap(pack_str("trades"), make_pos(NOW_MS, 3), make_pos(NOW_MS + 5, 0))
    assert decode_frame(frame) == [
        {"op": "gap", "topic": "trades", "from": f"{NOW_MS}-3", "to": f"{NOW_MS + 5}-0"}
    ]


@pytest.mark.parametrize("full", [True, False])
def test_a_stream_snap_holds_a_list_of_events(full: bool) -> None:
    p = make_pos(NOW_MS, 4)
    frame = build_stream_snap(pack_str("trades"), "ep", p, full, [pack_event(p, pack("x"))])
    assert decode_frame(frame) == [
        {
            "op": "snap",
            "topic": "trades",
            "epoch": "ep",
            "pos": f"{NOW_MS}-4",
            "full": full,
            "items": [[f"{NOW_MS}-4", "x"]],
        }
    ]
    assert decode_frame(build_stream_snap(pack_str("t"), "ep", 0, True, []))[0]["items"] == []


@pytest.mark.parametrize("n", [15, 16, 65535, 65536])
def test_upd_with_many_items_crosses_map_header_sizes(n: int) -> None:
    items = [pack_item(f"k{i}", pack(i)) for i in range(n)]
    (msg,) = decode_frame(build_upd(pack_str("t"), 3, items))
    assert msg["items"] == {f"k{i}": i for i in range(n)}


def test_control_messages_decode_to_the_documented_maps() -> None:
    assert unpack(hello("c-1", "node-a", True)) == {
        "op": "hello",
        "v": 1,
        "conn": "c-1",
        "node": "node-a",
        "auth": True,
    }
    assert unpack(ack(None)) == {"op": "ack"}
    assert unpack(ack(4, pos=f"{NOW_MS}-0")) == {"op": "ack", "id": 4, "pos": f"{NOW_MS}-0"}
    assert unpack(err("bad_topic", "no", 5, "a b")) == {
        "op": "err",
        "code": "bad_topic",
        "msg": "no",
        "id": 5,
        "topic": "a b",
    }
    assert unpack(err("internal", "oops")) == {"op": "err", "code": "internal", "msg": "oops"}
    assert unpack(pong(6, 1234)) == {"op": "pong", "id": 6, "ts": 1234}
    assert unpack(pong(None, 1234)) == {"op": "pong", "ts": 1234}
    assert unpack(bye("restart", 1500)) == {"op": "bye", "reason": "restart", "retry_ms": 1500}


def test_a_frame_of_many_messages_decodes_in_order() -> None:
    parts = [
        hello("c", "n", False),
        ack(1),
        build_snap(pack_str("a"), "e", 5, True, [pack_item("k", pack(1))]),
        build_upd(pack_str("a"), 6, [pack_item("k", pack(2))]),
        build_upd(pack_str("b"), 7, [pack_item("j", NIL)]),
        err("bad_request", "x", 2),
        pong(3, 9),
        bye("drain", 100),
    ]
    messages = decode_frame(b"".join(parts))
    assert [m["op"] for m in messages] == [
        "hello",
        "ack",
        "snap",
        "upd",
        "upd",
        "err",
        "pong",
        "bye",
    ]
    assert messages == [unpack(p) for p in parts]
    assert messages[3]["items"] == {"k": 2}
    assert messages[4]["topic"] == "b"


def test_decode_frame_of_nothing_is_no_messages() -> None:
    assert decode_frame(b"") == []


def test_decode_frame_refuses_a_frame_that_ends_inside_a_message() -> None:
    frame = ack(1) + build_upd(pack_str("a"), 6, [pack_item("k", pack("value"))])
    with pytest.raises(ValueError):
        decode_frame(frame[:-1])


def test_decode_frame_accepts_publisher_maps_with_non_string_keys() -> None:
    frame = build_upd(pack_str("a"), 1, [pack_item("k", pack({1: "one", 2.5: "x"}))])
    assert decode_frame(frame)[0]["items"] == {"k": {1: "one", 2.5: "x"}}


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, b"\x80"),
        (1, b"\x81"),
        (15, b"\x8f"),
        (16, b"\xde\x00\x10"),
        (65535, b"\xde\xff\xff"),
        (65536, b"\xdf\x00\x01\x00\x00"),
        (2**32 - 1, b"\xdf\xff\xff\xff\xff"),
    ],
)
def test_map_header_sizes(n: int, expected: bytes) -> None:
    assert map_header(n) == expected
    if n <= 65536:
        assert pack({f"{i}": None for i in range(n)}).startswith(expected)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, b"\x90"),
        (1, b"\x91"),
        (15, b"\x9f"),
        (16, b"\xdc\x00\x10"),
        (65535, b"\xdc\xff\xff"),
        (65536, b"\xdd\x00\x01\x00\x00"),
        (2**32 - 1, b"\xdd\xff\xff\xff\xff"),
    ],
)
def test_array_header_sizes(n: int, expected: bytes) -> None:
    assert array_header(n) == expected
    if n <= 65536:
        assert pack([None] * n) == expected + NIL * n


def test_pack_str_and_pack_item_are_plain_msgpack() -> None:
    assert pack_str("prices.fx") == pack("prices.fx")
    assert pack_item("k", pack([1])) == pack("k") + pack([1])
    assert iter_items([("a", NIL), ("b", pack(2))]) == [pack("a") + NIL, pack("b") + pack(2)]


# -- the shared reader (rule 3; engine.admin.http reads /publish bodies with it) -----


@pytest.mark.parametrize(
    ("payload", "shape"),
    [
        (b"\x80", ("map", 0)),
        (b"\x8f", ("map", 15)),
        (b"\x93\x01\x02\x03", ("array", 3)),
        (b"\xdc\x01\x00", ("array", 256)),
        (b"\xde\x00\x02", ("map", 2)),
        (b"\xdd\x00\x01\x00\x00", ("array", 65536)),
        (b"\xdf\x00\x00\x00\x03", ("map", 3)),
        (b"\xa1x", None),  # a string
        (b"\x01", None),
        (b"\xc0", None),
        (b"", None),  # nothing left
    ],
)
def test_container_at_reads_the_header_byte_only(payload: bytes, shape: object) -> None:
    assert container_at(payload, 0) == shape
    assert container_at(b"\x01" + payload, 1) == shape  # at an offset


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    "payload",
    [
        b"\xdb\x7f\xff\xff\xff",  # str32 of 2 GiB
        b"\xc6\x7f\xff\xff\xff",  # bin32 of 2 GiB
        b"\xdd\x7f\xff\xff\xff",  # array32 of 2**31 elements
        b"\xdf\x7f\xff\xff\xff",  # map32 of 2**31 pairs
    ],
)
def test_bounded_unpacker_refuses_a_length_beyond_the_message(strict: bool, payload: bytes) -> None:
    unpacker = bounded_unpacker(len(payload), strict_map_key=strict)
    unpacker.feed(payload)
    # refused (a limit, or simply no data), never an attempt to allocate the length
    with pytest.raises((ValueError, msgpack.OutOfData)):
        unpacker.unpack()


def test_bounded_unpacker_keys_strict_or_not() -> None:
    payload = msgpack.packb({1: "x"})
    strict = bounded_unpacker(len(payload))
    strict.feed(payload)
    with pytest.raises(ValueError):
        strict.unpack()
    loose = bounded_unpacker(len(payload), strict_map_key=False)
    loose.feed(payload)
    assert loose.unpack() == {1: "x"}


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize(
    "data", [b"\xca\x3f\xc0\x00\x00", b"\xd1\x00\x01", b"\x82\xa1z\x01\xa1a\x02"]
)
def test_read_raw_slices_the_exact_bytes_and_moves_past_them(kind: type, data: bytes) -> None:
    payload = kind(b"\xa4data" + data + b"\x07")  # a key, the value, one more value
    unpacker = bounded_unpacker(len(payload))
    unpacker.feed(payload)
    assert unpacker.unpack() == "data"
    raw = read_raw(unpacker, payload)
    assert type(raw) is bytes  # a copy: never a view of a picows frame
    assert raw == data
    assert unpacker.unpack() == 7  # the reader is just after the value
    assert unpacker.tell() == len(payload)
