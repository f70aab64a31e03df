"""A ramp for the locust users: add it to `-f` (`-f loadtest/locustfile.py,loadtest/locust_ramp.py`).

Stages come from LOCUST_STAGES, "seconds:users:spawn_rate" separated by commas,
each `seconds` counted from the start of the test (default: 20 s at 51 users, then
100 at 101, then 100 at 201, then stop). The publisher is one of the users
(`fixed_count = 1`). The test stops after the last stage.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def parse_stages(text: str) -> list[tuple[float, int, float]]:
    stages = []
    for part in text.split(","):
        seconds, users, rate = part.strip().split(":")
        stages.append((float(seconds), int(users), float(rate)))
    return sorted(stages)


class RampShape(LoadTestShape):
    """Step through LOCUST_STAGES; None (stop) after the last one."""

    stages = parse_stages(os.environ.get("LOCUST_STAGES", "20:51:25,40:101:25,60:201:50"))

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        for until, users, rate in self.stages:
            if t < until:
                return users, rate
        return None
