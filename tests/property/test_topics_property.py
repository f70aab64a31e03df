"""engine.patterns: pattern matching agrees with its definition on generated patterns and topics."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.patterns import compile_pattern

# A small alphabet makes collisions between pattern and topic segments likely.
segment = st.text(alphabet="ab:_-", min_size=1, max_size=3)
segments = st.lists(segment, min_size=1, max_size=5)
topic_segments = st.lists(st.text(alphabet="ab:_-", min_size=0, max_size=3), min_size=1, max_size=6)
pattern_segment = st.one_of(segment, st.just("*"))


def reference_match(pattern: list[str], topic: list[str]) -> bool:
    """The definition: `*` is one segment, a trailing `>` one or more segments."""
    if pattern and pattern[-1] == ">":
        fixed = pattern[:-1]
        if len(topic) <= len(fixed):
            return False
    else:
        fixed = pattern
        if len(topic) != len(fixed):
            return False
    return all(want in ("*", got) for want, got in zip(fixed, topic, strict=False))


@given(segments, topic_segments)
def test_tail_pattern_matches_exactly_the_topics_below_its_prefix(
    prefix: list[str], topic: list[str]
) -> None:
    p = compile_pattern(".".join([*prefix, ">"]))
    expected = topic[: len(prefix)] == prefix and len(topic) > len(prefix)
    assert p.matches(".".join(topic)) is expected


@given(segments, topic_segments)
def test_tail_pattern_matches_its_prefix_plus_anything(prefix: list[str], rest: list[str]) -> None:
    p = compile_pattern(".".join([*prefix, ">"]))
    assert p.matches(".".join(prefix + rest))
    assert not p.matches(".".join(prefix))


@given(segments, topic_segments)
def test_pattern_without_wildcards_matches_only_itself(
    pattern: list[str], topic: list[str]
) -> None:
    text = ".".join(pattern)
    p = compile_pattern(text)
    assert p.literal
    assert p.matches(text)
    assert p.matches(".".join(topic)) is (".".join(topic) == text)


@given(st.lists(pattern_segment, min_size=1, max_size=5), st.booleans(), topic_segments)
def test_matches_agrees_with_the_definition(body: list[str], tail: bool, topic: list[str]) -> None:
    pattern = [*body, ">"] if tail else body
    p = compile_pattern(".".join(pattern))
    assert p.matches(".".join(topic)) is reference_match(pattern, topic)


@given(st.lists(pattern_segment, min_size=1, max_size=5), st.booleans())
def test_a_pattern_matches_itself_with_wildcards_filled_in(body: list[str], tail: bool) -> None:
    filled = ["x" if s == "*" else s for s in body]
    if tail:
        filled.append("y")
    pattern = [*body, ">"] if tail else body
    assert compile_pattern(".".join(pattern)).matches(".".join(filled))


@given(st.lists(pattern_segment, min_size=1, max_size=5), topic_segments)
def test_star_matches_exactly_one_segment(body: list[str], topic: list[str]) -> None:
    p = compile_pattern(".".join(body))
    if len(topic) != len(body):
        assert not p.matches(".".join(topic))
