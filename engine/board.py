"""The status board: one small JSON file per process in the run directory.

Workers write theirs from a timer on their event loop (so a fresh file is also
the heartbeat: a hung loop stops writing); the supervisor writes its own. The
supervisor reads the workers' files to detect stale heartbeats; the admin
process reads them all for /readyz, /stats and /metrics. What a worker's and
the supervisor's files hold is engine.status (`WorkerStatus`,
`SupervisorStatus`), converted to and from JSON there; this module only moves
that JSON, as it does the admin's rebalance request (`RebalanceOrder`). The
hub's status is a plain object (`write` / `read`).

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
from collections.abc import Mapping
from typing import Any

from engine.status import RebalanceOrder, SupervisorStatus, WorkerStatus

SUPERVISOR = "supervisor"
# A shedding request from POST /rebalance (RebalanceOrder); workers read it on SIGUSR2.
REBALANCE = "rebalance"


def worker_name(slot: int) -> str:
    return f"worker-{slot}"


class Board:
    """A directory of status files, one per named process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, name: str) -> str:
        return os.path.join(self.path, f"{name}.json")

    def write(self, name: str, status: Mapping[str, Any]) -> None:
        """Write a JSON object as `name`'s status, stamped with `ts` (rules 1, 2)."""
        status = {**status, "ts": time.time()}
        tmp = os.path.join(self.path, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(status, fh, separators=(",", ":"))
        os.replace(tmp, self._file(name))

    def read(self, name: str) -> dict[str, Any] | None:
        """`name`'s status as JSON, or None (no file, or not a JSON object)."""
        try:
            with open(self._file(name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(name))

    def write_worker(self, slot: int, status: WorkerStatus) -> None:
        self.write(worker_name(slot), status.to_json())

    def write_supervisor(self, status: SupervisorStatus) -> None:
        self.write(SUPERVISOR, status.to_json())

    def read_supervisor(self) -> SupervisorStatus | None:
        doc = self.read(SUPERVISOR)
        return None if doc is None else SupervisorStatus.from_json(doc)

    def write_rebalance(self, order: RebalanceOrder) -> None:
        self.write(REBALANCE, order.to_json())

    def read_rebalance(self) -> RebalanceOrder | None:
        doc = self.read(REBALANCE)
        return None if doc is None else RebalanceOrder.from_json(doc)

    def read_workers(self) -> dict[int, WorkerStatus]:
        """Every worker's status by slot."""
        out: dict[int, WorkerStatus] = {}
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
                doc = self.read(fname[: -len(".json")])
                if doc is not None:
                    out[slot] = WorkerStatus.from_json(doc)
        return out


def default_run_dir() -> str:
    """Where a new run directory goes: tmpfs when there is one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else "/tmp"
