"""Benchmark reports: one JSON document and a Markdown summary per `fanout bench` run.

The JSON holds everything measured (per step of a sweep, per target); the
Markdown is what a person reads: the workload, the machine, the exact command,
and one table per step with fanout and the baseline side by side and their
ratio. Pure functions apart from `write`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# (label, path into a target's result, format, how the ratio reads)
_ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("delivered updates/s", ("delivery", "updates_per_s"), ",.0f"),
    ("frames/s", ("delivery", "frames_per_s"), ",.0f"),
    ("updates per frame", ("delivery", "updates_per_frame"), ",.1f"),
    ("published updates/s (achieved)", ("publish", "achieved_rate"), ",.0f"),
    ("latency p50 (ms)", ("latency_ms", "p50"), ",.1f"),
    ("latency p99 (ms)", ("latency_ms", "p99"), ",.1f"),
    ("latency p99.9 (ms)", ("latency_ms", "p999"), ",.1f"),
    ("latency max (ms)", ("latency_ms", "max"), ",.1f"),
    ("server CPU (share of a core)", ("cpu", "server_core_share"), ".2f"),
    ("load generator CPU (share of a core)", ("cpu", "loadgen_core_share"), ".2f"),
    ("load generator CPU ÷ server CPU", ("cpu", "loadgen_over_server"), ".2f"),
    ("server CPU-s per million updates", ("cpu", "server_s_per_million_updates"), ",.3f"),
    ("server CPU-s per million frames", ("cpu", "server_s_per_million_frames"), ",.3f"),
    ("redis-server CPU (share of a core)", ("cpu", "bus_server_core_share"), ".2f"),
    ("redis-server CPU-s per million updates", ("cpu", "bus_server_s_per_million_updates"), ",.3f"),
    ("connect time, first to last connection (s)", ("setup", "connect_s"), ",.2f"),
    (
        "server CPU per connection while connecting (µs)",
        ("setup", "connect_server_us_per_connection"),
        ",.0f",
    ),
    ("server RSS connected (MiB)", ("memory", "server_rss_connected_bytes"), "mib"),
    ("server RSS peak (MiB)", ("memory", "server_rss_peak_bytes"), "mib"),
    ("RSS per connection (KiB)", ("memory", "rss_per_connection_bytes"), "kib"),
    ("PSS per connection (KiB)", ("memory", "per_connection_bytes", "pss"), "kib"),
    ("anonymous memory per connection (KiB)", ("memory", "per_connection_bytes", "anon"), "kib"),
    ("server RSS end ÷ connected", ("memory", "rss_end_over_connected"), ".3f"),
    ("clients converged (fraction)", ("convergence", "fraction"), ".4f"),
    ("probes converged", ("convergence", "probes_converged"), ",.0f"),
    ("snapshots matched (counting clients)", ("convergence", "snapshots_matched"), ",.0f"),
    ("snapshots checked (counting clients)", ("convergence", "snapshots"), ",.0f"),
    ("machine busy (cores)", ("cpu", "machine_busy_core_share"), ".2f"),
    ("storm: recovered in (s)", ("storm", "recover_s"), ".2f"),
    ("churn: connections replaced", ("churn", "churned"), ",.0f"),
    ("slow clients (not reading)", ("convergence", "slow_clients"), ",.0f"),
    ("slow clients closed by the server", ("convergence", "slow_closed"), ",.0f"),
]

_OPTIONAL = {label for label, _, _ in _ROWS[-5:]}  # scenario rows: shown when not all zero


# A run is generator-bound when the load generator used more than this share of the
# server's CPU, or when the machine's busy cores reached this share of its cores.
GENERATOR_OVER_SERVER_MAX = 0.5
SATURATED_BUSY_SHARE = 0.95


def generator_bound(
    loadgen_cpu_s: float, server_cpu_s: float, busy_cores: float, cores: int
) -> str | None:
    """Why a run's figures may measure the load generator rather than the server, or
    None: the generator used more than half the server's CPU (both over the same
    window; the server's includes its bus server), or the machine was saturated
    (busy cores >= 95% of its cores: the server waited for a CPU)."""
    reasons = []
    if loadgen_cpu_s > GENERATOR_OVER_SERVER_MAX * server_cpu_s:
        over = loadgen_cpu_s / server_cpu_s if server_cpu_s > 0 else float("inf")
        reasons.append(
            f"load generator CPU {loadgen_cpu_s:.2f} s = {over:.2f}x the server's "
            f"{server_cpu_s:.2f} s (> {GENERATOR_OVER_SERVER_MAX:g})"
        )
    if busy_cores >= SATURATED_BUSY_SHARE * cores:
        reasons.append(
            f"machine saturated: {busy_cores:.2f} of {cores} cores busy "
            f"(>= {SATURATED_BUSY_SHARE:.0%})"
        )
    return "; ".join(reasons) or None


def dig(d: Any, path: Sequence[str]) -> Any:
    for p in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(p)
    return d


def fmt(x: Any, spec: str) -> str:
    if x is None:
        return "n/a"
    if spec == "mib":
        return f"{x / 2**20:,.1f}"
    if spec == "kib":
        return f"{x / 1024:,.1f}"
    return format(x, spec)


def ratios(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """fanout ÷ baseline for every numeric row both targets have."""
    f, b = results.get("fanout"), results.get("baseline")
    out: dict[str, float | None] = {}
    if not f or not b:
        return out
    for label, path, _ in _ROWS:
        x, y = dig(f, path), dig(b, path)
        if isinstance(x, int | float) and isinstance(y, int | float) and y:
            out[label] = round(x / y, 4)
    return out


def step_table(step: Mapping[str, Any]) -> list[str]:
    results: Mapping[str, Mapping[str, Any]] = step["results"]
    targets = [t for t in ("fanout", "baseline") if t in results]
    both = len(targets) == 2
    head = "| metric | " + " | ".join(targets) + (" | fanout ÷ baseline |" if both else " |")
    lines = [head, "|" + " --- |" * (len(targets) + 1 + (1 if both else 0))]
    rat = step.get("ratios") or {}
    for label, path, spec in _ROWS:
        values = [dig(results[t], path) for t in targets]
        if all(v is None for v in values) or (label in _OPTIONAL and not any(values)):
            continue
        row = f"| {label} | " + " | ".join(fmt(v, spec) for v in values)
        if both:
            r = rat.get(label)
            row += f" | {'n/a' if r is None else format(r, '.3g') + 'x'}"
        lines.append(row + " |")
    return lines


def _generator_lines(step: Mapping[str, Any]) -> list[str]:
    """Each target's generator-bound flag, and how the clients were split."""
    lines = []
    for t, r in step["results"].items():
        cpu, conv = r.get("cpu") or {}, r.get("convergence") or {}
        if cpu.get("generator_bound"):
            lines.append(f"- **{t}: generator-bound**: {cpu.get('generator_bound_reason')}")
        elif "generator_bound" in cpu:
            lines.append(f"- {t}: not generator-bound (load generator ÷ server CPU "
                         f"{fmt(cpu.get('loadgen_over_server'), '.2f')})")  # fmt: skip
        if "probes" in conv:
            lines.append(
                f"- {t}: {conv['probes_converged']:,} of {conv['probes']:,} probes converged "
                f"(every frame decoded), {conv['snapshots_matched']:,} of "
                f"{conv['snapshots']:,} counting clients' snapshots matched"
                + (
                    f"; {conv['order_errors']:,} out-of-order updates"
                    if conv.get("order_errors")
                    else ""
                )
            )
    return lines


def _bus_line(s: Mapping[str, Any], with_baseline: bool) -> str:
    if s.get("target_ws"):
        return (
            "a running engine the bench did not start (--target): subscribers -> "
            f"{s['target_ws']}, publisher -> {s['target_admin']}; its own bus and workers"
        )
    nodes = int(s.get("nodes") or 1)
    if s.get("bus", "local") == "local":
        return "local (one node, its embedded hub)"
    if nodes == 1:
        return "redis (a redis-server of the run), 1 node: publisher and subscribers on it"
    subs = "node-2" if nodes == 2 else f"node-2..node-{nodes}"
    return (
        f"redis (a redis-server of the run), {nodes} nodes: the publisher posts to node-1, "
        f"the subscribers are on {subs} (every delivery crossed Redis between nodes); "
        "server CPU and RSS summed over the nodes, redis-server's apart"
        + ("; the baseline is one process with no bus" if with_baseline else "")
    )


def markdown(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    lines = [
        f"# fanout bench: {s['workload']} / {s['scenario']}",
        "",
        f"- started {report['started_at']}; command: `{report['command']}`",
        f"- workload: {report['workload']}",
        f"- {s['subscribers']:,} subscribers in {s['sub_procs']} processes, "
        f"{s['rate']:,.0f} updates/s for {s['duration_s']:g} s (batches every "
        f"{s['batch_ms']:g} ms via "
        + ("WebSocket `pub` batches" if s.get("publish_via") == "ws" else "POST /publish")
        + ")"
        + (
            ""
            if s.get("target_ws")
            else f"; fanout: {s['workers']} workers, flush_interval_ms = {s['flush_ms']}"
        )
        + (f"; max_hz {s['max_hz']:g}" if s.get("max_hz") else ""),
        f"- bus: {_bus_line(s, any('baseline' in st['results'] for st in report['steps']))}",
        f"- machine: {m['cpu_model'] or 'unknown CPU'}, {m['cpus']} cores, "
        f"{m['memory_bytes'] / 2**30:.1f} GiB, Python {m['python']}, fd limit {m['fd_limit']}",
        "- server and load generator share this machine: see the load generator's CPU",
        "",
    ]
    for step in report["steps"]:
        if report.get("sweep"):
            lines += [f"## {report['sweep']} = {step['value']:,}", ""]
        lines += step_table(step)
        for t, why in (step.get("broken") or {}).items():
            if why:
                lines.append(f"\n- {t} broke: {why}")
        lines += _generator_lines(step)
        for t, r in step["results"].items():
            extra = []
            mem = r.get("memory") or {}
            if mem.get("warmup_connections"):
                start = mem.get("per_connection_from_start_bytes") or {}
                extra.append(
                    f"memory per connection measured after {mem['warmup_connections']} "
                    "warm-up connections (one-time costs left out; from the start, RSS "
                    f"{fmt(start.get('rss'), 'kib')} KiB, PSS {fmt(start.get('pss'), 'kib')} KiB)"
                )
            measured_by = str(r.get("server_measured_by") or "")
            if "/metrics" in measured_by:  # --target: a running engine, not started here
                extra.append(f"server CPU and memory from {measured_by}")
            if r.get("merged_shards"):
                extra.append(
                    f"merged from the shards {', '.join(map(str, r['merged_shards']))}; "
                    f"server figures: {r['cpu'].get('server_merge')}; latency: "
                    f"{r['latency_ms'].get('method')}"
                )
            if r.get("errors"):
                extra.append(f"errors {r['errors']}")
            if r.get("close_codes"):
                extra.append(f"closes {r['close_codes']}")
            if r["convergence"].get("slow_close_codes"):
                extra.append(f"slow clients' closes {r['convergence']['slow_close_codes']}")
            if r.get("connect_errors"):
                extra.append(f"connect errors {r['connect_errors']}")
            if extra:
                lines.append(f"- {t}: " + "; ".join(extra))
        lines.append("")
    servers = {
        t: r.get("server_command") for st in report["steps"] for t, r in st["results"].items()
    }
    for t, cmd in servers.items():
        if cmd:
            lines.append(f"- {t} server: `{cmd}`")
    if servers:
        lines.append("")
    if report.get("sustained"):
        lines.append("## Sustained (last step that did not break)")
        lines.append("")
        for t, v in report["sustained"].items():
            lines.append(f"- {t}: {report['sweep']} = {'none' if v is None else f'{v:,}'}")
        lines.append("")
    for p in report.get("plots") or []:
        lines.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    verdict = (
        "every reading client converged"
        if report["all_converged"]
        else "NOT every client converged"
    )
    lines.append(f"\n**{verdict}** (every target, every step).")
    return "\n".join(lines) + "\n"


def write(
    report: dict[str, Any], base: str, plot: Callable[[dict[str, Any], str], list[str]] | None
) -> tuple[str, str]:
    """Write `<base>.json` and `<base>.md` (and plots for a sweep); returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    if plot is not None and report.get("sweep"):
        report["plots"] = plot(report, base)
    json_path, md_path = base + ".json", base + ".md"
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
        fh.write("\n")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(markdown(report))
    return json_path, md_path


__all__ = ["generator_bound", "markdown", "ratios", "step_table", "write"]
