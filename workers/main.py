"""The worker process: built after the fork, one uvloop event loop, one listener.

Signals (installed on the worker's own loop):
- SIGTERM: graceful drain: stop accepting, `bye` with a jittered `retry_ms`,
  close 1001, exit 0 once clients are gone (the supervisor SIGKILLs after
  `workers.graceful_timeout_s`).
- SIGUSR1: retire (the supervisor's rolling restart, or SIGTTOU): the same
  drain, closing with 1012 (service restart) so clients reconnect at once to
  the other workers.
- SIGUSR2: rebalance: read the admin's shedding request from the board and
  close that many connections, paced over its `pace_s`, each with `bye`
  (reason "rebalance") and 1012, so clients reconnect to other nodes; with
  its `hold_s` (automatic rebalancing) upgrades are refused meanwhile (503
  "rebalancing"), so they land elsewhere.
- SIGINT / SIGQUIT: quick stop: close connections, exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import resource
import signal
import time

import uvloop

from engine import codes
from engine.board import Board
from engine.bus import create_bus
from engine.config import Config
from engine.logs import setup_logging
from engine.protocol import codec
from workers import gcpolicy
from workers.server import WorkerServer

log = logging.getLogger("fanout.worker")

BUS_CONNECT_TIMEOUT_S = 10.0
# Descriptors a worker needs besides its clients' sockets: the listening socket,
# bus links, board and log files, the event loop's own, and upgrades in progress.
FD_RESERVE = 64
# Where the soft limit goes when the hard one is unlimited (Linux' default fs.nr_open).
_NOFILE_UNLIMITED_TARGET = 1_048_576


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each client connection is a
    socket). Returns (soft before, soft now, hard); the limit stays as it was
    when the system refuses the change."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _NOFILE_UNLIMITED_TARGET
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
        return soft, target, hard
    return soft, soft, hard


def connection_capacity(max_connections: int, open_files: int) -> int:
    """The connections a worker can hold with `open_files` descriptors: at most
    `max_connections`, and `FD_RESERVE` fewer than the limit (at least 1)."""
    if open_files == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, open_files - FD_RESERVE))


def check_open_files(max_connections: int) -> int:
    """Raise the open-files limit and log it; returns how many connections this
    worker admits (fewer than `limits.max_connections`, with a warning naming
    the fix, when the hard limit cannot hold them)."""
    before, now, hard = raise_open_files_limit()
    log.info("open files limit (RLIMIT_NOFILE) %d (was %d, hard limit %d)", now, before, hard)
    capacity = connection_capacity(max_connections, now)
    if capacity < max_connections:
        log.warning(
            "limits.max_connections = %d does not fit in the open files limit %d"
            " (hard limit %d, %d kept for other files): this worker refuses upgrades"
            " past %d connections (503 full). Raise the hard limit (ulimit -Hn,"
            " systemd LimitNOFILE=, the container's nofile ulimit) or lower"
            " limits.max_connections",
            max_connections,
            now,
            hard,
            FD_RESERVE,
            capacity,
        )
    return capacity


def run_worker(cfg: Config, slot: int, run_dir: str) -> None:
    """Entry point of a forked worker process. Returns when the worker is done;
    raises SystemExit with a non-zero code when it cannot boot."""
    # What the worker inherited from the supervisor (modules, config) lives as
    # long as it does: keep the cyclic collector from walking it. A collection
    # writes to the header of every object it visits, and the kernel copies each
    # inherited page written to: ~7 MB per worker (docs/benchmarks.md, "Memory
    # per connection"); full collections (`maybe_trim`) get shorter too
    # (workers/gcpolicy.py rule 1).
    gc.freeze()
    setup_logging(cfg.log.level, cfg.log.format, f"worker {slot}")
    capacity = check_open_files(cfg.limits.max_connections)
    code = uvloop.run(_main(cfg, slot, run_dir, capacity))
    if code:
        raise SystemExit(code)


async def serve_worker(cfg: Config, run_dir: str, *, slot: int = 1) -> WorkerServer:
    """Start a worker inside the running loop (tests, single-process use):
    connects its bus client, waits for the first connection, starts listening."""
    bus = create_bus(cfg, run_dir)
    server = WorkerServer(cfg, bus, slot=slot)
    await bus.start(server)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUS_CONNECT_TIMEOUT_S
    while not bus.connected:
        if loop.time() > deadline:
            await bus.close()
            raise ConnectionError("the bus did not answer within 10 s")
        await asyncio.sleep(0.02)
    await server.start()
    return server


async def _main(cfg: Config, slot: int, run_dir: str, capacity: int) -> int:
    try:
        server = await serve_worker(cfg, run_dir, slot=slot)
        server.max_connections = capacity
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", cfg.server.host, cfg.server.port, exc)
        return codes.EXIT_PORT_IN_USE
    except ConnectionError as exc:
        log.error("%s", exc)
        return codes.EXIT_FAILURE
    stop_watching_gc = gcpolicy.watch(server.counters)
    board = Board(run_dir)
    server.on_tick.append(lambda: board.write_worker(slot, server.status()))
    board.write_worker(slot, server.status())

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    mode: list[str] = []

    def on_signal(kind: str) -> None:
        if not mode:
            mode.append(kind)
            stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_signal, "term")
    loop.add_signal_handler(signal.SIGUSR1, on_signal, "retire")
    shedding: list[asyncio.Task[None]] = []

    def on_rebalance() -> None:
        order = board.read_rebalance()
        count = 0 if order is None else order.shed.get(slot, 0)
        if order is not None and order.hold_s > 0:
            # engine/rebalance.py rule 6: the clients told to go land elsewhere
            server.hold_until = time.monotonic() + order.pace_s + order.hold_s
        if order is not None and count > 0:
            shedding.append(loop.create_task(shed(server, count, order.pace_s)))

    loop.add_signal_handler(signal.SIGUSR2, on_rebalance)
    loop.add_signal_handler(signal.SIGINT, on_signal, "quick")
    loop.add_signal_handler(signal.SIGQUIT, on_signal, "quick")
    log.info("accepting on port %d", server.port)
    await stop.wait()
    if mode[0] in ("term", "retire"):
        retire = mode[0] == "retire"
        log.info(
            "draining %d connections (%s)",
            len(server.connections),
            "restart" if retire else "shutdown",
        )
        server.accepting = False
        board.write_worker(slot, server.status())
        await server.drain(
            codes.CLOSE_SERVICE_RESTART if retire else codes.CLOSE_GOING_AWAY,
            "restart" if retire else "shutdown",
            max(0.1, cfg.workers.graceful_timeout_s - 1.0),
            # spread the reconnects over workers.drain_s (not all at one instant)
            pace_s=cfg.workers.drain_s,
        )
    for task in shedding:
        task.cancel()
    await server.close()
    await server.bus.close()
    stop_watching_gc()
    board.write_worker(slot, server.status())
    return codes.EXIT_OK


async def shed(server: WorkerServer, count: int, pace_s: float) -> None:
    """Close `count` connections, spread evenly over `pace_s`, each told to come
    back later (`bye` with a jittered `retry_ms`, close 1012): through the load
    balancer they land on other nodes."""
    victims = [c for c in list(server.connections) if not c.closing][:count]
    log.info(
        "rebalance: shedding %d of %d connections over %gs",
        len(victims),
        len(server.connections),
        pace_s,
    )
    gap_s = pace_s / len(victims) if victims and pace_s > 0 else 0.0
    lo, hi = server.cfg.workers.retry_min_ms, server.cfg.workers.retry_max_ms
    for i, conn in enumerate(victims):
        if not conn.closing:
            conn.send_control(codec.bye("rebalance", random.randint(lo, hi)))
            conn.close(codes.CLOSE_SERVICE_RESTART, "rebalance")
        if gap_s and i + 1 < len(victims):
            await asyncio.sleep(gap_s)
