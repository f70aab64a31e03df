"""engine.config: sources and precedence, types and ranges, errors that name the key,
dump_toml round trip, load_config file handling, and config.toml kept in step with code."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from engine.config import (
    Config,
    TopicRule,
    default_config,
    dump_toml,
    env_name,
    load_config,
    parse_config,
    setting_names,
)
from engine.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_TOML = REPO_ROOT / "config.toml"


def parse(
    doc: dict[str, Any] | None = None, env: dict[str, str] | None = None, **ov: object
) -> Config:
    overrides = {k.replace("__", "."): v for k, v in ov.items()}
    return parse_config(doc or {}, env or {}, overrides)


def error_of(
    doc: dict[str, Any] | None = None, env: dict[str, str] | None = None, **ov: object
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(doc, env, **ov)
    return info.value


def section_of(cfg: Config, section: str) -> Any:
    obj: Any = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    return obj


# ---- defaults --------------------------------------------------------------


def test_empty_sources_give_the_documented_defaults() -> None:
    cfg = parse()
    assert cfg == default_config()
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.port == 8000
    assert cfg.server.path == "/ws"
    assert cfg.server.allowed_origins == ()
    assert cfg.server.admin_host == "127.0.0.1"
    assert cfg.server.admin_port == 8001
    assert cfg.server.node == ""
    assert cfg.workers.count == 0
    assert cfg.workers.graceful_timeout_s == 30.0
    assert cfg.workers.drain_s == 5.0
    assert cfg.workers.retry_min_ms == 500
    assert cfg.workers.retry_max_ms == 5000
    assert cfg.fanout.flush_interval_ms == 20
    assert cfg.fanout.max_buffer_bytes == 262144
    assert cfg.fanout.socket_notsent_lowat_bytes == 16384
    assert cfg.limits.max_message_bytes == 65536
    assert cfg.limits.max_publish_items == 1000
    assert cfg.auth.mode == "none"
    assert cfg.auth.jwt_secret_env == "FANOUT_JWT_SECRET"
    assert cfg.auth.api_key_env == "FANOUT_API_KEY"
    assert cfg.auth.allow_anonymous_publish is False
    assert cfg.bus.backend == "local"
    assert cfg.bus.shards == 16
    assert cfg.bus.hub_max_buffer_bytes == 64 * 1024 * 1024
    assert cfg.bus.redis.url == "redis://127.0.0.1:6379/0"
    assert cfg.bus.redis.stream_maxlen == 100000
    assert cfg.bus.redis.prefix == "fanout"
    assert cfg.log.level == "info"
    assert cfg.log.format == "text"
    assert cfg.topics == ()


def test_float_settings_are_floats_even_when_given_as_ints() -> None:
    cfg = parse({"workers": {"graceful_timeout_s": 12}, "limits": {"messages_per_s": 7}})
    assert cfg.workers.graceful_timeout_s == 12.0
    assert isinstance(cfg.workers.graceful_timeout_s, float)
    assert isinstance(cfg.limits.messages_per_s, float)
    assert isinstance(default_config().fanout.ping_interval_s, float)


def test_sections_are_frozen_and_replace_works() -> None:
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    faster = dataclasses.replace(cfg, fanout=dataclasses.replace(cfg.fanout, flush_interval_ms=5))
    assert faster.fanout.flush_interval_ms == 5
    assert cfg.fanout.flush_interval_ms == 20
    redis = dataclasses.replace(cfg.bus.redis, url="redis://h:1/0")
    assert dataclasses.replace(cfg.bus, redis=redis).redis.url == "redis://h:1/0"


def test_resolved_worker_count_and_node_name() -> None:
    cfg = default_config()
    assert cfg.resolved_worker_count(6) == 6
    assert cfg.resolved_worker_count(0) == 1
    assert parse(workers__count=3).resolved_worker_count(6) == 3
    assert cfg.node_name("host-a") == "host-a"
    assert parse({"server": {"node": "eu-1"}}).node_name("host-a") == "eu-1"


# ---- types and ranges ------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "port", "abc", "expected an integer 0..65535, got 'abc'"),
        ("server", "port", 65536, "expected an integer 0..65535, got 65536"),
        ("server", "port", -1, "expected an integer 0..65535, got -1"),
        ("server", "port", 80.0, "expected an integer 0..65535, got 80.0"),
        ("server", "port", True, "expected an integer 0..65535, got True"),
        ("server", "admin_port", 70000, "expected an integer 0..65535, got 70000"),
        ("server", "path", "ws", "expected a path starting with '/', got 'ws'"),
        ("server", "host", "", "expected a host name or IP address, got ''"),
        ("server", "node", 5, "expected a string, got 5"),
        ("workers", "count", 257, "expected an integer 0..256, got 257"),
        ("workers", "graceful_timeout_s", 0, "expected a number > 0, got 0"),
        ("workers", "drain_s", -1, "expected a number >= 0, got -1"),
        ("workers", "heartbeat_timeout_s", 0.5, "expected a number >= 1, got 0.5"),
        ("workers", "max_boot_failures", 0, "expected an integer >= 1, got 0"),
        ("fanout", "flush_interval_ms", 0, "expected an integer 1..1000, got 0"),
        ("fanout", "flush_interval_ms", 1001, "expected an integer 1..1000, got 1001"),
        ("fanout", "max_buffer_bytes", 4095, "expected an integer >= 4096, got 4095"),
        ("fanout", "ping_timeout_s", "20", "expected a number > 0, got '20'"),
        ("fanout", "socket_notsent_lowat_bytes", -1, "expected an integer >= 0, got -1"),
        ("limits", "max_message_bytes", 255, "expected an integer 256..16777216, got 255"),
        (
            "limits",
            "max_message_bytes",
            16 * 1024 * 1024 + 1,
            "expected an integer 256..16777216, got 16777217",
        ),
        ("limits", "messages_per_s", 0, "expected a number > 0, got 0"),
        ("limits", "messages_per_s", float("inf"), "expected a number > 0, got inf"),
        ("limits", "messages_per_s", float("nan"), "expected a number > 0, got nan"),
        ("limits", "max_connections", 0, "expected an integer >= 1, got 0"),
        ("limits", "max_publish_items", 0, "expected an integer >= 1, got 0"),
        ("auth", "mode", "oauth", "expected one of 'none', 'jwt', got 'oauth'"),
        ("auth", "allow_anonymous_publish", 1, "expected true or false, got 1"),
        ("auth", "allow_anonymous_publish", "true", "expected true or false, got 'true'"),
        ("auth", "jwt_secret_env", "my secret!", "expected an environment variable name"),
        ("bus", "backend", "kafka", "expected one of 'local', 'redis', got 'kafka'"),
        ("bus", "shards", 0, "expected an integer 1..1024, got 0"),
        ("bus", "shards", 1025, "expected an integer 1..1024, got 1025"),
        ("log", "level", "verbose", "expected one of 'debug', 'info', 'warning', 'error'"),
        ("log", "format", "xml", "expected one of 'text', 'json', got 'xml'"),
        ("server", "allowed_origins", "https://a.example", "expected a list of origins"),
        ("server", "allowed_origins", ["a.example"], "expected a list of origins"),
        ("server", "allowed_origins", ["https://a.example/path"], "expected a list of origins"),
        ("server", "allowed_origins", ["https://a.example:99999"], "expected a list of origins"),
    ],
)
def test_bad_value_in_file_names_key_expectation_and_value(
    section: str, key: str, value: object, expected: str
) -> None:
    err = error_of({section: {key: value}})
    assert err.key == f"{section}.{key}"
    assert expected in err.message
    assert str(err).startswith(f"config: {section}.{key}: ")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "url",
            "http://localhost:6379",
            "expected a URL starting with redis://, rediss:// or unix://",
        ),
        ("stream_maxlen", 0, "expected an integer >= 1, got 0"),
        ("prefix", "fan{out}", "expected 1..64 characters"),
        ("cluster", "no", "expected true or false, got 'no'"),
    ],
)
def test_bad_value_in_bus_redis_names_the_nested_key(
    key: str, value: object, expected: str
) -> None:
    err = error_of({"bus": {"redis": {key: value}}})
    assert err.key == f"bus.redis.{key}"
    assert expected in err.message


def test_range_edges_are_accepted() -> None:
    cfg = parse(
        {
            "server": {"port": 0, "admin_port": 65535},
            "workers": {"count": 256, "drain_s": 0, "heartbeat_timeout_s": 1},
            "fanout": {
                "flush_interval_ms": 1000,
                "max_buffer_bytes": 4096,
                "socket_notsent_lowat_bytes": 0,
            },
            "limits": {"max_message_bytes": 16 * 1024 * 1024, "max_connections_per_ip": 0},
            "bus": {"shards": 1024},
        }
    )
    assert cfg.server.port == 0
    assert cfg.server.admin_port == 65535
    assert cfg.workers.count == 256
    assert cfg.fanout.flush_interval_ms == 1000
    assert cfg.limits.max_message_bytes == 16 * 1024 * 1024
    assert cfg.bus.shards == 1024


def test_choices_are_case_insensitive_and_stored_lower_case() -> None:
    cfg = parse({"log": {"level": "DEBUG", "format": "Json"}, "auth": {"mode": "NONE"}})
    assert (cfg.log.level, cfg.log.format, cfg.auth.mode) == ("debug", "json", "none")


def test_allowed_origins_are_a_lower_cased_tuple() -> None:
    origins = [
        "https://App.Example.com",
        "https://*.example.com",
        "http://localhost:3000",
        "http://[::1]:8080",
    ]
    cfg = parse({"server": {"allowed_origins": origins}})
    assert cfg.server.allowed_origins == (
        "https://app.example.com",
        "https://*.example.com",
        "http://localhost:3000",
        "http://[::1]:8080",
    )


# ---- cross-field rules ------------------------------------------------------


def test_drain_longer_than_graceful_timeout_is_refused() -> None:
    err = error_of({"workers": {"graceful_timeout_s": 10, "drain_s": 11}})
    assert err.key == "workers.drain_s"
    assert "workers.graceful_timeout_s (10.0)" in err.message
    assert "got 11.0" in err.message
    assert parse({"workers": {"graceful_timeout_s": 10, "drain_s": 10}}).workers.drain_s == 10.0


@pytest.mark.parametrize(
    ("low", "high"),
    [("restart_backoff_min_ms", "restart_backoff_max_ms"), ("retry_min_ms", "retry_max_ms")],
)
def test_max_below_min_is_refused_naming_the_max(low: str, high: str) -> None:
    err = error_of({"workers": {low: 2000, high: 1000}})
    assert err.key == f"workers.{high}"
    assert f"workers.{low} (2000)" in err.message
    assert "got 1000" in err.message


def test_cross_rule_applies_to_merged_sources() -> None:
    # file sets drain_s 20 (fine with the default 30), the environment lowers the timeout
    err = error_of({"workers": {"drain_s": 20}}, {"FANOUT_WORKERS_GRACEFUL_TIMEOUT_S": "15"})
    assert err.key == "workers.drain_s"


def test_jwt_mode_needs_a_key() -> None:
    err = error_of({"auth": {"mode": "jwt"}})
    assert err.key == "auth.jwt_secret_env"
    assert "FANOUT_JWT_SECRET" in err.message
    secret = "s3cret-of-at-least-32-bytes-0123456789"
    assert parse({"auth": {"mode": "jwt"}}, {"FANOUT_JWT_SECRET": secret}).auth.mode == "jwt"
    assert parse({"auth": {"mode": "jwt", "jwks_file": "/etc/fanout/jwks.json"}}).auth.mode == "jwt"
    err = error_of({"auth": {"mode": "jwt", "jwt_secret_env": ""}})
    assert err.key == "auth.jwt_secret_env"
    assert "no key is configured" in err.message


# ---- unknown names ------------------------------------------------------------


def test_unknown_section_is_an_error_with_a_suggestion() -> None:
    err = error_of({"sever": {"port": 1}})
    assert err.key == "sever"
    assert "unknown section" in err.message
    assert "'server'" in err.message


def test_unknown_key_is_an_error_with_a_suggestion() -> None:
    err = error_of({"fanout": {"flush_interval": 10}})
    assert err.key == "fanout.flush_interval"
    assert "unknown setting" in err.message
    assert "'flush_interval_ms'" in err.message
    err = error_of({"bus": {"redis": {"uri": "redis://x"}}})
    assert err.key == "bus.redis.uri"


def test_a_section_must_be_a_table() -> None:
    err = error_of({"server": 5})
    assert err.key == "server"
    assert "expected a table [server], got 5" in err.message


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, {}, {"server.prot": 1})
    assert info.value.key == "server.prot"
    assert "'server.port'" in info.value.message


# ---- environment ---------------------------------------------------------------


def test_env_names_follow_section_and_key() -> None:
    assert env_name("server.admin_port") == "FANOUT_SERVER_ADMIN_PORT"
    assert env_name("bus.redis.url") == "FANOUT_BUS_REDIS_URL"
    assert env_name("fanout.flush_interval_ms") == "FANOUT_FANOUT_FLUSH_INTERVAL_MS"


def test_every_setting_can_be_set_from_the_environment() -> None:
    cfg = default_config()
    for name in setting_names():
        section, _, key = name.rpartition(".")
        value = getattr(section_of(cfg, section), key)
        text = json.dumps(list(value)) if isinstance(value, tuple) else str(value)
        got = parse(env={env_name(name): text})
        assert getattr(section_of(got, section), key) == value, name


def test_env_values_are_parsed_by_type() -> None:
    cfg = parse(
        env={
            "FANOUT_SERVER_ADMIN_PORT": "9001",
            "FANOUT_BUS_REDIS_URL": "redis://redis:6379/1",
            "FANOUT_BUS_REDIS_CLUSTER": "yes",
            "FANOUT_WORKERS_DRAIN_S": "2.5",
            "FANOUT_LIMITS_MESSAGES_PER_S": "100",
            "FANOUT_AUTH_ALLOW_ANONYMOUS_PUBLISH": "TRUE",
            "FANOUT_SERVER_NODE": "",
            "FANOUT_LOG_FORMAT": "json",
        }
    )
    assert cfg.server.admin_port == 9001
    assert cfg.bus.redis.url == "redis://redis:6379/1"
    assert cfg.bus.redis.cluster is True
    assert cfg.workers.drain_s == 2.5
    assert cfg.limits.messages_per_s == 100.0
    assert cfg.auth.allow_anonymous_publish is True
    assert cfg.log.format == "json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("1", True),
        ("Yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("NO", False),
        ("off", False),
    ],
)
def test_env_booleans(text: str, expected: bool) -> None:
    assert parse(env={"FANOUT_BUS_REDIS_CLUSTER": text}).bus.redis.cluster is expected


def test_env_list_is_a_json_array() -> None:
    cfg = parse(
        env={"FANOUT_SERVER_ALLOWED_ORIGINS": '["https://a.example", "https://*.b.example"]'}
    )
    assert cfg.server.allowed_origins == ("https://a.example", "https://*.b.example")
    assert parse(env={"FANOUT_SERVER_ALLOWED_ORIGINS": "[]"}).server.allowed_origins == ()


@pytest.mark.parametrize(
    ("var", "text", "key", "expected"),
    [
        ("FANOUT_SERVER_PORT", "abc", "server.port", "expected an integer 0..65535, got 'abc'"),
        ("FANOUT_SERVER_PORT", "80.5", "server.port", "got '80.5'"),
        ("FANOUT_SERVER_PORT", "99999", "server.port", "got '99999'"),
        ("FANOUT_WORKERS_DRAIN_S", "soon", "workers.drain_s", "expected a number >= 0, got 'soon'"),
        ("FANOUT_WORKERS_DRAIN_S", "nan", "workers.drain_s", "got 'nan'"),
        (
            "FANOUT_BUS_REDIS_CLUSTER",
            "maybe",
            "bus.redis.cluster",
            "expected true or false, got 'maybe'",
        ),
        (
            "FANOUT_SERVER_ALLOWED_ORIGINS",
            "https://a.example",
            "server.allowed_origins",
            "JSON array",
        ),
        (
            "FANOUT_SERVER_ALLOWED_ORIGINS",
            '"https://a.example"',
            "server.allowed_origins",
            "JSON array",
        ),
        ("FANOUT_LOG_LEVEL", "loud", "log.level", "expected one of"),
    ],
)
def test_bad_env_value_names_key_and_variable(var: str, text: str, key: str, expected: str) -> None:
    err = error_of(env={var: text})
    assert err.key == key
    assert expected in err.message
    assert f"(from {var})" in err.message


def test_env_variable_naming_no_setting_is_an_error() -> None:
    err = error_of(env={"FANOUT_SERVER_PROT": "9000"})
    assert err.key == "server.prot"
    assert "FANOUT_SERVER_PROT" in err.message
    assert "FANOUT_SERVER_PORT" in err.message  # the suggestion
    assert error_of(env={"FANOUT_BUS_REDIS_URI": "x"}).key == "bus.redis.uri"
    assert "FANOUT_BUS_REDIS" in error_of(env={"FANOUT_BUS_REDIS": "x"}).message
    assert "FANOUT_TOPICS_X" in error_of(env={"FANOUT_TOPICS_X": "[]"}).message


def test_env_variables_that_are_not_settings_are_ignored() -> None:
    env = {
        "FANOUT_CONFIG": "/nonexistent.toml",
        "FANOUT_JWT_SECRET": "s",
        "FANOUT_API_KEY": "k",
        "FANOUT_RUN_DIR": "/tmp/x",
        "FANOUT_TEST_TIMEOUT_FACTOR": "3",  # unknown section
        "fanout_server_port": "1",  # not upper case: not ours
        "PATH": "/usr/bin",
    }
    assert parse(env=env) == default_config()


def test_configured_secret_variables_are_not_mistaken_for_settings() -> None:
    doc = {
        "auth": {
            "mode": "jwt",
            "jwt_secret_env": "FANOUT_AUTH_SECRET",
            "api_key_env": "FANOUT_AUTH_KEY",
        }
    }
    secret = "s3cret-of-at-least-32-bytes-0123456789"
    cfg = parse(doc, {"FANOUT_AUTH_SECRET": secret, "FANOUT_AUTH_KEY": "k"})
    assert cfg.auth.jwt_secret_env == "FANOUT_AUTH_SECRET"


def test_env_topics_is_a_json_array_of_objects() -> None:
    text = json.dumps(
        [
            {"pattern": "prices.>", "max_hz": 10},
            {"pattern": "trades.*", "mode": "stream", "history": 50},
        ]
    )
    cfg = parse({"topics": [{"pattern": "old"}]}, {"FANOUT_TOPICS": text})
    assert cfg.topics == (
        TopicRule("prices.>", "state", 10.0, 0),
        TopicRule("trades.*", "stream", 0.0, 50),
    )
    assert parse({"topics": [{"pattern": "old"}]}, {"FANOUT_TOPICS": "[]"}).topics == ()


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("prices.>", "topics", "expected a JSON array of objects"),
        ('{"pattern": "a"}', "topics", "expected an array of [[topics]] tables"),
        ('["a"]', "topics[0]", "expected a table"),
        ('[{"pattern": "a", "hz": 1}]', "topics[0].hz", "unknown setting in [[topics]]"),
        ('[{"pattern": "a", "max_hz": -1}]', "topics[0].max_hz", "expected a number >= 0, got -1"),
        ('[{"pattern": "a.>.b"}]', "topics[0].pattern", "'>' must be the last segment"),
    ],
)
def test_bad_env_topics_name_the_entry_and_the_variable(text: str, key: str, expected: str) -> None:
    err = error_of(env={"FANOUT_TOPICS": text})
    assert err.key == key
    assert expected in err.message
    assert "FANOUT_TOPICS" in err.message


# ---- precedence -------------------------------------------------------------------


def test_precedence_defaults_file_env_overrides() -> None:
    doc = {"server": {"port": 1111, "admin_port": 2222, "node": "file"}, "workers": {"count": 2}}
    env = {"FANOUT_SERVER_ADMIN_PORT": "3333", "FANOUT_SERVER_NODE": "env"}
    cfg = parse_config(doc, env, {"server.node": "flag"})
    assert cfg.server.host == "0.0.0.0"  # default
    assert cfg.server.port == 1111  # file
    assert cfg.workers.count == 2  # file
    assert cfg.server.admin_port == 3333  # env over file
    assert cfg.server.node == "flag"  # override over env over file


def test_overrides_accept_typed_values_and_text_and_skip_none() -> None:
    cfg = parse_config(
        {},
        {"FANOUT_WORKERS_COUNT": "4"},
        {
            "workers.count": None,
            "server.port": 9000,
            "fanout.flush_interval_ms": "7",
            "bus.redis.url": "redis://o:1/0",
        },
    )
    assert cfg.workers.count == 4  # None = flag not given
    assert cfg.server.port == 9000
    assert cfg.fanout.flush_interval_ms == 7
    assert cfg.bus.redis.url == "redis://o:1/0"


def test_bad_override_names_key_and_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, {}, {"workers.count": "many"})
    assert info.value.key == "workers.count"
    assert "got 'many' (from the command line)" in info.value.message


def test_topics_override_replaces_topics() -> None:
    cfg = parse_config(
        {"topics": [{"pattern": "a"}]}, {}, {"topics": [{"pattern": "b", "max_hz": 2}]}
    )
    assert cfg.topics == (TopicRule("b", "state", 2.0, 0),)


# ---- [[topics]] in the file --------------------------------------------------------------


def test_topics_in_file_keep_their_order_and_defaults() -> None:
    cfg = parse(
        {
            "topics": [
                {"pattern": "prices.>", "max_hz": 10},
                {"pattern": "news", "mode": "stream", "history": 100},
            ]
        }
    )
    assert cfg.topics == (
        TopicRule("prices.>", "state", 10.0, 0),
        TopicRule("news", "stream", 0.0, 100),
    )


@pytest.mark.parametrize(
    ("topics", "key", "expected"),
    [
        ([{"mode": "stream"}], "topics[0].pattern", "required"),
        ([{"pattern": "a"}, {"pattern": ""}], "topics[1].pattern", "expected a topic pattern"),
        ([{"pattern": "a.b*"}], "topics[0].pattern", "wildcards must be whole segments"),
        (
            [{"pattern": "a", "mode": "queue"}],
            "topics[0].mode",
            "expected one of 'state', 'stream'",
        ),
        ([{"pattern": "a", "history": -1}], "topics[0].history", "expected an integer 0..1000000"),
        ([{"pattern": "a", "history": 5}], "topics[0].history", "only to mode = 'stream'"),
        (
            [{"pattern": "a", "mode": "stream", "history": 1_000_001}],
            "topics[0].history",
            "expected an integer 0..1000000, got 1000001",
        ),
        (
            [{"pattern": "a"}, {"pattern": "a", "max_hz": 1}],
            "topics[1].pattern",
            "duplicate of topics[0]",
        ),
        ({"pattern": "a"}, "topics", "expected an array of [[topics]] tables"),
    ],
)
def test_bad_topics_in_file_name_the_entry(topics: object, key: str, expected: str) -> None:
    err = error_of({"topics": topics})
    assert err.key == key
    assert expected in err.message


# ---- dump_toml -------------------------------------------------------------------------


def test_dump_toml_round_trips_the_defaults() -> None:
    text = dump_toml(default_config())
    assert parse_config(tomllib.loads(text), {}, {}) == default_config()


def test_dump_toml_round_trips_every_setting_changed() -> None:
    doc = {
        "server": {
            "host": "::",
            "port": 0,
            "path": "/live/ws",
            "allowed_origins": ["https://a.example", "https://*.b.example:8443"],
            "admin_host": "0.0.0.0",
            "admin_port": 0,
            "node": 'n\u00e9ud "1"\\\t\x7f',
        },
        "workers": {
            "count": 3,
            "graceful_timeout_s": 12.5,
            "drain_s": 1e-3,
            "retry_min_ms": 1,
            "retry_max_ms": 2,
        },
        "fanout": {"flush_interval_ms": 7, "ping_interval_s": 1e6},
        "limits": {"messages_per_s": 0.1},
        "auth": {
            "mode": "jwt",
            "jwks_file": "/etc/jwks.json",
            "issuer": "me",
            "allow_anonymous_publish": True,
        },
        "bus": {
            "backend": "redis",
            "shards": 3,
            "redis": {
                "url": "rediss://u@h:1/2",
                "cluster": True,
                "prefix": "x:y",
                "password_env": "REDIS_PW",
                "tls_ca_file": "/etc/ca.pem",
            },
        },
        "log": {"level": "debug", "format": "json"},
        "topics": [
            {"pattern": "prices.>", "max_hz": 10},
            {"pattern": "trades.*.eu", "mode": "stream", "history": 1000},
        ],
    }
    cfg = parse(doc)
    text = dump_toml(cfg)
    again = parse_config(tomllib.loads(text), {}, {})
    assert again == cfg
    assert again.server.node == 'n\u00e9ud "1"\\\t\x7f'
    assert dump_toml(again) == text


def test_dump_toml_writes_every_setting() -> None:
    doc = tomllib.loads(dump_toml(default_config()))
    for name in setting_names():
        table: Any = doc
        section, _, key = name.rpartition(".")
        for part in section.split("."):
            table = table[part]
        assert key in table, name


# ---- load_config -----------------------------------------------------------------------


def test_load_config_reads_the_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fanout.toml"
    path.write_text('[server]\nport = 9100\nnode = "file"\n[[topics]]\npattern = "a.>"\n')
    cfg = load_config(str(path), {"FANOUT_SERVER_NODE": "env"}, {"workers.count": 2})
    assert cfg.server.port == 9100
    assert cfg.server.node == "env"
    assert cfg.workers.count == 2
    assert cfg.topics == (TopicRule("a.>"),)


def test_load_config_uses_fanout_config_variable(tmp_path: Path) -> None:
    path = tmp_path / "from-env.toml"
    path.write_text("[bus]\nshards = 4\n")
    assert load_config(None, {"FANOUT_CONFIG": str(path)}).bus.shards == 4


def test_load_config_falls_back_to_cwd_config_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(None, {}) == default_config()
    (tmp_path / "config.toml").write_text('[log]\nlevel = "warning"\n')
    assert load_config(None, {}).log.level == "warning"


def test_load_config_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert info.value.key == "config"
    assert "not found" in info.value.message
    assert missing in info.value.message
    with pytest.raises(ConfigError) as info:
        load_config(None, {"FANOUT_CONFIG": missing})
    assert missing in info.value.message


def test_load_config_toml_syntax_error_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.key == "config"
    assert str(path) in info.value.message
    assert "not valid TOML" in info.value.message
    assert "line 2" in info.value.message


def test_load_config_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {})
    assert info.value.key == "config"
    assert str(tmp_path) in info.value.message


def test_load_config_value_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "fanout.toml"
    path.write_text("[fanout]\nflush_interval_ms = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.key == "fanout.flush_interval_ms"


# ---- config.toml at the repository root: docs and code cannot drift ---------------------------


def test_repo_config_toml_is_exactly_the_defaults() -> None:
    doc = tomllib.loads(CONFIG_TOML.read_text())
    assert parse_config(doc, {}, {}) == default_config()


def test_repo_config_toml_spells_out_every_setting() -> None:
    doc = tomllib.loads(CONFIG_TOML.read_text())
    missing = []
    for name in setting_names():
        table: Any = doc
        section, _, key = name.rpartition(".")
        for part in section.split("."):
            table = table.get(part, {})
        if key not in table:
            missing.append(name)
    assert missing == []


def test_repo_config_toml_comments_every_setting() -> None:
    lines = CONFIG_TOML.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")):
            assert lines[i - 1].startswith("#") or lines[i - 1].split("=")[0].strip().endswith(
                "_min_ms"
            ), f"no comment above: {line}"


def test_repo_config_toml_topics_example_is_valid() -> None:
    text = CONFIG_TOML.read_text()
    example = text.split('# Example (remove the leading "# " to use it):\n', 1)[1]
    uncommented = "\n".join(
        line.removeprefix("#").removeprefix(" ") for line in example.splitlines()
    )
    cfg = parse_config(tomllib.loads(uncommented), {}, {})
    assert cfg.topics == (
        TopicRule("prices.>", "state", 10.0, 0),
        TopicRule("trades.*", "stream", 0.0, 1000),
    )


def test_token_leeway_is_bounded_so_a_token_cannot_outlive_its_exp_by_far() -> None:
    assert parse(auth__leeway_s=300).auth.leeway_s == 300
    for bad in (-1, 301, 86_400):
        assert "auth.leeway_s" in str(error_of(auth__leeway_s=bad))
