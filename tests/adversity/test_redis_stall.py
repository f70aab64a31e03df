"""A deaf node: a TCP proxy stalls everything between node A and Redis (bytes
stop moving, connections stay open) while node B talks to Redis directly.

What an operator sees: node A's workers report their bus lag growing past
`bus.max_lag_ms` in /stats, and in /metrics the lag of every shard and the age
of the last entry read grow with it; A's /readyz turns 503, while node B stays
ready and keeps delivering; when the path heals, A is ready again and its
subscribers converge to every key published meanwhile.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client.raw import RawConnection, connect
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served
from tests.support.tcpproxy import StallProxy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

WAIT_S = 30.0 * TIMEOUT_FACTOR
MAX_LAG_MS = 500
SHARDS = 4
TOPIC = "stall.t"


@pytest.fixture
def setup(tmp_path: Any) -> Iterator[tuple[StallProxy, Served, Served]]:
    redis = RedisServer().start()
    proxy = StallProxy(redis.port).start()
    nodes: list[Served] = []
    try:
        for name, url in (("a", proxy.url), ("b", redis.url)):
            nodes.append(
                Served(
                    ["--workers", "1"],
                    env={
                        "FANOUT_BUS_BACKEND": "redis",
                        "FANOUT_BUS_REDIS_URL": url,
                        "FANOUT_BUS_MAX_LAG_MS": str(MAX_LAG_MS),
                        "FANOUT_BUS_SHARDS": str(SHARDS),
                    },
                    log_path=str(tmp_path / f"node-{name}.log"),
                )
            )
        for n in nodes:
            n.wait_ready()
        yield proxy, nodes[0], nodes[1]
    finally:
        for n in nodes:
            n.stop()
        proxy.close()
        redis.close()


async def subscriber(node: Served) -> tuple[RawConnection, dict[str, Any]]:
    conn = await connect(node.ws_url)
    assert (await conn.recv())["op"] == "hello"
    conn.subscribe([TOPIC], id=1)
    assert (await conn.recv())["op"] == "ack"
    assert (await conn.recv())["op"] == "snap"
    return conn, {}


def bus_gauges(node: Served) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """From /metrics: shard lags by (worker, shard) and last-entry ages by worker (s)."""
    with urllib.request.urlopen(node.admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    lags = {
        (w, shard): float(v)
        for w, shard, v in re.findall(
            r'^fanout_bus_shard_lag_seconds\{worker="(\d+)",shard="(\d+)"\} (\S+)$', text, re.M
        )
    }
    ages = {
        w: float(v)
        for w, v in re.findall(
            r'^fanout_bus_last_entry_age_seconds\{worker="(\d+)"\} (\S+)$', text, re.M
        )
    }
    return lags, ages


def pump(conn: RawConnection, state: dict[str, Any]) -> None:
    for msg in conn.take_nowait():
        if msg.get("op") in ("snap", "upd"):
            state.update(msg["items"])


async def test_a_stalled_link_shows_as_lag_and_not_ready(
    setup: tuple[StallProxy, Served, Served],
) -> None:
    proxy, a, b = setup
    conn_a, state_a = await subscriber(a)
    conn_b, state_b = await subscriber(b)
    try:
        # healthy: a gauge per shard, near zero, and a recent last entry
        assert (
            await asyncio.to_thread(b.post, "/publish", {"topic": TOPIC, "key": "pre", "data": 0})
        )[0] == 200
        deadline = time.monotonic() + WAIT_S
        while True:
            pump(conn_a, state_a)
            shard_lags, ages = await asyncio.to_thread(bus_gauges, a)
            if state_a == {"pre": 0} and ages:
                break
            assert time.monotonic() < deadline, f"node A reads the bus: {state_a}, {ages}"
            await asyncio.sleep(0.1)
        (worker,) = ages
        assert sorted(shard_lags) == [(worker, str(n)) for n in range(SHARDS)]
        assert max(shard_lags.values()) < MAX_LAG_MS / 1000, shard_lags
        assert ages[worker] < 5.0

        proxy.stall()
        lags: list[float] = []
        a_ready: list[int] = []
        deadline = time.monotonic() + WAIT_S
        i = 0
        while time.monotonic() < deadline:
            i += 1
            status, _ = await asyncio.to_thread(
                b.post, "/publish", {"topic": TOPIC, "key": f"k{i % 5}", "data": i}
            )
            assert status == 200, "node B publishes on"
            _, stats = await asyncio.to_thread(a.get, "/stats")
            lags += [w["bus_lag_ms"] for w in stats["workers"] if w.get("bus_lag_ms")]
            a_ready.append((await asyncio.to_thread(a.get, "/readyz"))[0])
            shard_lags, ages = await asyncio.to_thread(bus_gauges, a)
            if (
                any(lag > MAX_LAG_MS for lag in lags)
                and a_ready[-1] == 503
                and len(shard_lags) == SHARDS
                and min(shard_lags.values()) > MAX_LAG_MS / 1000
            ):
                break
            await asyncio.sleep(0.1)
        assert any(lag > MAX_LAG_MS for lag in lags), f"node A's lag was visible: {lags}"
        assert a_ready[-1] == 503
        # a stalled link holds back every shard, and nothing has been read since
        assert sorted(shard_lags) == [(worker, str(n)) for n in range(SHARDS)]
        assert min(shard_lags.values()) > MAX_LAG_MS / 1000, shard_lags
        assert ages[worker] > MAX_LAG_MS / 1000, ages
        assert (await asyncio.to_thread(b.get, "/readyz"))[0] == 200, "node B stays ready"
        final = {"pre": 0} | {f"k{j % 5}": j for j in range(i - 4, i + 1)}
        deadline = time.monotonic() + WAIT_S
        while state_b != final:
            pump(conn_b, state_b)
            assert time.monotonic() < deadline, f"node B delivers: {state_b} != {final}"
            await asyncio.sleep(0.02)

        proxy.resume()
        deadline = time.monotonic() + WAIT_S
        while (await asyncio.to_thread(a.get, "/readyz"))[0] != 200:
            assert time.monotonic() < deadline, "node A ready again"
            await asyncio.sleep(0.1)
        while state_a != final:
            pump(conn_a, state_a)
            assert time.monotonic() < deadline, f"node A converges: {state_a} != {final}"
            await asyncio.sleep(0.02)
    finally:
        for conn in (conn_a, conn_b):
            conn.close()
            try:
                await conn.wait_closed(2.0)
            except TimeoutError:
                pass
