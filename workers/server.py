"""One worker's WebSocket server: picows wiring, the flush task, the bus sink, timers.

The hot path is synchronous: bus entries are applied to the fan-out core from
the bus client's data callback; one flush task per worker asks the core what to
send every `fanout.flush_interval_ms` and writes one frame per session,
yielding to the loop every `_YIELD_EVERY` sessions so reads and pings are
served during a large flush. Everything else runs from one timer per second.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from picows import (
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from engine import codes
from engine.bus.base import Bus, Entry
from engine.config import Config
from engine.fanout.budget import slow_expired, watermarks
from engine.fanout.core import Fanout, Session, period_ticks
from engine.protocol import codec
from engine.topics import TopicRules
from workers.listener import Connection

log = logging.getLogger("fanout.worker")

_YIELD_EVERY = 256  # sessions written between two yields to the loop in one flush
SUBPROTOCOL = "fanout.v1"


class WorkerServer:
    """Serves clients of one worker process and keeps them at the latest state."""

    def __init__(self, cfg: Config, bus: Bus, *, slot: int = 1, node: str = "") -> None:
        self.cfg = cfg
        self.bus = bus
        self.slot = slot
        self.node = node or cfg.server.node or socket.gethostname()
        self.fanout = Fanout()
        self.rules = TopicRules(cfg.topics)
        self.connections: set[Connection] = set()
        self.paused: set[Connection] = set()
        self.accepting = False
        self.port = 0
        self.started = time.time()
        # settings read on the hot path, flattened
        self.max_buffer_bytes = cfg.fanout.max_buffer_bytes
        self.hard_cap_bytes = 4 * cfg.fanout.max_buffer_bytes + 4 * cfg.limits.max_message_bytes
        self.max_message_bytes = cfg.limits.max_message_bytes
        self.max_topics_per_conn = cfg.limits.max_topics_per_conn
        self.allow_publish = cfg.auth.allow_anonymous_publish
        self.high, self.low = watermarks(cfg.fanout.max_buffer_bytes)
        self.notsent_lowat = cfg.fanout.socket_notsent_lowat_bytes
        # counters (exported on the board and, later, as metrics)
        self.closes: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.connects = 0
        self.ping_timeouts = 0
        self.stats_control_frames = 0
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.on_tick: list[Any] = []  # callables run by the one-second timer

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen (SO_REUSEPORT) and start the flush task and timers."""
        cfg = self.cfg
        self._server = await ws_create_server(
            self.accept,
            cfg.server.host if host is None else host,
            cfg.server.port if port is None else port,
            reuse_port=True,
            backlog=2048,
            max_frame_size=cfg.limits.max_message_bytes,
            read_buffer_init_size=2048,
            websocket_handshake_timeout=cfg.limits.handshake_timeout_s,
            enable_auto_ping=False,
            logger_name="server",
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.accepting = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.flush_loop()))
        self._timer = loop.call_later(1.0, self.every_second)

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()

    async def drain(self, close_code: int, reason: str, timeout_s: float) -> None:
        """Stop accepting, send every client `bye` with a jittered `retry_ms`,
        close with `close_code`, and wait (up to `timeout_s`) for them to go."""
        await self.stop_accepting()
        lo, hi = self.cfg.workers.retry_min_ms, self.cfg.workers.retry_max_ms
        for conn in list(self.connections):
            conn.send_control(codec.bye(reason, random.randint(lo, hi)))
            conn.close(close_code, reason)
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.disconnect(graceful=False)

    async def close(self) -> None:
        await self.stop_accepting()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self._timer is not None:
            self._timer.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.disconnect(graceful=False)

    # -- accepting -------------------------------------------------------------------

    def accept(self, request: WSUpgradeRequest) -> Any:
        """picows listener factory: route, refuse, or accept an upgrade."""
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        if path != self.cfg.server.path:
            return _http_error(
                HTTPStatus.NOT_FOUND, "not_found", f"no WebSocket endpoint at {path}"
            )
        if not self.accepting:
            return _http_error(
                HTTPStatus.SERVICE_UNAVAILABLE, "draining", "this worker is shutting down"
            )
        if len(self.connections) >= self.cfg.limits.max_connections:
            return _http_error(
                HTTPStatus.SERVICE_UNAVAILABLE, "full", "this worker is at limits.max_connections"
            )
        headers = {}
        offered = request.headers.get("Sec-WebSocket-Protocol")
        if offered and SUBPROTOCOL in (p.strip() for p in offered.split(",")):
            headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        conn = Connection(self, f"{os.getpid():x}.{next(self._ids):x}", "")
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), conn)

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.connects += 1
        ut = conn.underlying
        ut.set_write_buffer_limits(self.high, self.low)  # type: ignore[attr-defined]
        if self.notsent_lowat:
            sock = ut.get_extra_info("socket")  # type: ignore[attr-defined]
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, self.notsent_lowat)
                except OSError:
                    pass

    def connection_closed(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.paused.discard(conn)
            self.fanout.close_session(conn.session)
            self.closes[_close_code(conn)] += 1

    def hello(self, conn_id: str) -> bytes:
        return codec.hello(conn_id, self.node, auth_required=False)

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def subscribe(
        self, session: Session, topic: str, since: tuple[str, int] | None, max_hz: float | None
    ) -> tuple[bytes, int]:
        rule = self.rules.rule_for(topic)
        period = period_ticks(max_hz, rule.max_hz, self.cfg.fanout.flush_interval_ms)
        return self.fanout.subscribe(session, topic, since, period)

    # -- bus sink --------------------------------------------------------------------

    def on_bus_epoch(self, epoch: str) -> None:
        if epoch != self.fanout.epoch:
            if self.fanout.epoch:
                log.warning(
                    "bus epoch changed (%s -> %s): clients get full snapshots",
                    self.fanout.epoch,
                    epoch,
                )
            self.fanout.reset(epoch)

    def on_bus_entries(self, entries: Sequence[Entry]) -> None:
        apply = self.fanout.apply
        for topic, key, pos, data in entries:
            apply(topic, key, pos, data)

    def on_bus_connected(self, connected: bool) -> None:
        if not connected:
            log.warning("bus link lost; serving the state held until it returns")

    # -- the flush task and timers ----------------------------------------------------

    async def flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.cfg.fanout.flush_interval_ms / 1000.0
        fanout = self.fanout
        deadline = loop.time()
        while True:
            deadline += interval
            plan = fanout.collect()
            if plan:
                deliver = fanout.deliver
                n = 0
                for session, deliveries in plan.items():
                    deliver(session, deliveries)
                    n += 1
                    if n % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
            delay = deadline - loop.time()
            if delay < 0:
                deadline = loop.time()  # overloaded: don't try to catch up on missed ticks
                delay = 0
            await asyncio.sleep(delay)

    def every_second(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(1.0, self.every_second)
        now = time.monotonic()
        timeout = self.cfg.fanout.slow_client_timeout_s
        for conn in list(self.paused):
            if conn.closing:
                self.paused.discard(conn)
            elif conn.underlying.get_write_buffer_size() <= self.low:  # type: ignore[attr-defined]
                conn.mark_drained()  # refused a frame but drained without a transport resume
            elif slow_expired(conn.paused_since, now, timeout):
                conn.close(codes.CLOSE_SLOW_CONSUMER, "slow consumer")
                self.paused.discard(conn)
        self.check_pings(now)
        for fn in self.on_tick:
            fn()

    def check_pings(self, now: float) -> None:
        """One WebSocket ping per `ping_interval_s` per connection, from this one
        timer (not a task per connection); drop those silent past `ping_timeout_s`."""
        interval = self.cfg.fanout.ping_interval_s
        timeout = self.cfg.fanout.ping_timeout_s
        for conn in list(self.connections):
            if conn.closing or conn.transport is None:
                continue
            sent = conn.ping_sent_at
            if sent is None:
                if now - conn.last_ping_at >= interval:
                    conn.ping_sent_at = conn.last_ping_at = now
                    conn.transport.send_ping()
            elif now - sent >= timeout:
                # the peer is gone or stuck: no close frame could reach it
                conn.closing = True
                self.ping_timeouts += 1
                conn.transport.disconnect(graceful=False)

    def status(self) -> dict[str, Any]:
        s = self.fanout.stats
        return {
            "pid": os.getpid(),
            "slot": self.slot,
            "accepting": self.accepting,
            "bus_connected": self.bus.connected,
            "bus_lag_ms": self.bus.lag_ms(),
            "connections": len(self.connections),
            "subscriptions": self.fanout.subscription_count(),
            "frames_sent": s.frames_sent + self.stats_control_frames,
            "bytes_sent": s.bytes_sent,
            "updates_applied": s.updates_applied,
            "updates_delivered": s.updates_delivered,
            "frames_refused": s.frames_refused,
            "slow_clients": len(self.paused),
            "slow_closes": self.closes.get(codes.CLOSE_SLOW_CONSUMER, 0),
            "connects": self.connects,
            "closes": {str(k): v for k, v in self.closes.items()},
            "errors": dict(self.errors),
            "ping_timeouts": self.ping_timeouts,
            "started": self.started,
        }


_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _close_code(conn: Connection) -> int:
    """The close code a connection ended with: ours if we sent one, else the
    client's, else 1006 (no close handshake)."""
    hs = conn.transport.close_handshake if conn.transport is not None else None
    if hs is not None:
        info = hs.sent if hs.sent is not None else hs.recv
        if info is not None:
            return int(info.code.value)
    return 1006


def _http_error(status: HTTPStatus, code: str, message: str) -> WSUpgradeResponseWithListener:
    import json

    body = json.dumps({"error": code, "message": message}).encode()
    resp = WSUpgradeResponse.create_error_response(
        status, body, extra_headers={"Content-Type": "application/json"}
    )
    return WSUpgradeResponseWithListener(resp, None)
