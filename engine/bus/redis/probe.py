"""The redis bus' probe: is the reader deaf, did Redis lose its data, which topics expire.

Rules:

1. Deaf-reader detection (`lag_ms`): a probe every `PROBE_INTERVAL_S` reads
   each shard's head ID on the command connection; a shard is behind from the
   first probe that saw a head this client has not read yet, until it reads
   it. The lag is the oldest such age, or the time since a read last returned
   beyond BLOCK (a stalled connection), whichever is worse. No heartbeat
   entries are written: a quiet shard has nothing to be behind on.
2. The probe also re-checks the epoch and trimming
   (engine/bus/redis/reader.py rules 3-4): an epoch that changed, a stream
   gone or ending before the last entry read, or trimmed past it, raises
   `Resync` (the link task syncs again).
3. Topics with an idle expiry (engine/bus/limits.py rule 3) are removed by
   `expire.lua`, run by the probe for every shard, at most `EXPIRE_BATCH`
   topics per shard and probe.
"""

from __future__ import annotations

import asyncio
from typing import Final

from engine.bus.redis.link import Link, Resync, log
from engine.bus.redis.reader import Reader

PROBE_INTERVAL_S: Final = 1.0
EXPIRE_BATCH: Final = 256  # topics one expire.lua call removes at most


class Probe:
    """The probe of one bus client: runs while the link is served (rules 1-3)."""

    def __init__(self, link: Link, reader: Reader, *, interval_s: float, expires: bool) -> None:
        self.link = link
        self.reader = reader
        self.interval_s = interval_s
        self.expires = expires  # some topic has an idle expiry: run expire.lua
        self.topics_expired = 0  # topics removed by expire.lua calls of this client

    async def run(self) -> None:
        """Once per `interval_s`: the epoch, heads for the lag and the trimming
        (rules 1-2); and the idle topics' expiry (rule 3). Raises `Resync`."""
        loop = asyncio.get_running_loop()
        link = self.link
        reader = self.reader
        reads = reader.reads_entries()
        while True:
            await asyncio.sleep(self.interval_s)
            epoch = await link.cmd.get(link.layout.epoch_key)
            if epoch is None or epoch.decode() != link.epoch:
                raise Resync("the epoch in Redis changed")
            if self.expires:
                await self._expire_topics()
            if not reads:
                continue
            heads, firsts = await link.heads_and_firsts()
            now = loop.time()
            for s in range(link.layout.shards):
                last = reader.last[s] or 0
                head = heads[s]
                if head is None:
                    if last > 0:
                        raise Resync(f"shard {s}: the stream is gone")
                    continue
                if head < last:
                    raise Resync(f"shard {s}: the stream ends before the last entry read")
                first = firsts[s] or 0
                if first > last:
                    raise Resync(f"shard {s}: trimmed past the last entry read")
                unread = reader.unread[s]
                while unread and unread[0][0] <= last:  # read since: bounded by unread heads
                    unread.popleft()
                if head > last and (not unread or unread[-1][0] < head):
                    unread.append((head, now))

    def shard_lags_ms(self) -> list[float] | None:
        """Each shard's lag in ms (rule 1); None while disconnected.

        A read stuck on a stalled connection counts against every shard it reads.
        """
        reader = self.reader
        if not self.link.connected:
            return None
        loop = reader.loop
        if loop is None or not reader.reads_entries():
            return [0.0] * self.link.layout.shards
        now = loop.time()
        block_s = reader.block_ms / 1000.0
        stalled = max((now - sent - block_s for sent in reader.read_sent.values()), default=0.0)
        lags = []
        for s, unread in enumerate(reader.unread):
            last = reader.last[s]
            while unread and last is not None and unread[0][0] <= last:
                unread.popleft()
            lag = now - unread[0][1] if unread else 0.0
            lags.append(max(lag, stalled, 0.0) * 1000.0)
        return lags

    async def _expire_topics(self) -> None:
        """Remove every shard's topics idle past their deadline (expire.lua, rule 3)."""
        layout = self.link.layout
        sha = self.link.scripts.sha["expire"]
        commands = [
            (
                "EVALSHA",
                sha,
                3,
                layout.expiries[s],
                layout.topic_sets[s],
                layout.floors[s],
                layout.shard_prefix(s),
                EXPIRE_BATCH,
            )
            for s in range(layout.shards)
        ]
        for s, gone in enumerate(await self.link.many(commands)):
            if gone:
                self.topics_expired += len(gone)
                log.info("bus: %d idle topic(s) of shard %d expired", len(gone), s)
