"""The admin HTTP server over loopback, with a real hub as the bus.

Requests go through the standard library's http.client (in a thread) or a raw
socket when the test needs bytes no well-behaved client sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest

from engine.admin.server import AdminServer, serve_admin
from engine.board import SUPERVISOR, Board, worker_name
from engine.bus import create_bus
from engine.bus.base import Bus
from engine.bus.hub import Hub, serve_hub
from engine.config import Config, default_config
from engine.protocol.codec import parse_pos

API_KEY_ENV = "FANOUT_TEST_ADMIN_API_KEY"
JSON = "application/json"
POS_RE = re.compile(r"\d+-\d+")
TIMEOUT_S = 10.0 * float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


def make_cfg(*, max_publish_items: int = 10) -> Config:
    cfg = default_config()
    return dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, admin_host="127.0.0.1", admin_port=0, node="n1"),
        limits=dataclasses.replace(cfg.limits, max_publish_items=max_publish_items),
        auth=dataclasses.replace(cfg.auth, api_key_env=API_KEY_ENV),
    )


@pytest.fixture
def run_dir() -> Iterator[str]:
    # Short: the hub's Unix socket path must stay under 108 bytes.
    path = tempfile.mkdtemp(prefix="fa-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cfg() -> Config:
    return make_cfg()


@pytest.fixture
async def hub(cfg: Config, run_dir: str) -> AsyncIterator[Hub]:
    h = await serve_hub(cfg, run_dir)
    yield h
    await h.close()


@pytest.fixture
async def bus(cfg: Config, run_dir: str) -> AsyncIterator[Bus]:
    """The admin's bus client (connected when the test also uses `hub`)."""
    b = create_bus(cfg, run_dir, want_entries=False)
    await b.start(None)
    yield b
    await b.close()


@pytest.fixture
async def admin(
    cfg: Config, run_dir: str, hub: Hub, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[AdminServer]:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    async with asyncio.timeout(TIMEOUT_S):
        while not bus.connected:
            await asyncio.sleep(0.01)
    server = await serve_admin(cfg, run_dir, bus)
    yield server
    await server.close()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def _call(
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    conn: http.client.HTTPConnection | None,
) -> Answer:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        data = r.read()
        answer = Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        if own:
            c.close()
    assert answer.headers["content-type"] == "application/json"
    return answer


async def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Answer:
    return await asyncio.to_thread(_call, port, method, path, body, headers or {}, conn)


async def post_json(port: int, obj: Any, **headers: str) -> Answer:
    hdrs = {"Content-Type": "application/json", **headers}
    return await call(port, "POST", "/publish", json.dumps(obj).encode(), hdrs)


def _raw(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def raw(port: int, request: bytes) -> bytes:
    return await asyncio.to_thread(_raw, port, request)


async def snapshot_items(bus: Bus, topic: str) -> dict[str, bytes]:
    snap = await bus.snapshot(topic)
    return {key: data for key, _, data in snap.items}


# -- /publish -----------------------------------------------------------------------


async def test_publish_single_returns_its_position(admin: AdminServer, bus: Bus) -> None:
    r = await post_json(admin.port, {"topic": "prices.fx", "key": "EURUSD", "data": {"bid": 1.5}})
    assert r.status == 200
    assert POS_RE.fullmatch(r.json["pos"])
    assert await snapshot_items(bus, "prices.fx") == {"EURUSD": msgpack.packb({"bid": 1.5})}


async def test_publish_without_content_type_is_415_and_publishes_nothing(
    admin: AdminServer, bus: Bus
) -> None:
    # What a web page's fetch(..., {mode: "no-cors"}) sends (issue 11, finding 5).
    r = await call(admin.port, "POST", "/publish", b'{"topic": "t", "key": "k", "data": [1]}')
    assert r.status == 415 and r.json["error"] == "unsupported_media_type"
    assert "application/json" in r.json["message"]
    assert await snapshot_items(bus, "t") == {}


async def test_publish_batch_returns_positions_in_order(admin: AdminServer, bus: Bus) -> None:
    items = [{"topic": "scores", "key": f"k{i}", "data": i} for i in range(3)]
    r = await post_json(admin.port, {"items": items})
    assert r.status == 200
    positions = r.json["pos"]
    assert len(positions) == 3 and all(POS_RE.fullmatch(p) for p in positions)
    assert [parse_pos(p) for p in positions] == sorted({parse_pos(p) for p in positions})
    assert await snapshot_items(bus, "scores") == {f"k{i}": msgpack.packb(i) for i in range(3)}


async def test_publish_null_deletes_the_key(admin: AdminServer, bus: Bus) -> None:
    assert (await post_json(admin.port, {"topic": "t", "key": "k", "data": 1})).status == 200
    assert (await post_json(admin.port, {"topic": "t", "key": "k", "data": None})).status == 200
    assert await snapshot_items(bus, "t") == {"k": b"\xc0"}


async def test_publish_msgpack_keeps_the_data_bytes(admin: AdminServer, bus: Bus) -> None:
    float32 = b"\xca\x3f\xc0\x00\x00"  # 1.5 as float32: re-encoding would widen it
    wide_int = b"\xd1\x00\x07"  # 7 as int16
    item = (
        b"\x83"
        + msgpack.packb("topic")
        + msgpack.packb("bin.t")
        + msgpack.packb("key")
        + msgpack.packb("a")
        + msgpack.packb("data")
    )
    single = item + float32
    headers = {"Content-Type": "application/msgpack"}
    r = await call(admin.port, "POST", "/publish", single, headers)
    assert r.status == 200 and POS_RE.fullmatch(r.json["pos"])
    batch = (
        b"\x81"
        + msgpack.packb("items")
        + b"\x92"
        + single
        + item.replace(b"\xa1a", b"\xa1b")
        + wide_int
    )
    r = await call(admin.port, "POST", "/publish", batch, headers)
    assert r.status == 200 and len(r.json["pos"]) == 2
    assert await snapshot_items(bus, "bin.t") == {"a": float32, "b": wide_int}


async def test_publish_chunked_body(admin: AdminServer, bus: Bus) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"topic": "t", '
        yield b'"key": "k", "data": "chunked"}'

    def send() -> Answer:
        c = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=TIMEOUT_S)
        try:
            c.request(
                "POST", "/publish", body=chunks(), headers={"Content-Type": JSON},
                encode_chunked=True,
            )  # fmt: skip
            r = c.getresponse()
            return Answer(r.status, dict(r.getheaders()), r.read())
        finally:
            c.close()

    r = await asyncio.to_thread(send)
    assert r.status == 200
    assert await snapshot_items(bus, "t") == {"k": msgpack.packb("chunked")}


@pytest.mark.parametrize(
    ("body", "status", "error", "words"),
    [
        (b"{oops", 400, "bad_request", "undecodable JSON"),
        (b'{"topic": "t", "data": 1}', 400, "bad_request", "'key' is required"),
        (b'{"topic": "a b", "key": "k", "data": 1}', 400, "bad_topic", "'topic'"),
        (b'{"items": []}', 400, "bad_request", "'items' must not be empty"),
        (
            json.dumps({"items": [{"topic": "t", "key": "k", "data": 1}] * 11}).encode(),
            400,
            "bad_request",
            "limit is 10",
        ),
    ],
)
async def test_bad_publish_bodies_get_json_errors(
    admin: AdminServer, bus: Bus, body: bytes, status: int, error: str, words: str
) -> None:
    r = await call(admin.port, "POST", "/publish", body, {"Content-Type": "application/json"})
    assert r.status == status
    assert r.json["error"] == error
    assert words in r.json["message"]
    assert await snapshot_items(bus, "t") == {}  # nothing published


async def test_bad_msgpack_is_400(admin: AdminServer) -> None:
    headers = {"Content-Type": "application/msgpack"}
    r = await call(admin.port, "POST", "/publish", b"\x83\xa5topic", headers)
    assert r.status == 400 and r.json["error"] == "bad_request"


async def test_wrong_content_type_is_415(admin: AdminServer) -> None:
    r = await call(admin.port, "POST", "/publish", b"topic=t", {"Content-Type": "text/plain"})
    assert r.status == 415
    assert "text/plain" in r.json["message"]


async def test_body_over_the_limit_is_413(admin: AdminServer) -> None:
    big = b'{"topic": "t", "key": "k", "data": "' + b"x" * admin.body_limit + b'"}'
    r = await call(admin.port, "POST", "/publish", big, {"Content-Type": "application/json"})
    assert r.status == 413
    assert r.json["error"] == "too_large"


async def test_declared_body_over_the_limit_is_413_before_the_body(admin: AdminServer) -> None:
    head = (
        b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (admin.body_limit + 1)
    )
    out = await raw(admin.port, head)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b'"error":"too_large"' in out


async def test_chunked_body_over_the_limit_is_413(admin: AdminServer) -> None:
    size = admin.body_limit + 1
    request = (
        b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
        + b"%x\r\n" % size
        + b"x" * size
        + b"\r\n0\r\n\r\n"
    )
    out = await raw(admin.port, request)
    assert out.startswith(b"HTTP/1.1 413 ")


async def test_publish_while_the_hub_is_down_is_503(cfg: Config, run_dir: str, bus: Bus) -> None:
    server = await serve_admin(cfg, run_dir, bus)  # no hub: the bus never connects
    try:
        r = await post_json(server.port, {"topic": "t", "key": "k", "data": 1})
        assert r.status == 503
        assert r.json["error"] == "unavailable"
        ready = await call(server.port, "GET", "/readyz")
        assert ready.status == 503
        assert "bus: disconnected" in ready.json["reasons"]
    finally:
        await server.close()


async def test_publish_after_the_hub_went_away_is_503(admin: AdminServer, hub: Hub) -> None:
    await hub.close()
    r = await post_json(admin.port, {"topic": "t", "key": "k", "data": 1})
    assert r.status == 503
    assert r.json["error"] == "unavailable"


async def test_api_key_is_enforced(
    cfg: Config, run_dir: str, hub: Hub, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    async with asyncio.timeout(TIMEOUT_S):
        while not bus.connected:
            await asyncio.sleep(0.01)
    server = await serve_admin(cfg, run_dir, bus)
    try:
        update = {"topic": "t", "key": "k", "data": 1}
        r = await post_json(server.port, update)
        assert r.status == 401 and r.json["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await post_json(server.port, update, Authorization="Bearer wrong")
        assert r.status == 401
        r = await post_json(server.port, update, Authorization="Bearer s3cret")
        assert r.status == 200 and POS_RE.fullmatch(r.json["pos"])
        # Probes stay open.
        assert (await call(server.port, "GET", "/stats")).status == 200
    finally:
        await server.close()


# -- routing and the connection --------------------------------------------------------


async def test_unknown_path_is_404_and_wrong_method_405(admin: AdminServer) -> None:
    r = await call(admin.port, "GET", "/nope")
    assert r.status == 404 and r.json["error"] == "not_found"
    r = await call(admin.port, "GET", "/publish")
    assert r.status == 405 and r.headers["allow"] == "POST"
    r = await call(admin.port, "DELETE", "/readyz")
    assert r.status == 405 and r.headers["allow"] == "GET"


async def test_keep_alive_serves_many_requests_on_one_connection(admin: AdminServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=TIMEOUT_S)
    try:
        assert (await call(admin.port, "GET", "/healthz", conn=conn)).status in (200, 503)
        sock = conn.sock
        assert sock is not None
        body = b'{"topic": "t", "key": "k", "data": 1}'
        js = {"Content-Type": "application/json"}
        assert (await call(admin.port, "POST", "/publish", body, js, conn=conn)).status == 200
        assert (await call(admin.port, "POST", "/publish", b"{bad", js, conn=conn)).status == 400
        assert (await call(admin.port, "POST", "/publish", body, conn=conn)).status == 415
        assert (await call(admin.port, "POST", "/nope", body, conn=conn)).status == 404
        assert (await call(admin.port, "GET", "/stats", conn=conn)).status == 200
        assert conn.sock is sock  # never reconnected
    finally:
        conn.close()


async def test_malformed_http_gets_a_json_400(admin: AdminServer) -> None:
    out = await raw(admin.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"application/json" in out


@pytest.mark.parametrize("size", [10_000, 40_000, 200_000])
async def test_oversized_head_is_refused(admin: AdminServer, size: int) -> None:
    head = (
        b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: "
        + b"a" * size
        + b"\r\n\r\n"
    )
    out = await raw(admin.port, head)
    assert out.startswith(b"HTTP/1.1 431 " if size > 16_384 else b"HTTP/1.1 200 ")


async def test_a_slow_client_does_not_block_others(admin: AdminServer) -> None:
    slow_head = socket.create_connection(("127.0.0.1", admin.port))
    slow_body = socket.create_connection(("127.0.0.1", admin.port))
    try:
        slow_head.sendall(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # head never finished
        slow_body.sendall(
            b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"
        )  # body never finished
        r = await post_json(admin.port, {"topic": "t", "key": "k", "data": 1})
        assert r.status == 200
        assert (await call(admin.port, "GET", "/stats")).status == 200
    finally:
        slow_head.close()
        slow_body.close()


@pytest.fixture
async def patient_admin(
    cfg: Config, run_dir: str, hub: Hub, bus: Bus
) -> AsyncIterator[AdminServer]:
    """An admin server whose idle timeout outlasts any test: idle sockets stay."""
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, admin_idle_timeout_s=3600)
    )
    server = await serve_admin(cfg, run_dir, bus)
    yield server
    await server.close()


async def test_connections_over_the_cap_serve_only_probes(patient_admin: AdminServer) -> None:
    """Past MAX_CONNECTIONS, a probe connection answers /healthz (issue 11,
    finding 6) and 503 for anything else; past the probe slots too, 503."""
    from engine.admin.server import MAX_CONNECTIONS

    admin = patient_admin

    def open_idle(n: int) -> list[socket.socket]:
        return [
            socket.create_connection(("127.0.0.1", admin.port), timeout=TIMEOUT_S) for _ in range(n)
        ]

    idle = await asyncio.to_thread(open_idle, MAX_CONNECTIONS)
    try:
        out = await raw(admin.port, b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ")
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"] == "unavailable"
        out = await raw(admin.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert out.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 "))  # the board decides
        assert b"connection: close" in out.lower() and b'"status"' in out
        # The probe slots taken too: refused at once.
        idle += await asyncio.to_thread(open_idle, admin.probe_slots)
        out = await raw(admin.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ")
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"] == "unavailable"
    finally:
        for s in idle:
            s.close()
    # Once they are gone, clients are served again.
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            try:
                r = await call(admin.port, "GET", "/stats")
            except (ConnectionError, http.client.RemoteDisconnected):
                continue
            if r.status == 200:
                break
            await asyncio.sleep(0.01)


async def test_idle_connections_are_closed_after_the_idle_timeout(
    cfg: Config, run_dir: str, hub: Hub, bus: Bus
) -> None:
    # Long enough that the second client's request, sent right after its
    # connect, always arrives within it.
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, admin_idle_timeout_s=1.0))
    server = await serve_admin(cfg, run_dir, bus)
    try:

        def idle_then_keep_alive() -> tuple[bytes, bytes]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as s:
                never_asked = s.recv(1024)  # b"": closed by the server, nothing said
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answered = b""
                while chunk := s.recv(65536):  # the answer, then the close once idle
                    answered += chunk
            return never_asked, answered

        never_asked, answered = await asyncio.to_thread(idle_then_keep_alive)
        assert never_asked == b""
        assert answered.startswith(b"HTTP/1.1 503 ") and answered.count(b"HTTP/1.1") == 1
        assert server.refused["idle"] == 2
        assert 'fanout_admin_refused_total{reason="idle"} 2' in server.metrics()
    finally:
        await server.close()


@pytest.mark.parametrize("path", ["/stats", "/metrics", "/readyz", "/", "/publish"])
async def test_a_host_not_allowed_is_421(admin: AdminServer, path: str) -> None:
    method = "POST" if path == "/publish" else "GET"
    r = await call(admin.port, method, path, b"{}", {"Host": "rebound.example:8001"})
    assert r.status == 421
    assert r.json["error"] == "bad_host" and "rebound.example" in r.json["message"]
    for host in ("127.0.0.1", "localhost:1", "[::1]:8001", "10.1.2.3"):
        assert (await call(admin.port, "GET", "/stats", headers={"Host": host})).status == 200


async def test_allowed_hosts_are_served(cfg: Config, run_dir: str, hub: Hub, bus: Bus) -> None:
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(
            cfg.server, admin_allowed_hosts=("fanout-admin", "*.svc.cluster.local")
        ),
    )
    server = await serve_admin(cfg, run_dir, bus)
    try:
        for host, status in (
            ("fanout-admin:8001", 200),
            ("fanout-admin.fanout.svc.cluster.local", 200),
            ("svc.cluster.local", 421),
            ("evil.example", 421),
        ):
            r = await call(server.port, "GET", "/stats", headers={"Host": host})
            assert r.status == status, host
    finally:
        await server.close()


async def test_beyond_loopback_without_a_key_posts_are_403_and_a_warning_is_logged(
    cfg: Config, run_dir: str, hub: Hub, bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, admin_host="0.0.0.0"))
    async with asyncio.timeout(TIMEOUT_S):
        while not bus.connected:
            await asyncio.sleep(0.01)
    with caplog.at_level("WARNING", logger="fanout.admin"):
        server = await serve_admin(cfg, run_dir, bus)
    try:
        assert any(
            "beyond loopback" in r.getMessage() and API_KEY_ENV in r.getMessage()
            for r in caplog.records
        )
        r = await post_json(server.port, {"topic": "t", "key": "k", "data": 1})
        assert r.status == 403 and r.json["error"] == "forbidden"
        assert API_KEY_ENV in r.json["message"]
        assert await snapshot_items(bus, "t") == {}
        r = await call(
            server.port, "POST", "/rebalance", b'{"fraction": 1}', {"Content-Type": JSON}
        )
        assert r.status == 403
        assert (await call(server.port, "GET", "/stats")).status == 200
    finally:
        await server.close()


# -- probes and statistics --------------------------------------------------------------


def write_supervisor(board: Board, state: str = "running", slots: int = 2) -> None:
    board.write(
        SUPERVISOR,
        {
            "pid": 1,
            "state": state,
            "workers_expected": slots,
            "workers": {str(slot): 1000 + slot for slot in range(1, slots + 1)},
            "started": time.time() - 50,
        },
    )


def write_worker(board: Board, slot: int, **fields: Any) -> None:
    status = {
        "pid": 1000 + slot,
        "slot": slot,
        "accepting": True,
        "bus_connected": True,
        "connections": 10 * slot,
        "subscriptions": 20 * slot,
        "topics": 7 * slot,
        "topics_dropped": 9 * slot,
        "updates_unheld": 2 * slot,
        "frames_sent": 30 * slot,
        "bytes_sent": 40 * slot,
        "updates_delivered": 50 * slot,
        "slow_closes": slot,
        "started": time.time() - 40,
    }
    board.write(worker_name(slot), {**status, **fields})


async def test_healthz_follows_the_supervisor_status(admin: AdminServer, run_dir: str) -> None:
    r = await call(admin.port, "GET", "/healthz")
    assert r.status == 503  # no supervisor status, and not our parent
    write_supervisor(Board(run_dir))
    r = await call(admin.port, "GET", "/healthz")
    assert r.status == 200 and r.json == {"status": "ok"}


async def test_readyz_without_workers_is_503_with_reasons(admin: AdminServer, run_dir: str) -> None:
    r = await call(admin.port, "GET", "/readyz")
    assert r.status == 503
    assert r.json["status"] == "not_ready"
    assert "supervisor: no status" in r.json["reasons"]
    write_supervisor(Board(run_dir))
    r = await call(admin.port, "GET", "/readyz")
    assert r.status == 503
    assert r.json["reasons"] == ["worker 1: no status", "worker 2: no status"]


async def test_readyz_is_200_when_all_is_well(admin: AdminServer, run_dir: str) -> None:
    board = Board(run_dir)
    write_supervisor(board)
    write_worker(board, 1)
    write_worker(board, 2)
    r = await call(admin.port, "GET", "/readyz")
    assert r.status == 200
    assert r.json["status"] == "ready"

    write_worker(board, 2, accepting=False)
    write_supervisor(board, state="draining")
    r = await call(admin.port, "GET", "/readyz")
    assert r.status == 503
    assert r.json["reasons"] == ["supervisor: draining", "worker 2: not accepting"]


async def test_stats_sums_the_workers(admin: AdminServer, run_dir: str, bus: Bus) -> None:
    board = Board(run_dir)
    write_supervisor(board)
    write_worker(board, 1)
    write_worker(board, 2)
    r = await call(admin.port, "GET", "/stats")
    assert r.status == 200
    stats = r.json
    assert stats["node"] == "n1"
    assert stats["uptime_s"] >= 50
    assert [(w["slot"], w["pid"], w["connections"]) for w in stats["workers"]] == [
        (1, 1001, 10),
        (2, 1002, 20),
    ]
    assert all(0 <= w["heartbeat_age_s"] < 10 for w in stats["workers"])
    assert stats["totals"] == {
        "connections": 30,
        "subscriptions": 60,
        "topics": 21,
        "topics_dropped": 27,
        "updates_unheld": 6,
        "frames_sent": 90,
        "bytes_sent": 120,
        "updates_delivered": 150,
        "slow_closes": 3,
        "workers": 2,
    }
    assert stats["bus"] == {"backend": "local", "connected": True, "epoch": bus.epoch}


# -- the process entry ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_admin_serves_until_sigterm(run_dir: str) -> None:
    port = _free_port()
    code = (
        "import dataclasses, sys\n"
        "from engine.admin.server import run_admin\n"
        "from engine.config import default_config\n"
        "cfg = default_config()\n"
        "cfg = dataclasses.replace(cfg, server=dataclasses.replace("
        f"cfg.server, admin_host='127.0.0.1', admin_port={port}))\n"
        f"run_admin(cfg, {run_dir!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                r = _call(port, "GET", "/healthz", None, {}, None)
                break
            except OSError:
                assert proc.poll() is None, "run_admin exited early"
                assert time.monotonic() < deadline, "run_admin never listened"
                time.sleep(0.05)
        assert r.status == 200  # its parent (this test) is alive
        r = _call(port, "GET", "/readyz", None, {}, None)
        assert r.status == 503 and "bus: disconnected" in r.json["reasons"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_admin_exits_4_when_the_port_is_taken(run_dir: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = (
            "import dataclasses\n"
            "from engine.admin.server import run_admin\n"
            "from engine.config import default_config\n"
            "cfg = default_config()\n"
            "cfg = dataclasses.replace(cfg, server=dataclasses.replace("
            f"cfg.server, admin_host='127.0.0.1', admin_port={port}))\n"
            f"run_admin(cfg, {run_dir!r})\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=os.getcwd(), timeout=TIMEOUT_S, capture_output=True
        )
    assert proc.returncode == 4


# -- the board's shape: /stats, /metrics and /readyz byte for byte -------------------------
#
# The status board is the contract between the workers and the admin. These
# tests pin what the admin answers for a board written exactly as the workers
# and the supervisor write it: the golden files were captured before the status
# became a dataclass (issue 12), and must not change with how it is read.

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
FULL_WORKER: dict[str, Any] = {  # every key a worker writes, in its order
    "pid": 1001,
    "slot": 1,
    "accepting": True,
    "bus_connected": True,
    "bus_lag_ms": 12.5,
    "bus_shard_lag_ms": [0.0, 12.5, 3.1],
    "bus_last_entry_age_ms": 40.2,
    "bus_events": {"task_restarts": 1, "publish_timeouts": 2, "oom_refusals": 0,
                   "byte_trims": 3, "topics_expired": 4},
    "bus_tasks_down": [],
    "connections": 10,
    "subscriptions": 20,
    "topics": 7,
    "topics_idle": 2,
    "topics_loading": 1,
    "topics_loaded": 30,
    "topics_dropped": 9,
    "topic_load_failures": 1,
    "updates_unheld": 2,
    "frames_sent": 300,
    "bytes_sent": 4000,
    "compressed_frames": 100,
    "compressed_bytes": 1500,
    "compressed_input_bytes": 3000,
    "updates_applied": 55,
    "updates_delivered": 500,
    "updates_coalesced": 6,
    "published": 8,
    "slow_events": 3,
    "flush_hist": {"b": [0.001, 0.01, 0.1], "c": [5, 3, 1, 0], "n": 9, "s": 0.0625},
    "publish_hist": {"b": [0.001, 0.01, 0.1], "c": [0, 8, 0, 0], "n": 8, "s": 0.04},
    "frames_refused": 4,
    "slow_clients": 1,
    "slow_closes": 2,
    "connects": 12,
    "closes": {"1000": 5, "4008": 2, "3xxx": 1},
    "errors": {"bad_topic": 4, "forbidden": 1},
    "ping_timeouts": 1,
    "upgrades_refused": {"429": 2, "503": 1},
    "upgrades_refused_by": {"too_many_attempts": 2, "busy": 1},
    "loop_lag_max_ms": 3.5,
    "gc_hist": {"b": [0.001, 0.01, 0.1], "c": [40, 2, 1, 0], "n": 43, "s": 0.125},
    "gc_collections": {"0": 38, "1": 4, "2": 1},
    "started": 1_700_000_000.25,
    "ts": 0.0,  # set when written
}  # fmt: skip
LOCAL_WORKER: dict[str, Any] = {  # the local bus reports no shards, no events
    **FULL_WORKER,
    "pid": 1002,
    "slot": 2,
    "bus_lag_ms": None,
    "bus_shard_lag_ms": None,
    "bus_last_entry_age_ms": None,
    "bus_events": {},
    "flush_hist": {"b": [0.001, 0.01, 0.1], "c": [0, 0, 0, 0], "n": 0, "s": 0.0},
    "closes": {},
    "errors": {},
    "upgrades_refused": {},
    "upgrades_refused_by": {},
}


def write_board_file(run_dir: str, name: str, doc: dict[str, Any]) -> None:
    """A status file as its owner writes it: JSON, `ts` last (the wire itself)."""
    with open(os.path.join(run_dir, f"{name}.json"), "w", encoding="utf-8") as fh:
        json.dump({**doc, "ts": time.time()}, fh, separators=(",", ":"))


def write_full_board(run_dir: str, **worker2: Any) -> None:
    write_board_file(run_dir, "supervisor", {
        "pid": 1, "state": "running", "workers_expected": 2, "workers": {"1": 1001, "2": 1002},
        "aux": {"hub": 1003, "admin": 1004}, "port": 8080, "admin_port": 8081,
        "started": time.time() - 50,
    })  # fmt: skip
    write_board_file(run_dir, "worker-1", FULL_WORKER)
    write_board_file(run_dir, "worker-2", {**LOCAL_WORKER, **worker2})
    write_board_file(run_dir, "worker-3", {**FULL_WORKER, "pid": 1009, "slot": 3})  # not run


def masked(text: str) -> str:
    """Wall-clock figures (uptime, heartbeat ages) and the bus epoch masked; psutil's figures of
    processes (whichever pids happen to exist here) left out."""
    text = re.sub(r'"(uptime_s|heartbeat_age_s)":[0-9.e+-]+', r'"\1":"*"', text)
    text = re.sub(r'"epoch":"[^"]*"', '"epoch":"*"', text)  # the hub's, new every run
    text = re.sub(r"(fanout_worker_heartbeat_age_seconds\{[^}]*\}) \S+", r"\1 *", text)
    return "".join(ln for ln in text.splitlines(keepends=True) if "fanout_process_" not in ln)


def golden(name: str) -> str:
    with open(os.path.join(GOLDEN, name), encoding="utf-8") as fh:
        return fh.read()


def _get(port: int, path: str) -> tuple[int, str, str]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.getheader("content-type") or "", r.read().decode()
    finally:
        c.close()


async def test_stats_metrics_and_readyz_keep_their_shape_byte_for_byte(
    admin: AdminServer, run_dir: str
) -> None:
    write_full_board(run_dir)
    status, ctype, body = await asyncio.to_thread(_get, admin.port, "/stats")
    assert (status, ctype) == (200, "application/json")
    assert masked(body) == golden("stats.json").rstrip("\n")
    status, ctype, body = await asyncio.to_thread(_get, admin.port, "/metrics")
    assert (status, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert masked(body) == golden("metrics.txt")
    status, _, body = await asyncio.to_thread(_get, admin.port, "/readyz")
    assert (status, body) == (200, '{"status":"ready","workers":2}')
    # a worker whose bus task is restarting, and one lagging past bus.max_lag_ms
    write_full_board(run_dir, bus_connected=False, bus_tasks_down=["publisher", "reader"])
    write_board_file(run_dir, "worker-1", {**FULL_WORKER, "bus_lag_ms": 90_000.0})
    status, _, body = await asyncio.to_thread(_get, admin.port, "/readyz")
    assert (status, body) == (
        503,
        '{"status":"not_ready","reasons":["worker 1: bus lagging (90000 ms > 5000 ms)",'
        '"worker 2: bus task publisher, reader restarting"]}',
    )


async def test_a_worker_writes_every_key_of_the_pinned_board(
    engine_factory: Any,
) -> None:
    engine = await engine_factory()
    status = engine.worker.status().to_json()
    assert list(status) == list(FULL_WORKER)
