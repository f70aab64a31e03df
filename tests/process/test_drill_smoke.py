"""`loadtest.drill` run for real at a tiny scale: three nodes on one redis-server,
node a drained with SIGTERM under a publisher; its clients are served again by
b and c, and every client ends with every key's final value. Behaviour only: no
timing figure is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.redis_server import redis_available

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_drained_nodes_clients_are_served_again_and_every_client_converges(
    tmp_path: Path,
) -> None:
    report_path = tmp_path / "drill.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.drill", "--clients", "9", "--keys", "5",
         "--rate", "50", "--duration", "4", "--drain-at", "1.5", "--drain-s", "0.5",
         "--retry-min-ms", "100", "--retry-max-ms", "400", "--settle", "10",
         "--report", str(report_path), "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=50 * TIMEOUT_FACTOR,
    )  # fmt: skip
    assert report_path.exists(), result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert report["all_converged"] is True and report["ok"] is True
    assert report["convergence"]["converged"] == report["convergence"]["clients"] == 9
    assert report["convergence"]["keys"] == 5
    drained = report["drained_clients"]
    assert drained["clients"] == drained["closed"] == drained["served_again"] == 3
    assert drained["close_codes"] == {"1001": 3}
    assert drained["byes"] == 3
    assert drained["partial_snaps"] == 3  # recovered with `since` across nodes
    assert set(drained["landed_on"]) <= {"b", "c"}
    assert drained["served_after_close_ms"]["n"] == 3
    assert report["other_clients"]["disconnected"] == 0
    assert report["drained_node"]["exit_code"] == 0
    assert report["publish"]["updates"] > 0
    assert "served again after their close" in result.stdout
    # everything it started is gone
    for node in report["nodes"].values():
        assert not _running(node["pid"]), node


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def test_drill_help_names_its_knobs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.drill", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0
    for word in ("--clients", "--rate", "--drain-at", "--drain-s", "--settle", "--report"):
        assert word in result.stdout
