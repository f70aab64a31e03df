"""One worker's WebSocket server: picows wiring, the flush task, the bus sink, timers.

The hot path is synchronous: bus entries are applied to the fan-out core from
the bus client's data callback; one flush task per worker asks the core what to
send every `fanout.flush_interval_ms` and writes one frame per session,
yielding to the loop every `_YIELD_EVERY` sessions so reads and pings are
served during a large flush. Everything else runs from one timer per second.

Admission happens before the WebSocket upgrade, in `accept` (the picows
listener factory), in this order: the client's address (the TCP peer, or
behind `server.trusted_proxies` the X-Forwarded-For rule of
engine/auth/clientip.py), upgrade attempts per second per IP (429) and per
worker (503, engine/auth/ratelimit.py rule 7), WebSocket version 13 (426) and a Host
header (400) (RFC 6455 checks picows does not make), path (404), draining
(503), connections per worker (503), connections per client IP (429), `Origin` allowlist (403),
`Authorization: Bearer` token (401). Refusals are JSON bodies
`{"error", "message"}`. picows gives the factory no peer address, so the
server builds its own protocol factory (`_create_ws_server`, the few lines of
picows' `ws_create_server`) whose protocols record the peer in
`connection_made`, before the request is parsed.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import aiofastnet
from multidict import CIMultiDict, CIMultiDictProxy
from picows import (
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSAutoPingStrategy, WSProtocol  # type: ignore[attr-defined]

from engine import codes
from engine.auth.clientip import TrustedProxies
from engine.auth.origins import OriginPolicy
from engine.auth.permissions import anonymous
from engine.auth.ratelimit import (
    UPGRADE_ADMITTED,
    UPGRADE_BUSY,
    IpCounter,
    RatePolicy,
    UpgradeLimiter,
)
from engine.auth.tokens import Identity, TokenError, TokenVerifier, load_verifier, parse_jwks
from engine.bus.base import Bus, Entry, Update
from engine.config import Config
from engine.connection import ConnectionPolicy, LoadFailure
from engine.counters import WorkerCounters
from engine.errors import BusError
from engine.fanout.budget import slow_expired, watermarks
from engine.fanout.core import Delivery, Fanout, Session, Shared, period_ticks, quantize_period
from engine.protocol import codec
from engine.protocol.closecodes import CLOSE_ABNORMAL, CLOSE_NO_STATUS, close_label
from engine.protocol.deflate import Deflater, negotiate
from engine.status import WorkerStatus
from engine.topics import TopicRules
from workers import gcpolicy
from workers.listener import Connection

log = logging.getLogger("fanout.worker")

_YIELD_EVERY = 256  # sessions written between two yields to the loop in one flush
SUBPROTOCOL = "fanout.v1"


class WorkerServer:
    """Serves clients of one worker process and keeps them at the latest state."""

    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        *,
        slot: int = 1,
        node: str = "",
        verifier: TokenVerifier | None = None,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.slot = slot
        self.node = node or cfg.server.node or socket.gethostname()
        self.rules = TopicRules(cfg.topics)
        # permessage-deflate: one compressor per worker, none per connection
        # (engine/protocol/deflate.py rule 2; engine/fanout/core.py rule 10)
        compression = cfg.fanout.compression
        self.deflater = Deflater(cfg.fanout.compression_min_bytes) if compression != "off" else None
        # lazy: only the topics subscribed here (engine/fanout/core.py rule 9)
        self.fanout = Fanout(
            history_of=self.rules.history_of,
            lazy=True,
            max_idle_topics=cfg.fanout.max_idle_topics,
            deflater=self.deflater,
            per_client=compression == "per_client",
        )
        self.grace_ticks = math.ceil(cfg.fanout.topic_grace_s * 1000 / cfg.fanout.flush_interval_ms)
        # topic -> the `sub`s waiting for its load; the load tasks under way
        self._waiting: dict[str, list[_Waiter]] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._load_failure_logged_at = -math.inf
        self._load_slots = asyncio.Semaphore(cfg.fanout.max_topic_loads)
        self._dropped_at_trim = 0  # topics_dropped at the last malloc_trim
        # a dict as an ordered set: ~30 bytes per entry at any size, where a set's
        # table, grown 4x at a time, costs up to ~105 (5,000 entries)
        self.connections: dict[Connection, None] = {}
        self.paused: set[Connection] = set()
        self.accepting = False
        # monotonic time until which upgrades are refused (503) while this
        # node hands connections to others (engine/rebalance.py rule 6)
        self.hold_until = 0.0
        self.port = 0
        self.started = time.time()
        # settings read on the hot path, flattened
        self.ws_path = cfg.server.path.encode("latin-1")  # shared by upgraded requests
        self.max_buffer_bytes = cfg.fanout.max_buffer_bytes
        self.hard_cap_bytes = 4 * cfg.fanout.max_buffer_bytes + 4 * cfg.limits.max_message_bytes
        # security (engine/auth): who may connect, and how much they may send
        self.origins = OriginPolicy(cfg.server.allowed_origins)
        # per worker: a client may hold workers x this many on one node
        self.per_ip = IpCounter(cfg.limits.max_connections_per_ip)
        self.upgrades = UpgradeLimiter(
            cfg.limits.upgrades_per_s, cfg.limits.upgrades_per_ip_per_s, time.monotonic()
        )
        self.trusted_proxies = TrustedProxies(cfg.server.trusted_proxies)
        # limits.max_connections, or fewer if the open-file limit cannot hold
        # them (workers/main.py lowers it at start)
        self.max_connections = cfg.limits.max_connections
        self.anonymous = anonymous(cfg.auth.allow_anonymous_publish)
        self.verifier: TokenVerifier | None = None
        self._jwks_mtime = 0.0
        if cfg.auth.mode == "jwt":
            self.verifier = verifier or load_verifier(cfg.auth, os.environ, _read_text)
            if cfg.auth.jwks_file:
                self._jwks_mtime = _mtime(cfg.auth.jwks_file)
        self.auth_timeout_s = cfg.auth.timeout_s
        # the rules every connection applies (engine/connection.py)
        self.connection_policy = ConnectionPolicy(
            max_message_bytes=cfg.limits.max_message_bytes,
            max_message_fragments=cfg.limits.max_message_fragments,
            fragment_timeout_s=cfg.limits.fragment_timeout_s,
            max_topics_per_conn=cfg.limits.max_topics_per_conn,
            rate=RatePolicy(cfg.limits.messages_per_s, cfg.limits.abuse_window_s),
            history_of=self.rules.history_of,
            tokens=self.verifier is not None,
            max_publish_items=cfg.limits.max_publish_items,
        )
        self.high, self.low = watermarks(cfg.fanout.max_buffer_bytes)
        self.notsent_lowat = cfg.fanout.socket_notsent_lowat_bytes
        # this worker's counters, its connections' included (the board reads them)
        self.counters = WorkerCounters()
        self.draining = False
        self._trim_peak = 0  # most connections held since the last malloc_trim
        self._trim_at = 0.0
        self._timer_due = 0.0
        self.loop_lag_max_s = 0.0  # the latest the one-second timer ever fired
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.on_tick: list[Any] = []  # callables run by the one-second timer

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen (SO_REUSEPORT) and start the flush task and timers."""
        cfg = self.cfg
        self._server = await _create_ws_server(
            self,
            cfg.server.host if host is None else host,
            cfg.server.port if port is None else port,
            max_frame_size=cfg.limits.max_message_bytes,
            handshake_timeout_s=cfg.limits.handshake_timeout_s,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.accepting = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.flush_loop()))
        self._timer_due = loop.time() + 1.0
        self._timer = loop.call_later(1.0, self.every_second)

    async def stop_accepting(self) -> None:
        self.accepting = False
        if self._server is not None:
            self._server.close()

    async def drain(
        self, close_code: int, reason: str, timeout_s: float, pace_s: float = 0.0
    ) -> None:
        """Stop accepting, then send every client `bye` with a jittered
        `retry_ms` and close it with `close_code`, spreading the closes evenly
        over `pace_s` (so that clients do not all reconnect elsewhere at the
        same instant), and wait (up to `timeout_s` in all) for them to go."""
        await self.stop_accepting()
        self.draining = True
        lo, hi = self.cfg.workers.retry_min_ms, self.cfg.workers.retry_max_ms
        deadline = time.monotonic() + timeout_s
        victims = list(self.connections)
        pace_s = min(pace_s, max(0.0, timeout_s - 1.0))
        gap_s = pace_s / len(victims) if victims and pace_s > 0 else 0.0
        # Close in batches of at least 10 ms: one timer per close would cost more
        # than the closes for a large worker.
        per_batch = max(1, round(0.01 / gap_s)) if gap_s else max(1, len(victims))
        for i in range(0, len(victims), per_batch):
            # wait first: /readyz has turned 503 by now, so the load balancer
            # stops sending new clients before the first one is told to leave
            if gap_s:
                await asyncio.sleep(gap_s * per_batch)
            for conn in victims[i : i + per_batch]:
                conn.send_control(codec.bye(reason, random.randint(lo, hi)))
                conn.close(close_code, reason)
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.disconnect(graceful=False)

    async def close(self) -> None:
        await self.stop_accepting()
        for load in list(self._loads):
            load.cancel()
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

    def accept(self, request: WSUpgradeRequest, peer: str = "") -> Any:
        """picows listener factory: route, refuse, or accept an upgrade (the
        order of checks is in the module docstring). `peer` is the client's IP."""
        if self.trusted_proxies:  # the client behind them (engine/auth/clientip.py)
            peer = self.trusted_proxies.client_ip(
                peer, request.headers.getall("X-Forwarded-For", ())
            )
        verdict = self.upgrades.admit(peer, time.monotonic())
        if verdict != UPGRADE_ADMITTED:
            if verdict == UPGRADE_BUSY:
                return self.refuse_upgrade(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "busy",
                    "this worker is over limits.upgrades_per_s; retry later",
                    (("Retry-After", "1"),),
                )
            return self.refuse_upgrade(
                HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_attempts",
                "too many connection attempts from this address"
                " (limits.upgrades_per_ip_per_s); retry later",
                (("Retry-After", "1"),),
            )
        # RFC 6455 4.2.1 and 4.4, which picows leaves to us: it upgrades version 8
        # and a request without Host (tests/conformance/test_rfc6455_handshake.py)
        if request.headers.get("Sec-WebSocket-Version") != "13":
            return self.refuse_upgrade(
                HTTPStatus.UPGRADE_REQUIRED,
                "unsupported_version",
                "only WebSocket version 13 is served",
                (("Sec-WebSocket-Version", "13"),),
            )
        if not request.headers.get("Host"):
            return self.refuse_upgrade(
                HTTPStatus.BAD_REQUEST, "bad_request", "the upgrade request has no Host header"
            )
        path = request.path.split(b"?", 1)[0].decode("latin-1")
        if path != self.cfg.server.path:
            return self.refuse_upgrade(
                HTTPStatus.NOT_FOUND, "not_found", f"no WebSocket endpoint at {path}"
            )
        if not self.accepting:
            return self.refuse_upgrade(
                HTTPStatus.SERVICE_UNAVAILABLE, "draining", "this worker is shutting down"
            )
        if self.hold_until and time.monotonic() < self.hold_until:
            return self.refuse_upgrade(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "rebalancing",
                "this node is handing connections to other nodes; retry",
                (("Retry-After", "1"),),
            )
        if len(self.connections) >= self.max_connections:
            return self.refuse_upgrade(
                HTTPStatus.SERVICE_UNAVAILABLE, "full", "this worker is at limits.max_connections"
            )
        if not self.per_ip.allows(peer):
            return self.refuse_upgrade(
                HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_connections",
                "too many connections from this address (limits.max_connections_per_ip)",
            )
        headers = request.headers
        if not self.origins.allows(headers.get("Origin")):
            return self.refuse_upgrade(
                HTTPStatus.FORBIDDEN, "forbidden_origin", "this origin may not connect"
            )
        identity: Identity | None = None
        authorization = headers.get("Authorization")
        if self.verifier is not None and authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            try:
                if scheme.lower() != "bearer":
                    raise TokenError("expected 'Authorization: Bearer <token>'")
                identity = self.verifier.verify(token.strip(), time.time())
            except TokenError as exc:
                return self.refuse_upgrade(
                    HTTPStatus.UNAUTHORIZED,
                    "unauthorized",
                    str(exc),
                    (("WWW-Authenticate", 'Bearer realm="fanout"'),),
                )
        reply = {}
        offered = headers.get("Sec-WebSocket-Protocol")
        if offered and SUBPROTOCOL in (p.strip() for p in offered.split(",")):
            reply["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        n = next(self._ids)
        conn = Connection(self, codec.conn_id(os.getpid(), n), peer, phase=n)
        rules = conn.rules
        if self.deflater is not None:
            offers = headers.getall("Sec-WebSocket-Extensions", ())
            extension = negotiate(offers) if offers else None
            if extension is not None:
                reply["Sec-WebSocket-Extensions"] = extension
                conn.session.deflate = rules.deflate = True
        if self.verifier is None:
            rules.grant(self.anonymous, None, None, conn.opened_at, time.time())
        elif identity is not None:
            rules.grant(
                identity.permissions,
                identity.user,
                identity.expires_at,
                conn.opened_at,
                time.time(),
            )
        else:
            rules.require_auth(conn.opened_at + self.auth_timeout_s)
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(reply), conn)

    def refuse_upgrade(
        self,
        status: HTTPStatus,
        code: str,
        message: str,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> WSUpgradeResponseWithListener:
        self.counters.refused[int(status)] += 1
        self.counters.refused_by[code] += 1
        return _http_error(status, code, message, extra)

    def connection_opened(self, conn: Connection) -> None:
        _release_upgrade(conn.transport, self.ws_path)
        self.connections[conn] = None
        self.counters.connects += 1
        if self.per_ip.limit:
            self.per_ip.add(conn.peer)
        ut = conn.underlying
        ut.set_write_buffer_limits(self.high, self.low)
        if self.notsent_lowat:
            sock = ut.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, self.notsent_lowat)
                except OSError:
                    pass

    def connection_closed(self, conn: Connection) -> None:
        if conn in self.connections:
            del self.connections[conn]
            self.paused.discard(conn)
            self.fanout.close_session(conn.session)
            code = _close_code(conn)
            self.counters.closes[close_label(code)] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "connection %s closed: code %d after %.1f s",
                    conn.conn_id,
                    code,
                    time.monotonic() - conn.opened_at,
                )
            if self.per_ip.limit:
                self.per_ip.remove(conn.peer)

    def hello(self, conn_id: str, auth_required: bool = False) -> bytes:
        return codec.hello(conn_id, self.node, auth_required=auth_required)

    def connection_slow(self, conn: Connection) -> None:
        self.counters.slow_events += 1
        self.paused.add(conn)

    def connection_drained(self, conn: Connection) -> None:
        self.paused.discard(conn)
        self.fanout.resume(conn.session)

    def subscribe(
        self, session: Session, topic: str, since: tuple[str, int] | None, max_hz: float | None
    ) -> bytes:
        """Subscribe `session` to `topic` (held here): its `snap`."""
        rule = self.rules.rule_for(topic)
        if max_hz is not None:
            # bounded and quantized: a client may not hold a topic's frames back
            # for ever, nor split a topic into many groups (one encoding each)
            max_hz = max(max_hz, self.cfg.limits.min_max_hz)
        period = period_ticks(max_hz, rule.max_hz, self.cfg.fanout.flush_interval_ms)
        if max_hz is not None:
            period = quantize_period(period)  # few distinct periods per topic
        snap, n = self.fanout.subscribe(session, topic, since, period)
        self.fanout.stats.updates_delivered += n
        return snap

    def unsubscribe(self, session: Session, topic: str) -> None:
        self.fanout.unsubscribe(session, topic)

    def publish(
        self, updates: Sequence[Update], done: Callable[[Sequence[int] | BusError], None]
    ) -> None:
        """A WebSocket `pub` (one update, or a batch): `done` gets the bus' answer."""
        self.bus.publish(updates, done)

    # -- topics held (engine/fanout/core.py rule 9) -----------------------------------

    def missing_topics(self, topics: Sequence[str]) -> list[str]:
        """The topics of a `sub` this worker must load from the bus first."""
        needs_load = self.fanout.needs_load
        return [t for t in topics if needs_load(t)]

    def load_topics(
        self, topics: Sequence[str], done: Callable[[LoadFailure | None], None]
    ) -> None:
        """Load `topics` from the bus (one load per topic, shared by every `sub`
        that waits for it), then call `done(None)`, or `done((topic, why))`
        naming one that could not be loaded (the bus is down, or the load took
        over `fanout.topic_load_timeout_s`)."""
        waiter = _Waiter(len(topics), done)
        loop = asyncio.get_running_loop()
        for topic in topics:
            self._waiting.setdefault(topic, []).append(waiter)
            if self.fanout.begin_load(topic):
                task = loop.create_task(self.load_topic(topic))
                self._loads.add(task)
                task.add_done_callback(self._loads.discard)

    async def load_topic(self, topic: str) -> None:
        """Load one topic for the `sub`s waiting for it: at most
        `fanout.max_topic_loads` at once per worker (the others wait their
        turn), all within `fanout.topic_load_timeout_s`; a failure is reported
        to every waiting `sub`, and the topic forgotten."""
        timeout = self.cfg.fanout.topic_load_timeout_s
        failure: str | None = None
        try:
            failure = await asyncio.wait_for(self._fetch_topic(topic), timeout)
        except asyncio.CancelledError:
            failure = "the worker is stopping"
            raise
        except TimeoutError:
            failure = f"not loaded within fanout.topic_load_timeout_s ({timeout:g} s)"
        except BusError as exc:
            failure = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug must fail this load, never hang its subs
            log.exception("loading topic %r failed", topic)
            failure = repr(exc)
        finally:
            if failure is not None:
                self.fanout.abandon_load(topic)
                self.counters.topic_load_failures += 1
                self._log_load_failure(topic, failure)
            for waiter in self._waiting.pop(topic, ()):
                waiter.one_done(None if failure is None else (topic, failure))

    async def _fetch_topic(self, topic: str) -> str | None:
        """Fetch a topic's state (or a stream topic's history) and merge it in
        (`Fanout.load_state` / `load_stream`); a load of another epoch than this
        worker's (the bus changed epochs meanwhile) is fetched again. Returns
        None, or why it was not loaded."""
        fanout = self.fanout
        history = self.rules.history_of(topic)
        async with self._load_slots:
            for attempt in range(_LOAD_ATTEMPTS):
                if history is None:
                    snap = await self.bus.snapshot(topic)
                    loaded = fanout.load_state(topic, snap.epoch, snap.items)
                else:
                    h = await self.bus.history(topic, 0, history)
                    loaded = fanout.load_stream(topic, h.epoch, h.events, h.complete)
                if loaded or topic not in fanout.loading:
                    return None
                await asyncio.sleep(_LOAD_RETRY_S * (attempt + 1))  # until the epoch is known here
        return "the bus changed epochs during the load"

    def _log_load_failure(self, topic: str, failure: str) -> None:
        # at most one line a second: a client can ask for loads while the bus is down
        now = time.monotonic()
        if now - self._load_failure_logged_at >= 1.0:
            log.warning(
                "topic %r not loaded: %s (%d load failures so far)",
                topic,
                failure,
                self.counters.topic_load_failures,
            )
            self._load_failure_logged_at = now

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

    def wants(self, topic: str, updates: int) -> bool:
        """`TopicFilter`: entries of a topic this worker does not hold are
        skipped by the bus client before they are decoded."""
        return self.fanout.wants(topic, updates)

    def on_bus_entries(self, entries: Sequence[Entry]) -> None:
        apply = self.fanout.apply
        for topic, key, pos, data in entries:
            apply(topic, key, pos, data)

    def on_bus_floors(self, floors: Sequence[tuple[str, int]]) -> None:
        # stream topics: events this worker missed while away are lost (a gap)
        lose = self.fanout.lose
        for topic, floor in floors:
            lose(topic, floor)

    def on_bus_connected(self, connected: bool) -> None:
        if not connected and not self.draining:
            log.warning("bus link lost; serving the state held until it returns")

    # -- the flush task and timers ----------------------------------------------------

    async def flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.cfg.fanout.flush_interval_ms / 1000.0
        fanout = self.fanout
        deadline = loop.time()
        while True:
            deadline += interval
            with gcpolicy.no_collection():  # while a plan lives (rule 3 there)
                plan, shared = fanout.plan()
                if plan or shared:
                    t0 = loop.time()
                    await self.write_plan(plan, shared)
                    self.counters.flush_hist.observe(loop.time() - t0)
                del plan, shared  # gone before collection resumes
            delay = deadline - loop.time()
            if delay < 0:
                deadline = loop.time()  # overloaded: don't try to catch up on missed ticks
                delay = 0
            await asyncio.sleep(delay)

    async def write_plan(self, plan: dict[Session, list[Delivery]], shared: list[Shared]) -> None:
        """Write one flush's frames, yielding to the loop every `_YIELD_EVERY` sessions."""
        fanout = self.fanout
        n = 0  # sessions written since the last yield
        # the up-to-date single-topic sessions, by group (one message each)
        for sh in shared:
            i, end = 0, len(sh.subs)
            while i < end:
                step = min(_YIELD_EVERY - n, end - i)
                fanout.deliver_shared(sh, i, i + step)
                i += step
                n += step
                if n >= _YIELD_EVERY:
                    n = 0
                    await asyncio.sleep(0)
        deliver = fanout.deliver
        for session, deliveries in plan.items():
            deliver(session, deliveries)
            n += 1
            if n >= _YIELD_EVERY:
                n = 0
                await asyncio.sleep(0)

    def every_second(self) -> None:
        loop = asyncio.get_running_loop()
        # how late this timer fired: the longest the loop was busy elsewhere
        lag = loop.time() - self._timer_due
        if lag > self.loop_lag_max_s:
            self.loop_lag_max_s = lag
        self._timer_due = loop.time() + 1.0
        self._timer = loop.call_later(1.0, self.every_second)
        now = time.monotonic()
        timeout = self.cfg.fanout.slow_client_timeout_s
        for conn in list(self.paused):
            if conn.closing:
                self.paused.discard(conn)
            elif conn.underlying.get_write_buffer_size() <= self.low:
                conn.mark_drained()  # refused a frame but drained without a transport resume
            elif slow_expired(conn.paused_since, now, timeout):
                conn.close(codes.CLOSE_SLOW_CONSUMER, "slow consumer")
                self.paused.discard(conn)
        self.check_pings(now)
        if self._jwks_mtime:
            self.reload_jwks()
        self.fanout.drop_idle(self.grace_ticks)  # topics nobody subscribed to for the grace
        self.maybe_trim(now)
        for fn in self.on_tick:
            fn()

    def maybe_trim(self, now: float) -> None:
        """After the connection count fell well below its peak (a flood gone, a
        mass disconnect), hand freed heap memory back to the OS (a full
        collection, then glibc `malloc_trim`), at most every `_TRIM_EVERY_S`:
        without it the worker's RSS stays at its peak. Steady churn at a stable
        count never triggers it (a full collection pauses the loop)."""
        n = len(self.connections)
        if n > self._trim_peak:
            self._trim_peak = n
        dropped = self.fanout.stats.topics_dropped - self._dropped_at_trim
        if (
            (self._trim_peak - n >= _TRIM_AFTER_CLOSES and n <= 0.8 * self._trim_peak)
            or dropped >= _TRIM_AFTER_DROPS  # topics dropped after their grace (rule 9)
        ) and now - self._trim_at >= _TRIM_EVERY_S:
            self._dropped_at_trim = self.fanout.stats.topics_dropped
            self._trim_peak = n
            self._trim_at = now
            # a closed connection and its session refer to each other: only the
            # cyclic collector frees them, so collect before trimming
            gc.collect()
            _malloc_trim()

    def reload_jwks(self) -> None:
        """Key rotation: re-read `auth.jwks_file` when it changed (checked each second).
        A file that cannot be read or parsed keeps the keys in use (logged)."""
        path = self.cfg.auth.jwks_file
        mtime = _mtime(path)
        if mtime == self._jwks_mtime or self.verifier is None:
            return
        self._jwks_mtime = mtime
        try:
            self.verifier.replace_jwks(parse_jwks(_read_text(path)))
        except Exception as exc:  # unreadable or bad JSON: keep the keys in use
            log.error("auth.jwks_file %s not reloaded, keeping the current keys: %s", path, exc)
        else:
            log.info("auth.jwks_file %s reloaded", path)

    def check_pings(self, now: float) -> None:
        """One WebSocket ping per `ping_interval_s` per connection, from this one
        timer (not a task per connection); drop those silent past `ping_timeout_s`.
        Also ends connections past their deadline: no `auth` within
        `auth.timeout_s` (4001), or the token expired (4003)."""
        interval = self.cfg.fanout.ping_interval_s
        timeout = self.cfg.fanout.ping_timeout_s
        for conn in list(self.connections):
            if conn.closing or conn.transport is None:
                continue
            if conn.check_deadlines(now):  # auth, token expiry, an unfinished message
                continue
            sent = conn.ping_sent_at
            if sent is None:
                if now - conn.last_ping_at >= interval:
                    conn.ping_sent_at = conn.last_ping_at = now
                    conn.transport.send_ping()
            elif now - sent >= timeout:
                # the peer is gone or stuck: no close frame could reach it
                conn.closing = True
                self.counters.ping_timeouts += 1
                conn.transport.disconnect(graceful=False)

    def status(self) -> WorkerStatus:
        """This worker's figures for the board (written once a second: the heartbeat)."""
        s = self.fanout.stats
        c = self.counters
        # Per-shard figures only some buses have (the redis bus; the local hub: None).
        lags = self.bus.shard_lags_ms()
        age = self.bus.last_entry_age_ms()
        return WorkerStatus(
            pid=os.getpid(),
            slot=self.slot,
            accepting=self.accepting,
            bus_connected=self.bus.connected,
            bus_lag_ms=self.bus.lag_ms(),
            bus_shard_lag_ms=None if lags is None else tuple(round(x, 1) for x in lags),
            bus_last_entry_age_ms=None if age is None else round(age, 1),
            bus_events=self.bus.bus_stats(),
            bus_tasks_down=tuple(self.bus.tasks_down()),
            connections=len(self.connections),
            subscriptions=self.fanout.subscription_count(),
            topics=len(self.fanout.topics),
            topics_idle=len(self.fanout.idle),
            topics_loading=len(self.fanout.loading),
            topics_loaded=s.topics_loaded,
            topics_dropped=s.topics_dropped,
            topic_load_failures=c.topic_load_failures,
            updates_unheld=s.updates_unheld,
            frames_sent=s.frames_sent + c.control_frames,
            bytes_sent=s.bytes_sent,
            compressed_frames=s.compressed_frames,
            compressed_bytes=s.compressed_bytes,
            compressed_input_bytes=s.compressed_input_bytes,
            updates_applied=s.updates_applied,
            updates_delivered=s.updates_delivered,
            updates_coalesced=s.updates_coalesced,
            published=c.published,
            slow_events=c.slow_events,
            flush_hist=c.flush_hist.snapshot(),
            publish_hist=c.publish_hist.snapshot(),
            frames_refused=s.frames_refused,
            slow_clients=len(self.paused),
            slow_closes=c.closes.get(str(codes.CLOSE_SLOW_CONSUMER), 0),
            connects=c.connects,
            closes=dict(c.closes),
            errors=dict(c.errors),
            ping_timeouts=c.ping_timeouts,
            upgrades_refused={str(k): v for k, v in c.refused.items()},
            upgrades_refused_by=dict(c.refused_by),
            loop_lag_max_ms=round(self.loop_lag_max_s * 1000, 1),
            gc_hist=c.gc_hist.snapshot(),
            gc_collections={g: c.gc_collections[g] for g in ("0", "1", "2")},
            started=self.started,
        )


_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _close_code(conn: Connection) -> int:
    """The close code a connection ended with: ours if we sent one, else the
    client's, else 1006 (no close handshake)."""
    hs = conn.transport.close_handshake if conn.transport is not None else None
    if hs is not None:
        info = hs.sent if hs.sent is not None else hs.recv
        if info is not None:
            # 0: picows' code for a close without a body (answered with an empty close)
            return int(info.code.value) or CLOSE_NO_STATUS
    return CLOSE_ABNORMAL


def _http_error(
    status: HTTPStatus, code: str, message: str, extra: tuple[tuple[str, str], ...] = ()
) -> WSUpgradeResponseWithListener:
    import json

    body = json.dumps({"error": code, "message": message}).encode()
    resp = WSUpgradeResponse.create_error_response(
        status, body, extra_headers={"Content-Type": "application/json", **dict(extra)}
    )
    return WSUpgradeResponseWithListener(resp, None)


_TRIM_AFTER_CLOSES = 500
_TRIM_AFTER_DROPS = 10_000
_LOAD_ATTEMPTS = 5  # fetches of one topic whose epoch is not this worker's yet
_LOAD_RETRY_S = 0.05


class _Waiter:
    """One `sub` waiting for the loads of its topics (`WorkerServer.load_topics`)."""

    __slots__ = ("done", "failed", "left")

    def __init__(self, left: int, done: Callable[[LoadFailure | None], None]) -> None:
        self.left = left
        self.done = done
        self.failed: LoadFailure | None = None

    def one_done(self, failed: LoadFailure | None) -> None:
        if failed is not None and self.failed is None:
            self.failed = failed
        self.left -= 1
        if self.left == 0:
            self.done(self.failed)


_TRIM_EVERY_S = 5.0


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


class _Accept:
    """The listener factory of one TCP connection: knows its peer's IP."""

    __slots__ = ("peer", "server")

    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self.peer = ""

    def __call__(self, request: WSUpgradeRequest) -> Any:
        return self.server.accept(request, self.peer)


class _PeerProtocol(WSProtocol):  # type: ignore[misc]
    """picows' server protocol, recording the peer address for its `_Accept`
    (picows passes the listener factory only the parsed request), and reading
    nothing more once a close frame was sent."""

    __slots__ = ("_accept",)
    _accept: _Accept | None

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        if self._accept is not None:
            self._accept.peer = peer[0] if isinstance(peer, tuple) else ""
            self._accept = None
        super().connection_made(transport)

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        ws = self.transport
        if ws is not None and ws.is_close_frame_sent:
            # Closing (ours, or picows failing a frame: it disconnects 10 ms
            # later). Stop reading now: after a frame error picows' parser is
            # left mid-frame and would grow its read buffer, doubling, to hold
            # whatever arrives until the disconnect (a frame header claiming
            # 2^62 bytes: MBs on loopback). Once per read, not per frame.
            ws.underlying_transport.pause_reading()


# read from the socket by picows; a small initial buffer keeps idle connections cheap
_READ_BUFFER_INIT_SIZE = 2048

# What an upgraded connection's request and response hold as headers (read-only, shared).
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _release_upgrade(transport: WSTransport | None, path: bytes) -> None:
    """Drop what picows keeps of the upgrade on the transport for the whole life
    of the connection (`transport.request`, `transport.response`): the headers
    of both (two multidicts and their strings, ~2.3 KiB per connection; the
    client's `Authorization` token with them) and the request line's own bytes
    objects (~0.15 KiB), measured in docs/benchmarks.md, "Memory per
    connection". Nothing reads them once the upgrade is done (`accept` already
    has). The request keeps its method (picows upgrades only GET), version
    (only HTTP/1.1) and `path`, the endpoint's (`accept` upgrades no other;
    the query string goes), as bytes shared by every connection."""
    if transport is not None:
        request = transport.request
        request.method = b"GET"
        request.version = b"HTTP/1.1"
        request.path = path
        # read-only on purpose: a write would be shared by every connection
        request.headers = _NO_HEADERS  # type: ignore[assignment]
        transport.response.headers = _NO_HEADERS  # type: ignore[assignment]


async def _create_ws_server(
    server: WorkerServer,
    host: str,
    port: int,
    *,
    max_frame_size: int,
    handshake_timeout_s: float,
) -> asyncio.Server:
    """What `picows.ws_create_server` does (aiofastnet transports, SO_REUSEPORT),
    with a protocol per connection that knows its peer (see `_PeerProtocol`).
    `handshake_timeout_s` drops a TCP client that does not complete the upgrade."""
    loop = asyncio.get_running_loop()
    # Not a `logging.Logger`: given one, picows builds a child Logger per
    # connection (~1 KiB each); an adapter is shared by every connection.
    logger = logging.LoggerAdapter(logging.getLogger("picows.server"), {})

    def protocol_factory() -> WSProtocol:
        accept = _Accept(server)
        proto = _PeerProtocol(
            None,  # host+port: client side only
            None,  # ws_path: client side only
            False,  # is_client_side
            accept,  # the listener factory
            logger,
            True,  # disconnect_on_exception
            handshake_timeout_s,
            False,  # enable_auto_ping: one ping timer per worker instead
            20.0,  # auto_ping_idle_timeout (unused)
            20.0,  # auto_ping_reply_timeout (unused)
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # enable_auto_pong: the listener answers pings, rate-limited
            max_frame_size,
            None,  # extra_headers
            _READ_BUFFER_INIT_SIZE,
        )
        proto._accept = accept
        return proto

    srv: asyncio.Server = await aiofastnet.create_server(
        loop, protocol_factory, host=host, port=port, reuse_port=True, backlog=2048
    )
    return srv
