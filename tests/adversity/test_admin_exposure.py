"""Issue 11, findings 5 and 6: the admin port attacked as a web page, a
neighbour on the network or a pile of idle sockets would, against a real
`fanout serve`, while an honest subscriber on the node's worker receives a feed.

- A node whose admin port listens beyond loopback (the Docker image's 0.0.0.0)
  with no API key refuses every POST with 403 (`POST /rebalance {"fraction": 1}`
  used to drop every connection); its probes still answer.
- A node on loopback without a key (a developer's machine) refuses a body
  without `Content-Type` or with a type a web page may send cross-origin
  (`fetch(..., {mode: "no-cors"})`): 415, and nothing is published.
- A `Host` header naming another site (DNS rebinding) gets 421 on every path,
  /stats included.
- `MAX_CONNECTIONS` idle sockets on the admin port do not starve the probes:
  /healthz still answers 200.
Each answer is a JSON error body; the honest subscriber is never closed and
keeps receiving what the honest publisher (or the demo feed) sends.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.admin.server import MAX_CONNECTIONS
from engine.client.raw import RawConnection, connect
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TIMEOUT_S = 10.0 * TIMEOUT_FACTOR


def http_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to 127.0.0.1:port; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in lines[1:])
                )
                if len(body) >= int(headers.get("content-length", "0")):
                    return int(lines[0].split()[1]), headers, body
    raise AssertionError(f"no complete answer: {out!r}")


def post(port: int, path: str, body: bytes, *headers: str, host: str = "127.0.0.1") -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def get(port: int, path: str, host: str = "127.0.0.1") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()


async def answer(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    status, headers, body = await asyncio.to_thread(http_request, port, request)
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


async def wait_connections(served: Served, n: int) -> None:
    """Until the workers' reports on the board count `n` connections."""
    async with asyncio.timeout(TIMEOUT_S):
        while served.get("/stats")[1]["totals"]["connections"] != n:
            await asyncio.sleep(0.1)


async def subscribe(served: Served, topic: str) -> RawConnection:
    conn = await connect(served.ws_url)
    assert (await conn.recv())["op"] == "hello"
    conn.subscribe([topic], id=1)
    while (await conn.recv())["op"] != "snap":  # after the ack: the topic's state
        pass
    return conn


async def receive_updates(conn: RawConnection, n: int) -> dict[str, Any]:
    """Items of the next `n` upd/snap messages; fails if the connection closes."""
    items: dict[str, Any] = {}
    for _ in range(n):
        msg = await conn.recv(timeout=TIMEOUT_S)
        assert msg["op"] in ("upd", "snap"), msg
        items.update(msg.get("items", {}))
    return items


# -- a node whose admin port listens on every interface, with no API key -----------------


@pytest.fixture
def exposed(tmp_path: Path) -> Iterator[Served]:
    """What `docker run fanout --demo` runs: admin on 0.0.0.0, no API key."""
    s = Served(
        ["--workers", "1", "--demo"],
        env={"FANOUT_SERVER_ADMIN_HOST": "0.0.0.0", "FANOUT_WORKERS_DRAIN_S": "0.2"},
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def test_posts_are_refused_beyond_loopback_without_a_key(exposed: Served) -> None:
    from engine.demo import DEMO_TOPICS

    port = exposed.admin_port
    conn = await subscribe(exposed, DEMO_TOPICS[0])
    try:
        await wait_connections(exposed, 1)
        await receive_updates(conn, 3)

        status, body = await answer(
            port, post(port, "/rebalance", b'{"fraction": 1}', "Content-Type: application/json")
        )
        assert status == 403, body
        assert body["error"] == "forbidden" and "FANOUT_API_KEY" in body["message"]
        status, body = await answer(
            port,
            post(
                port,
                "/publish",
                b'{"topic": "t", "key": "k", "data": 1}',
                "Content-Type: application/json",
            ),
        )
        assert status == 403 and body["error"] == "forbidden"
        # Probes and statistics still answer.
        assert (await answer(port, get(port, "/healthz")))[0] == 200
        assert (await answer(port, get(port, "/readyz")))[0] == 200

        # The honest subscriber was not shed: the feed keeps coming, never a `bye`.
        await receive_updates(conn, 20)
        assert not conn.closed.done()
        assert "shedding" not in exposed.output()
        # The operator was told, at start.
        assert "beyond loopback, with no API key" in exposed.output()
    finally:
        conn.close()


# -- a node on loopback without a key (a developer's machine) ----------------------------


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Served]:
    # Idle sockets are not closed during the test: the probes must get through
    # on their own slots, not because the idle timeout freed general ones.
    s = Served(
        ["--workers", "1"],
        env={"FANOUT_SERVER_ADMIN_IDLE_TIMEOUT_S": "3600"},
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def test_a_web_page_cannot_publish_or_read_the_admin(local: Served) -> None:
    port = local.admin_port
    conn = await subscribe(local, "news")
    try:
        # What a page's fetch(..., {mode: "no-cors"}) or a form can send.
        forged = b'{"topic": "news", "key": "forged", "data": 1}'
        for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "text/json"):
            headers = () if ctype is None else (f"Content-Type: {ctype}",)
            status, body = await answer(port, post(port, "/publish", forged, *headers))
            assert status == 415, (ctype, body)
            assert body["error"] == "unsupported_media_type"

        # DNS rebinding: the page's own host name in Host.
        for path in ("/stats", "/metrics", "/readyz", "/config.json"):
            status, body = await answer(port, get(port, path, host="evil.example"))
            assert status == 421, (path, body)
            assert body["error"] == "bad_host" and "evil.example" in body["message"]
        status, body = await answer(
            port,
            post(port, "/publish", forged, "Content-Type: application/json", host="evil.example"),
        )
        assert status == 421

        # The honest publisher is served, and the subscriber gets its update only.
        status, _ = local.post("/publish", {"topic": "news", "key": "honest", "data": 2})
        assert status == 200
        items = await receive_updates(conn, 1)
        assert items == {"honest": 2}
        assert not conn.closed.done()
    finally:
        conn.close()


async def test_idle_sockets_do_not_starve_the_probes(local: Served) -> None:
    port = local.admin_port
    conn = await subscribe(local, "news")

    def open_idle() -> list[socket.socket]:
        return [
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
            for _ in range(MAX_CONNECTIONS + 10)
        ]

    idle = await asyncio.to_thread(open_idle)
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _, _ = await asyncio.to_thread(http_request, port, get(port, path))
            assert status == 200, path
        # What the kubelet runs (urllib, as the image's HEALTHCHECK does).
        with urllib.request.urlopen(f"{local.admin_url}/healthz", timeout=TIMEOUT_S) as r:
            assert r.status == 200
    finally:
        for s in idle:
            s.close()
    # The honest subscriber was served throughout.
    status, _ = local.post("/publish", {"topic": "news", "key": "after", "data": 3})
    assert status == 200
    assert await receive_updates(conn, 1) == {"after": 3}
    conn.close()
