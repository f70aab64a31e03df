"""loadtest/ingest.py's pure parts: its flags and the batches it publishes."""

from __future__ import annotations

import pytest

from loadtest.ingest import MAX_SECONDS, batches, parse_args


def test_help_and_bounded_flags() -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    for bad in (["--seconds", "0"], ["--seconds", str(MAX_SECONDS + 1)], ["--batch", "0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2


def test_batches_are_full_and_cover_every_key() -> None:
    args = parse_args(["--topics", "3", "--keys", "7", "--batch", "5"])
    work = batches(args, salt=1)
    assert all(len(b) == 5 for b in work)
    covered = {(t, k) for b in work for t, k, _ in b}
    assert covered == {(f"ingest.t{t}", f"k{k}") for t in range(3) for k in range(7)}
