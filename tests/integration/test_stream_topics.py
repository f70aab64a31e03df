"""Stream topics (docs/protocol.md 4.2) against a real worker and hub over 127.0.0.1.

Every event is delivered in order with its position (nothing coalesced), `sub`
with `since` is answered from the retained history, and a state topic beside
them behaves as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from engine.bus.base import Update
from engine.client import connect
from engine.client.client import CONNECTED
from engine.client.raw import RawConnection
from engine.client.raw import connect as raw_connect
from engine.client.state import ReconnectPolicy
from engine.config import TopicRule
from engine.protocol.codec import format_pos, parse_pos
from tests.integration.conftest import Engine, eventually
from workers.main import serve_worker

pytestmark = pytest.mark.timeout(60)

HISTORY = 20
TOPICS = [
    TopicRule(pattern="trades.>", mode="stream", max_hz=0.0, history=HISTORY),
    TopicRule(pattern="slow.>", mode="stream", max_hz=2.0, history=HISTORY),
]


@pytest.fixture
async def engine(engine_factory: Any) -> Engine:
    return await engine_factory(
        fanout={"flush_interval_ms": 5},
        auth={"allow_anonymous_publish": True},
        topics=TOPICS,
    )


async def publish_events(engine: Engine, topic: str, values: list[Any], key: str = "") -> list[int]:
    """Publish every value as one event, in one batch (all between two flushes)."""
    assert engine.worker is not None
    updates = [Update(topic, key, msgpack.packb(v, use_bin_type=True)) for v in values]
    return await engine.worker.bus.publish_wait(updates)


async def events_until(conn: RawConnection, topic: str, last: int) -> list[tuple[int, Any]]:
    """(pos, data) of the events received on `topic` until the one at `last`;
    fails on a gap (none is expected here)."""
    got: list[tuple[int, Any]] = []
    while not got or got[-1][0] < last:
        msg = await conn.recv()
        assert msg["op"] != "gap", msg
        if msg["op"] == "evt" and msg["topic"] == topic:
            got.extend((parse_pos(p), d) for p, d in msg["items"])
    return got


async def test_every_event_is_delivered_in_order_with_its_position(engine: Engine) -> None:
    conn, (_, snap) = await engine.subscriber(["trades.fx"])
    assert snap["op"] == "snap" and snap["full"] is True and snap["items"] == []
    # 200 events of one key published at once, then 100 more one by one
    positions = await publish_events(engine, "trades.fx", list(range(200)), key="EURUSD")
    for i in range(200, 300):
        positions.append(await engine.publish("trades.fx", "EURUSD", i))
    got = await events_until(conn, "trades.fx", positions[-1])
    assert got == list(zip(positions, range(300), strict=True))  # nothing coalesced
    assert conn.frames < 300  # batched: several events per frame


async def test_pub_to_a_stream_topic_needs_no_key(engine: Engine) -> None:
    sub, _ = await engine.subscriber(["trades.ws"])
    pub = await engine.client()
    pub.send({"op": "pub", "topic": "trades.ws", "data": {"px": 1.5}, "id": 7})
    ack = await pub.recv()
    assert ack["op"] == "ack" and ack["id"] == 7
    evt = await sub.recv_op("evt")
    assert evt == {"op": "evt", "topic": "trades.ws", "items": [[ack["pos"], {"px": 1.5}]]}
    # a state topic still needs its key
    pub.send({"op": "pub", "topic": "prices.fx", "data": 1, "id": 8})
    err = await pub.recv()
    assert (err["op"], err["code"], err["id"]) == ("err", "bad_request", 8)


async def test_sub_with_since_is_served_from_the_history(engine: Engine) -> None:
    positions = await publish_events(engine, "trades.h", [f"e{i}" for i in range(50)])
    wire = [format_pos(p) for p in positions]
    _, (_, snap) = await engine.subscriber(["trades.h"])
    epoch = snap["epoch"]
    # no since: the newest `history` events
    assert snap["full"] is True and snap["pos"] == wire[-1]
    assert snap["items"] == [[wire[i], f"e{i}"] for i in range(30, 50)]
    # since inside the history: exactly the events after it
    _, (_, snap) = await engine.subscriber(["trades.h"], since={"trades.h": (epoch, wire[39])})
    assert snap["full"] is False
    assert snap["items"] == [[wire[i], f"e{i}"] for i in range(40, 50)]
    # since older than the history: the newest `history` events, full
    _, (_, snap) = await engine.subscriber(["trades.h"], since={"trades.h": (epoch, wire[5])})
    assert snap["full"] is True and [p for p, _ in snap["items"]] == wire[30:]
    # another epoch: full
    _, (_, snap) = await engine.subscriber(["trades.h"], since={"trades.h": ("old", wire[45])})
    assert snap["full"] is True and len(snap["items"]) == HISTORY
    # up to date: nothing, partial; and the next event follows
    conn, (_, snap) = await engine.subscriber(["trades.h"], since={"trades.h": (epoch, wire[-1])})
    assert (snap["full"], snap["items"]) == (False, [])
    (p,) = await publish_events(engine, "trades.h", ["next"])
    assert (await conn.recv_op("evt"))["items"] == [[format_pos(p), "next"]]


async def test_a_new_worker_serves_the_history_it_loaded_from_the_bus(engine: Engine) -> None:
    positions = await publish_events(engine, "trades.late", list(range(30)))
    assert engine.worker is not None
    epoch = engine.worker.fanout.epoch
    late = await serve_worker(engine.cfg, engine.run_dir, slot=2)
    try:
        conn = await raw_connect(f"ws://127.0.0.1:{late.port}{engine.cfg.server.path}")
        engine.clients.append(conn)
        await conn.recv()  # hello
        conn.subscribe(
            ["trades.late"], id=1, since={"trades.late": (epoch, format_pos(positions[24]))}
        )
        await conn.recv()  # ack
        snap = await conn.recv()
        assert snap["full"] is False
        assert snap["items"] == [[format_pos(positions[i]), i] for i in range(25, 30)]
    finally:
        await late.close()
        await late.bus.close()


async def test_a_stream_topic_with_max_hz_batches_every_event(engine: Engine) -> None:
    conn, _ = await engine.subscriber(["slow.t"])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    positions: list[int] = []
    evts = 0
    got: list[int] = []
    for i in range(20):
        positions += await publish_events(engine, "slow.t", [i])
        await asyncio.sleep(0.01)
    while not got or got[-1] != 19:
        msg = await conn.recv_op("evt")
        evts += 1
        got.extend(d for _, d in msg["items"])
    elapsed = loop.time() - t0
    assert got == list(range(20))  # every event, in order, however batched
    assert evts <= elapsed * 2.0 + 1  # at most 2 frames per second (max_hz = 2)


async def test_a_state_topic_beside_stream_topics_is_still_coalesced(engine: Engine) -> None:
    conn, _ = await engine.subscriber(["prices.fx", "trades.mix"])
    for i in range(100):
        await engine.publish("prices.fx", "EURUSD", i)
    (p,) = await publish_events(engine, "trades.mix", ["done"])
    seen: dict[str, Any] = {}
    events: list[Any] = []

    def drain() -> bool:
        for m in conn.take_nowait():
            if m["op"] == "upd":
                assert m["topic"] == "prices.fx"
                seen.update(m["items"])
            elif m["op"] == "evt":
                events.extend(m["items"])
        return seen.get("EURUSD") == 99 and bool(events)

    await eventually(drain)
    assert events == [[format_pos(p), "done"]]
    assert engine.worker is not None
    assert engine.worker.fanout.stats.updates_coalesced > 0


async def test_the_python_client_recovers_a_stream_with_since(engine: Engine) -> None:
    client = connect(engine.url, policy=ReconnectPolicy(base_ms=5, max_ms=20))
    await client.__aenter__()
    try:
        await client.subscribe(["trades.py"])
        stream = client.changes()
        first = await publish_events(engine, "trades.py", ["a", "b"])
        change = await asyncio.wait_for(stream.__anext__(), 5)
        if change.kind == "snap":  # the subscription's own (empty) snap
            change = await asyncio.wait_for(stream.__anext__(), 5)
        got = list(change.events)
        while len(got) < 2:
            got += (await asyncio.wait_for(stream.__anext__(), 5)).events
        assert got == [(format_pos(first[0]), "a"), (format_pos(first[1]), "b")]
        assert engine.worker is not None
        engine.worker.accepting = False  # refuse reconnects while events are published
        for conn in list(engine.worker.connections):
            assert conn.transport is not None
            conn.transport.disconnect(graceful=False)
        await eventually(lambda: client.conn_state != CONNECTED)
        missed = await publish_events(engine, "trades.py", ["c", "d", "e"])
        engine.worker.accepting = True
        await eventually(lambda: client.conn_state == CONNECTED and client.counters.connects == 2)
        change = await asyncio.wait_for(stream.__anext__(), 5)
        # resubscribed with `since`: exactly the events it missed, in order
        assert (change.kind, change.full) == ("snap", False)
        assert list(change.events) == [
            (format_pos(p), v) for p, v in zip(missed, "cde", strict=True)
        ]
    finally:
        await client.close()
