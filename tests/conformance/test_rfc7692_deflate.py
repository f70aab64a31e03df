"""RFC 7692 (permessage-deflate) on a real worker, over raw TCP: what a peer
that negotiated it sees, byte for byte, against one that did not.

| RFC 7692 | requirement | test |
| --- | --- | --- |
| 5, 7 | the offer is answered with no context takeover either way | test_negotiated_* |
| 6, 7.2.1 | RSV1 on compressed messages, 00 00 ff ff removed; same messages as a raw peer | test_frames_* |
| 6.1 | RSV1 on a continuation frame fails the connection (1002) | test_rsv1_on_a_continuation_* |
| 6.2, 7.2.2 | a compressed message from the peer is inflated and read | test_a_compressed_sub_* |
| 8.2.3.3 | a message that inflates past the limit closes 1009; others on the worker keep receiving | test_a_zip_bomb_* |
| 6.2 | a message that does not inflate closes 1007 | test_a_message_that_does_not_inflate_* |

RSV1 without a negotiated extension: tests/conformance/test_rfc6455_framing.py
(test_5_2_rsv_bits_without_an_extension_fail_the_connection).
"""

from __future__ import annotations

import zlib
from typing import Any

import msgpack

from engine import codes
from engine.protocol.deflate import CLIENT_OFFER, MAX_OFFER_BYTES, RESPONSE, Deflater, inflate
from tests.conformance.conftest import MAX_MESSAGE_BYTES
from tests.conformance.peer import OP_BINARY, OP_CONT, Frame, Peer, frame
from tests.support.serve import Served

OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
BIG = "abcdefghij" * 100  # a value over fanout.compression_min_bytes, compressible


def _messages(f: Frame) -> list[Any]:
    payload = inflate(f.payload, 1 << 24) if f.rsv == 4 else f.payload
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(payload)
    return list(unpacker)


def _next_data(peer: Peer) -> Frame:
    f, _ = peer.read_until(OP_BINARY)
    assert f.opcode == OP_BINARY, f"closed: {f}"
    return f


def _sub(peer: Peer, topics: list[str]) -> list[Frame]:
    """Subscribe; the frames of the ack and snaps."""
    peer.send_msg({"op": "sub", "id": 1, "topics": topics})
    return [_next_data(peer)]


def _publish(served: Served, items: list[dict[str, Any]]) -> None:
    status, body = served.post("/publish", {"items": items})
    assert status == 200, body


def _header(peer: Peer, name: str) -> str | None:
    for line in peer.head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def test_negotiated_with_no_context_takeover(served: Served) -> None:
    for offer in (OFFER, {"Sec-WebSocket-Extensions": CLIENT_OFFER}):
        peer = Peer(served.port, offer)
        try:
            assert _header(peer, "sec-websocket-extensions") == RESPONSE
        finally:
            peer.close()


def test_an_offer_header_past_its_bound_is_declined_and_the_connection_served_raw(
    served: Served,
) -> None:
    # ~16 KB of offers (what the upgrade's head admits) cost ~9 ms of parsing
    # each, so a peer upgrading 1,000 times a second held a worker: past
    # MAX_OFFER_BYTES the offers are not read and the connection is uncompressed
    padding = "x-pad; a=1, " * (MAX_OFFER_BYTES // 12 + 1)
    peer = Peer(served.port, {"Sec-WebSocket-Extensions": padding + CLIENT_OFFER})
    try:
        assert _header(peer, "sec-websocket-extensions") is None
        frames = _sub(peer, ["bound.t"])
        assert [f.rsv for f in frames] == [0] and _messages(frames[0])[0]["op"] == "ack"
    finally:
        peer.close()


def test_frames_carry_rsv1_and_decode_to_what_a_raw_peer_gets(served: Served) -> None:
    topics = ["rfc7692.a", "rfc7692.b"]
    z, raw = Peer(served.port, OFFER), Peer(served.port)
    try:
        _publish(served, [{"topic": t, "key": "k0", "data": BIG} for t in topics])
        zsnap, rsnap = _sub(z, topics), _sub(raw, topics)
        assert zsnap[0].rsv == 4 and rsnap[0].rsv == 0  # the snaps: compressed for z alone
        assert not zsnap[0].payload.endswith(b"\x00\x00\xff\xff")
        assert _messages(zsnap[0]) == _messages(rsnap[0])
        # one flush, two topics: one frame of two compressed pieces (core rule 10)
        _publish(served, [{"topic": t, "key": "k1", "data": BIG + t} for t in topics])
        zf, rf = _next_data(z), _next_data(raw)
        assert zf.rsv == 4 and rf.rsv == 0
        assert len(zf.payload) < len(rf.payload) / 3
        by_topic = sorted(_messages(zf), key=lambda m: m["topic"])
        assert by_topic == sorted(_messages(rf), key=lambda m: m["topic"])
        assert [m["topic"] for m in by_topic] == topics
        # a message under the threshold goes raw, on the same connection
        _publish(served, [{"topic": topics[0], "key": "k2", "data": 1}])
        small = _next_data(z)
        assert small.rsv == 0 and _messages(small) == _messages(_next_data(raw))
        z.probe()
    finally:
        z.close()
        raw.close()


def test_a_compressed_sub_is_inflated_and_answered(served: Served) -> None:
    peer = Peer(served.port, OFFER)
    try:
        sub = msgpack.packb({"op": "sub", "id": 9, "topics": ["rfc7692.c"]})
        payload = Deflater().frame(sub)
        # fragmented: RSV1 on the first frame only
        peer.send(frame(OP_BINARY, payload[:4], fin=False, rsv=4))
        peer.send(frame(OP_CONT, payload[4:]))
        (ack, *_) = _messages(_next_data(peer))
        assert ack == {"op": "ack", "id": 9}
    finally:
        peer.close()


def test_rsv1_on_a_continuation_fails_the_connection(served: Served) -> None:
    peer = Peer(served.port, OFFER)
    try:
        payload = Deflater().frame(msgpack.packb({"op": "ping", "id": 1}))
        peer.send(frame(OP_BINARY, payload[:2], fin=False, rsv=4))
        peer.send(frame(OP_CONT, payload[2:], rsv=4))
        assert peer.expect_fail().close_code == 1002
    finally:
        peer.close()


def test_a_zip_bomb_closes_1009_and_a_subscriber_on_the_worker_keeps_receiving(
    served: Served,
) -> None:
    honest = Peer(served.port, OFFER)
    attacker = Peer(served.port, OFFER)
    try:
        _sub(honest, ["rfc7692.d"])
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        # 100 MB of zeros in ~100 KB: inflated only up to limits.max_message_bytes
        bomb = (c.compress(bytes(100_000_000)) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        assert len(bomb) < MAX_MESSAGE_BYTES
        attacker.send(frame(OP_BINARY, bomb, rsv=4))
        assert attacker.expect_fail().close_code == codes.CLOSE_MESSAGE_TOO_BIG
        _publish(served, [{"topic": "rfc7692.d", "key": "k", "data": BIG}])
        (upd,) = _messages(_next_data(honest))
        assert upd["op"] == "upd" and upd["items"] == {"k": BIG}
    finally:
        honest.close()
        attacker.close()


def test_a_message_that_does_not_inflate_closes_1007(served: Served) -> None:
    peer = Peer(served.port, OFFER)
    try:
        peer.send(frame(OP_BINARY, b"\xff\xff\xff\xff", rsv=4))
        assert peer.expect_fail().close_code == codes.CLOSE_INVALID_PAYLOAD
    finally:
        peer.close()
