"""Who may open a connection, how often (issue 11, finding 9): upgrade attempts
per second per worker (503 busy) and per client address (429
too_many_attempts), and the client address behind trusted proxies
(X-Forwarded-For read only from them) for the per-IP limits. Each test keeps
an honest subscriber on the same worker and checks it is still served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from engine.metrics import render, worker_families
from tests.integration.conftest import Engine
from tests.integration.test_protocol import still_served
from tests.support.rawws import RawWS

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., Awaitable[Engine]]


def attempt(port: int, forwarded_for: str | None = None) -> tuple[int, dict[str, Any], str]:
    """One upgrade attempt: status, JSON body (refusals) and the response head.
    An accepted connection is closed at once (blocking: run in a thread)."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    raw = RawWS("127.0.0.1", port, headers=headers, timeout=5)
    try:
        if raw.status == 101:
            return 101, {}, raw.response_head
        body = raw.buf
        while True:
            try:
                chunk = raw.sock.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            body += chunk
        return raw.status, json.loads(body), raw.response_head
    finally:
        raw.close()


def attempts_until_refused(
    port: int, status: int, forwarded_for: str | None = None, limit: int = 200
) -> tuple[int, dict[str, Any], str, int]:
    """Attempt upgrades until one is refused with `status`; also returns how
    many were accepted before it."""
    accepted = 0
    for _ in range(limit):
        code, body, head = attempt(port, forwarded_for)
        if code == status:
            return code, body, head, accepted
        assert code == 101, (code, body)
        accepted += 1
    raise AssertionError(f"no {status} in {limit} attempts")


async def watcher(engine: Engine, forwarded_for: str | None = None) -> Any:
    from engine.client.raw import connect

    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    conn = await connect(engine.url, extra_headers=headers)
    engine.clients.append(conn)
    assert (await conn.recv())["op"] == "hello"
    conn.subscribe(["watch.me"], id=1)
    assert (await conn.recv())["op"] == "ack"
    assert (await conn.recv())["op"] == "snap"
    return conn


async def test_upgrade_attempts_over_the_worker_rate_get_503_busy(
    engine_factory: Factory,
) -> None:
    engine = await engine_factory(limits={"upgrades_per_s": 5.0}, fanout={"flush_interval_ms": 5})
    honest = await watcher(engine)
    assert engine.worker is not None
    _, body, head, _ = await asyncio.to_thread(attempts_until_refused, engine.worker.port, 503)
    assert body["error"] == "busy" and "limits.upgrades_per_s" in body["message"]
    assert "retry-after: 1" in head.lower()
    await still_served(engine, honest)
    # counted, and exported by reason
    worker_status = engine.worker.status()
    assert worker_status.upgrades_refused_by["busy"] >= 1
    text = render(worker_families({1: worker_status}, {}))
    assert 'fanout_upgrades_refused_total{worker="1",reason="busy"}' in text


async def test_one_address_over_its_rate_gets_429_and_others_still_connect(
    engine_factory: Factory,
) -> None:
    engine = await engine_factory(
        server={"host": "127.0.0.1", "port": 0, "admin_port": 0, "trusted_proxies": ("127.0.0.1",)},
        limits={"upgrades_per_s": 0.0, "upgrades_per_ip_per_s": 3},
        fanout={"flush_interval_ms": 5},
    )
    honest = await watcher(engine, forwarded_for="198.51.100.1")
    assert engine.worker is not None
    port = engine.worker.port
    _, body, head, _ = await asyncio.to_thread(attempts_until_refused, port, 429, "203.0.113.9")
    assert body["error"] == "too_many_attempts" and "retry-after: 1" in head.lower()
    # another client behind the same proxy is not refused for it
    code, _, _ = await asyncio.to_thread(attempt, port, "198.51.100.2")
    assert code == 101
    await still_served(engine, honest)


async def test_behind_a_trusted_proxy_the_per_ip_limit_counts_the_client(
    engine_factory: Factory,
) -> None:
    engine = await engine_factory(
        server={
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": 0,
            "trusted_proxies": ("127.0.0.0/8",),
        },
        limits={"max_connections_per_ip": 2},
        fanout={"flush_interval_ms": 5},
    )
    honest = await watcher(engine, forwarded_for="198.51.100.1")
    assert engine.worker is not None
    port = engine.worker.port

    def hold_two_then_try_a_third() -> tuple[int, dict[str, Any], int]:
        # "1.2.3.4" is whatever the client wrote; the proxy appended 203.0.113.9
        held = [
            RawWS("127.0.0.1", port, headers={"X-Forwarded-For": "1.2.3.4, 203.0.113.9"})
            for _ in range(2)
        ]
        try:
            assert [h.status for h in held] == [101, 101]
            status, body, _ = attempt(port, "5.6.7.8, 203.0.113.9")
            other, _, _ = attempt(port, "203.0.113.10")
            return status, body, other
        finally:
            for h in held:
                h.close()

    status, body, other = await asyncio.to_thread(hold_two_then_try_a_third)
    assert status == 429 and body["error"] == "too_many_connections"
    assert other == 101  # a different client behind the same proxy
    await still_served(engine, honest)


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(engine_factory: Factory) -> None:
    engine = await engine_factory(
        server={
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": 0,
            "trusted_proxies": ("10.0.0.0/8",),  # not the loopback peer of this test
        },
        limits={"max_connections_per_ip": 2},
        fanout={"flush_interval_ms": 5},
    )
    honest = await watcher(engine)
    assert engine.worker is not None
    port = engine.worker.port

    def spoof() -> tuple[int, int]:
        held = RawWS("127.0.0.1", port, headers={"X-Forwarded-For": "203.0.113.1"})
        try:
            # the honest watcher and `held` are both 127.0.0.1: a third is refused
            # whatever address it claims
            status, _, _ = attempt(port, "203.0.113.2")
            return held.status, status
        finally:
            held.close()

    assert await asyncio.to_thread(spoof) == (101, 429)
    await still_served(engine, honest)
