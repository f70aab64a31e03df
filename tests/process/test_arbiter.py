"""The arbiter with fake children (tests/process/arbiter_harness.py), in a real subprocess.

Each test starts the harness in its own session and kills that process group
at the end, so nothing outlives a failing test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.board import SUPERVISOR, Board, worker_name
from engine.codes import EXIT_BOOT_FAILURE, EXIT_OK

pytestmark = pytest.mark.slow

HARNESS = Path(__file__).with_name("arbiter_harness.py")
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # an upper bound for things that take well under a second

FAST = {
    "count": 2,
    "graceful_timeout_s": 5.0,
    "drain_s": 0.0,
    "heartbeat_timeout_s": 1.0,
    "boot_timeout_s": 5.0,
    "max_boot_failures": 3,
    "restart_backoff_min_ms": 20,
    "restart_backoff_max_ms": 200,
}


class Run:
    """One harness process and what it left behind."""

    def __init__(self, tmp: Path, spec: dict[str, Any]) -> None:
        self.run_dir = tmp / "run"
        self.ctl = tmp / "ctl"
        self.run_dir.mkdir(parents=True)
        self.ctl.mkdir()
        self.log_path = tmp / "stderr.log"
        full = {"run_dir": str(self.run_dir), "ctl_dir": str(self.ctl), **spec}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HARNESS), json.dumps(full)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.board = Board(str(self.run_dir))

    def log(self) -> str:
        return self.log_path.read_text()

    def supervisor(self) -> dict[str, Any]:
        return self.board.read(SUPERVISOR) or {}

    def accepting_pid(self, slot: int) -> int | None:
        status = self.board.read(worker_name(slot))
        if status and status.get("accepting") is True:
            return int(status["pid"])
        return None

    def markers(self, kind: str) -> dict[int, dict[str, Any]]:
        """{pid: data} of the marker files `<kind>-<pid>` the fake children left."""
        out = {}
        for path in self.ctl.glob(f"{kind}-*"):
            out[int(path.name.split("-")[1])] = json.loads(path.read_text())
        return out

    def wait_until(self, check: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; log:\n{self.log()}")

    def wait_running(self) -> dict[str, Any]:
        """The supervisor's status once every worker has booted."""
        self.wait_until(lambda: self.supervisor().get("state") == "running", "state running")
        return self.supervisor()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def exit_code(self) -> int:
        try:
            return self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the arbiter did not exit; log:\n{self.log()}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def _start(
        worker: str = "good",
        aux: list[dict[str, Any]] | None = None,
        remove_run_dir: bool = False,
        **workers: Any,
    ) -> Run:
        spec = {
            "worker": worker,
            "aux": aux or [],
            "remove_run_dir": remove_run_dir,
            "workers": {**FAST, **workers},
        }
        run = Run(tmp_path / f"r{len(runs)}", spec)
        runs.append(run)
        return run

    yield _start
    for run in runs:
        run.kill()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_ready_crash_respawn_and_sigterm(start: Callable[..., Run]) -> None:
    run = start(count=2)
    status = run.wait_running()
    assert "ready: 2 workers accepting on ws://127.0.0.1:8123/ws" in run.log()
    assert status["workers_expected"] == 2
    assert status["port"] == 8123
    pids = {slot: run.accepting_pid(slot) for slot in (1, 2)}
    assert status["workers"] == {"1": pids[1], "2": pids[2]}

    old = pids[1]
    assert old is not None
    os.kill(old, signal.SIGKILL)
    new = run.wait_until(
        lambda: (p := run.accepting_pid(1)) not in (None, old) and p, "worker 1 respawned"
    )
    assert run.accepting_pid(2) == pids[2]  # the other slot was left alone
    run.wait_until(lambda: run.supervisor()["workers"].get("1") == new, "status shows new pid")
    assert f"worker 1 (pid {old}) was killed by SIGKILL" in run.log()

    run.signal(signal.SIGTERM)
    assert run.exit_code() == EXIT_OK
    assert set(run.markers("term")) == {new, pids[2]}
    assert run.markers("quit") == {}
    assert run.supervisor()["state"] == "stopping"
    assert run.supervisor()["workers"] == {}


def test_workers_that_keep_failing_to_boot_make_it_give_up(start: Callable[..., Run]) -> None:
    run = start(worker="crash", count=1, max_boot_failures=3)
    assert run.exit_code() == EXIT_BOOT_FAILURE
    assert (
        "fanout: workers failed to boot 3 times in a row"
        " (last: worker 1 exited with code 4); giving up" in run.log()
    )
    assert len(run.markers("start")) == 3


def test_a_target_that_raises_exits_1_with_its_traceback(start: Callable[..., Run]) -> None:
    run = start(worker="raise", count=1, max_boot_failures=1)
    assert run.exit_code() == EXIT_BOOT_FAILURE
    log = run.log()
    assert "RuntimeError: boom at boot" in log
    assert "(last: worker 1 exited with code 1); giving up" in log


def test_worker_that_never_accepts_is_a_boot_failure(start: Callable[..., Run]) -> None:
    run = start(worker="silent", count=1, boot_timeout_s=0.5, max_boot_failures=2)
    assert run.exit_code() == EXIT_BOOT_FAILURE
    assert (
        "fanout: workers failed to boot 2 times in a row (last: worker 1 did not boot"
        " within workers.boot_timeout_s = 0.5s); giving up" in run.log()
    )
    assert all(gone(pid) for pid in run.markers("start"))


def test_hung_worker_is_killed_and_replaced(start: Callable[..., Run]) -> None:
    run = start(count=1, heartbeat_timeout_s=1.0)
    run.wait_running()
    old = run.accepting_pid(1)
    assert old is not None
    (run.ctl / f"hang-{old}").touch()
    new = run.wait_until(
        lambda: (p := run.accepting_pid(1)) not in (None, old) and p, "a new worker 1"
    )
    assert gone(old)
    log = run.log()
    assert f"worker 1 (pid {old}) is hung" in log
    assert f"worker 1 (pid {old}) was killed by SIGKILL (no heartbeat within" in log
    run.signal(signal.SIGTERM)
    assert run.exit_code() == EXIT_OK
    assert set(run.markers("term")) == {new}


def test_sigterm_drains_workers_before_stopping_aux(start: Callable[..., Run]) -> None:
    run = start(count=2, aux=[{"name": "admin", "ready": False}])
    status = run.wait_running()
    admin = run.wait_until(lambda: run.supervisor()["aux"].get("admin"), "admin started")
    workers = {int(pid) for pid in status["workers"].values()}

    run.signal(signal.SIGTERM)
    assert run.exit_code() == EXIT_OK
    assert "SIGTERM: draining 2 workers" in run.log()
    assert set(run.markers("term")) == workers | {admin}
    assert run.markers("quit") == {}
    # The aux processes got SIGTERM only after every worker had exited.
    mtime = {pid: (run.ctl / f"term-{pid}").stat().st_mtime_ns for pid in workers | {admin}}
    assert all(mtime[w] <= mtime[admin] for w in workers)


def test_sigterm_kills_a_worker_that_ignores_it(start: Callable[..., Run]) -> None:
    run = start(count=1, graceful_timeout_s=1.0)
    (run.ctl / "ignore-term").touch()
    run.wait_running()
    pid = run.accepting_pid(1)
    assert pid is not None
    run.signal(signal.SIGTERM)
    assert run.exit_code() == EXIT_OK
    assert pid in run.markers("term")  # it was asked first
    assert gone(pid)
    log = run.log()
    assert f"worker 1 (pid {pid}) did not exit within workers.graceful_timeout_s = 1s" in log
    assert f"worker 1 (pid {pid}) was killed by SIGKILL" in log


def test_sigint_is_a_quick_stop(start: Callable[..., Run]) -> None:
    run = start(count=2, aux=[{"name": "admin", "ready": False}])
    status = run.wait_running()
    admin = run.wait_until(lambda: run.supervisor()["aux"].get("admin"), "admin started")
    children = {int(pid) for pid in status["workers"].values()} | {admin}
    run.signal(signal.SIGINT)
    assert run.exit_code() == EXIT_OK
    assert set(run.markers("quit")) == children
    assert run.markers("term") == {}


def test_sigquit_is_a_quick_stop_and_run_dir_can_be_removed(start: Callable[..., Run]) -> None:
    run = start(count=1, remove_run_dir=True)
    status = run.wait_running()
    assert run.run_dir.is_dir()
    run.signal(signal.SIGQUIT)
    assert run.exit_code() == EXIT_OK
    assert set(run.markers("quit")) == {int(status["workers"]["1"])}
    assert not run.run_dir.exists()


def test_workers_start_after_the_hub_is_ready_and_hub_is_respawned(
    start: Callable[..., Run],
) -> None:
    run = start(count=2, aux=[{"name": "hub", "first": True, "ready_after_s": 0.3}])
    run.wait_running()
    started = run.markers("start")
    workers = [data for data in started.values() if "slot" in data]
    assert sorted(w["slot"] for w in workers) == [1, 2]
    assert all(w["hub_ready"] for w in workers)

    hub = run.supervisor()["aux"]["hub"]
    os.kill(hub, signal.SIGKILL)
    run.wait_until(lambda: run.supervisor()["aux"].get("hub") not in (None, hub), "hub respawn")
    assert f"hub (pid {hub}) was killed by SIGKILL" in run.log()
    run.signal(signal.SIGTERM)
    assert run.exit_code() == EXIT_OK


def test_hub_that_never_gets_ready_makes_it_give_up(start: Callable[..., Run]) -> None:
    run = start(
        count=2,
        boot_timeout_s=0.3,
        max_boot_failures=2,
        aux=[{"name": "hub", "first": True, "ready_after_s": 3600}],
    )
    assert run.exit_code() == EXIT_BOOT_FAILURE
    assert (
        "fanout: hub failed to boot 2 times in a row (last: hub did not boot within"
        " workers.boot_timeout_s = 0.3s); giving up" in run.log()
    )
    assert not any("slot" in data for data in run.markers("start").values())
