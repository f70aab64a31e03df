"""The publisher process of `fanout bench`: U updates/s through POST /publish
or WebSocket `pub` batches (`--publish-via`).

One keep-alive HTTP connection to the admin port (`WorkloadPublisher`, through
loadtest/bench/httppost.py: a third of http.client's CPU per request), or one
WebSocket connection to node 1 with up to `WS_IN_FLIGHT` batches awaiting
their acks (`WsWorkloadPublisher`), and a clock-paced loop (`publish_for`: every batch interval it sends what is due by
then, so a slow request is made up for by a larger next batch); the
workload's sampler picks the (topic, key) pairs. `data` is `[seq,
time.time_ns()]`, stamped per batch just before it is sent. A msgpack body
is assembled from each pair's encoded `{"topic": t, "key": k, "data": `
prefix, made once per pair (`msgpack_body`: the same bytes as packing the
items, at a fraction of the publisher's CPU, which counts as the generator's).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.client
import json
import os
import signal
import time
import urllib.parse
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgpack

from engine.client.raw import RawConnection, connect
from engine.protocol.codec import conn_worker
from loadtest.bench.httppost import KeepAlivePost
from loadtest.bench.shard import WHOLE, Shard, shard_pairs, shard_sampler
from loadtest.latency import bucket_mid_ns, bucket_of, percentiles_ms
from loadtest.workload import Workload, key_sampler

PREFETCH_MAX = 4_000_000  # pairs drawn before the window (a list of references: ~32 MB)
GRACE_S = 2.0  # a server that cannot keep up: stop publishing this long after the duration
WS_IN_FLIGHT = 8  # WebSocket `pub` batches awaiting their ack (then the publisher waits)
CONNECT_TRIES = 8  # connections opened per worker wanted, at most (WsWorkloadPublisher)
WS_ACK_TIMEOUT_S = 10.0  # a batch without an ack by then: the connection is given up
_HTTP_HEAD = b"\x81\xa5items"  # {"items": ...}
_WS_HEAD = b"\x83\xa2op\xa3pub\xa2id"  # {"op": "pub", "id": ..., then "items"


class _Publisher:
    """What both channels' publishers share: the workload's sampler (this
    generator's share of it), the sequence stamped into values, the counters
    `publish_for` reports, and the finals."""

    def __init__(self, workload: Workload, seed: int, max_items: int, shard: Shard) -> None:
        self.workload = workload
        # --shard i/N: only this generator's pairs (loadtest/bench/shard.py)
        self.shard = shard
        self.sample = (
            key_sampler(workload, seed) if shard == WHOLE else shard_sampler(workload, seed, shard)
        )
        self.max_items = max_items
        self.seq = 0
        self.requests = 0
        self.accepted = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.rtt_hist: dict[int, int] = {}
        self.prefixes: dict[tuple[str, str], bytes] = {}  # at most one per key of the workload
        self.drawn: list[tuple[str, str]] = []  # `prefetch`: the next pairs, already drawn
        self.next_drawn = 0

    def prefetch(self, n: int) -> None:
        """Draw the next `n` pairs (at most PREFETCH_MAX) now, before the window, so
        that drawing them costs the generator nothing while the server is measured:
        `pairs` then hands out the same pairs in the same order as drawing live."""
        self.drawn = self.sample(min(n, PREFETCH_MAX))
        self.next_drawn = 0

    def pairs(self, n: int) -> list[tuple[str, str]]:
        """The next `n` pairs to publish: prefetched first, then drawn live."""
        i = self.next_drawn
        got = self.drawn[i : i + n]
        self.next_drawn = i + len(got)
        if len(got) < n:
            self.drawn, self.next_drawn = [], 0
            got += self.sample(n - len(got))
        return got

    def final_batches(self) -> tuple[dict[str, dict[str, int]], list[list[dict[str, Any]]]]:
        """One last value for every key of every topic (of this generator's share):
        the finals ({topic: {key: seq}}) and the items, in batches of `max_items`."""
        t = time.time_ns()
        finals: dict[str, dict[str, int]] = {}
        items = []
        for topic, key in shard_pairs(self.workload, self.shard):
            self.seq += 1
            finals.setdefault(topic, {})[key] = self.seq
            items.append({"topic": topic, "key": key, "data": [self.seq, t]})
        return finals, [items[i : i + self.max_items] for i in range(0, len(items), self.max_items)]

    def record_rtt(self, t0_ns: int) -> None:
        b = bucket_of(time.perf_counter_ns() - t0_ns)
        self.rtt_hist[b] = self.rtt_hist.get(b, 0) + 1


class WorkloadPublisher(_Publisher):
    """POST /publish batches of the workload's keys over one keep-alive HTTP/1.1
    connection (msgpack or JSON bodies); finals are {topic: {key: seq}}."""

    def __init__(
        self,
        admin: str,
        workload: Workload,
        seed: int,
        max_items: int,
        body: str,
        shard: Shard = WHOLE,
    ) -> None:
        super().__init__(workload, seed, max_items, shard)
        parsed = urllib.parse.urlsplit(admin)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.body = body
        self.headers = {"Content-Type": f"application/{body}"}
        api_key = os.environ.get("FANOUT_API_KEY", "")
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn = KeepAlivePost(self.host, self.port, timeout_s=10.0)  # httppost.py

    def post(self, n: int) -> bool:
        """Publish `n` updates (one request), stamped now; True when the bus accepted them."""
        t = time.time_ns()
        seq = self.seq
        pairs = self.pairs(n)
        self.seq = seq + n
        if self.body != "json":
            return self._send_body(msgpack_body(pairs, seq, t, self.prefixes), len(pairs))
        items = [
            {"topic": topic, "key": key, "data": [seq + i + 1, t]}
            for i, (topic, key) in enumerate(pairs)
        ]
        return self._send(items)

    def post_all_finals(self) -> dict[str, dict[str, int]]:
        """One last value for every key of every topic (of this generator's share)."""
        finals, batches = self.final_batches()
        for items in batches:
            if not self._send(items):
                raise RuntimeError(f"publishing the final values failed: {dict(self.errors)}")
        return finals

    def _send(self, items: list[dict[str, Any]]) -> bool:
        if self.body == "json":
            body = json.dumps({"items": items}, separators=(",", ":")).encode()
        else:
            body = msgpack.packb({"items": items})
        return self._send_body(body, len(items))

    def _send_body(self, body: bytes, n_items: int) -> bool:
        t0 = time.perf_counter_ns()
        self.requests += 1
        try:
            status, answer = self.conn.post("/publish", body, self.headers)
        except (OSError, http.client.HTTPException) as exc:  # the connection is closed
            self.errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
            self.failed += n_items
            return False
        self.record_rtt(t0)
        if status != 200:
            self.errors[f"HTTP {status}: {answer[:100]!r}"] += 1
            self.failed += n_items
            return False
        self.accepted += n_items
        return True

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def drain(self) -> None:
        """Every request is answered when `post` returns: nothing to wait for."""

    def close(self) -> None:
        self.conn.close()


class WsWorkloadPublisher(_Publisher):
    """WebSocket `pub` batches of the workload's keys over `conns` connections to
    `ws_url`, each on a worker of its own (docs/protocol.md: `items`, acked with one
    position per item), batches sent to them in turn, at most `in_flight` per
    connection awaiting their ack; the bodies are assembled from per-pair prefixes
    like the HTTP ones (`msgpack_body`). The worker that reads a batch decodes and
    checks it: one connection per worker spreads that over every worker instead
    of loading one (at 100,000 updates/s one connection saturated its worker).
    Connections are opened until `conns` distinct workers answered (the part of
    `hello.conn` before the dot is the worker's pid; SO_REUSEPORT picks the
    worker), at most CONNECT_TRIES per connection wanted; the others are closed.
    The server must let these connections publish (the bench starts it with
    anonymous publishing on and a message rate that fits). Same counters as
    `WorkloadPublisher`, counted when the ack or `err` arrives; a batch's round
    trip runs from its send to its ack."""

    def __init__(
        self,
        ws_url: str,
        workload: Workload,
        seed: int,
        max_items: int,
        shard: Shard = WHOLE,
        in_flight: int = WS_IN_FLIGHT,
        conns: int = 1,
    ) -> None:
        super().__init__(workload, seed, max_items, shard)
        self.loop = asyncio.new_event_loop()
        self.conns = self.loop.run_until_complete(_one_per_worker(ws_url, max(1, conns)))
        self.in_flight = in_flight * len(self.conns)
        self.next_conn = 0
        self.waiting: dict[int, tuple[int, int]] = {}  # request id -> (items, sent at ns)

    def post(self, n: int) -> bool:
        """Send `n` updates as one batch, stamped now (after waiting for a free
        slot); the ack is counted when it arrives. False when the connection is gone."""
        self._collect()
        if len(self.waiting) >= self.in_flight:
            self._wait(lambda: len(self.waiting) < self.in_flight, WS_ACK_TIMEOUT_S)
        t = time.time_ns()
        pairs = self.pairs(n)
        seq = self.seq
        self.seq = seq + n
        return self._send(msgpack_body(pairs, seq, t, self.prefixes, self._head()), len(pairs))

    def post_all_finals(self) -> dict[str, dict[str, int]]:
        """One last value for every key of every topic (of this generator's share),
        every batch acked before it returns."""
        finals, batches = self.final_batches()
        failed = self.failed
        for items in batches:
            if not self._send(self._head() + msgpack.packb(items), len(items)):
                break
            self._wait(lambda: len(self.waiting) < self.in_flight, WS_ACK_TIMEOUT_S)
        self.drain()
        if self.failed != failed:
            raise RuntimeError(f"publishing the final values failed: {dict(self.errors)}")
        return finals

    def pause(self, seconds: float) -> None:
        """Sleep `seconds` while the acks are read."""
        self._wait(lambda: False, seconds)

    def drain(self) -> None:
        """Wait (at most WS_ACK_TIMEOUT_S) for the ack of every batch sent."""
        self._wait(lambda: not self.waiting, WS_ACK_TIMEOUT_S)
        for n, _ in self.waiting.values():
            self.failed += n
            self.errors[f"no ack within {WS_ACK_TIMEOUT_S:g} s"] += 1
        self.waiting.clear()

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
                self.loop.run_until_complete(conn.wait_closed(2.0))
        self.loop.close()

    def _head(self) -> bytes:
        """`{"op": "pub", "id": <the next request id>, "items": ` (the map's first bytes)."""
        self.requests += 1
        rid: bytes = msgpack.packb(self.requests)
        return _WS_HEAD + rid + b"\xa5items"

    def _send(self, body: bytes, n_items: int) -> bool:
        conn = self.conns[self.next_conn]
        self.next_conn = (self.next_conn + 1) % len(self.conns)
        try:
            conn.send_bytes(body)
        except Exception as exc:  # the connection is gone: ConnectionClosed, OSError
            self.errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
            self.failed += n_items
            return False
        self.waiting[self.requests] = (n_items, time.perf_counter_ns())
        return True

    def _wait(self, done: Any, timeout_s: float) -> None:
        """Run the loop, reading acks, until `done()` or `timeout_s` passed."""

        async def until() -> None:
            deadline = self.loop.time() + timeout_s
            while not done():
                left = deadline - self.loop.time()
                if left <= 0 or all(c.closed.done() and not c.pending() for c in self.conns):
                    return
                await RawConnection.wait_any(self.conns, left)
                self._collect()

        self.loop.run_until_complete(until())

    def _collect(self) -> None:
        """Count the acks and errors received so far (without waiting)."""
        for conn in self.conns:
            for msg in conn.take_nowait():
                self._count(msg)

    def _count(self, msg: dict[str, Any]) -> None:
        sent = self.waiting.pop(msg.get("id", -1), None)
        if sent is None:
            return  # hello, or a reply to nothing of ours
        n, t0 = sent
        if msg.get("op") == "ack":
            self.accepted += n
            self.record_rtt(t0)
        else:
            self.failed += n
            self.errors[f"{msg.get('code')}: {str(msg.get('msg'))[:100]}"] += 1


async def _one_per_worker(ws_url: str, want: int) -> list[RawConnection]:
    """`want` connections to `ws_url` on as many distinct workers as answer within
    CONNECT_TRIES tries per connection wanted (at least one connection)."""
    conns: list[RawConnection] = []
    workers: set[str] = set()
    for _ in range(CONNECT_TRIES * want):
        conn = await connect(ws_url, compression=False)
        hello = await conn.recv_op("hello")
        worker = conn_worker(hello)
        if worker in workers:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed(2.0)
            continue
        workers.add(worker)
        conns.append(conn)
        if len(conns) == want:
            break
    return conns


def msgpack_body(
    pairs: list[tuple[str, str]],
    seq: int,
    t: int,
    prefixes: dict[tuple[str, str], bytes],
    head: bytes = _HTTP_HEAD,
) -> bytes:
    """`msgpack.packb({"items": [{"topic", "key", "data": [seq + i + 1, t]}, ...]})` of
    `pairs`, byte for byte, from each pair's encoded prefix (kept in `prefixes`);
    `head`: the map's bytes before the items array (a WebSocket `pub`'s op and id)."""
    packer = msgpack.Packer()
    pack = packer.pack
    stamp = pack(t)  # `data` is [seq, t]: 0x92, then both, and t is the batch's
    parts = [head, packer.pack_array_header(len(pairs))]
    append = parts.append
    for n, pair in enumerate(pairs, seq + 1):
        prefix = prefixes.get(pair)
        if prefix is None:
            topic, key = pair
            prefix = packer.pack_map_header(3) + pack("topic") + pack(topic)
            prefix += pack("key") + pack(key) + pack("data") + b"\x92"
            prefixes[pair] = prefix
        append(prefix)
        append(pack(n))
        append(stamp)
    return b"".join(parts)


def publish_for(
    pub: WorkloadPublisher | WsWorkloadPublisher,
    pipe: Pipe,
    rate: float,
    duration_s: float,
    batch_ms: float,
    grace_s: float = 30.0,
) -> dict[str, Any]:
    """Publish `rate` updates/s for `duration_s`, paced against the clock.

    Every tick (`batch_ms`) sends what is due by then (`rate * elapsed`, minus
    what was sent), so a slow request is made up for by a larger next batch
    instead of lowering the rate. Bounded: at most `rate * duration_s` updates,
    and it gives up `grace_s` (30) s past the end.
    """
    total = round(rate * duration_s)
    interval = batch_ms / 1000.0
    sent = 0
    max_behind = 0
    start = time.perf_counter()
    hard_stop = start + duration_s + grace_s
    next_tick = start
    next_report = start + 1.0
    aborted = exiting = False
    while sent < total:
        now = time.perf_counter()
        if now > hard_stop:
            aborted = True
            break
        elapsed = now - start
        due = total if elapsed >= duration_s else min(total, int(rate * elapsed))
        max_behind = max(max_behind, due - sent - round(rate * interval))
        while sent < due and time.perf_counter() <= hard_stop:
            n = min(due - sent, pub.max_items)
            pub.post(n)
            sent += n
        now = time.perf_counter()
        if now >= next_report:
            pipe.send(("progress", {"sent": sent, "accepted": pub.accepted}))
            next_report += 1.0
        if pipe.poll():
            cmd = pipe.recv()
            if cmd[0] in ("abort", "exit"):
                aborted, exiting = True, cmd[0] == "exit"
                break
        next_tick += interval
        delay = next_tick - time.perf_counter()
        if delay > 0:
            pub.pause(delay)
        else:
            next_tick = time.perf_counter()  # behind: don't burst to catch up ticks
    pub.drain()  # over WebSocket: the acks of the last batches
    end = time.perf_counter()
    return {
        "sent": sent,
        "accepted": pub.accepted,
        "failed": pub.failed,
        "requests": pub.requests,
        "elapsed_s": round(end - start, 4),
        "achieved_rate": round(pub.accepted / max(end - start, 1e-9), 1),
        "max_behind_items": max(0, max_behind),
        "errors": dict(pub.errors),
        "rtt_ms": {
            **percentiles_ms(pub.rtt_hist, (0.5, 0.99)),
            "max": round(bucket_mid_ns(max(pub.rtt_hist)) / 1e6, 3) if pub.rtt_hist else None,
        },
        "aborted": aborted,
        "exit": exiting,
        # WebSocket: the connections it published on, each on a worker of its own
        "ws_connections": len(pub.conns) if isinstance(pub, WsWorkloadPublisher) else None,
    }


def publisher_process(
    pipe: Pipe,
    admin: str,
    workload: Workload,
    seed: int,
    rate: float,
    duration_s: float,
    batch_ms: float,
    max_items: int,
    body: str,
    budget_s: float,
    shard: Shard = WHOLE,
    ws_url: str | None = None,
    ws_conns: int = 1,
) -> None:
    """Waits for `go` (publish for the duration), `final` (every key once), `exit`.
    Publishes through POST /publish at `admin`, or WebSocket `pub` batches at
    `ws_url` when given (`--publish-via ws`), over `ws_conns` connections (one per
    worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pub: WorkloadPublisher | WsWorkloadPublisher
    if ws_url is not None:
        pub = WsWorkloadPublisher(ws_url, workload, seed, max_items, shard, conns=ws_conns)
    else:
        pub = WorkloadPublisher(admin, workload, seed, max_items, body, shard)
    deadline = time.monotonic() + budget_s
    try:
        pub.prefetch(round(rate * duration_s))
        pipe.send(("ready", {"prefetched": len(pub.drawn)}))
        while time.monotonic() < deadline:
            if not pipe.poll(0.5):
                continue
            cmd = pipe.recv()
            if cmd[0] == "go":
                done = publish_for(pub, pipe, rate, duration_s, batch_ms, grace_s=GRACE_S)
                pipe.send(("done", done))
                if done["exit"]:
                    return
            elif cmd[0] == "final":
                pipe.send(("finals", pub.post_all_finals()))
            elif cmd[0] == "exit":
                return
    except (EOFError, OSError):
        return
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"publisher: {type(exc).__name__}: {exc}"))
        raise
    finally:
        pub.close()


__all__ = [
    "WorkloadPublisher",
    "WsWorkloadPublisher",
    "msgpack_body",
    "publish_for",
    "publisher_process",
]
