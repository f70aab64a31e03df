"""Topic permissions from token claims. PURE.

Rules this module owns:

1. `sub_topics` and `pub_topics` are lists of topic patterns (engine.patterns:
   `*` one segment, a trailing `>` the rest). A token without `sub_topics` may
   subscribe to nothing, or to any topic when `auth.missing_sub_topics = "all"`;
   a token without `pub_topics` may not publish (protocol.md section 3). An
   empty list allows nothing.
2. A claim that is not a list of valid patterns makes the whole token invalid
   (`ValueError`, turned into a refused token): a typo in an issuer's claims
   must not silently widen or narrow access.
3. At most `MAX_PATTERNS` patterns per claim: checking a topic costs at most
   that many matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.errors import ConfigError
from engine.patterns import Pattern, compile_pattern

MAX_PATTERNS: Final = 256


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a connection may do: a tuple of patterns, or None for any topic (an
    empty tuple allows nothing)."""

    sub: tuple[Pattern, ...] | None
    pub: tuple[Pattern, ...] | None

    def can_sub(self, topic: str) -> bool:
        return self.sub is None or any(p.matches(topic) for p in self.sub)

    def can_pub(self, topic: str) -> bool:
        return self.pub is None or any(p.matches(topic) for p in self.pub)

    def first_refused_sub(self, topics: Iterable[str]) -> str | None:
        """The first topic of `topics` this connection may not subscribe to, or None."""
        if self.sub is None:
            return None
        for t in topics:
            if not self.can_sub(t):
                return t
        return None


ALLOW_ALL: Final = Permissions(None, None)
SUBSCRIBE_ONLY: Final = Permissions(None, ())


def anonymous(allow_publish: bool) -> Permissions:
    """`auth.mode = "none"`: subscribe to anything; publish if allowed."""
    return ALLOW_ALL if allow_publish else SUBSCRIBE_ONLY


def _patterns(claims: Mapping[str, Any], name: str) -> tuple[Pattern, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise ValueError(f"'{name}' must be a list of at most {MAX_PATTERNS} topic patterns")
    out = []
    for item in value:
        try:
            out.append(compile_pattern(item, name))
        except ConfigError:
            raise ValueError(f"'{name}' holds a bad topic pattern {str(item)[:60]!r}") from None
    return tuple(out)


MISSING_SUB_TOPICS: Final = ("none", "all")  # the choices of auth.missing_sub_topics


def permissions_from_claims(
    claims: Mapping[str, Any], *, missing_sub_topics: str = "none"
) -> Permissions:
    """The permissions a verified token's claims grant (rules 1-2).

    `missing_sub_topics` (`auth.missing_sub_topics`) decides a token without a
    `sub_topics` claim: "none" subscribes to nothing, "all" to any topic.
    """
    if missing_sub_topics not in MISSING_SUB_TOPICS:
        raise ValueError(f"missing_sub_topics must be 'none' or 'all', not {missing_sub_topics!r}")
    sub = _patterns(claims, "sub_topics")
    if sub is None and missing_sub_topics == "none":
        sub = ()
    pub = _patterns(claims, "pub_topics")
    return Permissions(sub, () if pub is None else pub)
