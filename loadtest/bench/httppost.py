"""The bench publisher's HTTP client: keep-alive POSTs at a third of http.client's CPU.

`http.client` spends ~250 µs of CPU per request on this machine (header
objects, `email.parser` for the response's headers, several reads), about as
much as building a batch of 100 items; a publisher at 100 requests/s then
costs the generator a few percent of a core that is not the server's. This
client does only what the bench's `POST /publish` needs:

1. One request at a time on one connection, written with one `sendall`
   (request line, headers and body together: no Nagle/delayed-ACK stall).
2. The response's head is read up to `MAX_HEAD_BYTES` and parsed by
   `parse_head` (pure: status, Content-Length, Connection: close); its body is
   exactly Content-Length bytes, at most `MAX_BODY_BYTES`. A response without
   Content-Length (chunked, or read-to-close) is refused (`ResponseError`):
   the engine's admin always sends one.
3. Every read and write is bounded by `timeout_s` (the socket's timeout).
4. After an error, or a response with `Connection: close`, the connection is
   closed; the next `post` opens a new one.

Errors are `OSError` (connect, timeout, reset) or `ResponseError` (an
`http.client.HTTPException`: a malformed or oversized response), the same
families `http.client` raises, so a caller catches both as before.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Mapping

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
_READ_BYTES = 65536


class ResponseError(http.client.HTTPException):
    """A response this client does not accept (malformed, too large, no length)."""


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length, connection closes) of a response head (without its
    final blank line); raises ResponseError naming what is wrong."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ResponseError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = -1
    closes = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ResponseError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit():
                raise ResponseError(f"bad content-length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            raise ResponseError("transfer-encoding is not supported: Content-Length expected")
        elif name == b"connection":
            closes = value.strip().lower() == b"close"
    if length < 0:
        raise ResponseError("no content-length in the response")
    if length > MAX_BODY_BYTES:
        raise ResponseError(f"content-length {length} over {MAX_BODY_BYTES} bytes")
    return status, length, closes


class KeepAlivePost:
    """POST requests to one `host:port` over one keep-alive connection (rules 1-4)."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.buf = b""  # bytes read past the last response (none with one request at a time)

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """Send one POST and read its whole response: (status, body). Raises OSError
        or ResponseError; the connection is closed then (rule 4)."""
        try:
            return self._exchange(path, body, headers)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.buf = b""

    def _exchange(self, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.sock
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode("latin-1") + body)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > MAX_HEAD_BYTES:
                raise ResponseError(f"response head over {MAX_HEAD_BYTES} bytes")
            buf += self._read(sock)
        status, length, closes = parse_head(buf[:end])
        rest = buf[end + 4 :]
        while len(rest) < length:
            rest += self._read(sock)
        self.buf = rest[length:]
        if closes:
            self.close()
        return status, rest[:length]

    @staticmethod
    def _read(sock: socket.socket) -> bytes:
        data = sock.recv(_READ_BYTES)
        if not data:
            raise http.client.RemoteDisconnected("the server closed the connection")
        return data


__all__ = ["MAX_BODY_BYTES", "MAX_HEAD_BYTES", "KeepAlivePost", "ResponseError", "parse_head"]
