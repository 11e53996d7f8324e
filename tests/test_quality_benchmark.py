"""The pure parts of benchmarks/quality_vs_nnunet.py: nnU-Net's region order, our topology in nnU-Net's plans, the goal.

The benchmark itself trains both tools for 30 minutes each; it is run by hand and its numbers are in issue 14's note."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_vs_nnunet", ROOT / "benchmarks" / "quality_vs_nnunet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_region_order_writes_each_region_as_the_label_it_adds(bench) -> None:
    from medseg.task import BRATS2023

    names, order = bench.region_label_order({k: list(v) for k, v in BRATS2023.regions.items()})
    assert names == sorted(BRATS2023.regions, key=lambda n: -len(BRATS2023.regions[n]))
    # writing the order's labels region by region, largest first, gives back each voxel's label
    for label in BRATS2023.labels.values():
        if label == 0:
            continue
        written = 0
        for name, value in zip(names, order):
            if label in BRATS2023.regions[name]:
                written = value
        assert written == label
    with pytest.raises(bench.BenchmarkError, match="not nested"):
        bench.region_label_order({"A": [1, 2], "B": [1, 2]})


def test_plans_take_our_topology_with_axes_reversed(bench, tmp_path: Path) -> None:
    plans = {"plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2], "configurations": {"3d_fullres": {
        "patch_size": [112, 112, 112], "batch_size": 2, "spacing": [1.0, 1.0, 1.0],
        "architecture": {"arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "kernel_sizes": [], "strides": [],
                                         "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5}}}}}
    source = tmp_path / "nnUNetPlans.json"
    source.write_text(json.dumps(plans))
    ours = SimpleNamespace(patch_size=[48, 56, 64], batch_size=3, network={
        "features": [16, 32, 64], "kernel_sizes": [[3, 3, 1], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]]})
    info = bench.nnunet_plans_like_ours(source, tmp_path / "nnUNetPlans_medseg.json", ours)
    written = json.loads((tmp_path / "nnUNetPlans_medseg.json").read_text())
    cfg = written["configurations"]["3d_fullres"]
    assert written["plans_name"] == "nnUNetPlans_medseg"
    assert cfg["patch_size"] == [64, 56, 48] and cfg["batch_size"] == 3  # (I, J, K) -> SimpleITK's (K, J, I)
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == 3 and kwargs["features_per_stage"] == [16, 32, 64]
    assert kwargs["kernel_sizes"][0] == [1, 3, 3] and kwargs["strides"][1] == [1, 2, 2]
    assert kwargs["n_conv_per_stage"] == [2, 2, 2] and kwargs["n_conv_per_stage_decoder"] == [2, 2]
    assert info["default_plan_patch_size"] == [112, 112, 112]


def test_goal_needs_every_region_within_the_margin_and_one_better(bench) -> None:
    theirs = {"WT": {"dice": 0.90}, "TC": {"dice": 0.80}, "ET": {"dice": 0.70}}
    assert bench.goal({"WT": {"dice": 0.91}, "TC": {"dice": 0.79}, "ET": {"dice": 0.69}}, theirs)["goal_met"]
    missed = bench.goal({"WT": {"dice": 0.95}, "TC": {"dice": 0.77}, "ET": {"dice": 0.70}}, theirs)
    assert not missed["goal_met"] and missed["dice_difference"]["TC"] == pytest.approx(-0.03)
    assert not bench.goal({"WT": {"dice": 0.90}, "TC": {"dice": 0.80}, "ET": {"dice": 0.70}}, theirs)["goal_met"]  # better nowhere
