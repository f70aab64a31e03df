"""The wire codec of protocol v1: msgpack maps in binary frames. PURE: no I/O.

Rules this module owns:

1. A publisher's `data` is never decoded and re-encoded. `decode_request` hands
   back the exact msgpack bytes of the `data` value (`Pub.data`), and the
   `build_*` functions splice stored value bytes into outgoing messages.
2. A deletion is the msgpack nil byte (`NIL`) stored as the key's value; it is
   sent as nil in `upd` and in `snap` with `full: false`, and left out of a full
   `snap`.
3. Decoding is bounded: the unpacker is given limits for string, binary, array,
   map and extension lengths derived from the frame size, so no frame can make
   it allocate more than a small multiple of its own size. Beyond that, only
   the fields the protocol defines are decoded, and only in their shapes:
   unknown fields and `data` are skipped without building objects, a
   container where a scalar belongs is refused before it is decoded, and
   `topics` / `since` may hold at most `max_topics` entries of scalars. So a
   request allocates O(its own size) with a small constant, and nesting depth
   is at most 3 (`since` -> topic -> [epoch, pos]).
4. Positions are integers inside the engine and strings on the wire
   ("MS-SEQ", the Redis stream ID form, for every bus backend): `format_pos`,
   `parse_pos`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from engine.codes import ErrorCode
from engine.errors import RemoteProtocolError

NIL: Final = b"\xc0"  # msgpack nil: the value bytes of a deleted key

TOPIC_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_SEQ_BITS: Final = 32
_SEQ_MASK: Final = (1 << _SEQ_BITS) - 1
# ASCII digits only: `\d` would also accept other scripts' digits, which `int()` parses.
# SEQ takes 10 digits so that every SEQ `format_pos` can write (up to 2**32 - 1) parses back.
_POS_RE: Final = re.compile(r"([0-9]{1,15})-([0-9]{1,10})")

# Hard caps on what one client message may hold, whatever its size.
MAX_DEPTH_HINT: Final = 32  # documented; msgpack's C unpacker enforces its own stack limit
_FIELDS: Final = frozenset({"op", "id", "topics", "topic", "key", "since", "max_hz", "token"})
_MAX_ID: Final = 2**53


# -- positions ----------------------------------------------------------------------


def make_pos(ms: int, seq: int) -> int:
    """The integer position of stream ID `ms-seq`."""
    return (ms << _SEQ_BITS) | seq


def format_pos(pos: int) -> str:
    """Wire form of a position: "MS-SEQ" (0 -> "0-0")."""
    return f"{pos >> _SEQ_BITS}-{pos & _SEQ_MASK}"


def parse_pos(text: object) -> int:
    """Parse a wire position; raises `RemoteProtocolError(bad_request)`."""
    if isinstance(text, str):
        m = _POS_RE.fullmatch(text)
        if m is not None:
            seq = int(m.group(2))
            if seq <= _SEQ_MASK:
                return make_pos(int(m.group(1)), seq)
    raise RemoteProtocolError(ErrorCode.BAD_REQUEST, f"bad position {text!r}: expected 'MS-SEQ'")


def valid_topic(name: object) -> bool:
    return isinstance(name, str) and TOPIC_RE.fullmatch(name) is not None


# -- client -> server ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sub:
    id: int | None
    topics: tuple[str, ...]
    since: Mapping[str, tuple[str, int]]  # topic -> (epoch, pos)
    max_hz: float | None


@dataclass(frozen=True, slots=True)
class Unsub:
    id: int | None
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Pub:
    id: int | None
    topic: str
    key: str | None
    data: bytes  # the publisher's msgpack bytes, exactly


@dataclass(frozen=True, slots=True)
class Ping:
    id: int | None


@dataclass(frozen=True, slots=True)
class Auth:
    id: int | None
    token: str


Request = Sub | Unsub | Pub | Ping | Auth

KNOWN_OPS: Final = frozenset({"sub", "unsub", "pub", "ping", "auth"})


def _unpacker(size: int) -> msgpack.Unpacker:
    # Every length limit is bounded by the frame's own size: a container can't
    # claim more elements than there are bytes left to describe them.
    n = max(size, 1)
    return msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=n,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=n,
    )


def _bad(msg: str, rid: int | None = None, topic: str | None = None) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_REQUEST, msg, request_id=rid, topic=topic)


def decode_request(payload: bytes, max_topics: int) -> Request:
    """Decode one client message (one complete binary WebSocket message).

    Returns a typed request, or raises `RemoteProtocolError` with the protocol
    code to answer (`bad_request`, `unknown_op`, `bad_topic`, `too_many_topics`)
    and the request's `id` when it could be read. Never raises anything else.
    """
    fields: dict[str, Any] = {}
    data: bytes | None = None
    unpacker = _unpacker(len(payload))
    try:
        unpacker.feed(payload)
        try:
            n = unpacker.read_map_header()
        except msgpack.UnpackValueError:
            raise _bad("a message must be a msgpack map") from None
        for _ in range(n):
            if _container(payload, unpacker.tell()) is not None:
                raise _bad("message field names must be strings")
            k = unpacker.unpack()
            if not isinstance(k, str):
                raise _bad("message field names must be strings")
            if k == "data":
                start = unpacker.tell()
                unpacker.skip()
                # bytes(): a memoryview payload (a picows frame) must not be kept.
                data = bytes(payload[start : unpacker.tell()])
            elif k not in _FIELDS:
                unpacker.skip()  # not ours: never decoded (rule 3)
            elif k in ("topics", "since"):
                fields[k] = _read_shallow(unpacker, payload, k, max_topics)
            elif _container(payload, unpacker.tell()) is not None:
                fields[k] = _ILL_TYPED  # refused by _validate, with the request's id
                unpacker.skip()
            else:
                fields[k] = unpacker.unpack()
        if unpacker.tell() != len(payload):
            raise _bad("trailing bytes after the message (one message per frame)")
    except RemoteProtocolError:
        raise
    except (msgpack.OutOfData, StopIteration):
        raise _bad("truncated msgpack message") from None
    except Exception as exc:  # msgpack raises ValueError/TypeError subclasses of many kinds
        raise _bad(f"undecodable msgpack: {type(exc).__name__}") from None
    return _validate(fields, data, max_topics)


_ILL_TYPED: Final = object()  # a container where a scalar field belongs (never decoded)


@dataclass(frozen=True, slots=True)
class _TooMany:
    """`topics` or `since` with more entries than allowed (skipped undecoded)."""

    n: int


def _container(payload: bytes, at: int) -> tuple[str, int] | None:
    """("array" | "map", length) when the msgpack value at `at` is a container
    (read from its header byte, without decoding it), else None."""
    if at >= len(payload):
        return None
    b = payload[at]
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F
    if b in (0xDC, 0xDE):
        n = int.from_bytes(payload[at + 1 : at + 3], "big")
        return ("array" if b == 0xDC else "map"), n
    if b in (0xDD, 0xDF):
        n = int.from_bytes(payload[at + 1 : at + 5], "big")
        return ("array" if b == 0xDD else "map"), n
    return None


def _read_shallow(unpacker: msgpack.Unpacker, payload: bytes, name: str, max_topics: int) -> Any:
    """`topics` (a list of scalars) or `since` (a map of scalar -> list of two
    scalars), at most `max_topics` entries: anything else is skipped undecoded
    and left for `_validate` to refuse (the sentinel `_ILL_TYPED`), or refused here."""
    shape = _container(payload, unpacker.tell())
    want = "array" if name == "topics" else "map"
    if shape is None or shape[0] != want:
        if shape is None:
            return unpacker.unpack()  # a scalar: small, refused by _validate
        unpacker.skip()
        return _ILL_TYPED
    if shape[1] > max_topics:
        unpacker.skip()
        return _TooMany(shape[1])
    if name == "topics":
        n = unpacker.read_array_header()
        items: list[Any] = []
        for _ in range(n):
            if _container(payload, unpacker.tell()) is not None:
                unpacker.skip()
                items.append(_ILL_TYPED)
            else:
                items.append(unpacker.unpack())
        return items
    n = unpacker.read_map_header()
    since: dict[Any, Any] = {}
    for _ in range(n):
        if _container(payload, unpacker.tell()) is not None:
            unpacker.skip()
            unpacker.skip()
            since[("_ill_typed", len(since))] = _ILL_TYPED
            continue
        topic = unpacker.unpack()
        mark = _container(payload, unpacker.tell())
        if mark is None:
            value: Any = unpacker.unpack()
        elif mark != ("array", 2):
            unpacker.skip()
            value = _ILL_TYPED
        else:
            unpacker.read_array_header()
            value = []
            for _ in range(2):
                if _container(payload, unpacker.tell()) is not None:
                    unpacker.skip()
                    value.append(_ILL_TYPED)
                else:
                    value.append(unpacker.unpack())
        since[topic] = value
    return since


def _validate(fields: dict[str, Any], data: bytes | None, max_topics: int) -> Request:
    rid = fields.get("id")
    if rid is not None and (
        not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < _MAX_ID
    ):
        raise _bad("'id' must be an unsigned integer")
    op = fields.get("op")
    if not isinstance(op, str):
        raise _bad("missing string field 'op'", rid)
    if op == "sub":
        topics = _topics(fields, rid, max_topics)
        since = _since(fields.get("since"), rid)
        max_hz = fields.get("max_hz")
        if max_hz is not None:
            if isinstance(max_hz, bool) or not isinstance(max_hz, int | float):
                raise _bad("'max_hz' must be a number", rid)
            if not max_hz > 0 or max_hz != max_hz or max_hz == float("inf"):
                raise _bad("'max_hz' must be a positive finite number", rid)
            max_hz = float(max_hz)
        return Sub(rid, topics, since, max_hz)
    if op == "unsub":
        return Unsub(rid, _topics(fields, rid, max_topics))
    if op == "pub":
        topic = fields.get("topic")
        if not isinstance(topic, str):
            raise _bad("'pub' needs a string 'topic'", rid)
        if not valid_topic(topic):
            raise RemoteProtocolError(
                ErrorCode.BAD_TOPIC,
                f"bad topic name {topic[:60]!r}",
                topic=topic[:200],
                request_id=rid,
            )
        key = fields.get("key")
        if key is not None and (not isinstance(key, str) or not key):
            raise _bad("'key' must be a non-empty string", rid, topic)
        if data is None:
            raise _bad("'pub' needs a 'data' field", rid, topic)
        return Pub(rid, topic, key, data)
    if op == "ping":
        return Ping(rid)
    if op == "auth":
        token = fields.get("token")
        if not isinstance(token, str):
            raise _bad("'auth' needs a string 'token'", rid)
        return Auth(rid, token)
    raise RemoteProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:40]!r}", request_id=rid)


def _topics(fields: dict[str, Any], rid: int | None, max_topics: int) -> tuple[str, ...]:
    topics = fields.get("topics")
    if isinstance(topics, _TooMany):
        raise RemoteProtocolError(
            ErrorCode.TOO_MANY_TOPICS,
            f"{topics.n} topics in one message; the limit is {max_topics}",
            request_id=rid,
        )
    if not isinstance(topics, list) or not topics:
        raise _bad("'topics' must be a non-empty list of strings", rid)
    if len(topics) > max_topics:
        raise RemoteProtocolError(
            ErrorCode.TOO_MANY_TOPICS,
            f"{len(topics)} topics in one message; the limit is {max_topics}",
            request_id=rid,
        )
    for t in topics:
        if not isinstance(t, str):
            raise _bad("'topics' must be a list of strings", rid)
        if not valid_topic(t):
            raise RemoteProtocolError(
                ErrorCode.BAD_TOPIC, f"bad topic name {t[:60]!r}", topic=t[:200], request_id=rid
            )
    return tuple(dict.fromkeys(topics))  # drop repeats, keep order


def _since(value: object, rid: int | None) -> dict[str, tuple[str, int]]:
    if value is None:
        return {}
    if isinstance(value, _TooMany):
        raise _bad(
            f"'since' names {value.n} topics; a message may hold at most as many as 'topics'", rid
        )
    if not isinstance(value, dict):
        raise _bad("'since' must be a map of topic -> [epoch, pos]", rid)
    out: dict[str, tuple[str, int]] = {}
    for topic, mark in value.items():
        if not isinstance(topic, str):  # strict_map_key lets bin keys through
            raise _bad("'since' keys must be topic name strings", rid)
        if (
            not isinstance(mark, list)
            or len(mark) != 2
            or not isinstance(mark[0], str)
            or not isinstance(mark[1], str)
        ):
            raise _bad(f"'since' of {topic[:60]!r} must be [epoch, pos] strings", rid, topic[:200])
        try:
            out[topic] = (mark[0], parse_pos(mark[1]))
        except RemoteProtocolError as exc:
            raise _bad(exc.message, rid, topic[:200]) from None
    return out


# -- server -> client ---------------------------------------------------------------

# Typed here: msgpack ships no stubs, and an untyped `pack` would make every builder return Any.
_pack: Final[Callable[[object], bytes]] = msgpack.Packer(use_bin_type=True).pack


def encode(message: Mapping[str, Any]) -> bytes:
    """Encode one control message (hello, ack, err, pong, bye)."""
    return _pack(message)


def pack_str(s: str) -> bytes:
    return _pack(s)


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_UPD_HEAD: Final = map_header(4) + _pack("op") + _pack("upd") + _pack("topic")
_SNAP_HEAD: Final = map_header(6) + _pack("op") + _pack("snap") + _pack("topic")
_K_POS: Final = _pack("pos")
_K_ITEMS: Final = _pack("items")
_K_EPOCH: Final = _pack("epoch")
_K_FULL: Final = _pack("full")
_TRUE: Final = b"\xc3"
_FALSE: Final = b"\xc2"


def pack_item(key: str, data: bytes) -> bytes:
    """One `key: data` pair of an `items` map, `data` spliced in as is."""
    return _pack(key) + data


def build_upd(packed_topic: bytes, pos: int, items: Sequence[bytes]) -> bytes:
    """`{op: upd, topic, pos, items: {key: data}}` from pre-packed items (`pack_item`)."""
    return b"".join(
        (
            _UPD_HEAD,
            packed_topic,
            _K_POS,
            _pack(format_pos(pos)),
            _K_ITEMS,
            map_header(len(items)),
            *items,
        )
    )


def build_snap(
    packed_topic: bytes, epoch: str, pos: int, full: bool, items: Sequence[bytes]
) -> bytes:
    """`{op: snap, topic, epoch, pos, full, items: {key: data}}` from pre-packed items."""
    return b"".join(
        (
            _SNAP_HEAD,
            packed_topic,
            _K_EPOCH,
            _pack(epoch),
            _K_POS,
            _pack(format_pos(pos)),
            _K_FULL,
            _TRUE if full else _FALSE,
            _K_ITEMS,
            map_header(len(items)),
            *items,
        )
    )


# -- stream topics (docs/protocol.md 4.2) ----------------------------------------------

_EVT_HEAD: Final = map_header(3) + _pack("op") + _pack("evt") + _pack("topic")
_GAP_HEAD: Final = map_header(4) + _pack("op") + _pack("gap") + _pack("topic")
_K_FROM: Final = _pack("from")
_K_TO: Final = _pack("to")
_EVENT_HEADER: Final = array_header(2)


def pack_event(pos: int, data: bytes) -> bytes:
    """One `[pos, data]` pair of an `evt` or stream `snap`, `data` spliced in as is."""
    return _EVENT_HEADER + _pack(format_pos(pos)) + data


def build_evt(packed_topic: bytes, events: Sequence[bytes]) -> bytes:
    """`{op: evt, topic, items: [[pos, data], ...]}` from pre-packed events (`pack_event`)."""
    return b"".join((_EVT_HEAD, packed_topic, _K_ITEMS, array_header(len(events)), *events))


def build_gap(packed_topic: bytes, from_pos: int, to_pos: int) -> bytes:
    """`{op: gap, topic, from, to}`: the events after `from_pos` up to `to_pos` were lost."""
    return b"".join(
        (
            _GAP_HEAD,
            packed_topic,
            _K_FROM,
            _pack(format_pos(from_pos)),
            _K_TO,
            _pack(format_pos(to_pos)),
        )
    )


def build_stream_snap(
    packed_topic: bytes, epoch: str, pos: int, full: bool, events: Sequence[bytes]
) -> bytes:
    """A stream topic's `{op: snap, topic, epoch, pos, full, items: [[pos, data], ...]}`."""
    return b"".join(
        (
            _SNAP_HEAD,
            packed_topic,
            _K_EPOCH,
            _pack(epoch),
            _K_POS,
            _pack(format_pos(pos)),
            _K_FULL,
            _TRUE if full else _FALSE,
            _K_ITEMS,
            array_header(len(events)),
            *events,
        )
    )


def hello(conn: str, node: str, auth_required: bool) -> bytes:
    return encode({"op": "hello", "v": 1, "conn": conn, "node": node, "auth": auth_required})


def ack(request_id: int | None, **fields: Any) -> bytes:
    msg: dict[str, Any] = {"op": "ack"}
    if request_id is not None:
        msg["id"] = request_id
    msg.update(fields)
    return encode(msg)


def err(code: str, message: str, request_id: int | None = None, topic: str | None = None) -> bytes:
    msg: dict[str, Any] = {"op": "err", "code": code, "msg": message}
    if request_id is not None:
        msg["id"] = request_id
    if topic is not None:
        msg["topic"] = topic
    return encode(msg)


def pong(request_id: int | None, ts_ms: int) -> bytes:
    msg: dict[str, Any] = {"op": "pong", "ts": ts_ms}
    if request_id is not None:
        msg["id"] = request_id
    return encode(msg)


def bye(reason: str, retry_ms: int) -> bytes:
    return encode({"op": "bye", "reason": reason, "retry_ms": retry_ms})


def decode_frame(frame: bytes) -> list[Any]:
    """Decode every message of a server frame (messages back to back). For clients and tests.

    Raises `ValueError` when the frame ends inside a message (a streaming
    unpacker alone would silently drop that partial tail). Map keys need not be
    strings: a publisher's `data` may use any msgpack scalar as a key.
    """
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(frame)
    messages = list(unpacker)
    if unpacker.tell() != len(frame):
        raise ValueError(f"frame ends inside a message ({len(frame) - unpacker.tell()} bytes left)")
    return messages


def iter_items(pairs: Iterable[tuple[str, bytes]]) -> list[bytes]:
    return [pack_item(k, v) for k, v in pairs]
