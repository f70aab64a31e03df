"""One WebSocket connection: picows callbacks in, the connection's rules asked,
their answers carried out.

Everything here runs synchronously inside picows callbacks (no task or await
per message). A `WSFrame` is valid only inside `on_ws_frame`: payloads are
copied out there.

The rules (what a frame or a request means, what to answer, when to close:
rate limits, fragments, framing errors, authentication, permissions, a `sub`
waiting for a topic load) live in engine/connection.py, a pure module; this
shell feeds it a frame's type, fin bit and size, copies a payload only when
the rules ask for it, and carries out what they return. What the connection
needs of its worker is `ConnectionHost`, nothing more.

The connection owns its `Session` (engine.fanout.core) and implements its
`Writer`: `write` admits a planned frame only under the send budget
(engine.fanout.budget); control replies (ack, err, snap, pong) bypass the
budget, but a connection whose buffer passes `hard_cap_bytes` with them is
evicted as a slow consumer (4008).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from engine import codes
from engine.auth.tokens import TokenError, TokenVerifier
from engine.bus.base import Update
from engine.connection import (
    CLOSE_FRAME,
    IGNORE,
    INFLATE,
    MESSAGE,
    PAUSE,
    PING,
    PONG,
    REFUSE,
    REFUSE_MESSAGE,
    STORE,
    Action,
    Close,
    ConnectionPolicy,
    ConnectionRules,
    LoadFailure,
    Publish,
    PublishBatch,
)
from engine.counters import WorkerCounters
from engine.errors import BusError
from engine.fanout.budget import admits
from engine.fanout.core import Session
from engine.protocol import codec
from engine.protocol.codec import Auth, Ping, Sub, Unsub
from engine.protocol.deflate import Deflater

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE


class ConnectionHost(Protocol):
    """What a connection needs from its worker (workers/server.py `WorkerServer`)."""

    @property
    def counters(self) -> WorkerCounters: ...  # the worker's, counted into
    @property
    def connection_policy(self) -> ConnectionPolicy: ...  # shared by its connections
    @property
    def verifier(self) -> TokenVerifier | None: ...  # None: auth.mode = "none"
    @property
    def max_buffer_bytes(self) -> int: ...  # the send budget (fanout.max_buffer_bytes)
    @property
    def hard_cap_bytes(self) -> int: ...  # past it with replies: evicted (4008)
    @property
    def deflater(self) -> Deflater | None: ...  # permessage-deflate: the worker's compressor

    def hello(self, conn_id: str, auth_required: bool) -> bytes: ...
    def connection_opened(self, conn: Connection) -> None: ...
    def connection_closed(self, conn: Connection) -> None: ...
    def connection_slow(self, conn: Connection) -> None:
        """`conn` went over its send budget (its session is paused)."""

    def connection_drained(self, conn: Connection) -> None:
        """`conn` drained below its budget: its session catches up."""

    def subscribe(
        self, session: Session, topic: str, since: tuple[str, int] | None, max_hz: float | None
    ) -> bytes:
        """Subscribe `session` to `topic` (held by the worker): its `snap`."""

    def unsubscribe(self, session: Session, topic: str) -> None: ...
    def missing_topics(self, topics: Sequence[str]) -> list[str]:
        """The topics of a `sub` the worker must load from the bus first."""

    def load_topics(
        self, topics: Sequence[str], done: Callable[[LoadFailure | None], None]
    ) -> None: ...
    def publish(
        self, updates: Sequence[Update], done: Callable[[Sequence[int] | BusError], None]
    ) -> None:
        """Publish `updates` all or nothing: `done` gets one position per update."""


class Connection(WSListener):
    """One client connection of a worker."""

    __slots__ = (
        "closing",
        "conn_id",
        "host",
        "last_ping_at",
        "opened_at",
        "paused_since",
        "peer",
        "ping_sent_at",
        "rules",
        "session",
        "transport",
        "underlying",
    )

    def __init__(self, host: ConnectionHost, conn_id: str, peer: str, phase: int = 0) -> None:
        self.host = host
        self.conn_id = conn_id
        self.peer = peer
        self.transport: WSTransport | None = None
        self.underlying: Any = None  # the asyncio transport under picows'
        self.session = Session(self, phase)  # spreads its rate-limited frames
        self.paused_since: float | None = None
        self.ping_sent_at: float | None = None
        self.opened_at = self.last_ping_at = time.monotonic()
        self.closing = False
        self.rules = ConnectionRules(
            host.connection_policy, host.counters, self.session.subs, self.opened_at
        )

    # -- picows callbacks ------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.underlying = transport.underlying_transport
        self.host.connection_opened(self)
        self.send_control(self.host.hello(self.conn_id, not self.rules.authed))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.host.connection_closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # valid only inside on_ws_frame: copy the payload out before returning
        if self.closing:
            return  # nothing a peer sends after a close, or once we failed it, is read
        rules = self.rules
        verdict = rules.frame(
            frame.msg_type,  # type: ignore[arg-type]  # an IntEnum of the opcodes at run time
            frame.fin,
            frame.payload_size,
            (frame.rsv1 << 2 | frame.rsv2 << 1 | frame.rsv3)
            if frame.rsv1 or frame.rsv2 or frame.rsv3
            else 0,
            time.monotonic(),
        )
        if verdict == MESSAGE:
            action = rules.receive(frame.get_payload_as_bytes())
            _ACTS[type(action)](self, action)
        elif verdict != IGNORE:
            self.frame_verdict(verdict, transport, frame)

    def frame_verdict(self, verdict: int | Close, transport: WSTransport, frame: WSFrame) -> None:
        """Carry out what the rules said of a frame that is not a whole message."""
        rules = self.rules
        if verdict == STORE:
            message = rules.store(frame.get_payload_as_bytes(), frame.fin)
            if message is not None:
                self.act(rules.assembled(message))
        elif verdict == INFLATE:
            self.act(rules.inflated(frame.get_payload_as_bytes()))
        elif verdict == PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif verdict == PONG:
            self.ping_sent_at = None
        elif verdict == CLOSE_FRAME:
            self.closing = True
            reply = rules.close_received(frame.payload_size, int(frame.get_close_code().value))
            if reply is None:
                transport.send(_CLOSE, b"")  # an empty close for an empty close (RFC 6455 5.5.1)
            else:
                transport.send_close(WSCloseCode(reply))
            transport.disconnect()
        elif verdict == REFUSE:
            self.send_control(rules.refusal(None))
        elif verdict == REFUSE_MESSAGE:
            self.send_control(rules.refusal(frame.get_payload_as_bytes()))
        elif verdict == PAUSE:
            self.underlying.pause_reading()
            delay = rules.resume_at - time.monotonic() + 0.005
            asyncio.get_running_loop().call_later(max(0.0, delay), self.resume_reads)
        elif isinstance(verdict, Close):
            self.close_with(verdict)

    def resume_reads(self) -> None:
        if self.rules.resume() and self.may_read():
            self.underlying.resume_reading()

    def may_read(self) -> bool:
        transport = self.transport
        return (
            not self.closing
            and transport is not None
            and not transport.is_close_frame_sent  # picows failed a frame meanwhile
        )

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
            self.host.connection_slow(self)

    def mark_drained(self) -> None:
        if self.session.paused:
            self.paused_since = None
            self.host.connection_drained(self)

    def check_deadlines(self, now: float) -> bool:
        """Close the connection if one of its deadlines passed (the worker's
        one-second timer asks): True if it did."""
        overdue = self.rules.overdue(now)
        if overdue is None:
            return False
        self.close_with(overdue)
        return True

    # -- Writer (engine.fanout.core) -------------------------------------------------

    def write(self, frame: bytes, compressed: bool = False) -> bool:
        """Send a planned frame if the send budget admits it; otherwise the
        connection is slow until its buffer drains. `compressed`: RSV1."""
        if self.closing or self.session.paused:
            return False
        buffered = self.underlying.get_write_buffer_size()
        if not admits(buffered, len(frame), self.host.max_buffer_bytes):
            self.mark_slow()
            return False
        self.transport.send(_BINARY, frame, True, compressed)  # type: ignore[union-attr]
        return True

    def send_control(self, frame: bytes) -> None:
        """Send a reply regardless of the budget, evicting a client that hoards
        them. Compressed for a client that negotiated it (a `snap` is made for
        this client: compressed for it alone)."""
        if self.closing or self.transport is None:
            return
        deflater = self.host.deflater
        if self.session.deflate and deflater is not None and len(frame) >= deflater.min_bytes:
            self.transport.send(_BINARY, deflater.frame(frame), True, True)
        else:
            self.transport.send(_BINARY, frame)
        host = self.host
        host.counters.control_frames += 1
        if self.underlying.get_write_buffer_size() > host.hard_cap_bytes:
            self.close(codes.CLOSE_SLOW_CONSUMER, "slow consumer: replies not read")

    def close(self, code: int, reason: str = "") -> None:
        """Close with `code`, dropping whatever is still buffered (a slow client's
        backlog must not delay its eviction)."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.rules.drop_message(None)  # now: the connection itself is freed only by a gc cycle
        self.transport.send_close(WSCloseCode(code), reason.encode()[:120])
        if code in (codes.CLOSE_SLOW_CONSUMER,):
            self.transport.disconnect(graceful=False)
        else:
            self.transport.disconnect()

    def close_with(self, close: Close) -> None:
        if close.reply is not None:
            self.send_control(close.reply)
        self.close(close.code, close.reason)

    # -- requests: what the rules return (engine.connection.Action) ------------------

    def act(self, action: Action) -> None:
        _ACTS[type(action)](self, action)

    def nothing(self, action: None) -> None:
        pass

    def pong(self, req: Ping) -> None:
        self.send_control(codec.pong(req.id, int(time.time() * 1000)))

    def check_token(self, req: Auth) -> None:
        verifier = self.host.verifier
        assert verifier is not None  # the rules ack `auth` themselves without tokens
        try:
            identity = verifier.verify(req.token, time.time())
        except TokenError as exc:
            self.close(codes.CLOSE_NOT_AUTHENTICATED, str(exc))
            return
        self.act(
            self.rules.authenticate(
                req,
                identity.permissions,
                identity.user,
                identity.expires_at,
                time.monotonic(),
                time.time(),
            )
        )

    def begin_sub(self, req: Sub) -> None:
        """A `sub` the rules admitted: answered now if the worker holds its
        topics, else once the bus loaded them (engine/fanout/core.py rule 9),
        reading paused meanwhile."""
        missing = self.host.missing_topics(req.topics)
        if not missing:
            self.answer_sub(req)
            return
        self.rules.wait()
        self.underlying.pause_reading()
        self.host.load_topics(missing, lambda failed: self.sub_loaded(req, failed, 1))

    def answer_sub(self, req: Sub) -> None:
        """Subscribe to topics all held: `ack`, then one `snap` per topic, one frame."""
        subscribe = self.host.subscribe
        session = self.session
        parts = [codec.ack(req.id)]
        for topic in req.topics:
            parts.append(subscribe(session, topic, req.since.get(topic), req.max_hz))
        self.send_control(b"".join(parts))

    def sub_loaded(self, req: Sub, failed: LoadFailure | None, attempt: int) -> None:
        """The loads a waiting `sub` asked for are done: answer it, then the
        requests held meanwhile, in order; then read again."""
        rules = self.rules
        if self.closing:
            rules.forget_held()
            return
        missing = self.host.missing_topics(req.topics) if failed is None else ()
        answer = rules.loaded(req, failed, missing, attempt)
        if answer is None:
            self.host.load_topics(missing, lambda f: self.sub_loaded(req, f, attempt + 1))
            return
        if type(answer) is Sub:
            self.answer_sub(answer)
        else:
            self.send_control(answer)  # type: ignore[arg-type]
        while not self.closing:
            payload = rules.next_held()
            if payload is None:
                break
            self.act(rules.receive(payload))
        if rules.held is None and not rules.reads_paused and self.may_read():
            self.underlying.resume_reading()

    def unsub(self, req: Unsub) -> None:
        for topic in req.topics:
            self.host.unsubscribe(self.session, topic)
        self.send_control(codec.ack(req.id))

    def publish(self, req: Publish) -> None:
        def done(result: Sequence[int] | BusError) -> None:
            self.send_control(self.rules.published(req, result, time.monotonic() - t0))

        t0 = time.monotonic()
        self.host.publish((req.update,), done)

    def publish_batch(self, req: PublishBatch) -> None:
        def done(result: Sequence[int] | BusError) -> None:
            self.send_control(self.rules.published_batch(req, result, time.monotonic() - t0))

        t0 = time.monotonic()
        self.host.publish(req.updates, done)


# What a connection does with each kind of action the rules return (by type:
# one dict lookup, no chain of tests, per request).
_ACTS: dict[type, Callable[[Connection, Any], None]] = {
    type(None): Connection.nothing,
    bytes: Connection.send_control,
    Close: Connection.close_with,
    Sub: Connection.begin_sub,
    Unsub: Connection.unsub,
    Ping: Connection.pong,
    Auth: Connection.check_token,
    Publish: Connection.publish,
    PublishBatch: Connection.publish_batch,
}
