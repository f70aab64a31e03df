"""A subscriber process of `fanout bench`: one uvloop loop of picows clients.

Its clients (loadtest/client.py) are of two kinds. *Probes* (`spec["probes"]`,
their indices; every client with --decode-all) decode every frame: each keeps,
per subscribed topic, a view {key: data} and its position (epoch, pos) so that
it can come back with `since`; they check order and convergence and record
latency. Every other client *counts*: once it has its snaps it counts frames
and bytes without decoding (client.py rule 6), and at the end resubscribes
and compares the re-sent snaps with the final values (the snapshot check).
Delivered updates are the probes' count scaled to every client's frames
(`updates`; exact when every client is a probe). The process reports its
counters once a second and obeys commands from the orchestrator:

- `mark_start` / `mark_end`: the measured window (latency histogram, counts);
- `slow`: the clients flagged slow stop reading (their socket fills up);
- `storm`: every other client drops its connection at once and reconnects
  with `since`; the answer `stormed` says how long until all had their snap;
- `churn R`: close and reopen (with `since`) R connections per second;
- `converge finals settle_s`: wait until every reading probe holds the final
  value of every key of its topics; then every reading counting client
  resubscribes and its snaps are compared with `finals`; answer both.

Connecting: each client binds its plan's source address (127.0.0.N) before it
connects, so that more than ~28,000 connections (the ephemeral ports of one
(source, destination) pair) fit; an upgrade refused with 503 (the worker is over
limits.upgrades_per_s) is retried at most CONNECT_RETRIES times with a growing
pause, as a real client would; `ready` says when the first connection started
and the last one was up (CLOCK_MONOTONIC: comparable across processes).

Bounds: a decode cache of at most 4,096 messages (each distinct message is
decoded once), one histogram, one view per client; every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection as Pipe
from typing import Any

from loadtest.children import raise_nofile
from loadtest.client import (
    CountingSink,
    SnapshotSink,
    connect,
    listener_class,
    local_host,
    set_read_lowat,
    source_socket,
)
from loadtest.latency import percentiles_ms

# A counting client's socket wakes its loop once this many bytes wait (client.py rule
# 6): one read for several frames. Its counts lag by at most this much per client.
READ_LOWAT_BYTES = 65536  # the default of `fanout bench --read-lowat`
# ... and every READ_SWEEP_S its mark is lifted for LIFT_S, so that a ping of the
# server's waits at most that long for its pong, however little the client receives
# (fanout drops a client that has not answered within ping_timeout_s, 20 s by default)
READ_SWEEP_S = 5.0
SNAPSHOT_RETRY_S = 0.5  # a counting client whose re-sent snaps differ asks again this often
SNAPSHOT_MIN_WAIT_S = 5.0  # the snapshot check's time budget, at least
LIFT_S = 0.05
CONNECT_RETRIES = 8  # upgrades refused with 503 (worker busy) retried at most this often
RETRY_PAUSE_S = 0.05  # the first pause before a retry; doubles at each one, at most 2 s
RETRY_STATUS = 503
GC_YOUNG_OBJECTS = 50_000  # allocations between two collections of the youngest generation


def subscriber_process(pipe: Pipe, index: int, spec: dict[str, Any]) -> None:
    """Entry point of one subscriber process (forked; builds its own loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_nofile()
    logging.getLogger("picows").setLevel(logging.WARNING)
    logging.getLogger("fanout-bench").setLevel(logging.CRITICAL)
    import uvloop

    try:
        uvloop.run(_main(pipe, index, spec))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"subscriber {index}: {type(exc).__name__}: {exc}"))
        raise


async def _main(pipe: Pipe, index: int, spec: dict[str, Any]) -> None:
    proc = SubscriberProcess(pipe, index, spec)
    try:
        await proc.open_all()
        await proc.serve()
    finally:
        proc.stop()
    await asyncio.sleep(0)


class SubscriberProcess:
    """One subscriber process: its clients, the orchestrator's commands, its answers.

    Phases: `open_all` (connect and subscribe every client, answer `ready`),
    then `serve` (run commands until `exit`, the parent's end or the time
    budget), then `stop` (drop every connection)."""

    def __init__(self, pipe: Pipe, index: int, spec: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.pipe = pipe
        self.sink = CountingSink()
        self.client_cls = listener_class()
        self.clients: list[Any] = []
        self.local_addrs: set[str] = set()
        self.done: asyncio.Future[str] = self.loop.create_future()
        self.url: str = spec["url"]
        self.max_hz: float | None = spec.get("max_hz")
        self.read_lowat = int(spec.get("read_lowat", READ_LOWAT_BYTES))
        self.plan: list[tuple[int, tuple[str, ...], str, bool]] = spec["clients"]
        # None: every client is a probe (--decode-all, storm, churn, warm-up)
        probes = spec.get("probes")
        self.probes: set[int] | None = None if probes is None else set(probes)
        self.addr_of = {p[0]: p[2] for p in self.plan}
        self.slot_of: dict[int, int] = {}
        self.sem = asyncio.Semaphore(int(spec["concurrency"]))
        self.connect_errors: collections.Counter[str] = collections.Counter()
        self.connect_retries = 0
        self.first_connect_t: float | None = None  # time.monotonic(): the first attempt
        self.last_connected_t: float | None = None  # the last connection up
        self.rng = random.Random(index)
        self.commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.churn_stats = {"churned": 0, "failed": 0}
        self.churn_task: asyncio.Task[None] | None = None
        self.churn_stop = asyncio.Event()
        self.seconds = 0  # progress reports sent
        self.p99: float | None = None  # of the window so far, every 5 s
        self.loop.call_later(float(spec["budget_s"]), self.finish, "time budget exhausted")
        self.loop.add_reader(pipe.fileno(), self.on_pipe)
        # the loop made the pipe non-blocking; a large message (a latency histogram spread
        # over seconds is hundreds of KB) to a parent busy elsewhere would then fail with
        # EAGAIN: sends block instead (the parent is always reading while it waits on us)
        os.set_blocking(pipe.fileno(), True)

    def finish(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def on_pipe(self) -> None:
        try:
            while self.pipe.poll():
                self.commands.append(self.pipe.recv())
        except (EOFError, OSError):
            self.finish("parent gone")
        self.wake.set()

    def counters(self) -> dict[str, Any]:
        """Frames and bytes of every client; updates counted by the probes (`probe_*`)
        and scaled to every client's frames (`updates`)."""
        st = self.sink
        count_frames = sum(c.frames for c in self.clients)
        count_bytes = sum(c.bytes for c in self.clients)
        return {
            "frames": st.frames + count_frames,
            "bytes": st.bytes + count_bytes,
            "updates": st.updates
            + round(count_frames * st.updates / st.frames if st.frames else 0),
            "probe_frames": st.frames,
            "probe_updates": st.updates,
            "counted_frames": count_frames,
            "closed": st.closed,
            "clients": len(self.clients),
        }

    def is_probe(self, client: Any) -> bool:
        return self.probes is None or client.index in self.probes

    # -- connect and subscribe every client ---------------------------------------------

    async def connect(
        self,
        i: int,
        topics: Sequence[str],
        addr: str,
        slow: bool,
        since: Mapping[str, Any] | None = None,
        views: dict[str, dict[str, Any]] | None = None,
    ) -> Any:
        async with self.sem:
            if self.done.done():
                return None
            client = self.client_cls(
                self.sink, topics, index=i, slow=slow, max_hz=self.max_hz, since=since, views=views
            )
            if self.first_connect_t is None:
                self.first_connect_t = time.monotonic()
            transport = await self.connect_retrying(client, addr)
            if transport is None:
                return None
            self.last_connected_t = time.monotonic()
            host = local_host(transport)
            if host is not None:
                self.local_addrs.add(host)
            return client

    async def connect_retrying(self, client: Any, addr: str) -> Any:
        """`client`'s connection from source address `addr`; a 503 is retried after a
        pause (bounded); None, with the error counted, when it cannot connect."""
        pause = RETRY_PAUSE_S
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                return await connect(
                    client, self.url, logger_name="fanout-bench", socket_factory=source_socket(addr)
                )
            except Exception as exc:
                response = getattr(exc, "response", None)
                busy = getattr(response, "status", None) == RETRY_STATUS
                if not busy or attempt == CONNECT_RETRIES or self.done.done():
                    self.connect_errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                    return None
            self.connect_retries += 1
            await asyncio.sleep(pause * (0.5 + self.rng.random()))
            pause = min(2.0, pause * 2)
        return None

    async def wait_ready(self, clients: Sequence[Any], timeout_s: float) -> float:
        t0 = time.monotonic()
        while not self.done.done() and time.monotonic() - t0 < timeout_s:
            if all(c.ready or c.closed for c in clients):
                break
            await asyncio.sleep(0.01)
        return time.monotonic() - t0

    async def open_all(self) -> None:
        """Connect and subscribe every client of the plan; answer `ready`."""
        t0 = time.monotonic()
        made = await asyncio.gather(*(self.connect(*p) for p in self.plan))
        self.clients = [c for c in made if c is not None]
        self.slot_of = {c.index: i for i, c in enumerate(self.clients)}
        await self.wait_ready(self.clients, 20.0)
        ready_t = time.monotonic()
        for c in self.clients:
            if not self.is_probe(c):
                c.count(self.read_lowat)  # it has its snaps: from here it only counts
        # the clients and their views live until the end and hold no cycles: a collection
        # of the oldest generation would walk them all, as often as probes allocate. The
        # probes' decoded messages die young (their refcount frees them), so collections
        # can be rarer: the young generation is bounded by GC_YOUNG_OBJECTS
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS, 20, 100)
        sweep = asyncio.ensure_future(sweep_reads(lambda: self.clients, READ_SWEEP_S))
        self.tasks.add(sweep)
        self.pipe.send(
            (
                "ready",
                {
                    "connected": len(self.clients),
                    "ready": sum(1 for c in self.clients if c.ready and not c.closed),
                    "connect_errors": dict(self.connect_errors),
                    "connect_retries": self.connect_retries,
                    # connected but without their snaps: why (server closes, `err`s)
                    "not_ready": sum(1 for c in self.clients if not c.ready),
                    "closed": self.sink.closed,
                    "close_codes": {str(k): v for k, v in self.sink.close_codes.items()},
                    "errors": dict(self.sink.errors),
                    "setup_s": round(time.monotonic() - t0, 3),
                    # CLOCK_MONOTONIC, one clock for every process of the machine
                    "first_connect_t": self.first_connect_t,
                    "last_connected_t": self.last_connected_t,
                    "ready_t": ready_t,
                    "local_addrs": sorted(self.local_addrs),
                },
            )
        )
        self.loop.call_later(1.0, self.progress)

    # -- storm and churn ------------------------------------------------------------------

    async def replace(self, old: Any) -> Any:
        """Drop `old` and reconnect in its place with `since`; keeps its views."""
        old.drop()
        new = await self.connect(
            old.index, list(old.views), self.addr_of[old.index], old.slow, old.since(), old.views
        )
        if new is not None:
            self.clients[self.slot_of[old.index]] = new
        return new

    async def storm(self) -> None:
        targets = [c for c in self.clients if not c.slow and not c.closed]
        t_start = time.monotonic()
        news = await asyncio.gather(*(self.replace(c) for c in targets))
        connected_s = time.monotonic() - t_start
        alive = [c for c in news if c is not None]
        await self.wait_ready(alive, 30.0)
        self.pipe.send(
            (
                "stormed",
                {
                    "dropped": len(targets),
                    "reconnected": len(alive),
                    "resubscribed": sum(1 for c in alive if c.ready and not c.closed),
                    "connected_s": round(connected_s, 3),
                    "recover_s": round(time.monotonic() - t_start, 3),
                    "connect_errors": dict(self.connect_errors),
                },
            )
        )

    async def churn(self, rate: float) -> None:
        interval = 1.0 / rate
        next_t = time.monotonic()
        while not self.done.done() and not self.churn_stop.is_set():
            candidates = [c for c in self.clients if not c.slow and c.ready and not c.closed]
            if candidates:
                new = await self.replace(self.rng.choice(candidates))
                self.churn_stats["churned" if new is not None else "failed"] += 1
            next_t += interval
            with contextlib.suppress(TimeoutError):
                # stop between two replacements, never in the middle of one (a client
                # dropped and not yet replaced would be lost)
                await asyncio.wait_for(self.churn_stop.wait(), max(0.0, next_t - time.monotonic()))

    def progress(self) -> None:
        if self.done.done():
            return
        st = self.sink
        self.seconds += 1
        if st.measuring and self.seconds % 5 == 0:  # sorting the histogram is not free
            self.p99 = percentiles_ms(st.hist, (0.99,))["p99"]
        p99 = self.p99 if st.measuring else None
        with contextlib.suppress(OSError, ValueError):
            self.pipe.send(("progress", {**self.counters(), "p99_ms": p99, **self.churn_stats}))
        self.loop.call_later(1.0, self.progress)

    # -- commands -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the orchestrator's commands until `exit`, its end or the time budget."""
        while not self.done.done():
            self.wake.clear()
            while self.commands:
                await self.run_command(self.commands.popleft())
            if not self.done.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 0.5)

    async def read_waiting(self) -> None:
        """Read what the counting clients' sockets hold below their SO_RCVLOWAT, so that
        a mark counts the frames received by then (a short run's counts would otherwise
        lag by up to READ_LOWAT_BYTES per client)."""
        await read_below_lowat(self.clients)

    async def run_command(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        st = self.sink
        if kind == "mark_start":
            await self.read_waiting()
            st.reset_window()
            self.pipe.send(("marked_start", self.counters()))
        elif kind == "mark_end":
            await self.read_waiting()
            st.measuring = False
            window = {"hist": st.hist, "samples": st.samples, "negative": st.negative}
            self.pipe.send(("marked_end", {**self.counters(), **window, "max_ns": st.max_ns}))
        elif kind == "slow":
            n = 0
            for c in self.clients:
                if c.slow and c.transport is not None and not c.closed:
                    c.transport.underlying_transport.pause_reading()
                    n += 1
            self.pipe.send(("slowed", n))
        elif kind == "storm":
            task = self.loop.create_task(self.storm())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif kind == "churn":
            self.churn_task = self.loop.create_task(self.churn(float(cmd[1])))
        elif kind == "churn_stop":
            if self.churn_task is not None:
                self.churn_stop.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.churn_task), 30.0)
                self.churn_task = None
            self.pipe.send(("churned", dict(self.churn_stats)))
        elif kind == "converge":
            result = await _converge(self, cmd[1], float(cmd[2]))
            result["connect_errors"] = dict(self.connect_errors)
            self.pipe.send(("converged", result))
        elif kind == "exit":
            self.finish("exit")

    def stop(self) -> None:
        """Drop every connection; cancel what still runs."""
        self.finish("stopped")
        self.loop.remove_reader(self.pipe.fileno())
        for t in (*self.tasks, self.churn_task):
            if t is not None:
                t.cancel()
        for c in self.clients:
            c.drop()


async def read_below_lowat(clients: Sequence[Any], lift_s: float = LIFT_S) -> None:
    """Lift the SO_RCVLOWAT of every counting client (`client.lowat`) for `lift_s`, so
    that their loop reads what waits below it (frames, and the server's pings, which
    picows answers), then set it back."""
    lowered = [c for c in clients if c.lowat and not c.closed]
    for c in lowered:
        set_read_lowat(c.transport, 1)
    await asyncio.sleep(lift_s)
    for c in lowered:
        if c.lowat and not c.closed:
            set_read_lowat(c.transport, c.lowat)


async def sweep_reads(clients: Callable[[], Sequence[Any]], every_s: float) -> None:
    """Every `every_s`, `read_below_lowat` of `clients()`: a counting client that
    receives less than its low-water mark in a ping's timeout still answers the
    ping (and its counts lag by at most `every_s`). Runs until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        await read_below_lowat(clients())


def converged(client: Any, finals: Mapping[str, Mapping[str, int]]) -> bool:
    """True when the client holds the final seq of every key of every topic it reads."""
    for topic, view in client.views.items():
        for key, seq in finals.get(topic, {}).items():
            v = view.get(key)
            if not isinstance(v, list) or not v or v[0] != seq:
                return False
    return True


async def _converge(
    proc: SubscriberProcess, finals: Mapping[str, Mapping[str, int]], settle_s: float
) -> dict[str, Any]:
    """Wait (at most `settle_s`) until every reading client holds `finals`; check all."""
    st, done = proc.sink, proc.done
    t0 = time.monotonic()
    readers = [c for c in proc.clients if not c.slow and proc.is_probe(c)]
    pending = [c for c in readers if not c.closed]
    while pending and not done.done() and time.monotonic() - t0 < settle_s:
        pending = [c for c in pending if not c.closed and not converged(c, finals)]
        if pending:
            await asyncio.sleep(0.02)
    settle = time.monotonic() - t0
    ok = [c for c in readers if not c.closed and converged(c, finals)]
    ok_ids = {id(c) for c in ok}
    examples: list[dict[str, Any]] = []
    for c in readers:
        if id(c) in ok_ids or len(examples) >= 3:
            continue
        wrong = {
            f"{t}/{k}": (c.views[t].get(k) or [None])[0]
            for t in c.views
            for k, s in finals.get(t, {}).items()
            if (c.views[t].get(k) or [None])[0] != s
        }
        examples.append(
            {
                "closed": c.closed,
                "close_code": c.close_code,
                "keys_wrong": len(wrong),
                "sample": dict(list(wrong.items())[:3]),
            }
        )
    slow = [c for c in proc.clients if c.slow]
    return {
        "clients": len(readers),
        "converged": len(ok),
        "settle_s": round(settle, 3),
        "examples": examples,
        "slow_clients": len(slow),
        "slow_closed": sum(1 for c in slow if c.closed),
        "slow_close_codes": {str(k): v for k, v in st.slow_close_codes.items()},
        "errors": dict(st.errors),
        "close_codes": {str(k): v for k, v in st.close_codes.items()},
        "byes": st.byes,
        "local_addrs": sorted(proc.local_addrs),
        "snapshots": await _check_snapshots(proc, finals, max(0.0, settle_s - settle)),
    }


async def _check_snapshots(
    proc: SubscriberProcess, finals: Mapping[str, Mapping[str, int]], timeout_s: float
) -> dict[str, Any]:
    """Every reading counting client resubscribes (its topics' snaps are re-sent) and
    its snaps are compared with `finals`. A server still applying the finals (a bus
    lagging behind a run at its limit: the probes cover only their own topics) sends
    some snaps from before them: those clients resubscribe again, SNAPSHOT_RETRY_S
    apart, until every snap matches or `timeout_s` (at least 5 s) has passed. A
    closed client, or one whose last snaps did not all come in time or still differ,
    counts as not matched; `rounds` says how many resubscriptions it took."""
    counted = [c for c in proc.clients if not c.slow and not proc.is_probe(c)]
    check = SnapshotSink(proc.sink)
    deadline = time.monotonic() + max(SNAPSHOT_MIN_WAIT_S, timeout_s)
    pending, rounds = counted, 0
    while pending:
        rounds += 1
        for c in pending:
            check.snaps.pop(id(c), None)
            c.resubscribe(check)
        left = max(0.5, deadline - time.monotonic())
        await proc.wait_ready([c for c in pending if not c.closed], left)
        pending = [c for c in pending if not c.closed and not check.matched(c, finals)]
        if time.monotonic() + SNAPSHOT_RETRY_S >= deadline:
            break
        if pending:
            await asyncio.sleep(SNAPSHOT_RETRY_S)
    matched = [c for c in counted if check.matched(c, finals)]
    return {
        "clients": len(counted),
        "matched": len(matched),
        "closed": sum(1 for c in counted if c.closed),
        "undecodable": check.undecodable,
        "rounds": rounds,
    }
