"""Real `fanout serve` processes with real clients: SO_REUSEPORT across workers,
cross-worker delivery, respawn after kill -9 with exact recovery, graceful drain."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client.raw import RawConnection, connect
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "2"],
        env={
            "FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "true",
            "FANOUT_WORKERS_GRACEFUL_TIMEOUT_S": "10",
            "FANOUT_WORKERS_DRAIN_S": "1",
            "FANOUT_WORKERS_RESTART_BACKOFF_MIN_MS": "50",
            "FANOUT_WORKERS_RESTART_BACKOFF_MAX_MS": "200",
            "FANOUT_WORKERS_RETRY_MIN_MS": "100",
            "FANOUT_WORKERS_RETRY_MAX_MS": "900",
            "FANOUT_WORKERS_HEARTBEAT_TIMEOUT_S": "3",
        },
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def pid_of(hello: dict[str, Any]) -> int:
    return int(hello["conn"].split(".")[0], 16)


async def open_on_each_worker(
    url: str, want: int = 2, tries: int = 200
) -> dict[int, RawConnection]:
    """Connect until connections on `want` distinct workers are held (the kernel spreads them)."""
    by_pid: dict[int, RawConnection] = {}
    for _ in range(tries):
        conn = await connect(url)
        hello = await conn.recv()
        pid = pid_of(hello)
        if pid in by_pid:
            conn.close()
        else:
            by_pid[pid] = conn
        if len(by_pid) >= want:
            return by_pid
    raise AssertionError(f"connections landed on {len(by_pid)} worker(s) only")


async def test_two_workers_share_the_port_and_deliver_across(served: Served) -> None:
    conns = await open_on_each_worker(served.ws_url)
    assert set(conns) == set(served.worker_pids().values())
    a, b = conns.values()
    b.subscribe(["x.cross"], id=1)
    assert (await b.recv())["op"] == "ack"
    assert (await b.recv())["op"] == "snap"
    a.send({"op": "pub", "topic": "x.cross", "key": "k", "data": "from-a", "id": 2})
    ack = await a.recv()
    assert ack["op"] == "ack" and ack["id"] == 2
    upd = await b.recv_op("upd")
    assert upd["items"] == {"k": "from-a"} and upd["pos"] == ack["pos"]
    for c in conns.values():
        c.close()


async def test_kill_9_respawns_and_since_recovers_exactly_the_missed_keys(served: Served) -> None:
    for i in range(20):
        assert served.post("/publish", {"topic": "rec.k9", "key": f"k{i}", "data": i})[0] == 200
    conns = await open_on_each_worker(served.ws_url)
    victim_pid, victim = next(iter(conns.items()))
    victim.subscribe(["rec.k9"], id=1)
    await victim.recv()
    snap = await victim.recv()
    assert snap["full"] is True and len(snap["items"]) == 20
    mark = (snap["epoch"], snap["pos"])
    slot = next(s for s, p in served.worker_pids().items() if p == victim_pid)

    os.kill(victim_pid, signal.SIGKILL)
    assert await victim.wait_closed() == 1006
    # while it is gone: three keys change, one is deleted
    for key, data in (("k3", 33), ("k7", 77), ("k11", 111), ("k15", None)):
        assert served.post("/publish", {"topic": "rec.k9", "key": key, "data": data})[0] == 200

    async def respawned() -> int:
        for _ in range(300):
            pids = served.worker_pids()
            if pids.get(slot) not in (None, victim_pid) and served.get("/readyz")[0] == 200:
                return pids[slot]
            await asyncio.sleep(0.05)
        raise AssertionError("worker not respawned")

    new_pid = await respawned()
    assert new_pid != victim_pid
    # reconnect (to whichever worker) with since: only what was missed, full: false
    again = await connect(served.ws_url)
    await again.recv()
    again.subscribe(["rec.k9"], id=2, since={"rec.k9": mark})
    assert (await again.recv())["op"] == "ack"
    snap2 = await again.recv()
    assert snap2["full"] is False
    assert snap2["items"] == {"k3": 33, "k7": 77, "k11": 111, "k15": None}
    again.close()
    for c in conns.values():
        c.close()


async def test_sigterm_sends_bye_and_closes_1001(served: Served) -> None:
    conns = await open_on_each_worker(served.ws_url)
    loop = asyncio.get_running_loop()
    served.signal(signal.SIGTERM)
    t0 = loop.time()
    for conn in conns.values():
        bye = await conn.recv_op("bye", timeout=15)
        assert bye["reason"] and 100 <= bye["retry_ms"] <= 900
        assert await conn.wait_closed(15) == 1001
    code = await asyncio.to_thread(served.wait, 15)
    assert code == 0
    assert loop.time() - t0 < 10  # within workers.graceful_timeout_s


async def test_hung_worker_is_killed_and_replaced(served: Served, tmp_path: Any) -> None:
    pids = served.worker_pids()
    slot, pid = next(iter(pids.items()))
    os.kill(pid, signal.SIGSTOP)  # the loop stops: no more heartbeats
    try:
        for _ in range(600):
            now = served.worker_pids()
            if now.get(slot) not in (None, pid):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("hung worker not replaced")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "heartbeat" in served.output().lower() or "hung" in served.output().lower()
