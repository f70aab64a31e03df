"""`RedisBus`: the bus on Redis Streams (`bus.backend = "redis"`), for many nodes.

Layout in Redis (`P` is `bus.redis.prefix`, `N` a shard, `engine.bus.base.shard_of`):

    P:{sN}:log            the shard's stream; entry fields t (topic), k (key), d (data)
    P:{sN}:state:<topic>  a state topic's latest state: field key -> "<stream id> <data>"
    P:{sN}:topics         the set of the shard's state topics (what a reader loads)
    P:{sN}:hist:<topic>   a stream topic's retained history: its newest `history`
                          events, with the log's IDs; fields k (key), d (data)
    P:{sN}:streams        hash: the shard's stream topics -> their floor (the ID of
                          the newest event no longer retained; "0-0": none)
    P:{sN}:meta           hash: added (data bytes since the last byte check),
                          trimmed (the newest entry ID a byte trim removed)
    P:{sN}:expiry         zset: topics with an idle expiry -> their deadline (ms)
    P:epoch               the epoch (random hex), created by the first client

Every key of a shard shares the hash tag `{sN}`, so a shard lives on one Redis
Cluster node and the publish script touches one slot.

Rules:

1. A publish is `engine/bus/lua/publish.lua`, one script call per shard: it
   XADDs each entry (`MAXLEN ~ bus.redis.stream_maxlen`) and records the
   key's `(pos, data)` in the state hash, atomically. Positions are the stream
   IDs (`make_pos(ms, seq)`). **Atomicity is per shard**: a batch whose topics
   span shards is one script call per shard; if the link breaks between two of
   them, part of the batch may be published (the local hub is atomic per batch).
   Publishes are sent in call order on one connection (pipelined in batches;
   consecutive requests to one shard share a script call, up to
   `MERGE_UPDATES` updates), so two publishes of one topic get positions in
   call order. A stream topic's update (the `[[topics]]` rules this client is
   given decide; all publishers must share them) is appended to the topic's
   history stream, trimmed to `history` exactly, instead of a state hash;
   its key may be "".
2. `publish` fails fast with `BusUnavailable` while the client is not
   connected, and when `MAX_QUEUED` requests already wait (the overflow policy
   of the publish queue). A request that was sent and whose reply was lost with
   the connection is reported `BusUnavailable` too, though Redis may have
   applied it (no client can know; a retry publishes the same value again,
   which is harmless for state topics).
3. Reading: every shard is read with `XREAD BLOCK` from the last ID read (one
   call for all shards; one per shard on Redis Cluster, where a command cannot
   span slots), on a client of its own with no socket timeout; a read that has
   not returned `BLOCK + READ_GRACE_S` after it was sent counts as a broken link.
4. Every (re)connect is a sync: `on_bus_epoch(epoch)`, then (for shards read
   for the first time, or whose stream was trimmed past the last ID read) the
   shard's head ID H is resolved, the state hashes are loaded and every key at
   a position <= H is delivered, oldest first, then `on_bus_connected(True)`,
   then live entries after H. Keys rewritten after H come from the stream, so
   the loaded state and the stream never disagree and no topic receives an
   entry below a position it already holds. A stream topic's load is its floor
   and its retained events <= H (`history.lua`, one atomic read), the floors
   delivered first (`on_bus_floors`); a floor above H is lowered to H (the
   events after H come from the shard's stream). Otherwise reading resumes from the
   last ID: no entry that Redis still holds is skipped. A reader that falls
   behind past the trimming (`MAXLEN ~`) finds out before delivering anything
   after the gap: XREAD's COUNT is at most MAXLEN, so only a full reply can
   follow a gap, and after a full reply the shard's first ID is compared with
   the last ID read; a gap means a sync (the shard's state is loaded again).
5. The epoch changes when Redis lost its data: the epoch key is gone (created
   anew by `epoch.lua`), or a stream no longer holds the last entry this
   client read although it was not trimmed (Redis came back from an older copy
   of its data, maybe with new entries since: the client replaces the epoch,
   once for everyone). A new epoch resets the read positions and loads
   every shard.
6. Deaf-reader detection (`lag_ms`): a probe every `PROBE_INTERVAL_S` reads each
   shard's head ID on the command connection; a shard is behind from the first
   probe that saw a head this client has not read yet, until it reads it. The lag
   is the oldest such age, or the time since a read last returned beyond BLOCK
   (a stalled connection), whichever is worse. No heartbeat entries are written:
   a quiet shard has nothing to be behind on. The probe also re-checks the
   epoch and trimming (rule 4/5).
7. Reconnects use exponential backoff with jitter (`FailureStreak`).
8. Bounds (`engine/bus/limits.py`): a publish is checked before it is queued
   (strings encodable as UTF-8, `data` within `max_data_bytes`: a bad value
   fails its own request, never the publish loop); the key and topic counts
   are checked by the script, per request (one request refused, the others
   of the same script call applied). A stream's memory is bounded by
   `stream_max_bytes` as well as `stream_maxlen`: every `BYTES_CHECKS`-th of
   the budget published, `trim.lua` measures it (MEMORY USAGE) and removes
   its oldest entries, recording the newest ID removed (`trimmed`). A reader
   reads `trimmed` in the same round trip as each XREAD (pipelined, so no
   command runs in between when data is waiting): `trimmed` above its last
   ID, with the reply not reaching back to it, means entries it had not read
   were removed: a sync (rule 4). (On a cluster the two are separate round
   trips.) Topics with an idle expiry are removed by `expire.lua`, run by the
   probe for every shard.
9. Redis out of memory (`maxmemory`, the script is refused up front): the
   request fails `BusUnavailable` saying so (counted: `oom_refusals`) and the
   stream taking the most memory is trimmed to half its size at once
   (`trim.lua` runs even when Redis is full), at most once per
   `OOM_TRIM_INTERVAL_S`; so a Redis filled by the streams recovers by itself. Filled by state (keys x
   `data`), it refuses publishes until topics expire or an operator acts:
   size `maxmemory` by docs/kubernetes.md ("Sizing the Redis bus").
10. Nothing waits on Redis without a bound: every publish gets a reply or
   `BusUnavailable` within `publish_timeout_s` (one timer for them all), as do
   snapshots and histories. The publish loop and the link task are
   supervised (`engine/bus/tasks.py`): a task that raises is restarted with
   backoff and counted (`task_restarts`); while one is down the client
   reports itself disconnected, so `/readyz` fails and publishes fail fast.

Workers hold only the topics their clients subscribe to (engine/fanout/core.py
rule 9): a `sub` of a topic not held loads it with `snapshot` / `history`,
merged under the entries read since the worker began holding it. No atomic read
with the shard's head is needed: a topic's entries are ordered on its shard, so
an entry read after the load is either in the loaded state (or superseded
there: a replay, ignored by position) or newer than all of it. Not done: the
reader still reads every shard whole, and the worker drops the entries of
topics it does not hold (a filter per shard would save that CPU), and a sync
still loads every state hash (rule 4).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.resources
import logging
import random
import secrets
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

import engine.bus.limits as bounds
from engine.backoff import Backoff, FailureStreak
from engine.bus.backend import BusBackend, CallbackGuard
from engine.bus.base import (
    BusSink,
    Entry,
    ExpiryOf,
    History,
    HistoryOf,
    PublishDone,
    Snapshot,
    Update,
    shard_of,
)
from engine.bus.limits import Limits
from engine.bus.tasks import TaskHealth, supervise
from engine.codes import ErrorCode
from engine.config import redact_url
from engine.errors import BusError, BusUnavailable
from engine.protocol.codec import format_pos, make_pos

log = logging.getLogger(__name__)
_call = CallbackGuard(log, "bus: a publish callback failed")

RECONNECT_BACKOFF: Final = Backoff(min_ms=100, max_ms=5000)
STABLE_LINK_S: Final = 10.0
BLOCK_MS: Final = 1000  # XREAD BLOCK: also how often an idle reader proves it is alive
READ_GRACE_S: Final = 5.0  # a read not back BLOCK + this after it was sent: broken link
READ_COUNT: Final = 1000  # entries per XREAD reply (per stream)
PROBE_INTERVAL_S: Final = 1.0
COMMAND_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 2.0
MAX_QUEUED: Final = 10_000  # publish requests waiting to be sent; more: BusUnavailable
PIPELINE_REQUESTS: Final = 512  # publish requests per pipeline round trip
MERGE_UPDATES: Final = 1000  # updates per script call at most (a script blocks Redis while it runs)
CLOSE_TIMEOUT_S: Final = 1.0
EPOCH_BYTES: Final = 8
BYTES_CHECKS: Final = 16  # byte checks per `stream_max_bytes` published (rule 8)
OOM_TRIM_INTERVAL_S: Final = 0.25  # emergency trims at most this often (rule 9)
OOM_TRIM_FRACTION: Final = 0.5  # ... down to this share of the stream's memory
TRIM_KEEP: Final = 1  # a byte trim leaves the newest entry: the head stays known
EXPIRE_BATCH: Final = 256  # topics one expire.lua call removes at most
SHARD_CACHE_MAX: Final = 65_536  # topic -> shard answers kept (cleared when full)

_REDIS_DOWN: Final = (RedisError, OSError, asyncio.TimeoutError)


def _script(name: str) -> str:
    return importlib.resources.files("engine.bus").joinpath("lua", name).read_text("utf-8")


def pos_of(stream_id: bytes | str) -> int:
    """A stream ID ("MS-SEQ") as a position."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return make_pos(int(ms), int(seq))


def _no_streams(topic: str) -> int | None:
    return None  # without rules, every topic is a state topic


def _no_expiry(topic: str) -> float:
    return 0.0


def _text(raw: bytes) -> str:
    """A topic or key read from Redis. Never raises: bytes that are not UTF-8
    (written by something else than this client, which checks) become U+FFFD,
    so one bad value cannot stop a reader, which would load it again forever."""
    return raw.decode("utf-8", "replace")


def parse_events(rows: Sequence[Any]) -> list[tuple[int, str, bytes]]:
    """History stream rows `[id, [field, value, ...]]` as (pos, key, data)."""
    out = []
    for sid, fields in rows:
        values = dict(zip(fields[0::2], fields[1::2], strict=True))
        out.append((pos_of(sid), _text(values[b"k"]), values[b"d"]))
    return out


def parse_state(raw: dict[bytes, bytes]) -> list[tuple[str, int, bytes]]:
    """A topic state hash as (key, pos, data), oldest first."""
    items = []
    for field, value in raw.items():
        sid, _, data = value.partition(b" ")
        items.append((_text(field), pos_of(sid), data))
    items.sort(key=lambda item: item[1])
    return items


class _Resync(Exception):
    """The probe found the epoch changed or a stream trimmed past us: sync again."""


# shard, per-update keys (state hash or history stream), ARGV quadruples, indices
# in the request, idle expiries in ms per update (None: no topic of the call has one)
_Call = tuple[int, list[str], list[Any], list[int], list[int] | None]


class _Merged:
    """One script call of publish.lua being built (`RedisBus._merge`)."""

    __slots__ = ("argv", "counts", "expiries", "keys", "segments", "shard", "updates")

    def __init__(self, shard: int, shard_keys: list[str]) -> None:
        self.shard = shard
        self.keys = list(shard_keys)  # KEYS[1..5], then one per update
        self.argv: list[Any] = []  # 4 per update
        self.counts: list[int] = []  # updates per request
        self.expiries: list[str] = []  # "i:ms" for updates of expiring topics
        self.updates = 0
        self.segments: list[tuple[_Request, list[int]]] = []  # request, its indices


class _Request:
    """One publish waiting for Redis. Settled once: by its reply, a failure, or its deadline."""

    __slots__ = ("calls", "deadline", "done", "results", "settled")

    def __init__(self, calls: list[_Call], done: PublishDone, deadline: float):
        self.calls = calls  # per shard: its updates' state keys, ARGV and indices in the request
        self.done = done
        self.deadline = deadline  # loop time: BusUnavailable past it (rule 10)
        self.results: list[int] = [0] * sum(len(c[3]) for c in calls)
        self.settled = False

    def settle(self, result: Sequence[int] | BusError) -> None:
        if self.settled:
            return
        self.settled = True
        _call(self.done, result)


class RedisBus(BusBackend):
    """The `Bus` of the redis backend. See the module's rules.

    `holds_all_state` is True: a connect delivers the whole state (rule 4). A
    worker keeps only the topics subscribed to it and loads the others on
    `sub` (`snapshot`, `history`), so its memory follows its subscriptions.
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
        publish_timeout_s: float = COMMAND_TIMEOUT_S,
        expiry_of: ExpiryOf | None = None,
    ) -> None:
        self.url = url
        # What logs and task names show: a password in the URL never (redact_url).
        self.shown_url = redact_url(url)
        # AUTH (a password in the URL wins, as redis-py reads it) and, for a
        # rediss:// URL, the CA bundle the server's certificate is checked against.
        self._auth: dict[str, Any] = {}
        if username:
            self._auth["username"] = username
        if password:
            self._auth["password"] = password
        if tls_ca_file:
            self._auth["ssl_ca_certs"] = tls_ca_file
        self.shards = shards
        self.prefix = prefix
        self.stream_maxlen = stream_maxlen
        self.cluster = cluster
        self.want_entries = want_entries
        self.block_ms = block_ms
        self.probe_interval_s = probe_interval_s
        self.limits = limits or Limits()
        self.stream_max_bytes = stream_max_bytes
        self.publish_timeout_s = publish_timeout_s
        self._expiry_of = expiry_of or _no_expiry
        self._expires = expiry_of is not None  # the probe runs expire.lua (rule 8)
        self._topics_per_shard = self.limits.topics_per_shard(shards)
        self._script_head = [
            stream_maxlen,
            self.limits.max_keys_per_topic,
            self._topics_per_shard,
            stream_max_bytes,
            max(1, stream_max_bytes // BYTES_CHECKS),
        ]
        self.health = TaskHealth()
        self.oom_refusals = 0  # publishes Redis refused for maxmemory (rule 9)
        self.publish_timeouts = 0  # requests that got no reply within publish_timeout_s
        self.byte_trims = 0  # entries removed by byte trims (rule 8)
        self.topics_expired = 0  # topics removed by expire.lua calls of this client
        self._oom_trimmed = -OOM_TRIM_INTERVAL_S  # loop time of the last emergency trim
        self._trim_due: set[int] = set()  # shards whose byte check is due
        self._sending: list[_Request] = []  # the batch the publish loop sent last
        self._deadlines: asyncio.TimerHandle | None = None  # rule 10: the next deadline
        self._streak = FailureStreak(backoff, stable_s=STABLE_LINK_S)
        self._epoch_key = f"{prefix}:epoch"
        self._logs = [f"{prefix}:{{s{s}}}:log" for s in range(shards)]
        self._shard_of_log = {name.encode(): s for s, name in enumerate(self._logs)}
        self._topic_sets = [f"{prefix}:{{s{s}}}:topics" for s in range(shards)]
        self._floors = [f"{prefix}:{{s{s}}}:streams" for s in range(shards)]
        self._metas = [f"{prefix}:{{s{s}}}:meta" for s in range(shards)]
        self._expiries = [f"{prefix}:{{s{s}}}:expiry" for s in range(shards)]
        # KEYS[1..5] of publish.lua, per shard
        self._shard_keys = [
            [self._logs[s], self._topic_sets[s], self._floors[s], self._metas[s], self._expiries[s]]
            for s in range(shards)
        ]
        self._history_of = history_of or _no_streams
        self._publish_src = _script("publish.lua")
        self._epoch_src = _script("epoch.lua")
        self._history_src = _script("history.lua")
        self._trim_src = _script("trim.lua")
        self._expire_src = _script("expire.lua")
        self._publish_sha = ""
        self._epoch_sha = ""
        self._history_sha = ""
        self._trim_sha = ""
        self._expire_sha = ""
        self._shard_cache: dict[str, int] = {}
        self._sink: BusSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cmd: Any = None  # Redis | RedisCluster: publishes, loads, probes
        self._reader: Any = None  # Redis | RedisCluster: XREAD BLOCK, no socket timeout
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._trouble: asyncio.Future[None] | None = None  # set by the publisher on a link error
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = asyncio.Event()
        self._epoch: str | None = None
        self._connected = False
        self._closed = False
        # read state, per shard: last ID read (None: load the shard at the next sync)
        self._last: list[int | None] = [None] * shards
        # per shard: heads seen by the probe and not read yet, (pos, loop time seen)
        self._unread: list[collections.deque[tuple[int, float]]] = [
            collections.deque() for _ in range(shards)
        ]
        # reader group -> loop time its pending XREAD was sent (absent: not waiting on Redis)
        self._read_sent: dict[int, float] = {}
        self._last_entry_at: float | None = None

    # -- Bus --------------------------------------------------------------------------

    @property
    def epoch(self) -> str | None:
        return self._epoch

    @property
    def connected(self) -> bool:
        """Linked to Redis, and no background task down (rule 10)."""
        return self._connected and not self.health.down

    @property
    def holds_all_state(self) -> bool:
        return True

    def bus_stats(self) -> dict[str, int]:
        """Counters of this client's failure modes (rules 8-10), for metrics."""
        return {
            "task_restarts": self.health.total_restarts(),
            "publish_timeouts": self.publish_timeouts,
            "oom_refusals": self.oom_refusals,
            "byte_trims": self.byte_trims,
            "topics_expired": self.topics_expired,
        }

    def lag_ms(self) -> float | None:
        """The worst shard's lag (rule 6); None while disconnected."""
        lags = self.shard_lags_ms()
        if lags is None:
            return None
        return max(lags, default=0.0)

    def shard_lags_ms(self) -> list[float] | None:
        """Each shard's lag in ms (rule 6), for metrics; None while disconnected.

        A read stuck on a stalled connection counts against every shard it reads.
        """
        if not self._connected:
            return None
        if self._loop is None or not self._reads_entries():
            return [0.0] * self.shards
        now = self._loop.time()
        block_s = self.block_ms / 1000.0
        stalled = max((now - sent - block_s for sent in self._read_sent.values()), default=0.0)
        lags = []
        for s, unread in enumerate(self._unread):
            last = self._last[s]
            while unread and last is not None and unread[0][0] <= last:
                unread.popleft()
            lag = now - unread[0][1] if unread else 0.0
            lags.append(max(lag, stalled, 0.0) * 1000.0)
        return lags

    def last_entry_age_ms(self) -> float | None:
        """Milliseconds since this client last received an entry (None: never)."""
        if self._loop is None or self._last_entry_at is None:
            return None
        return (self._loop.time() - self._last_entry_at) * 1000.0

    async def start(self, sink: BusSink | None) -> None:
        """Connect; return once the first attempt is up (state delivered) or failed."""
        if self._task is not None:
            raise RuntimeError("RedisBus.start called twice")
        self._sink = sink
        loop = self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._cmd = self._client(COMMAND_TIMEOUT_S)
        self._reader = self._client(None)
        self._first = loop.create_future()
        health = self.health
        self._publisher = loop.create_task(
            supervise("publisher", self._publish_loop, health), name="bus-redis-publish"
        )
        self._task = loop.create_task(
            supervise("link", self._run, health), name=f"bus-redis:{self.shown_url}"
        )
        await self._first

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        """Queue a publish; `done` gets its positions or a `BusError` later
        (rules 1-2, 8-10), within `publish_timeout_s`."""
        loop = self._loop or asyncio.get_running_loop()
        if not self.connected or self._closed:
            loop.call_soon(_call, done, BusUnavailable("not connected to Redis"))
            return
        if len(self._queue) >= MAX_QUEUED:
            loop.call_soon(
                _call, done, BusUnavailable("Redis is not keeping up (publish queue full)")
            )
            return
        try:
            calls = self._calls(updates)
        except BusError as exc:
            loop.call_soon(_call, done, exc)
            return
        if not calls:
            loop.call_soon(_call, done, [])
            return
        self._queue.append(_Request(calls, done, loop.time() + self.publish_timeout_s))
        if self._deadlines is None:
            self._deadlines = loop.call_later(self.publish_timeout_s, self._expire_requests)
        self._wake.set()

    def _expire_requests(self) -> None:
        """One timer for every request (rule 10): requests are sent in queue
        order and share one timeout, so deadlines grow along the batch being
        sent, then the queue. Settles those past theirs with BusUnavailable
        (one that was sent may still be applied, like a reply lost with the
        link) and sets the timer for the next one."""
        loop = self._loop or asyncio.get_running_loop()
        self._deadlines = None
        now = loop.time()
        why = f"no reply from Redis within bus.publish_timeout_s ({self.publish_timeout_s:g} s)"
        queue = self._queue
        for req in self._sending:
            if not req.settled and req.deadline <= now:
                self.publish_timeouts += 1
                req.settle(BusUnavailable(why))
        while queue and (queue[0].settled or queue[0].deadline <= now):
            req = queue.popleft()
            if not req.settled:
                self.publish_timeouts += 1
                req.settle(BusUnavailable(why))
        waiting = [r.deadline for r in self._sending if not r.settled]
        if queue:
            waiting.append(queue[0].deadline)
        if waiting:
            self._deadlines = loop.call_at(min(waiting), self._expire_requests)

    async def snapshot(self, topic: str) -> Snapshot:
        """The topic's latest state from its hash (deleted keys included with data NIL)."""
        if not self.connected or self._closed or self._epoch is None:
            raise BusUnavailable("not connected to Redis")
        key = self._state_key(topic, self._shard(topic))
        try:
            raw = await asyncio.wait_for(self._cmd.hgetall(key), self.publish_timeout_s)
        except _REDIS_DOWN as exc:
            raise BusUnavailable(f"Redis: {exc}") from exc
        items = parse_state(raw)
        return Snapshot(epoch=self._epoch, pos=items[-1][1] if items else 0, items=items)

    async def history(self, topic: str, since: int = 0, limit: int | None = None) -> History:
        """A stream topic's retained events after `since`, from its history stream."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        if self._history_of(topic) is None:
            raise BusError(f"{topic!r} is not a stream topic")
        if not self.connected or self._closed or self._epoch is None:
            raise BusUnavailable("not connected to Redis")
        epoch = self._epoch
        count = 0 if limit is None else limit + 1  # one more: tells whether `limit` cut
        shard = self._shard(topic)
        args = (2, self._hist_key(topic, shard), self._floors[shard], topic, format_pos(since))
        try:
            reply = await asyncio.wait_for(self._history_call(args, count), self.publish_timeout_s)
        except _REDIS_DOWN as exc:
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

    async def _history_call(self, args: tuple[Any, ...], count: int) -> Any:
        try:
            return await self._cmd.evalsha(self._history_sha, *args, "+", count)
        except NoScriptError:
            self._history_sha = await self._cmd.script_load(self._history_src)
            return await self._cmd.evalsha(self._history_sha, *args, "+", count)

    async def close(self) -> None:
        """Refuse new publishes, send those queued (bounded wait), disconnect."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_TIMEOUT_S
        while self._queue and self._connected and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await _stop([t for t in (self._task, self._publisher) if t is not None])
        if self._deadlines is not None:
            self._deadlines.cancel()
            self._deadlines = None
        for req in self._sending:
            req.settle(BusUnavailable("the bus client was closed"))
        self._fail_queued("the bus client was closed")
        self._set_down()
        for client in (self._cmd, self._reader):
            if client is not None:
                with contextlib.suppress(*_REDIS_DOWN):
                    await client.aclose()
        self._settle_first()

    # -- connecting -------------------------------------------------------------------

    def _client(self, socket_timeout: float | None) -> Any:
        kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "decode_responses": False,
            "protocol": 2,  # pins reply shapes (field notes: RESP3 changes XREAD's)
            **self._auth,
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), 0), **kwargs)
        return aioredis.Redis.from_url(
            self.url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **kwargs
        )

    def _reads_entries(self) -> bool:
        return self.want_entries and self._sink is not None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        streak = self._streak
        while not self._closed:
            try:
                await self._sync()
                await self._serve()
            except _Resync as why:
                log.info("bus: resynchronizing with Redis: %s", why)
                continue  # still connected: no backoff
            except _REDIS_DOWN as exc:
                (log.warning if streak.failures == 0 else log.debug)(
                    "bus: Redis at %s unavailable: %s", self.shown_url, exc
                )
            except Exception:
                # A sink that failed has lost entries: load every shard again.
                log.exception("bus: error while reading from Redis; resynchronizing")
                self._last = [None] * self.shards
            self._set_down()
            streak.record_failure(loop.time())
            self._settle_first()
            if self._closed:
                break
            await asyncio.sleep(streak.next_delay_ms(random.random()) / 1000.0)

    async def _sync(self) -> None:
        """Rules 4 and 5: epoch, heads, state loads; then connected."""
        loop = asyncio.get_running_loop()
        cmd = self._cmd
        if self.cluster:
            # Discover the slots once, before readers share the client: concurrent
            # first commands on a fresh RedisCluster fail ("Connection closed").
            await cmd.initialize()
            await self._reader.initialize()
        self._publish_sha = await cmd.script_load(self._publish_src)
        self._epoch_sha = await cmd.script_load(self._epoch_src)
        self._history_sha = await cmd.script_load(self._history_src)
        self._trim_sha = await cmd.script_load(self._trim_src)
        self._expire_sha = await cmd.script_load(self._expire_src)
        epoch = await self._epoch_call("")
        reads = self._reads_entries()
        heads: list[int | None] = []
        firsts: list[int | None] = []
        if reads:
            heads, firsts = await self._heads_and_firsts()
            if epoch == self._epoch:
                lost = await self._lost_shards(heads, firsts)
                if lost:
                    log.warning(
                        "bus: Redis lost entries of %d shard(s) it had delivered: new epoch",
                        len(lost),
                    )
                    epoch = await self._epoch_call(epoch)
        if epoch != self._epoch:
            if self._epoch is not None:
                log.warning("bus: epoch changed (%s -> %s)", self._epoch, epoch)
            self._last = [None] * self.shards
        self._epoch = epoch
        sink = self._sink
        if sink is not None:
            sink.on_bus_epoch(epoch)
        if reads:
            assert sink is not None
            load = [
                s
                for s in range(self.shards)
                if self._last[s] is None or (firsts[s] or 0) > (self._last[s] or 0)
            ]
            for s in load:
                head = heads[s] or 0
                floors, entries = await self._load_shard(s, head)
                if floors:
                    sink.on_bus_floors(floors)
                if entries:
                    sink.on_bus_entries(entries)
                    self._last_entry_at = loop.time()
                self._last[s] = head
                self._unread[s].clear()
            if load:
                log.info("bus: loaded the state of %d shard(s) from Redis", len(load))
        self._read_sent.clear()
        was = self._connected  # a resync while connected is not a new link
        self._connected = True
        self._streak.record_success(loop.time())
        if not was:
            log.info("bus: connected to Redis at %s (epoch %s)", self.shown_url, epoch)
            if sink is not None:
                sink.on_bus_connected(True)
        self._settle_first()

    async def _lost_shards(self, heads: list[int | None], firsts: list[int | None]) -> list[int]:
        """Shards where Redis no longer holds the last entry this client read
        although it was not trimmed: Redis came back from an older copy of its
        data (even if new entries were added since)."""
        lost = []
        check = []
        for s, last in enumerate(self._last):
            if last is None or last == 0:
                continue
            head = heads[s]
            if head is None or head < last:
                lost.append(s)
            elif (firsts[s] or 0) <= last:
                check.append(s)
        if check:
            replies = await self._many(
                [
                    ("XRANGE", self._logs[s], format_pos(p), format_pos(p))
                    for s in check
                    if (p := self._last[s]) is not None
                ]
            )
            lost += [s for s, reply in zip(check, replies, strict=True) if not reply]
        return lost

    async def _epoch_call(self, replace: str) -> str:
        new = secrets.token_hex(EPOCH_BYTES)
        args = (self._epoch_key, new, replace)
        try:
            value = await self._cmd.evalsha(self._epoch_sha, 1, *args)
        except NoScriptError:
            self._epoch_sha = await self._cmd.script_load(self._epoch_src)
            value = await self._cmd.evalsha(self._epoch_sha, 1, *args)
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run commands in one round trip (a pipeline; per node on a cluster)."""
        if not commands:
            return []
        pipe = self._cmd.pipeline(transaction=False) if not self.cluster else self._cmd.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        result: list[Any] = await pipe.execute()
        return result

    async def _heads_and_firsts(self) -> tuple[list[int | None], list[int | None]]:
        commands: list[tuple[Any, ...]] = []
        for name in self._logs:
            commands.append(("XREVRANGE", name, "+", "-", "COUNT", 1))
            commands.append(("XRANGE", name, "-", "+", "COUNT", 1))
        replies = await self._many(commands)
        heads = [pos_of(r[0][0]) if r else None for r in replies[0::2]]
        firsts = [pos_of(r[0][0]) if r else None for r in replies[1::2]]
        return heads, firsts

    async def _load_shard(self, shard: int, head: int) -> tuple[list[tuple[str, int]], list[Entry]]:
        """Every key of the shard's state topics and every retained event of its
        stream topics at a position <= `head`, oldest first, and the stream
        topics' floors (rule 4)."""
        topics = sorted(_text(t) for t in await self._cmd.smembers(self._topic_sets[shard]))
        streams = sorted(_text(t) for t in await self._cmd.hkeys(self._floors[shard]))
        out: list[Entry] = []
        floors: list[tuple[str, int]] = []
        upto = format_pos(head)
        for i in range(0, len(streams), 256):
            chunk = streams[i : i + 256]
            replies = await self._many(
                [
                    (
                        "EVALSHA",
                        self._history_sha,
                        2,
                        self._hist_key(t, shard),
                        self._floors[shard],
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
        for i in range(0, len(topics), 256):
            chunk = topics[i : i + 256]
            raws = await self._many([("HGETALL", self._state_key(t, shard)) for t in chunk])
            for topic, raw in zip(chunk, raws, strict=True):
                if isinstance(raw, list):  # a pipelined HGETALL may come back as pairs
                    raw = dict(zip(raw[0::2], raw[1::2], strict=True))
                for key, pos, data in parse_state(raw):
                    if pos <= head:
                        out.append((topic, key, pos, data))
        out.sort(key=lambda e: e[2])
        return floors, out

    async def _serve(self) -> None:
        """Run the readers and the probe until one of them fails (raises)."""
        loop = asyncio.get_running_loop()
        self._trouble = loop.create_future()
        tasks: list[asyncio.Future[Any]] = [self._trouble]
        if self._reads_entries():
            groups = (
                [[s] for s in range(self.shards)] if self.cluster else [list(range(self.shards))]
            )
            for g, shards in enumerate(groups):
                tasks.append(loop.create_task(self._read(g, shards), name=f"bus-redis-read-{g}"))
        else:
            tasks.append(loop.create_task(self._watch(), name="bus-redis-watch"))
        tasks.append(loop.create_task(self._probe(), name="bus-redis-probe"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises why it ended
            raise RedisError("a reader ended")  # pragma: no cover - they only end by raising
        finally:
            self._trouble = None
            await _stop(tasks)

    async def _read(self, group: int, shards: list[int]) -> None:
        """Rule 3: XREAD BLOCK the group's shards from their last IDs, forever."""
        loop = asyncio.get_running_loop()
        sink = self._sink
        assert sink is not None
        last = self._last
        of_log = self._shard_of_log
        timeout = self.block_ms / 1000.0 + READ_GRACE_S
        # COUNT <= MAXLEN: a stream trimmed past our last ID still holds >= MAXLEN
        # newer entries, so only a full reply can follow a gap (rule 4).
        count = min(READ_COUNT, self.stream_maxlen)
        while True:
            streams = {self._logs[s]: format_pos(last[s] or 0) for s in shards}
            self._read_sent[group] = loop.time()
            reply, trims = await asyncio.wait_for(self._xread(streams, count, shards), timeout)
            del self._read_sent[group]  # not waiting on Redis while handling the reply
            self._check_byte_trims(shards, reply, trims)
            if not reply:
                continue
            full = [of_log[name] for name, items in reply if len(items) >= count]
            if full:
                await self._check_trimmed(full)
            entries: list[Entry] = []
            for name, items in reply:
                s = of_log[name]
                for sid, fields in items:
                    entries.append(
                        (_text(fields[b"t"]), _text(fields[b"k"]), pos_of(sid), fields[b"d"])
                    )
                last[s] = entries[-1][2]
            self._last_entry_at = loop.time()
            sink.on_bus_entries(entries)

    async def _xread(
        self, streams: dict[str, str], count: int, shards: list[int]
    ) -> tuple[Any, list[Any]]:
        """XREAD BLOCK, then each shard's `trimmed` (rule 8): one pipelined
        round trip (two on a cluster)."""
        reader = self._reader
        metas = [self._metas[s] for s in shards]
        if self.cluster:
            reply = await reader.xread(streams, count=count, block=self.block_ms)
            return reply, [await reader.hget(m, "trimmed") for m in metas]
        pipe = reader.pipeline(transaction=False)
        pipe.xread(streams, count=count, block=self.block_ms)
        for m in metas:
            pipe.hget(m, "trimmed")
        reply, *trims = await pipe.execute()
        return reply, trims

    def _check_byte_trims(self, shards: list[int], reply: Any, trims: list[Any]) -> None:
        """Raise `_Resync` before delivering a reply when a byte trim removed
        entries of a shard this reader had not read (rule 8): the newest ID
        removed is above the last ID read, and the reply does not reach back
        to it (had it, the trim came after the read, and the next read checks)."""
        firsts: dict[int, int] | None = None
        for s, trimmed in zip(shards, trims, strict=True):
            if trimmed is None:
                continue
            cut = pos_of(trimmed)
            if cut <= (self._last[s] or 0):
                continue
            if firsts is None:
                firsts = {
                    self._shard_of_log[name]: pos_of(items[0][0]) for name, items in reply or ()
                }
            first = firsts.get(s)
            if first is None or first > cut:
                raise _Resync(f"shard {s}: entries not read yet were trimmed (stream_max_bytes)")

    async def _check_trimmed(self, shards: list[int]) -> None:
        """Raise `_Resync` (before anything of the reply is delivered) when a
        shard's first entry is after the last ID read: entries may be lost."""
        replies = await self._many(
            [("XRANGE", self._logs[s], "-", "+", "COUNT", 1) for s in shards]
        )
        for s, reply in zip(shards, replies, strict=True):
            last = self._last[s] or 0
            if reply and pos_of(reply[0][0]) > last:
                raise _Resync(f"shard {s}: trimmed past the last entry read (a reader fell behind)")

    async def _watch(self) -> None:
        """A publish-only client's link watch: a blocking read on a stream nobody
        writes, so a lost Redis shows at once, not at the next publish."""
        loop = asyncio.get_running_loop()
        idle = f"{self.prefix}:idle"
        timeout = self.block_ms / 1000.0 + READ_GRACE_S
        while True:
            self._read_sent[0] = loop.time()
            await asyncio.wait_for(
                self._reader.xread({idle: "$"}, count=1, block=self.block_ms), timeout
            )
            del self._read_sent[0]

    async def _probe(self) -> None:
        """Rule 6: once per `probe_interval_s`, the epoch, and heads for the
        lag; and the idle topics' expiry (rule 8)."""
        loop = asyncio.get_running_loop()
        reads = self._reads_entries()
        while True:
            await asyncio.sleep(self.probe_interval_s)
            epoch = await self._cmd.get(self._epoch_key)
            if epoch is None or epoch.decode() != self._epoch:
                raise _Resync("the epoch in Redis changed")
            if self._expires:
                await self._expire_topics()
            if not reads:
                continue
            heads, firsts = await self._heads_and_firsts()
            now = loop.time()
            for s in range(self.shards):
                last = self._last[s] or 0
                head = heads[s]
                if head is None:
                    if last > 0:
                        raise _Resync(f"shard {s}: the stream is gone")
                    continue
                if head < last:
                    raise _Resync(f"shard {s}: the stream ends before the last entry read")
                first = firsts[s] or 0
                if first > last:
                    raise _Resync(f"shard {s}: trimmed past the last entry read")
                unread = self._unread[s]
                while unread and unread[0][0] <= last:  # read since: bounded by unread heads
                    unread.popleft()
                if head > last and (not unread or unread[-1][0] < head):
                    unread.append((head, now))

    async def _expire_topics(self) -> None:
        """Remove every shard's topics idle past their deadline (expire.lua)."""
        commands = [
            (
                "EVALSHA",
                self._expire_sha,
                3,
                self._expiries[s],
                self._topic_sets[s],
                self._floors[s],
                f"{self.prefix}:{{s{s}}}:",
                EXPIRE_BATCH,
            )
            for s in range(self.shards)
        ]
        for s, gone in enumerate(await self._many(commands)):
            if gone:
                self.topics_expired += len(gone)
                log.info("bus: %d idle topic(s) of shard %d expired", len(gone), s)

    def _set_down(self) -> None:
        was = self._connected
        self._connected = False
        self._read_sent.clear()
        for unread in self._unread:
            unread.clear()
        if was:
            if not self._closed:
                log.warning("bus: lost Redis; reconnecting")
            if self._sink is not None:
                self._sink.on_bus_connected(False)

    def _settle_first(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    # -- publishing -------------------------------------------------------------------

    def _shard(self, topic: str) -> int:
        s = self._shard_cache.get(topic)
        if s is None:
            if len(self._shard_cache) >= SHARD_CACHE_MAX:  # names come from clients
                self._shard_cache.clear()
            s = self._shard_cache[topic] = shard_of(topic, self.shards)
        return s

    def _state_key(self, topic: str, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:state:{topic}"

    def _hist_key(self, topic: str, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:hist:{topic}"

    def _calls(self, updates: Sequence[Update]) -> list[_Call]:
        """Group a request's updates by shard (order kept); refuse what breaks
        rule 1 of engine/bus/limits.py, and an empty key for a state topic."""
        bounds.check_updates(updates, self.limits.max_data_bytes)
        by_shard: dict[int, _Call] = {}
        history_of = self._history_of
        expiry_of = self._expiry_of if self._expires else None
        for i, u in enumerate(updates):
            history = history_of(u.topic)
            if history is None and not u.key:
                raise BusError(f"update {i}: a state topic's key must not be empty")
            s = self._shard(u.topic)
            call = by_shard.get(s)
            if call is None:
                call = by_shard[s] = (s, [], [], [], None if expiry_of is None else [])
            if history is None:
                call[1].append(self._state_key(u.topic, s))
                call[2].extend((u.topic, u.key, bytes(u.data), -1))
            else:
                call[1].append(self._hist_key(u.topic, s))
                call[2].extend((u.topic, u.key, bytes(u.data), history))
            call[3].append(i)
            if expiry_of is not None:
                expiries = call[4]
                assert expiries is not None
                expiries.append(round(expiry_of(u.topic) * 1000))
        return list(by_shard.values())

    async def _publish_loop(self) -> None:
        """Send queued requests, batch by batch (rule 1). An error in one batch
        fails that batch's requests only (rule 8); the loop goes on."""
        queue = self._queue
        if queue:  # restarted (rule 10): what was queued meanwhile is sent
            self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                if not self._connected:
                    self._fail_queued("not connected to Redis")
                    break
                batch = [queue.popleft() for _ in range(min(PIPELINE_REQUESTS, len(queue)))]
                batch = [req for req in batch if not req.settled]  # timed out while queued
                if not batch:
                    continue
                self._sending = batch  # settled by close() if cancelled meanwhile
                try:
                    await self._send(batch)
                except _REDIS_DOWN as exc:
                    for req in batch:
                        req.settle(BusUnavailable(f"Redis: {exc}"))
                    self._fail_queued(f"Redis: {exc}")
                    if self._trouble is not None and not self._trouble.done():
                        self._trouble.set_exception(exc)
                    break
                except Exception as exc:  # a bug or a value Redis' client cannot send
                    log.exception("bus: a publish batch failed; its requests are refused")
                    for req in batch:
                        req.settle(BusError(f"the publish failed: {type(exc).__name__}: {exc}"))
                if self._trim_due:
                    await self._trim_shards()

    def _merge(self, batch: list[_Request]) -> list[_Merged]:
        """Script calls for `batch`: per shard, consecutive requests share a
        call (up to MERGE_UPDATES updates), each request its own segment
        (checked and applied whole by the script). Order kept per shard."""
        merged: list[_Merged] = []
        current: dict[int, int] = {}  # shard -> its call being filled in `merged`
        for req in batch:
            for shard, state_keys, argv, indices, expiries in req.calls:
                m = current.get(shard)
                if m is None or merged[m].updates + len(indices) > MERGE_UPDATES:
                    m = current[shard] = len(merged)
                    merged.append(_Merged(shard, self._shard_keys[shard]))
                call = merged[m]
                if expiries is not None:
                    call.expiries.extend(
                        f"{call.updates + j + 1}:{ms}" for j, ms in enumerate(expiries) if ms > 0
                    )
                call.keys.extend(state_keys)
                call.argv.extend(argv)
                call.counts.append(len(indices))
                call.updates += len(indices)
                call.segments.append((req, indices))
        return merged

    async def _send(self, batch: list[_Request]) -> None:
        """Send the batch: the script calls of `_merge`, in one pipeline round
        trip, or one call at a time on a cluster; then settle every request."""
        merged = self._merge(batch)
        sha = self._publish_sha
        head = self._script_head
        calls = [
            (
                call.keys,
                [*head, ",".join(map(str, call.counts)), ",".join(call.expiries), *call.argv],
            )
            for call in merged
        ]
        replies: list[Any]
        if self.cluster:
            replies = []
            for keys, args in calls:
                try:
                    replies.append(await self._cmd.evalsha(sha, len(keys), *keys, *args))
                except ResponseError as exc:  # NOSCRIPT and OOM included: that call did not run
                    replies.append(exc)
                except _REDIS_DOWN as exc:  # the calls before it were published: say so
                    down = RedisConnectionError(f"Redis: {exc}")
                    replies.extend([down] * (len(merged) - len(replies)))
                    if self._trouble is not None and not self._trouble.done():
                        self._trouble.set_exception(down)
                    break
        else:
            pipe = self._cmd.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        failed: dict[int, BusError] = {}
        for call, reply in zip(merged, replies, strict=True):
            if isinstance(reply, Exception):
                err = self._call_error(call.shard, reply)
                for req, _ in call.segments:
                    failed.setdefault(id(req), err)
                continue
            if reply[-1] == 1:
                self._trim_due.add(call.shard)
            for (req, indices), ids in zip(call.segments, reply, strict=False):
                if ids and ids[0] == b"!":
                    _, code, topic, key = (x.decode(errors="replace") for x in ids)
                    failed.setdefault(id(req), self._refusal(code, topic, key))
                    continue
                for i, sid in zip(indices, ids, strict=True):
                    req.results[i] = pos_of(sid)
        for req in batch:
            err_ = failed.get(id(req))
            req.settle(err_ if err_ is not None else req.results)

    def _call_error(self, shard: int, reply: Exception) -> BusError:
        """What a script call's error means for its requests (rules 1, 9)."""
        if isinstance(reply, RedisConnectionError):  # BusyLoadingError: Redis is starting
            return BusUnavailable(f"Redis: {reply}")
        if isinstance(reply, OutOfMemoryError) or str(reply).startswith("OOM"):
            self.oom_refusals += 1
            self._trim_due.add(-1)  # an emergency trim (rule 9)
            return BusUnavailable(
                "Redis is out of memory (maxmemory): nothing was published; trimming the"
                " largest stream (size maxmemory by docs/kubernetes.md, Sizing the Redis bus)"
            )
        if isinstance(reply, NoScriptError | ResponseError) and "NOSCRIPT" in str(reply):
            if self._trouble is not None and not self._trouble.done():
                self._trouble.set_exception(RedisError("NOSCRIPT"))
            return BusUnavailable("Redis lost the publish script; reconnecting")
        return BusError(f"Redis refused the publish: {reply}")

    def _refusal(self, code: str, topic: str, key: str) -> BusError:
        if code == ErrorCode.TOO_MANY_KEYS:
            return bounds.too_many_keys(topic, key, self.limits.max_keys_per_topic)
        if code == ErrorCode.TOO_MANY_TOPICS:
            return bounds.too_many_topics(topic, self._topics_per_shard)
        return BusError(f"Redis refused the publish of {topic!r}: {code}")

    async def _trim_shards(self) -> None:
        """Run trim.lua for the shards whose byte check is due (rule 8); after a
        maxmemory refusal (rule 9), at most once per OOM_TRIM_INTERVAL_S, for
        the shard whose stream takes the most memory, down to OOM_TRIM_FRACTION
        of it."""
        due, self._trim_due = self._trim_due, set()
        targets: dict[int, int] = {}  # shard -> budget
        if self.stream_max_bytes > 0:
            targets.update((s, self.stream_max_bytes) for s in due if s >= 0)
        if -1 in due:
            now = asyncio.get_running_loop().time()
            if now - self._oom_trimmed >= OOM_TRIM_INTERVAL_S:
                self._oom_trimmed = now
                try:
                    usages = await self._many(
                        [("MEMORY", "USAGE", log, "SAMPLES", 0) for log in self._logs]
                    )
                except Exception as exc:
                    log.warning("bus: measuring the streams failed: %s", exc)
                    usages = []
                sizes = [int(u or 0) for u in usages]
                if sizes and max(sizes) > 0:
                    shard = sizes.index(max(sizes))
                    targets[shard] = min(
                        int(sizes[shard] * OOM_TRIM_FRACTION),
                        targets.get(shard, sizes[shard]),
                    )
        for shard, target in sorted(targets.items()):
            try:
                removed, before = await self._cmd.evalsha(
                    self._trim_sha, 2, self._logs[shard], self._metas[shard], target, TRIM_KEEP
                )
            except Exception as exc:  # the next check or refusal tries again
                log.warning("bus: trimming shard %d's stream failed: %s", shard, exc)
                continue
            if removed:
                self.byte_trims += int(removed)
                log.info(
                    "bus: trimmed %d entries of shard %d's stream (%d bytes, budget %d)",
                    removed,
                    shard,
                    before,
                    target,
                )

    def _fail_queued(self, why: str) -> None:
        while self._queue:
            self._queue.popleft().settle(BusUnavailable(why))


async def _stop(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are done.

    Cancels again while any is still running: a library that swallows one
    cancellation (seen with redis-py under load) must not leave a task running
    or its owner waiting forever. If the caller is cancelled meanwhile, the
    tasks are still stopped first, then the cancellation goes on.
    """
    interrupted = False
    for _ in range(200):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        try:
            await asyncio.wait(pending, timeout=0.05)
        except asyncio.CancelledError:
            interrupted = True
    else:
        log.error("bus: %d task(s) would not stop", sum(not t.done() for t in tasks))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" warning
    if interrupted:
        raise asyncio.CancelledError
