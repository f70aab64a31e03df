"""loadtest/microbench.py runs each of its measurements and reports a cost per frame."""

from __future__ import annotations

import pytest

from loadtest import microbench


def test_every_microbenchmark_reports_frames_and_a_cost_per_frame(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert microbench.main(["-S", "20", "--rate", "500"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["core-hot", "core-market", "generator"]
    for line in lines:
        assert "'us_per_frame': " in line
        assert "'frames_per_round': 0" not in line


def test_an_unknown_microbenchmark_is_refused_by_name() -> None:
    with pytest.raises(SystemExit) as exc:
        microbench.main(["core-cold"])
    assert exc.value.code == 2


def test_probe_rounds_feeds_the_probes_frames_as_often_as_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert microbench.main(["probe-rounds", "-S", "60", "--rate", "500", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("probe-rounds") and "'rounds': 2" in out
    assert "'probe_frames_per_round': 0" not in out
