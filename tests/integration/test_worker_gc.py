"""A real worker's flush and the cyclic collector (workers/gcpolicy.py rule 3).

The worker, its hub and its clients run in this process; the collector's
young threshold is set so low that collections run all the time. Each one
records whether a flush (`Fanout.plan` or `WorkerServer.write_plan`) was on
the stack that triggered it: none may be.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import Engine, eventually

FLUSH_FRAMES = frozenset({"plan", "write_plan", "deliver", "deliver_shared"})


@pytest.fixture
def collections() -> Iterator[dict[str, int]]:
    """Collections started inside and outside a flush, while the test runs."""
    seen = {"in_flush": 0, "outside": 0}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase != "start":
            return
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name in FLUSH_FRAMES:
                seen["in_flush"] += 1
                return
            frame = frame.f_back
        seen["outside"] += 1

    before = gc.get_threshold()
    enabled = gc.isenabled()
    gc.enable()
    gc.set_threshold(50, before[1], before[2])
    gc.callbacks.append(on_gc)
    try:
        yield seen
    finally:
        gc.callbacks.remove(on_gc)
        gc.set_threshold(*before)
        if not enabled:
            gc.disable()


async def test_no_collection_runs_while_a_flush_plans_or_writes(
    engine_factory: Any, collections: dict[str, int]
) -> None:
    engine: Engine = await engine_factory(fanout={"flush_interval_ms": 5})
    topics = [f"gc.t{i}" for i in range(4)]
    # one client on all four topics (planned per session), four on one each (per group)
    clients = [(await engine.subscriber(topics))[0]]
    clients += [(await engine.subscriber([t]))[0] for t in topics]
    for round_ in range(60):
        for t in topics:
            for k in range(5):
                await engine.publish(t, f"k{k}", {"round": round_, "pad": "x" * 40})
        await asyncio.sleep(0.006)  # about one flush per round

    done: set[int] = set()

    def last_round_seen() -> bool:
        for i, c in enumerate(clients):
            for m in c.take_nowait():
                if m.get("op") == "upd" and m["items"].get("k4", {}).get("round") == 59:
                    done.add(i)
        return len(done) == len(clients)

    await eventually(last_round_seen)
    assert engine.worker is not None
    assert engine.worker.fanout.stats.frames_sent >= 60  # the flushes did write
    assert collections["outside"] > 0  # collections did run, elsewhere
    assert collections["in_flush"] == 0
