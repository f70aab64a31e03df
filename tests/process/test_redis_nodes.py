"""Several `fanout serve` nodes sharing one real redis-server (`bus.backend = "redis"`).

What a user sees: an update published on any node's admin API reaches the
subscribers of every node; a client that lost its node (disconnected, or its
worker was killed with SIGKILL) and resubscribes with `since` on another node
(or on the respawned worker) receives exactly the keys it missed, `full: false`;
`/readyz` of every node is 503 while Redis is down and 200 once it is back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client.raw import RawConnection, connect
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

WAIT_S = 20.0 * TIMEOUT_FACTOR
TOPIC = "nodes.t"


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True).start()
    yield server
    server.close()


@pytest.fixture
def nodes(redis: RedisServer, tmp_path: Any) -> Iterator[list[Served]]:
    served: list[Served] = []
    try:
        for name in "abc":
            served.append(
                Served(
                    ["--workers", "1"],
                    env={
                        "FANOUT_BUS_BACKEND": "redis",
                        "FANOUT_BUS_REDIS_URL": redis.url,
                        "FANOUT_SERVER_NODE": name,
                        "FANOUT_WORKERS_RESTART_BACKOFF_MIN_MS": "50",
                        "FANOUT_WORKERS_RESTART_BACKOFF_MAX_MS": "200",
                    },
                    log_path=str(tmp_path / f"node-{name}.log"),
                )
            )
        for s in served:
            s.wait_ready()
        yield served
    finally:
        for s in served:
            s.stop()


class Client:
    """A subscriber of TOPIC on one node, keeping the protocol's recovery data."""

    def __init__(self) -> None:
        self.conn: RawConnection | None = None
        self.state: dict[str, Any] = {}
        self.epoch = ""
        self.pos = ""
        self.snaps: list[dict[str, Any]] = []

    async def subscribe(self, node: Served, since: bool = False) -> dict[str, Any]:
        self.conn = await connect(node.ws_url)
        hello = await self.conn.recv()
        assert hello["op"] == "hello"
        extra = {"since": {TOPIC: [self.epoch, self.pos]}} if since else {}
        self.conn.subscribe([TOPIC], id=1, **extra)
        assert (await self.conn.recv())["op"] == "ack"
        snap = await self.conn.recv()
        self.apply(snap)
        return snap

    def apply(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "snap":
            self.snaps.append(msg)
            self.epoch = msg["epoch"]
            if msg["full"]:
                self.state.clear()
        if msg.get("op") in ("snap", "upd"):
            for key, value in msg["items"].items():
                if value is None:
                    self.state.pop(key, None)
                else:
                    self.state[key] = value
            self.pos = msg["pos"]

    async def until(self, expected: dict[str, Any]) -> None:
        assert self.conn is not None
        deadline = time.monotonic() + WAIT_S
        while self.state != expected:
            for msg in self.conn.take_nowait():
                self.apply(msg)
            if time.monotonic() > deadline:
                raise AssertionError(f"state {self.state} != {expected}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            try:
                await self.conn.wait_closed(2.0)
            except TimeoutError:
                pass


async def post(node: Served, key: str, data: Any) -> None:
    status, body = await asyncio.to_thread(
        node.post, "/publish", {"topic": TOPIC, "key": key, "data": data}
    )
    assert status == 200, body


async def readyz_all(nodes: list[Served], want: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        codes = [(await asyncio.to_thread(n.get, "/readyz"))[0] for n in nodes]
        if all(c == want for c in codes):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz {codes}, expected all {want}")
        await asyncio.sleep(0.1)


async def test_updates_cross_nodes_and_recovery_is_exact(
    nodes: list[Served], redis: RedisServer
) -> None:
    a, b, c = nodes
    clients = [Client() for _ in range(6)]
    try:
        for i, client in enumerate(clients):  # spread over the nodes
            snap = await client.subscribe(nodes[i % 3])
            assert snap["full"] is True
        expected: dict[str, Any] = {}
        for i in range(30):  # published on every node in turn
            key, value = f"k{i % 10}", {"v": i}
            await post(nodes[i % 3], key, value)
            expected[key] = value
        for client in clients:
            await client.until(expected)
        assert len({client.epoch for client in clients}) == 1, "one epoch for every node"

        # A client of node A disconnects; updates go on; it resubscribes on node C.
        roamer = clients[0]
        await roamer.close()
        missed = {"k1": {"v": "m1"}, "k2": None, "new": {"v": "m3"}}
        for key, value in missed.items():
            await post(b, key, value)
        snap = await roamer.subscribe(c, since=True)
        assert snap["full"] is False
        assert snap["items"] == missed, "exactly the keys it missed, deletions included"
        expected.update(missed)
        expected.pop("k2")
        await roamer.until(expected)

        # kill -9 the worker of node B: its clients come back with `since` to the
        # respawned worker, which loaded the state from Redis.
        victims = [clients[1], clients[4]]  # node B's clients
        for victim in victims:
            await victim.until(expected)  # it holds everything so far, and its position
        (pid,) = b.worker_pids().values()
        os.kill(pid, signal.SIGKILL)
        for victim in victims:
            await victim.close()
        more = {"k3": {"v": "after-kill"}, "k4": None}
        for key, value in more.items():
            await post(a, key, value)
        deadline = time.monotonic() + WAIT_S
        while (await asyncio.to_thread(b.worker_pids)).get(1) in (pid, None):
            assert time.monotonic() < deadline, "the worker was not respawned"
            await asyncio.sleep(0.05)
        await readyz_all([b], 200)
        expected.update(more)
        expected.pop("k4")
        for victim in victims:
            snap = await victim.subscribe(b, since=True)
            assert snap["full"] is False
            assert snap["items"] == more
            await victim.until(expected)
        for client in clients:
            await client.until(expected)

        # Redis down: every node is not ready and refuses publishes; back: ready again.
        redis.kill()
        await readyz_all(nodes, 503)
        status, _ = await asyncio.to_thread(
            c.post, "/publish", {"topic": TOPIC, "key": "x", "data": 1}
        )
        assert status == 503
        await asyncio.to_thread(redis.start)
        await readyz_all(nodes, 200)
        await post(c, "last", "one")
        expected["last"] = "one"
        for client in clients:
            await client.until(expected)
    finally:
        for client in clients:
            await client.close()
