"""POST /rebalance on a real node: the requested number of connections is shed,
each told `bye` (reason "rebalance") and closed with 1012."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client.raw import connect
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "2"],
        env={"FANOUT_WORKERS_DRAIN_S": "1"},
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def test_rebalance_sheds_the_requested_number_paced_with_bye(served: Served) -> None:
    conns = []
    for _ in range(40):
        c = await connect(served.ws_url)
        await c.recv()
        conns.append(c)
    for _ in range(50):  # workers report their connections once a second
        _, stats = served.get("/stats")
        if stats["totals"]["connections"] == 40:
            break
        await asyncio.sleep(0.1)
    status, answer = served.post("/rebalance", {"connections": 30})
    assert status == 202 and answer["connections"] == 40 and answer["shed"] == 10
    assert sum(answer["per_worker"].values()) == 10
    await asyncio.sleep(2.0)  # paced over workers.drain_s = 1 s
    closed = [c for c in conns if c.closed.done()]
    assert len(closed) == 10
    for c in closed:
        assert c.closed.result() == 1012
        byes = [m for m in c.take_nowait() if m.get("op") == "bye"]
        assert byes and byes[0]["reason"] == "rebalance" and byes[0]["retry_ms"] > 0
    assert served.post("/rebalance", {"fraction": 2})[0] == 400
    for c in conns:
        c.close()
