"""The redis bus against a real 3-master Redis Cluster started by the test
(`bus.redis.cluster = true`): every key of a shard shares a hash tag, so the
publish script runs on one node; readers read each shard from its node; and a
real `fanout serve` on the cluster delivers publishes to its subscribers."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from engine.bus import Update, create_bus, shard_of
from engine.client.raw import connect
from engine.config import Config, TopicRule, default_config
from engine.errors import BusRefused
from tests.contract.conftest import Recorder, until
from tests.support.redis_server import RedisCluster, redis_available
from tests.support.serve import Served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

SHARDS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster(3).start()
    yield c
    c.close()


def cluster_config(cluster: RedisCluster, prefix: str) -> Config:
    base = default_config()
    redis = dataclasses.replace(base.bus.redis, url=cluster.url, cluster=True, prefix=prefix)
    return dataclasses.replace(
        base,
        bus=dataclasses.replace(base.bus, backend="redis", shards=SHARDS, redis=redis),
        topics=(TopicRule(pattern="cl.ev.>", mode="stream", max_hz=0.0, history=3),),
    )


def val(x: object) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


async def test_publish_read_and_snapshot_on_a_cluster(cluster: RedisCluster, tmp_path: Any) -> None:
    cfg = cluster_config(cluster, "t1")
    sinks = [Recorder(), Recorder()]
    readers = [create_bus(cfg, str(tmp_path)) for _ in sinks]
    pub = create_bus(cfg, str(tmp_path), want_entries=False)
    try:
        for bus, sink in zip(readers, sinks, strict=True):
            await bus.start(sink)
        await pub.start(None)
        assert pub.connected and all(b.connected for b in readers)
        topics = [f"cl.t{i}" for i in range(12)]
        assert len({shard_of(t, SHARDS) for t in topics}) > 3, "spread over shards and nodes"
        published: list[tuple[Update, int]] = []
        for i in range(120):
            batch = [Update(topics[(i + j) % len(topics)], f"k{i % 5}", val(i)) for j in range(2)]
            published.extend(zip(batch, await pub.publish_wait(batch), strict=True))
        marks = {(u.topic, p) for u, p in published}
        for sink in sinks:
            await until(lambda s=sink: marks <= s.marks(), "every entry at every reader")
            per_topic: dict[str, list[int]] = defaultdict(list)
            for topic, _k, pos, _d in sink.entries:
                per_topic[topic].append(pos)
            assert all(all(a < b for a, b in itertools.pairwise(p)) for p in per_topic.values())
        for topic in topics:
            snap = await pub.snapshot(topic)
            assert {k: (p, d) for k, p, d in snap.items} == sinks[0].topic_state(topic)
            assert snap.epoch == pub.epoch == readers[0].epoch
        # a late reader loads the state from every node
        late = Recorder()
        bus = create_bus(cfg, str(tmp_path))
        readers.append(bus)
        await bus.start(late)
        assert late.state == sinks[0].state
        assert bus.lag_ms() == 0.0
    finally:
        for bus in [*readers, pub]:
            await bus.close()


async def test_stream_history_on_a_cluster(cluster: RedisCluster, tmp_path: Any) -> None:
    cfg = cluster_config(cluster, "t3")
    pub = create_bus(cfg, str(tmp_path), want_entries=False)
    buses = [pub]
    try:
        await pub.start(None)
        topics = [f"cl.ev.t{i}" for i in range(8)]
        assert len({shard_of(t, SHARDS) for t in topics}) > 3, "spread over shards and nodes"
        positions: dict[str, list[int]] = defaultdict(list)
        for i in range(6):
            batch = [Update(t, "", val(i)) for t in topics]
            for u, p in zip(batch, await pub.publish_wait(batch), strict=True):
                positions[u.topic].append(p)
        for t in topics:
            h = await pub.history(t)
            assert [(p, d) for p, _, d in h.events] == [
                (p, val(i)) for i, p in enumerate(positions[t])
            ][-3:]
            assert not h.complete
            h = await pub.history(t, since=positions[t][2])
            assert h.complete and [p for p, _, _ in h.events] == positions[t][3:]
        # a late reader loads every node's floors and retained events
        late = Recorder()
        bus = create_bus(cfg, str(tmp_path))
        buses.append(bus)
        await bus.start(late)
        for t in topics:
            assert late.floors[t] == positions[t][2]
            assert [e[2] for e in late.entries if e[0] == t] == positions[t][3:]
    finally:
        for b in buses:
            await b.close()


async def test_fanout_serve_on_a_cluster(cluster: RedisCluster, tmp_path: Any) -> None:
    served = Served(
        ["--workers", "1"],
        env={
            "FANOUT_BUS_BACKEND": "redis",
            "FANOUT_BUS_REDIS_URL": cluster.url,
            "FANOUT_BUS_REDIS_CLUSTER": "true",
            "FANOUT_BUS_REDIS_PREFIX": "t2",
        },
        log_path=str(tmp_path / "serve.log"),
    )
    conn = None
    try:
        served.wait_ready()
        conn = await connect(served.ws_url)
        assert (await conn.recv())["op"] == "hello"
        conn.subscribe(["cl.serve"], id=1)
        assert (await conn.recv())["op"] == "ack"
        assert (await conn.recv())["op"] == "snap"
        status, body = await asyncio.to_thread(
            served.post, "/publish", {"topic": "cl.serve", "key": "k", "data": {"v": 1}}
        )
        assert status == 200, body
        upd = await conn.recv_op("upd")
        assert upd["items"] == {"k": {"v": 1}}
    finally:
        if conn is not None:
            conn.close()
            try:
                await conn.wait_closed(2.0)
            except TimeoutError:
                pass
        served.stop()


async def test_bounds_expiry_and_byte_trims_on_a_cluster(
    cluster: RedisCluster, tmp_path: Any
) -> None:
    """publish.lua's counts, expire.lua (which builds the topic's keys from the
    shard's hash tag) and trim.lua each run on the node of their shard."""
    cfg = cluster_config(cluster, "t3")
    rules = (TopicRule(pattern="cl.tmp.>", mode="state", idle_expiry_s=0.5), *cfg.topics)
    bus_cfg = dataclasses.replace(cfg.bus, max_keys_per_topic=2)
    redis = dataclasses.replace(bus_cfg.redis, stream_max_bytes=32 * 1024)
    cfg = dataclasses.replace(cfg, topics=rules, bus=dataclasses.replace(bus_cfg, redis=redis))
    sink = Recorder()
    reader = create_bus(cfg, str(tmp_path))
    pub = create_bus(cfg, str(tmp_path), want_entries=False)
    try:
        await reader.start(sink)
        await pub.start(None)
        temps = [f"cl.tmp.{i}" for i in range(8)]
        assert len({shard_of(t, SHARDS) for t in temps}) > 3
        for topic in temps:
            await pub.publish_wait([Update(topic, "a", val(1)), Update(topic, "b", val(2))])
        with pytest.raises(BusRefused) as err:
            await pub.publish_wait([Update("cl.tmp.0", "c", val(3))])
        assert err.value.code == "too_many_keys"
        for i in range(100):  # 100 x 2 KB on one shard: over its 32 KB budget
            await pub.publish_wait([Update("cl.big", f"k{i % 2}", val("x" * 2000))])
        await until(lambda: pub.bus_stats()["byte_trims"] > 0, "a byte trim on the cluster")  # type: ignore[attr-defined]
        for topic in temps:
            while (await pub.snapshot(topic)).items:
                await asyncio.sleep(0.1)
        assert (await pub.snapshot("cl.big")).items  # no expiry rule: kept
        last = await pub.publish_wait([Update("cl.big", "k0", val("end"))])
        await until(lambda: ("cl.big", last[0]) in sink.marks(), "the reader keeps reading")
    finally:
        await reader.close()
        await pub.close()
