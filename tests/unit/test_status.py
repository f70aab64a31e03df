"""The status board's contents (engine/status.py): one typed status per
process, converted to and from JSON in one place, read by attribute."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.board import REBALANCE, SUPERVISOR, Board, worker_name
from engine.metrics import Histogram
from engine.status import HistogramCounts, RebalanceOrder, SupervisorStatus, WorkerStatus

REPO = Path(__file__).resolve().parents[2]

finite = st.floats(allow_nan=False, allow_infinity=False)
count = st.integers(min_value=0, max_value=2**53)
name = st.text(max_size=12)
counts = st.dictionaries(name, count, max_size=5)
maybe_finite = st.none() | finite
histograms = st.builds(
    HistogramCounts,
    bounds=st.lists(finite, max_size=5).map(tuple),
    counts=st.lists(count, max_size=6).map(tuple),
    count=count,
    sum=finite,
)
workers = st.builds(
    WorkerStatus,
    pid=st.none() | count,
    slot=count,
    accepting=st.booleans(),
    bus_connected=st.booleans(),
    bus_lag_ms=maybe_finite,
    bus_shard_lag_ms=st.none() | st.lists(finite, max_size=4).map(tuple),
    bus_last_entry_age_ms=maybe_finite,
    bus_events=counts,
    bus_tasks_down=st.lists(name, max_size=3).map(tuple),
    connections=count,
    frames_sent=count,
    flush_hist=st.none() | histograms,
    publish_hist=st.none() | histograms,
    closes=counts,
    errors=counts,
    upgrades_refused=counts,
    upgrades_refused_by=counts,
    loop_lag_max_ms=finite,
    started=maybe_finite,
    ts=maybe_finite,
)
supervisors = st.builds(
    SupervisorStatus,
    pid=st.none() | count,
    state=st.none() | name,
    workers_expected=st.none() | count,
    workers=st.dictionaries(count, st.none() | count, max_size=4),
    aux=counts,
    port=st.none() | count,
    admin_port=st.none() | count,
    started=maybe_finite,
    ts=maybe_finite,
)
orders = st.builds(
    RebalanceOrder,
    id=name,
    shed=st.dictionaries(count, count, max_size=4),
    pace_s=finite,
    ts=maybe_finite,
)


# -- rule 2: a round trip is exact ---------------------------------------------------------


@given(workers)
def test_a_worker_status_round_trips_exactly_through_json_text(status: WorkerStatus) -> None:
    text = json.dumps(status.to_json(), separators=(",", ":"))
    assert WorkerStatus.from_json(json.loads(text)) == status


@given(supervisors)
def test_a_supervisor_status_round_trips_exactly_through_json_text(
    status: SupervisorStatus,
) -> None:
    text = json.dumps(status.to_json(), separators=(",", ":"))
    assert SupervisorStatus.from_json(json.loads(text)) == status


@given(orders)
def test_a_rebalance_order_round_trips_exactly_through_json_text(order: RebalanceOrder) -> None:
    text = json.dumps(order.to_json(), separators=(",", ":"))
    assert RebalanceOrder.from_json(json.loads(text)) == order


def test_the_board_carries_a_status_exactly_and_stamps_its_ts(tmp_path: Path) -> None:
    board = Board(str(tmp_path))
    hist = Histogram((0.01, 0.1))
    hist.observe(0.05)
    worker = WorkerStatus(
        pid=7,
        slot=2,
        accepting=True,
        bus_lag_ms=1.5,
        bus_shard_lag_ms=(0.0, 1.5),
        bus_tasks_down=("reader",),
        closes={"1000": 3},
        flush_hist=hist.snapshot(),
        started=12.25,
    )
    board.write_worker(2, worker)
    (got,) = board.read_workers().values()
    assert got.ts is not None and got == dataclasses.replace(worker, ts=got.ts)
    sup = SupervisorStatus(pid=1, state="running", workers_expected=1, workers={2: 7})
    board.write_supervisor(sup)
    read = board.read_supervisor()
    assert read is not None and read.ts is not None
    assert read == dataclasses.replace(sup, ts=read.ts)
    board.write_rebalance(RebalanceOrder(id="1.5", shed={2: 10}, pace_s=3.0))
    order = board.read_rebalance()
    assert order is not None and order.shed == {2: 10} and order.pace_s == 3.0


# -- rule 4: the file keeps its shape --------------------------------------------------------


@pytest.mark.parametrize("cls", [WorkerStatus, SupervisorStatus, RebalanceOrder])
def test_json_keys_are_the_fields_in_order_with_ts_last(cls: Any) -> None:
    keys = list(cls().to_json())
    assert keys == [f.name for f in dataclasses.fields(cls)]
    assert keys[-1] == "ts"


def test_a_file_is_written_as_before(tmp_path: Path) -> None:
    board = Board(str(tmp_path))
    board.write_worker(3, WorkerStatus(pid=9, slot=3))
    text = (tmp_path / f"{worker_name(3)}.json").read_text()
    assert text.startswith('{"pid":9,"slot":3,"accepting":false,"bus_connected":false,')
    assert '"flush_hist":null' in text and '"closes":{}' in text
    board.write_supervisor(SupervisorStatus(pid=1, workers={1: 9}))
    doc = json.loads((tmp_path / f"{SUPERVISOR}.json").read_text())
    assert doc["workers"] == {"1": 9} and isinstance(doc["ts"], float)
    board.write_rebalance(RebalanceOrder(id="1.5", shed={2: 10}, pace_s=3.0))
    text = (tmp_path / f"{REBALANCE}.json").read_text()
    assert text.startswith('{"id":"1.5","shed":{"2":10},"pace_s":3.0,"hold_s":0.0,"ts":')


# -- rule 3: reading never raises, and defaults mean "not ready" -------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"pid": "7", "accepting": 1, "bus_connected": "yes", "ts": "now"},
        {"connections": True, "closes": [1], "errors": {"x": "2"}, "bus_tasks_down": "a"},
        {"bus_lag_ms": float("nan"), "bus_shard_lag_ms": [1.0, True], "flush_hist": [1]},
        {"flush_hist": {"b": ["x"], "c": [1]}, "started": float("inf")},
    ],
)
def test_a_malformed_worker_status_reads_as_defaults(doc: dict[str, Any]) -> None:
    status = WorkerStatus.from_json(doc)
    assert status.pid is None and not status.accepting and not status.bus_connected
    assert status.connections == 0 and status.bus_tasks_down == ()
    assert status.bus_lag_ms is None and status.bus_shard_lag_ms is None
    assert status.flush_hist is None and status.started is None and status.ts is None
    assert dict(status.errors) == {} and dict(status.closes) == {}


def test_a_malformed_supervisor_status_reads_as_defaults() -> None:
    status = SupervisorStatus.from_json({"state": 3, "workers": {"x": 1, "2": "p"}, "aux": []})
    assert status.state is None and dict(status.workers) == {2: None} and dict(status.aux) == {}
    assert status.workers_expected is None and status.ts is None


# -- rule 1: readers use attributes, and mypy checks their names ------------------------------


def test_a_status_is_not_a_mapping_and_cannot_be_changed() -> None:
    status = WorkerStatus(pid=1)
    assert not hasattr(status, "get") and not hasattr(status, "keys")
    with pytest.raises(TypeError):
        status["pid"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        status.conections  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.pid = 2  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        status.extra = 1  # type: ignore[attr-defined]  # slotted: no new attributes


def test_mypy_names_a_reader_of_a_field_that_does_not_exist(tmp_path: Path) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    reader = tmp_path / "reader.py"
    reader.write_text(
        textwrap.dedent(
            """\
            from engine.status import WorkerStatus

            def ready(status: WorkerStatus) -> bool:
                return status.acepting and status["bus_connected"] is True
            """
        )
    )
    out, _, code = mypy_api.run(
        [
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--config-file",
            str(REPO / "pyproject.toml"),
            str(reader),
        ]
    )
    assert code == 1, out
    assert '"WorkerStatus" has no attribute "acepting"' in out
    assert '"WorkerStatus" is not indexable' in out
