"""The pure parts of the load-testing tools: workloads and report tables."""

from __future__ import annotations

import collections
from typing import Any

import pytest

from loadtest.latency import bucket_mid_ns, bucket_of, percentiles_ms
from loadtest.report import markdown, ratios, step_table
from loadtest.workload import HOT, MARKET, key_sampler


def test_hot_is_one_topic_of_fifty_keys_published_round_robin() -> None:
    assert HOT.topic_names() == ["bench.hot"]
    sample = key_sampler(HOT, seed=1)
    first = sample(50)
    assert len(set(first)) == 50 and sample(50) == first
    assert HOT.subscriptions(3, seed=1) == [("bench.hot",)] * 3


def test_market_keys_are_zipf_skewed_and_the_same_for_the_same_seed() -> None:
    assert MARKET.total_keys == 5000 and len(MARKET.topic_names()) == 100
    draws = key_sampler(MARKET, seed=7)(20_000)
    assert draws == key_sampler(MARKET, seed=7)(20_000)
    counts = collections.Counter(draws).most_common()
    # the most popular key is drawn far more often than a typical one
    assert counts[0][1] > 20 * (20_000 / 5000)
    assert all(topic in MARKET.topic_names() for (topic, _key), _n in counts)


def test_market_subscribers_take_five_distinct_topics_reproducibly() -> None:
    subs = MARKET.subscriptions(100, seed=3)
    assert subs == MARKET.subscriptions(100, seed=3)
    assert all(len(set(s)) == 5 for s in subs)
    assert len({t for s in subs for t in s}) > 50


def _result(updates_per_s: float, p99: float, converged: int) -> dict[str, object]:
    return {
        "delivery": {"updates_per_s": updates_per_s, "frames_per_s": 10.0},
        "latency_ms": {"p99": p99},
        "cpu": {"server_s_per_million_updates": 0.5},
        "convergence": {"fraction": converged / 10, "converged": converged, "clients": 10},
        "publish": {},
    }


def test_ratios_are_fanout_over_baseline_and_the_table_shows_both() -> None:
    results = {"fanout": _result(3000.0, 20.0, 10), "baseline": _result(1000.0, 200.0, 10)}
    r = ratios(results)
    assert r["delivered updates/s"] == 3.0 and r["latency p99 (ms)"] == 0.1
    lines = step_table({"results": results, "ratios": r})
    assert lines[0] == "| metric | fanout | baseline | fanout ÷ baseline |"
    assert "| delivered updates/s | 3,000 | 1,000 | 3x |" in lines
    assert ratios({"fanout": results["fanout"]}) == {}


def test_markdown_names_the_command_and_says_whether_every_client_converged() -> None:
    report = {
        "started_at": "t",
        "command": "fanout bench -S 10",
        "workload": "hot",
        "settings": {
            "workload": "hot", "scenario": "fanout", "subscribers": 10, "sub_procs": 2,
            "rate": 100.0, "duration_s": 1.0, "batch_ms": 10.0, "workers": 2, "flush_ms": 20,
        },
        "machine": {"cpu_model": "x", "cpus": 2, "memory_bytes": 2**30, "python": "3.11",
                    "fd_limit": [1, 2]},
        "steps": [{"value": None, "results": {"fanout": _result(1.0, 1.0, 9)}, "ratios": {}}],
        "all_converged": False,
    }  # fmt: skip
    md = markdown(report)
    assert "`fanout bench -S 10`" in md
    assert "NOT every client converged" in md


def test_latency_buckets_are_monotonic_and_percentiles_fall_in_the_right_bucket() -> None:
    samples_ms = [1.0] * 98 + [50.0, 5000.0]
    hist: dict[int, int] = {}
    for ms in samples_ms:
        b = bucket_of(int(ms * 1e6))
        hist[b] = hist.get(b, 0) + 1
    assert bucket_of(-5) == 0
    assert bucket_of(10**6) < bucket_of(10**9) < bucket_of(10**10)
    p = percentiles_ms(hist, (0.5, 0.99, 1.0))
    assert p["p50"] == pytest.approx(1.0, abs=0.07)
    assert p["p99"] == pytest.approx(50.0, abs=0.07)
    assert p["p100"] == pytest.approx(5000.0, abs=70.0)
    assert percentiles_ms({}, (0.5,)) == {"p50": None}


def test_a_percentile_is_the_first_bucket_whose_cumulative_count_reaches_its_rank() -> None:
    def ms(b: int) -> float:
        return round(bucket_mid_ns(b) / 1e6, 3)

    hist = {30: 2, 10: 1, 20: 0, 40: 1}  # ordered: 10 (1), 20 (0), 30 (2), 40 (1); total 4
    assert percentiles_ms(hist, (0.25, 0.5, 0.75, 1.0)) == {
        "p25": ms(10),  # rank 1: bucket 10 (an empty bucket after it is not the answer)
        "p50": ms(30),
        "p75": ms(30),
        "p100": ms(40),
    }
    assert percentiles_ms({7: 0, 9: 3}, (0.001,)) == {"p01": ms(9)}


# -- fanout bench: probes, counting clients, the generator-bound flag (issue 13, item 1) ----


def test_a_run_is_generator_bound_past_half_the_servers_cpu_or_on_a_saturated_machine() -> None:
    from loadtest.report import generator_bound

    assert generator_bound(2.0, 10.0, 1.0, 2) is None  # a fifth, 1 of 2 cores busy
    assert generator_bound(5.0, 10.0, 1.8, 2) is None  # exactly half, 90% busy
    half = generator_bound(5.1, 10.0, 1.0, 2)
    assert half is not None and "0.51x the server's" in half
    busy = generator_bound(1.0, 10.0, 1.9, 2)
    assert busy is not None and "machine saturated: 1.90 of 2 cores busy" in busy
    both = generator_bound(8.0, 0.0, 8.0, 8)
    assert both is not None and "saturated" in both and "inf" in both


def test_probes_are_a_share_of_the_reading_clients_at_least_fifty_in_as_few_processes() -> None:
    from loadtest.bench.run import probe_indices

    assert probe_indices(20, set(), 0.05) == set(range(20))  # fewer than 50: all probes
    probes = probe_indices(10_000, set(), 0.05)
    assert len(probes) == 500 and min(probes) == 0 and max(probes) >= 9_900
    assert len(probe_indices(1000, set(), 0.05)) == 50  # 5% is 50
    assert len(probe_indices(400, set(), 0.05)) == 50  # at least 50
    slow = set(range(0, 1000, 10))
    probes = probe_indices(1000, slow, 0.2)
    assert len(probes) == 200 and not probes & slow  # a slow client is never a probe
    assert probe_indices(1000, set(), 1.0) == set(range(1000))
    # in as few subscriber processes as hold them (client i is in process i % procs),
    # spread over each one's clients: they share its decode cache
    probes = probe_indices(1000, set(), 0.05, procs=2)
    assert {i % 2 for i in probes} == {0} and max(probes) >= 900
    probes = probe_indices(10_000, set(), 0.05, procs=8)
    assert len(probes) == 500 and {i % 8 for i in probes} == {0}
    probes = probe_indices(1000, slow, 0.6, procs=2)  # more than the first one's readers
    assert len(probes) == 600 and not probes & slow
    assert {i for i in range(0, 1000, 2) if i not in slow} <= probes  # the first's all


def test_delivered_updates_are_the_probes_count_scaled_to_every_clients_frames() -> None:
    from loadtest.bench.run import _delivery

    start = {"p1": {"frames": 10, "probe_frames": 10, "probe_updates": 20, "counted_frames": 0,
                    "bytes": 100}}  # fmt: skip
    end = {"p1": {"frames": 110, "probe_frames": 30, "probe_updates": 80, "counted_frames": 80,
                  "bytes": 1100}}  # fmt: skip
    d = _delivery(start, end, 2.0, 5)
    assert d["frames"] == 100 and d["bytes"] == 1000 and d["bytes_per_s"] == 500
    assert d["updates_counted_by_probes"] == 60
    assert d["updates"] == 60 + 80 * 3 and d["updates_estimated"] is True  # 3 per frame
    end["p1"]["counted_frames"] = 0  # --decode-all: every frame counted by a probe
    assert _delivery(start, end, 2.0, 5)["updates"] == 60
    assert _delivery(start, end, 2.0, 5)["updates_estimated"] is False


def test_the_publishers_msgpack_body_is_the_packed_items_byte_for_byte() -> None:
    import time

    import msgpack

    from loadtest.bench.publisher import msgpack_body

    pairs = [*key_sampler(MARKET, seed=1)(300), ("t", "k" * 40), ("é" * 20, "")]
    t = time.time_ns()
    prefixes: dict[tuple[str, str], bytes] = {}
    items = [{"topic": tp, "key": k, "data": [7 + i + 1, t]} for i, (tp, k) in enumerate(pairs)]
    for _ in range(2):  # building the prefixes, then reusing them
        assert msgpack_body(pairs, 7, t, prefixes) == msgpack.packb({"items": items})
    assert msgpack_body([], 7, t, prefixes) == msgpack.packb({"items": []})


def test_a_run_whose_snapshot_did_not_match_is_broken_though_every_probe_converged() -> None:
    from loadtest.bench import build_parser, parse_args, settings_from
    from loadtest.bench.run import broke

    s = settings_from(parse_args(build_parser(), ["-S", "100"]))
    result: dict[str, dict[str, Any]] = {
        "memory": {"rss_guard_tripped": False},
        "latency_ms": {"p99": 10.0},
        "publish": {"achieved_rate": s.rate},
        "convergence": {"all_converged": True, "converged": 50, "clients": 50,
                        "snapshots": 50, "snapshots_matched": 50,
                        "all_snapshots_matched": True},
    }  # fmt: skip
    assert broke(result, s, 250.0) is None
    result["convergence"].update(snapshots_matched=49, all_snapshots_matched=False)
    assert broke(result, s, 250.0) == "only 49 of 50 snapshots matched"


def test_read_lowat_is_a_bounded_byte_count() -> None:
    from loadtest.bench import MAX_READ_LOWAT, build_parser, parse_args

    assert parse_args(build_parser(), ["--read-lowat", "0"]).read_lowat == 0
    assert parse_args(build_parser(), []).read_lowat == 65536
    for bad in ("-1", str(MAX_READ_LOWAT + 1)):
        with pytest.raises(SystemExit):
            parse_args(build_parser(), ["--read-lowat", bad])
