"""locust users for fanout: subscribers over WebSocket, a publisher over POST /publish.

    locust -f loadtest/locustfile.py --headless -u 101 -r 50 --run-time 60s \\
        --host http://127.0.0.1:8081 --ws-url ws://127.0.0.1:8080/ws \\
        --topics bench.hot --csv reports/locust --html reports/locust.html
    locust -f loadtest/locustfile.py,loadtest/locust_ramp.py ...   # with the ramp shape
    locust -f loadtest/locustfile.py --processes 2 ...               # master + 2 workers

- `SubscriberUser`: one WebSocket connection (picows, msgpack) subscribed to
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
            client.closing = True
            if client.transport is not None:
                client.transport.send_close(1000)
                client.transport.disconnect()

    async def _connect(self, handle: int, url: str, topics: list[str], max_hz: float) -> None:
        from picows import ws_connect

        client = _client_class()(self, topics, max_hz)
        self.conns[handle] = client
        try:
            await ws_connect(
                lambda: client,
                url,
                extra_headers={"Sec-WebSocket-Protocol": "fanout.v1"},
                websocket_handshake_timeout=15,
                max_frame_size=64 * 1024 * 1024,
            )
        except Exception as exc:
            self.conns.pop(handle, None)
            self.emit("fail", "connect", (time.perf_counter() - client.t0) * 1000, 0, repr(exc))


_CLIENT_CLASS: type | None = None


def _client_class() -> type:
    global _CLIENT_CLASS
    if _CLIENT_CLASS is not None:
        return _CLIENT_CLASS
    from picows import WSListener, WSMsgType

    binary, close_t, cont = WSMsgType.BINARY, WSMsgType.CLOSE, WSMsgType.CONTINUATION

    class Client(WSListener):
        def __init__(self, pump: _Pump, topics: list[str], max_hz: float) -> None:
            self.pump = pump
            self.topics = topics
            self.pending = set(topics)
            self.transport: Any = None
            self.closing = False
            self.close_code: int | None = None
            self.fragments: bytearray | None = None
            self.t0 = time.perf_counter()
            sub: dict[str, Any] = {"op": "sub", "topics": topics, "id": 1}
            if max_hz:
                sub["max_hz"] = max_hz
            self.sub = msgpack.packb(sub)

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport
            transport.send(binary, self.sub)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            t = frame.msg_type
            if t == binary and frame.fin and self.fragments is None:
                self.feed(frame.get_payload_as_bytes())
            elif t in (binary, cont):
                self.fragments = (self.fragments or bytearray()) + frame.get_payload_as_bytes()
                if frame.fin:
                    payload, self.fragments = bytes(self.fragments), None
                    self.feed(payload)
            elif t == close_t:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def feed(self, payload: bytes) -> None:
            now = time.time_ns()
            emit = self.pump.emit
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(payload)
            try:
                for msg in unpacker:
                    op = msg.get("op") if isinstance(msg, dict) else None
                    if op == "upd":
                        name = f"upd {msg.get('topic')}"
                        for v in (msg.get("items") or {}).values():
                            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                                emit("ok", name, (now - v[1]) / 1e6, len(payload), None)
                    elif op == "snap":
                        self.pending.discard(msg.get("topic"))
                        if not self.pending:
                            ms = (time.perf_counter() - self.t0) * 1000
                            emit("ok", "connect", ms, len(payload), None)
                    elif op == "err":
                        emit("fail", f"err {msg.get('code')}", 0, len(payload), str(msg))
                    elif op is None:
                        emit("fail", "bad message", 0, len(payload), repr(msg)[:100])
            except (ValueError, msgpack.UnpackException) as exc:
                emit("fail", "bad message", 0, len(payload), str(exc))

        def on_ws_disconnected(self, transport: Any) -> None:
            if not self.closing:
                code = self.close_code if self.close_code is not None else 1006
                self.pump.emit("fail", f"close {code}", 0, 0, f"server closed: {code}")

    _CLIENT_CLASS = Client
    return Client


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
