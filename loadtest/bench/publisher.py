"""The publisher process of `fanout bench`: POST /publish at U updates/s.

It reuses firstbench's keep-alive HTTP publisher and its clock-paced loop
(`_publish_for`: every batch interval it sends what is due by then, so a slow
request is made up for by a larger next batch); only the choice of keys
differs: the workload's sampler picks (topic, key) pairs. `data` is
`[seq, time.time_ns()]`, stamped per batch just before it is sent.
"""

from __future__ import annotations

import contextlib
import signal
import time
from multiprocessing.connection import Connection as Pipe

from loadtest.firstbench import _publish_for, _Publisher
from loadtest.workload import Workload, key_sampler

GRACE_S = 2.0  # a server that cannot keep up: stop publishing this long after the duration


class WorkloadPublisher(_Publisher):
    """Publishes the workload's keys; finals are {topic: {key: seq}}."""

    def __init__(
        self, admin: str, workload: Workload, seed: int, max_items: int, body: str
    ) -> None:
        super().__init__(admin, "", [], max_items, body)
        self.workload = workload
        self.sample = key_sampler(workload, seed)

    def post(self, n: int) -> bool:
        t = time.time_ns()
        seq = self.seq
        items = [
            {"topic": topic, "key": key, "data": [seq + i + 1, t]}
            for i, (topic, key) in enumerate(self.sample(n))
        ]
        self.seq = seq + n
        return self._send(items)

    def post_all_finals(self) -> dict[str, dict[str, int]]:
        """One last value for every key of every topic."""
        t = time.time_ns()
        finals: dict[str, dict[str, int]] = {}
        items = []
        for topic, key in self.workload.all_pairs():
            self.seq += 1
            finals.setdefault(topic, {})[key] = self.seq
            items.append({"topic": topic, "key": key, "data": [self.seq, t]})
        for i in range(0, len(items), self.max_items):
            if not self._send(items[i : i + self.max_items]):
                raise RuntimeError(f"publishing the final values failed: {dict(self.errors)}")
        return finals


def publisher_process(
    pipe: Pipe,
    admin: str,
    workload: Workload,
    seed: int,
    rate: float,
    duration_s: float,
    batch_ms: float,
    max_items: int,
    body: str,
    budget_s: float,
) -> None:
    """Waits for `go` (publish for the duration), `final` (every key once), `exit`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pub = WorkloadPublisher(admin, workload, seed, max_items, body)
    deadline = time.monotonic() + budget_s
    try:
        while time.monotonic() < deadline:
            if not pipe.poll(0.5):
                continue
            cmd = pipe.recv()
            if cmd[0] == "go":
                done = _publish_for(pub, pipe, rate, duration_s, batch_ms, grace_s=GRACE_S)
                pipe.send(("done", done))
                if done["exit"]:
                    return
            elif cmd[0] == "final":
                pipe.send(("finals", pub.post_all_finals()))
            elif cmd[0] == "exit":
                return
    except (EOFError, OSError):
        return
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", f"publisher: {type(exc).__name__}: {exc}"))
        raise
    finally:
        pub.close()


__all__ = ["WorkloadPublisher", "publisher_process"]
