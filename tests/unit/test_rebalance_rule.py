"""engine/rebalance.py: how many connections a node closes now (rules 1-5), fed by hand."""

from __future__ import annotations

import math

from engine import rebalance
from engine.rebalance import Policy, State, decide

POLICY = Policy(tolerance=0.05, sustain_s=10.0, max_shed_per_s=50.0, cooldown_s=10.0)


def run(
    state: State, now: float, mine: int, peers: list[int], policy: Policy = POLICY
) -> tuple[int, State]:
    d = decide(policy, state, now=now, mine=mine, peers=peers)
    return d.shed, d.state


def test_alone_never_sheds() -> None:  # rule 1
    shed, state = run(State(), 0.0, 10_000, [])
    shed2, state = run(state, 100.0, 10_000, [])
    assert (shed, shed2) == (0, 0) and state.phase == rebalance.ALONE


def test_within_tolerance_never_sheds() -> None:  # rule 2
    state = State()
    for t in range(0, 1000, 5):
        shed, state = run(state, float(t), 104, [100, 96])  # fair 100, 104 <= 105
        assert shed == 0 and state.phase == rebalance.BALANCED


def test_one_connection_over_a_tiny_fair_share_is_not_over() -> None:  # rule 2: a whole one
    assert not rebalance.is_over(2, 1.5, 0.05)
    assert rebalance.is_over(3, 1.5, 0.05)


def test_sheds_only_after_sustain_then_down_to_fair_share_at_the_rate() -> None:  # rules 3-4
    state = State()
    shed, state = run(state, 0.0, 300, [300, 0])
    assert shed == 0 and state.phase == rebalance.OVER
    shed, state = run(state, 9.9, 300, [300, 0])
    assert shed == 0 and state.phase == rebalance.OVER
    shed, state = run(state, 10.0, 300, [300, 0])  # a full bucket: 50
    assert shed == 50 and state.phase == rebalance.SHEDDING and state.round_left == 50
    shed, state = run(state, 10.5, 250, [300, 50])  # 0.5 s refills 25
    assert shed == 25
    shed, state = run(state, 11.5, 225, [280, 95])
    assert shed == 25 and state.phase == rebalance.COOLDOWN and state.shed_total == 100
    assert state.rounds == 1


def test_a_break_in_being_over_restarts_the_sustain_clock() -> None:  # rule 3
    state = State()
    _, state = run(state, 0.0, 300, [300, 0])
    _, state = run(state, 5.0, 200, [200, 200])  # balanced for a moment
    assert state.over_since is None
    shed, state = run(state, 12.0, 300, [300, 0])
    assert shed == 0 and state.over_since == 12.0
    shed, state = run(state, 22.0, 300, [300, 0])
    assert shed == 50


def test_cooldown_then_the_next_round_at_once_while_still_over() -> None:  # rule 5
    policy = Policy(tolerance=0.05, sustain_s=2.0, max_shed_per_s=1000.0, cooldown_s=5.0)
    state = State()
    _, state = run(state, 0.0, 300, [300, 0], policy)
    shed, state = run(state, 2.0, 300, [300, 0], policy)
    assert shed == 100 and state.phase == rebalance.COOLDOWN
    shed, state = run(state, 6.9, 267, [267, 66], policy)
    assert shed == 0 and state.phase == rebalance.COOLDOWN
    shed, state = run(state, 7.0, 267, [267, 66], policy)
    assert shed == 67 and state.rounds == 2  # 267 - ceil(200)


def test_a_round_stops_when_the_count_is_down_to_fair_share() -> None:  # rule 4
    policy = Policy(tolerance=0.05, sustain_s=0.0, max_shed_per_s=10.0, cooldown_s=5.0)
    _, state = run(State(), 0.0, 300, [100], policy)  # round of 100, 10 at a time
    assert state.round_left == 90
    shed, state = run(state, 1.0, 201, [199], policy)  # clients left by themselves
    assert shed == 1 and state.round_left == 0 and state.phase == rebalance.COOLDOWN


def test_the_bucket_never_holds_more_than_one_second() -> None:  # rule 4
    policy = Policy(tolerance=0.05, sustain_s=0.0, max_shed_per_s=20.0, cooldown_s=0.0)
    _, state = run(State(at=0.0, tokens=0.0), 1000.0, 10_000, [0], policy)
    assert state.shed_total == 20
    slow = Policy(tolerance=0.05, sustain_s=0.0, max_shed_per_s=0.5, cooldown_s=0.0)
    assert slow.bucket == 1.0
    shed, state = run(State(), 0.0, 100, [0], slow)
    assert shed == 1
    shed, state = run(state, 1.0, 99, [1], slow)
    assert shed == 0
    shed, state = run(state, 2.0, 99, [1], slow)
    assert shed == 1


def test_fair_share_counts_this_node() -> None:
    assert rebalance.fair_share(300, [300, 0]) == 200.0
    assert math.isclose(rebalance.fair_share(1, [0, 0]), 1 / 3)


def test_the_settings_parse_and_a_ttl_within_one_announce_is_refused() -> None:
    from engine.config import parse_config
    from engine.errors import ConfigError

    cfg = parse_config({"rebalance": {"enabled": True}}, {"FANOUT_REBALANCE_TOLERANCE": "0.1"})
    assert cfg.rebalance.enabled and cfg.rebalance.tolerance == 0.1
    assert parse_config({}, {}).rebalance.enabled is False
    try:
        parse_config({"rebalance": {"announce_interval_s": 2.0, "peer_ttl_s": 2.0}}, {})
    except ConfigError as exc:
        assert exc.key == "rebalance.peer_ttl_s"
    else:
        raise AssertionError("a peer_ttl_s within one announce must be refused")
    try:
        parse_config({"rebalance": {"tolerance": 1.5}}, {})
    except ConfigError as exc:
        assert exc.key == "rebalance.tolerance"
    else:
        raise AssertionError("a tolerance over 1 must be refused")


def test_clients_in_flight_do_not_lower_the_fair_share() -> None:  # rule 1
    policy = Policy(tolerance=0.05, sustain_s=2.0, max_shed_per_s=1000.0, cooldown_s=4.0)
    _, state = run(State(), 0.0, 300, [300, 0], policy)
    shed, state = run(state, 2.0, 300, [300, 0], policy)
    assert shed == 100
    # 4 s on: 72 clients told to go are still between nodes (total 528, not 600)
    d = decide(policy, state, now=6.0, mine=200, peers=[200, 128])
    assert d.shed == 0 and d.fair == 200.0
    # clients that really left count once the window (sustain + cooldown) has passed
    d = decide(policy, d.state, now=12.5, mine=200, peers=[200, 128])
    assert d.fair == 176.0


def test_the_peak_is_kept_while_clients_trickle_back_and_the_shedder_holds() -> None:  # 1, 6
    policy = Policy(tolerance=0.05, sustain_s=2.0, max_shed_per_s=1000.0, cooldown_s=4.0)
    _, state = run(State(), 0.0, 1500, [1500, 0], policy)
    d = decide(policy, state, now=2.0, mine=1500, peers=[1500, 0])
    assert d.shed == 500 and d.hold is False  # the order itself carries the hold
    # a busy balancer: the clients land on c a few at a time, for longer than the window
    t, c = 2.0, 0
    while c < 1000:
        t, c = t + 1.0, c + 40
        d = decide(policy, d.state, now=t, mine=1000, peers=[1000, min(c, 1000)])
        assert d.shed == 0 and d.fair == 1000.0
        assert d.hold is (c < 1000)  # refuse new connections while some are in flight
    assert t > 2.0 + policy.window_s
