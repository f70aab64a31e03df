"""One Redis connection with several pipelines in flight: the publish path's wire.

redis-py's pipeline writes its commands, then waits for every reply before the
connection can be used again: one round trip at a time, the client idle while
Redis runs the scripts and Redis idle while the client builds the next round.
A `Pipe` writes round after round on one connection and reads the replies in
order with one task, so the client builds round k+1 while Redis runs round k.

Rules:

1. One connection, made by the link's client (same URL, AUTH, TLS, socket
   timeout: a reply not read within `COMMAND_TIMEOUT_S` is a broken link),
   owned by the pipe: nothing else writes on it, so Redis runs the rounds in
   the order they were sent (a TCP connection is served in order), and the
   order of publishes from one process is kept across rounds in flight.
2. `send` writes a round's commands and returns a future of their replies, in
   command order; a reply that is an error (`ResponseError`: NOSCRIPT, OOM, a
   script error) is that command's result, the others are unaffected. Futures
   are resolved in the order the rounds were sent, one task reading them all.
3. Bounded by its caller: the publisher sends at most
   `bus.redis.max_inflight_batches` rounds before one is answered
   (engine/bus/redis/publisher.py rule 7). The pipe itself keeps only the
   futures of what was sent.
4. A lost link (an error writing or reading, a reply not read in time) breaks
   the pipe for good: every round not answered gets the exception (Redis may
   have applied it: nobody can know), the connection is dropped, and `broken`
   is set; its owner makes a new pipe once the link is back. `close` does
   the same with `BusUnavailable`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

from hiredis import pack_command
from redis.exceptions import ResponseError

from engine.bus.redis.link import REDIS_DOWN, log
from engine.errors import BusUnavailable

Command = Sequence[Any]  # a command's arguments, its name first


class Pipe:
    """A connection of `client` (a non-cluster redis.asyncio.Redis) that takes
    rounds of commands back to back (rules 1-4)."""

    __slots__ = ("_conn", "_pending", "_reader", "_ready", "broken", "syncs")

    def __init__(self, client: Any, syncs: int = 0) -> None:
        self.syncs = syncs  # the link's sync it was made after (its owner's mark)
        self._conn: Any = client.connection_pool.make_connection()  # rule 1: its own
        # rounds sent and not answered: their future and command count (rule 2)
        self._pending: collections.deque[tuple[asyncio.Future[list[Any]], int]] = (
            collections.deque()
        )
        self._ready = asyncio.Event()  # set while `_pending` holds a round
        self._reader: asyncio.Task[None] | None = None
        self.broken = False

    @property
    def inflight(self) -> int:
        """Rounds sent and not answered yet."""
        return len(self._pending)

    async def send(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Write `commands` (one round); the future gets their replies (rule 2).
        Raises what a lost link raises (rule 4), the pipe then broken."""
        if self.broken:
            raise BusUnavailable("the publish connection was lost")
        loop = asyncio.get_running_loop()
        # hiredis packs str (UTF-8), bytes and numbers in C; redis-py's own
        # packer runs a Python encoder per argument (~5 per update). A value
        # it cannot pack fails here, before anything is written.
        packed = [pack_command(tuple(command)) for command in commands]
        future: asyncio.Future[list[Any]] = loop.create_future()
        conn = self._conn
        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            self._break(exc if isinstance(exc, Exception) else BusUnavailable("cancelled"))
            raise
        self._pending.append((future, len(commands)))
        self._ready.set()
        if self._reader is None:
            self._reader = loop.create_task(self._read(), name="bus-redis-publish-replies")
        return future

    async def _read(self) -> None:
        """Read every round's replies in order and resolve its future (rule 2)."""
        conn = self._conn
        pending = self._pending
        try:
            while True:
                await self._ready.wait()
                future, count = pending[0]
                replies: list[Any] = []
                for _ in range(count):
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:  # this command's reply (rule 2)
                        replies.append(exc)
                pending.popleft()
                if not pending:
                    self._ready.clear()
                if not future.done():
                    future.set_result(replies)
        except REDIS_DOWN as exc:
            self._break(exc)
        except Exception as exc:  # a reply redis-py cannot parse: the link is unusable
            log.exception("bus: reading publish replies failed")
            self._break(exc)

    def _break(self, exc: Exception) -> None:
        """Rule 4: fail every round not answered, drop the connection."""
        self.broken = True
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: its owner may be gone
        self._ready.clear()
        conn = self._conn
        if conn.is_connected:
            # the writer's transport is closed at once; nothing is awaited
            asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))

    async def close(self) -> None:
        """Stop reading; fail what was not answered (`BusUnavailable`); disconnect."""
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                if not reader.cancelled():  # the caller was cancelled, not the reader
                    raise
        if not self.broken:
            self._break(BusUnavailable("the publish connection was closed"))
        try:
            await self._conn.disconnect(nowait=True)
        except REDIS_DOWN:
            pass
