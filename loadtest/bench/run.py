"""`fanout bench`: orchestration of one measured run against fanout and/or the baseline.

One *run* of a target (fanout or the baseline) is: start the server on free
ports (fanout: its nodes and their bus, loadtest/bench/nodes.py), open S
subscribers over P processes (spreading their source addresses over
127.0.0.x; each process on one of the subscriber nodes), wait until every one
has its snap, run the scenario for D
seconds while a publisher sends U updates/s, publish one final value of every
key, and check every reading probe ends at those values and every other
reading client's re-sent snaps hold them (loadtest/bench/subscriber.py: probes
decode every frame, the other clients count frames and bytes). Both targets get the
same workload from the same seed. Everything started is stopped, whatever
happens (children: exit, terminate, kill; servers: their whole process group).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from loadtest.accounting import (
    cpu_seconds,
    machine_busy_seconds,
    rss_bytes,
    server_pids,
    tree_memory_bytes,
    used,
)
from loadtest.bench import connections as conns
from loadtest.bench.nodes import FanoutNodes
from loadtest.bench.publisher import publisher_process
from loadtest.bench.shard import WHOLE, Shard, shard_clients, shard_mass
from loadtest.bench.subscriber import READ_LOWAT_BYTES, subscriber_process
from loadtest.bench.target import TargetEngine
from loadtest.bench.target import per_node as per_node_of_target
from loadtest.children import Children, tied_preexec
from loadtest.latency import merge_hist, percentiles_ms
from loadtest.ports import free_port
from loadtest.report import generator_bound
from loadtest.server import Server, SetupError
from loadtest.workload import Workload

SCENARIOS = ("fanout", "idle", "slow", "storm", "churn")
# every client comes back with `since` in these: each must know its positions (decode all)
RESUMING_SCENARIOS = ("storm", "churn")
MIN_PROBES = 50


@dataclass(frozen=True, slots=True)
class BenchSettings:
    workload: Workload
    scenario: str
    subscribers: int
    sub_procs: int
    rate: float
    duration_s: float
    batch_ms: float
    workers: int
    flush_ms: int
    bus: str  # "local" (the embedded hub: one node) or "redis" (a redis-server of the run)
    nodes: int  # fanout nodes: node 1 takes the publisher, nodes 2..N the subscribers
    settle_s: float
    concurrency: int
    max_items: int
    body: str
    slow_fraction: float
    churn_rate: float
    max_hz: float | None
    source_addrs: int
    seed: int
    server_cpus: tuple[int, ...] | None
    config: str | None
    quiet: bool
    max_server_rss_mib: int = 8192
    warmup: int = 0  # --idle: subscribers connected before the memory baseline
    probes: float = 0.05  # --probes: the share of reading clients that decode every frame
    decode_all: bool = False  # --decode-all: every client decodes every frame
    read_lowat: int = READ_LOWAT_BYTES  # --read-lowat: a counting client's SO_RCVLOWAT (0: none)
    # --target: a running engine (loadtest/bench/target.py); --shard: this generator's share
    target_ws: str | None = None
    target_admin: str | None = None
    metrics_from: tuple[str, ...] = ()
    shard: Shard = WHOLE
    api_key_env: str = "FANOUT_API_KEY"  # its name only: the key is never in a report
    publish_via: str = "http"  # --publish-via: POST /publish or WebSocket `pub` batches

    def clients(self) -> list[int]:
        """The global indices of this generator's subscribers (every one without --shard)."""
        return shard_clients(self.subscribers, self.shard)

    def publish_rate(self) -> float:
        """This generator's publish rate: its share of --rate (all of it without --shard)."""
        return self.rate * shard_mass(self.workload, self.seed, self.shard)

    def every_client_decodes(self) -> bool:
        return self.decode_all or self.scenario in RESUMING_SCENARIOS

    def source_addr_count(self) -> int:
        return conns.source_addr_count(self)  # warm-up included


class BaselineServer:
    """`python -m loadtest.baseline` on free ports, in its own process group."""

    def __init__(self, cpus: tuple[int, ...] | None = None) -> None:
        self.base = tempfile.mkdtemp(prefix="fb-base-")
        self.log_path = os.path.join(self.base, "baseline.log")
        self.port = free_port()
        self.admin_port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "loadtest.baseline",
            "--port",
            str(self.port),
            "--http-port",
            str(self.admin_port),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=root,
            preexec_fn=lambda: tied_preexec(cpus),
        )

    url = Server.url
    admin = Server.admin
    wait_ready = Server.wait_ready
    log_tail = Server.log_tail
    stop = Server.stop

    def command(self) -> str:
        return f"python {shlex.join(self.args[1:])}"

    @property
    def sub_urls(self) -> list[str]:
        return [self.url]

    def trees(self) -> dict[str, list[int]]:
        return {"baseline": server_pids(self.proc.pid)}

    def pids(self) -> list[int]:
        return server_pids(self.proc.pid)

    def bus_pid(self) -> None:
        return None  # one process, no bus

    def describe(self) -> dict[str, Any]:
        return {"bus": None, "nodes": [{"name": "baseline", "url": self.url, "admin": self.admin}]}

    def board_pids(self) -> dict[str, int]:
        return {"baseline": self.proc.pid}

    def cleanup_dir(self, keep_log_to: str | None) -> None:
        Server.cleanup_dir(self, keep_log_to)  # type: ignore[arg-type]


def _fanout_nodes(s: BenchSettings) -> FanoutNodes:
    conns.fit_connections(s)  # the fd limit the server and the generator inherit
    env = conns.server_env(s)  # limits.max_connections when a worker's share is above it
    if s.workload.mode == "stream":
        rules = [{"pattern": t, "mode": "stream"} for t in s.workload.topic_names()]
        env["FANOUT_TOPICS"] = json.dumps(rules)
    if s.publish_via == "ws":
        env.update(ws_publish_env(s))
    return FanoutNodes(s.bus, s.nodes, s.workers, s.flush_ms, s.config, s.server_cpus, env)


def ws_publish_env(s: BenchSettings) -> dict[str, str]:
    """What a WebSocket publisher needs of the server: anonymous publishing, a
    message size and an item count for a whole batch (`--max-publish-items`), and a
    message rate above what an anonymous batch costs (a token per 100 items,
    engine/connection.py rule 6), twice over."""
    tokens_per_s = s.publish_rate() / 100 + 1000 / max(s.batch_ms, 1.0)
    return {
        "FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "true",
        "FANOUT_LIMITS_MAX_MESSAGE_BYTES": str(max(65536, 256 * s.max_items)),
        "FANOUT_LIMITS_MAX_PUBLISH_ITEMS": str(max(1000, s.max_items)),
        "FANOUT_LIMITS_MESSAGES_PER_S": str(max(50, round(2 * tokens_per_s))),
    }


def run_target(target: str, s: BenchSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """One measured run of `target` ("fanout" or "baseline"); always tears down."""
    server: Any = None
    procs = Children()
    keep_log = False
    try:
        if s.target_ws and s.target_admin:  # started by the user: nothing to start or stop
            key = os.environ.get("FANOUT_API_KEY", "")
            server = TargetEngine(s.target_ws, s.target_admin, key, s.metrics_from, s.api_key_env)
        elif target == "baseline":
            server = BaselineServer(s.server_cpus)
        else:
            server = _fanout_nodes(s)
        server.wait_ready(30.0)
        result = _measure(target, s, server, procs, log)
        return result
    except BaseException:
        keep_log = True
        raise
    finally:
        procs.stop_all()
        if server is not None:
            server.stop()
            if keep_log:
                tail = server.log_tail()
                if tail:
                    log(f"{target} server log (tail):\n{tail}")
            server.cleanup_dir(None)


def _tree_rss(server: Any) -> int:
    """RSS summed over every process of the target (every node's tree; not redis-server),
    for the samples taken once a second: /proc/PID/statm (psutil, 0.6 ms of CPU per
    sample of a 2-worker server's 5 processes), not smaps_rollup (8.6 ms: it walks
    every page table, in the orchestrator's CPU, the generator's)."""
    if isinstance(server, TargetEngine):
        return server.memory()["rss"]
    return sum(rss_bytes(server.pids()).values())


def _tree_memory(server: Any) -> dict[str, int]:
    """From /proc (psutil) for the servers a run starts; a running engine's /metrics."""
    if isinstance(server, TargetEngine):
        return server.memory()
    return tree_memory_bytes(server.pids())


def _server_cpu(server: Any, pids: list[int]) -> dict[Any, tuple[float, float]]:
    """CPU of the server's processes: psutil, or a running engine's /metrics."""
    if isinstance(server, TargetEngine):
        return server.cpu_seconds()
    return cpu_seconds(pids)


def _per_connection(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, int]:
    return {k: round((after[k] - before[k]) / n) for k in after if k in before and n}


def _measure(
    target: str, s: BenchSettings, server: Any, procs: Children, log: Callable[[str], None]
) -> dict[str, Any]:
    m = Measurement(target, s, server, procs, log)
    m.warm_up()
    m.open_subscribers()
    m.run_window()
    m.converge()
    return m.figures()


class Measurement:
    """One measured run of a target whose server is ready, phase by phase:
    `warm_up` (--idle), `open_subscribers`, `run_window` (the measured window),
    `converge` (final values), then `figures` (the result). Each phase reads
    what the ones before it left on the object."""

    def __init__(
        self,
        target: str,
        s: BenchSettings,
        server: Any,
        procs: Children,
        log: Callable[[str], None],
    ) -> None:
        self.target, self.s, self.server, self.procs, self.log = target, s, server, procs, log
        self.names = server.board_pids()
        self.where = server.describe()
        self.n_addrs = s.source_addr_count()
        self.budget = s.duration_s + s.settle_s + 180.0 + s.subscribers / 20.0
        log(
            f"[{target}] server ready: publisher -> {server.admin}, subscribers -> "
            + ", ".join(server.sub_urls)
            + (
                f" ({len(self.where['nodes'])} nodes on the {self.where['bus']} bus)"
                if self.where["bus"]
                else ""
            )
        )
        self.mem_start = self.mem_before = self.mem_connected = _tree_memory(server)

    def _spec(
        self,
        url: str,
        plan: list[tuple[int, tuple[str, ...], str, bool]],
        probes: set[int] | None = None,
    ) -> dict[str, Any]:
        """A subscriber process's orders; `probes` None: every client is a probe."""
        s = self.s
        return {
            "url": url,
            "clients": plan,
            "concurrency": s.concurrency,
            "budget_s": self.budget,
            "max_hz": s.max_hz,
            "read_lowat": s.read_lowat,
            "probes": None if probes is None else [p[0] for p in plan if p[0] in probes],
        }

    # -- warm-up (--idle) ---------------------------------------------------------------

    def warm_up(self) -> None:
        """One-time costs land with the first connections (code pages a worker
        touches for the first time, heap holes left by startup): connect a few
        first, so that the per-connection figures are the cost of one more.
        They stay connected (idle) until the end of the run."""
        s, w, server, n_addrs = self.s, self.s.workload, self.server, self.n_addrs
        if s.warmup:
            warm = [
                (s.subscribers + i, topics, f"127.0.0.{1 + i % n_addrs}", False)
                for i, topics in enumerate(w.subscriptions(s.warmup, s.seed + 1))
            ]
            warmers = []
            for k, url in enumerate(server.sub_urls):  # every subscriber node
                spec = self._spec(url, warm[k :: len(server.sub_urls)])
                warmers.append(self.procs.spawn(f"warmup-{k + 1}", subscriber_process, 0, spec))
            warmed = sum(self.procs.expect(c, "ready", 60.0)["ready"] for c in warmers)
            if warmed < s.warmup:
                raise SetupError(f"only {warmed} of {s.warmup} warm-up subscribers are subscribed")
            time.sleep(1.0)
        self.mem_before = _tree_memory(server)
        self.rss_before = self.mem_before["rss"]

    # -- subscribers ----------------------------------------------------------------------

    def open_subscribers(self) -> None:
        """Spawn the subscriber processes (and the publisher), wait until every
        subscriber has its snap; the slow scenario's clients then stop reading."""
        s, server, procs = self.s, self.server, self.procs
        topics_of = s.workload.subscriptions(s.subscribers, s.seed)
        mine = s.clients()
        self.n_clients = len(mine)
        n_slow = round(s.slow_fraction * s.subscribers) if s.scenario == "slow" else 0
        slow_every = s.subscribers / n_slow if n_slow else 0.0
        slow_set = {int(i * slow_every) for i in range(n_slow)}
        probes = (
            None
            if s.every_client_decodes()
            else {  # over positions in `mine` (= the indices without --shard), then global
                mine[j]
                for j in probe_indices(
                    len(mine),
                    {j for j, i in enumerate(mine) if i in slow_set},
                    s.probes,
                    s.sub_procs,
                )
            }
        )
        self.n_probes = len(set(mine) - slow_set) if probes is None else len(probes)
        plans: list[list[tuple[int, tuple[str, ...], str, bool]]] = [[] for _ in range(s.sub_procs)]
        for j, i in enumerate(mine):
            addr = f"127.0.0.{1 + j % self.n_addrs}"
            plans[j % s.sub_procs].append((i, topics_of[i], addr, i in slow_set))
        self.subs: list[Any] = []
        connect_cpu0 = _server_cpu(server, server.pids())  # server CPU while they connect
        sub_urls = server.sub_urls  # nodes 2..N: every delivery crossed the bus between nodes
        self.used_urls: list[str] = []
        for p, plan in enumerate(plans):
            if not plan:
                continue
            self.used_urls.append(sub_urls[p % len(sub_urls)])
            spec = self._spec(self.used_urls[-1], plan, probes)
            self.subs.append(procs.spawn(f"subscriber-{p + 1}", subscriber_process, p + 1, spec))
        self.publisher = procs.spawn(
            "publisher",
            publisher_process,
            server.admin,
            s.workload,
            s.seed,
            s.publish_rate(),
            s.duration_s,
            s.batch_ms,
            s.max_items,
            s.body,
            self.budget,
            s.shard,
            server.nodes[0].url if s.publish_via == "ws" and self.target == "fanout" else None,
            s.workers,  # --publish-via ws: one connection per worker of node 1
        )
        timeout_s = 60.0 + s.subscribers / 20.0
        self.setup = {c.name: procs.expect(c, "ready", timeout_s) for c in self.subs}
        # the publisher draws the window's pairs before it (publisher.py `prefetch`)
        procs.expect(self.publisher, "ready", 60.0)
        ready = self.ready = sum(v["ready"] for v in self.setup.values())
        self.connect_times = conns.connect_times(list(self.setup.values()))
        self.connect_times.update(
            conns.connect_cpu(
                connect_cpu0,
                _server_cpu(server, server.pids()),
                cpu_seconds([int(c.proc.pid or 0) for c in self.subs]),
                sum(v["connected"] for v in self.setup.values()),
            )
        )
        self.log(f"[{self.target}] connect times: {self.connect_times}")
        self.log(
            f"[{self.target}] {ready} of {len(mine)} subscribers ready ("
            + ", ".join(f"{k} {v['ready']} in {v['setup_s']} s" for k, v in self.setup.items())
            + ")"
        )
        connected = self.connected = sum(v["connected"] for v in self.setup.values())
        # --idle measures connections: one without its snap is reported (setup.not_subscribed,
        # and the run is broken), not a reason to measure nothing
        if ready < len(mine) and not (s.scenario == "idle" and connected == len(mine)):
            raise SetupError(
                f"only {ready} of {len(mine)} subscribers are subscribed: {self.setup}"
            )
        time.sleep(1.0)  # let the server settle before taking its memory
        self.mem_connected = _tree_memory(server)
        self.rss_connected = self.mem_connected["rss"]
        if n_slow:
            slowed = sum(procs.expect(c, "slowed", 10.0) for c in _send_all(self.subs, "slow"))
            self.log(f"[{self.target}] {slowed} slow clients stopped reading")

    # -- the measured window ----------------------------------------------------------------

    def run_window(self) -> None:
        """Mark the window's start, publish for the duration (or hold, --idle), run the
        scenario's storm or churn, mark its end; CPU and memory sampled at both ends."""
        s, server, procs, subs = self.s, self.server, self.procs, self.subs
        for c in subs:
            c.send("mark_start")
        self.start_counts = {c.name: procs.expect(c, "marked_start", 10.0) for c in subs}
        self.pids = server.pids()
        self.trees = server.trees()
        bus_pid = self.bus_pid = server.bus_pid()
        self.bus0 = cpu_seconds([bus_pid] if bus_pid else [])
        gen_pids = {c.name: int(c.proc.pid or 0) for c in procs.children}
        gen_pids["orchestrator"] = os.getpid()
        self.gen_pids = gen_pids
        self.cpu0 = _server_cpu(server, self.pids)
        self.gen0, self.busy0 = cpu_seconds(gen_pids.values()), machine_busy_seconds()
        self.t0 = time.monotonic()
        if s.scenario == "churn":
            for c in subs:
                c.send("churn", s.churn_rate / len(subs))
        if s.scenario != "idle":
            self.publisher.send("go")
        self.rss_peak = self.rss_connected
        self.rss_guard = False
        self.rss_timeline: list[float] = []  # MiB, once a second (a soak: is it flat?)
        self.done = self._publish_and_watch()
        self.churned: dict[str, Any] = {}
        if s.scenario == "churn":
            per = [procs.expect(c, "churned", 30.0) for c in _send_all(subs, "churn_stop")]
            self.churned = {
                "requested_per_s": s.churn_rate,
                "churned": sum(p["churned"] for p in per),
                "failed": sum(p["failed"] for p in per),
            }
        t1 = time.monotonic()
        for c in subs:
            c.send("mark_end")
        self.cpu1 = _server_cpu(server, self.pids)
        self.gen1, self.busy1 = cpu_seconds(gen_pids.values()), machine_busy_seconds()
        self.bus1 = cpu_seconds([bus_pid] if bus_pid else [])
        self.bus_rss = sum(rss_bytes([bus_pid] if bus_pid else []).values())
        self.rss_end = _tree_memory(server)["rss"]  # the same source as rss_connected
        self.rss_peak = max(self.rss_peak, self.rss_end)
        self.gen_rss = sum(rss_bytes(gen_pids.values()).values())
        self.end_counts = {c.name: procs.expect(c, "marked_end", 20.0) for c in subs}
        self.window = t1 - self.t0
        self.storm: dict[str, Any] = {}
        if s.scenario == "storm":
            per_proc = [procs.expect(c, "stormed", 90.0) for c in subs]
            self.storm = {
                "dropped": sum(p["dropped"] for p in per_proc),
                "reconnected": sum(p["reconnected"] for p in per_proc),
                "resubscribed": sum(p["resubscribed"] for p in per_proc),
                "connected_s": max(p["connected_s"] for p in per_proc),
                "recover_s": max(p["recover_s"] for p in per_proc),
            }
            self.log(f"[{self.target}] storm: {self.storm}")

    def _publish_and_watch(self) -> dict[str, Any]:
        """Until the publisher is done (or the duration passed, --idle): start the storm
        half-way, a progress line and an RSS sample once a second; the RSS guard."""
        s, procs, publisher, t0 = self.s, self.procs, self.publisher, self.t0
        storm_at = t0 + s.duration_s / 2 if s.scenario == "storm" else None
        upd0 = sum(int(v["updates"]) for v in self.start_counts.values())
        last = (t0, 0, upd0, 0)
        next_line = t0 + 1.1
        hard_stop = t0 + s.duration_s + 60.0
        while True:
            if s.scenario == "idle":
                if time.monotonic() >= t0 + s.duration_s:
                    return {}
            else:
                found, payload = procs.take(publisher, "done")
                if found:
                    return dict(payload)
                if time.monotonic() > hard_stop:
                    publisher.send("abort")
                    return dict(procs.expect(publisher, "done", 30.0))
                if publisher.gone or not publisher.proc.is_alive():
                    raise RuntimeError("the publisher exited during the run")
            if storm_at is not None and time.monotonic() >= storm_at:
                self.log(
                    f"[{self.target}] storm: every reading client drops and reconnects with `since`"
                )
                _send_all(self.subs, "storm")
                storm_at = None
            procs.pump(max(0.0, min(0.2, next_line - time.monotonic())))
            if time.monotonic() >= next_line:
                last = self._second(last)
                next_line += 1.0

    def _second(self, last: tuple[float, int, int, int]) -> tuple[float, int, int, int]:
        """Once a second of the window: an RSS sample (and the guard) and a progress line."""
        s, now = self.s, time.monotonic()
        rss_now = _tree_rss(self.server)
        self.rss_peak = max(self.rss_peak, rss_now)
        if len(self.rss_timeline) < 100_000:  # one sample a second: bounded
            self.rss_timeline.append(round(rss_now / 2**20, 1))
        if not self.rss_guard and self.rss_peak > s.max_server_rss_mib * 2**20:
            self.rss_guard = True  # an unbounded server (the baseline): stop feeding it
            self.log(
                f"[{self.target}] server RSS over {s.max_server_rss_mib} MiB: publishing stops"
            )
            self.publisher.send("abort")
        subs = self.subs
        sent = int(self.publisher.progress.get("sent", 0))
        upd = sum(int(c.progress.get("updates", 0)) for c in subs)
        frames = sum(int(c.progress.get("frames", 0)) for c in subs)
        p99s = [float(c.progress["p99_ms"]) for c in subs if c.progress.get("p99_ms")]
        dt = max(now - last[0], 1e-6)
        self.log(
            f"[{self.target} {now - self.t0:5.1f}s] published {(sent - last[1]) / dt:>8,.0f}/s  "
            f"delivered {(upd - last[2]) / dt:>10,.0f}/s  "
            f"frames {(frames - last[3]) / dt:>9,.0f}/s  "
            f"p99 so far {max(p99s) if p99s else float('nan'):.1f} ms  "
            f"server RSS {self.rss_peak / 2**20:,.0f} MiB"
        )
        return (now, sent, upd, frames)

    # -- final values and convergence -------------------------------------------------------

    def converge(self) -> None:
        """Publish one final value of every key; every subscriber process checks its
        reading clients end at those values (within --settle)."""
        s, procs = self.s, self.procs
        self.publisher.send("final")
        finals = procs.expect(self.publisher, "finals", 60.0)
        for c in self.subs:
            c.send("converge", finals, s.settle_s)
        self.conv = {c.name: procs.expect(c, "converged", s.settle_s + 60.0) for c in self.subs}
        for c in procs.children:
            c.send("exit")

    # -- figures ------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """The run's result (the report's `results[target]`)."""
        start, end, conv = self.start_counts, self.end_counts, self.conv
        frames = sum(end[n]["frames"] - start[n]["frames"] for n in end)
        delivery = _delivery(start, end, self.window, self.n_probes)
        updates = delivery["updates"]
        window = self.window
        errors: collections.Counter[str] = collections.Counter()
        close_codes: collections.Counter[str] = collections.Counter()
        connect_errors: collections.Counter[str] = collections.Counter()
        for v in conv.values():
            errors.update(v["errors"])
            close_codes.update(v["close_codes"])
            connect_errors.update(v["connect_errors"])
        addrs = sorted({a for v in conv.values() for a in v["local_addrs"]})
        by_name = {pid: name for name, pid in self.names.items()}
        return {
            "target": self.target,
            "bus": self.where["bus"],
            "nodes": self.where["nodes"],
            "bus_server": self.where.get("redis"),  # the redis-server of the run: url, pid, command
            "server_command": self.server.command(),
            "server_measured_by": (
                self.server.measured_by()
                if isinstance(self.server, TargetEngine)
                else "psutil (/proc) of the process trees the bench started"
            ),
            "server_sources": (
                self.server.sources() if isinstance(self.server, TargetEngine) else None
            ),
            "shard": str(self.s.shard),
            "clients": self.n_clients,
            "server_processes": {by_name.get(p, f"pid {p}"): p for p in sorted(set(self.pids))},
            "window_s": round(window, 3),
            "setup": {
                "ready": self.ready,
                "per_process": self.setup,
                **self.connect_times,  # first attempt to last connection up (connect_s)
                "connected": self.connected,
                "not_subscribed": self.connected - self.ready,
                "fd_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
                "server_env": conns.server_env(self.s),
                "source_addrs": addrs,
                "subscriber_urls": {
                    c.name: url for c, url in zip(self.subs, self.used_urls, strict=True)
                },
            },
            "publish": self.done,
            "delivery": delivery,
            "latency_ms": self._latency(),
            "cpu": self._cpu(updates, frames, by_name),
            "memory": self._memory(),
            "convergence": self._convergence(),
            "storm": self.storm or None,
            "churn": self.churned or None,
            "errors": dict(errors),
            "close_codes": dict(close_codes),
            "connect_errors": dict(connect_errors),
        }

    def _latency(self) -> dict[str, Any]:
        end = self.end_counts
        hist: dict[int, int] = {}
        for v in end.values():
            merge_hist(hist, v["hist"])
        latency: dict[str, Any] = dict(percentiles_ms(hist, (0.5, 0.9, 0.99, 0.999)))
        latency["max"] = round(max(v["max_ns"] for v in end.values()) / 1e6, 3)
        latency["samples"] = sum(v["samples"] for v in end.values())
        latency["histogram"] = {str(b): n for b, n in sorted(hist.items())}  # for `bench merge`
        return latency

    def _cpu(self, updates: int, frames: int, by_name: Mapping[int, str]) -> dict[str, Any]:
        cpu0, cpu1, window = self.cpu0, self.cpu1, self.window
        both = [p for p in cpu0 if p in cpu1]
        per_process = {
            (p if isinstance(p, str) else by_name.get(p, f"pid {p}")): round(used(cpu0, cpu1, p), 3)
            for p in both
        }
        server_cpu = sum(used(cpu0, cpu1, p) for p in both)
        per_node = {
            node: round(sum(used(cpu0, cpu1, p) for p in tree if p in cpu0 and p in cpu1), 3)
            for node, tree in self.trees.items()
        } or per_node_of_target(cpu0, cpu1)
        bus_pid, bus0, bus1 = self.bus_pid, self.bus0, self.bus1
        bus_cpu = used(bus0, bus1, bus_pid) if bus_pid in bus0 and bus_pid in bus1 else None
        gen0, gen1 = self.gen0, self.gen1
        gen_by_name = {
            n: round(used(gen0, gen1, p), 3)
            for n, p in self.gen_pids.items()
            if p in gen0 and p in gen1
        }
        loadgen_cpu = sum(gen_by_name.values())
        busy_cores = (self.busy1 - self.busy0) / window
        bound = generator_bound(
            loadgen_cpu, server_cpu + (bus_cpu or 0.0), busy_cores, os.cpu_count() or 1
        )
        return {
            "server_s": round(server_cpu, 3),
            "server_core_share": round(server_cpu / window, 3),
            "server_s_per_million_updates": (
                round(server_cpu / (updates / 1e6), 3) if updates else None
            ),
            "server_s_per_million_frames": (
                round(server_cpu / (frames / 1e6), 3) if frames else None
            ),
            "server_per_process_s": per_process,
            "server_per_node_s": per_node,
            # redis-server, apart from the nodes (None on the local bus: its hub is a
            # process of the node, in server_s)
            "bus_server_s": round(bus_cpu, 3) if bus_cpu is not None else None,
            "bus_server_core_share": round(bus_cpu / window, 3) if bus_cpu is not None else None,
            "bus_server_s_per_million_updates": (
                round(bus_cpu / (updates / 1e6), 3) if bus_cpu is not None and updates else None
            ),
            "loadgen_s": round(loadgen_cpu, 3),
            "loadgen_core_share": round(loadgen_cpu / window, 3),
            "loadgen_per_process_s": gen_by_name,
            "machine_busy_core_share": round(busy_cores, 3),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            # the generator's CPU over the system under test's (nodes + redis-server)
            "loadgen_over_server": (
                round(loadgen_cpu / (server_cpu + (bus_cpu or 0.0)), 3)
                if server_cpu + (bus_cpu or 0.0) > 0
                else None
            ),
            "generator_bound": bound is not None,
            "generator_bound_reason": bound,
        }

    def _memory(self) -> dict[str, Any]:
        s, connections = self.s, self.n_clients
        rss_connected, rss_end = self.rss_connected, self.rss_end
        return {
            "server_rss_before_bytes": self.rss_before,
            "server_rss_connected_bytes": rss_connected,
            "server_rss_end_bytes": rss_end,
            "server_rss_peak_bytes": self.rss_peak,
            "rss_per_connection_bytes": round((rss_connected - self.rss_before) / connections),
            # the same, split (accounting.memory_bytes): pss counts each page of the tree
            # once, copy-on-write copies included; anon is the heap; file, shared
            # libraries' pages a process touched for the first time (no new memory)
            "per_connection_bytes": _per_connection(
                self.mem_before, self.mem_connected, connections
            ),
            "warmup_connections": s.warmup,
            # before the warm-up, over warm-up + measured connections (= the figure
            # without a warm-up): one-time costs included
            "per_connection_from_start_bytes": _per_connection(
                self.mem_start, self.mem_connected, connections + s.warmup
            ),
            "server_memory_start_bytes": self.mem_start,
            "server_memory_before_bytes": self.mem_before,
            "server_memory_connected_bytes": self.mem_connected,
            "bus_server_rss_end_bytes": self.bus_rss or None,
            "loadgen_rss_bytes": self.gen_rss,
            "rss_guard_tripped": self.rss_guard,
            "rss_timeline_mib": self.rss_timeline,
            "rss_end_over_connected": round(rss_end / rss_connected, 4) if rss_connected else None,
            "note": "sums over the server's process tree; RSS counts a page shared by forked "
            "processes once per process (in both terms of a difference), PSS once in all",
        }

    def _convergence(self) -> dict[str, Any]:
        conv = self.conv
        clients = sum(v["clients"] for v in conv.values())
        converged = sum(v["converged"] for v in conv.values())
        slow_codes: collections.Counter[str] = collections.Counter()
        for v in conv.values():
            slow_codes.update(v["slow_close_codes"])
        snap_clients = sum(v["snapshots"]["clients"] for v in conv.values())
        snap_matched = sum(v["snapshots"]["matched"] for v in conv.values())
        return {
            # the reading probes (every reading client with --decode-all, storm, churn)
            "clients": clients,
            "converged": converged,
            "fraction": round(converged / clients, 4) if clients else None,
            "all_converged": clients > 0 and converged == clients,
            "settle_s": max(v["settle_s"] for v in conv.values()),
            "examples": [e for v in conv.values() for e in v["examples"]][:3],
            "slow_clients": sum(v["slow_clients"] for v in conv.values()),
            "slow_closed": sum(v["slow_closed"] for v in conv.values()),
            "slow_close_codes": dict(slow_codes),
            "probes": clients,
            "probes_converged": converged,
            "order_errors": sum(int(v["errors"].get("order", 0)) for v in conv.values()),
            # the reading counting clients: resubscribed at the end, snaps vs final values
            "snapshots": snap_clients,
            "snapshots_matched": snap_matched,
            "all_snapshots_matched": snap_matched == snap_clients,
            # resubscriptions the snapshot check took (more than 1: the server was
            # still applying the finals when the first snaps were sent)
            "snapshot_rounds": max(
                (v["snapshots"].get("rounds", 0) for v in conv.values()), default=0
            ),
        }


def probe_indices(subscribers: int, slow: set[int], share: float, procs: int = 1) -> set[int]:
    """The probes: `share` of the clients (at least MIN_PROBES, at most every reading
    one), as few subscriber processes as hold them (client i is in process i % procs),
    spread evenly over the reading (not slow) clients of each: the first process
    takes as many as it has readers, the next the rest. Probes of one process
    share its decode cache (each distinct message is decoded once per process:
    the market workload's probes, spread over two processes, cost ~50 % more per
    frame), and the processes without probes only count, waking once per
    READ_LOWAT_BYTES of a client."""
    readers = [i for i in range(subscribers) if i not in slow]
    n = min(len(readers), max(MIN_PROBES, math.ceil(round(share * subscribers, 6))))
    chosen: set[int] = set()
    for p in range(procs):
        group = [i for i in readers if i % procs == p]
        k = min(len(group), n - len(chosen))
        chosen.update(group[j * len(group) // k] for j in range(k))
        if len(chosen) >= n:
            break
    return chosen


def _delivery(
    start: Mapping[str, Mapping[str, Any]],
    end: Mapping[str, Mapping[str, Any]],
    window: float,
    probes: int,
) -> dict[str, Any]:
    """The window's deliveries: frames and bytes of every client; updates as counted by
    the probes, scaled by every client's frames over theirs (exact when all decode)."""

    def delta(k: str) -> int:
        return sum(int(end[n].get(k, 0)) - int(start[n].get(k, 0)) for n in end)

    frames, counted = delta("frames"), delta("counted_frames")
    probe_frames, probe_updates = delta("probe_frames"), delta("probe_updates")
    updates = probe_updates + (round(counted * probe_updates / probe_frames) if probe_frames else 0)
    nbytes = delta("bytes")
    return {
        "updates": updates,
        "updates_per_s": round(updates / window, 1),
        "frames": frames,
        "frames_per_s": round(frames / window, 1),
        "updates_per_frame": round(updates / frames, 2) if frames else None,
        "bytes": nbytes,
        "bytes_per_s": round(nbytes / window, 1),
        "updates_counted_by_probes": probe_updates,
        "updates_estimated": counted > 0,
        "probes": probes,
    }


def _send_all(children: list[Any], *msg: Any) -> list[Any]:
    for c in children:
        c.send(*msg)
    return children


def broke(result: Mapping[str, Any], s: BenchSettings, max_p99_ms: float) -> str | None:
    """Why a run counts as broken (latency, delivery or publishing), or None."""
    if result["memory"]["rss_guard_tripped"]:
        return f"server RSS went over {s.max_server_rss_mib} MiB"
    p99 = result["latency_ms"].get("p99")
    if s.scenario != "idle" and (p99 is None or p99 > max_p99_ms):
        return f"p99 {p99} ms > {max_p99_ms:g} ms"
    not_subscribed = result.get("setup", {}).get("not_subscribed")
    if not_subscribed:
        return f"{not_subscribed} connected subscribers had no snap when the window started"
    c = result["convergence"]
    if not c["all_converged"]:
        return f"only {c['converged']} of {c['clients']} probes converged"
    if not c.get("all_snapshots_matched", True):
        return f"only {c['snapshots_matched']} of {c['snapshots']} snapshots matched"
    pub = result["publish"]
    rate = s.publish_rate()
    if s.scenario != "idle" and pub and pub.get("achieved_rate", 0) < 0.9 * rate:
        return f"publisher reached {pub.get('achieved_rate')}/s of {rate:g}/s"
    return None


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fd_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }
