"""Redis outages under a real `fanout serve` on the redis bus, with a real
redis-server killed with SIGKILL and restarted on the same port.

What a user sees: publishes during the outage answer 503 and publish nothing;
subscribers keep their connections and state; `/readyz` is 503 during the
outage and 200 after; after Redis returns, subscribers converge to every key
published after it came back, and, with persistence on (AOF, fsync always),
no acknowledged update is lost. A Redis restarted empty is a new epoch:
subscribers receive full snapshots.
"""

from __future__ import annotations

import asyncio
import threading
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


class Feed:
    """A subscriber's view of one state topic, from its snap and upd messages."""

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn
        self.state: dict[str, Any] = {}
        self.snaps: list[dict[str, Any]] = []

    def pump(self) -> None:
        for msg in self.conn.take_nowait():
            self.apply(msg)

    def apply(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "snap":
            self.snaps.append(msg)
            if msg["full"]:
                self.state.clear()
        if msg.get("op") in ("snap", "upd"):
            for key, value in msg["items"].items():
                if value is None:
                    self.state.pop(key, None)
                else:
                    self.state[key] = value

    async def until(self, cond: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            self.pump()
            if cond():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; state={self.state}")
            await asyncio.sleep(0.02)


OPEN: list[RawConnection] = []


async def close_clients() -> None:
    while OPEN:
        conn = OPEN.pop()
        conn.close()
        try:
            await conn.wait_closed(2.0)
        except TimeoutError:
            pass


async def subscribe(served: Served, topic: str) -> Feed:
    conn = await connect(served.ws_url)
    OPEN.append(conn)
    assert (await conn.recv())["op"] == "hello"
    conn.subscribe([topic], id=1)
    assert (await conn.recv())["op"] == "ack"
    feed = Feed(conn)
    feed.apply(await conn.recv())  # the snap
    return feed


async def wait_ready(served: Served, want: int) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, body = await asyncio.to_thread(served.get, "/readyz")
        if status == want:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz stayed {status} {body}, expected {want}")
        await asyncio.sleep(0.1)


def publish(served: Served, topic: str, key: str, data: Any) -> tuple[int, Any]:
    return served.post("/publish", {"topic": topic, "key": key, "data": data})


@pytest.fixture
def redis_aof() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True).start()
    yield server
    server.close()


@pytest.fixture
def redis_volatile() -> Iterator[RedisServer]:
    server = RedisServer(persistent=False).start()
    yield server
    server.close()


def serve_on(redis: RedisServer, tmp_path: Any, name: str = "serve") -> Served:
    served = Served(
        ["--workers", "2"],
        env={"FANOUT_BUS_BACKEND": "redis", "FANOUT_BUS_REDIS_URL": redis.url},
        log_path=str(tmp_path / f"{name}.log"),
    )
    try:
        served.wait_ready()
    except BaseException:
        served.stop()
        raise
    return served


class SteadyPublisher(threading.Thread):
    """POSTs one new key per request as fast as the admin answers; remembers
    which publishes were acknowledged (200) and which were refused (503)."""

    def __init__(self, served: Served, topic: str) -> None:
        super().__init__(daemon=True)
        self.served = served
        self.topic = topic
        self.acked: dict[str, int] = {}
        self.refused: list[str] = []
        self.other: list[tuple[int, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            key = f"k{i}"
            try:
                status, body = publish(self.served, self.topic, key, i)
            except OSError as exc:  # the admin itself is up; count anything else
                self.other.append((0, str(exc)))
                continue
            if status == 200:
                self.acked[key] = i
            elif status == 503:
                self.refused.append(key)
            else:
                self.other.append((status, body))
            i += 1
            time.sleep(0.002)


async def test_redis_killed_and_restarted_with_its_data(
    redis_aof: RedisServer, tmp_path: Any
) -> None:
    served = serve_on(redis_aof, tmp_path)
    try:
        feed = await subscribe(served, "out.t")
        steady = SteadyPublisher(served, "out.t")
        steady.start()
        await feed.until(lambda: len(steady.acked) >= 50, "a steady load before the kill")

        redis_aof.kill()
        body = await wait_ready(served, 503)
        assert "bus" in str(body).lower()
        # publishes fail during the outage, with 503 and nothing published
        status, answer = await asyncio.to_thread(publish, served, "out.t", "during", 1)
        assert status == 503, answer
        refused_before = len(steady.refused)
        deadline = time.monotonic() + WAIT_S
        while len(steady.refused) == refused_before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(steady.refused) > refused_before, "the steady publisher saw 503s"
        # the subscriber keeps its connection and its state
        feed.conn.send({"op": "ping", "id": 7})
        await feed.until(lambda: True, "pump")
        held = dict(feed.state)
        assert held, "state kept during the outage"

        await asyncio.to_thread(redis_aof.start)
        await wait_ready(served, 200)
        n_after = len(steady.acked)
        await feed.until(lambda: len(steady.acked) >= n_after + 50, "publishes after the restart")
        steady.halt.set()
        await asyncio.to_thread(steady.join, 10)
        assert steady.other == []

        # every acknowledged update, before and after the outage, reaches the subscriber
        await feed.until(
            lambda: all(feed.state.get(k) == v for k, v in steady.acked.items()),
            "every acknowledged key at the subscriber",
        )
        assert "during" not in feed.state
        assert all(snap["full"] for snap in feed.snaps[:1])
        assert len({snap["epoch"] for snap in feed.snaps}) == 1, "same epoch: no full resync"
        # a new subscriber (possibly on the other worker) sees the same state, from Redis
        late = await subscribe(served, "out.t")
        await late.until(
            lambda: all(late.state.get(k) == v for k, v in steady.acked.items()),
            "the late subscriber's snapshot",
        )
        assert "during" not in late.state
        assert set(late.state) <= set(steady.acked) | set(steady.refused)
    finally:
        await close_clients()
        served.stop()


async def test_redis_restarted_empty_is_a_new_epoch(
    redis_volatile: RedisServer, tmp_path: Any
) -> None:
    served = serve_on(redis_volatile, tmp_path)
    try:
        feed = await subscribe(served, "empty.t")
        for i in range(5):
            status, _ = await asyncio.to_thread(publish, served, "empty.t", f"old{i}", i)
            assert status == 200
        await feed.until(lambda: len(feed.state) == 5, "the first keys")
        first_epoch = feed.snaps[0]["epoch"]

        redis_volatile.kill()
        await wait_ready(served, 503)
        status, _ = await asyncio.to_thread(publish, served, "empty.t", "during", 1)
        assert status == 503
        await asyncio.to_thread(redis_volatile.start, wipe=True)
        await wait_ready(served, 200)

        status, _ = await asyncio.to_thread(publish, served, "empty.t", "new", "v")
        assert status == 200
        # the subscriber gets a full snapshot of the new epoch: the old keys are gone
        await feed.until(lambda: feed.state == {"new": "v"}, "the new epoch's state only")
        full = [s for s in feed.snaps[1:] if s["full"]]
        assert full and all(s["epoch"] != first_epoch for s in full)
        assert feed.snaps[-1]["epoch"] != first_epoch
    finally:
        await close_clients()
        served.stop()
