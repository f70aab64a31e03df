"""GET /metrics under a load: the counters add up to what clients saw."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from picows import WSMsgType

from engine.client.raw import RawConnection, connect
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")


def scrape(served: Served) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(served.admin_url + "/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = frozenset(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def per_worker(samples: dict[Any, float], name: str) -> dict[str, float]:
    return {dict(lbl)["worker"]: v for (n, lbl), v in samples.items() if n == name}


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(["--workers", "2"], log_path=str(tmp_path / "serve.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def test_metrics_add_up_to_what_clients_saw(served: Served) -> None:
    slot_of = {pid: str(slot) for slot, pid in served.worker_pids().items()}
    clients: list[tuple[str, RawConnection]] = []
    for _ in range(16):
        c = await connect(served.ws_url)
        hello = await c.recv()
        clients.append((slot_of[int(hello["conn"].split(".")[0], 16)], c))
        c.subscribe(["m.t"], id=1)
    received: Counter[str] = Counter()
    for i in range(30):
        items = [{"topic": "m.t", "key": f"k{j}", "data": i} for j in range(5)]
        assert served.post("/publish", {"items": items})[0] == 200
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    # every client reads all it got: items in snap and upd messages
    for slot, c in clients:
        for m in c.take_nowait():
            if m.get("op") in ("snap", "upd"):
                received[slot] += len(m["items"])
    # close some: three normally (1000), one with a text frame (the server closes 1003)
    for _, c in clients[:3]:
        c.close(1000)
    offender_slot, offender = clients[3]
    offender.send_bytes(b"{}", WSMsgType.TEXT)
    assert await offender.wait_closed() == 1003
    expected_closes: dict[tuple[str, str], int] = defaultdict(int)
    for slot, _ in clients[:3]:
        expected_closes[(slot, "1000")] += 1
    expected_closes[(offender_slot, "1003")] += 1
    open_per_slot = Counter(slot for slot, _ in clients[4:])

    # workers write their figures once a second: wait until the scrape shows them
    for _ in range(100):
        samples = scrape(served)
        delivered = per_worker(samples, "fanout_updates_delivered_total")
        conns = per_worker(samples, "fanout_connections")
        closes = {
            (dict(lbl)["worker"], dict(lbl)["code"]): v
            for (n, lbl), v in samples.items()
            if n == "fanout_disconnects_total"
        }
        if (
            all(delivered.get(s, 0) == n for s, n in received.items())
            and all(conns.get(s, 0) == n for s, n in open_per_slot.items())
            and all(closes.get(k, 0) == v for k, v in expected_closes.items())
        ):
            break
        await asyncio.sleep(0.1)
    assert {s: delivered.get(s, 0) for s in received} == dict(received)
    assert {s: conns.get(s, 0) for s in open_per_slot} == dict(open_per_slot)
    assert {k: closes.get(k, 0) for k in expected_closes} == dict(expected_closes)
    # per-process figures for every fanout process
    procs = {
        dict(lbl)["process"] for (n, lbl) in samples if n == "fanout_process_resident_memory_bytes"
    }
    assert {"supervisor", "hub", "admin", "worker 1", "worker 2"} <= procs
    assert samples[("fanout_http_published_total", frozenset())] == 150
    for _, c in clients[4:]:
        c.close()
