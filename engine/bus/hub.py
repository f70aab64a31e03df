"""The hub: the embedded bus of one node (`bus.backend = "local"`), on a Unix socket.

It orders publishes (`HubCore`), keeps the latest state, and pushes entries to
every client that asked for them (`engine/bus/wire.py` has the messages).

Rules:

1. One event loop, no threads: a client's handshake writes `hello`, the whole
   state dump and `d` in one go, and every later entry is written after that,
   so a new client sees no gap and no race (it may see an entry twice: the
   dump includes entries still waiting in the batch; positions make that
   harmless).
2. Entries are batched: everything published during one loop iteration goes
   out in one write per client, scheduled with `call_soon`, encoded once and
   shared by every client. Replies to a client's requests follow the entries of
   the same iteration, so a publisher that gets its positions has already been
   sent the entries they name.
3. Overflow policy (`bus.hub_max_buffer_bytes`): a client whose unsent bytes
   exceed the limit is dropped (counted in `overflow_drops`). Its link is
   closed gracefully: the hub stops reading it and sends nothing new, but what
   is already queued (including the replies of the requests it processed)
   still goes out, so a publish is never applied and then reported as failed.
   The client reconnects and resyncs from the dump. The dump itself is exempt
   until the client drains below the limit once.
4. The epoch is fresh random text per hub start: a restarted hub has lost its
   state, and clients must learn that (see `engine.bus.base`, guarantee 4).
5. Stream topics follow the `[[topics]]` rules the hub started with (SIGHUP
   does not reload them: changing a topic's mode or history needs a restart of
   the node). The dump sends their floors before the entries (guarantee 6).
6. Bounds (`engine/bus/limits.py`, `HubCore` rules 6-7): a publish over a
   limit is answered with its code (`too_large`, `too_many_keys`,
   `too_many_topics`) and applies nothing; idle topics are expired once per
   `EXPIRE_INTERVAL_S` (when a rule has an idle expiry).
7. Every `wire.HEARTBEAT_INTERVAL_S` each client that wants entries gets a
   heartbeat with the hub's wall clock, queued behind the entries already
   sent: a worker that reads it late, or not at all, shows a bus lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

import uvloop

from engine.board import Board
from engine.bus import expiry_of, history_of, hub_socket_path, limits_of, wire
from engine.bus.hubcore import HubCore
from engine.codes import ErrorCode
from engine.errors import BusRefused

if TYPE_CHECKING:
    from engine.bus.base import Entry, ExpiryOf, HistoryOf
    from engine.bus.limits import Limits
    from engine.config import Config

log = logging.getLogger(__name__)

STATUS_NAME: Final = "hub"
STATUS_INTERVAL_S: Final = 1.0
EPOCH_BYTES: Final = 6  # 12 hex characters
EXPIRE_INTERVAL_S: Final = 1.0


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _HubConn(asyncio.Protocol):
    """One client link. Reads requests synchronously; writes go through the hub."""

    __slots__ = ("allowance", "closing", "hub", "joined", "out", "reader", "transport", "wants")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.reader = wire.FrameReader()
        self.transport: asyncio.WriteTransport | None = None
        self.joined = False  # the handshake ("h") was received
        self.wants = False  # it wants the entry stream
        self.closing = False
        self.out: list[bytes] = []  # reply frames waiting for the next flush
        self.allowance = hub.max_buffer_bytes  # unsent bytes tolerated right now

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.WriteTransport: cast, don't assert
        self.transport = cast(asyncio.WriteTransport, transport)
        self.hub._conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            messages = self.reader.feed(data)
        except wire.WireError as exc:
            self.hub._drop(self, f"bad framing: {exc.message}", abort=True)
            return
        for msg in messages:
            self.hub._receive(self, msg)
            if self.closing:
                return

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.hub._forget(self)


class Hub:
    """The hub's server: accepts clients on `path` and runs the bus for them.

    Use `serve_hub` (in a running loop) or `run_hub` (a whole process).
    """

    def __init__(
        self,
        path: str,
        *,
        shards: int,
        max_buffer_bytes: int,
        epoch: str | None = None,
        clock_ms: Callable[[], int] = _wall_ms,
        history_of: HistoryOf | None = None,
        limits: Limits | None = None,
        expiry_of: ExpiryOf | None = None,
    ) -> None:
        self.path = path
        self.max_buffer_bytes = max_buffer_bytes
        epoch = epoch if epoch is not None else secrets.token_hex(EPOCH_BYTES)
        self.core = HubCore(shards, epoch, history_of, limits=limits, expiry_of=expiry_of)
        self._expires = expiry_of is not None
        self._expire_handle: asyncio.TimerHandle | None = None
        self._beat_handle: asyncio.TimerHandle | None = None
        self.refused = 0  # publishes refused for a bound
        self.overflow_drops = 0
        self._clock_ms = clock_ms
        self._conns: set[_HubConn] = set()
        self._feed: set[_HubConn] = set()  # joined clients that want entries
        self._dirty: set[_HubConn] = set()  # clients with replies waiting
        self._pending: list[Entry] = []  # entries published since the last flush
        self._flush_handle: asyncio.Handle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None

    @property
    def epoch(self) -> str:
        return self.core.epoch

    @property
    def clients(self) -> int:
        return len(self._conns)

    def status(self) -> dict[str, Any]:
        """The hub's board status."""
        return {
            "pid": os.getpid(),
            "epoch": self.core.epoch,
            "clients": len(self._conns),
            "entries": self.core.entries,
            "topics": self.core.topic_count,
            "overflow_drops": self.overflow_drops,
            "refused": self.refused,
            "topics_expired": self.core.expired,
        }

    async def start(self) -> None:
        """Listen on `path` (a stale socket file left by a dead hub is replaced)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await loop.create_unix_server(lambda: _HubConn(self), self.path)
        self._inode = os.stat(self.path).st_ino
        log.info("hub listening on %s (epoch %s)", self.path, self.core.epoch)
        if self._expires:
            self._expire_handle = loop.call_later(EXPIRE_INTERVAL_S, self._expire)
        self._beat_handle = loop.call_later(wire.HEARTBEAT_INTERVAL_S, self._beat)

    def _beat(self) -> None:
        """Rule 7: a heartbeat to every feed client, then again in HEARTBEAT_INTERVAL_S."""
        self._beat_handle = None
        if self._server is None:
            return
        try:
            frame = wire.heartbeat(self._clock_ms())
            for conn in list(self._feed):
                self._send(conn, frame)
        finally:
            loop = asyncio.get_running_loop()
            self._beat_handle = loop.call_later(wire.HEARTBEAT_INTERVAL_S, self._beat)

    def _expire(self) -> None:
        """Rule 6: drop the idle topics, then run again in EXPIRE_INTERVAL_S."""
        self._expire_handle = None
        if self._server is None:
            return
        try:
            gone = self.core.expire(self._clock_ms())
            if gone:
                log.info("hub: %d idle topic(s) expired", len(gone))
        finally:
            loop = asyncio.get_running_loop()
            self._expire_handle = loop.call_later(EXPIRE_INTERVAL_S, self._expire)

    async def close(self) -> None:
        """Stop serving: close every link and remove the socket file."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        if self._expire_handle is not None:
            self._expire_handle.cancel()
            self._expire_handle = None
        if self._beat_handle is not None:
            self._beat_handle.cancel()
            self._beat_handle = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for conn in list(self._conns):
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
        self._conns.clear()
        self._feed.clear()
        self._dirty.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)
        # Only our own socket file: a newer hub may already have replaced it.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    # -- requests -------------------------------------------------------------------

    def _receive(self, conn: _HubConn, msg: Any) -> None:
        try:
            req = wire.parse_request(msg)
        except wire.WireError as exc:
            if exc.request_id is None or not conn.joined:
                self._drop(conn, f"bad message: {exc.message}", abort=True)
            else:
                self._queue(conn, wire.failed(exc.request_id, exc.code, exc.message))
            return
        if isinstance(req, wire.Handshake):
            if conn.joined:
                self._drop(conn, "second handshake", abort=True)
            else:
                self._join(conn, req.want_entries)
        elif not conn.joined:
            self._drop(conn, "request before the handshake", abort=True)
        elif isinstance(req, wire.PublishRequest):
            try:
                entries = self.core.publish(req.updates, self._clock_ms())
            except BusRefused as exc:
                self.refused += 1
                self._queue(conn, wire.failed(req.req_id, exc.code, exc.message))
                return
            if entries:
                self._pending.extend(entries)
            self._queue(conn, wire.published(req.req_id, [e[2] for e in entries]))
        elif isinstance(req, wire.HistoryRequest):
            history = self.core.history(req.topic, req.since, req.limit)
            if history is None:
                frame = wire.failed(
                    req.req_id, ErrorCode.BAD_REQUEST, f"{req.topic!r} is not a stream topic"
                )
            else:
                frame = wire.history_reply(req.req_id, history)
            self._queue(conn, self._fit(conn, req.req_id, frame, f"history of {req.topic!r}"))
        else:
            frame = wire.snapshot_reply(req.req_id, self.core.snapshot(req.topic))
            self._queue(conn, self._fit(conn, req.req_id, frame, f"snapshot of {req.topic!r}"))

    @staticmethod
    def _fit(conn: _HubConn, req_id: int, frame: bytes, what: str) -> bytes:
        """`frame`, or a refusal when it is over the client's frame limit."""
        if len(frame) > conn.reader.max_frame_bytes:
            return wire.failed(
                req_id, ErrorCode.INTERNAL, f"{what} is {len(frame)} bytes, over the frame limit"
            )
        return frame

    def _join(self, conn: _HubConn, want_entries: bool) -> None:
        # Synchronous from hello to "d": nothing can be published in between.
        assert conn.transport is not None
        conn.joined = True
        conn.wants = want_entries
        frames = [wire.hello(self.core.epoch)]
        if want_entries:
            frames.extend(wire.floor_frames(self.core.floors()))
            frames.extend(wire.entry_frames(self.core.state_entries()))
            self._feed.add(conn)
        frames.append(wire.dump_done())
        conn.allowance = self.max_buffer_bytes + sum(len(f) for f in frames)
        for frame in frames:
            conn.transport.write(frame)

    def _queue(self, conn: _HubConn, frame: bytes) -> None:
        conn.out.append(frame)
        self._dirty.add(conn)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    # -- writes -----------------------------------------------------------------------

    def _flush(self) -> None:
        """Send this iteration's entries to every feed client, then queued replies."""
        self._flush_handle = None
        blob = b""
        if self._pending:
            entries, self._pending = self._pending, []
            frames = wire.entry_frames(entries)
            blob = frames[0] if len(frames) == 1 else b"".join(frames)
        dirty, self._dirty = self._dirty, set()
        if blob:
            for conn in list(self._feed):
                if conn not in dirty:
                    self._send(conn, blob)
        for conn in dirty:
            if conn.closing:
                continue
            replies = b"".join(conn.out)
            conn.out.clear()
            self._send(conn, blob + replies if blob and conn.wants else replies)

    def _send(self, conn: _HubConn, data: bytes) -> None:
        transport = conn.transport
        if transport is None or conn.closing:
            return
        transport.write(data)
        unsent = transport.get_write_buffer_size()
        if unsent <= self.max_buffer_bytes:
            conn.allowance = self.max_buffer_bytes  # drained: the dump's exemption ends
        elif unsent > conn.allowance:
            self.overflow_drops += 1
            self._drop(conn, f"over bus.hub_max_buffer_bytes ({unsent} bytes unsent)", abort=False)

    def _drop(self, conn: _HubConn, reason: str, *, abort: bool) -> None:
        """Close a client's link: `abort` discards what is queued, else it is sent first."""
        log.warning("hub: dropping a client: %s", reason)
        conn.closing = True
        self._feed.discard(conn)
        self._dirty.discard(conn)
        conn.out.clear()
        if conn.transport is not None:
            if abort:
                conn.transport.abort()
            else:
                conn.transport.close()

    def _forget(self, conn: _HubConn) -> None:
        self._conns.discard(conn)
        self._feed.discard(conn)
        self._dirty.discard(conn)


async def serve_hub(cfg: Config, run_dir: str) -> Hub:
    """Start a hub in the running loop, listening at `hub_socket_path(run_dir)`.

    For tests and single-process use; close it with `await hub.close()`.
    """
    hub = Hub(
        hub_socket_path(run_dir),
        shards=cfg.bus.shards,
        max_buffer_bytes=cfg.bus.hub_max_buffer_bytes,
        history_of=history_of(cfg),
        limits=limits_of(cfg),
        expiry_of=expiry_of(cfg),
    )
    await hub.start()
    return hub


def run_hub(cfg: Config, run_dir: str) -> None:
    """The hub process (called by the supervisor in the forked child).

    Builds a uvloop loop, serves until SIGTERM, SIGINT or SIGQUIT, writes the
    board status `hub` every second, and removes its socket on the way out.
    SIGHUP is ignored: restarting the hub would lose the node's state (a new
    epoch), which is not what a rolling restart of the workers asks for.
    """
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_hub_main(cfg, run_dir))


async def _hub_main(cfg: Config, run_dir: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    hub = await serve_hub(cfg, run_dir)
    board = Board(run_dir)
    try:
        while not stop.is_set():
            board.write(STATUS_NAME, hub.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATUS_INTERVAL_S)
    finally:
        await hub.close()
        log.info("hub stopped (epoch %s)", hub.epoch)
