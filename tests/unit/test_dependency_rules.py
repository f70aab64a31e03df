"""The dependency rule of style.md: a pure core with no I/O, thin I/O shells.

Two checks, because each misses what the other sees:

- ast: every import statement of a pure module (module level, inside
  functions, under `TYPE_CHECKING`) names an allowed module. This sees direct
  imports, including ones a runtime check would miss because some other module
  already loaded them (`os` is always loaded).
- runtime: importing a pure module in a fresh interpreter loads no event loop,
  socket, thread or process machinery, whatever it imports on the way (a
  package `__init__`, msgpack, another engine module).

And the supervisor (synchronous, forks its children) never imports asyncio,
uvloop, redis or picows: not directly, and not through what it imports.

And no import cycle in engine/, workers/ or loadtest/ (Tarjan's algorithm
over every import the ast sees, `TYPE_CHECKING` and function-level ones
included): a cycle means two modules that are one, or a third that is missing.
Known cycles are in `CYCLE_WAIVERS`, with their way out.

The allowlists (keep them short; say why when adding to them):

- `PURE_STDLIB`: standard library modules with no I/O, clock, randomness or
  threads. `time` is left out on purpose: a pure module takes the time as an
  argument (`now_ms`), which is what lets its tests run without a clock. No
  pure module needs `time` or `random` today; a module that truly does gets an
  entry in `EXTRA_STDLIB` with the reason.
- `EXTRA_STDLIB`: per-module additions (parsers the module exists to drive).
- `ENGINE_DEPS`: which engine modules each pure module may import; every one
  of them is itself checked here.
- `WAIVERS`: known violations, each with its reason and its way out. A waiver
  that is no longer needed fails `test_every_waiver_is_still_needed`.
- `CYCLE_WAIVERS`: known import cycles, the same way
  (`test_every_cycle_waiver_is_still_needed`).
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "engine"

PURE_STDLIB = frozenset(
    {
        "__future__",
        "typing",
        "dataclasses",
        "collections",  # and collections.abc
        "re",
        "math",
        "zlib",  # crc32 for shard_of
        "struct",  # fixed-size binary headers
        "enum",
        "itertools",
        "functools",
        "operator",
        "bisect",
        "heapq",
        "abc",
        "types",
    }
)
THIRD_PARTY = frozenset({"msgpack"})

EXTRA_STDLIB: dict[str, frozenset[str]] = {
    # TOML files, JSON arrays in environment variables, "did you mean" for typos.
    # ipaddress: server.trusted_proxies is a list of networks, checked at parse time.
    "engine/config.py": frozenset({"tomllib", "json", "difflib", "ipaddress"}),
    # a JWT's payload is base64url of JSON: its `exp` is read without verification
    "engine/client/tokens.py": frozenset({"base64", "binascii", "json"}),
}

WAIVERS: dict[str, dict[str, str]] = {
    "engine/config.py": {
        "os": (
            "load() defaults to os.environ and tests os.path.isfile(DEFAULT_PATH): the loader "
            "lives beside the parser. Way out: the CLI shell passes env and the file's text."
        ),
    },
}

_BASE = ("engine.errors", "engine.codes")
_PROTOCOL = (*_BASE, "engine.protocol", "engine.patterns")
ENGINE_DEPS: dict[str, tuple[str, ...]] = {
    # A name covers its submodules: "engine.protocol" allows engine.protocol.codec.
    "engine/__init__.py": (),
    "engine/errors.py": (),
    "engine/codes.py": (),
    "engine/protocol/": _PROTOCOL,
    "engine/fanout/": (*_PROTOCOL, "engine.fanout", "engine.config", "engine.bus.base"),
    "engine/config.py": (*_BASE, "engine.patterns"),
    "engine/patterns.py": _BASE,
    "engine/topics.py": (*_BASE, "engine.config", "engine.patterns"),
    "engine/backoff.py": _BASE,
    "engine/status.py": _BASE,
    "engine/rebalance.py": (),  # the automatic rebalancing rule
    "engine/metrics.py": (*_BASE, "engine.protocol", "engine.status"),
    "engine/counters.py": (*_BASE, "engine.metrics"),
    "engine/auth/permissions.py": (*_BASE, "engine.patterns"),
    "engine/auth/ratelimit.py": _BASE,
    # the rules of one connection: the shell is workers/listener.py
    "engine/connection.py": (
        *_PROTOCOL,
        "engine.auth.permissions",
        "engine.auth.ratelimit",
        "engine.bus.base",
        "engine.counters",
    ),
    "engine/bus/base.py": (*_BASE, "engine.protocol"),
    # the clients' rules: the shells are engine/client/client.py and fanout.js
    "engine/client/state.py": (*_BASE, "engine.backoff", "engine.protocol"),
    "engine/client/tokens.py": (*_BASE, "engine.backoff"),
    "engine/bus/wire.py": (*_BASE, "engine.protocol", "engine.bus.base"),
    "engine/bus/limits.py": (*_BASE, "engine.protocol", "engine.bus.base"),
    "engine/bus/redis/layout.py": (*_BASE, "engine.protocol", "engine.bus.base"),
    "engine/bus/hubcore.py": (
        *_PROTOCOL,
        "engine.bus.base",
        "engine.bus.limits",
        "engine.bus.wire",
        "engine.config",
    ),
}

# Not loaded by importing a pure module (checked in a fresh interpreter).
RUNTIME_FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "selectors",
        "select",
        "signal",
        "threading",
        "subprocess",
        "multiprocessing",
        "concurrent",
        "uvloop",
        "picows",
        "redis",
        "hiredis",
    }
)
SUPERVISOR_FORBIDDEN = frozenset({"asyncio", "uvloop", "redis", "picows"})


# -- what the files import ------------------------------------------------------------------


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_engine_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or base.is_dir()


def package_of(path: Path) -> str:
    return module_name(path) if path.name == "__init__.py" else module_name(path.parent)


def imports_of(path: Path) -> list[tuple[int, str]]:
    return imports_in(path.read_text(encoding="utf-8"), package_of(path))


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth.

    `package` anchors relative imports. `from X import y` counts as importing
    `X.y` when that is an engine module, else `X`. `__import__(...)` calls count
    as importing "__import__".
    """
    found: list[tuple[int, str]] = []
    for line, base, names in raw_imports(source, package):
        if names is None:
            found.append((line, base))
        else:
            for name in names:
                sub = f"{base}.{name}"
                found.append((line, sub if is_engine_module(sub) else base))
    return sorted(found)


def raw_imports(source: str, package: str) -> list[tuple[int, str, tuple[str, ...] | None]]:
    """(line, absolute module, names) of every import in `source`, at any depth,
    in line order: names None for `import X` (and `__import__(...)`, as
    "__import__"), the imported names for `from X import a, b`. `package`
    anchors relative imports."""
    found: list[tuple[int, str, tuple[str, ...] | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.append((node.lineno, base, tuple(alias.name for alias in node.names)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            found.append((node.lineno, "__import__", None))
    return sorted(found, key=lambda f: f[0])  # ast.walk is breadth first: line order


def covered(name: str, allowed: frozenset[str] | tuple[str, ...]) -> bool:
    """`name` is in `allowed`, or is a submodule of a name in it."""
    return any(name == a or name.startswith(a + ".") for a in allowed)


# -- which files are pure -----------------------------------------------------------------------


def pure_files() -> list[Path]:
    files = [ENGINE / "__init__.py", ENGINE / "errors.py", ENGINE / "codes.py"]
    for package in ("protocol", "fanout"):
        files += sorted((ENGINE / package).rglob("*.py"))
    for name in (
        "config.py",
        "patterns.py",
        "topics.py",
        "backoff.py",
        "status.py",
        "rebalance.py",
        "metrics.py",
        "counters.py",
        "auth/permissions.py",
        "auth/ratelimit.py",
        "connection.py",
        "bus/base.py",
        "bus/wire.py",
        "bus/limits.py",
        "bus/hubcore.py",
        "client/state.py",
        "client/tokens.py",
    ):
        files.append(ENGINE / name)
    return [f for f in files if f.is_file()]


def engine_deps_of(name: str) -> tuple[str, ...]:
    for key, deps in ENGINE_DEPS.items():
        if name == key or (key.endswith("/") and name.startswith(key)):
            return deps
    raise AssertionError(f"{name}: no entry in ENGINE_DEPS")


def violations(path: Path) -> list[str]:
    return violations_in(path.read_text(encoding="utf-8"), rel(path), package_of(path))


def violations_in(source: str, name: str, package: str) -> list[str]:
    """`name:line: imports X` for every import of `source` that file `name` may not make."""
    stdlib = PURE_STDLIB | EXTRA_STDLIB.get(name, frozenset()) | set(WAIVERS.get(name, {}))
    deps = engine_deps_of(name)
    out: list[str] = []
    for line, module in imports_in(source, package):
        top = module.split(".")[0]
        if top == "engine":
            ok = covered(module, deps) or module == "engine"
        else:
            ok = covered(module, stdlib) or top in THIRD_PARTY
        if not ok:
            out.append(f"{name}:{line}: imports {module}")
    return out


PURE_FILES = pure_files()


@pytest.mark.parametrize("package", ["protocol", "fanout"])
def test_the_pure_packages_exist(package: str) -> None:
    modules = list((ENGINE / package).glob("*.py"))
    assert modules, f"engine/{package}/ holds no modules: the pure core is missing"


@pytest.mark.parametrize("path", PURE_FILES, ids=rel)
def test_pure_module_imports_only_allowed_modules(path: Path) -> None:
    assert violations(path) == []


@pytest.mark.parametrize("path", PURE_FILES, ids=rel)
def test_importing_a_pure_module_loads_no_io_machinery(path: Path) -> None:
    loaded = loaded_after_import(module_name(path), RUNTIME_FORBIDDEN)
    assert loaded == [], f"importing {module_name(path)} loads {loaded}"


def test_every_allowed_engine_dependency_is_itself_checked() -> None:
    checked = {module_name(p) for p in PURE_FILES}
    for deps in ENGINE_DEPS.values():
        for dep in deps:
            if is_engine_module(dep):
                assert any(covered(c, (dep,)) for c in checked), f"{dep} is allowed but not checked"


def test_every_waiver_is_still_needed() -> None:
    for name, modules in WAIVERS.items():
        path = REPO / name
        if not path.is_file():
            continue
        imported = {m for _, m in imports_of(path)}
        for module in modules:
            assert any(covered(m, (module,)) for m in imported), (
                f"{name} no longer imports {module}: remove its waiver"
            )


# -- the rule checks what it claims to check ------------------------------------------------------


def test_the_checker_sees_every_kind_of_import() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import asyncio\n"
        "def f() -> None:\n"
        "    import socket\n"
        "    from engine import cli\n"
        "    from . import codec\n"
        "    from ..bus import hub\n"
        "    __import__('signal')\n"
    )
    found = violations_in(source, "engine/protocol/probe.py", "engine.protocol")
    assert [v.split(": imports ")[1] for v in found] == [
        "os.path",
        "asyncio",
        "socket",
        "engine.cli" if is_engine_module("engine.cli") else "engine",
        "engine.bus.hub" if is_engine_module("engine.bus.hub") else "engine.bus",
        "__import__",
    ]


# -- the supervisor -------------------------------------------------------------------------------


def supervisor_files() -> list[Path]:
    # and the shared modules it imports that live outside its package
    shared = [ENGINE / "backoff.py", ENGINE / "board.py", ENGINE / "status.py"]
    return sorted((ENGINE / "supervisor").glob("*.py")) + [f for f in shared if f.is_file()]


@pytest.mark.parametrize("path", supervisor_files(), ids=rel)
def test_supervisor_imports_no_event_loop_or_network_client(path: Path) -> None:
    bad = [
        f"{rel(path)}:{line}: imports {m}"
        for line, m in imports_of(path)
        if m.split(".")[0] in SUPERVISOR_FORBIDDEN
    ]
    assert bad == []


@pytest.mark.parametrize("path", supervisor_files(), ids=rel)
def test_importing_the_supervisor_loads_no_event_loop(path: Path) -> None:
    # Children build their loops and clients after the fork: what they need is
    # imported inside the child, never at the supervisor's module level.
    loaded = loaded_after_import(module_name(path), SUPERVISOR_FORBIDDEN)
    assert loaded == [], f"importing {module_name(path)} loads {loaded}"


def loaded_after_import(module: str, watch: frozenset[str]) -> list[str]:
    """The modules of `watch` loaded by importing `module` in a fresh interpreter."""
    script = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"watch = {sorted(watch)!r}\n"
        "print(json.dumps(sorted(w for w in watch if w in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout)
    return loaded


# -- import cycles --------------------------------------------------------------------------------

CYCLE_ROOTS = ("engine", "workers", "loadtest")

# Known cycles: the modules of one strongly connected component -> the reason
# and the way out. A waiver whose cycle is gone fails
# `test_every_cycle_waiver_is_still_needed`.
CYCLE_WAIVERS: dict[frozenset[str], str] = {}


def repo_sources(roots: tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    """module -> (source, package anchoring its relative imports, file) of every
    module under `roots`."""
    out: dict[str, tuple[str, str, str]] = {}
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            out[module_name(path)] = (path.read_text(encoding="utf-8"), package_of(path), rel(path))
    return out


def import_graph(sources: dict[str, tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """module -> {module it imports: "file:line" of the first such import}, for
    the modules of `sources` only.

    Every import counts: module level, inside functions, under `TYPE_CHECKING`
    (a cycle there still means two modules that are one, or a missing third).
    `import a.b.c` imports the longest of a.b.c, a.b, a that is a module here;
    `from X import y` imports X.y when that is a module here, else X. Importing
    a.b.c also runs the package a.b's `__init__`, which is not counted: a
    package that imports its own submodules would be a cycle with each of them.
    """
    graph: dict[str, dict[str, str]] = {}
    for module, (source, package, file) in sources.items():
        edges: dict[str, str] = {}
        for line, base, names in raw_imports(source, package):
            wanted = [base] if names is None else [f"{base}.{n}" for n in names]
            for name in wanted:
                parts = name.split(".")
                while parts and ".".join(parts) not in sources:
                    parts.pop()
                target = ".".join(parts)
                if target and target != module:
                    edges.setdefault(target, f"{file}:{line}")
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's
    algorithm, iterative), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def cycle_path(graph: dict[str, dict[str, str]], component: list[str]) -> str:
    """One cycle through the component's first module, each step with the
    import that makes it: "a -> b (a.py:3) -> a (b.py:7)"."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = [start]
    while queue:  # breadth first: the shortest way back to `start`
        node = queue.pop(0)
        for child in graph[node]:
            if child not in members or child in came_from:
                continue
            came_from[child] = node
            if child == start:
                queue = []
                break
            queue.append(child)
    steps = [start]
    node = start
    while True:
        node = came_from[node]
        steps.append(node)
        if node == start:
            break
    steps.reverse()
    out = steps[0]
    for here, there in itertools.pairwise(steps):
        out += f" -> {there} ({graph[here][there]})"
    return out


def test_no_import_cycles() -> None:
    graph = import_graph(repo_sources(CYCLE_ROOTS))
    found = [
        cycle_path(graph, c) for c in import_cycles(graph) if frozenset(c) not in CYCLE_WAIVERS
    ]
    assert found == [], "import cycles (two modules that are one, or a missing third):\n" + (
        "\n".join(found)
    )


def test_every_cycle_waiver_is_still_needed() -> None:
    found = {frozenset(c) for c in import_cycles(import_graph(repo_sources(CYCLE_ROOTS)))}
    for waived in CYCLE_WAIVERS:
        assert waived in found, f"the cycle {sorted(waived)} is gone: remove its waiver"


def test_the_cycle_finder_sees_every_kind_of_import() -> None:
    sources = {
        "p": ("", "p", "p/__init__.py"),
        "p.a": ("from p import b\n", "p", "p/a.py"),
        "p.b": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.c import Thing\n",
            "p",
            "p/b.py",
        ),
        "p.c": ("import os\ndef f() -> None:\n    from . import a\n", "p", "p/c.py"),
        "p.d": ("import p.a\nfrom .b import x\n", "p", "p/d.py"),
        "p.e": ("from p.e import y\n", "p", "p/e.py"),  # itself: not a cycle
    }
    graph = import_graph(sources)
    assert graph["p.d"] == {"p.a": "p/d.py:1", "p.b": "p/d.py:2"}
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert cycle_path(graph, ["p.a", "p.b", "p.c"]) == (
        "p.a -> p.b (p/a.py:1) -> p.c (p/b.py:3) -> p.a (p/c.py:3)"
    )
    # two cycles sharing a module are one component
    sources["p.d"] = ("import p.a\n", "p", "p/d.py")
    sources["p.a"] = ("from p import b\nfrom p import d\n", "p", "p/a.py")
    assert import_cycles(import_graph(sources)) == [["p.a", "p.b", "p.c", "p.d"]]
    # without the import under TYPE_CHECKING there is none left
    sources["p.b"] = ("", "p", "p/b.py")
    sources["p.d"] = ("", "p", "p/d.py")
    assert import_cycles(import_graph(sources)) == []
