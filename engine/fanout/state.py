"""The latest-state table of one topic. PURE: no I/O.

Rules this module owns:

1. A key's value changes only to an entry with a strictly newer position
   (`apply` is idempotent by position: replays and snapshot/stream races are
   harmless).
2. `entries` is ordered by position, oldest first, so the keys changed after a
   position are found by walking from the newest end: `changed_since` costs
   O(keys changed), not O(keys).
3. A deletion (data NIL) stays as a tombstone with its position, so a client
   recovering with `since` learns that the key was deleted. Memory is bounded
   by the number of keys the topic ever had, never by the number of updates.
4. Each entry keeps its `items` pair pre-packed (msgpack key + the publisher's
   data bytes): building a message is a join, never an encode of the payload.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from engine.fanout.session import APPLIED, COALESCED, STALE
from engine.protocol.codec import NIL, build_snap, build_upd, pack_item, pack_str

if TYPE_CHECKING:
    from engine.fanout.session import Group, Slot


class TopicState:
    """Latest value and position of every key of one topic."""

    __slots__ = ("entries", "groups", "live", "name", "packed_name", "pos", "sent_mark")

    def __init__(self, name: str) -> None:
        self.name = name
        self.packed_name = pack_str(name)
        # key -> (pos, packed item, deleted); ordered by pos ascending (rule 2)
        self.entries: dict[str, tuple[int, bytes, bool]] = {}
        self.pos = 0  # position of the newest entry applied
        self.live = 0  # keys that are not deleted
        # position as of the last flush that visited this topic: a key changed
        # after it and changed again before the next flush was coalesced
        self.sent_mark = 0
        # (period, phase) -> subscriber group; owned by engine.fanout.core
        self.groups: dict[Slot, Group] = {}

    def apply(self, key: str, pos: int, data: bytes) -> int:
        """Record `data` for `key` at `pos`. Returns `STALE` (and changes
        nothing) when the key already holds a position at or after `pos`,
        `COALESCED` when it replaced a value newer than `sent_mark` (one no
        flush has planned yet), else `APPLIED` (engine/fanout/session.py rule 2)."""
        entries = self.entries
        old = entries.get(key)
        result = APPLIED
        if old is not None:
            if old[0] >= pos:
                return STALE
            del entries[key]
            if not old[2]:
                self.live -= 1
            if old[0] > self.sent_mark:
                result = COALESCED
        deleted = data == NIL
        entries[key] = (pos, pack_item(key, data), deleted)
        if not deleted:
            self.live += 1
        if pos > self.pos:
            self.pos = pos
        else:
            # Out of order (merging a snapshot under the live stream): restore rule 2.
            self.entries = dict(sorted(entries.items(), key=lambda kv: kv[1][0]))
        return result

    def merge(self, items: Iterable[tuple[str, int, bytes]]) -> int:
        """Apply many entries at once (a snapshot loaded under live entries,
        in any order): rule 1 per key, then one sort restores rule 2. Returns
        how many changed a key."""
        entries = self.entries
        newest = self.pos
        changed = 0
        for key, pos, data in items:
            old = entries.get(key)
            if old is not None:
                if old[0] >= pos:
                    continue
                if not old[2]:
                    self.live -= 1
            deleted = data == NIL
            entries[key] = (pos, pack_item(key, data), deleted)
            if not deleted:
                self.live += 1
            if pos > newest:
                newest = pos
            changed += 1
        if changed:
            self.pos = newest
            self.entries = dict(sorted(entries.items(), key=lambda kv: kv[1][0]))
        return changed

    def changed_since(self, since: int) -> list[bytes]:
        """Packed items of the keys changed after `since`, oldest first, deletions included."""
        out: list[bytes] = []
        for pos, item, _ in reversed(self.entries.values()):
            if pos <= since:
                break
            out.append(item)
        out.reverse()
        return out

    def live_items(self) -> list[bytes]:
        """Packed items of every key that exists (a full snapshot)."""
        return [item for _, item, deleted in self.entries.values() if not deleted]

    def update_since(self, since: int) -> tuple[bytes, int]:
        """The `upd` of the keys changed after `since` (at the topic's position)
        and its item count."""
        items = self.changed_since(since)
        return build_upd(self.packed_name, self.pos, items), len(items)

    def full_snap(self, epoch: str) -> tuple[bytes, int]:
        """A `full: true` snap of every live key and its item count."""
        items = self.live_items()
        return build_snap(self.packed_name, epoch, self.pos, True, items), len(items)

    def snap_since(self, epoch: str, since: int | None) -> tuple[bytes, int, int]:
        """A new subscriber's `snap`, its item count and the position it reflects:
        full unless `since` (a position of this epoch) is given, then only the
        keys changed after it (deletions included), however old it is."""
        if since is None:
            snap, n = self.full_snap(epoch)
            return snap, n, self.pos
        items = self.changed_since(since)
        return build_snap(self.packed_name, epoch, self.pos, False, items), len(items), self.pos

    def clear(self) -> None:
        """Forget every key (the bus lost its history: a new epoch)."""
        self.entries = {}
        self.pos = 0
        self.live = 0
        self.sent_mark = 0
