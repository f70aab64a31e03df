"""engine.patterns: pattern syntax and matching; engine.topics: TopicRules lookup
with its bounded cache."""

from __future__ import annotations

import pytest

from engine.config import TopicRule
from engine.errors import ConfigError
from engine.patterns import Pattern, compile_pattern
from engine.topics import DEFAULT_RULE, TopicRules


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("prices.fx", "prices.fx", True),
        ("prices.fx", "prices.fx.eu", False),
        ("prices.fx", "prices", False),
        ("prices.fx", "prices.fxx", False),
        ("prices.>", "prices.fx", True),
        ("prices.>", "prices.fx.eu", True),
        ("prices.>", "prices", False),
        ("prices.>", "pricesx.fx", False),
        ("prices.>", "other.prices.fx", False),
        ("prices.*", "prices.fx", True),
        ("prices.*", "prices.fx.eu", False),
        ("prices.*", "prices", False),
        ("prices.*.eu", "prices.fx.eu", True),
        ("prices.*.eu", "prices.fx.us", False),
        ("prices.*.eu", "prices.eu", False),
        ("*.fx", "prices.fx", True),
        ("*.fx", "fx", False),
        ("*", "prices", True),
        ("*", "prices.fx", False),
        (">", "prices", True),
        (">", "prices.fx.eu", True),
        ("*.>", "prices", False),
        ("*.>", "prices.fx", True),
        ("a.*.c.>", "a.b.c.d", True),
        ("a.*.c.>", "a.b.c", False),
        ("a.*.c.>", "a.b.x.d", False),
        ("user:42.*", "user:42.inbox", True),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert compile_pattern(pattern).matches(topic) is expected


def test_empty_segments_of_a_topic_are_segments() -> None:
    # topic names may contain "..": str.split semantics, documented in the module
    assert compile_pattern("a.*.b").matches("a..b")
    assert compile_pattern("a.>").matches("a.")


def test_literal_flag() -> None:
    assert compile_pattern("prices.fx").literal
    assert not compile_pattern("prices.*").literal
    assert not compile_pattern("prices.>").literal


def test_compiled_pattern_is_a_value() -> None:
    p = compile_pattern("prices.*.eu")
    assert isinstance(p, Pattern)
    assert p.text == "prices.*.eu"
    assert p.segments == ("prices", None, "eu")
    assert p.tail is False
    assert compile_pattern("prices.>").segments == ("prices",)
    assert compile_pattern("prices.>").tail is True
    assert compile_pattern("prices.*.eu") == p


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "1..200 characters"),
        ("a" * 201, "1..200 characters"),
        ("a.>.b", "'>' must be the last segment"),
        (">.a", "'>' must be the last segment"),
        ("a..b", "empty segment"),
        (".a", "empty segment"),
        ("a.", "empty segment"),
        ("a*", "wildcards must be whole segments"),
        ("a.b>", "wildcards must be whole segments"),
        ("a b", "may only hold A-Z a-z 0-9 _ : -"),
        ("a/b", "may only hold"),
        ("prices.é", "may only hold"),
    ],
)
def test_bad_patterns_are_config_errors_naming_the_key(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_pattern(pattern, "auth.claims")
    assert info.value.key == "auth.claims"
    assert "expected a topic pattern" in info.value.message
    assert reason in info.value.message
    assert repr(pattern) in info.value.message


def test_non_string_pattern_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        compile_pattern(5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        compile_pattern(["a"])  # type: ignore[arg-type]  # unhashable: still a ConfigError
    assert info.value.key == "pattern"
    assert "got 5" in info.value.message


def test_rule_for_returns_the_first_matching_rule() -> None:
    rules = TopicRules(
        [
            TopicRule("prices.fx.eu", max_hz=1),
            TopicRule("prices.>", max_hz=10),
            TopicRule("trades.*", mode="stream", history=100),
        ]
    )
    assert rules.rule_for("prices.fx.eu").max_hz == 1.0
    assert rules.rule_for("prices.fx.us").max_hz == 10.0
    assert rules.rule_for("trades.btc") == TopicRule("trades.*", "stream", 0.0, 100)
    assert rules.rule_for("trades.btc.x") is DEFAULT_RULE
    assert rules.rule_for("news") is DEFAULT_RULE


def test_default_rule_is_a_state_topic_without_cap_or_history() -> None:
    rule = TopicRules([]).rule_for("anything")
    assert (rule.mode, rule.max_hz, rule.history) == ("state", 0.0, 0)


def test_cache_is_bounded_and_answers_stay_right_after_clearing() -> None:
    rules = TopicRules([TopicRule("a.>", max_hz=5)], max_cached=100)
    for i in range(1000):
        assert rules.rule_for(f"a.{i}").max_hz == 5.0
        assert rules.rule_for(f"b.{i}") is DEFAULT_RULE
        assert rules.cached() <= 100
    assert rules.rule_for("a.1").max_hz == 5.0


def test_bad_rule_pattern_names_its_index() -> None:
    with pytest.raises(ConfigError) as info:
        TopicRules([TopicRule("ok"), TopicRule("bad.>.x")])
    assert info.value.key == "topics[1].pattern"
