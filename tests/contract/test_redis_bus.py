"""What only the redis backend has to prove (the shared contract is
test_bus_contract.py): resuming from the last ID after Redis restarts with its
data, reloading the state when a reader fell behind past the stream's trimming,
the lag of a reader whose link stalls, and an epoch change when Redis comes
back with less than a reader had seen."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from engine.backoff import Backoff
from engine.bus import Update
from engine.bus.limits import Limits
from engine.bus.redis.layout import VERSION as LAYOUT_VERSION
from engine.bus.redis.layout import pos_of
from engine.bus.redis_streams import RedisBus
from engine.errors import BusError, BusUnavailable
from tests.contract.conftest import Recorder, until
from tests.support.redis_server import RedisServer, redis_available
from tests.support.tcpproxy import StallProxy

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


def val(x: object) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


class OrderedRecorder(Recorder):
    """Also checks what the worker's core relies on: an entry that changes a key
    is never below a position its topic already reached."""

    def __init__(self) -> None:
        super().__init__()
        self.topic_pos: dict[str, int] = {}
        self.below: list[tuple[str, str, int]] = []

    def on_bus_epoch(self, epoch: str) -> None:
        if self.epochs and self.epochs[-1] != epoch:
            self.topic_pos.clear()
        super().on_bus_epoch(epoch)

    def on_bus_entries(self, entries: Any) -> None:
        for topic, key, pos, _data in entries:
            held = self.state.get((topic, key))
            if held is None or pos > held[0]:
                if pos < self.topic_pos.get(topic, 0):
                    self.below.append((topic, key, pos))
                self.topic_pos[topic] = max(pos, self.topic_pos.get(topic, 0))
        super().on_bus_entries(entries)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True).start()
    yield server
    server.close()


async def test_resume_after_a_restart_with_data_skips_nothing(redis: RedisServer) -> None:
    sink = OrderedRecorder()
    reader = RedisBus(redis.url, shards=4)
    pub = RedisBus(redis.url, shards=4, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        before = [await pub.publish_wait([Update("r.t", f"k{i}", val(i))]) for i in range(20)]
        await until(lambda: ("r.t", before[-1][0]) in sink.marks(), "entries before")
        epoch = reader.epoch
        await asyncio.to_thread(redis.kill)
        await until(lambda: not reader.connected and not pub.connected, "the outage seen")
        with pytest.raises(BusUnavailable):
            await pub.publish_wait([Update("r.t", "never", val(0))])
        await asyncio.to_thread(redis.start)
        await until(lambda: reader.connected and pub.connected, "reconnected")
        assert reader.epoch == pub.epoch == epoch, "the same data: the same epoch"
        after = [await pub.publish_wait([Update("r.t", f"k{i}", val(-i))]) for i in range(20)]
        want = {("r.t", p[0]) for p in before + after}
        await until(lambda: want <= sink.marks(), "every entry, before and after")
        assert sink.marks() == want
        assert ("r.t", "never") not in sink.state
        assert sink.below == []
        assert sink.epochs == [epoch, epoch] and sink.links == [True, False, True]
    finally:
        await reader.close()
        await pub.close()


async def test_a_reader_behind_the_trimming_reloads_the_state(redis: RedisServer) -> None:
    proxy = StallProxy(redis.port).start()
    sink = OrderedRecorder()
    # stream_maxlen 10: MAXLEN ~ trims whole nodes (100 entries), so 1,000 entries
    # written while the reader is stalled are mostly trimmed before it reads them.
    # (One entry per publish.lua call: the publishes are awaited one by one, or
    # they would share a few calls.)
    reader = RedisBus(proxy.url, shards=2, stream_maxlen=10)
    pub = RedisBus(redis.url, shards=2, stream_maxlen=10, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        (first,) = await pub.publish_wait([Update("trim.t", "k0", val("first"))])
        await until(lambda: ("trim.t", first) in sink.marks(), "the first entry")
        proxy.stall()
        for i in range(1000):
            await pub.publish_wait([Update("trim.t", f"k{i % 37}", val(i))])
        (last,) = await pub.publish_wait([Update("trim.t", "end", val("end"))])
        await until(lambda: (reader.lag_ms() or 0) > 0, "the stalled reader lags")
        proxy.resume()
        await until(lambda: ("trim.t", "end") in sink.state, "the reader caught up")
        snap = await pub.snapshot("trim.t")
        await until(
            lambda: sink.topic_state("trim.t") == {k: (p, d) for k, p, d in snap.items},
            "the reader's state equals Redis's",
        )
        assert sink.state[("trim.t", "end")] == (last, val("end"))
        assert sink.below == [], "the reload came before any entry after the gap"
        assert len(sink.entries) < 1002, "entries were trimmed: the state was reloaded"
        await until(lambda: reader.lag_ms() == 0.0, "no lag once caught up")
    finally:
        await reader.close()
        await pub.close()
        proxy.close()


@pytest.mark.parametrize("inflight", [1, 4])
async def test_rounds_in_flight_keep_call_order_and_ack_each_request(
    redis: RedisServer, inflight: int
) -> None:
    """50,000 updates published without waiting go out in several rounds
    (publisher.py rules 1, 7): every request is acked with its own positions,
    and positions follow the call order across rounds, per topic."""
    sink = OrderedRecorder()
    reader = RedisBus(redis.url, shards=4)
    pub = RedisBus(redis.url, shards=4, want_entries=False, max_inflight_batches=inflight)
    await reader.start(sink)
    await pub.start(None)
    try:
        acks: dict[int, Any] = {}
        topics = [f"ord.t{t}" for t in range(3)]
        for i in range(5000):
            batch = [Update(topics[(i + j) % 3], f"k{j}", val(i)) for j in range(10)]
            pub.publish(batch, lambda r, i=i: acks.__setitem__(i, r))
        await until(lambda: len(acks) == 5000, "every request acked")
        assert all(isinstance(a, list) and len(a) == 10 for a in acks.values())
        for t, topic in enumerate(topics):
            seen = [acks[i][j] for i in range(5000) for j in range(10) if (i + j) % 3 == t]
            assert seen == sorted(seen) and len(set(seen)) == len(seen), topic
        last = acks[4999]
        await until(
            lambda: sink.state.get((topics[(4999 + 9) % 3], "k9"), (0,))[0] == last[9], "read"
        )
        assert sink.below == []
    finally:
        await reader.close()
        await pub.close()


async def test_a_burst_on_a_shard_empty_at_the_sync_is_no_gap(redis: RedisServer) -> None:
    """More than one XREAD's COUNT (1,000) appear at once on a shard that was
    empty when the reader synced: a full reply, but nothing was trimmed, so
    every entry is delivered and nothing is reloaded (reader.py rule 3)."""
    sink = OrderedRecorder()
    reader = RedisBus(redis.url, shards=2)
    pub = RedisBus(redis.url, shards=2, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        # one request: one script call, so all 1,500 entries appear at once
        positions = await pub.publish_wait(
            [Update("burst.t", f"k{i}", val(i)) for i in range(1500)]
        )
        want = {("burst.t", p) for p in positions}
        await until(lambda: want <= sink.marks(), "every entry of the burst")
        assert len(sink.entries) == 1500, "delivered entry by entry, no state reload"
        assert len(sink.epochs) == 1, "no resync"
        assert sink.below == []
    finally:
        await reader.close()
        await pub.close()


async def test_a_reader_behind_a_byte_trim_reloads_the_state(redis: RedisServer) -> None:
    """Byte trims (bus.redis.stream_max_bytes) cut the stream far below
    stream_maxlen, so the reply after the gap is not full: the reader learns of
    the gap from the recorded `trimmed` ID, not from a full reply (rule 8)."""
    proxy = StallProxy(redis.port).start()
    sink = OrderedRecorder()
    budget = 64 * 1024
    reader = RedisBus(proxy.url, shards=1, stream_max_bytes=budget)
    pub = RedisBus(redis.url, shards=1, stream_max_bytes=budget, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        (first,) = await pub.publish_wait([Update("bytes.t", "first", val("first"))])
        await until(lambda: ("bytes.t", first) in sink.marks(), "the first entry")
        proxy.stall()
        # answers the reader's pending XREAD (the reply waits in the proxy), so
        # that its next XREAD is sent after the trims below
        await pub.publish_wait([Update("bytes.t", "wake", val("wake"))])
        for i in range(300):  # 300 entries (one call each) x 2 KB into a 64 KB budget
            await pub.publish_wait([Update("bytes.t", f"k{i}", val("x" * 2000))])
        (last,) = await pub.publish_wait([Update("bytes.t", "end", val("end"))])
        await until(lambda: pub.bus_stats()["byte_trims"] > 200, "the stream trimmed by bytes")
        await until(lambda: (reader.lag_ms() or 0) > 0, "the stalled reader lags")
        proxy.resume()
        await until(lambda: ("bytes.t", "end") in sink.state, "the reader caught up")
        snap = await pub.snapshot("bytes.t")
        assert len(snap.items) == 303
        await until(
            lambda: sink.topic_state("bytes.t") == {k: (p, d) for k, p, d in snap.items},
            "the reader's state equals Redis's (every key, those trimmed from the stream too)",
        )
        assert sink.state[("bytes.t", "end")] == (last, val("end"))
        assert sink.below == [], "the reload came before any entry after the gap"
    finally:
        await reader.close()
        await pub.close()
        proxy.close()


async def test_redis_back_with_less_data_is_a_new_epoch(redis: RedisServer) -> None:
    sink = OrderedRecorder()
    # The reader retries after a second: the restarted Redis gets a new entry
    # first, so its stream's head is past what the reader had read.
    reader = RedisBus(redis.url, shards=1, backoff=Backoff(min_ms=1000, max_ms=1000))
    pub = RedisBus(redis.url, shards=1, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        await pub.publish_wait([Update("old.t", "a", val(1))])
        await asyncio.to_thread(redis.cli, "save")  # a copy of the data as it is now
        await asyncio.to_thread(redis.cli, "config", "set", "appendonly", "no")
        (p,) = await pub.publish_wait([Update("old.t", "b", val(2))])
        await until(lambda: ("old.t", p) in sink.marks(), "the entry the copy lacks")
        epoch = reader.epoch
        await asyncio.to_thread(redis.kill)
        await until(lambda: not reader.connected, "the outage seen")
        redis.persistent = False  # restart from the RDB copy, without entry b
        await asyncio.to_thread(redis.start)
        other = RedisBus(redis.url, shards=1, want_entries=False)
        await other.start(None)
        await other.publish_wait([Update("old.t", "c", val(3))])
        await other.close()
        await until(lambda: reader.connected and reader.epoch != epoch, "a new epoch")
        await until(lambda: pub.epoch == reader.epoch, "every client agrees")
        assert ("old.t", "b") not in sink.state
        assert set(sink.topic_state("old.t")) == {"a", "c"}
    finally:
        await reader.close()
        await pub.close()


async def test_many_concurrent_snapshots_and_histories_all_answer(redis: RedisServer) -> None:
    """A worker asks up to `fanout.max_topic_loads` (256) loads at once; redis-py's
    pool holds at most 100 connections, and the 101st call failed at once with
    "Too many connections" (err unavailable to a client's `sub`). Reads queue
    for a connection instead: every one answers."""
    reader = RedisBus(redis.url, shards=4, history_of=lambda t: 10 if t.startswith("ev.") else None)
    await reader.start(Recorder())
    try:
        await reader.publish_wait([Update(f"st.{i}", "k", val(i)) for i in range(300)])
        await reader.publish_wait([Update(f"ev.{i}", "", val(i)) for i in range(50)])
        snaps = [reader.snapshot(f"st.{i}") for i in range(300)]
        hists = [reader.history(f"ev.{i}") for i in range(50)]
        results = await asyncio.gather(*snaps, *hists, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        assert [s.items[0][0] for s in results[:300]] == ["k"] * 300  # type: ignore[union-attr]
    finally:
        await reader.close()


async def test_requests_of_one_round_share_one_entry_and_a_refused_one_takes_no_position(
    redis: RedisServer,
) -> None:
    """Layout 2 (engine/bus/redis/layout.py rule 5): the requests queued together
    are one publish.lua call per shard, written as ONE stream entry whose
    updates have consecutive positions ending at its ID; a request refused in
    the middle (bus.max_keys_per_topic) applies nothing and takes no position;
    a reader gets every accepted update at the position its publisher was
    acked with, and a snapshot agrees."""
    sink = OrderedRecorder()
    limits = Limits(max_keys_per_topic=2)
    reader = RedisBus(redis.url, shards=1, limits=limits)
    pub = RedisBus(redis.url, shards=1, want_entries=False, limits=limits)
    await reader.start(sink)
    await pub.start(None)
    try:
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(3)]
        requests = [
            [Update("one.t", "a", val(1)), Update("one.t", "b", val(2))],
            [Update("one.t", "c", val(3))],  # a third key: refused
            [Update("one.t", "a", val(4))],
        ]
        for request, answer in zip(requests, answers, strict=True):
            pub.publish(request, answer.set_result)  # queued together: one round
        first, refused, last = await asyncio.gather(*answers)
        assert isinstance(refused, BusError) and "max_keys_per_topic" in str(refused)
        assert last == [first[1] + 1] and first[1] == first[0] + 1
        assert redis.cli("XLEN", "fanout:{s0}:log").strip() == "1"
        await until(
            lambda: ("one.t", "a") in sink.state and sink.state[("one.t", "a")][0] == last[0],
            "the entry read",
        )
        assert [(k, p) for _, k, p, _ in sink.entries] == [
            ("a", first[0]),
            ("b", first[1]),
            ("a", last[0]),
        ]
        snap = await pub.snapshot("one.t")
        assert snap.items == [("b", first[1], val(2)), ("a", last[0], val(4))]
        assert sink.topic_state("one.t") == {k: (p, d) for k, p, d in snap.items}
    finally:
        await reader.close()
        await pub.close()


async def test_a_reader_reads_layout_1_entries_and_skips_unreadable_ones(
    redis: RedisServer,
) -> None:
    """A stream written by fanout before layout 2 (one update per entry, fields
    t, k, d) is read as it was; an entry of neither layout (here one written
    by hand) is skipped and counted (`bad_entries`), and reading goes on."""
    sink = OrderedRecorder()
    reader = RedisBus(redis.url, shards=1)
    pub = RedisBus(redis.url, shards=1, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        old = redis.cli("XADD", "fanout:{s0}:log", "*", "t", "old.t", "k", "k", "d", "\x01").strip()
        redis.cli("XADD", "fanout:{s0}:log", "*", "b", "not msgpack", "n", "5")
        (after,) = await pub.publish_wait([Update("new.t", "k", val("after"))])
        await until(lambda: ("new.t", "k") in sink.state, "the entry after the bad one")
        assert [(t, k, p) for t, k, p, _ in sink.entries] == [
            ("old.t", "k", pos_of(old)),
            ("new.t", "k", after),
        ]
        assert reader.bus_stats()["bad_entries"] == 1
        assert reader.connected and sink.links == [True]
    finally:
        await reader.close()
        await pub.close()


async def test_a_request_of_interleaved_topics_keeps_each_keys_order(redis: RedisServer) -> None:
    """publisher.py rule 1: a request's updates go as runs of one topic; each
    update is still acked at its own index, a key written twice ends with its
    last value at the higher position, and a reader gets what was acked."""
    sink = OrderedRecorder()
    reader = RedisBus(redis.url, shards=2)
    pub = RedisBus(redis.url, shards=2, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        updates = [
            Update("mix.a", "k", val(1)),
            Update("mix.b", "k", val(2)),
            Update("mix.a", "j", val(3)),
            Update("mix.c", "k", val(4)),
            Update("mix.a", "k", val(5)),
        ]
        pos = await pub.publish_wait(updates)
        assert len(set(pos)) == 5 and pos[4] > pos[0]
        for u, p in zip(updates, pos, strict=True):
            await until(lambda u=u, p=p: (u.topic, p) in sink.marks(), f"{u.topic} at {p}")
        assert sink.state[("mix.a", "k")] == (pos[4], val(5))
        assert sink.below == []
        snap = await pub.snapshot("mix.a")
        assert snap.items == [("j", pos[2], val(3)), ("k", pos[4], val(5))]
    finally:
        await reader.close()
        await pub.close()


class HoldingRecorder(OrderedRecorder):
    """A sink that holds some topics only (a worker's lazy core): `TopicFilter`."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held
        self.refused = 0

    def wants(self, topic: str, updates: int) -> bool:
        if topic in self.held:
            return True
        self.refused += updates
        return False


async def test_a_sink_that_holds_some_topics_gets_only_theirs(redis: RedisServer) -> None:
    """layout.py rule 5: runs of topics the sink does not want are skipped
    before they become entries; the wanted ones arrive at their positions, and
    a topic held later gets its entries from then on."""
    sink = HoldingRecorder({"held.t"})
    reader = RedisBus(redis.url, shards=1)
    pub = RedisBus(redis.url, shards=1, want_entries=False)
    await reader.start(sink)
    await pub.start(None)
    try:
        pos = await pub.publish_wait(
            [Update("other.t", "k", val(1)), Update("held.t", "k", val(2))]
            + [Update("other.t", f"k{i}", val(i)) for i in range(3)]
        )
        await until(lambda: ("held.t", "k") in sink.state, "the held topic's update")
        assert [(t, k, p) for t, k, p, _ in sink.entries] == [("held.t", "k", pos[1])]
        sink.held.add("other.t")
        (later,) = await pub.publish_wait([Update("other.t", "k", val("later"))])
        await until(lambda: ("other.t", "k") in sink.state, "the topic held since")
        assert sink.state[("other.t", "k")] == (later, val("later"))
        assert sink.refused == 4 and sink.below == []
    finally:
        await reader.close()
        await pub.close()


async def test_a_node_marks_the_layout_and_refuses_a_newer_one(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """layout.py rule 7: the first client writes `P:layout`; a client meeting a
    later version stays disconnected (publishes fail fast, /readyz fails) and
    says which key and why; it syncs once the key is back to its version."""
    first = RedisBus(redis.url, shards=1, want_entries=False)
    await first.start(None)
    await first.close()
    assert redis.cli("GET", "fanout:layout").strip() == str(LAYOUT_VERSION)
    redis.cli("SET", "fanout:layout", str(LAYOUT_VERSION + 1))
    bus = RedisBus(redis.url, shards=1, backoff=Backoff(min_ms=50, max_ms=50))
    sink = OrderedRecorder()
    await bus.start(sink)
    try:
        assert not bus.connected and sink.links == []
        with pytest.raises(BusUnavailable):
            await bus.publish_wait([Update("t", "k", val(1))])
        assert any(
            "'fanout:layout'" in r.getMessage() and "upgrade this node" in r.getMessage()
            for r in caplog.records
        )
        redis.cli("SET", "fanout:layout", str(LAYOUT_VERSION))
        await until(lambda: bus.connected, "the client syncs with its own layout")
        await bus.publish_wait([Update("t", "k", val(1))])
    finally:
        await bus.close()
