"""The Kubernetes pod's configuration, run for real: `fanout serve` with
deploy/kubernetes/base/config.toml and the environment deployment.yaml gives the
container (its Secret values stood in for), on a real redis-server.

What an operator would see after `kubectl apply -k`: the pod becomes ready with
the configured workers; the image's HEALTHCHECK command passes against it;
`POST /publish` needs the API key from the Secret; a client with a token signed
with the Secret's JWT key receives what was published; SIGTERM (what the kubelet
sends after preStop) tells the client `bye`, closes it with 1001 and exits 0
within `workers.graceful_timeout_s`.
Only the ports (free ones) and the admin address (loopback) differ from the pod.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from engine.client.raw import connect
from engine.config import parse_config
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import Served

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed"),
]

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes" / "base"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
API_KEY = "test-api-key"
REDIS_PASSWORD = "test-redis-password"


def pod_env(redis_url: str) -> dict[str, str]:
    """deployment.yaml's container environment, with stand-ins for the Secret's
    values (the Redis password is the test server's requirepass)."""
    [deployment] = yaml.safe_load_all((BASE / "deployment.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    stand_ins = {"jwt-secret": JWT_SECRET, "api-key": API_KEY, "redis-password": REDIS_PASSWORD}
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = stand_ins[var["valueFrom"]["secretKeyRef"]["key"]]
    assert env.pop("FANOUT_CONFIG") == "/etc/fanout/config.toml"
    env["FANOUT_CONFIG"] = str(BASE / "config.toml")  # what the ConfigMap mounts there
    env["FANOUT_SERVER_ADMIN_HOST"] = "127.0.0.1"  # a shared test machine, not a pod
    env["FANOUT_BUS_REDIS_URL"] = redis_url  # config.toml names the in-cluster Service
    return env


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Served]:
    redis = RedisServer(persistent=True, requirepass=REDIS_PASSWORD).start()
    served = Served([], env=pod_env(redis.url), log_path=str(tmp_path / "pod.log"))
    try:
        served.wait_ready()
        yield served
    finally:
        served.stop()
        redis.close()


def publish(pod: Served, body: dict[str, Any], key: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        pod.admin_url + "/publish", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:  # close the error response's socket
            return exc.code, json.loads(exc.read() or b"null")


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD (exec form), run with this interpreter."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK"))
    command: list[str] = json.loads(line[line.index("CMD") + 3 :])
    return [sys.executable, *command[1:]]


async def test_the_pod_config_serves_and_drains(pod: Served) -> None:
    cfg = parse_config(
        tomllib.loads((BASE / "config.toml").read_text()), {"FANOUT_JWT_SECRET": JWT_SECRET}
    )
    status, ready = pod.get("/readyz")
    assert status == 200 and ready["workers"] == cfg.workers.count

    health = subprocess.run(
        healthcheck_command(),
        env={"FANOUT_SERVER_ADMIN_PORT": str(pod.admin_port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert health.returncode == 0, health.stderr

    update = {"topic": "prices.fx", "key": "EURUSD", "data": {"px": 1.0842}}
    assert publish(pod, update, None)[0] == 401
    assert publish(pod, update, "wrong-key")[0] == 401
    status, answer = publish(pod, update, API_KEY)
    assert status == 200 and "pos" in answer

    claims = {"sub": "ops", "exp": int(time.time()) + 600, "sub_topics": ["prices.>"]}
    token = jwt.encode(claims, JWT_SECRET, "HS256")
    conn = await connect(pod.ws_url, extra_headers={"Authorization": f"Bearer {token}"})
    try:
        assert (await conn.recv())["op"] == "hello"
        conn.send({"op": "sub", "topics": ["prices.fx"], "id": 1})
        seen: dict[str, Any] = {}
        while "EURUSD" not in seen:
            msg = await conn.recv()
            assert msg["op"] in ("ack", "snap", "upd"), msg
            seen.update(msg.get("items", {}))
        assert seen["EURUSD"] == {"px": 1.0842}

        # What the kubelet sends after preStop: the client is told to go
        # (`bye`, then close 1001) and the engine exits 0 within its grace.
        pod.signal(signal.SIGTERM)
        wait_s = cfg.workers.graceful_timeout_s + 5
        while (msg := await conn.recv(timeout=wait_s))["op"] != "bye":
            assert msg["op"] in ("upd", "snap"), msg
        assert await conn.wait_closed(wait_s) == 1001
    finally:
        conn.close()
    assert pod.wait(wait_s) == 0, pod.output()
    assert REDIS_PASSWORD not in pod.output()  # AUTH worked, and was never logged
