"""Named constants: WebSocket close codes, protocol error codes, process exit codes.

One place for every code a client, an operator or a script can observe.
"""

from __future__ import annotations

from typing import Final

# -- WebSocket close codes (protocol.md section 6) --------------------------------
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001  # the engine is shutting down (after `bye`)
CLOSE_UNSUPPORTED_DATA: Final = 1003  # a text frame was received
CLOSE_INVALID_PAYLOAD: Final = 1007  # a compressed message that does not inflate
CLOSE_POLICY_VIOLATION: Final = 1008  # e.g. keeps sending undecodable frames
CLOSE_MESSAGE_TOO_BIG: Final = 1009  # inbound message over limits.max_message_bytes
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012  # the worker is restarting (after `bye`)
CLOSE_NOT_AUTHENTICATED: Final = 4001
CLOSE_TOKEN_EXPIRED: Final = 4003
CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_RATE_LIMITED: Final = 4029


# -- `err` codes (protocol.md section 4) -------------------------------------------
class ErrorCode:
    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_OP: Final = "unknown_op"
    BAD_TOPIC: Final = "bad_topic"
    FORBIDDEN: Final = "forbidden"
    TOO_MANY_TOPICS: Final = "too_many_topics"  # per connection, or the bus' bus.max_topics
    TOO_LARGE: Final = "too_large"  # a value over bus.max_data_bytes
    TOO_MANY_KEYS: Final = "too_many_keys"  # a state topic at bus.max_keys_per_topic
    RATE_LIMITED: Final = "rate_limited"
    UNAVAILABLE: Final = "unavailable"
    INTERNAL: Final = "internal"
    BAD_HOST: Final = "bad_host"  # admin HTTP only: a Host not in server.admin_allowed_hosts (421)


# -- process exit codes ------------------------------------------------------------
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # unexpected error
EXIT_CONFIG: Final = 2  # bad configuration or command line
EXIT_BOOT_FAILURE: Final = 3  # workers kept failing to boot; the supervisor gave up
EXIT_PORT_IN_USE: Final = 4  # a listening port could not be bound

# A `bad_request` counts toward closing with 1008 after this many in a row.
MAX_CONSECUTIVE_BAD_FRAMES: Final = 10
