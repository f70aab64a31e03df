"""The client's pure core (engine/client/state.py): the state view and the
reconnect policy, with an injected clock (`now`) and random draws (`rand`)."""

from __future__ import annotations

import random

import pytest

from engine.client.state import Change, Reconnector, ReconnectPolicy, StateView


def snap(topic: str, pos: str, items: dict, *, full: bool = True, epoch: str = "e1") -> dict:
    return {"op": "snap", "topic": topic, "epoch": epoch, "pos": pos, "full": full, "items": items}


def upd(topic: str, pos: str, items: dict) -> dict:
    return {"op": "upd", "topic": topic, "pos": pos, "items": items}


# -- the state view -------------------------------------------------------------------


def test_full_snap_replaces_partial_snap_merges_nil_deletes() -> None:
    v = StateView()
    c = v.apply(snap("t", "1-0", {"a": 1, "b": 2}))
    assert c == Change("t", "snap", "1-0", {"a": 1, "b": 2}, full=True, epoch="e1")
    assert dict(v.view("t")) == {"a": 1, "b": 2}
    c = v.apply(upd("t", "2-0", {"a": 10, "b": None}))
    assert c is not None and c.items == {"a": 10, "b": None} and c.kind == "upd"
    assert dict(v.view("t")) == {"a": 10}
    assert v.since() == {"t": ("e1", "2-0")}
    c = v.apply(snap("t", "3-0", {"c": 3, "a": None}, full=False))
    assert c is not None and not c.full and c.items == {"c": 3, "a": None}
    assert dict(v.view("t")) == {"c": 3}
    assert v.since() == {"t": ("e1", "3-0")}


def test_full_snap_reports_the_keys_it_removed() -> None:
    v = StateView()
    v.apply(snap("t", "1-0", {"a": 1, "b": 2}))
    c = v.apply(snap("t", "1-0", {"b": 3}, epoch="e2"))
    assert c is not None and c.items == {"a": None, "b": 3}
    assert dict(v.view("t")) == {"b": 3}
    assert v.since() == {"t": ("e2", "1-0")}


def test_partial_snap_of_another_epoch_is_treated_as_full() -> None:
    v = StateView()
    v.apply(snap("t", "5-0", {"a": 1}))
    c = v.apply(snap("t", "1-0", {"b": 1}, full=False, epoch="e2"))
    assert c is not None and c.full and dict(v.view("t")) == {"b": 1}


def test_since_only_names_topics_with_a_mark_and_can_be_restricted() -> None:
    v = StateView()
    v.view("empty")
    v.apply(snap("a", "1-0", {}))
    v.apply(snap("b", "2-0", {}))
    assert v.since() == {"a": ("e1", "1-0"), "b": ("e1", "2-0")}
    assert v.since(("b",)) == {"b": ("e1", "2-0")}
    v.forget("a")
    assert "a" not in v.since()


def test_view_is_a_read_only_mapping() -> None:
    v = StateView()
    v.apply(snap("t", "1-0", {"a": 1}))
    tv = v.view("t")
    assert tv["a"] == 1 and len(tv) == 1 and list(tv) == ["a"] and "a" in tv
    with pytest.raises(TypeError):
        tv["b"] = 2  # type: ignore[index]


def test_messages_that_change_nothing_return_none_and_bad_ones_raise() -> None:
    v = StateView()
    for op in ("hello", "ack", "err", "pong", "bye", "future_op"):
        assert v.apply({"op": op}) is None
    with pytest.raises(ValueError):
        v.apply({"op": "upd", "topic": "t", "items": {}})
    with pytest.raises(ValueError):
        v.apply({"op": "snap", "topic": "t", "epoch": "e", "pos": "1-0", "items": {}})
    with pytest.raises(ValueError):
        v.apply({"op": "upd", "topic": "t", "pos": "1-0", "items": [1]})


def test_stream_events_and_gaps_move_the_mark_and_are_surfaced() -> None:
    v = StateView()
    c = v.apply(
        {
            "op": "snap",
            "topic": "s",
            "epoch": "e",
            "pos": "3-0",
            "full": True,
            "items": [["1-0", "a"], ["2-0", "b"]],
        }
    )
    assert c is not None and c.events == (("1-0", "a"), ("2-0", "b"))
    assert v.since() == {"s": ("e", "2-0")}
    c = v.apply({"op": "evt", "topic": "s", "items": [["4-0", "c"]]})
    assert c is not None and c.kind == "evt" and v.since() == {"s": ("e", "4-0")}
    c = v.apply({"op": "gap", "topic": "s", "from": "5-0", "to": "9-0"})
    assert c is not None and (c.kind, c.gap_from, c.gap_to) == ("gap", "5-0", "9-0")


# -- the reconnect policy -------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_growing_capped_ceiling() -> None:
    rec = Reconnector(ReconnectPolicy(base_ms=100, max_ms=1000, factor=2, stable_s=30))
    ceilings = []
    for i in range(7):
        rec.failed(now=float(i))
        ceilings.append(rec.delay_ms(1.0))
        assert rec.delay_ms(0.0) == 0.0
        assert rec.delay_ms(0.25) == pytest.approx(ceilings[-1] * 0.25)
    assert ceilings == [100, 200, 400, 800, 1000, 1000, 1000]


def test_backoff_delays_follow_the_injected_rng() -> None:
    policy = ReconnectPolicy(base_ms=250, max_ms=30_000)
    rec = Reconnector(policy)
    rng, ref = random.Random(42), random.Random(42)
    for attempt in range(10):
        rec.failed(now=attempt * 0.1)
        expected = ref.random() * min(30_000, 250 * 2**attempt)
        assert rec.delay_ms(rng.random()) == pytest.approx(expected)


def test_a_connection_up_for_stable_s_resets_the_streak_a_shorter_one_does_not() -> None:
    rec = Reconnector(ReconnectPolicy(base_ms=100, max_ms=10_000, stable_s=30))
    for t in range(4):
        rec.failed(now=t)
    assert rec.delay_ms(1.0) == 800
    rec.connected(now=10.0)
    rec.closed(now=39.9, code=1006)  # up 29.9 s: not stable
    assert rec.delay_ms(1.0) == 1600
    rec.connected(now=50.0)
    rec.closed(now=80.0, code=1006)  # up 30 s: the streak starts again
    assert rec.delay_ms(1.0) == 100


def test_bye_sets_the_next_delay_once_and_does_not_grow_the_streak() -> None:
    rec = Reconnector(ReconnectPolicy(base_ms=100, max_ms=10_000))
    rec.failed(now=0)
    rec.connected(now=1)
    rec.bye(2345)
    rec.closed(now=2, code=1012)
    assert rec.delay_ms(0.5) == 2345
    assert rec.delay_ms(1.0) == 100  # the streak is still one failure: the bye did not grow it
    rec.bye(10)
    rec.failed(now=3)  # a bye on a connection that then failed to open is forgotten
    assert rec.delay_ms(1.0) == 200


@pytest.mark.parametrize("code", [4001, 4003])
def test_no_reconnect_after_an_auth_close_until_a_new_token(code: int) -> None:
    rec = Reconnector(ReconnectPolicy())
    rec.connected(now=0)
    rec.closed(now=1, code=code)
    assert rec.delay_ms(0.5) is None
    assert rec.delay_ms(0.5) is None
    rec.new_token()
    assert rec.delay_ms(1.0) == 250


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1008, 1011, 1012, 4008, 4029])
def test_every_other_close_reconnects_with_backoff(code: int) -> None:
    rec = Reconnector(ReconnectPolicy(base_ms=100))
    rec.connected(now=0)
    rec.closed(now=1, code=code)
    assert rec.delay_ms(1.0) == 100


def test_policy_refuses_nonsense() -> None:
    for bad in (
        {"base_ms": -1},
        {"max_ms": 10, "base_ms": 20},
        {"factor": 0.5},
        {"stable_s": float("nan")},
    ):
        with pytest.raises(ValueError):
            ReconnectPolicy(**bad)  # type: ignore[arg-type]


def test_state_module_is_pure() -> None:
    """engine/client/state.py follows the dependency rule (tests/unit/test_dependency_rules.py)."""
    import json
    import subprocess
    import sys

    from tests.unit.test_dependency_rules import (
        _BASE,
        PURE_STDLIB,
        REPO,
        RUNTIME_FORBIDDEN,
        THIRD_PARTY,
        covered,
        imports_of,
    )

    # the backoff and the codec (Undecodable) it reuses are themselves checked pure modules
    allowed = (
        *PURE_STDLIB,
        *THIRD_PARTY,
        *_BASE,
        "engine.backoff",
        "engine.protocol.codec",
    )
    path = REPO / "engine" / "client" / "state.py"
    bad = [(line, name) for line, name in imports_of(path) if not covered(name, allowed)]
    assert not bad, bad
    code = "import sys, json; import engine.client.state; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    loaded = set(json.loads(out.stdout))
    assert not loaded & RUNTIME_FORBIDDEN, loaded & RUNTIME_FORBIDDEN
