"""`fanout bench`'s counting clients wake their loop only once READ_LOWAT_BYTES wait
(SO_RCVLOWAT). A client that receives less than that within the server's ping
timeout would leave the ping unread and be dropped; the subscriber process's
sweep (`sweep_reads`) lifts the mark often enough that picows answers it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from loadtest.bench.subscriber import READ_LOWAT_BYTES, sweep_reads
from loadtest.client import CountingSink, connect, listener_class
from tests.integration.conftest import TIMEOUT_FACTOR, Engine, eventually


async def _counting_client(engine: Engine, sink: CountingSink) -> Any:
    client = listener_class()(sink, ["pings.t"], index=0)
    await connect(client, engine.url, compression=False)
    await eventually(lambda: client.ready)
    client.count(READ_LOWAT_BYTES)
    return client


async def test_a_swept_counting_client_answers_pings_and_an_unswept_one_is_dropped(
    engine_factory: Callable[..., Awaitable[Engine]],
) -> None:
    engine = await engine_factory(fanout={"ping_interval_s": 0.3, "ping_timeout_s": 0.6})
    await engine.publish("pings.t", "k", [1, 0])
    sink = CountingSink()
    swept = await _counting_client(engine, sink)
    unswept = await _counting_client(engine, sink)
    assert swept.lowat == unswept.lowat == READ_LOWAT_BYTES  # SO_RCVLOWAT took
    sweep = asyncio.ensure_future(sweep_reads(lambda: [swept], 0.1))
    try:
        # pings every 0.3 s, 0.6 s to answer; a few bytes a ping: far below the mark
        await eventually(lambda: unswept.closed, timeout=5.0)
        await asyncio.sleep(2.0 * TIMEOUT_FACTOR)  # several more ping rounds
        assert not swept.closed and swept.close_code is None
        await engine.publish("pings.t", "k", [2, 0])  # and it still counts what comes
        await eventually(lambda: swept.frames >= 1, timeout=5.0, interval=0.05)
    finally:
        sweep.cancel()
        swept.drop()
