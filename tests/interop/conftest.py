"""The user's view of fanout through three WebSocket stacks that share no code
with it: Node's `ws` (npm), Python's `websockets` (PyPI) and Chromium's own
WebSocket. Each runs the same scenario (scenario.mjs; the Python one mirrors
it) against one real `fanout serve` and returns a report that `check_report`
reads as a user would: what was received, and the close code each stack saw.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.serve import TIMEOUT_FACTOR, Served

HERE = Path(__file__).resolve().parent
TIMEOUT_MS = int(10_000 * TIMEOUT_FACTOR)

# The scenario's stream topics (`<prefix>.ev`); `<prefix>.s` are state topics.
TOPIC_RULES = [{"pattern": "interop.*.ev", "mode": "stream", "history": 100}]


@pytest.fixture(scope="package")  # stopped once the package's tests are done
def interop_served(tmp_path_factory: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1"],
        env={"FANOUT_TOPICS": json.dumps(TOPIC_RULES)},
        log_path=str(tmp_path_factory.mktemp("interop") / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def publish(served: Served, items: list[dict[str, Any]]) -> list[str]:
    """POST /publish with a batch; the positions answered."""
    req = urllib.request.Request(
        served.admin_url + "/publish",
        data=json.dumps({"items": items}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10 * TIMEOUT_FACTOR) as resp:
        body = json.loads(resp.read())
    pos: list[str] = body["pos"]
    return pos


def require(what: str, reason: str) -> None:
    """Skip when a stack is missing here, but fail in CI, where `make test`
    installs every stack (a skipped interop test would hide a broken install)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI: {reason}")
    pytest.skip(reason)


def check_report(report: dict[str, Any]) -> None:
    """What every stack must have seen (docs/protocol.md sections 1-4 and 6)."""
    initial, live, missed = (report["published"][k] for k in ("initial", "live", "missed"))
    assert report["protocol"] == "fanout.v1"
    assert report["hello"] == {"op": "hello", "v": 1}
    assert report["ack"] == "ack"
    snap = report["snap_state"]
    assert snap["full"] is True and snap["items"] == {"a": 1, "b": 1}
    assert snap["pos"] == initial[1]
    ev = report["snap_stream"]
    assert ev["items"] == [[initial[2], "e1"], [initial[3], "e2"]]
    assert report["upd"] == {"items": {"a": 2}, "pos": live[0]}
    assert report["evt"] == {"items": [[live[1], "e3"]]}
    # ws.close() without a code: the engine answers an empty close, which the
    # stack reports as 1005 ("no status received"): a clean close, no error
    assert report["close_empty"] == {"code": 1005, "clean": True, "errors": []}
    # reconnected with `since`: exactly what was missed, with its positions
    resnap = report["resnap_state"]
    assert resnap["full"] is False and resnap["items"] == {"a": 3, "c": 1}
    assert resnap["pos"] == missed[1] and resnap["epoch"] == snap["epoch"]
    reev = report["resnap_stream"]
    assert reev["full"] is False
    assert reev["items"] == [[missed[2], "e4"], [missed[3], "e5"]]
    assert report["close_1000"] == {"code": 1000, "clean": True, "errors": []}
    assert report["close_4000"] == {"code": 4000, "clean": True, "errors": []}
