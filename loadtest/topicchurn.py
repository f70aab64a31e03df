"""Topic churn (issue 11, finding 2), measured: the worker's RSS and topic count
while one anonymous client subscribes to fresh topic names and leaves them.

    .venv/bin/python -m loadtest.topicchurn                  # 50,000 names, one worker
    .venv/bin/python -m loadtest.topicchurn --names 150000 --json out.json

Starts `fanout serve --workers 1` (local bus, `fanout.topic_grace_s` = --grace),
warms it with 2,000 names, waits the grace out, then `sub`s and `unsub`s
--names fresh names in batches of 100 from one connection. Prints RSS before,
at its peak during the churn and after the grace, the growth per name, and
the worker's topic count after (it holds only what is subscribed: 0).
Exit code 0 when the run completed, 1 on error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import psutil

from engine.client.raw import connect
from loadtest.server import Server, SetupError, http_get

BATCH = 100


async def churn(url: str, names: int, tag: str) -> None:
    """`sub` then `unsub` `names` fresh topics, BATCH at a time, each answered."""
    conn = await connect(url)
    try:
        await conn.recv()  # hello
        rid = 0
        for n in range(0, names, BATCH):
            topics = [f"churn.{tag}.{n + i}" for i in range(min(BATCH, names - n))]
            rid += 1
            conn.send({"op": "sub", "topics": topics, "id": rid})
            await conn.recv_op("ack")
            for _ in topics:
                await conn.recv_op("snap")
            rid += 1
            conn.send({"op": "unsub", "topics": topics, "id": rid})
            await conn.recv_op("ack")
    finally:
        conn.close()


def _worker(server: Server) -> dict[str, Any]:
    status, stats = http_get(server.admin, "/stats")
    if status != 200:
        raise SetupError(f"/stats answered {status}")
    (worker,) = stats["workers"]
    return dict(worker)


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(
        workers=1,
        flush_ms=20,
        config=None,
        log_level="warning",
        extra_env={
            "FANOUT_LIMITS_MESSAGES_PER_S": "100000",  # the churn, not the rate limit
            "FANOUT_FANOUT_TOPIC_GRACE_S": str(args.grace),
        },
    )
    try:
        server.wait_ready(30)
        proc = psutil.Process(_worker(server)["pid"])
        asyncio.run(churn(server.url, 2_000, "warm"))  # code paths, allocator pools
        time.sleep(args.grace + 3)  # the grace, then the one-second sweep
        rss_before = proc.memory_info().rss
        peak = [rss_before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], proc.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        asyncio.run(churn(server.url, args.names, str(os.getpid())))
        churn_s = time.monotonic() - t0
        done.set()
        sampler.join()
        time.sleep(args.grace + 3)
        rss_after = proc.memory_info().rss
        worker = _worker(server)
        return {
            "names": args.names,
            "grace_s": args.grace,
            "churn_s": round(churn_s, 1),
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_peak_mib": round(peak[0] / 2**20, 1),
            "rss_after_mib": round(rss_after / 2**20, 1),
            "growth_bytes_per_name": round((rss_after - rss_before) / args.names),
            "topics_after": worker.get("topics"),
            "subscriptions_after": worker.get("subscriptions"),
            "command": server.command(),
        }
    finally:
        server.stop()
        server.cleanup_dir(None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.topicchurn", description=__doc__)
    p.add_argument("--names", type=int, default=50_000, help="fresh topic names (50000)")
    p.add_argument("--grace", type=float, default=1.0, help="fanout.topic_grace_s (1)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.names < 1:
        p.error("--names must be at least 1")
    try:
        result = run(args)
    except (OSError, RuntimeError, SetupError) as exc:
        print(f"topicchurn: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
