"""Publishing on the redis bus: the publish queue, its loop, and the trims.

Rules:

1. A publish is `engine/bus/lua/publish.lua`, one script call per shard: it
   XADDs ONE entry for the call's accepted updates (`MAXLEN ~
   bus.redis.stream_maxlen` entries; layout.py rule 5: the updates packed
   here, once per request, with msgpack) and records each key's `(pos,
   data)` in the state hash, atomically. A request's updates of one shard go
   as runs of one topic each (grouped here, in order within a topic: a
   topic's key, history and idle expiry are sent once per run, two strings
   per update). Positions are consecutive stream sequence numbers
   (`make_pos(ms, seq)`), the entry's ID the last of them; a reply is each
   request's first position. **Atomicity is per shard**: a batch whose topics
   span shards is one script call per shard; if the link breaks between two of
   them, part of the batch may be published (the local hub is atomic per batch).
   Publishes are sent in rounds, in call order, on one connection of their
   own (engine/bus/redis/pipe.py): a round is everything queued (up to
   `ROUND_UPDATES` updates), one script call per shard (the requests of a
   shard share it, up to `MERGE_UPDATES` updates), so two publishes of one
   topic get positions in call order, across rounds in flight too (rule 7).
   Each request is acked with its own positions. A stream topic's update (the `[[topics]]` rules this client is
   given decide; all publishers must share them) is appended to the topic's
   history stream, trimmed to `history` exactly, instead of a state hash;
   its key may be "".
2. `publish` fails fast with `BusUnavailable` while the client is not
   connected, and when `MAX_QUEUED` requests already wait (the overflow policy
   of the publish queue). A request that was sent and whose reply was lost with
   the connection is reported `BusUnavailable` too, though Redis may have
   applied it (no client can know; a retry publishes the same value again,
   which is harmless for state topics).
3. Bounds (`engine/bus/limits.py`): a publish is checked before it is queued
   (strings encodable as UTF-8, `data` within `max_data_bytes`: a bad value
   fails its own request, never the publish loop); the key and topic counts
   are checked by the script, per request (one request refused, the others
   of the same script call applied). An error in one batch fails that
   batch's requests only; the loop goes on.
4. A stream's memory is bounded by `stream_max_bytes` as well as
   `stream_maxlen`: every `BYTES_CHECKS`-th of the budget published,
   `trim.lua` measures it (MEMORY USAGE) and removes its oldest entries,
   recording the newest ID removed (`trimmed`; the reader checks it,
   engine/bus/redis/reader.py rule 5).
5. Redis out of memory (`maxmemory`, the script is refused up front): the
   request fails `BusUnavailable` saying so (counted: `oom_refusals`) and the
   stream taking the most memory is trimmed to half its size at once
   (`trim.lua` runs even when Redis is full), at most once per
   `OOM_TRIM_INTERVAL_S`; so a Redis filled by the streams recovers by
   itself. Filled by state (keys x `data`), it refuses publishes until
   topics expire or an operator acts: size `maxmemory` by
   docs/kubernetes.md ("Sizing the Redis bus"). A script Redis lost
   (NOSCRIPT) fails its requests `BusUnavailable` and resyncs the link.
6. Nothing waits on Redis without a bound: every publish gets a reply or
   `BusUnavailable` within `publish_timeout_s`, from one timer for them all
   (`expire_requests`). The loop is supervised by the bus (a restarted loop
   first sends what was queued while it was down; the rounds in flight when
   it failed are answered `BusUnavailable`: they may have been applied).
7. Rounds in flight: the loop sends the next round while Redis runs the
   previous ones (the client builds round k+1 while Redis runs round k), at
   most `bus.redis.max_inflight_batches` not yet answered. Overflow policy:
   when that many are in flight the loop waits for the oldest one's replies
   (bounded by the connection's `COMMAND_TIMEOUT_S`); requests keep queueing
   meanwhile, and past `MAX_QUEUED` they fail fast (rule 2). On a Redis
   Cluster, rounds go one script call at a time (no pipe).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, Final

from msgpack import packb
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

import engine.bus.limits as bounds
from engine.bus.backend import CallbackGuard
from engine.bus.base import ExpiryOf, HistoryOf, PublishDone, Update
from engine.bus.limits import Limits
from engine.bus.redis.layout import pos_of
from engine.bus.redis.link import REDIS_DOWN, Link, log
from engine.bus.redis.pipe import Pipe
from engine.bus.tasks import TaskHealth
from engine.codes import ErrorCode
from engine.errors import BusError, BusUnavailable

_call = CallbackGuard(log, "bus: a publish callback failed")
_PLUS_MAX: Final = 1024
_PLUS: Final = [b"+%d " % j for j in range(_PLUS_MAX)]  # publish.lua's "+<j> " prefixes

MAX_QUEUED: Final = 10_000  # publish requests waiting to be sent; more: BusUnavailable
ROUND_UPDATES: Final = 16_000  # updates per round at most (rule 1; at least one request)
MERGE_UPDATES: Final = 1000  # updates per script call at most (a script blocks Redis while it runs)
BYTES_CHECKS: Final = 16  # byte checks per `stream_max_bytes` published (rule 4)
OOM_TRIM_INTERVAL_S: Final = 0.25  # emergency trims at most this often (rule 5)
OOM_TRIM_FRACTION: Final = 0.5  # ... down to this share of the stream's memory
TRIM_KEEP: Final = 1  # a byte trim leaves the newest entry: the head stays known

# a round sent and not answered yet: its requests and their script calls
_Round = tuple[list["_Request"], list["_Merged"]]


class _Part:
    """A request's updates of one shard, as runs of one topic each (rule 1)."""

    __slots__ = ("indices", "kv", "packed", "runs", "shard")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        # per topic: its state hash or history stream, the topic, its history
        # (-1: a state topic), its updates, its idle expiry in ms (0: none)
        self.runs: list[tuple[str, str, int, int, int]] = []
        self.kv: list[Any] = []  # key, "+<j> <data>" per update (publish.lua ARGV)
        self.indices: list[int] = []  # each update's index in the request
        self.packed = b""  # the entry's part: msgpack [topic, [key, data, ...], ...]


class _Merged:
    """One script call of publish.lua being built (`Publisher._merge`)."""

    __slots__ = (
        "expiries",
        "histories",
        "keys",
        "kv",
        "lengths",
        "packed",
        "runs",
        "segments",
        "shard",
        "topics",
        "updates",
    )

    def __init__(self, shard: int, shard_keys: list[str]) -> None:
        self.shard = shard
        self.keys = list(shard_keys)  # KEYS[1..5], then one per run
        self.runs: list[int] = []  # runs per request
        self.lengths: list[int] = []  # updates per run
        self.histories: list[int] = []  # per run
        self.topics: list[str] = []  # per run
        self.expiries: list[str] = []  # "g:ms" for runs of expiring topics
        self.kv: list[Any] = []  # 2 per update
        self.packed: list[bytes] = []  # one per request
        self.updates = 0
        self.segments: list[tuple[_Request, list[int]]] = []  # request, its indices


class _Request:
    """One publish waiting for Redis. Settled once: by its reply, a failure, or its deadline."""

    __slots__ = ("calls", "deadline", "done", "results", "settled")

    def __init__(self, calls: list[_Part], done: PublishDone, deadline: float):
        self.calls = calls  # per shard: its runs, ARGV and indices in the request
        self.done = done
        self.deadline = deadline  # loop time: BusUnavailable past it (rule 6)
        self.results: list[int] = [0] * sum(len(c.indices) for c in calls)
        self.settled = False

    def settle(self, result: Sequence[int] | BusError) -> None:
        if self.settled:
            return
        self.settled = True
        _call(self.done, result)


def _no_expiry(topic: str) -> float:
    return 0.0


class Publisher:
    """The publish queue of one bus client and the loop that sends it (rules 1-6)."""

    def __init__(
        self,
        link: Link,
        health: TaskHealth,
        *,
        history_of: HistoryOf,
        limits: Limits,
        stream_maxlen: int,
        stream_max_bytes: int,
        publish_timeout_s: float,
        expiry_of: ExpiryOf | None,
        max_inflight_batches: int = 4,
    ) -> None:
        self.link = link
        self.layout = link.layout
        self.health = health
        self.limits = limits
        self.stream_max_bytes = stream_max_bytes
        self.publish_timeout_s = publish_timeout_s
        self.max_inflight_batches = max(1, max_inflight_batches)
        self._history_of = history_of
        self._expiry_of = expiry_of or _no_expiry
        self._expires = expiry_of is not None
        self._topics_per_shard = limits.topics_per_shard(link.layout.shards)
        self._script_head = [
            stream_maxlen,
            limits.max_keys_per_topic,
            self._topics_per_shard,
            stream_max_bytes,
            max(1, stream_max_bytes // BYTES_CHECKS),
        ]
        self.oom_refusals = 0  # publishes Redis refused for maxmemory (rule 5)
        self.publish_timeouts = 0  # requests that got no reply within publish_timeout_s
        self.byte_trims = 0  # entries removed by byte trims (rule 4)
        self._oom_trimmed = -OOM_TRIM_INTERVAL_S  # loop time of the last emergency trim
        self._trim_due: set[int] = set()  # shards whose byte check is due
        self._inflight: collections.deque[_Round] = collections.deque()  # rule 7
        self._pipe: Pipe | None = None  # rule 1: the publishes' own connection
        self._answered = asyncio.Event()  # a round was answered: room for the next
        self._deadlines: asyncio.TimerHandle | None = None  # rule 6: the next deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self.queue: collections.deque[_Request] = collections.deque()
        self.wake = asyncio.Event()  # read anew by every wait: tests replace it

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.wake = asyncio.Event()
        self._answered = asyncio.Event()

    # -- the caller's side ------------------------------------------------------------

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        """Queue a publish; `done` gets its positions or a `BusError` later
        (rules 1-3, 5-6), within `publish_timeout_s`."""
        link = self.link
        loop = self._loop or asyncio.get_running_loop()
        if not (link.connected and not self.health.down) or link.closed:
            loop.call_soon(_call, done, BusUnavailable("not connected to Redis"))
            return
        if len(self.queue) >= MAX_QUEUED:
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
        self.queue.append(_Request(calls, done, loop.time() + self.publish_timeout_s))
        if self._deadlines is None:
            self._deadlines = loop.call_later(self.publish_timeout_s, self._expire_requests)
        self.wake.set()

    def _calls(self, updates: Sequence[Update]) -> list[_Part]:
        """A request's updates by shard, and by topic within a shard (rule 1:
        a topic's updates keep their order, so a key's positions do); refuse
        what breaks rule 1 of engine/bus/limits.py, and an empty key for a
        state topic."""
        bounds.check_updates(updates, self.limits.max_data_bytes)
        by_topic: dict[str, list[int]] = {}
        for i, u in enumerate(updates):
            group = by_topic.get(u.topic)
            if group is None:
                by_topic[u.topic] = [i]
            else:
                group.append(i)
        parts: dict[int, _Part] = {}
        layout = self.layout
        for topic, group in by_topic.items():
            history = self._history_of(topic)
            s = layout.shard(topic)
            part = parts.get(s)
            if part is None:
                part = parts[s] = _Part(s)
            if history is None:
                tkey = layout.state_key(topic, s)
                if not all(updates[i].key for i in group):
                    i = next(i for i in group if not updates[i].key)
                    raise BusError(f"update {i}: a state topic's key must not be empty")
            else:
                tkey = layout.hist_key(topic, s)
            expiry = round(self._expiry_of(topic) * 1000) if self._expires else 0
            part.runs.append((tkey, topic, -1 if history is None else history, len(group), expiry))
            kv, indices = part.kv, part.indices
            kd: list[Any] = []
            for i in group:
                u = updates[i]
                data = u.data if type(u.data) is bytes else bytes(u.data)
                j = len(indices)
                # "+<j> <data>": publish.lua prefixes the request's first position
                kv += (u.key, _PLUS[j] + data if j < _PLUS_MAX else b"+%d %s" % (j, data))
                kd += (u.key, data)
                indices.append(i)
            part.packed += packb((topic, kd))  # the entry's part (layout.py rule 5)
        return list(parts.values())

    def _expire_requests(self) -> None:
        """One timer for every request (rule 6): requests are sent in queue
        order and share one timeout, so deadlines grow along the batch being
        sent (oldest round first), then the queue. Settles those past theirs with BusUnavailable
        (one that was sent may still be applied, like a reply lost with the
        link) and sets the timer for the next one."""
        loop = self._loop or asyncio.get_running_loop()
        self._deadlines = None
        now = loop.time()
        why = f"no reply from Redis within bus.publish_timeout_s ({self.publish_timeout_s:g} s)"
        queue = self.queue
        for req in self._sent():
            if not req.settled and req.deadline <= now:
                self.publish_timeouts += 1
                req.settle(BusUnavailable(why))
        while queue and (queue[0].settled or queue[0].deadline <= now):
            req = queue.popleft()
            if not req.settled:
                self.publish_timeouts += 1
                req.settle(BusUnavailable(why))
        waiting = [r.deadline for r in self._sent() if not r.settled]
        if queue:
            waiting.append(queue[0].deadline)
        if waiting:
            self._deadlines = loop.call_at(min(waiting), self._expire_requests)

    def _sent(self) -> list[_Request]:
        """The requests of the rounds in flight, oldest first."""
        return [req for batch, _ in self._inflight for req in batch]

    async def drain(self, deadline: float) -> None:
        """Wait (until loop time `deadline` at most) for the queue to be sent and answered."""
        loop = asyncio.get_running_loop()
        while (self.queue or self._inflight) and self.link.connected and loop.time() < deadline:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Settle everything still waiting (the loop is stopped): BusUnavailable."""
        if self._deadlines is not None:
            self._deadlines.cancel()
            self._deadlines = None
        for req in self._sent():
            req.settle(BusUnavailable("the bus client was closed"))
        self._inflight.clear()
        self.fail_queued("the bus client was closed")

    def fail_queued(self, why: str) -> None:
        while self.queue:
            self.queue.popleft().settle(BusUnavailable(why))

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Send queued requests round by round, several rounds in flight (rules
        1, 7). An error in one round fails that round's requests only (rule 3);
        the loop goes on."""
        queue = self.queue
        link = self.link
        if queue:  # restarted (rule 6): what was queued meanwhile is sent
            self.wake.set()
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while queue:
                    if not link.connected:
                        self.fail_queued("not connected to Redis")
                        break
                    await self._room()
                    batch = self._take()
                    if batch and not await self._send_round(batch):
                        break
                if self._trim_due:
                    await self._trim_shards()
        finally:
            await self._drop_pipe()  # rule 6: what was in flight is answered BusUnavailable

    async def _room(self) -> None:
        """Rule 7's overflow policy: wait while `max_inflight_batches` rounds
        are in flight (each is answered, or fails with the link, within the
        connection's timeout)."""
        while len(self._inflight) >= self.max_inflight_batches:
            self._answered.clear()
            await self._answered.wait()

    def _take(self) -> list[_Request]:
        """The next round: the queued requests not settled yet, oldest first,
        up to ROUND_UPDATES updates (at least one request)."""
        queue = self.queue
        batch: list[_Request] = []
        updates = 0
        while queue and (not batch or updates + len(queue[0].results) <= ROUND_UPDATES):
            req = queue.popleft()
            if not req.settled:  # else it timed out while queued
                batch.append(req)
                updates += len(req.results)
        return batch

    async def _send_round(self, batch: list[_Request]) -> bool:
        """Send `batch` as one round; False when the link broke (the queue failed)."""
        try:
            await self._send(batch)
        except REDIS_DOWN as exc:
            for req in batch:
                req.settle(BusUnavailable(f"Redis: {exc}"))
            self.fail_queued(f"Redis: {exc}")
            self.link.fail(exc)
            return False
        except Exception as exc:  # a bug or a value Redis' client cannot send
            log.exception("bus: a publish batch failed; its requests are refused")
            for req in batch:
                req.settle(BusError(f"the publish failed: {type(exc).__name__}: {exc}"))
        return True

    def _merge(self, batch: list[_Request]) -> list[_Merged]:
        """Script calls for `batch`: per shard, consecutive requests share a
        call (up to MERGE_UPDATES updates), each request its own segment
        (checked and applied whole by the script). Order kept per shard."""
        merged: list[_Merged] = []
        current: dict[int, int] = {}  # shard -> its call being filled in `merged`
        shard_keys = self.layout.shard_keys
        for req in batch:
            for part in req.calls:
                shard = part.shard
                m = current.get(shard)
                if m is None or merged[m].updates + len(part.indices) > MERGE_UPDATES:
                    m = current[shard] = len(merged)
                    merged.append(_Merged(shard, shard_keys[shard]))
                call = merged[m]
                for tkey, topic, history, length, expiry in part.runs:
                    if expiry > 0:
                        call.expiries.append(f"{len(call.topics) + 1}:{expiry}")
                    call.keys.append(tkey)
                    call.topics.append(topic)
                    call.histories.append(history)
                    call.lengths.append(length)
                call.runs.append(len(part.runs))
                call.kv += part.kv
                call.packed.append(part.packed)
                call.updates += len(part.indices)
                call.segments.append((req, part.indices))
        return merged

    async def _send(self, batch: list[_Request]) -> None:
        """Send the batch as one round: the script calls of `_merge`, written on
        the pipe and answered later (`_round_answered`), or one call at a time
        on a cluster; raises what a lost link raises."""
        merged = self._merge(batch)
        head = self._script_head
        sha = self.link.scripts.sha["publish"]
        commands = [
            (
                "EVALSHA",
                sha,
                len(call.keys),
                *call.keys,
                *head,
                packb(call.runs),
                ",".join(call.expiries),
                packb(call.lengths),
                packb(call.histories),
                *call.topics,
                *call.kv,
                *call.packed,
            )
            for call in merged
        ]
        rnd: _Round = (batch, merged)
        self._inflight.append(rnd)  # settled by close() if cancelled meanwhile
        try:
            if self.link.cluster:
                replies = await self._run_calls(commands)
                self._inflight.remove(rnd)
                self._settle(batch, merged, replies)
                return
            pipe = await self._live_pipe()
            answer = await pipe.send(commands)
        except BaseException:
            if rnd in self._inflight:
                self._inflight.remove(rnd)
            raise
        answer.add_done_callback(lambda f: self._round_answered(rnd, f))

    async def _live_pipe(self) -> Pipe:
        """The pipe, made anew when the last one broke with the link (pipe.py
        rule 4) or the link synced since it was made (link.py rule 3)."""
        pipe, syncs = self._pipe, self.link.syncs
        # made before the last sync and idle: its connection may be dead (one
        # with rounds in flight fails them by itself if it is: pipe.py rule 4)
        if pipe is None or pipe.broken or (pipe.syncs != syncs and not pipe.inflight):
            await self._drop_pipe()
            pipe = self._pipe = Pipe(self.link.cmd, syncs)
        return pipe

    async def _drop_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.close()  # fails its rounds in flight: `_round_answered` settles them

    def _round_answered(self, rnd: _Round, answer: asyncio.Future[list[Any]]) -> None:
        """A round's replies (or the link's failure) came: settle its requests
        (rules 3, 5), make room for the next round (rule 7)."""
        if rnd in self._inflight:
            self._inflight.remove(rnd)
        self._answered.set()
        batch, merged = rnd
        exc = answer.exception() if not answer.cancelled() else BusUnavailable("cancelled")
        if exc is None:
            try:
                self._settle(batch, merged, answer.result())
            except Exception as bug:
                log.exception("bus: a publish batch failed; its requests are refused")
                for req in batch:
                    req.settle(BusError(f"the publish failed: {type(bug).__name__}: {bug}"))
        else:
            why = exc if isinstance(exc, BusUnavailable) else BusUnavailable(f"Redis: {exc}")
            for req in batch:
                req.settle(why)
            if not isinstance(exc, BusUnavailable):  # the link broke (pipe.py rule 4)
                self.fail_queued(str(why))
                self.link.fail(exc)
        if self._trim_due:
            self.wake.set()  # the loop runs the trims

    def _settle(self, batch: list[_Request], merged: list[_Merged], replies: list[Any]) -> None:
        """Settle every request of a round from its script calls' replies."""
        failed: dict[int, BusError] = {}
        for call, reply in zip(merged, replies, strict=True):
            if isinstance(reply, Exception):
                err = self._call_error(reply)
                for req, _ in call.segments:
                    failed.setdefault(id(req), err)
                continue
            if reply[-1] == 1:
                self._trim_due.add(call.shard)
            for (req, indices), first in zip(call.segments, reply, strict=False):
                if isinstance(first, list):  # {'!', code, topic, key}
                    _, code, topic, key = (x.decode(errors="replace") for x in first)
                    failed.setdefault(id(req), self._refusal(code, topic, key))
                    continue
                # the request's updates have consecutive positions (publish.lua)
                results = req.results
                for j, i in enumerate(indices, pos_of(first)):
                    results[i] = j
        for req in batch:
            err_ = failed.get(id(req))
            req.settle(err_ if err_ is not None else req.results)

    async def _run_calls(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """A cluster's round: one script call at a time (each to its shard's
        node); one reply per call (an exception for a call that failed)."""
        cmd = self.link.cmd
        replies: list[Any] = []
        for command in commands:
            try:
                replies.append(await cmd.execute_command(*command))
            except ResponseError as exc:  # NOSCRIPT and OOM included: that call did not run
                replies.append(exc)
            except REDIS_DOWN as exc:  # the calls before it were published: say so
                down = RedisConnectionError(f"Redis: {exc}")
                replies.extend([down] * (len(commands) - len(replies)))
                self.link.fail(down)
                break
        return replies

    def _call_error(self, reply: Exception) -> BusError:
        """What a script call's error means for its requests (rules 1, 5)."""
        if isinstance(reply, RedisConnectionError):  # BusyLoadingError: Redis is starting
            return BusUnavailable(f"Redis: {reply}")
        if isinstance(reply, OutOfMemoryError) or str(reply).startswith("OOM"):
            self.oom_refusals += 1
            self._trim_due.add(-1)  # an emergency trim (rule 5)
            return BusUnavailable(
                "Redis is out of memory (maxmemory): nothing was published; trimming the"
                " largest stream (size maxmemory by docs/kubernetes.md, Sizing the Redis bus)"
            )
        if isinstance(reply, NoScriptError | ResponseError) and "NOSCRIPT" in str(reply):
            self.link.fail(RedisError("NOSCRIPT"))
            return BusUnavailable("Redis lost the publish script; reconnecting")
        return BusError(f"Redis refused the publish: {reply}")

    def _refusal(self, code: str, topic: str, key: str) -> BusError:
        if code == ErrorCode.TOO_MANY_KEYS:
            return bounds.too_many_keys(topic, key, self.limits.max_keys_per_topic)
        if code == ErrorCode.TOO_MANY_TOPICS:
            return bounds.too_many_topics(topic, self._topics_per_shard)
        return BusError(f"Redis refused the publish of {topic!r}: {code}")

    # -- trims ------------------------------------------------------------------------

    async def _trim_shards(self) -> None:
        """Run trim.lua for the shards whose byte check is due (rule 4); after a
        maxmemory refusal (rule 5), at most once per OOM_TRIM_INTERVAL_S, for
        the shard whose stream takes the most memory, down to OOM_TRIM_FRACTION
        of it."""
        due, self._trim_due = self._trim_due, set()
        targets: dict[int, int] = {}  # shard -> budget
        if self.stream_max_bytes > 0:
            targets.update((s, self.stream_max_bytes) for s in due if s >= 0)
        if -1 in due:
            await self._emergency_target(targets)
        layout = self.layout
        for shard, target in sorted(targets.items()):
            try:
                removed, before = await self.link.cmd.evalsha(
                    self.link.scripts.sha["trim"],
                    2,
                    layout.logs[shard],
                    layout.metas[shard],
                    target,
                    TRIM_KEEP,
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

    async def _emergency_target(self, targets: dict[int, int]) -> None:
        """Add the emergency trim of rule 5 to `targets` (shard -> budget),
        unless one ran within OOM_TRIM_INTERVAL_S."""
        now = asyncio.get_running_loop().time()
        if now - self._oom_trimmed < OOM_TRIM_INTERVAL_S:
            return
        self._oom_trimmed = now
        try:
            usages = await self.link.many(
                [("MEMORY", "USAGE", name, "SAMPLES", 0) for name in self.layout.logs]
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
