"""loadtest/publish_path.py: each stage of the publish path runs on this tree
(the callgrind figures in docs/benchmarks.md come from it)."""

from __future__ import annotations

import pytest

from loadtest import publish_path


@pytest.mark.parametrize("name", publish_path.STAGES)
def test_each_stage_runs_on_this_tree(name: str) -> None:
    assert publish_path.main(["--stage", name, "--batches", "2", "--items", "10"]) == 0


def test_the_edge_stage_makes_the_hub_request_of_the_whole_batch() -> None:
    from engine.bus import wire

    frame = publish_path.stage("edge", 100)()
    assert isinstance(frame, bytes)
    request = wire.parse_request(wire.FrameReader().feed(frame)[0])
    assert isinstance(request, wire.PublishRequest) and len(request.updates) == 100
    assert {u[0] for u in request.updates} == {f"market.t{t}" for t in range(50)}


def test_bounds_are_refused() -> None:
    with pytest.raises(SystemExit):
        publish_path.main(["--batches", str(publish_path.MAX_BATCHES + 1)])
