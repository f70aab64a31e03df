"""One WebSocket connection: picows callbacks in, protocol requests dispatched.

Everything here runs synchronously inside picows callbacks (no task or await
per message). A `WSFrame` is valid only inside `on_ws_frame`: payloads are
copied out there.

The connection owns its `Session` (engine.fanout.core) and implements its
`Writer`: `write` admits a planned frame only under the send budget
(engine.fanout.budget); control replies (ack, err, snap, pong) bypass the
budget, but a connection whose buffer passes `hard_cap_bytes` with them is
evicted as a slow consumer (4008).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from engine import codes
from engine.bus.base import Update
from engine.codes import ErrorCode
from engine.errors import BusError, BusUnavailable, RemoteProtocolError
from engine.fanout.budget import admits
from engine.fanout.core import Session
from engine.protocol import codec
from engine.protocol.codec import Auth, Ping, Pub, Sub, Unsub

if TYPE_CHECKING:
    from collections.abc import Sequence

    from workers.server import WorkerServer

_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION


class Connection(WSListener):
    """One client connection of a worker."""

    __slots__ = (
        "bad_frames",
        "closing",
        "conn_id",
        "fragments",
        "fragments_size",
        "last_ping_at",
        "opened_at",
        "paused_since",
        "peer",
        "ping_sent_at",
        "server",
        "session",
        "transport",
        "underlying",
    )

    def __init__(self, server: WorkerServer, conn_id: str, peer: str) -> None:
        self.server = server
        self.conn_id = conn_id
        self.peer = peer
        self.transport: WSTransport | None = None
        self.underlying: object = None
        self.session = Session(self)
        self.fragments: list[bytes] | None = None
        self.fragments_size = 0
        self.bad_frames = 0
        self.paused_since: float | None = None
        self.ping_sent_at: float | None = None
        self.opened_at = self.last_ping_at = time.monotonic()
        self.closing = False

    # -- picows callbacks ------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.underlying = transport.underlying_transport
        self.server.connection_opened(self)
        self.send_control(self.server.hello(self.conn_id))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.server.connection_closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # valid only inside on_ws_frame: copy the payload out before returning
        if self.closing:
            return
        mtype = frame.msg_type
        if mtype == _BINARY:
            if frame.fin:
                self.receive_message(frame.get_payload_as_bytes())
            else:
                self.fragments = [frame.get_payload_as_bytes()]
                self.fragments_size = frame.payload_size
        elif mtype == _CONTINUATION:
            if self.fragments is None:
                return  # continuation of a refused (text) message or a protocol slip
            self.fragments_size += frame.payload_size
            if self.fragments_size > self.server.max_message_bytes:
                self.fragments = None
                self.close(codes.CLOSE_MESSAGE_TOO_BIG, "message too big")
                return
            self.fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                payload = b"".join(self.fragments)
                self.fragments = None
                self.receive_message(payload)
        elif mtype == WSMsgType.PONG:
            self.ping_sent_at = None
        elif mtype == WSMsgType.TEXT:
            self.close(
                codes.CLOSE_UNSUPPORTED_DATA, "text frames are not accepted; send binary msgpack"
            )
        elif mtype == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        # PING frames are answered by picows (auto-pong)

    def pause_writing(self) -> None:
        # the transport crossed its high watermark (half the budget): stop sending
        self.mark_slow()

    def resume_writing(self) -> None:
        # drained below the low watermark: catch up on the next due tick
        self.mark_drained()

    def mark_slow(self) -> None:
        if not self.session.paused:
            self.session.paused = True
            self.paused_since = time.monotonic()
            self.server.paused.add(self)

    def mark_drained(self) -> None:
        if self.session.paused:
            self.paused_since = None
            self.server.paused.discard(self)
            self.server.fanout.resume(self.session)

    # -- Writer (engine.fanout.core) -------------------------------------------------

    def write(self, frame: bytes) -> bool:
        """Send a planned frame if the send budget admits it; otherwise the
        connection is slow until its buffer drains."""
        if self.closing or self.session.paused:
            return False
        buffered = self.underlying.get_write_buffer_size()  # type: ignore[attr-defined]
        if not admits(buffered, len(frame), self.server.max_buffer_bytes):
            self.mark_slow()
            return False
        self.transport.send(_BINARY, frame)  # type: ignore[union-attr]
        return True

    def send_control(self, frame: bytes) -> None:
        """Send a reply regardless of the budget, evicting a client that hoards them."""
        if self.closing or self.transport is None:
            return
        self.transport.send(_BINARY, frame)
        self.server.stats_control_frames += 1
        if self.underlying.get_write_buffer_size() > self.server.hard_cap_bytes:  # type: ignore[attr-defined]
            self.close(codes.CLOSE_SLOW_CONSUMER, "slow consumer: replies not read")

    def close(self, code: int, reason: str = "") -> None:
        """Close with `code`, dropping whatever is still buffered (a slow client's
        backlog must not delay its eviction)."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.transport.send_close(WSCloseCode(code), reason.encode()[:120])
        if code in (codes.CLOSE_SLOW_CONSUMER,):
            self.transport.disconnect(graceful=False)
        else:
            self.transport.disconnect()

    # -- requests --------------------------------------------------------------------

    def receive_message(self, payload: bytes) -> None:
        server = self.server
        try:
            request = codec.decode_request(payload, server.max_topics_per_conn)
        except RemoteProtocolError as exc:
            self.refuse(exc)
            if exc.code == ErrorCode.BAD_REQUEST:
                self.bad_frames += 1
                if self.bad_frames >= codes.MAX_CONSECUTIVE_BAD_FRAMES:
                    self.close(codes.CLOSE_POLICY_VIOLATION, "too many undecodable messages")
            return
        self.bad_frames = 0
        if type(request) is Sub:
            self.handle_sub(request)
        elif type(request) is Pub:
            self.handle_pub(request)
        elif type(request) is Unsub:
            self.handle_unsub(request)
        elif type(request) is Ping:
            self.send_control(codec.pong(request.id, int(time.time() * 1000)))
        elif type(request) is Auth:
            # auth.mode = "none": there is nothing to authenticate; accept politely.
            self.send_control(codec.ack(request.id, user=None))

    def refuse(self, exc: RemoteProtocolError) -> None:
        self.server.count_error(exc.code)
        self.send_control(codec.err(exc.code, exc.message, exc.request_id, exc.topic))

    def handle_sub(self, req: Sub) -> None:
        server = self.server
        subs = self.session.subs
        new = sum(1 for t in req.topics if t not in subs)
        if len(subs) + new > server.max_topics_per_conn:
            self.refuse(
                RemoteProtocolError(
                    ErrorCode.TOO_MANY_TOPICS,
                    f"subscribing would hold {len(subs) + new} topics; "
                    f"the limit is {server.max_topics_per_conn}",
                    topic=req.topics[0],
                    request_id=req.id,
                )
            )
            return
        parts = [codec.ack(req.id)]
        for topic in req.topics:
            snap, n = server.subscribe(self.session, topic, req.since.get(topic), req.max_hz)
            parts.append(snap)
            server.fanout.stats.updates_delivered += n
        self.send_control(b"".join(parts))

    def handle_unsub(self, req: Unsub) -> None:
        for topic in req.topics:
            self.server.fanout.unsubscribe(self.session, topic)
        self.send_control(codec.ack(req.id))

    def handle_pub(self, req: Pub) -> None:
        server = self.server
        if not server.allow_publish:
            self.refuse(
                RemoteProtocolError(
                    ErrorCode.FORBIDDEN,
                    "publishing over WebSocket is disabled (auth.allow_anonymous_publish = false)",
                    topic=req.topic,
                    request_id=req.id,
                )
            )
            return
        if req.key is None:
            self.refuse(
                RemoteProtocolError(
                    ErrorCode.BAD_REQUEST,
                    "'pub' to a state topic needs a string 'key'",
                    topic=req.topic,
                    request_id=req.id,
                )
            )
            return
        rid = req.id
        topic = req.topic

        def done(result: Sequence[int] | BusError) -> None:
            if isinstance(result, BusError):
                code = (
                    ErrorCode.UNAVAILABLE
                    if isinstance(result, BusUnavailable)
                    else ErrorCode.INTERNAL
                )
                self.server.count_error(code)
                self.send_control(codec.err(code, str(result) or "bus unavailable", rid, topic))
            else:
                self.send_control(codec.ack(rid, pos=codec.format_pos(result[0])))

        server.bus.publish([Update(topic, req.key, req.data)], done)
