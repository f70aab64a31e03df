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
3. `CountingSink` (counting mode, the load generator's hot path): each
   distinct message is decoded once per process (a cache keyed by its bytes,
   at most 4,096 entries), applied to the client's views, its key values
   counted and their `[seq, time_ns]` stamps put in a latency histogram.
   Its cost per frame is what `python -m loadtest.microbench generator`
   measures.
4. `DecodingSink` (decoding mode: locust, probes): every message decoded
   and handed whole to `message(client, msg, now_ns, size)`; a subclass says
   what to do with it. Slower, and it sees everything.
5. A connection the tool closes on purpose sets `dropping` first: its close is
   not counted as the server's.

picows is imported when the first listener class is built (`listener_class`),
so that importing this module costs no picows in processes that never connect.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgpack

from loadtest.latency import LatencyRecorder
from loadtest.workload import STREAM_KEY

SUBPROTOCOL = "fanout.v1"
MAX_FRAME_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT_S = 15.0


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
            "close_code",
            "closed",
            "dropping",
            "epochs",
            "feed",
            "fragments",
            "index",
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
            self.snapped: set[str] = set()
            self.transport: Any = None
            self.ready = False
            self.closed = False
            self.dropping = False
            self.slow = slow
            self.close_code: int | None = None
            self.fragments: bytearray | None = None
            self.sub_message = sub_message(topics, max_hz, since)

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

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            transport.send(binary, self.sub_message)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            # the frame is valid only inside this call: payloads are copied here
            mtype = frame.msg_type
            if mtype == binary and frame.fin and self.fragments is None:
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


async def connect(client: Any, url: str, **picows_args: Any) -> Any:
    """Open `client`'s connection to `url` (fanout.v1, 15 s handshake timeout, frames up
    to 64 MiB); returns the transport. `picows_args` go to `ws_connect` (local_addr,
    logger_name). Raises what ws_connect raises."""
    from picows import ws_connect

    transport, _ = await ws_connect(
        lambda: client,
        url,
        extra_headers={"Sec-WebSocket-Protocol": SUBPROTOCOL},
        websocket_handshake_timeout=HANDSHAKE_TIMEOUT_S,
        max_frame_size=MAX_FRAME_BYTES,
        **picows_args,
    )
    return transport


def local_host(transport: Any) -> str | None:
    """The local address a transport's socket is bound to, or None."""
    try:
        return str(transport.underlying_transport.get_extra_info("sockname")[0])
    except Exception:
        return None


# -- counting mode ------------------------------------------------------------------------

# One decoded message: (topic or None, clear the view, items for the view, epoch
# (snap only), pos, is_snap, key values in it, ((stamp, count), ...), control
# item or None). Messages with a topic update that topic's view.
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
]


class CountingSink(LatencyRecorder):
    """Counting mode (rule 3): what one process's clients received, and its decode cache.

    `feed` is the hot path: one call per received message. Counts: `frames`,
    `updates` (key values in `upd`/`evt`; a snap's values are not delivered
    updates), latency while `measuring`, `errors` by kind, close codes (of
    the clients flagged slow apart), `byes`, `closed`."""

    _CACHE_MAX = 4096  # messages; cleared when full (bounded memory)

    def __init__(self) -> None:
        # message bytes -> decoded message. The engine sends the same `upd` bytes
        # to every subscriber of a topic (a whole frame on a one-topic workload,
        # part of frames that differ per client on the market workload), so each
        # distinct message is decoded once per process.
        self.mcache: dict[bytes, _Msg] = {}
        self.unpacker = msgpack.Unpacker(raw=False)
        self.frames = 0
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
        m = self.mcache.get(payload)
        # a frame of one message seen before (the common case), or split it
        msgs = (m,) if m is not None else self._split(payload)
        views = client.views
        for topic, clear, items, epoch, pos, is_snap, n, stamps, control in msgs:
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
                    client.positions[topic] = pos
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
            msgs.append((None, False, {}, None, None, False, 0, (), ("bad", str(exc)[:80])))
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


def _decode_msg(msg: Any) -> _Msg:
    if not isinstance(msg, dict):
        return None, False, {}, None, None, False, 0, (), ("bad", repr(msg)[:80])
    op = msg.get("op")
    if op == "upd":
        its = msg.get("items") or {}
        topic = str(msg.get("topic"))
        return (
            topic,
            False,
            its,
            None,
            msg.get("pos"),
            False,
            len(its),
            stamps_of(its.values()),
            None,
        )
    if op == "evt":
        events = msg.get("items") or []
        values = [ev[1] for ev in events if isinstance(ev, list) and len(ev) == 2]
        last = {STREAM_KEY: events[-1][1]} if events else {}
        pos = events[-1][0] if events else None
        topic = str(msg.get("topic"))
        return topic, False, last, None, pos, False, len(events), stamps_of(values), None
    if op == "snap":
        its = msg.get("items") or {}
        if isinstance(its, list):  # a stream topic: [[pos, data], ...]
            its = {STREAM_KEY: its[-1][1]} if its else {}
        topic = str(msg.get("topic"))
        full = bool(msg.get("full"))
        return topic, full, its, msg.get("epoch"), msg.get("pos"), True, 0, (), None
    return None, False, {}, None, None, False, 0, (), (str(op), msg)


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


__all__ = [
    "CountingSink",
    "DecodingSink",
    "Sink",
    "connect",
    "listener_class",
    "local_host",
    "stamps_of",
    "sub_message",
]
