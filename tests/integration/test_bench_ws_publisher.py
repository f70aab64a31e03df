"""`fanout bench --publish-via ws`: the bench's WebSocket publisher
(loadtest/bench/publisher.py `WsWorkloadPublisher`) against a real worker:
paced batches with several awaiting their acks, every one counted when its
ack or `err` arrives, finals acked before they are reported."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from loadtest.bench.publisher import WsWorkloadPublisher, publish_for
from loadtest.workload import Workload
from tests.integration.conftest import Engine

pytestmark = pytest.mark.timeout(60)

SMALL = Workload("small", topics=3, keys=20, zipf_s=None, topics_per_sub=3, prefix="wsb")


class Pipe:
    """The parent's end of the publisher's pipe, as `publish_for` uses it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, obj: Any) -> None:
        self.sent.append(obj)

    def poll(self) -> bool:
        return False


def run(
    engine: Engine, rate: float, seconds: float, conns: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Publish for `seconds`, then the finals (in a thread: the publisher runs its own loop)."""
    pub = WsWorkloadPublisher(engine.url, SMALL, seed=1, max_items=50, in_flight=4, conns=conns)
    try:
        done = publish_for(pub, Pipe(), rate, seconds, batch_ms=10.0)  # type: ignore[arg-type]
        finals = pub.post_all_finals() if not done["failed"] else {}
        return done, finals
    finally:
        pub.close()


async def test_every_batch_is_acked_and_every_final_value_reaches_a_subscriber(
    engine_factory: Any,
) -> None:
    engine = await engine_factory(
        fanout={"flush_interval_ms": 5},
        auth={"allow_anonymous_publish": True},
        limits={"messages_per_s": 10_000},
    )
    topics = SMALL.topic_names()
    sub, _ = await engine.subscriber(topics)
    done, finals = await asyncio.to_thread(run, engine, 3000.0, 1.0)
    assert done["sent"] == 3000 and done["accepted"] == 3000, done
    assert (done["failed"], done["errors"], done["aborted"]) == (0, {}, False)
    assert done["requests"] >= 3000 / 50 and done["rtt_ms"]["p50"] is not None
    assert sum(len(keys) for keys in finals.values()) == 60
    seen: dict[str, dict[str, Any]] = {t: {} for t in topics}
    want = {t: {k: [seq] for k, seq in keys.items()} for t, keys in finals.items()}
    while {t: {k: v[:1] for k, v in items.items()} for t, items in seen.items()} != want:
        msg = await sub.recv_op("upd")
        seen[msg["topic"]].update(msg["items"])


async def test_asked_for_a_connection_per_worker_it_keeps_one_per_distinct_worker(
    engine_factory: Any,
) -> None:
    # one worker here: the second connection lands on it too, and is closed
    engine = await engine_factory(
        auth={"allow_anonymous_publish": True}, limits={"messages_per_s": 10_000}
    )
    done, finals = await asyncio.to_thread(run, engine, 1000.0, 0.5, 2)
    assert done["ws_connections"] == 1 and done["accepted"] == done["sent"] == 500, done
    assert sum(len(keys) for keys in finals.values()) == 60
    await asyncio.sleep(0.2)
    assert engine.worker is not None and engine.worker.status().connections == 0  # all closed


async def test_a_refused_batch_is_counted_failed_with_the_servers_error(
    engine_factory: Any,
) -> None:
    # anonymous publishing off: every batch is answered `err forbidden`
    engine = await engine_factory(limits={"messages_per_s": 10_000})
    done, _ = await asyncio.to_thread(run, engine, 1000.0, 0.3)
    assert done["sent"] == 300 and (done["accepted"], done["failed"]) == (0, 300), done
    assert list(done["errors"]) == [
        "forbidden: publishing over WebSocket is disabled (auth.allow_anonymous_publish = false)"
    ]


def test_the_ws_body_is_the_packed_pub_byte_for_byte() -> None:
    from loadtest.bench.publisher import _WS_HEAD, msgpack_body

    pairs = [("t1", "a"), ("t2", "b")]
    head = _WS_HEAD + msgpack.packb(300) + b"\xa5items"
    body = msgpack_body(pairs, 7, 99, {}, head)
    items = [
        {"topic": "t1", "key": "a", "data": [8, 99]},
        {"topic": "t2", "key": "b", "data": [9, 99]},
    ]
    assert body == msgpack.packb({"op": "pub", "id": 300, "items": items})


@pytest.mark.parametrize(
    "extra", [["--baseline"], ["--target", "ws://127.0.0.1:1/ws", "--admin", "http://127.0.0.1:2"]]
)
def test_publish_via_ws_needs_an_engine_the_bench_starts(extra: list[str]) -> None:
    from loadtest.bench import build_parser, parse_args

    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["--publish-via", "ws", *extra])


def test_the_server_a_ws_publisher_needs_lets_it_publish_its_rate() -> None:
    from loadtest.bench import build_parser, parse_args, settings_from
    from loadtest.bench.run import ws_publish_env

    argv = ["--workload", "market", "-U", "100000", "--publish-via", "ws"]
    a = parse_args(build_parser(), [*argv, "--max-publish-items", "5000"])
    s = settings_from(a)
    env = ws_publish_env(s)
    assert s.publish_via == "ws" and env["FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH"] == "true"
    # an anonymous batch costs a token per 100 items, a message one more: 100 batches/s
    assert int(env["FANOUT_LIMITS_MESSAGES_PER_S"]) >= 2 * (100_000 / 100 + 100)
    assert int(env["FANOUT_LIMITS_MAX_MESSAGE_BYTES"]) >= 256 * 5000
    assert env["FANOUT_LIMITS_MAX_PUBLISH_ITEMS"] == "5000"  # a whole batch is admitted
    a = parse_args(build_parser(), argv)  # the default batch, the default limit
    assert ws_publish_env(settings_from(a))["FANOUT_LIMITS_MAX_PUBLISH_ITEMS"] == "1000"


async def test_waiting_on_several_connections_wakes_for_any_message_not_for_an_ended_one(
    engine: Engine,
) -> None:
    from engine.client.raw import RawConnection

    a, b = await engine.client(), await engine.client()
    a.close()
    await a.wait_closed(5.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await RawConnection.wait_any([a, b], 0.3)  # `a` had ended: b is still waited on
    assert loop.time() - t0 >= 0.25 and not b.pending()
    b.subscribe(["wsb.wait"], id=7)
    t0 = loop.time()
    await RawConnection.wait_any([a, b], 5.0)
    assert loop.time() - t0 < 4.0 and b.pending()  # woken by b's ack
    assert (await b.recv())["op"] == "ack"
    b.close()
    await b.wait_closed(5.0)
    t0 = loop.time()
    await RawConnection.wait_any([a, b], 5.0)  # all ended: at once
    assert loop.time() - t0 < 1.0
