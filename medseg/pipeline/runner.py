"""Run the training pipeline with ``kfp.local`` (no cluster) or compile it for Kubeflow.

The pipeline definition lives in ``pipelines/training_pipeline.py`` at the project root; its arguments
come from ``params.yaml``.
"""

from __future__ import annotations

import builtins

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import medseg
from medseg import schemas
from medseg.errors import MedsegError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def load_params(path: str | Path = schemas.PARAMS_YAML) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedsegError("parameter file not found", path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MedsegError(f"not valid YAML ({exc})", path) from None


def work_paths(params: dict[str, Any]) -> dict[str, Path]:
    work = Path(params.get("work_dir", "work")).resolve()
    return {"work": work, "raw": work / "raw", "kfp": work / "kfp", "mlflow_db": work / schemas.MLFLOW_DB, "optuna_db": work / schemas.OPTUNA_DB}


CHECKPOINTS_DIR = "checkpoints"  # under work_dir: the train step's checkpoint store in kfp.local runs

#: ``pipeline_arguments(target=...)``: ``local`` for ``kfp.local`` runs, ``cluster`` for the compiled defaults.
RUN_TARGETS = ("local", "cluster")


def pipeline_arguments(params: dict[str, Any], source: str | Path, tracking_uri: str, optuna_storage: str, target: str = "local") -> dict[str, Any]:
    """``params.yaml`` → the pipeline's typed parameters.

    ``target="local"`` (``medseg pipeline run``, kfp.local): one tune worker (the study is a local SQLite
    file and the machine has few cores) and ``deploy_target="local"`` (the model server on 127.0.0.1).
    ``target="cluster"`` (the compiled pipeline's defaults): ``cluster.tune_workers`` parallel workers and
    ``deploy.target`` (``kserve``).

    GPUs: a local run asks none (``train_gpus``/``tune_gpus``/``evaluate_gpus`` 0: the CPU, as before); the compiled
    defaults come from ``cluster.accelerator`` and ``cluster.device_budget`` (see :func:`gpu_arguments`).
    """
    if target not in RUN_TARGETS:
        raise MedsegError(f"pipeline target must be one of {', '.join(RUN_TARGETS)}, got {target!r}")
    from medseg.deploy.config import config_values

    ing, reg, tune = params.get("ingest", {}), params.get("registry", {}), params.get("tune", {})
    deploy_config = config_values(params)
    deploy_default = deploy_config.pop("target", "kserve")
    deploy_config.pop("image", None)  # the pipeline passes the serve image it was compiled with
    gpu = gpu_arguments(params, target)
    from medseg.training.config import split_train_section

    train_fields, folds = split_train_section(params.get("train"))
    return {
        "source": str(source),
        "mlflow_tracking_uri": tracking_uri,
        "optuna_storage": optuna_storage,
        "model_name": str(reg.get("model_name") or "auto"),
        "source_format": ing.get("source_format", "auto"),
        "n_folds": int(ing.get("n_folds", 5)),
        "test_fraction": float(ing.get("test_fraction", 0.2)),
        "seed": int(ing.get("seed", 0)),
        "device_budget": gpu.pop("device_budget"),
        "configuration": str(params.get("preprocess", {}).get("configuration", "auto")),
        "candidate_configurations": str(params.get("preprocess", {}).get("candidates") or ""),
        "train_params": train_fields,
        "folds": folds if folds is not None else str(train_fields.get("fold", 0)),
        "tune_params": dict(tune.get("trial_params", {})),
        "n_trials": int(tune.get("n_trials", 3)),
        "overlap": float(params.get("evaluate", {}).get("overlap", 0.5)),
        "evaluate_mirror": bool(params.get("evaluate", {}).get("mirror", False)),
        "thresholds": _thresholds(reg.get("thresholds", "auto")),
        "promotion_margin": float(reg.get("promotion_margin", 0.0)),
        "gate_metric": str(reg.get("gate_metric") or "auto"),
        "tune_workers": 1 if target == "local" else max(1, int((params.get("cluster") or {}).get("tune_workers", 1))),
        "deploy_target": "local" if target == "local" else str(deploy_default),
        "deploy_config": deploy_config,
        "checkpoint_store": checkpoint_store_argument(params, target),
        **gpu,
    }


def checkpoint_store_argument(params: dict[str, Any], target: str = "local") -> str:
    """Where the train step keeps its checkpoints: ``local`` → ``<work_dir>/checkpoints`` (a killed ``medseg
    pipeline run`` resumes with ``--resume-run``); ``cluster`` → ``cluster.checkpoint_store`` (``s3://...`` or the
    mount path of a volume the train pod has; empty: none)."""
    if target == "local":
        return str(work_paths(params)["work"] / CHECKPOINTS_DIR)
    return str((params.get("cluster") or {}).get("checkpoint_store") or "")


def gpu_arguments(params: dict[str, Any], target: str = "local") -> dict[str, Any]:
    """The GPU parameters of the training pipeline: ``train_gpus``, ``tune_gpus``, ``evaluate_gpus``, ``accelerator_type``,
    ``gpu_memory_gib``, ``train_node_selector`` and ``device_budget``.

    ``local``: no GPU and ``preprocess.device_budget`` (what the DVC stage plans with). ``cluster``: ``cluster.accelerator``
    (``type``, ``limit`` = GPUs per train pod, ``tune_limit`` (default 1 when ``limit`` > 0), ``evaluate_limit``
    (default 0), ``memory_gib``), ``cluster.node_selector`` and ``cluster.device_budget`` (default: ``preprocess.device_budget``).
    An empty ``type`` means no GPU for any step.
    """
    cluster = params.get("cluster") or {}
    acc = cluster.get("accelerator") or {}
    kind = str(acc.get("type") or "")
    local_budget = str((params.get("preprocess") or {}).get("device_budget", "cpu"))
    args: dict[str, Any] = {"accelerator_type": kind, "gpu_memory_gib": float(acc.get("memory_gib", 0) or 0),
                            "train_node_selector": {str(k): str(v) for k, v in (cluster.get("node_selector") or {}).items()}}
    if target == "local" or not kind:
        return {**args, "train_gpus": 0, "tune_gpus": 0, "evaluate_gpus": 0, "device_budget": local_budget if target == "local" else
                str(cluster.get("device_budget") or local_budget)}
    train_gpus = int(acc.get("limit", 1))
    counts = {"train_gpus": train_gpus, "tune_gpus": int(acc.get("tune_limit", min(train_gpus, 1))), "evaluate_gpus": int(acc.get("evaluate_limit", 0))}
    bad = {k: v for k, v in counts.items() if v < 0}
    if bad:
        raise MedsegError(f"cluster.accelerator: GPU counts must be >= 0, got {bad}")
    return {**args, **counts, "device_budget": str(cluster.get("device_budget") or local_budget)}


def _thresholds(value: Any) -> dict[str, Any]:
    """``registry.thresholds`` as the pipeline's dict: ``auto`` (the task's own, ``{"auto": true}``), ``none``/empty (none),
    or a mapping ``GROUP[/METRIC]: value``."""
    if value is None or value == "none":
        return {}
    if value == "auto":
        return {"auto": True}
    if not isinstance(value, dict):
        raise MedsegError(f"registry.thresholds must be auto, none or a mapping GROUP[/METRIC]: value, got {value!r}")
    return dict(value)


PIPELINES = {
    "training": ("pipelines.training_pipeline", "training_pipeline"),
    "batch-inference": ("pipelines.batch_inference_pipeline", "batch_inference_pipeline"),
}


def _import_pipeline(which: str = "training"):
    """``(name, pipeline function)`` of one of :data:`PIPELINES` (defined at the project root)."""
    import importlib

    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    module_name, func = PIPELINES[which]
    module = importlib.import_module(module_name)
    return module.PIPELINE_NAME, getattr(module, func)


def run_local(arguments: dict[str, Any], pipeline_root: Path) -> dict[str, Any]:
    """Execute the pipeline with kfp.local's SubprocessRunner in this Python environment.

    Returns {"run_dir", "tasks": {task: {output: path}}, "seconds"}.
    """
    from medseg.optional import needs_extra

    with needs_extra("all", "running the pipeline with kfp.local"):
        from kfp import local

    name, pipeline = _import_pipeline()
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.glob(f"{name}-*"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    t0 = time.perf_counter()
    # kfp.local indents task logs by swapping builtins.print per task; with ParallelFor tasks on threads the
    # swaps interleave and an indenting print can outlive the run, so the caller's print is put back
    original_print = builtins.print
    previous_local = os.environ.get("MEDSEG_KFP_LOCAL")
    os.environ["MEDSEG_KFP_LOCAL"] = "1"  # pipelines/training_pipeline.py: the local retry policy of the train task
    try:
        pipeline(**arguments)
    except RuntimeError as exc:
        raise MedsegError(f"pipeline run failed: {exc}") from None
    finally:
        builtins.print = original_print
        if previous_local is None:
            os.environ.pop("MEDSEG_KFP_LOCAL", None)
        else:
            os.environ["MEDSEG_KFP_LOCAL"] = previous_local
    seconds = time.perf_counter() - t0
    new_runs = sorted(set(pipeline_root.glob(f"{name}-*")) - before, key=lambda p: p.stat().st_mtime)
    if not new_runs:
        raise MedsegError(f"pipeline finished but wrote no run folder under {pipeline_root}")
    run_dir = new_runs[-1]
    return {"run_dir": str(run_dir), "tasks": task_outputs(run_dir), "seconds": seconds}


_LOOP_ITERATION = re.compile(r"^for-loop-\d+-iteration-(\d+)$")


def task_outputs(run_dir: Path) -> dict[str, dict[str, str]]:
    """``{task: {output: path}}`` of a kfp.local run folder. Tasks inside a ``dsl.ParallelFor`` (kfp.local
    writes them to ``for-loop-<n>-iteration-<i>/<task>/``) are listed as ``<task>-<i>``."""
    tasks: dict[str, dict[str, str]] = {}
    for folder in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()):
        loop = _LOOP_ITERATION.match(folder.name)
        if loop:
            for task in sorted(p for p in folder.iterdir() if p.is_dir()):
                tasks[f"{task.name}-{loop.group(1)}"] = {o.name: str(o) for o in task.iterdir()}
        else:
            tasks[folder.name] = {o.name: str(o) for o in folder.iterdir()}
    return tasks


def task_parameters(run_dir: Path, task: str) -> dict[str, Any]:
    """The output parameters (a NamedTuple's fields) of one task of a kfp.local run folder, from its
    ``executor_output.json``; empty when the task has none."""
    from medseg.io import read_json

    path = Path(run_dir) / task / schemas.KFP_EXECUTOR_OUTPUT_JSON
    if not path.is_file():
        return {}
    return dict(read_json(path).get("parameterValues") or {})


def compiled_version() -> str:
    from medseg.tracking import git_commit

    commit = git_commit(PROJECT_ROOT)
    return f"{medseg.__version__}-{commit[:8]}" if commit != "unknown" else medseg.__version__


def compile_pipeline(out_dir: Path | None = None, which: str = "training") -> Path:
    """Write ``pipelines/compiled/<name>-<version>.yaml`` (version = package version + git sha)."""
    from medseg.optional import needs_extra

    with needs_extra("pipelines", "compiling the pipeline"):
        from kfp import compiler

    name, pipeline = _import_pipeline(which)
    out_dir = Path(out_dir) if out_dir else PROJECT_ROOT / "pipelines" / "compiled"
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{name}-{compiled_version()}.yaml"
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # kfp insists on a .yaml name: compile aside, then move in
        staged = Path(tmp) / dest.name
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(staged))
        os.replace(staged, dest)
    return dest


def summarize(result: dict[str, Any]) -> str:
    """One JSON line: the run folder, each task's outputs, the wall time (the demo reads it)."""
    return json.dumps(result)
