"""The Python client keeps its token fresh on a live connection, against a real
`fanout serve` with JWT auth and no clock leeway (`auth.leeway_s = 0`: the
engine closes a connection 4003 the moment its token's `exp` passes).

For 30 seconds, with 3-second tokens from a provider and updates published
all along: one connection (no reconnect, no 4003, a single full snapshot),
a fresh token sent in `auth` every 2 seconds, and the client's final view
equal to what was published last. A client holding a static 3-second token
on the same engine is closed 4003: the engine does expire tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client import CONNECTED, UNAUTHORIZED, Change, ReconnectPolicy, connect
from tests.support.serve import TIMEOUT_FACTOR, Served
from tests.support.ticker import tick
from tests.support.tokens import SECRET, hs256

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RUN_S = 30.0
TTL_S = 3.0


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "1"],
        env={
            "FANOUT_AUTH_MODE": "jwt",
            "FANOUT_AUTH_LEEWAY_S": "0",
            "FANOUT_JWT_SECRET": SECRET,
            "FANOUT_FANOUT_FLUSH_INTERVAL_MS": "10",
        },
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def test_3_second_tokens_for_30_seconds_no_reconnect_no_missed_update(
    served: Served,
) -> None:
    provided = 0

    async def provider() -> str:
        nonlocal provided
        provided += 1
        return hs256(ttl_s=TTL_S)

    seen: dict[str, list[int]] = {}

    def record(change: Change) -> None:
        for key, value in change.items.items():
            seen.setdefault(key, []).append(value)

    await asyncio.to_thread(served.post, "/publish", {"topic": "live.t", "key": "k0", "data": 0})
    policy = ReconnectPolicy(base_ms=50, max_ms=500)
    static = connect(served.ws_url, token=hs256(ttl_s=TTL_S), policy=policy)
    async with connect(served.ws_url, token_provider=provider, policy=policy) as client:
        client.on_change(record)
        await client.subscribe(["live.t"])
        async with static:
            await static.subscribe(["live.t"])
            last = await tick(served.admin_url, "live.t", keys=5, duration_s=RUN_S)
            # the static token ended long ago: closed 4003, waiting for set_token
            assert static.conn_state == UNAUTHORIZED
            assert static.counters.last_close_code == 4003
        deadline = asyncio.get_running_loop().time() + 5 * TIMEOUT_FACTOR
        while dict(client.topic("live.t")) != last:
            assert asyncio.get_running_loop().time() < deadline, (
                dict(client.topic("live.t")),
                last,
            )
            await asyncio.sleep(0.05)
        c = client.counters
        assert client.conn_state == CONNECTED
        assert (c.connects, c.disconnects, c.connect_failures) == (1, 0, 0)
        assert c.last_close_code is None and list(c.retry_delays_ms) == []
        assert (c.snaps_full, c.snaps_partial) == (1, 0)
        # a new token about every 2 s (1 s before each 3-s token's exp), none failed
        assert c.token_failures == 0 and c.token_auths >= RUN_S / 2 - 3
        assert provided == c.token_refreshes == c.token_auths + 1
        # every key only moved forward, to the value published last
        for key, values in seen.items():
            assert values == sorted(values), key
            assert values[-1] == last.get(key, 0)
