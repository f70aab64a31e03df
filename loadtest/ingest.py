"""Ingest: published updates/s and CPU-s per million published updates of each
server process, through the WebSocket `pub` batch channel and through
`POST /publish`, with the same batch size (issue 13, item 3).

    python -m loadtest.ingest --seconds 10 --batch 100
    python -m loadtest.ingest --mode ws --batch 500 --in-flight 16 --json out.json

Starts its own `fanout serve` (local bus, `--workers` workers, anonymous
publishing on, the per-connection message rate raised so that the rate limit
is not what is measured), opens `--subscribers` subscribers of every topic,
then, for each mode, publishes for `--seconds` as fast as the publishers get
acks: `--publishers` publishers (engine.client.Publisher), each with
`--in-flight` batches of `--batch` updates outstanding (over WebSocket: one
connection per publisher, batches in flight on it; over HTTP: one keep-alive
connection per batch in flight, since HTTP/1.1 answers in order). Keys cycle
over `--topics` x `--keys`, values are small maps.

Reported per mode: published updates/s, batches/s, CPU-s per million
published updates of each server process (from /proc: admin, hub, workers,
supervisor) and of this generator (publishers and subscribers together), the
machine's busy share, and whether every subscriber converged (a final marker
on every topic reached each of them). Bounded in time: at most
`--seconds` per mode plus setup (the server is stopped on exit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from engine.client.publisher import Publisher
from engine.client.raw import RawConnection, connect
from loadtest.accounting import cpu_seconds, machine_busy_seconds, used
from loadtest.server import Server

MAX_SECONDS = 300


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.ingest",
        description="Published updates/s and CPU-s per million: WS pub batches vs POST /publish.",
    )
    p.add_argument("--mode", choices=("ws", "http", "both"), default="both")
    p.add_argument("--seconds", type=float, default=10.0, help="window per mode (max 300)")
    p.add_argument("--batch", type=int, default=100, help="updates per batch (both modes)")
    p.add_argument("--in-flight", type=int, default=8, help="batches outstanding per publisher")
    p.add_argument("--publishers", type=int, default=2)
    p.add_argument("--subscribers", type=int, default=4, help="subscribers of every topic")
    p.add_argument("--topics", type=int, default=10)
    p.add_argument("--keys", type=int, default=1000, help="keys per topic")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flush-ms", type=int, default=20)
    p.add_argument("--json", help="write the report there too")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if min(args.batch, args.in_flight, args.publishers, args.topics, args.keys) < 1:
        p.error("--batch, --in-flight, --publishers, --topics and --keys must be at least 1")
    return args


def batches(args: argparse.Namespace, salt: int) -> list[list[tuple[str, str, Any]]]:
    """Pre-built batches covering every key once (the generator reuses them)."""
    keys = [(f"ingest.t{t}", f"k{k}") for t in range(args.topics) for k in range(args.keys)]
    out = []
    for start in range(0, len(keys), args.batch):
        chunk = keys[start : start + args.batch]
        while len(chunk) < args.batch:
            chunk = chunk + keys[: args.batch - len(chunk)]
        out.append([(t, k, {"px": salt + i, "q": 100}) for i, (t, k) in enumerate(chunk)])
    return out


async def subscriber(url: str, topics: list[str]) -> RawConnection:
    conn = await connect(url, max_queue=10_000_000)
    await conn.recv_op("hello")
    conn.subscribe(topics, id=1)
    for _ in range(len(topics) + 1):
        await conn.recv()
    return conn


async def converged(
    subs: list[RawConnection], topics: list[str], marker: str, timeout_s: float
) -> int:
    """How many subscribers saw `marker` as key `_end` on every topic in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    done = 0
    for conn in subs:
        missing = set(topics)
        while missing and loop.time() < deadline:
            try:
                msg = await conn.recv(max(0.01, deadline - loop.time()))
            except (TimeoutError, Exception):
                break
            if msg.get("op") == "upd" and msg.get("items", {}).get("_end") == marker:
                missing.discard(msg["topic"])
        done += not missing
    return done


async def publish_loop(
    pub: Publisher,
    work: list[list[tuple[str, str, Any]]],
    start: int,
    stop_at: float,
    counts: list[int],
) -> None:
    loop = asyncio.get_running_loop()
    i = start
    while loop.time() < stop_at:
        positions = await pub.publish_many(work[i % len(work)])
        counts[0] += len(positions)
        counts[1] += 1
        i += 1


async def run_mode(
    mode: str, args: argparse.Namespace, server: Server, subs: list[RawConnection]
) -> dict[str, Any]:
    topics = [f"ingest.t{t}" for t in range(args.topics)]
    work = batches(args, salt=1 if mode == "ws" else 2)
    if mode == "ws":
        pubs = [
            Publisher(ws_url=server.url, max_in_flight=args.in_flight, max_message_bytes=16 << 20)
            for _ in range(args.publishers)
        ]
        lanes = [(p, j) for p in pubs for j in range(args.in_flight)]
    else:
        pubs = [Publisher(server.admin) for _ in range(args.publishers * args.in_flight)]
        lanes = [(p, 0) for p in pubs]
    # warm up: every connection opened, one batch each
    await asyncio.gather(*(p.publish_many(work[0]) for p, _ in lanes))
    for conn in subs:
        conn.take_nowait()
    names = server.board_pids()
    pids = [*names.values(), os.getpid()]
    counts = [0, 0]
    cpu0, busy0, t0 = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
    stop_at = asyncio.get_running_loop().time() + args.seconds
    await asyncio.gather(
        *(publish_loop(p, work, n * 7, stop_at, counts) for n, (p, _) in enumerate(lanes))
    )
    cpu1, busy1, elapsed = cpu_seconds(pids), machine_busy_seconds(), time.monotonic() - t0
    marker = f"{mode}-{time.time()}"
    await pubs[0].publish_many([(t, "_end", marker) for t in topics])
    ok = await converged(subs, topics, marker, 30.0)
    for p in pubs:
        await p.close()
    per_million = {
        name: round(used(cpu0, cpu1, pid) / counts[0] * 1e6, 2)
        for name, pid in sorted(names.items())
        if pid in cpu0 and pid in cpu1
    }
    generator = used(cpu0, cpu1, os.getpid())
    server_cpu = sum(used(cpu0, cpu1, pid) for pid in names.values() if pid in cpu0 and pid in cpu1)
    return {
        "mode": mode,
        "batch": args.batch,
        "seconds": round(elapsed, 2),
        "updates_per_s": round(counts[0] / elapsed),
        "batches_per_s": round(counts[1] / elapsed),
        "cpu_s_per_million_updates": per_million,
        "server_cpu_s_per_million": round(server_cpu / counts[0] * 1e6, 2),
        "server_cores": round(server_cpu / elapsed, 2),
        "generator_cpu_s_per_million": round(generator / counts[0] * 1e6, 2),
        "generator_cores": round(generator / elapsed, 2),
        "generator_bound": generator > server_cpu / 2,
        "machine_busy_cores": round((busy1 - busy0) / elapsed, 2),
        "machine_cores": os.cpu_count(),
        "subscribers_converged": f"{ok}/{len(subs)}",
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {
        "FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "true",
        "FANOUT_LIMITS_MESSAGES_PER_S": "1000000",
        "FANOUT_LIMITS_MAX_MESSAGE_BYTES": str(16 << 20),
        "FANOUT_LIMITS_MAX_PUBLISH_ITEMS": str(max(1000, args.batch)),
    }
    server = Server(args.workers, args.flush_ms, None, "warning", extra_env=env)
    try:
        server.wait_ready(30)
        topics = [f"ingest.t{t}" for t in range(args.topics)]
        subs = [await subscriber(server.url, topics) for _ in range(args.subscribers)]
        modes = ("ws", "http") if args.mode == "both" else (args.mode,)
        reports = [await run_mode(m, args, server, subs) for m in modes]
        for conn in subs:
            conn.close()
        for r in reports:
            r["command"] = "python -m loadtest.ingest " + " ".join(sys.argv[1:])
            r["server"] = server.command()
        return reports
    finally:
        server.stop()
        server.cleanup_dir(None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reports = asyncio.run(main_async(args))
    text = json.dumps(reports, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
