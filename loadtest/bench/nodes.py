"""The fanout side of a `fanout bench` run: one node on the local bus, or N nodes on
a Redis bus whose redis-server the bench starts itself.

Rules of a run:

- node 1 takes the publisher (its admin API, `POST /publish`); the subscribers
  connect to nodes 2..N only (to node 1 when it is alone), so with `--bus
  redis --nodes 2` or more every delivery crossed Redis from one node to
  another: publish accepted on node 1 -> the shard's stream -> `XREAD` by a
  worker of another node -> its clients;
- "the server" of the report is every node's process tree (supervisor,
  workers, admin, hub), summed; the redis-server is measured apart
  (`bus_pid`), so that both the engine's cost and the bus's are visible;
- the redis-server is fresh for every run (no persistence, a temporary
  directory, a free loopback port): no run sees another's streams;
- everything started is stopped by `stop`, whatever happened; a start that
  fails half-way stops what it had started before raising.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Mapping
from typing import Any

from loadtest.accounting import server_pids
from loadtest.redis_server import RedisServer, redis_available
from loadtest.server import Server, SetupError

BUSES = ("local", "redis")


class FanoutNodes:
    """`nodes` x `fanout serve --workers W` on free ports, sharing one bus."""

    def __init__(
        self,
        bus: str,
        nodes: int,
        workers: int,
        flush_ms: int,
        config: str | None,
        cpus: tuple[int, ...] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        if bus not in BUSES:
            raise ValueError(f"bus must be one of {BUSES}, not {bus!r}")
        if bus == "local" and nodes != 1:
            raise ValueError("the local bus is one node (its hub lives in that node)")
        self.bus = bus
        self.redis: RedisServer | None = None
        self.nodes: list[Server] = []
        self._stopped = False
        try:
            # --bus decides, over --config and the caller's environment
            env = {**(extra_env or {}), "FANOUT_BUS_BACKEND": bus}
            if bus == "redis":
                if not redis_available():
                    raise SetupError(
                        "--bus redis needs redis-server and redis-cli "
                        "(apt-get install redis-server)"
                    )
                self.redis = RedisServer(tied=True, cpus=cpus)
                self.redis.start()
                env["FANOUT_BUS_REDIS_URL"] = self.redis.url
            for i in range(1, nodes + 1):
                node_env = {**env, "FANOUT_SERVER_NODE": f"node-{i}"} if bus == "redis" else env
                self.nodes.append(Server(workers, flush_ms, config, "warning", cpus, node_env))
        except BaseException:
            self.stop()
            self.cleanup_dir(None)
            raise

    # -- what the run uses ------------------------------------------------------------------

    @property
    def admin(self) -> str:
        """Node 1's admin API: where the publisher posts."""
        return self.nodes[0].admin

    @property
    def sub_urls(self) -> list[str]:
        """The WebSocket URLs the subscribers use: nodes 2..N (node 1 when alone)."""
        return [n.url for n in self.nodes[1:]] or [self.nodes[0].url]

    @property
    def url(self) -> str:
        return self.sub_urls[0]

    def wait_ready(self, timeout_s: float) -> None:
        for node in self.nodes:
            node.wait_ready(timeout_s)

    def trees(self) -> dict[str, list[int]]:
        """Each node's processes (its supervisor and every descendant), by node name."""
        return {f"node-{i}": server_pids(n.proc.pid) for i, n in enumerate(self.nodes, 1)}

    def pids(self) -> list[int]:
        return [p for tree in self.trees().values() for p in tree]

    def bus_pid(self) -> int | None:
        """The redis-server's pid (measured apart from the nodes), None on the local bus."""
        proc = self.redis.proc if self.redis is not None else None
        return proc.pid if proc is not None else None

    def board_pids(self) -> dict[str, int]:
        """Names of the processes (node-2 worker-1, ...; one node: as `Server` names them)."""
        if len(self.nodes) == 1:
            return self.nodes[0].board_pids()
        return {
            f"node-{i} {name}": pid
            for i, n in enumerate(self.nodes, 1)
            for name, pid in n.board_pids().items()
        }

    def describe(self) -> dict[str, Any]:
        """The bus and the nodes, for the report."""
        roles = ["publisher"] + ["subscribers"] * (len(self.nodes) - 1)
        if len(self.nodes) == 1:
            roles = ["publisher and subscribers"]
        return {
            "bus": self.bus,
            "nodes": [
                {
                    "name": f"node-{i}",
                    "role": role,
                    "url": n.url,
                    "admin": n.admin,
                    "supervisor_pid": n.proc.pid,
                }
                for i, (n, role) in enumerate(zip(self.nodes, roles, strict=True), 1)
            ],
            "redis": (
                {"url": self.redis.url, "pid": self.bus_pid(), "command": self.redis.command()}
                if self.redis is not None
                else None
            ),
        }

    def command(self) -> str:
        if len(self.nodes) == 1 and self.redis is None:
            return self.nodes[0].command()
        parts = [f"node-{i}: {n.command()}" for i, n in enumerate(self.nodes, 1)]
        if self.redis is not None:
            parts.insert(0, f"bus: {self.redis.command()}")
        return "; ".join(parts)

    def log_tail(self) -> str:
        tails = [(f"node-{i}", n.log_tail()) for i, n in enumerate(self.nodes, 1)]
        if self.redis is not None:
            tails.append(("redis-server", self.redis.log()))
        if len(tails) == 1:
            return tails[0][1]
        return "\n".join(f"--- {name}\n{tail}" for name, tail in tails if tail)

    # -- teardown ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every node (SIGINT to its group, SIGKILL after 10 s), then the redis-server
        (SIGKILL: nothing of it is kept). Idempotent, bounded, and not cut short by a
        Ctrl-C or SIGTERM: they are held until everything is stopped."""
        if self._stopped:
            return
        self._stopped = True
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    node.stop()
            if self.redis is not None:
                self.redis.kill()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def cleanup_dir(self, keep_log_to: str | None) -> None:
        """Remove the nodes' run directories and the redis-server's (after `stop`)."""
        for i, node in enumerate(self.nodes, 1):
            node.cleanup_dir(f"{keep_log_to}-node-{i}.log" if keep_log_to else None)
        if self.redis is not None:
            self.redis.close()
