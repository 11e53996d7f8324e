"""MLflow conventions (issue 15, point 6): system metrics in training and tuning runs, the dataset as an MLflow dataset
input whose digest is the manifest hash, a pinned ``medseg-ops`` requirement in the logged model, and an input
example that holds no path (it loads and validates in a fresh process, from the store alone).

Real parts: a SQLite MLflow store and artifact folder per test module, the mini preprocessed dataset of
tests/test_training_loop.py, tiny untrained packages of tests/factories.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medseg import schemas
from medseg.tracking import DATASET_DIGEST_CHARS, HTTP_RETRY_DEFAULTS, bound_http_retries
from tests.test_training_loop import MINI, build_mini_preprocessed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import mlflow

    tmp = tmp_path_factory.mktemp("conventions")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("medseg", artifact_location=(tmp / "artifacts").as_uri())
    return {"uri": uri, "tmp": tmp}


@pytest.fixture(autouse=True)
def _isolate_globals(monkeypatch: pytest.MonkeyPatch):
    """Sample often enough for a run of seconds; leave torch threads and MLflow's URI as they were."""
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    threads, uri = torch.get_num_threads(), os.environ.get("MLFLOW_TRACKING_URI")
    yield
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(uri)


def _mini_with_manifest(root: Path) -> tuple[Path, str]:
    """The mini preprocessed folder with the manifest.json preprocessing copies from the ingested dataset."""
    pre = build_mini_preprocessed(root)
    cases = [{"case_id": f"mini_{i:03d}", "files": [{"path": f"imagesTr/mini_{i:03d}_0000.nii.gz", "sha256": f"{i:064x}"}]} for i in range(6)]
    manifest = schemas.Manifest(dataset_name="mini", source="s3://raw-bucket/mini", source_format="nnunet", cases=cases)
    manifest.content_hash = manifest.compute_hash()
    manifest.save(pre)
    return pre, manifest.content_hash


def _check_dataset_input(run, name: str, digest: str, context: str, source: str) -> None:
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert (dataset.name, dataset.digest) == (name, digest[:DATASET_DIGEST_CHARS])
    assert json.loads(dataset.source)["uri"] == source and dataset.source_type == "local"
    assert tags["manifest_hash"] == digest and tags["mlflow.data.context"] == context and tags["raw_source"] == "s3://raw-bucket/mini"


def _system_metrics(client, run_id: str) -> set[str]:
    return {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}


@pytest.mark.slow  # two tiny trainings, a one-trial study, MLflow's SQLite schema
def test_training_and_tuning_runs_log_system_metrics_and_the_dataset(store: dict, tmp_path: Path) -> None:
    import mlflow

    from medseg.training.stage import run_train, run_tune
    from medseg.training.trainer import TrainConfig
    from medseg.training.tuning import sqlite_url

    pre, digest = _mini_with_manifest(tmp_path / "pre")
    result = run_train(pre, tmp_path / "train", TrainConfig(**{**MINI, "epochs": 3, "iterations_per_epoch": 4}), tracking_uri=store["uri"], progress=False)
    run_tune(pre, tmp_path / "best.json", {**MINI, "epochs": 2, "iterations_per_epoch": 3}, 1, sqlite_url(tmp_path / "optuna.db"), "conv",
             tracking_uri=store["uri"], progress=False)
    client = mlflow.MlflowClient(store["uri"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("medseg").experiment_id])}

    train_run = client.get_run(schemas.ModelPackage.load(result.model_dir).training["mlflow_run_id"])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= _system_metrics(client, train_run.info.run_id)
    assert len(client.get_metric_history(train_run.info.run_id, "system/cpu_utilization_percentage")) >= 1
    _check_dataset_input(train_run, "mini", digest, "training", str(pre.resolve()))

    tune_run = client.get_run(runs["tune-conv"].info.run_id)
    assert "system/cpu_utilization_percentage" in _system_metrics(client, tune_run.info.run_id)
    _check_dataset_input(tune_run, "mini", digest, "tuning", str(pre.resolve()))


def test_a_folder_without_manifest_logs_no_dataset(tmp_path: Path) -> None:
    from medseg.tracking import dataset_input, log_dataset_input

    assert dataset_input(build_mini_preprocessed(tmp_path / "pre")) is None
    assert log_dataset_input(None, "training") is None


def test_http_retries_are_bounded_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # an operator's choice wins
    settings = bound_http_retries()
    assert settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    assert {k: v for k, v in settings.items() if k != "MLFLOW_HTTP_REQUEST_MAX_RETRIES"} == {
        k: v for k, v in HTTP_RETRY_DEFAULTS.items() if k != "MLFLOW_HTTP_REQUEST_MAX_RETRIES"}
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()) == (9, 1)  # what MLflow's client reads


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import mlflow
    from mlflow.models import Model
    mlflow.set_tracking_uri(sys.argv[1])
    local = mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[2], dst_path=sys.argv[3])
    example = Model.load(local).load_input_example(local)
    model = mlflow.pyfunc.load_model(sys.argv[2])
    out = model.predict(example)  # checked against the logged signature first
    print(json.dumps({"columns": list(out.columns), "rows": len(out), "example_columns": list(example.columns)}))
""")


@pytest.mark.slow  # logging runs MLflow's own check of the example; then a fresh interpreter loads torch and MLflow
@pytest.mark.parametrize("kind", ["segmentation", "classifier"])
def test_logged_model_pins_medseg_ops_and_its_example_holds_no_path(store: dict, tmp_path: Path, kind: str, onnx_export: None) -> None:
    import mlflow

    from medseg.registry import registry as reg
    from medseg.registry.pyfunc_model import DATA_URI_PREFIX, installed_version, synthetic_input_example
    from tests.factories import make_classifier_package, make_model_package

    package = (make_model_package if kind == "segmentation" else make_classifier_package)(tmp_path / "pkg")
    example = synthetic_input_example(package)
    channels = schemas.Plans.load(package).channel_names
    from medseg.task import Task

    groups = list(Task.from_folder(package).reported_groups)
    assert all(str(example.iloc[0][c]).startswith(DATA_URI_PREFIX) for c in channels)
    metrics = schemas.Metrics(n_cases=1, mean={}, per_case=[{"case_id": "c1", "case_key": "k1"}])
    out = reg.register_model(package, metrics, f"conv-{kind}", store["uri"], {}, {}, input_example=example)

    with reg._tracking(store["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(out["model_uri"], dst_path=str(tmp_path / "dl")))
    requirements = (local / "requirements.txt").read_text().split()
    # the U-Net is exported (the onnx_export fixture), so [serve] loads it without torch; a classifier needs torch
    extra = "serve" if kind == "segmentation" else "serve-torch"
    assert f"medseg-ops[{extra}]=={installed_version()}" in requirements
    stored = (local / "input_example.json").read_text()
    assert str(tmp_path) not in stored and str(package) not in stored and DATA_URI_PREFIX in stored  # nothing local to this run
    assert len(stored) < 64_000

    # the package folder and everything else of this run gone: the store alone serves the example
    import shutil

    shutil.rmtree(package)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, store["uri"], out["model_uri"], str(tmp_path / "fresh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["rows"] == 1
    if kind == "segmentation":
        assert answer["columns"] == ["case_id", *[f"{g}_ml" for g in groups]]
    else:
        assert "label" in answer["columns"] and "age" in answer["example_columns"]
