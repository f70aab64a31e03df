"""The status board: one small JSON file per process in the run directory.

Workers write theirs from a timer on their event loop (so a fresh file is also
the heartbeat: a hung loop stops writing); the supervisor writes its own. The
supervisor reads the workers' files to detect stale heartbeats; the admin
process reads them all for /readyz and /stats.

Rules:
1. Writes are atomic (write to a temporary name, then rename): a reader sees
   the old file or the new one, never half of one.
2. Each status carries `ts` (wall-clock seconds) written by its owner; staleness
   is judged from `ts`, so a reader needs no clock of the writer's.
3. Nothing here blocks for long: files are tiny and live on tmpfs when there is one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

SUPERVISOR = "supervisor"
# A shedding request from POST /rebalance: {"id", "shed": {slot: n}, "pace_s"};
# workers read it on SIGUSR2.
REBALANCE = "rebalance"


def worker_name(slot: int) -> str:
    return f"worker-{slot}"


class Board:
    """A directory of status files, one per named process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.json")

    def write(self, name: str, status: dict[str, Any]) -> None:
        status = {**status, "ts": time.time()}
        tmp = os.path.join(self.path, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(status, fh, separators=(",", ":"))
        os.replace(tmp, self._file(name))

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._file(name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(name))

    def read_workers(self) -> dict[int, dict[str, Any]]:
        """Every worker's status by slot."""
        out: dict[int, dict[str, Any]] = {}
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return out
        for fname in names:
            if fname.startswith("worker-") and fname.endswith(".json"):
                try:
                    slot = int(fname[len("worker-") : -len(".json")])
                except ValueError:
                    continue
                status = self.read(fname[: -len(".json")])
                if status is not None:
                    out[slot] = status
        return out


def age_s(status: dict[str, Any] | None, now: float | None = None) -> float:
    """Seconds since a status was written (infinite when there is none)."""
    if status is None or not isinstance(status.get("ts"), int | float):
        return float("inf")
    return (time.time() if now is None else now) - float(status["ts"])


def default_run_dir() -> str:
    """Where a new run directory goes: tmpfs when there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"
