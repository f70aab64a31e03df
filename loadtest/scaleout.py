"""Scale-out drill: a third node joins two loaded ones; time automatic rebalancing.

    .venv/bin/python -m loadtest.scaleout                    # 3,000 clients
    .venv/bin/python -m loadtest.scaleout --clients 600 --sustain-s 2 --cooldown-s 4

It starts a redis-server on a free loopback port and two `fanout serve --bus
redis` nodes (a, b) with `rebalance.enabled`, behind `RoundRobin`, a TCP
proxy on loopback standing in for a Kubernetes Service (each new connection
goes to the next node in turn). `--clients` Python clients (`engine.client`:
they honour `bye` / `retry_ms` and resubscribe with `since`) connect through
it and subscribe to one topic; then node c starts and joins the rotation,
and updates are published every 0.2 s through node b.

What it reports (JSON file and a summary on stdout): the time from node c
joining to balanced (every node within `--balanced-within` of the fair share,
every client connected), each node's connections over time, the clients
moved (told `bye`) and the most times one client was told, and whether every
client holds the final value of every key. Exit codes: 0 balanced and
converged, 1 not, 3 could not set up. Not a test: nothing about timing is
asserted. Limits: every wait is bounded (`--timeout-s`); everything started
is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Final

import uvloop

from engine.client import Client, ReconnectPolicy
from engine.client.client import CONNECTED
from loadtest.children import raise_nofile
from loadtest.redis_server import RedisServer, redis_available
from loadtest.server import Server, SetupError, http_get

TOPIC: Final = "scaleout.t"
KEYS: Final = 20
BATCH: Final = 100  # clients connecting at once
SETUP_TIMEOUT_S: Final = 60.0


class RoundRobin:
    """A TCP proxy on 127.0.0.1: each new connection goes to the next of
    `backends` (ports) in turn; bytes are piped both ways until either side
    closes. Set `backends` at any time: new connections use the new list."""

    def __init__(self) -> None:
        self.backends: list[int] = []
        self.port = 0
        self._turn = itertools.count()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = self.backends[next(self._turn) % len(self.backends)]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        pipes = [
            asyncio.ensure_future(_pipe(reader, up_writer)),
            asyncio.ensure_future(_pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def node_env(a: argparse.Namespace, redis_url: str, name: str) -> dict[str, str]:
    return {
        "FANOUT_BUS_BACKEND": "redis",
        "FANOUT_BUS_REDIS_URL": redis_url,
        "FANOUT_SERVER_NODE": name,
        "FANOUT_REBALANCE_ENABLED": "true",
        "FANOUT_REBALANCE_TOLERANCE": str(a.tolerance),
        "FANOUT_REBALANCE_SUSTAIN_S": str(a.sustain_s),
        "FANOUT_REBALANCE_COOLDOWN_S": str(a.cooldown_s),
        "FANOUT_REBALANCE_MAX_SHED_PER_S": str(a.max_shed_per_s),
        "FANOUT_REBALANCE_ANNOUNCE_INTERVAL_S": str(a.announce_s),
        "FANOUT_WORKERS_RETRY_MIN_MS": str(a.retry_min_ms),
        "FANOUT_WORKERS_RETRY_MAX_MS": str(a.retry_max_ms),
    }


def refusals(nodes: list[Server]) -> list[dict[str, float]]:
    """Each node's upgrades refused so far, by reason (from /metrics)."""
    import urllib.request

    out = []
    for n in nodes:
        with urllib.request.urlopen(n.admin + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        by: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("fanout_upgrades_refused_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                by[reason] = by.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
        out.append(by)
    return out


def counts(nodes: list[Server]) -> list[int]:
    out = []
    for n in nodes:
        _, stats = http_get(n.admin, "/stats")
        out.append(int(stats["totals"]["connections"]) if stats else -1)
    return out


async def publish(node: Server, value: str) -> None:
    import urllib.request

    items = [{"topic": TOPIC, "key": f"k{k}", "data": f"{value}-{k}"} for k in range(KEYS)]
    req = urllib.request.Request(
        node.admin + "/publish",
        data=json.dumps({"items": items}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )

    def post() -> None:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()

    await asyncio.to_thread(post)


async def publish_rounds(node: Server) -> None:
    for i in itertools.count(1):
        with contextlib.suppress(OSError):
            await publish(node, str(i))
        await asyncio.sleep(0.2)


async def connect_all(url: str, n: int) -> list[Client]:
    policy = ReconnectPolicy(base_ms=250.0, max_ms=2000.0)
    clients: list[Client] = []
    for start in range(0, n, BATCH):
        batch = [Client(url, policy=policy) for _ in range(min(BATCH, n - start))]
        for c in batch:
            c.start()
        await asyncio.gather(*(c.wait_connected(SETUP_TIMEOUT_S) for c in batch))
        await asyncio.gather(*(c.subscribe([TOPIC]) for c in batch))
        clients += batch
    return clients


async def wait_counts(nodes: list[Server], want: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(counts, nodes) != want:
        if time.monotonic() > deadline:
            raise SetupError(f"nodes never held {want}")
        await asyncio.sleep(0.25)


async def run(a: argparse.Namespace, redis: RedisServer) -> dict[str, Any]:
    nodes = [Server(a.workers, 20, None, "info", extra_env=node_env(a, redis.url, n)) for n in "ab"]
    proxy = RoundRobin()
    clients: list[Client] = []
    try:
        for n in nodes:
            n.wait_ready(SETUP_TIMEOUT_S)
        await proxy.start()
        proxy.backends = [n.port for n in nodes]
        await publish(nodes[0], "0")
        clients = await connect_all(f"ws://127.0.0.1:{proxy.port}/ws", a.clients)
        half = a.clients // 2
        await wait_counts(nodes, [a.clients - half, half], 30.0)
        joiner = Server(a.workers, 20, None, "info", extra_env=node_env(a, redis.url, "c"))
        nodes.append(joiner)
        joiner.wait_ready(SETUP_TIMEOUT_S)
        proxy.backends = [n.port for n in nodes]
        return await measure(a, nodes, clients)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await proxy.close()
        for name, n in zip("abc", nodes, strict=False):
            n.stop()
            keep = os.path.join(a.keep_logs, f"node-{name}.log") if a.keep_logs else None
            n.cleanup_dir(keep)


async def measure(
    a: argparse.Namespace, nodes: list[Server], clients: list[Client]
) -> dict[str, Any]:
    """From node c joining: poll the counts until balanced, then check convergence."""
    joined = time.monotonic()
    fair = a.clients / len(nodes)
    publisher = asyncio.ensure_future(publish_rounds(nodes[1]))
    timeline: list[tuple[float, list[int]]] = []
    balanced_s = None
    while time.monotonic() - joined < a.timeout_s:
        now = await asyncio.to_thread(counts, nodes)
        timeline.append((round(time.monotonic() - joined, 2), now))
        if sum(now) == a.clients and all(abs(c - fair) <= fair * a.balanced_within for c in now):
            balanced_s = time.monotonic() - joined
            break
        await asyncio.sleep(0.5)
    away = Counter(
        f"{type(c.last_error).__name__}: {str(c.last_error)[:80]}"
        for c in clients
        if c.conn_state != CONNECTED
    )
    publisher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publisher
    await publish(nodes[2], "final")
    final = {f"k{k}": f"final-{k}" for k in range(KEYS)}
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and not all(dict(c.topic(TOPIC)) == final for c in clients):
        await asyncio.sleep(0.25)
    byes = [c.counters.byes for c in clients]
    return {
        "clients": a.clients,
        "balanced_s": None if balanced_s is None else round(balanced_s, 2),
        "final_counts": timeline[-1][1] if timeline else [],
        "clients_moved": sum(byes),
        "most_moves_of_one_client": max(byes, default=0),
        "connect_failures": sum(c.counters.connect_failures for c in clients),
        "upgrades_refused": await asyncio.to_thread(refusals, nodes),
        "away_at_end_by_last_error": dict(away.most_common(5)),
        "converged": sum(dict(c.topic(TOPIC)) == final for c in clients),
        "timeline": timeline,
        "settings": {k: v for k, v in vars(a).items() if k != "report"},
        "loadavg_at_end": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1, help="workers per node")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--sustain-s", type=float, default=5.0)
    p.add_argument("--cooldown-s", type=float, default=5.0)
    p.add_argument("--max-shed-per-s", type=float, default=200.0)
    p.add_argument("--announce-s", type=float, default=0.5)
    p.add_argument("--retry-min-ms", type=int, default=100)
    p.add_argument("--retry-max-ms", type=int, default=1000)
    p.add_argument("--balanced-within", type=float, default=0.1, help="of the fair share")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--report", default="scaleout.json")
    p.add_argument("--keep-logs", default="", help="a directory for the nodes' logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not redis_available():
        print("scaleout: redis-server is needed", file=sys.stderr)
        return 3
    raise_nofile(a.clients * 4 + 1000)
    redis = RedisServer(tied=True).start()
    try:
        report = uvloop.run(run(a, redis))
    except SetupError as exc:
        print(f"scaleout: could not set up: {exc}", file=sys.stderr)
        return 3
    finally:
        redis.close()
    with open(a.report, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    print(
        f"{a.clients} clients, node c joined: balanced in {report['balanced_s']} s"
        f" {report['final_counts']}, {report['clients_moved']} clients moved"
        f" (at most {report['most_moves_of_one_client']} times one),"
        f" {report['converged']}/{a.clients} hold every final value;"
        f" load average {report['loadavg_at_end'][0]:.2f} (report: {a.report})"
    )
    ok = report["balanced_s"] is not None and report["converged"] == a.clients
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
