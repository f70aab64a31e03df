"""The browser client's pure parts (engine/static/fanout.js), tested with Node's
built-in test runner: the hand-written msgpack decoder against bytes made by
Python's msgpack (and the other way round), the state view, the reconnect
policy, and the client driven by a fake WebSocket with mocked timers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

# Values as Python's msgpack packs them; bin and big integers are tagged for JSON.
CASES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**32 - 1,
    2**32,
    2**53 - 1,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32768,
    -32769,
    -(2**31),
    -(2**31) - 1,
    1.5,
    -0.1,
    1e300,
    "",
    "EURUSD",
    "é€𝄞",
    "x" * 31,
    "x" * 32,
    "y" * 255,
    "z" * 256,
    "w" * 65536,
    [],
    list(range(15)),
    list(range(16)),
    list(range(70000)),
    {},
    {"px": 1.0842, "ts": 1795317667250},
    {f"k{i}": i for i in range(16)},
    {f"k{i}": i for i in range(70000)},
    {"op": "upd", "topic": "prices.fx", "pos": "1-0", "items": {"EURUSD": {"px": 1.1}, "X": None}},
    {"nested": [[[{"a": [1, {"b": None}]}]]]},
]
BIN_CASES = [b"", b"\x00\xff", b"a" * 256, b"b" * 70000]
BIG_CASES = [2**64 - 1, -(2**63)]


def _tag(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return {"$big": str(value)}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        return {k: _tag(v) for k, v in value.items()}
    return value


def test_node_suite_passes_and_both_codecs_agree(tmp_path: Path) -> None:
    values = [*CASES, *BIN_CASES, *BIG_CASES, {"bin": b"\x01\x02", "big": 2**63}]
    fixtures = [
        {"hex": msgpack.packb(v, use_bin_type=True).hex(), "value": _tag(v)} for v in values
    ]
    fx = tmp_path / "fixtures.json"
    fx.write_text(json.dumps(fixtures))
    out = tmp_path / "out.json"
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "--test", str(ROOT / "tests" / "js")],
        env={"FANOUT_MSGPACK_FIXTURES": str(fx), "FANOUT_MSGPACK_OUT": str(out), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
    encoded = json.loads(out.read_text())
    assert len(encoded) == len(values)
    for value, hexed in zip(values, encoded, strict=True):
        # what the JS encoder wrote, read back by Python's msgpack
        assert msgpack.unpackb(bytes.fromhex(hexed), raw=False, strict_map_key=False) == value
