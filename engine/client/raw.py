"""A minimal protocol-v1 connection over picows: send messages, receive decoded ones.

This is the plain wire layer (no state view, no reconnects) used by
`fanout watch`, the first benchmark script and the tests. The full client
(state view, recovery with `since`, backoff) builds on it.

Received frames are decoded into messages inside `on_ws_frame` (a frame is
valid only there) and queued; the queue is bounded by `max_queue` messages,
and overflow closes the connection (policy "fail loudly": a reader that cannot
keep up must not silently lose state updates).

It offers permessage-deflate (`compression=True`, the default): frames the
engine sends compressed (RSV1) are inflated here, each on its own (the
engine answers `server_no_context_takeover`), up to `MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from engine.protocol.codec import decode_server_frame
from engine.protocol.deflate import CLIENT_OFFER, accepted, inflate

_BINARY = WSMsgType.BINARY
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a frame, or a compressed one inflated


class ConnectionClosed(Exception):
    """The server closed the connection; `code` is its close code (1006 if none)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class _Listener(WSListener):
    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.conn.transport = transport
        self.conn.deflate = accepted(transport.response.headers.get("Sec-WebSocket-Extensions"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        conn = self.conn
        mtype = frame.msg_type
        if mtype == _BINARY:
            conn.frames += 1
            payload = frame.get_payload_as_bytes()
            if frame.rsv1:
                if not conn.deflate:  # RFC 6455 5.2: no extension, no RSV bit
                    transport.send_close(WSCloseCode.PROTOCOL_ERROR)
                    transport.disconnect()
                    return
                # a broken or oversized one raises (ValueError): picows then disconnects
                payload = inflate(payload, MAX_MESSAGE_BYTES)
            # A value that cannot be decoded arrives as an Undecodable (codec rule 5);
            # only a broken frame raises (ValueError), and picows then disconnects.
            conn.push(decode_server_frame(payload))
        elif mtype == WSMsgType.CLOSE:
            conn.close_code = frame.get_close_code().value
            conn.close_reason = frame.get_close_reason() or ""
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif mtype == WSMsgType.TEXT:
            conn.push([{"op": "_text", "text": frame.get_payload_as_utf8_text()}])

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.conn.set_closed()


class RawConnection:
    """One WebSocket connection speaking protocol v1."""

    def __init__(self, max_queue: int = 1_000_000) -> None:
        self.transport: WSTransport | None = None
        self.deflate = False  # permessage-deflate negotiated
        self.frames = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.max_queue = max_queue
        self._queue: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def push(self, messages: list[Any]) -> None:
        self._queue.extend(messages)
        if len(self._queue) > self.max_queue and self.transport is not None:
            self.transport.send_close(WSCloseCode.POLICY_VIOLATION)
            self.transport.disconnect()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def set_closed(self) -> None:
        if not self.closed.done():
            self.closed.set_result(self.close_code if self.close_code is not None else 1006)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- sending ---------------------------------------------------------------------

    def send(self, message: Mapping[str, Any]) -> None:
        self.send_bytes(msgpack.packb(message, use_bin_type=True))

    def send_bytes(self, payload: bytes, msg_type: WSMsgType = _BINARY, fin: bool = True) -> None:
        if self.transport is None:
            raise ConnectionClosed(1006)
        self.transport.send(msg_type, payload, fin)

    def subscribe(
        self,
        topics: Sequence[str],
        *,
        id: int | None = None,
        since: Mapping[str, tuple[str, str]] | None = None,
        max_hz: float | None = None,
    ) -> None:
        msg: dict[str, Any] = {"op": "sub", "topics": list(topics)}
        if id is not None:
            msg["id"] = id
        if since:
            msg["since"] = {t: list(m) for t, m in since.items()}
        if max_hz is not None:
            msg["max_hz"] = max_hz
        self.send(msg)

    # -- receiving -------------------------------------------------------------------

    def pending(self) -> int:
        return len(self._queue)

    def take_nowait(self) -> list[dict[str, Any]]:
        out = list(self._queue)
        self._queue.clear()
        return out

    async def recv(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The next message. Raises ConnectionClosed when the connection ended
        with nothing left to read, TimeoutError after `timeout` seconds."""
        while not self._queue:
            if self.closed.done():
                raise ConnectionClosed(self.closed.result(), self.close_reason)
            self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._waiter, timeout)
        return self._queue.popleft()

    async def recv_op(self, op: str, timeout: float = 10.0) -> dict[str, Any]:
        """Skip messages until one with `op` arrives."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.001, deadline - loop.time()))
            if msg.get("op") == op:
                return msg

    async def wait_closed(self, timeout: float = 10.0) -> int:
        return int(await asyncio.wait_for(asyncio.shield(self.closed), timeout))

    @staticmethod
    async def wait_any(conns: Sequence[RawConnection], timeout: float) -> None:
        """Return once one of `conns` has a message waiting, one of them ends while
        this waits, or all have ended; or after `timeout` seconds (then without
        raising). A connection that had ended before does not wake it: the others
        are still waited on."""
        if any(c._queue for c in conns) or all(c.closed.done() for c in conns):
            return
        waiter = asyncio.get_running_loop().create_future()
        for c in conns:
            c._waiter = waiter
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            for c in conns:
                if c._waiter is waiter:
                    c._waiter = None

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.closed.done():
            self.transport.send_close(WSCloseCode(code))
            self.transport.disconnect()


async def connect(
    url: str,
    *,
    subprotocols: Sequence[str] = ("fanout.v1",),
    extra_headers: Mapping[str, str] | None = None,
    max_queue: int = 1_000_000,
    timeout: float = 10.0,
    compression: bool = True,
) -> RawConnection:
    """Open a connection; the server's `hello` is the first message received.
    `compression`: offer permessage-deflate (the engine then compresses
    frames of `fanout.compression_min_bytes` or more)."""
    conn = RawConnection(max_queue)
    headers = dict(extra_headers or {})
    if subprotocols:
        headers["Sec-WebSocket-Protocol"] = ", ".join(subprotocols)
    if compression:
        headers.setdefault("Sec-WebSocket-Extensions", CLIENT_OFFER)
    await ws_connect(
        lambda: _Listener(conn),
        url,
        extra_headers=headers,
        websocket_handshake_timeout=timeout,
        max_frame_size=MAX_MESSAGE_BYTES,
        logger_name="client",
    )
    return conn
