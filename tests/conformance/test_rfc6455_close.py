"""RFC 6455 sections 5.5.1, 7 and 8.1 (the closing handshake), against a real worker.

The server answers a client's close with a close frame and then ends the TCP
connection (section 7.1.1). What its close frame must carry:

| section | the client's close | the server's answer | tests |
| --- | --- | --- | --- |
| 5.5.1, 7.4 | empty (no status code: what Node's `ws.close()` and browsers send) | an empty close: status code 0 does not exist, and 1005 must never be sent | test_5_5_1_empty_close_* |
| 7.4.1, 7.4.2 | a code defined for use in a close frame (1000-1003, 1007-1011, 1012-1014 registered with IANA since, 3000-4999) | the same code | test_7_4_1_valid_code_* |
| 7.4.1, 7.4.2 | a code not allowed in a close frame (0-999, 1004, 1005, 1006, 1015, 1016-2999, 5000+) | 1002 | test_7_4_1_invalid_code_* |
| 5.5.1 | a one-byte payload (half a status code) | 1002 | test_5_5_1_one_byte_* |
| 5.5.1, 8.1 | a reason that is not UTF-8 | 1007 (or 1002) | test_8_1_* |
| 5.5.1 | a reason of 123 bytes (the most a 125-byte control frame holds) | the code | test_5_5_1_longest_reason_* |
| 5.5.1 | data sent after the close | not processed | test_5_5_1_nothing_is_processed_after_a_close |

The engine's rules are engine/protocol/closecodes.py.
"""

from __future__ import annotations

import struct

import msgpack
import pytest

from tests.conformance.peer import OP_BINARY, OP_CLOSE, OP_PING, Peer, frame

PROTOCOL_ERROR = 1002
VALID = [
    1000,
    1001,
    1002,
    1003,
    1007,
    1008,
    1009,
    1010,
    1011,
    1012,
    1013,
    1014,
    3000,
    3999,
    4000,
    4999,
]
INVALID = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]

pytestmark = pytest.mark.slow  # one real `fanout serve` for the suite


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason)


def test_5_5_1_empty_close_is_answered_with_an_empty_close(peer: Peer) -> None:
    """Issue 15: the engine answered `88 02 00 00` (status code 0) and Node's
    `ws` reported 1002 for its own `ws.close()`."""
    peer.send(bytes.fromhex("888000000000"))  # the bytes of the issue: empty, mask 0
    f = peer.expect_close()
    assert f.payload == b"", f"answered {f.payload.hex()} to an empty close"
    assert f.fin and not f.masked


def test_5_5_1_empty_close_with_a_random_mask_is_answered_empty(peer: Peer) -> None:
    peer.send(frame(OP_CLOSE, b""))
    assert peer.expect_close().payload == b""


@pytest.mark.parametrize("code", VALID)
def test_7_4_1_valid_code_is_echoed(peer: Peer, code: int) -> None:
    peer.send(close(code))
    f = peer.expect_close()
    assert f.close_code == code, f"sent {code}, answered {f.payload.hex()}"


@pytest.mark.parametrize("code", [1000, 4000])
def test_7_4_1_valid_code_with_a_reason_is_echoed(peer: Peer, code: int) -> None:
    peer.send(close(code, "bye, κόσμε".encode()))
    assert peer.expect_close().close_code == code


@pytest.mark.parametrize("code", INVALID)
def test_7_4_1_invalid_code_is_answered_1002(peer: Peer, code: int) -> None:
    peer.send(close(code))
    f = peer.expect_close()
    assert f.close_code == PROTOCOL_ERROR, f"sent {code}, answered {f.payload.hex()}"


def test_5_5_1_one_byte_close_payload_is_answered_1002(peer: Peer) -> None:
    peer.send(frame(OP_CLOSE, b"\x03"))
    assert peer.expect_close().close_code == PROTOCOL_ERROR


def test_5_5_1_longest_reason_is_accepted(peer: Peer) -> None:
    peer.send(close(1000, b"r" * 123))
    assert peer.expect_close().close_code == 1000


@pytest.mark.parametrize(
    "reason",
    [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xce", b"\xf4\x90\x80\x80", b"ok\x80"],
    ids=["ff", "overlong", "surrogate", "truncated", "above_10ffff", "lone_continuation"],
)
def test_8_1_a_close_reason_that_is_not_utf8_is_answered_1007(peer: Peer, reason: bytes) -> None:
    peer.send(close(1000, reason))
    f = peer.expect_close()
    assert f.close_code in (1007, PROTOCOL_ERROR), f"answered {f.payload.hex()}"


def test_8_1_a_valid_utf8_close_reason_is_accepted(peer: Peer) -> None:
    peer.send(close(1000, "κόσμε \U0001f600".encode()))
    assert peer.expect_close().close_code == 1000


def test_5_5_1_nothing_is_processed_after_a_close(peer: Peer) -> None:
    """After its close frame a peer sends no more data (5.5.1); what follows
    in the same write is not processed: no pong, no reply to a message."""
    ping_msg = frame(OP_BINARY, msgpack.packb({"op": "ping", "id": 9}))
    peer.send(close(1000) + frame(OP_PING, b"late") + ping_msg)
    f, before = peer.read_until(OP_CLOSE)
    assert f.close_code == 1000 and before == []
    assert peer.at_eof()
    assert peer.buf == b"", "bytes after the server's close frame"


def test_7_1_1_the_server_closes_the_tcp_connection_after_the_handshake(peer: Peer) -> None:
    peer.send(close(1000))
    f = peer.expect_close()  # asserts the EOF after it
    assert f.close_code == 1000
