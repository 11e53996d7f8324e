"""The model registry: register a model package with its lineage, gate it to ``champion``, roll back.

Aliases of a registered model (one per task)::

    challenger          the latest version that met the absolute thresholds at registration
    champion            the promoted version (what ``models:/NAME@champion`` and the server load)
    previous-champion   the champion before the last promotion: the target of ``rollback``

The task (:class:`medseg.task.Task`, from the package's ``dataset.json``) decides what is measured: the
thresholds' metrics and directions, the metrics logged (:meth:`~medseg.task.Task.reported_metrics`), and the
gate's groups, primary group and metric. A registered model holds one task: its signature is tagged on the
registered model when it is created, and a package of another task is refused under that name. Each version
is tagged with what the gate needs (``task_kind``, ``primary_metric``, ``primary_group``, ``gate_groups``,
``task_signature``), so promotion never downloads the model, and with its test set's identity
(``test_set_hash``: sha256 over the sorted case keys of its per-case metrics).

Every decision is written on the model version as tags (``threshold_passed``/``threshold_reason`` at
registration, ``promotion_decision``/``promotion_reason`` and the compared numbers at promotion), so a
refusal is a recorded outcome, not an exception. Registrations, promotions and rollbacks are logged on the
registered model (tags ``promotion_log/<seq>``, ``promotion_last``) and each promotion decision as a JSON
record ``promotion/<seq>-v<version>-<decision>.json`` in the version's run.

Each version's run holds its model card ``model_card.md`` (written at registration, completed with the gate
decision at promotion: :mod:`medseg.registry.model_card`) and its test metrics as artifacts ``evaluation/metrics.json`` and
``evaluation/per_case.json``; promotion compares the challenger's and the champion's per-case metric over
the same test cases with the paired bootstrap gate of :mod:`medseg.registry.gate`. The ``challenger`` alias
(at registration) and ``champion`` / ``previous-champion`` (at promotion and rollback) move only under the
lock of :mod:`medseg.registry.lock`, so concurrent registrations and promotions are serialised.

When the tracking server stops answering (after MLflow's bounded HTTP retries: :func:`medseg.tracking.bound_http_retries`)
register, promote and rollback end with one clear :class:`MedsegError`, and nothing half done counts as done: a version
is ``registration_state`` ``incomplete`` until its alias, log entry and model card are written (promote refuses it, the
same registration run again completes it: :func:`register_model` is idempotent), and promotion moves aliases behind the
registered-model tag :data:`PENDING_TAG`, which the next promote or rollback undoes before it decides.

Used by the pipeline (:func:`register_model`, :func:`promote`) and by ``medseg registry``
(:func:`add_arguments` / :func:`run`). MLflow is imported inside the functions (CLI start-up time).
Version numbers are strings everywhere here (the local store gives ints, REST gives strings).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import sha256_json
from medseg.registry import gate, model_card
from medseg.registry.lineage import LINEAGE_KEYS, UNKNOWN, build_lineage, merge_lineage
from medseg.registry.lock import DEFAULT_TIMEOUT_S, Held, promotion_lock
from medseg.task import CLASSIFICATION_GATES, CLASSIFICATION_REPORTED, THRESHOLD_SEPARATOR, Task, metric_spec

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"
EVAL_DIR = "evaluation"  # the folder of the test metrics in a version's run
PER_CASE_JSON = schemas.PER_CASE_JSON
#: Report files logged beside metrics.json when ``report_dir`` holds them.
REPORT_FILES = (schemas.REPORT_MD, schemas.REPORT_HTML, schemas.PER_CASE_CSV, schemas.CASES_CSV, schemas.DICE_BOXPLOT_PNG, schemas.CONFUSION_CSV,
                schemas.TRAINING_CURVES_PNG)
#: ``thresholds`` key asking for the task's default thresholds (:meth:`~medseg.task.Task.default_thresholds`).
AUTO = "auto"
#: Registered-model tag: the task signature (JSON) every version of the model must have.
TASK_SIGNATURE_TAG = "task_signature"
#: Version tags describing the task (what promotion needs, without downloading the model).
TASK_TAGS = ("task_kind", "primary_metric", "primary_group", "gate_groups", TASK_SIGNATURE_TAG)


# --------------------------------------------------------------------------- helpers
def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    from medseg.tracking import bound_http_retries

    bound_http_retries()  # a tracking server that is down: a bounded retry with backoff, then a clear error
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


#: Words of the errors MLflow's REST client raises when the tracking server does not answer (after its retries).
_UNREACHABLE_MARKERS = ("max retries exceeded", "connection refused", "connectionerror", "failed to establish a new connection",
                        "remotedisconnected", "connection aborted", "read timed out", "bad gateway", "service unavailable", "gateway timeout",
                        "too many 502", "too many 503", "too many 504", "too many 500")


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the tracking server could not be reached."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__}: {exc}".lower()
        if any(marker in text for marker in _UNREACHABLE_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


@contextmanager
def _server_faults(tracking_uri: str, what: str, rerun: str) -> Iterator[None]:
    """Turn "the tracking server did not answer" (after MLflow's bounded retries) into one clear :class:`MedsegError`
    saying what was not completed and that a re-run completes it; other errors pass unchanged."""
    try:
        yield
    except MedsegError:
        raise
    except Exception as exc:
        if not _unreachable(exc):
            raise
        import os

        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        raise MedsegError(f"the MLflow tracking server at {_redact(tracking_uri)} did not answer (after {retries} retries with backoff): "
                          f"{what} not completed. Nothing half-done is kept as done: {rerun}") from None


def _redact(uri: str) -> str:
    """``uri`` without a password (``http://user:secret@host`` → ``http://user:***@host``)."""
    return re.sub(r"(//[^:/@]+:)[^@/]+@", r"\1***@", str(uri))


@contextmanager
def _tracking(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri`` for the block, then restore what was set before.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also write ``MLFLOW_TRACKING_URI``/
    ``MLFLOW_REGISTRY_URI`` into ``os.environ`` (for subprocesses), so those are restored exactly; the
    resolved default (``sqlite:///<cwd>/mlflow.db``) is never written back.
    """
    import os

    import mlflow

    old_tracking, old_registry = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)  # None: forgets the URI and unsets the variable
        mlflow.set_registry_uri(old_registry or "")  # "": falls back to the tracking URI
        if old_registry is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def _aliases(model: Any) -> dict[str, str]:
    """Alias → version as str (the local store returns ints, REST strings)."""
    return {str(a): str(v) for a, v in (getattr(model, "aliases", None) or {}).items()}


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def _get_version(client: Any, name: str, version: str | int) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if _not_found(exc):
            raise MedsegError(f"registered model {name!r} has no version {version}") from None
        raise


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _set_tags(client: Any, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _fmt_value(x: float) -> str:
    return f"{float(x):.4f}"


# --------------------------------------------------------------------------- the task of a version
@dataclass
class GateTask:
    """What the gate needs to know of a version's task (from its tags, or its package's ``dataset.json``)."""

    kind: str
    primary_metric: str
    primary_group: str
    gate_groups: list[str]
    signature: dict[str, Any] | None = field(default=None)

    @classmethod
    def from_task(cls, task: Task) -> GateTask:
        return cls(task.kind, task.primary_metric, task.primary_group, list(task.gate_groups), task.signature)

    def tags(self) -> dict[str, str]:
        return {"task_kind": self.kind, "primary_metric": self.primary_metric, "primary_group": self.primary_group,
                "gate_groups": json.dumps(self.gate_groups), TASK_SIGNATURE_TAG: _signature_json(self.signature)}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> GateTask | None:
        if not all(k in tags for k in ("task_kind", "primary_metric", "primary_group", "gate_groups")):
            return None
        try:
            groups = [str(g) for g in json.loads(tags["gate_groups"])]
            signature = json.loads(tags[TASK_SIGNATURE_TAG]) if tags.get(TASK_SIGNATURE_TAG) else None
        except ValueError:
            return None
        return cls(str(tags["task_kind"]), str(tags["primary_metric"]), str(tags["primary_group"]), groups, signature)

    def gate_metric(self, requested: str | None) -> tuple[str, bool]:
        """The metric the gate compares and whether higher is better: ``requested``, or the task's primary
        metric for ``auto``. A classifier is gated on ``log_loss`` or ``auc_macro``; a segmentation model on
        a per-case segmentation metric."""
        metric = self.primary_metric if requested in (None, "", AUTO) else str(requested)
        spec = metric_spec(metric)
        if self.kind == "classification" and metric not in CLASSIFICATION_GATES:
            raise MedsegError(f"a classifier is gated on {' or '.join(CLASSIFICATION_GATES)}, not {metric!r}")
        if self.kind != "classification" and metric in CLASSIFICATION_REPORTED:
            raise MedsegError(f"{metric!r} is a classification metric; this is a {self.kind} model (gate on e.g. {self.primary_metric!r})")
        return metric, spec.higher_is_better


def _signature_json(signature: Mapping[str, Any] | None) -> str:
    return json.dumps(signature, sort_keys=True) if signature is not None else ""


def version_task(client: Any, name: str, mv: Any, tracking_uri: str) -> GateTask:
    """The task of a registered version: its tags, else (versions registered before they were written) the
    ``dataset.json`` of its logged model package (one download)."""
    found = GateTask.from_tags(mv.tags or {})
    if found is not None:
        return found
    import mlflow

    from medseg.registry.pyfunc_model import package_dir_of

    with tempfile.TemporaryDirectory(prefix="medseg-task-") as tmp, _tracking(tracking_uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp)
        return GateTask.from_task(Task.from_folder(package_dir_of(local)))


# --------------------------------------------------------------------------- thresholds
def resolve_thresholds(task: Task, thresholds: Mapping[str, Any] | None) -> dict[str, float]:
    """``GROUP/METRIC`` → threshold. ``{}``: none; a truthy ``auto`` key: the task's
    :meth:`~medseg.task.Task.default_thresholds`, the other keys added or overriding; ``GROUP`` alone is the
    task's primary metric.

    Raises:
        MedsegError: an unknown metric, or a value that is not a number.
    """
    given = dict(thresholds or {})
    auto = given.pop(AUTO, None)
    out: dict[str, float] = {}
    if auto and str(auto).strip().lower() not in ("false", "0", "no", "off"):
        out.update({k: float(v) for k, v in task.default_thresholds().items()})
    for key, value in given.items():
        group, metric = task.parse_threshold_key(str(key))
        try:
            out[f"{group}{THRESHOLD_SEPARATOR}{metric}"] = float(value)
        except (TypeError, ValueError):
            raise MedsegError(f"threshold {key!r}: {value!r} is not a number") from None
    return out


def check_thresholds(metrics: schemas.Metrics, thresholds: Mapping[str, Any], task: Task) -> tuple[bool, str]:
    """Every threshold (``GROUP``, ``GROUP/METRIC`` or ``auto``: :func:`resolve_thresholds`) must hold on
    ``metrics.mean``, each in its metric's direction. Returns (passed, reason naming group, metric, value
    and threshold)."""
    resolved = resolve_thresholds(task, thresholds)
    if not resolved:
        return True, "no thresholds set"
    failed, held = [], []
    for key, limit in resolved.items():
        group, metric = task.parse_threshold_key(key)
        spec = metric_spec(metric)
        raw = (metrics.mean.get(group) or {}).get(metric)
        value = gate._number(raw)
        if value is None:
            failed.append(f"{group}: no mean {metric} in the metrics")
            continue
        direction = "" if spec.higher_is_better else " (lower is better)"
        if spec.passes(value, limit):
            held.append(f"{group} {metric} {_fmt_value(value)} {'>=' if spec.higher_is_better else '<='} {_fmt_value(limit)}{direction}")
        else:
            failed.append(f"{group} {metric} {_fmt_value(value)} {'<' if spec.higher_is_better else '>'} {_fmt_value(limit)}{direction}")
    if failed:
        return False, "below threshold: " + "; ".join(failed)
    return True, "thresholds met: " + "; ".join(held)


def hash_test_set(per_case: Sequence[Mapping[str, Any]]) -> str:
    """The test set's identity: sha256 over the sorted case keys (JSON list); ``unknown`` when a case has none."""
    keys = [str(e.get("case_key") or "") for e in per_case]
    if not keys or not all(keys):
        return UNKNOWN
    return sha256_json(sorted(keys))


# --------------------------------------------------------------------------- register
def register_model(
    model_dir: Path,
    metrics: schemas.Metrics,
    name: str,
    tracking_uri: str,
    lineage: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    experiment: str = "medseg",
    report_dir: Path | None = None,
    input_example: Any = None,
    *,
    dataset_dir: Path | None = None,
    lock_timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Log ``model_dir`` as a pyfunc model in a new run, register it as a new version of ``name``.

    Args:
        model_dir: the model package.
        metrics: its held-out test metrics (``metrics.json``; per-case entries with ``case_key``).
        name: the registered model; ``auto``: the task's :meth:`~medseg.task.Task.default_model_name`.
        tracking_uri: MLflow tracking and registry URI.
        lineage: lineage values the caller knows (e.g. :func:`~medseg.registry.lineage.build_lineage`'s, or
            just ``pipeline_run_id``); they win over what :func:`build_lineage` finds itself (empty or
            ``unknown`` values do not).
        thresholds: ``{}``: none; ``{"auto": true}``: the task's defaults; ``GROUP`` / ``GROUP/METRIC`` keys
            (see :func:`resolve_thresholds`), each checked in its metric's direction.
        report_dir: the evaluation folder; its report files (:data:`REPORT_FILES`) are logged too.
        input_example: a one-row DataFrame, stored with the model; MLflow predicts it once while logging. Use
            :func:`~medseg.registry.pyfunc_model.synthetic_input_example` (inline, no path of this machine).
        dataset_dir: the canonical dataset (its manifest hash is the ``manifest_hash`` lineage tag); also logged as
            the run's MLflow dataset input (context ``testing``).
        lock_timeout: seconds to wait for the registry lock (the ``challenger`` alias moves under it).

    The run gets the training config as params, ``test_<GROUP>_<metric>`` metrics (every number
    :meth:`~medseg.task.Task.reported_metrics` gives) and ``test_n_cases``, ``evaluation/metrics.json`` +
    ``evaluation/per_case.json`` (and the report files), and the lineage as tags. The version gets the
    lineage tags (:data:`LINEAGE_KEYS`), the task tags (:data:`TASK_TAGS`), ``test_set_hash``,
    ``threshold_passed`` / ``threshold_reason`` and, if every threshold holds, the alias ``challenger``. The
    registration is logged in the promotion log (action ``register``). The version's run also gets its model card
    (``model_card.md``, and ``model_card.json`` it is rendered from; :mod:`medseg.registry.model_card`) and the
    version a one-line description.

    Returns ``{"name", "version", "run_id", "model_uri", "challenger", "reason", "test_set_hash", "model_card", "resumed",
    "already_registered"}``.

    Raises:
        MedsegError: ``name`` holds models of another task (signature), a threshold names an unknown metric, or the
            tracking server stopped answering (after MLflow's bounded retries).

    Idempotent: a registration is identified by :func:`registration_key`. Run again after being cut off (the server
    went away), it completes the version its first attempt created (``"resumed": true``) or, when none was created,
    marks the first attempt's run FAILED and registers anew; run again after it completed, it returns that version
    (``"already_registered": true``). The version carries ``registration_state`` ``incomplete`` until its alias, log
    entry and model card are in place; :func:`promote` refuses such a version.
    """
    model_dir = Path(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    task = Task.from_folder(model_dir)
    info = GateTask.from_task(task)
    if not name or name == AUTO:
        name = task.default_model_name()
    resolved = resolve_thresholds(task, thresholds)
    passed, reason = check_thresholds(metrics, resolved, task)
    tags = merge_lineage(build_lineage(model_dir, dataset_dir), lineage)
    set_hash = hash_test_set(metrics.per_case)
    key = registration_key(model_dir, metrics, name, resolved, tags.get("pipeline_run_id", UNKNOWN))
    client = _client(tracking_uri)
    rerun = "run the same registration again: it completes the version this one left, or registers anew if none was created"
    with _server_faults(tracking_uri, f"registration of {name!r}", rerun):
        _check_signature(client, name, task)  # fail before logging anything
        card = model_card.build_card(model_dir, metrics, name, resolved, passed, reason, tags, test_set_hash=set_hash)  # likewise: before logging
        found = _find_registration(client, name, key)
        if found is not None and (found.tags or {}).get(REGISTRATION_STATE_TAG) == REGISTRATION_COMPLETE:
            with promotion_lock(client, name, tracking_uri, lock_timeout):
                _check_signature(client, name, task, adopt=True)  # what a registration does besides its version
            return _registration_result(name, found, passed, reason, set_hash, resumed=False, already=True)
        if found is None:
            _fail_interrupted_runs(client, tracking_uri, experiment, key)
            run_id, model_uri, model_id = _log_registration_run(model_dir, package, metrics, task, tags, key, tracking_uri, experiment, run_name or f"register-{name}",
                                                                report_dir, input_example, dataset_dir)
        else:  # an earlier attempt created the version and was cut off: complete that one (same number as a clean run)
            run_id, model_uri, model_id = found.run_id, None, None
        with _tracking(tracking_uri):  # MLflow resolves the logged model (models:/m-...) via the fluent URI
            _ensure_registered_model(client, name, task)
            primary = {g: round(float(v), 6) for g in task.gate_groups
                       if (v := gate._number((metrics.mean.get(g) or {}).get(task.primary_metric))) is not None}
            version_tags = {
                **tags,
                **info.tags(),
                "threshold_passed": "true" if passed else "false",
                "threshold_reason": reason,
                "thresholds": json.dumps(resolved, sort_keys=True),
                "test_primary": json.dumps(primary, sort_keys=True),
                "test_n_cases": str(metrics.n_cases),
                "test_set_hash": set_hash,
                REGISTRATION_KEY_TAG: key,
                REGISTRATION_STATE_TAG: REGISTRATION_INCOMPLETE,  # until the alias, the log entry and the card are in place
            }
            with promotion_lock(client, name, tracking_uri, lock_timeout) as lock:
                _check_signature(client, name, task, adopt=True)
                if found is None:
                    found = _find_registration(client, name, key)  # a concurrent identical registration got here first
                resumed = found is not None
                if found is None:
                    mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=version_tags, model_id=model_id)
                    version = str(mv.version)
                else:
                    version, run_id = str(found.version), found.run_id
                _finish_registration(client, name, version, run_id, passed, reason, task, set_hash, lock, resumed)
        model_card.publish_card(client, name, version, run_id, card)
        client.set_model_version_tag(name, version, REGISTRATION_STATE_TAG, REGISTRATION_COMPLETE)  # last: the version is whole
    return _registration_result(name, _get_version(client, name, version), passed, reason, set_hash, resumed=resumed, already=False)


#: Version tags of an idempotent registration: what it registered (:func:`registration_key`) and whether it completed.
REGISTRATION_KEY_TAG, REGISTRATION_STATE_TAG = "registration_key", "registration_state"
REGISTRATION_INCOMPLETE, REGISTRATION_COMPLETE = "incomplete", "complete"
#: Run tag naming the registration a run belongs to (an interrupted attempt's run is marked FAILED by the re-run).
RUN_KEY_TAG = "medseg.registration_key"


def registration_key(model_dir: Path, metrics: schemas.Metrics, name: str, thresholds: Mapping[str, float], pipeline_run_id: str) -> str:
    """The identity of one registration: sha256 over the registered model's name, every file of the package (path
    and content), the test metrics, the resolved thresholds and the pipeline run. Registering the same again finds
    the version it made (and completes it if an earlier attempt was cut off) instead of adding another."""
    from medseg.io import sha256_file

    files = sorted((p.relative_to(model_dir).as_posix(), sha256_file(p)) for p in Path(model_dir).rglob("*") if p.is_file())
    return sha256_json({"name": name, "files": files, "metrics": metrics.to_dict(), "thresholds": dict(sorted(thresholds.items())),
                        "pipeline_run_id": str(pipeline_run_id)})


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of ``name`` (none when the model does not exist yet)."""
    escaped = name.replace("'", "\\'")
    out, token = [], None
    while True:
        page = client.search_model_versions(f"name='{escaped}'", max_results=200, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _find_registration(client: Any, name: str, key: str) -> Any | None:
    """The version an earlier registration with ``key`` created (the oldest, should there be two), else None."""
    found = [mv for mv in _versions(client, name) if (mv.tags or {}).get(REGISTRATION_KEY_TAG) == key]
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _fail_interrupted_runs(client: Any, tracking_uri: str, experiment: str, key: str) -> None:
    """Mark FAILED the runs of an earlier attempt of this registration that never created its version (the server
    went away while they logged): they stay for the record but are not left RUNNING."""
    from medseg.tracking import ensure_experiment

    exp_id = ensure_experiment(tracking_uri, experiment)
    for run in client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status = 'RUNNING'", max_results=50):
        client.set_tag(run.info.run_id, "medseg.interrupted", "true: the registration was cut off before its version was created; a re-run registered it")
        client.set_terminated(run.info.run_id, "FAILED")


def _log_registration_run(model_dir: Path, package: schemas.ModelPackage, metrics: schemas.Metrics, task: Task, tags: Mapping[str, str], key: str,
                          tracking_uri: str, experiment: str, run_name: str, report_dir: Path | None, input_example: Any,
                          dataset_dir: Path | None) -> tuple[str, str, str | None]:
    """The registration's run: params, test metrics, evaluation files, the dataset input and the pyfunc model.
    Returns (run id, logged model URI, logged model id)."""
    import mlflow

    from medseg.registry.pyfunc_model import log_model_package
    from medseg.tracking import ensure_experiment, log_dataset_input

    with _tracking(tracking_uri):
        exp_id = ensure_experiment(tracking_uri, experiment)
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags={**tags, "medseg.stage": "register", RUN_KEY_TAG: key}, nested=nested) as run:
            params = _flat_params(package.training.get("config") or {})
            params["configuration"] = package.configuration
            mlflow.log_params(params)
            values = {"test_n_cases": float(metrics.n_cases)}
            values.update({_metric_key(f"test_{key_}"): value for key_, value in task.reported_metrics(metrics.mean).items()})
            for key_, value in (package.training or {}).items():
                if key_.startswith("best_val") and gate._number(value) is not None:
                    values[_metric_key(key_)] = float(value)
            mlflow.log_metrics(values)
            log_dataset_input(dataset_dir, "testing")
            mlflow.log_dict(metrics.to_dict(), f"{EVAL_DIR}/{schemas.METRICS_JSON}")
            mlflow.log_dict(list(metrics.per_case), f"{EVAL_DIR}/{schemas.PER_CASE_JSON}")
            if report_dir is not None:
                for fname in REPORT_FILES:
                    if (Path(report_dir) / fname).is_file():
                        mlflow.log_artifact(str(Path(report_dir) / fname), EVAL_DIR)
            log_info = log_model_package(model_dir, input_example=input_example)
            return run.info.run_id, log_info.model_uri, getattr(log_info, "model_id", None)


def _logged(tags: Mapping[str, str], action: str, version: str) -> bool:
    """Whether the promotion log already holds an ``action`` entry for ``version``."""
    return any(e.get("action") == action and str(e.get("version")) == version for e in promotion_log(tags))


def _finish_registration(client: Any, name: str, version: str, run_id: str, passed: bool, reason: str, task: Task, set_hash: str, lock: Held,
                         resumed: bool) -> None:
    """Under the lock: the ``challenger`` alias and the ``register`` log entry of ``version``, each only if missing
    (a resumed registration repeats none of what its first attempt did)."""
    champion, previous = _alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS_CHAMPION)
    challenger_before = _alias_version(client, name, CHALLENGER)
    lock.check()
    # a resumed version takes challenger only if no newer version holds it meanwhile
    newest = challenger_before is None or int(challenger_before) <= int(version)
    challenger_after = version if passed and newest else challenger_before
    if passed and newest and challenger_before != version:
        client.set_registered_model_alias(name, CHALLENGER, version)
    rm_tags = client.get_registered_model(name).tags or {}
    if _logged(rm_tags, "register", version):
        return
    seq = _next_log_seq(client, name)
    _log(client, name, seq, {
        "seq": seq, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": "register", "version": version,
        "decision": "challenger" if passed else "below thresholds", "reason": reason[:_REASON_MAX], "run_id": run_id,
        "champion_before": champion, "champion_after": champion, "previous_champion_after": previous,
        "challenger_before": challenger_before, "challenger_after": challenger_after,
        "task_kind": task.kind, "test_set_hash": set_hash, "lock": lock.to_dict(), **({"resumed": True} if resumed else {}),
    })


def _registration_result(name: str, mv: Any, passed: bool, reason: str, set_hash: str, *, resumed: bool, already: bool) -> dict[str, Any]:
    version, run_id = str(mv.version), mv.run_id
    return {"name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}", "challenger": passed, "reason": reason,
            "test_set_hash": set_hash, "model_card": f"runs:/{run_id}/{schemas.MODEL_CARD_MD}", "resumed": resumed, "already_registered": already}


def _registered_signature(client: Any, name: str) -> tuple[bool, dict[str, Any] | None]:
    """(the model exists, its task signature tag parsed or None)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return False, None
        raise
    raw = (rm.tags or {}).get(TASK_SIGNATURE_TAG)
    try:
        return True, (json.loads(raw) if raw else None)
    except ValueError:
        return True, None


def _check_signature(client: Any, name: str, task: Task, adopt: bool = False) -> None:
    """Refuse a package of another task under ``name``; ``adopt``: tag a model registered before signatures were."""
    exists, signature = _registered_signature(client, name)
    if not exists:
        return
    if signature is None:
        if adopt:
            client.set_registered_model_tag(name, TASK_SIGNATURE_TAG, _signature_json(task.signature))
        return
    if signature != json.loads(_signature_json(task.signature)):
        raise MedsegError(f"registered model {name!r} holds models of task {_signature_json(signature)}; this package's task is "
                          f"{_signature_json(task.signature)}: register it under another name")


def _ensure_registered_model(client: Any, name: str, task: Task) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={TASK_SIGNATURE_TAG: _signature_json(task.signature)})
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_params(value, f"{name}."))
        else:
            out[_metric_key(name)] = str(value)[:6000]
    return out


# --------------------------------------------------------------------------- per-case metrics
def read_version_per_case(client: Any, mv: Any) -> list[dict[str, Any]] | None:
    """The per-case metrics stored with a version's run (``evaluation/per_case.json``, else the
    ``per_case`` of ``evaluation/metrics.json``; also accepted at the run's root). ``None`` if absent."""
    import mlflow.artifacts

    run_id = getattr(mv, "run_id", None)
    if not run_id:
        return None
    candidates = [f"{EVAL_DIR}/{PER_CASE_JSON}", f"{EVAL_DIR}/{schemas.METRICS_JSON}", PER_CASE_JSON, schemas.METRICS_JSON]
    present: set[str] = set()
    for folder in (EVAL_DIR, None):
        try:
            present |= {a.path for a in client.list_artifacts(run_id, folder)}
        except Exception:  # noqa: BLE001 - a missing folder is just absent
            pass
    for path in candidates:
        if path not in present:
            continue
        with tempfile.TemporaryDirectory(prefix="medseg-percase-") as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            data = json.loads(Path(local).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("per_case")
        if isinstance(data, list):
            return [dict(e) for e in data if isinstance(e, Mapping)]
    return None



# --------------------------------------------------------------------------- promote / rollback
#: Registered-model tags: the audit log (one tag per decision, zero-padded sequence) and the last entry.
LOG_TAG_PREFIX, LAST_TAG = "promotion_log/", "promotion_last"
#: Folder of the promotion records in the version's run.
RECORD_DIR = "promotion"
_REASON_MAX = 4000


def promote(
    name: str,
    version: str | int,
    tracking_uri: str,
    metrics_per_case: list[dict] | None = None,
    margin: float = 0.0,
    gate_metric: str = AUTO,
    *,
    alpha: float = 0.05,
    n_bootstrap: int = 2000,
    seed: int = 0,
    lock_timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Gate ``version`` to ``champion`` with the paired bootstrap gate of :mod:`medseg.registry.gate`.

    The version's task (its tags; :func:`version_task`) decides the groups compared, the primary group and
    the metric: ``gate_metric`` ``auto`` is the task's primary metric (Dice, or e.g. IoU for a task that names
    it; ``log_loss`` for a classifier, whose ``auc_macro`` selects the macro AUC gate); another per-case metric
    may be named (``iou``, ``hd95``, ...). ``margin`` is in the metric's units.

    Refused when the version did not pass its thresholds at registration. With no champion yet it is
    promoted. Otherwise the challenger's per-case metrics (``metrics_per_case`` if given, else those stored
    with its run) and the champion's are paired by case key (by case id for records without keys) and
    compared: promoted iff every group is non-inferior (lower bound of the ``1 - alpha`` bootstrap CI of the
    oriented mean paired difference ``> -margin``) and the challenger is strictly better on the primary group.
    Refused when the two test sets differ in content, or the champion is a model of another task.

    Everything from reading the champion to moving the aliases runs under :func:`promotion_lock`
    (a file lock beside a SQLite DB, a tag lease on a tracking server), so concurrent registrations and
    promotions are serialised and the second is decided against the first one's outcome.

    On promotion the old champion becomes ``previous-champion`` and the ``challenger`` alias is removed
    if it pointed at this version. Every decision (a refusal is an outcome, not an error) is recorded
    as version tags ``promotion_*``, as a JSON record ``promotion/<seq>-v<version>-<decision>.json`` in
    the version's run, and as registered-model tags ``promotion_log/<seq>`` and ``promotion_last``.

    A promotion cut off after it began moving aliases (the server went away) is undone by the next promote or
    rollback (:func:`_undo_interrupted_promotion`), so running the same promotion again decides it anew from the state
    the last completed decision left. A version whose registration did not complete is refused with an error.

    Returns ``{"promoted", "reason", "version", "champion_version", "previous_champion_version",
    "task_kind", "metric", "higher_is_better", "primary_group", "challenger_value", "champion_value",
    "n_common_cases", "pairing", "compared_with", "margin", "alpha", "n_bootstrap", "seed", "gate", "log_seq",
    "record", "lock"}`` (``*_value``: the primary group's means of the metric over the paired cases;
    ``gate``: :meth:`GateDecision.to_dict`).

    Raises:
        MedsegError: no such version, or a ``gate_metric`` the task cannot be gated on.
    """
    client = _client(tracking_uri)
    version = str(version)
    with _server_faults(tracking_uri, f"promotion of {name!r} v{version}", "nothing was changed; run the promotion again"):
        mv = _get_version(client, name, version)  # outside the lock: the version's own data do not change
        info = version_task(client, name, mv, tracking_uri)
    metric, higher = info.gate_metric(gate_metric)
    auc = metric == gate.AUC_METRIC
    params = {"groups": None if auc else list(info.gate_groups), "metric": metric, "higher_is_better": higher,
              "primary_group": gate.ALL if auc else info.primary_group, "margin": float(margin), "alpha": float(alpha),
              "n_bootstrap": int(n_bootstrap), "seed": int(seed)}
    fixed = _gate_params(params)
    rerun = f"run the same promotion again: it first undoes what this one changed, then decides v{version} again"
    with _server_faults(tracking_uri, f"promotion of {name!r} v{version}", rerun), promotion_lock(client, name, tracking_uri, lock_timeout) as lock:
        _undo_interrupted_promotion(client, name, lock)
        champion = _alias_version(client, name, CHAMPION)  # re-read inside the lock
        previous = _alias_version(client, name, PREVIOUS_CHAMPION)
        result: dict[str, Any] = {
            "promoted": False, "reason": "", "version": version, "champion_version": champion,
            "previous_champion_version": previous, "task_kind": info.kind, "metric": metric, "higher_is_better": higher,
            "primary_group": params["primary_group"], "challenger_value": None, "champion_value": None, "n_common_cases": 0,
            "pairing": None, "compared_with": None, "margin": float(margin), "alpha": float(alpha), "n_bootstrap": int(n_bootstrap),
            "seed": int(seed), "gate": None, "log_seq": None, "record": None, "lock": lock.to_dict(),
        }
        if champion == version:
            result["reason"] = f"version {version} is already the champion"
            return result  # nothing decided: the tags of the original promotion stay

        tags = mv.tags or {}
        if tags.get(REGISTRATION_STATE_TAG) == REGISTRATION_INCOMPLETE:
            raise MedsegError(f"registered model {name!r} v{version}: its registration did not complete (registration_state "
                              f"{REGISTRATION_INCOMPLETE}): run the registration again before promoting it")
        if tags.get("threshold_passed") != "true":
            why = tags.get("threshold_reason") or "no threshold_passed tag (not registered by medseg?)"
            return _record(client, name, mv, lock, result, gate.GateDecision(False, f"did not pass the registration thresholds ({why})", **fixed))
        if champion is None:
            return _record(client, name, mv, lock, result, gate.decide([], None, **params))

        result["compared_with"] = champion
        champion_mv = _get_version(client, name, champion)
        theirs = GateTask.from_tags(champion_mv.tags or {})
        if theirs is not None and info.signature is not None and theirs.signature is not None and theirs.signature != info.signature:
            return _record(client, name, mv, lock, result, gate.GateDecision(
                False, f"champion v{champion} is a model of another task ({_signature_json(theirs.signature)}; this version: "
                       f"{_signature_json(info.signature)})", **fixed))
        challenger_cases = metrics_per_case if metrics_per_case is not None else read_version_per_case(client, mv)
        if not challenger_cases:
            return _record(client, name, mv, lock, result, gate.GateDecision(False, f"version {version} has no per-case metrics to compare", **fixed))
        champion_cases = read_version_per_case(client, champion_mv)
        if not champion_cases:
            return _record(client, name, mv, lock, result, gate.GateDecision(False, f"champion version {champion} has no per-case metrics to compare", **fixed))
        decision = gate.decide(challenger_cases, champion_cases, champion_label=f"champion v{champion}", **params)
        return _record(client, name, mv, lock, result, decision)


def _gate_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of :class:`~medseg.registry.gate.GateDecision` among those of :func:`~medseg.registry.gate.decide`."""
    out = {k: v for k, v in params.items() if k != "groups"}
    out["method"] = gate.METHOD_AUC if params["metric"] == gate.AUC_METRIC else gate.METHOD_MEAN
    return out


def _record(client: Any, name: str, mv: Any, lock: Held, result: dict[str, Any], decision: gate.GateDecision) -> dict[str, Any]:
    """Apply ``decision`` (aliases) and record it everywhere; called inside the promotion lock."""
    version, old = result["version"], result["champion_version"]
    primary = decision.groups.get(decision.primary_group)
    promoted = bool(decision.promote)
    seq = _next_log_seq(client, name)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result.update(promoted=promoted, reason=decision.reason, gate=decision.to_dict(), n_common_cases=decision.n_common, pairing=decision.pairing or None,
                  challenger_value=primary.challenger_mean if primary else None, champion_value=primary.champion_mean if primary else None,
                  log_seq=seq)
    champion_after, previous_after = (version, old if old is not None else result["previous_champion_version"]) if promoted else (old, result["previous_champion_version"])
    record = {
        "seq": seq, "time": now, "action": "promote", "name": name, "version": version, "decision": "promoted" if promoted else "refused",
        "reason": decision.reason, "compared_with": result["compared_with"], "champion_before": old,
        "previous_champion_before": result["previous_champion_version"], "champion_after": champion_after,
        "previous_champion_after": previous_after, "lock": lock.to_dict(), "gate": decision.to_dict(),
    }
    # 1. the full record in the version's run (before any alias moves: if the artifact store fails, nothing changed)
    if getattr(mv, "run_id", None):
        path = f"{RECORD_DIR}/{seq:06d}-v{version}-{record['decision']}.json"
        client.log_dict(mv.run_id, record, path)
        result["record"] = f"runs:/{mv.run_id}/{path}"
    # ... and in the version's model card (re-rendered; before the aliases move, so a server loading the new champion reads
    # a card with this decision; a card failure is logged and never stops the decision)
    model_card.record_gate_decision(client, name, mv, record)
    # 2. the aliases (after checking a lease is still ours), behind a marker saying how to undo them: should the server go
    # away before the decision is fully recorded, the next promotion or rollback puts the aliases back first
    lock.check()
    if promoted:
        challenger_before = _alias_version(client, name, CHALLENGER)
        client.set_registered_model_tag(name, PENDING_TAG, json.dumps({
            "seq": seq, "version": version, "champion_before": old, "previous_champion_before": result["previous_champion_version"],
            "challenger_before": challenger_before, "time": now}))
    if promoted:
        if old is not None:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old)
            result["previous_champion_version"] = old
        client.set_registered_model_alias(name, CHAMPION, version)
        if _alias_version(client, name, CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        result["champion_version"] = version
    # 3. the version's tags and the registered model's log
    per_group = {g.group: {"n": g.n_cases, "diff": round(g.mean_diff, 6), "lower": round(g.ci_lower, 6), "upper": round(g.ci_upper, 6),
                           "challenger": round(g.challenger_mean, 6), "champion": round(g.champion_mean, 6), "non_inferior": g.non_inferior}
                 for g in decision.groups.values()}
    direction = "higher is better" if decision.higher_is_better else "lower is better"
    _set_tags(client, name, version, {
        "promotion_decision": record["decision"],
        "promotion_reason": decision.reason[:_REASON_MAX],
        "promotion_time": now,
        "promotion_compared_with": result["compared_with"] or "none",
        "promotion_metric": decision.metric,
        "promotion_direction": direction,
        "promotion_method": decision.method,
        "promotion_pairing": decision.pairing or "none",
        "promotion_primary_group": decision.primary_group,
        "promotion_margin": decision.margin,
        "promotion_alpha": decision.alpha,
        "promotion_n_bootstrap": decision.n_bootstrap,
        "promotion_seed": decision.seed,
        "promotion_n_common_cases": decision.n_common,
        "promotion_challenger_value": _fmt(result["challenger_value"]),
        "promotion_champion_value": _fmt(result["champion_value"]),
        "promotion_groups": json.dumps(per_group, sort_keys=True),
        "promotion_log_seq": seq,
        "promotion_record": result["record"] or "none",
    })
    entry = {k: record[k] for k in ("seq", "time", "action", "version", "decision", "compared_with", "champion_before", "champion_after", "previous_champion_after")}
    entry.update(reason=decision.reason[:_REASON_MAX], metric=decision.metric, direction=direction, method=decision.method, pairing=decision.pairing,
                 primary_group=decision.primary_group, margin=decision.margin, alpha=decision.alpha, n_bootstrap=decision.n_bootstrap, seed=decision.seed,
                 n_common=decision.n_common, groups=per_group, record=result["record"])
    _log(client, name, seq, entry)
    if promoted:
        client.delete_registered_model_tag(name, PENDING_TAG)  # last: the decision is whole
    return result


#: Registered-model tag present while a promotion moves the aliases: how to put them back (see :func:`_undo_interrupted_promotion`).
PENDING_TAG = "medseg.promotion_pending"


def _set_or_delete_alias(client: Any, name: str, alias: str, version: str | None) -> None:
    if version is not None:
        client.set_registered_model_alias(name, alias, str(version))
    elif _alias_version(client, name, alias) is not None:
        client.delete_registered_model_alias(name, alias)


def _undo_interrupted_promotion(client: Any, name: str, lock: Held) -> dict[str, Any] | None:
    """Under the lock: if a promotion was cut off after it began moving aliases (its :data:`PENDING_TAG` is still
    there), put ``champion``, ``previous-champion`` and ``challenger`` back as they were before it, so the next decision
    starts from a state some completed decision left. A promotion whose log entry was written had completed: only
    its marker is removed. Returns the marker that was handled, else None."""
    tags = client.get_registered_model(name).tags or {}
    raw = tags.get(PENDING_TAG)
    if not raw:
        return None
    try:
        pending = json.loads(raw)
    except ValueError:
        pending = None
    lock.check()
    if isinstance(pending, dict) and f"{LOG_TAG_PREFIX}{int(pending.get('seq') or 0):06d}" not in tags:
        _set_or_delete_alias(client, name, CHAMPION, pending.get("champion_before"))
        _set_or_delete_alias(client, name, PREVIOUS_CHAMPION, pending.get("previous_champion_before"))
        if pending.get("challenger_before") is not None:
            client.set_registered_model_alias(name, CHALLENGER, str(pending["challenger_before"]))
        if pending.get("version"):
            client.set_model_version_tag(name, str(pending["version"]), "promotion_interrupted_at", str(pending.get("time") or ""))
    client.delete_registered_model_tag(name, PENDING_TAG)
    return pending if isinstance(pending, dict) else {}


def _next_log_seq(client: Any, name: str) -> int:
    """1 + the highest ``promotion_log/<seq>`` tag of the registered model (call inside the lock)."""
    tags = client.get_registered_model(name).tags or {}
    seqs = [int(k[len(LOG_TAG_PREFIX):]) for k in tags if k.startswith(LOG_TAG_PREFIX) and k[len(LOG_TAG_PREFIX):].isdigit()]
    return max(seqs, default=0) + 1


def _log(client: Any, name: str, seq: int, entry: Mapping[str, Any]) -> None:
    text = json.dumps(entry, sort_keys=True, default=str)
    client.set_registered_model_tag(name, f"{LOG_TAG_PREFIX}{seq:06d}", text)
    client.set_registered_model_tag(name, LAST_TAG, text)


def promotion_log(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """The decisions recorded in a registered model's tags, oldest first."""
    out = []
    for key, value in tags.items():
        if key.startswith(LOG_TAG_PREFIX):
            try:
                out.append(json.loads(value))
            except ValueError:
                out.append({"seq": key[len(LOG_TAG_PREFIX):], "unparsed": value})
    return sorted(out, key=lambda e: int(e.get("seq") or 0))


def rollback(name: str, tracking_uri: str, *, lock_timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Swap ``champion`` and ``previous-champion`` (one step; a second rollback undoes the first).

    Runs under the same lock as :func:`promote` and is logged in the same ``promotion_log/<seq>`` tags.
    """
    client = _client(tracking_uri)
    with _server_faults(tracking_uri, f"rollback of {name!r}", "run the rollback again"), promotion_lock(client, name, tracking_uri, lock_timeout) as lock:
        _undo_interrupted_promotion(client, name, lock)
        champion = _alias_version(client, name, CHAMPION)
        previous = _alias_version(client, name, PREVIOUS_CHAMPION)
        if previous is None:
            raise MedsegError(f"registered model {name!r} has no {PREVIOUS_CHAMPION} to roll back to")
        lock.check()
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        client.set_registered_model_alias(name, CHAMPION, previous)
        if champion is not None and champion != previous:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion)
            client.set_model_version_tag(name, champion, "rolled_back_at", now)
        else:
            client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        client.set_model_version_tag(name, previous, "restored_by_rollback_at", now)
        seq = _next_log_seq(client, name)
        _log(client, name, seq, {"seq": seq, "time": now, "action": "rollback", "version": previous, "decision": "rolled back",
                                 "champion_before": champion, "champion_after": previous, "previous_champion_after": champion if champion != previous else None,
                                 "reason": f"rollback from v{champion} to v{previous}"})
    return {"name": name, "champion_version": previous, "previous_champion_version": champion}


# --------------------------------------------------------------------------- list / show
def list_models(tracking_uri: str) -> list[dict[str, Any]]:
    """Every registered model: ``{"name", "aliases", "latest_version", "tags", "description"}``."""
    client = _client(tracking_uri)
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        for rm in page:
            latest = [int(v.version) for v in (rm.latest_versions or [])]
            out.append({"name": rm.name, "aliases": _aliases(rm), "latest_version": str(max(latest)) if latest else None,
                        "tags": dict(rm.tags or {}), "description": rm.description or ""})
        token = page.token
        if not token:
            break
    return sorted(out, key=lambda m: m["name"])


def show_model(name: str, tracking_uri: str) -> dict[str, Any]:
    """One registered model: aliases, tags and every version (oldest first) with its aliases and tags."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise MedsegError(f"no registered model {name!r}") from None
        raise
    escaped = name.replace("'", "\\'")
    aliases = _aliases(rm)
    by_version: dict[str, list[str]] = {}
    for alias, v in sorted(aliases.items()):  # search results do not carry aliases in every store
        by_version.setdefault(v, []).append(alias)
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{escaped}'", max_results=200, page_token=token)
        for mv in page:
            versions.append({"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "status": mv.status,
                             "created": mv.creation_timestamp, "aliases": sorted({str(a) for a in (mv.aliases or [])} | set(by_version.get(str(mv.version), []))),
                             "tags": dict(mv.tags or {})})
        token = page.token
        if not token:
            break
    versions.sort(key=lambda v: int(v["version"]))
    rm_tags = dict(rm.tags or {})
    log = promotion_log(rm_tags)
    try:
        last = json.loads(rm_tags[LAST_TAG]) if LAST_TAG in rm_tags else None
    except ValueError:
        last = None
    return {"name": rm.name, "aliases": aliases, "tags": rm_tags, "description": rm.description or "", "versions": versions,
            "last_decision": last, "promotion_log": log}



# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of ``medseg registry``: list, show, promote, rollback, rebuild (:mod:`medseg.registry.rebuild`)."""
    from medseg.tracking import default_tracking_uri

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=None, metavar="URI",
                        help=f"MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or {default_tracking_uri()})")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="{list,show,promote,rollback,rebuild}")
    sub.add_parser("list", parents=[common], help="registered models with their aliases")
    p = sub.add_parser("show", parents=[common], help="a registered model's versions, aliases and tags")
    p.add_argument("name")
    p = sub.add_parser("promote", parents=[common], help="gate a version to champion against the current champion")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--params", type=Path, default=Path(schemas.PARAMS_YAML),
                   help="parameter file whose registry section gives the gate's margin and metric, as the pipeline uses them (default: params.yaml, if present)")
    p.add_argument("--margin", type=float, default=None,
                   help="non-inferiority margin in the metric's units: every group's CI lower bound of the difference (positive = challenger better) "
                        "must be above -margin (default: registry.promotion_margin of --params, else 0)")
    p.add_argument("--gate-metric", default=None, metavar="METRIC",
                   help="the per-case metric compared: auto (the task's primary metric: dice, or e.g. iou; log_loss for a classifier), another "
                        "segmentation metric (iou, hd95, ...), or auc_macro for a classifier (default: registry.gate_metric of --params, else auto)")
    p.add_argument("--metrics", type=Path, default=None, metavar="FILE",
                   help="metrics.json whose per_case to use for the version (default: the one stored with its run)")
    p.add_argument("--alpha", type=float, default=0.05, help="the gate uses the lower bound of the (1-alpha) bootstrap CI (default 0.05)")
    p.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed: same inputs and seed, same decision (default 0)")
    p = sub.add_parser("rollback", parents=[common], help="swap champion and previous-champion")
    p.add_argument("name")
    from medseg.registry.rebuild import add_rebuild_parser

    add_rebuild_parser(sub, common)


def gate_settings(params_path: Path | None, margin: float | None = None, gate_metric: str | None = None) -> tuple[float, str]:
    """The gate's margin and metric for ``medseg registry promote``: the options when given, else the
    ``registry`` section of the parameter file (``promotion_margin``, ``gate_metric``: what the pipeline's
    promote step uses), else 0 and ``auto``."""
    registry_params: dict[str, Any] = {}
    if params_path is not None and Path(params_path).is_file():
        from medseg.pipeline.runner import load_params

        registry_params = load_params(params_path).get("registry") or {}
    if margin is None:
        margin = float(registry_params.get("promotion_margin", 0.0))
    if gate_metric is None:
        gate_metric = str(registry_params.get("gate_metric") or AUTO)
    return float(margin), gate_metric


def run(args: argparse.Namespace) -> int:
    """``medseg registry ...``. Returns 0 (a refused promotion is an outcome, also 0)."""
    from medseg.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    cmd = args.registry_command
    if cmd == "list":
        result: Any = list_models(uri)
    elif cmd == "show":
        result = show_model(args.name, uri)
    elif cmd == "promote":
        per_case = schemas.Metrics.load(args.metrics).per_case if args.metrics else None
        margin, gate_metric = gate_settings(args.params, args.margin, args.gate_metric)
        result = promote(args.name, args.version, uri, per_case, margin=margin, gate_metric=gate_metric,
                         alpha=args.alpha, n_bootstrap=args.n_bootstrap, seed=args.seed)
    elif cmd == "rollback":
        result = rollback(args.name, uri)
    elif cmd == "rebuild":  # prints its own comparison; exit 1 when not reproduced
        from medseg.registry.rebuild import run_rebuild

        return run_rebuild(args, uri)
    else:  # pragma: no cover - argparse restricts the choices
        raise MedsegError(f"unknown registry command {cmd!r}")
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(cmd, result, sys.stdout)
    return 0


def _version_metrics_text(tags: Mapping[str, str]) -> str:
    """``task segmentation  iou: {"abnormality": 0.61}`` from a version's tags (older versions: their mean Dice)."""
    kind = tags.get("task_kind", "?")
    if "test_primary" in tags:
        return f"task {kind}  {tags.get('primary_metric', '?')}: {tags['test_primary']}"
    return f"task {kind}  dice: {tags.get('test_mean_dice', '-')}"


def _print_human(cmd: str, result: Any, out: Any) -> None:
    if cmd == "list":
        if not result:
            print("no registered models", file=out)
        for m in result:
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m["aliases"].items())) or "no aliases"
            print(f"{m['name']}  latest v{m['latest_version']}  ({aliases})", file=out)
    elif cmd == "show":
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(result["aliases"].items())) or "none"
        print(f"{result['name']}  aliases: {aliases}", file=out)
        for v in result["versions"]:
            t = v["tags"]
            mark = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
            print(f"  v{v['version']}{mark}  run {v['run_id']}  {_version_metrics_text(t)}  thresholds: {t.get('threshold_passed', '?')}"
                  f"  promotion: {t.get('promotion_decision', '-')}", file=out)
            for key in (*LINEAGE_KEYS, "test_set_hash"):
                if key in t:
                    print(f"      {key}: {t[key]}", file=out)
            if "promotion_reason" in t:
                print(f"      promotion_reason: {t['promotion_reason']}", file=out)
        last = result.get("last_decision")
        if last:
            print(f"last decision (#{last.get('seq')} of {len(result.get('promotion_log') or [])}, {last.get('time')}): "
                  f"{last.get('action')} v{last.get('version')}: {last.get('decision')}"
                  + (f" against champion v{last['compared_with']}" if last.get("compared_with") else "")
                  + f"; champion now v{last.get('champion_after')}", file=out)
            print(f"  reason: {last.get('reason')}", file=out)
            metric = last.get("metric") or "dice"
            for group, r in (last.get("groups") or last.get("regions") or {}).items():
                print(f"  {group} {metric}: diff {r['diff']:+.4f}  CI [{r['lower']:+.4f}, {r['upper']:+.4f}]  n={r['n']}"
                      f"  {'non-inferior' if r['non_inferior'] else 'NOT non-inferior'}", file=out)
        else:
            print("last decision: none", file=out)
    elif cmd == "promote":
        word = "promoted" if result["promoted"] else "refused"
        print(f"{word}: version {result['version']}: {result['reason']}", file=out)
        g = result.get("gate") or {}
        direction = "" if g.get("higher_is_better", True) else " (lower is better)"
        for group, r in (g.get("groups") or {}).items():
            print(f"  {group} {g.get('metric')}{direction}: {r['challenger_mean']:.4f} vs {r['champion_mean']:.4f}  diff {r['mean_diff']:+.4f}"
                  f"  {100 * (1 - g['alpha']):g}% CI [{r['ci_lower']:+.4f}, {r['ci_upper']:+.4f}]  n={r['n_cases']}", file=out)
        print(f"champion: v{result['champion_version']}", file=out)
    elif cmd == "rollback":
        print(f"champion: v{result['champion_version']} (previous-champion: v{result['previous_champion_version']})", file=out)
