"""The multi-node drill: drain one of three nodes under load and time the failover.

    .venv/bin/python -m loadtest.drill          # 300 clients, 200 updates/s, 30 s, SIGTERM at 10 s
    .venv/bin/python -m loadtest.drill --clients 9 --duration 4 --drain-at 1.5 --drain-s 0.5

It starts a redis-server on a free loopback port and three `fanout serve`
nodes (a, b, c) on it (`bus.backend = "redis"`), opens `--clients` Python
clients (`engine.client`) spread evenly over the nodes, all subscribed to one
topic of `--keys` keys, and publishes `--rate` updates/s through
`POST /publish` (batches every `--batch-ms`, round robin over the nodes'
admin ports; a node that fails a publish is left and the batch sent to the
next). At `--drain-at` seconds it sends SIGTERM to node a's supervisor (the
graceful drain: every client gets `bye` with a jittered `retry_ms`, closes
are paced over `workers.drain_s`, close 1001). Publishing goes on until
`--duration`; then every client must hold the last accepted value of every
key.

Failover: the Python client takes one URL. Here each client has a list (its
own node first, then the other two; half of node a's clients list b first,
half c) and moves to the next one whenever it is waiting to reconnect (it
sets `client.url` from its state callback, before the client's next
attempt). In a deployment a load balancer or Service does that.

What it reports (JSON file and a summary on stdout), for node a's clients:

- from each client's disconnect (`bye` then close, which arrive together) to
  its first `snap` or `upd` after it reconnected elsewhere ("served again"):
  p50 / p99 / max; the same counted from the SIGTERM; and the part beyond
  the `retry_ms` the server asked the client to wait (connect, `hello`,
  `sub` with `since`, the `snap`);
- the close codes seen, the nodes they landed on;
- node a's exit code and time from SIGTERM to exit;
- clients of nodes b and c that lost their connection (expected none);
- convergence: how many clients hold the final value of every key (the last
  value each key was given by an accepted publish), waited for up to `--settle`.

Limits: every wait is bounded (setup 60 s, node a's exit
`workers.graceful_timeout_s` + 15 s, convergence `--settle`); everything
started is stopped on success, error, Ctrl-C or SIGTERM. All clients run on
one event loop in this process; its worst scheduling delay is reported
(`loop_lag_max_ms`), since a saturated loop would inflate the times.
Exit codes: 0 every client served again and converged and node a exited 0;
1 otherwise; 3 could not set up; 130 interrupted. Not a test: nothing about
timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import uvloop

from engine.client import Publisher, PublishError
from engine.client.client import CONNECTED, WAITING, Client
from engine.client.state import Change
from engine.config import WorkersConfig
from loadtest.children import raise_nofile
from loadtest.redis_server import RedisServer, redis_available
from loadtest.server import Server, SetupError

NODES: Final = ("a", "b", "c")
DRAINED: Final = "a"
SETUP_TIMEOUT_S: Final = 60.0
EXIT_MARGIN_S: Final = 15.0
PUBLISH_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    clients: int
    keys: int
    rate: float
    batch_ms: float
    duration_s: float
    drain_at_s: float
    settle_s: float
    workers: int
    flush_ms: int
    drain_s: float
    retry_min_ms: int
    retry_max_ms: int
    graceful_timeout_s: float
    topic: str
    report: str
    quiet: bool
    server_log_level: str
    keep_logs: bool


class Tracked:
    """One client, its list of node URLs and what happened to it (monotonic seconds)."""

    def __init__(self, home: str, urls: list[tuple[str, str]], topic: str) -> None:
        self.home = home
        self.urls = urls  # (node, ws url), own node first
        self.at = 0
        self.topic = topic
        self.client = Client(urls[0][1], connect_timeout_s=5.0)
        self.prev_state = self.client.conn_state
        self.closed_at: float | None = None  # the first disconnect
        self.close_code: int | None = None
        self.retry_ms: float | None = None  # the wait before the next attempt
        self.served_at: float | None = None  # the first snap/upd after it
        self.served_on: str | None = None
        self.disconnects = 0
        self.converged = False  # set by check(), after publishing stopped
        self.keys_differing = 0
        self.client.on_state(self.on_state)
        self.client.on_change(self.on_change)

    @property
    def node(self) -> str:
        return self.urls[self.at][0]

    def on_state(self, new: str) -> None:
        if new == WAITING:
            c = self.client.counters
            if self.prev_state == CONNECTED:
                self.disconnects += 1
                if self.closed_at is None:
                    self.closed_at = time.monotonic()
                    self.close_code = c.last_close_code
                    self.retry_ms = c.retry_delays_ms[-1] if c.retry_delays_ms else None
            # lost the connection, or an attempt failed: the next node for the next attempt
            self.at = (self.at + 1) % len(self.urls)
            self.client.url = self.urls[self.at][1]
        self.prev_state = new

    def on_change(self, change: Change) -> None:
        if self.closed_at is not None and self.served_at is None:
            self.served_at = time.monotonic()
            self.served_on = self.node

    def check(self, expected: dict[str, int]) -> bool:
        """Whether it is connected and holds every key's expected value (and no other key)."""
        view = dict(self.client.topic(self.topic))
        self.keys_differing = sum(view.get(k) != v for k, v in expected.items()) + sum(
            k not in expected for k in view
        )
        self.converged = self.client.conn_state == CONNECTED and self.keys_differing == 0
        return self.converged


def quantiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    """min, p50, p99, max (nearest rank) in ms, rounded to 0.1 ms."""
    if not values:
        return {"n": 0, "min": None, "p50": None, "p99": None, "max": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return v[min(len(v) - 1, max(0, int(q * len(v) + 0.999999) - 1))]

    return {
        "n": len(v),
        "min": round(v[0], 1),
        "p50": round(rank(0.50), 1),
        "p99": round(rank(0.99), 1),
        "max": round(v[-1], 1),
    }


class Drill:
    def __init__(self, s: Settings, argv: Sequence[str]) -> None:
        self.s = s
        self.argv = list(argv)
        self.redis: RedisServer | None = None
        self.nodes: dict[str, Server] = {}
        self.tracked: list[Tracked] = []
        self.expected: dict[str, int] = {}
        self.published = 0
        self.batches = 0
        self.failovers = 0
        self.publish_errors: Counter[str] = Counter()
        self.down: set[str] = set()
        self.t0 = 0.0
        self.sigterm_at: float | None = None
        self.exit_at: float | None = None
        self.exit_code: int | None = None
        self.loop_lag_max_s = 0.0
        self.publish_s = 0.0
        self.converge_s: float | None = None

    # -- setup and teardown -----------------------------------------------------------

    def start(self) -> None:
        if not redis_available():
            raise SetupError("redis-server and redis-cli are needed (apt-get install redis-server)")
        self.redis = RedisServer(tied=True).start()
        env = {
            "FANOUT_BUS_BACKEND": "redis",
            "FANOUT_BUS_REDIS_URL": self.redis.url,
            "FANOUT_WORKERS_DRAIN_S": str(self.s.drain_s),
            "FANOUT_WORKERS_RETRY_MIN_MS": str(self.s.retry_min_ms),
            "FANOUT_WORKERS_RETRY_MAX_MS": str(self.s.retry_max_ms),
            "FANOUT_WORKERS_GRACEFUL_TIMEOUT_S": str(self.s.graceful_timeout_s),
        }
        for name in NODES:
            self.nodes[name] = Server(
                self.s.workers,
                self.s.flush_ms,
                None,
                self.s.server_log_level,
                extra_env={**env, "FANOUT_SERVER_NODE": name},
            )
        for node in self.nodes.values():
            node.wait_ready(SETUP_TIMEOUT_S)

    def cleanup(self, keep_logs: bool) -> None:
        for name, node in self.nodes.items():
            node.stop()
            keep = os.path.splitext(self.s.report)[0] + f"-node-{name}.log" if keep_logs else None
            node.cleanup_dir(keep)
        if self.redis is not None:
            self.redis.close()

    # -- the drill ---------------------------------------------------------------------

    async def drill(self) -> None:
        s = self.s
        urls = {name: node.url for name, node in self.nodes.items()}
        for i in range(s.clients):
            home = NODES[i % len(NODES)]
            others = [n for n in NODES if n != home]
            if (i // len(NODES)) % 2:
                others.reverse()
            self.tracked.append(Tracked(home, [(n, urls[n]) for n in (home, *others)], s.topic))
        loop = asyncio.get_running_loop()
        lag_task = loop.create_task(self._watch_loop_lag())
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                for t in self.tracked:
                    t.client.start()
                await asyncio.gather(*(t.client.subscribe([s.topic]) for t in self.tracked))
            self._log(f"{s.clients} clients subscribed ({s.clients // 3} or so per node)")
            self.t0 = time.monotonic()
            publisher = loop.create_task(self._publish(self.t0 + s.duration_s))
            progress = loop.create_task(self._progress())
            tasks = [publisher, progress]
            try:
                await asyncio.sleep(s.drain_at_s)
                self.sigterm_at = time.monotonic()
                os.kill(self.nodes[DRAINED].proc.pid, signal.SIGTERM)
                exiting = loop.create_task(self._wait_exit())
                tasks.append(exiting)
                self._log(f"[{self.sigterm_at - self.t0:5.1f}s] SIGTERM to node {DRAINED}")
                await publisher
                await exiting
                await self._converge()
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            lag_task.cancel()
            await asyncio.gather(*(t.client.close() for t in self.tracked))

    async def _publish(self, stop_at: float) -> None:
        """`rate` updates/s in batches every `batch_ms`, key after key, value = a sequence
        number; `expected` keeps the last accepted value of each key."""
        s = self.s
        pubs = {
            n: Publisher(node.admin, retries=0, timeout_s=PUBLISH_TIMEOUT_S)
            for n, node in self.nodes.items()
        }
        batch_s = s.batch_ms / 1000.0
        owed = 0.0
        seq = 0
        turn = 0
        started = next_t = time.monotonic()
        try:
            while time.monotonic() < stop_at:
                owed += s.rate * batch_s
                n = int(owed)
                owed -= n
                if n:
                    items = [(s.topic, f"k{(seq + j) % s.keys}", seq + j) for j in range(n)]
                    turn = await self._send(pubs, items, turn)
                    for _, key, value in items:
                        self.expected[key] = value
                    seq += n
                    self.published += n
                    self.batches += 1
                next_t += batch_s
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        finally:
            self.publish_s = time.monotonic() - started
            await asyncio.gather(*(p.close() for p in pubs.values()))

    async def _send(
        self, pubs: dict[str, Publisher], items: list[tuple[str, str, int]], turn: int
    ) -> int:
        for _ in range(len(NODES)):
            name = NODES[turn % len(NODES)]
            turn += 1
            if name in self.down:
                continue
            try:
                await pubs[name].publish_many(items)
                return turn
            except (PublishError, OSError, TimeoutError) as exc:
                # a publish whose answer was lost may have been applied: sending the
                # same values again on the next node is harmless for a state topic
                self.down.add(name)
                self.failovers += 1
                self.publish_errors[f"{name}: {str(exc)[:80]}"] += 1
        raise RuntimeError(f"no node accepted a publish: {dict(self.publish_errors)}")

    async def _wait_exit(self) -> None:
        """Poll node a's supervisor from the SIGTERM on (10 ms resolution, bounded)."""
        proc = self.nodes[DRAINED].proc
        assert self.sigterm_at is not None
        deadline = self.sigterm_at + self.s.graceful_timeout_s + EXIT_MARGIN_S
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if proc.returncode is not None:
            self.exit_at = time.monotonic()
            self.exit_code = proc.returncode

    async def _converge(self) -> None:
        """Wait (up to --settle) until every client holds every key's final value."""
        start = time.monotonic()
        while time.monotonic() - start < self.s.settle_s:
            if all([t.check(self.expected) for t in self.tracked]):
                break
            await asyncio.sleep(0.1)
        self.converge_s = time.monotonic() - start

    async def _watch_loop_lag(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.05)
            self.loop_lag_max_s = max(self.loop_lag_max_s, time.monotonic() - t - 0.05)

    async def _progress(self) -> None:
        last_t, last_pub = self.t0, 0
        drained = [t for t in self.tracked if t.home == DRAINED]
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            connected = sum(t.client.conn_state == CONNECTED for t in self.tracked)
            closed = sum(t.closed_at is not None for t in drained)
            served = sum(t.served_at is not None for t in drained)
            if self.sigterm_at is None:
                state = "up"
            elif self.exit_code is None:
                state = "draining"
            else:
                state = f"exited {self.exit_code}"
            self._log(
                f"[{now - self.t0:5.1f}s] published {(self.published - last_pub) / (now - last_t):6.0f}/s"
                f"  connected {connected}/{len(self.tracked)}"
                f"  node {DRAINED}'s clients closed {closed}, served again {served}/{len(drained)}"
                f"  node {DRAINED} {state}"
            )
            last_t, last_pub = now, self.published

    def _log(self, line: str) -> None:
        if not self.s.quiet:
            print(line, file=sys.stderr, flush=True)

    # -- the report ---------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        s = self.s
        drained = [t for t in self.tracked if t.home == DRAINED]
        others = [t for t in self.tracked if t.home != DRAINED]
        sigterm = self.sigterm_at if self.sigterm_at is not None else float("nan")
        served = [t for t in drained if t.served_at is not None and t.closed_at is not None]
        after_close = [1000 * (t.served_at - t.closed_at) for t in served]  # type: ignore[operator]
        after_term = [1000 * (t.served_at - sigterm) for t in served]  # type: ignore[operator]
        beyond = [
            1000 * (t.served_at - t.closed_at) - t.retry_ms  # type: ignore[operator]
            for t in served
            if t.retry_ms is not None
        ]
        closed_after = [1000 * (t.closed_at - sigterm) for t in drained if t.closed_at is not None]
        converged = [t for t in self.tracked if t.converged]
        misses = [
            {"home": t.home, "node": t.node, "keys_differing": t.keys_differing}
            for t in self.tracked
            if not t.converged
        ][:10]
        ok = (
            len(converged) == len(self.tracked)
            and len(served) == len(drained)
            and self.exit_code == 0
        )
        return {
            "tool": "loadtest.drill",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join([sys.executable, "-m", "loadtest.drill", *self.argv]),
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
            "settings": asdict(s),
            "nodes": {
                n: {
                    "ws": node.url,
                    "admin": node.admin,
                    "pid": node.proc.pid,
                    "command": node.command(),
                }
                for n, node in self.nodes.items()
            },
            "drained_node": {
                "name": DRAINED,
                "sigterm_at_s": round(sigterm - self.t0, 3),
                "exit_code": self.exit_code,
                "exit_after_sigterm_s": None
                if self.exit_at is None
                else round(self.exit_at - sigterm, 3),
            },
            "drained_clients": {
                "clients": len(drained),
                "closed": sum(t.closed_at is not None for t in drained),
                "served_again": len(served),
                "close_codes": dict(
                    Counter(str(t.close_code) for t in drained if t.closed_at is not None)
                ),
                "byes": sum(t.client.counters.byes for t in drained),
                # resubscribed with `since` on another node: only what they missed
                "partial_snaps": sum(t.client.counters.snaps_partial for t in drained),
                "landed_on": dict(Counter(t.served_on for t in served if t.served_on)),
                "closed_after_sigterm_ms": quantiles_ms(closed_after),
                "served_after_close_ms": quantiles_ms(after_close),
                "served_after_sigterm_ms": quantiles_ms(after_term),
                "served_beyond_retry_ms": quantiles_ms(beyond),
                "retry_ms": quantiles_ms([t.retry_ms for t in served if t.retry_ms is not None]),
            },
            "other_clients": {
                "clients": len(others),
                "disconnected": sum(t.disconnects > 0 for t in others),
            },
            "publish": {
                "updates": self.published,
                "batches": self.batches,
                "updates_per_s": round(self.published / max(self.publish_s, 1e-9), 1),
                "failovers": self.failovers,
                "errors": dict(self.publish_errors),
            },
            "convergence": {
                "clients": len(self.tracked),
                "converged": len(converged),
                "keys": len(self.expected),
                "wait_s": None if self.converge_s is None else round(self.converge_s, 3),
                "not_converged": misses,
            },
            "loop_lag_max_ms": round(self.loop_lag_max_s * 1000, 1),
            "all_converged": len(converged) == len(self.tracked),
            "ok": ok,
        }


def summary(r: dict[str, Any]) -> str:
    d, c, node = r["drained_clients"], r["convergence"], r["drained_node"]
    s = r["settings"]

    def q(name: str) -> str:
        f = d[name]
        return f"p50 {f['p50']} / p99 {f['p99']} / max {f['max']} ms" if f["n"] else "none"

    return "\n".join(
        [
            f"drill: 3 nodes on one redis, {s['clients']} clients, {r['publish']['updates_per_s']:.0f}"
            f" updates/s over {s['keys']} keys; SIGTERM to node {node['name']} at"
            f" {node['sigterm_at_s']:.1f} s (workers.drain_s {s['drain_s']},"
            f" retry_ms {s['retry_min_ms']}-{s['retry_max_ms']})",
            f"  node {node['name']}: exit code {node['exit_code']},"
            f" {node['exit_after_sigterm_s']} s after SIGTERM",
            f"  its clients: {d['clients']}, closed {d['closed']} (codes {d['close_codes']},"
            f" byes {d['byes']}), served again {d['served_again']} (on {d['landed_on']})",
            f"  served again after their close:  {q('served_after_close_ms')}",
            f"  served again after the SIGTERM:  {q('served_after_sigterm_ms')}",
            f"  of which beyond bye.retry_ms:    {q('served_beyond_retry_ms')}",
            f"  other nodes' clients disconnected: {r['other_clients']['disconnected']}"
            f" of {r['other_clients']['clients']}",
            f"  publishes: {r['publish']['updates']} updates, failovers {r['publish']['failovers']}",
            f"  every key's final value: {c['converged']} of {c['clients']} clients"
            f" (after {c['wait_s']} s)",
            f"  load generator loop lag max {r['loop_lag_max_ms']} ms",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> Settings:
    w = WorkersConfig()
    p = argparse.ArgumentParser(
        prog="python -m loadtest.drill",
        description="The multi-node drill: three `fanout serve` nodes on one redis-server "
        "(both started here), clients spread over them, a steady publisher; SIGTERM to node a "
        "under load. Reports how long node a's clients took to be served again by b and c, "
        "the close codes, node a's exit, and whether every client holds every key's final value.",
    )
    p.add_argument("--clients", type=int, default=300, help="clients, spread evenly (default 300)")
    p.add_argument("--keys", type=int, default=50, help="keys in the topic (default 50)")
    p.add_argument("--rate", type=float, default=200.0, help="updates per second (default 200)")
    p.add_argument(
        "--batch-ms", type=float, default=100.0, help="publish batch interval, ms (default 100)"
    )
    p.add_argument(
        "--duration", type=float, default=30.0, help="seconds of publishing (default 30)"
    )
    p.add_argument(
        "--drain-at",
        type=float,
        default=10.0,
        help="SIGTERM node a after this many seconds (default 10)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="max seconds to wait for convergence (default 20)",
    )
    p.add_argument("--workers", type=int, default=1, help="workers per node (default 1)")
    p.add_argument("--flush-ms", type=int, default=20, help="fanout.flush_interval_ms (default 20)")
    p.add_argument(
        "--drain-s",
        type=float,
        default=w.drain_s,
        help=f"workers.drain_s: node a's closes are paced over it (default {w.drain_s:g})",
    )
    p.add_argument(
        "--retry-min-ms", type=int, default=w.retry_min_ms,
        help=f"workers.retry_min_ms: bye.retry_ms at least (default {w.retry_min_ms})",
    )  # fmt: skip
    p.add_argument(
        "--retry-max-ms", type=int, default=w.retry_max_ms,
        help=f"workers.retry_max_ms: bye.retry_ms at most (default {w.retry_max_ms})",
    )  # fmt: skip
    p.add_argument("--topic", default="drill.t", help="topic (default drill.t)")
    p.add_argument("--report", help="JSON report path (default reports/drill-<timestamp>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the nodes' logs beside the report (always kept when the drill fails)",
    )
    p.add_argument(
        "--server-log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    a = p.parse_args(argv)
    for name in ("clients", "keys", "workers", "flush_ms"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("rate", "batch_ms", "duration", "drain_at", "settle"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.drain_at >= a.duration:
        p.error("--drain-at must be before the end of --duration")
    if not 0 <= a.retry_min_ms <= a.retry_max_ms:
        p.error("--retry-min-ms must be between 0 and --retry-max-ms")
    if a.drain_s < 0:
        p.error("--drain-s must not be negative")
    report = a.report or os.path.join("reports", f"drill-{time.strftime('%Y%m%d-%H%M%S')}.json")
    return Settings(
        clients=a.clients,
        keys=a.keys,
        rate=a.rate,
        batch_ms=a.batch_ms,
        duration_s=a.duration,
        drain_at_s=a.drain_at,
        settle_s=a.settle,
        workers=a.workers,
        flush_ms=a.flush_ms,
        drain_s=a.drain_s,
        retry_min_ms=a.retry_min_ms,
        retry_max_ms=a.retry_max_ms,
        graceful_timeout_s=max(w.graceful_timeout_s, a.drain_s),
        topic=a.topic,
        report=report,
        quiet=a.quiet,
        server_log_level=a.server_log_level,
        keep_logs=a.keep_logs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(args)
    raise_nofile()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    drill = Drill(s, args)
    keep_logs = s.keep_logs
    try:
        drill.start()
        uvloop.run(drill.drill())
        report = drill.report()
        os.makedirs(os.path.dirname(os.path.abspath(s.report)), exist_ok=True)
        with open(s.report, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
        print(summary(report))
        print(f"report: {s.report}")
        keep_logs = keep_logs or not report["ok"]
        return 0 if report["ok"] else 1
    except KeyboardInterrupt:
        print("drill: interrupted; stopping what it started", file=sys.stderr)
        return 130
    except (SetupError, RuntimeError, TimeoutError) as exc:
        print(f"drill: {exc!r}", file=sys.stderr)
        keep_logs = True
        return 3
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the cleanup
        if keep_logs:
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(os.path.abspath(s.report)), exist_ok=True)
        drill.cleanup(keep_logs)
        if keep_logs:
            print(f"drill: the nodes' logs are beside {s.report}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
