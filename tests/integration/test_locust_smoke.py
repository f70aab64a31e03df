"""A short headless locust session against a real `fanout serve`: the subscriber users
report publish-to-receive latency rows for the topic, and nothing failed. Behaviour
only: no figure is asserted on."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.serve import TIMEOUT_FACTOR, Served

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_headless_locust_run_has_latency_rows_and_no_failures(tmp_path: Path) -> None:
    served = Served(["--workers", "1"])
    try:
        served.wait_ready()
        prefix = tmp_path / "run"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "FANOUT_"))}
        result = subprocess.run(
            [
                sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py",
                "--headless", "-u", "5", "-r", "5", "--run-time", "5s",
                "--host", served.admin_url, "--ws-url", served.ws_url,
                "--topics", "bench.locust", "--pub-batch", "10", "--pub-per-s", "10",
                "--csv", str(prefix), "--html", str(tmp_path / "report.html"), "--only-summary",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60 * TIMEOUT_FACTOR,
        )  # fmt: skip
    finally:
        served.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    latency = rows[("WS", "upd bench.locust")]
    assert int(latency["Request Count"]) > 0
    assert int(rows[("WS", "connect")]["Request Count"]) == 4  # 5 users: 1 publisher, 4 subs
    assert int(rows[("POST", "POST /publish")]["Request Count"]) > 0
    assert all(int(r["Failure Count"]) == 0 for r in rows.values()), rows
    assert (tmp_path / "report.html").stat().st_size > 0
