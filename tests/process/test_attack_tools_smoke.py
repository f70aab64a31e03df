"""The attack-measuring tools of issue 11 run as their docs say, at a tiny scale,
and report what the closing figures came from: `loadtest.fragflood` (finding 1),
`loadtest.topicchurn` (finding 2) and `loadtest.redisfill` (finding 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.redis_server import redis_available
from tests.support.serve import TIMEOUT_FACTOR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=240 * TIMEOUT_FACTOR,
        cwd=ROOT,
    )


def test_fragflood_sees_the_attacker_closed_1009(tmp_path: Path) -> None:
    out = run("loadtest.fragflood", "--duration", "2", "--json", str(tmp_path / "f.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "f.json").read_text())
    assert result["close_code"] == 1009
    assert result["rss_peak_mib"] < result["rss_before_mib"] + 16


def test_topicchurn_leaves_no_topic_held(tmp_path: Path) -> None:
    out = run(
        "loadtest.topicchurn",
        "--names",
        "300",
        "--grace",
        "0.5",
        "--json",
        str(tmp_path / "t.json"),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["names"] == 300
    assert result["topics_after"] == 0 and result["subscriptions_after"] == 0


@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
def test_redisfill_keeps_small_publishes_going() -> None:
    out = run("loadtest.redisfill", "--rounds", "5", "--in-flight", "4")
    assert out.returncode == 0, out.stderr
    after = [line for line in out.stdout.splitlines() if line.startswith("small publishes AFTER")]
    assert after == ["small publishes AFTER the fill: 2000/2000"], out.stdout
