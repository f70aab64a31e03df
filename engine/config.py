"""Configuration: config.toml + environment + command-line overrides -> frozen dataclasses.

Rules this module owns:

1. Every setting is declared once, as a field of the section dataclasses below,
   with its type, default and allowed range (the `_int`, `_float`, `_str`, ...
   helpers record them in the field's metadata). Parsing, environment variable
   names, error messages and `dump_toml` all derive from that declaration, and
   `config.toml` at the repository root is tested against it.
2. Sources, later wins: defaults < config file < environment < overrides
   (command-line flags). The environment form of `section.key` is
   `FANOUT_<SECTION>_<KEY>` upper-cased (`bus.redis.url` -> `FANOUT_BUS_REDIS_URL`);
   `FANOUT_TOPICS` is a JSON array of `[[topics]]` objects and replaces the
   file's topics. List values in the environment are JSON arrays.
3. A bad value raises `ConfigError(key, message)` at parse time, before any
   process starts. `key` is the dotted name (`server.port`, `topics[2].max_hz`);
   the message says what was expected and what was given, and where the value
   came from when it was not the file (`(from FANOUT_SERVER_PORT)`). Unknown
   sections, keys and `FANOUT_<SECTION>_...` variables are errors (typos must
   not be silently ignored).
4. PURE, except `read_config_file` and `load_config`, which read the file (and
   `os.environ` when no environment is given).

The dataclasses carry no validation of their own: `dataclasses.replace` on a
section (what tests do) is not checked; only `parse_config` checks.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypeVar

from engine.errors import ConfigError
from engine.patterns import compile_pattern

ENV_PREFIX: Final = "FANOUT_"
ENV_CONFIG: Final = "FANOUT_CONFIG"
DEFAULT_PATH: Final = "./config.toml"
# FANOUT_ variables that are not settings. Any variable whose section is not a
# known section is ignored too; these are listed so the rule reads explicitly.
IGNORED_ENV: Final = frozenset(
    {"FANOUT_CONFIG", "FANOUT_JWT_SECRET", "FANOUT_API_KEY", "FANOUT_RUN_DIR"}
)

_SPEC: Final = "fanout.config.spec"
_Kind = Literal["int", "float", "bool", "str", "choice", "origins", "hosts", "cidrs"]


class _Invalid(Exception):
    """A value does not fit its spec (internal; turned into ConfigError by the caller)."""


@dataclass(frozen=True, slots=True)
class _Spec:
    """The type and range of one setting."""

    kind: _Kind
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo is exclusive (> lo)
    choices: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None  # a str must fullmatch it
    expect: str = ""  # replaces the generated "expected ..." text

    def expectation(self) -> str:
        if self.expect:
            return self.expect
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "str":
            return "a string"
        noun = "an integer" if self.kind == "int" else "a number"
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{noun} {lo}..{hi}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{noun} <= {hi}"
        return noun

    def convert(self, value: object) -> Any:
        """`value` (a TOML/JSON/Python value) checked and normalized, or `_Invalid`."""
        kind = self.kind
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise _Invalid
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _Invalid
            if kind == "int":
                if not isinstance(value, int):
                    raise _Invalid
                number: int | float = value
            else:
                try:
                    number = float(value)
                except OverflowError:
                    raise _Invalid from None
                if not math.isfinite(number):
                    raise _Invalid
            if self.lo is not None and (number <= self.lo if self.lo_open else number < self.lo):
                raise _Invalid
            if self.hi is not None and number > self.hi:
                raise _Invalid
            return number
        if kind == "origins":
            if not isinstance(value, list | tuple):
                raise _Invalid
            origins: list[str] = []
            for item in value:
                if not isinstance(item, str) or not _valid_origin(item):
                    raise _Invalid
                origins.append(item.lower())  # browsers send scheme and host lower-cased
            return tuple(origins)
        if kind == "hosts":
            if not isinstance(value, list | tuple):
                raise _Invalid
            hosts: list[str] = []
            for item in value:
                if not isinstance(item, str) or _ALLOWED_HOST_RE.fullmatch(item) is None:
                    raise _Invalid
                hosts.append(item.lower())  # host names compare case-insensitively
            return tuple(hosts)
        if kind == "cidrs":
            if not isinstance(value, list | tuple):
                raise _Invalid
            networks: list[str] = []
            for item in value:
                if not isinstance(item, str):
                    raise _Invalid
                try:  # "10.0.0.0/8", "fd00::/8", or one address
                    networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
                except ValueError:
                    raise _Invalid from None
            return tuple(networks)
        if not isinstance(value, str):
            raise _Invalid
        if kind == "choice":
            lowered = value.lower()
            if lowered not in self.choices:
                raise _Invalid
            return lowered
        if self.regex is not None and self.regex.fullmatch(value) is None:
            raise _Invalid
        return value

    def convert_text(self, text: str) -> Any:
        """A value given as text (environment, command line) parsed by type, then checked."""
        kind = self.kind
        if kind == "bool":
            word = text.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise _Invalid
        if kind == "int":
            if _INT_TEXT_RE.fullmatch(text.strip()) is None:
                raise _Invalid
            return self.convert(int(text))
        if kind == "float":
            try:
                number = float(text)
            except ValueError:
                raise _Invalid from None
            return self.convert(number)
        if kind in ("origins", "hosts", "cidrs"):
            try:
                items = json.loads(text)
            except ValueError:
                raise _Invalid from None
            return self.convert(items)
        return self.convert(text)


_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
_INT_TEXT_RE: Final = re.compile(r"[+-]?[0-9](_?[0-9])*")
_ORIGIN_RE: Final = re.compile(
    r"[a-z][a-z0-9+.-]*://"
    r"(?:(?:\*\.)?[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
_HOST_RE: Final = re.compile(r"\S+")
# server.admin_allowed_hosts: "*", a host name, or "*." + a domain (its subdomains).
_ALLOWED_HOST_RE: Final = re.compile(r"\*|(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?", re.IGNORECASE)
_PATH_RE: Final = re.compile(r"/[^\s?#]*")
_ENV_NAME_RE: Final = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?")
_REDIS_URL_RE: Final = re.compile(r"(?:redis|rediss|unix)://\S*")
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MiB: Final = 1024 * 1024
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MIN_HS256_SECRET_BYTES: Final = 32


def _valid_origin(text: str) -> bool:
    m = _ORIGIN_RE.fullmatch(text)
    return m is not None and (m["port"] is None or 1 <= int(m["port"]) <= 65535)


REDACTED: Final = "***"
_URL_PASSWORD_PARAM_RE: Final = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme "://", userinfo, "@" + the rest) of a URL that has a userinfo, else None.

    The last "@" before the query wins: a password with a raw "@" is still
    taken whole."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    head = rest.split("?", 1)[0]
    at = head.rfind("@")
    if at < 0:
        return None
    return scheme + sep, rest[:at], rest[at:]


def url_has_password(url: str) -> bool:
    """Whether a Redis URL carries a password (in its userinfo or `?password=`)."""
    parts = _split_userinfo(url)
    if parts is not None and parts[1].partition(":")[2]:
        return True
    return _URL_PASSWORD_PARAM_RE.search(url) is not None


def redact_url(url: str) -> str:
    """`url` fit to print: the password of its userinfo and of a `password=`
    query parameter replaced by `***` (a userinfo without ":" is a user name,
    as Redis clients read it, and is kept). PURE; used by every log line, error
    and dump that shows a URL."""
    parts = _split_userinfo(url)
    if parts is not None:
        scheme, userinfo, rest = parts
        user, _, password = userinfo.partition(":")
        if password:
            url = f"{scheme}{user}:{REDACTED}{rest}"
    return _URL_PASSWORD_PARAM_RE.sub(lambda m: m[1] + REDACTED, url)


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else repr(x)


# Field declaration helpers: the default plus the spec in the field's metadata.
# They return `Any` so that mypy accepts them as defaults of typed fields.


def _int(default: int, lo: int | None = None, hi: int | None = None) -> Any:
    return field(default=default, metadata={_SPEC: _Spec("int", lo, hi)})


def _float(
    default: float, lo: float | None = None, *, hi: float | None = None, lo_open: bool = False
) -> Any:
    return field(default=float(default), metadata={_SPEC: _Spec("float", lo, hi, lo_open=lo_open)})


def _bool(default: bool) -> Any:
    return field(default=default, metadata={_SPEC: _Spec("bool")})


def _str(default: str, regex: re.Pattern[str] | None = None, expect: str = "") -> Any:
    return field(default=default, metadata={_SPEC: _Spec("str", regex=regex, expect=expect)})


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={_SPEC: _Spec("choice", choices=choices)})


_HOST_EXPECT: Final = "a host name or IP address"
_ENV_EXPECT: Final = "an environment variable name (letters, digits, '_') or ''"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: where clients and operators connect."""

    host: str = _str("0.0.0.0", _HOST_RE, _HOST_EXPECT)
    port: int = _int(8000, 0, 65535)
    path: str = _str("/ws", _PATH_RE, "a path starting with '/'")
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata={
            _SPEC: _Spec(
                "origins",
                expect=(
                    "a list of origins (in the environment: a JSON array) like"
                    ' ["https://app.example.com", "https://*.example.com"]'
                ),
            )
        },
    )
    admin_host: str = _str("127.0.0.1", _HOST_RE, _HOST_EXPECT)
    admin_port: int = _int(8001, 0, 65535)
    # Host header names the admin port answers besides IP addresses and
    # "localhost" (always accepted): DNS rebinding cannot name a listed host.
    admin_allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata={
            _SPEC: _Spec(
                "hosts",
                expect=(
                    "a list of host names (in the environment: a JSON array) like"
                    ' ["fanout-admin", "*.svc.cluster.local"], or ["*"] for any'
                ),
            )
        },
    )
    # An admin connection waiting for its next request is closed after this.
    admin_idle_timeout_s: float = _float(5, 0, lo_open=True)
    # Connections beyond the admin's general cap that may still ask a probe.
    admin_probe_connections: int = _int(16, 1, 1024)
    node: str = _str("")
    # Proxies (CIDRs) whose X-Forwarded-For names the client (for the per-IP limits).
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata={
            _SPEC: _Spec(
                "cidrs",
                expect=(
                    "a list of networks or addresses (in the environment: a JSON array) like"
                    ' ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]'
                ),
            )
        },
    )


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """[workers]: the worker processes and their supervision."""

    count: int = _int(0, 0, 256)
    graceful_timeout_s: float = _float(30, 0, lo_open=True)
    drain_s: float = _float(5, 0)
    heartbeat_timeout_s: float = _float(10, 1)
    boot_timeout_s: float = _float(30, 0, lo_open=True)
    max_boot_failures: int = _int(5, 1)
    restart_backoff_min_ms: int = _int(100, 0)
    restart_backoff_max_ms: int = _int(10_000, 0)
    retry_min_ms: int = _int(500, 0)
    retry_max_ms: int = _int(5_000, 0)


@dataclass(frozen=True, slots=True)
class FanoutConfig:
    """[fanout]: flushing, send budgets and WebSocket pings."""

    flush_interval_ms: int = _int(20, 1, 1000)
    max_buffer_bytes: int = _int(262_144, 4096)
    slow_client_timeout_s: float = _float(30, 0, lo_open=True)
    ping_interval_s: float = _float(20, 0, lo_open=True)
    ping_timeout_s: float = _float(20, 0, lo_open=True)
    socket_notsent_lowat_bytes: int = _int(16_384, 0)
    # Topics a worker holds (issue 11, finding 2): a topic whose last subscriber
    # left is kept this long, then dropped (reloaded from the bus on a later
    # sub); at most max_idle_topics are kept so (the oldest go first); at most
    # max_topic_loads loads are asked of the bus at once; a load not done in
    # topic_load_timeout_s fails the sub (unavailable).
    topic_grace_s: float = _float(5, 0)
    max_idle_topics: int = _int(10_000, 0)
    max_topic_loads: int = _int(256, 1)
    topic_load_timeout_s: float = _float(5, 0, lo_open=True)
    # permessage-deflate (issue 14, engine/protocol/deflate.py): "group"
    # compresses each shared message once per flush for every client that
    # negotiated it, "off" never negotiates, "per_client" compresses each
    # client's frame on its own (to measure what peers pay; not for production).
    # Messages under compression_min_bytes go uncompressed.
    compression: str = _choice("group", "off", "group", "per_client")
    compression_min_bytes: int = _int(256, 0)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: what one client or one request may do."""

    max_message_bytes: int = _int(65_536, 256, 16 * _MiB)
    max_topics_per_conn: int = _int(100, 1)
    messages_per_s: float = _float(50, 0, lo_open=True)
    abuse_window_s: float = _float(10, 0, lo_open=True)
    max_connections: int = _int(20_000, 1)
    max_connections_per_ip: int = _int(0, 0)
    handshake_timeout_s: float = _float(5, 0, lo_open=True)
    # Inbound frames (issue 11, finding 1): a fragmented message's bounds
    # besides max_message_bytes, and upgrade attempts per second (0 = no limit).
    max_message_fragments: int = _int(64, 1)
    fragment_timeout_s: float = _float(10, 0, lo_open=True)
    upgrades_per_s: float = _float(1000, 0)
    upgrades_per_ip_per_s: int = _int(0, 0)
    max_publish_items: int = _int(1000, 1)
    min_max_hz: float = _float(0.1, 0, lo_open=True)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]: who may connect, subscribe and publish."""

    mode: str = _choice("none", "none", "jwt")
    timeout_s: float = _float(10, 0, lo_open=True)
    jwt_secret_env: str = _str("FANOUT_JWT_SECRET", _ENV_NAME_RE, _ENV_EXPECT)
    jwt_public_key_file: str = _str("")
    jwks_file: str = _str("")
    issuer: str = _str("")
    audience: str = _str("")
    allow_anonymous_publish: bool = _bool(False)
    api_key_env: str = _str("FANOUT_API_KEY", _ENV_NAME_RE, _ENV_EXPECT)
    # What a token without a `sub_topics` claim may subscribe to: "none" (safe
    # default) or "all" (every topic, what earlier versions did).
    missing_sub_topics: str = _choice("none", "none", "all")
    # Clock skew tolerated on a token's `exp` and `nbf`, seconds (engine/auth/tokens.py
    # rule 2): a token is refused, and its connection closed 4003, this long after `exp`.
    leeway_s: float = _float(30, 0, hi=300)  # more would let a token outlive its exp by far


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """[bus.redis]: the Redis Streams backend."""

    url: str = _str(
        "redis://127.0.0.1:6379/0",
        _REDIS_URL_RE,
        "a URL starting with redis://, rediss:// or unix://",
    )
    cluster: bool = _bool(False)
    stream_maxlen: int = _int(100_000, 1)
    stream_max_bytes: int = _int(32 * _MiB, 0)
    # Publish rounds sent and not answered yet, per bus client (publisher.py rule 7).
    max_inflight_batches: int = _int(4, 1, 64)
    prefix: str = _str("fanout", _PREFIX_RE, "1..64 characters of A-Z a-z 0-9 _ . : -")
    # Redis AUTH: the environment variables holding the password and the ACL
    # user name (unset or empty: none). The secret never goes in a file or the URL.
    password_env: str = _str("FANOUT_REDIS_PASSWORD", _ENV_NAME_RE, _ENV_EXPECT)
    username_env: str = _str("FANOUT_REDIS_USERNAME", _ENV_NAME_RE, _ENV_EXPECT)
    # rediss:// only: the CA bundle the server's certificate is checked against
    # ("" = the system's CAs).
    tls_ca_file: str = _str("")

    def __repr__(self) -> str:
        # A password in the URL must not reach a log line or a traceback.
        shown = ", ".join(
            f"{f.name}={(redact_url(self.url) if f.name == 'url' else getattr(self, f.name))!r}"
            for f in fields(self)
        )
        return f"RedisConfig({shown})"


@dataclass(frozen=True, slots=True)
class BusConfig:
    """[bus]: where updates are ordered and stored."""

    backend: str = _choice("local", "local", "redis")
    shards: int = _int(16, 1, 1024)
    max_lag_ms: int = _int(5000, 1)
    hub_max_buffer_bytes: int = _int(64 * _MiB, 65_536)
    # Bounds of what the bus stores (issue 11, finding 4); 0 = no limit for the counts.
    publish_timeout_s: float = _float(5, 0, lo_open=True)
    max_data_bytes: int = _int(_MiB, 16, 512 * _MiB)
    max_keys_per_topic: int = _int(100_000, 0)
    max_topics: int = _int(100_000, 0)
    redis: RedisConfig = field(default_factory=RedisConfig)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: what is logged and how."""

    level: str = _choice("info", "debug", "info", "warning", "error")
    format: str = _choice("text", "text", "json")


@dataclass(frozen=True, slots=True)
class RebalanceConfig:
    """[rebalance]: automatic rebalancing on scale-out (redis bus only; engine/rebalance.py)."""

    enabled: bool = _bool(False)
    # Over fair share by more than this fraction (rule 2), for sustain_s (rule 3).
    tolerance: float = _float(0.05, 0, hi=1)
    sustain_s: float = _float(30, 0)
    # Connections one node closes per second at most (rule 4), and the pause after a round.
    max_shed_per_s: float = _float(50, 0, lo_open=True)
    cooldown_s: float = _float(15, 0)
    # How often a node announces its count and reads its peers'; a peer silent
    # for peer_ttl_s is gone (its entry expires).
    announce_interval_s: float = _float(1, 0.05, hi=60)
    peer_ttl_s: float = _float(5, 0.1, hi=600)


MAX_HISTORY_EVENTS: Final = 1_000_000  # per stream topic, on the bus and in every worker


@dataclass(frozen=True, slots=True)
class TopicRule:
    """One [[topics]] entry: the rules of the topics its pattern matches.

    `mode` is "state" (latest value per key, coalesced) or "stream" (every
    event, in order); `max_hz` caps frames per second per connection (0 = no
    cap); `history` is how many events a stream topic retains (on the bus and
    in every worker) for clients subscribing with `since`, up to
    `MAX_HISTORY_EVENTS`; `idle_expiry_s` removes a topic from the bus once
    nothing was published to it for that long (0 = never).
    """

    pattern: str = field(metadata={_SPEC: _Spec("str", expect="a topic pattern like 'prices.>'")})
    mode: str = _choice("state", "state", "stream")
    max_hz: float = _float(0, 0)
    history: int = _int(0, 0, MAX_HISTORY_EVENTS)
    idle_expiry_s: float = _float(0, 0)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration. Build it with `parse_config` / `load_config`."""

    server: ServerConfig = field(default_factory=ServerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    fanout: FanoutConfig = field(default_factory=FanoutConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    topics: tuple[TopicRule, ...] = ()

    def resolved_worker_count(self, cpu_count: int) -> int:
        """`workers.count`, with 0 meaning one worker per core (at least one)."""
        return self.workers.count if self.workers.count > 0 else max(1, cpu_count)

    def node_name(self, hostname: str) -> str:
        """`server.node`, with "" meaning the host name (sent in `hello`)."""
        return self.server.node or hostname


def default_config() -> Config:
    """Every setting at its default (what `config.toml` at the repo root spells out)."""
    return Config()


# Section name -> dataclass, in the order of config.toml and dump_toml.
_SECTIONS: Final[dict[str, type]] = {
    "server": ServerConfig,
    "workers": WorkersConfig,
    "fanout": FanoutConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "bus": BusConfig,
    "bus.redis": RedisConfig,
    "log": LogConfig,
    "rebalance": RebalanceConfig,
}
_TOP_SECTIONS: Final = ("server", "workers", "fanout", "limits", "auth", "bus", "log", "rebalance")


def env_prefix(section: str) -> str:
    """`FANOUT_BUS_REDIS_` for "bus.redis": the prefix of a section's variables."""
    return ENV_PREFIX + section.replace(".", "_").upper() + "_"


def _specs_of(cls: type) -> dict[str, _Spec]:
    return {f.name: f.metadata[_SPEC] for f in fields(cls) if _SPEC in f.metadata}


_SPECS: Final[dict[str, dict[str, _Spec]]] = {
    name: _specs_of(cls) for name, cls in _SECTIONS.items()
}
_TOPIC_SPECS: Final = _specs_of(TopicRule)
# Longest prefix first, so FANOUT_BUS_REDIS_URL is bus.redis.url, not bus.redis_url.
_ENV_SECTIONS: Final = sorted(
    ((env_prefix(name), name) for name in _SPECS),
    key=lambda pair: -len(pair[0]),
)


def env_name(key: str) -> str:
    """The environment variable of a dotted setting: "server.admin_port" -> FANOUT_SERVER_ADMIN_PORT."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def setting_names() -> tuple[str, ...]:
    """Every dotted setting name ("server.host", ..., "log.format"), topics excluded."""
    return tuple(f"{section}.{key}" for section, specs in _SPECS.items() for key in specs)


def _suggest(word: str, known: Any) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _bad(key: str, spec: _Spec, given: object, source: str) -> ConfigError:
    if key == "bus.redis.url" and isinstance(given, str):
        given = redact_url(given)  # an error message is printed and logged
    return ConfigError(key, f"expected {spec.expectation()}, got {given!r}{source}")


class _Builder:
    """Accumulates checked values, source by source, then builds the Config."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        self.topics: tuple[TopicRule, ...] = ()
        self.unknown_env: list[tuple[str, str]] = []  # (variable, dotted guess)

    def set(self, section: str, key: str, value: object, *, text: bool, source: str) -> None:
        spec = _SPECS[section][key]
        try:
            if text and isinstance(value, str):
                converted = spec.convert_text(value)
            else:
                converted = spec.convert(value)
        except _Invalid:
            raise _bad(f"{section}.{key}", spec, value, source) from None
        self.values[section][key] = converted

    def current(self, section: str, key: str) -> Any:
        if key in self.values[section]:
            return self.values[section][key]
        return getattr(_SECTIONS[section](), key)

    def build(self) -> Config:
        v = self.values
        return Config(
            server=_make(ServerConfig, v["server"]),
            workers=_make(WorkersConfig, v["workers"]),
            fanout=_make(FanoutConfig, v["fanout"]),
            limits=_make(LimitsConfig, v["limits"]),
            auth=_make(AuthConfig, v["auth"]),
            bus=_make(BusConfig, {**v["bus"], "redis": _make(RedisConfig, v["bus.redis"])}),
            log=_make(LogConfig, v["log"]),
            rebalance=_make(RebalanceConfig, v["rebalance"]),
            topics=self.topics,
        )


_T = TypeVar("_T")


def _make(cls: Callable[..., _T], values: Mapping[str, Any]) -> _T:
    return cls(**values)


def parse_config(
    doc: Mapping[str, Any],
    env: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """The effective Config from a parsed TOML document, an environment and overrides.

    Later sources win: defaults < `doc` < `env` < `overrides`. `overrides` keys
    are dotted names ("workers.count", "bus.redis.url", or "topics" with a list
    of tables); a value of None means "not given" (an unset command-line flag),
    a str value is parsed like an environment value. PURE: `env` is only read.
    Raises ConfigError naming the first bad key.
    """
    builder = _Builder()
    _apply_doc(builder, doc)
    _apply_env(builder, env)
    _apply_overrides(builder, overrides or {})
    # A variable under a known section that names no setting is a typo, unless it
    # is the variable configured to hold the JWT secret or the API key.
    secrets = {
        builder.current("auth", "jwt_secret_env"),
        builder.current("auth", "api_key_env"),
        builder.current("bus.redis", "password_env"),
        builder.current("bus.redis", "username_env"),
    }
    for var, guess in builder.unknown_env:
        if var not in secrets:
            section, _, key = guess.rpartition(".")
            hint = ""
            if section in _SPECS:
                close = difflib.get_close_matches(key, list(_SPECS[section]), n=1)
                hint = f"; did you mean {env_name(f'{section}.{close[0]}')}?" if close else ""
            raise ConfigError(guess, f"environment variable {var} names no setting{hint}")
    cfg = builder.build()
    _check_cross(cfg, env)
    return cfg


def _apply_doc(builder: _Builder, doc: Mapping[str, Any]) -> None:
    for name, table in doc.items():
        if name == "topics":
            builder.topics = _parse_topics(table, "")
        elif name in _TOP_SECTIONS:
            _apply_table(builder, name, table)
        else:
            known = [*_TOP_SECTIONS, "topics"]
            raise ConfigError(name, f"unknown section{_suggest(name, known)}")


def _apply_table(builder: _Builder, section: str, table: object) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(section, f"expected a table [{section}], got {table!r}")
    specs = _SPECS[section]
    for key, value in table.items():
        if section == "bus" and key == "redis":
            _apply_table(builder, "bus.redis", value)
        elif key in specs:
            builder.set(section, key, value, text=False, source="")
        else:
            raise ConfigError(
                f"{section}.{key}", f"unknown setting in [{section}]{_suggest(key, specs)}"
            )


def _apply_env(builder: _Builder, env: Mapping[str, str]) -> None:
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in IGNORED_ENV:
            continue
        text = env[var]
        if var == "FANOUT_TOPICS":
            builder.topics = _parse_topics(_json_topics(text, var), f" (from {var})")
            continue
        if var.startswith("FANOUT_TOPICS_"):
            builder.unknown_env.append((var, "topics." + var[len("FANOUT_TOPICS_") :].lower()))
            continue
        for prefix, section in _ENV_SECTIONS:
            if var.startswith(prefix):
                key = var[len(prefix) :].lower()
                if key in _SPECS[section]:
                    builder.set(section, key, text, text=True, source=f" (from {var})")
                else:
                    builder.unknown_env.append((var, f"{section}.{key}"))
                break


def _json_topics(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(
            "topics",
            f'expected a JSON array of objects like \'[{{"pattern": "prices.>", "max_hz": 10}}]\''
            f", got {text!r} (from {where})",
        ) from None


def _apply_overrides(builder: _Builder, overrides: Mapping[str, object]) -> None:
    source = " (from the command line)"
    for name, value in overrides.items():
        if value is None:
            continue
        if name == "topics":
            if isinstance(value, str):
                value = _json_topics(value, "the command line")
            builder.topics = _parse_topics(value, source)
            continue
        section, _, key = name.rpartition(".")
        if key not in _SPECS.get(section, {}):
            raise ConfigError(name, f"unknown setting{_suggest(name, setting_names())}{source}")
        builder.set(section, key, value, text=True, source=source)


def _parse_topics(value: object, source: str) -> tuple[TopicRule, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(
            "topics", f"expected an array of [[topics]] tables, got {value!r}{source}"
        )
    rules: list[TopicRule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        where = f"topics[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(
                where,
                f"expected a table with 'pattern', 'mode', 'max_hz', 'history', 'idle_expiry_s',"
                f" got {item!r}{source}",
            )
        for key in item:
            if key not in _TOPIC_SPECS:
                raise ConfigError(
                    f"{where}.{key}",
                    f"unknown setting in [[topics]]{_suggest(key, _TOPIC_SPECS)}{source}",
                )
        if "pattern" not in item:
            raise ConfigError(
                f"{where}.pattern", f"required: a topic pattern like 'prices.>'{source}"
            )
        values: dict[str, Any] = {}
        for key, raw in item.items():
            spec = _TOPIC_SPECS[key]
            try:
                values[key] = spec.convert(raw)
            except _Invalid:
                raise _bad(f"{where}.{key}", spec, raw, source) from None
        try:
            compile_pattern(values["pattern"], f"{where}.pattern")
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.message + source) from None
        rule = _make(TopicRule, values)
        if rule.mode == "state" and rule.history:
            raise ConfigError(
                f"{where}.history",
                f"history applies only to mode = 'stream' topics, got {rule.history!r}"
                f" for a state topic{source}",
            )
        if rule.pattern in seen:
            raise ConfigError(
                f"{where}.pattern",
                f"duplicate of topics[{seen[rule.pattern]}].pattern {rule.pattern!r}"
                f" (the first matching rule wins, so this one would never apply){source}",
            )
        seen[rule.pattern] = i
        rules.append(rule)
    return tuple(rules)


def _check_cross(cfg: Config, env: Mapping[str, str]) -> None:
    """Rules between settings, checked on the merged result."""
    w = cfg.workers
    if w.drain_s > w.graceful_timeout_s:
        raise ConfigError(
            "workers.drain_s",
            f"expected a number <= workers.graceful_timeout_s ({w.graceful_timeout_s!r}),"
            f" got {w.drain_s!r}",
        )
    for low, high in (
        ("restart_backoff_min_ms", "restart_backoff_max_ms"),
        ("retry_min_ms", "retry_max_ms"),
    ):
        lo, hi = getattr(w, low), getattr(w, high)
        if hi < lo:
            raise ConfigError(
                f"workers.{high}", f"expected an integer >= workers.{low} ({lo!r}), got {hi!r}"
            )
    _check_redis(cfg.bus.redis, env)
    r = cfg.rebalance
    if r.peer_ttl_s <= r.announce_interval_s:
        raise ConfigError(
            "rebalance.peer_ttl_s",
            f"expected a number > rebalance.announce_interval_s ({r.announce_interval_s!r}):"
            f" a live peer must announce before its entry expires, got {r.peer_ttl_s!r}",
        )
    a = cfg.auth
    if a.mode == "jwt" and not a.jwt_public_key_file and not a.jwks_file:
        if not a.jwt_secret_env:
            raise ConfigError(
                "auth.jwt_secret_env",
                "auth.mode is 'jwt' but no key is configured: set jwt_secret_env (HS256),"
                " jwt_public_key_file or jwks_file",
            )
        if not env.get(a.jwt_secret_env):
            raise ConfigError(
                "auth.jwt_secret_env",
                f"auth.mode is 'jwt' with an HS256 secret, but the environment variable"
                f" {a.jwt_secret_env} is not set (or set jwt_public_key_file or jwks_file)",
            )
        problem = hs256_secret_problem(env[a.jwt_secret_env], a.jwt_secret_env)
        if problem:
            raise ConfigError("auth.jwt_secret_env", problem)


def _check_redis(r: RedisConfig, env: Mapping[str, str]) -> None:
    """A password given twice is ambiguous; a CA file only applies to TLS."""
    if r.password_env and env.get(r.password_env) and url_has_password(r.url):
        raise ConfigError(
            "bus.redis.url",
            f"holds a password and {r.password_env} (bus.redis.password_env) is set too:"
            f" give it once, in {r.password_env}",
        )
    if r.tls_ca_file and not r.url.startswith("rediss://"):
        raise ConfigError(
            "bus.redis.tls_ca_file",
            f"applies only to a TLS URL (rediss://), got bus.redis.url = {redact_url(r.url)!r}",
        )


def redis_credentials(r: RedisConfig, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(username, password) for Redis AUTH from the environment variables that
    `bus.redis.username_env` / `password_env` name; None for an unset or empty one."""
    username = env.get(r.username_env) if r.username_env else None
    password = env.get(r.password_env) if r.password_env else None
    return username or None, password or None


def hs256_secret_problem(secret: str, var: str) -> str:
    """Why `secret` (held by the environment variable `var`) cannot be an HS256
    key, or "" if it can. Never quotes the secret."""
    size = len(secret.encode("utf-8", "surrogateescape"))
    if size >= MIN_HS256_SECRET_BYTES:
        return ""
    return (
        f"the HS256 secret in {var} is too short ({size} of at least"
        f" {MIN_HS256_SECRET_BYTES} bytes, RFC 7518 section 3.2): generate one with"
        f" `openssl rand -hex 32`"
    )


def read_config_file(path: str) -> dict[str, Any]:
    """The parsed TOML document at `path`; ConfigError("config", ...) if unreadable or invalid."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read config file {path}: {exc.strerror}") from None


def load_config(
    path: str | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Read the config file and apply `env` (default `os.environ`) and `overrides`.

    With `path` None: the file named by FANOUT_CONFIG if set (it must exist),
    else ./config.toml if it exists, else defaults only. An explicit file that
    is missing or not valid TOML is a ConfigError with key "config".
    """
    if env is None:
        env = os.environ
    if path is None:
        path = env.get(ENV_CONFIG) or None
        if path is None and os.path.isfile(DEFAULT_PATH):
            path = DEFAULT_PATH
    doc = read_config_file(path) if path is not None else {}
    return parse_config(doc, env, overrides)


# ---- dump_toml ------------------------------------------------------------


def _toml_str(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:  # lone surrogate (os.environ surrogateescape)
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(cfg: Config) -> str:
    """The effective configuration as TOML (what `fanout check-config` prints).

    Every setting is written, defaults included; `tomllib.loads` of the result
    fed to `parse_config` gives back an equal Config, except a password in
    `bus.redis.url`, which is written as `***` (`redact_url`).
    """
    lines = ["# fanout: effective configuration (defaults < config file < environment < flags)"]
    for section, cls in _SECTIONS.items():
        obj: object = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        lines.append("")
        lines.append(f"[{section}]")
        for f in fields(cls):
            if _SPEC in f.metadata:
                value = getattr(obj, f.name)
                if section == "bus.redis" and f.name == "url":
                    value = redact_url(value)  # printed: never the password
                lines.append(f"{f.name} = {_toml_value(value)}")
    for rule in cfg.topics:
        lines.append("")
        lines.append("[[topics]]")
        for f in fields(TopicRule):
            lines.append(f"{f.name} = {_toml_value(getattr(rule, f.name))}")
    return "\n".join(lines) + "\n"
