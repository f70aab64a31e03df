"""The exception tree of fanout.

::

    EngineError
     ├── ConfigError            a setting is missing, ill-typed or out of range (names the key)
     ├── ProtocolError          a peer sent something the protocol refuses
     │    └── RemoteProtocolError   ... and it was the remote client's fault (-> `err` or close)
     ├── LocalProtocolError     our own code misused the protocol layer (a bug)
     └── BusError               the bus cannot do what was asked
          ├── BusUnavailable        not connected right now; nothing was published
          └── BusRefused            over a bus limit (`code`: an `err` code); nothing was published

A peer's bad input and our own misuse are different errors (h11's split).
OS errors are not wrapped.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error fanout raises on purpose."""


class ConfigError(EngineError):
    """A bad setting. `key` is the dotted name (`fanout.flush_interval_ms`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config: {key}: {message}")
        self.key = key
        self.message = message


class ProtocolError(EngineError):
    """A protocol rule was broken."""


class RemoteProtocolError(ProtocolError):
    """A client's message is refused.

    `code` is one of `engine.codes.ErrorCode`; `topic` names the topic at fault
    (when one is); `request_id` is the `id` of the refused request, if it had one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        topic: str | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.topic = topic
        self.request_id = request_id


class LocalProtocolError(ProtocolError):
    """Our own code asked the protocol layer for something invalid (a bug)."""


class BusError(EngineError):
    """The bus refused or failed an operation."""


class BusUnavailable(BusError):
    """The bus is not connected; the operation had no effect (nothing published)."""


class BusRefused(BusError):
    """A publish over one of the bus' limits (`data` size, keys per topic,
    topics): nothing of it was published. `code` is the `engine.codes.ErrorCode`
    a client is told (`too_large`, `too_many_keys`, `too_many_topics`); the
    message names the topic (and key) at fault and the setting."""

    def __init__(self, code: str, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.topic = topic
