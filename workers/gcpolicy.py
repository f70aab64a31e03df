"""The worker's garbage-collector policy, and what it costs.

Rules:
1. Inherited objects are frozen (`gc.freeze`, at the fork, workers/main.py):
   the collector never walks what the supervisor built (modules, config), so
   their pages stay shared with it.
2. No automatic collection while a flush's plan lives: the worker's flush
   loop turns it off from the plan to its last frame (`no_collection`). A
   plan is a list and a tuple per frame, thousands at scale, freed within
   the tick. With collections allowed, CPython's young threshold (700) fell
   in the middle of each plan and promoted it, and those promotions made it
   run a full collection every ~3 s: with 10,000 connections on two workers,
   44-161 ms each, collecting nothing, a stall of every frame the worker had
   to send (docs/benchmarks.md, "Garbage collection in the workers").
   Allocations meanwhile are counted as ever: the first one after the flush
   collects if they passed the threshold, when the plan is gone. CPython's
   thresholds are kept, so cyclic garbage (a closed connection and its
   session refer to each other) is collected as promptly as before.
3. Every collection is counted by generation and timed
   (`fanout_gc_collections_total`, `fanout_gc_pause_seconds`): a pause is a
   stall of the worker's loop.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine.counters import WorkerCounters


@contextmanager
def no_collection() -> Iterator[None]:
    """Rule 2: no automatic collection inside the block (it may await);
    turned back on at its end unless it was off before."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def watch(counters: WorkerCounters) -> Callable[[], None]:
    """Rule 3: count and time every collection of this process into `counters`
    until the returned function is called."""
    started = [0.0]
    clock = time.perf_counter
    hist = counters.gc_hist
    by_generation = counters.gc_collections

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            hist.observe(clock() - started[0])
            by_generation[str(info["generation"])] += 1

    gc.callbacks.append(on_gc)

    def stop() -> None:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)

    return stop
