"""Issue 11, finding 2: an anonymous client grows a worker's topic table by
subscribing to fresh topic names and leaving them.

Against a real `fanout serve` (one worker, the local hub): the attacker
subscribes to hundreds of fresh names and unsubscribes them (and, once, just
disconnects while subscribed). The worker must drop a topic when its last
subscriber left and `fanout.topic_grace_s` passed, so its topic count (the
worker's status on /stats) comes back to what the honest clients hold; the
honest subscriber on the same worker keeps receiving throughout, and a topic
dropped and subscribed again is served its latest values from the bus.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from engine.client.raw import RawConnection, connect
from engine.protocol.codec import format_pos, parse_pos
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NAMES = 600  # fresh names per attack round
BATCH = 50  # topics per sub message (under limits.max_topics_per_conn)
GRACE_S = 0.5
LEAVERS = 3  # attackers that disconnect while subscribed


HISTORY = 5  # of the stream topics `ev.>`


@pytest.fixture(params=["local", "redis"])
def served(request: Any, tmp_path: Any) -> Iterator[Served]:
    env = {
        "FANOUT_LIMITS_MESSAGES_PER_S": "10000",
        "FANOUT_FANOUT_TOPIC_GRACE_S": str(GRACE_S),
        "FANOUT_FANOUT_FLUSH_INTERVAL_MS": "5",
        "FANOUT_TOPICS": json.dumps([{"pattern": "ev.>", "mode": "stream", "history": HISTORY}]),
    }
    redis: RedisServer | None = None
    if request.param == "redis":
        if not redis_available():
            pytest.skip("redis-server is not installed")
        redis = RedisServer(persistent=False).start()
        env |= {"FANOUT_BUS_BACKEND": "redis", "FANOUT_BUS_REDIS_URL": redis.url}
    s = Served(["--workers", "1"], env=env, log_path=str(tmp_path / "serve.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
        if redis is not None:
            redis.close()


def worker_status(served: Served) -> dict[str, Any]:
    status, stats = served.get("/stats")
    assert status == 200, stats
    (w,) = stats["workers"]
    return dict(w)


async def until_status(served: Served, check: Any, what: str, timeout: float = 20.0) -> None:
    """Wait for the worker's next status (written once a second) to satisfy `check`."""
    deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
    while True:
        w = await asyncio.to_thread(worker_status, served)
        if check(w):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: worker status {w}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def clients() -> AsyncIterator[list[RawConnection]]:
    """Every client a test opens, closed when it ends."""
    opened: list[RawConnection] = []
    yield opened
    for conn in opened:
        conn.close()
        await conn.wait_closed()


async def client(served: Served, opened: list[RawConnection]) -> RawConnection:
    conn = await connect(served.ws_url)
    opened.append(conn)
    assert (await conn.recv())["op"] == "hello"
    return conn


async def sub_unsub(conn: RawConnection, prefix: str, names: int, unsub: bool = True) -> None:
    rid = 0
    for first in range(0, names, BATCH):
        topics = [f"{prefix}.{first + i}" for i in range(BATCH)]
        rid += 1
        conn.send({"op": "sub", "topics": topics, "id": rid})
        ack = await conn.recv()
        assert (ack["op"], ack.get("id")) == ("ack", rid), ack
        for t in topics:
            snap = await conn.recv()
            assert (snap["op"], snap["topic"], snap["full"], snap["items"]) == (
                "snap",
                t,
                True,
                {},
            ), snap
        if unsub:
            rid += 1
            conn.send({"op": "unsub", "topics": topics, "id": rid})
            ack = await conn.recv()
            assert (ack["op"], ack.get("id")) == ("ack", rid), ack


class Feed:
    """Publishes `honest.t` through the admin API until stopped; counts values."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.sent = 0
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            self.sent += 1
            status, body = await asyncio.to_thread(
                self.served.post, "/publish", {"topic": "honest.t", "key": "n", "data": self.sent}
            )
            assert status == 200, body
            await asyncio.sleep(0.02)


async def honest_values(conn: RawConnection, upto: int) -> list[int]:
    """Values of `honest.t` received until `upto` (every one since the snap)."""
    got: list[int] = []
    while not got or got[-1] < upto:
        msg = await conn.recv()
        assert msg["op"] == "upd" and msg["topic"] == "honest.t", msg
        got.append(msg["items"]["n"])
    return got


async def test_fresh_topics_subscribed_then_left_are_dropped_after_the_grace(
    served: Served, clients: list[RawConnection]
) -> None:
    honest = await client(served, clients)
    honest.send({"op": "sub", "topics": ["honest.t"], "id": 1})
    assert (await honest.recv_op("ack"))["id"] == 1
    assert (await honest.recv_op("snap"))["topic"] == "honest.t"
    feed = Feed(served)
    feeding = asyncio.create_task(feed.run())
    try:
        await until_status(
            served, lambda w: w["subscriptions"] == 1 and w["topics"] == 1, "honest subscribed"
        )
        baseline = 1  # honest.t only
        attacker = await client(served, clients)
        await sub_unsub(attacker, "fresh", NAMES)
        # and attackers that leave by disconnecting, each subscribed to
        # limits.max_topics_per_conn fresh names
        for i in range(LEAVERS):
            leaver = await client(served, clients)
            await sub_unsub(leaver, f"gone{i}", 100, unsub=False)
            leaver.close()
            await leaver.wait_closed()
            clients.remove(leaver)
        await until_status(
            served,
            lambda w: w["topics"] == baseline and w["connections"] == 2,
            "the attack's topics dropped after the grace",
        )
        w = worker_status(served)
        assert w["topics_dropped"] >= NAMES + 100 * LEAVERS
        assert w["subscriptions"] == 1
        # the honest subscriber kept receiving every value, in order
        upto = feed.sent
        got = await honest_values(honest, upto)
        assert got == sorted(set(got)) and got[-1] >= upto and len(got) > 1
    finally:
        feed.stop = True
        await feeding


async def test_a_dropped_topic_subscribed_again_gets_its_latest_values(
    served: Served, clients: list[RawConnection]
) -> None:
    for k, v in (("a", 1), ("b", 2), ("c", 3)):
        status, _ = served.post("/publish", {"topic": "back.t", "key": k, "data": v})
        assert status == 200
    conn = await client(served, clients)
    conn.send({"op": "sub", "topics": ["back.t"], "id": 1})
    await conn.recv_op("ack")
    first = await conn.recv_op("snap")
    assert first["items"] == {"a": 1, "b": 2, "c": 3}
    conn.send({"op": "unsub", "topics": ["back.t"], "id": 2})
    await conn.recv_op("ack")
    await until_status(
        served, lambda w: w["topics_dropped"] == 1 and w["topics"] == 0, "back.t dropped"
    )
    # published while no worker holds the topic: the worker must not recreate it ...
    for k, v in (("a", 10), ("c", None), ("d", 4)):
        status, _ = served.post("/publish", {"topic": "back.t", "key": k, "data": v})
        assert status == 200
    await until_status(served, lambda w: w["updates_unheld"] >= 3, "the entries reached the worker")
    assert worker_status(served)["topics"] == 0
    # ... and a new sub reloads it from the bus: the latest values
    conn.send({"op": "sub", "topics": ["back.t"], "id": 3})
    await conn.recv_op("ack")
    snap = await conn.recv_op("snap")
    assert (snap["full"], snap["items"]) == (True, {"a": 10, "b": 2, "d": 4})
    # and `since` the first snap's position: exactly what changed, the deletion included
    conn.send(
        {
            "op": "sub",
            "topics": ["back.t"],
            "since": {"back.t": [first["epoch"], first["pos"]]},
            "id": 4,
        }
    )
    await conn.recv_op("ack")
    partial = await conn.recv_op("snap")
    assert (partial["full"], partial["items"]) == (False, {"a": 10, "c": None, "d": 4})
    assert partial["pos"] == snap["pos"]


async def test_a_dropped_stream_topic_subscribed_again_is_served_from_the_bus_history(
    served: Served, clients: list[RawConnection]
) -> None:
    def publish(n: int) -> int:
        status, body = served.post("/publish", {"topic": "ev.t", "key": "e", "data": n})
        assert status == 200, body
        return parse_pos(body["pos"])

    positions = [publish(n) for n in range(3)]
    conn = await client(served, clients)
    conn.send({"op": "sub", "topics": ["ev.t"], "id": 1})
    await conn.recv_op("ack")
    first = await conn.recv_op("snap")
    assert [d for _, d in first["items"]] == [0, 1, 2] and first["full"] is True
    conn.send({"op": "unsub", "topics": ["ev.t"], "id": 2})
    await conn.recv_op("ack")
    await until_status(
        served, lambda w: w["topics_dropped"] == 1 and w["topics"] == 0, "ev.t dropped"
    )
    positions += [publish(n) for n in range(3, 10)]  # the bus keeps the newest 5
    await until_status(served, lambda w: w["updates_unheld"] >= 7, "the events reached it")
    wire = [format_pos(p) for p in positions]
    # no since: the newest `history` events
    conn.send({"op": "sub", "topics": ["ev.t"], "id": 3})
    await conn.recv_op("ack")
    snap = await conn.recv_op("snap")
    assert (snap["full"], snap["pos"]) == (True, wire[-1])
    assert snap["items"] == [[wire[n], n] for n in range(5, 10)]
    # a since the bus history still reaches: exactly the events after it
    since = {"ev.t": [first["epoch"], wire[6]]}
    conn.send({"op": "sub", "topics": ["ev.t"], "since": since, "id": 4})
    await conn.recv_op("ack")
    partial = await conn.recv_op("snap")
    assert (partial["full"], partial["items"]) == (False, [[wire[n], n] for n in (7, 8, 9)])
    # a since older than what the bus kept (the first snap's): a full snap, not a silent skip
    since = {"ev.t": [first["epoch"], first["pos"]]}
    conn.send({"op": "sub", "topics": ["ev.t"], "since": since, "id": 5})
    await conn.recv_op("ack")
    old = await conn.recv_op("snap")
    assert (old["full"], [d for _, d in old["items"]]) == (True, [5, 6, 7, 8, 9])
    # and it is live again: the next event follows
    p = publish(10)
    evt = await conn.recv_op("evt")
    assert evt["items"] == [[format_pos(p), 10]]
