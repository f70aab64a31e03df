"""The one WebSocket client of the load tools: a picows listener speaking fanout.v1.

Every load tool that subscribes (`fanout bench`'s subscriber processes, the
locust users; issue 13's probes next) opens its connections with `connect`
and a listener from `listener_class()`, and chooses what a received message
means by the *sink* it gives the listener:

1. The listener owns the wire: it sends the `sub` on connect, reassembles
   fragmented messages (a picows frame is valid only inside `on_ws_frame`:
   payloads are copied there) and answers a close. A sink sees whole
   messages' payloads, never a frame.
2. The listener owns the connection's view of its topics: `views` {topic:
   {key: data}}, `epochs`, `positions`, `snapped`, `ready` (every topic has
   had its snap) and `since()`, what a reconnect asks for.
3. `CountingSink` (the probes' sink, and every client's with `fanout bench
   --decode-all`): each distinct message is decoded once per process (a cache keyed
   by its bytes, at most 4,096 entries), applied to the client's views, its key
   values counted and their `[seq, time_ns]` stamps put in a latency histogram
   (one sample per key value; rule 9 for the common frame).
   Its cost per frame is what `python -m loadtest.microbench generator`
   measures.
4. `DecodingSink` (decoding mode: locust, probes): every message decoded
   and handed whole to `message(client, msg, now_ns, size)`; a subclass says
   what to do with it. Slower, and it sees everything.
5. A connection the tool closes on purpose sets `dropping` first: its close is
   not counted as the server's.
6. A *counting client* (`client.count()`, called once it is `ready`)
   decodes nothing: each whole binary frame adds one to `client.frames` and
   its size to `client.bytes`, read from the frame without copying the
   payload; a close frame is still answered and counted by the sink. With
   `read_lowat_bytes` its socket wakes the loop only once that many bytes
   wait (SO_RCVLOWAT; a peer's FIN still wakes it): one read for several
   frames, what the server sends is unchanged (the kernel queues and acks
   them as before), and its counts lag by at most that many bytes.
   `resubscribe(sink)` ends counting: the client sends its `sub` again (no
   `since`: the server re-sends every topic's snap) and hands what follows to
   `sink` (`SnapshotSink`: the snaps are compared with the final values).
7. A probe's order check (`CountingSink`): a topic's position never goes
   backwards on a connection; an `upd`/`evt` whose position is before the
   one the client holds (its snap's or its last update's, as (ms, seq) in
   `client.order_keys`) counts as `errors["order"]`.
8. A client with a source address (`source_socket`) binds it before it connects,
   with IP_BIND_ADDRESS_NO_PORT: connect() picks the port, so one address holds
   as many connections as the ephemeral range has ports per destination (~28,000),
   and more connections than that need more addresses (127.0.0.2, ...).
9. A probe's frame of `upd`s only (what the engine sends between snaps) takes the
   fast path of `CountingSink.feed`: split in C at each `upd`'s head (`_UPD_HEAD`),
   each body looked up in a cache of decoded bodies (at most 4,096), a body not in
   it decoded with msgpack's C unpacker (head + body must be exactly one whole
   `upd`), then per message: one view update, the order check, the count; the
   frame's stamps go to the histogram at once (one sample per key value, as on
   the general path). What does not split so (a
   snap, a control message, an `evt`, a body that is not one whole `upd`, the head's
   bytes inside a value) takes the general path, message by message; nothing is
   applied twice, the checks are the same on both paths.

picows is imported when the first listener class is built (`listener_class`),
so that importing this module costs no picows in processes that never connect.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgpack

from engine.protocol.deflate import CLIENT_OFFER, inflate
from loadtest.latency import LatencyRecorder
from loadtest.workload import STREAM_KEY

SUBPROTOCOL = "fanout.v1"
MAX_FRAME_BYTES = 64 * 1024 * 1024
# clients offer permessage-deflate when this is "1" in the environment (`connect`)
COMPRESSION_ENV = "FANOUT_BENCH_COMPRESSION"
HANDSHAKE_TIMEOUT_S = 15.0
# linux/in.h: bind() leaves the source port to connect(), which picks any port free for
# the whole 4-tuple; bind() alone takes a port free for every destination, and scans
# the range (even ports first) longer and longer as it fills up
IP_BIND_ADDRESS_NO_PORT = 24
# The head of every `upd` the engine encodes (engine/protocol/codec.py `_UPD_HEAD`: a map
# of 4, "op": "upd", then "topic"): the probes split frames at it (rule 9)
_UPD_HEAD = b"\x84\xa2op\xa3upd\xa5topic"


class Sink(Protocol):
    """What a listener hands its whole messages and its end to (rules 3-5)."""

    def feed(self, client: Any, payload: bytes) -> None:
        """One whole message's payload (a frame, or a reassembled fragmented message)."""

    def disconnected(self, client: Any) -> None:
        """The connection ended (`client.close_code`: the server's code, or None)."""

    def unexpected(self, client: Any, what: str) -> None:
        """A frame the protocol does not send (e.g. "frame:TEXT")."""


def sub_message(
    topics: Sequence[str], max_hz: float | None = None, since: Mapping[str, Any] | None = None
) -> bytes:
    """The encoded `sub` of `topics` (id 1), with `max_hz` and `since` when given."""
    sub: dict[str, Any] = {"op": "sub", "topics": list(topics), "id": 1}
    if max_hz:
        sub["max_hz"] = max_hz
    if since:
        sub["since"] = dict(since)
    out: bytes = msgpack.packb(sub)
    return out


_LISTENER: type | None = None


def listener_class() -> type:
    """The picows listener class (built once per process, on first use)."""
    global _LISTENER
    if _LISTENER is None:
        _LISTENER = _build_listener_class()
    return _LISTENER


def _build_listener_class() -> type:
    from picows import WSListener, WSMsgType

    binary = WSMsgType.BINARY
    close = WSMsgType.CLOSE
    continuation = WSMsgType.CONTINUATION

    class Client(WSListener):  # type: ignore[misc]
        """One subscriber connection: its topics' views and positions (rule 2)."""

        __slots__ = (
            "bytes",
            "close_code",
            "closed",
            "counting",
            "dropping",
            "epochs",
            "feed",
            "fragments",
            "frames",
            "index",
            "lowat",
            "max_hz",
            "order_keys",
            "positions",
            "ready",
            "sink",
            "slow",
            "snapped",
            "sub_message",
            "tag",
            "transport",
            "views",
        )

        def __init__(
            self,
            sink: Sink,
            topics: Sequence[str],
            *,
            index: int = 0,
            slow: bool = False,
            max_hz: float | None = None,
            since: Mapping[str, Any] | None = None,
            views: dict[str, dict[str, Any]] | None = None,
            tag: Any = None,
        ) -> None:
            self.sink = sink
            self.feed = sink.feed  # bound once: on_ws_frame calls it per frame
            self.index = index
            self.tag = tag  # the tool's own per-connection data
            self.views = views if views is not None else {t: {} for t in topics}
            self.epochs: dict[str, Any] = {}
            self.positions: dict[str, Any] = {}
            self.order_keys: dict[str, tuple[int, int]] = {}  # rule 7: positions as (ms, seq)
            self.snapped: set[str] = set()
            self.transport: Any = None
            self.ready = False
            self.closed = False
            self.dropping = False
            self.slow = slow
            self.close_code: int | None = None
            self.fragments: bytearray | None = None
            self.max_hz = max_hz
            self.sub_message = sub_message(topics, max_hz, since)
            self.counting = False  # rule 6
            self.frames = 0  # counted while `counting` (a sink counts the others)
            self.bytes = 0
            self.lowat = 0

        def since(self) -> dict[str, list[Any]]:
            """{topic: [epoch, pos]} of every topic it had a snap of: a reconnect's `since`."""
            return {
                t: [self.epochs[t], self.positions[t]]
                for t in self.views
                if t in self.epochs and self.positions.get(t) is not None
            }

        def drop(self) -> None:
            """Close on purpose, at once (rule 5)."""
            self.dropping = True
            if self.transport is not None and not self.closed:
                self.transport.disconnect(graceful=False)

        def count(self, read_lowat_bytes: int = 0) -> None:
            """From now on count frames and bytes, decode nothing (rule 6)."""
            self.counting = True
            if read_lowat_bytes and set_read_lowat(self.transport, read_lowat_bytes):
                self.lowat = read_lowat_bytes

        def resubscribe(self, sink: Sink) -> None:
            """Stop counting, send the `sub` again without `since` (every topic's snap is
            re-sent) and hand what follows to `sink` (rule 6)."""
            if self.lowat and not self.closed:
                set_read_lowat(self.transport, 1)  # wakes the loop for what waits
                self.lowat = 0
            self.counting = False
            self.sink = sink
            self.feed = sink.feed
            self.snapped = set()
            self.ready = False
            if self.transport is not None and not self.closed:
                self.transport.send(binary, sub_message(list(self.views), self.max_hz))

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            transport.send(binary, self.sub_message)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            # the frame is valid only inside this call: payloads are copied here
            mtype = frame.msg_type
            if mtype == binary and frame.fin and self.fragments is None:
                if self.counting:  # rule 6: no copy, no decoding
                    self.frames += 1
                    self.bytes += frame.payload_size  # as on the wire: compressed or not
                elif frame.rsv1:  # permessage-deflate: the engine sends whole frames only
                    self.feed(self, inflate(frame.get_payload_as_bytes(), MAX_FRAME_BYTES))
                else:
                    self.feed(self, frame.get_payload_as_bytes())
            elif mtype in (binary, continuation):
                if self.fragments is None:
                    self.fragments = bytearray()
                self.fragments += frame.get_payload_as_bytes()
                if frame.fin:
                    payload, self.fragments = bytes(self.fragments), None
                    self.feed(self, payload)
            elif mtype == close:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            else:
                self.sink.unexpected(self, f"frame:{mtype.name}")

        def on_ws_disconnected(self, transport: Any) -> None:
            if self.closed:
                return
            self.closed = True
            self.sink.disconnected(self)

    return Client


async def connect(
    client: Any, url: str, *, compression: bool | None = None, **picows_args: Any
) -> Any:
    """Open `client`'s connection to `url` (fanout.v1, 15 s handshake timeout, frames up
    to 64 MiB); returns the transport. `picows_args` go to `ws_connect` (local_addr,
    logger_name). `compression`: offer permessage-deflate (None: when the environment
    has `COMPRESSION_ENV`=1, which `fanout bench` subscriber processes inherit; a
    counting client then counts compressed bytes, a decoding one inflates). Raises
    what ws_connect raises."""
    from picows import ws_connect

    if compression is None:
        compression = os.environ.get(COMPRESSION_ENV) == "1"
    headers = {"Sec-WebSocket-Protocol": SUBPROTOCOL}
    if compression:
        headers["Sec-WebSocket-Extensions"] = CLIENT_OFFER
    transport, _ = await ws_connect(
        lambda: client,
        url,
        extra_headers=headers,
        websocket_handshake_timeout=HANDSHAKE_TIMEOUT_S,
        max_frame_size=MAX_FRAME_BYTES,
        **picows_args,
    )
    return transport


def source_socket(host: str) -> Any:
    """A picows `socket_factory`: a TCP socket bound to source address `host`, its port
    picked by connect() (rule 8), which picows then connects."""

    def factory(url: Any) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # not Linux: bind() picks the port
        try:
            sock.bind((host, 0))
        except OSError:
            sock.close()
            raise
        return sock

    return factory


def set_read_lowat(transport: Any, nbytes: int) -> bool:
    """Set SO_RCVLOWAT of a picows transport's socket; False when it cannot."""
    import socket

    try:
        sock = transport.underlying_transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
    except (AttributeError, OSError):
        return False
    return True


def local_host(transport: Any) -> str | None:
    """The local address a transport's socket is bound to, or None."""
    try:
        return str(transport.underlying_transport.get_extra_info("sockname")[0])
    except Exception:
        return None


# -- counting mode ------------------------------------------------------------------------

# One decoded message: (topic or None, clear the view, items for the view, epoch
# (snap only), pos, is_snap, key values in it, ((stamp, count), ...), control
# item or None, pos as a comparable (ms, seq) or None). Messages with a topic
# update that topic's view.
_Msg = tuple[
    str | None,
    bool,
    dict[str, Any],
    Any,
    Any,
    bool,
    int,
    tuple[tuple[int, int], ...],
    tuple[str, Any] | None,
    tuple[int, int] | None,
]


class CountingSink(LatencyRecorder):
    """Counting mode (rule 3): what one process's clients received, and its decode cache.

    `feed` is the hot path: one call per received message. Counts: `frames`,
    `bytes`, `updates` (key values in `upd`/`evt`; a snap's values are not delivered
    updates), latency while `measuring`, `errors` by kind, close codes (of
    the clients flagged slow apart), `byes`, `closed`."""

    _CACHE_MAX = 4096  # messages; cleared when full (bounded memory)

    def __init__(self) -> None:
        # message bytes -> decoded message. The engine sends the same `upd` bytes
        # to every subscriber of a topic (a whole frame on a one-topic workload,
        # part of frames that differ per client on the market workload), so each
        # distinct message is decoded once per process.
        self.mcache: dict[bytes, _Msg] = {}
        # an `upd`'s bytes after its head -> (topic, items, pos, (ms, seq), count, stamps)
        self.ucache: dict[bytes, tuple[str, dict[str, Any], Any, tuple[int, int], int, Any]] = {}
        self.unpacker = msgpack.Unpacker(raw=False)
        self.frames = 0
        self.bytes = 0
        self.updates = 0
        self.measuring = False
        LatencyRecorder.__init__(self)
        self.errors: collections.Counter[str] = collections.Counter()
        self.close_codes: collections.Counter[int] = collections.Counter()
        self.slow_close_codes: collections.Counter[int] = collections.Counter()
        self.byes = 0
        self.closed = 0

    def feed(self, client: Any, payload: bytes) -> None:
        now = time.time_ns()
        self.frames += 1
        self.bytes += len(payload)
        # rule 9: a frame of `upd`s only (the common case) is split at their heads in C
        bodies = payload.split(_UPD_HEAD)
        if bodies[0]:
            self._feed_messages(client, payload, now)
            return
        del bodies[0]
        msgs = list(map(self.ucache.get, bodies))
        if None in msgs and not self._decode_bodies(bodies, msgs):
            self._feed_messages(client, payload, now)  # not `upd`s after all
            return
        views = client.views
        positions = client.positions
        order_keys = client.order_keys
        updates = 0
        stamps: list[tuple[int, int]] = []
        for topic, items, pos, key, n, st in msgs:
            view = views.get(topic)
            if view is not None:
                view.update(items)
                held = order_keys.get(topic)
                if held is not None and key < held:  # rule 7
                    self.errors["order"] += 1
                order_keys[topic] = key
                positions[topic] = pos
            updates += n
            stamps += st
        self.updates += updates
        if self.measuring:
            self.record(stamps, now)

    def _decode_bodies(self, bodies: list[bytes], msgs: list[Any]) -> bool:
        """Decode the bodies not in the cache into `msgs` (rule 9); False when one is
        not exactly one whole `upd` (nothing was applied: the general path takes it)."""
        ucache = self.ucache
        unpackb = msgpack.unpackb
        while None in msgs:
            i = msgs.index(None)
            body = bodies[i]
            try:
                msg = unpackb(_UPD_HEAD + body, raw=False)
            except (ValueError, msgpack.UnpackException):
                return False
            items = msg.get("items")
            pos = msg.get("pos")
            if type(items) is not dict or type(pos) is not str:
                return False
            ms, _, seq = pos.partition("-")  # pos_key, inlined: once per distinct message
            try:
                key = (int(ms), int(seq or 0))
            except ValueError:
                return False
            counts: dict[int, int] = {}  # stamps_of, inlined
            for v in items.values():
                if type(v) is list and len(v) == 2 and type(t := v[1]) is int:
                    counts[t] = counts.get(t, 0) + 1
            m = (str(msg.get("topic")), items, pos, key, len(items), tuple(counts.items()))
            if len(ucache) >= self._CACHE_MAX:
                ucache.clear()
            ucache[body] = m
            msgs[i] = m
        return True

    def _feed_messages(self, client: Any, payload: bytes, now: int) -> None:
        """The general path: any frame (snaps, control messages, `evt`s, a mix)."""
        m = self.mcache.get(payload)
        # a frame of one message seen before, or split it
        msgs = (m,) if m is not None else self._split(payload)
        views = client.views
        positions = client.positions
        order_keys = client.order_keys
        for topic, clear, items, epoch, pos, is_snap, n, stamps, control, key in msgs:
            if topic is not None:
                view = views.get(topic)
                if view is not None:
                    if clear:
                        view.clear()
                    view.update(items)
                    if is_snap:
                        client.epochs[topic] = epoch
                        client.snapped.add(topic)
                        if len(client.snapped) == len(views):
                            client.ready = True
                    elif key is not None:  # rule 7
                        held = order_keys.get(topic)
                        if held is not None and key < held:
                            self.errors["order"] += 1
                    if key is not None:
                        order_keys[topic] = key
                    positions[topic] = pos
            self.updates += n
            if control is not None:
                self._control((control,))
            if stamps and self.measuring:
                self.record(stamps, now)

    def disconnected(self, client: Any) -> None:
        if client.dropping:
            return  # closed on purpose (storm, churn)
        self.closed += 1
        code = client.close_code if client.close_code is not None else 1006
        if client.slow:
            self.slow_close_codes[code] += 1
        else:
            self.close_codes[code] += 1

    def unexpected(self, client: Any, what: str) -> None:
        self.errors[what] += 1

    def reset_window(self) -> None:
        """Start a measured window: an empty histogram, counting latency."""
        self.hist, self.samples, self.negative, self.max_ns = {}, 0, 0, 0
        self.measuring = True

    def _split(self, payload: bytes) -> list[_Msg]:
        """The frame's messages (msgpack `skip` finds their ends, building no
        objects), each decoded once per process (`_decode`)."""
        msgs: list[_Msg] = []
        unpacker = self.unpacker
        mcache = self.mcache
        try:
            unpacker.feed(payload)
            base = at = unpacker.tell()
            end = base + len(payload)
            while at < end:
                unpacker.skip()
                nxt = unpacker.tell()
                raw = payload if nxt - at == len(payload) else payload[at - base : nxt - base]
                at = nxt
                m = mcache.get(raw)
                msgs.append(self._decode(raw) if m is None else m)
        except (ValueError, msgpack.UnpackException) as exc:
            msgs.append((None, False, {}, None, None, False, 0, (), ("bad", str(exc)[:80]), None))
            self.unpacker = msgpack.Unpacker(raw=False)  # its buffer is not trusted now
        return msgs

    def _decode(self, raw: bytes) -> _Msg:
        m = _decode_msg(msgpack.unpackb(raw, raw=False))
        if m[8] is None and not m[5]:  # snaps and control messages are rare: not kept
            mcache = self.mcache
            if len(mcache) >= self._CACHE_MAX:
                mcache.clear()
            mcache[raw] = m
        return m

    def _control(self, control: Sequence[tuple[str, Any]]) -> None:
        for op, msg in control:
            if op == "err":
                self.errors[f"err:{msg.get('code')}"] += 1
            elif op == "bye":
                self.byes += 1
            elif op == "bad":
                self.errors["undecodable"] += 1
            elif op == "gap":
                self.errors["gap"] += 1


def stamps_of(values: Any) -> tuple[tuple[int, int], ...]:
    """((stamp, count), ...) of the `[seq, stamp]` values among `values`."""
    counts: dict[int, int] = {}
    for v in values:
        if type(v) is list and len(v) == 2 and type(v[1]) is int:
            t = v[1]
            counts[t] = counts.get(t, 0) + 1
    return tuple(counts.items())


def pos_key(pos: Any) -> tuple[int, int] | None:
    """A wire position "MS-SEQ" as a comparable (ms, seq), or None (not a position)."""
    if type(pos) is not str:
        return None
    ms, _, seq = pos.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def _decode_msg(msg: Any) -> _Msg:
    if not isinstance(msg, dict):
        return None, False, {}, None, None, False, 0, (), ("bad", repr(msg)[:80]), None
    op = msg.get("op")
    if op == "upd":
        its = msg.get("items") or {}
        topic = str(msg.get("topic"))
        pos = msg.get("pos")
        return (
            topic,
            False,
            its,
            None,
            pos,
            False,
            len(its),
            stamps_of(its.values()),
            None,
            pos_key(pos),
        )
    if op == "evt":
        events = msg.get("items") or []
        values = [ev[1] for ev in events if isinstance(ev, list) and len(ev) == 2]
        last = {STREAM_KEY: events[-1][1]} if events else {}
        pos = events[-1][0] if events else None
        topic = str(msg.get("topic"))
        return (
            topic,
            False,
            last,
            None,
            pos,
            False,
            len(events),
            stamps_of(values),
            None,
            pos_key(pos),
        )
    if op == "snap":
        its = msg.get("items") or {}
        if isinstance(its, list):  # a stream topic: [[pos, data], ...]
            its = {STREAM_KEY: its[-1][1]} if its else {}
        topic = str(msg.get("topic"))
        full = bool(msg.get("full"))
        pos = msg.get("pos")
        return topic, full, its, msg.get("epoch"), pos, True, 0, (), None, pos_key(pos)
    return None, False, {}, None, None, False, 0, (), (str(op), msg), None


# -- decoding mode ------------------------------------------------------------------------


class DecodingSink:
    """Decoding mode (rule 4): every message of every payload decoded and handed to
    `message`; subclasses say what a message means (the base class ignores it).

    A `snap` marks its topic snapped on the client (`client.ready` once every
    topic has had one) before `message` sees it. A payload that is not
    msgpack goes to `bad` (the messages before the error were handed over)."""

    def feed(self, client: Any, payload: bytes) -> None:
        now = time.time_ns()
        size = len(payload)
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(payload)
        try:
            for msg in unpacker:
                if type(msg) is dict and msg.get("op") == "snap":
                    topic = msg.get("topic")
                    if topic in client.views:
                        client.snapped.add(topic)
                        if len(client.snapped) == len(client.views):
                            client.ready = True
                self.message(client, msg, now, size)
        except (ValueError, msgpack.UnpackException) as exc:
            self.bad(client, str(exc), size)

    def message(self, client: Any, msg: Any, now_ns: int, size: int) -> None:
        """One decoded message (any msgpack value: check it is a map)."""

    def bad(self, client: Any, error: str, size: int) -> None:
        """A payload that did not decode."""

    def disconnected(self, client: Any) -> None:
        """The connection ended (`client.dropping`: on purpose)."""

    def unexpected(self, client: Any, what: str) -> None:
        """A frame the protocol does not send."""


# -- the snapshot check (rule 6) ----------------------------------------------------------


def snapshot_matches(
    snaps: Mapping[str, Mapping[str, Any]],
    topics: Sequence[str],
    finals: Mapping[str, Mapping[str, int]],
) -> bool:
    """True when there is a snap of every topic in `topics` and it holds the final seq
    (`finals` {topic: {key: seq}}) of every key: values are `[seq, stamp]`."""
    for topic in topics:
        snap = snaps.get(topic)
        if snap is None:
            return False
        for key, seq in finals.get(topic, {}).items():
            v = snap.get(key)
            if type(v) is not list or not v or v[0] != seq:
                return False
    return True


class SnapshotSink(DecodingSink):
    """What a counting client receives after `resubscribe` (rule 6): the items of each
    topic's re-sent snap, kept to compare with the final values (`matched`); the
    updates that follow are ignored. Closes and odd frames go on to `parent` (the
    sink that counts them)."""

    def __init__(self, parent: Sink) -> None:
        self.parent = parent
        self.snaps: dict[int, dict[str, dict[str, Any]]] = {}  # id(client) -> topic -> items
        self.undecodable = 0

    def message(self, client: Any, msg: Any, now_ns: int, size: int) -> None:
        if type(msg) is not dict or msg.get("op") != "snap":
            return
        items = msg.get("items") or {}
        if isinstance(items, list):  # a stream topic: [[pos, data], ...]
            items = {STREAM_KEY: items[-1][1]} if items else {}
        if isinstance(items, dict):
            self.snaps.setdefault(id(client), {})[str(msg.get("topic"))] = items

    def bad(self, client: Any, error: str, size: int) -> None:
        self.undecodable += 1

    def matched(self, client: Any, finals: Mapping[str, Mapping[str, int]]) -> bool:
        """The client is open, had every topic's snap, and each holds the final values."""
        snaps = self.snaps.get(id(client), {})
        return not client.closed and snapshot_matches(snaps, list(client.views), finals)

    def disconnected(self, client: Any) -> None:
        self.parent.disconnected(client)

    def unexpected(self, client: Any, what: str) -> None:
        self.parent.unexpected(client, what)


__all__ = [
    "CountingSink",
    "DecodingSink",
    "Sink",
    "SnapshotSink",
    "connect",
    "listener_class",
    "local_host",
    "pos_key",
    "set_read_lowat",
    "snapshot_matches",
    "stamps_of",
    "sub_message",
]
