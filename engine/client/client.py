"""The Python client: subscribe, keep the latest state, recover after any disconnect.

    async with connect("ws://127.0.0.1:8000/ws") as client:
        await client.subscribe(["prices.fx"])
        print(client.topic("prices.fx")["EURUSD"])
        async for change in client.changes():
            ...

A thin I/O shell: `engine.client.raw` moves frames, `engine.client.state`
decides (the state view, the reconnect delays). One task per client reads the
connection; changes reach callbacks synchronously and iterators through
bounded queues.

Guarantees:
- `client.topic(t)` converges to the server's latest value of every key of
  `t` whenever the client is connected; after a disconnect it resubscribes
  with `since` (the epoch and last position per topic), so the server sends
  only the keys it missed (`snap` with `full: false`).
- Reconnects use exponential backoff with full jitter (`ReconnectPolicy`),
  reset after a connection stayed up `stable_s`; a `bye` sets the next delay
  to its `retry_ms`; after close 4001 or 4003 the client does not reconnect
  until `set_token` gives it a new token (state "unauthorized"), or, with a
  `token_provider`, until the provider gave one.
- With a `token_provider` (an async callable returning a token), the token
  stays fresh on the live connection (engine.client.tokens rules 1-5): the
  provider is called before the current token's `exp` (read without
  verification, `TokenRefresh` margin) and the new token is sent in `auth`,
  no reconnect. A provider that raises, times out (`TokenRefresh.timeout_s`)
  or returns an unusable token is reported (`TokenProviderError` to
  `on_error`) and called again after a backoff delay; the client does not
  close the connection for that (the server closes 4003 at expiry, and the
  client then waits for the provider before reconnecting).
- Every attempt after the first waits its delay, whatever ended the one
  before (a refused connect, a close, a server breaking the protocol, a bug):
  the client never reconnects in a loop without a wait.
- An error no reconnect can fix is raised, not retried: a message the client
  cannot encode from the caller's own input (a token or `max_hz` of the wrong
  type, a string that is not UTF-8) stops the client (state "closed",
  `last_error`) and is raised by whatever the caller awaits (`async with`,
  `wait_connected`, `subscribe`, the `changes()` iterators). A token that is
  not a `str` is a `TypeError` at once.
- Limits: an iterator from `changes()` holds at most `max_pending_changes`
  changes; past that its oldest change is dropped and counted in
  `counters.changes_dropped` (the state view itself is never behind). The
  connection's receive queue is bounded by `engine.client.raw` (overflow
  closes the connection, and the client recovers with `since`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NoReturn

import msgpack

from engine.client import raw, tokens
from engine.client.state import Change, Reconnector, ReconnectPolicy, StateView, TopicView
from engine.client.tokens import ProviderRetry, TokenRefresh

log = logging.getLogger("fanout.client")

# Connection states (`Client.conn_state`).
IDLE: Final = "idle"
CONNECTING: Final = "connecting"
CONNECTED: Final = "connected"
WAITING: Final = "waiting"  # between two attempts (backoff or bye.retry_ms)
UNAUTHORIZED: Final = "unauthorized"  # closed 4001/4003: waits for set_token()
CLOSED: Final = "closed"  # close() was called

ChangeCallback = Callable[[Change], None]
StateCallback = Callable[[str], None]
ErrorCallback = Callable[[Exception], None]
TokenProvider = Callable[[], Awaitable[str]]


class SubscribeError(Exception):
    """The server refused a `sub` (nothing in it was subscribed)."""

    def __init__(self, code: str, message: str, topic: str | None) -> None:
        super().__init__(f"{code}: {message}" + (f" (topic {topic})" if topic else ""))
        self.code = code
        self.topic = topic


class Unauthorized(Exception):
    """The server closed with 4001/4003: a new token is needed (`set_token`)."""


class TokenProviderError(Exception):
    """The token provider failed: it raised, did not answer within
    `TokenRefresh.timeout_s`, or returned something that is not a usable token
    (not a `str`, not UTF-8, already expired). `code` is "token_provider";
    `error` is the cause. Reported to `on_error`; the provider is called again
    after a backoff delay, and the connection is kept."""

    code = "token_provider"

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"token_provider: {error!r}")
        self.error = error


class BadValue(Exception):
    """A value this client could not decode (engine.protocol.codec rule 5: not
    UTF-8, nested deeper than `MAX_DATA_DEPTH`). `code` is "bad_value"; `key`
    is the state key, or the stream event's position. The view holds an
    `Undecodable` for it and the connection is kept: reported, not retried."""

    code = "bad_value"

    def __init__(self, topic: str, key: str, reason: str) -> None:
        super().__init__(f"bad_value: {topic} {key!r}: {reason}")
        self.topic = topic
        self.key = key
        self.reason = reason


class _CallerError(Exception):
    """A message built from the caller's input could not be encoded (`error`,
    a TypeError, ValueError or OverflowError): no reconnect can fix it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _check_token(token: object) -> None:
    if token is not None and not isinstance(token, str):
        raise TypeError(f"token must be a str or None, got {type(token).__name__}")


@dataclass(slots=True)
class Counters:
    """What the client has seen, since it was created (never reset)."""

    connects: int = 0  # connections that reached "connected"
    connect_failures: int = 0  # attempts that never got there
    disconnects: int = 0
    messages: int = 0
    snaps_full: int = 0
    snaps_partial: int = 0
    updates: int = 0  # keys received in snap and upd
    byes: int = 0
    changes_dropped: int = 0
    bad_values: int = 0  # values this client could not decode (`BadValue`)
    token_refreshes: int = 0  # tokens the provider gave
    token_auths: int = 0  # of them, sent in `auth` on a live connection
    token_failures: int = 0  # provider calls that failed (`TokenProviderError`)
    last_close_code: int | None = None
    retry_delays_ms: deque[float] = field(default_factory=lambda: deque(maxlen=64))


class ChangeStream:
    """An async iterator of changes, from its creation on; ends when the client closes.

    Bounded: holds at most `limit` changes not yet read; on overflow the
    oldest is dropped (counted in the client's `counters.changes_dropped`).
    """

    def __init__(self, client: Client, limit: int) -> None:
        self._client = client
        self._queue: deque[Change] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: BaseException | None = None

    def push(self, change: Change) -> None:
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self._client.counters.changes_dropped += 1
        self._queue.append(change)
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        """No more changes; `error` (the client's failure) is raised once the
        changes already queued have been read."""
        self._ended = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        while not self._queue:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._queue.popleft()

    def pending(self) -> int:
        return len(self._queue)


class _SubWait:
    __slots__ = ("future", "remaining")

    def __init__(self, topics: Iterable[str]) -> None:
        self.remaining = set(topics)
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Client:
    """A resilient subscriber. Create it with `connect(...)` and use it in `async with`.

    `clock` (monotonic seconds) and `rng` are injectable so that the backoff
    timing is reproducible in tests; `wall` (seconds since the epoch) is the
    clock a token's `exp` is compared with.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        token_refresh: TokenRefresh | None = None,
        policy: ReconnectPolicy | None = None,
        max_pending_changes: int = 10_000,
        connect_timeout_s: float = 10.0,
        compression: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        _check_token(token)
        self.url = url
        self.compression = compression  # offer permessage-deflate (engine/client/raw.py)
        self.token: str | None = None
        self.policy = policy or ReconnectPolicy()
        self.token_refresh = token_refresh or TokenRefresh()
        self._provider = token_provider
        self._wall = wall
        self._refresh_at: float | None = None  # wall seconds (tokens rule 2), None: never
        self._provider_retry = ProviderRetry(
            self.policy.base_ms, self.policy.max_ms, self.policy.factor
        )
        self._use_token(token)
        self.connect_timeout_s = connect_timeout_s
        self.max_pending_changes = max_pending_changes
        self.state = StateView()
        self.counters = Counters()
        self.conn_state = IDLE
        self.last_error: BaseException | None = None
        self._clock = clock
        self._rng = rng or random.Random()
        self._rec = Reconnector(self.policy)
        self._subs: dict[str, float | None] = {}  # topic -> max_hz, in subscription order
        self._sent: dict[int, tuple[str, ...]] = {}  # sub id -> topics (for err)
        self._waits: list[_SubWait] = []
        self._streams: weakref.WeakSet[ChangeStream] = weakref.WeakSet()
        self._on_change: list[ChangeCallback] = []
        self._on_state: list[StateCallback] = []
        self._on_error: list[ErrorCallback] = []
        self._ids = itertools.count(1)
        self._conn: raw.RawConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # interrupts a backoff wait (close, set_token)
        self._state_event = asyncio.Event()
        self._closing = False
        self._failure: Exception | None = None  # a caller's error that stopped the client

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self.start()
        try:
            await self.wait_connected(self.connect_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected. Raises `Unauthorized` if the server refused the
        token, TimeoutError after `timeout` seconds (the client keeps trying)."""
        async with asyncio.timeout(timeout):
            while self.conn_state != CONNECTED:
                if self.conn_state == UNAUTHORIZED:
                    raise Unauthorized(f"the server closed with {self.counters.last_close_code}")
                if self.conn_state == CLOSED:
                    if self._failure is not None:
                        raise self._failure
                    raise ConnectionError("the client is closed")
                self._state_event.clear()
                await self._state_event.wait()

    async def close(self) -> None:
        """Close the connection (code 1000) and stop reconnecting. Iterators end."""
        self._closing = True
        self._wake.set()
        if self._conn is not None:
            self._conn.close(1000)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set_state(CLOSED)
        for stream in list(self._streams):
            stream.end(self._failure)
        for wait in self._waits:
            if not wait.future.done():
                wait.future.set_exception(self._failure or ConnectionError("the client was closed"))
        self._waits.clear()

    def set_token(self, token: str | None) -> None:
        """Use `token` from the next connection on; after a 4001/4003 close,
        reconnect now (with backoff reset). A token that is not a `str` (or
        None) raises TypeError. With a `token_provider`, the provider is still
        called when this token is due for a refresh."""
        _check_token(token)
        self._use_token(token)
        if self._rec.blocked:
            self._rec.new_token()
            self._wake.set()

    # -- what users call -------------------------------------------------------------

    async def subscribe(self, topics: Iterable[str], *, max_hz: float | None = None) -> None:
        """Subscribe, and wait until every topic's snapshot is in the view.

        Raises `SubscribeError` when the server refuses (then nothing in this
        call is subscribed). Subscriptions survive reconnects. If the client
        is not connected, this waits for the next connection.
        """
        names = tuple(dict.fromkeys(topics))
        if not names:
            return
        if self._failure is not None:
            raise self._failure
        before = {t: self._subs[t] for t in names if t in self._subs}
        for t in names:
            self._subs[t] = max_hz
        conn = self._conn
        if conn is not None and self.conn_state == CONNECTED:
            try:
                self._send_sub(conn, names, max_hz)
            except _CallerError as exc:  # e.g. max_hz of the wrong type: not kept
                for t in names:
                    del self._subs[t]
                self._subs.update(before)
                raise exc.error from None
        wait = _SubWait(names)
        self._waits.append(wait)
        try:
            await wait.future
        finally:
            if wait in self._waits:
                self._waits.remove(wait)

    async def unsubscribe(self, topics: Iterable[str]) -> None:
        names = [t for t in dict.fromkeys(topics) if t in self._subs]
        for t in names:
            del self._subs[t]
            self.state.forget(t)
        conn = self._conn
        if names and conn is not None and self.conn_state == CONNECTED:
            self._send(conn, {"op": "unsub", "topics": names, "id": next(self._ids)})

    def topic(self, name: str) -> TopicView:
        """The view of a topic: a read-only Mapping key -> latest value."""
        return self.state.view(name)

    @property
    def subscriptions(self) -> Mapping[str, float | None]:
        return dict(self._subs)

    def changes(self) -> ChangeStream:
        """An async iterator of every change from now on (see `ChangeStream`)."""
        stream = ChangeStream(self, self.max_pending_changes)
        self._streams.add(stream)
        return stream

    def on_change(self, callback: ChangeCallback) -> None:
        """Call `callback(change)` for every change, synchronously, in the reader task."""
        self._on_change.append(callback)

    def on_state(self, callback: StateCallback) -> None:
        """Call `callback(conn_state)` whenever the connection state changes."""
        self._on_state.append(callback)

    def on_error(self, callback: ErrorCallback) -> None:
        """Call `callback(error)` for every error the server or a value reports,
        synchronously, in the reader task: `SubscribeError` for a server `err`,
        `BadValue` for a value this client cannot decode. Neither closes the
        connection."""
        self._on_error.append(callback)

    def _report(self, error: Exception) -> None:
        self.last_error = error
        for cb in self._on_error:
            try:
                cb(error)
            except Exception:
                log.exception("client: error callback failed")

    # -- the token -------------------------------------------------------------------

    def _use_token(self, token: str | None) -> None:
        """`token` is the one to send from now on; schedule its refresh (tokens rule 2)."""
        self.token = token
        exp = None if token is None else tokens.token_expiry(token)
        self._refresh_at = tokens.refresh_at(exp, self._wall(), self.token_refresh)

    def _token_due(self) -> bool:
        """With a provider: no token yet, or the current one is due for a refresh."""
        if self._provider is None:
            return False
        if self.token is None:
            return True
        return self._refresh_at is not None and self._wall() >= self._refresh_at

    async def _call_provider(self) -> str:
        """One provider call, bounded by `token_refresh.timeout_s`; the token it
        returns is checked before it is used (a `str`, UTF-8, not expired)."""
        assert self._provider is not None
        async with asyncio.timeout(self.token_refresh.timeout_s):
            token = await self._provider()
        if not isinstance(token, str):
            raise TypeError(f"the token provider returned a {type(token).__name__}, not a str")
        token.encode("utf-8")  # a lone surrogate could never be sent: fail here, not in _send
        tokens.check_fresh(tokens.token_expiry(token), self._wall())
        return token

    async def _obtain_token(self) -> None:
        """Call the provider until it gives a usable token (or the client closes).
        Each failure is reported (`TokenProviderError`) and followed by a backoff
        delay (tokens rule 5). Cancelled with its caller."""
        while not self._closing:
            try:
                token = await self._call_provider()
            except Exception as exc:  # raised, timed out, unusable: retried, never fatal
                self._provider_retry.failed()
                self.counters.token_failures += 1
                log.warning("client: the token provider failed: %r", exc)
                self._report(TokenProviderError(exc))
                await asyncio.sleep(self._provider_retry.delay_ms(self._rng.random()) / 1000.0)
                continue
            self._provider_retry.succeeded()
            self.counters.token_refreshes += 1
            self._use_token(token)
            return

    async def _keep_token_fresh(self, conn: raw.RawConnection) -> None:
        """While `conn` is up: a new token from the provider before the current
        one is due, sent in `auth` on this connection (the server's `ack`, or a
        close 4001 if it refuses it). Cancelled when the connection ends."""
        try:
            await self._refresh_while_up(conn)
        except Exception:  # a bug here must not die unseen in a task nobody awaits
            log.exception("client: token refresh failed")

    async def _refresh_while_up(self, conn: raw.RawConnection) -> None:
        while not conn.closed.done():
            at = self._refresh_at
            if at is None:
                return  # no known exp: refreshed only after a 4001/4003 close (tokens rule 3)
            await asyncio.sleep(max(0.0, at - self._wall()))
            await self._obtain_token()
            if self._closing or conn.closed.done() or self.token is None:
                return
            try:
                self._send(conn, {"op": "auth", "token": self.token, "id": next(self._ids)})
            except raw.ConnectionClosed:
                return
            self.counters.token_auths += 1

    # -- the connection loop ---------------------------------------------------------

    def _set_state(self, new: str) -> None:
        if new == self.conn_state:
            return
        self.conn_state = new
        self._state_event.set()
        for cb in self._on_state:
            try:
                cb(new)
            except Exception:
                log.exception("client: state callback failed")

    async def _run(self) -> None:
        first = True
        while not self._closing:
            delay_ms = self._rec.delay_ms(self._rng.random())
            if delay_ms is None and self._provider is not None:
                # closed 4001/4003: a new token first, then the backoff delay as
                # after any close (a provider whose tokens are refused must not
                # make the client reconnect in a loop)
                self._set_state(WAITING)
                await self._obtain_token()
                self._rec.unblock()
                continue
            if delay_ms is None:
                self._set_state(UNAUTHORIZED)
                self._wake.clear()
                await self._wake.wait()
                continue
            # every attempt but the very first waits, whatever ended the last one
            # (not only after a connect or a refused connect: a connection dropped
            # before "connected" used to skip the wait and loop ~1,500 times a second)
            if not first:
                self.counters.retry_delays_ms.append(delay_ms)
                self._set_state(WAITING)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay_ms / 1000.0)
                if self._closing:
                    break
            first = False
            if self._token_due():
                self._set_state(WAITING)
                await self._obtain_token()
                if self._closing:
                    break
            self._set_state(CONNECTING)
            try:
                conn = await raw.connect(
                    self.url, timeout=self.connect_timeout_s, compression=self.compression
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, reset, handshake failed (HTTP 503...)
                self.last_error = exc
                self.counters.connect_failures += 1
                self._rec.failed(self._clock())
                continue
            self._conn = conn
            try:
                code = await self._serve(conn)
            except _CallerError as exc:
                self._fail(exc.error)
                return
            except Exception as exc:  # a bug here must not end the task silently
                log.exception("client: connection failed")
                self.last_error = exc
                self.counters.disconnects += 1
                code = 1006
            finally:
                self._conn = None
                conn.close(1000)
            self.counters.last_close_code = code
            self._rec.closed(self._clock(), code)

    def _fail(self, error: Exception) -> None:
        """Stop for good on an error no reconnect can fix; whoever waits gets it."""
        log.error("client: stopped: %r (a reconnect cannot fix this)", error)
        self.last_error = error
        self._failure = error
        self._closing = True
        self._set_state(CLOSED)
        for stream in list(self._streams):
            stream.end(error)
        for wait in self._waits:
            if not wait.future.done():
                wait.future.set_exception(error)

    def _send(self, conn: raw.RawConnection, msg: Mapping[str, Any]) -> None:
        """Send one of our own messages. A message that cannot be encoded was
        built from the caller's input: `_CallerError`, never a reconnect."""
        try:
            payload = msgpack.packb(msg, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _CallerError(exc) from exc
        conn.send_bytes(payload)

    async def _serve(self, conn: raw.RawConnection) -> int:
        """Run one connection until it closes; returns its close code."""
        try:
            hello = await conn.recv(self.connect_timeout_s)
            if hello.get("op") != "hello":
                raise ValueError(f"expected hello, got {hello.get('op')!r}")
            if self.token is not None:
                rid = next(self._ids)
                self._send(conn, {"op": "auth", "token": self.token, "id": rid})
                while True:
                    msg = await conn.recv(self.connect_timeout_s)
                    if msg.get("op") == "ack" and msg.get("id") == rid:
                        break
                    if msg.get("op") == "err" and msg.get("id") == rid:
                        conn.close(1000)
                        return await conn.wait_closed()
            self._rec.connected(self._clock())
            self.counters.connects += 1
            self._set_state(CONNECTED)
            self._resubscribe(conn)
            await self._read(conn)
        except raw.ConnectionClosed as exc:
            self.counters.disconnects += 1
            return exc.code
        except (TimeoutError, ValueError, TypeError) as exc:
            # no hello/ack in time, or the server broke the protocol: start over
            self.last_error = exc
            log.warning("client: dropping the connection: %r", exc)
            self.counters.disconnects += 1
            conn.close(1002 if not isinstance(exc, TimeoutError) else 1000)
            return 1006

    async def _read(self, conn: raw.RawConnection) -> NoReturn:
        """Handle every message until the connection closes (`ConnectionClosed`),
        keeping the token fresh meanwhile when there is a provider."""
        fresh = None
        if self._provider is not None:
            fresh = asyncio.get_running_loop().create_task(self._keep_token_fresh(conn))
        try:
            while True:
                self._handle(await conn.recv(None))
        finally:
            if fresh is not None:
                fresh.cancel()

    def _resubscribe(self, conn: raw.RawConnection) -> None:
        groups: dict[float | None, list[str]] = {}
        for topic, hz in self._subs.items():
            groups.setdefault(hz, []).append(topic)
        for hz, names in groups.items():
            self._send_sub(conn, tuple(names), hz)

    def _send_sub(self, conn: raw.RawConnection, names: tuple[str, ...], hz: float | None) -> None:
        rid = next(self._ids)
        self._sent[rid] = names
        msg: dict[str, Any] = {"op": "sub", "topics": list(names), "id": rid}
        since = self.state.since(names)
        if since:
            msg["since"] = {t: list(mark) for t, mark in since.items()}
        if hz is not None:
            msg["max_hz"] = hz
        self._send(conn, msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        self.counters.messages += 1
        op = msg.get("op")
        if op == "bye":
            self.counters.byes += 1
            retry = msg.get("retry_ms")
            if isinstance(retry, int | float) and not isinstance(retry, bool):
                self._rec.bye(retry)
            return
        if op == "ack":
            self._sent.pop(msg.get("id", -1), None)
            return
        if op == "err":
            self._refused(msg)
            return
        if msg.get("topic") not in self._subs:
            return  # in flight when we unsubscribed (or never asked for): not ours to keep
        change = self.state.apply(msg)
        if change is None:
            return
        for key, bad in change.undecodable():
            self.counters.bad_values += 1
            log.warning("client: cannot decode %s %r: %s", change.topic, key, bad.reason)
            self._report(BadValue(change.topic, key, bad.reason))
        if change.kind == "snap":
            if change.full:
                self.counters.snaps_full += 1
            else:
                self.counters.snaps_partial += 1
            for wait in self._waits:
                wait.remaining.discard(change.topic)
                if not wait.remaining and not wait.future.done():
                    wait.future.set_result(None)
        self.counters.updates += len(change.items)
        for cb in self._on_change:
            try:
                cb(change)
            except Exception:
                log.exception("client: change callback failed")
        for stream in list(self._streams):
            stream.push(change)

    def _refused(self, msg: Mapping[str, Any]) -> None:
        error = SubscribeError(str(msg.get("code")), str(msg.get("msg")), msg.get("topic"))
        self._report(error)
        names = self._sent.pop(msg.get("id", -1), None)
        if names is None:
            log.warning("client: server error: %s", error)
            return
        # `sub` is all or nothing: none of these topics is subscribed
        for t in names:
            self._subs.pop(t, None)
        for wait in self._waits:
            if wait.remaining & set(names) and not wait.future.done():
                wait.future.set_exception(error)


def connect(
    url: str,
    *,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    token_refresh: TokenRefresh | None = None,
    policy: ReconnectPolicy | None = None,
    max_pending_changes: int = 10_000,
    connect_timeout_s: float = 10.0,
    compression: bool = True,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    rng: random.Random | None = None,
) -> Client:
    """A client for `url` (`ws://host:port/ws`). Use it as `async with connect(...) as c`:
    entering waits (up to `connect_timeout_s`) for the first connection.
    `token_provider`: an async callable returning a fresh token, called before
    the current token expires (`token_refresh`) and after a 4001/4003 close.
    `compression`: offer permessage-deflate (the engine then sends frames of
    `fanout.compression_min_bytes` or more compressed; False: every frame raw)."""
    return Client(
        url,
        token=token,
        token_provider=token_provider,
        token_refresh=token_refresh,
        policy=policy,
        max_pending_changes=max_pending_changes,
        connect_timeout_s=connect_timeout_s,
        compression=compression,
        clock=clock,
        wall=wall,
        rng=rng,
    )
