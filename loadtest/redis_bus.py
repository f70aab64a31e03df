"""Measure the redis bus alone: publish rate through the Lua script and
publish-to-delivery latency, on a throwaway redis-server on a free loopback port.

    .venv/bin/python -m loadtest.redis_bus [--n 50000] [--batch 1] [--topics 1] [--latency 2000]

- rate: one publishing client calls `publish` N times without awaiting (the
  client sends them in rounds, one script call per shard, several rounds in
  flight: engine/bus/redis/publisher.py rule 7), each request holding
  `--batch` updates of `--topics` topics (1: one run per request, as a feed
  of one instrument; more: runs of fewer updates, more work per update in
  publish.lua); updates per second until every `done` fired, while one
  reader client (a worker's bus) reads them.
- latency: `--latency` sequential publishes; the time from `publish` to the
  entry's delivery to the reader's sink (another client: publish accepted ->
  XADD -> XREAD wake-up -> delivered), p50/p99/max.
Not a test: figures depend on the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence

import msgpack
import uvloop

from engine.bus.base import Entry, Update
from engine.bus.redis_streams import RedisBus
from loadtest.accounting import cpu_seconds, machine_busy_seconds, used
from loadtest.redis_server import RedisServer

IN_FLIGHT = 4000  # requests published and not answered yet (MAX_QUEUED is 10,000)
IN_FLIGHT_UPDATES = 20_000  # ... and updates in them (more would wait past publish_timeout_s)


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.waiting: dict[tuple[str, str], float] = {}
        self.latencies: list[float] = []

    def on_bus_epoch(self, epoch: str) -> None:
        pass

    def on_bus_connected(self, connected: bool) -> None:
        pass

    def on_bus_floors(self, floors: Sequence[tuple[str, int]]) -> None:
        pass

    def on_bus_entries(self, entries: Sequence[Entry]) -> None:
        self.count += len(entries)
        if self.waiting:
            now = time.perf_counter()
            for topic, key, _pos, _data in entries:
                t0 = self.waiting.pop((topic, key), None)
                if t0 is not None:
                    self.latencies.append(now - t0)


async def main(n: int, batch: int, latency_n: int, topics: int = 1) -> None:
    server = RedisServer(tied=True).start()
    try:
        sink = Sink()
        reader = RedisBus(server.url, shards=16)
        pub = RedisBus(server.url, shards=16, want_entries=False)
        await reader.start(sink)
        await pub.start(None)
        data = msgpack.packb({"px": 1.0842, "ts": 0})
        requests = max(1, n // batch)
        done = 0
        finished = asyncio.get_running_loop().create_future()

        room = asyncio.Event()  # a request was answered: awaited, not polled (no spin)

        def on_done(result: object) -> None:
            nonlocal done
            assert isinstance(result, list), result
            done += 1
            room.set()
            if done == requests and not finished.done():
                finished.set_result(None)

        assert server.proc is not None
        pids = [os.getpid(), server.proc.pid]
        cpu0, busy0 = cpu_seconds(pids), machine_busy_seconds()
        t0 = time.perf_counter()
        for i in range(requests):
            pub.publish(
                [
                    Update(f"bench.t{(i + j % topics) % 64}", f"k{(i * batch + j) % 500}", data)
                    for j in range(batch)
                ],
                on_done,
            )
            while (i + 1 - done) > min(IN_FLIGHT, IN_FLIGHT_UPDATES // batch):  # no timeouts
                room.clear()
                await room.wait()
        await finished
        elapsed = time.perf_counter() - t0
        total = requests * batch
        while sink.count < total:
            await asyncio.sleep(0.01)
        delivered = time.perf_counter() - t0
        cpu1, busy1 = cpu_seconds(pids), machine_busy_seconds()
        per_m = 1e6 / total
        client, redis = (used(cpu0, cpu1, pid) * per_m for pid in pids)
        print(
            f"publish: {total} updates in {requests} requests of {batch}: "
            f"{total / elapsed:,.0f} updates/s accepted, "
            f"{total / delivered:,.0f} updates/s delivered to the reader; "
            f"CPU-s per million updates: client (publisher + reader) {client:.2f}, "
            f"redis-server {redis:.2f}; machine busy {(busy1 - busy0) / delivered:.2f} cores"
        )
        for i in range(latency_n):
            key = f"lat{i}"
            sink.waiting[("bench.lat", key)] = time.perf_counter()
            await pub.publish_wait([Update("bench.lat", key, data)])
            while sink.waiting:
                await asyncio.sleep(0)
        lat = sorted(sink.latencies)
        if lat:
            p = [lat[int(q * (len(lat) - 1))] * 1000 for q in (0.5, 0.99)]
            print(
                f"latency publish -> delivered (loopback, {len(lat)} sequential): "
                f"p50 {p[0]:.2f} ms, p99 {p[1]:.2f} ms, max {lat[-1] * 1000:.2f} ms, "
                f"mean {statistics.fmean(lat) * 1000:.2f} ms"
            )
        await pub.close()
        await reader.close()
    finally:
        server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latency", type=int, default=2000)
    ap.add_argument("--topics", type=int, default=1, help="topics per request (at most 64)")
    a = ap.parse_args()
    uvloop.run(main(a.n, a.batch, a.latency, min(64, max(1, a.topics))))
