"""The bus: one ordered log per shard, positions, epochs, latest state (see `base`).

`create_bus` builds the client of the configured backend; `hub_socket_path`
names the embedded hub's socket in a run directory.

    base.py           the interface (`Bus`, `BusSink`) and the guarantees every backend gives
    backend.py        what the backends' clients share (`publish_wait`, default figures)
    limits.py         what the bus refuses to store (pure); tasks.py: supervised tasks
    local.py          the local backend's client; hub.py, hubcore.py (pure), wire.py (pure)
    redis_streams.py  the redis backend's client, its parts in redis/ (one job per module)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from engine.bus.base import (
    Bus,
    BusSink,
    Entry,
    ExpiryOf,
    History,
    HistoryOf,
    Snapshot,
    Update,
    shard_of,
)
from engine.bus.limits import Limits
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import Config

__all__ = [
    "HUB_SOCKET",
    "Bus",
    "BusSink",
    "Entry",
    "History",
    "HistoryOf",
    "Snapshot",
    "Update",
    "create_bus",
    "expiry_of",
    "history_of",
    "hub_socket_path",
    "limits_of",
    "shard_of",
]

HUB_SOCKET: Final = "hub.sock"


def hub_socket_path(run_dir: str) -> str:
    """The hub's Unix socket in `run_dir`.

    Limit: a Unix socket path must be under 108 bytes; keep run directories short.
    """
    return os.path.join(run_dir, HUB_SOCKET)


def history_of(cfg: Config) -> HistoryOf:
    """The `[[topics]]` rules of `cfg` as the bus uses them: topic -> the
    `history` of a stream topic, None for a state topic."""
    from engine.topics import TopicRules

    return TopicRules(cfg.topics).history_of


def expiry_of(cfg: Config) -> ExpiryOf | None:
    """topic -> its rule's `idle_expiry_s`; None when no rule has one."""
    from engine.topics import TopicRules

    if not any(rule.idle_expiry_s > 0 for rule in cfg.topics):
        return None
    return TopicRules(cfg.topics).idle_expiry_of


def limits_of(cfg: Config) -> Limits:
    """The bus' bounds (`bus.max_data_bytes`, `bus.max_keys_per_topic`, `bus.max_topics`)."""
    return Limits(
        max_data_bytes=cfg.bus.max_data_bytes,
        max_keys_per_topic=cfg.bus.max_keys_per_topic,
        max_topics=cfg.bus.max_topics,
    )


def create_bus(cfg: Config, run_dir: str, *, want_entries: bool = True) -> Bus:
    """A client of the configured bus backend (not started: call `start`).

    `want_entries=False` makes a client that only publishes and takes snapshots
    (admin, demo feed): the bus sends it no entries. The client is given the
    `[[topics]]` rules (stream topics: engine/bus/base.py guarantee 6).
    """
    backend = cfg.bus.backend
    if backend == "local":
        from engine.bus.local import LocalBus

        # The hub applies its own copy of the rules and counts; the client
        # checks what it can before sending (data size, strings).
        return LocalBus(
            hub_socket_path(run_dir),
            want_entries=want_entries,
            max_data_bytes=cfg.bus.max_data_bytes,
            request_timeout_s=cfg.bus.publish_timeout_s,
        )
    if backend == "redis":
        from engine.bus.redis_streams import RedisBus
        from engine.config import redis_credentials

        r = cfg.bus.redis
        # Read here, in the process that connects: the secret lives in the
        # environment only, never in the Config that is printed and logged.
        username, password = redis_credentials(r, os.environ)
        return RedisBus(
            r.url,
            shards=cfg.bus.shards,
            prefix=r.prefix,
            stream_maxlen=r.stream_maxlen,
            cluster=r.cluster,
            want_entries=want_entries,
            username=username,
            password=password,
            tls_ca_file=r.tls_ca_file,
            history_of=history_of(cfg),
            limits=limits_of(cfg),
            stream_max_bytes=r.stream_max_bytes,
            max_inflight_batches=r.max_inflight_batches,
            publish_timeout_s=cfg.bus.publish_timeout_s,
            expiry_of=expiry_of(cfg),
        )
    raise ConfigError("bus.backend", f"unknown backend {backend!r}: expected 'local' or 'redis'")
