"""The flood measurement: abusive clients against a 2-worker `fanout serve`
while honest subscribers receive a live feed.

    .venv/bin/python -m loadtest.flood                       # 2,000 abusers, 10 s, 100 honest
    .venv/bin/python -m loadtest.flood --abusers 50 --duration 3 --honest 5 --feed-rate 200

What runs (every process is started and killed by this script):

- `fanout serve --workers 2` on free loopback ports, with `limits.messages_per_s`
  = `--rate-limit` (5 by default) and `limits.abuse_window_s` = `--abuse-window`
  (5 s by default, so that detection, between the window and the window + 1 s,
  falls inside the flood), nothing else changed;
- a publisher posting `--feed-rate` updates/s (1,000 by default) to the topic
  `feed` through `POST /publish`, `data = [seq, time_ns]` stamped at send;
- one honest process: `--honest` subscribers (100) of `feed` that record
  publish-to-receive latency of every value they receive (same clock);
- `--procs` abuser processes (4) holding `--abusers` connections (2,000) that
  each send `--factor` (10) times the rate limit in `ping` messages for
  `--duration` seconds (10), then stop. To keep the load generator cheap (two
  cores are shared with the server), each abuser writes its messages of a
  100 ms tick as one TCP write of pre-built masked frames; the server still
  parses and rate-checks every frame. Abusers read what comes back: they record
  whether they saw `err rate_limited` and the close code they got.

Phases: warm-up (honest clients subscribed, feed running) -> RSS "before" ->
flood -> abusers gone -> settle (`--settle`, 5 s) -> RSS "after". Latency is
reported for the flood window and for the whole run. The server's CPU
(utime+stime of its process tree) and each load process's own CPU are reported
for the flood window, since they compete for the same cores.

Output: a summary on stdout and the full result as JSON (`--json PATH`).
Exit code 0 when the run completed (whatever the figures), 1 on error.
Limits: every wait is bounded; the script kills the server's process group and
its own children on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgpack
import psutil

from engine.board import Board
from engine.status import WorkerStatus
from loadtest.accounting import tree_memory_bytes
from loadtest.client import connect, listener_class

TOPIC = "feed"
KEYS = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    i = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return round(sorted_ms[i], 2)


def _child_setup() -> None:
    with contextlib.suppress(Exception):  # die with the parent (Linux)
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)


# -- WebSocket bits (client side, raw) ---------------------------------------------------

_MASK = b"\x11\x22\x33\x44"


def masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    n = len(payload)
    head = (
        bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    )
    body = bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))
    return head + _MASK + body


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: fanout.v1\r\n\r\n"
    ).encode()


class _FrameReader:
    """Server frames (unmasked) from a byte stream; `handshake` first."""

    __slots__ = ("buf", "upgraded")

    def __init__(self) -> None:
        self.buf = b""
        self.upgraded = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out: list[tuple[int, bytes]] = []
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            status = self.buf[9:12]
            self.buf = self.buf[end + 4 :]
            if status != b"101":
                out.append((-int(status), b""))
                return out
            self.upgraded = True
        buf = self.buf
        i = 0
        while len(buf) - i >= 2:
            op = buf[i] & 0x0F
            n = buf[i + 1] & 0x7F
            h = 2
            if n == 126:
                if len(buf) - i < 4:
                    break
                n = struct.unpack_from("!H", buf, i + 2)[0]
                h = 4
            elif n == 127:
                if len(buf) - i < 10:
                    break
                n = struct.unpack_from("!Q", buf, i + 2)[0]
                h = 10
            if len(buf) - i < h + n:
                break
            out.append((op, buf[i + h : i + h + n]))
            i += h + n
        self.buf = buf[i:]
        return out


# -- abusers ---------------------------------------------------------------------------------


class _Abuser(asyncio.Protocol):
    def __init__(self, port: int, stats: dict[str, Any]) -> None:
        self.port = port
        self.stats = stats
        self.reader = _FrameReader()
        self.transport: asyncio.Transport | None = None
        self.ready = False
        self.throttled = False
        self.code: int | None = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(upgrade_request(self.port))

    def data_received(self, data: bytes) -> None:
        for op, payload in self.reader.feed(data):
            if op < 0:
                self.code = op  # an HTTP refusal: -status
                self.finish()
            elif op == 0x2:
                self.ready = True
                if b"rate_limited" in payload:
                    self.throttled = True
            elif op == 0x8:
                self.code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.finish()
            elif op == 0x9 and self.transport is not None:
                self.transport.write(masked_frame(payload, 0xA))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.code is None:
            self.code = 1006
        self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


def _abuser_process(
    port: int, n: int, msgs_per_tick: int, duration_s: float, start_at: float, pipe: Pipe
) -> None:
    _child_setup()
    import uvloop

    result = uvloop.run(_abusers(port, n, msgs_per_tick, duration_s, start_at))
    t = os.times()
    result["cpu_s"] = t.user + t.system
    pipe.send(result)


async def _abusers(
    port: int, n: int, msgs_per_tick: int, duration_s: float, start_at: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {}
    conns: list[_Abuser] = []
    for i in range(n):
        try:
            _, proto = await loop.create_connection(lambda: _Abuser(port, stats), "127.0.0.1", port)
            conns.append(proto)
        except OSError:
            pass
        if i % 50 == 49:
            await asyncio.sleep(0.01)
    # every connection has had its hello (or was refused) before the flood starts
    deadline = time.time() + 20
    while time.time() < deadline and not all(c.ready or c.done.done() for c in conns):
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    burst = masked_frame(msgpack.packb({"op": "ping"})) * msgs_per_tick
    t0 = time.time()
    cpu0 = sum(os.times()[:2])
    closed_at: list[float] = []
    while time.time() - t0 < duration_s:
        tick = time.time()
        for c in conns:
            if not c.done.done() and c.transport is not None:
                c.transport.write(burst)
        await asyncio.sleep(max(0.0, 0.1 - (time.time() - tick)))
    sent_cpu = sum(os.times()[:2]) - cpu0
    # what is still open gets a few seconds to be closed; then we leave
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.done for c in conns)), 5.0)
    for c in conns:
        if not c.done.done():
            closed_at.append(0)
            c.finish()
    codes: dict[str, int] = {}
    for c in conns:
        codes[str(c.code)] = codes.get(str(c.code), 0) + 1
    return {
        "connected": sum(1 for c in conns if c.ready),
        "attempted": n,
        "throttled": sum(1 for c in conns if c.throttled),
        "closed_4029_after_throttle": sum(1 for c in conns if c.throttled and c.code == 4029),
        "close_codes": codes,
        "still_open_after_flood": len(closed_at),
        "flood_cpu_s": round(sent_cpu, 2),
    }


# -- honest subscribers ------------------------------------------------------------------------


def _honest_process(
    url: str, n: int, marks: tuple[float, float], stop_at: float, pipe: Pipe
) -> None:
    _child_setup()
    import uvloop

    result = uvloop.run(_honest(url, n, marks, stop_at))
    t = os.times()
    result["cpu_s"] = t.user + t.system
    pipe.send(result)


class _HonestSink:
    """The honest subscribers' sink (loadtest/client.py): the latency of every value.

    Every honest subscriber gets the same bytes from a flush (one encoded `upd`
    shared by all): each distinct message is decoded once and the result reused,
    so the measuring process spends its CPU on timestamps, not on decoding
    (each client still takes its latency at its own receive time)."""

    def __init__(self, marks: tuple[float, float]) -> None:
        self.flood_start, self.flood_end = marks
        self.lat_all: list[float] = []
        self.lat_flood: list[float] = []
        self.by_second: dict[int, list[float]] = {}  # second of the run (publish time) -> ms
        self.counters = {"values": 0, "frames": 0, "closed": 0}
        self.cache: dict[bytes, list[int]] = {}

    def feed(self, client: Any, payload: bytes) -> None:
        now = time.time_ns()
        self.counters["frames"] += 1
        stamps = self.cache.get(payload)
        if stamps is None:
            stamps = []
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(payload)
            for msg in unpacker:
                if msg.get("op") == "upd":
                    for value in msg["items"].values():
                        if isinstance(value, list) and len(value) == 2:
                            stamps.append(value[1])
            if len(self.cache) > 1000:
                self.cache.clear()
            self.cache[payload] = stamps
        flood_start, flood_end = self.flood_start, self.flood_end
        for stamp in stamps:
            ms = (now - stamp) / 1e6
            self.lat_all.append(ms)
            ts = stamp / 1e9
            self.by_second.setdefault(int(ts - flood_start), []).append(ms)
            if flood_start <= ts <= flood_end:
                self.lat_flood.append(ms)
        self.counters["values"] += len(stamps)

    def disconnected(self, client: Any) -> None:
        self.counters["closed"] += 1

    def unexpected(self, client: Any, what: str) -> None:
        pass  # text frames and the like: not counted (as before the shared client)


async def _honest(url: str, n: int, marks: tuple[float, float], stop_at: float) -> dict[str, Any]:
    sink = _HonestSink(marks)
    flood_start, flood_end = marks
    lat_all, lat_flood, by_second, counters = (
        sink.lat_all,
        sink.lat_flood,
        sink.by_second,
        sink.counters,
    )
    cpu_marks: dict[str, float] = {}
    transports = []
    for _ in range(n):
        transports.append(await connect(listener_class()(sink, [TOPIC]), url))
    while time.time() < stop_at:
        if not cpu_marks.get("flood_start") and time.time() >= flood_start:
            cpu_marks["flood_start"] = sum(os.times()[:2])
        if not cpu_marks.get("flood_end") and time.time() >= flood_end:
            cpu_marks["flood_end"] = sum(os.times()[:2])
        await asyncio.sleep(0.05)
    closed_during_run = counters["closed"]
    for t in transports:
        t.disconnect()
    lat_all.sort()
    lat_flood.sort()
    return {
        "subscribers": n,
        "closed_during_run": closed_during_run,
        "values": counters["values"],
        "frames": counters["frames"],
        "latency_ms_all": {
            q: percentile(lat_all, p) for q, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        },
        "latency_ms_flood": {
            q: percentile(lat_flood, p) for q, p in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        },
        "samples_flood": len(lat_flood),
        "p99_ms_by_second": {
            str(k): percentile(sorted(v), 0.99) for k, v in sorted(by_second.items())
        },
        "flood_cpu_s": round(cpu_marks.get("flood_end", 0) - cpu_marks.get("flood_start", 0), 2),
    }


# -- publisher ---------------------------------------------------------------------------------


def _publisher_process(admin_port: int, rate: int, stop_at: float, pipe: Pipe) -> None:
    _child_setup()
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    tick_s = 0.01
    per_tick = max(1, round(rate * tick_s))
    seq = 0
    errors = 0
    t_next = time.time()
    while time.time() < stop_at:
        items = []
        for _ in range(per_tick):
            seq += 1
            items.append({"topic": TOPIC, "key": f"k{seq % KEYS}", "data": [seq, time.time_ns()]})
        try:
            conn.request(
                "POST",
                "/publish",
                json.dumps({"items": items}),
                {"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors += 1
        except OSError:
            errors += 1
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
        t_next += tick_s
        time.sleep(max(0.0, t_next - time.time()))
    t = os.times()
    pipe.send({"published": seq, "errors": errors, "cpu_s": t.user + t.system})


# -- the server ----------------------------------------------------------------------------------


def server_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    total = 0.0
    for p in server_tree(pid):
        with contextlib.suppress(psutil.Error):
            rss = p.memory_info().rss / 1e6
            total += rss
            out[p.name() + f"[{p.pid}]"] = round(rss, 1)
    out["total"] = round(total, 1)
    return out


def tree_memory_mb(pid: int) -> dict[str, float]:
    """The tree's memory by kind (loadtest/accounting.py, `memory_bytes`): pss counts
    each page once (copy-on-write copies included), anon is the heap, file the
    pages of shared libraries a process touched (no new memory)."""
    kinds = tree_memory_bytes(p.pid for p in server_tree(pid))
    return {k: round(v / 1e6, 1) for k, v in kinds.items()}


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in server_tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def worker_rss_mb(admin_port: int) -> float:
    """RSS of the worker processes only (they hold the connections)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as r:
        stats = json.loads(r.read())
    total = 0.0
    for w in stats["workers"]:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(w["pid"]).memory_info().rss / 1e6
    return round(total, 1)


def worker_statuses(run_dir: str) -> list[WorkerStatus]:
    """Each worker's full status from the supervisor's board (closes and errors
    by code, which /stats does not break down): the board is a directory of
    `run_dir`, the one `fanout serve` made."""
    out: list[WorkerStatus] = []
    for entry in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, entry)
        if os.path.isdir(path):
            out.extend(Board(path).read_workers().values())
    return out


def start_server(
    args: argparse.Namespace,
    port: int,
    admin_port: int,
    run_dir: str,
    log: Any,
    extra_env: dict[str, str] | None = None,
) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env.update(
        {
            "FANOUT_SERVER_HOST": "127.0.0.1",
            "FANOUT_SERVER_PORT": str(port),
            "FANOUT_SERVER_ADMIN_PORT": str(admin_port),
            "FANOUT_LIMITS_MESSAGES_PER_S": str(args.rate_limit),
            "FANOUT_LIMITS_ABUSE_WINDOW_S": str(args.abuse_window),
            # message floods are measured here, not connect floods (every abuser connects at once)
            "FANOUT_LIMITS_UPGRADES_PER_S": "0",
            "FANOUT_RUN_DIR": run_dir,
            "FANOUT_LOG_LEVEL": "warning",
            **(extra_env or {}),
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--workers", str(args.workers)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(admin_port: int, proc: Any, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fanout serve exited with {proc.returncode}")
        url = f"http://127.0.0.1:{admin_port}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("fanout serve not ready in time")


def run(args: argparse.Namespace) -> dict[str, Any]:
    port, admin_port = free_port(), free_port()
    run_dir = tempfile.mkdtemp(prefix="fanout-flood-")
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    proc = start_server(args, port, admin_port, run_dir, log)
    children: list[multiprocessing.Process] = []
    ctx = multiprocessing.get_context("spawn")
    try:
        wait_ready(admin_port, proc)
        url = f"ws://127.0.0.1:{port}/ws"
        now = time.time()
        # timeline (wall clock, shared by every process)
        flood_start = now + args.warmup + 3.0  # abusers connect during the warm-up
        flood_end = flood_start + args.duration
        stop_at = flood_end + 5.0 + args.settle + 2.0
        pipes: list[tuple[str, Pipe]] = []

        def spawn(name: str, target: Any, *a: Any) -> None:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=target, args=(*a, child), daemon=True)
            p.start()
            children.append(p)
            pipes.append((name, parent))

        spawn("publisher", _publisher_process, admin_port, args.feed_rate, stop_at)
        spawn("honest", _honest_process, url, args.honest, (flood_start, flood_end), stop_at)
        time.sleep(args.warmup)
        rss_before = tree_rss_mb(proc.pid)
        memory_before = tree_memory_mb(proc.pid)
        workers_before = worker_rss_mb(admin_port)
        msgs_per_tick = max(1, round(args.factor * args.rate_limit * 0.1))
        per_proc = [args.abusers // args.procs] * args.procs
        per_proc[0] += args.abusers - sum(per_proc)
        for n in per_proc:
            spawn("abusers", _abuser_process, port, n, msgs_per_tick, args.duration, flood_start)
        time.sleep(max(0.0, flood_start - time.time()))
        cpu0, t0 = tree_cpu_s(proc.pid), time.time()
        time.sleep(max(0.0, flood_end - time.time()))
        cpu1, t1 = tree_cpu_s(proc.pid), time.time()
        peak = tree_rss_mb(proc.pid)
        # abusers still open get closed by the server or leave (5 s), then settle
        time.sleep(max(0.0, flood_end + 5.0 + args.settle - time.time()))
        rss_after = tree_rss_mb(proc.pid)
        memory_after = tree_memory_mb(proc.pid)
        workers_after = worker_rss_mb(admin_port)
        time.sleep(1.5)  # a fresh status on the board
        statuses = worker_statuses(run_dir)
        results: dict[str, list[Any]] = {}
        for name, pipe in pipes:
            if pipe.poll(max(1.0, stop_at - time.time() + 30)):
                results.setdefault(name, []).append(pipe.recv())
        samples = {
            "rss_before": rss_before,
            "peak": peak,
            "rss_after": rss_after,
            "memory_before": memory_before,
            "memory_after": memory_after,
            "workers_before": workers_before,
            "workers_after": workers_after,
            "cpu_s": cpu1 - cpu0,
            "window_s": t1 - t0,
        }
        return {
            "command": " ".join(
                [os.path.basename(sys.executable), "-m", "loadtest.flood", *sys.argv[1:]]
            ),
            "settings": vars(args),
            "abusers": _abusers_summary(args, results.get("abusers", []), msgs_per_tick),
            "honest": results.get("honest", [{}])[0],
            "publisher": results.get("publisher", [{}])[0],
            "server": _server_summary(samples, statuses),
        }
    finally:
        for p in children:
            if p.is_alive():
                p.terminate()
        for p in children:
            p.join(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if log is not subprocess.DEVNULL:
            log.close()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def _abusers_summary(
    args: argparse.Namespace, abusers: list[dict[str, Any]], msgs_per_tick: int
) -> dict[str, Any]:
    """The abuser processes' results, summed."""
    codes: dict[str, int] = {}
    for a in abusers:
        for k, v in a["close_codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "attempted": sum(a["attempted"] for a in abusers),
        "connected": sum(a["connected"] for a in abusers),
        "throttled": sum(a["throttled"] for a in abusers),
        "closed_4029_after_throttle": sum(a["closed_4029_after_throttle"] for a in abusers),
        "close_codes": codes,
        "load_cpu_s_flood": round(sum(a["flood_cpu_s"] for a in abusers), 2),
        "messages_per_s_sent": args.abusers * msgs_per_tick * 10,
    }


def _server_summary(m: Mapping[str, Any], statuses: list[WorkerStatus]) -> dict[str, Any]:
    """The server's memory and CPU samples around the flood, and its workers' statuses."""
    rss_before, rss_after = m["rss_before"], m["rss_after"]
    workers_before, workers_after = m["workers_before"], m["workers_after"]
    return {
        "rss_mb_before": rss_before,
        "rss_mb_peak": m["peak"],
        "rss_mb_after": rss_after,
        "rss_change_pct": round(
            100.0 * (rss_after["total"] - rss_before["total"]) / rss_before["total"], 1
        ),
        "memory_mb_before": m["memory_before"],
        "memory_mb_after": m["memory_after"],
        "workers_rss_mb_before": workers_before,
        "workers_rss_mb_after": workers_after,
        "workers_rss_change_pct": round(
            100.0 * (workers_after - workers_before) / workers_before, 1
        ),
        "cpu_s_flood": round(m["cpu_s"], 2),
        "cpu_cores_flood": round(m["cpu_s"] / m["window_s"], 2),
        "connections_after": sum(w.connections for w in statuses),
        "closes": _sum_maps(w.closes for w in statuses),
        "errors": _sum_maps(w.errors for w in statuses),
        "upgrades_refused": _sum_maps(w.upgrades_refused for w in statuses),
        "loop_lag_max_ms": [w.loop_lag_max_ms for w in statuses],
    }


def _sum_maps(maps: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return out


def summary(r: dict[str, Any]) -> str:
    a, h, s = r["abusers"], r["honest"], r["server"]
    return "\n".join(
        [
            f"command: {r['command']}",
            f"abusers: {a['connected']}/{a['attempted']} connected, {a['throttled']} throttled,"
            f" {a['closed_4029_after_throttle']} closed 4029 after throttling; close codes {a['close_codes']};"
            f" {a['messages_per_s_sent']} msgs/s offered; load CPU {a['load_cpu_s_flood']} s",
            f"honest: {h.get('subscribers')} subscribers, {h.get('closed_during_run')} closed,"
            f" {h.get('values')} values; latency during flood {h.get('latency_ms_flood')}"
            f" ({h.get('samples_flood')} samples); whole run {h.get('latency_ms_all')}",
            f"server: RSS {s['rss_mb_before']['total']} MB before, {s['rss_mb_peak']['total']} MB peak,"
            f" {s['rss_mb_after']['total']} MB after ({s['rss_change_pct']:+} %); workers"
            f" {s['workers_rss_mb_before']} -> {s['workers_rss_mb_after']} MB"
            f" ({s['workers_rss_change_pct']:+} %); CPU during flood {s['cpu_s_flood']} s"
            f" ({s['cpu_cores_flood']} cores); connections left {s['connections_after']}",
            "server memory before -> after (MB): "
            + ", ".join(
                f"{k} {s['memory_mb_before'][k]} -> {s['memory_mb_after'][k]}"
                for k in ("pss", "anon", "file")
                if k in s["memory_mb_before"] and k in s["memory_mb_after"]
            ),
        ]
    )


def main_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings (also used by tests/adversity/test_flood.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--abusers", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=4, help="abuser processes")
    ap.add_argument("--factor", type=float, default=10.0, help="abusers send this x the limit")
    ap.add_argument("--duration", type=float, default=10.0, help="flood seconds")
    ap.add_argument("--honest", type=int, default=100)
    ap.add_argument("--feed-rate", type=int, default=1000, help="updates/s to the feed")
    ap.add_argument("--rate-limit", type=float, default=5.0, help="limits.messages_per_s")
    ap.add_argument("--abuse-window", type=float, default=5.0, help="limits.abuse_window_s")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after the abusers left")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--server-log", help="the server's output goes here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = main_args(argv)
    result = run(args)
    print(summary(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
