"""Per-topic rules: which `[[topics]]` entry applies to a topic. PURE: no I/O.

Rules this module owns:

1. A topic's rule is the first `[[topics]]` entry whose pattern matches it
   (engine/patterns.py), else `DEFAULT_RULE`.
2. The answers are cached per topic name, at most `max_cached` of them: topic
   names come from clients, so the cache is cleared when full rather than
   grown (a clear costs only re-matching).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from engine.config import TopicRule
from engine.patterns import compile_pattern

DEFAULT_RULE: Final = TopicRule(pattern=">", mode="state", max_hz=0.0, history=0, idle_expiry_s=0.0)
"""The rule of a topic no `[[topics]]` entry matches: state topic, no rate cap, no
history, never expires."""


class TopicRules:
    """The `[[topics]]` rules of a config, looked up by topic name.

    `rule_for` returns the first rule whose pattern matches, else `DEFAULT_RULE`.
    Answers are cached per topic name in a dict bounded by `max_cached` entries;
    when it is full it is cleared (topic names come from clients, so the cache
    must not grow without limit, and a clear costs only re-matching).
    Not thread-safe; one instance per event loop.
    """

    __slots__ = ("_cache", "_compiled", "_max_cached", "rules")

    def __init__(self, rules: Sequence[TopicRule], *, max_cached: int = 65_536) -> None:
        self.rules: tuple[TopicRule, ...] = tuple(rules)
        self._compiled = tuple(
            (compile_pattern(rule.pattern, f"topics[{i}].pattern"), rule)
            for i, rule in enumerate(self.rules)
        )
        self._cache: dict[str, TopicRule] = {}
        self._max_cached = max(1, max_cached)

    def rule_for(self, topic: str) -> TopicRule:
        """The rule for `topic`: the first matching rule, or `DEFAULT_RULE`."""
        rule = self._cache.get(topic)
        if rule is not None:
            return rule
        rule = DEFAULT_RULE
        for pattern, candidate in self._compiled:
            if pattern.matches(topic):
                rule = candidate
                break
        if len(self._cache) >= self._max_cached:
            self._cache.clear()
        self._cache[topic] = rule
        return rule

    def history_of(self, topic: str) -> int | None:
        """The `history` of `topic` if its rule makes it a stream topic, else None."""
        rule = self.rule_for(topic)
        return rule.history if rule.mode == "stream" else None

    def idle_expiry_of(self, topic: str) -> float:
        """Seconds after its last publish the bus removes `topic` (0: never)."""
        return self.rule_for(topic).idle_expiry_s

    def cached(self) -> int:
        """How many topic names the cache holds now (for tests and stats)."""
        return len(self._cache)
