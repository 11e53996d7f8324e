"""Smoke test of benchmarks/serve_load.py: a tiny package, a 32³ case, a few requests, the JSON's shape, no errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_end_to_end_json(bench, capsys):
    code = bench.main(["--tiny", "--case-shape", "32", "32", "32", "--clients", "1", "2", "--seconds", "2", "--max-requests", "3",
                       "--warmup", "1", "--soak", "2", "--soak-clients", "1", "--request-timeout", "60"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert out["benchmark"] == "serve_load" and out["case"]["shape"] == [32, 32, 32] and out["case"]["channels"] == 4
    assert [p["clients"] for p in out["phases"]] == [1, 2]
    for phase in out["phases"]:
        assert phase["errors"] == 0 and phase["error_samples"] == []
        assert 1 <= phase["requests"] <= 3 * phase["clients"]
        assert phase["server_requests_observed"] == phase["requests"]  # the /metrics deltas cover exactly this phase
        lat = phase["latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert set(phase["server_stage_mean_s"]) == {"preprocess", "queue", "predict", "postprocess"}
        assert 0 <= phase["outside_predictor_share"] < 1
        assert phase["outside_forward_share_est"] >= phase["outside_predictor_share"]
        assert phase["rss_mib_before"] > 50 and phase["rss_mib_after"] > 50
    assert 0 < out["predictor_profile"]["forward_fraction"] <= 1
    soak = out["soak"]
    assert soak["errors"] == 0 and soak["requests"] >= 1 and soak["rss_mib_first"] > 50 and soak["rss_growth_pct"] is not None
    assert out["targets"]["zero_errors"] is True
    assert out["targets"]["p99_over_p50_4_clients_le_1.5"] is None  # no 4-client phase in this run
    # with the profile (default) the overhead target is judged on the share outside the network forward
    assert set(out["targets"]) == {"outside_forward_share_1_client_le_0.15", "p99_over_p50_4_clients_le_1.5", "zero_errors",
                                   "soak_rss_growth_lt_5pct"}
    assert out["targets"]["outside_forward_share_1_client_le_0.15"] == (out["phases"][0]["outside_forward_share_est"] <= 0.15)


def test_histogram_deltas_and_summary(bench):
    def sample(name, value, **labels):
        return (name, tuple(sorted(labels.items()))), value

    before = dict([sample("medseg_stage_seconds_sum", 1.0, model="m", stage="predict"), sample("medseg_stage_seconds_count", 1, model="m", stage="predict")])
    after = dict([sample("medseg_stage_seconds_sum", 9.0, model="m", stage="predict"), sample("medseg_stage_seconds_count", 5, model="m", stage="predict"),
                  sample("medseg_stage_seconds_sum", 0.4, model="m", stage="queue"), sample("medseg_stage_seconds_count", 4, model="m", stage="queue"),
                  sample("request_predict_seconds_sum", 8.8, model_name="m"), sample("request_predict_seconds_count", 4, model_name="m")])
    deltas = bench.histogram_deltas(before, after, "m")
    assert deltas["stage_predict"] == {"sum": 8.0, "count": 4}
    assert deltas["stage_preprocess"] == {"sum": 0.0, "count": 0.0}
    run = {"latencies": [2.4, 2.5, 2.5, 2.6], "errors": 0, "error_samples": [], "wall_s": 10.0}
    phase = bench.summarize_phase(1, run, deltas, 100.0, 101.0, forward_fraction=0.5)
    assert phase["server_stage_mean_s"]["predict"] == 2.0 and phase["server_stage_mean_s"]["preprocess"] is None
    assert phase["outside_predictor_share"] == pytest.approx(0.2)  # 1 - 8 / 10
    assert phase["outside_predictor_share_excl_queue"] == pytest.approx(1 - 8 / 9.6, abs=1e-4)
    assert phase["outside_forward_share_est"] == pytest.approx(0.6)
    assert phase["throughput_rps"] == 0.4 and phase["kserve_request_predict_mean_s"] == 2.2
    targets = bench.targets({"phases": [phase], "soak": None})
    assert targets == {"outside_forward_share_1_client_le_0.15": False, "p99_over_p50_4_clients_le_1.5": None,
                       "zero_errors": True, "soak_rss_growth_lt_5pct": None}
    # without the in-process profile the overhead is judged on the share outside the predictor
    unprofiled = bench.summarize_phase(1, run, deltas, 100.0, 101.0, forward_fraction=None)
    assert bench.targets({"phases": [unprofiled], "soak": None})["outside_predictor_share_1_client_le_0.15"] is False
