"""Automatic rebalancing in the admin process: presence in, shedding orders out.

A thin shell between engine/bus/redis/presence.py (this node's count out,
the live peers back, every `rebalance.announce_interval_s`), the pure rule
(engine/rebalance.py `decide`) and the /rebalance machinery of
engine/admin/server.py (a `RebalanceOrder` on the board, SIGUSR2 to the
workers, which close the oldest connections with `bye` "rebalance" and 1012).
Runs only with `rebalance.enabled` on the redis bus.

The order's pace is one announce interval (the next decision comes then); its
hold (engine/rebalance.py rule 6) covers the cool-down that follows, and at
least `workers.retry_max_ms`, plus one interval: a client told `bye`
reconnects within `retry_max_ms`, a client refused tries again with backoff,
and each must find this node's workers refusing until the counts have
settled; a node that shed holds no more than fair share, so refusing new
connections then costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from engine import rebalance
from engine.board import Board
from engine.bus.redis.presence import Presence, make_client
from engine.bus.tasks import TaskHealth, supervise
from engine.config import redis_credentials

if TYPE_CHECKING:
    from engine.config import Config

log = logging.getLogger("fanout.rebalance")

TASK = "presence"  # its name in /readyz and the restart counts


class Rebalancer:
    """Announces, decides, orders shedding (see the module docstring).

    `shed(count, pace_s, hold_s)` closes `count` of this node's connections
    and returns how many it ordered (the admin server's `order_shedding`);
    `count_of()` is this node's connections (the workers' statuses);
    `ready_of()` whether /readyz says ready: a node that is not leaves the
    presence (presence.py rule 3) and decides nothing.
    """

    def __init__(
        self,
        cfg: Config,
        node_id: str,
        *,
        count_of: Callable[[], int],
        ready_of: Callable[[], bool],
        shed: Callable[[int, float, float], int],
    ) -> None:
        r = cfg.rebalance
        self.cfg = cfg
        self.node_id = node_id
        self.count_of = count_of
        self.ready_of = ready_of
        self.ready = False
        self.shed = shed
        self.policy = rebalance.Policy(
            tolerance=r.tolerance,
            sustain_s=r.sustain_s,
            max_shed_per_s=r.max_shed_per_s,
            cooldown_s=r.cooldown_s,
        )
        self.interval_s = r.announce_interval_s
        retry_max_s = cfg.workers.retry_max_ms / 1000.0
        self.hold_s = max(r.cooldown_s, retry_max_s) + r.announce_interval_s
        self.state = rebalance.State()
        self.fair = 0.0
        self.mine = 0
        self.ordered = 0  # connections the workers were told to close
        self.decide_failures = 0
        self.health = TaskHealth()
        self.presence: Presence | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the supervised presence task in the running loop."""
        rc = self.cfg.bus.redis
        username, password = redis_credentials(rc, os.environ)
        auth: dict[str, Any] = {}
        if username:
            auth["username"] = username
        if password:
            auth["password"] = password
        if rc.tls_ca_file:
            auth["ssl_ca_certs"] = rc.tls_ca_file
        self.presence = Presence(
            make_client(rc.url, cluster=rc.cluster, auth=auth),
            prefix=rc.prefix,
            node_id=self.node_id,
            interval_s=self.interval_s,
            ttl_s=self.cfg.rebalance.peer_ttl_s,
            count_of=self.announced,
            on_peers=self.decide,
        )
        self._task = asyncio.get_running_loop().create_task(
            supervise(TASK, self.presence.run, self.health), name="rebalance-presence"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.presence is not None:
            await self.presence.leave()

    def announced(self) -> int | None:
        """What presence announces: this node's connections, None when not ready."""
        self.ready = self.ready_of()
        return self.count_of() if self.ready else None

    def decide(self, peers: dict[str, int]) -> None:
        """After each announce: the rule's decision, carried out (only when ready).

        A failure here is logged and counted (`decide_failures` in /stats), and
        the presence goes on: a bug in rebalancing must not make /readyz fail
        on every node at once (only a presence that cannot reach Redis does)."""
        try:
            self._decide(peers)
        except Exception:
            self.decide_failures += 1
            log.exception("rebalance: a decision failed; announcing on")

    def _decide(self, peers: dict[str, int]) -> None:
        if not self.ready:
            return
        now = asyncio.get_running_loop().time()
        self.mine = self.count_of()
        d = rebalance.decide(
            self.policy, self.state, now=now, mine=self.mine, peers=list(peers.values())
        )
        self.state, self.fair = d.state, d.fair
        if d.hold and not d.shed:  # rule 6: clients still in flight, land them elsewhere
            self.shed(0, 0.0, 2 * self.interval_s)
        if d.shed:
            ordered = self.shed(d.shed, self.interval_s, self.hold_s)
            self.ordered += ordered
            log.info(
                "rebalance: %d connections, fair share %.1f over %d nodes: closing %d",
                self.mine,
                d.fair,
                len(peers) + 1,
                ordered,
            )

    def peers(self) -> dict[str, int]:
        if self.presence is None:
            return {}
        return self.presence.peers(asyncio.get_running_loop().time())

    def figures(self) -> dict[str, Any]:
        """What /stats shows."""
        peers = self.peers()
        return {
            "enabled": True,
            "node": self.node_id,
            "state": self.state.phase if self.ready else rebalance.NOT_READY,
            "peers": dict(sorted(peers.items())),
            "connections": self.mine,
            "fair_share": round(self.fair, 2),
            "rounds": self.state.rounds,
            "shed": self.ordered,
            "presence_up": not self.health.down and bool(self.presence and self.presence.last_ok),
            "presence_restarts": self.health.total_restarts(),
            "decide_failures": self.decide_failures,
        }


def node_connections(board: Board, expected: Mapping[int, int | None]) -> int:
    """This node's connections: the workers the supervisor runs, by their own statuses."""
    return sum(
        st.connections
        for slot, st in board.read_workers().items()
        if st.pid is not None and st.pid == expected.get(slot)
    )
