"""The rules of one client connection, apart from its I/O. PURE: no loop, no
socket, no clock (the time is an argument: `now`, monotonic seconds; `wall`,
seconds since the epoch).

workers/listener.py is the shell: it feeds a `ConnectionRules` what arrives
(a frame's type, fin bit and size, then, if asked, its payload; the result
of a token check, of a topic load, of a publish) and does what it returns
(replies to send, a `Close`, or a request to carry out on the worker). The
same split as python-hyper/h11's `Connection` and python-websockets'
`protocol.py`; here every rule is testable without a socket
(tests/unit/test_connection_rules.py).

Rules this module owns (the policies it applies live in engine/auth):

1. Every inbound frame but a close passes `frame()` once, and with it the
   connection's `RateLimiter` (engine/auth/ratelimit.py rules 1-6), before its
   payload is copied: data frames, each continuation of a fragmented message,
   pings and pongs. A refused frame drops its whole message (its later
   fragments are skipped, so message boundaries stay known); the refusal is
   answered `err rate_limited` at most once a second (`REFUSE`), or reading
   pauses until the limiter's next interval (`PAUSE`), or the connection
   closes 4029. While reading is paused, whatever the current read still
   holds is dropped unread.
2. A fragmented message holds at most `max_message_bytes` in at most
   `max_message_fragments` frames (else 1009), and must end within
   `fragment_timeout_s` of its first frame (else 1008, checked on each of its
   frames and by `overdue`). Empty fragments are counted, never stored. What
   one connection holds is thus bounded by configuration, whatever it sends.
3. Framing errors fail the connection with 1002 (RFC 6455 5.2, 5.4):
   reserved bits without an extension, a continuation with no message to
   continue, a new data frame inside a fragmented message. Text frames close
   1003. A close frame is answered by engine.protocol.closecodes.
   With permessage-deflate negotiated (`deflate`), RSV1 on the first frame
   of a binary message marks it compressed (RFC 7692 6); RSV1 anywhere else
   (a continuation, a control frame), and RSV2/RSV3 always, still fail it
   with 1002. A compressed message, whole or reassembled (its fragments
   counted and bounded as compressed bytes, rule 2), is inflated to at most
   `max_message_bytes` (else 1009: a zip bomb is cut there) before it is
   read; one that does not inflate closes 1007 (engine/protocol/deflate.py
   rule 5).
4. Until a token is accepted only `auth` is served; anything else, or no
   `auth` by `deadline`, closes 4001. An authenticated connection closes 4003
   at its token's expiry, or when a refreshed token no longer covers a
   current subscription.
5. `sub` is all or nothing: `err forbidden` naming the first refused topic,
   `err too_many_topics` past `max_topics_per_conn`. A `sub` whose topics the
   worker must load first (engine/fanout/core.py rule 9) makes the connection
   wait: the requests that arrive meanwhile are held, and answered in order
   once it is answered; a load that fails answers `err unavailable` naming the
   topic and why.
6. `pub` needs the token's `pub_topics` (or anonymous publishing); a state
   topic's `pub` needs a string `key` (a stream topic's events need none).
   A `pub` batch (`items`, engine/protocol/codec.py rule 6) is all or
   nothing: every item must pass these rules, else `err forbidden` naming the
   first refused topic, or `err bad_request` naming the first item without a
   key; it is acked once, with one position per item, in order. It costs one
   rate-limit token, like any message, when a token granted the publisher its
   `pub_topics`; an anonymous publisher's batch costs one token per
   `ANONYMOUS_ITEMS_PER_TOKEN` items or part of them (the first one taken by
   `frame()`), refused `err rate_limited` whole when the bucket runs dry.
7. An undecodable request is answered `err` with the request's id when it had
   one; `MAX_CONSECUTIVE_BAD_FRAMES` bad requests in a row close 1008.
8. Every `err` sent is counted in the worker's `WorkerCounters.errors` (by
   code), every accepted `pub` in `published` (a batch: its items) and
   `publish_hist` (a batch: once).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from engine import codes
from engine.auth.permissions import Permissions
from engine.auth.ratelimit import ABUSIVE, ADMITTED, RATE_LIMITED, RateLimiter, RatePolicy
from engine.auth.ratelimit import PAUSE as RATE_PAUSE
from engine.bus.base import CheckedUpdates, Update
from engine.codes import ErrorCode
from engine.counters import WorkerCounters
from engine.errors import BusError, BusRefused, BusUnavailable, RemoteProtocolError
from engine.protocol import codec
from engine.protocol.closecodes import CLOSE_PROTOCOL_ERROR, close_reply
from engine.protocol.codec import Auth, Ping, Pub, PubBatch, Sub, Unsub
from engine.protocol.deflate import InflateError, TooBig, inflate

# WebSocket opcodes (RFC 6455 5.2); picows' WSMsgType is an IntEnum of them
OP_CONTINUATION: Final = 0
OP_TEXT: Final = 1
OP_BINARY: Final = 2
OP_CLOSE: Final = 8
OP_PING: Final = 9
OP_PONG: Final = 10

# What the shell does with a frame (`frame()`), besides a `Close`:
MESSAGE: Final = 0  # a whole message: pass its payload to `receive`
STORE: Final = 1  # a fragment to keep: pass its payload to `store`
IGNORE: Final = 2  # nothing (counted, skipped, or dropped unread)
PING: Final = 3  # answer a pong with the ping's payload
PONG: Final = 4  # the peer answered our ping
CLOSE_FRAME: Final = 5  # the peer's close: answer it (`close_received`) and end
REFUSE: Final = 6  # rate limited: send `refusal(None)`
REFUSE_MESSAGE: Final = 7  # rate limited, a whole message: send `refusal(its payload)`
PAUSE: Final = 8  # stop reading until `resume_at`, then call `resume`
INFLATE: Final = 9  # a whole compressed message: pass its payload to `assembled`

# The reserved bits of a frame header, as `frame()` takes them (RFC 6455 5.2)
RSV1: Final = 4
RSV2: Final = 2
RSV3: Final = 1

# An anonymous publisher's batch costs one rate-limit token per this many
# items (rule 6); an authenticated one's costs one token per message.
ANONYMOUS_ITEMS_PER_TOKEN: Final = 100

# loads of a `sub`'s topics, when one loaded first went (its grace) while another loaded
SUB_LOAD_ATTEMPTS: Final = 3

# A topic that could not be loaded for a `sub`, and why.
LoadFailure = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with `code` (after sending `reply`, if any)."""

    code: int
    reason: str
    reply: bytes | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish `update` on the bus, then give the result to `published`."""

    request_id: int | None
    update: Update


@dataclass(frozen=True, slots=True)
class PublishBatch:
    """Publish `updates` on the bus, all or nothing, then give the result to
    `published_batch` (rule 6)."""

    request_id: int | None
    updates: tuple[Update, ...]


# What `receive` asks of the shell: nothing (None: held, or nothing to say),
# send `bytes`, `Close`, or carry out an admitted request (`Sub`: subscribe,
# or load its topics first; `Unsub`; `Ping`; `Auth`: check the token;
# `Publish`, `PublishBatch`).
Action = bytes | Close | Sub | Unsub | Ping | Auth | Publish | PublishBatch | None

AUTH_FIRST: Final = Close(codes.CLOSE_NOT_AUTHENTICATED, "send 'auth' first")
UNFINISHED: Final = Close(
    codes.CLOSE_POLICY_VIOLATION, "a fragmented message was not finished in time"
)
_TEXT_REFUSED: Final = Close(
    codes.CLOSE_UNSUPPORTED_DATA, "text frames are not accepted; send binary msgpack"
)
_RSV: Final = Close(CLOSE_PROTOCOL_ERROR, "reserved bits set, and no extension was negotiated")
_NO_MESSAGE: Final = Close(CLOSE_PROTOCOL_ERROR, "a continuation frame, and no message to continue")
_INTERLEAVED: Final = Close(
    CLOSE_PROTOCOL_ERROR, "a new message began before the fragmented one ended"
)
_TOO_BIG: Final = Close(codes.CLOSE_MESSAGE_TOO_BIG, "message too big")
_INFLATES_TOO_BIG: Final = Close(
    codes.CLOSE_MESSAGE_TOO_BIG, "compressed message inflates past limits.max_message_bytes"
)
_ABUSED: Final = Close(codes.CLOSE_RATE_LIMITED, "rate limit abused")
_BAD_FRAMES: Final = "too many undecodable messages"

# `ConnectionRules.fragments` while the rest of a refused message is skipped:
# shared, never appended to (compared by identity).
_SKIPPING: list[bytes] = []


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """The settings every connection of a worker shares (one object per worker)."""

    max_message_bytes: int  # limits.max_message_bytes
    max_message_fragments: int  # limits.max_message_fragments
    fragment_timeout_s: float  # limits.fragment_timeout_s
    max_topics_per_conn: int  # limits.max_topics_per_conn
    rate: RatePolicy  # limits.messages_per_s, limits.abuse_window_s
    # the history length of a stream topic, None for a state topic (engine.topics)
    history_of: Callable[[str], int | None]
    # auth.mode = "jwt": tokens are checked (else `auth` is acked politely)
    tokens: bool
    max_publish_items: int = codec.DEFAULT_MAX_PUBLISH_ITEMS  # limits.max_publish_items


class ConnectionRules:
    """One connection's protocol state and rules (see the module's rules).

    Not thread-safe, like the loop that drives it. `subs` is the connection's
    subscriptions (its `Session.subs`, read only here)."""

    __slots__ = (
        "authed",
        "bad_frames",
        "compressed",
        "counters",
        "deadline",
        "deflate",
        "fragments",
        "fragments_deadline",
        "fragments_left",
        "fragments_size",
        "held",
        "last_frame_at",
        "limiter",
        "perms",
        "policy",
        "reads_paused",
        "subs",
        "user",
        "waiting",
    )

    def __init__(
        self,
        policy: ConnectionPolicy,
        counters: WorkerCounters,
        subs: Mapping[str, object],
        now: float,
    ) -> None:
        self.policy = policy
        self.counters = counters
        self.subs = subs
        self.limiter = RateLimiter(policy.rate, now)
        self.last_frame_at = now  # when `frame()` last ran: the time of `receive`
        # the message being reassembled (None: none; _SKIPPING: a refused one)
        self.fragments: list[bytes] | None = None
        self.fragments_size = 0
        self.fragments_left = 0  # continuation frames it may still have
        self.fragments_deadline = math.inf  # monotonic time by which it must end
        self.bad_frames = 0
        self.reads_paused = False
        self.deflate = False  # permessage-deflate negotiated (rule 3)
        self.compressed = False  # the message being reassembled is (rule 3)
        self.authed = False
        self.perms: Permissions | None = None
        self.user: str | None = None
        # monotonic time by which the connection must (re)authenticate: inf = never
        self.deadline = math.inf
        # requests read while a `sub` waits for its topics' load (rule 5), in
        # order; None: none held. `waiting`: a `sub` waits.
        self.held: deque[bytes] | None = None
        self.waiting = False

    # -- authentication (rule 4) -------------------------------------------------------

    def grant(
        self,
        perms: Permissions,
        user: str | None,
        expires_at: float | None,
        now: float,
        wall: float,
    ) -> None:
        """Authenticated: `perms` apply; the connection ends (4003) at `expires_at`
        (seconds since the epoch) unless a fresh token arrives before."""
        self.authed = True
        self.perms = perms
        self.user = user
        self.deadline = math.inf if expires_at is None else now + (expires_at - wall)

    def require_auth(self, deadline: float) -> None:
        """No token yet: only `auth` is served, and it must come by `deadline`."""
        self.deadline = deadline

    def authenticate(
        self,
        req: Auth,
        perms: Permissions,
        user: str | None,
        expires_at: float | None,
        now: float,
        wall: float,
    ) -> bytes | Close:
        """`req`'s token was accepted: its ack, or a Close if a refreshed token
        no longer covers the subscriptions."""
        if self.authed and perms.first_refused_sub(self.subs) is not None:
            return Close(
                codes.CLOSE_TOKEN_EXPIRED, "the new token does not cover the subscriptions"
            )
        self.grant(perms, user, expires_at, now, wall)
        return codec.ack(req.id, user=user)

    def overdue(self, now: float) -> Close | None:
        """A deadline passed (checked once a second): no `auth` in time, the
        token expired, or a fragmented message left unfinished."""
        if now >= self.deadline:
            if self.authed:
                return Close(codes.CLOSE_TOKEN_EXPIRED, "token expired")
            return Close(codes.CLOSE_NOT_AUTHENTICATED, "no auth message in time")
        if now >= self.fragments_deadline:
            return UNFINISHED
        return None

    # -- frames (rules 1-3) ------------------------------------------------------------

    def frame(self, opcode: int, fin: bool, size: int, rsv: int, now: float) -> int | Close:
        """Account one inbound frame (before its payload is read): what to do with
        it. `rsv`: its reserved bits (`RSV1` | `RSV2` | `RSV3`; any true value
        but `RSV1` is a framing error)."""
        self.last_frame_at = now
        if rsv:
            if rsv != RSV1 or not self.deflate or opcode != OP_BINARY:
                return _RSV
            return self.compressed_frame(fin, size, now)
        if opcode == OP_CLOSE:
            return CLOSE_FRAME
        if self.reads_paused:
            self.skip(opcode, fin)  # paused: the rest of the current read is dropped unread
            return IGNORE
        verdict = self.limiter.admit(now)
        if verdict != ADMITTED:
            return self.throttle(verdict, opcode, fin)
        if opcode == OP_BINARY:
            if fin and self.fragments is None:
                return MESSAGE
            return self.begin_message(fin, size, now)
        if opcode == OP_CONTINUATION:
            return self.continuation(fin, size, now)
        if opcode == OP_PING:
            # answered by the shell, not by picows: pings count against the
            # rate limit like messages (each pong is a write)
            return PING
        if opcode == OP_PONG:
            return PONG
        return _TEXT_REFUSED  # picows fails the reserved opcodes itself

    def begin_message(self, fin: bool, size: int, now: float) -> int | Close:
        """A binary frame while no message is being reassembled: a whole message
        (fin) after a skipped one, or the first fragment of a new one."""
        if self.fragments is not None and self.fragments is not _SKIPPING:
            return _INTERLEAVED
        if fin:
            self.fragments = None
            return MESSAGE
        self.fragments = []
        self.compressed = False
        self.fragments_size = size
        self.fragments_left = self.policy.max_message_fragments - 1
        self.fragments_deadline = now + self.policy.fragment_timeout_s
        return STORE

    def compressed_frame(self, fin: bool, size: int, now: float) -> int | Close:
        """The first frame of a compressed binary message (rule 3): accounted
        like any, then inflated whole (`INFLATE`) or once reassembled."""
        if self.reads_paused:
            self.skip(OP_BINARY, fin)
            return IGNORE
        verdict = self.limiter.admit(now)
        if verdict != ADMITTED:
            return self.throttle(verdict, OP_BINARY, fin)
        if fin and self.fragments is None:
            return INFLATE
        out = self.begin_message(fin, size, now)
        if out == STORE:
            self.compressed = True
        elif out == MESSAGE:
            return INFLATE  # a whole message after the rest of a refused one was skipped
        return out

    def continuation(self, fin: bool, size: int, now: float) -> int | Close:
        fragments = self.fragments
        if fragments is None:
            return _NO_MESSAGE
        if fragments is _SKIPPING:
            if fin:
                self.fragments = None
            return IGNORE
        self.fragments_left -= 1
        if self.fragments_left < 0:
            return Close(
                codes.CLOSE_MESSAGE_TOO_BIG,
                f"a message in more than {self.policy.max_message_fragments} fragments",
            )
        if now > self.fragments_deadline:
            return UNFINISHED
        if size:
            self.fragments_size += size
            if self.fragments_size > self.policy.max_message_bytes:
                return _TOO_BIG
        elif not fin:
            return IGNORE  # an empty fragment is counted, never stored
        return STORE

    def store(self, payload: bytes, fin: bool) -> bytes | None:
        """Keep a fragment `frame()` said to STORE: the whole message once `fin`."""
        fragments = self.fragments
        assert fragments is not None and fragments is not _SKIPPING
        if payload:
            fragments.append(payload)
        if not fin:
            return None
        self.drop_message(None)
        if len(fragments) == 1:
            return fragments[0]
        return b"".join(fragments)

    def assembled(self, message: bytes) -> Action:
        """A message `store` returned whole: inflated first if it was
        compressed (rule 3), then `receive`d."""
        if self.compressed:
            self.compressed = False
            return self.inflated(message)
        return self.receive(message)

    def inflated(self, payload: bytes) -> Action:
        """A compressed message (`INFLATE`, or reassembled): inflated within
        `max_message_bytes`, then `receive`d (rule 3)."""
        try:
            message = inflate(payload, self.policy.max_message_bytes)
        except TooBig:
            return _INFLATES_TOO_BIG
        except InflateError as exc:
            return Close(codes.CLOSE_INVALID_PAYLOAD, str(exc)[:100])
        return self.receive(message)

    def drop_message(self, then: list[bytes] | None) -> None:
        """Forget the message being reassembled; `then` is None, or _SKIPPING
        to skip the rest of it."""
        self.fragments = then
        self.fragments_size = 0
        self.fragments_deadline = math.inf

    def skip(self, opcode: int, fin: bool) -> None:
        """A data frame dropped unread (or refused): its message is dropped whole,
        and its later fragments skipped, so message boundaries stay known."""
        if opcode <= OP_BINARY and (self.fragments is not None or not fin):
            self.drop_message(None if fin else _SKIPPING)

    def throttle(self, verdict: int, opcode: int, fin: bool) -> int | Close:
        """A frame the rate limiter did not admit (rule 1)."""
        whole = opcode == OP_BINARY and fin and self.fragments is None
        self.skip(opcode, fin)
        if verdict == ABUSIVE:
            return _ABUSED
        self.counters.errors[ErrorCode.RATE_LIMITED] += 1  # every refused frame
        if verdict == RATE_PAUSE:
            if self.reads_paused:
                return IGNORE
            self.reads_paused = True
            return PAUSE
        if verdict == RATE_LIMITED:
            return REFUSE_MESSAGE if whole else REFUSE
        return IGNORE  # REFUSED_QUIET: answered already this interval

    def refusal(self, payload: bytes | None) -> bytes:
        """The `err rate_limited` for a refused frame (counted by `frame`);
        `payload`: the whole message it was, whose request id the reply names
        (a bounded decode, at most once a second)."""
        rid = None
        if payload is not None:
            try:
                rid = codec.decode_request(payload, self.policy.max_topics_per_conn).id
            except RemoteProtocolError as exc:
                rid = exc.request_id
        return codec.err(
            ErrorCode.RATE_LIMITED,
            f"over limits.messages_per_s ({self.policy.rate.rate:g}/s, every frame"
            " counts); message not processed",
            rid,
        )

    @property
    def resume_at(self) -> float:
        """When reading may resume after a PAUSE (monotonic seconds)."""
        return self.limiter.resume_at

    def resume(self) -> bool:
        """The PAUSE is over: True if the shell may read again (no `sub` waits)."""
        self.reads_paused = False
        return self.held is None

    def close_received(self, size: int, code: int) -> int | None:
        """The peer's close frame: the code to answer with (None: an empty close)."""
        self.drop_message(None)
        return close_reply(size, code)

    # -- requests (rules 4-7) ----------------------------------------------------------

    def receive(self, payload: bytes) -> Action:
        """One whole message: what to do about it."""
        if self.waiting:
            # a `sub` waits for a load: requests keep their order (the shell has
            # paused reading, so only the rest of the current read lands here)
            self.held.append(payload)  # type: ignore[union-attr]
            return None
        try:
            request = codec.decode_request(
                payload, self.policy.max_topics_per_conn, self.policy.max_publish_items
            )
        except RemoteProtocolError as exc:
            if not self.authed:
                return AUTH_FIRST
            reply = self.refuse(exc)
            if exc.code == ErrorCode.BAD_REQUEST:
                self.bad_frames += 1
                if self.bad_frames >= codes.MAX_CONSECUTIVE_BAD_FRAMES:
                    return Close(codes.CLOSE_POLICY_VIOLATION, _BAD_FRAMES, reply)
            return reply
        self.bad_frames = 0
        kind = type(request)
        if not self.authed and kind is not Auth:
            return AUTH_FIRST
        if type(request) is Sub:
            return self.check_sub(request)
        if type(request) is Pub:
            return self.check_pub(request)
        if type(request) is PubBatch:
            return self.check_pub_batch(request)
        if kind is Auth and not self.policy.tokens:
            # auth.mode = "none": there is nothing to authenticate; accept politely
            return codec.ack(request.id, user=None)
        return request  # type: ignore[return-value]  # Unsub, Ping or Auth: the shell's

    def refuse(self, exc: RemoteProtocolError) -> bytes:
        """The `err` for a refused request (counted)."""
        self.counters.errors[exc.code] += 1
        return codec.err(exc.code, exc.message, exc.request_id, exc.topic)

    def check_sub(self, req: Sub) -> bytes | Sub:
        """`req` if it may subscribe, else its `err` (rule 5)."""
        refused = self.perms.first_refused_sub(req.topics)  # type: ignore[union-attr]
        if refused is not None:
            return self.refuse(
                RemoteProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"not allowed to subscribe to {refused!r}",
                    topic=refused,
                    request_id=req.id,
                )
            )
        subs = self.subs
        new = sum(1 for t in req.topics if t not in subs)
        limit = self.policy.max_topics_per_conn
        if len(subs) + new > limit:
            return self.refuse(
                RemoteProtocolError(
                    ErrorCode.TOO_MANY_TOPICS,
                    f"subscribing would hold {len(subs) + new} topics; the limit is {limit}",
                    topic=req.topics[0],
                    request_id=req.id,
                )
            )
        return req

    def check_pub(self, req: Pub) -> bytes | Publish:
        """What to publish for `req`, else its `err` (rule 6)."""
        if not self.perms.can_pub(req.topic):  # type: ignore[union-attr]
            return self.refuse(
                RemoteProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"not allowed to publish to {req.topic!r} (the token's pub_topics)"
                    if self.policy.tokens
                    else "publishing over WebSocket is disabled"
                    " (auth.allow_anonymous_publish = false)",
                    topic=req.topic,
                    request_id=req.id,
                )
            )
        key = req.key
        if key is None:
            if self.policy.history_of(req.topic) is None:
                return self.refuse(
                    RemoteProtocolError(
                        ErrorCode.BAD_REQUEST,
                        "'pub' to a state topic needs a string 'key'",
                        topic=req.topic,
                        request_id=req.id,
                    )
                )
            key = ""  # a stream topic's events need no key
        return Publish(req.id, Update(req.topic, key, req.data))

    def check_pub_batch(self, req: PubBatch) -> bytes | PublishBatch:
        """What to publish for a `pub` batch, else its `err` (rule 6): all or nothing."""
        topics = dict.fromkeys(item.topic for item in req.items)
        can_pub = self.perms.can_pub  # type: ignore[union-attr]
        for topic in topics:
            if not can_pub(topic):
                return self.refuse(
                    RemoteProtocolError(
                        ErrorCode.FORBIDDEN,
                        f"not allowed to publish to {topic!r} (the token's pub_topics);"
                        " nothing of the batch was published"
                        if self.policy.tokens
                        else "publishing over WebSocket is disabled"
                        " (auth.allow_anonymous_publish = false)",
                        topic=topic,
                        request_id=req.id,
                    )
                )
        streams = {t for t in topics if self.policy.history_of(t) is not None}
        updates: list[Update] = []
        for i, item in enumerate(req.items):
            key = item.key
            if key is None:
                if item.topic not in streams:
                    return self.refuse(
                        RemoteProtocolError(
                            ErrorCode.BAD_REQUEST,
                            f"'items[{i}]': a 'pub' to a state topic needs a string 'key';"
                            " nothing of the batch was published",
                            topic=item.topic,
                            request_id=req.id,
                        )
                    )
                key = ""
            updates.append(Update(item.topic, key, item.data))
        if not self.policy.tokens and not self.charge(len(updates)):
            return self.refuse(
                RemoteProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"a batch of {len(updates)} items costs one token per"
                    f" {ANONYMOUS_ITEMS_PER_TOKEN} items from an anonymous publisher, over"
                    f" limits.messages_per_s ({self.policy.rate.rate:g}/s); nothing was published",
                    request_id=req.id,
                )
            )
        return PublishBatch(req.id, CheckedUpdates(updates))  # checked by the codec (rule 6)

    def charge(self, items: int) -> bool:
        """Take the tokens an anonymous batch costs beyond the one its frame
        took (rule 6): False when the bucket ran dry."""
        admit = self.limiter.admit
        now = self.last_frame_at
        for _ in range(-(-items // ANONYMOUS_ITEMS_PER_TOKEN) - 1):
            if admit(now) != ADMITTED:
                return False
        return True

    def published(self, req: Publish, result: Sequence[int] | BusError, elapsed_s: float) -> bytes:
        """The bus answered `req`: its ack (with the position), or its `err`."""
        if isinstance(result, BusError):
            return self.publish_failed(result, req.request_id, req.update.topic)
        self.counters.published += 1
        self.counters.publish_hist.observe(elapsed_s)
        return codec.ack(req.request_id, pos=codec.format_pos(result[0]))

    def publish_failed(self, result: BusError, request_id: int | None, topic: str) -> bytes:
        """The `err` for a publish the bus refused or could not take (counted)."""
        code = (
            ErrorCode.UNAVAILABLE
            if isinstance(result, BusUnavailable)
            else result.code
            if isinstance(result, BusRefused)  # too_large, too_many_keys, ...
            else ErrorCode.INTERNAL
        )
        self.counters.errors[code] += 1
        return codec.err(code, str(result) or "bus unavailable", request_id, topic)

    def published_batch(
        self, req: PublishBatch, result: Sequence[int] | BusError, elapsed_s: float
    ) -> bytes:
        """The bus answered a batch: one ack with a position per item, in
        order, or one `err` (nothing of it was published)."""
        if isinstance(result, BusError):
            named = result.topic if isinstance(result, BusRefused) else None
            return self.publish_failed(result, req.request_id, named or req.updates[0].topic)
        self.counters.published += len(req.updates)
        self.counters.publish_hist.observe(elapsed_s)
        return codec.ack(req.request_id, pos=codec.format_positions(result))

    # -- a `sub` waiting for its topics (rule 5) ----------------------------------------

    def wait(self) -> None:
        """A `sub` waits for its topics' load: hold what arrives until `loaded`."""
        self.waiting = True
        if self.held is None:
            self.held = deque()

    def loaded(
        self,
        req: Sub,
        failed: LoadFailure | None,
        missing: Sequence[str],
        attempt: int,
    ) -> Sub | bytes | None:
        """The loads a waiting `sub` asked for are done; `missing`: its topics the
        worker still does not hold. None: load `missing` again (a topic loaded
        first went, its grace over, while another loaded); `req`: answer it (the
        shell subscribes); bytes: its `err unavailable`. Held requests follow
        (`next_held`)."""
        if failed is None and missing:
            if attempt < SUB_LOAD_ATTEMPTS:
                return None
            failed = (missing[0], "dropped again while the other topics loaded")
        self.waiting = False
        if failed is None:
            return req
        topic, why = failed
        return self.refuse(
            RemoteProtocolError(
                ErrorCode.UNAVAILABLE,
                f"topic {topic!r} could not be loaded from the bus ({why}); nothing was subscribed",
                topic=topic,
                request_id=req.id,
            )
        )

    def next_held(self) -> bytes | None:
        """The next request held while a `sub` waited, in order; None once none is
        left, or another `sub` waits (the rest stay held after it)."""
        held = self.held
        if self.waiting or held is None:
            return None
        if held:
            return held.popleft()
        self.held = None
        return None

    def forget_held(self) -> None:
        """The connection is closing: what was held is never answered."""
        self.held = None
        self.waiting = False
