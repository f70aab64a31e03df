"""The server under test: a `fanout serve` started on free ports in its own process
group, killed with its whole group on stop."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from engine.board import Board
from loadtest.children import tied_preexec
from loadtest.ports import free_port


class Server:
    """A `fanout serve` started by this script: own process group, free ports, own run dir."""

    def __init__(
        self,
        workers: int,
        flush_ms: int,
        config: str | None,
        log_level: str,
        cpus: tuple[int, ...] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.base = tempfile.mkdtemp(
            prefix="fb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        self.log_path = os.path.join(self.base, "serve.log")
        self.port = free_port()
        self.admin_port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "FANOUT_FANOUT_FLUSH_INTERVAL_MS": str(flush_ms),
                "FANOUT_RUN_DIR": self.base,
                "PYTHONUNBUFFERED": "1",
                # the generators connect thousands of clients at once and do not
                # retry a refused upgrade: admission is not what a benchmark measures
                "FANOUT_LIMITS_UPGRADES_PER_S": "0",
            }
        )
        self.args = [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--workers",
            str(workers),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--log-level",
            log_level,
        ]
        if config:
            self.args += ["--config", config]
        env.update(extra_env or {})
        self.env_shown = {"FANOUT_FANOUT_FLUSH_INTERVAL_MS": str(flush_ms), **(extra_env or {})}
        self.env_shown.update(
            {
                k: v
                for k, v in os.environ.items()
                if k.startswith("FANOUT_") and k != "FANOUT_API_KEY"
            }
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # cwd: the run dir, so that no ./config.toml of the caller's directory is read
        # unless --config names one.
        self.proc = subprocess.Popen(
            self.args,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.base,
            preexec_fn=lambda: tied_preexec(cpus),
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env_shown.items()))
        return f"{env} fanout {shlex.join(self.args[3:])}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(
                    f"fanout serve exited with code {self.proc.returncode}:\n" + self.log_tail()
                )
            status, _ = http_get(self.admin, "/readyz")
            if status == 200:
                return
            time.sleep(0.1)
        raise SetupError(f"fanout serve not ready after {timeout_s:.0f} s:\n" + self.log_tail())

    def board_pids(self) -> dict[str, int]:
        """Names of the server's processes from the supervisor's status file."""
        names: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.base):
                path = os.path.join(self.base, entry)
                sup = Board(path).read_supervisor() if os.path.isdir(path) else None
                if sup is None:
                    continue
                names["supervisor"] = self.proc.pid if sup.pid is None else sup.pid
                for slot, pid in sup.workers.items():
                    if pid is not None:
                        names[f"worker-{slot}"] = pid
                names.update(sup.aux)
        return names

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGINT the group (a quick stop), SIGKILL what is left after 10 s."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()

    def cleanup_dir(self, keep_log_to: str | None) -> None:
        if keep_log_to:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, keep_log_to)
        shutil.rmtree(self.base, ignore_errors=True)


class SetupError(Exception):
    """The benchmark could not set up (server, subscribers); nothing was measured."""


def http_get(base: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(base.rstrip("/") + path, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None
