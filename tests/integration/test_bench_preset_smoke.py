"""`fanout bench --preset first` (the first measurement, `make bench-first`; it was
loadtest/firstbench.py), run for real at a tiny scale: it starts its own `fanout
serve`, publishes, checks convergence, writes its report and stops everything it
started. Behaviour only: no figure in the report is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadtest.bench import build_parser, parse_args, settings_from

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


def run_bench(
    tmp_path: Path, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    # a caller's FANOUT_* settings must not change the server the command starts
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "--preset", "first", *args,
         "--report-dir", str(tmp_path), "--name", "r", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * TIMEOUT_FACTOR,
    )  # fmt: skip


def test_the_first_preset_is_the_first_measurement_and_flags_override_it() -> None:
    s = settings_from(parse_args(build_parser(), ["--preset", "first"]))
    assert (s.workload.name, s.scenario, s.bus) == ("hot", "fanout", "local")
    assert s.workload.topic_names() == ["bench.hot"] and s.workload.keys == 50
    assert (s.subscribers, s.sub_procs, s.rate, s.duration_s) == (1000, 2, 10_000, 30.0)
    assert (s.workers, s.flush_ms, s.batch_ms, s.settle_s) == (2, 20, 10.0, 15.0)
    assert (s.concurrency, s.max_items, s.body) == (100, 1000, "msgpack")
    s = settings_from(parse_args(build_parser(), ["--preset", "first", "-S", "20", "-D", "2"]))
    assert (s.subscribers, s.sub_procs, s.duration_s, s.rate) == (20, 2, 2.0, 10_000)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_tiny_run_reports_every_client_converged_and_stops_the_server(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "-S", "20", "-U", "200", "-D", "2", "--settle", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads((tmp_path / "r.json").read_text())
    assert report["preset"] == "first"
    assert report["settings"]["sub_procs"] == 2 and report["settings"]["workers"] == 2
    (step,) = report["steps"]
    r = step["results"]["fanout"]

    conv = r["convergence"]
    assert conv["clients"] == 20
    assert conv["converged"] == 20
    assert conv["all_converged"] is True
    assert r["publish"]["accepted"] == 400 and r["publish"]["failed"] == 0
    assert r["delivery"]["updates"] > 0
    assert r["latency_ms"]["samples"] > 0
    assert r["errors"] == {} and r["close_codes"] == {}
    assert "every reading client converged" in result.stdout

    # everything the command started is gone
    started = r["server_processes"]
    assert {"supervisor", "worker-1", "worker-2"} <= set(started)
    alive = [name for name, pid in started.items() if _running(pid)]
    assert alive == []


@pytest.mark.slow
def test_a_server_that_cannot_start_fails_with_the_setup_exit_code(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "-S", "2", "-U", "10", "-D", "1", "--config", "/nonexistent.toml")
    assert result.returncode == 3
    assert "fanout serve exited" in result.stderr
    assert not (tmp_path / "r.json").exists()


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
