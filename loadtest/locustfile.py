"""locust users for fanout: subscribers over WebSocket, a publisher over POST /publish.

    locust -f loadtest/locustfile.py --headless -u 101 -r 50 --run-time 60s \\
        --host http://127.0.0.1:8081 --ws-url ws://127.0.0.1:8080/ws \\
        --topics bench.hot --csv reports/locust --html reports/locust.html
    locust -f loadtest/locustfile.py,loadtest/locust_ramp.py ...   # with the ramp shape
    locust -f loadtest/locustfile.py --processes 2 ...               # master + 2 workers

- `SubscriberUser`: one WebSocket connection (the load tools' client,
  loadtest/client.py, in decoding mode) subscribed to
  `--topics` (all of them, or `--topics-per-user` random ones); every key value
  received in an `upd` is reported as a request `WS upd <topic>` whose
  response time is publish-to-receive latency (`data` is `[seq, time_ns]`).
  `WS connect` reports the time from connect to the last `snap`. Failures:
  `err` messages (`WS err <code>`), closes the user did not ask for
  (`WS close <code>`), failed connects (`WS connect`).
- `PublisherUser` (exactly one per run: `fixed_count = 1`): `POST /publish` on
  `--host` (the admin port) with `--pub-batch` updates per request,
  `--pub-per-s` requests per second, keys spread over `--keys` per topic.

How it runs under gevent: picows needs a real asyncio loop, so each locust
process starts ONE real OS thread (`gevent.monkey.get_original("_thread",
"start_new_thread")`; a `threading.Thread` would be a greenlet after patching
and freezes locust) running a uvloop loop with every subscriber connection of
that process. The thread appends samples to a deque (append and popleft are
atomic); one greenlet drains it every 50 ms and fires `events.request`. The
greenlet side never blocks on the thread (work is handed over with
`call_soon_threadsafe`). Bounds: the deque holds at most `_MAX_PENDING` events
(the oldest are dropped and counted as `WS dropped-samples` failures).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random
import time
from typing import Any

import gevent
import msgpack
from gevent import monkey
from locust import HttpUser, User, constant, constant_throughput, events, task

from loadtest.client import DecodingSink, connect, listener_class

_MAX_PENDING = 1_000_000


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--ws-url",
        default=os.environ.get("LOCUST_WS_URL", "ws://127.0.0.1:8080/ws"),
        help="fanout WebSocket URL (env LOCUST_WS_URL)",
    )
    parser.add_argument("--topics", default="bench.hot", help="comma-separated topics")
    parser.add_argument(
        "--topics-per-user", type=int, default=0, help="random topics per subscriber (0: all)"
    )
    parser.add_argument("--keys", type=int, default=50, help="keys per topic (publisher)")
    parser.add_argument("--max-hz", type=float, default=0.0, help="subscribers' max_hz (0: none)")
    parser.add_argument("--pub-batch", type=int, default=10, help="updates per POST /publish")
    parser.add_argument("--pub-per-s", type=float, default=10.0, help="POST /publish per second")


class _Pump:
    """The real OS thread of one locust process: a uvloop loop of picows clients."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: collections.deque[tuple[str, str, float, int, str | None]] = (
            collections.deque()
        )
        self.dropped = 0
        self.conns: dict[int, Any] = {}
        self.ids = itertools.count(1)
        self.sink = _Samples(self)
        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        start_new_thread(self._run, ())
        deadline = time.monotonic() + 10
        while self.loop is None and time.monotonic() < deadline:
            gevent.sleep(0.01)
        if self.loop is None:
            raise RuntimeError("the picows thread did not start")
        gevent.spawn(self._drain)

    def _run(self) -> None:
        import uvloop

        logging.getLogger("picows").setLevel(logging.WARNING)
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        loop.run_forever()

    def emit(self, kind: str, name: str, ms: float, length: int, error: str | None) -> None:
        if len(self.events) >= _MAX_PENDING:
            self.events.popleft()
            self.dropped += 1
        self.events.append((kind, name, ms, length, error))

    def _drain(self) -> None:
        fire = events.request.fire
        while True:
            gevent.sleep(0.05)
            n = 0
            while self.events:
                _kind, name, ms, length, error = self.events.popleft()
                fire(
                    request_type="WS",
                    name=name,
                    response_time=ms,
                    response_length=length,
                    exception=RuntimeError(error) if error else None,
                    context={},
                )
                n += 1
                if n % 2000 == 0:
                    gevent.sleep(0)  # let locust's own greenlets run
            if self.dropped:
                fire(
                    request_type="WS",
                    name="dropped-samples",
                    response_time=0,
                    response_length=0,
                    exception=RuntimeError(f"{self.dropped} samples dropped"),
                    context={},
                )
                self.dropped = 0

    def open(self, url: str, topics: list[str], max_hz: float) -> int:
        handle = next(self.ids)
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._open, handle, url, topics, max_hz)
        return handle

    def close(self, handle: int) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._close, handle)

    # -- on the pump thread --------------------------------------------------------------

    def _open(self, handle: int, url: str, topics: list[str], max_hz: float) -> None:
        assert self.loop is not None
        self.loop.create_task(self._connect(handle, url, topics, max_hz))

    def _close(self, handle: int) -> None:
        client = self.conns.pop(handle, None)
        if client is not None:
            client.dropping = True
            if client.transport is not None:
                client.transport.send_close(1000)
                client.transport.disconnect()

    async def _connect(self, handle: int, url: str, topics: list[str], max_hz: float) -> None:
        client = listener_class()(self.sink, topics, max_hz=max_hz, tag=time.perf_counter())
        self.conns[handle] = client
        try:
            await connect(client, url)
        except Exception as exc:
            self.conns.pop(handle, None)
            self.emit("fail", "connect", (time.perf_counter() - client.tag) * 1000, 0, repr(exc))


class _Samples(DecodingSink):
    """Decoding mode (loadtest/client.py): every message of a subscriber becomes
    samples of the pump. `client.tag` is the connect's perf_counter start."""

    def __init__(self, pump: _Pump) -> None:
        self.emit = pump.emit

    def message(self, client: Any, msg: Any, now_ns: int, size: int) -> None:
        emit = self.emit
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "upd":
            name = f"upd {msg.get('topic')}"
            for v in (msg.get("items") or {}).values():
                if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                    emit("ok", name, (now_ns - v[1]) / 1e6, size, None)
        elif op == "snap":
            if client.ready:  # every topic has had its snap (marked before this call)
                emit("ok", "connect", (time.perf_counter() - client.tag) * 1000, size, None)
        elif op == "err":
            emit("fail", f"err {msg.get('code')}", 0, size, str(msg))
        elif op is None:
            emit("fail", "bad message", 0, size, repr(msg)[:100])

    def bad(self, client: Any, error: str, size: int) -> None:
        self.emit("fail", "bad message", 0, size, error)

    def disconnected(self, client: Any) -> None:
        if not client.dropping:
            code = client.close_code if client.close_code is not None else 1006
            self.emit("fail", f"close {code}", 0, 0, f"server closed: {code}")


_PUMP: _Pump | None = None


def _pump() -> _Pump:
    global _PUMP
    if _PUMP is None:
        _PUMP = _Pump()
    return _PUMP


class SubscriberUser(User):
    """One WebSocket subscriber; its samples come from the pump thread."""

    weight = 100
    wait_time = constant(1)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        topics = [t for t in o.topics.split(",") if t]
        if o.topics_per_user and o.topics_per_user < len(topics):
            topics = random.sample(topics, o.topics_per_user)
        self.handle = _pump().open(o.ws_url, topics, o.max_hz)

    @task
    def hold(self) -> None:
        """Nothing per task: the connection lives in the pump thread."""

    def on_stop(self) -> None:
        _pump().close(self.handle)


class PublisherUser(HttpUser):
    """POST /publish batches of `[seq, time_ns]` values over `--keys` keys of `--topics`."""

    fixed_count = 1

    def wait_time(self) -> float:
        return float(constant_throughput(self.environment.parsed_options.pub_per_s)(self))

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.pairs = itertools.cycle(
            [(t, f"k{k}") for k in range(o.keys) for t in o.topics.split(",") if t]
        )
        self.seq = 0

    @task
    def publish(self) -> None:
        n = self.environment.parsed_options.pub_batch
        t = time.time_ns()
        items = []
        for _ in range(n):
            topic, key = next(self.pairs)
            self.seq += 1
            items.append({"topic": topic, "key": key, "data": [self.seq, t]})
        self.client.post(
            "/publish",
            data=msgpack.packb({"items": items}),
            headers={"Content-Type": "application/msgpack"},
            name="POST /publish",
        )
