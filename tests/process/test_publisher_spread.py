"""The Python `Publisher` with `connections=2` against a real `fanout serve --workers
2`: its batches go to both workers (one connection on each, found through
`hello.conn`), every one is acked, and a subscriber ends at every key's value of
the latest position."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.client.publisher import Publisher
from engine.client.raw import connect
from engine.protocol.codec import parse_pos
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_two_connections_hold_one_worker_each_and_every_batch_lands(tmp_path: Any) -> None:
    served = Served(
        ["--workers", "2"],
        env={"FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "true"},
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        served.wait_ready()
        sub = await connect(served.ws_url)
        await sub.recv_op("hello")
        sub.subscribe(["spread.t"], id=1)
        await sub.recv_op("snap")
        async with Publisher(ws_url=served.ws_url, connections=2) as pub:
            batches = [[("spread.t", f"k{i}", b) for i in range(20)] for b in range(40)]
            results = await asyncio.gather(*(pub.publish_many(b) for b in batches))
            assert all(len(r) == 20 for r in results)
            assert len(pub.ws_workers) == 2 and all(pub.ws_workers)  # one on each worker
        # batches on two connections are ordered by the positions the bus gave them:
        # each key ends at the value of its latest position
        latest: dict[str, tuple[Any, int]] = {}
        for b, positions in enumerate(results):
            for (_, key, value), pos in zip(batches[b], positions, strict=True):
                if key not in latest or parse_pos(pos) > latest[key][0]:
                    latest[key] = (parse_pos(pos), value)
        want = {k: v for k, (_, v) in latest.items()}
        seen: dict[str, Any] = {}
        while {k: seen.get(k) for k in want} != want:
            msg = await sub.recv_op("upd", timeout=10.0)
            seen.update(msg["items"])
        sub.close()
    finally:
        served.stop()
