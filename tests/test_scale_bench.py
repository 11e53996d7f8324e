"""The pure parts of benchmarks/scale.py: the process-tree memory sampler on a real child, and the table and summary.

The benchmark itself preprocesses 250 full-size cases with both tools (about an hour); it is run by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("scale", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# a child that holds 120 MB (written, so resident) and starts a grandchild holding 80 MB, both for a second
ALLOCATING_CHILD = textwrap.dedent("""
    import json, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (80 << 20); time.sleep(1.5)"])
    held = b"y" * (120 << 20)
    time.sleep(1.5)
    grandchild.wait()
    print(json.dumps({"held_mb": len(held) >> 20}))
""")


def test_run_monitored_sees_the_memory_of_the_child_and_its_grandchild(bench, tmp_path: Path) -> None:
    run = bench.run_monitored([sys.executable, "-c", ALLOCATING_CHILD], tmp_path / "child.log", interval=0.05)
    assert run["exit_code"] == 0
    assert json.loads(run["last_line"]) == {"held_mb": 120}
    mem = run["memory"]
    assert 120 <= mem["peak_rss_max_process_mb"] < 400
    assert mem["peak_rss_by_role_mb"]["main"] >= 120
    assert mem["peak_rss_by_role_mb"]["worker"] >= 80
    assert mem["peak_rss_tree_mb"] >= 200  # both held at once
    assert mem["peak_pss_tree_mb"] >= 190 and mem["peak_uss_tree_mb"] >= 190
    assert mem["processes_seen"] == 2 and mem["max_live_processes"] == 2
    assert len(mem["rss_tree_mb_peak_per_tenth"]) == 10
    assert run["kernel_maxrss_mb"] >= 0.9 * mem["peak_rss_max_process_mb"]  # the kernel's high-water mark agrees
    assert run["wall_s"] >= 1.5 and run["cpu_s"] > 0
    assert 0 < mem["cpu_s_sampled"] <= run["cpu_s"] + 0.1  # sampled: never more than the kernel's count
    assert "held_mb" in (tmp_path / "child.log").read_text()


def test_run_monitored_passes_lines_and_their_times_and_reports_a_failure(bench, tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    run = bench.run_monitored([sys.executable, "-c", "print('Fingerprint extraction...'); raise SystemExit(3)"],
                              tmp_path / "fail.log", on_line=lambda line, t: seen.append((line, t)))
    assert run["exit_code"] == 3
    assert [line for line, _ in seen] == ["Fingerprint extraction..."] and seen[0][1] >= 0
    with pytest.raises(bench.BenchmarkError, match="exit 3"):
        bench.last_json(run, "the child", tmp_path / "fail.log")


def test_sampler_of_a_finished_process_reports_no_samples(bench) -> None:
    sampler = bench.ProcessTreeSampler(root_pid=2**22 + 12345)  # above any pid_max default: never alive
    assert sampler.sample_once() is None
    assert sampler.summary() == {"samples": 0}


def test_process_role(bench) -> None:
    assert bench.process_role(10, 10, ["python"]) == "main"
    assert bench.process_role(11, 10, ["python", "-c", "from multiprocessing.resource_tracker import main"]) == "resource_tracker"
    assert bench.process_role(12, 10, ["python", "-c", "from multiprocessing.spawn import spawn_main"]) == "worker"


def fake_run(wall: float, cpu: float, rss_max: float, rss_tree: float, phases: dict | None = None) -> dict:
    return {"exit_code": 0, "wall_s": wall, "cpu_s": cpu, "kernel_maxrss_mb": rss_max, "phases": phases or {},
            "memory": {"peak_rss_max_process_mb": rss_max, "peak_rss_tree_mb": rss_tree, "peak_pss_tree_mb": rss_tree - 10}}


def test_report_table_growth_and_ratios(bench) -> None:
    runs = {
        "ours_ingest": {"50": fake_run(25, 20, 100, 100), "200": fake_run(100, 80, 100, 100)},
        "ours_preprocess": {"50": fake_run(55, 100, 400, 1000, {"import_s": 1.0, "n_cases": 50}),
                            "200": fake_run(205, 400, 400, 1000)},
        "nnunet": {"50": fake_run(550, 1000, 5000, 8000), "200": fake_run(2050, 4000, 5000, 8000)},
    }
    report = bench.build_report({"benchmark": "scale"}, runs)
    table = report["table"]
    row = table["ours_preprocess"]["50"]
    assert row["wall_s_per_case"] == 1.1 and row["cpu_s_per_case"] == 2.0 and row["peak_rss_tree_mb"] == 1000
    assert row["phases_s"] == {"import_s": 1.0}  # counts are not phases
    both = table["ours_ingest_plus_preprocess"]["200"]  # the steps add up in time, their memory peaks take the max
    assert both["wall_s"] == 305 and both["cpu_s_per_case"] == 2.4 and both["peak_rss_max_process_mb"] == 400
    growth = report["summary"]["growth"]["ours_preprocess"]
    assert (growth["from_n"], growth["to_n"]) == (50, 200)
    assert growth["wall_s_per_case"] == round((205 / 200) / (55 / 50), 3)
    assert growth["marginal_wall_s_per_case"] == 1.0 and growth["marginal_cpu_s_per_case"] == 2.0
    assert growth["peak_rss_max_process_mb"] == 1.0 and growth["peak_rss_tree_mb"] == 1.0
    vs = report["summary"]["ours_vs_nnunet"]
    assert vs["ours_preprocess"]["50"]["wall_s_per_case"] == 0.1
    assert vs["ours_preprocess"]["200"]["peak_rss_max_process_mb"] == 0.08
    assert vs["ours_ingest_plus_preprocess"]["200"]["wall_s_per_case"] == round(305 / 2050, 3)
    text = bench.format_table(table)
    assert "nnunet" in text and " 200 " in text and "ours_ingest_plus_preprocess" in text


def test_report_with_one_size_only_has_no_growth(bench) -> None:
    report = bench.build_report({}, {"ours_preprocess": {"50": fake_run(55, 100, 400, 1000)}})
    assert report["summary"] == {"growth": {}, "ours_vs_nnunet": {}}


def test_link_first_cases_links_the_first_n_and_writes_their_marker(bench, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    cases = [f"BraTS-GLI-{i:05d}-000" for i in range(5)]
    for case in cases:
        (raw / case).mkdir(parents=True)
    (raw / "medseg_synth.json").write_text(json.dumps({"cases": 5, "seed": 0, "shape": [8, 8, 8], "anatomy": "mni"}))
    out = bench.link_first_cases(raw, cases, 3, tmp_path / "n3", (8, 8, 8))
    linked = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert linked == cases[:3] and all((out / c).is_symlink() for c in linked)
    marker = json.loads((out / "medseg_synth.json").read_text())
    assert marker["cases"] == 3 and marker["anatomy"] == "mni" and marker["shape"] == [8, 8, 8]
