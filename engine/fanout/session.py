"""Who wants which topic: sessions, subscriptions, groups, and the `Topic`
protocol both kinds of topic implement. PURE: no I/O.

The fan-out core (engine/fanout/core.py) owns the rules these objects follow
(its rules 1-9); this module only holds their shape, so that the topics
(engine/fanout/state.py, engine/fanout/stream.py) and the core can name each
other's types without importing each other:

    core.py  -->  state.py, stream.py  -->  session.py
       `--------------------------------------^

Rules this module owns:

1. A `Topic` is anything that answers the calls below, checked by mypy where
   the core creates one (`TopicState` for state topics, `StreamState` for
   stream topics). The core reads and writes `pos`, `sent_mark` and `groups`
   and calls the methods; nothing else of a topic.
2. `Topic.apply` says what an entry did in one int, so the core's hot path
   asks the topic once: `STALE` (nothing changed: a replay or an older
   value), `APPLIED`, or `COALESCED` (applied over a value that no flush has
   planned yet, i.e. after `sent_mark`; core rule 1). A stream topic never
   coalesces (stream.py rule 1).
"""

from __future__ import annotations

from typing import Final, Protocol

STALE: Final = 0
APPLIED: Final = 1
COALESCED: Final = 2

# A group's due ticks: (period, offset), due when tick % period == offset.
Slot = tuple[int, int]


class Topic(Protocol):
    """One topic as the core sees it, whatever its kind (rule 1)."""

    name: str
    pos: int  # the position of the newest entry held (or a stream's floor after a loss)
    sent_mark: int  # position as of the last flush that visited the topic
    groups: dict[Slot, Group]  # (period, offset) -> subscriber group; owned by the core

    def apply(self, key: str, pos: int, data: bytes) -> int:
        """Take one bus entry (idempotent by position): `STALE`, `APPLIED` or
        `COALESCED` (rule 2)."""

    def update_since(self, since: int) -> tuple[bytes, int]:
        """The message of what changed after `since` (at the topic's position)
        and its item count."""

    def full_snap(self, epoch: str) -> tuple[bytes, int]:
        """A `full: true` snap and its item count."""

    def snap_since(self, epoch: str, since: int | None) -> tuple[bytes, int, int]:
        """A new subscriber's `snap`, its item count, and the position it reflects."""

    def clear(self) -> None:
        """Forget everything held (a new epoch)."""


class Writer(Protocol):
    """The shell's side of a session: writes one frame if the send budget admits it."""

    def write(self, frame: bytes, compressed: bool = False) -> bool:
        """Send `frame` now and return True, or return False (over budget; nothing
        sent). `compressed`: a permessage-deflate payload (the frame's RSV1 bit)."""


class Session:
    """One connection's subscriptions. `paused` is set by the shell while the
    transport is over its budget (pause_writing .. resume_writing). `phase`
    spreads its rate-limited frames (core rule 6): give sessions distinct values.
    `deflate`: the connection negotiated permessage-deflate (core rule 10)."""

    __slots__ = ("__weakref__", "deflate", "paused", "phase", "subs", "writer")

    def __init__(self, writer: Writer, phase: int = 0, deflate: bool = False) -> None:
        self.writer = writer
        self.subs: dict[str, Sub] = {}
        self.paused = False
        self.phase = phase
        self.deflate = deflate


class Sub:
    """One session's subscription to one topic. `live` turns False when it ends
    (unsub, re-sub, closed session)."""

    __slots__ = ("group", "live", "sent_pos", "session", "topic")

    def __init__(self, session: Session, topic: Topic, group: Group, sent_pos: int) -> None:
        self.session = session
        self.topic = topic
        self.group = group
        self.sent_pos = sent_pos
        self.live = True


class Group:
    """The subscribers of one topic that share a flush period and phase."""

    __slots__ = ("behind", "flushed_pos", "period", "slot", "subs")

    def __init__(self, slot: Slot, flushed_pos: int) -> None:
        self.slot = slot
        self.period = slot[0]
        self.subs: set[Sub] = set()
        self.behind: set[Sub] = set()  # subs with sent_pos < flushed_pos
        self.flushed_pos = flushed_pos
