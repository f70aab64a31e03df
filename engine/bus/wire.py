"""The hub's wire: length-prefixed msgpack frames on the hub's Unix socket. PURE: no I/O.

Rules this module owns:

1. A frame is a 4-byte big-endian length, then that many bytes of one msgpack
   value (an array whose first element is a one-word tag). A frame longer than
   the reader's `max_frame_bytes` is a `WireError`: the reader never buffers
   more than one frame plus one chunk of input.
2. A position crosses the wire as two unsigned integers, `hi, lo` =
   `pos >> 32, pos & 0xFFFFFFFF`, in place of the one `pos` field, because
   positions (`make_pos`: milliseconds << 32 | seq) need about 73 bits and
   msgpack integers stop at 64. The split is exact for any position below 2**96.
3. `data` values travel as msgpack bin (the publisher's bytes, never decoded);
   topics, keys and the epoch as str. Decoding yields tuples, not lists, so a
   received entry row becomes an `Entry` with no copy of its fields.

Messages, hub -> client::

    ["hello", epoch]                          first, right after the client's "h"
    ["f", [[topic, hi, lo], ...]]             stream topics' floors (in the dump, before entries)
    ["e", [[topic, key, hi, lo, data], ...]]  entries (the state dump, then live ones)
    ["d"]                                     the dump is complete (live entries follow)
    ["r", req_id, [hi, lo, hi, lo, ...]]      publish accepted: one position per update
    ["x", req_id, code, message]              request refused; nothing was published
    ["s", req_id, epoch, hi, lo, [[key, hi, lo, data], ...]]   snapshot reply
    ["y", req_id, epoch, complete, [[hi, lo, key, data], ...]] history reply
    ["b", wall_ms]                            heartbeat, every HEARTBEAT_INTERVAL_S, to
                                              clients that want entries: their bus lag

client -> hub::

    ["h", want_entries]                       first message: does it want the entry stream
    ["p", req_id, [[topic, key, data], ...]]  publish, atomically
    ["s", req_id, topic]                      snapshot of one topic
    ["y", req_id, topic, hi, lo, limit]       a stream topic's history after a position
                                              (limit -1: no limit)

`["d"]` is sent to every client (with an empty dump when it wants no entries),
so "hello ... d" is the whole handshake.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from engine.bus.base import Entry, History, Snapshot, Update
from engine.codes import ErrorCode
from engine.errors import ProtocolError

MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
# Entry frames are cut near this size so a big dump arrives as many frames the
# reader can decode one at a time, between which its loop serves other work.
ENTRY_FRAME_TARGET_BYTES: Final = 1024 * 1024

_HEADER: Final = struct.Struct(">I")
_HEADER_BYTES: Final = 4
_LO_MASK: Final = 0xFFFFFFFF
# The hub's heartbeat period: a client that reads one older than this by more
# than its link's delay is behind (LocalBus.lag_ms, engine/bus/local.py rule 6).
HEARTBEAT_INTERVAL_S: Final = 0.5

_packer = msgpack.Packer(use_bin_type=True)


class WireError(ProtocolError):
    """A peer on the hub socket broke the framing or sent a malformed message.

    `code` is an `ErrorCode` string; `request_id` is set when the bad message's
    request id could be read (the hub then answers `["x", ...]` instead of
    closing the connection).
    """

    def __init__(
        self, message: str, *, code: str = ErrorCode.BAD_REQUEST, request_id: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# -- framing ----------------------------------------------------------------------


def encode_frame(obj: Any) -> bytes:
    """One frame: the length header and `obj` as msgpack (bytes as bin)."""
    body: bytes = _packer.pack(obj)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Incremental frame decoder: `feed` bytes as they arrive, get whole messages.

    Limits: a frame over `max_frame_bytes` raises `WireError` as soon as its
    header is read (the stream is then unusable: close it); so is a frame that
    is not exactly one msgpack value. Buffering is bounded by one frame plus
    the last chunk fed.
    """

    __slots__ = ("_buf", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held that do not make a whole frame yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Any]:
        """Add `data`; return every message completed by it, in order."""
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data  # common case: parse straight from the chunk, no copy
        end = len(src)
        off = 0
        out: list[Any] = []
        with memoryview(src) as view:
            while end - off >= _HEADER_BYTES:
                (n,) = _HEADER.unpack_from(src, off)
                if n > self.max_frame_bytes:
                    raise WireError(
                        f"frame of {n} bytes is over the limit of {self.max_frame_bytes}"
                    )
                start = off + _HEADER_BYTES
                if end - start < n:
                    break
                out.append(_unpack(view[start : start + n]))
                off = start + n
        if src is self._buf:
            del self._buf[:off]
        elif off < end:
            self._buf = bytearray(data[off:])
        return out


def _unpack(body: memoryview) -> Any:
    try:
        # Lengths inside are bounded by the body's own size (msgpack's default
        # limits for unpackb), so a frame cannot claim more than it carries.
        return msgpack.unpackb(body, raw=False, use_list=False)
    except Exception as exc:  # msgpack raises ValueError/TypeError subclasses of many kinds
        raise WireError(f"undecodable frame: {type(exc).__name__}: {exc}") from None


# -- hub -> client ------------------------------------------------------------------


def hello(epoch: str) -> bytes:
    return encode_frame(("hello", epoch))


def dump_done() -> bytes:
    return encode_frame(("d",))


def heartbeat(wall_ms: int) -> bytes:
    return encode_frame(("b", wall_ms))


def entry_frames(
    entries: Sequence[Entry], target_bytes: int = ENTRY_FRAME_TARGET_BYTES
) -> list[bytes]:
    """`["e", ...]` frames carrying `entries` in order, each near `target_bytes` at most.

    The batch is encoded once; only a batch over the target is cut (by count,
    from its average entry size), so the usual small batch costs one pack. A
    single entry bigger than the target gets a frame of its own.
    """
    if not entries:
        return []
    frame = _entries_frame(entries)
    if len(frame) <= target_bytes or len(entries) == 1:
        return [frame]
    parts = -(-len(frame) // target_bytes)
    step = max(1, -(-len(entries) // parts))
    out: list[bytes] = []
    for i in range(0, len(entries), step):
        chunk = entries[i : i + step]
        piece = _entries_frame(chunk)
        if len(piece) > target_bytes and len(chunk) > 1:
            out.extend(entry_frames(chunk, target_bytes))  # uneven sizes: cut again
        else:
            out.append(piece)
    return out


def _entries_frame(entries: Sequence[Entry]) -> bytes:
    return encode_frame(("e", [(t, k, p >> 32, p & _LO_MASK, d) for t, k, p, d in entries]))


FLOORS_PER_FRAME: Final = 10_000  # topic names are at most 200 bytes: frames stay ~2 MB


def floor_frames(floors: Sequence[tuple[str, int]]) -> list[bytes]:
    """`["f", ...]` frames carrying the stream topics' floors (topic, floor)."""
    return [
        encode_frame(
            ("f", [(t, p >> 32, p & _LO_MASK) for t, p in floors[i : i + FLOORS_PER_FRAME]])
        )
        for i in range(0, len(floors), FLOORS_PER_FRAME)
    ]


def published(req_id: int, positions: Sequence[int]) -> bytes:
    flat: list[int] = []
    for p in positions:
        flat.append(p >> 32)
        flat.append(p & _LO_MASK)
    return encode_frame(("r", req_id, flat))


def failed(req_id: int, code: str, message: str) -> bytes:
    return encode_frame(("x", req_id, code, message))


def snapshot_reply(req_id: int, snap: Snapshot) -> bytes:
    items = [(k, p >> 32, p & _LO_MASK, d) for k, p, d in snap.items]
    return encode_frame(("s", req_id, snap.epoch, snap.pos >> 32, snap.pos & _LO_MASK, items))


def history_reply(req_id: int, history: History) -> bytes:
    rows = [(p >> 32, p & _LO_MASK, k, d) for p, k, d in history.events]
    return encode_frame(("y", req_id, history.epoch, history.complete, rows))


# -- client -> hub ------------------------------------------------------------------


def handshake(want_entries: bool) -> bytes:
    return encode_frame(("h", want_entries))


def publish_request(req_id: int, updates: Sequence[Update]) -> bytes:
    # an `Update` is a (topic, key, data) tuple: packed as the row it is, no copy
    rows = updates if type(updates) is list or type(updates) is tuple else list(updates)
    return encode_frame(("p", req_id, rows))


def snapshot_request(req_id: int, topic: str) -> bytes:
    return encode_frame(("s", req_id, topic))


def history_request(req_id: int, topic: str, since: int, limit: int | None) -> bytes:
    limit_ = -1 if limit is None else limit
    return encode_frame(("y", req_id, topic, since >> 32, since & _LO_MASK, limit_))


# -- decoding (both sides) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    want_entries: bool


@dataclass(frozen=True, slots=True)
class PublishRequest:
    req_id: int
    updates: Sequence[tuple[str, str, bytes]]


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    req_id: int
    topic: str


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    req_id: int
    topic: str
    since: int
    limit: int | None


Request = Handshake | PublishRequest | SnapshotRequest | HistoryRequest


def parse_request(msg: Any) -> Request:
    """Check a client's message (as decoded by `FrameReader`) and type it.

    Raises `WireError`, with `request_id` set when the message had a readable
    one (the hub answers it) and unset otherwise (the hub closes the link).
    """
    if not isinstance(msg, tuple) or not msg or not isinstance(msg[0], str):
        raise WireError("a message must be an array starting with a tag")
    tag = msg[0]
    if tag == "h":
        if len(msg) != 2 or not isinstance(msg[1], bool):
            raise WireError("'h' is [\"h\", want_entries: bool]")
        return Handshake(msg[1])
    if tag == "y":
        return _history_request(msg)
    if tag not in ("p", "s"):
        raise WireError(f"unknown message tag {tag[:20]!r}")
    if len(msg) != 3 or type(msg[1]) is not int or msg[1] < 0:
        raise WireError(f"{tag!r} needs a request id and one argument")
    req_id: int = msg[1]
    if tag == "s":
        if not isinstance(msg[2], str):
            raise WireError("'s' needs a topic string", request_id=req_id)
        return SnapshotRequest(req_id, msg[2])
    rows = msg[2]
    if not isinstance(rows, tuple):
        raise WireError("'p' needs a list of [topic, key, data]", request_id=req_id)
    for row in rows:
        if (
            not isinstance(row, tuple)
            or len(row) != 3
            or not isinstance(row[0], str)
            or not isinstance(row[1], str)
            or not isinstance(row[2], bytes)
        ):
            raise WireError("each update is [topic: str, key: str, data: bin]", request_id=req_id)
    return PublishRequest(req_id, rows)


def _history_request(msg: tuple[Any, ...]) -> HistoryRequest:
    if len(msg) < 2 or type(msg[1]) is not int or msg[1] < 0:
        raise WireError("'y' needs a request id")
    req_id: int = msg[1]
    if (
        len(msg) != 6
        or not isinstance(msg[2], str)
        or any(type(x) is not int for x in msg[3:6])
        or not 0 <= msg[3] < 2**64
        or not 0 <= msg[4] <= _LO_MASK
        or msg[5] < -1
    ):
        raise WireError(
            "'y' is [\"y\", req_id, topic, since_hi, since_lo, limit >= -1]", request_id=req_id
        )
    limit = None if msg[5] == -1 else msg[5]
    return HistoryRequest(req_id, msg[2], (msg[3] << 32) | msg[4], limit)


def entries_of(rows: Sequence[tuple[str, str, int, int, bytes]]) -> list[Entry]:
    """The entries of an `["e", rows]` message."""
    return [(t, k, (hi << 32) | lo, d) for t, k, hi, lo, d in rows]


def positions_of(flat: Sequence[int]) -> list[int]:
    """The positions of an `["r", id, flat]` message."""
    return [(flat[i] << 32) | flat[i + 1] for i in range(0, len(flat), 2)]


def floors_of(rows: Sequence[tuple[str, int, int]]) -> list[tuple[str, int]]:
    """The (topic, floor) pairs of an `["f", rows]` message."""
    return [(t, (hi << 32) | lo) for t, hi, lo in rows]


def history_of(msg: Sequence[Any]) -> History:
    """The `History` of a `["y", id, epoch, complete, rows]` message."""
    events = [((hi << 32) | lo, k, d) for hi, lo, k, d in msg[4]]
    return History(epoch=msg[2], events=events, complete=msg[3])


def snapshot_of(msg: Sequence[Any]) -> Snapshot:
    """The `Snapshot` of an `["s", id, epoch, hi, lo, items]` message."""
    items = [(k, (hi << 32) | lo, d) for k, hi, lo, d in msg[5]]
    return Snapshot(epoch=msg[2], pos=(msg[3] << 32) | msg[4], items=items)
