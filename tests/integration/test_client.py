"""The Python client and publishers against real servers over 127.0.0.1.

- Recovery: after the server drops the connection, after a `bye` (a drain),
  and (slow, process level) after `kill -9` of the worker: the client
  resubscribes with `since` and receives only the keys it missed (`full: false`).
- Backoff: delays drawn from an injected rng, checked against the policy.
- 4001/4003: a tiny real picows server that refuses or revokes tokens (a real
  WebSocket peer speaking protocol v1, not a mock of the engine; written while
  the engine's JWT auth was being built), and the engine's own JWT auth (a
  token expiring while connected: 4003).
- Publisher (admin HTTP, keep-alive, retries) and BusPublisher (the bus).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from engine.admin.server import serve_admin
from engine.bus import create_bus
from engine.client import (
    CLOSED,
    CONNECTED,
    UNAUTHORIZED,
    BusPublisher,
    Change,
    Client,
    Publisher,
    PublishError,
    ReconnectPolicy,
    SubscribeError,
    Unauthorized,
    connect,
)
from engine.client.state import Reconnector
from tests.integration.conftest import TIMEOUT_FACTOR, Engine, eventually
from tests.support.serve import Served
from workers.main import serve_worker

FAST = ReconnectPolicy(base_ms=20, max_ms=200, stable_s=30)


@pytest.fixture
async def client_factory(engine: Engine) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def make(**kw: Any) -> Client:
        kw.setdefault("policy", FAST)
        c = connect(engine.url, **kw)
        clients.append(c)
        await c.__aenter__()
        return c

    yield make
    for c in clients:
        await c.close()


def drop_all(engine: Engine) -> None:
    """The server kills every connection (no close frame: as a crash or a cut cable)."""
    assert engine.worker is not None
    for conn in list(engine.worker.connections):
        assert conn.transport is not None
        conn.transport.disconnect(graceful=False)


async def test_subscribe_fills_the_view_and_updates_arrive_as_changes(
    engine: Engine, client_factory: Callable[..., Awaitable[Client]]
) -> None:
    await engine.publish("c.t", "a", {"px": 1})
    client = await client_factory()
    seen: list[Change] = []
    client.on_change(seen.append)
    stream = client.changes()
    await client.subscribe(["c.t"])
    assert dict(client.topic("c.t")) == {"a": {"px": 1}}
    await engine.publish("c.t", "b", 2)
    await engine.publish("c.t", "a", None)
    await eventually(lambda: dict(client.topic("c.t")) == {"b": 2})
    first = await asyncio.wait_for(stream.__anext__(), 5 * TIMEOUT_FACTOR)
    assert (first.kind, first.full, dict(first.items)) == ("snap", True, {"a": {"px": 1}})
    assert seen[0] == first and {k for c in seen[1:] for k in c.items} == {"a", "b"}
    assert client.conn_state == CONNECTED and client.counters.connects == 1


async def test_a_refused_subscription_raises_and_is_not_kept(
    client_factory: Callable[..., Awaitable[Client]],
) -> None:
    client = await client_factory()
    with pytest.raises(SubscribeError) as info:
        await client.subscribe(["ok.topic", "bad topic"])
    assert info.value.code == "bad_topic" and info.value.topic == "bad topic"
    assert client.subscriptions == {}


async def test_after_the_server_drops_the_connection_only_missed_keys_arrive(
    engine: Engine, client_factory: Callable[..., Awaitable[Client]]
) -> None:
    for k in "abcdefgh":
        await engine.publish("rec.t", k, {"v": 0})
    client = await client_factory()
    await client.subscribe(["rec.t"])
    stream = client.changes()
    assert engine.worker is not None
    engine.worker.accepting = False  # refuse reconnects (HTTP 503) while we publish
    drop_all(engine)
    await eventually(lambda: client.conn_state != CONNECTED)
    await engine.publish("rec.t", "b", {"v": 1})
    await engine.publish("rec.t", "c", None)
    await eventually(lambda: client.counters.connect_failures >= 1)
    engine.worker.accepting = True
    await eventually(lambda: client.conn_state == CONNECTED and client.counters.connects == 2)
    change = await asyncio.wait_for(stream.__anext__(), 5 * TIMEOUT_FACTOR)
    assert change.kind == "snap" and change.full is False
    assert dict(change.items) == {"b": {"v": 1}, "c": None}  # nothing it already had
    assert dict(client.topic("rec.t")) == {k: {"v": 1 if k == "b" else 0} for k in "abdefgh"}
    assert client.counters.snaps_partial == 1 and client.counters.last_close_code == 1006


async def test_after_a_bye_it_waits_retry_ms_and_recovers_on_the_new_worker(
    engine_factory: Callable[..., Awaitable[Engine]],
) -> None:
    engine = await engine_factory(
        fanout={"flush_interval_ms": 5}, workers={"retry_min_ms": 150, "retry_max_ms": 150}
    )
    for k in "xyz":
        await engine.publish("bye.t", k, 0)
    async with connect(engine.url, policy=FAST) as client:
        await client.subscribe(["bye.t"])
        stream = client.changes()
        old = engine.worker
        assert old is not None
        # the replacement listens on the same port (SO_REUSEPORT) before the old one drains
        cfg = dataclasses.replace(
            engine.cfg, server=dataclasses.replace(engine.cfg.server, port=old.port)
        )
        new = await serve_worker(cfg, engine.run_dir, slot=2)
        new.accepting = False  # hold reconnects until the missed update is published
        try:
            await old.drain(1012, "restart", 5.0)
            assert client.counters.byes == 1
            await engine.publish("bye.t", "y", 1)
            new.accepting = True
            await eventually(lambda: client.counters.connects == 2)
            change = await asyncio.wait_for(stream.__anext__(), 5 * TIMEOUT_FACTOR)
            assert (change.full, dict(change.items)) == (False, {"y": 1})
            assert client.counters.retry_delays_ms[0] == 150  # bye.retry_ms, honoured
            assert client.counters.last_close_code == 1012
            assert dict(client.topic("bye.t")) == {"x": 0, "y": 1, "z": 0}
        finally:
            await new.close()
            await new.bus.close()


async def test_backoff_delays_follow_the_policy_and_the_injected_rng() -> None:
    from tests.support.serve import free_port

    url = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens there
    policy = ReconnectPolicy(base_ms=1, max_ms=8, factor=2)
    ticks = iter(range(1000))
    client = Client(url, policy=policy, rng=random.Random(7), clock=lambda: float(next(ticks)))
    client.start()
    try:
        await eventually(lambda: client.counters.connect_failures >= 7)
    finally:
        await client.close()
    ref = random.Random(7)
    ref.random()  # the first attempt draws too (and waits for nothing)
    expected = [ref.random() * min(8, 1 * 2**n) for n in range(6)]
    assert list(client.counters.retry_delays_ms)[:6] == pytest.approx(expected)


# -- a tiny real server that checks tokens --------------------------------------------


class TokenServer:
    """Protocol v1, just enough: hello (auth required), `auth` -> ack or close
    4001, `sub` -> ack + an empty snap. `revoke()` closes everyone with 4001."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        self.tokens_seen: list[str] = []
        self.transports: list[WSTransport] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        outer = self

        class Listener(WSListener):
            def on_ws_connected(self, transport: WSTransport) -> None:
                outer.transports.append(transport)
                transport.send(
                    WSMsgType.BINARY,
                    msgpack.packb({"op": "hello", "v": 1, "conn": "c", "node": "t", "auth": True}),
                )

            def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
                if frame.msg_type != WSMsgType.BINARY:
                    return
                msg = msgpack.unpackb(frame.get_payload_as_bytes())
                if msg["op"] == "auth":
                    outer.tokens_seen.append(msg["token"])
                    if msg["token"] in outer.valid:
                        reply = {"op": "ack", "id": msg["id"], "user": "u"}
                        transport.send(WSMsgType.BINARY, msgpack.packb(reply))
                        return
                    transport.send_close(WSCloseCode(4001), b"bad token")
                    transport.disconnect()
                elif msg["op"] == "sub":
                    out = msgpack.packb({"op": "ack", "id": msg["id"]})
                    for t in msg["topics"]:
                        snap = {"op": "snap", "topic": t, "epoch": "e", "pos": "1-0"}
                        out += msgpack.packb({**snap, "full": True, "items": {}})
                    transport.send(WSMsgType.BINARY, out)

        self.server = await ws_create_server(lambda _req: Listener(), "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    def revoke(self) -> None:
        self.valid.clear()
        for t in self.transports:
            t.send_close(WSCloseCode(4001), b"token revoked")
            t.disconnect()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_no_reconnect_after_4001_until_a_new_token() -> None:
    srv = TokenServer()
    url = await srv.start()
    srv.valid.add("t1")
    try:
        async with connect(url, token="t1", policy=FAST) as client:
            await client.subscribe(["a.b"])
            srv.revoke()
            await eventually(lambda: client.conn_state == UNAUTHORIZED)
            assert client.counters.last_close_code == 4001
            # the policy would have retried within 20 ms; it does not, however long we wait
            await asyncio.sleep(0.3)
            assert srv.tokens_seen == ["t1"] and client.conn_state == UNAUTHORIZED
            srv.valid.add("t2")
            client.set_token("t2")
            await eventually(lambda: client.conn_state == CONNECTED)
            assert srv.tokens_seen == ["t1", "t2"] and client.counters.connects == 2
            await eventually(lambda: client.counters.snaps_full == 2)  # resubscribed
    finally:
        srv.close()


async def test_a_refused_first_token_raises_unauthorized() -> None:
    srv = TokenServer()
    url = await srv.start()
    try:
        with pytest.raises(Unauthorized):
            async with connect(url, token="nope", policy=FAST):
                pass
        assert srv.tokens_seen == ["nope"]
    finally:
        srv.close()


# -- publishers -----------------------------------------------------------------------


@pytest.fixture
async def admin(engine: Engine) -> AsyncIterator[Any]:
    bus = create_bus(engine.cfg, engine.run_dir, want_entries=False)
    await bus.start(None)
    await eventually(lambda: bus.connected)
    server = await serve_admin(engine.cfg, engine.run_dir, bus)
    yield server
    await server.close()
    await bus.close()


async def test_publisher_reuses_one_connection_and_reopens_a_closed_one(
    engine: Engine, admin: Any, client_factory: Callable[..., Awaitable[Client]]
) -> None:
    client = await client_factory()
    await client.subscribe(["pub.t"])
    async with Publisher(f"http://127.0.0.1:{admin.port}") as pub:
        pos1 = await pub.publish("pub.t", "a", {"px": 1.5})
        positions = await pub.publish_many([("pub.t", "b", [1, 2]), ("pub.t", "a", None)])
        assert len(positions) == 2 and pos1 not in positions
        assert pub.connections_opened == 1
        # the server closes the idle keep-alive connection: the next publish reopens it
        for task in list(admin._tasks):
            task.cancel()
        await eventually(lambda: not admin._tasks)
        await pub.publish("pub.t", "c", "x")
        assert pub.connections_opened == 2
        with pytest.raises(PublishError) as info:
            await pub.publish("bad topic", "k", 1)
        assert info.value.status == 400 and info.value.error == "bad_topic"
    await eventually(lambda: dict(client.topic("pub.t")) == {"b": [1, 2], "c": "x"})


async def test_publisher_retries_503_then_gives_up(engine: Engine) -> None:
    bus = create_bus(engine.cfg, engine.run_dir + "/nowhere", want_entries=False)
    server = await serve_admin(engine.cfg, engine.run_dir, bus)  # its bus never connects
    try:
        pub = Publisher(f"http://127.0.0.1:{server.port}", retries=2)
        with pytest.raises(PublishError) as info:
            await pub.publish("t", "k", 1)
        assert info.value.status == 503 and pub.retried == 2
        await pub.close()
    finally:
        await server.close()


async def test_publisher_reports_an_unreachable_server() -> None:
    from tests.support.serve import free_port

    pub = Publisher(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(PublishError) as info:
        await pub.publish("t", "k", 1)
    assert info.value.status == 0 and pub.retried == 1


async def test_bus_publisher_publishes_without_http(
    engine: Engine, client_factory: Callable[..., Awaitable[Client]]
) -> None:
    client = await client_factory()
    await client.subscribe(["busp.t"])
    async with BusPublisher(engine.cfg, engine.run_dir) as pub:
        pos = await pub.publish("busp.t", "k", {"px": 2})
        assert "-" in pos
        assert len(await pub.publish_many([("busp.t", "j", 1), ("busp.t", "k", None)])) == 2
        with pytest.raises(ValueError):
            await pub.publish("bad topic", "k", 1)
    await eventually(lambda: dict(client.topic("busp.t")) == {"j": 1})


# -- process level: kill -9 of the worker -----------------------------------------------


@pytest.mark.slow
async def test_recovers_after_the_worker_is_killed(tmp_path: Any) -> None:
    served = Served(["--workers", "1"], log_path=str(tmp_path / "serve.log"))
    try:
        await asyncio.to_thread(served.wait_ready)
        for k in "abcd":
            assert (
                await asyncio.to_thread(
                    served.post, "/publish", {"topic": "k9.t", "key": k, "data": 0}
                )
            )[0] == 200
        async with connect(served.ws_url, policy=FAST) as client:
            await client.subscribe(["k9.t"])
            stream = client.changes()
            (pid,) = (await asyncio.to_thread(served.worker_pids)).values()
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda: client.conn_state != CONNECTED, timeout=10)
            # published while no worker runs: the hub keeps it for the respawned worker
            status, _ = await asyncio.to_thread(
                served.post, "/publish", {"topic": "k9.t", "key": "b", "data": 1}
            )
            assert status == 200
            await eventually(lambda: client.counters.connects == 2, timeout=20)
            change = await asyncio.wait_for(stream.__anext__(), 10 * TIMEOUT_FACTOR)
            # the respawned worker may come back before or after that publish: either
            # way only what was missed comes in the snapshot, never a, c or d again
            assert (change.kind, change.full) == ("snap", False)
            assert dict(change.items) in ({"b": 1}, {})
            await eventually(lambda: dict(client.topic("k9.t")) == {"a": 0, "b": 1, "c": 0, "d": 0})
            assert client.counters.last_close_code == 1006
    finally:
        served.stop()


async def test_admin_serves_the_dashboard_and_the_browser_client(admin: Any) -> None:
    async def get(path: str) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        # an IP address as Host: the admin refuses other names (421, server.admin_allowed_hosts)
        host = f"127.0.0.1:{admin.port}"
        writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        raw = await reader.read(-1)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, body

    status, headers, body = await get("/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b'from "/static/fanout.js"' in body
    status, headers, body = await get("/static/fanout.js")
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"export class FanoutClient" in body
    status, headers, body = await get("/config.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "ws_port": admin.cfg.server.port,
        "ws_path": "/ws",
    }
    status, headers, _ = await get("/static/nope.js")
    assert status == 404 and headers["content-type"] == "application/json"


async def test_an_iterator_that_falls_behind_loses_its_oldest_changes_not_the_state(
    engine: Engine,
) -> None:
    async with connect(engine.url, policy=FAST, max_pending_changes=3) as client:
        await client.subscribe(["slow.t"])
        stream = client.changes()
        for i in range(10):
            await engine.publish("slow.t", f"k{i}", i)
            await eventually(lambda i=i: f"k{i}" in client.topic("slow.t"))
        assert stream.pending() == 3
        assert client.counters.changes_dropped == 7
        kept = [await stream.__anext__() for _ in range(3)]
        assert [next(iter(c.items)) for c in kept] == ["k7", "k8", "k9"]  # the newest
        assert len(client.topic("slow.t")) == 10  # the view is never behind
        await client.unsubscribe(["slow.t"])
        assert client.subscriptions == {} and len(client.topic("slow.t")) == 0
    # closing ends every iterator
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_real_engine_token_expiry_4003_waits_for_a_new_token_then_recovers(
    engine_factory: Callable[..., Awaitable[Engine]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule against the engine's own JWT auth (tokens in the first message)."""
    from engine.auth.tokens import LEEWAY_S
    from tests.support.tokens import SECRET, hs256

    monkeypatch.setenv("FANOUT_JWT_SECRET", SECRET)
    engine = await engine_factory(
        auth={"mode": "jwt", "timeout_s": 2.0}, fanout={"flush_interval_ms": 5}
    )
    await engine.publish("jwt.t", "a", 1)
    await engine.publish("jwt.t", "b", 1)
    # valid for about one more second (exp is in the past, within the clock leeway)
    async with connect(engine.url, token=hs256(ttl_s=1.0 - LEEWAY_S), policy=FAST) as client:
        await client.subscribe(["jwt.t"])
        stream = client.changes()
        await eventually(lambda: client.conn_state == UNAUTHORIZED, timeout=10)
        assert client.counters.last_close_code == 4003
        await engine.publish("jwt.t", "b", 2)  # missed while it waits for a token
        await asyncio.sleep(0.2)  # FAST would have retried ten times by now
        assert client.counters.connects == 1 and client.conn_state == UNAUTHORIZED
        client.set_token(hs256())
        await eventually(lambda: client.conn_state == CONNECTED and client.counters.connects == 2)
        change = await asyncio.wait_for(stream.__anext__(), 5 * TIMEOUT_FACTOR)
        assert (change.full, dict(change.items)) == (False, {"b": 2})
        assert dict(client.topic("jwt.t")) == {"a": 1, "b": 2}


# -- no spin: every reconnect waits, a caller's error is raised (issue 15) --------------


class _Ceiling(random.Random):
    """Every draw is 1.0: each delay is the policy's ceiling, exactly."""

    def random(self) -> float:
        return 1.0


class CountingServer:
    """A real picows server that counts upgrades; `hello` is what it sends first
    (a server that breaks the protocol sends something else)."""

    def __init__(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        self.upgrades = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        outer = self

        class Listener(WSListener):
            def on_ws_connected(self, transport: WSTransport) -> None:
                outer.upgrades += 1
                transport.send(WSMsgType.BINARY, msgpack.packb(outer.hello))

        self.server = await ws_create_server(lambda _req: Listener(), "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def attempts_allowed(policy: ReconnectPolicy, window_ms: float) -> int:
    """The most connection attempts the policy allows in `window_ms` with every
    draw at its ceiling: the first, then one per delay that fits in the window."""
    rec = Reconnector(policy)
    n, spent = 1, 0.0
    while True:
        rec.failed(0.0)
        delay = rec.delay_ms(1.0)
        assert delay is not None
        spent += delay
        if spent > window_ms:
            return n
        n += 1


async def test_a_server_breaking_the_protocol_gets_reconnects_at_the_backoff_rate() -> None:
    """The engine's first message is not `hello` (an internal error of the
    connection, before it was ever "connected"): every reconnect waits its
    backoff delay. On the code before the fix, no attempt waited at all: about
    1,500 upgrades a second, and no delay recorded."""
    srv = CountingServer({"op": "nope"})
    url = await srv.start()
    policy = ReconnectPolicy(base_ms=50, max_ms=400, factor=2)
    window_s = 1.0
    client = Client(url, policy=policy, rng=_Ceiling())
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        client.start()
        await eventually(lambda: srv.upgrades >= 3)  # it does keep trying
        await asyncio.sleep(max(0.0, started + window_s - loop.time()))
        upgrades = srv.upgrades
    finally:
        await client.close()
        srv.close()
    assert upgrades <= attempts_allowed(policy, window_s * 1000)
    # every attempt after the first waited the policy's delay, in order
    delays = list(client.counters.retry_delays_ms)
    assert delays[:4] == [50, 100, 200, 400][: len(delays[:4])]
    assert len(delays) >= upgrades - 1
    assert isinstance(client.last_error, ValueError)  # what went wrong is surfaced
    assert client.counters.connects == 0


async def test_an_error_in_the_clients_own_send_path_is_raised_not_retried(
    engine: Engine,
) -> None:
    """A token that cannot be encoded (a lone surrogate: `str`, so it passes the
    type check) fails in the client's own send path after the upgrade. No
    reconnect can fix that: the caller gets the error, the client stops, and
    the engine saw exactly one connection. On the code before the fix the client
    reconnected ~1,500 times a second, forever, and `async with` never raised."""
    assert engine.worker is not None
    before = engine.worker.counters.connects
    client = connect(engine.url, token="\ud800", policy=ReconnectPolicy(base_ms=50, max_ms=400))
    with pytest.raises(UnicodeEncodeError):
        async with client:
            pass
    assert client.conn_state == CLOSED
    assert isinstance(client.last_error, UnicodeEncodeError)
    assert engine.worker.counters.connects - before == 1  # and "closed" makes no more attempts

    # a caller that started the client in the background sees it too
    other = connect(engine.url, token="\ud800", policy=ReconnectPolicy(base_ms=50, max_ms=400))
    changes = other.changes()
    other.start()
    with pytest.raises(UnicodeEncodeError):
        await other.subscribe(["c.t"])
    with pytest.raises(UnicodeEncodeError):
        await anext(changes)
    with pytest.raises(UnicodeEncodeError):
        await other.wait_connected(1.0)
    await other.close()
    assert engine.worker.counters.connects - before == 2


async def test_a_token_of_the_wrong_type_is_a_type_error_at_once() -> None:
    from tests.support.serve import free_port

    url = f"ws://127.0.0.1:{free_port()}/ws"
    with pytest.raises(TypeError, match="token"):
        connect(url, token=12345)  # type: ignore[arg-type]
    client = connect(url)
    with pytest.raises(TypeError, match="token"):
        client.set_token(b"bytes")  # type: ignore[arg-type]


async def test_a_subscription_that_cannot_be_encoded_raises_and_is_not_kept(
    engine: Engine, client_factory: Callable[..., Awaitable[Client]]
) -> None:
    client = await client_factory()
    with pytest.raises(TypeError):
        await client.subscribe(["c.t"], max_hz=object())  # type: ignore[arg-type]
    assert "c.t" not in client.subscriptions
    await engine.publish("c.t", "a", 1)
    await client.subscribe(["c.t"])  # the client still works
    assert dict(client.topic("c.t")) == {"a": 1}
    assert client.conn_state == CONNECTED


@pytest.mark.parametrize("compression", [True, False])
async def test_the_client_offers_permessage_deflate_unless_told_not_to(
    engine: Engine, client_factory: Callable[..., Awaitable[Client]], compression: bool
) -> None:
    big = {"text": "the same words again " * 40, "n": list(range(50))}
    await engine.publish("c.z", "a", big)
    client = await client_factory(compression=compression)
    await client.subscribe(["c.z"])  # the snap: over the threshold
    big2 = dict(big, n=list(range(60)))
    await engine.publish("c.z", "a", big2)
    await eventually(lambda: dict(client.topic("c.z")) == {"a": big2})
    assert engine.worker is not None
    (conn,) = engine.worker.connections
    assert conn.session.deflate is compression
    # the upd went compressed only to the client that negotiated the extension
    assert (engine.worker.fanout.stats.compressed_frames > 0) is compression
