"""A raw RFC 6455 peer for the conformance suite: it writes any bytes a client
could (unmasked frames, reserved bits and opcodes, bad lengths, fragments with
control frames between them) and reads the server's frames with every header
bit, so that a test can assert what the RFC says the server must answer.

Liveness without waiting for a timeout: `probe()` sends a ping with a unique
payload and reads until its pong. Frames are processed in order, so the pong
proves the connection is open and that everything sent before it was handled.
`expect_fail()` sends the same probe after the frame under test and reads until
a close frame: a pong first means the server let the frame through.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from tests.support.serve import TIMEOUT_FACTOR

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for `key` (RFC 6455 section 4.2.2, item 5.4)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame as a client would write it. `rsv` is the three RSV bits (0-7);
    `length` overrides the length written in the header (the payload is not
    changed); the shortest length encoding is used (section 5.2)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


@dataclass(frozen=True, slots=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """The status code of a close frame, None for an empty one."""
        assert self.opcode == OP_CLOSE, f"not a close frame: opcode {self.opcode:#x}"
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


class Refused(Exception):
    def __init__(self, status: int, head: str) -> None:
        super().__init__(f"upgrade refused: {head}")
        self.status = status
        self.head = head


def http_upgrade(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
    """Send a hand-written request; returns the status, the response headers
    (names lower-cased) and whatever bytes followed the head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT_FACTOR)
    try:
        sock.sendall(request.encode("latin-1"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, rest
    finally:
        sock.close()


def upgrade_request(port: int, *, drop: tuple[str, ...] = (), **extra: str) -> str:
    """A valid upgrade request to /ws, less the headers named in `drop`, plus
    `extra` (underscores in names become dashes; a name in both replaces)."""
    headers = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    lines = [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    return "GET /ws HTTP/1.1\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n"


class Peer:
    """One upgraded connection; the server's `hello` has been read."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT_FACTOR)
        self.key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.head = head.decode("latin-1")
        status = int(self.head.split(" ", 2)[1])
        if status != 101:
            raise Refused(status, self.head)
        self.hello = self.read_frame()
        self._probes = 0

    # -- writing -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_msg(self, message: Any) -> None:
        self.send(frame(OP_BINARY, msgpack.packb(message, use_bin_type=True)))

    # -- reading -----------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the TCP connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self) -> Frame:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        key = self._read(4) if b1 & 0x80 else b""
        payload = self._read(n)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, bool(b1 & 0x80), payload)

    def messages(self, f: Frame) -> list[Any]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(f.payload)
        return list(unpacker)

    def read_until(self, opcode: int) -> tuple[Frame, list[Frame]]:
        """Frames until one with `opcode` (a close ends the search too); returns
        it and the frames read before it."""
        seen: list[Frame] = []
        while True:
            f = self.read_frame()
            if f.opcode == opcode or f.opcode == OP_CLOSE:
                return f, seen
            seen.append(f)

    def probe(self) -> None:
        """Assert the connection is open and everything sent before was handled."""
        self._probes += 1
        token = f"probe-{self._probes}".encode()
        self.send(frame(OP_PING, token))
        while True:
            f = self.read_frame()
            assert f.opcode != OP_CLOSE, f"closed instead of answering a ping: {f}"
            if f.opcode == OP_PONG and f.payload == token:
                return

    def expect_close(self) -> Frame:
        """The server's close frame, then the end of the TCP connection
        (section 7.1.1: the server closes it first)."""
        f, _ = self.read_until(OP_CLOSE)
        assert f.opcode == OP_CLOSE
        assert self.at_eof(), "the TCP connection stayed open after the close handshake"
        return f

    def expect_fail(self) -> Frame:
        """The frame just sent must _Fail the WebSocket Connection_: read until
        the server's close frame; a pong to the probe sent after it first means
        the server accepted the frame."""
        try:
            self.send(frame(OP_PING, b"after"))
        except OSError:
            pass  # the server already closed: its close frame is in our buffer
        while True:
            f = self.read_frame()
            if f.opcode == OP_CLOSE:
                return f
            assert not (f.opcode == OP_PONG and f.payload == b"after"), (
                "the server answered the ping sent after the frame: the frame was accepted"
            )

    def at_eof(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
