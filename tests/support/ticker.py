"""A steady feed for long client tests: publish a rising counter to a few keys
of one topic through the admin HTTP API, and say what was published last."""

from __future__ import annotations

import asyncio

from engine.client import Publisher


async def tick(
    admin_url: str, topic: str, keys: int, duration_s: float, interval_s: float = 0.05
) -> dict[str, int]:
    """Publish `n` to key `k{n % keys}` every `interval_s` for `duration_s`
    seconds (n = 1, 2, ...); returns each key's last published value."""
    last: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s
    n = 0
    async with Publisher(admin_url) as pub:
        while loop.time() < end:
            n += 1
            key = f"k{n % keys}"
            await pub.publish(topic, key, n)
            last[key] = n
            await asyncio.sleep(interval_s)
    return last
