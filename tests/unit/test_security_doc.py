"""SECURITY.md stays true (issue 11): every limit a setting declares is in its
limits table and every test a row names exists (relative links: test_doc_links.py).

A new setting that bounds something (in [limits], or named max_*, *_timeout_s,
*_per_*) fails here until SECURITY.md says its default and the attack it
stops, or WAIVED says why it is no security limit.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.config import setting_names

ROOT = Path(__file__).resolve().parents[2]
SECURITY = (ROOT / "SECURITY.md").read_text()

# operational settings that look like limits but bound no attacker's effect
WAIVED = {
    "workers.graceful_timeout_s": "how long a drain may take (operator's choice)",
    "workers.heartbeat_timeout_s": "supervision of our own workers",
    "workers.boot_timeout_s": "supervision of our own workers",
    "workers.max_boot_failures": "supervision of our own workers",
    "bus.max_lag_ms": "readiness threshold, not a bound on input",
}


def _limit_settings() -> list[str]:
    return [
        name
        for name in setting_names()
        if name.startswith("limits.") or re.search(r"\.(max_\w+|\w+_timeout_s|\w+_per_\w+)$", name)
    ]


def _limits_table() -> str:
    start = SECURITY.index("## Limits and why their defaults")
    return SECURITY[start : SECURITY.index("\n## ", start + 1)]


def test_every_limit_setting_is_in_the_limits_table() -> None:
    table = _limits_table()
    missing = [n for n in _limit_settings() if n not in WAIVED and f"`{n}`" not in table]
    assert not missing, (
        f"settings that bound input but are not in SECURITY.md's limits table: {missing}"
    )


def test_waivers_name_existing_settings() -> None:
    assert set(WAIVED) <= set(setting_names()), "a waiver names a setting that no longer exists"


def test_every_test_the_bad_input_table_names_exists() -> None:
    named = set(re.findall(r"`((?:tests/)?[\w/]*test_\w+\.py)(?:::\w+)?`", SECURITY))
    assert len(named) >= 10
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    for name in named:
        if "/" in name:
            assert name in tests or (ROOT / name).is_dir(), name
        else:
            assert any(t.endswith("/" + name) for t in tests), name
    for folder in re.findall(r"`(tests/\w+)`", SECURITY):
        assert (ROOT / folder).is_dir(), folder
