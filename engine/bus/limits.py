"""What the bus refuses to store, and why. PURE: no I/O.

Rules this module owns (issue 11, findings 3 and 4; both backends apply them,
the contract suite checks they agree):

1. A publish is checked whole before anything of it is sent: every topic and
   key must be a `str` encodable as UTF-8 (a lone surrogate is not: it would
   fail inside the backend, where it once killed the Redis publish loop), and
   every `data` non-empty msgpack bytes of at most `max_data_bytes`. A bad
   value fails its own publish (`BusError`; `BusRefused(too_large)` for the
   size) and nothing else. Checked once: `CheckedUpdates`, which an ingest
   edge built after checking the strings and the data itself, get only the
   size check here.
2. Counts are checked where the state lives (the hub's core; Redis'
   publish script), per publish, before any of it is applied: a publish that
   would add a key to a state topic holding `max_keys_per_topic` keys
   (tombstones count) is refused with `too_many_keys`; one that would add a
   topic to a shard holding `topics_per_shard(max_topics, shards)` topics with
   `too_many_topics`. Rewriting an existing key is always allowed. 0 means no
   limit. The count is per shard because a shard is the unit one Redis node
   applies atomically (Cluster: one slot), so no cross-shard counter is needed.
3. A topic whose rule has `idle_expiry_s > 0` is removed from the bus (keys,
   tombstones, history, floor) once nothing was published to it for that long.
   Its deadline is its last publish + `idle_expiry_s`, reset by every publish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Final

from engine.bus.base import CheckedUpdates, Update
from engine.codes import ErrorCode
from engine.errors import BusError, BusRefused

DEFAULT_MAX_DATA_BYTES: Final = 1024 * 1024
_data_of: Final = itemgetter(2)  # an Update's data


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of one bus (`bus.max_data_bytes`, `bus.max_keys_per_topic`,
    `bus.max_topics`); 0 for a count means no limit."""

    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    max_keys_per_topic: int = 0
    max_topics: int = 0

    def topics_per_shard(self, shards: int) -> int:
        """The topic count one shard may hold (rule 2), 0 for no limit."""
        return topics_per_shard(self.max_topics, shards)


def topics_per_shard(max_topics: int, shards: int) -> int:
    """`max_topics` spread over `shards`, rounded up (0: no limit)."""
    if max_topics <= 0:
        return 0
    return -(-max_topics // max(1, shards))


def utf8(text: object, what: str) -> bytes:
    """`text` as UTF-8, or `BusError` naming `what` (rule 1)."""
    if not isinstance(text, str):
        raise BusError(f"{what} must be a string, got {type(text).__name__}")
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise BusError(
            f"{what} {text!r} is not valid UTF-8 (a lone surrogate at {exc.start})"
        ) from None


def check_updates(updates: Sequence[Update], max_data_bytes: int) -> None:
    """Raise `BusError` / `BusRefused` for the first update that breaks rule 1.

    `CheckedUpdates` (checked at the ingest edge but for the size) have only
    their sizes checked: one C pass, then a Python one only to name the offender."""
    if type(updates) is CheckedUpdates and (
        not updates or max(map(len, map(_data_of, updates))) <= max_data_bytes
    ):
        return
    for i, u in enumerate(updates):
        topic, key = u.topic, u.key
        # isascii() is a flag read: only other strings pay for an encode
        if type(topic) is not str or not topic.isascii():
            utf8(topic, f"update {i}: topic")
        if type(key) is not str or not key.isascii():
            utf8(key, f"update {i}: key of {topic!r}")
        data = u.data
        if not isinstance(data, bytes | bytearray) or not data:
            raise BusError(f"update {i}: data must be msgpack bytes, got {type(data)!r}")
        if len(data) > max_data_bytes:
            raise too_large(u.topic, u.key, len(data), max_data_bytes)


def too_large(topic: str, key: str, size: int, limit: int) -> BusRefused:
    return BusRefused(
        ErrorCode.TOO_LARGE,
        f"data of {topic!r} key {key!r} is {size} bytes, over bus.max_data_bytes ({limit})",
        topic=topic,
    )


def too_many_keys(topic: str, key: str, limit: int) -> BusRefused:
    return BusRefused(
        ErrorCode.TOO_MANY_KEYS,
        f"{topic!r} holds bus.max_keys_per_topic ({limit}) keys: new key {key!r} refused",
        topic=topic,
    )


def too_many_topics(topic: str, limit: int) -> BusRefused:
    return BusRefused(
        ErrorCode.TOO_MANY_TOPICS,
        f"the bus holds its share of bus.max_topics ({limit} in {topic!r}'s shard):"
        f" new topic {topic!r} refused",
        topic=topic,
    )


REFUSED_CODES: Final = frozenset(
    {ErrorCode.TOO_LARGE, ErrorCode.TOO_MANY_KEYS, ErrorCode.TOO_MANY_TOPICS}
)


def refused(code: str, message: str) -> BusError:
    """A refusal reported by the hub or a script (`code`, `message`) as the error to raise."""
    if code in REFUSED_CODES:
        return BusRefused(code, message)
    return BusError(message)
