"""`fanout bench --target --shard i/N` and `fanout bench merge`, the pure parts:
the shard split (clients, keys, rate: the union of the shards is the whole
workload), the /metrics parse, and the merge of the shards' reports."""

from __future__ import annotations

import collections
import copy
from typing import Any

import pytest

from loadtest.bench.merge import check_shards, merge_latency, merge_reports, server_merge
from loadtest.bench.shard import (
    WHOLE,
    Shard,
    shard_clients,
    shard_mass,
    shard_pairs,
    shard_sampler,
)
from loadtest.bench.target import parse_process_series
from loadtest.latency import bucket_of, percentiles_ms
from loadtest.workload import HOT, MARKET, key_sampler


def test_shard_parse_names_the_flag_on_bad_input() -> None:
    assert Shard.parse("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_the_shards_clients_are_disjoint_and_their_union_is_every_client(n: int) -> None:
    shares = [shard_clients(100, Shard(i, n)) for i in range(1, n + 1)]
    flat = [c for s in shares for c in s]
    assert sorted(flat) == list(range(100)) and len(flat) == len(set(flat))
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


@pytest.mark.parametrize("w", [HOT, MARKET])
def test_the_shards_keys_are_disjoint_and_their_union_is_every_key(w: Any) -> None:
    shares = [shard_pairs(w, Shard(i, 3)) for i in (1, 2, 3)]
    flat = [p for s in shares for p in s]
    assert sorted(flat) == sorted(w.all_pairs()) and len(flat) == len(set(flat))
    assert shard_pairs(w, WHOLE) == w.all_pairs()
    for i, share in enumerate(shares, 1):  # a generator draws only its own keys
        assert set(shard_sampler(w, 1, Shard(i, 3))(2000)) <= set(share)


@pytest.mark.parametrize("w", [HOT, MARKET])
def test_the_shards_rates_add_up_to_the_whole_rate(w: Any) -> None:
    masses = [shard_mass(w, 1, Shard(i, 2)) for i in (1, 2)]
    assert sum(masses) == pytest.approx(1.0) and shard_mass(w, 1, WHOLE) == 1.0
    if w is HOT:
        assert masses == [pytest.approx(0.5)] * 2


def test_the_union_of_the_shards_draws_has_the_workloads_key_popularity() -> None:
    """Each shard publishes rate x mass draws of its keys: together, the whole's
    popularity (the most drawn keys of both agree)."""
    n = 200_000
    union: collections.Counter[tuple[str, str]] = collections.Counter()
    for i in (1, 2):
        shard = Shard(i, 2)
        union.update(shard_sampler(MARKET, 1, shard)(round(n * shard_mass(MARKET, 1, shard))))
    whole = collections.Counter(key_sampler(MARKET, 1)(n))
    top_whole = [p for p, _ in whole.most_common(5)]
    top_union = [p for p, _ in union.most_common(5)]
    assert top_whole[:3] == top_union[:3]
    assert union[top_whole[0]] == pytest.approx(whole[top_whole[0]], rel=0.05)


def test_metrics_parse_keeps_the_two_process_series_by_process() -> None:
    text = (
        "# HELP fanout_process_cpu_seconds_total CPU time\n"
        "# TYPE fanout_process_cpu_seconds_total counter\n"
        'fanout_process_cpu_seconds_total{process="worker-1"} 1.5\n'
        'fanout_process_cpu_seconds_total{process="admin"} 0.25\n'
        'fanout_process_resident_memory_bytes{process="worker-1"} 1048576\n'
        'fanout_process_open_fds{process="worker-1"} 12\n'
        'fanout_clients{worker="1"} 3\n'
    )
    got = parse_process_series(text)
    assert got == {
        "fanout_process_cpu_seconds_total": {"worker-1": 1.5, "admin": 0.25},
        "fanout_process_resident_memory_bytes": {"worker-1": 1048576.0},
    }


def _hist(ms: list[float]) -> dict[str, int]:
    h: collections.Counter[int] = collections.Counter(bucket_of(int(x * 1e6)) for x in ms)
    return {str(b): n for b, n in h.items()}


def _report(shard: str, clients: int, lat_ms: list[float], server_s: float) -> dict[str, Any]:
    hist = _hist(lat_ms)
    lat = {**percentiles_ms({int(b): n for b, n in hist.items()}, (0.5, 0.99)), "histogram": hist}
    result = {
        "shard": shard,
        "clients": clients,
        "server_measured_by": "the engine's /metrics of http://h:8081",
        "server_sources": ["http://h:8081"],
        "window_s": 10.0,
        "setup": {"ready": clients},
        "publish": {"sent": 1000, "accepted": 1000, "failed": 0, "requests": 10,
                    "achieved_rate": 100.0, "errors": {}},
        "delivery": {"updates": 5000, "frames": 2500, "bytes": 10_000, "updates_per_s": 500.0,
                     "frames_per_s": 250.0, "bytes_per_s": 1000.0, "probes": 5,
                     "updates_counted_by_probes": 500},
        "latency_ms": {**lat, "max": max(lat_ms), "samples": len(lat_ms)},
        "cpu": {"server_s": server_s, "loadgen_s": 1.0, "loadgen_core_share": 0.1,
                "generator_bound": False},
        "memory": {"server_rss_connected_bytes": 100, "rss_guard_tripped": False},
        "convergence": {"clients": clients, "converged": clients, "all_converged": True,
                        "settle_s": 0.1, "snapshots": 2, "snapshots_matched": 2},
        "errors": {}, "close_codes": {"1000": 1}, "connect_errors": {},
    }  # fmt: skip
    return {
        "started_at": "2026-12-06T14:00:00+0000",
        "command": f"fanout bench --shard {shard}",
        "machine": {"cpu_model": "x", "cpus": 2, "memory_bytes": 2**30, "python": "3.11",
                    "fd_limit": [1024, 1024]},
        "settings": {"shard": shard, "sub_procs": 1, "subscribers": 10, "workload": "hot"},
        "workload": "hot",
        "steps": [{"value": None, "results": {"fanout": result}}],
    }  # fmt: skip


def test_merge_sums_rates_and_counts_and_merges_the_latency_histograms() -> None:
    a = _report("1/2", 5, [1.0] * 99 + [50.0], server_s=4.0)
    b = _report("2/2", 6, [2.0] * 100, server_s=5.0)
    merged = merge_reports([a, b], ["a.json", "b.json"])
    r = merged["steps"][0]["results"]["fanout"]
    assert r["clients"] == 11 and r["setup"]["ready"] == 11
    assert r["convergence"]["clients"] == r["convergence"]["converged"] == 11
    assert r["convergence"]["snapshots_matched"] == 4 and merged["all_converged"] is True
    assert r["delivery"]["updates"] == 10_000 and r["delivery"]["updates_per_s"] == 1000.0
    assert r["publish"]["accepted"] == 2000 and r["publish"]["achieved_rate"] == 200.0
    assert r["close_codes"] == {"1000": 2} and r["cpu"]["loadgen_s"] == 2.0
    # one engine seen by both generators: its CPU once (the max), not twice
    assert r["cpu"]["server_s"] == 5.0 and "max" in r["cpu"]["server_merge"]
    assert r["latency_ms"]["samples"] == 200 and "merged" in r["latency_ms"]["method"]
    both = {int(k): v for k, v in r["latency_ms"]["histogram"].items()}
    assert r["latency_ms"]["p99"] == percentiles_ms(both, (0.99,))["p99"]
    assert merged["settings"]["shard"] == "merged" and merged["settings"]["subscribers"] == 11


def test_merge_without_histograms_takes_the_max_p99_and_says_so() -> None:
    lats = [{"p50": 1.0, "p99": 7.0, "max": 9.0, "samples": 3},
            {"p50": 2.0, "p99": 4.0, "max": 5.0, "samples": 4}]  # fmt: skip
    got = merge_latency(lats)
    assert got["p99"] == 7.0 and got["p50"] == 2.0 and got["samples"] == 7
    assert "maximum" in got["method"]


def test_merge_reports_a_shard_that_did_not_converge_and_refuses_missing_shards() -> None:
    a, b = _report("1/2", 5, [1.0], 1.0), _report("2/2", 5, [1.0], 1.0)
    bad = copy.deepcopy(b)
    bad["steps"][0]["results"]["fanout"]["convergence"].update(converged=4, all_converged=False)
    merged = merge_reports([a, bad], ["a", "b"])
    assert merged["all_converged"] is False
    assert "9 of 10" in merged["steps"][0]["broken"]["fanout"]
    with pytest.raises(ValueError, match="shards"):
        merge_reports([a, a], ["a", "a2"])
    with pytest.raises(ValueError, match="shards"):
        check_shards(["1/3", "2/3"])


def test_server_figures_are_taken_once_per_engine_and_summed_over_different_ones() -> None:
    def r(*urls: str) -> dict[str, Any]:
        return {"server_sources": list(urls)}

    assert server_merge([r("http://a", "http://b"), r("http://b", "http://a")]) == "max"
    assert server_merge([r("http://a"), r("http://b")]) == "sum"
    assert server_merge([r("http://a", "http://b"), r("http://a")]) == "overlap"
    assert server_merge([{}, {}]) == "sum"  # servers each bench started itself


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--target", "ws://h:1/ws"], "--target and --admin go together"),
        (["--shard", "1/2"], "--shard and --metrics need --target"),
        (["--target", "ws://h:1/ws", "--admin", "http://h:2", "--baseline"], "already running"),
        (["--target", "ws://h:1/ws", "--admin", "http://h:2", "--shard", "3/2"], "--shard"),
    ],
)
def test_flags_that_do_not_fit_a_running_engine_end_the_command_naming_them(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtest.bench import build_parser, parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_parser(), args)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_a_target_run_keeps_the_shard_and_urls_in_its_settings_but_not_the_key() -> None:
    from loadtest.bench import build_parser, parse_args, settings_from

    a = parse_args(
        build_parser(),
        ["--target", "ws://h:1/ws", "--admin", "http://h:2", "--shard", "2/2", "-S", "10"],
    )
    s = settings_from(a)
    assert (s.target_ws, s.target_admin, s.shard) == ("ws://h:1/ws", "http://h:2", Shard(2, 2))
    assert s.clients() == [1, 3, 5, 7, 9] and s.publish_rate() == pytest.approx(s.rate / 2)
    assert a.api_key_env == "FANOUT_API_KEY"
