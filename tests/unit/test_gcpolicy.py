"""The worker's garbage-collector policy (workers/gcpolicy.py).

The collector is process state: every test here restores the thresholds,
callbacks and switch it found.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from engine.counters import WorkerCounters
from workers import gcpolicy


@pytest.fixture
def collector() -> Iterator[WorkerCounters]:
    """A watched collector with a tiny young threshold, so that allocations collect."""
    before = gc.get_threshold()
    enabled = gc.isenabled()
    counters = WorkerCounters()
    gc.collect()
    gc.enable()
    gc.set_threshold(100, before[1], before[2])
    stop = gcpolicy.watch(counters)
    try:
        yield counters
    finally:
        stop()
        gc.set_threshold(*before)
        if not enabled:
            gc.disable()


def allocate(n: int) -> list[list[int]]:
    """n live container objects (what a flush's plan holds: lists and tuples)."""
    return [[i] for i in range(n)]


def test_every_collection_is_counted_by_generation_and_timed(collector: WorkerCounters) -> None:
    gc.collect()
    gc.collect(0)
    assert collector.gc_collections["2"] == 1 and collector.gc_collections["0"] >= 1
    assert collector.gc_hist.count == sum(collector.gc_collections.values())
    assert collector.gc_hist.sum > 0


def test_a_watch_that_stopped_counts_nothing() -> None:
    counters = WorkerCounters()
    gcpolicy.watch(counters)()
    gc.collect()
    assert counters.gc_hist.count == 0 and not counters.gc_collections


def test_a_plan_is_not_collected_while_it_lives(collector: WorkerCounters) -> None:
    # without the policy, a plan of 5,000 objects is collected (and promoted) 50 times
    plan = allocate(5_000)
    assert collector.gc_collections["0"] >= 10
    del plan
    before = dict(collector.gc_collections)
    with gcpolicy.no_collection():
        plan = allocate(5_000)
        assert dict(collector.gc_collections) == before
        del plan
    # after the block collections resume, with the plan gone
    allocate(200)
    assert collector.gc_collections["0"] > before["0"]
    assert gc.isenabled()


def test_no_collection_leaves_a_collector_that_was_off_off() -> None:
    enabled = gc.isenabled()
    gc.disable()
    try:
        with gcpolicy.no_collection():
            pass
        assert not gc.isenabled()
    finally:
        if enabled:
            gc.enable()
