"""A Redis that stops answering publishes (issue 11, finding 3's wedge), under
a real `fanout serve` on a real redis-server paused with CLIENT PAUSE WRITE.

Before: a publish waited on the bus without a bound; a bus that never
answered (a dead publish task, a stuck Redis) held every POST /publish open,
the hung requests filled the admin's connection slots and /healthz failed.
What a user sees now: each publish answers 503 (WebSocket `pub`: `err
unavailable`) naming `bus.publish_timeout_s`; /healthz stays 200 throughout;
the honest subscriber keeps its connection, and once Redis answers again
publishes succeed and reach it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_py

from engine.client.raw import connect
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

WAIT_S = 30.0 * TIMEOUT_FACTOR
PUBLISHERS = 40  # concurrent POSTs while Redis does not answer


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


async def test_publishes_to_a_redis_that_does_not_answer_end_in_503(
    redis: RedisServer, tmp_path: Any
) -> None:
    served = Served(
        ["--workers", "1"],
        env={
            "FANOUT_BUS_BACKEND": "redis",
            "FANOUT_BUS_REDIS_URL": redis.url,
            "FANOUT_BUS_PUBLISH_TIMEOUT_S": "0.5",
            "FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "true",
        },
        log_path=str(tmp_path / "serve.log"),
    )
    control = redis_py.Redis.from_url(redis.url)
    try:
        served.wait_ready()
        sub = await connect(served.ws_url)
        assert (await sub.recv())["op"] == "hello"
        sub.subscribe(["honest.t"], id=1)
        assert (await sub.recv())["op"] == "ack"
        status, _ = served.post("/publish", {"topic": "honest.t", "key": "k", "data": 0})
        assert status == 200

        control.execute_command("CLIENT", "PAUSE", int(WAIT_S * 1000), "WRITE")
        answers: list[tuple[int, Any]] = []

        def post(i: int) -> None:
            answers.append(served.post("/publish", {"topic": "honest.t", "key": "k", "data": i}))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(PUBLISHERS)]
        for t in threads:
            t.start()
        pub = await connect(served.ws_url)
        assert (await pub.recv())["op"] == "hello"
        pub.send({"op": "pub", "id": 5, "topic": "honest.t", "key": "ws", "data": 1})
        reply = await pub.recv()
        assert reply["op"] == "err" and reply["code"] == "unavailable", reply
        assert "publish_timeout_s" in reply["msg"]
        for t in threads:
            await asyncio.to_thread(t.join, WAIT_S)
        assert len(answers) == PUBLISHERS
        # each one ended, in 503: by its timeout, or, once the bus client gave
        # up on the paused link (its command timeout), as not connected
        for status, body in answers:
            assert status == 503 and body["error"] == "unavailable", (status, body)
        assert any("publish_timeout_s" in body["message"] for _, body in answers), answers
        status, body = served.get("/healthz")
        assert status == 200, body
    finally:
        control.execute_command("CLIENT", "UNPAUSE")
        control.close()
    try:
        # Redis answers again: publishes succeed and reach the honest subscriber
        deadline = time.monotonic() + WAIT_S
        while True:
            status, body = served.post("/publish", {"topic": "honest.t", "key": "k", "data": 99})
            if status == 200:
                break
            assert time.monotonic() < deadline, (status, body)
            await asyncio.sleep(0.1)
        got = None
        while got != 99:
            msg = await sub.recv(timeout=WAIT_S)
            if msg.get("op") in ("snap", "upd"):
                got = msg["items"].get("k", got)
        sub.close()
        pub.close()
    finally:
        served.stop()
