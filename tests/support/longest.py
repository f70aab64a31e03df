"""The longest functions of the code base, so that a reader can hold each in their head.

    .venv/bin/python -m tests.support.longest              # top 10 of engine/ workers/ loadtest/
    .venv/bin/python -m tests.support.longest -n 25 engine # top 25 of engine/

One line per function, longest first: its length in lines (from `def` to its
last line, docstring, comments and nested functions included; decorators not),
`file:line`, and its qualified name (`Class.method`, `outer.<locals>.inner`).
Read with `ast`: nothing is imported or run. House style: past ~100 lines,
split a function by the phases its comment dividers name.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("engine", "workers", "loadtest")


@dataclass(frozen=True, slots=True)
class Function:
    """One function or method: where it starts and how many lines it spans."""

    file: str
    line: int
    name: str
    length: int

    def __str__(self) -> str:
        return f"{self.length:5d}  {self.file}:{self.line}  {self.name}"


def functions_in(source: str, file: str) -> Iterator[Function]:
    """Every function and method of `source` (nested ones too), in source order."""
    yield from _walk(ast.parse(source).body, file, "")


def _walk(body: Sequence[ast.stmt], file: str, prefix: str) -> Iterator[Function]:
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = prefix + node.name
            end = node.end_lineno if node.end_lineno is not None else node.lineno
            yield Function(file, node.lineno, name, end - node.lineno + 1)
            yield from _walk(node.body, file, name + ".<locals>.")
        elif isinstance(node, ast.ClassDef):
            yield from _walk(node.body, file, prefix + node.name + ".")
        else:
            # functions defined under if/try/with/for/match, at any depth
            inner: list[ast.stmt] = []
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    inner.append(child)
                elif isinstance(child, ast.ExceptHandler | ast.match_case):
                    inner.extend(child.body)
            yield from _walk(inner, file, prefix)


def longest(roots: Sequence[Path], top: int, base: Path = REPO) -> list[Function]:
    """The `top` longest functions of the .py files under `roots` (files or
    directories), longest first; ties in file and line order."""
    found: list[Function] = []
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            try:
                name = path.resolve().relative_to(base).as_posix()
            except ValueError:
                name = path.as_posix()
            found.extend(functions_in(path.read_text(encoding="utf-8"), name))
    found.sort(key=lambda f: (-f.length, f.file, f.line))
    return found[:top]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.longest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-n", "--top", type=int, default=10, help="how many (default 10)")
    parser.add_argument(
        "roots", nargs="*", help=f"files or directories (default: {' '.join(ROOTS)})"
    )
    args = parser.parse_args(argv)
    roots = [Path(r) for r in args.roots] or [REPO / r for r in ROOTS]
    missing = [str(r) for r in roots if not r.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    print("lines  where  function")
    for function in longest(roots, args.top):
        print(function)
    return 0


if __name__ == "__main__":
    sys.exit(main())
