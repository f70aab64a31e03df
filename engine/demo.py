"""The built-in demo feed for `fanout serve --demo`: a few hundred prices on a random walk.

Three state topics (`prices.fx`, `prices.crypto`, `prices.equities`), 300 keys
in all, about 400 updates per second in small batches, published through the
bus like any backend publisher. Each value is `{"px": float, "ts": ms}`; `ts`
is the publish time, so a watcher can show publish-to-receive latency.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time

import msgpack
import uvloop

from engine.bus import create_bus
from engine.bus.base import Update
from engine.config import Config
from engine.errors import BusError
from engine.logs import setup_logging

log = logging.getLogger("fanout.demo")

FX = [
    "EURUSD",
    "GBPUSD",
    "USDJPY",
    "USDCHF",
    "AUDUSD",
    "USDCAD",
    "NZDUSD",
    "EURGBP",
    "EURJPY",
    "GBPJPY",
    "EURCHF",
    "AUDJPY",
    "EURAUD",
    "EURCAD",
    "USDSEK",
    "USDNOK",
    "USDDKK",
    "USDPLN",
    "USDMXN",
    "USDZAR",
    "USDSGD",
    "USDHKD",
    "USDTRY",
    "USDCNH",
]
CRYPTO = [
    "BTC",
    "ETH",
    "SOL",
    "XRP",
    "ADA",
    "DOGE",
    "DOT",
    "AVAX",
    "LINK",
    "LTC",
    "MATIC",
    "ATOM",
    "XLM",
    "ALGO",
    "NEAR",
    "FIL",
    "APT",
    "ARB",
    "OP",
    "UNI",
]

UPDATES_PER_S = 400
BATCH_INTERVAL_S = 0.05


def demo_keys() -> dict[str, list[str]]:
    """Topic -> keys of the demo feed (300 keys in all)."""
    rng = random.Random(7)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    equities: set[str] = set()
    while len(equities) < 256:
        equities.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 4))))
    return {"prices.fx": FX, "prices.crypto": CRYPTO, "prices.equities": sorted(equities)}


DEMO_TOPICS = tuple(demo_keys())


class PriceWalk:
    """Random-walk prices; `ticks(n)` picks n keys (popular ones more often)."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)
        self.keys = [(t, k) for t, ks in demo_keys().items() for k in ks]
        self.px = {tk: round(self.rng.uniform(0.5, 500.0), 4) for tk in self.keys}
        # Zipf-like popularity: a few keys tick most of the time
        self.weights = [1.0 / (i + 1) ** 0.8 for i in range(len(self.keys))]

    def ticks(self, n: int, now_ms: int) -> list[Update]:
        out = []
        for tk in self.rng.choices(self.keys, self.weights, k=n):
            px = self.px[tk] * (1.0 + self.rng.gauss(0.0, 0.0008))
            self.px[tk] = px
            data = msgpack.packb({"px": round(px, 5), "ts": now_ms}, use_bin_type=True)
            out.append(Update(tk[0], tk[1], data))
        return out

    def everything(self, now_ms: int) -> list[Update]:
        return [
            Update(t, k, msgpack.packb({"px": round(self.px[(t, k)], 5), "ts": now_ms}))
            for t, k in self.keys
        ]


def run_demo(cfg: Config, run_dir: str) -> None:
    """Entry point of the demo-feed process (forked by the supervisor)."""
    setup_logging(cfg.log.level, cfg.log.format, "demo")
    uvloop.run(_main(cfg, run_dir))


async def _main(cfg: Config, run_dir: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(sig, stop.set)
    bus = create_bus(cfg, run_dir, want_entries=False)
    await bus.start(None)
    walk = PriceWalk()
    per_batch = max(1, round(UPDATES_PER_S * BATCH_INTERVAL_S))
    seeded = False
    failures = 0
    while not stop.is_set():
        now_ms = int(time.time() * 1000)
        batch = walk.ticks(per_batch, now_ms) if seeded else walk.everything(now_ms)
        try:
            await bus.publish_wait(batch)
            seeded = True
            failures = 0
        except BusError as exc:
            failures += 1
            if failures in (1, 100) or failures % 1000 == 0:
                log.warning("demo feed cannot publish (%s); retrying", exc)
        try:
            await asyncio.wait_for(stop.wait(), BATCH_INTERVAL_S)
        except TimeoutError:
            pass
    await bus.close()
