"""Log output: repeated warnings are rate-limited, and say how many were dropped."""

from __future__ import annotations

import io
import json
import logging

from engine.logs import JsonFormatter, RepeatFilter, RepeatLimiter


def test_limiter_admits_a_burst_per_window_then_reports_what_it_dropped() -> None:
    lim = RepeatLimiter(burst=3, window_s=10.0)
    assert [lim.admit("k", 0.0 + i * 0.1) for i in range(5)] == [0, 0, 0, None, None]
    assert lim.admit("other", 0.5) == 0  # keys are independent
    assert lim.admit("k", 9.9) is None
    # a new window: the first admitted event carries the count dropped before it
    assert lim.admit("k", 10.0) == 3
    assert lim.admit("k", 10.1) == 0


def test_limiter_memory_is_bounded_by_max_keys() -> None:
    lim = RepeatLimiter(burst=1, window_s=10.0, max_keys=4)
    for i in range(100):
        assert lim.admit(i, 0.0) == 0
    assert len(lim._state) == 4
    assert lim.admit(99, 0.1) is None  # the newest keys are still tracked


def _logger(stream: io.StringIO) -> logging.Logger:
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    handler.addFilter(RepeatFilter(RepeatLimiter(burst=2, window_s=3600.0)))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    return log


def test_a_repeated_warning_is_logged_a_few_times_only_and_others_pass() -> None:
    out = io.StringIO()
    log = _logger(out)
    for i in range(50):
        log.warning("bus: lost Redis; reconnecting (attempt %d)", i)
        log.debug("debug lines are not limited %d", i)
    log.error("a different error")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    warnings = [x for x in lines if x["level"] == "warning"]
    assert [x["msg"] for x in warnings] == [
        "bus: lost Redis; reconnecting (attempt 0)",
        "bus: lost Redis; reconnecting (attempt 1)",
    ]
    assert sum(x["level"] == "debug" for x in lines) == 50
    assert [x["msg"] for x in lines if x["level"] == "error"] == ["a different error"]


def test_the_next_admitted_record_says_how_many_were_dropped() -> None:
    out = io.StringIO()
    log = _logger(out)
    filt = log.handlers[0].filters[0]
    assert isinstance(filt, RepeatFilter)
    filt.limiter.window_s = 0.0  # every record opens a new window ...
    filt.limiter.burst = 1
    log.warning("x %d", 1)
    filt.limiter.window_s = 3600.0  # ... then none does
    log.warning("x %d", 2)
    log.warning("x %d", 3)
    filt.limiter.window_s = 0.0
    log.warning("x %d", 4)
    msgs = [json.loads(x)["msg"] for x in out.getvalue().splitlines()]
    assert msgs == ["x 1", "x 4 (and 2 more like it, not logged)"]
