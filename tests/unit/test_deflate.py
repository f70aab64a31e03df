"""permessage-deflate (engine/protocol/deflate.py): negotiation (rule 1),
pieces and framing (rules 3-4), bounded inflation (rule 5); the fan-out core
compressing once per group per flush (engine/fanout/core.py rule 10); the
connection's rules for compressed frames (engine/connection.py rule 3)."""

from __future__ import annotations

import random
import zlib
from typing import Any

import msgpack
import pytest

from engine import codes
from engine.auth.ratelimit import RatePolicy
from engine.connection import (
    IGNORE,
    INFLATE,
    MESSAGE,
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    REFUSE_MESSAGE,
    RSV1,
    RSV2,
    RSV3,
    STORE,
    Close,
)
from engine.fanout.core import Fanout, Session
from engine.protocol.closecodes import CLOSE_PROTOCOL_ERROR
from engine.protocol.codec import decode_frame
from engine.protocol.deflate import (
    RESPONSE,
    TAIL,
    Deflater,
    InflateError,
    TooBig,
    accepted,
    frame_of,
    inflate,
    negotiate,
    parse_offers,
    stored,
)
from tests.unit.test_connection_rules import reply, req, rules

# -- negotiation (rule 1) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "offers",
    [
        ["permessage-deflate"],
        ["permessage-deflate; client_max_window_bits"],  # Chromium, websockets
        ["permessage-deflate; client_max_window_bits=10"],
        ['permessage-deflate; client_max_window_bits="12"'],
        ["permessage-deflate; server_no_context_takeover; client_no_context_takeover"],
        ["PerMessage-Deflate; Client_Max_Window_Bits"],
        ["x-webkit-deflate-frame", "permessage-deflate"],  # two headers
        ['x-foo; a="b, c", permessage-deflate'],  # a comma inside a quoted value
    ],
)
def test_an_acceptable_offer_is_answered_with_no_context_takeover(offers: list[str]) -> None:
    assert negotiate(offers) == RESPONSE


def test_server_max_window_bits_15_is_echoed() -> None:
    assert negotiate(["permessage-deflate; server_max_window_bits=15"]) == (
        RESPONSE + "; server_max_window_bits=15"
    )


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=10",  # smaller than the shared window
        "permessage-deflate; server_max_window_bits",  # needs a value
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=abc",
        "permessage-deflate; server_no_context_takeover=1",  # takes no value
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; x-unknown",
        "permessage-deflate; =1",
        "x-webkit-deflate-frame",
        "",
    ],
)
def test_an_invalid_offer_is_declined(offer: str) -> None:
    assert negotiate([offer]) is None


def test_a_declined_offer_falls_through_to_the_next() -> None:
    offers = ["permessage-deflate; server_max_window_bits=9, permessage-deflate"]
    assert negotiate(offers) == RESPONSE
    assert [o.name for o in parse_offers(offers)] == ["permessage-deflate"] * 2


def test_a_client_checks_the_response() -> None:
    assert accepted(RESPONSE)
    assert not accepted(None) and not accepted("") and not accepted("x-foo")
    assert not accepted("permessage-deflate")  # a server keeping its context


# -- pieces and framing (rules 3-4) ------------------------------------------------------

MESSAGES = [b"", b"a", b"hello " * 50, bytes(range(256)) * 3, b"\x00" * 70_000]


@pytest.mark.parametrize("min_bytes", [0, 64, 1 << 20])
def test_pieces_concatenate_into_one_message(min_bytes: int) -> None:
    d = Deflater(stored_under=min_bytes)
    for i in range(len(MESSAGES)):
        for j in range(len(MESSAGES)):
            msgs = [MESSAGES[i], MESSAGES[j], MESSAGES[i]]
            payload = frame_of([d.piece(m) for m in msgs])
            assert inflate(payload, 1 << 20) == b"".join(msgs)
            # what any RFC 7692 receiver does: append the tail, inflate with zlib
            assert zlib.decompressobj(-15).decompress(payload + TAIL) == b"".join(msgs)


def test_a_piece_refers_to_nothing_before_it() -> None:
    d = Deflater()
    d.piece(b"the same words again and again " * 20)
    second = d.piece(b"the same words again and again " * 20)
    # inflated alone, with no window of what came before: no context takeover
    assert inflate(frame_of([second]), 10_000) == b"the same words again and again " * 20


def test_a_compressed_frame_ends_without_the_tail() -> None:
    d = Deflater()
    payload = d.frame(b"x" * 1000)
    assert not payload.endswith(TAIL) and len(payload) < 50


def test_a_stored_piece_is_the_message_as_is() -> None:
    assert stored(b"abc") == b"\x00\x03\x00\xfc\xffabc"
    big = bytes(200_000)
    assert inflate(frame_of([stored(big)]), 1 << 20) == big


# -- inflating (rule 5) ------------------------------------------------------------------


def _bomb(size: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (z.compress(bytes(size)) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_a_zip_bomb_is_cut_at_the_bound() -> None:
    bomb = _bomb(50_000_000)
    assert len(bomb) < 60_000
    with pytest.raises(TooBig):
        inflate(bomb, 65_536)
    assert inflate(_bomb(65_536), 65_536) == bytes(65_536)  # exactly the bound is fine
    with pytest.raises(TooBig):
        inflate(_bomb(65_537), 65_536)


def test_a_broken_stream_is_an_inflate_error() -> None:
    with pytest.raises(InflateError):
        inflate(b"\xff\xff\xff\xff", 100)


def test_a_final_block_is_allowed() -> None:
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    payload = z.compress(b"hello") + z.flush(zlib.Z_FINISH)  # BFINAL set (RFC 7692 7.2.3.4)
    assert inflate(payload, 100) == b"hello"
    with pytest.raises(InflateError):
        inflate(payload + b"junk", 100)


# -- the core: compressed once per group per flush (core rule 10) ------------------------


class ZClient:
    """A fake `Writer` that inflates what it gets compressed, as a browser does."""

    def __init__(self) -> None:
        self.frames: list[list[dict[str, Any]]] = []
        self.compressed: list[bool] = []

    def write(self, frame: bytes, compressed: bool = False) -> bool:
        self.compressed.append(compressed)
        self.frames.append(decode_frame(inflate(frame, 1 << 20) if compressed else frame))
        return True


def _flush(fo: Fanout) -> None:
    plan, shared = fo.plan()
    for sh in shared:
        fo.deliver_shared(sh)
    for s, deliveries in plan.items():
        fo.deliver(s, deliveries)


def _sessions(fo: Fanout, n: int, topics: list[str], deflate: bool) -> list[ZClient]:
    clients = []
    for i in range(n):
        c = ZClient()
        s = Session(c, i, deflate=deflate)
        for t in topics:
            fo.subscribe(s, t, None, 1)
        clients.append(c)
    return clients


def _publish(fo: Fanout, topic: str, pos: int, keys: int) -> None:
    for k in range(keys):
        fo.apply(topic, f"key{k}", pos + k, msgpack.packb({"v": [pos, k] * 20, "k": "x" * 30}))


@pytest.mark.parametrize("per_client", [False, True])
def test_each_shared_message_is_compressed_once_per_flush(per_client: bool) -> None:
    d = Deflater(64)
    fo = Fanout("e1", deflater=d, per_client=per_client)
    single = _sessions(fo, 10, ["a"], deflate=True)  # the shared path
    multi = _sessions(fo, 10, ["a", "b"], deflate=True)  # frames of two topics
    raw = _sessions(fo, 3, ["a", "b"], deflate=False)
    _publish(fo, "a", 1, 5)
    _publish(fo, "b", 100, 5)
    _flush(fo)
    # group: one piece per (topic, group); per client: one per frame
    assert d.pieces == (20 if per_client else 2)
    want_a = [m for m in raw[0].frames[0] if m["topic"] == "a"]
    for c in single:
        assert c.compressed == [True] and c.frames[0] == want_a
    for c in multi:
        assert c.compressed == [True] and c.frames[0] == raw[0].frames[0]
    assert all(c.compressed == [False] for c in raw)
    assert fo.stats.compressed_frames == 20
    assert fo.stats.compressed_input_bytes > fo.stats.bytes_sent - 3 * len(
        b"".join(msgpack.packb(m) for m in raw[0].frames[0])
    )


def test_a_frame_under_the_threshold_goes_raw() -> None:
    d = Deflater(10_000)
    fo = Fanout("e1", deflater=d)
    (c,) = _sessions(fo, 1, ["a", "b"], deflate=True)
    _publish(fo, "a", 1, 1)
    _publish(fo, "b", 5, 1)
    _flush(fo)
    assert c.compressed == [False] and d.pieces == 0
    assert sorted(m["topic"] for m in c.frames[0]) == ["a", "b"]


def test_a_frame_deflate_cannot_shrink_goes_as_is() -> None:
    rng = random.Random(7)
    d = Deflater(64)
    fo = Fanout("e1", deflater=d)
    single = _sessions(fo, 3, ["a"], deflate=True)  # the shared path
    (multi,) = _sessions(fo, 1, ["a", "b"], deflate=True)
    for t, pos in (("a", 1), ("b", 10)):
        fo.apply(t, "k", pos, msgpack.packb(rng.randbytes(400)))  # incompressible
    _flush(fo)
    assert all(c.compressed == [False] for c in [*single, multi])
    assert sorted(m["topic"] for m in multi.frames[0]) == ["a", "b"]
    assert fo.stats.compressed_frames == 0


# -- the connection's rules (engine/connection.py rule 3) --------------------------------


def test_rsv1_without_negotiation_is_a_protocol_error() -> None:
    r, _ = rules()
    out = r.frame(OP_BINARY, True, 5, RSV1, 0.0)
    assert isinstance(out, Close) and out.code == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("opcode", "rsv"),
    [(OP_BINARY, RSV2), (OP_BINARY, RSV3), (OP_BINARY, RSV1 | RSV2), (OP_PING, RSV1)],
)
def test_other_reserved_bits_fail_even_with_deflate(opcode: int, rsv: int) -> None:
    r, _ = rules()
    r.deflate = True
    out = r.frame(opcode, True, 5, rsv, 0.0)
    assert isinstance(out, Close) and out.code == CLOSE_PROTOCOL_ERROR


def test_a_compressed_whole_message_is_inflated_and_read() -> None:
    r, _ = rules()
    r.deflate = True
    payload = Deflater().frame(req(op="ping", id=7))
    assert r.frame(OP_BINARY, True, len(payload), RSV1, 0.0) == INFLATE
    out = r.inflated(payload)
    assert type(out).__name__ == "Ping" and out.id == 7  # type: ignore[union-attr]
    # an uncompressed message on the same connection is read as it is
    assert r.frame(OP_BINARY, True, 5, 0, 0.0) == MESSAGE


def test_a_compressed_fragmented_message_is_reassembled_then_inflated() -> None:
    r, _ = rules()
    r.deflate = True
    payload = Deflater().frame(req(op="sub", id=3, topics=["a"]))
    head, tail = payload[:3], payload[3:]
    assert r.frame(OP_BINARY, False, len(head), RSV1, 0.0) == STORE
    assert r.store(head, False) is None
    # RSV1 on a continuation fails the connection (RFC 7692 6.1)
    assert r.frame(OP_CONTINUATION, True, len(tail), 0, 0.0) == STORE
    message = r.store(tail, True)
    assert message is not None
    out = r.assembled(message)
    assert type(out).__name__ == "Sub"
    # the next, uncompressed fragmented message is not inflated
    plain = req(op="ping", id=4)
    assert r.frame(OP_BINARY, False, 2, 0, 0.0) == STORE
    r.store(plain[:2], False)
    r.frame(OP_CONTINUATION, True, len(plain) - 2, 0, 0.0)
    assert type(r.assembled(r.store(plain[2:], True) or b"")).__name__ == "Ping"


def test_rsv1_on_a_continuation_is_a_protocol_error() -> None:
    r, _ = rules()
    r.deflate = True
    assert r.frame(OP_BINARY, False, 3, RSV1, 0.0) == STORE
    out = r.frame(OP_CONTINUATION, True, 3, RSV1, 0.0)
    assert isinstance(out, Close) and out.code == CLOSE_PROTOCOL_ERROR


def test_a_compressed_message_that_inflates_too_big_closes_1009() -> None:
    r, _ = rules()  # max_message_bytes = 100
    r.deflate = True
    bomb = _bomb(101)
    out = r.inflated(bomb)
    assert isinstance(out, Close) and out.code == codes.CLOSE_MESSAGE_TOO_BIG


def test_a_compressed_message_that_does_not_inflate_closes_1007() -> None:
    r, _ = rules()
    r.deflate = True
    out = r.inflated(b"\xff\xff\xff")
    assert isinstance(out, Close) and out.code == codes.CLOSE_INVALID_PAYLOAD


def test_compressed_frames_are_rate_limited_like_any() -> None:
    r, counters = rules(rate=RatePolicy(1, 1))  # a burst of 2
    r.deflate = True
    verdicts = [r.frame(OP_BINARY, True, 5, RSV1, 0.0) for _ in range(3)]
    assert verdicts == [INFLATE, INFLATE, REFUSE_MESSAGE]
    assert counters.errors["rate_limited"] == 1
    assert reply(r.refusal(None))["code"] == "rate_limited"


def test_a_compressed_message_after_a_skipped_one_is_inflated() -> None:
    r, _ = rules()
    r.deflate = True
    r.skip(OP_BINARY, False)  # a refused fragmented message: its rest is skipped
    assert r.frame(OP_CONTINUATION, False, 5, 0, 0.0) == IGNORE
    # a new whole message, compressed, ends the skipping: it is inflated
    assert r.frame(OP_BINARY, True, 5, RSV1, 0.0) == INFLATE
    assert r.fragments is None
