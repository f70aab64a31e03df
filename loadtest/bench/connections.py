"""Connection scale of `fanout bench` (--idle at 50,000): what a run's connections need.

1. Source addresses: one (source, destination) pair has ~28,000 ephemeral ports
   (net.ipv4.ip_local_port_range); the run spreads its clients over 127.0.0.1..N,
   one address per PORTS_PER_SOURCE_ADDR connections (warm-up included) unless
   --source-addrs says N; each client binds its address before it connects.
2. File descriptors: `fit_connections` raises the bench's fd limit to what the
   busiest process of the run needs (a worker's share of the connections, or a
   subscriber process's), before the server starts: the server and the generator
   inherit it. The hard limit rises only for root with CAP_SYS_RESOURCE; when it
   cannot, the run stops before starting anything, naming the fix.
3. Server settings: a worker admits at most limits.max_connections (20,000 by
   default); when a worker's share is above it, `server_env` passes
   FANOUT_LIMITS_MAX_CONNECTIONS to the server it starts (shown in the report's
   server command).
4. Connect time: `connect_times` runs from the first connection attempt of any
   subscriber process to the last connection up (CLOCK_MONOTONIC, one clock for
   every process of the machine), and to the last client subscribed.
"""

from __future__ import annotations

import math
from typing import Any

from loadtest.children import raise_nofile
from loadtest.server import SetupError

PORTS_PER_SOURCE_ADDR = 20_000  # of the ~28,000 ephemeral ports per (src, dst) pair
DEFAULT_MAX_CONNECTIONS = 20_000  # limits.max_connections' default (per worker)
# SO_REUSEPORT spreads connections over the workers by a hash of the 4-tuple: a
# worker's count is about binomial; allow this many standard deviations above its share
SHARE_SIGMAS = 5.0
FD_RESERVE = 256  # fds of a process for everything but its connections


def connections(s: Any) -> int:
    """Every subscriber connection of the run, the warm-up's included."""
    return int(s.subscribers + s.warmup)


def source_addr_count(s: Any) -> int:
    """--source-addrs, or one loopback address per PORTS_PER_SOURCE_ADDR connections."""
    if s.source_addrs > 0:
        return int(s.source_addrs)
    return max(1, -(-connections(s) // PORTS_PER_SOURCE_ADDR))


def per_worker(s: Any) -> int:
    """A worker's share of the connections (on the subscriber nodes: 2..N, or the one)."""
    return _share(connections(s), s.workers * max(1, s.nodes - 1))


def _share(n: int, k: int) -> int:
    """The most connections of `n` one of `k` workers gets (but for 1 time in ~10^6)."""
    return math.ceil(n / k + SHARE_SIGMAS * math.sqrt(n * (1 / k) * (1 - 1 / k)))


def server_env(s: Any) -> dict[str, str]:
    """Settings the bench passes to the server it starts so that the connections fit."""
    if per_worker(s) > DEFAULT_MAX_CONNECTIONS:
        return {"FANOUT_LIMITS_MAX_CONNECTIONS": str(per_worker(s))}
    return {}


def fit_connections(s: Any) -> tuple[int, int]:
    """Raise this process's fd limit for the run (inherited by what it starts);
    SetupError naming the fix when it cannot. Returns the limit (soft, hard)."""
    per_server = per_worker(s)
    per_generator = math.ceil(s.subscribers / max(1, s.sub_procs))
    need = max(per_server, per_generator) + FD_RESERVE
    soft, hard = raise_nofile(need)
    if soft < need:
        workers = (
            next(
                w
                for w in range(s.workers, connections(s) + 2)
                if _share(connections(s), w * max(1, s.nodes - 1)) + FD_RESERVE <= soft
            )
            if soft > 2 * FD_RESERVE
            else "more"
        )
        raise SetupError(
            f"{connections(s):,} connections need ~{need:,} open files in one process "
            f"({per_server:,} per worker, {per_generator:,} per subscriber process) but "
            f"the fd limit is {soft:,} (hard {hard:,}) and only root with "
            "CAP_SYS_RESOURCE can raise it: raise the hard limit (ulimit -Hn, systemd "
            "LimitNOFILE=, docker --ulimit nofile=N:N) or spread the connections "
            f"(--workers {workers}, --sub-procs)"
        )
    return soft, hard


def connect_times(setups: list[dict[str, Any]]) -> dict[str, Any]:
    """From the subscriber processes' `ready` answers: seconds from the first connection
    attempt to the last connection up (`connect_s`) and to every client subscribed
    (`subscribed_s`), connections per second, and upgrades retried after a 503."""
    firsts = [v["first_connect_t"] for v in setups if v.get("first_connect_t") is not None]
    lasts = [v["last_connected_t"] for v in setups if v.get("last_connected_t") is not None]
    readies = [v["ready_t"] for v in setups if v.get("ready_t") is not None]
    connected = sum(int(v.get("connected", 0)) for v in setups)
    retries = sum(int(v.get("connect_retries", 0)) for v in setups)
    if not firsts or not lasts:
        return {"connect_s": None, "subscribed_s": None, "connects_per_s": None}
    connect_s = max(lasts) - min(firsts)
    return {
        "connect_s": round(connect_s, 3),
        "subscribed_s": round(max(readies) - min(firsts), 3) if readies else None,
        "connects_per_s": round(connected / connect_s) if connect_s > 0 else None,
        "connect_retries": retries,
    }


def connect_cpu(
    server0: dict[Any, tuple[float, float]],
    server1: dict[Any, tuple[float, float]],
    generator: dict[int, tuple[float, float]],
    connected: int,
) -> dict[str, Any]:
    """CPU seconds (user + system) of the server between two readings taken before the
    subscriber processes start and once all are ready, and of those processes from their
    start: in all and in µs per connection (its upgrade and its `sub`/`snap`)."""
    server_s = sum(sum(server1[p]) - sum(server0[p]) for p in server0 if p in server1)
    generator_s = sum(sum(v) for v in generator.values())
    per = 1e6 / connected if connected else 0.0
    return {
        "connect_server_cpu_s": round(server_s, 3),
        "connect_server_us_per_connection": round(server_s * per, 1) if connected else None,
        "connect_generator_cpu_s": round(generator_s, 3),
        "connect_generator_us_per_connection": round(generator_s * per, 1) if connected else None,
    }
