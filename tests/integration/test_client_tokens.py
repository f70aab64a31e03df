"""The Python client's token provider against the engine's own JWT auth
(HS256, `auth.leeway_s = 0`: a token ends exactly at its `exp`, and the
engine closes its connection 4003 then).

- A provider that fails (raises, hangs past `TokenRefresh.timeout_s`, returns
  an expired token, returns a non-str) is called again after backoff delays,
  each failure is reported to `on_error`, and the connection outlives the
  first token's `exp` without a reconnect.
- A provider that fails until the engine closed 4003: the client waits for a
  token, reconnects, and receives what it missed (`since`).
- Tokens the engine refuses (4001) back off like any close: no reconnect loop.

The 30-second run (3-second tokens, no reconnect, no missed update) is in
tests/process/test_client_token_refresh.py, against a real `fanout serve`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from engine.client import CONNECTED, Client, ReconnectPolicy, TokenProviderError, connect
from engine.client.tokens import StaleToken, TokenRefresh, token_expiry
from tests.integration.conftest import TIMEOUT_FACTOR, Engine, eventually
from tests.support.tokens import SECRET, hs256

POLICY = ReconnectPolicy(base_ms=20, max_ms=200, stable_s=30)


class _Ceiling(random.Random):
    """Every draw is 1.0: each backoff delay is its ceiling, exactly."""

    def random(self) -> float:
        return 1.0


@pytest.fixture
async def jwt_engine(
    engine_factory: Callable[..., Awaitable[Engine]], monkeypatch: pytest.MonkeyPatch
) -> Engine:
    monkeypatch.setenv("FANOUT_JWT_SECRET", SECRET)
    return await engine_factory(
        auth={"mode": "jwt", "timeout_s": 2.0, "leeway_s": 0.0}, fanout={"flush_interval_ms": 5}
    )


async def test_a_failing_provider_is_retried_with_backoff_and_the_connection_kept(
    jwt_engine: Engine,
) -> None:
    calls: list[float] = []  # monotonic time of each call
    first_exp: list[float] = []

    async def provider() -> str:
        calls.append(time.monotonic())
        n = len(calls)
        if n == 1:
            token = hs256(ttl_s=4.0)  # refreshed 2 s before its exp (min_margin_s)
            first_exp.append(token_expiry(token) or 0.0)
            return token
        if n == 2:
            raise RuntimeError("issuer down")
        if n == 3:
            await asyncio.Event().wait()  # hangs: timed out after timeout_s
        if n == 4:
            return hs256(ttl_s=-5.0)  # expired already
        if n == 5:
            return 12345  # type: ignore[return-value]  # not a str
        return hs256(ttl_s=60.0)

    errors: list[Exception] = []
    refresh = TokenRefresh(min_margin_s=2.0, timeout_s=0.2)
    client = connect(jwt_engine.url, token_provider=provider, token_refresh=refresh, policy=POLICY)
    client._rng = _Ceiling()
    client.on_error(errors.append)
    await jwt_engine.publish("tok.a", "k", 1)
    async with client:
        await client.subscribe(["tok.a"])
        await eventually(lambda: client.counters.token_auths == 1, timeout=10)
        assert [type(e) for e in errors] == [TokenProviderError] * 4
        assert all(isinstance(e, TokenProviderError) and e.code == "token_provider" for e in errors)
        causes = [type(e.error) for e in errors if isinstance(e, TokenProviderError)]
        assert causes == [RuntimeError, TimeoutError, StaleToken, TypeError]
        # each retry waited its backoff delay (ceilings 20, 40, 80, 160 ms), the
        # hung call its timeout too: a lower bound, which no load can break (less
        # the loop clock's millisecond rounding: uvloop may wake a little early)
        gaps = [b - a for a, b in itertools.pairwise(calls[1:])]
        waits = [0.020, 0.2 + 0.040, 0.080, 0.160]
        assert all(gap >= wait - 0.005 for gap, wait in zip(gaps, waits, strict=True)), gaps
        # the first token's exp passes: the engine (no leeway) would close 4003
        # had it not taken the new token
        await asyncio.sleep(max(0.0, first_exp[0] + 0.5 - time.time()))
        await jwt_engine.publish("tok.a", "k", 2)
        await eventually(lambda: client.topic("tok.a").get("k") == 2)
        assert client.conn_state == CONNECTED
        assert (client.counters.connects, client.counters.disconnects) == (1, 0)
        assert client.counters.last_close_code is None
        assert client.counters.token_failures == 4 and client.counters.token_refreshes == 2


async def test_a_provider_failing_past_expiry_reconnects_after_4003_and_recovers(
    jwt_engine: Engine,
) -> None:
    holder: list[Client] = []
    calls = 0
    failures_after_close = 0

    async def provider() -> str:
        nonlocal calls, failures_after_close
        calls += 1
        if calls == 1:
            return hs256(ttl_s=1.5)  # the first connection's token
        c = holder[0]
        if c.counters.last_close_code != 4003:
            raise RuntimeError("issuer down")  # until the engine closed 4003
        if failures_after_close == 0:  # once more, after the close
            failures_after_close = 1
            await jwt_engine.publish("tok.b", "k2", "missed")  # while it has no connection
            raise RuntimeError("still down")
        return hs256(ttl_s=60.0)

    await jwt_engine.publish("tok.b", "k1", "v1")
    await jwt_engine.publish("tok.b", "k2", "v1")
    client = connect(jwt_engine.url, token_provider=provider, policy=POLICY)
    holder.append(client)
    async with client:
        await client.subscribe(["tok.b"])
        stream = client.changes()
        await eventually(lambda: client.counters.connects == 2, timeout=10)
        change = await asyncio.wait_for(stream.__anext__(), 5 * TIMEOUT_FACTOR)
        assert (change.full, dict(change.items)) == (False, {"k2": "missed"})
        assert dict(client.topic("tok.b")) == {"k1": "v1", "k2": "missed"}
        assert client.counters.last_close_code == 4003
        assert client.counters.token_failures >= 2 and client.conn_state == CONNECTED


async def test_tokens_the_engine_refuses_back_off_like_any_close(jwt_engine: Engine) -> None:
    given: list[str] = []

    async def provider() -> str:
        bad = hs256(secret="not-the-engine-secret-0123456789abcdef", ttl_s=60)
        given.append(bad if len(given) < 3 else hs256(ttl_s=60))
        return given[-1]

    await jwt_engine.publish("tok.c", "k", 1)
    client = connect(jwt_engine.url, token_provider=provider, policy=POLICY)
    client._rng = _Ceiling()
    async with client:  # three 4001 closes, then connected: no Unauthorized raised
        await client.subscribe(["tok.c"])
        assert len(given) == 4 and client.counters.connects == 1
        assert client.counters.last_close_code == 4001
        # a new token after each 4001, then the backoff delay as after any close
        assert list(client.counters.retry_delays_ms) == [20, 40, 80]
        assert dict(client.topic("tok.c")) == {"k": 1}
