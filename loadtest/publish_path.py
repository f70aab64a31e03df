"""Instructions per published update along the local bus' publish path, stage by stage.

    python -m loadtest.publish_path                   # every stage, this tree
    python -m loadtest.publish_path --root /tmp/old   # another checkout (before/after)
    python -m loadtest.publish_path --stage edge --batches 12   # one stage, run as is

The stages, with the engine's own functions on a batch of `--items` market-like
updates (`[seq, time_ns]` values over 50 topics), in one process, no socket:

- edge: the worker taking a WebSocket `pub` batch: `decode_request`, the
  `Update`s the connection's rules make of it (marked checked, as they are),
  the bus' `check_updates` and the hub request's encoding;
- hub: the hub's frame decoding and `parse_request`, `HubCore.publish`, the
  reply and the entry frame for the workers;
- apply: one worker taking that entry frame: decoding, `entries_of` and each
  topic's `TopicState.apply`.

With no `--stage`, each stage runs under `valgrind --tool=callgrind` twice
(2 and 2 + `--batches` batches) and the difference, divided by the items,
is printed: instruction counts do not depend on the machine's load, so they
compare two trees on a shared machine where CPU times cannot. Bounded: at
most 200 batches per run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence

MAX_BATCHES = 200
TOPICS = 50
STAGES = ("edge", "hub", "apply")


def stage(name: str, items: int) -> Callable[[], object]:
    """The function that runs stage `name` once on a batch of `items` updates."""
    import msgpack

    from engine.bus import limits, wire
    from engine.bus.base import Update
    from engine.bus.hubcore import HubCore
    from engine.fanout.state import TopicState
    from engine.protocol import codec

    try:
        from engine.bus.base import CheckedUpdates as checked
    except ImportError:  # a tree from before CheckedUpdates
        checked = tuple  # type: ignore[misc,assignment]
    body = [
        {"topic": f"market.t{i % TOPICS}", "key": f"k{i}", "data": [i, 1_765_000_000 * 10**9 + i]}
        for i in range(items)
    ]
    payload = msgpack.packb({"op": "pub", "id": 7, "items": body})

    def edge() -> bytes:
        req = codec.decode_request(payload, 100, items)
        updates = checked(Update(i.topic, i.key, i.data) for i in req.items)  # type: ignore[attr-defined]
        limits.check_updates(updates, 1 << 20)
        return wire.publish_request(1, updates)

    frame = edge()
    hub = HubCore(16, "epoch")

    def hub_side() -> bytes:
        request = wire.parse_request(wire.FrameReader().feed(frame)[0])
        entries = hub.publish(request.updates, 1000)  # type: ignore[union-attr]
        wire.published(1, [e[2] for e in entries])
        return wire.entry_frames(entries)[0]

    entry_frame = hub_side()
    states = {f"market.t{t}": TopicState(f"market.t{t}") for t in range(TOPICS)}

    def apply() -> None:
        for topic, key, pos, data in wire.entries_of(wire.FrameReader().feed(entry_frame)[0][1]):
            states[topic].apply(key, pos, data)

    return {"edge": edge, "hub": hub_side, "apply": apply}[name]


def instructions(root: str, name: str, batches: int, items: int) -> int:
    """Instructions callgrind counts for one run of a stage (process start included)."""
    env = {**os.environ, "PYTHONPATH": root}  # `engine` is imported from `root`
    # run by path: `-m` would put the working directory first on the path
    args = [sys.executable, os.path.abspath(__file__), "--stage", name]
    args += ["--batches", str(batches), "--items", str(items)]
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
        check=True,
    )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count from callgrind: {out.stderr[-500:]}")
    return int(m.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.publish_path", description=__doc__)
    p.add_argument("--stage", choices=STAGES, help="run this stage --batches times, as is")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--items", type=int, default=1000, help="updates per batch (max 1000)")
    p.add_argument("--root", default=None, help="the tree to measure (default: this one)")
    a = p.parse_args(argv)
    if not 0 < a.batches <= MAX_BATCHES or not 0 < a.items <= 1000:
        p.error(f"--batches in 1..{MAX_BATCHES}, --items in 1..1000")
    if a.stage:
        run = stage(a.stage, a.items)
        for _ in range(a.batches):
            run()
        return 0
    root = os.path.abspath(a.root or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"instructions per published update ({a.items}-item batches), tree {root}")
    total = 0.0
    for name in STAGES:
        base = instructions(root, name, 2, a.items)
        more = instructions(root, name, 2 + a.batches, a.items)
        per_item = (more - base) / (a.batches * a.items)
        total += per_item * (2 if name == "apply" else 1)
        print(f"  {name:5s} {per_item:10,.0f}")
    print(f"  total {total:10,.0f} (edge + hub + apply on 2 workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
