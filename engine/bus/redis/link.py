"""The redis bus' link: its two Redis clients and the state its jobs share.

The reader (engine/bus/redis/reader.py), the probe (probe.py) and the
publisher (publisher.py) each do one job over one `Link`; `RedisBus`
(engine/bus/redis_streams.py) owns it and runs them.

Rules:

1. Two clients per bus client: `cmd` (publishes, loads, probes; a socket
   timeout of `COMMAND_TIMEOUT_S`) and `reader` (`XREAD BLOCK` only, no socket
   timeout: a blocking read is bounded by its own `wait_for`). Neither
   retries a command by itself: a failure reaches the job that sent it,
   which knows whether a retry is safe.
2. RESP2 always (`protocol=2`): the reply shapes the jobs parse (XREAD's
   above all) are pinned.
3. `connected` is set by a complete sync only (counted: `syncs`) and
   cleared by the bus when the link fails; `epoch` is the epoch of the last
   sync. A job that finds
   the link broken while another job is waiting on it reports it with
   `fail` (the link task restarts the link); it never reconnects by itself.
4. `many` runs commands in one round trip: a pipeline, per node on a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from engine.bus.redis.layout import Layout, pos_of
from engine.bus.redis.scripts import Scripts

# One logger for the whole backend: its name is in every JSON log line.
log = logging.getLogger("engine.bus.redis_streams")

COMMAND_TIMEOUT_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 2.0
# What a lost or unreachable Redis raises.
REDIS_DOWN: Final = (RedisError, OSError, asyncio.TimeoutError)


class Resync(Exception):
    """A job found the epoch changed or a stream trimmed past the reader: sync again."""


class Link:
    """The Redis clients of one bus client and the link state its jobs share."""

    def __init__(
        self, url: str, layout: Layout, *, cluster: bool, auth: dict[str, Any], shown_url: str
    ) -> None:
        self.url = url
        self.shown_url = shown_url  # the URL without its password: for logs
        self.layout = layout
        self.cluster = cluster
        self._auth = auth
        self.scripts = Scripts()
        self.cmd: Any = None  # Redis | RedisCluster: publishes, loads, probes
        self.reader: Any = None  # Redis | RedisCluster: XREAD BLOCK, no socket timeout
        self.connected = False
        self.closed = False
        self.epoch: str | None = None
        # complete syncs so far: a connection a job made before the last one
        # may be dead (Redis restarted): the publisher's pipe is made anew
        self.syncs = 0
        # set by the link task while it serves; a job's `fail` ends the serving
        self.trouble: asyncio.Future[None] | None = None

    def open(self) -> None:
        """Make the two clients (rule 1); they connect on first use."""
        self.cmd = self._client(COMMAND_TIMEOUT_S)
        self.reader = self._client(None)

    def fail(self, exc: BaseException) -> None:
        """Report a broken link seen by a job other than the link task (rule 3)."""
        if self.trouble is not None and not self.trouble.done():
            self.trouble.set_exception(exc)

    async def many(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run commands in one round trip (a pipeline; per node on a cluster)."""
        if not commands:
            return []
        pipe = self.cmd.pipeline(transaction=False) if not self.cluster else self.cmd.pipeline()
        for command in commands:
            pipe.execute_command(*command)
        result: list[Any] = await pipe.execute()
        return result

    async def heads_and_firsts(self) -> tuple[list[int | None], list[int | None]]:
        """Each shard's newest and oldest stream ID (None: no stream), one round trip."""
        commands: list[tuple[Any, ...]] = []
        for name in self.layout.logs:
            commands.append(("XREVRANGE", name, "+", "-", "COUNT", 1))
            commands.append(("XRANGE", name, "-", "+", "COUNT", 1))
        replies = await self.many(commands)
        heads = [pos_of(r[0][0]) if r else None for r in replies[0::2]]
        firsts = [pos_of(r[0][0]) if r else None for r in replies[1::2]]
        return heads, firsts

    def _client(self, socket_timeout: float | None) -> Any:
        kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "decode_responses": False,
            "protocol": 2,  # pins reply shapes (field notes: RESP3 changes XREAD's)
            **self._auth,
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), 0), **kwargs)
        return aioredis.Redis.from_url(
            self.url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **kwargs
        )


async def stop(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are done.

    Cancels again while any is still running: a library that swallows one
    cancellation (seen with redis-py under load) must not leave a task running
    or its owner waiting forever. If the caller is cancelled meanwhile, the
    tasks are still stopped first, then the cancellation goes on.
    """
    interrupted = False
    for _ in range(200):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        try:
            await asyncio.wait(pending, timeout=0.05)
        except asyncio.CancelledError:
            interrupted = True
    else:
        log.error("bus: %d task(s) would not stop", sum(not t.done() for t in tasks))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" warning
    if interrupted:
        raise asyncio.CancelledError
