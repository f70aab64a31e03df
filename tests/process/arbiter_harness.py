"""Runs an Arbiter with fake children; started as a subprocess by test_arbiter.py.

Usage: python arbiter_harness.py '<json spec>'. The spec holds `run_dir`,
`ctl_dir` (where children leave markers and the test leaves instructions),
`workers` (overrides of the [workers] section), `worker` (the fake worker's
behaviour) and `aux` (fake aux processes). Exits with the arbiter's exit code.

Fake processes leave marker files in ctl_dir, named after their pid:
`start-<pid>` (JSON: slot, whether the hub was ready), `term-<pid>` on SIGTERM,
`quit-<pid>` on SIGQUIT. A fake worker stops its heartbeat for good when the
file `hang-<pid>` appears, and ignores SIGTERM when `ignore-term` exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from engine.board import Board, worker_name
from engine.config import default_config
from engine.supervisor.arbiter import Arbiter, AuxSpec


def mark(ctl: str, name: str, data: dict[str, Any] | None = None) -> None:
    tmp = os.path.join(ctl, f".{name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data or {}, fh)
    os.replace(tmp, os.path.join(ctl, name))


def on_stop_signals(ctl: str, *, exit_on_term: bool) -> None:
    def on_term(signum: int, frame: FrameType | None) -> None:
        mark(ctl, f"term-{os.getpid()}")
        if exit_on_term:
            os._exit(0)

    def on_quit(signum: int, frame: FrameType | None) -> None:
        mark(ctl, f"quit-{os.getpid()}")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGQUIT, on_quit)


def make_worker(spec: dict[str, Any]) -> Callable[[int], None]:
    run_dir, ctl, mode = spec["run_dir"], spec["ctl_dir"], spec["worker"]

    def worker(slot: int) -> None:
        pid = os.getpid()
        hub_ready = os.path.exists(os.path.join(run_dir, "hub.ready"))
        mark(ctl, f"start-{pid}", {"slot": slot, "hub_ready": hub_ready})
        if mode == "crash":
            sys.exit(4)
        if mode == "raise":
            raise RuntimeError("boom at boot")
        on_stop_signals(ctl, exit_on_term=not os.path.exists(os.path.join(ctl, "ignore-term")))
        board = Board(run_dir)
        accepting = mode != "silent"
        while True:
            if os.path.exists(os.path.join(ctl, f"hang-{pid}")):
                time.sleep(3600)  # a hung event loop: no more heartbeats
            board.write(worker_name(slot), {"pid": pid, "slot": slot, "accepting": accepting})
            time.sleep(0.05)

    return worker


def make_aux(spec: dict[str, Any], aux: dict[str, Any]) -> AuxSpec:
    run_dir, ctl, name = spec["run_dir"], spec["ctl_dir"], aux["name"]
    ready_file = os.path.join(run_dir, f"{name}.ready")

    def target() -> None:
        mark(ctl, f"start-{os.getpid()}", {"aux": name})
        on_stop_signals(ctl, exit_on_term=True)
        time.sleep(aux.get("ready_after_s", 0.0))
        with open(ready_file, "w"):
            pass
        while True:
            time.sleep(3600)

    return AuxSpec(
        name=name,
        target=target,
        start_before_workers=aux.get("first", False),
        ready=(lambda: os.path.exists(ready_file)) if aux.get("ready", True) else None,
    )


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
    )
    cfg = default_config()
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, host="127.0.0.1", port=spec.get("port", 8123)),
        workers=dataclasses.replace(cfg.workers, **spec["workers"]),
    )
    arbiter = Arbiter(
        cfg,
        spec["run_dir"],
        worker_target=make_worker(spec),
        aux=[make_aux(spec, a) for a in spec.get("aux", [])],
        remove_run_dir=spec.get("remove_run_dir", False),
    )
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
