"""Publishing from back-end code: through the admin HTTP API, or straight into the bus.

`Publisher` posts to `POST /publish` on the admin port over one keep-alive
HTTP/1.1 connection (h11 over asyncio streams), reopened when it breaks.

Retries and why they are safe: a request that failed on a connection error
(refused, reset, a keep-alive connection the server closed, a timeout) or was
answered 503 is sent again, up to `retries` times with backoff and jitter. A
retried request may have been applied already (the answer was lost), so a
retry can publish the same value twice. For **state topics that is harmless
by design**: a key's latest value is what it was (the second publish gets a
newer position, and subscribers may receive the same value once more, which
is what latest-state delivery allows). It would duplicate events of stream
topics (not served yet): set `retries=0` for them. Requests the server
refused (400, 401, 413, 415) are never retried: they raise `PublishError`.

`BusPublisher` publishes through the configured bus backend
(`engine.bus.create_bus`), without HTTP: for back-end code running next to
the bus (the Redis backend when it exists; the local hub, given the engine's
run directory). A publish either reports positions or raises
`engine.errors.BusUnavailable` (nothing was published), so the caller may
retry it under the same rule as above.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import h11
import msgpack

from engine.backoff import Backoff
from engine.bus.base import Update
from engine.protocol.codec import data_problem, format_pos, utf8_problem, valid_topic

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
    `http://127.0.0.1:8001`), sending `Authorization: Bearer <api_key>` when given.

    One request at a time over one connection (concurrent calls queue on a
    lock); open several Publishers for parallel requests.
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
    ) -> None:
        parts = urlsplit(admin_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"admin_url must be http://host:port, got {admin_url!r}")
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

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, topic: str, key: str, data: Any) -> str:
        """Publish one update (data None deletes the key); returns its position."""
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
        answer = await self._post(msgpack.packb({"items": batch}, use_bin_type=True))
        return [str(p) for p in answer["pos"]]

    async def close(self) -> None:
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
