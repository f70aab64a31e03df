"""Every op and error code of protocol v1 against a real worker and hub over 127.0.0.1.

Each bad-input test also keeps a well-behaved subscriber on the same worker and
checks that it still receives updates afterwards.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
from picows import WSMsgType

from engine.client.raw import RawConnection
from tests.integration.conftest import Engine, View, eventually
from tests.support.rawws import OP_BINARY, OP_CONT, OP_TEXT, RawWS

pytestmark = pytest.mark.timeout(60)


async def bystander(engine: Engine, topic: str = "watch.me") -> RawConnection:
    conn, _ = await engine.subscriber([topic])
    return conn


async def still_served(engine: Engine, conn: RawConnection, topic: str = "watch.me") -> None:
    """The bystander receives a fresh update."""
    marker = f"v{asyncio.get_running_loop().time()}"
    await engine.publish(topic, "k", marker)
    while True:
        msg = await conn.recv_op("upd")
        if msg["topic"] == topic and msg["items"].get("k") == marker:
            return


async def test_hello_and_subprotocol(engine: Engine) -> None:
    conn = await engine.client()
    assert conn.transport is not None
    assert conn.transport.response.headers.get("Sec-WebSocket-Protocol") == "fanout.v1"
    conn2 = await engine.client(subprotocols=())
    conn2.send({"op": "ping", "id": 3})
    assert (await conn2.recv())["op"] == "pong"


async def test_hello_fields(engine: Engine) -> None:
    from engine.client.raw import connect

    conn = await connect(engine.url)
    engine.clients.append(conn)
    hello = await conn.recv()
    assert hello["op"] == "hello" and hello["v"] == 1 and hello["auth"] is False
    assert isinstance(hello["conn"], str) and hello["conn"]
    assert isinstance(hello["node"], str) and hello["node"]


async def test_sub_snap_then_coalesced_updates(engine: Engine) -> None:
    await engine.publish("prices.fx", "EURUSD", 1.1)
    await engine.publish("prices.fx", "GBPUSD", 1.3)
    conn, (ack, snap) = await engine.subscriber(["prices.fx"])
    assert ack == {"op": "ack", "id": 1}
    assert snap["op"] == "snap" and snap["topic"] == "prices.fx" and snap["full"] is True
    assert snap["items"] == {"EURUSD": 1.1, "GBPUSD": 1.3}
    assert isinstance(snap["epoch"], str) and "-" in snap["pos"]
    for i in range(200):
        await engine.publish("prices.fx", "EURUSD", 1.0 + i / 1000)
    view = View()
    view.apply(snap)
    await eventually(lambda: (view.drain(conn), view.state["prices.fx"].get("EURUSD") == 1.199)[1])
    assert view.state["prices.fx"] == {"EURUSD": 1.199, "GBPUSD": 1.3}
    # 200 updates of one key arrived as far fewer frames (coalesced)
    assert conn.frames < 200


async def test_delete_with_nil(engine: Engine) -> None:
    await engine.publish("t.del", "a", 1)
    await engine.publish("t.del", "b", 2)
    conn, _ = await engine.subscriber(["t.del"])
    await engine.publish("t.del", "a", None)
    upd = await conn.recv_op("upd")
    assert upd["items"] == {"a": None}
    _, (_, snap2) = await engine.subscriber(["t.del"])
    assert snap2["items"] == {"b": 2}


async def test_since_recovery_sends_only_missed_keys(engine: Engine) -> None:
    for k in "abcde":
        await engine.publish("rec.t", k, 0)
    _, (_, snap) = await engine.subscriber(["rec.t"])
    mark = (snap["epoch"], snap["pos"])
    await engine.publish("rec.t", "b", 1)
    await engine.publish("rec.t", "d", 1)
    await engine.publish("rec.t", "e", None)
    _, (_, snap2) = await engine.subscriber(["rec.t"], since={"rec.t": mark})
    assert snap2["full"] is False
    assert snap2["items"] == {"b": 1, "d": 1, "e": None}
    # a stale epoch gets a full snapshot
    _, (_, snap3) = await engine.subscriber(["rec.t"], since={"rec.t": ("other", snap["pos"])})
    assert snap3["full"] is True and snap3["items"] == {"a": 0, "b": 1, "c": 0, "d": 1}


async def test_resubscribe_resends_snap_and_unsub_stops_updates(engine: Engine) -> None:
    await engine.publish("u.t", "k", 1)
    conn, _ = await engine.subscriber(["u.t"])
    conn.subscribe(["u.t"], id=2)
    assert (await conn.recv()) == {"op": "ack", "id": 2}
    assert (await conn.recv())["op"] == "snap"
    conn.send({"op": "unsub", "topics": ["u.t"], "id": 3})
    assert (await conn.recv()) == {"op": "ack", "id": 3}
    await engine.publish("u.t", "k", 2)
    conn.send({"op": "ping", "id": 4})
    # the pong comes back and no upd came before it
    assert (await conn.recv())["op"] == "pong"
    await asyncio.sleep(0.05)
    assert [m for m in conn.take_nowait() if m["op"] == "upd"] == []


async def test_ping_pong(engine: Engine) -> None:
    conn = await engine.client()
    conn.send({"op": "ping", "id": 9})
    pong = await conn.recv()
    assert pong["op"] == "pong" and pong["id"] == 9 and pong["ts"] > 1_600_000_000_000


async def test_pub_forbidden_when_anonymous_publish_is_off(engine: Engine) -> None:
    watcher = await bystander(engine)
    conn = await engine.client()
    conn.send({"op": "pub", "topic": "a.b", "key": "k", "data": 1, "id": 5})
    err = await conn.recv()
    assert (
        err["op"] == "err"
        and err["code"] == "forbidden"
        and err["id"] == 5
        and err["topic"] == "a.b"
    )
    await still_served(engine, watcher)


async def test_pub_when_allowed_reaches_subscribers(engine_factory: Any) -> None:
    engine = await engine_factory(
        auth={"allow_anonymous_publish": True}, fanout={"flush_interval_ms": 5}
    )
    sub, _ = await engine.subscriber(["p.t"])
    pub = await engine.client()
    pub.send(
        {"op": "pub", "topic": "p.t", "key": "k", "data": {"px": 1.5, "raw": b"\x00\x01"}, "id": 7}
    )
    ack = await pub.recv()
    assert ack["op"] == "ack" and ack["id"] == 7 and "-" in ack["pos"]
    upd = await sub.recv_op("upd")
    assert upd["items"] == {"k": {"px": 1.5, "raw": b"\x00\x01"}} and upd["pos"] == ack["pos"]
    pub.send({"op": "pub", "topic": "p.t", "data": 1, "id": 8})
    err = await pub.recv()
    assert err["code"] == "bad_request" and err["id"] == 8


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ([1, 2, 3], "bad_request"),
        ("just a string", "bad_request"),
        ({"topics": ["a"]}, "bad_request"),
        ({"op": "sub", "topics": "a"}, "bad_request"),
        ({"op": "fly", "id": 4}, "unknown_op"),
        ({"op": "sub", "topics": ["bad topic!"], "id": 4}, "bad_topic"),
        ({"op": "sub", "topics": ["x" * 201]}, "bad_topic"),
    ],
)
async def test_bad_messages_get_err_and_connection_stays(
    engine: Engine, message: Any, code: str
) -> None:
    watcher = await bystander(engine)
    conn = await engine.client()
    conn.send(message)
    err = await conn.recv()
    assert err["op"] == "err" and err["code"] == code and err["msg"]
    if isinstance(message, dict) and "id" in message:
        assert err["id"] == message["id"]
    if code == "bad_topic":
        assert "topic" in err
    conn.send({"op": "ping"})
    assert (await conn.recv())["op"] == "pong"
    await still_served(engine, watcher)


async def test_undecodable_bytes_get_bad_request(engine: Engine) -> None:
    conn = await engine.client()
    conn.send_bytes(b"\xc1\xff\x00")
    err = await conn.recv()
    assert err["code"] == "bad_request"
    conn.send_bytes(msgpack.packb({"op": "ping"}) + b"\x01")  # trailing bytes
    assert (await conn.recv())["code"] == "bad_request"


async def test_sub_is_all_or_nothing(engine: Engine) -> None:
    conn = await engine.client()
    conn.send({"op": "sub", "topics": ["good.one", "bad one"], "id": 2})
    err = await conn.recv()
    assert err["code"] == "bad_topic" and err["topic"] == "bad one"
    await engine.publish("good.one", "k", 1)
    conn.send({"op": "ping"})
    assert (await conn.recv())["op"] == "pong"
    await asyncio.sleep(0.05)
    assert conn.take_nowait() == []


async def test_too_many_topics(engine_factory: Any) -> None:
    engine = await engine_factory(
        limits={"max_topics_per_conn": 3}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    conn = await engine.client()
    conn.subscribe(["a", "b", "c", "d"], id=1)
    assert (await conn.recv())["code"] == "too_many_topics"
    conn.subscribe(["a", "b"], id=2)
    assert (await conn.recv())["op"] == "ack"
    await conn.recv()
    await conn.recv()
    conn.subscribe(["c", "d"], id=3)
    err = await conn.recv()
    assert err["code"] == "too_many_topics" and err["id"] == 3
    await still_served(engine, watcher)


async def test_text_frame_closes_1003(engine: Engine) -> None:
    watcher = await bystander(engine)
    conn = await engine.client()
    conn.send_bytes(b'{"op": "ping"}', WSMsgType.TEXT)
    assert await conn.wait_closed() == 1003
    await still_served(engine, watcher)


async def test_oversized_frame_closes_1009(engine_factory: Any) -> None:
    engine = await engine_factory(
        limits={"max_message_bytes": 1024}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    conn = await engine.client()
    conn.send({"op": "ping", "pad": "x" * 2000})
    assert await conn.wait_closed() == 1009
    await still_served(engine, watcher)


async def test_fragmented_message_is_reassembled_and_counted(engine_factory: Any) -> None:
    engine = await engine_factory(
        limits={"max_message_bytes": 1024}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    port = engine.worker.port
    payload = msgpack.packb({"op": "ping", "id": 11})
    raw = await asyncio.to_thread(RawWS, "127.0.0.1", port)
    try:
        await asyncio.to_thread(raw.recv_messages)  # hello
        raw.send_frame(OP_BINARY, payload[:3], fin=False)
        raw.send_frame(OP_CONT, payload[3:6], fin=False)
        raw.send_frame(OP_CONT, payload[6:], fin=True)
        assert (await asyncio.to_thread(raw.recv_messages))[0] == {
            "op": "pong",
            "id": 11,
            "ts": pytest.approx(0, abs=1e13),
        }
        # fragments that add up past the limit: 1009, even though each fragment is small
        for _ in range(3):
            raw.send_frame(OP_BINARY if _ == 0 else OP_CONT, b"\x00" * 500, fin=False)
        assert await asyncio.to_thread(raw.recv_close_code) == 1009
    finally:
        raw.close()
    await still_served(engine, watcher)


async def test_text_fragment_start_closes_1003(engine: Engine) -> None:
    raw = await asyncio.to_thread(RawWS, "127.0.0.1", engine.worker.port)
    try:
        await asyncio.to_thread(raw.recv_messages)
        raw.send_frame(OP_TEXT, b"{", fin=False)
        assert await asyncio.to_thread(raw.recv_close_code) == 1003
    finally:
        raw.close()


async def test_repeated_garbage_closes_1008(engine: Engine) -> None:
    watcher = await bystander(engine)
    conn = await engine.client()
    for _ in range(20):
        conn.send_bytes(b"\xc1")
    assert await conn.wait_closed() == 1008
    errs = [m for m in conn.take_nowait() if m.get("op") == "err"]
    assert len(errs) >= 1
    await still_served(engine, watcher)


async def test_wrong_path_is_404(engine: Engine) -> None:
    raw = await asyncio.to_thread(RawWS, "127.0.0.1", engine.worker.port, "/nope")
    raw.close()
    assert raw.status == 404


async def test_several_dirty_topics_arrive_in_one_frame(engine: Engine) -> None:
    conn, _ = await engine.subscriber(["m.a", "m.b", "m.c"])
    frames_before = conn.frames
    # publish to three topics within one flush interval (5 ms): one frame
    import msgpack as mp

    from engine.bus.base import Update

    await engine.worker.bus.publish_wait(
        [Update(t, "k", mp.packb(1)) for t in ("m.a", "m.b", "m.c")]
    )
    got: list[dict[str, Any]] = []
    while len(got) < 3:
        got.append(await conn.recv_op("upd"))
    assert {m["topic"] for m in got} == {"m.a", "m.b", "m.c"}
    assert conn.frames - frames_before == 1


async def test_max_hz_limits_frames(engine_factory: Any) -> None:
    engine = await engine_factory(fanout={"flush_interval_ms": 10})
    fast, _ = await engine.subscriber(["hz.t"])
    slow, _ = await engine.subscriber(["hz.t"], max_hz=5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(60):
        await engine.publish("hz.t", "k", i)
        await asyncio.sleep(0.01)
    v_fast, v_slow = View(), View()
    fast_upds: list[dict[str, Any]] = []
    slow_upds: list[dict[str, Any]] = []

    def converged() -> bool:
        for conn, view, upds in ((fast, v_fast, fast_upds), (slow, v_slow, slow_upds)):
            for m in conn.take_nowait():
                if m["op"] == "upd":
                    upds.append(m)
                    view.apply(m)
        return v_fast.state.get("hz.t", {}).get("k") == 59 == v_slow.state.get("hz.t", {}).get("k")

    await eventually(converged, timeout=10)
    elapsed = loop.time() - t0
    # at most one frame per 200 ms (5 Hz) over the whole run, however slow the machine
    assert len(slow_upds) <= elapsed / 0.2 + 2, (len(slow_upds), elapsed)
    assert len(fast_upds) > len(slow_upds)


async def test_pub_while_the_bus_is_down_gets_unavailable_and_keeps_state(
    engine_factory: Any,
) -> None:
    engine = await engine_factory(
        auth={"allow_anonymous_publish": True}, fanout={"flush_interval_ms": 5}
    )
    await engine.publish("down.t", "k", 1)
    sub, (_, snap) = await engine.subscriber(["down.t"])
    assert snap["items"] == {"k": 1}
    await engine.hub.close()
    await eventually(lambda: not engine.worker.bus.connected)
    pub = await engine.client()
    pub.send({"op": "pub", "topic": "down.t", "key": "k", "data": 2, "id": 4})
    err = await pub.recv()
    assert err["op"] == "err" and err["code"] == "unavailable" and err["id"] == 4
    # the subscriber keeps its connection and is still answered from the state held
    _, (_, snap2) = await engine.subscriber(["down.t"])
    assert snap2["items"] == {"k": 1}
    sub.send({"op": "ping", "id": 5})
    assert (await sub.recv_op("pong"))["id"] == 5
