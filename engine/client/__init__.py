"""Clients of the engine.

- `connect` / `Client` (client.py): a resilient subscriber keeping the latest
  state of its topics, recovering with `since` after any disconnect.
- `Publisher` (publisher.py): publishes through the admin HTTP API;
  `BusPublisher` publishes straight into the bus, for back-end code running
  next to it.
- `raw` (raw.py): the plain protocol-v1 connection the others build on.
- `state` (state.py): PURE: the state view and the reconnect policy.
- `tokens` (tokens.py): PURE: a token's `exp` (read without verification) and
  when a token provider is asked for the next one.

Names are loaded on first use, so that importing the pure `engine.client.state`
loads no event loop or socket machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.client.client import (
        CLOSED,
        CONNECTED,
        CONNECTING,
        UNAUTHORIZED,
        WAITING,
        BadValue,
        Client,
        Counters,
        SubscribeError,
        TokenProviderError,
        Unauthorized,
        connect,
    )
    from engine.client.publisher import BusPublisher, Publisher, PublishError
    from engine.client.state import Change, ReconnectPolicy, StateView, TopicView
    from engine.client.tokens import TokenRefresh
    from engine.protocol.codec import Undecodable

_WHERE = {
    **dict.fromkeys(
        (
            "CLOSED",
            "CONNECTED",
            "CONNECTING",
            "UNAUTHORIZED",
            "WAITING",
            "BadValue",
            "Client",
            "Counters",
            "SubscribeError",
            "TokenProviderError",
            "Unauthorized",
            "connect",
        ),
        "engine.client.client",
    ),
    **dict.fromkeys(("BusPublisher", "Publisher", "PublishError"), "engine.client.publisher"),
    **dict.fromkeys(("Change", "ReconnectPolicy", "StateView", "TopicView"), "engine.client.state"),
    "TokenRefresh": "engine.client.tokens",
    "Undecodable": "engine.protocol.codec",
}

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "UNAUTHORIZED",
    "WAITING",
    "BadValue",
    "BusPublisher",
    "Change",
    "Client",
    "Counters",
    "PublishError",
    "Publisher",
    "ReconnectPolicy",
    "StateView",
    "SubscribeError",
    "TokenProviderError",
    "TokenRefresh",
    "TopicView",
    "Unauthorized",
    "Undecodable",
    "connect",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
