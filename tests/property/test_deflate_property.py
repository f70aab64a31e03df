"""Properties of permessage-deflate once per group (engine/protocol/deflate.py
rules 3-5), checked with hypothesis.

1. A frame of several topics' messages, each compressed on its own (a
   piece, or a stored piece under the threshold) and joined, inflates to
   exactly the uncompressed frame, and decodes to the same messages; with
   zlib as any RFC 7692 receiver uses it, not only with our `inflate`.
2. Pieces made in any order by one compressor (its state reused across
   messages and frames) join in any order.
3. `inflate` never returns more than its bound, whatever the input: it
   returns, or raises `TooBig` / `InflateError`.
"""

from __future__ import annotations

import zlib

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.protocol.codec import build_upd, decode_frame, pack_item, pack_str
from engine.protocol.deflate import TAIL, Deflater, InflateError, TooBig, frame_of, inflate

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | _text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=20,
)


@st.composite
def topic_messages(draw: st.DrawFn) -> list[bytes]:
    """The `upd` messages of one flush to one client: one per topic."""
    out = []
    for t in range(draw(st.integers(1, 4))):
        items = [
            pack_item(k, msgpack.packb(v))
            for k, v in draw(st.dictionaries(_text, _values, max_size=6)).items()
        ]
        out.append(build_upd(pack_str(f"topic.{t}"), draw(st.integers(1, 2**40)), items))
    return out


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(topic_messages(), min_size=1, max_size=4), min_bytes=st.integers(0, 400))
def test_joined_pieces_inflate_to_the_raw_frame(frames: list[list[bytes]], min_bytes: int) -> None:
    d = Deflater(stored_under=min_bytes)  # one compressor for every frame: its state carries over
    for msgs in frames:
        payload = frame_of([d.piece(m) for m in msgs])
        raw = b"".join(msgs)
        assert inflate(payload, len(raw)) == raw
        assert zlib.decompressobj(-15).decompress(payload + TAIL) == raw
        assert decode_frame(inflate(payload, len(raw))) == decode_frame(raw)


@settings(max_examples=200)
@given(
    msgs=st.lists(st.binary(max_size=3000), min_size=1, max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_pieces_join_in_any_order(msgs: list[bytes], order: object) -> None:
    d = Deflater(stored_under=100)
    pieces = [d.piece(m) for m in msgs]
    idx = list(range(len(msgs)))
    order.shuffle(idx)  # type: ignore[attr-defined]
    payload = frame_of([pieces[i] for i in idx])
    assert inflate(payload, 1 << 20) == b"".join(msgs[i] for i in idx)


@settings(max_examples=300)
@given(payload=st.binary(max_size=2000), bound=st.integers(0, 5000))
def test_inflate_stays_within_its_bound(payload: bytes, bound: int) -> None:
    try:
        out = inflate(payload, bound)
    except (TooBig, InflateError):
        return
    assert len(out) <= bound
