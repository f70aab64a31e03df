"""Topic patterns: the syntax and matching of `prices.>`. PURE: no I/O.

Rules this module owns:

1. A topic is split into segments on "." exactly as `str.split(".")` does, so
   `a..b` has an empty middle segment and every topic has at least one segment.
2. A pattern is 1..200 characters of segments separated by ".":
   - `*` (a whole segment) matches exactly one segment, whatever it holds;
   - `>` (only as the last segment) matches one or more remaining segments;
   - any other segment is literal, 1+ characters of `A-Z a-z 0-9 _ : -` (the
     topic alphabet without the dot), and matches only itself.
   So `prices.>` matches `prices.fx` and `prices.fx.eu` but not `prices`, and
   `prices.*.eu` matches `prices.fx.eu` only. A pattern without wildcards
   matches only the identical topic.
3. `Pattern` knows nothing of topic rules: the same patterns serve `[[topics]]`
   in config (engine/config.py validates them, engine/topics.py looks rules up
   by them) and the `sub_topics` / `pub_topics` claims of JWT permissions
   (engine/auth/permissions.py). It imports no other engine module but the
   error tree, so each of those imports it one way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from engine.errors import ConfigError

MAX_PATTERN_LEN: Final = 200
_LITERAL_RE: Final = re.compile(r"[A-Za-z0-9_:-]+")
_EXPECT: Final = "expected a topic pattern like 'prices.fx', 'prices.>' or 'prices.*.eu'"


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled topic pattern; build it with `compile_pattern`.

    `segments` holds the segments before a trailing `>` (None for `*`); `tail`
    is True when the pattern ends with `>`. `matches` costs one string compare
    for literal patterns and for literal prefixes ending in `>`, one split
    otherwise.
    """

    text: str
    segments: tuple[str | None, ...]
    tail: bool

    @property
    def literal(self) -> bool:
        """True when the pattern has no wildcard (it matches only `text`)."""
        return not self.tail and None not in self.segments

    def matches(self, topic: str) -> bool:
        """Whether `topic` matches this pattern (rules 1-2 of the module docstring)."""
        segments = self.segments
        if None not in segments:
            if not self.tail:
                return topic == self.text
            # literal prefix + ">": one or more segments after the prefix's dot
            return topic.startswith(self.text[:-1])
        parts = topic.split(".")
        if self.tail:
            if len(parts) <= len(segments):
                return False
        elif len(parts) != len(segments):
            return False
        for want, got in zip(segments, parts, strict=False):
            if want is not None and want != got:
                return False
        return True


def compile_pattern(text: str, key: str = "pattern") -> Pattern:
    """Validate and compile a topic pattern.

    Raises `ConfigError(key, ...)` saying what is wrong with a bad pattern
    (any non-str included); the caller passes the dotted name of the setting
    it came from as `key`. Results are cached (patterns are immutable), so
    compiling a token's claims on every connection costs a dict lookup.
    """
    if not isinstance(text, str):
        raise ConfigError(key, f"{_EXPECT}, got {text!r}")
    compiled = _compile(text)
    if isinstance(compiled, str):
        raise ConfigError(key, f"{_EXPECT}, got {text!r} ({compiled})")
    return compiled


@lru_cache(maxsize=4096)
def _compile(text: str) -> Pattern | str:
    """The compiled pattern, or why `text` is not a pattern."""
    if not 1 <= len(text) <= MAX_PATTERN_LEN:
        return f"1..{MAX_PATTERN_LEN} characters"
    raw = text.split(".")
    segments: list[str | None] = []
    tail = False
    for i, seg in enumerate(raw):
        if seg == ">":
            if i != len(raw) - 1:
                return "'>' must be the last segment"
            tail = True
        elif seg == "*":
            segments.append(None)
        elif not seg:
            return "empty segment"
        elif _LITERAL_RE.fullmatch(seg) is None:
            if "*" in seg or ">" in seg:
                return f"wildcards must be whole segments: {seg!r}"
            return f"segment {seg!r} may only hold A-Z a-z 0-9 _ : -"
        else:
            segments.append(seg)
    return Pattern(text, tuple(segments), tail)
