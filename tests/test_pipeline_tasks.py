"""Every task the platform claims, end to end: ``medseg pipeline run --source DIR`` on small data in its real layout.

One parameter file for every task, short and with nothing task-specific in it (``model_name: auto``, no absolute
thresholds, ``configuration: auto``, network and loss ``auto``): the dataset's task decides the rest. Each run must
end with a champion of the right task in the MLflow registry, the task's metrics in the KFP Metrics artefact and in
MLflow, and the model server's V2 answer with the task's outputs. A second run on the same data is gated against
that champion on the task's metric (promoted, or refused with the reason); a run whose test set differs in content
is refused and says so.

The real kfp.local runner, a real MLflow store, the real KServe model server on 127.0.0.1, real files in each
source's own layout (``medseg synth --layout``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medseg import schemas
from medseg.task import Task

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

#: the same for every task: small and short, nothing that names a task
GENERIC_PARAMS: dict[str, Any] = {
    "ingest": {"source_format": "auto", "n_folds": 2, "test_fraction": 0.25, "seed": 0},
    "preprocess": {"device_budget": "cpu", "configuration": "auto"},
    "train": {"epochs": 2, "iterations_per_epoch": 3, "max_val_cases": 1, "loader_prefetch": 0},
    "tune": {"n_trials": 1, "trial_params": {"epochs": 1, "iterations_per_epoch": 1, "max_val_cases": 1}},
    "evaluate": {"overlap": 0.25},
    # untrained-quality models: no absolute thresholds (the gate against the champion still runs), a wide margin
    "registry": {"model_name": "auto", "thresholds": "none", "promotion_margin": 1.0, "gate_metric": "auto"},
}

#: layouts whose second run (the gate against the champion) is checked: one per kind of gate decision (regions of
#: one BraTS layout, a 2D plan, a classifier, an nnU-Net-format label set with its reshuffled test split). The other
#: layouts reach the same gate code with the same task kind (BraTS 2024 and METS are region tasks as BraTS 2023 is,
#: DICOM's labels are gated as MSD's are); running them twice cost ~70 s each in make test, for no new path.
GATED_LAYOUTS = ("brats2023", "lgg", "classification", "msd")

#: layout → (cases, shape, expected task kind, registered model name, chosen configuration)
LAYOUTS: dict[str, tuple[int, tuple[int, int, int], str, str, str]] = {
    "brats2023": (8, (32, 32, 32), "segmentation", "brats2023-segmentation", "3d_fullres"),
    "brats2024": (8, (32, 32, 32), "segmentation", "brats2024-segmentation", "3d_fullres"),
    "mets": (8, (32, 32, 32), "segmentation", "brats2023-segmentation", "3d_fullres"),
    "lgg": (8, (48, 48, 8), "segmentation", "lgg-segmentation", "2d"),
    "classification": (12, (32, 32, 32), "classification", "classification-classifier", "3d_fullres"),
    "dicom": (8, (32, 32, 16), "segmentation", "dicom-segmentation", "3d_fullres"),
    "msd": (8, (24, 32, 24), "segmentation", "msd-segmentation", "3d_fullres"),
}


def _write_source(layout: str, out: Path, seed: int = 0) -> Path:
    from medseg.synth_layouts import generate_layout

    cases, shape, *_ = LAYOUTS[layout]
    options = {"anatomy": "procedural"} if layout in ("brats2023", "brats2024", "mets") else {}
    generate_layout(layout, out, cases, seed=seed, shape=shape, progress=False, **options)
    return out


#: layouts whose first run trains every fold (2 here) as parallel tasks and ships their ensemble (train.folds: all)
ALL_FOLDS_LAYOUTS = ("brats2023",)
#: layouts whose first run also trains the 2d configuration and keeps the best of 3d_fullres, 2d and their pair by
#: cross-validation (preprocess.candidates), as nnU-Net's find_best_configuration
CANDIDATE_LAYOUTS = ("brats2024",)


def _run_pipeline(work: Path, source: Path, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``medseg pipeline run`` as a user runs it, in its own process; returns its summary line (run folder, task outputs)."""
    params = {**GENERIC_PARAMS, **(params or {}), "work_dir": str(work)}
    params_file = work / "params.yaml"
    work.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "medseg.cli", "pipeline", "run", "--source", str(source), "--params", str(params_file)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    log = work / f"pipeline-{len(list(work.glob('pipeline-*.log')))}.log"
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"pipeline failed, log in {log}:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    last = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"run_dir"' in line][-1]
    return json.loads(last)


def _output_parameters(run_dir: Path, task: str) -> dict[str, Any]:
    from medseg.pipeline.runner import task_parameters

    return task_parameters(run_dir, task)


def _kfp_metrics(run_dir: Path) -> dict[str, float]:
    data = json.loads((run_dir / "evaluate" / schemas.KFP_EXECUTOR_OUTPUT_JSON).read_text())
    found: dict[str, float] = {}
    for artifact in (data.get("artifacts") or {}).get("metrics", {}).get("artifacts", []):
        found.update(artifact.get("metadata") or {})
    return found


def _check_first_run(layout: str, work: Path, result: dict[str, Any]) -> dict[str, Any]:
    import mlflow

    _, _, kind, name, configuration = LAYOUTS[layout]
    run_dir = Path(result["run_dir"])
    tasks = result["tasks"]
    task = Task.from_folder(Path(tasks["ingest"]["dataset"]))
    assert task.kind == kind

    # the configuration the run picked is recorded
    plans = schemas.Plans.load(Path(tasks["preprocess"]["preprocessed"]))
    assert plans.chosen_configuration == configuration and plans.configuration_reason
    assert _output_parameters(run_dir, "preprocess")["configuration"] == configuration

    # the task's metrics in the KFP Metrics artefact
    kfp = _kfp_metrics(run_dir)
    primary = f"{task.primary_group}_{task.primary_metric}"
    assert primary in kfp, f"{primary} not in the KFP metrics {sorted(kfp)}"
    metrics = schemas.Metrics.load(Path(tasks["evaluate"]["evaluation"]))
    assert set(task.reported_metrics(metrics.mean)) <= set(kfp)

    # a champion of the right task in the registry, with the same metrics in MLflow
    registered = _output_parameters(run_dir, "register")
    assert registered["model_name"] == name
    client = mlflow.MlflowClient(f"sqlite:///{work / schemas.MLFLOW_DB}")
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == registered["version"] == "1"
    assert champion.tags.get("task_kind") == kind and champion.tags.get("primary_metric") == task.primary_metric
    logged = client.get_run(champion.run_id).data.metrics
    assert f"test_{primary}" in logged, sorted(logged)
    assert all(f"test_{k}" in logged for k in task.reported_metrics(metrics.mean))

    # the served champion answered a V2 request with the task's outputs
    smoke = json.loads((Path(tasks["serve"]["result"]) / schemas.SMOKE_JSON).read_text())
    assert smoke["endpoint_ok"] is True and str(smoke["model_version"]) == "1"
    if task.is_classification:
        assert set(smoke["probabilities"]) == set(task.classes) and smoke["label"] in task.classes
    else:
        assert set(smoke["volumes_ml"]) == set(task.reported_groups)
    return {"task": task, "name": name, "client": client}


def _check_fold_ensemble(result: dict[str, Any], client: Any) -> None:
    """``folds: all`` on 2 folds: one train task per fold (``train-0``, ``train-1``), and the fold-ensemble step's
    ensemble of both (postprocessing chosen out of fold, its MLflow run holding the out-of-fold Dice) is what
    evaluate and register took."""
    from medseg.tracking import DEFAULT_EXPERIMENT

    tasks = result["tasks"]
    folds = sorted(schemas.ModelPackage.load(Path(tasks[name]["model"])).training["config"]["fold"] for name in ("train-0", "train-1"))
    assert folds == [0, 1]
    ensemble = Path(tasks["fold-ensemble"]["model"])
    package = schemas.ModelPackage.load(ensemble)
    assert sorted(package.training["folds"]) == [0, 1] and all((ensemble / f).is_file() for f in package.training["ensemble"]["weights_files"])
    assert set(package.training["cv_dice"]) == set(Task.from_folder(ensemble).reported_groups)
    evaluated = json.loads((Path(tasks["evaluate"]["evaluation"]) / schemas.METRICS_JSON).read_text())
    assert evaluated["n_cases"] >= 1
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'ensemble'")
    assert len(runs) == 1 and runs[0].info.run_id == package.training["mlflow_run_id"]
    assert {f"cv_dice_{g}" for g in package.training["cv_dice"]} <= set(runs[0].data.metrics)
    # the registered version is that ensemble: its lineage names the ensemble's training run
    registered = _output_parameters(Path(result["run_dir"]), "register")
    assert client.get_model_version(registered["model_name"], registered["version"]).tags["training_run_id"] == package.training["mlflow_run_id"]


def _check_configuration_choice(result: dict[str, Any], client: Any) -> None:
    """``preprocess.candidates: 2d,3d_fullres`` on fold 0: one train task per configuration, and the fold-ensemble
    step's model is the best of 3d_fullres, 2d and their pair by out-of-fold Dice, which evaluate, register and serve took."""
    from medseg.tracking import DEFAULT_EXPERIMENT

    tasks = result["tasks"]
    trained = {schemas.ModelPackage.load(Path(tasks[name]["model"])).configuration for name in ("train-0", "train-1")}
    assert trained == {"3d_fullres", "2d"}
    model = Path(tasks["fold-ensemble"]["model"])
    package = schemas.ModelPackage.load(model)
    selection = package.training["configuration_selection"]
    assert set(selection["scores"]) == {"3d_fullres", "2d", "3d_fullres+2d"}
    assert selection["scores"][selection["chosen"]] == max(selection["scores"].values())
    assert package.configuration == selection["chosen"]
    if "+" in selection["chosen"]:
        assert [m["configuration"] for m in package.configuration_ensemble] == selection["members"]
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'select-configuration'")
    assert len(runs) == 1 and runs[0].data.params["chosen"] == selection["chosen"]
    assert runs[0].info.run_id == package.training["selection_mlflow_run_id"]
    registered = _output_parameters(Path(result["run_dir"]), "register")
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert client.get_run(version.run_id).data.params["configuration"] == selection["chosen"]  # the registration run says what was chosen


def _check_gated(result: dict[str, Any], task: Task, name: str, client: Any) -> dict[str, Any]:
    decision = json.loads(Path(result["tasks"]["promote"]["decision"]).read_text())
    assert decision["compared_with"] == "1", decision
    gate = decision["gate"]
    assert gate["metric"] == task.primary_metric and gate["n_common"] >= 1, gate
    assert task.primary_metric in decision["reason"] or decision["promoted"], decision["reason"]
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert champion == ("2" if decision["promoted"] else "1")
    return decision


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_task_runs_the_whole_loop_and_gates_a_second_run(layout: str, tmp_path: Path) -> None:
    source = _write_source(layout, tmp_path / "raw")
    work = tmp_path / "work"
    all_folds = layout in ALL_FOLDS_LAYOUTS
    if all_folds:
        first = _run_pipeline(work, source, {"train": {**GENERIC_PARAMS["train"], "folds": "all"}})
    elif layout in CANDIDATE_LAYOUTS:
        first = _run_pipeline(work, source, {"preprocess": {**GENERIC_PARAMS["preprocess"], "candidates": "2d,3d_fullres"}})
    else:
        first = _run_pipeline(work, source)
    checked = _check_first_run(layout, work, first)
    if all_folds:
        _check_fold_ensemble(first, checked["client"])
    if layout in CANDIDATE_LAYOUTS:
        _check_configuration_choice(first, checked["client"])
    if layout not in GATED_LAYOUTS:
        return
    # the same data again, another training seed (the same seed trains the same model: an equal model is never
    # promoted): paired with the champion case by case on the task's metric
    second = _run_pipeline(work, source, {"train": {**GENERIC_PARAMS["train"], "seed": 1}})
    decision = _check_gated(second, checked["task"], checked["name"], checked["client"])
    if layout != "msd":
        return
    # another test split of the same source: the test sets differ in content, so the gate refuses and says so
    champion = str(checked["client"].get_model_version_by_alias(checked["name"], "champion").version)
    reshuffled = _run_pipeline(work, source, {"ingest": {**GENERIC_PARAMS["ingest"], "seed": 7}})
    refused = json.loads(Path(reshuffled["tasks"]["promote"]["decision"]).read_text())
    assert refused["promoted"] is False and "test sets differ" in refused["reason"], refused["reason"]
    assert str(checked["client"].get_model_version_by_alias(checked["name"], "champion").version) == champion
    assert decision["compared_with"] == "1"
