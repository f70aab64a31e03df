"""The rules of one connection (engine/connection.py), without a socket or a
clock: frames and requests in, replies and actions out. The same rules run on
real sockets in tests/integration/test_protocol.py, test_security.py,
test_topic_lifetime.py and tests/adversity/test_ws_ingress.py."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from engine import codes
from engine.auth.permissions import ALLOW_ALL, SUBSCRIBE_ONLY, Permissions
from engine.auth.ratelimit import RatePolicy
from engine.bus.base import Update
from engine.codes import ErrorCode
from engine.connection import (
    AUTH_FIRST,
    CLOSE_FRAME,
    IGNORE,
    MESSAGE,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PAUSE,
    PING,
    PONG,
    REFUSE,
    REFUSE_MESSAGE,
    STORE,
    SUB_LOAD_ATTEMPTS,
    UNFINISHED,
    Close,
    ConnectionPolicy,
    ConnectionRules,
    Publish,
)
from engine.counters import WorkerCounters
from engine.errors import BusRefused, BusUnavailable
from engine.patterns import compile_pattern
from engine.protocol.closecodes import CLOSE_PROTOCOL_ERROR
from engine.protocol.codec import Auth, Ping, Sub, Unsub, decode_frame

STREAMS = {"events.log"}


def policy(**kw: Any) -> ConnectionPolicy:
    base: dict[str, Any] = {
        "max_message_bytes": 100,
        "max_message_fragments": 4,
        "fragment_timeout_s": 5.0,
        "max_topics_per_conn": 3,
        "rate": RatePolicy(1000, 3),
        "history_of": lambda t: 10 if t in STREAMS else None,
        "tokens": False,
    }
    base.update(kw)
    return ConnectionPolicy(**base)


def rules(
    perms: Permissions | None = ALLOW_ALL, subs: dict[str, object] | None = None, **kw: Any
) -> tuple[ConnectionRules, WorkerCounters]:
    counters = WorkerCounters()
    r = ConnectionRules(policy(**kw), counters, {} if subs is None else subs, 0.0)
    if perms is not None:
        r.grant(perms, None, None, 0.0, 1e9)
    return r, counters


def req(**fields: Any) -> bytes:
    out: bytes = msgpack.packb(fields)
    return out


def reply(out: object) -> dict[str, Any]:
    assert isinstance(out, bytes), out
    (msg,) = decode_frame(out)
    assert isinstance(msg, dict)
    return msg


# -- frames (rules 1-3) ------------------------------------------------------------------


def test_a_whole_binary_frame_is_a_message() -> None:
    r, _ = rules()
    assert r.frame(OP_BINARY, True, 10, False, 0.0) == MESSAGE


@pytest.mark.parametrize(
    ("opcode", "fin", "rsv", "code"),
    [
        (OP_BINARY, True, True, CLOSE_PROTOCOL_ERROR),  # reserved bits
        (OP_CONTINUATION, True, False, CLOSE_PROTOCOL_ERROR),  # nothing to continue
        (OP_TEXT, True, False, codes.CLOSE_UNSUPPORTED_DATA),
    ],
)
def test_framing_errors_close(opcode: int, fin: bool, rsv: bool, code: int) -> None:
    r, _ = rules()
    out = r.frame(opcode, fin, 3, rsv, 0.0)
    assert isinstance(out, Close) and out.code == code


def test_control_frames_are_passed_on_and_a_close_is_answered() -> None:
    r, _ = rules()
    assert r.frame(OP_PING, True, 0, False, 0.0) == PING
    assert r.frame(OP_PONG, True, 0, False, 0.0) == PONG
    assert r.frame(OP_CLOSE, True, 2, False, 0.0) == CLOSE_FRAME
    assert r.close_received(0, 0) is None  # an empty close for an empty close
    assert r.close_received(2, 4000) == 4000
    assert r.close_received(2, 1005) == CLOSE_PROTOCOL_ERROR


def test_a_fragmented_message_is_reassembled_and_empty_fragments_are_not_stored() -> None:
    r, _ = rules()
    assert r.frame(OP_BINARY, False, 2, False, 0.0) == STORE
    assert r.store(b"ab", False) is None
    assert r.frame(OP_CONTINUATION, False, 0, False, 0.1) == IGNORE  # counted, not stored
    assert r.frame(OP_CONTINUATION, True, 2, False, 0.2) == STORE
    assert r.store(b"cd", True) == b"abcd"
    assert r.fragments is None and r.fragments_size == 0
    assert r.frame(OP_BINARY, True, 1, False, 0.3) == MESSAGE


def test_an_empty_last_fragment_ends_the_message() -> None:
    r, _ = rules()
    assert r.frame(OP_BINARY, False, 2, False, 0.0) == STORE
    r.store(b"ab", False)
    assert r.frame(OP_CONTINUATION, True, 0, False, 0.0) == STORE
    assert r.store(b"", True) == b"ab"


def test_a_new_message_inside_a_fragmented_one_fails_the_connection() -> None:
    r, _ = rules()
    r.frame(OP_BINARY, False, 1, False, 0.0)
    out = r.frame(OP_BINARY, True, 1, False, 0.0)
    assert isinstance(out, Close) and out.code == CLOSE_PROTOCOL_ERROR


def test_too_many_fragments_close_1009_even_empty_ones() -> None:
    r, _ = rules()  # at most 4 frames
    r.frame(OP_BINARY, False, 1, False, 0.0)
    for _ in range(3):
        assert r.frame(OP_CONTINUATION, False, 0, False, 0.0) == IGNORE
    out = r.frame(OP_CONTINUATION, False, 0, False, 0.0)
    assert isinstance(out, Close) and out.code == codes.CLOSE_MESSAGE_TOO_BIG
    assert "more than 4 fragments" in out.reason


def test_too_many_bytes_close_1009() -> None:
    r, _ = rules()
    r.frame(OP_BINARY, False, 60, False, 0.0)
    out = r.frame(OP_CONTINUATION, True, 41, False, 0.0)
    assert out == Close(codes.CLOSE_MESSAGE_TOO_BIG, "message too big")


def test_an_unfinished_message_has_a_deadline() -> None:
    r, _ = rules()
    r.frame(OP_BINARY, False, 1, False, 10.0)
    assert r.overdue(14.9) is None
    assert r.overdue(15.0) == UNFINISHED  # the worker's timer sees it
    assert r.frame(OP_CONTINUATION, False, 1, False, 15.1) == UNFINISHED  # so does its next frame
    assert UNFINISHED.code == codes.CLOSE_POLICY_VIOLATION


# -- throttling (rule 1) -----------------------------------------------------------------


def test_a_refused_whole_message_is_answered_with_its_id_once_a_second() -> None:
    r, counters = rules(rate=RatePolicy(10, 3))  # a burst of 20
    for _ in range(20):
        assert r.frame(OP_BINARY, True, 1, False, 0.0) == MESSAGE
    assert r.frame(OP_BINARY, True, 1, False, 0.0) == REFUSE_MESSAGE
    msg = reply(r.refusal(req(op="ping", id=7)))
    assert msg["code"] == ErrorCode.RATE_LIMITED and msg["id"] == 7
    assert r.frame(OP_BINARY, True, 1, False, 0.0) == IGNORE  # answered already this second
    assert counters.errors[ErrorCode.RATE_LIMITED] == 2  # every refused frame counts


def test_a_refused_fragment_skips_the_rest_of_its_message() -> None:
    r, _ = rules(rate=RatePolicy(10, 3))
    for _ in range(20):
        r.frame(OP_BINARY, True, 1, False, 0.0)
    assert r.frame(OP_BINARY, False, 1, False, 0.0) == REFUSE  # not whole: no id to name
    # later: its continuations are skipped whole, the next message is read
    assert r.frame(OP_CONTINUATION, False, 1, False, 5.0) == IGNORE
    assert r.frame(OP_CONTINUATION, True, 1, False, 5.0) == IGNORE
    assert r.frame(OP_BINARY, True, 1, False, 5.0) == MESSAGE


def test_a_flood_pauses_reading_then_closes_4029() -> None:
    r, _ = rules(rate=RatePolicy(1, 2))  # over 3 frames a second for 2 s: abuse
    verdicts = [r.frame(OP_PING, True, 0, False, i / 100) for i in range(10)]
    assert PAUSE in verdicts and verdicts.count(PAUSE) == 1  # paused once
    assert r.reads_paused and r.resume_at == 1.0
    assert r.frame(OP_BINARY, True, 1, False, 0.5) == IGNORE  # dropped unread while paused
    assert r.resume() is True and not r.reads_paused
    out: object = None
    for t in range(1, 400):
        out = r.frame(OP_PING, True, 0, False, 1.0 + t / 100)
        if out == PAUSE:
            r.resume()
        if isinstance(out, Close):
            break
    assert out == Close(codes.CLOSE_RATE_LIMITED, "rate limit abused")


# -- authentication (rule 4) -------------------------------------------------------------


def test_until_authenticated_only_auth_is_served() -> None:
    r, _ = rules(perms=None, tokens=True)
    r.require_auth(10.0)
    assert r.receive(req(op="ping", id=1)) == AUTH_FIRST
    assert r.receive(b"\xc1") == AUTH_FIRST  # undecodable
    assert r.receive(req(op="auth", id=2, token="t")) == Auth(2, "t")
    assert r.overdue(10.0) == Close(codes.CLOSE_NOT_AUTHENTICATED, "no auth message in time")


def test_a_token_expires_on_the_monotonic_clock() -> None:
    r, _ = rules(perms=None, tokens=True)
    out = r.authenticate(Auth(1, "t"), ALLOW_ALL, "ann", 1_000_060.0, 5.0, 1_000_000.0)
    assert reply(out) == {"op": "ack", "id": 1, "user": "ann"}
    assert r.authed and r.deadline == 65.0
    assert r.overdue(64.9) is None
    assert r.overdue(65.0) == Close(codes.CLOSE_TOKEN_EXPIRED, "token expired")


def test_a_refreshed_token_must_cover_the_subscriptions() -> None:
    r, _ = rules(subs={"a.1": object()}, tokens=True)
    narrow = Permissions((compile_pattern("b.*"),), None)
    out = r.authenticate(Auth(3, "t"), narrow, None, None, 0.0, 0.0)
    assert isinstance(out, Close) and out.code == codes.CLOSE_TOKEN_EXPIRED


def test_auth_without_tokens_is_acked_politely() -> None:
    r, _ = rules()
    assert reply(r.receive(req(op="auth", id=4, token="x"))) == {"op": "ack", "id": 4, "user": None}


# -- requests (rules 5-7) ----------------------------------------------------------------


def test_sub_is_all_or_nothing_and_names_the_first_refused_topic() -> None:
    perms = Permissions((compile_pattern("a.*"),), None)
    r, counters = rules(perms=perms)
    msg = reply(r.receive(req(op="sub", id=1, topics=["a.1", "b.1", "c.1"])))
    assert (msg["code"], msg["topic"], msg["id"]) == (ErrorCode.FORBIDDEN, "b.1", 1)
    assert counters.errors[ErrorCode.FORBIDDEN] == 1
    assert r.receive(req(op="sub", id=2, topics=["a.1"])) == Sub(2, ("a.1",), {}, None)


def test_sub_past_the_topic_limit_is_refused_counting_only_new_topics() -> None:
    r, _ = rules(subs={"a": object(), "b": object()})  # limit 3
    assert isinstance(r.receive(req(op="sub", id=1, topics=["a", "b", "c"])), Sub)
    msg = reply(r.receive(req(op="sub", id=2, topics=["c", "d"])))
    assert msg["code"] == ErrorCode.TOO_MANY_TOPICS and "would hold 4 topics" in msg["msg"]


def test_pub_needs_permission_and_a_state_topic_needs_a_key() -> None:
    r, _ = rules(perms=SUBSCRIBE_ONLY)
    msg = reply(r.receive(req(op="pub", id=1, topic="t", key="k", data=1)))
    assert msg["code"] == ErrorCode.FORBIDDEN and "disabled" in msg["msg"]
    r, _ = rules()
    msg = reply(r.receive(req(op="pub", id=2, topic="t", data=1)))
    assert msg["code"] == ErrorCode.BAD_REQUEST and "needs a string 'key'" in msg["msg"]
    out = r.receive(req(op="pub", id=3, topic="events.log", data=1))
    assert out == Publish(3, Update("events.log", "", msgpack.packb(1)))


def test_the_bus_answer_to_a_pub_is_acked_or_named() -> None:
    r, counters = rules()
    pub = Publish(5, Update("t", "k", b"\x01"))
    assert reply(r.published(pub, [7], 0.01))["id"] == 5
    assert counters.published == 1 and counters.publish_hist.count == 1
    msg = reply(r.published(pub, BusUnavailable("down"), 0.0))
    assert (msg["code"], msg["topic"]) == (ErrorCode.UNAVAILABLE, "t")
    msg = reply(r.published(pub, BusRefused(ErrorCode.TOO_LARGE, "big"), 0.0))
    assert msg["code"] == ErrorCode.TOO_LARGE
    assert counters.published == 1


def test_unsub_and_ping_are_the_shells_to_carry_out() -> None:
    r, _ = rules()
    assert r.receive(req(op="unsub", id=1, topics=["a"])) == Unsub(1, ("a",))
    assert r.receive(req(op="ping", id=2)) == Ping(2)


def test_bad_requests_in_a_row_close_1008_after_their_err() -> None:
    r, counters = rules()
    for _ in range(codes.MAX_CONSECUTIVE_BAD_FRAMES - 1):
        assert reply(r.receive(b"\x01"))["code"] == ErrorCode.BAD_REQUEST
    r.receive(req(op="ping"))  # a good one restarts the count
    outs = [r.receive(b"\x01") for _ in range(codes.MAX_CONSECUTIVE_BAD_FRAMES)]
    last = outs[-1]
    assert isinstance(last, Close) and last.code == codes.CLOSE_POLICY_VIOLATION
    assert last.reply is not None and reply(last.reply)["code"] == ErrorCode.BAD_REQUEST
    assert counters.errors[ErrorCode.BAD_REQUEST] == 2 * codes.MAX_CONSECUTIVE_BAD_FRAMES - 1


# -- a sub waiting for its topics (rule 5) ------------------------------------------------


def test_requests_behind_a_waiting_sub_are_held_and_answered_in_order() -> None:
    r, _ = rules()
    sub = r.receive(req(op="sub", id=1, topics=["a"]))
    assert isinstance(sub, Sub)
    r.wait()
    assert r.receive(req(op="ping", id=2)) is None
    assert r.receive(req(op="sub", id=3, topics=["b"])) is None
    assert r.receive(req(op="ping", id=4)) is None
    assert r.next_held() is None  # not while the sub waits
    assert r.loaded(sub, None, (), 1) is sub
    assert r.receive(r.next_held() or b"") == Ping(2)
    second = r.receive(r.next_held() or b"")
    assert isinstance(second, Sub)
    r.wait()  # the second sub waits too: the rest stays held after it
    assert r.next_held() is None
    assert r.receive(req(op="ping", id=5)) is None
    assert r.loaded(second, None, (), 1) is second
    assert [r.receive(p) for p in iter(r.next_held, None)] == [Ping(4), Ping(5)]
    assert r.held is None and r.resume()  # reading may go on


def test_a_failed_load_answers_err_unavailable_naming_the_topic() -> None:
    r, counters = rules()
    sub = Sub(9, ("a", "b"), {}, None)
    r.wait()
    msg = reply(r.loaded(sub, ("b", "bus down"), (), 1))
    assert (msg["code"], msg["topic"], msg["id"]) == (ErrorCode.UNAVAILABLE, "b", 9)
    assert "bus down" in msg["msg"] and "nothing was subscribed" in msg["msg"]
    assert counters.errors[ErrorCode.UNAVAILABLE] == 1 and not r.waiting


def test_a_topic_dropped_while_others_loaded_is_loaded_again_a_few_times() -> None:
    r, _ = rules()
    sub = Sub(1, ("a", "b"), {}, None)
    r.wait()
    for attempt in range(1, SUB_LOAD_ATTEMPTS):
        assert r.loaded(sub, None, ["a"], attempt) is None and r.waiting
    msg = reply(r.loaded(sub, None, ["a"], SUB_LOAD_ATTEMPTS))
    assert msg["code"] == ErrorCode.UNAVAILABLE and "dropped again" in msg["msg"]


def test_a_closing_connection_forgets_what_it_held() -> None:
    r, _ = rules()
    r.wait()
    r.receive(req(op="ping", id=1))
    r.forget_held()
    assert r.held is None and r.next_held() is None
