"""Where the redis bus keeps what, and how its replies read. PURE: no I/O.

Layout in Redis, version 2 (`P` is `bus.redis.prefix`, `N` a shard,
`engine.bus.base.shard_of`):

    P:{sN}:log            the shard's stream: one entry per publish.lua call (rule 5),
                          fields n (its update count) and b (the updates, packed)
    P:{sN}:state:<topic>  a state topic's latest state: field key -> "<position> <data>" (rule 6)
    P:{sN}:topics         the set of the shard's state topics (what a reader loads)
    P:{sN}:hist:<topic>   a stream topic's retained history: its newest `history`
                          events, with the log's IDs; fields k (key), d (data)
    P:{sN}:streams        hash: the shard's stream topics -> their floor (the ID of
                          the newest event no longer retained; "0-0": none)
    P:{sN}:meta           hash: added (data bytes since the last byte check),
                          trimmed (the newest entry ID a byte trim removed)
    P:{sN}:expiry         zset: topics with an idle expiry -> their deadline (ms)
    P:epoch               the epoch (random hex), created by the first client
    P:layout              the layout version (rule 7), set by the first client

Rules:

1. Every key of a shard shares the hash tag `{sN}`, so a shard lives on one
   Redis Cluster node and a script touching one shard touches one slot.
2. Positions are the stream IDs (`pos_of`: "MS-SEQ" -> `make_pos(ms, seq)`).
3. A topic or key read from Redis never fails to decode (`text_of`): bytes
   that are not UTF-8 (written by something else than this client, which
   checks) become U+FFFD, so one bad value cannot stop a reader, which would
   load it again forever.
4. The topic -> shard answers are cached, at most `SHARD_CACHE_MAX` of them
   (cleared when full: topic names come from clients).
5. An entry of a shard's stream carries the updates of one publish.lua call
   (`entries_of`): `n` updates whose positions are the `n` consecutive
   sequence numbers ending at the entry's ID (same ms), so the stream IDs are
   still the read positions and an entry's updates lie in (previous entry's
   ID, its ID]. `b` is msgpack arrays one after another, one per run of
   updates of one topic: [topic, [key, data, key, data, ...]] (a request's
   updates of one shard, grouped by topic, in order within a topic). An entry of
   layout 1 (fields t, k, d: one update, written by fanout before 2026-12)
   is read as one update at its ID. An entry that is neither (written by
   something else, or cut) is `BadEntry`: the reader skips it and counts it
   (one bad value cannot stop a reader, as in rule 3). A run of a topic the
   sink does not hold (`TopicFilter.wants` says no) is skipped before its
   updates become entries: a worker pays little for topics nobody
   subscribes to on it.
6. A state hash's value is "<position> <data>"; the position is written
   "<id>+<j>" (the request's first position plus j: publish.lua formats one
   number per request) or, by fanout before layout 2, "<id>".
7. `P:layout` holds the version of the layout written in this Redis: a
   client sets it to `VERSION` when it is absent (a fresh Redis, or one
   written by fanout before layout 2, which never set it) and refuses to
   sync while it holds a later version (`newer_layout`): a node must not
   read or write a layout it does not know. A later layout raises it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, Final

import msgpack

from engine.bus.base import Entry, shard_of
from engine.protocol.codec import make_pos

SHARD_CACHE_MAX: Final = 65_536  # topic -> shard answers kept (cleared when full)
VERSION: Final = 2  # of what this module describes (rule 5: entries carry batches)


Wants = Callable[[str, int], bool]  # `TopicFilter.wants`: keep a run of this topic?


class BadEntry(ValueError):
    """A stream entry this layout cannot read (rule 5)."""


def pos_of(stream_id: bytes | str) -> int:
    """A stream ID ("MS-SEQ") as a position."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return make_pos(int(ms), int(seq))


def text_of(raw: bytes) -> str:
    """A topic or key read from Redis (rule 3). Never raises."""
    return raw.decode("utf-8", "replace")


def newer_layout(stored: bytes | None) -> str | None:
    """Why a client of `VERSION` must not use a Redis whose `P:layout` is
    `stored` (rule 7); None when it may."""
    try:
        version = int(stored or VERSION)
    except ValueError:
        return f"its layout version is {stored!r}, not a number"
    if version > VERSION:
        return f"it holds layout {version}, newer than this node's {VERSION}: upgrade this node"
    return None


def entries_of(
    stream_id: bytes, fields: dict[bytes, bytes], wants: Wants | None = None
) -> list[Entry]:
    """A shard stream's entry as its updates, oldest first (rule 5), but for
    the runs of topics `wants(topic, updates)` refuses (skipped undecoded into
    entries). Raises `BadEntry` for an entry of neither layout; never anything else."""
    blob = fields.get(b"b")
    try:
        last = pos_of(stream_id)
        if blob is None:  # layout 1: one update
            topic = text_of(fields[b"t"])
            if wants is not None and not wants(topic, 1):
                return []
            return [(topic, text_of(fields[b"k"]), last, fields[b"d"])]
        n = int(fields[b"n"])
        pos = last - n + 1
        out: list[Entry] = []
        # bounded by the entry itself (in memory already): msgpack's default
        # 100 MiB would refuse a call of large values (up to bus.max_data_bytes each)
        unpacker = msgpack.Unpacker(
            raw=False, unicode_errors="replace", max_buffer_size=max(1, len(blob))
        )
        unpacker.feed(blob)
        for topic, kd in unpacker:  # a run: one topic's updates
            keys, data = kd[0::2], kd[1::2]
            m = len(data)
            if wants is not None and type(topic) is str and not wants(topic, m):
                pos += m
                continue
            # types checked in C (map, set): a Python check per update costs more
            if (
                type(topic) is not str
                or len(keys) != m
                or set(map(type, keys)) - {str}
                or set(map(type, data)) - {bytes}
            ):
                raise BadEntry(f"entry {stream_id!r}: not a topic and (key, data) pairs")
            out.extend(zip(repeat(topic, m), keys, range(pos, pos + m), data, strict=True))
            pos += m
    except (KeyError, ValueError, TypeError, msgpack.UnpackException) as exc:
        if isinstance(exc, BadEntry):
            raise
        raise BadEntry(f"entry {stream_id!r}: {type(exc).__name__}: {exc}") from None
    if pos != last + 1:
        raise BadEntry(f"entry {stream_id!r}: {pos - last - 1 + n} updates, not {n}")
    return out


def parse_events(rows: Sequence[Any]) -> list[tuple[int, str, bytes]]:
    """History stream rows `[id, [field, value, ...]]` as (pos, key, data)."""
    out = []
    for sid, fields in rows:
        values = dict(zip(fields[0::2], fields[1::2], strict=True))
        out.append((pos_of(sid), text_of(values[b"k"]), values[b"d"]))
    return out


def value_pos(sid: bytes) -> int:
    """The position of a state hash value's "<id>" or "<id>+<j>" (rule 6)."""
    base, plus, j = sid.partition(b"+")
    return pos_of(base) + int(j) if plus else pos_of(base)


def parse_state(raw: dict[bytes, bytes]) -> list[tuple[str, int, bytes]]:
    """A topic state hash as (key, pos, data), oldest first (rule 6)."""
    items = []
    for field, value in raw.items():
        sid, _, data = value.partition(b" ")
        items.append((text_of(field), value_pos(sid), data))
    items.sort(key=lambda item: item[1])
    return items


class Layout:
    """The key names of one bus (`prefix`, `shards`), per shard (rule 1)."""

    __slots__ = (
        "_shard_cache",
        "epoch_key",
        "expiries",
        "floors",
        "idle_key",
        "layout_key",
        "logs",
        "metas",
        "prefix",
        "shard_keys",
        "shard_of_log",
        "shards",
        "topic_sets",
    )

    def __init__(self, prefix: str, shards: int) -> None:
        self.prefix = prefix
        self.shards = shards
        self.epoch_key = f"{prefix}:epoch"
        self.layout_key = f"{prefix}:layout"  # rule 7
        self.idle_key = f"{prefix}:idle"  # a stream nobody writes (a publish-only link watch)
        self.logs = [f"{prefix}:{{s{s}}}:log" for s in range(shards)]
        self.shard_of_log = {name.encode(): s for s, name in enumerate(self.logs)}
        self.topic_sets = [f"{prefix}:{{s{s}}}:topics" for s in range(shards)]
        self.floors = [f"{prefix}:{{s{s}}}:streams" for s in range(shards)]
        self.metas = [f"{prefix}:{{s{s}}}:meta" for s in range(shards)]
        self.expiries = [f"{prefix}:{{s{s}}}:expiry" for s in range(shards)]
        # KEYS[1..5] of publish.lua, per shard
        self.shard_keys = [
            [self.logs[s], self.topic_sets[s], self.floors[s], self.metas[s], self.expiries[s]]
            for s in range(shards)
        ]
        self._shard_cache: dict[str, int] = {}

    def shard(self, topic: str) -> int:
        """`shard_of(topic)`, cached (rule 4)."""
        s = self._shard_cache.get(topic)
        if s is None:
            if len(self._shard_cache) >= SHARD_CACHE_MAX:  # names come from clients
                self._shard_cache.clear()
            s = self._shard_cache[topic] = shard_of(topic, self.shards)
        return s

    def shard_prefix(self, shard: int) -> str:
        """The start of every key name of `shard`."""
        return f"{self.prefix}:{{s{shard}}}:"

    def state_key(self, topic: str, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:state:{topic}"

    def hist_key(self, topic: str, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:hist:{topic}"
