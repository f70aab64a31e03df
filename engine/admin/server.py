"""The admin HTTP process: /healthz /readyz /stats /publish on the admin port,
and the live dashboard (`/`, `/config.json`, `/static/<file>` from engine/static).

A thin shell: it moves bytes between asyncio streams and `engine.admin.parser`
(httptools), reads the status board, and awaits the bus; every decision is made in `engine.admin.http`.

Limits (each with its overflow policy):
- request head: `MAX_HEAD_BYTES` (431, then close);
- request body: `http.body_limit_bytes(limits.max_message_bytes)` (413, then
  close after a short linger: the rest of the body is not kept);
- a client gets `REQUEST_TIMEOUT_S` to send a request (head and body) and to
  read our answer; past it the connection is closed;
- a connection idle (no byte of its next request, the first one included) for
  `server.admin_idle_timeout_s` is closed: idle keep-alive sockets cannot
  hold the slots;
- at most `MAX_CONNECTIONS` connections at once. Past them, up to
  `server.admin_probe_connections` more are probe connections: one request,
  within the idle timeout, answered only for `http.PROBE_PATHS` (503 for the
  rest), then closed; so a pile of idle or slow sockets cannot make /healthz
  fail and the pod restart (issue 11, finding 6). Past both, connections are
  answered 503 and closed (lingering for at most `MAX_CONNECTIONS` more, then
  closed at once).
Each connection is its own task, so a slow client holds only its own task.

What the port accepts (Host allowlist, API key beyond loopback, media types)
is `engine.admin.http` rule 7; `serve_admin` warns once at start when the port
listens beyond loopback without an API key (every POST is then refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psutil

from engine import metrics, rebalance
from engine.admin import http
from engine.admin.parser import Request, RequestReader
from engine.admin.rebalancer import Rebalancer, node_connections
from engine.board import Board
from engine.codes import EXIT_PORT_IN_USE, ErrorCode
from engine.errors import BusError, BusRefused, BusUnavailable
from engine.status import RebalanceOrder, SupervisorStatus
from engine.topics import TopicRules

if TYPE_CHECKING:
    from engine.bus.base import Bus
    from engine.config import Config

log = logging.getLogger("fanout.admin")

# The dashboard and the browser client, served at / and /static/ (package data).
STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "static"
MAX_HEAD_BYTES: Final = 16 * 1024
REQUEST_TIMEOUT_S: Final = 30.0
MAX_CONNECTIONS: Final = 256
READ_CHUNK_BYTES: Final = 64 * 1024
LINGER_S: Final = 2.0  # how long a refused client may keep sending before we close

_BUSY_BODY: Final = b'{"error":"unavailable","message":"too many connections"}'
_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


_PROBES_ONLY: Final = http.HttpError(
    503,
    ErrorCode.UNAVAILABLE,
    "too many connections: only " + ", ".join(sorted(http.PROBE_PATHS)) + " are served now",
)


class _Closing(Exception):
    """The connection cannot carry another request (peer gone, error, or timeout)."""


class _Refused(Exception):
    """The request's framing is bad: answer `error` and close."""

    def __init__(self, error: http.HttpError) -> None:
        super().__init__(error.message)
        self.error = error


class AdminServer:
    """The admin HTTP server on one listening socket, inside a running loop.

    Create it with `serve_admin`. `supervisor_pid` is the supervisor's pid when
    this process is its child (then /healthz also checks that it is still our
    parent); None in tests and in-loop use, where only the board decides.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str,
        bus: Bus,
        *,
        api_key: str | None,
        supervisor_pid: int | None,
    ) -> None:
        self.cfg = cfg
        self.board = Board(run_dir)
        self.bus = bus
        self.api_key = api_key or None
        self.supervisor_pid = supervisor_pid
        self.bind_host = cfg.server.admin_host
        self.allowed_hosts = cfg.server.admin_allowed_hosts
        self.idle_timeout_s = cfg.server.admin_idle_timeout_s
        self.probe_slots = cfg.server.admin_probe_connections
        self.started = time.time()
        self.body_limit = http.body_limit_bytes(cfg.limits.max_message_bytes)
        self.rules = TopicRules(cfg.topics)  # a stream topic's /publish needs no key
        # /publish figures, rendered by /metrics with the workers' from the board
        self.publish_hist = metrics.Histogram()
        self.published = 0
        self.publish_failures = 0
        # requests refused from their head (by error code), connections shed
        # over every cap ("busy") and idle ones closed ("idle"): /metrics
        self.refused: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._probing: set[asyncio.Task[Any]] = set()  # over the cap, on probe slots
        self._shedding: set[asyncio.Task[Any]] = set()  # over the cap, lingering
        # automatic rebalancing (rebalance.enabled on the redis bus), set by _main
        self.rebalancer: Rebalancer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, reuse_address=True, limit=READ_CHUNK_BYTES
        )

    async def close(self) -> None:
        """Stop listening and drop open connections (in-flight requests are cancelled)."""
        if self._server is not None:
            self._server.close()
        tasks = [*self._tasks, *self._probing, *self._shedding]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- one connection ---------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) < MAX_CONNECTIONS:
            pool, probe_only = self._tasks, False
        elif len(self._probing) < self.probe_slots:
            pool, probe_only = self._probing, True
        else:
            self._count("busy")
            await self._shed(task, reader, writer)
            return
        pool.add(task)
        try:
            requests = RequestReader(MAX_HEAD_BYTES, self.body_limit)
            while await self._exchange(requests, reader, writer, probe_only=probe_only):
                requests.pop()
        except (_Closing, OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # `close` cancels open connections: end normally, or asyncio 3.11's
            # stream callback logs the cancelled task as an error with a traceback
            pass
        except Exception:
            log.exception("admin: connection failed")
        finally:
            pool.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _shed(
        self, task: asyncio.Task[Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer 503 to a connection over the cap and close it, lingering (as in
        `_refuse`) so the answer is not lost to a reset, when few enough are
        lingering already; otherwise close at once."""
        lingering = len(self._shedding) < MAX_CONNECTIONS
        try:
            writer.write(_BUSY)
            if lingering:
                self._shedding.add(task)
                await self._linger(reader, writer)
        except OSError:
            pass
        finally:
            self._shedding.discard(task)
            writer.close()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drop what the client still sends (up to the body
        limit, for `LINGER_S`) until it closes: closing on unread bytes would
        reset the connection before it reads our answer (RFC 9112 section 9.6)."""
        with contextlib.suppress(OSError, TimeoutError):
            if writer.can_write_eof():
                writer.write_eof()
            received = 0
            async with asyncio.timeout(LINGER_S):
                while received <= self.body_limit:
                    chunk = await reader.read(READ_CHUNK_BYTES)
                    if not chunk:
                        break
                    received += len(chunk)

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def _next(
        self,
        requests: RequestReader,
        reader: asyncio.StreamReader,
        deadline: float,
        idle_until: float | None = None,
        *,
        whole: bool = False,
    ) -> Request:
        """The request being served, once its head (`whole`: and its body, or a
        body over the limit) has arrived, reading as needed. Raises `_Refused`
        on a framing error, TimeoutError past `deadline` (loop time),
        `_Closing` when the peer closed, or when no byte at all arrived by
        `idle_until`."""
        while True:
            if requests.requests:
                request = requests.requests[0]
                if request.complete or request.over or (request.head_done and not whole):
                    return request
            if requests.error is not None:
                raise _Refused(requests.error)
            idle = idle_until is not None and not requests.requests
            try:
                async with asyncio.timeout_at(idle_until if idle else deadline):
                    data = await reader.read(READ_CHUNK_BYTES)
            except TimeoutError:
                if not idle:
                    raise
                self._count("idle")
                raise _Closing from None
            if not data:
                raise _Closing  # the peer closed (between requests, or mid-request)
            idle_until = None  # the request has begun: `deadline` applies
            requests.feed(data)

    async def _exchange(
        self,
        requests: RequestReader,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        probe_only: bool = False,
    ) -> bool:
        """Serve one request. True when the connection can carry another one.

        `probe_only` (a probe connection): only `http.PROBE_PATHS` are served,
        the whole request must arrive within the idle timeout, and the
        connection is closed after the answer."""
        # One deadline for the whole request (idle wait, head and body): a
        # client trickling bytes cannot hold its connection for longer.
        now = asyncio.get_running_loop().time()
        idle_until = now + self.idle_timeout_s
        deadline = idle_until if probe_only else now + REQUEST_TIMEOUT_S
        try:
            request = await self._next(requests, reader, deadline, idle_until)
        except _Refused as exc:
            await self._refuse(reader, writer, exc.error)
            return False
        headers = request.headers
        try:
            plan: http.Plan | None = http.plan_request(
                request.method,
                request.target,
                headers,
                api_key=self.api_key,
                body_limit=self.body_limit,
                bind_host=self.bind_host,
                allowed_hosts=self.allowed_hosts,
                api_key_env=self.cfg.auth.api_key_env,
            )
            refusal = None
        except http.HttpError as exc:
            plan, refusal = None, exc
            self._count(exc.error)
        if probe_only and plan is not None and plan.path not in http.PROBE_PATHS:
            self._count("busy")
            plan, refusal = None, _PROBES_ONLY
        declared = http.declared_length(headers)
        if refusal is not None and (declared or 0) > self.body_limit:
            await self._refuse(reader, writer, refusal)
            return False
        # A refused request's body (under the cap) is read and dropped all the
        # same: closing on unread bytes would reset the connection, and the
        # client could lose our answer.
        body = await self._read_body(requests, request, reader, writer, deadline)
        if body is None:
            return False
        if refusal is not None:
            response = refusal.response()
        else:
            assert plan is not None
            response = await self._dispatch(plan, body)
        keep = request.keep_alive and not probe_only
        await self._send(writer, response, close=not keep)
        return keep

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        error: http.HttpError,
    ) -> None:
        """Answer `error` and close, lingering: the client may still be sending
        a body we won't read."""
        await self._send(writer, error.response(), close=True)
        await self._linger(reader, writer)

    async def _read_body(
        self,
        requests: RequestReader,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: float,
    ) -> bytes | None:
        """The whole body, or None after answering 413 or 400 (bad framing) and closing."""
        if request.expect_continue and not request.complete and not request.size:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            request = await self._next(requests, reader, deadline, whole=True)
        except _Refused as exc:
            error = http.HttpError(400, "bad_request", f"malformed HTTP body: {exc.error.message}")
            await self._refuse(reader, writer, error)
            return None
        if request.over:
            await self._refuse(reader, writer, http.too_large(self.body_limit))
            return None
        return request.body()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: http.Response,
        *,
        close: bool,
    ) -> None:
        writer.write(http.response_bytes(response, close=close))
        transport = writer.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            # the answer did not all go out at once: wait for a slow reader, bounded
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await writer.drain()

    # -- what each path answers ------------------------------------------------------

    async def _dispatch(self, plan: http.Plan, body: bytes) -> http.Response:
        try:
            if plan.path == "/publish":
                assert plan.media is not None
                return await self._publish(body, plan.media)
            if plan.path == "/healthz":
                return self.health()
            if plan.path == "/readyz":
                return self.readiness()
            if plan.path == "/stats":
                return http.json_response(200, self.stats())
            if plan.path == "/rebalance":
                return self.rebalance(body)
            if plan.path == "/metrics":
                return http.Response(200, self.metrics().encode(), (), metrics.CONTENT_TYPE)
            if plan.path == "/config.json":
                return http.client_config(self.cfg.server.port, self.cfg.server.path)
            if plan.path == "/" or plan.path.startswith(http.STATIC_PREFIX):
                return self.static(plan.path)
        except http.HttpError as exc:
            return exc.response()
        except Exception:
            log.exception("admin: %s failed", plan.path)
            return http.json_response(
                500, {"error": ErrorCode.INTERNAL, "message": "internal error"}
            )
        raise AssertionError(f"unrouted path {plan.path}")

    def static(self, path: str) -> http.Response:
        """A file of engine/static (the dashboard and the browser client)."""
        name, ctype = http.static_file(path)
        try:
            body = (STATIC_DIR / name).read_bytes()  # small files on local disk
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise http.HttpError(404, "not_found", f"no such file {name!r}") from None
        return http.static_response(ctype, body)

    def _parent_alive(self) -> bool:
        # Reparented (to init or a subreaper) means the supervisor is gone.
        return self.supervisor_pid is not None and os.getppid() == self.supervisor_pid

    def health(self) -> http.Response:
        return http.health(
            self.board.read_supervisor(),
            time.time(),
            self.cfg.workers.heartbeat_timeout_s,
            self._parent_alive(),
        )

    def readiness(self) -> http.Response:
        supervisor = self.board.read_supervisor()
        ready, reasons = self._readiness(supervisor)
        if self.rebalancer is not None and self.rebalancer.health.down:
            ready = False
            reasons.append("rebalance: the presence task is down (Redis), restarting")
        return http.ready_response(ready, reasons, len(http.expected_workers(supervisor)))

    def _readiness(self, supervisor: SupervisorStatus | None) -> tuple[bool, list[str]]:
        return http.readiness(
            supervisor,
            self.board.read_workers(),
            now=time.time(),
            heartbeat_timeout_s=self.cfg.workers.heartbeat_timeout_s,
            parent_alive=self._parent_alive(),
            bus_connected=self.bus.connected,
            max_lag_ms=self.cfg.bus.max_lag_ms,
        )

    def rebalance(self, body: bytes) -> http.Response:
        """Ask workers to shed connections (paced over workers.drain_s, `bye` +
        1012) so that clients reconnect, through the Service, to other nodes."""
        req = http.parse_rebalance(body)
        pace_s = self.cfg.workers.drain_s
        open_conns, plan = self.order_shedding(req, pace_s)
        log.info(
            "rebalance: shedding %d of %d connections over %gs",
            sum(plan.values()),
            sum(open_conns.values()),
            pace_s,
        )
        return http.json_response(
            202,
            {
                "connections": sum(open_conns.values()),
                "shed": sum(plan.values()),
                "per_worker": {str(s): n for s, n in sorted(plan.items())},
                "pace_s": pace_s,
            },
        )

    def order_shedding(
        self, req: http.RebalanceRequest, pace_s: float, hold_s: float = 0.0
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Tell the workers to shed what `req` asks (a `RebalanceOrder` on the
        board, then SIGUSR2; with `hold_s`, every worker, to refuse upgrades
        for that long): (open connections, shed) by slot."""
        expected = http.expected_workers(self.board.read_supervisor())
        statuses = self.board.read_workers()
        pids = {  # the workers the supervisor runs, by a status of their own
            slot: st.pid
            for slot, st in statuses.items()
            if st.pid is not None and st.pid == expected.get(slot)
        }
        open_conns = {slot: statuses[slot].connections for slot in pids}
        plan = http.plan_shedding(open_conns, req)
        request_id = f"{time.time():.6f}"
        order = RebalanceOrder(id=request_id, shed=plan, pace_s=pace_s, hold_s=hold_s)
        self.board.write_rebalance(order)
        for slot in pids if hold_s > 0 else plan:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[slot], signal.SIGUSR2)
        return open_conns, plan

    def shed(self, count: int, pace_s: float, hold_s: float) -> int:
        """Automatic rebalancing: close `count` of this node's connections (0:
        none, only the hold); how many were ordered."""
        total = self.node_connections()
        _, plan = self.order_shedding(
            http.RebalanceRequest(connections=max(0, total - count)), pace_s, hold_s
        )
        return sum(plan.values())

    def ready_for_rebalancing(self) -> bool:
        """/readyz would say ready, the presence task aside (it asks)."""
        return self._readiness(self.board.read_supervisor())[0]

    def node_connections(self) -> int:
        return node_connections(self.board, http.expected_workers(self.board.read_supervisor()))

    def metrics(self) -> str:
        """Prometheus text: every worker's figures from the board, psutil figures
        of every fanout process, and this process' /publish figures."""
        now = time.time()
        supervisor = self.board.read_supervisor() or SupervisorStatus()
        workers = self.board.read_workers()
        expected = supervisor.workers
        if expected:
            workers = {s: st for s, st in workers.items() if s in expected}
        ages = {s: st.age_s(now) for s, st in workers.items() if st.ts is not None}
        pids: dict[str, int] = {}
        if supervisor.pid is not None:
            pids["supervisor"] = supervisor.pid
        pids.update(supervisor.aux)
        for slot, st in workers.items():
            if st.pid is not None:
                pids[f"worker {slot}"] = st.pid
        pids["admin"] = os.getpid()
        families = [
            *metrics.worker_families(workers, ages),
            *metrics.process_families(sample_processes(pids)),
            metrics.Family(
                "fanout_publish_duration_seconds", "histogram",
                "POST /publish: time for the bus to accept a batch.",
                (({}, self.publish_hist.snapshot()),),
            ),
            metrics.Family(
                "fanout_http_published_total", "counter",
                "Updates accepted by the bus through POST /publish.", (({}, self.published),),
            ),
            metrics.Family(
                "fanout_http_publish_failures_total", "counter",
                "POST /publish answered 503: nothing was published.", (({}, self.publish_failures),),
            ),
            metrics.Family(
                "fanout_admin_refused_total", "counter",
                "Admin requests refused from their head (reason: the error code, e.g."
                " bad_host, forbidden, unsupported_media_type), connections shed over"
                " every cap (busy) and idle ones closed (idle).",
                tuple(({"reason": r}, n) for r, n in sorted(self.refused.items())),
            ),
            metrics.Family(
                "fanout_workers", "gauge", "Workers the supervisor keeps running.",
                (({}, len(expected)),),
            ),
            metrics.Family(
                "fanout_admin_bus_connected", "gauge", "1 when the admin process' bus link is up.",
                (({}, 1 if self.bus.connected else 0),),
            ),
        ]  # fmt: skip
        # the admin's own bus client
        families.append(
            metrics.bus_events_family([({}, self.bus.bus_stats())], "fanout_admin_bus_events_total")
        )
        if self.rebalancer is not None:
            families.extend(rebalance_families(self.rebalancer.figures()))
        return metrics.render(families)

    def stats(self) -> dict[str, Any]:
        out = self._stats()
        if self.rebalancer is not None:
            out["rebalance"] = self.rebalancer.figures()
        return out

    def _stats(self) -> dict[str, Any]:
        return http.stats(
            node=self.cfg.node_name(socket.gethostname()),
            started=self.started,
            supervisor=self.board.read_supervisor(),
            workers=self.board.read_workers(),
            now=time.time(),
            bus={
                "backend": self.cfg.bus.backend,
                "connected": self.bus.connected,
                "epoch": self.bus.epoch,
            },
        )

    async def _publish(self, body: bytes, media: str) -> http.Response:
        request = http.parse_publish(
            body, media, self.cfg.limits.max_publish_items, self._is_stream
        )
        t0 = time.perf_counter()
        try:
            positions = await self.bus.publish_wait(request.updates)
        except BusUnavailable as exc:
            self.publish_failures += 1
            return http.unavailable(f"the bus is unavailable, nothing was published: {exc}")
        except BusRefused as exc:  # over a bus bound: bad input, the publisher's to fix
            raise http.HttpError(400, exc.code, exc.message, topic=exc.topic) from None
        except BusError as exc:
            self.publish_failures += 1
            return http.unavailable(f"the bus refused the publish: {exc}")
        self.publish_hist.observe(time.perf_counter() - t0)
        self.published += len(request.updates)
        return http.publish_response(request, positions)

    def _is_stream(self, topic: str) -> bool:
        return self.rules.history_of(topic) is not None


async def serve_admin(
    cfg: Config, run_dir: str, bus: Bus, *, supervisor_pid: int | None = None
) -> AdminServer:
    """Start the admin server on `cfg.server.admin_host:admin_port` (0 = any free
    port; see `.port`) in the running loop, serving until `await server.close()`.

    `bus` must be started by the caller (`await bus.start(None)`); until it is
    connected, /readyz says so and /publish answers 503. The API key is read from
    the environment variable named by `cfg.auth.api_key_env`, once, here.
    """
    api_key = os.environ.get(cfg.auth.api_key_env) if cfg.auth.api_key_env else None
    server = AdminServer(cfg, run_dir, bus, api_key=api_key, supervisor_pid=supervisor_pid)
    await server.start(cfg.server.admin_host, cfg.server.admin_port)
    if not api_key and not http.bind_is_loopback(cfg.server.admin_host):
        log.warning(
            "admin: listening on %s, beyond loopback, with no API key (%s is not set):"
            " every POST (/publish, /rebalance) is refused with 403; set %s to publish"
            " through this port",
            cfg.server.admin_host,
            cfg.auth.api_key_env or "auth.api_key_env is empty",
            cfg.auth.api_key_env or "auth.api_key_env and that variable",
        )
    return server


# Signals the supervisor uses on other processes, or a terminal sends to the
# whole process group: the admin process has no use for them.
_IGNORED_SIGNALS: Final = ("SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2")
_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def run_admin(cfg: Config, run_dir: str) -> None:
    """The admin process' entry point, called in the child after fork.

    Builds a uvloop loop and its own bus client, listens on
    `server.admin_host:admin_port`, and serves until SIGTERM, SIGINT or SIGQUIT.
    Exits with `EXIT_PORT_IN_USE` (SystemExit) when the port cannot be bound.
    """
    import uvloop

    supervisor_pid = os.getppid()
    # Handlers and the wakeup fd inherited from the supervisor must not run
    # here (a wakeup fd write would wake the supervisor for our signal).
    signal.set_wakeup_fd(-1)
    for name in _IGNORED_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main(cfg, run_dir, supervisor_pid))


async def _main(cfg: Config, run_dir: str, supervisor_pid: int) -> None:
    from engine.bus import create_bus

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    bus = create_bus(cfg, run_dir, want_entries=False)
    try:
        server = await serve_admin(cfg, run_dir, bus, supervisor_pid=supervisor_pid)
    except OSError as exc:
        log.error(
            "admin: cannot listen on %s:%s: %s",
            cfg.server.admin_host,
            cfg.server.admin_port,
            exc,
        )
        raise SystemExit(EXIT_PORT_IN_USE) from None
    log.info("admin: listening on %s:%s", cfg.server.admin_host, server.port)
    try:
        await bus.start(None)
        if cfg.rebalance.enabled and cfg.bus.backend == "redis":
            node = f"{cfg.node_name(socket.gethostname())}/{supervisor_pid}"
            server.rebalancer = Rebalancer(
                cfg,
                node,
                count_of=server.node_connections,
                ready_of=server.ready_for_rebalancing,
                shed=server.shed,
            )
            server.rebalancer.start()
        await stop.wait()
    finally:
        if server.rebalancer is not None:
            await server.rebalancer.close()
        await server.close()
        await bus.close()


def rebalance_families(fig: Mapping[str, Any]) -> list[metrics.Family]:
    """/metrics of automatic rebalancing (engine/admin/rebalancer.py figures)."""
    return [
        metrics.Family(
            "fanout_rebalance_peers", "gauge", "Live peers this node sees on the redis bus.",
            (({}, len(fig["peers"])),),
        ),
        metrics.Family(
            "fanout_rebalance_fair_share", "gauge",
            "Connections per live node, this one included (0 before the first announce).",
            (({}, fig["fair_share"]),),
        ),
        metrics.Family(
            "fanout_rebalance_shed_total", "counter",
            "Connections this node told to reconnect elsewhere (automatic rebalancing).",
            (({}, fig["shed"]),),
        ),
        metrics.Family(
            "fanout_rebalance_rounds_total", "counter", "Shedding rounds begun.",
            (({}, fig["rounds"]),),
        ),
        metrics.Family(
            "fanout_rebalance_state", "gauge",
            "1 for the phase automatic rebalancing is in (engine/rebalance.py).",
            tuple(({"state": p}, 1 if p == fig["state"] else 0) for p in rebalance.PHASES),
        ),
        metrics.Family(
            "fanout_rebalance_presence_restarts_total", "counter",
            "Presence task failures (Redis unreachable), each retried with backoff.",
            (({}, fig["presence_restarts"]),),
        ),
    ]  # fmt: skip


def sample_processes(pids: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """CPU seconds, RSS and open fds of each named process (gone ones are skipped).

    Called at scrape time.
    """

    out: dict[str, dict[str, float]] = {}
    for name, pid in pids.items():
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                cpu = p.cpu_times()
                out[name] = {
                    "cpu_s": round(cpu.user + cpu.system, 3),
                    "rss_bytes": float(p.memory_info().rss),
                    "fds": float(p.num_fds()),
                }
        except (psutil.Error, OSError):
            continue
    return out
