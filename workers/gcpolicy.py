"""The worker's garbage-collector policy, and what it costs (the only place
that touches the `gc` module's thresholds).

Rules:
1. Inherited objects are frozen (`gc.freeze`, at the fork): the collector
   never walks what the supervisor built (modules, config), so their pages
   stay shared with it.
2. A collection of the youngest generation starts after `GEN0_THRESHOLD` net
   new container objects, not CPython's 700. A flush tick builds its plan (a
   list and a tuple per frame: thousands at scale) and frees it within the
   tick; with 700, collections fell in the middle of plans, promoted the
   plan's objects, and those promotions made CPython run a full collection
   every few seconds: with 10,000 connections on two workers, 44-161 ms each,
   every ~3 s, a stall of every frame the worker had to send (docs/benchmarks.md,
   "Garbage collection in the workers"). With 20,000 a plan is freed before it is collected,
   and the steady state collects almost never. Cyclic garbage (a closed
   connection and its session refer to each other) waits for at most 20,000
   new objects: a few MB.
3. No collection while a flush's plan lives: the worker's flush loop turns
   automatic collection off from the plan to its last frame (for
   `fanout_flush_duration_seconds`), so a plan bigger than `GEN0_THRESHOLD`
   (20,000 sessions of 5 topics each: 120,000 objects) is not promoted
   either. Allocations meanwhile are counted as ever: the first one
   after the flush collects if they passed the threshold, when the plan is gone.
4. Every collection is counted by generation and timed
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

GEN0_THRESHOLD = 20_000


def tune() -> tuple[int, int, int]:
    """Rules 1 and 2 in this process (a worker, right after the fork); returns
    the thresholds it replaced."""
    gc.freeze()
    before = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, before[1], before[2])
    return before


@contextmanager
def no_collection() -> Iterator[None]:
    """Rule 3: no automatic collection inside the block (it may await);
    turned back on at its end unless it was off before."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def watch(counters: WorkerCounters) -> Callable[[], None]:
    """Rule 4: count and time every collection of this process into `counters`
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
