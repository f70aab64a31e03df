"""The embedded bus and the publish API under a real `fanout serve`: malformed
publishes lose nothing else, and a hub crash gives every client a full snapshot
in the new epoch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from engine.client.raw import connect
from tests.support.serve import Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def served(tmp_path: Any) -> Iterator[Served]:
    s = Served(
        ["--workers", "2"],
        env={
            "FANOUT_WORKERS_RESTART_BACKOFF_MIN_MS": "50",
            "FANOUT_WORKERS_RESTART_BACKOFF_MAX_MS": "200",
        },
        log_path=str(tmp_path / "serve.log"),
    )
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def post_raw(served: Served, body: bytes, content_type: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        served.admin_url + "/publish",
        data=body,
        method="POST",
        headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:  # close the error response's socket
            return exc.code, json.loads(exc.read())


BAD_BODIES = [
    (b"{not json", "application/json", 400, "bad_request"),
    (b'{"topic": "pub.t", "key": "k"}', "application/json", 400, "bad_request"),  # no data
    (b'{"topic": "pub t", "key": "k", "data": 1}', "application/json", 400, "bad_topic"),
    (b'{"topic": "pub.t", "key": "", "data": 1}', "application/json", 400, "bad_request"),
    (b'{"items": []}', "application/json", 400, "bad_request"),
    (
        b'{"items": [{"topic": "pub.t", "key": "a", "data": 1}, {"topic": "pub.t", "data": 2}]}',
        "application/json",
        400,
        "bad_request",
    ),
    (b"\xc1", "application/msgpack", 400, "bad_request"),
    (b"[1, 2]", "application/json", 400, "bad_request"),
    (b"topic=pub.t", "application/x-www-form-urlencoded", 415, None),
]


async def test_malformed_publishes_get_json_errors_and_lose_nothing_else(served: Served) -> None:
    sub = await connect(served.ws_url)
    await sub.recv()
    sub.subscribe(["pub.t"], id=1)
    await sub.recv()
    await sub.recv()
    for body, ctype, status, code in BAD_BODIES:
        got_status, answer = await asyncio.to_thread(post_raw, served, body, ctype)
        assert got_status == status, (body, answer)
        assert isinstance(answer, dict) and answer.get("message")
        if code:
            assert answer["error"] == code
        # after every bad request the subscriber still gets a good update, and
        # nothing of the refused batch (key "a") was published
        value = f"ok-{len(body)}"
        assert served.post("/publish", {"topic": "pub.t", "key": "good", "data": value})[0] == 200
        upd = await sub.recv_op("upd")
        assert upd["items"] == {"good": value}
    again = await connect(served.ws_url)
    await again.recv()
    again.subscribe(["pub.t"], id=2)
    await again.recv()
    snap = await again.recv()
    assert set(snap["items"]) == {"good"}
    sub.close()
    again.close()


async def test_hub_crash_gives_clients_a_full_snapshot_in_a_new_epoch(served: Served) -> None:
    assert served.post("/publish", {"topic": "hub.t", "key": "k", "data": 1})[0] == 200
    sub = await connect(served.ws_url)
    await sub.recv()
    sub.subscribe(["hub.t"], id=1)
    await sub.recv()
    snap = await sub.recv()
    assert snap["items"] == {"k": 1}
    _, stats = served.get("/stats")
    hub_pid = _hub_pid(served)
    os.kill(hub_pid, signal.SIGKILL)
    # the respawned hub has a new epoch and no state: the client is told so
    fresh = await sub.recv_op("snap", timeout=30)
    assert fresh["epoch"] != snap["epoch"] and fresh["full"] is True and fresh["items"] == {}
    # and the feed works again
    for _ in range(100):
        if served.post("/publish", {"topic": "hub.t", "key": "k", "data": 2})[0] == 200:
            break
        await asyncio.sleep(0.1)
    upd = await sub.recv_op("upd")
    assert upd["items"] == {"k": 2}
    sub.close()
    assert stats["bus"]["backend"] == "local"


def _hub_pid(served: Served) -> int:
    return served.supervisor_status().aux["hub"]
