"""`fanout bench merge a.json b.json ... --name merged`: one report from the
reports of N `--shard i/N` generators run by hand against one deployment.

Rules (`merge_reports`, pure):

1. The reports are one step each (no sweep) with a `fanout` result, and their
   shards are 1/N..N/N, each once (the union is the whole workload); otherwise
   ValueError naming the reports' shards.
2. Rates and counts add up: delivered updates, frames, bytes, published
   updates, clients, probes and their convergence, snapshots, errors; the
   load generators' CPU adds up too.
3. Latency: the reports' histograms are merged and the percentiles taken from
   the merged histogram; if a report carries none, every percentile is the
   maximum of the reports' and `latency_ms.method` says so.
4. Server CPU and memory: generators that read the same engine's /metrics
   (the same `server_sources`) saw the same processes over overlapping
   windows: the maximum is taken, not the sum; disjoint sources (or reports
   of servers the bench started) add up; sources that overlap without being
   the same: the maximum (a lower bound). `server_merge` says which.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.latency import merge_hist, percentiles_ms

QS = (0.5, 0.9, 0.99, 0.999)


def _result(report: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    steps = report.get("steps") or []
    if len(steps) != 1 or "fanout" not in steps[0].get("results", {}):
        raise ValueError(f"{where}: not a one-step fanout bench report (a sweep cannot be merged)")
    result: Mapping[str, Any] = steps[0]["results"]["fanout"]
    return result


def check_shards(shards: Sequence[str]) -> None:
    """Rule 1: 1/N..N/N, each once."""
    try:
        parsed = sorted((int(i), int(n)) for i, _, n in (s.partition("/") for s in shards))
    except ValueError:
        raise ValueError(f"shards {list(shards)}: expected i/N each") from None
    n = len(parsed)
    if parsed != [(i, n) for i in range(1, n + 1)]:
        raise ValueError(
            f"shards {list(shards)}: the reports must be the shards 1/{n}..{n}/{n}, each once"
        )


def _sum(rs: Sequence[Mapping[str, Any]], part: str, key: str) -> Any:
    return sum((r.get(part) or {}).get(key) or 0 for r in rs)


def _counter(dicts: Sequence[Mapping[str, int] | None]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        total.update(d or {})
    return dict(total)


def merge_latency(lats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rule 3."""
    out: dict[str, Any]
    if lats and all("histogram" in lat for lat in lats):
        hist: dict[int, int] = {}
        for lat in lats:
            merge_hist(hist, {int(b): int(n) for b, n in lat["histogram"].items()})
        out = dict(percentiles_ms(hist, QS))
        out["histogram"] = {str(b): n for b, n in sorted(hist.items())}
        out["method"] = "percentiles of the merged latency histograms"
    else:
        names = {k for lat in lats for k in lat if k.startswith("p")}
        out = {
            k: max((lat[k] for lat in lats if lat.get(k) is not None), default=None)
            for k in sorted(names)
        }
        out["method"] = (
            "a report carries no latency histogram: each percentile is the maximum of the "
            "reports' (an upper bound)"
        )
    out["max"] = max((lat.get("max") or 0 for lat in lats), default=None)
    out["samples"] = sum(lat.get("samples") or 0 for lat in lats)
    return out


def _per_million(cpu_s: float, n: int) -> float | None:
    return round(cpu_s / (n / 1e6), 3) if n else None


def server_merge(rs: Sequence[Mapping[str, Any]]) -> str:
    """Rule 4: "max" (one engine seen by every generator), "sum" or "overlap"."""
    sources = [frozenset(r.get("server_sources") or ()) for r in rs]
    if not all(sources):
        return "sum"
    if len(set(sources)) == 1:
        return "max"
    if sum(len(x) for x in sources) == len(frozenset().union(*sources)):
        return "sum"
    return "overlap"


MERGE_NOTES = {
    "max": "max over the reports (one engine's /metrics seen by every generator)",
    "sum": "sum over the reports (different servers)",
    "overlap": "max over the reports (their /metrics sources overlap: a lower bound)",
}


def merge_cpu(
    rs: Sequence[Mapping[str, Any]], updates: int, frames: int, window: float
) -> dict[str, Any]:
    """Rules 2 and 4 for CPU."""
    how = server_merge(rs)
    pick = sum if how == "sum" else max
    server = float(pick(_sum([r], "cpu", "server_s") for r in rs))
    loadgen = float(_sum(rs, "cpu", "loadgen_s"))
    bound = list(
        dict.fromkeys(
            str(r["cpu"].get("generator_bound_reason"))
            for r in rs
            if r["cpu"].get("generator_bound")
        )
    )
    return {
        "server_s": round(server, 3),
        "server_core_share": round(server / window, 3) if window else None,
        "server_s_per_million_updates": _per_million(server, updates),
        "server_s_per_million_frames": _per_million(server, frames),
        "server_merge": MERGE_NOTES[how],
        "loadgen_s": round(loadgen, 3),
        "loadgen_core_share": round(float(_sum(rs, "cpu", "loadgen_core_share")), 3),
        "loadgen_over_server": round(loadgen / server, 3) if server > 0 else None,
        "generator_bound": bool(bound),
        "generator_bound_reason": "; ".join(bound) or None,
    }


def merge_memory(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rule 4 for memory."""
    pick = sum if server_merge(rs) == "sum" else max
    keys = ("server_rss_before_bytes", "server_rss_connected_bytes", "server_rss_end_bytes",
            "server_rss_peak_bytes")  # fmt: skip
    out: dict[str, Any] = {k: pick(_sum([r], "memory", k) for r in rs) for k in keys}
    out["rss_guard_tripped"] = any((r.get("memory") or {}).get("rss_guard_tripped") for r in rs)
    return out


def merge_convergence(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    convs = [r["convergence"] for r in rs]
    clients = sum(c["clients"] for c in convs)
    converged = sum(c["converged"] for c in convs)
    snaps = sum(c.get("snapshots", 0) for c in convs)
    matched = sum(c.get("snapshots_matched", 0) for c in convs)
    return {
        "clients": clients,
        "converged": converged,
        "fraction": round(converged / clients, 4) if clients else None,
        "all_converged": clients > 0 and all(c["all_converged"] for c in convs),
        "settle_s": max(c.get("settle_s") or 0 for c in convs),
        "examples": [e for c in convs for e in c.get("examples", [])][:3],
        "slow_clients": sum(c.get("slow_clients", 0) for c in convs),
        "slow_closed": sum(c.get("slow_closed", 0) for c in convs),
        "slow_close_codes": _counter([c.get("slow_close_codes") for c in convs]),
        "probes": clients,
        "probes_converged": converged,
        "order_errors": sum(c.get("order_errors", 0) for c in convs),
        "snapshots": snaps,
        "snapshots_matched": matched,
        "all_snapshots_matched": snaps == matched,
    }


def merge_results(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One `results.fanout` from the generators' (rules 2-4)."""
    window = max(float(r["window_s"]) for r in rs)
    d = {k: sum(int(r["delivery"].get(k) or 0) for r in rs)
         for k in ("updates", "frames", "bytes", "updates_counted_by_probes", "probes")}  # fmt: skip
    delivery = {
        **d,
        "updates_per_s": round(_sum(rs, "delivery", "updates_per_s"), 1),
        "frames_per_s": round(_sum(rs, "delivery", "frames_per_s"), 1),
        "bytes_per_s": round(_sum(rs, "delivery", "bytes_per_s"), 1),
        "updates_per_frame": round(d["updates"] / d["frames"], 2) if d["frames"] else None,
        "updates_estimated": any(r["delivery"].get("updates_estimated") for r in rs),
    }
    publish = {k: _sum(rs, "publish", k) for k in ("sent", "accepted", "failed", "requests")}
    publish["achieved_rate"] = round(_sum(rs, "publish", "achieved_rate"), 1)
    publish["errors"] = _counter([(r.get("publish") or {}).get("errors") for r in rs])
    return {
        "target": "fanout",
        "merged_shards": [r.get("shard") for r in rs],
        "bus": rs[0].get("bus"),
        "nodes": [n for r in rs for n in r.get("nodes") or []],
        "server_command": "; ".join(dict.fromkeys(str(r.get("server_command")) for r in rs)),
        "server_sources": sorted({u for r in rs for u in r.get("server_sources") or ()}),
        "server_measured_by": "; ".join(
            dict.fromkeys(str(r.get("server_measured_by")) for r in rs)
        ),
        "clients": sum(int(r.get("clients") or 0) for r in rs),
        "window_s": round(window, 3),
        "setup": {"ready": sum(int(r["setup"]["ready"]) for r in rs)},
        "publish": publish,
        "delivery": delivery,
        "latency_ms": merge_latency([r["latency_ms"] for r in rs]),
        "cpu": merge_cpu(rs, d["updates"], d["frames"], window),
        "memory": merge_memory(rs),
        "convergence": merge_convergence(rs),
        "errors": _counter([r.get("errors") for r in rs]),
        "close_codes": _counter([r.get("close_codes") for r in rs]),
        "connect_errors": _counter([r.get("connect_errors") for r in rs]),
    }


def _broken(r: Mapping[str, Any]) -> str | None:
    c = r["convergence"]
    if not c["all_converged"]:
        return f"only {c['converged']} of {c['clients']} probes converged"
    if not c["all_snapshots_matched"]:
        return f"only {c['snapshots_matched']} of {c['snapshots']} snapshots matched"
    return None


def merge_reports(
    reports: Sequence[Mapping[str, Any]], names: Sequence[str], command: str = ""
) -> dict[str, Any]:
    """One report from the shards' (rules 1-4); `names` name the reports in errors."""
    results = [_result(r, n) for r, n in zip(reports, names, strict=True)]
    check_shards([str(r.get("settings", {}).get("shard", "1/1")) for r in reports])
    merged = merge_results(results)
    first = reports[0]
    settings = {
        **first["settings"],
        "shard": "merged",
        "subscribers": merged["clients"],
        "sub_procs": sum(int(r["settings"]["sub_procs"]) for r in reports),
    }
    broken = _broken(merged)
    return {
        "tool": "fanout bench merge",
        "started_at": min(str(r["started_at"]) for r in reports),
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or "fanout bench merge " + " ".join(names),
        "merged_from": [
            {"report": n, "command": r.get("command")} for r, n in zip(reports, names, strict=True)
        ],
        "preset": None,
        "machine": first["machine"],
        "settings": settings,
        "workload": first["workload"],
        "sweep": None,
        "steps": [
            {
                "value": None,
                "results": {"fanout": merged},
                "broken": {"fanout": broken},
                "ratios": {},
            }
        ],
        "sustained": {},
        "all_converged": broken is None,
    }


def main(argv: Sequence[str]) -> int:
    """`fanout bench merge`: write <report-dir>/<name>.json and .md; exit 0 when every
    client of every shard converged, 1 when not, 2 on reports that do not fit."""
    from loadtest import report as rep

    p = argparse.ArgumentParser(
        prog="fanout bench merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("reports", nargs="+", help="the JSON reports of the --shard generators")
    p.add_argument("--name", default="merged", help="report file name without extension")
    p.add_argument("--report-dir", default="reports")
    a = p.parse_args(argv)
    try:
        loaded = []
        for path in a.reports:
            with open(path, encoding="utf-8") as fh:
                loaded.append(json.load(fh))
        merged = merge_reports(loaded, a.reports, "fanout bench merge " + " ".join(argv))
    except (OSError, ValueError, KeyError) as exc:
        print(f"fanout bench merge: {exc}", file=sys.stderr)
        return 2
    json_path, md_path = rep.write(merged, f"{a.report_dir.rstrip('/')}/{a.name}", None)
    print(rep.markdown(merged))
    print(f"reports: {json_path}, {md_path}", file=sys.stderr)
    return 0 if merged["all_converged"] else 1


__all__ = ["check_shards", "main", "merge_latency", "merge_reports", "merge_results"]
