"""Shared pytest setup.

Hypothesis profiles: "ci" is the default (no per-example deadline: timing is
not behaviour, and a loaded CI machine must not fail a property test);
`HYPOTHESIS_PROFILE=fuzz` selects a long run with many more examples.

Skips (issue 12): a test skips when something it needs is missing here
(redis-server, node, chromium, kustomize, hadolint, promtool...), which is
handy on a laptop and hides a broken install in CI. So, when the environment
says `CI=true` (any value but empty, 0, false, no), every skip is reported as a
failure naming its reason, except the few in `SKIPS_ALLOWED_IN_CI` (a test that
does not apply here by design). `make test` installs everything the tests
need, so a CI run skips nothing it could have run. xfail is not a skip and is
left alone. Every run ends with a "skips" summary: how many, and why.
(tests/unit/test_ci_skips.py runs these rules on a small test file.)
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Generator
from typing import Any, Final

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None)
settings.register_profile("fuzz", deadline=None, max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Skips that stay skips under CI: the start of the skip's reason -> why it may.
SKIPS_ALLOWED_IN_CI: Final = {
    "this backend delivers state through snapshot()": (
        "tests/contract/test_bus_contract.py: a check of the other bus backend's way"
    ),
    "no IPv6": "a kernel without IPv6: nothing `make system-deps` could install",
}

_FAILED_SKIPS = pytest.StashKey[list[str]]()


def ci_forbids_skips() -> bool:
    """True when the environment says this run is CI (`CI=true`, as CI services set)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def allowed_in_ci(reason: str) -> bool:
    return reason.startswith(tuple(SKIPS_ALLOWED_IN_CI))


def _fail_skip_in_ci(config: pytest.Config, report: Any) -> None:
    """Turn a skipped report into a failed one when CI forbids it."""
    if not report.skipped or hasattr(report, "wasxfail") or not ci_forbids_skips():
        return
    reason = skip_reason(report)
    if allowed_in_ci(reason):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI={os.environ.get('CI')}: {reason}\n"
        "A CI run must not pass by skipping: `make test` installs what the tests need"
        " (`make system-deps`, the dev extras). A skip that is right in CI too goes in"
        " SKIPS_ALLOWED_IN_CI (tests/conftest.py), with why."
    )
    config.stash.setdefault(_FAILED_SKIPS, []).append(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _fail_skip_in_ci(item.config, report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield  # a module that skips itself (pytest.skip(allow_module_level=True))
    _fail_skip_in_ci(collector.config, report)
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """How many tests skipped, and why; and the skips CI turned into failures."""
    reasons: Counter[str] = Counter(
        skip_reason(r) for r in terminalreporter.stats.get("skipped", []) if r.skipped
    )
    failed = Counter(config.stash.get(_FAILED_SKIPS, []))
    terminalreporter.write_sep("-", f"skips: {sum(reasons.values())} skipped")
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"{n} skipped: {reason}")
    if failed:
        terminalreporter.write_line(
            f"{sum(failed.values())} failed instead of skipping (CI={os.environ.get('CI')}):"
        )
        for reason, n in failed.most_common():
            terminalreporter.write_line(f"{n} failed: {reason}")
