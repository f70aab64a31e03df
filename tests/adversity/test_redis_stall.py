"""A deaf node: a TCP proxy stalls everything between node A and Redis (bytes
stop moving, connections stay open) while node B talks to Redis directly.

What an operator sees: node A's workers report their bus lag growing past
`bus.max_lag_ms` in /stats and A's /readyz turns 503, while node B stays ready
and keeps delivering; when the path heals, A is ready again and its
subscribers converge to every key published meanwhile.
"""

from __future__ import annotations

import asyncio
import time
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
            if any(lag > MAX_LAG_MS for lag in lags) and a_ready[-1] == 503:
                break
            await asyncio.sleep(0.1)
        assert any(lag > MAX_LAG_MS for lag in lags), f"node A's lag was visible: {lags}"
        assert a_ready[-1] == 503
        assert (await asyncio.to_thread(b.get, "/readyz"))[0] == 200, "node B stays ready"
        final = {f"k{j % 5}": j for j in range(i - 4, i + 1)}
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
