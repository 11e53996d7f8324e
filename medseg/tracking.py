"""MLflow tracking helpers shared by the stages: one place that knows URIs, experiments and lineage.

Conventions every medseg run follows:

- training and tuning runs log system metrics (``system/cpu_utilization_percentage``, memory, disk, network;
  GPU when ``pynvml`` is importable) every :data:`SYSTEM_METRICS_INTERVAL_S` seconds unless
  ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` says otherwise (MLflow's default, 10 s, leaves a short run with none);
- the data a run read is an MLflow dataset input (:func:`log_dataset_input`): named after ``dataset.json``, its
  digest the manifest's content hash, its source where the data lie (a path, or the ``s3://`` / DVC location given);
- over HTTP, MLflow's own client retries are bounded (:func:`bound_http_retries`): a tracking server that is down
  gives a clear error in about half a minute instead of retrying for minutes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "medseg"
#: Seconds between system-metric samples: several points even for a run of a minute (MLflow's default is 10 s).
SYSTEM_METRICS_INTERVAL_S = 2.0
#: MLflow's HTTP retry settings medseg uses unless the environment sets them (MLflow's defaults, 7 retries with
#: factor 2, keep a client retrying for about four minutes): 4 retries, backoff 1, 2, 4, 8 s (+ jitter ≤ 1 s).
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
#: Longest a dataset digest may be in MLflow's store (``MAX_DATASET_DIGEST_SIZE``): the manifest hash is cut to it.
DATASET_DIGEST_CHARS = 36


def bound_http_retries() -> dict[str, str]:
    """Set MLflow's HTTP retry and timeout variables to :data:`HTTP_RETRY_DEFAULTS` where the environment does not
    set them (an operator's values win); returns the settings in force. Called before any MLflow client is made."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HTTP_RETRY_DEFAULTS}


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


def _system_metrics_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None  # MLflow's monitor needs it (it is not an MLflow dependency)


@contextlib.contextmanager
def mlflow_run(tracking_uri: str | None, run_name: str, tags: dict[str, str] | None = None, experiment: str = DEFAULT_EXPERIMENT, nested: bool = False,
               system_metrics: bool = False) -> Iterator[Any]:
    """An active MLflow run, or ``None`` when tracking is off (``tracking_uri`` empty).

    ``system_metrics``: sample CPU, memory, disk, network (and GPU where ``pynvml`` imports) into ``system/...``
    metrics every :data:`SYSTEM_METRICS_INTERVAL_S` s (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides);
    skipped with a warning when ``psutil`` is not installed."""
    if not tracking_uri:
        yield None
        return
    import mlflow

    bound_http_retries()
    exp_id = ensure_experiment(tracking_uri, experiment)
    monitor = system_metrics and _system_metrics_available()
    if system_metrics and not monitor:
        import logging

        logging.getLogger(__name__).warning("psutil is not installed: run %r logs no system metrics", run_name)
    if monitor:
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SYSTEM_METRICS_INTERVAL_S))  # read when the monitor starts
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags or {}, nested=nested, log_system_metrics=monitor) as run:
        yield run


def dataset_input(folder: str | Path, source: str | None = None) -> tuple[Any, dict[str, str]] | None:
    """The MLflow dataset of a medseg data folder (canonical or preprocessed: it holds ``dataset.json`` and
    ``manifest.json``) and the tags of its input, or ``None`` when the folder has no manifest.

    Name: ``dataset.json``'s ``name``. Digest: the manifest's content hash (the dataset version), cut to
    :data:`DATASET_DIGEST_CHARS`; the whole hash is the input tag ``manifest_hash``. Source: ``source`` (e.g. the
    ``s3://`` or DVC remote location the data came from), else the folder itself. Tags also carry the DVC md5
    of the folder when DVC tracks it, and the manifest's own ``source`` (where ingest read the raw data).
    """
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from medseg import schemas

    folder = Path(folder).resolve()
    if not (folder / schemas.MANIFEST_JSON).is_file():
        return None
    manifest = schemas.Manifest.load(folder)
    digest = manifest.content_hash or manifest.compute_hash()
    name = schemas.DatasetJson.load(folder).name if (folder / schemas.DATASET_JSON).is_file() else manifest.dataset_name
    with warnings.catch_warnings():  # a local path also matches other source types: the local one is meant
        warnings.simplefilter("ignore")
        resolved = resolve_dataset_source(source or str(folder))
    tags = {"manifest_hash": digest, "dataset_path": str(folder), "source_format": str(manifest.source_format), "raw_source": str(manifest.source)[:5000]}
    try:
        from medseg.data.dvc_remote import dvc_entry

        md5 = dvc_entry(folder)[0]
    except Exception:  # noqa: BLE001 - an unreadable dvc.lock must not stop a run; the md5 is extra
        md5 = None
    if md5:
        tags["dvc_md5"] = md5
    return MetaDataset(resolved, name=str(name or manifest.dataset_name), digest=digest[:DATASET_DIGEST_CHARS]), tags


def log_dataset_input(folder: str | Path | None, context: str, source: str | None = None) -> str | None:
    """Log :func:`dataset_input` of ``folder`` as an input of the active run (``context``: ``training``,
    ``tuning``, ``testing``); returns its digest, ``None`` when there is no folder or it has no manifest."""
    if folder is None:
        return None
    found = dataset_input(folder, source)
    if found is None:
        return None
    import mlflow

    dataset, tags = found
    mlflow.log_input(dataset, context=context, tags=tags)
    return str(dataset.digest)


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
