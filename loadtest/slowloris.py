"""The slowloris measurement: TCP connections that never finish the upgrade.

    .venv/bin/python -m loadtest.slowloris                  # 5,000 stalled sockets, 2 workers
    .venv/bin/python -m loadtest.slowloris --connections 300 --honest 5

Starts `fanout serve --workers 2` with `limits.handshake_timeout_s` =
`--handshake-timeout` (2 s by default, to keep the run short; the default is 5),
opens `--connections` TCP connections that send part of an upgrade request and
then nothing, and meanwhile connects `--honest` normal clients one after the
other, each subscribing to a topic and waiting for its snapshot. Reports how
many stalled sockets the server dropped (EOF or reset) and when, relative to
the handshake timeout, and how many honest clients got in (and how long their
connect-to-snapshot took). Exit code 0 when the run completed, 1 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from loadtest.flood import free_port, percentile, start_server, wait_ready


async def _stall(port: int, partial: bytes, drops: list[float], t0: list[float]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        drops.append(-1.0)  # could not even connect (backlog full)
        return
    writer.write(partial)
    try:
        data = await asyncio.wait_for(reader.read(100), 60)
        drops.append(time.monotonic() - t0[0] if not data else -2.0)
    except (ConnectionError, OSError):
        drops.append(time.monotonic() - t0[0])
    except TimeoutError:
        drops.append(-3.0)  # still open after 60 s
    finally:
        writer.close()


async def _honest(url: str, n: int, until: float) -> dict[str, Any]:
    from engine.client.raw import connect

    times: list[float] = []
    failures = 0
    for _ in range(n):
        start = time.monotonic()
        try:
            conn = await connect(url, timeout=10)
            await conn.recv(10)  # hello
            conn.subscribe(["loris.t"], id=1)
            await conn.recv(10)  # ack
            await conn.recv(10)  # snap
            times.append((time.monotonic() - start) * 1000)
            conn.close()
        except Exception:  # any failure to get served counts
            failures += 1
        await asyncio.sleep(max(0.0, (until - time.monotonic()) / max(1, n)))
    times.sort()
    return {
        "attempted": n,
        "served": len(times),
        "failures": failures,
        "connect_to_snap_ms": {"p50": percentile(times, 0.5), "max": percentile(times, 1.0)},
    }


async def _main(args: argparse.Namespace, port: int) -> dict[str, Any]:
    drops: list[float] = []
    t0 = [time.monotonic()]
    partials = [b"", b"GET /ws HTTP/1.1\r\n", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: webs"]
    stalls = []
    for i in range(args.connections):
        stalls.append(asyncio.create_task(_stall(port, partials[i % 3], drops, t0)))
        if i % 200 == 199:
            await asyncio.sleep(0.01)
    opened_s = time.monotonic() - t0[0]
    honest = await _honest(
        f"ws://127.0.0.1:{port}/ws", args.honest, time.monotonic() + args.handshake_timeout
    )
    await asyncio.gather(*stalls)
    dropped = sorted(d for d in drops if d >= 0)
    return {
        "stalled": args.connections,
        "opened_in_s": round(opened_s, 2),
        "dropped_by_server": len(dropped),
        "not_connected": drops.count(-1.0),
        "server_sent_data": drops.count(-2.0),
        "still_open_after_60s": drops.count(-3.0),
        "dropped_after_s": {
            "min": percentile(dropped, 0.0),
            "p50": percentile(dropped, 0.5),
            "max": percentile(dropped, 1.0),
        },
        "honest": honest,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--honest", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--handshake-timeout", type=float, default=2.0)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--server-log", help="the server's output goes here")
    args = ap.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import signal
    import subprocess
    import tempfile

    import uvloop

    port, admin_port = free_port(), free_port()
    run_dir = tempfile.mkdtemp(prefix="fanout-loris-")
    ns = argparse.Namespace(
        rate_limit=50.0, abuse_window=10.0, workers=args.workers, server_log=args.server_log
    )
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    extra = {"FANOUT_LIMITS_HANDSHAKE_TIMEOUT_S": str(args.handshake_timeout)}
    proc = start_server(ns, port, admin_port, run_dir, log, extra)
    try:
        wait_ready(admin_port, proc)
        result = uvloop.run(_main(args, port))
        result["handshake_timeout_s"] = args.handshake_timeout
        result["command"] = " ".join(["python", "-m", "loadtest.slowloris", *sys.argv[1:]])
        return result
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if log is not subprocess.DEVNULL:
            log.close()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
