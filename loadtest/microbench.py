"""Micro-benchmarks of the Python hot paths, with no sockets: the fan-out core's
cost per frame (apply + plan + deliver to a no-op writer) on the hot and market
workloads, and the load generator's cost per frame on market frames built by the
real core: `us_per_frame`, every client decoding (`CountingSink.feed`,
loadtest/client.py, `fanout bench --decode-all`); `probe_us_per_frame`, the
same for the probes alone (5% of the clients: fewer of their messages are
shared, so fewer are decoded once for several); `probe_2_procs_us_per_frame`,
the probes spread over two subscriber processes, as a run of 1,000 had them
before `probe_indices` put them in one (each process decodes what its own probes
get: fewer shared still); `counting_us_per_frame`, a
counting client (the listener's counting branch: no copy, no decoding);
`mixed_us_per_frame`, the default run's mix (5% probes, at least 50).

    .venv/bin/python -m loadtest.microbench            # all three, best of 5 rounds
    .venv/bin/python -m loadtest.microbench core-hot --rate 10000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python -m loadtest.microbench probe-rounds --rate 10000 --rounds 3
        # and --rounds 1: (Ir(3) - Ir(1)) / (2 x probe_frames_per_round) instructions
        # per probe frame, a figure that holds on a shared machine

Times are this process's CPU time (`time.process_time`: what a CPU shared with
other work takes from it while it waits does not count), best of the rounds.
They measure Python work only (the kernel's send and picows are not in them),
so they show what a change to engine/fanout/core.py or loadtest/client.py
saves per frame, with less noise than a full `fanout bench` run. Bounded: a
fixed number of ticks per round, 5 rounds.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import msgpack

from engine.fanout.core import Fanout, Session
from engine.protocol.codec import make_pos
from loadtest.client import CountingSink, listener_class
from loadtest.workload import HOT, MARKET, Workload, key_sampler

TICKS_PER_S = 50  # a 20 ms flush interval
ROUNDS = 5


class _Counter:
    """A Writer that accepts every frame and counts it (or keeps it)."""

    __slots__ = ("frames", "index", "keep")

    def __init__(self, index: int, keep: list[tuple[int, bytes]] | None = None) -> None:
        self.index = index
        self.keep = keep
        self.frames = 0

    def write(self, frame: bytes) -> bool:
        self.frames += 1
        if self.keep is not None:
            self.keep.append((self.index, frame))
        return True


def _core(
    workload: Workload, subscribers: int, rate: float, keep: list[tuple[int, bytes]] | None = None
) -> tuple[Callable[[], None], list[_Counter], list[tuple[str, ...]]]:
    """A core with `subscribers` sessions of the workload and a function running
    one second of it (`rate` updates spread over 50 flush ticks)."""
    fo = Fanout("e")
    subs = workload.subscriptions(subscribers, 1)
    writers = []
    for i, topics in enumerate(subs):
        w = _Counter(i, keep)
        s = Session(w, i)
        for t in topics:
            fo.subscribe(s, t, None, 1)
        writers.append(w)
    sample = key_sampler(workload, 1)
    per_tick = max(1, int(rate / TICKS_PER_S))
    ticks = [sample(per_tick) for _ in range(TICKS_PER_S)]
    seq = [0]

    def one_second() -> None:
        for batch in ticks:
            stamp = time.time_ns()
            for topic, key in batch:
                seq[0] += 1
                value = msgpack.packb([seq[0], stamp])
                fo.apply(topic, key, make_pos(1_700_000_000_000 + seq[0], 0), value)
            plan, shared = fo.plan()
            for sh in shared:
                fo.deliver_shared(sh)
            for session, deliveries in plan.items():
                fo.deliver(session, deliveries)

    return one_second, writers, subs


def bench_core(workload: Workload, subscribers: int, rate: float) -> dict[str, Any]:
    one_second, writers, _ = _core(workload, subscribers, rate)
    one_second()  # warm up: snaps' catch-ups, caches
    best = float("inf")
    frames = 0
    for _ in range(ROUNDS):
        before = sum(w.frames for w in writers)
        t0 = time.process_time()
        one_second()
        elapsed = time.process_time() - t0
        frames = sum(w.frames for w in writers) - before
        best = min(best, elapsed / max(1, frames) * 1e6)
    return {"frames_per_round": frames, "us_per_frame": round(best, 2)}


class _View:
    __slots__ = ("epochs", "order_keys", "positions", "ready", "snapped", "views")

    def __init__(self, topics: tuple[str, ...]) -> None:
        self.views: dict[str, dict[str, Any]] = {t: {} for t in topics}
        self.epochs: dict[str, Any] = {}
        self.positions: dict[str, Any] = {}
        self.order_keys: dict[str, tuple[int, int]] = {}
        self.snapped: set[str] = set()
        self.ready = False


class _Frame:
    """What the listener reads of a picows frame (a counting client reads its size)."""

    __slots__ = ("fin", "msg_type", "payload")

    def __init__(self, msg_type: Any, payload: bytes) -> None:
        self.msg_type, self.fin, self.payload = msg_type, True, payload

    @property
    def payload_size(self) -> int:
        return len(self.payload)

    def get_payload_as_bytes(self) -> bytes:
        return self.payload


def _decoding_us(
    frames: list[tuple[int, bytes]], subs: list[tuple[str, ...]], procs: int = 1
) -> float:
    """Best µs per frame of `CountingSink.feed` over `frames` (each to its client), the
    clients spread over `procs` sinks (a subscriber process each: each decodes its own)."""
    clients = {i: _View(subs[i]) for i, _ in frames}
    proc_of = {i: k % procs for k, i in enumerate(sorted(clients))}
    best = float("inf")
    for _ in range(ROUNDS):
        sinks = [CountingSink() for _ in range(procs)]
        for st in sinks:
            st.measuring = True
        work = [(sinks[proc_of[i]].feed, clients[i], frame) for i, frame in frames]
        t0 = time.process_time()
        for feed, client, frame in work:
            feed(client, frame)
        best = min(best, (time.process_time() - t0) / max(1, len(frames)) * 1e6)
    return best


def _counting_us(frames: list[tuple[int, bytes]], subs: list[tuple[str, ...]]) -> float:
    """Best µs per frame of a counting client's `on_ws_frame` (client.py rule 6)."""
    from picows import WSMsgType

    cls = listener_class()
    clients = {i: cls(CountingSink(), subs[i]) for i, _ in frames}
    for c in clients.values():
        c.count()
    wrapped = [(clients[i], _Frame(WSMsgType.BINARY, f)) for i, f in frames]
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.process_time()
        for c, frame in wrapped:
            c.on_ws_frame(None, frame)
        best = min(best, (time.process_time() - t0) / max(1, len(frames)) * 1e6)
    return best


def bench_generator(subscribers: int, rate: float) -> dict[str, Any]:
    frames: list[tuple[int, bytes]] = []
    one_second, _, subs = _core(MARKET, subscribers, rate, keep=frames)
    one_second()
    n_probes = min(subscribers, max(50, math.ceil(0.05 * subscribers)))
    probes = {j * subscribers // n_probes for j in range(n_probes)}
    probe_frames = [(i, f) for i, f in frames if i in probes]
    every = _decoding_us(frames, subs)
    probe = _decoding_us(probe_frames, subs)
    probe_2 = _decoding_us(probe_frames, subs, 2)
    counting = _counting_us(frames, subs)
    share = len(probe_frames) / len(frames)
    size = sum(len(f) for _, f in frames) / len(frames)
    return {
        "frames_per_round": len(frames),
        "bytes_per_frame": round(size),
        "us_per_frame": round(every, 2),
        "probe_us_per_frame": round(probe, 2),
        "probe_2_procs_us_per_frame": round(probe_2, 2),
        "counting_us_per_frame": round(counting, 2),
        "mixed_us_per_frame": round(share * probe + (1 - share) * counting, 2),
    }


def probe_rounds(subscribers: int, rate: float, rounds: int) -> dict[str, Any]:
    """The probes' frames fed `rounds` times (two subscriber processes, a fresh sink
    and views each round), untimed: for an instruction count, run it under callgrind
    with two values of --rounds and divide the difference by the frames between."""
    frames: list[tuple[int, bytes]] = []
    one_second, _, subs = _core(MARKET, subscribers, rate, keep=frames)
    one_second()
    n_probes = min(subscribers, max(50, math.ceil(0.05 * subscribers)))
    probes = sorted({j * subscribers // n_probes for j in range(n_probes)})
    proc_of = {i: k % 2 for k, i in enumerate(probes)}
    probe_frames = [(i, f) for i, f in frames if i in proc_of]
    for _ in range(rounds):
        clients = {i: _View(subs[i]) for i in proc_of}
        sinks = (CountingSink(), CountingSink())
        for i, frame in probe_frames:
            sinks[proc_of[i]].feed(clients[i], frame)
    return {"probe_frames_per_round": len(probe_frames), "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.microbench",
        description="Python cost per frame of the fan-out core and of the load "
        "generator, without sockets (best of 5 rounds of one simulated second).",
    )
    p.add_argument(
        "which",
        nargs="*",
        help="core-hot, core-market, generator (default: these three) and/or probe-rounds",
    )
    p.add_argument("-S", "--subscribers", type=int, default=1000, help="sessions (1000)")
    p.add_argument("--rate", type=float, default=0.0, help="updates/s (hot 10000, market 20000)")
    p.add_argument("--rounds", type=int, default=1, help="probe-rounds: rounds to run (1)")
    a = p.parse_args(argv)
    known = ["core-hot", "core-market", "generator", "probe-rounds"]
    which = a.which or known[:3]
    for name in which:
        if name not in known:
            p.error(f"unknown benchmark {name!r}: choose from {', '.join(known)}")
    for name in which:
        if name == "core-hot":
            rate = a.rate or 10000
            r = bench_core(HOT, a.subscribers, rate)
        elif name == "core-market":
            rate = a.rate or 20000
            r = bench_core(MARKET, a.subscribers, rate)
        elif name == "probe-rounds":
            rate = a.rate or 20000
            r = probe_rounds(a.subscribers, rate, max(0, a.rounds))
        else:
            rate = a.rate or 20000
            r = bench_generator(a.subscribers, rate)
        print(f"{name:12} {a.subscribers} subscribers, {rate:,.0f} updates/s: {r}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
