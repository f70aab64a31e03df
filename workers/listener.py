"""One WebSocket connection: picows callbacks in, protocol requests dispatched.

Everything here runs synchronously inside picows callbacks (no task or await
per message). A `WSFrame` is valid only inside `on_ws_frame`: payloads are
copied out there.

The connection owns its `Session` (engine.fanout.core) and implements its
`Writer`: `write` admits a planned frame only under the send budget
(engine.fanout.budget); control replies (ack, err, snap, pong) bypass the
budget, but a connection whose buffer passes `hard_cap_bytes` with them is
evicted as a slow consumer (4008).

Security rules this module applies (the policies live in engine/auth):

- Every inbound frame but a close (data, each continuation of a fragmented
  message, ping, pong: auto-pong is off, pings are answered here) passes the
  connection's `RateLimiter` once, before it is copied or decoded: a refused
  frame costs a bucket check (its message is dropped whole), at most one
  `err rate_limited` per second is written, a connection past three times the
  rate is not read until its next one-second interval (TCP holds the rest
  back), and sustained abuse closes 4029.
- A fragmented message holds at most `limits.max_message_bytes` in at most
  `limits.max_message_fragments` frames (else 1009), and must end within
  `limits.fragment_timeout_s` of its first frame (else 1008; the worker's
  one-second timer checks idle connections). Empty fragments are counted,
  never stored. What one connection holds is thus bounded by configuration,
  whatever it sends (docs/protocol.md section 1).
- Framing errors picows passes on fail the connection with 1002 (RFC 6455
  5.2, 5.4): reserved bits without an extension, a continuation with no
  message to continue, a new data frame inside a fragmented message. A close
  frame is answered by engine.protocol.closecodes (an empty close with an
  empty close, a sendable code with itself, any other with 1002).
- Until a token is accepted (`auth.mode = "jwt"` without a token at upgrade)
  only `auth` is served; anything else, or no `auth` by `deadline`, closes 4001.
- `perms` decides `sub` (all or nothing, `err forbidden` naming the first
  refused topic) and `pub`. A token refresh (`auth` on an authenticated
  connection) replaces them; if the new token no longer covers a current
  subscription the connection is closed with 4003, like an expired token.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import TYPE_CHECKING

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from engine import codes
from engine.auth.permissions import Permissions
from engine.auth.ratelimit import ABUSIVE, ADMITTED, PAUSE, RATE_LIMITED, RateLimiter
from engine.auth.tokens import TokenError
from engine.bus.base import Update
from engine.codes import ErrorCode
from engine.errors import BusError, BusRefused, BusUnavailable, RemoteProtocolError
from engine.fanout.budget import admits
from engine.fanout.core import Session
from engine.protocol import codec
from engine.protocol.closecodes import CLOSE_PROTOCOL_ERROR, close_reply
from engine.protocol.codec import Auth, Ping, Pub, Sub, Unsub

if TYPE_CHECKING:
    from collections.abc import Sequence

    from workers.server import LoadFailure, WorkerServer

_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_PING = WSMsgType.PING
# loads of a `sub`'s topics, when one loaded first went (its grace) while another loaded
_SUB_LOAD_ATTEMPTS = 3
_PONG = WSMsgType.PONG
_CLOSE = WSMsgType.CLOSE
_TEXT = WSMsgType.TEXT

# `Connection.fragments` while the rest of a refused message is skipped: shared,
# never appended to (compared by identity).
_SKIPPING: list[bytes] = []


class Connection(WSListener):
    """One client connection of a worker."""

    __slots__ = (
        "authed",
        "bad_frames",
        "closing",
        "conn_id",
        "deadline",
        "fragments",
        "fragments_deadline",
        "fragments_left",
        "fragments_size",
        "held",
        "last_ping_at",
        "limiter",
        "opened_at",
        "paused_since",
        "peer",
        "perms",
        "ping_sent_at",
        "reads_paused",
        "server",
        "session",
        "transport",
        "underlying",
        "user",
    )

    def __init__(self, server: WorkerServer, conn_id: str, peer: str, phase: int = 0) -> None:
        self.server = server
        self.conn_id = conn_id
        self.peer = peer
        self.transport: WSTransport | None = None
        self.underlying: object = None
        self.session = Session(self, phase)  # spreads its rate-limited frames
        # the message being reassembled (None: none; _SKIPPING: a refused one)
        self.fragments: list[bytes] | None = None
        self.fragments_size = 0
        self.fragments_left = 0  # continuation frames it may still have
        self.fragments_deadline = math.inf  # monotonic time by which it must end
        self.bad_frames = 0
        self.paused_since: float | None = None
        self.ping_sent_at: float | None = None
        self.opened_at = self.last_ping_at = time.monotonic()
        self.closing = False
        self.limiter = RateLimiter(server.rate_policy, self.opened_at)
        self.authed = False
        self.reads_paused = False
        # requests read while a `sub` waits for its topics' load, answered in
        # order after it (None: none waits); reading is paused meanwhile
        self.held: deque[bytes] | None = None
        self.perms: Permissions | None = None
        self.user: str | None = None
        # monotonic time by which the connection must (re)authenticate: inf = never
        self.deadline = math.inf

    def grant(self, perms: Permissions, user: str | None, expires_at: float | None) -> None:
        """Authenticated: `perms` apply; the connection ends (4003) at `expires_at`
        (seconds since the epoch) unless a fresh token arrives before."""
        self.authed = True
        self.perms = perms
        self.user = user
        self.deadline = (
            math.inf if expires_at is None else time.monotonic() + (expires_at - time.time())
        )

    # -- picows callbacks ------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.underlying = transport.underlying_transport
        self.server.connection_opened(self)
        self.send_control(self.server.hello(self.conn_id, not self.authed))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closing = True
        self.server.connection_closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # valid only inside on_ws_frame: copy the payload out before returning
        if self.closing:
            return  # nothing a peer sends after a close, or once we failed it, is read
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.fail("reserved bits set, and no extension was negotiated")
            return
        mtype = frame.msg_type
        if mtype == _CLOSE:
            self.receive_close(transport, frame)
            return
        if self.reads_paused:
            # paused: the rest of the current read is dropped unread (abuse)
            self.skip(mtype, frame.fin)
            return
        now = time.monotonic()
        verdict = self.limiter.admit(now)  # every frame, one bucket check
        if verdict != ADMITTED:
            self.throttle(verdict, frame)
            return
        if mtype == _BINARY:
            if frame.fin and self.fragments is None:
                self.receive_message(frame.get_payload_as_bytes())
            else:
                self.begin_message(frame, now)
        elif mtype == _CONTINUATION:
            self.receive_continuation(frame, now)
        elif mtype == _PING:
            # answered here, not by picows: a client's pings count against its
            # rate limit like messages (each pong is a write)
            transport.send_pong(frame.get_payload_as_bytes())
        elif mtype == _PONG:
            self.ping_sent_at = None
        else:  # TEXT: picows fails the reserved opcodes itself
            self.close(
                codes.CLOSE_UNSUPPORTED_DATA, "text frames are not accepted; send binary msgpack"
            )

    def begin_message(self, frame: WSFrame, now: float) -> None:
        """A binary frame while no message is being reassembled: a whole message
        (fin) after a skipped one, or the first fragment of a new one."""
        if self.fragments is not None and self.fragments is not _SKIPPING:
            self.fail("a new message began before the fragmented one ended")
            return
        if frame.fin:
            self.fragments = None
            self.receive_message(frame.get_payload_as_bytes())
            return
        self.fragments = [frame.get_payload_as_bytes()]
        self.fragments_size = frame.payload_size
        self.fragments_left = self.server.max_message_fragments - 1
        self.fragments_deadline = now + self.server.fragment_timeout_s

    def receive_continuation(self, frame: WSFrame, now: float) -> None:
        fragments = self.fragments
        if fragments is None:
            self.fail("a continuation frame, and no message to continue")
            return
        if fragments is _SKIPPING:
            if frame.fin:
                self.fragments = None
            return
        self.fragments_left -= 1
        if self.fragments_left < 0:
            self.close(
                codes.CLOSE_MESSAGE_TOO_BIG,
                f"a message in more than {self.server.max_message_fragments} fragments",
            )
            return
        if now > self.fragments_deadline:
            self.close_unfinished()
            return
        size = frame.payload_size
        if size:  # an empty fragment is counted, never stored
            self.fragments_size += size
            if self.fragments_size > self.server.max_message_bytes:
                self.close(codes.CLOSE_MESSAGE_TOO_BIG, "message too big")
                return
            fragments.append(frame.get_payload_as_bytes())
        if frame.fin:
            payload = fragments[0] if len(fragments) == 1 else b"".join(fragments)
            self.drop_message(None)
            self.receive_message(payload)

    def close_unfinished(self) -> None:
        """The fragmented message did not end in time (limits.fragment_timeout_s)."""
        self.close(codes.CLOSE_POLICY_VIOLATION, "a fragmented message was not finished in time")

    def drop_message(self, then: list[bytes] | None) -> None:
        """Forget the message being reassembled; `then` is None, or _SKIPPING
        to skip the rest of it."""
        self.fragments = then
        self.fragments_size = 0
        self.fragments_deadline = math.inf

    def skip(self, mtype: WSMsgType, fin: bool) -> None:
        """A data frame dropped unread (or refused): its message is dropped whole,
        and its later fragments skipped, so message boundaries stay known."""
        if mtype in (_BINARY, _CONTINUATION, _TEXT) and (self.fragments is not None or not fin):
            self.drop_message(None if fin else _SKIPPING)

    def fail(self, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close 1002, read nothing more."""
        self.close(CLOSE_PROTOCOL_ERROR, reason)

    def receive_close(self, transport: WSTransport, frame: WSFrame) -> None:
        """The client's close: answer it (engine.protocol.closecodes) and end."""
        reply = close_reply(frame.payload_size, int(frame.get_close_code().value))
        self.closing = True
        self.drop_message(None)
        if reply is None:
            transport.send(_CLOSE, b"")  # an empty close for an empty close (RFC 6455 5.5.1)
        else:
            transport.send_close(WSCloseCode(reply))
        transport.disconnect()

    def throttle(self, verdict: int, frame: WSFrame) -> None:
        """A frame the rate limiter did not admit: it is dropped (with the rest of
        its message), answered (at most once a second) or the connection closed,
        as the limiter says."""
        mtype = frame.msg_type
        whole = mtype == _BINARY and frame.fin and self.fragments is None
        self.skip(mtype, frame.fin)
        if verdict == ABUSIVE:
            self.close(codes.CLOSE_RATE_LIMITED, "rate limit abused")
            return
        self.server.count_error(ErrorCode.RATE_LIMITED)
        if verdict == PAUSE:
            if not self.reads_paused:
                self.reads_paused = True
                self.underlying.pause_reading()  # type: ignore[attr-defined]
                delay = self.limiter.resume_at - time.monotonic() + 0.005
                asyncio.get_running_loop().call_later(max(0.0, delay), self.resume_reads)
        elif verdict == RATE_LIMITED:
            # the id of the refused request, for the reply (a bounded decode, once a second)
            rid = None
            if whole:
                try:
                    rid = codec.decode_request(
                        frame.get_payload_as_bytes(), self.server.max_topics_per_conn
                    ).id
                except RemoteProtocolError as exc:
                    rid = exc.request_id
            self.send_control(
                codec.err(
                    ErrorCode.RATE_LIMITED,
                    f"over limits.messages_per_s ({self.limiter.policy.rate:g}/s, every frame"
                    " counts); message not processed",
                    rid,
                )
            )

    def resume_reads(self) -> None:
        self.reads_paused = False
        transport = self.transport
        if (
            not self.closing
            and transport is not None
            and not transport.is_close_frame_sent  # picows failed a frame meanwhile
            and self.held is None
        ):
            self.underlying.resume_reading()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        # the transport crossed its high watermark (half the budget): stop sending
        self.mark_slow()

    def resume_writing(self) -> None:
        # drained below the low watermark: catch up on the next due tick
        self.mark_drained()

    def mark_slow(self) -> None:
        if not self.session.paused:
            self.server.slow_events += 1
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
        self.drop_message(None)  # now: the connection itself is freed only by a gc cycle
        self.transport.send_close(WSCloseCode(code), reason.encode()[:120])
        if code in (codes.CLOSE_SLOW_CONSUMER,):
            self.transport.disconnect(graceful=False)
        else:
            self.transport.disconnect()

    # -- requests --------------------------------------------------------------------

    def receive_message(self, payload: bytes) -> None:
        if self.held is not None:
            # a `sub` waits for a load: requests keep their order (reading is
            # paused, so only the rest of the current read lands here, each
            # admitted by the rate limiter)
            self.held.append(payload)
            return
        server = self.server
        try:
            request = codec.decode_request(payload, server.max_topics_per_conn)
        except RemoteProtocolError as exc:
            if not self.authed:
                self.close(codes.CLOSE_NOT_AUTHENTICATED, "send 'auth' first")
                return
            self.refuse(exc)
            if exc.code == ErrorCode.BAD_REQUEST:
                self.bad_frames += 1
                if self.bad_frames >= codes.MAX_CONSECUTIVE_BAD_FRAMES:
                    self.close(codes.CLOSE_POLICY_VIOLATION, "too many undecodable messages")
            return
        self.bad_frames = 0
        if not self.authed and type(request) is not Auth:
            self.close(codes.CLOSE_NOT_AUTHENTICATED, "send 'auth' first")
            return
        if type(request) is Sub:
            self.handle_sub(request)
        elif type(request) is Pub:
            self.handle_pub(request)
        elif type(request) is Unsub:
            self.handle_unsub(request)
        elif type(request) is Ping:
            self.send_control(codec.pong(request.id, int(time.time() * 1000)))
        elif type(request) is Auth:
            self.handle_auth(request)

    def refuse(self, exc: RemoteProtocolError) -> None:
        self.server.count_error(exc.code)
        self.send_control(codec.err(exc.code, exc.message, exc.request_id, exc.topic))

    def handle_auth(self, req: Auth) -> None:
        verifier = self.server.verifier
        if verifier is None:
            # auth.mode = "none": there is nothing to authenticate; accept politely.
            self.send_control(codec.ack(req.id, user=None))
            return
        try:
            identity = verifier.verify(req.token, time.time())
        except TokenError as exc:
            self.close(codes.CLOSE_NOT_AUTHENTICATED, str(exc))
            return
        perms = identity.permissions
        if self.authed and perms.first_refused_sub(self.session.subs) is not None:
            self.close(codes.CLOSE_TOKEN_EXPIRED, "the new token does not cover the subscriptions")
            return
        self.grant(perms, identity.user, identity.expires_at)
        self.send_control(codec.ack(req.id, user=identity.user))

    def handle_sub(self, req: Sub) -> None:
        server = self.server
        subs = self.session.subs
        refused = self.perms.first_refused_sub(req.topics)  # type: ignore[union-attr]
        if refused is not None:
            self.refuse(
                RemoteProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"not allowed to subscribe to {refused!r}",
                    topic=refused,
                    request_id=req.id,
                )
            )
            return
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
        missing = server.missing_topics(req.topics)
        if missing:
            # topics this worker does not hold (engine/fanout/core.py rule 9):
            # answered once the bus loaded them; later requests wait their turn
            self.held = deque()
            self.underlying.pause_reading()  # type: ignore[attr-defined]
            server.load_topics(missing, lambda failed: self.sub_loaded(req, failed, 1))
            return
        self.answer_sub(req)

    def answer_sub(self, req: Sub) -> None:
        """Subscribe to topics all held: `ack`, then one `snap` per topic, one frame."""
        server = self.server
        parts = [codec.ack(req.id)]
        for topic in req.topics:
            snap, n = server.subscribe(self.session, topic, req.since.get(topic), req.max_hz)
            parts.append(snap)
            server.fanout.stats.updates_delivered += n
        self.send_control(b"".join(parts))

    def sub_loaded(self, req: Sub, failed: LoadFailure | None, attempt: int) -> None:
        """The loads a held `sub` waited for are done: answer it (or `err
        unavailable` naming the topic that failed, and why), then the requests held."""
        if self.closing:
            self.held = None
            return
        server = self.server
        if failed is None:
            # a topic loaded first may have gone while another loaded (its grace)
            missing = server.missing_topics(req.topics)
            if missing and attempt < _SUB_LOAD_ATTEMPTS:
                server.load_topics(missing, lambda f: self.sub_loaded(req, f, attempt + 1))
                return
            if missing:
                failed = (missing[0], "dropped again while the other topics loaded")
        if failed is None:
            self.answer_sub(req)
        else:
            topic, why = failed
            self.refuse(
                RemoteProtocolError(
                    ErrorCode.UNAVAILABLE,
                    f"topic {topic!r} could not be loaded from the bus ({why});"
                    " nothing was subscribed",
                    topic=topic,
                    request_id=req.id,
                )
            )
        self.release_held()

    def release_held(self) -> None:
        """Process the requests held while a `sub` waited, in order, until one
        waits again; then read again."""
        held = self.held
        self.held = None
        while held and not self.closing:
            self.receive_message(held.popleft())
            if self.held is not None:
                self.held.extend(held)  # another `sub` waits: the rest after it
                return
        transport = self.transport
        if (
            not self.closing
            and not self.reads_paused
            and transport is not None
            and not transport.is_close_frame_sent
        ):
            self.underlying.resume_reading()  # type: ignore[attr-defined]

    def handle_unsub(self, req: Unsub) -> None:
        for topic in req.topics:
            self.server.fanout.unsubscribe(self.session, topic)
        self.send_control(codec.ack(req.id))

    def handle_pub(self, req: Pub) -> None:
        server = self.server
        if not self.perms.can_pub(req.topic):  # type: ignore[union-attr]
            self.refuse(
                RemoteProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"not allowed to publish to {req.topic!r} (the token's pub_topics)"
                    if server.verifier is not None
                    else "publishing over WebSocket is disabled"
                    " (auth.allow_anonymous_publish = false)",
                    topic=req.topic,
                    request_id=req.id,
                )
            )
            return
        key = req.key
        if key is None:
            if server.rules.history_of(req.topic) is None:
                self.refuse(
                    RemoteProtocolError(
                        ErrorCode.BAD_REQUEST,
                        "'pub' to a state topic needs a string 'key'",
                        topic=req.topic,
                        request_id=req.id,
                    )
                )
                return
            key = ""  # a stream topic's events need no key
        rid = req.id
        topic = req.topic

        def done(result: Sequence[int] | BusError) -> None:
            if isinstance(result, BusError):
                code = (
                    ErrorCode.UNAVAILABLE
                    if isinstance(result, BusUnavailable)
                    else result.code
                    if isinstance(result, BusRefused)  # too_large, too_many_keys, ...
                    else ErrorCode.INTERNAL
                )
                self.server.count_error(code)
                self.send_control(codec.err(code, str(result) or "bus unavailable", rid, topic))
            else:
                self.server.published += 1
                self.server.publish_hist.observe(time.monotonic() - t0)
                self.send_control(codec.ack(rid, pos=codec.format_pos(result[0])))

        t0 = time.monotonic()
        server.bus.publish([Update(topic, key, req.data)], done)
