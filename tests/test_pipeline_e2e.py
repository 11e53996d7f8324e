"""End to end: the real kfp.local pipeline on a tiny synthetic dataset, the MLflow registry it fills,
and the real KServe model server answering for the champion over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from medseg import schemas
from medseg.task import BRATS2023

pytestmark = pytest.mark.slow

TINY_PARAMS = {
    "synth": {"cases": 8, "shape": [48, 48, 48], "seed": 3},
    "ingest": {"n_folds": 2, "test_fraction": 0.25, "seed": 0},
    "preprocess": {"device_budget": "cpu"},
    "train": {"epochs": 2, "iterations_per_epoch": 3, "max_val_cases": 1},
    "tune": {"n_trials": 2, "trial_params": {"epochs": 1, "iterations_per_epoch": 2, "max_val_cases": 1}},
    "evaluate": {"overlap": 0.25},
    # an untrained-quality model: the gate thresholds are 0 so the flow is exercised end to end
    "registry": {"model_name": "tiny-e2e", "thresholds": {"WT": 0.0}, "promotion_margin": 1.0},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from medseg.demo import run_demo

    root = tmp_path_factory.mktemp("e2e")
    params = {**TINY_PARAMS, "work_dir": str(root / "work")}
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    assert run_demo(params_file, root / "out") == 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    return root, params, summary


def test_demo_summary_and_outputs(demo_run):
    root, _, summary = demo_run
    assert summary["endpoint_ok"] is True
    assert summary["alias"] == "champion" and summary["model_version"] == "1"
    for key in ("wt_dice", "tc_dice", "et_dice"):
        assert 0.0 <= summary[key] <= 1.0
    out = root / "out"
    assert list(out.glob("*_seg.nii.gz")) and list(out.glob("*_overlay.png"))
    assert set(summary["stage_seconds"]) >= {"synth", "ingest", "preprocess", "tune", "train", "evaluate", "register", "promote", "serve"}


def test_every_task_wrote_its_artefacts(demo_run):
    _, _, summary = demo_run
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "ingest" / "dataset" / schemas.MANIFEST_JSON).is_file()
    assert (run_dir / "preprocess" / "preprocessed" / schemas.PLANS_JSON).is_file()
    best = json.loads((run_dir / "tune" / "best_params" / "best_params.json").read_text())
    assert best["n_trials"] == 2 and set(best["params"]) == {"learning_rate", "foreground_share", "weight_decay"}
    assert (run_dir / "fold-ensemble" / "model" / schemas.WEIGHTS_FILE).is_file()  # one fold: its package, passed through
    metrics = schemas.Metrics.load(run_dir / "evaluate" / "evaluation")
    assert metrics.n_cases == 2 and {"WT", "TC", "ET"} <= set(metrics.mean)
    assert {"lesionwise_dice_2023", "lesionwise_hd95_2023", "lesion_tp_2023"} <= set(metrics.mean["ET"])  # BraTS data: official lesion-wise numbers
    assert (run_dir / "evaluate" / "evaluation" / "cases.csv").read_text().startswith("case,region,metric,value")
    assert (run_dir / "evaluate" / "evaluation" / "per_case.csv").read_text().count("\n") >= 3
    assert "WT" in (run_dir / "evaluate" / "report").read_text()
    executor = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    assert "WT_dice" in json.dumps(executor)  # the KFP Metrics artefact carries the numbers


def test_registry_aliases_and_lineage(demo_run):
    import mlflow

    root, params, _ = demo_run
    client = mlflow.MlflowClient(f"sqlite:///{root / 'work' / 'mlflow.db'}")
    name = params["registry"]["model_name"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1"
    tags = champion.tags
    for key in ("manifest_hash", "git_commit", "pipeline_run_id", "plan_hash", "training_run_id"):
        assert tags.get(key) not in (None, "", "unknown") or key == "git_commit", key
    assert tags["promotion_decision"] == "promoted"
    run = client.get_run(tags["training_run_id"])
    best = json.loads((Path(demo_run[2]["run_dir"]) / "tune" / "best_params" / "best_params.json").read_text())
    assert float(run.data.params["learning_rate"]) == pytest.approx(best["params"]["learning_rate"])  # tuned values reach training
    history = client.get_metric_history(run.info.run_id, "val_dice_mean")
    assert len(history) == params["train"]["epochs"]


def test_champion_served_over_http(demo_run):
    from medseg.serving.client import infer
    from medseg.serving.server import free_port, start_server_process, stop_server, wait_until_ready

    root, params, summary = demo_run
    name = params["registry"]["model_name"]
    dataset = Path(summary["run_dir"]) / "ingest" / "dataset"
    case = schemas.Splits.load(dataset).test[0]
    images = [dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz" for c in range(4)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'work' / 'mlflow.db'}"}
    port = free_port()
    proc = start_server_process(f"models:/{name}@champion", name, port, env=env, log_file=root / "server.log")
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", name, 120)
        answer = infer(f"http://127.0.0.1:{port}", name, images, list(BRATS2023.channels))
    finally:
        stop_server(proc)
    assert answer["model_version"] == "1"
    assert set(answer["volumes_ml"]) == {"WT", "TC", "ET"}
    assert answer["segmentation_bytes"][:2] == b"\x1f\x8b"


def test_compile_and_load_back(tmp_path):
    from kfp import components

    from medseg.pipeline.runner import compile_pipeline

    path = compile_pipeline(tmp_path)
    assert path.name.startswith("medseg-training-") and path.suffix == ".yaml"
    spec = next(yaml.safe_load_all(path.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert {"exec-ingest", "exec-preprocess", "exec-tune-worker", "exec-train", "exec-evaluate", "exec-register", "exec-promote", "exec-serve"} <= set(executors)
    train_resources = executors["exec-train"]["container"]["resources"]
    assert train_resources["cpuRequest"] == 4 and train_resources["memoryLimit"] == 32
    # GPUs are run parameters (defaults: params.yaml cluster.accelerator): the resources name them
    assert train_resources["accelerator"] == {"resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
                                              "resourceCount": "{{$.inputs.parameters['pipelinechannel--train_gpus']}}"}
    assert executors["exec-tune-worker"]["container"]["resources"]["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--tune_gpus']}}"
    run_params = spec["root"]["inputDefinitions"]["parameters"]
    assert run_params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu" and run_params["train_gpus"]["defaultValue"] == 1
    platform = yaml.safe_load_all(path.read_text())
    docs = list(platform)
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = {s["secretName"] for s in k8s["exec-train"]["secretAsEnv"]}
    assert secrets == {"medseg-mlflow", "medseg-mlflow-pipeline", "medseg-s3"}
    assert {s["secretName"] for s in k8s["exec-tune-worker"]["secretAsEnv"]} == {"medseg-mlflow", "medseg-mlflow-pipeline", "medseg-s3", "medseg-optuna"}
    assert k8s["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "postgres" not in path.read_text() and "AKIA" not in path.read_text()  # no literal credentials
    assert spec["root"]["dag"]["tasks"]["ingest"]["cachingOptions"] == {}
    assert spec["root"]["dag"]["tasks"]["preprocess"]["cachingOptions"] == {"enableCache": True}
    assert "test set" in spec["root"]["inputDefinitions"]["parameters"]["test_fraction"]["description"]
    assert all(e["container"]["image"].startswith("ghcr.io/medseg-ops/") for e in executors.values())
    assert spec["root"]["dag"]["tasks"]["promote"]["cachingOptions"] == {}
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "medseg-training"
