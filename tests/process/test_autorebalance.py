"""Automatic rebalancing on scale-out (issue 14, part 3), as a user of a
Kubernetes Service would see it.

Three `fanout serve --bus redis` nodes on one real redis-server, behind a small
round-robin TCP proxy (`loadtest.scaleout.RoundRobin`, standing in for the Service). 600 Python clients
(engine/client: they honour `bye` / `retry_ms` and resubscribe with `since`)
connect while the proxy knows only nodes a and b; then node c starts and joins
the rotation. Within `BALANCE_S` every node holds 200 +- 10 % of the clients, no
client was told to go more than once, and every client holds every final value
(published during the moves and after).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client import Client, ReconnectPolicy
from loadtest.scaleout import RoundRobin
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

CLIENTS = 600
TOPIC = "rebalance.t"
KEYS = 20
BALANCE_S = 60.0 * TIMEOUT_FACTOR  # from node c joining the rotation to balanced
NODE_ENV = {
    "FANOUT_BUS_BACKEND": "redis",
    "FANOUT_REBALANCE_ENABLED": "true",
    "FANOUT_REBALANCE_TOLERANCE": "0.05",
    "FANOUT_REBALANCE_SUSTAIN_S": "2",
    "FANOUT_REBALANCE_COOLDOWN_S": "4",
    "FANOUT_REBALANCE_MAX_SHED_PER_S": "100",
    "FANOUT_REBALANCE_ANNOUNCE_INTERVAL_S": "0.5",
    "FANOUT_REBALANCE_PEER_TTL_S": "3",
    "FANOUT_WORKERS_RETRY_MIN_MS": "100",
    "FANOUT_WORKERS_RETRY_MAX_MS": "1000",
}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def node(redis: RedisServer, name: str, tmp_path: Any) -> Served:
    env = {**NODE_ENV, "FANOUT_BUS_REDIS_URL": redis.url, "FANOUT_SERVER_NODE": name}
    return Served(["--workers", "1"], env=env, log_path=str(tmp_path / f"node-{name}.log"))


def connections(n: Served) -> int:
    _, stats = n.get("/stats")
    return int(stats["totals"]["connections"])


async def publish(n: Served, round_: int | str) -> None:
    items = [{"topic": TOPIC, "key": f"k{k}", "data": f"{round_}-{k}"} for k in range(KEYS)]
    status, _ = await asyncio.to_thread(n.post, "/publish", {"items": items})
    assert status == 200


async def test_a_new_node_gets_its_share_within_the_stated_time(
    redis: RedisServer, tmp_path: Any
) -> None:
    nodes: list[Served] = []
    proxy = RoundRobin()
    clients: list[Client] = []
    try:
        nodes = [node(redis, "a", tmp_path), node(redis, "b", tmp_path)]
        for n in nodes:
            n.wait_ready()
        await proxy.start()
        proxy.backends = [n.port for n in nodes]
        url = f"ws://127.0.0.1:{proxy.port}/ws"
        await publish(nodes[0], 0)
        policy = ReconnectPolicy(base_ms=250.0, max_ms=2000.0)
        for _ in range(CLIENTS // 50):  # in batches: under limits.upgrades_per_s
            batch = [Client(url, policy=policy) for _ in range(50)]
            for c in batch:
                c.start()
            await asyncio.gather(*(c.wait_connected(30 * TIMEOUT_FACTOR) for c in batch))
            await asyncio.gather(*(c.subscribe([TOPIC]) for c in batch))
            clients += batch
        # the proxy alternates (a connect retried after a failure may take a turn)
        await wait_for(lambda: sum(connections(n) for n in nodes) == CLIENTS, 20.0)
        assert all(250 <= connections(n) <= 350 for n in nodes)

        c_node = node(redis, "c", tmp_path)
        nodes.append(c_node)
        c_node.wait_ready()
        proxy.backends = [n.port for n in nodes]
        joined = time.monotonic()
        # publish while clients move, every 0.2 s
        publisher = asyncio.ensure_future(publish_rounds(nodes[1]))

        def balanced() -> bool:
            counts = [connections(n) for n in nodes]
            return sum(counts) == CLIENTS and all(180 <= c <= 220 for c in counts)

        await wait_for(balanced, BALANCE_S)
        took_s = time.monotonic() - joined
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        await publish(nodes[2], "final")
        final = {f"k{k}": f"final-{k}" for k in range(KEYS)}
        deadline = time.monotonic() + 20.0 * TIMEOUT_FACTOR
        while not all(dict(c.topic(TOPIC)) == final for c in clients):  # on the loop's thread
            assert time.monotonic() < deadline, "a client is missing a final value"
            await asyncio.sleep(0.25)

        byes = [c.counters.byes for c in clients]
        moved = sum(byes)
        counts = [connections(n) for n in nodes]
        print(f"\nbalanced in {took_s:.1f} s: {counts}, {moved} clients moved")
        assert max(byes) <= 1, "a client was told to go twice"
        assert all(c.counters.connects <= 2 for c in clients)
        assert 180 <= moved <= 260, moved  # about c's share: clients land on c, not back
        _, stats = nodes[0].get("/stats")
        assert stats["rebalance"]["shed"] >= 90 and len(stats["rebalance"]["peers"]) == 2
        _, stats = c_node.get("/stats")
        assert stats["rebalance"]["shed"] == 0
        _, text = await asyncio.to_thread(metrics_of, nodes[0])
        assert "fanout_rebalance_shed_total" in text
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if proxy.port:
            await proxy.close()
        for n in nodes:
            n.stop()


async def publish_rounds(n: Served) -> None:
    for i in itertools.count(1):
        await publish(n, i)
        await asyncio.sleep(0.2)


def metrics_of(n: Served) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(n.admin_url + "/metrics", timeout=5) as resp:
        return resp.status, resp.read().decode()


async def wait_for(check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s * TIMEOUT_FACTOR
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s")
        await asyncio.sleep(0.25)


async def test_one_node_alone_sheds_nothing_and_readyz_names_presence_when_redis_is_gone(
    redis: RedisServer, tmp_path: Any
) -> None:
    n = node(redis, "solo", tmp_path)
    try:
        n.wait_ready()
        await wait_for(lambda: n.get("/stats")[1].get("rebalance", {}).get("state") == "alone", 10)
        _, stats = n.get("/stats")
        assert stats["rebalance"]["peers"] == {} and stats["rebalance"]["shed"] == 0
        _, text = await asyncio.to_thread(metrics_of, n)
        assert 'fanout_rebalance_state{state="alone"} 1' in text
        redis.kill()

        def presence_down() -> bool:
            status, body = n.get("/readyz")
            return status == 503 and any("presence" in r for r in body["reasons"])

        await wait_for(presence_down, 20.0)
    finally:
        n.stop()
