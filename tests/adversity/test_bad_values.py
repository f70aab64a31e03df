"""Bad values on every ingest path (issue 11, findings 3 and 7), against a real
one-worker `fanout serve`, once on the local bus and once on the Redis bus.

Finding 3: a lone surrogate (`"\\ud800"`, what JavaScript's `JSON.stringify`
emits for half an emoji) in a JSON `key` passed validation and killed the
Redis publish task: every later publish hung. The same string can hide in
`data` (a nested string, a map key), and a msgpack body or a WebSocket `pub`
can carry bytes that are not UTF-8 at all. Finding 7: `data` nested ~1,000
deep was accepted, and fanout.js (which stops at 64) closed 1002 and
reconnected forever.

What a user sees is asserted: each bad publish gets a 400 with a JSON body
naming the field (or `err bad_request` over the WebSocket, the connection kept
open), nothing of it is published, good publishes still succeed afterwards on
every path, and an honest subscriber on the same worker keeps receiving.

The last test feeds undecodable values straight into the bus (as a value
stored before this check existed would be) and shows that the Python client
reports each as an error and keeps its connection instead of reconnecting.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest

from engine.bus.base import Update
from engine.bus.hub import serve_hub
from engine.client import connect as client_connect
from engine.client.raw import RawConnection, connect
from engine.config import Config, default_config
from engine.protocol.codec import MAX_DATA_DEPTH, Undecodable
from tests.support.redis_server import RedisServer, redis_available
from tests.support.serve import TIMEOUT_FACTOR, Served

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HONEST = "watch.me"
TARGET = "t"
WAIT_S = 10.0 * TIMEOUT_FACTOR
BAD_UTF8 = b"\xed\xa0\x80"  # U+D800 encoded as if it were a character: not UTF-8


def nested(depth: int, leaf: Any = 1) -> Any:
    """`leaf` inside `depth` arrays: depth 0 is the leaf itself."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def msgpack_with(template: dict[str, Any], marker: str, raw: bytes) -> bytes:
    """`template` packed, with the str `marker` replaced by a str of the bytes `raw`."""
    packed = msgpack.packb(template, use_bin_type=True)
    old = msgpack.packb(marker)
    assert packed.count(old) == 1 and len(raw) < 32
    return packed.replace(old, bytes([0xA0 | len(raw)]) + raw)


# -- the server ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["local", "redis"])
def served(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Served]:
    env = {
        "FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "true",  # the WebSocket `pub` path
        "FANOUT_FANOUT_FLUSH_INTERVAL_MS": "5",
    }
    redis = None
    if request.param == "redis":
        if not redis_available():
            pytest.skip("redis-server is not installed")
        redis = RedisServer(persistent=False).start()
        env.update({"FANOUT_BUS_BACKEND": "redis", "FANOUT_BUS_REDIS_URL": redis.url})
    log = tmp_path_factory.mktemp(f"bad-values-{request.param}") / "serve.log"
    s = Served(["--workers", "1"], env=env, log_path=str(log))  # one worker: all share it
    try:
        s.wait_ready()
        yield s
        assert "Traceback" not in s.output(), s.output()
    finally:
        s.stop()
        if redis is not None:
            redis.close()


def post(served: Served, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    """POST /publish with exactly `body`; a hung publish fails on the socket timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", served.admin_port, timeout=WAIT_S)
    try:
        conn.request("POST", "/publish", body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(data)
    finally:
        conn.close()


class Feed:
    """A subscriber's view of state topics, from its snap and upd messages."""

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn
        self.state: dict[str, dict[str, Any]] = {}

    async def until(self, topic: str, key: str, value: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while self.state.get(topic, {}).get(key) != value:
            msg = await self.conn.recv(max(0.01, deadline - loop.time()))
            if msg.get("op") in ("snap", "upd"):
                view = self.state.setdefault(msg["topic"], {})
                if msg.get("full"):
                    view.clear()
                for k, v in msg["items"].items():
                    if v is None:
                        view.pop(k, None)
                    else:
                        view[k] = v


@pytest.fixture
async def honest(served: Served) -> AsyncIterator[Feed]:
    conn = await connect(served.ws_url)
    try:
        assert (await conn.recv())["op"] == "hello"
        conn.subscribe([HONEST, TARGET], id=1)
        assert (await conn.recv())["op"] == "ack"
        assert [(await conn.recv())["op"] for _ in range(2)] == ["snap", "snap"]
        yield Feed(conn)
    finally:
        conn.close()


class Tick:
    """Good publishes on every path, each checked at the honest subscriber."""

    def __init__(self, served: Served, feed: Feed) -> None:
        self.served = served
        self.feed = feed
        self.n = 0

    async def all_paths(self, pub: RawConnection) -> None:
        self.n += 1
        status, body = await asyncio.to_thread(
            post, self.served, json.dumps({"topic": HONEST, "key": "json", "data": self.n}).encode()
        )
        assert status == 200 and "pos" in body, body
        packed = msgpack.packb({"topic": HONEST, "key": "msgpack", "data": self.n})
        status, body = await asyncio.to_thread(post, self.served, packed, "application/msgpack")
        assert status == 200 and "pos" in body, body
        pub.send({"op": "pub", "topic": HONEST, "key": "ws", "data": self.n, "id": 10_000 + self.n})
        ack = await pub.recv_op("ack", WAIT_S)
        assert ack["id"] == 10_000 + self.n and "pos" in ack
        for key in ("json", "msgpack", "ws"):
            await self.feed.until(HONEST, key, self.n)


@pytest.fixture
async def publisher(served: Served) -> AsyncIterator[RawConnection]:
    conn = await connect(served.ws_url)
    try:
        assert (await conn.recv())["op"] == "hello"
        yield conn
    finally:
        conn.close()


# -- finding 3: strings that are not UTF-8 -----------------------------------------------

JSON_BAD = [
    # (body, the field the 400 must name)
    (b'{"topic":"t","key":"\\ud800","data":1}', "'key'"),  # the request
    (b'{"topic":"t","key":"k","data":{"a":["x\\udc00"]}}', "'data'"),
    (b'{"topic":"t","key":"k","data":{"\\ud83d":1}}', "'data'"),  # a map key
    (
        b'{"items":[{"topic":"t","key":"first","data":1},{"topic":"t","key":"\\udfff","data":2}]}',
        "'items[1].key'",
    ),
]

MSGPACK_BAD = [
    (msgpack_with({"topic": "t", "key": "KEY", "data": 1}, "KEY", BAD_UTF8), "'key'"),
    (msgpack_with({"topic": "t", "key": "k", "data": {"a": ["S"]}}, "S", BAD_UTF8), "'data'"),
    (msgpack_with({"topic": "t", "key": "k", "data": {"MK": 1}}, "MK", BAD_UTF8), "'data'"),
    (
        msgpack_with(
            {
                "items": [
                    {"topic": "t", "key": "first", "data": 1},
                    {"topic": "t", "key": "K2", "data": 2},
                ]
            },
            "K2",
            BAD_UTF8,
        ),
        "'items[1].key'",
    ),
]


async def test_strings_that_are_not_utf8_are_refused_on_every_path_and_publishing_goes_on(
    served: Served, honest: Feed, publisher: RawConnection
) -> None:
    tick = Tick(served, honest)
    await tick.all_paths(publisher)
    for body, field in JSON_BAD:
        status, answer = await asyncio.to_thread(post, served, body)
        assert status == 400, (body, answer)
        assert answer["error"] == "bad_request" and field in answer["message"], answer
        assert "UTF-8" in answer["message"], answer
        await tick.all_paths(publisher)
    for body, field in MSGPACK_BAD:
        status, answer = await asyncio.to_thread(post, served, body, "application/msgpack")
        assert status == 400, (body, answer)
        assert answer["error"] == "bad_request" and field in answer["message"], answer
        assert "UTF-8" in answer["message"], answer
        await tick.all_paths(publisher)
    # the WebSocket `pub`: the key, a nested string, a map key
    ws_bad = [
        (
            msgpack_with(
                {"op": "pub", "topic": "t", "key": "KEY", "data": 1, "id": 1}, "KEY", BAD_UTF8
            ),
            "'key'",
        ),
        (
            msgpack_with(
                {"op": "pub", "topic": "t", "key": "k", "data": ["S"], "id": 2}, "S", BAD_UTF8
            ),
            "'data'",
        ),
        (
            msgpack_with(
                {"op": "pub", "topic": "t", "key": "k", "data": {"MK": 0}, "id": 3}, "MK", BAD_UTF8
            ),
            "'data'",
        ),
    ]
    for frame, field in ws_bad:
        publisher.send_bytes(frame)
        err = await publisher.recv_op("err", WAIT_S)
        assert err["code"] == "bad_request" and field in err["msg"] and "UTF-8" in err["msg"], err
        await tick.all_paths(publisher)  # the same connection still publishes
    # all or nothing: the batches' good first items were not published either
    status, _ = await asyncio.to_thread(
        post, served, json.dumps({"topic": TARGET, "key": "after", "data": 1}).encode()
    )
    assert status == 200
    await honest.until(TARGET, "after", 1)
    assert set(honest.state[TARGET]) == {"after"}, honest.state[TARGET]
    assert (await asyncio.to_thread(served.get, "/readyz"))[0] == 200


# -- finding 7: one nesting limit -----------------------------------------------------------


async def test_data_nested_past_the_limit_is_refused_on_every_path_and_the_limit_itself_passes(
    served: Served, honest: Feed, publisher: RawConnection
) -> None:
    tick = Tick(served, honest)
    too_deep = nested(MAX_DATA_DEPTH + 1)
    refusals = [
        (
            json.dumps({"topic": TARGET, "key": "deep", "data": too_deep}).encode(),
            "application/json",
        ),
        (msgpack.packb({"topic": TARGET, "key": "deep", "data": too_deep}), "application/msgpack"),
        (
            json.dumps(
                {"topic": TARGET, "key": "deep", "data": {"a": nested(MAX_DATA_DEPTH, {})}}
            ).encode(),
            "application/json",
        ),
        (
            msgpack.packb({"topic": TARGET, "key": "deep", "data": nested(1000)}),
            "application/msgpack",
        ),
    ]
    for body, ctype in refusals:
        status, answer = await asyncio.to_thread(post, served, body, ctype)
        assert status == 400, answer
        assert answer["error"] == "bad_request" and "'data'" in answer["message"], answer
        assert str(MAX_DATA_DEPTH) in answer["message"], answer
        await tick.all_paths(publisher)
    for depth in (MAX_DATA_DEPTH + 1, 1000):
        publisher.send(
            {"op": "pub", "topic": TARGET, "key": "deep", "data": nested(depth), "id": 7}
        )
        err = await publisher.recv_op("err", WAIT_S)
        assert err["code"] == "bad_request" and err["id"] == 7, err
        assert "'data'" in err["msg"] and str(MAX_DATA_DEPTH) in err["msg"], err
        await tick.all_paths(publisher)
    # at the limit: accepted on every path and delivered intact
    at_limit = nested(MAX_DATA_DEPTH, "leaf")
    body = json.dumps({"topic": TARGET, "key": "json", "data": at_limit}).encode()
    assert (await asyncio.to_thread(post, served, body))[0] == 200
    body = msgpack.packb({"topic": TARGET, "key": "msgpack", "data": at_limit})
    assert (await asyncio.to_thread(post, served, body, "application/msgpack"))[0] == 200
    publisher.send({"op": "pub", "topic": TARGET, "key": "ws", "data": at_limit, "id": 8})
    assert "pos" in await publisher.recv_op("ack", WAIT_S)
    for key in ("json", "msgpack", "ws"):
        await honest.until(TARGET, key, at_limit)
    assert "deep" not in honest.state[TARGET]
    await tick.all_paths(publisher)


# -- a client that meets a value it cannot decode --------------------------------------------


@pytest.fixture
async def engine(tmp_path: Any) -> AsyncIterator[tuple[Any, str, Config, str]]:
    """A hub and one worker in this process (the test writes into the bus
    directly, as a value stored before the checks would arrive), and the
    worker's URL."""
    import dataclasses

    from workers.main import serve_worker

    cfg = default_config()
    cfg = dataclasses.replace(
        cfg,
        server=dataclasses.replace(cfg.server, host="127.0.0.1", port=0, admin_port=0),
        fanout=dataclasses.replace(cfg.fanout, flush_interval_ms=5),
    )
    run_dir = str(tmp_path)
    hub = await serve_hub(cfg, run_dir)
    worker = await serve_worker(cfg, run_dir)
    try:
        yield worker, f"ws://127.0.0.1:{worker.port}{cfg.server.path}", cfg, run_dir
    finally:
        await worker.close()
        await worker.bus.close()
        await hub.close()


async def test_the_python_client_reports_a_value_it_cannot_decode_and_stays_connected(
    engine: tuple[Any, str, Config, str],
) -> None:
    worker, url, _, _ = engine

    async def put(key: str, data: bytes) -> None:
        await worker.bus.publish_wait([Update(TARGET, key, data)])

    await put("good", msgpack.packb(1))
    await put("deep", msgpack.packb(nested(MAX_DATA_DEPTH + 1)))  # in the snapshot
    errors: list[Any] = []
    async with client_connect(url) as client:
        client.on_error(errors.append)
        changes = client.changes()
        await client.subscribe([TARGET])
        view = client.topic(TARGET)
        assert view["good"] == 1 and isinstance(view["deep"], Undecodable)
        # an upd: a string that is not UTF-8, then good keys after it
        await put("utf8", msgpack_with({"a": "S"}, "S", BAD_UTF8))
        await put("later", msgpack.packb(2))
        await put("deep", msgpack.packb(3))  # a readable value replaces the bad one
        async with asyncio.timeout(WAIT_S):
            async for _ in changes:
                if view.get("later") == 2 and view.get("deep") == 3:
                    break
        assert isinstance(view["utf8"], Undecodable) and view["good"] == 1
        assert [(e.code, e.topic, e.key) for e in errors] == [
            ("bad_value", TARGET, "deep"),
            ("bad_value", TARGET, "utf8"),
        ]
        assert client.counters.connects == 1 and client.counters.disconnects == 0
        assert client.counters.bad_values == 2


async def test_bus_publisher_refuses_what_every_other_ingest_path_refuses(
    engine: tuple[Any, str, Config, str],
) -> None:
    """BusPublisher (back-end code next to the bus) is an ingest path too."""
    from engine.client import BusPublisher

    _, url, cfg, run_dir = engine
    async with BusPublisher(cfg, run_dir) as pub:
        with pytest.raises(ValueError, match=r"'data' is nested deeper than 32"):
            await pub.publish_many(
                [(TARGET, "ok", 1), (TARGET, "deep", nested(MAX_DATA_DEPTH + 1))]
            )
        with pytest.raises(ValueError, match="'key' is not valid UTF-8"):
            await pub.publish(TARGET, "\ud800", 1)
        with pytest.raises(ValueError, match="UTF-8"):
            await pub.publish(TARGET, "k", {"a": ["x\udc00"]})
        await pub.publish(TARGET, "last", nested(MAX_DATA_DEPTH))
    conn = await connect(url)
    try:
        assert (await conn.recv())["op"] == "hello"
        conn.subscribe([TARGET], id=1)
        assert (await conn.recv())["op"] == "ack"
        snap = await conn.recv()
        assert snap["items"] == {"last": nested(MAX_DATA_DEPTH)}  # nothing else was published
    finally:
        conn.close()
