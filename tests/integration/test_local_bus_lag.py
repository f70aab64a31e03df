"""The local bus' lag (engine/bus/local.py rule 6, hub.py rule 7): a worker
that stops reading its link to the hub shows a growing `bus_lag_ms` in its
status, /readyz's rule says "bus lagging" past `bus.max_lag_ms`, and once it
reads again the lag falls back and the node is ready."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.admin import http
from engine.status import SupervisorStatus
from tests.integration.conftest import TIMEOUT_FACTOR, Engine

MAX_LAG_MS = 500


def ready(engine: Engine) -> tuple[bool, list[str]]:
    assert engine.worker is not None
    now = time.time()
    status = dataclasses.replace(engine.worker.status(), pid=os.getpid(), ts=now)
    supervisor = SupervisorStatus(
        pid=os.getppid(), state="running", workers_expected=1, workers={1: os.getpid()}, ts=now
    )
    return http.readiness(
        supervisor,
        {1: status},
        now=now,
        heartbeat_timeout_s=10.0,
        parent_alive=True,
        bus_connected=True,
        max_lag_ms=MAX_LAG_MS,
    )


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s * TIMEOUT_FACTOR
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_a_worker_that_stops_reading_the_hub_shows_lag_and_is_not_ready(
    engine_factory: Callable[..., Awaitable[Engine]],
) -> None:
    engine = await engine_factory()
    assert engine.worker is not None
    bus: Any = engine.worker.bus
    await until(lambda: bus._beat_ms is not None)  # the first heartbeat arrived
    assert bus.lag_ms() < MAX_LAG_MS and ready(engine) == (True, [])
    link = bus._link
    link.transport.pause_reading()  # deaf: the hub's writes pile up unread
    await until(lambda: (bus.lag_ms() or 0) > MAX_LAG_MS)
    ok, reasons = ready(engine)
    assert not ok and any("bus lagging" in r for r in reasons), reasons
    assert engine.worker.status().bus_lag_ms > MAX_LAG_MS
    link.transport.resume_reading()
    await until(lambda: bus.lag_ms() < MAX_LAG_MS)
    assert ready(engine) == (True, [])
