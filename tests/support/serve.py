"""Run a real `fanout serve` for process tests: free ports, readiness, cleanup."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from engine.board import Board
from engine.status import SupervisorStatus
from loadtest.ports import free_port

TIMEOUT_FACTOR = float(os.environ.get("FANOUT_TEST_TIMEOUT_FACTOR", "1"))


class Served:
    """A running `fanout serve` in its own process group."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, log_path: str | None = None
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
        full_env.update(
            {
                "FANOUT_SERVER_HOST": "127.0.0.1",
                "FANOUT_SERVER_PORT": str(self.port),
                "FANOUT_SERVER_ADMIN_PORT": str(self.admin_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.run_base = tempfile.mkdtemp(prefix="fanout-test-")
        full_env["FANOUT_RUN_DIR"] = self.run_base
        full_env.update(env or {})
        self.log_path = log_path
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", *args],
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:  # an unclosed error response leaks its socket (ResourceWarning at a later GC)
                return exc.code, json.loads(exc.read() or b"null")

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.admin_url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:  # an unclosed error response leaks its socket (ResourceWarning at a later GC)
                return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout * TIMEOUT_FACTOR
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"fanout serve exited with {self.proc.returncode}: {self.output()}"
                )
            try:
                status, _ = self.get("/readyz")
                if status == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"fanout serve not ready in time: {self.output()}")

    def worker_pids(self) -> dict[int, int]:
        _, stats = self.get("/stats")
        return {w["slot"]: w["pid"] for w in stats["workers"]}

    def supervisor_status(self) -> SupervisorStatus:
        """The supervisor's status on the board (names its aux processes' pids)."""
        for path in glob.glob(os.path.join(self.run_base, "fanout-*", "supervisor.json")):
            status = Board(os.path.dirname(path)).read_supervisor()
            if status is not None:
                return status
        raise AssertionError("no supervisor status on the board")

    def output(self) -> str:
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-4000:]
        return ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout * TIMEOUT_FACTOR)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        else:
            # reap anything the supervisor left behind in its group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.run_base, ignore_errors=True)
        if self.log is not subprocess.DEVNULL:
            self.log.close()  # type: ignore[union-attr]
