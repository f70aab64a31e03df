"""The wire codec of protocol v1: msgpack maps in binary frames. PURE: no I/O.

Rules this module owns:

1. A publisher's `data` bytes are what is published, exactly. `decode_request`
   hands back the exact msgpack bytes of the `data` value (`Pub.data`; in a
   batch whose bytes re-encode to themselves, each `data`'s re-encoding,
   which is then the same bytes), and the `build_*` functions splice stored
   value bytes into outgoing messages.
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
5. Only values every client can decode are published. On every ingest path
   (WebSocket `pub` here, `POST /publish` in engine.admin.http, `BusPublisher`)
   every string is valid UTF-8 (`utf8_problem`: no lone surrogate, which
   JavaScript's `JSON.stringify` emits for half an emoji) and `data` passes
   `data_problem`: it decodes with the Python client's own decoder, and
   arrays and maps nest at most `MAX_DATA_DEPTH` (32) deep. Both clients
   decode at least that (`CLIENT_MAX_DEPTH` counts the server message around
   a value); a value they cannot decode anyway (stored before this check) is
   handed over as an `Undecodable` and reported, never a reason to drop the
   connection (`decode_server_frame`).
6. A `pub` carries one update (`topic`, `key`, `data`) or a batch (`items`:
   1 to `max_items` = `limits.max_publish_items` maps of `topic`, `key`,
   `data`; never both). Each item is read and validated exactly like a single
   `pub` (rules 1, 3, 5: its `data` kept as raw bytes), and the first bad one
   refuses the whole batch, its error naming it (`items[3].key`). The item
   count is read from the array's header: a batch over the limit is skipped
   undecoded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Final, NamedTuple

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
# How deep the arrays and maps of one `data` value may nest (rule 5): a scalar
# is depth 0, `[1]` and `{}` depth 1, `[[1]]` depth 2. Shared with both clients
# (fanout.js MAX_DATA_DEPTH) and documented in docs/protocol.md section 1.
MAX_DATA_DEPTH: Final = 32
# Containers of a server message around a value: the message map, `items`,
# and a stream event's `[pos, data]` pair.
ENVELOPE_DEPTH: Final = 3
# The nesting a client decodes in a server message (fanout.js `maxDepth`).
CLIENT_MAX_DEPTH: Final = MAX_DATA_DEPTH + ENVELOPE_DEPTH
_FIELDS: Final = frozenset(
    {"op", "id", "topics", "topic", "key", "since", "max_hz", "token", "items"}
)
_ITEM_FIELDS: Final = frozenset({"topic", "key"})
_MAX_ID: Final = 2**53
_from_iterable: Final = chain.from_iterable
# `limits.max_publish_items`' default: the most items one `pub` batch may hold (rule 6)
DEFAULT_MAX_PUBLISH_ITEMS: Final = 1000


# -- positions ----------------------------------------------------------------------


def make_pos(ms: int, seq: int) -> int:
    """The integer position of stream ID `ms-seq`."""
    return (ms << _SEQ_BITS) | seq


def format_pos(pos: int) -> str:
    """Wire form of a position: "MS-SEQ" (0 -> "0-0")."""
    return f"{pos >> _SEQ_BITS}-{pos & _SEQ_MASK}"


def format_positions(positions: Iterable[int]) -> list[str]:
    """`format_pos` of each position (a batch's ack), without a call per position."""
    return [f"{pos >> _SEQ_BITS}-{pos & _SEQ_MASK}" for pos in positions]


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


# -- values every client can decode (rule 5) ---------------------------------------


def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be sent as a msgpack str (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        return (
            f"is not valid UTF-8: it holds a lone surrogate (U+{ord(bad):04X}) at"
            f" character {exc.start}, as JSON.stringify writes for half an emoji"
        )
    return None


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether the lists and dicts of a decoded value nest deeper than `limit`
    (a scalar is depth 0). Level by level, no recursion whatever the depth:
    each level's children are gathered by C iterators (`dict.values`,
    `chain`) and filtered by one comprehension, so a batch of a thousand
    small values costs a few C loops, not a Python step per container."""
    if type(value) is not list and type(value) is not dict:
        return False
    level: list[Any] = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        dicts = [c for c in level if type(c) is dict]
        if dicts:
            lists = [c for c in level if type(c) is list]
            children: Iterable[Any] = chain(
                _from_iterable(map(dict.values, dicts)), _from_iterable(lists)
            )
        else:
            children = _from_iterable(level)
        level = [c for c in children if type(c) is list or type(c) is dict]
        depth += 1
    return False


def depth_problem(limit: int = MAX_DATA_DEPTH) -> str:
    return (
        f"is nested deeper than {limit} levels of arrays and maps (the limit every"
        f" client decodes, MAX_DATA_DEPTH = {MAX_DATA_DEPTH}: docs/protocol.md)"
    )


def value_unpacker_kw(size: int) -> dict[str, Any]:
    """`msgpack.unpackb` options for one value of `size` bytes: the client's
    decoding, with every length bounded by the size (no allocation beyond it)."""
    n = max(size, 1)
    return {
        "raw": False,
        "strict_map_key": False,
        "max_str_len": n,
        "max_bin_len": n,
        "max_array_len": n,
        "max_map_len": n,
        "max_ext_len": n,
    }


def data_problem(data: bytes, limit: int = MAX_DATA_DEPTH) -> str | None:
    """Why the msgpack bytes of one `data` value must not be published, or None.

    The value is decoded as the Python client decodes it (strings as UTF-8,
    map keys of any scalar type), so whatever passes, both clients can read:
    refused are strings (values or map keys) that are not UTF-8, arrays or
    maps as map keys, malformed ext values (a bad timestamp), and nesting
    deeper than `limit`. Costs one decode of `data` (C) and one pass over its
    containers; allocation is bounded by the size of `data`.
    """
    if data == NIL:
        return None
    try:
        value = msgpack.unpackb(data, **value_unpacker_kw(len(data)))
    except UnicodeDecodeError:
        return "holds a string that is not valid UTF-8"
    except msgpack.StackError:
        return depth_problem(limit)
    except TypeError as exc:  # an unhashable map key: an array or a map
        return f"uses an array or a map as a map key, which clients cannot decode ({exc})"
    except Exception as exc:  # msgpack's many ValueError kinds: a malformed value
        return f"is not a msgpack value clients can decode ({type(exc).__name__})"
    if nested_deeper_than(value, limit):
        return depth_problem(limit)
    return None


class Undecodable:
    """Stands for a value a client could not decode (rule 5): too deep, not
    UTF-8, not msgpack a client reads. `reason` says why; the connection and
    every other value of the frame are kept. Never equal to a decoded value."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Undecodable({self.reason!r})"


# -- reading one msgpack message (rule 3; the admin's /publish bodies too) ------------


def bounded_unpacker(size: int, *, strict_map_key: bool = True) -> msgpack.Unpacker:
    """An unpacker for one message of `size` bytes (fed whole), every length
    limit bounded by that size (rule 3): a string, binary or container cannot
    claim more than there are bytes left to describe it, so no length prefix
    makes it allocate beyond the message. `strict_map_key=False` lets map keys
    of any scalar type through (a publisher's body; `decode_request` keeps
    the protocol's string keys)."""
    n = max(size, 1)
    return msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=strict_map_key,
        max_buffer_size=n,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=n,
    )


def container_at(payload: bytes, at: int) -> tuple[str, int] | None:
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


def read_raw(unpacker: msgpack.Unpacker, payload: bytes) -> bytes:
    """The exact msgpack bytes of the value at the unpacker's position, which
    moves past it (rule 1: `data` is skipped, never decoded). A copy: a
    memoryview payload (a picows frame) is not kept."""
    start = unpacker.tell()
    unpacker.skip()
    return bytes(payload[start : unpacker.tell()])


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


class PubItem(NamedTuple):
    """One update of a `pub` batch (rule 6). A named tuple: one is made per
    item on the publish path, where a frozen dataclass costs three times more."""

    topic: str
    key: str | None
    data: bytes  # the publisher's msgpack bytes, exactly


@dataclass(frozen=True, slots=True)
class PubBatch:
    """`{op: pub, id, items: [{topic, key, data}, ...]}`: published all or nothing."""

    id: int | None
    items: tuple[PubItem, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    id: int | None


@dataclass(frozen=True, slots=True)
class Auth:
    id: int | None
    token: str


Request = Sub | Unsub | Pub | PubBatch | Ping | Auth

KNOWN_OPS: Final = frozenset({"sub", "unsub", "pub", "ping", "auth"})


def _bad(msg: str, rid: int | None = None, topic: str | None = None) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_REQUEST, msg, request_id=rid, topic=topic)


def decode_request(
    payload: bytes, max_topics: int, max_items: int = DEFAULT_MAX_PUBLISH_ITEMS
) -> Request:
    """Decode one client message (one complete binary WebSocket message).

    Returns a typed request, or raises `RemoteProtocolError` with the protocol
    code to answer (`bad_request`, `unknown_op`, `bad_topic`, `too_many_topics`)
    and the request's `id` when it could be read. Never raises anything else.
    A `pub` batch holds at most `max_items` items (rule 6).
    """
    fields: dict[str, Any] = {}
    data: bytes | None = None
    unpacker = bounded_unpacker(len(payload))
    try:
        unpacker.feed(payload)
        try:
            n = unpacker.read_map_header()
        except msgpack.UnpackValueError:
            raise _bad("a message must be a msgpack map") from None
        for _ in range(n):
            if container_at(payload, unpacker.tell()) is not None:
                raise _bad("message field names must be strings")
            k = unpacker.unpack()
            if not isinstance(k, str):
                raise _bad("message field names must be strings")
            if k == "data":
                data = read_raw(unpacker, payload)
            elif k not in _FIELDS:
                unpacker.skip()  # not ours: never decoded (rule 3)
            elif k in ("topics", "since"):
                fields[k] = _read_shallow(unpacker, payload, k, max_topics)
            elif k == "items":
                fields[k] = _read_items(unpacker, payload, max_items, _id_of(fields))
            elif container_at(payload, unpacker.tell()) is not None:
                fields[k] = _ILL_TYPED  # refused by _validate, with the request's id
                unpacker.skip()
            else:
                try:
                    fields[k] = unpacker.unpack()
                except UnicodeDecodeError:
                    raise _bad(f"'{k}' is not valid UTF-8", _id_of(fields)) from None
        if unpacker.tell() != len(payload):
            raise _bad("trailing bytes after the message (one message per frame)")
    except RemoteProtocolError:
        raise
    except (msgpack.OutOfData, StopIteration):
        raise _bad("truncated msgpack message") from None
    except Exception as exc:  # msgpack raises ValueError/TypeError subclasses of many kinds
        raise _bad(f"undecodable msgpack: {type(exc).__name__}") from None
    return _validate(fields, data, max_topics, max_items)


_ILL_TYPED: Final = object()  # a container where a scalar field belongs (never decoded)


def _id_of(fields: Mapping[str, Any]) -> int | None:
    """The request's `id` when it was read already and is well formed."""
    rid = fields.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < _MAX_ID:
        return rid
    return None


@dataclass(frozen=True, slots=True)
class _TooMany:
    """`topics` or `since` with more entries than allowed (skipped undecoded)."""

    n: int


def _read_shallow(unpacker: msgpack.Unpacker, payload: bytes, name: str, max_topics: int) -> Any:
    """`topics` (a list of scalars) or `since` (a map of scalar -> list of two
    scalars), at most `max_topics` entries: anything else is skipped undecoded
    and left for `_validate` to refuse (the sentinel `_ILL_TYPED`), or refused here."""
    shape = container_at(payload, unpacker.tell())
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
            if container_at(payload, unpacker.tell()) is not None:
                unpacker.skip()
                items.append(_ILL_TYPED)
            else:
                items.append(unpacker.unpack())
        return items
    n = unpacker.read_map_header()
    since: dict[Any, Any] = {}
    for _ in range(n):
        if container_at(payload, unpacker.tell()) is not None:
            unpacker.skip()
            unpacker.skip()
            since[("_ill_typed", len(since))] = _ILL_TYPED
            continue
        topic = unpacker.unpack()
        mark = container_at(payload, unpacker.tell())
        if mark is None:
            value: Any = unpacker.unpack()
        elif mark != ("array", 2):
            unpacker.skip()
            value = _ILL_TYPED
        else:
            unpacker.read_array_header()
            value = []
            for _ in range(2):
                if container_at(payload, unpacker.tell()) is not None:
                    unpacker.skip()
                    value.append(_ILL_TYPED)
                else:
                    value.append(unpacker.unpack())
        since[topic] = value
    return since


# One item of a batch as read: its scalar fields, its raw `data` (None: absent),
# and whether that data was checked already (True: it passes `data_problem`).
_RawItem = tuple[dict[str, Any], bytes | None, bool]


def _read_items(unpacker: msgpack.Unpacker, payload: bytes, max_items: int, rid: int | None) -> Any:
    """`items` of a `pub` batch: at most `max_items` maps, each read like a
    single `pub` (scalar `topic` and `key`, `data` kept as raw bytes, unknown
    fields skipped undecoded). Anything else is skipped and left for
    `_validate` to refuse (`_ILL_TYPED`, `_TooMany`, or an item `_ILL_TYPED`);
    a `topic` or `key` that is not UTF-8 is refused here (`rid`: the id read so far).

    Cost: the array is decoded once in C as a client would decode it (bounded
    by its size, rule 3); when that succeeds, every string in it is UTF-8 and
    every value decodable, so an item's `data` needs only its depth checked,
    and a second pass only cuts each `data`'s bytes out. When it fails, the
    items are read one by one to name the first bad one."""
    shape = container_at(payload, unpacker.tell())
    if shape is None or shape[0] != "array":
        unpacker.skip()
        return _ILL_TYPED
    if shape[1] > max_items:
        unpacker.skip()
        return _TooMany(shape[1])
    start = unpacker.tell()
    unpacker.skip()
    region = bytes(payload[start : unpacker.tell()])
    walker = bounded_unpacker(len(region))
    walker.feed(region)
    try:
        decoded = msgpack.unpackb(region, **value_unpacker_kw(len(region)))
    except Exception:  # not UTF-8, malformed, too deep, unhashable key: name the item
        return _read_items_one_by_one(walker, region, rid)
    return _cut_data(walker, region, decoded)


def _cut_data(
    walker: msgpack.Unpacker, region: bytes, decoded: list[Any]
) -> list[_RawItem | object]:
    """The items of an array that decoded whole (`decoded`, from `region`, which
    `walker` reads): each item's decoded map as its fields (`_pub_item` reads
    only `topic` and `key`, and refuses a container there), its `data`'s exact
    bytes (rule 1). One depth check covers every `data` (the list of them, one
    level around each) unless one of them is too deep (then each is checked,
    to name it); other fields are never published.

    The exact bytes: when `region` re-encodes to itself (what nearly every
    msgpack library writes), each `data` re-encodes to its own bytes too, an
    encoding being made of its parts' (one C call per item); else they are
    cut out of `region` by a walk of each item's map."""
    items: list[_RawItem | object] = []
    datas = [v["data"] for v in decoded if type(v) is dict and "data" in v]
    shallow = not nested_deeper_than(datas, MAX_DATA_DEPTH + 1)
    exact = _pack(decoded) == region
    if not exact:
        walker.read_array_header()
    at = walker.tell
    skip = walker.skip
    for value in decoded:
        if type(value) is not dict:
            if not exact:
                skip()
            items.append(_ILL_TYPED)
            continue
        data: bytes | None = None
        if exact:
            if "data" in value:
                data = _pack(value["data"])
        else:
            for _ in range(walker.read_map_header()):
                if walker.unpack() == "data":
                    begin = at()
                    skip()
                    data = region[begin : at()]
                else:
                    skip()
        checked = data is not None and (
            shallow or not nested_deeper_than(value["data"], MAX_DATA_DEPTH)
        )
        items.append((value, data, checked))
    return items


def _read_items_one_by_one(
    unpacker: msgpack.Unpacker, payload: bytes, rid: int | None
) -> list[_RawItem | object]:
    """The items of an array that did not decode whole, read item by item so
    that the first bad one is named."""
    items: list[_RawItem | object] = []
    for _ in range(unpacker.read_array_header()):
        mark = container_at(payload, unpacker.tell())
        if mark is None or mark[0] != "map":
            unpacker.skip()
            items.append(_ILL_TYPED)
            continue
        fields: dict[str, Any] = {}
        data: bytes | None = None
        for _ in range(unpacker.read_map_header()):
            if container_at(payload, unpacker.tell()) is not None:
                unpacker.skip()
                unpacker.skip()
                fields["topic"] = _ILL_TYPED  # a container as a field name
                continue
            k = unpacker.unpack()
            if k == "data":
                data = read_raw(unpacker, payload)
            elif k not in _ITEM_FIELDS:
                unpacker.skip()
            elif container_at(payload, unpacker.tell()) is not None:
                unpacker.skip()
                fields[k] = _ILL_TYPED
            else:
                try:
                    fields[k] = unpacker.unpack()
                except UnicodeDecodeError:
                    raise _bad(f"'items[{len(items)}].{k}' is not valid UTF-8", rid) from None
        items.append((fields, data, False))
    return items


def _pub_item(
    fields: Mapping[str, Any],
    data: bytes | None,
    rid: int | None,
    where: str,
    checked: bool = False,
) -> PubItem:
    """One update of a `pub` (`where`: "" for a single one, "items[3]." in a
    batch), validated: topic name, key, `data` every client can decode (rule 5;
    `checked`: it was already)."""
    topic = fields.get("topic")
    if not isinstance(topic, str):
        raise _bad(f"'pub' needs a string '{where}topic'", rid)
    if not valid_topic(topic):
        raise RemoteProtocolError(
            ErrorCode.BAD_TOPIC,
            f"bad topic name {topic[:60]!r}" + (f" ({where[:-1]})" if where else ""),
            topic=topic[:200],
            request_id=rid,
        )
    key = fields.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise _bad(f"'{where}key' must be a non-empty string", rid, topic)
    if data is None:
        raise _bad(f"'pub' needs a '{where}data' field", rid, topic)
    if not checked:
        problem = data_problem(data)
        if problem is not None:
            raise _bad(f"'{where}data' {problem}", rid, topic)
    return PubItem(topic, key, data)


def _pub_batch(
    fields: Mapping[str, Any], data: bytes | None, rid: int | None, max_items: int
) -> PubBatch:
    """A `pub` with `items` (rule 6): 1 to `max_items` items, each a valid
    single `pub`; `topic`, `key` and `data` beside `items` are refused."""
    if data is not None or "topic" in fields or "key" in fields:
        raise _bad("'pub' holds either 'items' or one 'topic'/'key'/'data', not both", rid)
    items = fields["items"]
    if isinstance(items, _TooMany):
        raise _bad(
            f"'items' holds {items.n} items; the limit is {max_items} (limits.max_publish_items)",
            rid,
        )
    if not isinstance(items, list) or not items:
        raise _bad("'items' must be a non-empty array of {topic, key, data} maps", rid)
    out: list[PubItem] = []
    # Topics `_pub_item` accepted in this batch: an item naming one of them,
    # with a non-empty string key and data checked already, passes every rule
    # of `_pub_item` without running them again (the names repeat in a batch).
    valid: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, tuple):
            raise _bad(f"'items[{i}]' must be a map of topic, key, data", rid)
        fields, data, checked = item
        topic = fields.get("topic")
        key = fields.get("key")
        if (
            checked
            and type(topic) is str
            and topic in valid
            and type(key) is str
            and key
            and data is not None
        ):
            out.append(PubItem(topic, key, data))
            continue
        one = _pub_item(fields, data, rid, f"items[{i}].", checked)
        valid.add(one.topic)
        out.append(one)
    return PubBatch(rid, tuple(out))


def _validate(
    fields: dict[str, Any], data: bytes | None, max_topics: int, max_items: int
) -> Request:
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
        if "items" in fields:
            return _pub_batch(fields, data, rid, max_items)
        item = _pub_item(fields, data, rid, "")
        return Pub(rid, item.topic, item.key, item.data)
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


def conn_id(worker_pid: int, n: int) -> str:
    """A connection's id in `hello.conn`: `<worker>.<n>` (docs/protocol.md section 4)."""
    return f"{worker_pid:x}.{n:x}"


def conn_worker(hello_msg: Mapping[str, Any]) -> str:
    """The worker part of a `hello`'s `conn`: the same for connections one worker serves."""
    return str(hello_msg.get("conn", "")).partition(".")[0]


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
    messages = []
    while True:
        # tell() after a failed read counts the partial bytes it consumed: take it before
        start = unpacker.tell()
        try:
            messages.append(unpacker.unpack())
        except msgpack.OutOfData:
            if start != len(frame):
                raise ValueError(
                    f"frame ends inside a message ({len(frame) - start} bytes left)"
                ) from None
            return messages


# -- a client decoding server frames (rule 5) ----------------------------------------


def decode_server_frame(frame: bytes, limit: int = MAX_DATA_DEPTH) -> list[Any]:
    """Decode every message of a server frame, for a client (rule 5).

    A value in `items` (a state key's value, a stream event's data) that this
    client cannot decode (a string that is not UTF-8, nesting deeper than
    `limit`, malformed msgpack of a known length) becomes an `Undecodable`;
    every other message and value of the frame is decoded as usual. Raises
    `ValueError` only when the frame itself is broken (truncated, an unknown
    type byte, a message that is not a map): the server broke the protocol.
    The common case costs `decode_frame` plus one pass over each value's
    containers; the slow path runs only for a frame that failed to decode.
    """
    try:
        messages = decode_frame(frame)
    except Exception:
        try:
            return _decode_tolerant(bytes(frame), limit)
        except ValueError:
            raise
        except Exception as exc:  # an envelope value msgpack refuses (TypeError, ...)
            raise ValueError(f"undecodable server frame: {type(exc).__name__}") from None
    for msg in messages:
        if not isinstance(msg, dict):
            raise ValueError("a server message must be a msgpack map")
        _mark_deep(msg, limit)
    return messages


def _mark_deep(msg: dict[Any, Any], limit: int) -> None:
    if msg.get("op") not in ("snap", "upd", "evt"):
        return
    items = msg.get("items")
    # one pass over the whole message first (items one level down, events two):
    # the common message has no value too deep, and is judged in a few C loops
    if isinstance(items, dict):
        if not nested_deeper_than(items, limit + 1):
            return
        for key, value in items.items():
            if nested_deeper_than(value, limit):
                items[key] = Undecodable(depth_problem(limit))
    elif isinstance(items, list):
        if not nested_deeper_than(items, limit + 2):
            return
        for event in items:
            if isinstance(event, list) and len(event) == 2 and nested_deeper_than(event[1], limit):
                event[1] = Undecodable(depth_problem(limit))


# Bytes after the type byte of the msgpack types of a fixed size.
_FIXED_SIZE: Final = {
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
# type byte -> (bytes of its length field, extra bytes after it: an ext's type)
_SIZED: Final = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),
}  # fmt: skip
# type byte -> (bytes of its count field, elements per count: 2 for a map)
_COUNTED: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _uint(buf: bytes, at: int, size: int) -> int:
    if at + size > len(buf):
        raise ValueError("frame ends inside a message")
    return int.from_bytes(buf[at : at + size], "big")


def _head(buf: bytes, at: int) -> tuple[str, int, int]:
    """("map" | "array", element count, offset of the first element), or
    ("scalar", 0, at) when the value at `at` is not a container."""
    if at >= len(buf):
        raise ValueError("frame ends inside a message")
    b = buf[at]
    if 0x80 <= b <= 0x8F:
        return "map", b & 0x0F, at + 1
    if 0x90 <= b <= 0x9F:
        return "array", b & 0x0F, at + 1
    counted = _COUNTED.get(b)
    if counted is not None:
        size, _ = counted
        return ("array" if b in (0xDC, 0xDD) else "map"), _uint(buf, at + 1, size), at + 1 + size
    return "scalar", 0, at


def _skip(buf: bytes, at: int) -> int:
    """The offset just after the msgpack value at `at`, without decoding it.
    Iterative (any depth) and O(bytes skipped): each step consumes a byte."""
    n = len(buf)
    pending = 1
    while pending:
        if at >= n:
            raise ValueError("frame ends inside a message")
        b = buf[at]
        pending -= 1
        if b <= 0x7F or b >= 0xE0:
            at += 1
        elif b <= 0x8F:
            pending += 2 * (b & 0x0F)
            at += 1
        elif b <= 0x9F:
            pending += b & 0x0F
            at += 1
        elif b <= 0xBF:
            at += 1 + (b & 0x1F)
        elif b in _FIXED_SIZE:
            at += 1 + _FIXED_SIZE[b]
        elif b in _SIZED:
            size, extra = _SIZED[b]
            at += 1 + size + extra + _uint(buf, at + 1, size)
        elif b in _COUNTED:
            size, per = _COUNTED[b]
            pending += per * _uint(buf, at + 1, size)
            at += 1 + size
        else:
            raise ValueError(f"unknown msgpack type byte 0x{b:02x}")
    if at > n:
        raise ValueError("frame ends inside a message")
    return at


def _one(buf: bytes, at: int) -> tuple[Any, int]:
    """The value at `at` (it must decode: it is part of the envelope) and the offset after it."""
    end = _skip(buf, at)
    return msgpack.unpackb(buf[at:end], **value_unpacker_kw(end - at)), end


def _guarded(buf: bytes, at: int, limit: int) -> tuple[Any, int]:
    """The value at `at`, or an `Undecodable` saying why it cannot be decoded."""
    end = _skip(buf, at)
    try:
        value = msgpack.unpackb(buf[at:end], **value_unpacker_kw(end - at))
    except UnicodeDecodeError:
        return Undecodable("a string that is not valid UTF-8"), end
    except msgpack.StackError:
        return Undecodable(depth_problem(limit)), end
    except Exception as exc:
        return Undecodable(f"not a msgpack value this client decodes ({type(exc).__name__})"), end
    if nested_deeper_than(value, limit):
        return Undecodable(depth_problem(limit)), end
    return value, end


def _decode_tolerant(buf: bytes, limit: int) -> list[Any]:
    out: list[Any] = []
    at = 0
    while at < len(buf):
        kind, n, at = _head(buf, at)
        if kind != "map":
            raise ValueError("a server message must be a msgpack map")
        msg: dict[Any, Any] = {}
        for _ in range(n):
            name, at = _one(buf, at)
            if name != "items":
                msg[name], at = _one(buf, at)
                continue
            kind, count, first = _head(buf, at)
            if kind == "map":  # a state topic's {key: data}
                items: dict[Any, Any] = {}
                at = first
                for _ in range(count):
                    key, at = _one(buf, at)
                    items[key], at = _guarded(buf, at, limit)
                msg[name] = items
            elif kind == "array":  # a stream topic's [[pos, data], ...]
                events: list[Any] = []
                at = first
                for _ in range(count):
                    shape, two, inner = _head(buf, at)
                    if shape == "array" and two == 2:
                        pos, inner = _one(buf, inner)
                        data, at = _guarded(buf, inner, limit)
                        events.append([pos, data])
                    else:
                        event, at = _guarded(buf, at, limit)
                        events.append(event)
                msg[name] = events
            else:
                msg[name], at = _one(buf, at)
        out.append(msg)
    return out


def iter_items(pairs: Iterable[tuple[str, bytes]]) -> list[bytes]:
    return [pack_item(k, v) for k, v in pairs]
