"""A `pub` with a batch of items (engine/protocol/codec.py rule 6): decoded
item by item exactly like a single `pub`, refused whole at the first bad item."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from engine.codes import ErrorCode
from engine.errors import RemoteProtocolError
from engine.protocol.codec import (
    MAX_DATA_DEPTH,
    Pub,
    PubBatch,
    PubItem,
    decode_request,
)


def encoded(**fields: Any) -> bytes:
    out: bytes = msgpack.packb(fields)
    return out


def refused(payload: bytes, max_items: int = 10) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_request(payload, 10, max_items)
    return info.value


def test_a_batch_keeps_each_items_data_bytes_exactly_and_its_order() -> None:
    payload = encoded(
        op="pub",
        id=7,
        items=[
            {"topic": "a", "key": "k", "data": {"px": 1.5}},
            {"topic": "events.log", "data": [1, 2]},
            {"topic": "a", "key": "gone", "data": None, "extra": {"ignored": [1]}},
        ],
    )
    assert decode_request(payload, 10) == PubBatch(
        7,
        (
            PubItem("a", "k", msgpack.packb({"px": 1.5})),
            PubItem("events.log", None, msgpack.packb([1, 2])),
            PubItem("a", "gone", b"\xc0"),
        ),
    )


def test_a_single_pub_is_unchanged() -> None:
    assert decode_request(encoded(op="pub", id=1, topic="t", key="k", data=1), 10) == Pub(
        1, "t", "k", b"\x01"
    )


def test_the_whole_message_byte_by_byte_prefixes_are_refused_not_crashed() -> None:
    payload = encoded(op="pub", id=2, items=[{"topic": "a", "key": "k", "data": "x" * 20}])
    for n in range(len(payload)):
        assert refused(payload[:n]).code == ErrorCode.BAD_REQUEST
    assert refused(payload + b"\x01").code == ErrorCode.BAD_REQUEST  # trailing bytes


def test_more_items_than_the_limit_are_refused_from_the_header_with_the_id() -> None:
    exc = refused(encoded(op="pub", id=3, items=[{"topic": "a", "key": "k", "data": 1}] * 11))
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, 3)
    assert "holds 11 items; the limit is 10 (limits.max_publish_items)" in exc.message
    assert isinstance(
        decode_request(
            encoded(op="pub", items=[{"topic": "a", "key": "k", "data": 1}] * 10), 10, 10
        ),
        PubBatch,
    )


@pytest.mark.parametrize(
    ("items", "code", "says", "topic"),
    [
        ([], ErrorCode.BAD_REQUEST, "non-empty array", None),
        ("x", ErrorCode.BAD_REQUEST, "non-empty array", None),
        ([1], ErrorCode.BAD_REQUEST, "'items[0]' must be a map", None),
        (
            [{"topic": "a", "key": "k", "data": 1}, {"key": "k", "data": 1}],
            ErrorCode.BAD_REQUEST,
            "needs a string 'items[1].topic'",
            None,
        ),
        ([{"topic": ["a"], "key": "k", "data": 1}], ErrorCode.BAD_REQUEST, "items[0].topic", None),
        ([{"topic": "a b", "key": "k", "data": 1}], ErrorCode.BAD_TOPIC, "(items[0])", "a b"),
        ([{"topic": "a", "key": "", "data": 1}], ErrorCode.BAD_REQUEST, "'items[0].key'", "a"),
        (
            [{"topic": "a", "key": {"k": 1}, "data": 1}],
            ErrorCode.BAD_REQUEST,
            "'items[0].key'",
            "a",
        ),
        ([{"topic": "a", "key": "k"}], ErrorCode.BAD_REQUEST, "'items[0].data'", "a"),
    ],
)
def test_a_bad_item_refuses_the_batch_naming_it(
    items: Any, code: str, says: str, topic: str | None
) -> None:
    exc = refused(encoded(op="pub", id=4, items=items))
    assert (exc.code, exc.request_id, exc.topic) == (code, 4, topic)
    assert says in exc.message


def test_an_items_data_is_checked_like_a_single_pubs() -> None:
    deep: Any = 1
    for _ in range(MAX_DATA_DEPTH + 1):
        deep = [deep]
    ok = {"topic": "a", "key": "k", "data": 1}
    exc = refused(encoded(op="pub", id=5, items=[ok, {"topic": "b", "key": "k", "data": deep}]))
    assert (exc.code, exc.topic) == (ErrorCode.BAD_REQUEST, "b")
    assert "'items[1].data' is nested deeper than 32" in exc.message
    # a string that is not UTF-8, inside the data and as a key
    bad_str = b"\xa2\xff\xfe"
    payload = (
        b"\x83\xa2op\xa3pub\xa2id\x06\xa5items\x91\x83\xa5topic\xa1a\xa3key\xa1k\xa4data" + bad_str
    )
    exc = refused(payload)
    assert "'items[0].data' holds a string that is not valid UTF-8" in exc.message
    payload = (
        b"\x83\xa2op\xa3pub\xa2id\x06\xa5items\x91\x83\xa5topic\xa1a\xa3key"
        + bad_str
        + b"\xa4data\x01"
    )
    exc = refused(payload)
    assert (exc.request_id, exc.message) == (6, "'items[0].key' is not valid UTF-8")


def test_items_beside_a_single_update_is_refused() -> None:
    exc = refused(
        encoded(op="pub", id=8, topic="a", key="k", items=[{"topic": "a", "key": "k", "data": 1}])
    )
    assert (exc.code, exc.request_id) == (ErrorCode.BAD_REQUEST, 8)
    assert "either 'items' or one" in exc.message


@pytest.mark.parametrize(
    ("later", "says"),
    [
        ({"topic": "a", "key": "", "data": 1}, "'items[2].key' must be a non-empty string"),
        ({"topic": "a", "key": 5, "data": 1}, "'items[2].key' must be a non-empty string"),
        ({"topic": "a", "key": "k"}, "'pub' needs a 'items[2].data' field"),
        ({"topic": "a", "key": "k", "data": "DEEP"}, "'items[2].data' is nested deeper than 32"),
    ],
)
def test_an_item_repeating_an_accepted_topic_still_passes_every_rule_of_its_own(
    later: dict[str, Any], says: str
) -> None:
    # the batch remembers topics it accepted (a name is checked once per batch):
    # that must never let an item's own key or data through unchecked
    deep: Any = 1
    for _ in range(MAX_DATA_DEPTH + 1):
        deep = {"d": deep}
    if later.get("data") == "DEEP":
        later = {**later, "data": deep}
    ok = {"topic": "a", "key": "k", "data": 1}
    exc = refused(encoded(op="pub", id=9, items=[ok, ok, later, ok]))
    assert (exc.code, exc.request_id, exc.topic) == (ErrorCode.BAD_REQUEST, 9, "a")
    assert says in exc.message


def test_a_batch_of_repeated_topics_keeps_every_item_in_order() -> None:
    items = [{"topic": f"t{i % 3}", "key": f"k{i}", "data": [i, {"q": i}]} for i in range(50)]
    batch = decode_request(encoded(op="pub", items=items), 10, 50)
    assert isinstance(batch, PubBatch)
    assert batch.items == tuple(
        PubItem(f"t{i % 3}", f"k{i}", msgpack.packb([i, {"q": i}])) for i in range(50)
    )


def test_a_batchs_positions_are_formatted_each_as_format_pos_does() -> None:
    from engine.protocol.codec import format_pos, format_positions, make_pos, parse_pos

    positions = [0, make_pos(1_765_000_000_000, 0), make_pos(1_765_000_000_000, 2**32 - 1)]
    assert format_positions(positions) == [format_pos(p) for p in positions]
    assert [parse_pos(text) for text in format_positions(positions)] == positions
    assert format_positions([]) == []


@pytest.mark.parametrize(
    "raw",
    [
        b"\xca\x3f\xc0\x00\x00",  # 1.5 as float32: decodes to a float that packs as float64
        b"\xcd\x00\x05",  # 5 as uint16: packs back as a fixint
        b"\xd9\x02hi",  # "hi" as str8: packs back as a fixstr
    ],
)
def test_data_a_publisher_encoded_otherwise_than_we_would_is_kept_byte_for_byte(
    raw: bytes,
) -> None:
    # rule 1: the exact bytes, whether or not the batch re-encodes to itself
    def item(data: bytes) -> bytes:
        return (
            b"\x83"
            + msgpack.packb("topic")
            + msgpack.packb("a")
            + msgpack.packb("key")
            + msgpack.packb("k")
            + msgpack.packb("data")
            + data
        )

    payload = (
        b"\x83"
        + msgpack.packb("op")
        + msgpack.packb("pub")
        + msgpack.packb("id")
        + msgpack.packb(3)
        + msgpack.packb("items")
        + b"\x92"
        + item(b"\x01")
        + item(raw)
    )
    batch = decode_request(payload, 10)
    assert isinstance(batch, PubBatch)
    assert [i.data for i in batch.items] == [b"\x01", raw]
    exact = encoded(op="pub", id=3, items=[{"topic": "a", "key": "k", "data": [1, "x"]}])
    assert decode_request(exact, 10) == PubBatch(3, (PubItem("a", "k", msgpack.packb([1, "x"])),))


def test_a_hellos_conn_names_the_worker_serving_it() -> None:
    from engine.protocol.codec import conn_id, conn_worker, decode_frame, hello

    one, two = (decode_frame(hello(conn_id(0x1F2E, n), "node-a", False))[0] for n in (1, 300))
    assert one["conn"] == "1f2e.1" and conn_worker(one) == conn_worker(two) == "1f2e"
    assert conn_worker(decode_frame(hello(conn_id(7, 1), "node-a", False))[0]) != "1f2e"
    assert conn_worker({"op": "hello"}) == ""  # a server that sends none: one unknown worker
