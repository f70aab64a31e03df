"""`LocalBus`: a client of the embedded hub (`bus.backend = "local"`) over its Unix socket.

Rules:

1. Everything runs on the event loop, synchronously from `data_received`:
   no task per message. One background task only connects and waits.
2. Every (re)connect is a handshake: `on_bus_epoch(epoch)`, the stream
   topics' floors (`on_bus_floors`), the hub's whole state (and the stream
   topics' retained events) as entries, then `on_bus_connected(True)` (so a sink that reports
   "connected" holds the full state), then live entries. A restarted hub has a
   new epoch. When the link drops: `on_bus_connected(False)`, then reconnects
   with exponential backoff and jitter (100 ms .. 5 s).
3. `publish` never waits and never calls `done` from inside itself. `done`
   gets the positions once the hub replied, or `BusUnavailable` when not
   connected, when too much is already waiting to be sent to the hub
   (`max_unsent_bytes`: the overflow policy of this client's send buffer), and
   for every request still waiting for a reply when the link drops: nothing is
   reported published unless the hub said so.
   Limit: if the link breaks for a reason other than the hub going away (our
   own abort after a sink error or a corrupt frame), a request the hub had
   already applied is still reported `BusUnavailable`. `close` waits for
   outstanding replies first (up to `close_timeout_s`).
4. Nothing waits on the hub without a bound (`request_timeout_s`,
   `bus.publish_timeout_s`): a request without a reply by then gets
   `BusUnavailable` (one timer per link: requests are sent in order with one
   timeout, so the oldest pending request is the next due; a late reply is
   ignored). A publish
   is checked before it is sent (`engine/bus/limits.py` rule 1: strings, data
   size), so a bad value fails alone; the hub refuses one over a count with
   `BusRefused`. The connecting task is supervised (`engine/bus/tasks.py`).
5. Batched: the frames of every publish and request made during one loop
   iteration go to the hub in one write, in the order they were made (many
   publishers on one admin or worker cost the hub one read, not one each).
   What waits for that write counts against `max_unsent_bytes`.
6. Lag (`lag_ms`): the hub sends a heartbeat with its wall clock every
   `wire.HEARTBEAT_INTERVAL_S` behind the entries (hub.py rule 7); the lag is
   how much older than that interval the newest heartbeat read is (0 before
   the first one). A worker that stops reading, or falls behind the hub's
   writes, shows a growing lag, and /readyz fails past `bus.max_lag_ms`. Hub
   and worker share the machine, so they share the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import engine.bus.limits as bounds
import engine.bus.wire as wire
from engine.backoff import Backoff, FailureStreak
from engine.bus.backend import BusBackend, CallbackGuard
from engine.bus.base import BusSink, History, PublishDone, Snapshot, Update
from engine.bus.tasks import TaskHealth, supervise
from engine.errors import BusError, BusUnavailable

log = logging.getLogger(__name__)
_call = CallbackGuard(log, "bus: a reply callback failed")

RECONNECT_BACKOFF: Final = Backoff(min_ms=100, max_ms=5000)
# A link that stayed up this long broke for a new reason: retry at once (100 ms).
# One that keeps breaking sooner (a flapping hub, a sink that fails) backs off.
STABLE_LINK_S: Final = 10.0
HELLO_TIMEOUT_S: Final = 5.0
MAX_UNSENT_BYTES: Final = 16 * 1024 * 1024
CLOSE_TIMEOUT_S: Final = 1.0
REQUEST_TIMEOUT_S: Final = 5.0

_Reply = Callable[[Any], None]  # gets the decoded reply or a BusError


class _Link(asyncio.Protocol):
    """One connection to the hub. Dead once lost; the bus makes a new one."""

    __slots__ = (
        "bus",
        "deadlines",
        "hello_timer",
        "idle",
        "lost",
        "outbox",
        "outbox_bytes",
        "pending",
        "reader",
        "transport",
        "up",
    )

    def __init__(self, bus: LocalBus, loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.reader = wire.FrameReader()
        self.transport: asyncio.WriteTransport | None = None
        self.up = False  # handshake complete ("d" received) and not lost since
        # request id -> reply callback and its timeout (rule 4)
        # request id -> reply callback and its deadline (loop time), oldest first
        self.pending: dict[int, tuple[_Reply, float]] = {}
        self.deadlines: asyncio.TimerHandle | None = None  # the oldest pending's (rule 4)
        self.lost: asyncio.Future[None] = loop.create_future()
        self.idle: asyncio.Future[None] | None = None  # set by close(): no pending left
        self.hello_timer: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []  # frames for the hub's next write (rule 5)
        self.outbox_bytes = 0

    def send(self, frame: bytes) -> None:
        """Queue `frame` for the hub: written with the others of this loop iteration."""
        if not self.outbox:
            self.lost.get_loop().call_soon(self.flush)
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)

    def flush(self) -> None:
        frames, self.outbox, self.outbox_bytes = self.outbox, [], 0
        transport = self.transport
        # a link lost meanwhile failed its pending requests: the frames are dropped
        if frames and transport is not None and not transport.is_closing():
            transport.writelines(frames)  # one write (writev) for them all

    def unsent_bytes(self) -> int:
        assert self.transport is not None
        return self.transport.get_write_buffer_size() + self.outbox_bytes

    def itself(self) -> _Link:
        """The protocol factory of this one link (a new link per connection attempt)."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.WriteTransport: cast, don't assert
        self.transport = cast(asyncio.WriteTransport, transport)
        self.transport.write(wire.handshake(self.bus._wants_entries()))
        self.hello_timer = self.lost.get_loop().call_later(HELLO_TIMEOUT_S, self._no_hello)

    def _no_hello(self) -> None:
        log.warning("bus: no hello from the hub within %.0f s; reconnecting", HELLO_TIMEOUT_S)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except wire.WireError as exc:
            log.error("bus: bad frame from the hub (%s); reconnecting", exc.message)
            self.abort()
            return
        bus = self.bus
        for msg in messages:
            try:
                bus._on_message(self, msg)
            except Exception:
                # A sink that failed has lost entries: start over from the dump.
                log.exception("bus: error handling a hub message; reconnecting")
                self.abort()
                return

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        if self.deadlines is not None:
            self.deadlines.cancel()
            self.deadlines = None
        self.bus._on_link_lost(self)
        if not self.lost.done():
            self.lost.set_result(None)


class LocalBus(BusBackend):
    """The `Bus` of the local backend: a client of the hub at `socket_path`.

    `holds_all_state` is True: every (re)connect delivers the whole state.
    With `want_entries=False` (or no sink) the hub sends no entries: the client
    only publishes and takes snapshots.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        want_entries: bool = True,
        backoff: Backoff = RECONNECT_BACKOFF,
        max_unsent_bytes: int = MAX_UNSENT_BYTES,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        max_data_bytes: int = bounds.DEFAULT_MAX_DATA_BYTES,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.socket_path = socket_path
        self.want_entries = want_entries
        self.backoff = backoff
        self._streak = FailureStreak(backoff, stable_s=STABLE_LINK_S)
        self.max_unsent_bytes = max_unsent_bytes
        self.close_timeout_s = close_timeout_s
        self.max_data_bytes = max_data_bytes
        self.request_timeout_s = request_timeout_s
        self.health = TaskHealth()
        self.request_timeouts = 0  # requests without a reply within request_timeout_s
        self._sink: BusSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None  # settled by the first attempt
        self._current: _Link | None = None  # the link being made or in use
        self._link: _Link | None = None  # the link in use (handshake complete)
        self._epoch: str | None = None
        self._beat_ms: int | None = None  # the newest heartbeat's hub clock (rule 6)
        self._next_id = 0
        self._closed = False

    # -- Bus --------------------------------------------------------------------------

    @property
    def epoch(self) -> str | None:
        return self._epoch

    @property
    def connected(self) -> bool:
        return self._link is not None and not self.health.down

    def bus_stats(self) -> dict[str, int]:
        """Counters of this client's failure modes (rule 4), for metrics."""
        return {
            "task_restarts": self.health.total_restarts(),
            "publish_timeouts": self.request_timeouts,
        }

    @property
    def holds_all_state(self) -> bool:
        return True

    def lag_ms(self) -> float | None:
        """How far behind the hub's heartbeats this client reads (rule 6); None
        while disconnected."""
        if not self.connected:
            return None
        if self._beat_ms is None:
            return 0.0
        late_ms = time.time() * 1000.0 - self._beat_ms - wire.HEARTBEAT_INTERVAL_S * 1000.0
        return max(0.0, late_ms)

    async def start(self, sink: BusSink | None) -> None:
        """Connect; return once the first attempt is up (dump delivered) or failed."""
        if self._task is not None:
            raise RuntimeError("LocalBus.start called twice")
        self._sink = sink
        loop = self._loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._task = loop.create_task(
            supervise("link", self._run, self.health), name=f"bus-local:{self.socket_path}"
        )
        await self._first

    def publish(self, updates: Sequence[Update], done: PublishDone) -> None:
        """Send a publish now; `done` gets its positions or a `BusError` later (see module)."""
        loop = self._loop or asyncio.get_running_loop()
        link = self._link
        if link is None or self._closed:
            loop.call_soon(_call, done, BusUnavailable("not connected to the hub"))
            return
        assert link.transport is not None
        if link.unsent_bytes() > self.max_unsent_bytes:
            loop.call_soon(
                _call, done, BusUnavailable("the hub is not keeping up (send buffer full)")
            )
            return
        req_id = self._new_id()
        try:
            bounds.check_updates(updates, self.max_data_bytes)
            frame = wire.publish_request(req_id, updates)
        except BusError as exc:
            loop.call_soon(_call, done, exc)
            return
        except (TypeError, ValueError, OverflowError) as exc:  # not msgpack-encodable
            loop.call_soon(_call, done, BusError(f"cannot encode the publish: {exc}"))
            return
        if len(frame) > link.reader.max_frame_bytes:
            loop.call_soon(
                _call,
                done,
                BusError(f"publish of {len(frame)} bytes is over the hub's frame limit"),
            )
            return
        self._expect(link, req_id, done)
        link.send(frame)

    def _expect(self, link: _Link, req_id: int, reply: _Reply) -> None:
        """Wait for the reply to `req_id`, for request_timeout_s at most (rule 4)."""
        loop = self._loop or asyncio.get_running_loop()
        link.pending[req_id] = (reply, loop.time() + self.request_timeout_s)
        if link.deadlines is None:
            link.deadlines = loop.call_later(self.request_timeout_s, self._timed_out, link)

    def _timed_out(self, link: _Link) -> None:
        """Fail the pending requests past their deadline, oldest first; then
        wait for the next one's."""
        link.deadlines = None
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        pending = link.pending
        why = f"no reply from the hub within bus.publish_timeout_s ({self.request_timeout_s:g} s)"
        while pending:
            req_id, (callback, deadline) = next(iter(pending.items()))
            if deadline > now:
                link.deadlines = loop.call_at(deadline, self._timed_out, link)
                break
            del pending[req_id]
            self.request_timeouts += 1
            _call(callback, BusUnavailable(why))
        if not pending and link.idle is not None and not link.idle.done():
            link.idle.set_result(None)

    async def snapshot(self, topic: str) -> Snapshot:
        """The topic's latest state from the hub (deleted keys included with data NIL)."""
        result: Snapshot = await self._request(lambda req_id: wire.snapshot_request(req_id, topic))
        return result

    async def history(self, topic: str, since: int = 0, limit: int | None = None) -> History:
        """A stream topic's retained events after `since`, from the hub (`Bus.history`)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        result: History = await self._request(
            lambda req_id: wire.history_request(req_id, topic, since, limit)
        )
        return result

    async def _request(self, frame_of: Callable[[int], bytes]) -> Any:
        """Send the request `frame_of(req_id)` and await its reply (or its BusError)."""
        link = self._link
        if link is None or self._closed:
            raise BusUnavailable("not connected to the hub")
        assert link.transport is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def reply(result: Any) -> None:
            if fut.done():
                return
            if isinstance(result, BusError):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        req_id = self._new_id()
        try:
            frame = frame_of(req_id)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. a lone surrogate
            raise BusError(f"cannot encode the request: {exc}") from None
        self._expect(link, req_id, reply)
        link.send(frame)
        return await fut

    async def close(self) -> None:
        """Refuse new requests, wait (bounded) for outstanding replies, disconnect."""
        if self._closed:
            return
        self._closed = True
        link = self._link
        if link is not None and link.pending:
            link.idle = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.idle), self.close_timeout_s)
        link = self._current
        if link is not None and link.transport is not None:
            link.abort()
            await link.lost  # connection_lost has run: pending failed, sink told
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._settle_first()

    # -- link events (called by _Link, on the loop) ------------------------------------

    def _wants_entries(self) -> bool:
        return self.want_entries and self._sink is not None

    def _on_message(self, link: _Link, msg: Any) -> None:
        tag = msg[0]
        sink = self._sink
        if tag == "e":  # the hot path first
            if sink is not None:
                sink.on_bus_entries(wire.entries_of(msg[1]))
        elif tag == "r":
            self._reply(link, msg[1], wire.positions_of(msg[2]))
        elif tag == "s":
            self._reply(link, msg[1], wire.snapshot_of(msg))
        elif tag == "y":
            self._reply(link, msg[1], wire.history_of(msg))
        elif tag == "b":
            self._beat_ms = msg[1]
        elif tag == "f":
            if sink is not None:
                sink.on_bus_floors(wire.floors_of(msg[1]))
        elif tag == "x":
            self._reply(link, msg[1], bounds.refused(msg[2], f"the hub refused: {msg[3]}"))
        elif tag == "hello":
            if link.hello_timer is not None:
                link.hello_timer.cancel()
                link.hello_timer = None
            self._epoch = msg[1]
            if sink is not None:
                sink.on_bus_epoch(msg[1])
        elif tag == "d":
            link.up = True
            self._link = link
            self._streak.record_success(link.lost.get_loop().time())
            log.info("bus: connected to the hub (epoch %s)", self._epoch)
            if sink is not None:
                sink.on_bus_connected(True)
            self._settle_first()
        else:
            raise wire.WireError(f"unknown message tag {tag!r} from the hub")

    def _reply(self, link: _Link, req_id: int, result: Any) -> None:
        waiting = link.pending.pop(req_id, None)
        if waiting is not None:
            _call(waiting[0], result)
        if not link.pending and link.idle is not None and not link.idle.done():
            link.idle.set_result(None)

    def _on_link_lost(self, link: _Link) -> None:
        was_up = link.up
        link.up = False
        if self._link is link:
            self._link = None
        if self._current is link:
            self._current = None
        pending, link.pending = link.pending, {}
        for callback, _ in pending.values():
            _call(callback, BusUnavailable("the link to the hub was lost"))
        if link.idle is not None and not link.idle.done():
            link.idle.set_result(None)
        self._beat_ms = None  # the next link's heartbeats count
        if was_up:
            if not self._closed:
                log.warning("bus: lost the link to the hub; reconnecting")
            if self._sink is not None:
                self._sink.on_bus_connected(False)

    # -- background ---------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        streak = self._streak
        while not self._closed:
            link = _Link(self, loop)
            self._current = link
            try:
                await loop.create_unix_connection(link.itself, self.socket_path)
            except OSError as exc:
                self._current = None
                (log.warning if streak.failures == 0 else log.debug)(
                    "bus: cannot reach the hub at %s: %s", self.socket_path, exc
                )
            else:
                await link.lost
            streak.record_failure(loop.time())
            self._settle_first()
            if self._closed:
                break
            await asyncio.sleep(streak.next_delay_ms(random.random()) / 1000.0)

    def _settle_first(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id
