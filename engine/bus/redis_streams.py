"""`RedisBus`: the bus on Redis Streams (`bus.backend = "redis"`), for many nodes.

The client is split by job; each module opens with its rules:

    engine/bus/redis/layout.py     where what lives in Redis, and reading its replies (PURE)
    engine/bus/redis/scripts.py    the Lua scripts (engine/bus/lua/), loaded and called by SHA
    engine/bus/redis/link.py       the two Redis clients and the link state the jobs share
    engine/bus/redis/publisher.py  the publish queue and its loop; byte and emergency trims
    engine/bus/redis/reader.py     the sync of every (re)connect, then XREAD of the shards
    engine/bus/redis/probe.py      deaf-reader detection (the lag), epoch checks, idle expiry

This module runs them. Rules:

1. Two background tasks, both supervised (`engine/bus/tasks.py`): the link
   task (sync, then serve: the reading tasks, or the watch of a publish-only
   client, and the probe, until one of them raises or a job reports the link
   broken) and the publish loop. A task that raises is restarted with backoff
   and counted (`task_restarts`); while one is down the client reports itself
   disconnected, so `/readyz` fails and publishes fail fast.
2. Reconnects use exponential backoff with jitter (`FailureStreak`); a
   `Resync` (the epoch changed, a stream trimmed past the reader) syncs again
   at once, still connected. A sink that raised has lost entries: every shard
   is loaded again.
3. Nothing waits on Redis without a bound: publishes (publisher.py rule 6),
   snapshots and histories get an answer or `BusUnavailable` within
   `publish_timeout_s`.

Workers hold only the topics their clients subscribe to (engine/fanout/core.py
rule 9): a `sub` of a topic not held loads it with `snapshot` / `history`,
merged under the entries read since the worker began holding it. No atomic read
with the shard's head is needed: a topic's entries are ordered on its shard, so
an entry read after the load is either in the loaded state (or superseded
there: a replay, ignored by position) or newer than all of it. The runs of
topics the worker does not hold are skipped before they are decoded into
entries (`TopicFilter`, layout.py rule 5). Not done: the reader still reads
every shard whole (a filter per shard would save Redis and the network that
work), and a sync still loads every state hash (reader.py rule 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Sequence
from typing import Any, Final

from redis.exceptions import RedisError

from engine.backoff import Backoff, FailureStreak
from engine.bus.backend import BusBackend
from engine.bus.base import (
    BusSink,
    ExpiryOf,
    History,
    HistoryOf,
    PublishDone,
    Snapshot,
    Update,
)
from engine.bus.limits import Limits
from engine.bus.redis.layout import Layout, parse_events, parse_state, pos_of
from engine.bus.redis.link import COMMAND_TIMEOUT_S, REDIS_DOWN, Link, Resync, stop
from engine.bus.redis.probe import PROBE_INTERVAL_S, Probe
from engine.bus.redis.publisher import Publisher
from engine.bus.redis.reader import BLOCK_MS, Reader
from engine.bus.tasks import TaskHealth, supervise
from engine.config import redact_url
from engine.errors import BusError, BusUnavailable
from engine.protocol.codec import format_pos

log = logging.getLogger(__name__)

# Snapshot and history reads in flight per bus client. redis-py's pool holds at
# most 100 connections and refuses the next call at once ("Too many
# connections"), while a worker may load `fanout.max_topic_loads` (256) topics
# at once: reads past this bound wait their turn, within the same timeout.
READS_IN_FLIGHT: Final = 64

RECONNECT_BACKOFF: Final = Backoff(min_ms=100, max_ms=5000)
STABLE_LINK_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 1.0


def _no_streams(topic: str) -> int | None:
    return None  # without rules, every topic is a state topic


class RedisBus(BusBackend):
    """The `Bus` of the redis backend. See the module's rules.

    `holds_all_state` is True: a connect delivers the whole state (reader.py
    rule 2). A worker keeps only the topics subscribed to it and loads the
    others on `sub` (`snapshot`, `history`), so its memory follows its
    subscriptions.
    """

    def __init__(
        self,
        url: str,
        *,
        shards: int,
        prefix: str = "fanout",
        stream_maxlen: int = 100_000,
        cluster: bool = False,
        want_entries: bool = True,
        backoff: Backoff = RECONNECT_BACKOFF,
        block_ms: int = BLOCK_MS,
        probe_interval_s: float = PROBE_INTERVAL_S,
        username: str | None = None,
        password: str | None = None,
        tls_ca_file: str = "",
        history_of: HistoryOf | None = None,
        limits: Limits | None = None,
        stream_max_bytes: int = 0,
        max_inflight_batches: int = 4,
        publish_timeout_s: float = COMMAND_TIMEOUT_S,
        expiry_of: ExpiryOf | None = None,
    ) -> None:
        self.url = url
        # What logs and task names show: a password in the URL never (redact_url).
        self.shown_url = redact_url(url)
        # AUTH (a password in the URL wins, as redis-py reads it) and, for a
        # rediss:// URL, the CA bundle the server's certificate is checked against.
        auth: dict[str, Any] = {}
        if username:
            auth["username"] = username
        if password:
            auth["password"] = password
        if tls_ca_file:
            auth["ssl_ca_certs"] = tls_ca_file
        self.shards = shards
        self.prefix = prefix
        self.cluster = cluster
        self.want_entries = want_entries
        self.limits = limits or Limits()
        self.publish_timeout_s = publish_timeout_s
        self.health = TaskHealth()
        self._history_of = history_of or _no_streams
        self._reads = asyncio.Semaphore(READS_IN_FLIGHT)
        self._link = Link(
            url, Layout(prefix, shards), cluster=cluster, auth=auth, shown_url=self.shown_url
        )
        self._reader = Reader(
            self._link, want_entries=want_entries, block_ms=block_ms, stream_maxlen=stream_maxlen
        )
        self._probe = Probe(
            self._link, self._reader, interval_s=probe_interval_s, expires=expiry_of is not None
        )
        self._publisher = Publisher(
            self._link,
            self.health,
            history_of=self._history_of,
            limits=self.limits,
            stream_maxlen=stream_maxlen,
            stream_max_bytes=stream_max_bytes,
            max_inflight_batches=max_inflight_batches,
            publish_timeout_s=publish_timeout_s,
            expiry_of=expiry_of,
        )
        self._streak = FailureStreak(backoff, stable_s=STABLE_LINK_S)
        self._sink: BusSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None

    # -- Bus --------------------------------------------------------------------------

    @property
    def epoch(self) -> str | None:
        return self._link.epoch

    @property
    def connected(self) -> bool:
        """Linked to Redis, and no background task down (rule 1)."""
        return self._link.connected and not self.health.down

    @property
    def holds_all_state(self) -> bool:
        return True

    def bus_stats(self) -> dict[str, int]:
        """Counters of this client's failure modes, for metrics."""
        publisher = self._publisher
        return {
            "task_restarts": self.health.total_restarts(),
            "publish_timeouts": publisher.publish_timeouts,
            "oom_refusals": publisher.oom_refusals,
            "byte_trims": publisher.byte_trims,
            "topics_expired": self._probe.topics_expired,
            "bad_entries": self._reader.bad_entries,
        }

    def lag_ms(self) -> float | None:
        """The worst shard's lag (probe.py rule 1); None while disconnected."""
        lags = self.shard_lags_ms()
        if lags is None:
            return None
        return max(lags, default=0.0)

    def shard_lags_ms(self) -> list[float] | None:
        """Each shard's lag in ms (probe.py rule 1), for metrics; None while disconnected."""
        return self._probe.shard_lags_ms()

    def last_entry_age_ms(self) -> float | None:
        """Milliseconds since this client last received an entry (None: never)."""
        return self._reader.last_entry_age_ms()

    async def start(self, sink: BusSink | None) -> None:
        """Connect; return once the first attempt is up (state delivered) or failed."""
        if self._task is not None:
            raise RuntimeError("RedisBus.start called twice")
        self._sink = sink
        loop = asyncio.get_running_loop()
        self._reader.start(sink, loop)
        self._publisher.start(loop)
        self._link.open()
        self._first = loop.create_future()
        health = self.health
        self._publish_task = loop.create_task(
            supervise("publisher", self._publisher.run, health), name="bus-redis-publish"
        )
        self._task = loop.create_task(
            supervise("link", self._run, health), name=f"bus-redis:{self.shown_url}"
        )
        await self._first

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        """Queue a publish; `done` gets its positions or a `BusError` later
        (publisher.py rules 1-6), within `publish_timeout_s`."""
        self._publisher.publish(updates, done)

    async def _read(self, call: Any) -> Any:
        """Await `call` once fewer than READS_IN_FLIGHT reads are running."""
        try:
            async with self._reads:
                return await call
        finally:
            if inspect.iscoroutine(call) and inspect.getcoroutinestate(call) == "CORO_CREATED":
                call.close()  # never awaited (cancelled while waiting its turn)

    async def snapshot(self, topic: str) -> Snapshot:
        """The topic's latest state from its hash (deleted keys included with data NIL)."""
        link = self._link
        epoch = link.epoch
        if not self.connected or link.closed or epoch is None:
            raise BusUnavailable("not connected to Redis")
        key = link.layout.state_key(topic, link.layout.shard(topic))
        try:
            raw = await asyncio.wait_for(self._read(link.cmd.hgetall(key)), self.publish_timeout_s)
        except REDIS_DOWN as exc:
            raise BusUnavailable(f"Redis: {exc}") from exc
        items = parse_state(raw)
        return Snapshot(epoch=epoch, pos=items[-1][1] if items else 0, items=items)

    async def history(self, topic: str, since: int = 0, limit: int | None = None) -> History:
        """A stream topic's retained events after `since`, from its history stream."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if self._history_of(topic) is None:
            raise BusError(f"{topic!r} is not a stream topic")
        link = self._link
        epoch = link.epoch
        if not self.connected or link.closed or epoch is None:
            raise BusUnavailable("not connected to Redis")
        count = 0 if limit is None else limit + 1  # one more: tells whether `limit` cut
        layout = link.layout
        shard = layout.shard(topic)
        args = (2, layout.hist_key(topic, shard), layout.floors[shard], topic, format_pos(since))
        call = link.scripts.call(link.cmd, "history", *args, "+", count)
        try:
            reply = await asyncio.wait_for(self._read(call), self.publish_timeout_s)
        except REDIS_DOWN as exc:
            raise BusUnavailable(f"Redis: {exc}") from exc
        floor = pos_of(reply[0]) if reply[0] else 0
        events = parse_events(reply[1])
        if count:
            events.reverse()  # XREVRANGE: newest first
        complete = since >= floor
        if limit is not None and len(events) > limit:
            events = events[len(events) - limit :]
            complete = False
        return History(epoch, events, complete)

    async def close(self) -> None:
        """Refuse new publishes, send those queued (bounded wait), disconnect."""
        link = self._link
        if link.closed:
            return
        link.closed = True
        await self._publisher.drain(asyncio.get_running_loop().time() + CLOSE_TIMEOUT_S)
        await stop([t for t in (self._task, self._publish_task) if t is not None])
        self._publisher.close()
        self._set_down()
        for client in (link.cmd, link.reader):
            if client is not None:
                with contextlib.suppress(*REDIS_DOWN):
                    await client.aclose()
        self._settle_first()

    # -- the link task (rules 1-2) -----------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        streak = self._streak
        link = self._link
        while not link.closed:
            try:
                await self._reader.sync()
                streak.record_success(loop.time())
                self._settle_first()
                await self._serve()
            except Resync as why:
                log.info("bus: resynchronizing with Redis: %s", why)
                continue  # still connected: no backoff
            except REDIS_DOWN as exc:
                (log.warning if streak.failures == 0 else log.debug)(
                    "bus: Redis at %s unavailable: %s", self.shown_url, exc
                )
            except BusError as exc:  # a layout this node does not know (reader.py rule 2)
                log.error("bus: cannot use Redis at %s: %s", self.shown_url, exc)
            except Exception:
                # A sink that failed has lost entries: load every shard again.
                log.exception("bus: error while reading from Redis; resynchronizing")
                self._reader.forget_positions()
            self._set_down()
            streak.record_failure(loop.time())
            self._settle_first()
            if link.closed:
                break
            await asyncio.sleep(streak.next_delay_ms(random.random()) / 1000.0)

    async def _serve(self) -> None:
        """Run the reading tasks and the probe until one of them fails (raises)."""
        loop = asyncio.get_running_loop()
        link = self._link
        reader = self._reader
        link.trouble = loop.create_future()
        tasks: list[asyncio.Future[Any]] = [link.trouble]
        if reader.reads_entries():
            for g, shards in enumerate(reader.groups()):
                tasks.append(loop.create_task(reader.read(g, shards), name=f"bus-redis-read-{g}"))
        else:
            tasks.append(loop.create_task(reader.watch(), name="bus-redis-watch"))
        tasks.append(loop.create_task(self._probe.run(), name="bus-redis-probe"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises why it ended
            raise RedisError("a reader ended")  # pragma: no cover - they only end by raising
        finally:
            link.trouble = None
            await stop(tasks)

    def _set_down(self) -> None:
        link = self._link
        was = link.connected
        link.connected = False
        self._reader.read_sent.clear()
        for unread in self._reader.unread:
            unread.clear()
        if was:
            if not link.closed:
                log.warning("bus: lost Redis; reconnecting")
            if self._sink is not None:
                self._sink.on_bus_connected(False)

    def _settle_first(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
