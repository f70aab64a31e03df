"""A `pub` batch under the connection's rules (engine/connection.py rule 6),
without a socket or a clock: permissions and keys all or nothing, one ack with
a position per item, the rate-limit cost by who publishes."""

from __future__ import annotations

from typing import Any

import msgpack

from engine.auth.permissions import ALLOW_ALL, Permissions
from engine.auth.ratelimit import RatePolicy
from engine.bus.base import Update
from engine.codes import ErrorCode
from engine.connection import (
    ANONYMOUS_ITEMS_PER_TOKEN,
    MESSAGE,
    OP_BINARY,
    ConnectionPolicy,
    ConnectionRules,
    PublishBatch,
)
from engine.counters import WorkerCounters
from engine.errors import BusRefused, BusUnavailable
from engine.patterns import compile_pattern
from engine.protocol.codec import decode_frame

STREAMS = {"events.log"}


def rules(
    perms: Permissions = ALLOW_ALL,
    *,
    tokens: bool = True,
    rate: float = 1000.0,
    max_items: int = 1000,
) -> tuple[ConnectionRules, WorkerCounters]:
    policy = ConnectionPolicy(
        max_message_bytes=1 << 20,
        max_message_fragments=4,
        fragment_timeout_s=5.0,
        max_topics_per_conn=3,
        rate=RatePolicy(rate, 3),
        history_of=lambda t: 10 if t in STREAMS else None,
        tokens=tokens,
        max_publish_items=max_items,
    )
    counters = WorkerCounters()
    r = ConnectionRules(policy, counters, {}, 0.0)
    r.grant(perms, None, None, 0.0, 1e9)
    return r, counters


def batch(rid: int, *items: tuple[str, str | None, Any]) -> bytes:
    out: bytes = msgpack.packb(
        {
            "op": "pub",
            "id": rid,
            "items": [
                {"topic": t, "data": d} | ({} if k is None else {"key": k}) for t, k, d in items
            ],
        }
    )
    return out


def reply(out: object) -> dict[str, Any]:
    assert isinstance(out, bytes), out
    (msg,) = decode_frame(out)
    assert isinstance(msg, dict)
    return msg


def receive(r: ConnectionRules, payload: bytes, now: float = 0.0) -> object:
    assert r.frame(OP_BINARY, True, len(payload), False, now) == MESSAGE
    return r.receive(payload)


def test_a_batch_becomes_one_publish_of_every_item_in_order() -> None:
    r, _ = rules()
    out = receive(r, batch(1, ("a", "k1", 1), ("events.log", None, "e"), ("a", "k2", None)))
    assert out == PublishBatch(
        1,
        (
            Update("a", "k1", b"\x01"),
            Update("events.log", "", msgpack.packb("e")),
            Update("a", "k2", b"\xc0"),
        ),
    )


def test_permissions_are_all_or_nothing_naming_the_first_refused_topic() -> None:
    perms = Permissions(None, (compile_pattern("prices.>"),))
    r, counters = rules(perms)
    msg = reply(
        receive(r, batch(2, ("prices.fx", "a", 1), ("news.x", "b", 1), ("orders.y", "c", 1)))
    )
    assert (msg["code"], msg["id"], msg["topic"]) == (ErrorCode.FORBIDDEN, 2, "news.x")
    assert "nothing of the batch was published" in msg["msg"]
    assert counters.errors[ErrorCode.FORBIDDEN] == 1
    assert isinstance(
        receive(r, batch(3, ("prices.fx", "a", 1), ("prices.eq", "b", 2))), PublishBatch
    )


def test_a_state_topics_item_without_a_key_refuses_the_batch() -> None:
    r, _ = rules()
    msg = reply(receive(r, batch(4, ("events.log", None, 1), ("a", None, 1))))
    assert (msg["code"], msg["id"], msg["topic"]) == (ErrorCode.BAD_REQUEST, 4, "a")
    assert "'items[1]'" in msg["msg"] and "needs a string 'key'" in msg["msg"]


def test_too_many_items_is_a_bad_request_with_the_id() -> None:
    r, _ = rules(max_items=3)
    msg = reply(receive(r, batch(5, *[("a", f"k{i}", i) for i in range(4)])))
    assert (msg["code"], msg["id"]) == (ErrorCode.BAD_REQUEST, 5)
    assert "limits.max_publish_items" in msg["msg"]


def test_the_ack_holds_one_position_per_item_and_counts_every_item() -> None:
    r, counters = rules()
    req = PublishBatch(6, (Update("a", "k", b"\x01"), Update("b", "k", b"\x02")))
    msg = reply(r.published_batch(req, [(5 << 32) | 1, (5 << 32) | 2], 0.01))
    assert msg == {"op": "ack", "id": 6, "pos": ["5-1", "5-2"]}
    assert counters.published == 2 and counters.publish_hist.count == 1


def test_a_bus_refusal_names_its_topic_and_publishes_nothing() -> None:
    r, counters = rules()
    req = PublishBatch(7, (Update("a", "k", b"\x01"), Update("b", "k", b"\x02")))
    msg = reply(r.published_batch(req, BusRefused(ErrorCode.TOO_LARGE, "big", topic="b"), 0.0))
    assert (msg["code"], msg["id"], msg["topic"]) == (ErrorCode.TOO_LARGE, 7, "b")
    msg = reply(r.published_batch(req, BusUnavailable("down"), 0.0))
    assert (msg["code"], msg["topic"]) == (ErrorCode.UNAVAILABLE, "a")
    assert counters.published == 0


def test_an_authenticated_publishers_batch_costs_one_token() -> None:
    r, _ = rules(tokens=True, rate=1.0)  # a burst of 2 tokens
    big = batch(8, *[("a", f"k{i}", i) for i in range(1000)])
    assert isinstance(receive(r, big), PublishBatch)
    assert isinstance(receive(r, big), PublishBatch)


def test_an_anonymous_publishers_batch_costs_a_token_per_hundred_items() -> None:
    r, counters = rules(tokens=False, rate=2.0)  # a burst of 4 tokens
    items = [("a", f"k{i}", i) for i in range(3 * ANONYMOUS_ITEMS_PER_TOKEN + 1)]  # 4 tokens
    assert isinstance(receive(r, batch(9, *items)), PublishBatch)
    r, counters = rules(tokens=False, rate=2.0)
    items = [("a", f"k{i}", i) for i in range(4 * ANONYMOUS_ITEMS_PER_TOKEN + 1)]  # 5 tokens
    msg = reply(receive(r, batch(10, *items)))
    assert (msg["code"], msg["id"]) == (ErrorCode.RATE_LIMITED, 10)
    assert "nothing was published" in msg["msg"]
    assert counters.errors[ErrorCode.RATE_LIMITED] == 1
