"""The first benchmark script, run for real at a tiny scale: it starts its own
`fanout serve`, publishes, checks convergence, writes its report and stops
everything it started. Behaviour only: no figure in the report is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadtest.firstbench import bucket_of, percentiles_ms

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


def run_bench(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    # a caller's FANOUT_* settings must not change the server the script starts
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    return subprocess.run(
        [sys.executable, "-m", "loadtest.firstbench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * TIMEOUT_FACTOR,
    )


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_tiny_run_reports_every_client_converged_and_stops_the_server(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_bench(
        "--subscribers", "20", "--rate", "200", "--duration", "2", "--settle", "5",
        "--report", str(report_path), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(report_path.read_text())

    conv = report["convergence"]
    assert conv["clients"] == 20
    assert conv["converged"] == 20
    assert conv["all_converged"] is True
    assert report["publish"]["accepted"] == 400 and report["publish"]["failed"] == 0
    assert report["delivery"]["updates"] > 0
    assert report["latency_ms"]["samples"] > 0
    assert report["errors"] == {} and report["close_codes"] == {}
    assert "converged: **20 of 20**" in result.stdout

    # everything the script started is gone
    started = report["server"]["processes"]
    assert {"supervisor", "worker-1", "worker-2"} <= set(started)
    alive = [name for name, pid in started.items() if _running(pid)]
    assert alive == []


@pytest.mark.slow
def test_unreachable_server_fails_with_setup_exit_code(tmp_path: Path) -> None:
    result = run_bench(
        "--url", "ws://127.0.0.1:9/ws", "--admin", "http://127.0.0.1:9",
        "--report", str(tmp_path / "r.json"), "--quiet",
    )  # fmt: skip
    assert result.returncode == 3
    assert "readyz" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_latency_buckets_are_monotonic_and_percentiles_fall_in_the_right_bucket() -> None:
    samples_ms = [1.0] * 98 + [50.0, 5000.0]
    hist: dict[int, int] = {}
    for ms in samples_ms:
        b = bucket_of(int(ms * 1e6))
        hist[b] = hist.get(b, 0) + 1
    assert bucket_of(-5) == 0
    assert bucket_of(10**6) < bucket_of(10**9) < bucket_of(10**10)
    p = percentiles_ms(hist, (0.5, 0.99, 1.0))
    assert p["p50"] == pytest.approx(1.0, abs=0.07)
    assert p["p99"] == pytest.approx(50.0, abs=0.07)
    assert p["p100"] == pytest.approx(5000.0, abs=70.0)
    assert percentiles_ms({}, (0.5,)) == {"p50": None}


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
