"""Reading the redis bus: the sync of every (re)connect, then the shards' streams.

Rules:

1. Reading: every shard is read with `XREAD BLOCK` from the last ID read (one
   call for all shards; one per shard on Redis Cluster, where a command cannot
   span slots), on a client of its own with no socket timeout; a read that has
   not returned `BLOCK + READ_GRACE_S` after it was sent counts as a broken link.
2. Every (re)connect is a sync: the layout version checked (layout.py rule
   7: a newer one is refused, the link stays down), `on_bus_epoch(epoch)`, then (for shards read
   for the first time, or whose stream was trimmed past the last ID read) the
   shard's head ID H is resolved, the state hashes are loaded and every key at
   a position <= H is delivered, oldest first, then `on_bus_connected(True)`,
   then live entries after H. Keys rewritten after H come from the stream, so
   the loaded state and the stream never disagree and no topic receives an
   entry below a position it already holds. A stream topic's load is its floor
   and its retained events <= H (`history.lua`, one atomic read), the floors
   delivered first (`on_bus_floors`); a floor above H is lowered to H (the
   events after H come from the shard's stream). Otherwise reading resumes from the
   last ID: no entry that Redis still holds is skipped.
3. A reader that falls behind past the trimming (`MAXLEN ~`) finds out before
   delivering anything after the gap: XREAD's COUNT is at most MAXLEN, so
   only a full reply can follow a gap, and after a full reply the shard's
   first ID is compared with the last ID read; a gap means a sync (the
   shard's state is loaded again).
4. The epoch changes when Redis lost its data: the epoch key is gone (created
   anew by `epoch.lua`), or a stream no longer holds the last entry this
   client read although it was not trimmed (Redis came back from an older copy
   of its data, maybe with new entries since: the client replaces the epoch,
   once for everyone). A new epoch resets the read positions and loads
   every shard.
5. Byte trims (engine/bus/redis/publisher.py rule 4): a reader reads the
   shard's `trimmed` in the same round trip as each XREAD (pipelined, so no
   command runs in between when data is waiting): `trimmed` above its last
   ID, with the reply not reaching back to it, means entries it had not read
   were removed: a sync (rule 2). (On a cluster the two are separate round
   trips.)
6. A publish-only client (no sink, or `want_entries=False`) reads nothing:
   it watches its link with a blocking read of a stream nobody writes
   (`watch`), so a lost Redis shows at once, not at the next publish.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from typing import Any, Final

from engine.bus.base import BusSink, Entry, TopicFilter
from engine.bus.redis.layout import (
    VERSION,
    BadEntry,
    entries_of,
    newer_layout,
    parse_events,
    parse_state,
    pos_of,
    text_of,
)
from engine.bus.redis.link import Link, Resync, log
from engine.errors import BusError
from engine.protocol.codec import format_pos

BLOCK_MS: Final = 1000  # XREAD BLOCK: also how often an idle reader proves it is alive
READ_GRACE_S: Final = 5.0  # a read not back BLOCK + this after it was sent: broken link
# entries per XREAD reply (per stream); an entry holds one publish.lua call's
# updates (up to MERGE_UPDATES, more for one larger request): a reply is bounded
READ_COUNT: Final = 100
EPOCH_BYTES: Final = 8
LOAD_CHUNK: Final = 256  # topics loaded per round trip during a sync


class Reader:
    """The read side of one bus client: its sync and its shards' read positions."""

    def __init__(
        self, link: Link, *, want_entries: bool, block_ms: int, stream_maxlen: int
    ) -> None:
        shards = link.layout.shards
        self.link = link
        self.want_entries = want_entries
        self.block_ms = block_ms
        self.stream_maxlen = stream_maxlen
        self.sink: BusSink | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # per shard: last ID read (None: load the shard at the next sync)
        self.last: list[int | None] = [None] * shards
        # per shard: heads seen by the probe and not read yet, (pos, loop time seen)
        self.unread: list[collections.deque[tuple[int, float]]] = [
            collections.deque() for _ in range(shards)
        ]
        # reader group -> loop time its pending XREAD was sent (absent: not waiting on Redis)
        self.read_sent: dict[int, float] = {}
        self.last_entry_at: float | None = None
        self.bad_entries = 0  # stream entries skipped: neither layout (layout.py rule 5)

    def start(self, sink: BusSink | None, loop: asyncio.AbstractEventLoop) -> None:
        self.sink = sink
        self.loop = loop

    def reads_entries(self) -> bool:
        return self.want_entries and self.sink is not None

    def forget_positions(self) -> None:
        """Load every shard at the next sync (a sink failed: it lost entries)."""
        self.last = [None] * self.link.layout.shards

    def last_entry_age_ms(self) -> float | None:
        """Milliseconds since this client last received an entry (None: never)."""
        if self.loop is None or self.last_entry_at is None:
            return None
        return (self.loop.time() - self.last_entry_at) * 1000.0

    # -- the sync (rules 2 and 4) -------------------------------------------------------

    async def sync(self) -> None:
        """Rules 2 and 4: scripts, epoch, heads, state loads; then connected."""
        link = self.link
        cmd = link.cmd
        if link.cluster:
            # Discover the slots once, before readers share the client: concurrent
            # first commands on a fresh RedisCluster fail ("Connection closed").
            await cmd.initialize()
            await link.reader.initialize()
        await link.scripts.load(cmd)
        await self._check_layout()
        epoch = await self._epoch_call("")
        reads = self.reads_entries()
        heads: list[int | None] = []
        firsts: list[int | None] = []
        if reads:
            heads, firsts = await link.heads_and_firsts()
            if epoch == link.epoch:
                lost = await self._lost_shards(heads, firsts)
                if lost:
                    log.warning(
                        "bus: Redis lost entries of %d shard(s) it had delivered: new epoch",
                        len(lost),
                    )
                    epoch = await self._epoch_call(epoch)
        if epoch != link.epoch:
            if link.epoch is not None:
                log.warning("bus: epoch changed (%s -> %s)", link.epoch, epoch)
            self.forget_positions()
        link.epoch = epoch
        sink = self.sink
        if sink is not None:
            sink.on_bus_epoch(epoch)
        if reads:
            assert sink is not None
            await self._load_shards(sink, heads, firsts)
        self.read_sent.clear()
        was = link.connected  # a resync while connected is not a new link
        link.connected = True
        link.syncs += 1
        if not was:
            log.info("bus: connected to Redis at %s (epoch %s)", link.shown_url, epoch)
            if sink is not None:
                sink.on_bus_connected(True)

    async def _load_shards(
        self, sink: BusSink, heads: list[int | None], firsts: list[int | None]
    ) -> None:
        """Deliver the state of the shards read for the first time or trimmed
        past the last ID read, up to their heads (rule 2)."""
        loop = asyncio.get_running_loop()
        last = self.last
        load = [
            s
            for s in range(self.link.layout.shards)
            if last[s] is None or (firsts[s] or 0) > (last[s] or 0)
        ]
        for s in load:
            head = heads[s] or 0
            floors, entries = await self._load_shard(s, head)
            if floors:
                sink.on_bus_floors(floors)
            if entries:
                sink.on_bus_entries(entries)
                self.last_entry_at = loop.time()
            self.last[s] = head
            self.unread[s].clear()
        if load:
            log.info("bus: loaded the state of %d shard(s) from Redis", len(load))

    async def _lost_shards(self, heads: list[int | None], firsts: list[int | None]) -> list[int]:
        """Shards where Redis no longer holds the last entry this client read
        although it was not trimmed: Redis came back from an older copy of its
        data (even if new entries were added since)."""
        lost = []
        check = []
        for s, last in enumerate(self.last):
            if last is None or last == 0:
                continue
            head = heads[s]
            if head is None or head < last:
                lost.append(s)
            elif (firsts[s] or 0) <= last:
                check.append(s)
        if check:
            logs = self.link.layout.logs
            replies = await self.link.many(
                [
                    ("XRANGE", logs[s], format_pos(p), format_pos(p))
                    for s in check
                    if (p := self.last[s]) is not None
                ]
            )
            lost += [s for s, reply in zip(check, replies, strict=True) if not reply]
        return lost

    async def _check_layout(self) -> None:
        """layout.py rule 7: mark the layout; refuse a newer one (raises `BusError`)."""
        key = self.link.layout.layout_key
        _, stored = await self.link.many([("SET", key, VERSION, "NX"), ("GET", key)])
        why = newer_layout(stored)
        if why is not None:
            raise BusError(f"Redis key {key!r}: {why}")

    async def _epoch_call(self, replace: str) -> str:
        new = secrets.token_hex(EPOCH_BYTES)
        link = self.link
        value = await link.scripts.call(link.cmd, "epoch", 1, link.layout.epoch_key, new, replace)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _load_shard(self, shard: int, head: int) -> tuple[list[tuple[str, int]], list[Entry]]:
        """Every key of the shard's state topics and every retained event of its
        stream topics at a position <= `head`, oldest first, and the stream
        topics' floors (rule 2)."""
        link = self.link
        layout = link.layout
        cmd = link.cmd
        topics = sorted(text_of(t) for t in await cmd.smembers(layout.topic_sets[shard]))
        streams = sorted(text_of(t) for t in await cmd.hkeys(layout.floors[shard]))
        out: list[Entry] = []
        floors: list[tuple[str, int]] = []
        upto = format_pos(head)
        sha = link.scripts.sha["history"]
        for i in range(0, len(streams), LOAD_CHUNK):
            chunk = streams[i : i + LOAD_CHUNK]
            replies = await link.many(
                [
                    (
                        "EVALSHA",
                        sha,
                        2,
                        layout.hist_key(t, shard),
                        layout.floors[shard],
                        t,
                        "0-0",
                        upto,
                        0,
                    )
                    for t in chunk
                ]
            )
            for topic, (floor, rows) in zip(chunk, replies, strict=True):
                floors.append((topic, min(pos_of(floor) if floor else 0, head)))
                out.extend((topic, key, pos, data) for pos, key, data in parse_events(rows))
        for i in range(0, len(topics), LOAD_CHUNK):
            chunk = topics[i : i + LOAD_CHUNK]
            raws = await link.many([("HGETALL", layout.state_key(t, shard)) for t in chunk])
            for topic, raw in zip(chunk, raws, strict=True):
                if isinstance(raw, list):  # a pipelined HGETALL may come back as pairs
                    raw = dict(zip(raw[0::2], raw[1::2], strict=True))
                for key, pos, data in parse_state(raw):
                    if pos <= head:
                        out.append((topic, key, pos, data))
        out.sort(key=lambda e: e[2])
        return floors, out

    # -- live reading (rules 1, 3, 5) ---------------------------------------------------

    def groups(self) -> list[list[int]]:
        """The shards each reading task reads: all at once, or one per task on a cluster."""
        shards = self.link.layout.shards
        return [[s] for s in range(shards)] if self.link.cluster else [list(range(shards))]

    async def read(self, group: int, shards: list[int]) -> None:
        """Rule 1: XREAD BLOCK the group's shards from their last IDs, forever."""
        loop = asyncio.get_running_loop()
        sink = self.sink
        assert sink is not None
        wants = sink.wants if isinstance(sink, TopicFilter) else None  # layout.py rule 5
        last = self.last
        logs = self.link.layout.logs
        of_log = self.link.layout.shard_of_log
        timeout = self.block_ms / 1000.0 + READ_GRACE_S
        # COUNT <= MAXLEN: a stream trimmed past our last ID still holds >= MAXLEN
        # newer entries, so only a full reply can follow a gap (rule 3).
        count = min(READ_COUNT, self.stream_maxlen)
        while True:
            streams = {logs[s]: format_pos(last[s] or 0) for s in shards}
            self.read_sent[group] = loop.time()
            reply, trims = await asyncio.wait_for(self._xread(streams, count, shards), timeout)
            del self.read_sent[group]  # not waiting on Redis while handling the reply
            self._check_byte_trims(shards, reply, trims)
            if not reply:
                continue
            full = [of_log[name] for name, items in reply if len(items) >= count]
            if full:
                await self._check_trimmed(full)
            entries: list[Entry] = []
            for name, items in reply:
                for sid, fields in items:
                    try:
                        entries += entries_of(sid, fields, wants)
                    except BadEntry as exc:  # layout.py rule 5: skipped, counted
                        self.bad_entries += 1
                        log.warning("bus: skipped an unreadable entry of %s: %s", name, exc)
                last[of_log[name]] = pos_of(items[-1][0])
            self.last_entry_at = loop.time()
            if entries:
                sink.on_bus_entries(entries)

    async def _xread(
        self, streams: dict[str, str], count: int, shards: list[int]
    ) -> tuple[Any, list[Any]]:
        """XREAD BLOCK, then each shard's `trimmed` (rule 5): one pipelined
        round trip (two on a cluster)."""
        reader = self.link.reader
        metas = [self.link.layout.metas[s] for s in shards]
        if self.link.cluster:
            reply = await reader.xread(streams, count=count, block=self.block_ms)
            return reply, [await reader.hget(m, "trimmed") for m in metas]
        pipe = reader.pipeline(transaction=False)
        pipe.xread(streams, count=count, block=self.block_ms)
        for m in metas:
            pipe.hget(m, "trimmed")
        reply, *trims = await pipe.execute()
        return reply, trims

    def _check_byte_trims(self, shards: list[int], reply: Any, trims: list[Any]) -> None:
        """Raise `Resync` before delivering a reply when a byte trim removed
        entries of a shard this reader had not read (rule 5): the newest ID
        removed is above the last ID read, and the reply does not reach back
        to it (had it, the trim came after the read, and the next read checks)."""
        firsts: dict[int, int] | None = None
        of_log = self.link.layout.shard_of_log
        for s, trimmed in zip(shards, trims, strict=True):
            if trimmed is None:
                continue
            cut = pos_of(trimmed)
            if cut <= (self.last[s] or 0):
                continue
            if firsts is None:
                firsts = {of_log[name]: pos_of(items[0][0]) for name, items in reply or ()}
            first = firsts.get(s)
            if first is None or first > cut:
                raise Resync(f"shard {s}: entries not read yet were trimmed (stream_max_bytes)")

    async def _check_trimmed(self, shards: list[int]) -> None:
        """Raise `Resync` (before anything of the reply is delivered) when a
        shard's first entry is after the last ID read: entries may be lost (rule 3)."""
        logs = self.link.layout.logs
        commands: list[tuple[Any, ...]] = []
        for s in shards:
            commands += [("XRANGE", logs[s], "-", "+", "COUNT", 1), ("XLEN", logs[s])]
        replies = await self.link.many(commands)
        for s, reply, length in zip(shards, replies[0::2], replies[1::2], strict=True):
            last = self.last[s] or 0
            # A shard empty at the sync (last 0) lost nothing unless MAXLEN
            # trimmed it: a burst of more than COUNT entries is no gap.
            if reply and pos_of(reply[0][0]) > last and (last or length >= self.stream_maxlen):
                raise Resync(f"shard {s}: trimmed past the last entry read (a reader fell behind)")

    async def watch(self) -> None:
        """A publish-only client's link watch (rule 6)."""
        loop = asyncio.get_running_loop()
        idle = self.link.layout.idle_key
        timeout = self.block_ms / 1000.0 + READ_GRACE_S
        while True:
            self.read_sent[0] = loop.time()
            await asyncio.wait_for(
                self.link.reader.xread({idle: "$"}, count=1, block=self.block_ms), timeout
            )
            del self.read_sent[0]
