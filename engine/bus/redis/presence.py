"""Presence on the redis bus: every node announces its connection count and reads its peers'.

The I/O shell of automatic rebalancing (the rule is engine/rebalance.py). One
task per node, in the admin process (engine/admin/rebalancer.py), supervised
(engine/bus/tasks.py): a failure is logged, counted and retried with backoff,
and /readyz names the task while it is down.

Rules:
1. One hash per bus, `P:nodes` (`P` = `bus.redis.prefix`): field = node id,
   value = "<expiry ms> <connections>". One key, so one slot on a Redis
   Cluster.
2. One round trip per announce (`announce.lua`): write this node's entry,
   delete the entries past their expiry, return the live ones. Expiry is
   judged on Redis' clock (`TIME`), so the nodes' clocks may disagree.
3. A node that stops announcing (crashed, partitioned) drops out `peer_ttl_s`
   after its last announce; a node that stops cleanly removes its entry, and
   so does a node that is not ready (`count_of()` None: booting, draining,
   or failing /readyz): the Service sends it no client, so it must not
   count in the fair share, or the ready nodes would shed towards nowhere.
4. Bounded: a node id is at most `MAX_NODE_ID_BYTES`; at most `MAX_PEERS`
   entries are read (the rest are ignored, counted in `peers_ignored`); an
   announce gets an answer within `COMMAND_TIMEOUT_S` or fails.
5. Peers are only as fresh as the last announce that succeeded: `peers()`
   returns nothing once `peer_ttl_s` has passed since then, so a node cut off
   from Redis sees itself alone and sheds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engine.bus.redis.link import COMMAND_TIMEOUT_S, CONNECT_TIMEOUT_S, REDIS_DOWN

log = logging.getLogger("fanout.rebalance")

MAX_NODE_ID_BYTES: Final = 256
MAX_PEERS: Final = 1024

# KEYS[1] the hash; ARGV node id, connections (-1: not ready, leave), ttl ms,
# most entries returned.
ANNOUNCE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if tonumber(ARGV[2]) < 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], (now + ttl) .. ' ' .. ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local all = redis.call('HGETALL', KEYS[1])
local out = {}
local limit = tonumber(ARGV[4]) * 2
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sp = string.find(v, ' ', 1, true)
  local exp = sp and tonumber(string.sub(v, 1, sp - 1))
  if not exp or exp < now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif #out < limit then
    out[#out + 1] = all[i]
    out[#out + 1] = string.sub(v, sp + 1)
  end
end
return out
"""


def nodes_key(prefix: str) -> str:
    return f"{prefix}:nodes"


def parse_peers(reply: list[Any], me: str) -> dict[str, int]:
    """`announce.lua`'s flat [node, count, ...] as {node: count}, this node left
    out, entries that do not read as a count left out."""
    peers: dict[str, int] = {}
    for raw_node, raw_count in zip(reply[0::2], reply[1::2], strict=False):
        node = raw_node.decode("utf-8", "replace") if isinstance(raw_node, bytes) else str(raw_node)
        try:
            count = int(raw_count)
        except (TypeError, ValueError):
            continue
        if node != me and count >= 0:
            peers[node] = count
    return peers


def make_client(url: str, *, cluster: bool, auth: Mapping[str, Any]) -> Any:
    """A Redis client for presence alone (its own connection: an announce never
    waits behind a publish round)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": COMMAND_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "decode_responses": False,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
        **auth,
    }
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return aioredis.Redis.from_url(url, health_check_interval=0, **kwargs)


class Presence:
    """Announces `count_of()` as node `node_id` every `interval_s` (None: not
    ready, rule 3), reads the live peers, and hands them to `on_peers` (rules 1-5). `run` raises on a
    Redis failure: run it under `engine.bus.tasks.supervise`."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        node_id: str,
        interval_s: float,
        ttl_s: float,
        count_of: Callable[[], int | None],
        on_peers: Callable[[dict[str, int]], None],
    ) -> None:
        node_bytes = node_id.encode("utf-8", "replace")[:MAX_NODE_ID_BYTES]
        self.node_id = node_bytes.decode("utf-8", "ignore")
        self.client = client
        self.key = nodes_key(prefix)
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.count_of = count_of
        self.on_peers = on_peers
        self.announces = 0
        self.peers_ignored = 0
        self.last_ok: float | None = None  # loop time of the last announce answered
        self._peers: dict[str, int] = {}

    def peers(self, now: float) -> dict[str, int]:
        """The live peers as of the last announce answered; none once it is
        older than `ttl_s` (rule 5)."""
        if self.last_ok is None or now - self.last_ok > self.ttl_s:
            return {}
        return self._peers

    async def announce(self) -> dict[str, int]:
        """One announce (rule 2): this node's count out, the live peers back."""
        ttl_ms = max(1, round(self.ttl_s * 1000))
        count = self.count_of()
        call = self.client.eval(
            ANNOUNCE_LUA,
            1,
            self.key,
            self.node_id,
            -1 if count is None else count,
            ttl_ms,
            MAX_PEERS,
        )
        reply = await asyncio.wait_for(call, COMMAND_TIMEOUT_S)
        if len(reply) >= 2 * MAX_PEERS:
            self.peers_ignored += 1
        self._peers = parse_peers(reply, self.node_id)
        self.last_ok = asyncio.get_running_loop().time()
        self.announces += 1
        return self._peers

    async def run(self) -> None:
        """Announce every `interval_s` until cancelled; raises a Redis failure."""
        while True:
            peers = await self.announce()
            self.on_peers(peers)
            await asyncio.sleep(self.interval_s)

    async def leave(self) -> None:
        """Remove this node's entry (a clean stop, rule 3); failures are ignored."""
        with contextlib.suppress(*REDIS_DOWN):
            await asyncio.wait_for(self.client.hdel(self.key, self.node_id), 1.0)
        with contextlib.suppress(*REDIS_DOWN):
            await self.client.aclose()
