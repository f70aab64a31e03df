"""permessage-deflate on the demo feed: bytes on the wire per delivered update
and worker CPU per frame, compression off, per client, and once per group
(issue 14; docs/benchmarks.md, "Compression").

    python -m loadtest.deflatebench -S 300 -D 30          # every mode, one after the other
    python -m loadtest.deflatebench --core market -S 1000 # the core alone, no sockets

For each mode a fresh `fanout serve --demo --workers 1` runs with
`FANOUT_FANOUT_COMPRESSION=<mode>`; `-S` clients (loadtest/client.py, which
offer the extension) subscribe to the demo's three topics, count frames
without decoding once they hold their snaps, and over `-D` seconds the
engine's own counters are read from /metrics at both ends of the window:
`fanout_bytes_sent_total` (what was handed to the sockets: compressed bytes
when compressed), `fanout_updates_delivered_total`, `fanout_frames_sent_total`
and the worker's `fanout_process_cpu_seconds_total`. The market workload
goes through `fanout bench` instead (the same environment variables).

`--core WORKLOAD` measures the fan-out core alone, in this process (no
sockets, no kernel; what loadtest/microbench.py does for raw frames): the
same seeded updates (`--values quotes`: `{"bid", "ask", "ts"}` maps like a
price feed; `stamps`: `[seq, time_ns]`, what `fanout bench` publishes)
applied, planned and delivered to `-S` sessions that negotiated the
extension, for each mode; CPU time per frame (best of 5 rounds) and bytes
per delivered update, so the modes compare on identical frames.

Timing figures on a shared machine are noisy: read the ratios, with the
load average printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import msgpack

from engine.fanout.core import Fanout, Session
from engine.protocol.codec import make_pos
from engine.protocol.deflate import Deflater
from loadtest.client import CountingSink, connect, listener_class
from loadtest.ports import free_port
from loadtest.workload import WORKLOADS, key_sampler

MODES = ("off", "per_client", "group")
DEMO_TOPICS = ("prices.fx", "prices.crypto", "prices.equities")
_SERIES = re.compile(r"^(fanout_[a-z_]+)\{([^}]*)\} ([0-9.e+-]+)$", re.M)


def scrape(admin: str) -> dict[str, float]:
    """The counters this tool reads, summed over workers; the worker CPU apart."""
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in _SERIES.findall(text):
        if name in (
            "fanout_bytes_sent_total",
            "fanout_updates_delivered_total",
            "fanout_frames_sent_total",
        ):
            out[name] = out.get(name, 0.0) + float(value)
        elif name == "fanout_process_cpu_seconds_total" and 'process="worker' in labels:
            out["worker_cpu_s"] = out.get("worker_cpu_s", 0.0) + float(value)
        elif name == "fanout_process_resident_memory_bytes" and 'process="worker' in labels:
            out["worker_rss"] = out.get("worker_rss", 0.0) + float(value)
    return out


async def _clients(url: str, n: int) -> list[Any]:
    cls = listener_class()
    sink = CountingSink()
    clients = [cls(sink, DEMO_TOPICS, index=i) for i in range(n)]
    for c in clients:
        await connect(c, url, compression=True)
    deadline = time.monotonic() + 30
    while not all(c.ready for c in clients):
        if time.monotonic() > deadline:
            raise RuntimeError("clients not ready in 30 s")
        await asyncio.sleep(0.1)
    for c in clients:
        c.count()
    return clients


async def measure(mode: str, subscribers: int, duration_s: float) -> dict[str, Any]:
    port, admin_port = free_port(), free_port()
    run_dir = tempfile.mkdtemp(prefix="fdb-")
    env = dict(os.environ, FANOUT_FANOUT_COMPRESSION=mode, FANOUT_RUN_DIR=run_dir)
    env["FANOUT_LIMITS_UPGRADES_PER_S"] = "0"
    args = [sys.executable, "-m", "engine.cli", "serve", "--demo", "--workers", "1"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port)]
    args += ["--log-level", "warning"]
    proc = subprocess.Popen(args, env=env, cwd=run_dir, start_new_session=True)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(admin + "/readyz", timeout=1):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        rss0 = scrape(admin).get("worker_rss", 0.0)  # before any client
        clients = await _clients(f"ws://127.0.0.1:{port}/ws", subscribers)
        await asyncio.sleep(2)  # past the snaps
        m0, t0 = scrape(admin), time.monotonic()
        await asyncio.sleep(duration_s)
        m1, t1 = scrape(admin), time.monotonic()
        for c in clients:
            c.drop()
    finally:
        proc.send_signal(2)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    rss_per_conn = (m1.get("worker_rss", 0.0) - rss0) / subscribers / 1024
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
    updates = d.get("fanout_updates_delivered_total", 0.0)
    frames = d.get("fanout_frames_sent_total", 0.0)
    wire = d.get("fanout_bytes_sent_total", 0.0)
    cpu = d.get("worker_cpu_s", 0.0)
    return {
        "mode": mode,
        "subscribers": subscribers,
        "window_s": round(t1 - t0, 2),
        "updates_delivered": int(updates),
        "frames": int(frames),
        "bytes_per_update": round(wire / updates, 2) if updates else None,
        "bytes_per_frame": round(wire / frames, 1) if frames else None,
        "worker_cpu_s": round(cpu, 3),
        "worker_cpu_us_per_frame": round(cpu / frames * 1e6, 2) if frames else None,
        "worker_cpu_s_per_million_updates": round(cpu / updates * 1e6, 2) if updates else None,
        # the worker's RSS growth per client, at the window's end (KiB)
        "worker_rss_kib_per_connection": round(rss_per_conn, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


class _Wire:
    """A Writer that takes every frame and counts it and its bytes."""

    __slots__ = ("bytes", "frames")

    def __init__(self) -> None:
        self.frames = self.bytes = 0

    def write(self, frame: bytes, compressed: bool = False) -> bool:
        self.frames += 1
        self.bytes += len(frame)
        return True


def measure_core(
    mode: str, workload: str, subscribers: int, rate: float, values: str
) -> dict[str, Any]:
    """The core alone: one second of `rate` updates at 50 flushes/s, 5 rounds."""
    deflater = None if mode == "off" else Deflater(256)
    fo = Fanout("e", deflater=deflater, per_client=mode == "per_client")
    wires = []
    w = WORKLOADS[workload]
    for i, topics in enumerate(w.subscriptions(subscribers, 1)):
        wire = _Wire()
        s = Session(wire, i, deflate=True)
        for t in topics:
            fo.subscribe(s, t, None, 1)
        wires.append(wire)
    sample = key_sampler(w, 1)
    ticks = [sample(max(1, int(rate / 50))) for _ in range(50)]
    seq = 0

    def one_second() -> None:
        nonlocal seq
        for batch in ticks:
            for topic, key in batch:
                seq += 1
                if values == "stamps":
                    value = msgpack.packb([seq, 1_765_000_000_000_000_000 + seq * 997])
                else:
                    px = 100 + (seq * 7919 % 1000) / 100
                    value = msgpack.packb(
                        {"bid": round(px, 2), "ask": round(px + 0.02, 2), "ts": 1765e9 + seq}
                    )
                fo.apply(topic, key, make_pos(1_700_000_000_000 + seq, 0), value)
            plan, shared = fo.plan()
            for sh in shared:
                fo.deliver_shared(sh)
            for session, deliveries in plan.items():
                fo.deliver(session, deliveries)

    one_second()  # warm up
    best = float("inf")
    for _ in range(5):
        f0, b0, u0 = sum(x.frames for x in wires), sum(x.bytes for x in wires), fo.stats
        d0 = u0.updates_delivered
        t0 = time.process_time()
        one_second()
        cpu = time.process_time() - t0
        frames = sum(x.frames for x in wires) - f0
        nbytes = sum(x.bytes for x in wires) - b0
        updates = fo.stats.updates_delivered - d0
        best = min(best, cpu / max(1, frames) * 1e6)
    return {
        "mode": mode,
        "workload": workload,
        "values": values,
        "subscribers": subscribers,
        "frames_per_s": frames,
        "updates_per_s": updates,
        "bytes_per_update": round(nbytes / max(1, updates), 2),
        "bytes_per_frame": round(nbytes / max(1, frames), 1),
        "cpu_us_per_frame": round(best, 2),
        "zlib_pieces": deflater.pieces if deflater is not None else 0,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.deflatebench", description=__doc__)
    p.add_argument("-S", "--subscribers", type=int, default=300)
    p.add_argument("-D", "--duration", type=float, default=30.0)
    p.add_argument("--modes", default=",".join(MODES), help="of " + ", ".join(MODES))
    p.add_argument("--core", choices=sorted(WORKLOADS), help="the core alone, this workload")
    p.add_argument("-U", "--rate", type=float, default=10_000, help="--core: updates/s")
    p.add_argument("--values", choices=("quotes", "stamps"), default="quotes")
    a = p.parse_args(argv)
    if a.core:
        print("| mode | bytes per update | bytes per frame | core CPU us per frame | load |")
        print("| --- | --- | --- | --- | --- |")
        for mode in a.modes.split(","):
            r = measure_core(mode, a.core, a.subscribers, a.rate, a.values)
            print(
                f"| {mode} | {r['bytes_per_update']} | {r['bytes_per_frame']} |"
                f" {r['cpu_us_per_frame']} | {r['load_average'][0]} |",
                flush=True,
            )
        return 0
    rows = []
    for mode in a.modes.split(","):
        row = asyncio.run(measure(mode, a.subscribers, a.duration))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "| mode | bytes per update | bytes per frame | worker CPU us per frame"
        " | worker RSS KiB per connection | load |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['bytes_per_update']} | {r['bytes_per_frame']} |"
            f" {r['worker_cpu_us_per_frame']} | {r['worker_rss_kib_per_connection']} |"
            f" {r['load_average'][0]} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
