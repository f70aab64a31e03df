"""Fill a small Redis with large values and count small publishes (issue 11, finding 4).

    python -m loadtest.redisfill [--maxmemory 20mb] [--in-flight 16] [--rounds 100]

Starts its own redis-server (`maxmemory`, `noeviction`) on a free loopback
port, connects a bus client with the defaults of config.toml, and for each
round publishes `--in-flight` 900 KB values at once to one topic (every key
new) followed by 20 small publishes, each to another topic; then 2,000 small
publishes after the fill. Prints how many of each succeeded and the errors
seen. Before the bus bounded what it stores, a merged batch of large values
pushed Redis over `maxmemory` and nothing published again (0 of 2,000 during
and after); see docs/kubernetes.md ("Sizing the Redis bus").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile

import msgpack

from engine.bus import Update, create_bus
from engine.config import default_config
from engine.errors import BusError
from loadtest.redis_server import RedisServer

BIG = msgpack.packb("x" * 900_000)
WAIT_S = 10.0


async def fill(maxmemory: str, in_flight: int, rounds: int) -> None:
    redis = RedisServer(extra=["--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"])
    redis.start()
    try:
        base = default_config()
        r = dataclasses.replace(base.bus.redis, url=redis.url)
        cfg = dataclasses.replace(base, bus=dataclasses.replace(base.bus, backend="redis", redis=r))
        bus = create_bus(cfg, tempfile.mkdtemp(prefix="fo-fill-"), want_entries=False)
        await bus.start(None)
        errors: dict[str, int] = {}

        async def publish(update: Update) -> bool:
            try:
                await asyncio.wait_for(bus.publish_wait([update]), WAIT_S)
                return True
            except (BusError, TimeoutError) as exc:
                what = f"{type(exc).__name__}: {str(exc)[:90]}"
                errors[what] = errors.get(what, 0) + 1
                return False

        big_ok = small_ok = small_n = 0
        for i in range(rounds):
            bigs = [publish(Update("big.blob", f"k{i}.{j}", BIG)) for j in range(in_flight)]
            big_ok += sum(await asyncio.gather(*bigs))
            for j in range(20):
                small_n += 1
                small_ok += await publish(Update(f"small.{j}", "k", msgpack.packb(i)))
        after_ok = 0
        for i in range(2000):
            after_ok += await publish(Update(f"after.{i % 50}", "k", msgpack.packb(i)))
        print(f"redis: {redis.command()}")
        print(f"large publishes accepted during the fill: {big_ok}/{rounds * in_flight}")
        print(f"small publishes to other topics DURING the fill: {small_ok}/{small_n}")
        print(f"small publishes AFTER the fill: {after_ok}/2000")
        for what, n in sorted(errors.items(), key=lambda kv: -kv[1])[:4]:
            print(f"  {n} x {what}")
        await bus.close()
    finally:
        redis.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maxmemory", default="20mb")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(fill(args.maxmemory, args.in_flight, args.rounds))


if __name__ == "__main__":
    main()
