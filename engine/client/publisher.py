"""Publishing from back-end code: through the admin HTTP API, a worker's
WebSocket endpoint, or straight into the bus.

`Publisher` posts to `POST /publish` on the admin port over one keep-alive
HTTP/1.1 connection (h11 over asyncio streams), reopened when it breaks. Given
`ws_url` instead, it sends each batch as one `pub` with `items` over a
WebSocket connection (docs/protocol.md section 3), up to `max_in_flight`
batches at once per connection, each matched to its `ack` (a position per
item) or `err` by its `id`; a broken connection fails the batches in flight,
which are sent again on a new connection (opened with backoff) under the
retry rule below. `connections=N` spreads the batches over N connections on
distinct workers (`hello.conn` says which worker a connection reached): the
worker that reads a batch decodes and checks it, so one connection can
saturate its worker at high rates.

Retries and why they are safe: a request that failed on a connection error
(refused, reset, a keep-alive connection the server closed, a timeout) or was
answered 503 is sent again, up to `retries` times with backoff and jitter. A
retried request may have been applied already (the answer was lost), so a
retry can publish the same value twice. For **state topics that is harmless
by design**: a key's latest value is what it was (the second publish gets a
newer position, and subscribers may receive the same value once more, which
is what latest-state delivery allows). It would duplicate events of stream
topics (not served yet): set `retries=0` for them. Requests the server
refused (400, 401, 413, 415; over WebSocket every `err` but `unavailable` and
`rate_limited`, which publish nothing) are never retried: they raise `PublishError`.

`BusPublisher` publishes through the configured bus backend
(`engine.bus.create_bus`), without HTTP: for back-end code running next to
the bus (the Redis backend when it exists; the local hub, given the engine's
run directory). A publish either reports positions or raises
`engine.errors.BusUnavailable` (nothing was published), so the caller may
retry it under the same rule as above.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import h11
import msgpack
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from engine.backoff import Backoff
from engine.bus.base import Update
from engine.protocol.codec import (
    conn_worker,
    data_problem,
    decode_frame,
    format_pos,
    utf8_problem,
    valid_topic,
)

if TYPE_CHECKING:
    from engine.bus.base import Bus
    from engine.config import Config

Item = tuple[str, str, Any]  # (topic, key, data); data None deletes the key

_MAX_RESPONSE_BYTES: Final = 1 << 20
_RETRYABLE: Final = (
    OSError,
    EOFError,
    TimeoutError,
    h11.ProtocolError,
    asyncio.IncompleteReadError,
)
# `err` codes of a WebSocket `pub` that published nothing and may be sent again
_WS_RETRYABLE_CODES: Final = frozenset({"unavailable", "rate_limited"})
_MAX_ID: Final = 2**53
MAX_CONNECTIONS: Final = 64  # WebSocket connections of one Publisher, at most
CONNECT_TRIES: Final = 8  # connections opened per distinct worker wanted, at most


class PublishError(Exception):
    """The admin API refused a publish (`status`, `error` code, `message`), or
    it stayed unavailable through every retry (status 503, or 0 when it could
    not be reached)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"HTTP {status} {error}: {message}" if status else f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message


class Publisher:
    """Publishes updates through the admin HTTP API (`admin_url`, e.g.
    `http://127.0.0.1:8001`), sending `Authorization: Bearer <api_key>` when given;
    or, given `ws_url` (`ws://host:port/ws`), over a worker's WebSocket endpoint,
    sending `Authorization: Bearer <token>` when given (a token whose
    `pub_topics` cover the topics, or none with `auth.allow_anonymous_publish`).

    HTTP: one request at a time over one connection (concurrent calls queue on
    a lock); open several Publishers for parallel requests. WebSocket: up to
    `max_in_flight` concurrent `publish_many` calls are in flight per connection
    (more wait for a slot); a batch's encoded message must fit the server's
    `limits.max_message_bytes` (`max_message_bytes`, checked before sending:
    ValueError) and hold at most `limits.max_publish_items` items.

    `connections` (WebSocket, default 1): batches go to up to that many
    connections in turn, each on a worker of its own (the worker that reads a
    batch decodes and checks it: one connection can saturate its worker). The
    kernel picks a connection's worker (SO_REUSEPORT) and `hello.conn` names it:
    connections are opened until that many distinct workers answered, at most
    CONNECT_TRIES per connection wanted, the others closed at once; a node with
    fewer workers gets one connection per worker. A lost connection is replaced
    (again on a worker not held, when one answers) by the next batch.
    """

    def __init__(
        self,
        admin_url: str = "http://127.0.0.1:8001",
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        ws_url: str | None = None,
        token: str | None = None,
        max_in_flight: int = 8,
        max_message_bytes: int = 65_536,
        connections: int = 1,
    ) -> None:
        parts = urlsplit(admin_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"admin_url must be http://host:port, got {admin_url!r}")
        if ws_url is not None and urlsplit(ws_url).scheme not in ("ws", "wss"):
            raise ValueError(f"ws_url must be ws://host:port/path, got {ws_url!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, got {connections}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = parts.path.rstrip("/") + "/publish"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff = backoff or Backoff(50.0, 2_000.0)
        self._rng = rng or random.Random()
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._h11: h11.Connection | None = None
        self.connections_opened = 0
        self.retried = 0
        self.ws_url = ws_url
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.connections = connections
        self._slots = asyncio.Semaphore(max_in_flight * connections)
        self._channels: list[_WsChannel] = []
        self._spread = False  # True: the last opening round found no more distinct workers
        self._next_channel = 0
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Publisher:
        return self

    @property
    def ws_workers(self) -> set[str]:
        """The workers its open WebSocket connections are on (`hello.conn`'s part)."""
        return {c.worker for c in self._channels if not c.lost.done()}

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, topic: str, key: str, data: Any) -> str:
        """Publish one update (data None deletes the key); returns its position."""
        if self.ws_url is not None:
            return (await self.publish_many([(topic, key, data)]))[0]
        body = msgpack.packb({"topic": topic, "key": key, "data": data}, use_bin_type=True)
        answer = await self._post(body)
        return str(answer["pos"])

    async def publish_many(self, items: Iterable[Item]) -> list[str]:
        """Publish a batch atomically (all or nothing); returns one position per item.

        The server caps a batch at `limits.max_publish_items` (400 above it).
        """
        batch = [{"topic": t, "key": k, "data": d} for t, k, d in items]
        if not batch:
            return []
        if self.ws_url is not None:
            return await self._pub_ws(batch)
        answer = await self._post(msgpack.packb({"items": batch}, use_bin_type=True))
        return [str(p) for p in answer["pos"]]

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        for ws in channels:
            ws.close()
        writer, self._writer, self._reader, self._h11 = self._writer, None, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    # -- the exchange ------------------------------------------------------------------

    async def _post(self, body: bytes) -> Any:
        attempt = 0
        while True:
            try:
                async with self._lock:
                    status, payload = await asyncio.wait_for(self._exchange(body), self.timeout_s)
            except _RETRYABLE as exc:
                await self.close()
                failure = PublishError(0, "unreachable", f"{type(exc).__name__}: {exc}")
            else:
                info = _json(payload)
                if status == 200:
                    return info
                failure = PublishError(
                    status, str(info.get("error", "")), str(info.get("message", payload[:200]))
                )
                if status != 503:
                    raise failure
            if attempt >= self.retries:
                raise failure
            self.retried += 1
            await asyncio.sleep(self.backoff.delay_ms(attempt, self._rng.random()) / 1000.0)
            attempt += 1

    async def _exchange(self, body: bytes) -> tuple[int, bytes]:
        if self._writer is None or self._h11 is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._h11 = h11.Connection(h11.CLIENT)
            self.connections_opened += 1
        conn, reader, writer = self._h11, self._reader, self._writer
        headers = [
            ("host", f"{self.host}:{self.port}"),
            ("content-type", "application/msgpack"),
            ("content-length", str(len(body))),
            ("accept", "application/json"),
        ]
        if self.api_key:
            headers.append(("authorization", f"Bearer {self.api_key}"))
        out = conn.send(h11.Request(method="POST", target=self.path, headers=headers))
        out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise EOFError("the server closed the connection before answering")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > _MAX_RESPONSE_BYTES:
                    raise h11.RemoteProtocolError("response too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the server closed the connection")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()  # keep-alive: the next request reuses it
        else:
            await self.close()
        return status, b"".join(chunks)

    # -- the WebSocket channel -----------------------------------------------------------

    async def _pub_ws(self, batch: list[dict[str, Any]]) -> list[str]:
        """Send one `pub` batch, retried under the module's rule; its positions."""
        attempt = 0
        while True:
            rid = next(self._ids) % _MAX_ID
            message = msgpack.packb({"op": "pub", "id": rid, "items": batch}, use_bin_type=True)
            if len(message) > self.max_message_bytes:
                raise ValueError(
                    f"a batch of {len(batch)} items is {len(message)} bytes encoded, over"
                    f" max_message_bytes ({self.max_message_bytes}, the server's"
                    " limits.max_message_bytes): send smaller batches"
                )
            used: list[_WsChannel] = []
            try:
                async with self._slots:
                    answer = await asyncio.wait_for(
                        self._exchange_ws(rid, message, used), self.timeout_s
                    )
            except (*_RETRYABLE, ConnectionError) as exc:
                for channel in used:  # timed out or lost: the retry goes elsewhere
                    self._drop_ws(channel)
                failure = PublishError(0, "unreachable", f"{type(exc).__name__}: {exc}")
            else:
                if answer.get("op") == "ack":
                    return [str(p) for p in answer["pos"]]
                failure = PublishError(0, str(answer.get("code")), str(answer.get("msg")))
                if failure.error not in _WS_RETRYABLE_CODES:
                    raise failure
            if attempt >= self.retries:
                raise failure
            self.retried += 1
            await asyncio.sleep(self.backoff.delay_ms(attempt, self._rng.random()) / 1000.0)
            attempt += 1

    async def _exchange_ws(
        self, rid: int, message: bytes, used: list[_WsChannel]
    ) -> Mapping[str, Any]:
        """Send `message` on the next connection (opened as needed), appended to `used`;
        its answer."""
        async with self._connecting:  # connections are opened by one caller at a time
            live = [c for c in self._channels if not c.lost.done()]
            if len(live) != len(self._channels):
                self._spread = False  # one was lost: look for its worker again
            self._channels = live
            if not live or (len(live) < self.connections and not self._spread):
                await self._open_channels()
            channel = self._channels[self._next_channel % len(self._channels)]
            self._next_channel += 1
        used.append(channel)
        return await channel.request(rid, message)

    async def _open_channels(self) -> None:
        """Open connections until `connections` distinct workers are held, at most
        CONNECT_TRIES per connection wanted; one that reaches a worker already held
        is closed (unless none is held)."""
        assert self.ws_url is not None
        held = {c.worker for c in self._channels}
        for _ in range(CONNECT_TRIES * (self.connections - len(self._channels))):
            channel = await _WsChannel.open(self.ws_url, self.token, self.timeout_s)
            self.connections_opened += 1
            if channel.worker in held:
                channel.close()
                continue
            held.add(channel.worker)
            self._channels.append(channel)
            if len(self._channels) == self.connections:
                break
        self._spread = True

    def _drop_ws(self, channel: _WsChannel) -> None:
        if channel in self._channels:
            self._channels.remove(channel)
        channel.close()


class _WsChannel(WSListener):
    """One WebSocket connection of a `Publisher`: requests out, their `ack` or
    `err` matched back by `id` inside `on_ws_frame` (no queue, no reader task).
    A lost connection fails every request in flight with ConnectionError."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: WSTransport | None = None
        self.pending: dict[int, asyncio.Future[Mapping[str, Any]]] = {}
        self.hello: asyncio.Future[Mapping[str, Any]] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self.worker = ""  # `hello.conn` before the dot: the worker serving it

    @classmethod
    async def open(cls, url: str, token: str | None, timeout_s: float) -> _WsChannel:
        channel = cls()
        headers = {"Sec-WebSocket-Protocol": "fanout.v1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        await ws_connect(
            lambda: channel,
            url,
            extra_headers=headers,
            websocket_handshake_timeout=timeout_s,
            logger_name="publisher",
        )
        hello = await asyncio.wait_for(asyncio.shield(channel.hello), timeout_s)
        if hello.get("auth"):
            channel.close()
            raise PublishError(0, "not_authenticated", "the server wants a token (token=...)")
        channel.worker = conn_worker(hello)
        return channel

    async def request(self, rid: int, message: bytes) -> Mapping[str, Any]:
        if self.lost.done() or self.transport is None:
            raise ConnectionError(
                f"connection lost: {self.lost.result() if self.lost.done() else ''}"
            )
        future: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        self.transport.send(WSMsgType.BINARY, message)
        try:
            return await future
        finally:
            self.pending.pop(rid, None)

    def close(self) -> None:
        if self.transport is not None and not self.lost.done():
            self.transport.send_close()
            self.transport.disconnect()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # valid only inside on_ws_frame: decoded here
        if frame.msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code().value
            self.fail(f"closed {code} {frame.get_close_reason() or ''}".strip())
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.BINARY:
            return
        for msg in decode_frame(frame.get_payload_as_bytes()):
            if not isinstance(msg, dict):
                continue
            future = self.pending.get(msg.get("id"))  # type: ignore[arg-type]
            if future is not None and msg.get("op") in ("ack", "err"):
                if not future.done():
                    future.set_result(msg)
            elif msg.get("op") == "hello" and not self.hello.done():
                self.hello.set_result(msg)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.fail("the connection was lost")

    def fail(self, why: str) -> None:
        """The connection ended: every request in flight fails (it may be retried)."""
        if not self.lost.done():
            self.lost.set_result(why)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(why))
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(why))


def _json(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


class BusPublisher:
    """Publishes straight into the bus of `cfg` (no HTTP): for back-end code
    running next to it. `run_dir` is the engine's run directory (the local
    hub's socket lives there; other backends ignore it).

        async with BusPublisher(cfg, run_dir) as pub:
            await pub.publish("prices.fx", "EURUSD", {"px": 1.0842})
    """

    def __init__(self, cfg: Config, run_dir: str, *, connect_timeout_s: float = 10.0) -> None:
        from engine.bus import create_bus

        self.bus: Bus = create_bus(cfg, run_dir, want_entries=False)
        self.connect_timeout_s = connect_timeout_s

    async def start(self) -> None:
        """Connect; raises ConnectionError if the bus is not reachable in time."""
        await self.bus.start(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        while not self.bus.connected:
            if loop.time() > deadline:
                await self.bus.close()
                raise ConnectionError("the bus did not answer in time")
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> BusPublisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, topic: str, key: str, data: Any) -> str:
        return (await self.publish_many([(topic, key, data)]))[0]

    async def publish_many(self, items: Iterable[Item]) -> list[str]:
        """Publish atomically; returns wire positions. Raises BusUnavailable
        (nothing was published) or BusError; ValueError for a value the HTTP
        and WebSocket paths would refuse too (engine.protocol.codec rule 5:
        strings that are not UTF-8, `data` nested deeper than MAX_DATA_DEPTH)."""
        updates: list[Update] = []
        for i, (topic, key, value) in enumerate(items):
            if not valid_topic(topic) or not key:
                raise ValueError(f"bad topic {topic!r} or empty key")
            problem = utf8_problem(key)
            if problem is not None:
                raise ValueError(f"item {i} ({topic}): 'key' {problem}")
            try:
                data = msgpack.packb(value, use_bin_type=True)
            except UnicodeEncodeError:
                raise ValueError(
                    f"item {i} ({topic} {key!r}): 'data' holds a string that is not valid UTF-8"
                ) from None
            problem = data_problem(data)
            if problem is not None:
                raise ValueError(f"item {i} ({topic} {key!r}): 'data' {problem}")
            updates.append(Update(topic, key, data))
        if not updates:
            return []
        return [format_pos(p) for p in await self.bus.publish_wait(updates)]

    async def close(self) -> None:
        await self.bus.close()
