"""WebSocket-level heartbeat: the engine pings every `fanout.ping_interval_s` and
drops connections that do not answer within `fanout.ping_timeout_s`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.rawws import OP_PING, RawWS

pytestmark = pytest.mark.timeout(60)


async def test_silent_peer_is_dropped_answering_peer_stays(engine_factory: Any) -> None:
    engine = await engine_factory(fanout={"ping_interval_s": 1.0, "ping_timeout_s": 1.0})
    alive, _ = await engine.subscriber(["hb.t"])  # picows answers pings by itself
    raw = await asyncio.to_thread(RawWS, "127.0.0.1", engine.worker.port)

    def silent_until_dropped() -> tuple[int, float]:
        """Read frames without ever answering a ping; return pings seen and when the TCP ended."""
        pings = 0
        raw.sock.settimeout(15)
        try:
            while True:
                op, _ = raw.recv_frame()
                if op == OP_PING:
                    pings += 1
        except (ConnectionError, OSError):
            return pings, time.monotonic()

    t0 = time.monotonic()
    pings, ended = await asyncio.to_thread(silent_until_dropped)
    raw.close()
    assert pings >= 1
    assert ended - t0 < 6  # interval + timeout + the one-second sweep, with margin
    # the answering client is still connected and served
    await engine.publish("hb.t", "k", 1)
    upd = await alive.recv_op("upd")
    assert upd["items"] == {"k": 1}
    assert engine.worker.counters.ping_timeouts == 1
