"""Slow consumers against a real `fanout serve`: memory bounded by keys, not
updates; catch-up to the final values on drain; eviction with 4008; on a
stream topic, a gap naming the lost events, never a silent skip."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from engine.client.raw import connect
from engine.protocol.codec import parse_pos
from tests.support.rawws import RawWS
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = 100
UPDATES = 100_000
BATCH = 1000


def serve(tmp_path: Any, slow_timeout_s: float) -> Served:
    s = Served(
        ["--workers", "1"],
        env={
            "FANOUT_FANOUT_SLOW_CLIENT_TIMEOUT_S": str(slow_timeout_s),
            "FANOUT_FANOUT_MAX_BUFFER_BYTES": "65536",
            "FANOUT_LIMITS_MAX_PUBLISH_ITEMS": str(BATCH),
        },
        log_path=str(tmp_path / "serve.log"),
    )
    s.wait_ready()
    return s


@pytest.fixture
def patient(tmp_path: Any) -> Iterator[Served]:
    s = serve(tmp_path, slow_timeout_s=120)
    yield s
    s.stop()


@pytest.fixture
def strict(tmp_path: Any) -> Iterator[Served]:
    s = serve(tmp_path, slow_timeout_s=2)
    yield s
    s.stop()


def stalled_subscriber(served: Served, topic: str) -> RawWS:
    """A client that subscribes, then stops reading (a tiny receive buffer)."""
    raw = RawWS("127.0.0.1", served.port, rcvbuf=4096)
    raw.recv_messages()  # hello
    raw.send_msg({"op": "sub", "topics": [topic], "id": 1})
    raw.recv_messages()  # ack + snap
    return raw


def publish_burst(served: Served, topic: str) -> dict[str, int]:
    final: dict[str, int] = {}
    for start in range(0, UPDATES, BATCH):
        items = []
        for i in range(start, start + BATCH):
            key = f"k{i % KEYS}"
            items.append({"topic": topic, "key": key, "data": i})
            final[key] = i
        status, body = served.post("/publish", {"items": items})
        assert status == 200, body
    return final


def worker_rss(served: Served) -> int:
    (pid,) = served.worker_pids().values()
    return int(psutil.Process(pid).memory_info().rss)


async def test_stalled_client_costs_keys_not_updates_and_catches_up(patient: Served) -> None:
    topic = "slow.t"
    honest = await connect(patient.ws_url)
    await honest.recv()
    honest.subscribe([topic], id=1)
    raw = await asyncio.to_thread(stalled_subscriber, patient, topic)
    try:
        rss_before = worker_rss(patient)
        final = await asyncio.to_thread(publish_burst, patient, topic)
        await asyncio.sleep(0.5)
        rss_after = worker_rss(patient)
        print(
            f"worker RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB after {UPDATES} updates"
        )
        # the stalled client holds a few KB of kernel and user buffers, not 100,000 updates
        assert rss_after - rss_before < 8 * 1024 * 1024, (rss_before, rss_after)
        # the honest client on the same worker kept up and converged
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 20
        while seen != final and time.monotonic() < deadline:
            for m in honest.take_nowait() or [await honest.recv()]:
                if m.get("op") in ("snap", "upd"):
                    seen.update(m["items"])
        assert seen == final

        # the stalled client reads again: it ends at the final value of all 100 keys
        def read_until_final() -> dict[str, Any]:
            view: dict[str, Any] = {}
            raw.sock.settimeout(10)
            while view != final:
                for m in raw.recv_messages():
                    if m.get("op") in ("snap", "upd"):
                        view.update(m["items"])
            return view

        assert await asyncio.to_thread(read_until_final) == final
        _, stats = patient.get("/stats")
        assert stats["totals"]["slow_closes"] == 0
    finally:
        raw.close()
        honest.close()


async def test_client_that_never_reads_is_closed_4008(strict: Served) -> None:
    topic = "slow.evict"
    honest = await connect(strict.ws_url)
    await honest.recv()
    honest.subscribe([topic], id=1)
    raw = await asyncio.to_thread(stalled_subscriber, strict, topic)
    try:
        # Keep publishing (values of 1 KiB, so every flush is ~100 KiB) until the
        # engine gives up on the stalled client: the kernel's socket buffers absorb
        # a variable amount first, so a fixed burst may never reach the budget.
        pad = "x" * 1024
        closed = False
        deadline = time.monotonic() + 60
        n = 0
        while not closed and time.monotonic() < deadline:
            items = [{"topic": topic, "key": f"k{i}", "data": f"{pad}{n + i}"} for i in range(KEYS)]
            n += KEYS
            status, body = await asyncio.to_thread(strict.post, "/publish", {"items": items})
            assert status == 200, body
            _, stats = await asyncio.to_thread(strict.get, "/stats")
            closed = stats["totals"]["slow_closes"] >= 1
            await asyncio.sleep(0.05)
        assert closed, "the stalled client was never closed with 4008"
        assert stats["totals"]["slow_closes"] == 1
        # The engine sent 4008 and dropped the backlog at once (so the memory is
        # freed now); the close frame itself may be dropped with it, so the
        # client sees 4008 or an abrupt end, never more data after a timeout.
        raw.sock.settimeout(10)
        code = await asyncio.to_thread(raw.recv_close_code)
        assert code in (4008, 1006)
        # the honest client still receives
        assert strict.post("/publish", {"topic": topic, "key": "after", "data": 1})[0] == 200
        while True:
            m = await honest.recv()
            if m.get("op") == "upd" and "after" in m["items"]:
                break
    finally:
        raw.close()
        honest.close()


# -- stream topics: a gap, never a silent skip -------------------------------------------

STREAM_HISTORY = 2000  # >= a publish batch: a client that keeps up never misses an event
STREAM_BATCHES = 20


@pytest.fixture
def streaming(tmp_path: Any) -> Iterator[Served]:
    rules = [{"pattern": "feed.>", "mode": "stream", "history": STREAM_HISTORY}]
    s = Served(
        ["--workers", "1"],
        env={
            "FANOUT_FANOUT_SLOW_CLIENT_TIMEOUT_S": "120",
            "FANOUT_FANOUT_MAX_BUFFER_BYTES": "65536",
            "FANOUT_LIMITS_MAX_PUBLISH_ITEMS": str(BATCH),
            "FANOUT_TOPICS": json.dumps(rules),
        },
        log_path=str(tmp_path / "serve.log"),
    )
    s.wait_ready()
    yield s
    s.stop()


class StreamLog:
    """What a stream client received, checked as it arrives: events in strictly
    increasing positions, each gap starting at the client's position and ending
    before the next event."""

    def __init__(self, start: int) -> None:
        self.at = start
        self.events: list[tuple[int, int]] = []  # (pos, data)
        self.gaps: list[tuple[int, int]] = []

    def apply(self, m: dict[str, Any]) -> None:
        if m.get("op") == "evt":
            for p, data in m["items"]:
                pos = parse_pos(p)
                assert pos > self.at, "events in order, never twice"
                self.at = pos
                self.events.append((pos, data))
        elif m.get("op") == "gap":
            frm, to = parse_pos(m["from"]), parse_pos(m["to"])
            assert frm == self.at < to, (m, self.at)
            self.at = to
            self.gaps.append((frm, to))

    def check_accounts_for(self, published: list[int]) -> None:
        """Every published event was received, or lies inside a gap it was told of."""
        got = {p for p, _ in self.events}
        for p in published:
            assert p in got or any(a < p <= b for a, b in self.gaps), p


async def test_stalled_stream_client_gets_a_gap_then_the_later_events(streaming: Served) -> None:
    topic = "feed.ticks"
    honest = await connect(streaming.ws_url)
    await honest.recv()
    honest.subscribe([topic], id=1)
    raw = await asyncio.to_thread(stalled_subscriber, streaming, topic)
    pad = "x" * 500
    try:
        rss_before = worker_rss(streaming)

        def publish() -> list[int]:
            positions: list[int] = []
            for b in range(STREAM_BATCHES):
                items = [{"topic": topic, "data": [b * BATCH + i, pad]} for i in range(BATCH)]
                status, body = streaming.post("/publish", {"items": items})  # no key: a stream
                assert status == 200, body
                positions += [parse_pos(p) for p in body["pos"]]
            return positions

        published = await asyncio.to_thread(publish)
        n = len(published)
        await asyncio.sleep(0.5)
        rss_after = worker_rss(streaming)
        print(
            f"worker RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB after {n} events"
        )
        # nothing queued per client: the worker keeps at most `history` events of the topic
        assert rss_after - rss_before < 8 * 1024 * 1024, (rss_before, rss_after)

        # the honest client: every event in order (or, on a slow machine, told of a gap)
        seen = StreamLog(0)
        while seen.at < published[-1]:
            for m in honest.take_nowait() or [await honest.recv()]:
                seen.apply(m)
        seen.check_accounts_for(published)
        print(f"honest client: {len(seen.events)} of {n} events, {len(seen.gaps)} gaps")

        # the stalled client reads again: a gap naming what it lost, then the later events
        def read_to_the_end() -> StreamLog:
            log = StreamLog(0)
            raw.sock.settimeout(10)
            while log.at < published[-1]:
                for m in raw.recv_messages():
                    log.apply(m)
            return log

        log = await asyncio.to_thread(read_to_the_end)
        assert log.gaps, "the stalled client was told what it lost"
        log.check_accounts_for(published)
        frm, to = log.gaps[0]
        before = [p for p, _ in log.events if p <= frm]
        after = [p for p, _ in log.events if p > to]
        assert before == published[: len(before)]  # what it got before: the first events
        assert after == published[n - len(after) :]  # after: the newest, to the last one
        assert len(after) >= STREAM_HISTORY - BATCH  # the buffer's worth at least
        assert [d[0] for _, d in log.events] == [
            i for i, p in enumerate(published) if p in {q for q, _ in log.events}
        ]
        _, stats = streaming.get("/stats")
        assert stats["totals"]["slow_closes"] == 0
    finally:
        raw.close()
        honest.close()
