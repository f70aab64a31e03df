"""Node's `ws` (npm, tests/interop/package.json; `make test` runs `npm ci`)
runs the user's scenario (scenario.mjs via run_node.mjs) against a real worker.

Issue 15: on the engine before the fix, `ws.close()` (an empty close frame) was
answered with status code 0; `ws` then reported `RangeError: Invalid WebSocket
frame: invalid status code 0` and close code 1006/1002 instead of 1005.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.interop.conftest import HERE, TIMEOUT_MS, check_report, require
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow]

NODE = shutil.which("node")


def test_node_ws_subscribes_receives_closes_cleanly_and_recovers_with_since(
    interop_served: Served,
) -> None:
    if NODE is None:
        require("node", "node is not installed (make system-deps installs it)")
    if not (HERE / "node_modules" / "ws" / "package.json").exists():
        require("ws", "tests/interop/node_modules is missing: run `make test` (npm ci)")
    s = interop_served
    proc = subprocess.run(
        [
            str(NODE),
            str(HERE / "run_node.mjs"),
            s.ws_url,
            s.admin_url,
            "interop.node",
            str(TIMEOUT_MS),
        ],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT_FACTOR,
    )
    assert proc.returncode == 0, proc.stderr
    check_report(json.loads(proc.stdout))
