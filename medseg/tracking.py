"""MLflow tracking helpers shared by the stages: one place that knows URIs, experiments and lineage."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "medseg"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{Path('work/mlflow.db').resolve()}")


def git_commit(cwd: str | Path | None = None) -> str:
    """The source tree's commit (``MEDSEG_GIT_COMMIT`` wins: images are built without .git)."""
    if os.environ.get("MEDSEG_GIT_COMMIT"):
        return os.environ["MEDSEG_GIT_COMMIT"]
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """Experiment id; for a SQLite store, artifacts go in a folder beside the database file."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def mlflow_run(tracking_uri: str | None, run_name: str, tags: dict[str, str] | None = None, experiment: str = DEFAULT_EXPERIMENT, nested: bool = False) -> Iterator[Any]:
    """An active MLflow run, or ``None`` when tracking is off (``tracking_uri`` empty)."""
    if not tracking_uri:
        yield None
        return
    import mlflow

    exp_id = ensure_experiment(tracking_uri, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags or {}, nested=nested) as run:
        yield run


def resolve_tracking_uri(value: str | None) -> str:
    """The pipeline parameter, or, when it is empty, ``MLFLOW_TRACKING_URI`` (on a cluster mounted from a
    Kubernetes Secret, so the URL with its credentials never appears in the pipeline)."""
    uri = value or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        from medseg.errors import MedsegError

        raise MedsegError("no MLflow tracking URI: pass mlflow_tracking_uri or set MLFLOW_TRACKING_URI")
    return uri


def resolve_optuna_storage(value: str | None) -> str:
    """The pipeline parameter, or, when it is empty, ``OPTUNA_STORAGE`` (from a Secret on a cluster)."""
    storage = value or os.environ.get("OPTUNA_STORAGE", "")
    if not storage:
        from medseg.errors import MedsegError

        raise MedsegError("no Optuna storage: pass optuna_storage or set OPTUNA_STORAGE")
    return storage
