"""Every fold in its own train task, then one fold-ensemble step, under the real kfp.local runner.

``folds: all`` on a 2-fold split: the ``ParallelFor`` trains fold 0 and fold 1 (``train-0``, ``train-1``), the
fold-ensemble step combines their packages into one ensemble package with postprocessing chosen on their
out-of-fold predictions, and evaluate, register and serve take that ensemble.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg import schemas

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "ingest": {"source_format": "auto", "n_folds": 2, "test_fraction": 0.25, "seed": 0},
    "preprocess": {"device_budget": "cpu", "configuration": "3d_fullres"},
    "train": {"epochs": 2, "iterations_per_epoch": 3, "max_val_cases": 2, "loader_prefetch": 0, "folds": "all"},
    "tune": {"n_trials": 1, "trial_params": {"epochs": 1, "iterations_per_epoch": 1, "max_val_cases": 1}},
    "evaluate": {"overlap": 0.25},
    "registry": {"model_name": "auto", "thresholds": "none", "promotion_margin": 1.0, "gate_metric": "auto"},
}


def test_all_folds_train_as_parallel_tasks_and_their_ensemble_is_evaluated_and_registered(tmp_path: Path) -> None:
    import mlflow

    from medseg.pipeline.runner import task_parameters
    from medseg.synth_layouts import generate_layout

    source = tmp_path / "raw"
    generate_layout("brats2023", source, 8, seed=0, shape=(32, 32, 32), progress=False, anatomy="procedural")
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "work_dir": str(work)}))
    proc = subprocess.run([sys.executable, "-m", "medseg.cli", "pipeline", "run", "--source", str(source), "--params", str(work / "params.yaml")],
                          cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{") and '"run_dir"' in line][-1])
    tasks = result["tasks"]

    # one train task per fold, each a single-fold package of its own fold
    folds = {}
    for name in ("train-0", "train-1"):
        package = schemas.ModelPackage.load(Path(tasks[name]["model"]))
        folds[name] = package.training["config"]["fold"]
        assert not package.training.get("ensemble")
    assert sorted(folds.values()) == [0, 1]

    # the ensemble of both, postprocessing chosen on out-of-fold predictions, is what was evaluated and registered
    ensemble = Path(tasks["fold-ensemble"]["model"])
    package = schemas.ModelPackage.load(ensemble)
    assert sorted(package.training["folds"]) == [0, 1] and len(package.training["ensemble"]["weights_files"]) == 2
    assert set(package.training["cv_dice"]) == {"WT", "TC", "ET"}
    assert package.postprocessing == {} or "min_volume_mm3" in package.postprocessing
    assert all((ensemble / f).is_file() for f in package.training["ensemble"]["weights_files"])
    evaluated = schemas.Metrics.load(Path(tasks["evaluate"]["evaluation"]))
    assert evaluated.n_cases >= 1
    registered = task_parameters(Path(result["run_dir"]), "register")
    client = mlflow.MlflowClient(f"sqlite:///{work / schemas.MLFLOW_DB}")
    version = client.get_model_version(registered["model_name"], registered["version"])
    champion = client.get_model_version_by_alias(registered["model_name"], "champion")
    assert champion.version == version.version
    smoke = json.loads((Path(tasks["serve"]["result"]) / schemas.SMOKE_JSON).read_text())
    assert smoke["endpoint_ok"] is True
    # the ensemble step's MLflow run holds the out-of-fold Dice, and the package points at it
    from medseg.tracking import DEFAULT_EXPERIMENT

    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'ensemble'")
    assert len(runs) == 1 and {"cv_dice_WT", "cv_dice_TC", "cv_dice_ET"} <= set(runs[0].data.metrics)
    assert runs[0].info.run_id == package.training["mlflow_run_id"]
