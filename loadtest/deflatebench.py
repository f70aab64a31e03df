"""permessage-deflate on the demo feed: bytes on the wire per delivered update
and worker CPU per frame, compression off, per client, and once per group
(issue 14; docs/benchmarks.md, "Compression").

    python -m loadtest.deflatebench -S 300 -D 30          # every mode, one after the other

For each mode a fresh `fanout serve --demo --workers 1` runs with
`FANOUT_FANOUT_COMPRESSION=<mode>`; `-S` clients (loadtest/client.py, which
offer the extension) subscribe to the demo's three topics, count frames
without decoding once they hold their snaps, and over `-D` seconds the
engine's own counters are read from /metrics at both ends of the window:
`fanout_bytes_sent_total` (what was handed to the sockets: compressed bytes
when compressed), `fanout_updates_delivered_total`, `fanout_frames_sent_total`
and the worker's `fanout_process_cpu_seconds_total`. The market workload
goes through `fanout bench` instead (the same environment variables).
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

from loadtest.client import CountingSink, connect, listener_class
from loadtest.ports import free_port

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
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.deflatebench", description=__doc__)
    p.add_argument("-S", "--subscribers", type=int, default=300)
    p.add_argument("-D", "--duration", type=float, default=30.0)
    p.add_argument("--modes", default=",".join(MODES), help="of " + ", ".join(MODES))
    a = p.parse_args(argv)
    rows = []
    for mode in a.modes.split(","):
        row = asyncio.run(measure(mode, a.subscribers, a.duration))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| mode | bytes per update | bytes per frame | worker CPU us per frame | load |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['bytes_per_update']} | {r['bytes_per_frame']} |"
            f" {r['worker_cpu_us_per_frame']} | {r['load_average'][0]} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
