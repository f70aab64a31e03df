"""`python -m loadtest.http_ingest` run for real at a tiny scale: it starts
fanout, publishes msgpack batches over keep-alive POST /publish, reports the
admin's, hub's and workers' CPU per update, and stops what it started.
Behaviour only: no figure is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


def test_http_ingest_reports_every_batch_size_and_every_process() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.http_ingest", "--batches", "1,20",
         "--clients", "1", "--duration", "1", "--max-requests", "200", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90 * TIMEOUT_FACTOR,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [run["batch"] for run in report["runs"]] == [1, 20]
    for run in report["runs"]:
        assert run["failed"] == 0 and 0 < run["requests"] <= 200
        assert run["updates"] == run["requests"] * run["batch"]
        assert {"admin", "hub", "workers"} <= run["cpu_s_per_million_updates"].keys()
        assert run["admin_us_per_request"] is not None


def test_http_ingest_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.http_ingest", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0 and "--batches" in result.stdout
