"""Topics held per worker (engine/fanout/core.py rule 9) against a real worker
and hub over 127.0.0.1: a `sub` of a topic the worker does not hold waits for
its load, and what the client sees stays what the protocol says.
"""

from __future__ import annotations

from typing import Any

import pytest

from engine.client.raw import RawConnection
from tests.integration.conftest import Engine, eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def engine(engine_factory: Any) -> Engine:
    return await engine_factory(fanout={"flush_interval_ms": 5, "topic_grace_s": 0.0})


async def replies(conn: RawConnection, n: int) -> list[tuple[Any, ...]]:
    """The next `n` messages, as (op, id or topic)."""
    out: list[tuple[Any, ...]] = []
    for _ in range(n):
        m = await conn.recv()
        out.append((m["op"], m.get("id", m.get("topic"))))
    return out


async def test_requests_after_a_sub_that_waits_for_a_load_are_answered_in_order(
    engine: Engine,
) -> None:
    await engine.publish("cold.a", "k", 1)
    conn = await engine.client()
    # all sent at once: the first sub waits for two loads, the rest for it
    conn.send({"op": "sub", "topics": ["cold.a", "cold.b"], "id": 1})
    conn.send({"op": "ping", "id": 2})
    conn.send({"op": "unsub", "topics": ["cold.a"], "id": 3})
    conn.send({"op": "sub", "topics": ["cold.c"], "id": 4})
    conn.send({"op": "ping", "id": 5})
    assert await replies(conn, 8) == [
        ("ack", 1),
        ("snap", "cold.a"),
        ("snap", "cold.b"),
        ("pong", 2),
        ("ack", 3),
        ("ack", 4),
        ("snap", "cold.c"),
        ("pong", 5),
    ]
    assert engine.worker is not None
    assert sorted(conn_topics(engine)) == ["cold.b", "cold.c"]
    # the unsubscribed topic goes after its grace (0 here: the next sweep)
    await eventually(lambda: "cold.a" not in engine.worker.fanout.topics)  # type: ignore[union-attr]
    await engine.publish("cold.b", "k", 2)
    upd = await conn.recv_op("upd")
    assert (upd["topic"], upd["items"]) == ("cold.b", {"k": 2})


def conn_topics(engine: Engine) -> list[str]:
    assert engine.worker is not None
    return [name for name, t in engine.worker.fanout.topics.items() if t.groups]


async def test_a_sub_whose_topic_cannot_be_loaded_is_refused_and_the_rest_goes_on(
    engine: Engine,
) -> None:
    honest, _ = await engine.subscriber(["held.t"])
    assert engine.worker is not None and engine.hub is not None
    await engine.hub.close()  # the bus goes away: no topic can be loaded
    engine.hub = None
    await eventually(lambda: not engine.worker.bus.connected)  # type: ignore[union-attr]
    conn = await engine.client()
    conn.send({"op": "sub", "topics": ["held.t", "cold.t"], "id": 7})
    conn.send({"op": "ping", "id": 8})
    err = await conn.recv()
    assert (err["op"], err["code"], err["id"], err["topic"]) == (
        "err",
        "unavailable",
        7,
        "cold.t",
    )
    assert (await conn.recv())["op"] == "pong"  # reading resumed after the refusal
    assert engine.worker.counters.topic_load_failures == 1
    assert "cold.t" not in engine.worker.fanout.topics
    assert conn_topics(engine) == ["held.t"]  # all or nothing: held.t only for `honest`
    # the honest subscriber's connection is untouched and still answered
    honest.send({"op": "ping", "id": 9})
    assert (await honest.recv_op("pong"))["id"] == 9


async def test_a_client_that_leaves_while_its_sub_loads_leaves_nothing(engine: Engine) -> None:
    conn = await engine.client()
    conn.send({"op": "sub", "topics": ["gone.t"], "id": 1})
    conn.close()
    await conn.wait_closed()
    assert engine.worker is not None
    await eventually(lambda: not engine.worker.connections)  # type: ignore[union-attr]
    await eventually(lambda: "gone.t" not in engine.worker.fanout.topics)  # type: ignore[union-attr]
    assert engine.worker.fanout.subscription_count() == 0


async def test_a_load_the_bus_does_not_answer_in_time_is_refused_then_the_next_works(
    engine_factory: Any,
) -> None:
    engine = await engine_factory(
        fanout={"flush_interval_ms": 5, "topic_load_timeout_s": 0.3, "max_topic_loads": 1}
    )
    honest, _ = await engine.subscriber(["held.t"])
    await engine.publish("slow.t", "k", 1)
    assert engine.worker is not None
    link = engine.worker.bus._link  # the worker's link to the hub
    assert link is not None and link.transport is not None
    link.transport.pause_reading()  # a stalled bus: no reply reaches the worker
    conn = await engine.client()
    conn.send({"op": "sub", "topics": ["slow.t", "slow.u"], "id": 1})
    honest.send({"op": "ping", "id": 2})
    assert (await honest.recv_op("pong"))["id"] == 2  # the worker serves others meanwhile
    err = await conn.recv()
    assert (err["op"], err["code"], err["id"]) == ("err", "unavailable", 1)
    assert "fanout.topic_load_timeout_s" in err["msg"]
    assert engine.worker.counters.topic_load_failures == 2  # one in flight, one waiting its turn
    link.transport.resume_reading()
    conn.send({"op": "sub", "topics": ["slow.t"], "id": 3})
    assert (await conn.recv())["op"] == "ack"
    snap = await conn.recv()
    assert (snap["topic"], snap["items"]) == ("slow.t", {"k": 1})
