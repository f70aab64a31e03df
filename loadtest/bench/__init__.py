"""`fanout bench`: the native load generator (multi-process, picows clients).

    fanout bench                                   # hot workload, 1,000 subs, 10,000 updates/s, 30 s
    fanout bench --workload market --rate 20000 --baseline
    fanout bench --idle --subscribers 5000         # memory per connection
    fanout bench --slow 0.1 --workload market --rate 5000
    fanout bench --storm --subscribers 5000
    fanout bench --churn 200
    fanout bench --sweep rate --steps 1000,5000,10000,20000 --baseline
    fanout bench --bus redis --nodes 2             # end to end across nodes over Redis
    fanout bench --preset first                    # the first measurement (make bench-first)
    fanout bench -S 20 --decode-all                # every client decodes every frame
    fanout bench --target ws://h:8080/ws --admin http://h:8081 --shard 1/2   # a running engine
    fanout bench merge a.json b.json --name merged # one report from the --shard reports

Probes and counting clients: a share of the subscribers (`--probes`, 5% and
at least 50) decode every frame, check order and convergence and record
latency; the others count frames and bytes without decoding, and at the end
resubscribe and compare the re-sent snaps with the final values, so that the
generator costs a fraction of the server it measures. `--decode-all` makes
every client a probe (small runs; storm and churn always do: every client
comes back with `since`). Every report gives the generator's CPU next to the
server's and flags a run as generator-bound when the generator used more
than half of the server's CPU or the machine was saturated.

Each run starts its own server(s) on free ports (fanout: `fanout serve` with
`--workers` and `flush_interval_ms`; with `--baseline`, then the naive picows
broadcaster of loadtest/baseline.py on the same workload and seed), measures,
and writes `reports/bench-<workload>-<scenario>-<time>.json` and `.md` (plus
PNG plots for a sweep). docs/benchmarks.md explains every figure.

Buses: `--bus local` (default) is one node with its embedded hub. `--bus
redis` starts a redis-server of its own (free loopback port, no persistence)
and `--nodes N` fanout nodes on it: the publisher posts to node 1's admin API
and the subscribers connect to nodes 2..N only, so every update a subscriber
receives crossed Redis from one node to another (with `--nodes 1`, publisher
and subscribers share node 1, still through Redis). Server CPU and RSS are
summed over every node's processes; redis-server's CPU is reported apart.

A running deployment (`--target` and `--admin`, loadtest/bench/target.py):
the bench starts no server; the publisher posts with the API key of the
environment variable `--api-key-env` (default FANOUT_API_KEY, never printed);
server CPU and memory come from the engine's /metrics, per process, at the
start and end of the window. `--shard i/N` (loadtest/bench/shard.py) takes
generator i's share of the clients, of the keys and of the rate, so that N
generators run by hand make the whole workload; `fanout bench merge`
(loadtest/bench/merge.py) makes one report of theirs.

Exit codes: 0 measured, every reading probe converged and every counting
client's snapshot matched on every target; 1 measured but some did not; 3 could not set up or failed
midway; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

from loadtest.bench.nodes import BUSES
from loadtest.bench.run import SCENARIOS, BenchSettings, broke, machine, run_target
from loadtest.bench.shard import WHOLE, Shard
from loadtest.bench.subscriber import READ_LOWAT_BYTES
from loadtest.children import raise_nofile
from loadtest.server import SetupError
from loadtest.workload import WORKLOADS

# Named runs: a preset sets these flags' defaults; flags given on the command line win.
PRESETS: dict[str, dict[str, Any]] = {
    # The first measurement (README, "Benchmarks"; loadtest/firstbench.py until issue 12):
    # the hot workload, 1,000 subscribers in 2 processes, 10,000 updates/s for 30 s,
    # 2 workers, connections opened 100 at a time per process.
    "first": {
        "workload": "hot",
        "subscribers": 1000,
        "sub_procs": 2,
        "rate": 10_000.0,
        "duration": 30.0,
        "workers": 2,
        "connect_concurrency": 100,
    },
}


MAX_READ_LOWAT = 16 << 20  # --read-lowat, at most (the kernel caps it at half the buffer)


def _cpu_list(text: str) -> tuple[int, ...]:
    """ "0", "0-3", "0,2" -> CPU numbers."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list")
    return tuple(cpus)


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("steps must be positive numbers")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fanout bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Workloads: hot = 1 topic x 50 keys, every subscriber on it, keys round robin; "
        "market = 100 topics x 50 keys, Zipf s=1.1 key popularity, 5 random topics per "
        "subscriber. See docs/benchmarks.md.",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named run: first = the first measurement (hot, -S 1000 in 2 processes, "
        "-U 10000, -D 30, 2 workers); other flags override it",
    )
    _add_scenario(p)
    _add_load(p)
    _add_servers(p)
    _add_sweep(p)
    _add_target(p)
    _add_report(p)
    return p


def _add_scenario(parser: argparse.ArgumentParser) -> None:
    """The workload, the preset's overridable choice, and what to measure."""
    p = parser.add_argument_group("workload and scenario")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="hot")
    sc = p.add_mutually_exclusive_group()
    sc.add_argument("--scenario", choices=SCENARIOS, help="what to measure (default fanout)")
    sc.add_argument("--idle", action="store_true", help="scenario idle: memory per connection")
    sc.add_argument(
        "--slow",
        type=float,
        metavar="FRACTION",
        help="scenario slow: this fraction of subscribers stop reading (e.g. 0.1)",
    )
    sc.add_argument(
        "--storm",
        action="store_true",
        help="scenario storm: mid-run, every client drops and reconnects with `since`",
    )
    sc.add_argument(
        "--churn",
        type=float,
        metavar="PER_S",
        help="scenario churn: close and reopen this many connections per second",
    )


def _add_load(parser: argparse.ArgumentParser) -> None:
    """How many clients, how fast, for how long, and how they read."""
    p = parser.add_argument_group("load")
    p.add_argument("-S", "--subscribers", type=int, default=1000)
    p.add_argument(
        "--sub-procs",
        type=int,
        default=0,
        help="subscriber processes (default: 1 per 500, 2..8, rounded up to a multiple of "
        "the subscriber nodes)",
    )
    p.add_argument("-U", "--rate", type=float, default=10_000, help="updates/s (default 10000)")
    p.add_argument("-D", "--duration", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--batch-ms", type=float, default=10.0, help="publish batch interval (10)")
    p.add_argument("--settle", type=float, default=15.0, help="max s to wait for convergence")
    p.add_argument("--connect-concurrency", type=int, default=200, help="per process")
    p.add_argument("--max-publish-items", type=int, default=1000)
    p.add_argument("--body", choices=("msgpack", "json"), default="msgpack")
    p.add_argument(
        "--publish-via",
        choices=("http", "ws"),
        default="http",
        help="publish through POST /publish (http, default) or WebSocket `pub` batches on one "
        "connection per worker of node 1 (ws: the bench starts it with anonymous publishing "
        "on)",
    )
    p.add_argument("--max-hz", type=float, help="subscribers ask for at most this many frames/s")
    p.add_argument(
        "--probes",
        type=float,
        default=0.05,
        metavar="SHARE",
        help="share of the reading subscribers that decode every frame (order, convergence, "
        "latency); at least 50 (default 0.05); the others only count frames and bytes, "
        "and check their snapshot at the end",
    )
    p.add_argument(
        "--decode-all",
        action="store_true",
        help="every subscriber decodes every frame (the old mode, for small runs that check "
        "every client's frames; storm and churn always do)",
    )
    p.add_argument(
        "--read-lowat",
        type=int,
        default=READ_LOWAT_BYTES,
        metavar="BYTES",
        help="a counting client's socket wakes its loop once this many bytes wait "
        f"(SO_RCVLOWAT; default {READ_LOWAT_BYTES}). 0: it reads every frame, costing the "
        "generator ~3x more; on loopback the server's CPU per update then matches --decode-all's, where "
        "unread bytes make it 10-20%% higher (docs/benchmarks.md)",
    )
    p.add_argument(
        "--source-addrs",
        "--source-addresses",
        type=int,
        default=0,
        help="spread client source addresses over 127.0.0.1..N, each bound before connect "
        "(default: 1 per 20,000 connections, warm-up included)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--warmup",
        type=int,
        default=-1,
        metavar="N",
        help="--idle: connect N more subscribers first and take the memory baseline "
        "with them connected, so that the per-connection figures leave out one-time "
        "costs (default S/10)",
    )


def _add_servers(parser: argparse.ArgumentParser) -> None:
    """The servers the bench starts, and the baseline next to them."""
    p = parser.add_argument_group("servers")
    p.add_argument("--workers", type=int, default=2, help="fanout workers per node (default 2)")
    p.add_argument(
        "--bus",
        choices=BUSES,
        default="local",
        help="fanout's bus: local = one node, embedded hub (default); redis = a "
        "redis-server started for the run, shared by --nodes nodes",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="fanout nodes (default 1; more than 1 needs --bus redis): node 1 takes the "
        "publisher, nodes 2..N the subscribers (e.g. --bus redis --nodes 2)",
    )
    p.add_argument("--flush-ms", type=int, default=20, help="fanout flush_interval_ms (20)")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run the naive picows broadcaster on the same workload; report ratios "
        "(one process, no bus: the same with --bus redis, where the ratio is then fanout "
        "on Redis over a local baseline)",
    )
    p.add_argument(
        "--max-server-rss-mib",
        type=int,
        default=8192,
        help="stop publishing when the server's RSS exceeds this (the baseline has no bound)",
    )
    p.add_argument("--server-cpus", type=_cpu_list, metavar="LIST", help="pin servers to CPUs")
    p.add_argument(
        "--loadgen-cpus", type=_cpu_list, metavar="LIST", help="pin the load generator to CPUs"
    )
    p.add_argument("--config", help="config file for the fanout server")


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    """A sweep of one value, and when a step breaks."""
    p = parser.add_argument_group("sweeps")
    p.add_argument("--sweep", choices=("rate", "subscribers"), help="step this value up")
    p.add_argument("--steps", type=_int_list, help="comma-separated values for --sweep")
    p.add_argument(
        "--max-p99-ms", type=float, default=250.0, help="a step breaks above this p99 (250)"
    )


def _add_target(parser: argparse.ArgumentParser) -> None:
    """Loading an engine that is already running, from one of N generators."""
    p = parser.add_argument_group("a running engine (--target)")
    p.add_argument(
        "--target",
        metavar="WS_URL",
        help="load an engine that is already running (e.g. ws://host:8080/ws): the bench "
        "starts no server; needs --admin",
    )
    p.add_argument("--admin", metavar="URL", help="--target's admin API (e.g. http://host:8081)")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="--target: also read server CPU and memory from this admin URL's /metrics "
        "(repeat; --admin's always)",
    )
    p.add_argument(
        "--api-key-env",
        default="FANOUT_API_KEY",
        metavar="NAME",
        help="--target: the environment variable holding the admin API key (default "
        "FANOUT_API_KEY; never printed)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=WHOLE,
        metavar="I/N",
        help="--target: this generator's share of the clients, keys and rate (generator "
        "I of N run by hand); merge the reports with `fanout bench merge`",
    )


def _add_report(parser: argparse.ArgumentParser) -> None:
    """Where the report goes."""
    p = parser.add_argument_group("report")
    p.add_argument("--report-dir", default="reports")
    p.add_argument("--name", help="report file name without extension")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def sub_procs_for(a: argparse.Namespace, subscribers: int) -> int:
    """--sub-procs, or 1 per 500 subscribers (2..8) rounded up to a multiple of the
    subscriber nodes (each subscriber process connects to one node)."""
    if a.sub_procs:
        return min(int(a.sub_procs), subscribers)
    sub_nodes = max(1, a.nodes - 1)
    n = max(2, min(8, -(-subscribers // 500)))
    return min(-(-n // sub_nodes) * sub_nodes, subscribers)


def settings_from(a: argparse.Namespace) -> BenchSettings:
    scenario = a.scenario or "fanout"
    if a.idle:
        scenario = "idle"
    elif a.slow is not None:
        scenario = "slow"
    elif a.storm:
        scenario = "storm"
    elif a.churn is not None:
        scenario = "churn"
    sub_procs = sub_procs_for(a, a.subscribers)
    return BenchSettings(
        workload=WORKLOADS[a.workload],
        scenario=scenario,
        subscribers=a.subscribers,
        sub_procs=sub_procs,
        rate=a.rate,
        duration_s=a.duration,
        batch_ms=a.batch_ms,
        workers=a.workers,
        flush_ms=a.flush_ms,
        bus=a.bus,
        nodes=a.nodes,
        settle_s=a.settle,
        concurrency=a.connect_concurrency,
        max_items=a.max_publish_items,
        body=a.body,
        slow_fraction=a.slow if a.slow is not None else (0.1 if scenario == "slow" else 0.0),
        churn_rate=a.churn if a.churn is not None else (50.0 if scenario == "churn" else 0.0),
        max_hz=a.max_hz,
        source_addrs=a.source_addrs,
        seed=a.seed,
        server_cpus=a.server_cpus,
        config=a.config,
        quiet=a.quiet,
        max_server_rss_mib=a.max_server_rss_mib,
        warmup=(a.subscribers // 10 if a.warmup < 0 else a.warmup) if scenario == "idle" else 0,
        probes=a.probes,
        decode_all=a.decode_all,
        read_lowat=a.read_lowat,
        target_ws=a.target,
        target_admin=a.admin,
        metrics_from=tuple(a.metrics),
        shard=a.shard,
        api_key_env=a.api_key_env,
        publish_via=a.publish_via,
    )


def parse_args(p: argparse.ArgumentParser, args: Sequence[str]) -> argparse.Namespace:
    """The flags, with a --preset's values as the defaults of the flags not given;
    flags that do not fit together end the command (exit 2) naming them."""
    a = p.parse_args(args)
    if a.preset:
        p.set_defaults(**PRESETS[a.preset])
        a = p.parse_args(args)
    if a.sweep and not a.steps:
        p.error("--sweep needs --steps")
    if a.subscribers < 1 or a.rate <= 0 or a.duration <= 0:
        p.error("--subscribers, --rate and --duration must be positive")
    if not 0 < a.probes <= 1:
        p.error("--probes is a share between 0 (excluded) and 1")
    if not 0 <= a.read_lowat <= MAX_READ_LOWAT:
        p.error(f"--read-lowat is a byte count from 0 to {MAX_READ_LOWAT}")
    if a.slow is not None and not 0 < a.slow < 1:
        p.error("--slow is a fraction between 0 and 1")
    if a.nodes < 1:
        p.error("--nodes must be at least 1")
    if a.bus == "local" and a.nodes != 1:
        p.error("--nodes: the local bus is one node; more nodes need --bus redis")
    if a.sub_procs and a.sub_procs < a.nodes - 1:
        p.error("--sub-procs: at least one subscriber process per subscriber node (N - 1)")
    if bool(a.target) != bool(a.admin):
        p.error("--target and --admin go together (a running engine's WebSocket and admin URLs)")
    if a.target and (a.baseline or a.bus != "local" or a.nodes != 1 or a.idle):
        p.error("--target: the engine is already running (no --baseline, --bus, --nodes, --idle)")
    if a.publish_via == "ws" and (a.target or a.baseline):
        p.error("--publish-via ws: the bench starts the engine (no --target, --baseline)")
    if (a.shard != WHOLE or a.metrics) and not a.target:
        p.error("--shard and --metrics need --target")
    if a.shard.count > a.subscribers:
        p.error("--shard: more generators than --subscribers")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["merge"]:
        from loadtest.bench.merge import main as merge_main

        return merge_main(args[1:])
    a = parse_args(build_parser(), args)
    if a.target and a.api_key_env != "FANOUT_API_KEY":
        # the publisher and the scrapes read FANOUT_API_KEY (children inherit it)
        os.environ["FANOUT_API_KEY"] = os.environ.get(a.api_key_env, "")
    s = settings_from(a)
    raise_nofile()  # inherited by every process forked from here
    if a.loadgen_cpus:
        if not s.server_cpus:  # the servers keep the CPUs this command was given
            s = replace(s, server_cpus=tuple(sorted(os.sched_getaffinity(0))))
        os.sched_setaffinity(0, a.loadgen_cpus)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    def log(line: str) -> None:
        if not s.quiet:
            print(line, file=sys.stderr, flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = (
        a.name
        or (f"bench-{a.preset}-{stamp}" if a.preset else "")
        or f"bench-{s.workload.name}-{s.scenario}"
        + (f"-redis{s.nodes}" if s.bus == "redis" else "")
        + (f"-sweep-{a.sweep}" if a.sweep else "")
        + f"-{stamp}"
    )
    base = f"{a.report_dir.rstrip('/')}/{name}"
    targets = ["fanout", *(["baseline"] if a.baseline else [])]
    report: dict[str, Any] = {
        "tool": "fanout bench",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "fanout bench " + shlex.join(args),
        "preset": a.preset,
        "machine": machine(),
        "settings": {
            **{k: v for k, v in asdict(s).items() if k != "workload"},
            "workload": s.workload.name,
            "shard": str(s.shard),
        },
        "workload": s.workload.describe(),
        "sweep": a.sweep,
        "steps": [],
        "sustained": {},
    }
    try:
        run_steps(a, s, targets, report, log)
    except KeyboardInterrupt:
        print("fanout bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (SetupError, RuntimeError) as exc:
        print(f"fanout bench: {exc}", file=sys.stderr)
        if not report["steps"]:
            return 3
    return write_report(a, targets, report, base, log)


def run_steps(
    a: argparse.Namespace,
    s: BenchSettings,
    targets: Sequence[str],
    report: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Run every target at every step (one step without --sweep), adding each step
    to `report` as it ends; a sweep stops a target at its first broken step."""
    from loadtest import report as rep

    live = set(targets)
    values: list[int | None] = list(a.steps) if a.sweep else [None]
    for value in values:
        step_s = s
        if value is None:
            pass
        elif a.sweep == "rate":
            step_s = replace(s, rate=float(value))
        elif a.sweep == "subscribers":
            step_s = replace(s, subscribers=value, sub_procs=sub_procs_for(a, value))
        if value is not None:
            log(f"== {a.sweep} = {value:,}")
        results: dict[str, Any] = {}
        broken: dict[str, str | None] = {}
        for t in targets:
            if t not in live:
                continue
            results[t] = run_target(t, step_s, log)
            broken[t] = broke(results[t], step_s, a.max_p99_ms)
            if a.sweep:
                if broken[t]:
                    live.discard(t)
                    log(f"== {t} broke at {a.sweep} = {value:,}: {broken[t]}")
                else:
                    report["sustained"][t] = value
        step = {"value": value, "results": results, "broken": broken, "ratios": rep.ratios(results)}
        report["steps"].append(step)
        if a.sweep and "fanout" not in live:
            break


def write_report(
    a: argparse.Namespace,
    targets: Sequence[str],
    report: dict[str, Any],
    base: str,
    log: Callable[[str], None],
) -> int:
    """Write the JSON and Markdown reports (and a sweep's plots), print the Markdown;
    the exit code: 0 when every reading probe converged and every counting client's
    snapshot matched at every step, else 1."""
    from loadtest import report as rep
    from loadtest.plots import plot_sweep

    if a.sweep:
        for t in targets:
            report["sustained"].setdefault(t, None)  # broke at the first step
    report["all_converged"] = bool(report["steps"]) and all(
        r["convergence"]["all_converged"] and r["convergence"].get("all_snapshots_matched", True)
        for st in report["steps"]
        for r in st["results"].values()
    )
    json_path, md_path = rep.write(report, base, plot_sweep)
    print(rep.markdown(report))
    log(f"reports: {json_path}, {md_path}")
    return 0 if report["all_converged"] else 1


__all__ = ["PRESETS", "build_parser", "main", "parse_args"]
