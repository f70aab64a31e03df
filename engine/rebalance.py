"""Automatic rebalancing: how many connections a node closes now. PURE: no I/O, no clock.

Nodes on the redis bus announce their connection counts and read their live
peers' (engine/bus/redis/presence.py). Every announce, the admin process asks
`decide` how many of its node's connections to close now; they are closed by
the `/rebalance` machinery (`bye` reason "rebalance" with a jittered
`retry_ms`, close 1012, oldest connections first), so the clients reconnect
through the load balancer, most of them to other nodes.

Rules:
1. Fair share = the connections of every live node (this one included) over
   the number of live nodes, the total taken as the largest seen (the peak)
   until the total has stopped rising for `sustain_s + cooldown_s`: clients
   told to go are in flight for a while (retry_ms, refused attempts, a busy
   balancer), and a total counted without them would make the fair share
   too low and send the nodes into needless rounds, a cascade. Clients that
   really leave lower it only once the total stops rising for that window:
   meanwhile the nodes shed less, never more. Alone (no live peer) a node
   never sheds: there is nowhere for its clients to go.
2. A node is over when it holds more than `fair * (1 + tolerance)`, and at
   least one whole connection more than fair. A node not over never begins a
   round, and its sustain clock stops (`over_since` None).
3. Sustain: a round begins only once the node has been over for `sustain_s`
   without a break, so a peer restarting or a burst of connects moves nothing.
4. A round: at its start the node takes `mine - ceil(fair)` as the round's
   count (down to fair share, never below: rule 7) and closes them over the
   next decisions, at most `max_shed_per_s` per second: a token bucket refilled
   at that rate and holding at most one second's worth (at least 1), so no
   burst ever passes the rate. A round stops early when the node's count is
   down to fair share (peers came or went, clients left by themselves).
5. Cool-down: once a round's last connection is ordered closed, no round
   begins for `cooldown_s`: the clients reconnect (within
   `workers.retry_max_ms`), the counts settle (statuses every second,
   announces every `announce_interval_s`) before the node looks again. Still
   over then, the next round begins at once (the sustain clock ran on);
   otherwise the sustain clock starts again.
6. Admission hold: a node that sheds admits no new connection (503, the
   client tries again through the balancer) while its round and its
   cool-down are under way (at least `workers.retry_max_ms` after each part),
   and after that for as long as `Decision.hold` says: it has shed, it holds
   at least fair share, and clients are still in flight (the total is below
   the peak). So its closed clients land on the nodes that admit: those
   below fair share. A node not
   over never holds, and some live node is never over, so a client always
   has somewhere to go. Without the hold, a balancer that spreads reconnects
   over all nodes would send most of them back to the shedders: with k
   nodes shedding at once each round would leave k/(k+1) of the excess, and
   nearly every client would move before the newcomer filled up.
7. No back and forth: a node sheds only down to fair share, so a node that
   shed holds at least the mean; with two nodes, whatever the balancer does
   with the closed clients, the other node ends at or below fair share and
   never sheds back (tests/property/test_rebalance_rule.py simulates it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

# Phases, as /stats and /metrics show them.
NOT_READY: Final = "not_ready"  # the node is not ready: out of presence (the caller's)
ALONE: Final = "alone"  # no live peer (rule 1)
BALANCED: Final = "balanced"  # within tolerance (rule 2)
OVER: Final = "over"  # over, waiting out sustain_s (rule 3)
SHEDDING: Final = "shedding"  # a round is under way (rule 4)
COOLDOWN: Final = "cooldown"  # after a round (rule 5)
PHASES: Final = (NOT_READY, ALONE, BALANCED, OVER, SHEDDING, COOLDOWN)


@dataclass(frozen=True, slots=True)
class Policy:
    """The `rebalance.*` settings the rule uses."""

    tolerance: float = 0.05
    sustain_s: float = 10.0
    max_shed_per_s: float = 50.0
    cooldown_s: float = 10.0

    @property
    def window_s(self) -> float:
        """How long the largest total seen is kept (rule 1)."""
        return self.sustain_s + self.cooldown_s

    @property
    def bucket(self) -> float:
        """Most tokens the bucket holds: one second's worth, at least 1 (rule 4)."""
        return max(1.0, self.max_shed_per_s)


@dataclass(frozen=True, slots=True)
class State:
    """What the rule remembers between two decisions."""

    phase: str = BALANCED
    over_since: float | None = None  # when the node went over (rule 3)
    round_left: int = 0  # connections of the current round not ordered closed yet
    cooldown_until: float = -math.inf
    tokens: float = 0.0
    at: float | None = None  # the time of the last decision (None: none yet)
    shed_total: int = 0  # connections ordered closed so far
    rounds: int = 0  # rounds begun so far
    peak_total: int = 0  # the largest total seen (rule 1)
    last_total: int = 0  # the total at the last decision
    rise_at: float = -math.inf  # when the total last rose (or the peak was taken)


@dataclass(frozen=True, slots=True)
class Decision:
    """`decide`'s answer: close `shed` connections now; the next state; the
    fair share; whether to refuse new connections until the next decision (rule 6)."""

    shed: int
    state: State
    fair: float
    hold: bool = False


def fair_share(mine: int, peers: Sequence[int]) -> float:
    """Connections per live node, this one included, as counted now (rule 1
    keeps the largest total seen: `decide`'s `fair`)."""
    return (mine + sum(peers)) / (len(peers) + 1)


def is_over(mine: int, fair: float, tolerance: float) -> bool:
    """Rule 2."""
    return mine > fair * (1.0 + tolerance) and mine - fair >= 1.0


def decide(
    policy: Policy, state: State, *, now: float, mine: int, peers: Sequence[int]
) -> Decision:
    """How many connections to close now (rules 1-5).

    `now` is a monotonic clock in seconds, `mine` this node's connections,
    `peers` each live peer's. Call it every announce; a caller that closes
    fewer than `shed` (fewer connections were open) simply sees a lower count
    next time.
    """
    tokens = policy.bucket if state.at is None else state.tokens
    if state.at is not None:
        tokens = min(policy.bucket, tokens + policy.max_shed_per_s * max(0.0, now - state.at))
    state = replace(state, tokens=tokens, at=now)
    if not peers:
        return Decision(0, replace(state, phase=ALONE, over_since=None, round_left=0), mine)
    state = _peak(state, now, mine + sum(peers), policy.window_s)
    fair = state.peak_total / (len(peers) + 1)
    hold = state.rounds > 0 and mine >= fair and state.last_total < state.peak_total
    d = _decide(policy, state, now, mine, peers, fair)
    return replace(d, hold=hold) if hold else d


def _peak(state: State, now: float, total: int, window_s: float) -> State:
    """The peak total of rule 1."""
    if total >= state.peak_total:
        return replace(state, peak_total=total, last_total=total, rise_at=now)
    if total > state.last_total:  # rising: clients in flight are landing
        return replace(state, last_total=total, rise_at=now)
    if now - state.rise_at > window_s:  # stopped rising: the ones missing are gone
        return replace(state, peak_total=total, last_total=total, rise_at=now)
    return replace(state, last_total=total)


def _decide(
    policy: Policy, state: State, now: float, mine: int, peers: Sequence[int], fair: float
) -> Decision:
    """Rules 2-5, once the fair share is known."""
    if state.round_left > 0:
        return _shed(
            state, now, policy, fair, min(state.round_left, max(0, mine - math.ceil(fair)))
        )
    over = is_over(mine, fair, policy.tolerance)
    since = (state.over_since if state.over_since is not None else now) if over else None
    state = replace(state, over_since=since)
    if now < state.cooldown_until:
        return Decision(0, replace(state, phase=COOLDOWN), fair)
    if since is None:
        return Decision(0, replace(state, phase=BALANCED), fair)
    if now - since < policy.sustain_s:
        return Decision(0, replace(state, phase=OVER), fair)
    count = mine - math.ceil(fair)
    state = replace(state, rounds=state.rounds + 1)
    return _shed(state, now, policy, fair, count)


def _shed(state: State, now: float, policy: Policy, fair: float, left: int) -> Decision:
    """Order the next part of a round: as many as the bucket allows (rule 4);
    the round's last part starts the cool-down (rule 5)."""
    n = max(0, min(left, math.floor(state.tokens)))
    left -= n
    state = replace(
        state,
        tokens=state.tokens - n,
        round_left=left,
        shed_total=state.shed_total + n,
        phase=SHEDDING if left > 0 else COOLDOWN,
    )
    if left == 0:
        state = replace(state, cooldown_until=now + policy.cooldown_s)
    return Decision(n, state, fair)
