"""`pub` batches (engine/protocol/codec.py rule 6), property-based: an item's
`data` bytes come out exactly as sent, whichever way the batch is read (the
whole array decoded at once, or item by item after a value that does not
decode), and a batch is refused exactly when one of its items would be."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import RemoteProtocolError
from engine.protocol.codec import Pub, PubBatch, decode_request

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
    max_leaves=12,
)
topics = st.sampled_from(["a", "b.c", "bad topic", ""])
keys = st.one_of(st.none(), st.sampled_from(["k", "", "x.y"]), st.integers(0, 3))


def packed_item(topic: str, key: Any, data: bytes, bad_utf8: bool) -> bytes:
    fields = [msgpack.packb("topic") + msgpack.packb(topic)]
    if key is not None:
        fields.append(msgpack.packb("key") + msgpack.packb(key))
    fields.append(msgpack.packb("data") + (b"\xa2\xff\xfe" if bad_utf8 else data))
    return bytes([0x80 | len(fields)]) + b"".join(fields)


@given(st.lists(st.tuples(topics, keys, values, st.booleans()), min_size=1, max_size=6))
def test_a_batch_is_read_like_its_items_each_alone(items: list[tuple[str, Any, Any, bool]]) -> None:
    bad = [b and i % 3 == 0 for i, (_, _, _, b) in enumerate(items)]
    datas = [msgpack.packb(v, use_bin_type=True) for _, _, v, _ in items]
    body = b"".join(
        packed_item(t, k, d, b) for (t, k, _, _), d, b in zip(items, datas, bad, strict=True)
    )
    payload = (
        b"\x83"
        + msgpack.packb("op")
        + msgpack.packb("pub")
        + msgpack.packb("id")
        + b"\x07"
        + msgpack.packb("items")
        + bytes([0x90 | len(items)])
        + body
    )
    alone: list[Pub | RemoteProtocolError] = []
    for (t, k, _, _), d, b in zip(items, datas, bad, strict=True):
        item = packed_item(t, k, d, b)
        head = bytes([0x80 | (2 + (item[0] & 0x0F))])
        single = (
            head
            + msgpack.packb("op")
            + msgpack.packb("pub")
            + msgpack.packb("id")
            + b"\x07"
            + item[1:]
        )
        try:
            alone.append(decode_request(single, 4))  # type: ignore[arg-type]
        except RemoteProtocolError as exc:
            alone.append(exc)
    try:
        batch = decode_request(payload, 4)
    except RemoteProtocolError as exc:
        first = next(a for a in alone if isinstance(a, RemoteProtocolError))
        assert (exc.code, exc.request_id) == (first.code, 7)
        return
    assert isinstance(batch, PubBatch)
    assert all(isinstance(a, Pub) for a in alone)
    assert [(i.topic, i.key, i.data) for i in batch.items] == [
        (a.topic, a.key, a.data) for a in alone if isinstance(a, Pub)
    ]
