"""tests/support/longest.py: the longest functions, measured with ast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.longest import REPO, Function, functions_in, longest, main

SOURCE = '''\
import typing


def short() -> None:
    pass


class Box:
    @property
    def size(self) -> int:
        """Decorators are not counted; the docstring is."""
        return 1

    async def fill(self) -> None:
        def helper() -> None:
            x = 1
            del x

        helper()


if typing.TYPE_CHECKING:

    def typed() -> None: ...
else:
    try:
        pass
    except ImportError:

        def fallback() -> None:
            return None
'''


def test_every_function_with_its_qualified_name_line_and_length() -> None:
    assert list(functions_in(SOURCE, "m.py")) == [
        Function("m.py", 4, "short", 2),
        Function("m.py", 10, "Box.size", 3),
        Function("m.py", 14, "Box.fill", 6),
        Function("m.py", 15, "Box.fill.<locals>.helper", 3),
        Function("m.py", 24, "typed", 1),
        Function("m.py", 30, "fallback", 2),
    ]


def test_longest_first_ties_in_file_order_at_most_top(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(SOURCE, encoding="utf-8")
    (tmp_path / "b.py").write_text("def one() -> None:\n    pass\n", encoding="utf-8")
    found = longest([tmp_path / "pkg", tmp_path / "b.py"], 4, base=tmp_path)
    assert [(f.file, f.name, f.length) for f in found] == [
        ("pkg/a.py", "Box.fill", 6),
        ("pkg/a.py", "Box.size", 3),
        ("pkg/a.py", "Box.fill.<locals>.helper", 3),
        ("b.py", "one", 2),
    ]


def test_the_command_prints_one_line_per_function(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.py").write_text(SOURCE, encoding="utf-8")
    assert main(["-n", "2", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["lines", "where", "function"]
    assert [line.split() for line in lines[1:]] == [
        ["6", f"{tmp_path / 'a.py'}:14", "Box.fill"],
        ["3", f"{tmp_path / 'a.py'}:10", "Box.size"],
    ]


def test_a_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nowhere")])
    assert exc.value.code == 2


def test_it_runs_on_the_repo_as_documented() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.longest", "-n", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = done.stdout.splitlines()[1:]
    assert len(rows) == 3
    lengths = [int(row.split()[0]) for row in rows]
    assert lengths == sorted(lengths, reverse=True)
    assert all(row.split()[1].split("/")[0] in ("engine", "workers", "loadtest") for row in rows)
