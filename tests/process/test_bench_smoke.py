"""`fanout bench` run for real at a tiny scale: it starts fanout (and the baseline),
measures, writes its JSON and Markdown reports (and PNG plots for a sweep), says
whether every client converged, and stops everything it started. Behaviour only:
no figure is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.redis_server import redis_available

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


def bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", *args,
         "--report-dir", str(tmp_path), "--name", "r", "--quiet", "--settle", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
    )  # fmt: skip
    path = tmp_path / "r.json"
    assert path.exists(), result.stdout[-2000:] + result.stderr[-3000:]
    return result, json.loads(path.read_text())


def bench_fanout(
    tmp_path: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], dict[str, Any]]:
    """`bench` that must succeed, and its one step's fanout result."""
    result, report = bench(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, report, report["steps"][0]["results"]["fanout"]


def _pids(report: dict[str, Any]) -> list[int]:
    return [
        int(pid)
        for step in report["steps"]
        for r in step["results"].values()
        for pid in r["server_processes"].values()
    ]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_hot_run_with_baseline_reports_both_side_by_side_and_every_client_converged(
    tmp_path: Path,
) -> None:
    result, report = bench(
        tmp_path, "-S", "40", "-U", "400", "-D", "2", "--baseline", "--source-addrs", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["all_converged"] is True
    (step,) = report["steps"]
    assert set(step["results"]) == {"fanout", "baseline"}
    for r in step["results"].values():
        assert r["convergence"]["converged"] == r["convergence"]["clients"] == 40
        assert r["delivery"]["updates"] > 0 and r["latency_ms"]["samples"] > 0
        assert r["errors"] == {} and r["close_codes"] == {}
        # clients were spread over two source addresses
        assert r["setup"]["source_addrs"] == ["127.0.0.1", "127.0.0.2"]
    assert "delivered updates/s" in step["ratios"]
    md = (tmp_path / "r.md").read_text()
    assert "| metric | fanout | baseline | fanout ÷ baseline |" in md
    assert "every reading client converged" in md
    assert md in result.stdout
    started = _pids(report)
    assert len(started) >= 4  # fanout: supervisor, 2 workers, ...; the baseline
    assert not [p for p in started if _running(p)]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_market_storm_every_client_reconnects_with_since_and_converges(tmp_path: Path) -> None:
    _, _, r = bench_fanout(
        tmp_path, "--workload", "market", "--storm", "-S", "40", "-U", "300", "-D", "2"
    )
    assert r["storm"]["dropped"] == r["storm"]["reconnected"] == r["storm"]["resubscribed"] == 40
    assert r["convergence"]["all_converged"] is True


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_rate_sweep_writes_plots_and_the_sustained_step(tmp_path: Path) -> None:
    result, report = bench(tmp_path, "--sweep", "rate", "--steps", "100,200", "-S", "20", "-D", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["value"] for s in report["steps"]] == [100, 200]
    assert report["sustained"] == {"fanout": 200}
    for png in report["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["plots"]) == 2


def test_bench_help_lists_every_scenario_and_workload() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0
    for word in ("--idle", "--slow", "--storm", "--churn", "--baseline", "--sweep", "market",
                 "--bus", "--nodes"):  # fmt: skip
        assert word in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
def test_redis_bus_two_nodes_every_update_crosses_from_the_publishing_node_to_the_other(
    tmp_path: Path,
) -> None:
    result, report = bench(
        tmp_path, "--bus", "redis", "--nodes", "2", "-S", "6", "-U", "200", "-D", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["all_converged"] is True
    assert report["settings"]["bus"] == "redis" and report["settings"]["nodes"] == 2
    r = report["steps"][0]["results"]["fanout"]
    assert r["bus"] == "redis"
    node1, node2 = r["nodes"]
    assert (node1["name"], node1["role"]) == ("node-1", "publisher")
    assert (node2["name"], node2["role"]) == ("node-2", "subscribers")
    # published to node 1 only, read on node 2 only: every delivery went through Redis
    assert set(r["setup"]["subscriber_urls"].values()) == {node2["url"]}
    assert r["convergence"]["converged"] == r["convergence"]["clients"] == 6
    assert r["delivery"]["updates"] > 0 and r["latency_ms"]["samples"] > 0
    assert r["errors"] == {} and r["close_codes"] == {}
    assert set(r["cpu"]["server_per_node_s"]) == {"node-1", "node-2"}
    assert r["cpu"]["bus_server_s"] is not None  # redis-server's CPU, apart
    md = (tmp_path / "r.md").read_text()
    assert "- bus: redis" in md and "2 nodes" in md
    assert "redis-server CPU" in md
    assert "every reading client converged" in md
    # everything it started is gone: both nodes' processes and the redis-server
    started = [*_pids(report), int(r["bus_server"]["pid"])]
    assert len(started) >= 7  # 2 x (supervisor, 2 workers, admin), redis-server
    assert not [p for p in started if _running(p)]


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("flags", "check"),
    [
        (
            ["--idle"],
            # 2 warm-up subscribers (S/10) connected before the memory baseline
            lambda r: (
                r["memory"]["rss_per_connection_bytes"] is not None
                and r["memory"]["warmup_connections"] == 2
                and {"rss", "pss", "anon", "file"} <= set(r["memory"]["per_connection_bytes"])
            ),
        ),
        (["--slow", "0.25"], lambda r: r["convergence"]["slow_clients"] == 5),
        (["--churn", "20"], lambda r: r["churn"]["churned"] > 0 and r["churn"]["failed"] == 0),
    ],
    ids=["idle", "slow", "churn"],
)
def test_scenarios_report_their_figures_and_the_reading_clients_converge(
    tmp_path: Path, flags: list[str], check: Any
) -> None:
    _, _, r = bench_fanout(tmp_path, *flags, "-S", "20", "-U", "200", "-D", "2")
    assert r["convergence"]["all_converged"] is True
    assert check(r)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_publishing_over_websocket_uses_one_connection_per_worker_and_everyone_converges(
    tmp_path: Path,
) -> None:
    _, _, r = bench_fanout(
        tmp_path, "--publish-via", "ws", "--workload", "market", "-S", "60", "-U", "2000", "-D", "2"
    )
    # two workers (the default): batches went to both (SO_REUSEPORT picks the worker;
    # the publisher kept one connection per distinct worker of 16 tries at most)
    assert r["publish"]["ws_connections"] == 2, r["publish"]
    assert r["publish"]["failed"] == 0 and r["publish"]["accepted"] == r["publish"]["sent"]
    assert r["convergence"]["all_converged"] and r["convergence"]["all_snapshots_matched"]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_idle_connections_are_spread_over_source_addresses_and_report_the_connect_time(
    tmp_path: Path,
) -> None:
    _, _, r = bench_fanout(tmp_path, "--idle", "-S", "30", "-D", "1", "--source-addresses", "3")
    setup = r["setup"]
    # each client bound one of three loopback source addresses before it connected
    assert setup["source_addrs"] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert setup["ready"] == 30 and r["connect_errors"] == {}
    assert setup["connect_s"] is not None and setup["connects_per_s"] is not None
    assert setup["fd_limit"][0] == setup["fd_limit"][1]  # soft raised to the hard limit
    assert setup["server_env"] == {}  # 33 connections fit the default max_connections
    assert "connect time, first to last connection (s)" in (tmp_path / "r.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_probes_decode_the_other_clients_count_and_check_their_snapshot_at_the_end(
    tmp_path: Path,
) -> None:
    result, _, r = bench_fanout(
        tmp_path, "--workload", "market", "-S", "80", "-U", "300", "-D", "2"
    )
    conv, delivery, cpu = r["convergence"], r["delivery"], r["cpu"]
    assert (conv["probes"], conv["probes_converged"]) == (50, 50)  # at least 50
    assert (conv["snapshots"], conv["snapshots_matched"]) == (30, 30)  # every other one
    assert conv["all_converged"] is True and conv["all_snapshots_matched"] is True
    assert conv["order_errors"] == 0
    assert delivery["updates_estimated"] is True and delivery["bytes"] > 0
    assert delivery["updates"] > delivery["updates_counted_by_probes"] > 0
    assert cpu["loadgen_over_server"] is not None and isinstance(cpu["generator_bound"], bool)
    assert ("generator-bound" in result.stdout) is True
    assert "50 of 50 probes converged" in result.stdout
    assert "30 of 30 counting clients' snapshots matched" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_counting_clients_without_a_low_water_mark_read_every_frame_and_converge(
    tmp_path: Path,
) -> None:
    _, report, r = bench_fanout(tmp_path, "--read-lowat", "0", "-S", "60", "-U", "300", "-D", "2")
    assert report["settings"]["read_lowat"] == 0
    assert (r["convergence"]["probes"], r["convergence"]["snapshots_matched"]) == (50, 10)
    # the 10 counting clients' frames are counted as they come: more than the probes' alone
    assert r["delivery"]["updates"] > r["delivery"]["updates_counted_by_probes"] > 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_decode_all_makes_every_client_a_probe(tmp_path: Path) -> None:
    _, report, r = bench_fanout(tmp_path, "--decode-all", "-S", "60", "-U", "300", "-D", "2")
    assert report["settings"]["decode_all"] is True
    assert (r["convergence"]["probes"], r["convergence"]["snapshots"]) == (60, 0)
    assert r["delivery"]["updates_estimated"] is False
    assert r["latency_ms"]["samples"] == r["delivery"]["updates"]
