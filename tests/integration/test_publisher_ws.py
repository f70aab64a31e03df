"""The Python `Publisher` over a worker's WebSocket endpoint (`ws_url`):
batches as `pub` with `items`, several in flight, acks matched by id, errors
per batch, and a new connection (with backoff) after a lost one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.backoff import Backoff
from engine.client.publisher import Publisher, PublishError
from engine.codes import CLOSE_GOING_AWAY
from engine.protocol.codec import parse_pos
from tests.integration.conftest import Engine

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def engine(engine_factory: Any) -> Engine:
    return await engine_factory(
        fanout={"flush_interval_ms": 5}, auth={"allow_anonymous_publish": True}
    )


def quick() -> Backoff:
    return Backoff(5.0, 20.0)


async def test_batches_in_flight_are_acked_each_with_its_positions(engine: Engine) -> None:
    sub, _ = await engine.subscriber(["ws.p"])
    async with Publisher(ws_url=engine.url, max_in_flight=4) as pub:
        batches = [[("ws.p", f"k{b}.{i}", b * 100 + i) for i in range(50)] for b in range(12)]
        results = await asyncio.gather(*(pub.publish_many(b) for b in batches))
        assert [len(r) for r in results] == [50] * 12
        assert pub.connections_opened == 1
        one = await pub.publish("ws.p", "last", "done")
    everything = {k: v for b in batches for _, k, v in b} | {"last": "done"}
    seen: dict[str, Any] = {}
    while seen != everything:
        seen.update((await sub.recv_op("upd"))["items"])
    positions = sorted({parse_pos(p) for r in results for p in r})
    assert len(positions) == 600 and parse_pos(one) > positions[-1]


async def test_a_refused_batch_raises_alone_and_is_not_retried(engine: Engine) -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    async with Publisher(ws_url=engine.url, backoff=quick()) as pub:
        good, bad = await asyncio.gather(
            pub.publish_many([("ws.q", "a", 1)]),
            pub.publish_many([("ws.q", "b", 1), ("ws.q", "c", deep)]),
            return_exceptions=True,
        )
        assert isinstance(good, list) and len(good) == 1
        assert isinstance(bad, PublishError) and bad.error == "bad_request"
        assert "items[1].data" in bad.message and pub.retried == 0


async def test_a_forbidden_publish_surfaces_the_code(engine_factory: Any) -> None:
    engine = await engine_factory(fanout={"flush_interval_ms": 5})  # anonymous publish off
    async with Publisher(ws_url=engine.url) as pub:
        with pytest.raises(PublishError) as info:
            await pub.publish_many([("ws.r", "a", 1)])
    assert info.value.error == "forbidden"


async def test_a_lost_connection_is_reopened_and_the_batch_sent_again(engine: Engine) -> None:
    async with Publisher(ws_url=engine.url, backoff=quick()) as pub:
        await pub.publish("ws.s", "a", 1)
        assert engine.worker is not None
        for conn in list(engine.worker.connections):  # the server ends it
            conn.close(CLOSE_GOING_AWAY, "test")
        positions = await pub.publish_many([("ws.s", "b", 2), ("ws.s", "c", 3)])
        assert len(positions) == 2 and pub.connections_opened == 2


async def test_an_oversized_batch_is_refused_before_sending(engine: Engine) -> None:
    async with Publisher(ws_url=engine.url, max_message_bytes=1024) as pub:
        with pytest.raises(ValueError, match="over max_message_bytes"):
            await pub.publish_many([("ws.t", f"k{i}", "x" * 100) for i in range(20)])
        assert pub.connections_opened == 0


async def test_more_connections_than_workers_end_with_one_per_worker(engine: Engine) -> None:
    from engine.client.publisher import CONNECT_TRIES

    async with Publisher(ws_url=engine.url, connections=3) as pub:
        first = await asyncio.gather(*(pub.publish_many([("ws.u", f"k{i}", i)]) for i in range(9)))
        # one worker here: the first connection is kept, the others of the round's
        # CONNECT_TRIES per connection wanted reach the same worker and are closed
        assert pub.connections_opened == CONNECT_TRIES * 3 and len(first) == 9
        await pub.publish_many([("ws.u", "again", 1)])  # later batches do not try again
        assert pub.connections_opened == CONNECT_TRIES * 3
        assert engine.worker is not None and len(pub.ws_workers) == 1
        await asyncio.sleep(0.2)
        assert len(engine.worker.connections) == 1


def test_connections_are_bounded() -> None:
    for bad in (0, 65):
        with pytest.raises(ValueError, match="connections must be"):
            Publisher(ws_url="ws://127.0.0.1:1/ws", connections=bad)
