"""The first measurement of fanout: the *hot* workload, end to end.

    .venv/bin/python -m loadtest.firstbench                # 1,000 subs, 10,000 updates/s, 30 s
    .venv/bin/python -m loadtest.firstbench --subscribers 20 --rate 200 --duration 2

S subscribers (spread over several subscriber processes, each one uvloop loop
of picows clients) subscribe to one topic of K keys; a publisher process sends
U updates/s for D seconds, spread evenly over the keys, in batches through
`POST /publish` on the admin port; then it publishes one last ("final") value
for every key, and every subscriber must end at exactly those values.

What it reports (JSON file and a short text summary on stdout):

- delivered updates/s and frames/s, counted by the subscribers over the
  measured window (the D seconds of publishing);
- publish-to-receive latency: `data` is `[seq, time.time_ns()]` stamped by the
  publisher just before it sends the batch; a subscriber records
  `time_ns() - t` for every key value it receives (same machine, same clock);
- server CPU: utime+stime (from /proc, through psutil) of the supervisor and
  all its descendants (workers, hub, admin) at the start and end of the
  window, per million delivered updates and as a share of one core; the load
  generator's own CPU too, since on a small machine they compete for cores;
- convergence: how many of the S clients hold the final value of every key.

Limits and guarantees:

- Every wait is bounded in time and every loop in count; the script stops by
  itself, and kills what it started (the server's whole process group, its
  own child processes) on success, error, Ctrl-C or SIGTERM.
- Memory is bounded: latency goes into a histogram of 65.5 us buckets up to
  4.3 s (67 ms buckets beyond); the subscribers keep one view per client.
- A subscriber's work per frame is kept small: frames with identical bytes
  (a worker encodes one `upd` per flush and sends the same bytes to all its
  up-to-date clients) are decoded once and the decoded result is reused;
  each client still applies the values it received to its own view, and its
  latency is taken at its own receive time. The per-process decode cache is
  keyed by the exact payload bytes, so reuse never changes what a client sees.
- Counting: "delivered" counts key values in `upd` messages received in the
  window. The engine's own counters (from /stats, refreshed once a second)
  are reported beside them as a cross-check, not as the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import logging
import os
import platform
import shlex
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgpack
import psutil

from loadtest.accounting import cpu_seconds, machine_busy_seconds, server_pids, used
from loadtest.children import Child, Children, raise_nofile
from loadtest.latency import LatencyRecorder, bucket_mid_ns, bucket_of, merge_hist, percentiles_ms
from loadtest.server import Server, SetupError, http_get

# -- subscriber processes ------------------------------------------------------------------


class _SubscriberState(LatencyRecorder):
    """Everything one subscriber process counts, and its decode cache.

    `feed` is the hot path: one call per received binary frame.
    """

    _CACHE_MAX = 256  # distinct payloads kept; cleared when full (bounded memory)

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.sub_message = msgpack.packb({"op": "sub", "topics": [topic], "id": 1})
        self.cache: dict[
            bytes, tuple[bool, dict[str, Any], int, tuple[tuple[int, int], ...], tuple[Any, ...]]
        ] = {}
        self.clients: list[Any] = []
        self.frames = 0
        self.updates = 0  # key values in `upd` messages
        self.snap_items = 0
        self.measuring = False
        LatencyRecorder.__init__(self)
        self.errors: collections.Counter[str] = collections.Counter()
        self.close_codes: collections.Counter[int] = collections.Counter()
        self.byes = 0
        self.closed = 0

    def feed(self, client: Any, payload: bytes) -> None:
        now = time.time_ns()
        entry = self.cache.get(payload)
        if entry is None:
            entry = self._decode(payload)
        clear, items, n, stamps, control = entry
        view = client.view
        if clear:
            view.clear()
        view.update(items)
        self.frames += 1
        self.updates += n
        if control:
            self._control(client, control)
        if self.measuring and stamps:
            self.record(stamps, now)

    def _decode(
        self, payload: bytes
    ) -> tuple[bool, dict[str, Any], int, tuple[tuple[int, int], ...], tuple[Any, ...]]:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(payload)
        clear = False
        items: dict[str, Any] = {}
        n = 0
        stamps: collections.Counter[int] = collections.Counter()
        control: list[tuple[str, Any]] = []
        cacheable = True
        try:
            for msg in unpacker:
                if not isinstance(msg, dict):
                    control.append(("bad", repr(msg)[:80]))
                    cacheable = False
                    continue
                op = msg.get("op")
                if op == "upd" and msg.get("topic") == self.topic:
                    its = msg.get("items") or {}
                    items.update(its)
                    n += len(its)
                    for v in its.values():
                        if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                            stamps[v[1]] += 1
                elif op == "snap" and msg.get("topic") == self.topic:
                    its = msg.get("items") or {}
                    if msg.get("full"):
                        clear, items = True, {}
                    items.update(its)
                    control.append(("snap", len(its)))
                else:
                    control.append((str(op), msg))
                    cacheable = False
        except (ValueError, msgpack.UnpackException) as exc:
            control.append(("bad", str(exc)[:80]))
            cacheable = False
        entry = (clear, items, n, tuple(stamps.items()), tuple(control))
        if cacheable:
            if len(self.cache) >= self._CACHE_MAX:
                self.cache.clear()
            self.cache[payload] = entry
        return entry

    def _control(self, client: Any, control: Iterable[tuple[str, Any]]) -> None:
        for op, msg in control:
            if op == "snap":
                client.ready = True
                self.snap_items += msg
            elif op == "err":
                self.errors[f"err:{msg.get('code')}"] += 1
            elif op == "bye":
                self.byes += 1
            elif op == "bad":
                self.errors["undecodable"] += 1
            # hello, ack, pong and ops this script does not know: nothing to do

    def counters(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "updates": self.updates,
            "snap_items": self.snap_items,
            "closed": self.closed,
        }


def _make_client_class() -> type:
    """The picows listener class (built lazily: picows is imported in children only)."""
    from picows import WSListener, WSMsgType

    binary = WSMsgType.BINARY
    close = WSMsgType.CLOSE
    continuation = WSMsgType.CONTINUATION

    class Client(WSListener):
        """One subscriber connection: a view {key: data} and nothing else."""

        __slots__ = ("close_code", "closed", "fragments", "ready", "st", "transport", "view")

        def __init__(self, st: _SubscriberState) -> None:
            self.st = st
            self.view: dict[str, Any] = {}
            self.transport: Any = None
            self.ready = False
            self.closed = False
            self.close_code: int | None = None
            self.fragments: bytearray | None = None

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            transport.send(binary, self.st.sub_message)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            # the frame is valid only inside this call: its payload is copied here
            mtype = frame.msg_type
            if mtype == binary and frame.fin and self.fragments is None:
                self.st.feed(self, frame.get_payload_as_bytes())
            elif mtype in (binary, continuation):
                if self.fragments is None:
                    self.fragments = bytearray()
                self.fragments += frame.get_payload_as_bytes()
                if frame.fin:
                    payload, self.fragments = bytes(self.fragments), None
                    self.st.feed(self, payload)
            elif mtype == close:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            else:
                self.st.errors[f"frame:{mtype.name}"] += 1

        def on_ws_disconnected(self, transport: Any) -> None:
            if not self.closed:
                self.closed = True
                self.st.closed += 1
                self.st.close_codes[self.close_code if self.close_code is not None else 1006] += 1

    return Client


def _subscriber_process(
    pipe: Pipe, index: int, url: str, count: int, topic: str, concurrency: int, budget_s: float
) -> None:
    """Entry point of one subscriber process (forked; builds its own loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.getLogger("picows").setLevel(logging.WARNING)
    logging.getLogger("firstbench").setLevel(logging.WARNING)
    import uvloop

    try:
        uvloop.run(_subscriber_main(pipe, index, url, count, topic, concurrency, budget_s))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"subscriber {index}: {type(exc).__name__}: {exc}"))
        raise


async def _subscriber_main(
    pipe: Pipe, index: int, url: str, count: int, topic: str, concurrency: int, budget_s: float
) -> None:
    from picows import ws_connect

    loop = asyncio.get_running_loop()
    st = _SubscriberState(topic)
    client_cls = _make_client_class()
    done: asyncio.Future[str] = loop.create_future()

    def finish(reason: str) -> None:
        if not done.done():
            done.set_result(reason)

    loop.call_later(budget_s, finish, "time budget exhausted")
    commands: collections.deque[tuple[Any, ...]] = collections.deque()
    wake = asyncio.Event()

    def on_pipe() -> None:
        try:
            while pipe.poll():
                commands.append(pipe.recv())
        except (EOFError, OSError):
            finish("parent gone")
        wake.set()

    loop.add_reader(pipe.fileno(), on_pipe)
    # the loop made the pipe non-blocking; a large message (a latency histogram spread
    # over seconds is hundreds of KB) to a parent busy elsewhere would then fail with
    # EAGAIN: sends block instead (the parent is always reading while it waits on us)
    os.set_blocking(pipe.fileno(), True)

    # -- connect and subscribe every client ---------------------------------------------
    sem = asyncio.Semaphore(concurrency)
    connect_errors: collections.Counter[str] = collections.Counter()

    async def connect_one() -> None:
        async with sem:
            if done.done():
                return
            client = client_cls(st)
            try:
                await ws_connect(
                    lambda: client,
                    url,
                    extra_headers={"Sec-WebSocket-Protocol": "fanout.v1"},
                    websocket_handshake_timeout=10,
                    max_frame_size=64 * 1024 * 1024,
                    logger_name="firstbench",
                )
            except Exception as exc:
                connect_errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
                return
            st.clients.append(client)

    t0 = time.monotonic()
    await asyncio.gather(*(connect_one() for _ in range(count)))
    ready_deadline = time.monotonic() + 15.0
    while not done.done() and time.monotonic() < ready_deadline:
        if all(c.ready or c.closed for c in st.clients):
            break
        await asyncio.sleep(0.02)
    ready = sum(1 for c in st.clients if c.ready and not c.closed)
    pipe.send(
        (
            "ready",
            {
                "connected": len(st.clients),
                "ready": ready,
                "connect_errors": dict(connect_errors),
                "setup_s": round(time.monotonic() - t0, 3),
            },
        )
    )

    # -- progress every second; commands from the parent --------------------------------
    def progress() -> None:
        if done.done():
            return
        p99 = percentiles_ms(st.hist, (0.99,))["p99"] if st.measuring else None
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("progress", {**st.counters(), "p99_ms": p99}))
        loop.call_later(1.0, progress)

    loop.call_later(1.0, progress)

    while not done.done():
        wake.clear()
        while commands:
            cmd = commands.popleft()
            kind = cmd[0]
            if kind == "mark_start":
                st.hist, st.samples, st.negative, st.max_ns = {}, 0, 0, 0
                st.measuring = True
                pipe.send(("marked_start", st.counters()))
            elif kind == "mark_end":
                st.measuring = False
                pipe.send(
                    (
                        "marked_end",
                        {
                            **st.counters(),
                            "hist": st.hist,
                            "samples": st.samples,
                            "negative": st.negative,
                            "max_ns": st.max_ns,
                        },
                    )
                )
            elif kind == "converge":
                finals, settle_s = cmd[1], cmd[2]
                result = await _converge(st, finals, settle_s, done)
                pipe.send(("converged", result))
            elif kind == "exit":
                finish("exit")
        if not done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.5)
    loop.remove_reader(pipe.fileno())
    for c in st.clients:
        if c.transport is not None and not c.closed:
            c.transport.disconnect(graceful=False)
    await asyncio.sleep(0)


def _converged(view: Mapping[str, Any], finals: Mapping[str, int]) -> bool:
    for key, seq in finals.items():
        v = view.get(key)
        if not isinstance(v, list) or not v or v[0] != seq:
            return False
    return True


async def _converge(
    st: _SubscriberState, finals: Mapping[str, int], settle_s: float, done: asyncio.Future[str]
) -> dict[str, Any]:
    """Wait (at most `settle_s`) until every client holds `finals`; then check them all again."""
    t0 = time.monotonic()
    pending = [c for c in st.clients if not c.closed]
    while pending and not done.done() and time.monotonic() - t0 < settle_s:
        pending = [c for c in pending if not c.closed and not _converged(c.view, finals)]
        if pending:
            await asyncio.sleep(0.02)
    settle = time.monotonic() - t0
    ok = {id(c) for c in st.clients if not c.closed and _converged(c.view, finals)}
    examples: list[dict[str, Any]] = []
    for c in st.clients:
        if id(c) in ok or len(examples) >= 3:
            continue
        wrong = {
            k: (c.view.get(k) or [None])[0]
            for k, s in finals.items()
            if (c.view.get(k) or [None])[0] != s
        }
        examples.append(
            {
                "closed": c.closed,
                "close_code": c.close_code,
                "keys_wrong": len(wrong),
                "sample": dict(list(wrong.items())[:3]),
            }
        )
    return {
        "clients": len(st.clients),
        "converged": len(ok),
        "settle_s": round(settle, 3),
        "examples": examples,
        "errors": dict(st.errors),
        "close_codes": {str(k): v for k, v in st.close_codes.items()},
        "byes": st.byes,
        "cache_entries": len(st.cache),
    }


# -- the publisher process -------------------------------------------------------------------


class _Publisher:
    """POST /publish batches over one keep-alive HTTP/1.1 connection (msgpack bodies)."""

    def __init__(
        self, admin: str, topic: str, keys: Sequence[str], max_items: int, body: str
    ) -> None:
        parsed = urllib.parse.urlsplit(admin)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self.topic = topic
        self.keys = list(keys)
        self.max_items = max_items
        self.body = body
        self.headers = {"Content-Type": f"application/{body}"}
        api_key = os.environ.get("FANOUT_API_KEY", "")
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn: http.client.HTTPConnection | None = None
        self.seq = 0
        self.requests = 0
        self.accepted = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.rtt_hist: dict[int, int] = {}

    def post(self, n: int) -> bool:
        """Publish `n` updates (one request), stamped now; True when the bus accepted them."""
        t = time.time_ns()
        keys, k = self.keys, len(self.keys)
        topic = self.topic
        seq = self.seq
        items = [
            {"topic": topic, "key": keys[(seq + i) % k], "data": [seq + i + 1, t]} for i in range(n)
        ]
        self.seq = seq + n
        return self._send(items)

    def post_finals(self) -> dict[str, int]:
        """One last value for every key; returns {key: seq}."""
        t = time.time_ns()
        finals: dict[str, int] = {}
        items = []
        for key in self.keys:
            self.seq += 1
            finals[key] = self.seq
            items.append({"topic": self.topic, "key": key, "data": [self.seq, t]})
        for i in range(0, len(items), self.max_items):
            if not self._send(items[i : i + self.max_items]):
                raise RuntimeError(f"publishing the final values failed: {dict(self.errors)}")
        return finals

    def _send(self, items: list[dict[str, Any]]) -> bool:
        if self.body == "json":
            body = json.dumps({"items": items}, separators=(",", ":")).encode()
        else:
            body = msgpack.packb({"items": items})
        t0 = time.perf_counter_ns()
        self.requests += 1
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            self.conn.request("POST", "/publish", body, self.headers)
            resp = self.conn.getresponse()
            answer = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as exc:
            self.errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
            self.failed += len(items)
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return False
        b = bucket_of(time.perf_counter_ns() - t0)
        self.rtt_hist[b] = self.rtt_hist.get(b, 0) + 1
        if status != 200:
            self.errors[f"HTTP {status}: {answer[:100]!r}"] += 1
            self.failed += len(items)
            return False
        self.accepted += len(items)
        return True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _publisher_process(
    pipe: Pipe,
    admin: str,
    topic: str,
    keys: list[str],
    rate: float,
    duration_s: float,
    batch_ms: float,
    max_items: int,
    body: str,
    budget_s: float,
) -> None:
    """Entry point of the publisher process: waits for `go`, publishes, then `final`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pub = _Publisher(admin, topic, keys, max_items, body)
    deadline = time.monotonic() + budget_s
    try:
        while time.monotonic() < deadline:
            if not pipe.poll(0.5):
                continue
            cmd = pipe.recv()
            if cmd[0] == "go":
                done = _publish_for(pub, pipe, rate, duration_s, batch_ms)
                pipe.send(("done", done))
                if done["exit"]:
                    return
            elif cmd[0] == "final":
                pipe.send(("finals", pub.post_finals()))
            elif cmd[0] == "exit":
                return
    except (EOFError, OSError):
        return  # the parent is gone
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"publisher: {type(exc).__name__}: {exc}"))
        raise
    finally:
        pub.close()


def _publish_for(
    pub: _Publisher,
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
            time.sleep(delay)
        else:
            next_tick = time.perf_counter()  # behind: don't burst to catch up ticks
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
    }


# -- orchestration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    subscribers: int
    sub_procs: int
    topic: str
    keys: int
    rate: float
    duration_s: float
    batch_ms: float
    workers: int
    flush_ms: int
    settle_s: float
    connect_concurrency: int
    max_publish_items: int
    body: str
    server_cpus: tuple[int, ...] | None
    loadgen_cpus: tuple[int, ...] | None
    url: str | None
    admin: str | None
    config: str | None
    server_log_level: str
    report: str
    quiet: bool


class Bench:
    """One run: set up, measure, check, report, and always tear down."""

    def __init__(self, s: Settings, argv: Sequence[str]) -> None:
        self.s = s
        self.argv = list(argv)
        self.server: Server | None = None
        self.procs = Children()
        self.children = self.procs.children
        self.subs: list[Child] = []
        self.publisher: Child | None = None

    # -- child processes (shared machinery: loadtest.common.Children) --------------------

    def _spawn(self, name: str, target: Any, *args: Any) -> Child:
        return self.procs.spawn(name, target, *args)

    def _pump(self, timeout: float) -> None:
        self.procs.pump(timeout)

    def _expect(self, child: Child, kind: str, timeout_s: float) -> Any:
        return self.procs.expect(child, kind, timeout_s)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        s = self.s
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if s.url and s.admin:
            url, admin = s.url, s.admin.rstrip("/")
            status, _ = http_get(admin, "/readyz")
            if status != 200:
                raise SetupError(f"{admin}/readyz answered {status or 'nothing'}")
            server_cmd = None
        else:
            self.server = Server(s.workers, s.flush_ms, s.config, s.server_log_level, s.server_cpus)
            self.server.wait_ready(30.0)
            url, admin = self.server.url, self.server.admin
            server_cmd = self.server.command()
        if s.loadgen_cpus:  # after the server started: it must not inherit this
            os.sched_setaffinity(0, s.loadgen_cpus)  # children forked from here inherit it
        _, stats0 = http_get(admin, "/stats")
        supervisor = self._supervisor_pid(stats0)
        names = self.server.board_pids() if self.server else {}
        if not names and stats0:
            names = {f"worker-{w['slot']}": w["pid"] for w in stats0.get("workers", [])}
            if supervisor:
                names["supervisor"] = supervisor
        self._log(f"server ready: {url} (admin {admin}), supervisor pid {supervisor}")

        # subscribers, then the publisher (it waits for `go`)
        budget = s.duration_s + s.settle_s + 120.0 + s.subscribers / 50.0
        per = [
            s.subscribers // s.sub_procs + (1 if i < s.subscribers % s.sub_procs else 0)
            for i in range(s.sub_procs)
        ]
        for i, n in enumerate(per):
            if n:
                self.subs.append(
                    self._spawn(
                        f"subscriber-{i + 1}",
                        _subscriber_process,
                        i + 1,
                        url,
                        n,
                        s.topic,
                        s.connect_concurrency,
                        budget,
                    )
                )
        keys = [f"k{i:0{len(str(s.keys - 1))}d}" for i in range(s.keys)]
        self.publisher = self._spawn(
            "publisher",
            _publisher_process,
            admin,
            s.topic,
            keys,
            s.rate,
            s.duration_s,
            s.batch_ms,
            s.max_publish_items,
            s.body,
            budget,
        )
        setup: dict[str, Any] = {}
        for c in self.subs:
            setup[c.name] = self._expect(c, "ready", 60.0 + s.subscribers / 20.0)
        ready = sum(v["ready"] for v in setup.values())
        self._log(
            f"{ready} of {s.subscribers} subscribers ready: "
            + ", ".join(f"{k} {v['ready']} in {v['setup_s']} s" for k, v in setup.items())
        )
        if ready < s.subscribers:
            raise SetupError(f"only {ready} of {s.subscribers} subscribers are subscribed: {setup}")

        # -- the measured window --------------------------------------------------------------
        for c in self.subs:
            c.send("mark_start")
        start_counts = {c.name: self._expect(c, "marked_start", 10.0) for c in self.subs}
        pids = server_pids(supervisor) if supervisor else []
        gen_pids = {c.name: c.proc.pid for c in self.children if c.proc.pid}
        gen_pids["orchestrator"] = os.getpid()
        cpu0 = cpu_seconds(pids)
        gen0 = cpu_seconds(gen_pids.values())
        busy0 = machine_busy_seconds()
        _, stats_start = http_get(admin, "/stats")
        t0 = time.monotonic()
        self.publisher.send("go")
        done = self._watch(t0, start_counts)
        t1 = time.monotonic()
        for c in self.subs:
            c.send("mark_end")
        cpu1 = cpu_seconds(pids)
        gen1 = cpu_seconds(gen_pids.values())
        busy1 = machine_busy_seconds()
        pids_after = server_pids(supervisor) if supervisor else []
        _, stats_end = http_get(admin, "/stats")
        end_counts = {c.name: self._expect(c, "marked_end", 20.0) for c in self.subs}
        window = t1 - t0

        # -- final values and convergence -------------------------------------------------------
        self.publisher.send("final")
        finals = self._expect(self.publisher, "finals", 30.0)
        for c in self.subs:
            c.send("converge", finals, s.settle_s)
        conv = {c.name: self._expect(c, "converged", s.settle_s + 30.0) for c in self.subs}
        for c in self.children:
            c.send("exit")

        report = self._report(
            started_at=started_at,
            url=url,
            admin=admin,
            server_cmd=server_cmd,
            window=window,
            done=done,
            start_counts=start_counts,
            end_counts=end_counts,
            conv=conv,
            cpu=(cpu0, cpu1),
            gen=(gen0, gen1),
            busy=busy1 - busy0,
            gen_pids=gen_pids,
            names=names,
            pids=(pids, pids_after),
            stats=(stats_start, stats_end),
            setup=setup,
        )
        path = s.report
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        print(summary(report, path))
        ok = report["convergence"]["all_converged"] and not report["publish"]["failed"]
        return 0 if ok else 1

    def _supervisor_pid(self, stats: Any) -> int | None:
        if self.server is not None:
            return self.server.proc.pid
        try:
            worker_pid = int(stats["workers"][0]["pid"])
            return int(psutil.Process(worker_pid).ppid())
        except (TypeError, KeyError, IndexError, ValueError, psutil.Error):
            return None  # a server on another machine: no server CPU figures

    def _watch(self, t0: float, start_counts: Mapping[str, Any]) -> dict[str, Any]:
        """Progress lines every second until the publisher is done (bounded)."""
        assert self.publisher is not None
        s = self.s
        deadline = t0 + s.duration_s + 60.0
        last_t, last_sent = t0, 0
        last_upd = sum(int(v["updates"]) for v in start_counts.values())
        last_frames = sum(int(v["frames"]) for v in start_counts.values())
        next_line = t0 + 1.1  # just after the children's once-a-second progress
        while True:
            for i, (k, payload) in enumerate(self.publisher.inbox):
                if k == "done":
                    del self.publisher.inbox[i]
                    return dict(payload)
            if time.monotonic() > deadline:
                self.publisher.send("abort")
                return dict(self._expect(self.publisher, "done", 30.0))
            if self.publisher.gone or not self.publisher.proc.is_alive():
                self._pump(0)
                if not any(k == "done" for k, _ in self.publisher.inbox):
                    raise RuntimeError("the publisher exited during the run")
                continue
            self._pump(max(0.0, min(0.2, next_line - time.monotonic())))
            now = time.monotonic()
            if now >= next_line:
                sent = int(self.publisher.progress.get("sent", 0))
                upd = sum(int(c.progress.get("updates", 0)) for c in self.subs)
                frames = sum(int(c.progress.get("frames", 0)) for c in self.subs)
                p99s = [
                    float(c.progress["p99_ms"])
                    for c in self.subs
                    if c.progress.get("p99_ms") is not None
                ]
                dt = max(now - last_t, 1e-6)
                self._log(
                    f"[{now - t0:5.1f}s] published {(sent - last_sent) / dt:>9,.0f}/s  "
                    f"delivered {(upd - last_upd) / dt:>11,.0f}/s  "
                    f"frames {(frames - last_frames) / dt:>8,.0f}/s  "
                    f"p99 so far {max(p99s) if p99s else float('nan'):.1f} ms"
                )
                last_t, last_sent, last_upd, last_frames = now, sent, upd, frames
                next_line += 1.0

    def _log(self, line: str) -> None:
        if not self.s.quiet:
            print(line, file=sys.stderr, flush=True)

    # -- the report -----------------------------------------------------------------------------

    def _report(
        self,
        *,
        started_at: str,
        url: str,
        admin: str,
        server_cmd: str | None,
        window: float,
        done: Mapping[str, Any],
        start_counts: Mapping[str, Any],
        end_counts: Mapping[str, Any],
        conv: Mapping[str, Any],
        cpu: tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]],
        gen: tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]],
        busy: float,
        gen_pids: Mapping[str, int],
        names: Mapping[str, int],
        pids: tuple[list[int], list[int]],
        stats: tuple[Any, Any],
        setup: Mapping[str, Any],
    ) -> dict[str, Any]:
        s = self.s
        updates = sum(end_counts[n]["updates"] - start_counts[n]["updates"] for n in end_counts)
        frames = sum(end_counts[n]["frames"] - start_counts[n]["frames"] for n in end_counts)
        hist: dict[int, int] = {}
        for v in end_counts.values():
            merge_hist(hist, v["hist"])
        latency: dict[str, Any] = dict(percentiles_ms(hist, (0.5, 0.9, 0.99, 0.999)))
        latency["max"] = round(max(v["max_ns"] for v in end_counts.values()) / 1e6, 3)
        latency["samples"] = sum(v["samples"] for v in end_counts.values())
        latency["negative"] = sum(v["negative"] for v in end_counts.values())

        by_name = {pid: name for name, pid in names.items()}
        cpu0, cpu1 = cpu
        both = [pid for pid in cpu0 if pid in cpu1]
        per_process = {by_name.get(p, f"pid {p}"): round(used(cpu0, cpu1, p), 3) for p in both}
        per_process_sys = {
            by_name.get(p, f"pid {p}"): round(used(cpu0, cpu1, p, 1), 3) for p in both
        }
        server_cpu = sum(used(cpu0, cpu1, p) for p in both) if cpu0 else None
        workers_cpu = sum(v for k, v in per_process.items() if k.startswith("worker-"))
        gen0, gen1 = gen
        gen_by_name = {
            name: round(used(gen0, gen1, pid), 3)
            for name, pid in gen_pids.items()
            if pid in gen0 and pid in gen1
        }
        loadgen_cpu = sum(gen_by_name.values())
        millions = updates / 1e6

        def delta(name: str) -> int | None:
            try:
                return int(stats[1]["totals"][name]) - int(stats[0]["totals"][name])
            except (TypeError, KeyError, ValueError):
                return None

        converged = sum(v["converged"] for v in conv.values())
        clients = sum(v["clients"] for v in conv.values())
        errors: collections.Counter[str] = collections.Counter()
        close_codes: collections.Counter[str] = collections.Counter()
        for v in conv.values():
            errors.update(v["errors"])
            close_codes.update(v["close_codes"])
        return {
            "tool": "loadtest.firstbench",
            "started_at": started_at,
            "command": shlex.join([sys.executable, "-m", "loadtest.firstbench", *self.argv]),
            "server_command": server_cmd,
            "workload": {
                "subscribers": s.subscribers,
                "subscriber_processes": len(self.subs),
                "topic": s.topic,
                "keys": s.keys,
                "rate_per_s": s.rate,
                "duration_s": s.duration_s,
                "batch_interval_ms": s.batch_ms,
                "workers": s.workers if self.server else None,
                "flush_interval_ms": s.flush_ms if self.server else None,
                "publish_via": f"POST /publish ({s.body} body, one keep-alive HTTP/1.1 connection)",
                "data": "[seq, time.time_ns()] stamped per batch just before it is sent",
                "server_cpus": list(s.server_cpus) if s.server_cpus else None,
                "loadgen_cpus": list(s.loadgen_cpus) if s.loadgen_cpus else None,
            },
            "server": {
                "url": url,
                "admin": admin,
                "started_by_script": self.server is not None,
                "processes": dict(names),
                "processes_changed": sorted(set(pids[1]) ^ set(pids[0])),
            },
            "setup": dict(setup),
            "window_s": round(window, 3),
            "publish": dict(done),
            "delivery": {
                "updates": updates,
                "updates_per_s": round(updates / window, 1),
                "frames": frames,
                "frames_per_s": round(frames / window, 1),
                "updates_per_frame": round(updates / frames, 2) if frames else None,
                # every flush carries every key that changed since the last one; with
                # keys published round-robin that is min(K, U x flush interval) keys
                "ideal_updates_per_s": (
                    round(
                        s.subscribers * min(s.keys, s.rate * s.flush_ms / 1000) * 1000 / s.flush_ms
                    )
                    if self.server
                    else None
                ),
                "server_counted": {
                    "note": "from /stats (status files refreshed once a second): approximate",
                    "updates_delivered": delta("updates_delivered"),
                    "frames_sent": delta("frames_sent"),
                    "bytes_sent": delta("bytes_sent"),
                    "slow_closes": delta("slow_closes"),
                },
            },
            "latency_ms": latency,
            "cpu": {
                "server_s": round(server_cpu, 3) if server_cpu is not None else None,
                "server_core_share": round(server_cpu / window, 3)
                if server_cpu is not None
                else None,
                "server_s_per_million_updates": (
                    round(server_cpu / millions, 4) if server_cpu is not None and millions else None
                ),
                "server_per_process_s": per_process,
                "server_per_process_system_s": per_process_sys,
                # the workers alone: the figure to hold against the bare coalescing loop,
                # which had no publish path (admin HTTP parsing, hub)
                "workers_s_per_million_updates": (
                    round(workers_cpu / millions, 4) if workers_cpu and millions else None
                ),
                "loadgen_s": round(loadgen_cpu, 3),
                "loadgen_core_share": round(loadgen_cpu / window, 3),
                "loadgen_per_process_s": gen_by_name,
                "cores": os.cpu_count(),
                # CPU the whole machine spent in the window, and what neither the server
                # nor this script used (other programs, kernel threads): a busy neighbour
                # inflates latency and lowers throughput on a small machine
                "machine_busy_s": round(busy, 3),
                "machine_busy_core_share": round(busy / window, 3),
                "other_s": round(busy - (server_cpu or 0.0) - loadgen_cpu, 3),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "yardstick": "bare coalescing loop: 0.13-0.16 server CPU-s per million (field notes)",
            },
            "convergence": {
                "clients": s.subscribers,
                "connected_at_end": clients,
                "converged": converged,
                "all_converged": converged == s.subscribers,
                "per_process": dict(conv),
            },
            "errors": dict(errors),
            "close_codes": dict(close_codes),
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
            },
        }

    # -- teardown ---------------------------------------------------------------------------------

    def cleanup(self, keep_log_to: str | None) -> None:
        """Stop every child (exit, then terminate, then kill) and the server; bounded."""
        self.procs.stop_all()
        if self.server is not None:
            self.server.stop()
            self.server.cleanup_dir(keep_log_to)


def summary(r: Mapping[str, Any], path: str) -> str:
    """The human-readable summary (Markdown) of a report."""
    w, d, lat, cpu, conv, pub = (
        r["workload"],
        r["delivery"],
        r["latency_ms"],
        r["cpu"],
        r["convergence"],
        r["publish"],
    )

    def num(x: Any, fmt: str = ",.0f") -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = [
        "## fanout first measurement",
        "",
        f"- workload: {w['subscribers']:,} subscribers ({w['subscriber_processes']} processes) of "
        f"`{w['topic']}` ({w['keys']} keys); {num(w['rate_per_s'])} updates/s for {w['duration_s']:g} s "
        f"in {w['batch_interval_ms']:g} ms batches via {w['publish_via']}; "
        + (
            f"{w['workers']} workers, flush {w['flush_interval_ms']} ms"
            if w["workers"] is not None
            else "a server started elsewhere"
        ),
        f"- published: {pub['accepted']:,} accepted ({num(pub['achieved_rate'])}/s achieved), "
        f"{pub['failed']:,} failed; HTTP round trip p50 {num(pub['rtt_ms'].get('p50'), '.1f')} ms, "
        f"p99 {num(pub['rtt_ms'].get('p99'), '.1f')} ms",
        f"- delivered: **{num(d['updates_per_s'])} updates/s** in {num(d['frames_per_s'])} frames/s "
        f"({num(d['updates_per_frame'], '.1f')} updates/frame"
        + (
            f"; ideal for this workload ~{d['ideal_updates_per_s']:,}/s)"
            if d["ideal_updates_per_s"] is not None
            else ")"
        ),
        f"- latency publish->receive: p50 **{num(lat.get('p50'), '.1f')} ms**, p99 "
        f"**{num(lat.get('p99'), '.1f')} ms**, p99.9 {num(lat.get('p999'), '.1f')} ms, "
        f"max {num(lat.get('max'), '.1f')} ms ({lat['samples']:,} samples)",
        f"- server CPU: **{num(cpu['server_s_per_million_updates'], '.3f')} CPU-s per million "
        f"delivered updates**; {num(cpu['server_s'], '.1f')} CPU-s in {r['window_s']:.1f} s = "
        f"{num(cpu['server_core_share'], '.2f')} of a core; workers alone "
        f"{num(cpu['workers_s_per_million_updates'], '.3f')} CPU-s per million ("
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu["server_per_process_s"].items()))
        + ")",
        f"- load generator CPU: {cpu['loadgen_s']:.1f} CPU-s = {cpu['loadgen_core_share']:.2f} "
        "of a core ("
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu["loadgen_per_process_s"].items())
        + f"); machine has {cpu['cores']} cores, busy {cpu['machine_busy_core_share']:.2f} of"
        f" them in the window ({cpu['other_s']:.1f} CPU-s used by other programs)",
        f"- converged: **{conv['converged']:,} of {conv['clients']:,}** clients at the final value "
        f"of every key",
    ]
    if r["errors"] or r["close_codes"]:
        lines.append(f"- errors: {r['errors']}; closes: {r['close_codes']}")
    lines += [f"- report: {path}", f"- command: `{r['command']}`"]
    if r["server_command"]:
        lines.append(f"- server: `{r['server_command']}`")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def _cpu_list(text: str) -> tuple[int, ...]:
    """ "0", "0-3", "0,2" -> CPU numbers."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list")
    return tuple(cpus)


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.firstbench",
        description="First measurement of fanout: S subscribers of one topic of K keys, a "
        "publisher at U updates/s for D seconds; reports delivered updates/s, publish-to-receive "
        "latency, server CPU-s per million delivered updates and convergence. Starts "
        "`fanout serve` itself unless --url and --admin point at a running one.",
    )
    p.add_argument(
        "--subscribers",
        type=int,
        default=1000,
        metavar="S",
        help="subscriber connections (default 1000)",
    )
    p.add_argument(
        "--sub-procs", type=int, default=2, metavar="N", help="subscriber processes (default 2)"
    )
    p.add_argument("--topic", default="bench.hot", help="topic (default bench.hot)")
    p.add_argument(
        "--keys", type=int, default=50, metavar="K", help="keys in the topic (default 50)"
    )
    p.add_argument(
        "--rate", type=float, default=10_000, metavar="U", help="updates per second (default 10000)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        metavar="D",
        help="seconds of publishing (default 30)",
    )
    p.add_argument(
        "--batch-ms", type=float, default=10.0, help="publish batch interval, ms (default 10)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes of the server started here (default 2)",
    )
    p.add_argument(
        "--flush-ms",
        type=int,
        default=20,
        help="fanout.flush_interval_ms of the server started here (default 20)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=15.0,
        metavar="S",
        help="max seconds to wait for convergence (default 15)",
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=100,
        help="connections opened at once per process",
    )
    p.add_argument(
        "--max-publish-items",
        type=int,
        default=1000,
        help="items per POST /publish at most (limits.max_publish_items)",
    )
    p.add_argument(
        "--body",
        choices=("msgpack", "json"),
        default="msgpack",
        help="POST /publish body encoding (default msgpack)",
    )
    p.add_argument(
        "--server-cpus",
        type=_cpu_list,
        metavar="LIST",
        help="pin the server started here to these CPUs (e.g. 0 or 0-1 or 0,2)",
    )
    p.add_argument(
        "--loadgen-cpus",
        type=_cpu_list,
        metavar="LIST",
        help="pin this script's processes to these CPUs",
    )
    p.add_argument("--url", help="WebSocket URL of a running server (with --admin)")
    p.add_argument("--admin", help="admin base URL of a running server (with --url)")
    p.add_argument("--config", help="config file for the server started here")
    p.add_argument(
        "--server-log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    p.add_argument(
        "--report", help="JSON report path (default reports/firstbench-<timestamp>.json)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    if bool(a.url) != bool(a.admin):
        p.error("--url and --admin go together")
    for name in (
        "subscribers",
        "sub_procs",
        "keys",
        "workers",
        "flush_ms",
        "connect_concurrency",
        "max_publish_items",
    ):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("rate", "duration", "batch_ms", "settle"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    report = a.report or os.path.join(
        "reports", f"firstbench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    return Settings(
        subscribers=a.subscribers,
        sub_procs=min(a.sub_procs, a.subscribers),
        topic=a.topic,
        keys=a.keys,
        rate=a.rate,
        duration_s=a.duration,
        batch_ms=a.batch_ms,
        workers=a.workers,
        flush_ms=a.flush_ms,
        settle_s=a.settle,
        connect_concurrency=a.connect_concurrency,
        max_publish_items=a.max_publish_items,
        body=a.body,
        server_cpus=a.server_cpus,
        loadgen_cpus=a.loadgen_cpus,
        url=a.url,
        admin=a.admin,
        config=a.config,
        server_log_level=a.server_log_level,
        report=report,
        quiet=a.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark. Exit codes: 0 measured and every client converged; 1 measured,
    but some client did not converge or some publish failed; 3 could not set up or
    failed midway; 130 interrupted."""
    args = list(sys.argv[1:] if argv is None else argv)
    s = parse_args(args)
    raise_nofile()  # inherited by the subscriber processes forked later

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(s, args)
    keep_log: str | None = None
    try:
        return bench.run()
    except KeyboardInterrupt:
        print("firstbench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    except (SetupError, RuntimeError) as exc:
        print(f"firstbench: {exc}", file=sys.stderr)
        keep_log = os.path.splitext(s.report)[0] + "-serve.log"
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(os.path.abspath(keep_log)), exist_ok=True)
        return 3
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the cleanup
        bench.cleanup(keep_log)
        if keep_log and os.path.exists(keep_log):
            print(f"firstbench: server log kept at {keep_log}", file=sys.stderr)


__all__ = ["Settings", "bucket_of", "main", "percentiles_ms", "summary"]

if __name__ == "__main__":
    sys.exit(main())
