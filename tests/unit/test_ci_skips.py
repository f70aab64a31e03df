"""CI cannot pass by skipping (tests/conftest.py): a pytest run of a small test
file, in a subprocess with tests/conftest.py as its plugin, with `CI=true` and
without. Without CI a missing tool skips; with it the same test fails naming
the reason (an error for a skipif mark or a module that skips itself), while a
skip allowed in CI, an xfail and a pass stay what they are; both runs print how
many were skipped and why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SAMPLE = textwrap.dedent(
    """
    import pytest

    def test_passes():
        pass

    def test_needs_a_tool():
        pytest.skip("frobnicator is not installed")

    @pytest.mark.skipif(True, reason="no frob-server either")
    def test_marked_skip():
        pass

    def test_needs_ipv6():
        pytest.skip("no IPv6")

    @pytest.mark.xfail(reason="a known bug", strict=True)
    def test_known_bug():
        assert False
    """
)

MODULE_SKIP = textwrap.dedent(
    """
    import pytest

    pytest.skip("the whole module needs frob", allow_module_level=True)

    def test_never_runs():
        pass
    """
)


def run_pytest(tmp_path: Path, ci: str | None, *files: str) -> tuple[int, str]:
    for n, text in enumerate(files):
        (tmp_path / f"test_sample_{n}.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
            "-o", "asyncio_default_fixture_loop_scope=function", "-q", "-rA", str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def closing_counts(output: str) -> dict[str, int]:
    last = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)][-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


@pytest.mark.parametrize("ci", [None, "false"])
def test_without_ci_a_missing_tool_skips(tmp_path: Path, ci: str | None) -> None:
    code, out = run_pytest(tmp_path, ci, SAMPLE, MODULE_SKIP)
    assert code == 0, out
    assert closing_counts(out) == {"passed": 1, "skipped": 4, "xfailed": 1}, out
    assert "skips: 4 skipped" in out
    for reason in (
        "frobnicator is not installed",
        "no frob-server either",
        "no IPv6",
        "the whole module needs frob",
    ):
        assert f"1 skipped: {reason}" in out, out
    assert "failed instead of skipping" not in out


@pytest.mark.parametrize("ci", ["true"])
def test_in_ci_a_missing_tool_fails(tmp_path: Path, ci: str) -> None:
    code, out = run_pytest(tmp_path, ci, SAMPLE)
    assert code == 1, out
    # the skip in the test fails, the skipif mark (at setup) is an error; the skip
    # allowed in CI, the xfail and the pass are unchanged
    counts = closing_counts(out)
    assert counts == {"passed": 1, "failed": 1, "error": 1, "skipped": 1, "xfailed": 1}, out
    assert re.search(r"FAILED .*test_needs_a_tool - skipped under CI=.*frobnicator", out), out
    assert re.search(r"ERROR .*test_marked_skip - skipped under CI=.*no frob-server", out), out
    assert "skips: 1 skipped" in out and "1 skipped: no IPv6" in out
    assert "2 failed instead of skipping" in out
    for reason in ("frobnicator is not installed", "no frob-server either"):
        assert f"1 failed: {reason}" in out, out


def test_in_ci_a_module_that_skips_itself_is_a_collection_error(tmp_path: Path) -> None:
    code, out = run_pytest(tmp_path, "true", MODULE_SKIP)
    assert code == 2, out  # interrupted: 1 error during collection
    assert re.search(r"ERROR .*test_sample_0.py - skipped under CI=.*needs frob", out), out
    assert "1 failed: the whole module needs frob" in out
