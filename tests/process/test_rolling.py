"""Rolling restart (SIGHUP) and elastic workers (SIGTTIN / SIGTTOU) on a real
`fanout serve` under steady load: every worker is replaced, clients see only
`bye` + 1012, reconnect with `since`, and miss no key's final value."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client.raw import ConnectionClosed, connect
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOPIC = "roll.t"
KEYS = 20


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "2"],
        env={
            "FANOUT_WORKERS_RETRY_MIN_MS": "50",
            "FANOUT_WORKERS_RETRY_MAX_MS": "300",
            "FANOUT_WORKERS_GRACEFUL_TIMEOUT_S": "10",
            "FANOUT_WORKERS_DRAIN_S": "1",
        },
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


class Follower:
    """A client that keeps following TOPIC across reconnects, recovering with `since`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.view: dict[str, Any] = {}
        self.mark: tuple[str, str] | None = None
        self.closes: list[int] = []
        self.byes = 0
        self.full_snaps_after_first = 0

    async def run(self, stop: asyncio.Event) -> None:
        first = True
        while not stop.is_set():
            conn = await connect(self.url)
            await conn.recv()  # hello
            conn.subscribe([TOPIC], id=1, since={TOPIC: self.mark} if self.mark else None)
            try:
                while not stop.is_set():
                    try:
                        msg = await conn.recv(timeout=0.2)
                    except TimeoutError:
                        continue
                    op = msg.get("op")
                    if op == "bye":
                        self.byes += 1
                    elif op in ("snap", "upd"):
                        if op == "snap":
                            if msg["full"]:
                                if not first:
                                    self.full_snaps_after_first += 1
                                self.view.clear()
                            first = False
                            self.mark = (msg["epoch"], msg["pos"])
                        for k, v in msg["items"].items():
                            self.view[k] = v
                        self.mark = (self.mark[0], msg["pos"]) if self.mark else None
            except ConnectionClosed as exc:
                self.closes.append(exc.code)
                await asyncio.sleep(0.05)
                continue
            conn.close()


async def steady_publisher(served: Served, stop: asyncio.Event) -> dict[str, int]:
    last: dict[str, int] = {}
    i = 0
    while not stop.is_set():
        items = [{"topic": TOPIC, "key": f"k{(i + j) % KEYS}", "data": i + j} for j in range(5)]
        status, _ = await asyncio.to_thread(served.post, "/publish", {"items": items})
        assert status == 200
        for it in items:
            last[it["key"]] = it["data"]
        i += 5
        await asyncio.sleep(0.02)
    return last


async def test_sighup_replaces_every_worker_without_losing_a_final_value(served: Served) -> None:
    old_pids = set(served.worker_pids().values())
    followers = [Follower(served.ws_url) for _ in range(12)]
    stop_clients, stop_pub = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(f.run(stop_clients)) for f in followers]
    pub = asyncio.create_task(steady_publisher(served, stop_pub))
    await asyncio.sleep(1.0)

    served.signal(signal.SIGHUP)
    ready_during_roll = []
    for _ in range(300):
        ready_during_roll.append(served.get("/readyz")[0])
        pids = set(served.worker_pids().values())
        if len(pids) == 2 and not pids & old_pids and "rolling restart done" in served.output():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"roll did not finish: {served.output()}")
    await asyncio.sleep(1.0)
    stop_pub.set()
    last = await pub
    # final values of every key, then let everyone settle
    final = {f"k{j}": -j for j in range(KEYS)}
    await asyncio.to_thread(
        served.post,
        "/publish",
        {"items": [{"topic": TOPIC, "key": k, "data": v} for k, v in final.items()]},
    )
    for _ in range(100):
        if all(f.view == final for f in followers):
            break
        await asyncio.sleep(0.05)
    stop_clients.set()
    await asyncio.gather(*tasks)
    assert last
    assert all(f.view == final for f in followers), [f.view for f in followers if f.view != final]
    codes = [c for f in followers for c in f.closes]
    assert codes and set(codes) == {1012}, codes
    assert sum(f.byes for f in followers) >= len(codes)
    # recovery used `since`: no full snapshot after a reconnect (same epoch)
    assert sum(f.full_snaps_after_first for f in followers) == 0
    assert set(ready_during_roll) == {200}


async def test_ttin_and_ttou_change_the_worker_count(served: Served) -> None:
    assert len(served.worker_pids()) == 2
    served.signal(signal.SIGTTIN)
    for _ in range(200):
        if len(served.worker_pids()) == 3 and served.get("/readyz")[0] == 200:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("SIGTTIN did not add a worker")
    conns = []
    for _ in range(30):
        c = await connect(served.ws_url)
        await c.recv()
        conns.append(c)
    # one signal at a time: two identical signals sent at once may merge into one
    for want in (2, 1):
        served.signal(signal.SIGTTOU)
        for _ in range(200):
            if len(served.worker_pids()) == want:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"SIGTTOU did not bring the workers down to {want}")
    # the clients of retired workers were told to come back (bye + 1012); the others stay
    await asyncio.sleep(1.0)
    closed = [c.closed.result() for c in conns if c.closed.done()]
    assert closed and set(closed) == {1012}
    assert len(closed) < len(conns)  # the remaining worker's clients stay connected
    assert served.get("/readyz")[0] == 200
    for c in conns:
        c.close()


async def test_sighup_rereads_the_config_and_keeps_running_on_a_bad_one(tmp_path: Any) -> None:
    cfg = tmp_path / "fanout.toml"
    cfg.write_text("[limits]\nmax_topics_per_conn = 5\n")
    s = Served(["--workers", "1", "--config", str(cfg)], log_path=str(tmp_path / "serve.log"))
    try:
        s.wait_ready()
        old = set(s.worker_pids().values())
        cfg.write_text("[limits]\nmax_topics_per_conn = -1\n")
        s.signal(signal.SIGHUP)
        for _ in range(100):
            if "config not reloaded" in s.output():
                break
            await asyncio.sleep(0.05)
        assert "limits.max_topics_per_conn" in s.output()
        assert set(s.worker_pids().values()) == old and s.get("/readyz")[0] == 200

        cfg.write_text("[limits]\nmax_topics_per_conn = 2\n")
        s.signal(signal.SIGHUP)
        for _ in range(200):
            pids = set(s.worker_pids().values())
            if pids and not pids & old and "rolling restart done" in s.output():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(s.output())
        conn = await connect(s.ws_url)
        await conn.recv()
        conn.subscribe(["a", "b", "c"], id=1)
        assert (await conn.recv())["code"] == "too_many_topics"  # the reloaded limit
        conn.close()
    finally:
        s.stop()
