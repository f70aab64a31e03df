"""A `pub` with a batch of items over a real worker and hub (engine/connection.py
rule 6, engine/protocol/codec.py rule 6): acked with a position per item, all or
nothing, and an honest subscriber on the same worker receives every item."""

from __future__ import annotations

from typing import Any

import pytest

from engine.client.raw import RawConnection
from engine.config import TopicRule
from engine.protocol.codec import MAX_DATA_DEPTH, parse_pos
from tests.integration.conftest import Engine
from tests.integration.test_protocol import bystander, still_served
from tests.integration.test_security import bystander as token_bystander
from tests.integration.test_security import jwt_engine, jwt_env, token_client

pytestmark = pytest.mark.timeout(60)
__all__ = ["jwt_env"]  # the fixture, used by name

TOPICS = [TopicRule(pattern="trades.>", mode="stream", max_hz=0.0, history=1000)]


@pytest.fixture
async def engine(engine_factory: Any) -> Engine:
    return await engine_factory(
        fanout={"flush_interval_ms": 5},
        auth={"allow_anonymous_publish": True},
        bus={"max_data_bytes": 1024},
        limits={"max_publish_items": 50},
        topics=TOPICS,
    )


def items(topic: str, values: list[Any], key: str | None = "k") -> list[dict[str, Any]]:
    return [
        {"topic": topic, "data": v} | ({} if key is None else {"key": f"{key}{i}"})
        for i, v in enumerate(values)
    ]


async def events_until(conn: RawConnection, topic: str, last: str) -> list[list[Any]]:
    got: list[list[Any]] = []
    while not got or parse_pos(got[-1][0]) < parse_pos(last):
        msg = await conn.recv()
        assert msg["op"] != "gap", msg
        if msg["op"] == "evt" and msg["topic"] == topic:
            got.extend(msg["items"])
    return got


async def test_a_batch_is_acked_with_a_position_per_item_and_reaches_subscribers(
    engine: Engine,
) -> None:
    sub, _ = await engine.subscriber(["p.a", "p.b"])
    pub = await engine.client()
    pub.send(
        {
            "op": "pub",
            "id": 11,
            "items": [
                {"topic": "p.a", "key": "x", "data": 1},
                {"topic": "p.b", "key": "y", "data": {"px": 2.5}},
                {"topic": "p.a", "key": "z", "data": "three"},
            ],
        }
    )
    ack = await pub.recv()
    assert (ack["op"], ack["id"], len(ack["pos"])) == ("ack", 11, 3)
    positions = [parse_pos(p) for p in ack["pos"]]
    assert positions[0] < positions[2]  # a topic's positions follow the items' order
    seen: dict[str, dict[str, Any]] = {"p.a": {}, "p.b": {}}
    last: dict[str, str] = {}
    while seen != {"p.a": {"x": 1, "z": "three"}, "p.b": {"y": {"px": 2.5}}}:
        upd = await sub.recv_op("upd")
        seen[upd["topic"]].update(upd["items"])
        last[upd["topic"]] = upd["pos"]
    assert last == {"p.a": ack["pos"][2], "p.b": ack["pos"][1]}


async def test_the_honest_subscriber_receives_every_item_of_every_batch(engine: Engine) -> None:
    sub, _ = await engine.subscriber(["trades.fx"])
    pub = await engine.client()
    for b in range(10):  # ten batches in flight at once, a stream topic needs no key
        pub.send(
            {
                "op": "pub",
                "id": b,
                "items": items("trades.fx", list(range(b * 50, b * 50 + 50)), None),
            }
        )
    acks = [await pub.recv() for _ in range(10)]
    assert [a["id"] for a in acks] == list(range(10))
    wire = [p for a in acks for p in a["pos"]]
    got = await events_until(sub, "trades.fx", wire[-1])
    assert got == [[p, i] for i, p in enumerate(wire)]


@pytest.mark.parametrize(
    ("bad", "code", "says"),
    [
        ({"topic": "p.c", "key": "k", "data": [[[]]]}, "bad_request", None),  # made deep below
        ({"topic": "p.c", "data": 1}, "bad_request", "needs a string 'key'"),
        ({"topic": "p c", "key": "k", "data": 1}, "bad_topic", "(items[1])"),
        ({"topic": "p.c", "key": "k", "data": "x" * 2000}, "too_large", "bus.max_data_bytes"),
    ],
)
async def test_a_bad_item_refuses_the_batch_and_nothing_of_it_is_published(
    engine: Engine, bad: dict[str, Any], code: str, says: str | None
) -> None:
    if says is None:
        deep: Any = 1
        for _ in range(MAX_DATA_DEPTH + 1):
            deep = [deep]
        bad = {**bad, "data": deep}
        says = "'items[1].data' is nested deeper than 32"
    sub, _ = await engine.subscriber(["p.c", "watch.me"])
    pub = await engine.client()
    pub.send({"op": "pub", "id": 21, "items": [{"topic": "p.c", "key": "first", "data": 1}, bad]})
    err = await pub.recv()
    assert (err["op"], err["code"], err["id"]) == ("err", code, 21)
    assert says in err["msg"]
    # nothing of the batch reached the subscriber: the next update it sees is the marker
    await still_served(engine, sub)
    for msg in sub.take_nowait():
        assert msg.get("topic") != "p.c", msg
    assert engine.worker is not None
    assert list((await engine.worker.bus.snapshot("p.c")).items) == []


async def test_too_many_items_is_refused_with_the_id(engine: Engine) -> None:
    watcher = await bystander(engine)
    pub = await engine.client()
    pub.send({"op": "pub", "id": 31, "items": items("p.d", list(range(51)))})
    err = await pub.recv()
    assert (err["op"], err["code"], err["id"]) == ("err", "bad_request", 31)
    assert "holds 51 items; the limit is 50" in err["msg"]
    pub.send({"op": "pub", "id": 32, "items": items("p.d", list(range(50)))})
    assert len((await pub.recv())["pos"]) == 50
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
async def test_a_forbidden_topic_refuses_the_batch_naming_it(engine_factory: Any) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await token_bystander(engine)
    pub = await token_client(engine, pub_topics=["prices.>"])
    pub.send(
        {
            "op": "pub",
            "id": 41,
            "items": [
                {"topic": "prices.fx", "key": "a", "data": 1},
                {"topic": "news.x", "key": "b", "data": 1},
            ],
        }
    )
    err = await pub.recv()
    assert (err["op"], err["code"], err["id"], err["topic"]) == ("err", "forbidden", 41, "news.x")
    assert engine.worker is not None
    assert list((await engine.worker.bus.snapshot("prices.fx")).items) == []
    await still_served(engine, watcher)
