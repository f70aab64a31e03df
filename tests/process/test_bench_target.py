"""`fanout bench --target` against a deployment the bench did not start: two
`fanout serve --bus redis` nodes on one redis-server, started here as a user
would, loaded by two generators run side by side (`--shard 1/2` and `--shard
2/2`, each subscribing on one node and publishing through the other's admin
API with the API key of `--api-key-env`), then `fanout bench merge` of their
reports. What a user sees: the merged report counts every client, every one
converged, its server figures come from the engine's /metrics, the API key is
printed nowhere, and the nodes are still running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
KEY = "bench-target-secret-4711"
SUBSCRIBERS = 40


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Served]]:
    redis = RedisServer().start()
    served: list[Served] = []
    try:
        for name in "ab":
            served.append(
                Served(
                    ["--workers", "1"],
                    env={
                        "FANOUT_BUS_BACKEND": "redis",
                        "FANOUT_BUS_REDIS_URL": redis.url,
                        "FANOUT_SERVER_NODE": name,
                        "FANOUT_API_KEY": KEY,
                    },
                    log_path=str(tmp_path / f"node-{name}.log"),
                )
            )
        for s in served:
            s.wait_ready()
        yield served
    finally:
        for s in served:
            s.stop()
        redis.close()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "bench", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env["BENCH_KEY"] = KEY  # the key reaches the bench only through --api-key-env
    return env


def test_two_shards_against_two_running_nodes_merge_into_every_client_converged(
    nodes: list[Served], tmp_path: Path
) -> None:
    a, b = nodes
    gens = []
    for i, (sub, pub) in enumerate([(b, a), (a, b)], 1):
        args = _cli(
            "--target", sub.ws_url, "--admin", pub.admin_url, "--metrics", sub.admin_url,
            "--api-key-env", "BENCH_KEY", "--shard", f"{i}/2",
            "-S", str(SUBSCRIBERS), "-U", "400", "-D", "2", "--sub-procs", "1",
            "--settle", "10", "--report-dir", str(tmp_path), "--name", f"shard{i}", "--quiet",
        )  # fmt: skip
        gens.append(
            subprocess.Popen(
                args,
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [g.communicate(timeout=120 * TIMEOUT_FACTOR) for g in gens]
    for g, (out, err) in zip(gens, outs, strict=True):
        assert g.returncode == 0, out[-2000:] + err[-3000:]
        assert KEY not in out + err
    shards: list[dict[str, Any]] = [
        json.loads((tmp_path / f"shard{i}.json").read_text()) for i in (1, 2)
    ]
    for i, rep in enumerate(shards, 1):
        r = rep["steps"][0]["results"]["fanout"]
        assert r["shard"] == f"{i}/2" and r["clients"] == SUBSCRIBERS // 2
        assert "/metrics" in r["server_measured_by"] and r["cpu"]["server_s"] > 0
        assert r["server_processes"] == {}  # the bench started no server
        assert KEY not in json.dumps(rep)

    merged_run = subprocess.run(
        _cli("merge", str(tmp_path / "shard1.json"), str(tmp_path / "shard2.json"),
             "--name", "merged", "--report-dir", str(tmp_path)),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert merged_run.returncode == 0, merged_run.stdout[-2000:] + merged_run.stderr[-2000:]
    merged = json.loads((tmp_path / "merged.json").read_text())
    r = merged["steps"][0]["results"]["fanout"]
    assert merged["all_converged"] is True
    assert r["clients"] == r["setup"]["ready"] == SUBSCRIBERS
    conv = r["convergence"]
    assert conv["all_converged"] and conv["all_snapshots_matched"]
    assert conv["probes"] + conv["snapshots"] == SUBSCRIBERS
    assert r["delivery"]["updates"] > 0 and r["latency_ms"]["samples"] > 0
    assert "merged" in r["latency_ms"]["method"]
    # both generators read both nodes' /metrics: the engine's CPU once, not twice
    assert r["cpu"]["server_merge"].startswith("max")
    assert r["cpu"]["server_s"] == max(
        s["steps"][0]["results"]["fanout"]["cpu"]["server_s"] for s in shards
    )
    assert "merged from the shards 1/2, 2/2" in (tmp_path / "merged.md").read_text()
    # the nodes were not the bench's to stop
    assert all(n.get("/readyz")[0] == 200 for n in nodes)


def test_a_key_the_engine_refuses_ends_the_run_before_it_starts_naming_the_variable(
    nodes: list[Served], tmp_path: Path
) -> None:
    env = {**_env(), "BENCH_KEY": "not-the-key"}
    result = subprocess.run(
        _cli("--target", nodes[0].ws_url, "--admin", nodes[0].admin_url,
             "--api-key-env", "BENCH_KEY", "-S", "4", "-U", "10", "-D", "1",
             "--report-dir", str(tmp_path), "--name", "refused", "--quiet"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60 * TIMEOUT_FACTOR,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    assert "401: $BENCH_KEY holds a key it refused" in result.stderr
    assert "not-the-key" not in result.stdout + result.stderr
    assert nodes[0].get("/readyz")[0] == 200
