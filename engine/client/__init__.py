"""Clients of the engine.

- `connect` / `Client` (client.py): a resilient subscriber keeping the latest
  state of its topics, recovering with `since` after any disconnect.
- `Publisher` (publisher.py): publishes through the admin HTTP API;
  `BusPublisher` publishes straight into the bus, for back-end code running
  next to it.
- `raw` (raw.py): the plain protocol-v1 connection the others build on.
- `state` (state.py): PURE: the state view and the reconnect policy.
"""

from __future__ import annotations

from engine.client.client import (
    CLOSED,
    CONNECTED,
    CONNECTING,
    UNAUTHORIZED,
    WAITING,
    Client,
    Counters,
    SubscribeError,
    Unauthorized,
    connect,
)
from engine.client.publisher import BusPublisher, Publisher, PublishError
from engine.client.state import Change, ReconnectPolicy, StateView, TopicView

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "UNAUTHORIZED",
    "WAITING",
    "BusPublisher",
    "Change",
    "Client",
    "Counters",
    "PublishError",
    "Publisher",
    "ReconnectPolicy",
    "StateView",
    "SubscribeError",
    "TopicView",
    "Unauthorized",
    "connect",
]
