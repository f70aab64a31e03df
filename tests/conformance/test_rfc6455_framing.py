"""RFC 6455 section 5 (framing), against a real worker over raw TCP.

"Fail the WebSocket Connection" (section 7.1.7) is asserted as: the server's
next frame is a close with 1002 (protocol error), the ping sent right after
the bad frame is never answered, and the TCP connection ends.

| section | rule | tests |
| --- | --- | --- |
| 5.1 | a client frame without the mask bit: fail (1002); server frames are never masked | test_5_1_* |
| 5.2 | RSV1-3 set with no extension negotiated: fail | test_5_2_rsv* |
| 5.2 | reserved opcodes 0x3-0x7 and 0xB-0xF: fail | test_5_2_reserved_opcode_* |
| 5.2 | 7-bit, 16-bit and 64-bit payload lengths; a 64-bit length with its most significant bit set: fail | test_5_2_*length* |
| 5.4 | a fragmented message is reassembled; control frames may come between its fragments; a continuation frame without a message to continue, or a new data frame before the last fragment: fail | test_5_4_* |
| 5.5 | control frames: payload of at most 125 bytes and never fragmented, else fail | test_5_5_control_* |
| 5.5.2, 5.5.3 | a ping is answered by a pong with the same payload; an unsolicited pong is ignored | test_5_5_2_*, test_5_5_3_* |
| 5.6 | text frames: fanout refuses them with 1003 (docs/protocol.md section 1) | test_5_6_* |

The fanout messages used here (`ping` -> `pong`, docs/protocol.md section 3)
only show that a message was received whole.
"""

from __future__ import annotations

import struct

import msgpack
import pytest

from tests.conformance.conftest import MAX_MESSAGE_BYTES
from tests.conformance.peer import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Peer,
    frame,
)

PROTOCOL_ERROR = 1002
PING_MSG = msgpack.packb({"op": "ping", "id": 7})  # the fanout message, answered with pong id 7

pytestmark = pytest.mark.slow  # one real `fanout serve` for the suite


def expect_protocol_error(peer: Peer) -> None:
    f = peer.expect_fail()
    assert f.opcode == OP_CLOSE and f.close_code == PROTOCOL_ERROR, f
    assert peer.at_eof()


def padded_ping(size: int) -> bytes:
    """The fanout `ping` message (id 7), padded with a bin field to `size` bytes."""
    for overhead in range(40):
        msg = {"op": "ping", "id": 7, "pad": b"x" * max(0, size - overhead)}
        payload: bytes = msgpack.packb(msg, use_bin_type=True)
        if len(payload) == size:
            return payload
    raise AssertionError(f"no padding gives {size} bytes")


def expect_pong_message(peer: Peer, rid: int = 7) -> None:
    while True:
        f = peer.read_frame()
        assert f.opcode != OP_CLOSE, f"closed: {f}"
        if f.opcode == OP_BINARY and any(
            m.get("op") == "pong" and m.get("id") == rid for m in peer.messages(f)
        ):
            return


# -- 5.1 masking ---------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_PING])
def test_5_1_an_unmasked_client_frame_fails_the_connection(peer: Peer, opcode: int) -> None:
    peer.send(frame(opcode, PING_MSG if opcode == OP_BINARY else b"x", mask=False))
    expect_protocol_error(peer)


def test_5_1_server_frames_are_never_masked_and_have_no_rsv_bits(peer: Peer) -> None:
    assert not peer.hello.masked and peer.hello.rsv == 0 and peer.hello.fin
    peer.send(frame(OP_BINARY, PING_MSG))
    peer.send(frame(OP_PING, b"m"))
    seen = [peer.read_frame(), peer.read_frame()]
    assert {f.opcode for f in seen} == {OP_BINARY, OP_PONG}
    assert all(not f.masked and f.rsv == 0 for f in seen)


# -- 5.2 base framing ----------------------------------------------------------------


@pytest.mark.parametrize("rsv", [4, 2, 1, 7], ids=["rsv1", "rsv2", "rsv3", "rsv123"])
def test_5_2_rsv_bits_without_an_extension_fail_the_connection(peer: Peer, rsv: int) -> None:
    peer.send(frame(OP_BINARY, PING_MSG, rsv=rsv))
    expect_protocol_error(peer)


@pytest.mark.parametrize("rsv", [4, 2, 1], ids=["rsv1", "rsv2", "rsv3"])
def test_5_2_rsv_bits_on_a_ping_fail_the_connection(peer: Peer, rsv: int) -> None:
    peer.send(frame(OP_PING, b"x", rsv=rsv))
    expect_protocol_error(peer)


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_5_2_reserved_opcode_fails_the_connection(peer: Peer, opcode: int) -> None:
    peer.send(frame(opcode, b"x"))
    expect_protocol_error(peer)


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, MAX_MESSAGE_BYTES - 100])
def test_5_2_every_payload_length_encoding_is_read(peer: Peer, size: int) -> None:
    """7-bit (<= 125), 16-bit (126-65535) and 64-bit (>= 65536) lengths."""
    payload = padded_ping(size)
    assert len(payload) == size
    peer.send(frame(OP_BINARY, payload))
    expect_pong_message(peer)


def test_5_2_a_64_bit_length_with_the_top_bit_set_fails_the_connection(peer: Peer) -> None:
    peer.send(bytes([0x80 | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + b"\0" * 4)
    f, _ = peer.read_until(OP_CLOSE)
    assert f.opcode == OP_CLOSE and f.close_code in (PROTOCOL_ERROR, 1009), f
    assert peer.at_eof()


# -- 5.4 fragmentation ---------------------------------------------------------------


def test_5_4_a_fragmented_message_is_reassembled(peer: Peer) -> None:
    a, b, c = PING_MSG[:2], PING_MSG[2:5], PING_MSG[5:]
    peer.send(frame(OP_BINARY, a, fin=False))
    peer.send(frame(OP_CONT, b, fin=False))
    peer.send(frame(OP_CONT, c, fin=True))
    expect_pong_message(peer)


def test_5_4_empty_fragments_are_allowed(peer: Peer) -> None:
    peer.send(frame(OP_BINARY, b"", fin=False))
    peer.send(frame(OP_CONT, PING_MSG, fin=False))
    peer.send(frame(OP_CONT, b"", fin=True))
    expect_pong_message(peer)


def test_5_4_control_frames_between_fragments_are_answered_in_place(peer: Peer) -> None:
    """A ping between two fragments is answered at once (section 5.4: control
    frames MAY be injected in the middle of a fragmented message), and the
    message is still reassembled."""
    peer.send(frame(OP_BINARY, PING_MSG[:3], fin=False))
    peer.send(frame(OP_PING, b"between"))
    peer.send(frame(OP_PONG, b"unsolicited"))
    peer.send(frame(OP_CONT, PING_MSG[3:], fin=True))
    first = peer.read_frame()
    assert first.opcode == OP_PONG and first.payload == b"between"
    expect_pong_message(peer)


def test_5_4_a_continuation_frame_without_a_message_fails_the_connection(peer: Peer) -> None:
    peer.send(frame(OP_CONT, PING_MSG, fin=True))
    expect_protocol_error(peer)


def test_5_4_a_non_final_continuation_without_a_message_fails_the_connection(
    peer: Peer,
) -> None:
    peer.send(frame(OP_CONT, b"\x81", fin=False))
    expect_protocol_error(peer)


def test_5_4_a_continuation_after_a_finished_message_fails_the_connection(peer: Peer) -> None:
    peer.send(frame(OP_BINARY, PING_MSG))
    expect_pong_message(peer)
    peer.send(frame(OP_CONT, PING_MSG, fin=True))
    expect_protocol_error(peer)


@pytest.mark.parametrize("fin", [True, False], ids=["final", "non_final"])
def test_5_4_a_new_data_frame_inside_a_fragmented_message_fails_the_connection(
    peer: Peer, fin: bool
) -> None:
    peer.send(frame(OP_BINARY, PING_MSG[:3], fin=False))
    peer.send(frame(OP_BINARY, PING_MSG, fin=fin))
    expect_protocol_error(peer)


# -- 5.5 control frames ----------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_5_5_control_frame_over_125_bytes_fails_the_connection(peer: Peer, opcode: int) -> None:
    payload = struct.pack("!H", 1000) + b"r" * 124 if opcode == OP_CLOSE else b"p" * 126
    peer.send(frame(opcode, payload))
    f, _ = peer.read_until(OP_CLOSE)
    assert f.close_code == PROTOCOL_ERROR, f
    assert peer.at_eof()


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_5_5_fragmented_control_frame_fails_the_connection(peer: Peer, opcode: int) -> None:
    payload = struct.pack("!H", 1000) if opcode == OP_CLOSE else b"p"
    peer.send(frame(opcode, payload, fin=False))
    f, _ = peer.read_until(OP_CLOSE)
    assert f.close_code == PROTOCOL_ERROR, f
    assert peer.at_eof()


@pytest.mark.parametrize(
    "payload",
    [b"", b"a", b"hello", bytes(range(125)), b"\xff\xfe\x00\x80" * 31],
    ids=["empty", "1", "5", "125", "binary_124"],
)
def test_5_5_2_a_ping_is_answered_with_its_payload(peer: Peer, payload: bytes) -> None:
    peer.send(frame(OP_PING, payload))
    f = peer.read_frame()
    assert f.opcode == OP_PONG and f.fin and f.payload == payload


def test_5_5_3_an_unsolicited_pong_is_ignored(peer: Peer) -> None:
    peer.send(frame(OP_PONG, b"nobody asked"))
    peer.send(frame(OP_PONG, b""))
    peer.probe()


# -- 5.6 data frames ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        [frame(OP_TEXT, b"hi")],
        [frame(OP_TEXT, b"h", fin=False), frame(OP_CONT, b"i")],
        [frame(OP_TEXT, b"\xff")],  # not UTF-8 either: 1003 comes first
    ],
    ids=["text", "fragmented_text", "invalid_utf8_text"],
)
def test_5_6_text_frames_are_refused_1003(peer: Peer, frames: list[bytes]) -> None:
    for f in frames:
        peer.send(f)
    got = peer.expect_close()
    assert got.close_code == 1003
