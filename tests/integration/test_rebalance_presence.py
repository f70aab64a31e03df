"""engine/bus/redis/presence.py against a real redis-server: nodes see each
other's counts, a node that stops announcing drops out after its TTL, a clean
stop removes its entry at once, and a dead Redis leaves a node seeing itself
alone (rules 1-5)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from engine.bus.redis.presence import (
    MAX_NODE_ID_BYTES,
    MAX_PEERS,
    Presence,
    make_client,
    nodes_key,
)
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


def presence(redis: RedisServer, node: str, count: int | None, ttl_s: float = 0.5) -> Presence:
    return Presence(
        make_client(redis.url, cluster=False, auth={}),
        prefix="t",
        node_id=node,
        interval_s=0.05,
        ttl_s=ttl_s,
        count_of=lambda: count,
        on_peers=lambda peers: None,
    )


async def test_nodes_see_each_other_and_a_silent_one_expires(redis: RedisServer) -> None:
    a, b, c = presence(redis, "a", 300), presence(redis, "b", 250), presence(redis, "c", 0)
    try:
        await a.announce()
        await b.announce()
        assert await c.announce() == {"a": 300, "b": 250}
        assert await a.announce() == {"b": 250, "c": 0}
        await asyncio.sleep(0.6 * TIMEOUT_FACTOR)  # b and c fall silent past their TTL
        assert await a.announce() == {}
        assert a.peers(asyncio.get_running_loop().time()) == {}
        await c.leave()
        await b.announce()
        await a.leave()  # a clean stop: gone at once
        assert await b.announce() == {}
    finally:
        for p in (a, b, c):
            await p.client.aclose()


async def test_a_long_node_id_is_cut_and_entries_that_are_not_counts_are_ignored(
    redis: RedisServer,
) -> None:
    a = presence(redis, "n" * 1000, 7, ttl_s=5.0)
    b = presence(redis, "b", 1, ttl_s=5.0)
    try:
        assert len(a.node_id.encode()) == MAX_NODE_ID_BYTES
        await a.announce()
        await a.client.hset(nodes_key("t"), "junk", "not-a-number")
        assert await b.announce() == {a.node_id: 7}
    finally:
        await a.client.aclose()
        await b.client.aclose()


async def test_with_redis_gone_a_node_sees_itself_alone_after_the_ttl(redis: RedisServer) -> None:
    a, b = presence(redis, "a", 10, ttl_s=0.3), presence(redis, "b", 20, ttl_s=0.3)
    try:
        await b.announce()
        assert await a.announce() == {"b": 20}
        redis.kill()
        with pytest.raises(Exception):  # noqa: B017 - whichever Redis failure the client raises
            await a.announce()
        await asyncio.sleep(0.35)
        assert a.peers(asyncio.get_running_loop().time()) == {}  # rule 5
    finally:
        await a.client.aclose()
        await b.client.aclose()


async def test_a_node_that_is_not_ready_leaves_the_presence(redis: RedisServer) -> None:
    counts: dict[str, int | None] = {"a": 5}
    a = Presence(
        make_client(redis.url, cluster=False, auth={}),
        prefix="t",
        node_id="a",
        interval_s=0.05,
        ttl_s=5.0,
        count_of=lambda: counts["a"],
        on_peers=lambda peers: None,
    )
    b = presence(redis, "b", 1, ttl_s=5.0)
    try:
        await a.announce()
        assert await b.announce() == {"a": 5}
        counts["a"] = None  # draining, booting, failing /readyz (rule 3)
        assert await a.announce() == {"b": 1}
        assert await b.announce() == {}
    finally:
        await a.client.aclose()
        await b.client.aclose()


async def test_a_hash_flooded_with_entries_is_read_only_up_to_the_bound(
    redis: RedisServer,
) -> None:
    a = presence(redis, "a", 1, ttl_s=60.0)
    try:
        await a.announce()
        far = 10**15  # an expiry far ahead: every entry is live
        flood = {f"n{i}": f"{far} {i}" for i in range(3 * MAX_PEERS)}
        await a.client.hset(nodes_key("t"), mapping=flood)
        peers = await a.announce()  # rule 4: at most MAX_PEERS entries come back
        assert len(peers) <= MAX_PEERS and a.peers_ignored == 1
    finally:
        await a.client.aclose()
