"""GET /metrics of a real `fanout serve`, read by the tools Prometheus users run.

- Under a load, the counters add up to what clients saw (local bus).
- With traffic that touches every family (the Redis bus, refused upgrades and
  admin requests, err replies, closes), the scrape passes `promtool check
  metrics`, every family the engine's code declares is in it, and every metric
  the alert rules and the Grafana dashboard of deploy/kubernetes/monitoring
  read is there (tests/unit/test_monitoring.py reads the same names from code).

Every scrape is parsed by prometheus_client's text parser, not by regexes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from picows import WSMsgType
from prometheus_client.parser import text_string_to_metric_families

from engine.client.raw import RawConnection, connect
from tests.support.rawws import RawWS
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import Served
from tests.unit.test_monitoring import (
    DASHBOARD,
    RULES,
    exported,
    family_of,
    grafana_to_promql,
    metric_names,
    queries,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_text(served: Served) -> str:
    with urllib.request.urlopen(served.admin_url + "/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text: str = resp.read().decode()
    return text


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """(samples by (series name, labels), family name -> type), by Prometheus'
    own Python parser (a malformed line raises)."""
    samples: Samples = {}
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
            # the parser names a counter's family without _total: keep the exported name
            kinds[sample.name if family.type == "counter" else family.name] = family.type
    return samples, kinds


def scrape(served: Served) -> Samples:
    return parse(scrape_text(served))[0]


def per_worker(samples: dict[Any, float], name: str) -> dict[str, float]:
    return {dict(lbl)["worker"]: v for (n, lbl), v in samples.items() if n == name}


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(["--workers", "2"], log_path=str(tmp_path / "serve.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


async def test_metrics_add_up_to_what_clients_saw(served: Served) -> None:
    slot_of = {pid: str(slot) for slot, pid in served.worker_pids().items()}
    clients: list[tuple[str, RawConnection]] = []
    for _ in range(16):
        c = await connect(served.ws_url)
        hello = await c.recv()
        clients.append((slot_of[int(hello["conn"].split(".")[0], 16)], c))
        c.subscribe(["m.t"], id=1)
    received: Counter[str] = Counter()
    for i in range(30):
        items = [{"topic": "m.t", "key": f"k{j}", "data": i} for j in range(5)]
        assert served.post("/publish", {"items": items})[0] == 200
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)
    # every client reads all it got: items in snap and upd messages
    for slot, c in clients:
        for m in c.take_nowait():
            if m.get("op") in ("snap", "upd"):
                received[slot] += len(m["items"])
    # close some: three normally (1000), one with a text frame (the server closes 1003)
    for _, c in clients[:3]:
        c.close(1000)
    offender_slot, offender = clients[3]
    offender.send_bytes(b"{}", WSMsgType.TEXT)
    assert await offender.wait_closed() == 1003
    expected_closes: dict[tuple[str, str], int] = defaultdict(int)
    for slot, _ in clients[:3]:
        expected_closes[(slot, "1000")] += 1
    expected_closes[(offender_slot, "1003")] += 1
    open_per_slot = Counter(slot for slot, _ in clients[4:])

    # workers write their figures once a second: wait until the scrape shows them
    for _ in range(100):
        samples = scrape(served)
        delivered = per_worker(samples, "fanout_updates_delivered_total")
        conns = per_worker(samples, "fanout_connections")
        closes = {
            (dict(lbl)["worker"], dict(lbl)["code"]): v
            for (n, lbl), v in samples.items()
            if n == "fanout_disconnects_total"
        }
        if (
            all(delivered.get(s, 0) == n for s, n in received.items())
            and all(conns.get(s, 0) == n for s, n in open_per_slot.items())
            and all(closes.get(k, 0) == v for k, v in expected_closes.items())
        ):
            break
        await asyncio.sleep(0.1)
    assert {s: delivered.get(s, 0) for s in received} == dict(received)
    assert {s: conns.get(s, 0) for s in open_per_slot} == dict(open_per_slot)
    assert {k: closes.get(k, 0) for k in expected_closes} == dict(expected_closes)
    # per-process figures for every fanout process
    procs = {
        dict(lbl)["process"] for (n, lbl) in samples if n == "fanout_process_resident_memory_bytes"
    }
    assert {"supervisor", "hub", "admin", "worker 1", "worker 2"} <= procs
    assert samples[("fanout_http_published_total", frozenset())] == 150
    for _, c in clients[4:]:
        c.close()


def promtool_check_metrics(text: str) -> None:
    """`promtool check metrics`: the exposition format and Prometheus' naming
    lints (counters end in _total, units in base units, help text...)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (`make system-deps` installs it)")
    done = subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.fixture
def served_on_redis(tmp_path: Any) -> Iterator[Served]:
    if not redis_available():
        pytest.skip("redis-server is not installed (`make system-deps` installs it)")
    redis = RedisServer().start()
    env = {
        "FANOUT_BUS_BACKEND": "redis",
        "FANOUT_BUS_REDIS_URL": redis.url,
        "FANOUT_SERVER_ALLOWED_ORIGINS": json.dumps(["https://app.example"]),
        "FANOUT_REBALANCE_ENABLED": "true",  # its families too (alone: it sheds nothing)
    }
    s = Served(["--workers", "2"], env=env, log_path=str(tmp_path / "serve.log"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
        redis.close()


def post_raw(served: Served, path: str, body: bytes, content_type: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        served.admin_url + path, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


async def test_every_family_scraped_passes_promtool_and_feeds_rules_and_dashboard(
    served_on_redis: Served,
) -> None:
    served = served_on_redis
    # -- traffic that reaches every family ------------------------------------
    clients: list[RawConnection] = []
    for _ in range(6):  # both workers get some (the kernel spreads them)
        c = await connect(served.ws_url)
        assert (await c.recv())["op"] == "hello"
        c.subscribe(["m.t"], id=1)
        clients.append(c)
    for i in range(5):
        assert (
            served.post("/publish", {"items": [{"topic": "m.t", "key": "k", "data": i}]})[0] == 200
        )
    for c in clients:  # every client got the last value: the workers read the bus
        while True:
            m = await c.recv()
            if m.get("op") in ("snap", "upd") and m["items"].get("k") == 4:
                break
    clients[0].subscribe(["not a topic!"], id=2)  # err bad_topic
    assert (await clients[0].recv_op("err"))["code"] == "bad_topic"
    clients[1].close(1000)  # a disconnect by code
    refused = RawWS("127.0.0.1", served.port, headers={"Origin": "https://evil.example"})
    assert refused.status == 403  # fanout_upgrades_refused_total{reason="forbidden_origin"}
    refused.sock.close()
    status, body = post_raw(served, "/publish", b"t=1", "text/plain")
    assert status == 415, body  # fanout_admin_refused_total{reason="unsupported_media_type"}

    # -- workers write their figures once a second: wait for every family ---------
    declared = set(exported())
    for _ in range(100):
        text = scrape_text(served)
        samples, kinds = parse(text)
        refusals = {
            dict(lbl).get("reason"): v
            for (n, lbl), v in samples.items()
            if n == "fanout_upgrades_refused_total"
        }
        if set(kinds) >= declared and refusals.get("forbidden_origin") == 1:
            break
        await asyncio.sleep(0.1)
    assert set(kinds) == declared, (
        f"declared in engine/ but not scraped: {sorted(declared - set(kinds))};"
        f" scraped but not found in engine/: {sorted(set(kinds) - declared)}"
    )
    promtool_check_metrics(text)

    # -- what the hardening added, with the traffic's values -----------------------
    assert refusals == {"forbidden_origin": 1}
    admin_refused = {
        dict(lbl)["reason"]: v
        for (n, lbl), v in samples.items()
        if n == "fanout_admin_refused_total"
    }
    assert admin_refused.get("unsupported_media_type") == 1
    for family in ("fanout_bus_events_total", "fanout_admin_bus_events_total"):
        events = {dict(lbl)["event"] for (n, lbl) in samples if n == family}
        assert events >= {"task_restarts", "publish_timeouts", "oom_refusals"}, family
    errors = {dict(lbl)["code"]: v for (n, lbl), v in samples.items() if n == "fanout_errors_total"}
    assert errors.get("bad_topic") == 1
    assert sum(v for (n, lbl), v in samples.items() if n == "fanout_disconnects_total") == 1

    # -- every metric the rules and the dashboard read is in this real scrape -----
    histograms = [n for n, kind in kinds.items() if kind == "histogram"]
    read = {m for rule_group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in rule_group["rules"] for m in metric_names(rule["expr"])}  # fmt: skip
    board = json.loads(DASHBOARD.read_text())
    read |= {m for _, expr in queries(board) for m in metric_names(grafana_to_promql(expr))}
    missing = {m for m in read if family_of(m, histograms) not in kinds}
    assert not missing, f"rules or dashboard read metrics a real scrape lacks: {sorted(missing)}"
    for c in clients:
        c.close()
