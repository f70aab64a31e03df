"""HTTP ingest load: keep-alive `POST /publish` of msgpack batches, and what it costs.

    python -m loadtest.http_ingest --batches 1,100,1000 --clients 2 --duration 10

Starts a `fanout serve` on the local bus (or loads `--admin URL`, an engine
started by someone else: then only the generator's figures are reported), and
for each batch size runs `--clients` client processes, each with one keep-alive
connection sending the same few prebuilt msgpack bodies back to back (one
request in flight per connection), for `--duration` seconds or `--max-requests`
requests per client, whichever comes first. The bodies are built before the
window: the generator measures the server, not its own encoder.

The report (text, or JSON with `--json`) gives per batch size: requests and
updates per second, the admin's CPU per request and per update (µs), CPU-s
per million published updates for the admin, the hub and the workers, and the
generator's own CPU next to them. CPU comes from /proc (psutil), sampled at the
start and the end of the window. Every answer must be 200: any other status is
counted and fails the run (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from typing import Any

import msgpack

from loadtest.accounting import cpu_seconds, machine_busy_seconds, used
from loadtest.server import Server, SetupError

MAX_RESPONSE_BYTES = 1 << 20
BODY_VARIANTS = 8  # distinct bodies per batch size, sent in turn


def build_bodies(batch: int, topics: int, value_bytes: int) -> list[bytes]:
    """`BODY_VARIANTS` msgpack bodies of `batch` updates each (one update:
    `{"topic","key","data"}`; more: `{"items": [...]}`), spread over `topics`
    state topics, each `data` a map padded to about `value_bytes`."""
    pad = "x" * max(0, value_bytes - 24)
    bodies = []
    for v in range(BODY_VARIANTS):
        items = [
            {
                "topic": f"ingest.{i % topics}",
                "key": f"k{i}",
                "data": {"px": 100.0 + v + i / 1000, "seq": v, "pad": pad},
            }
            for i in range(batch)
        ]
        doc: Any = items[0] if batch == 1 else {"items": items}
        bodies.append(msgpack.packb(doc, use_bin_type=True))
    return bodies


def request_bytes(host: str, port: int, body: bytes, api_key: str | None) -> bytes:
    head = (
        f"POST /publish HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n"
    )
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    return head.encode() + b"\r\n" + body


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one response (Content-Length framed) off `sock`; returns its status.
    Bytes past it stay in `buf`."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            total = end + 4 + length
            if total > MAX_RESPONSE_BYTES:
                raise RuntimeError("response too large")
            if len(buf) >= total:
                del buf[:total]
                return int(head.split(" ", 2)[1])
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        buf += chunk


def client(
    host: str,
    port: int,
    requests: list[bytes],
    deadline: float,
    max_requests: int,
    out: Any,
) -> None:
    """One publisher: one keep-alive connection, one request in flight."""
    t0 = os.times()
    sent = failed = 0
    statuses: dict[int, int] = {}
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    try:
        while sent < max_requests and time.monotonic() < deadline:
            sock.sendall(requests[sent % len(requests)])
            status = _read_response(sock, buf)
            sent += 1
            if status != 200:
                failed += 1
                statuses[status] = statuses.get(status, 0) + 1
    finally:
        sock.close()
    t1 = os.times()
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    out.put({"requests": sent, "failed": failed, "statuses": statuses, "cpu_s": cpu})


def _py_spy(
    prefix: str | None, batch: int, admin: list[int], duration_s: float
) -> subprocess.Popen[bytes] | None:
    """py-spy recording the admin process during the window (raw folded stacks)."""
    if not prefix or not admin:
        return None
    out = f"{prefix}.batch{batch}.txt"
    seconds = str(max(1, int(duration_s) - 1))
    cmd = ["py-spy", "record", "-p", str(admin[0]), "-d", seconds, "-r", "200", "-f", "raw"]
    if os.environ.get("HTTP_INGEST_NATIVE"):
        cmd.append("--native")  # C frames too (uvloop, msgpack, httptools)
    return subprocess.Popen([*cmd, "-o", out], stdout=subprocess.DEVNULL)


def server_roles(srv: Server) -> dict[str, list[int]]:
    """The server's processes by role: admin, hub, workers, supervisor."""
    roles: dict[str, list[int]] = {"admin": [], "hub": [], "workers": [], "supervisor": []}
    for name, pid in srv.board_pids().items():
        role = "workers" if name.startswith("worker") else name
        roles.setdefault(role, []).append(pid)
    return roles


def run_batch(args: argparse.Namespace, batch: int, roles: dict[str, list[int]]) -> dict[str, Any]:
    host, port = args.host, args.port
    bodies = build_bodies(batch, args.topics, args.value_bytes)
    requests = [request_bytes(host, port, b, args.api_key) for b in bodies]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    pids = [p for ps in roles.values() for p in ps]
    before, busy0, t0 = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
    deadline = t0 + args.duration
    procs = [
        ctx.Process(target=client, args=(host, port, requests, deadline, args.max_requests, out))
        for _ in range(args.clients)
    ]
    for p in procs:
        p.start()
    spy = _py_spy(args.py_spy, batch, roles.get("admin", []), args.duration)
    results = [out.get(timeout=args.duration + 60) for _ in procs]
    if spy is not None:
        spy.wait(30)
    for p in procs:
        p.join(10)
    elapsed = time.monotonic() - t0
    after, busy1 = cpu_seconds(pids), machine_busy_seconds()
    reqs = sum(r["requests"] for r in results)
    updates = reqs * batch
    gen_cpu = sum(r["cpu_s"] for r in results)
    cpu = {
        role: sum(used(before, after, p) for p in ps if p in before and p in after)
        for role, ps in roles.items()
        if ps
    }
    system = {
        role: sum(used(before, after, p, 1) for p in ps if p in before and p in after)
        for role, ps in roles.items()
        if ps
    }
    statuses: dict[str, int] = {}
    for r in results:
        for s, n in r["statuses"].items():
            statuses[str(s)] = statuses.get(str(s), 0) + n
    per_million = {
        role: round(c / updates * 1e6, 2) if updates else None for role, c in cpu.items()
    }
    admin = cpu.get("admin")
    return {
        "batch": batch,
        "clients": args.clients,
        "elapsed_s": round(elapsed, 2),
        "requests": reqs,
        "updates": updates,
        "failed": sum(r["failed"] for r in results),
        "statuses": statuses,
        "requests_per_s": round(reqs / elapsed, 1),
        "updates_per_s": round(updates / elapsed, 1),
        "admin_us_per_request": round(admin / reqs * 1e6, 1) if admin is not None and reqs else None,
        "admin_us_per_update": round(admin / updates * 1e6, 2) if admin is not None and updates else None,
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "system_cpu_s": {k: round(v, 3) for k, v in system.items()},  # kernel: syscalls
        "cpu_s_per_million_updates": per_million,
        "generator_cpu_s": round(gen_cpu, 3),
        "generator_cpu_s_per_million_updates": round(gen_cpu / updates * 1e6, 2) if updates else None,
        "machine_busy_cores": round((busy1 - busy0) / elapsed, 2),
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.http_ingest",
        description="Keep-alive POST /publish of msgpack batches; admin/hub/worker CPU per update.",
    )
    p.add_argument("--batches", default="1,100,1000", help="batch sizes, comma-separated")
    p.add_argument("--clients", type=int, default=2, help="client processes (one connection each)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per batch size (max 600)")
    p.add_argument(
        "--max-requests", type=int, default=1_000_000, help="requests per client, at most"
    )
    p.add_argument("--topics", type=int, default=10, help="state topics the updates spread over")
    p.add_argument(
        "--value-bytes", type=int, default=40, help="approximate size of each data value"
    )
    p.add_argument("--workers", type=int, default=2, help="workers of the server started here")
    p.add_argument("--admin", help="load this admin URL (http://host:port) instead of starting one")
    p.add_argument("--api-key-env", default="FANOUT_API_KEY", help="env var holding the API key")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--py-spy", metavar="PREFIX", help="record the admin with py-spy: PREFIX.batchN.txt"
    )
    args = p.parse_args(argv)
    if not 0 < args.duration <= 600:
        p.error("--duration must be in (0, 600]")
    if args.clients < 1 or args.clients > 64:
        p.error("--clients must be in 1..64")
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    args.api_key = os.environ.get(args.api_key_env) or None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    srv = None
    if args.admin:
        hostport = args.admin.split("://", 1)[-1].rstrip("/")
        args.host, _, port = hostport.rpartition(":")
        args.port = int(port)
        roles: dict[str, list[int]] = {}
    else:
        srv = Server(args.workers, 5, None, "warning")
    try:
        if srv is not None:
            srv.wait_ready(30)
            args.host, args.port = "127.0.0.1", srv.admin_port
            roles = server_roles(srv)
        rows = []
        for batch in args.batch_sizes:
            rows.append(run_batch(args, batch, roles))
    except SetupError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if srv is not None:
            srv.stop()
            srv.cleanup_dir(None)
    report = {"server": srv.command() if srv else args.admin, "runs": rows}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"server: {report['server']}")
        for r in rows:
            per_m = ", ".join(f"{k} {v}" for k, v in r["cpu_s_per_million_updates"].items())
            print(
                f"batch {r['batch']:>5}: {r['requests_per_s']:>8} req/s {r['updates_per_s']:>10}"
                f" upd/s | admin {r['admin_us_per_request']} us/req {r['admin_us_per_update']}"
                f" us/upd | CPU-s per 1M updates: {per_m}; generator"
                f" {r['generator_cpu_s_per_million_updates']} | machine {r['machine_busy_cores']}"
                f" cores | failed {r['failed']} {r['statuses'] or ''}"
            )
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
