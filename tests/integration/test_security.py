"""Security and abuse resistance (issue 4): one test per row of SECURITY.md's
bad-input table (rows already covered elsewhere are named there), each with a
well-behaved client on the same worker that must keep receiving updates.

Tokens are HS256 with the secret in FANOUT_JWT_SECRET (tests/support/tokens.py);
RS256/ES256 and JWKS rotation are covered by tests/unit/test_auth_tokens.py and
one end-to-end test below.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from engine.auth.tokens import LEEWAY_S
from engine.client.raw import ConnectionClosed, RawConnection, connect
from tests.integration.conftest import Engine, eventually
from tests.integration.test_protocol import still_served
from tests.support.rawws import RawWS
from tests.support.tokens import SECRET, hs256

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., Awaitable[Engine]]


@pytest.fixture
def jwt_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_JWT_SECRET", SECRET)


async def jwt_engine(engine_factory: Factory, **sections: Any) -> Engine:
    auth = {"mode": "jwt", "timeout_s": 1.0, **sections.pop("auth", {})}
    return await engine_factory(auth=auth, fanout={"flush_interval_ms": 5}, **sections)


async def token_client(engine: Engine, token: str | None = None, **claims: Any) -> RawConnection:
    """A client authenticated at upgrade (Authorization: Bearer)."""
    token = token or hs256(**claims)
    conn = await connect(engine.url, extra_headers={"Authorization": f"Bearer {token}"})
    engine.clients.append(conn)
    hello = await conn.recv()
    assert hello["op"] == "hello" and hello["auth"] is False
    return conn


async def bystander(engine: Engine, topic: str = "watch.me") -> RawConnection:
    """A well-behaved subscriber (with a token when the engine wants one)."""
    if engine.worker is not None and engine.worker.verifier is not None:
        conn = await token_client(engine)
    else:
        conn = await engine.client()
    conn.subscribe([topic], id=1)
    assert (await conn.recv())["op"] == "ack"
    assert (await conn.recv())["op"] == "snap"
    return conn


def http_refusal(port: int, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a refused upgrade (blocking: run in a thread)."""
    raw = RawWS("127.0.0.1", port, headers=headers)
    try:
        body = raw.buf
        raw.sock.settimeout(5)
        while True:
            try:
                chunk = raw.sock.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            body += chunk
        return raw.status, json.loads(body) if raw.status != 101 else {}
    finally:
        raw.close()


async def refusal(engine: Engine, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    assert engine.worker is not None
    return await asyncio.to_thread(http_refusal, engine.worker.port, headers)


# -- before the upgrade: HTTP refusals -----------------------------------------------------


async def test_origin_not_allowed_is_403(engine_factory: Factory) -> None:
    engine = await engine_factory(
        server={
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": 0,
            "allowed_origins": ("https://app.example.com", "https://*.example.org"),
        },
        fanout={"flush_interval_ms": 5},
    )
    watcher = await bystander(engine)
    status, body = await refusal(engine, {"Origin": "https://evil.example.net"})
    assert status == 403 and body["error"] == "forbidden_origin"
    assert (await refusal(engine, {"Origin": "null"}))[0] == 403
    # allowed: exact, a subdomain pattern, and no Origin at all (not a browser)
    for origin in ("https://app.example.com", "https://eu.live.example.org", None):
        headers = {"Origin": origin} if origin else None
        ok = await connect(engine.url, extra_headers=headers)
        engine.clients.append(ok)
        assert (await ok.recv())["op"] == "hello"
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {hs256(secret='another-secret-of-at-least-32-bytes!!')}",  # bad signature
        f"Bearer {hs256(ttl_s=-LEEWAY_S - 60)}",  # expired
        "Bearer not.a.jwt",
        f"Basic {hs256()}",  # wrong scheme
    ],
)
async def test_bad_token_at_upgrade_is_401(engine_factory: Factory, authorization: str) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    status, body = await refusal(engine, {"Authorization": authorization})
    assert status == 401 and body["error"] == "unauthorized" and body["message"]
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
async def test_token_in_the_query_string_is_not_read(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    conn = await connect(engine.url + f"?token={hs256()}&access_token={hs256()}")
    engine.clients.append(conn)
    assert (await conn.recv())["auth"] is True  # still needs a token
    conn.send({"op": "sub", "topics": ["a"]})
    assert await conn.wait_closed() == 4001


async def test_over_max_connections_is_503(engine_factory: Factory) -> None:
    engine = await engine_factory(limits={"max_connections": 2}, fanout={"flush_interval_ms": 5})
    watcher = await bystander(engine)
    await engine.client()
    status, body = await refusal(engine)
    assert status == 503 and body["error"] == "full"
    await still_served(engine, watcher)


async def test_over_max_connections_per_ip_is_429(engine_factory: Factory) -> None:
    engine = await engine_factory(
        limits={"max_connections_per_ip": 3}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    second = await engine.client()
    await engine.client()
    status, body = await refusal(engine)
    assert status == 429 and body["error"] == "too_many_connections"
    # a slot frees when a connection ends
    second.close()
    await second.wait_closed()
    assert engine.worker is not None
    await eventually(lambda: engine.worker.per_ip.counts.get("127.0.0.1") == 2)
    third = await engine.client()
    third.send({"op": "ping"})
    assert (await third.recv())["op"] == "pong"
    await still_served(engine, watcher)


async def test_tcp_client_that_never_upgrades_is_dropped(engine_factory: Factory) -> None:
    engine = await engine_factory(
        limits={"handshake_timeout_s": 0.5}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    assert engine.worker is not None
    port = engine.worker.port

    def stall(partial: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(partial)  # never the end of the request head
            try:
                return s.recv(100)  # b"" once the server drops the connection
            except ConnectionResetError:
                return b""

    stalls = [
        asyncio.to_thread(stall, p)
        for p in (b"", b"GET /ws HTTP/1.1\r\n", b"GET /ws HTTP/1.1\r\nHost: x\r\n" * 3)
    ]
    results = await asyncio.gather(*stalls)
    assert results == [b"", b"", b""]
    await still_served(engine, watcher)


# -- authentication after the upgrade --------------------------------------------------------


@pytest.mark.usefixtures("jwt_env")
async def test_auth_message_then_subscribe(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    conn = await connect(engine.url)
    engine.clients.append(conn)
    assert (await conn.recv())["auth"] is True
    conn.send({"op": "auth", "token": hs256(sub="bob"), "id": 1})
    assert await conn.recv() == {"op": "ack", "id": 1, "user": "bob"}
    conn.subscribe(["watch.me"], id=2)
    assert (await conn.recv())["op"] == "ack"
    await still_served(engine, conn)
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
@pytest.mark.parametrize(
    "first",
    [
        {"op": "sub", "topics": ["watch.me"]},
        {"op": "ping"},
        {"op": "auth", "token": "garbage"},
        {"op": "auth", "token": hs256(ttl_s=-LEEWAY_S - 60)},
        {"op": "nope"},
    ],
)
async def test_anything_but_a_good_auth_first_closes_4001(
    engine_factory: Factory, first: dict[str, Any]
) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    conn = await connect(engine.url)
    engine.clients.append(conn)
    assert (await conn.recv())["auth"] is True
    conn.send(first)
    assert await conn.wait_closed() == 4001
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
async def test_no_auth_within_the_timeout_closes_4001(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory, auth={"timeout_s": 0.5})
    watcher = await bystander(engine)
    conn = await connect(engine.url)
    engine.clients.append(conn)
    assert (await conn.recv())["auth"] is True
    assert await conn.wait_closed() == 4001
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
async def test_token_expiring_while_connected_closes_4003(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    # valid for about one more second (exp is in the past, within the clock leeway)
    conn = await token_client(engine, hs256(ttl_s=1.0 - LEEWAY_S))
    conn.subscribe(["watch.me"], id=1)
    assert await conn.wait_closed() == 4003
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
async def test_refreshed_token_keeps_the_connection(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    conn = await token_client(engine, hs256(ttl_s=1.0 - LEEWAY_S, sub="carol"))
    conn.subscribe(["watch.me"], id=1)
    assert (await conn.recv())["op"] == "ack"
    conn.send({"op": "auth", "token": hs256(sub="carol"), "id": 2})
    assert (await conn.recv_op("ack"))["user"] == "carol"
    await asyncio.sleep(2.5)  # past the first token's end
    assert not conn.closed.done()
    await still_served(engine, conn)


@pytest.mark.usefixtures("jwt_env")
async def test_refresh_that_revokes_a_subscription_closes_4003(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    conn = await token_client(engine)
    conn.subscribe(["secret.t"], id=1)
    assert (await conn.recv())["op"] == "ack"
    conn.send({"op": "auth", "token": hs256(sub_topics=["public.>"]), "id": 2})
    assert await conn.wait_closed() == 4003
    await still_served(engine, watcher)


# -- permissions -----------------------------------------------------------------------------


@pytest.mark.usefixtures("jwt_env")
async def test_sub_outside_sub_topics_is_forbidden_all_or_nothing(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    conn = await token_client(engine, sub_topics=["prices.>", "scores.*.live"])
    conn.subscribe(["prices.fx", "scores.nba.live", "admin.keys", "other"], id=3)
    err = await conn.recv()
    assert err["op"] == "err" and err["code"] == "forbidden" and err["id"] == 3
    assert err["topic"] == "admin.keys"
    await engine.publish("prices.fx", "k", 1)
    conn.send({"op": "ping"})
    assert (await conn.recv())["op"] == "pong"
    await asyncio.sleep(0.05)
    assert conn.take_nowait() == []  # nothing of the refused message was subscribed
    conn.subscribe(["prices.fx", "scores.nba.live"], id=4)
    assert (await conn.recv()) == {"op": "ack", "id": 4}
    await still_served(engine, watcher)


@pytest.mark.usefixtures("jwt_env")
async def test_pub_needs_pub_topics(engine_factory: Factory) -> None:
    engine = await jwt_engine(engine_factory)
    watcher = await bystander(engine)
    reader = await token_client(engine)  # no pub_topics: may not publish
    reader.send({"op": "pub", "topic": "watch.me", "key": "k", "data": 1, "id": 1})
    err = await reader.recv()
    assert err["code"] == "forbidden" and err["topic"] == "watch.me" and err["id"] == 1
    writer = await token_client(engine, pub_topics=["watch.*"])
    writer.send({"op": "pub", "topic": "other.place.x", "key": "k", "data": 1, "id": 2})
    assert (await writer.recv())["code"] == "forbidden"
    writer.send({"op": "pub", "topic": "watch.me", "key": "k", "data": "from-writer", "id": 3})
    ack = await writer.recv()
    assert ack["op"] == "ack" and ack["id"] == 3
    upd = await watcher.recv_op("upd")
    assert upd["items"] == {"k": "from-writer"}
    await still_served(engine, watcher)


# -- rate limits --------------------------------------------------------------------------


async def test_over_the_rate_limit_is_refused_not_processed(engine_factory: Factory) -> None:
    engine = await engine_factory(
        limits={"messages_per_s": 5.0, "abuse_window_s": 30.0}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    conn = await engine.client()
    for i in range(40):  # in one go: the burst (10) passes, the rest is refused
        conn.send({"op": "ping", "id": i})
    await asyncio.sleep(0.3)
    msgs = conn.take_nowait()
    pongs = [m for m in msgs if m["op"] == "pong"]
    errs = [m for m in msgs if m["op"] == "err"]
    assert 10 <= len(pongs) <= 13  # the burst, plus what refilled meanwhile
    assert errs and all(e["code"] == "rate_limited" for e in errs)
    assert len(errs) <= 2  # answered at most once a second, not once per message
    assert errs[0]["id"] not in {p["id"] for p in pongs}  # names a refused request
    await asyncio.sleep(1.0)  # the bucket refills: served again
    conn.send({"op": "ping", "id": 99})
    assert (await conn.recv_op("pong"))["id"] == 99
    await still_served(engine, watcher)


async def test_sustained_abuse_closes_4029(engine_factory: Factory) -> None:
    engine = await engine_factory(
        limits={"messages_per_s": 5.0, "abuse_window_s": 1.5}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    conn = await engine.client()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    rounds = 0
    while not conn.closed.done() and loop.time() < deadline:
        for _ in range(5):  # ~100 messages/s: 20x the limit
            try:
                conn.send({"op": "ping"})
            except ConnectionClosed:
                break
        await asyncio.sleep(0.05)
        rounds += 1
        if rounds % 10 == 0 and not conn.closed.done():
            await still_served(engine, watcher)  # served while the abuse goes on
    assert await conn.wait_closed() == 4029
    assert any(m.get("code") == "rate_limited" for m in conn.take_nowait())  # throttled first
    assert engine.worker is not None and engine.worker.counters.closes["4029"] == 1
    await still_served(engine, watcher)


async def test_bursts_below_the_abuse_threshold_are_not_closed(engine_factory: Factory) -> None:
    engine = await engine_factory(
        limits={"messages_per_s": 20.0, "abuse_window_s": 1.0}, fanout={"flush_interval_ms": 5}
    )
    conn = await engine.client()
    t_end = asyncio.get_running_loop().time() + 3
    while asyncio.get_running_loop().time() < t_end:
        for _ in range(4):  # ~40 messages/s: 2x the limit, under 3x
            conn.send({"op": "ping"})
        await asyncio.sleep(0.1)
    conn.send({"op": "ping", "id": 5})
    await asyncio.sleep(1.0)
    assert not conn.closed.done()
    assert any(m.get("code") == "rate_limited" for m in conn.take_nowait())


async def test_tiny_max_hz_is_raised_to_min_max_hz(engine_factory: Factory) -> None:
    engine = await engine_factory(limits={"min_max_hz": 5.0}, fanout={"flush_interval_ms": 5})
    conn = await engine.client()
    conn.subscribe(["hz.t"], id=1, max_hz=1e-9)  # one frame per ~30 years, if allowed
    assert (await conn.recv())["op"] == "ack"
    await conn.recv()
    await engine.publish("hz.t", "k", "fresh")
    upd = await conn.recv_op("upd", timeout=5)  # within 1/min_max_hz (rounded up), not never
    assert upd["items"] == {"k": "fresh"}


async def test_max_hz_values_share_a_few_periods(engine_factory: Factory) -> None:
    engine = await engine_factory(fanout={"flush_interval_ms": 5})
    conns = []
    for i in range(30):
        c = await engine.client()
        c.subscribe(["grp.t"], id=1, max_hz=1.0 + i * 3.3)
        conns.append(c)
    for c in conns:
        assert (await c.recv())["op"] == "ack"
    assert engine.worker is not None
    groups = engine.worker.fanout.topics["grp.t"].groups
    # one encoding per due period and tick: 30 rates, at most four periods per
    # octave (3 to 200 ticks here), whatever the phases
    periods = {g.period for g in groups.values()}
    assert len(periods) <= 4 * 6, sorted(periods)
    assert all(p <= 8 or p >> (p.bit_length() - 3) in (4, 5, 6, 7) for p in periods)
    assert len(periods) < 30


# -- end to end with an asymmetric key --------------------------------------------------------


async def test_rs256_public_key_file(engine_factory: Factory, tmp_path: Any) -> None:
    from tests.support.tokens import public_pem, rsa_key, signed

    key = rsa_key()
    pem = tmp_path / "pub.pem"
    pem.write_text(public_pem(key))
    engine = await jwt_engine(engine_factory, auth={"jwt_public_key_file": str(pem)})
    conn = await token_client(engine, signed(key, "RS256", sub="rsa-user"))
    conn.send({"op": "auth", "token": signed(key, "RS256", sub="rsa-user"), "id": 1})
    assert (await conn.recv())["user"] == "rsa-user"
    # an HS256 token signed with the public key's text (algorithm confusion) is refused
    import jwt as pyjwt

    forged = pyjwt.encode({"sub": "x", "exp": time.time() + 60}, "x" * 40, algorithm="HS256")
    assert (await refusal(engine, {"Authorization": f"Bearer {forged}"}))[0] == 401


async def test_jwks_file_rotation_by_kid(engine_factory: Factory, tmp_path: Any) -> None:
    import os

    from picows import WSInvalidStatusError

    from tests.support.tokens import ec_key, jwk, rsa_key, signed

    old, new = rsa_key(), ec_key()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(old, "RS256", "old")]}))
    engine = await jwt_engine(engine_factory, auth={"jwks_file": str(path)})
    watcher = await token_client(engine, signed(old, "RS256", kid="old"))
    status, _ = await refusal(
        engine, {"Authorization": f"Bearer {signed(new, 'ES256', kid='new')}"}
    )
    assert status == 401  # not published yet
    # rotate: the new key is published (the old one stays for connections in flight)
    path.write_text(json.dumps({"keys": [jwk(old, "RS256", "old"), jwk(new, "ES256", "new")]}))
    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime, whatever the fs granularity

    async def accepted() -> bool:
        try:
            conn = await token_client(engine, signed(new, "ES256", kid="new"))
        except WSInvalidStatusError:  # 401 until the worker has re-read the file
            return False
        conn.close()
        return True

    for _ in range(50):  # the worker re-reads the file within a second or so
        if await accepted():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the rotated key was never accepted")
    watcher.subscribe(["watch.me"], id=1)
    assert (await watcher.recv())["op"] == "ack"
    await watcher.recv()
    await still_served(engine, watcher)


def test_admin_api_defaults_are_closed() -> None:
    """The admin API binds loopback and reads its API key from FANOUT_API_KEY by
    default (enforcement: test_admin.py::test_api_key_is_enforced)."""
    from engine.config import default_config

    cfg = default_config()
    assert cfg.server.admin_host == "127.0.0.1"
    assert cfg.auth.api_key_env == "FANOUT_API_KEY"
    assert cfg.auth.mode == "none" and cfg.auth.allow_anonymous_publish is False


async def test_websocket_ping_floods_are_rate_limited_too(engine_factory: Factory) -> None:
    from tests.support.rawws import OP_PING, OP_PONG

    engine = await engine_factory(
        limits={"messages_per_s": 5.0, "abuse_window_s": 1.5}, fanout={"flush_interval_ms": 5}
    )
    watcher = await bystander(engine)
    assert engine.worker is not None
    raw = await asyncio.to_thread(RawWS, "127.0.0.1", engine.worker.port)

    def flood() -> tuple[int, int]:
        raw.recv_messages()  # hello
        for _ in range(40):  # in one go: the burst (10) is answered, the rest is not
            raw.send_frame(OP_PING, b"p")
        pongs = 0
        raw.sock.settimeout(0.5)
        try:
            while True:
                op, _ = raw.recv_frame()
                pongs += op == OP_PONG
        except OSError:
            pass
        raw.sock.settimeout(10)
        # keep going at 20x the limit: closed with 4029
        try:
            for _ in range(400):
                raw.send_frame(OP_PING, b"p")
                time.sleep(0.01)
        except OSError:
            pass
        return pongs, raw.recv_close_code()

    try:
        pongs, code = await asyncio.to_thread(flood)
    finally:
        raw.close()
    assert 1 <= pongs <= 13
    assert code == 4029
    await still_served(engine, watcher)
