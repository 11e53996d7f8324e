"""The model registry: register a model package with its lineage, gate it to ``champion``, roll back.

Aliases of a registered model (one per task)::

    challenger          the latest version that met the absolute thresholds at registration
    champion            the promoted version (what ``models:/NAME@champion`` and the server load)
    previous-champion   the champion before the last promotion: the target of ``rollback``

Every decision is written on the model version as tags (``threshold_passed``/``threshold_reason`` at
registration, ``promotion_decision``/``promotion_reason`` and the compared numbers at promotion), so a
refusal is a recorded outcome, not an exception. Promotions and rollbacks are also logged on the
registered model (tags ``promotion_log/<seq>``, ``promotion_last``) and each promotion decision as a
JSON record ``promotion/<seq>-v<version>-<decision>.json`` in the version's run.

Each version's run holds its test metrics as artifacts ``evaluation/metrics.json`` and
``evaluation/per_case.json``; promotion compares the challenger's and the champion's per-case Dice
over the test cases they share with the paired bootstrap gate of :mod:`medseg.registry.gate`, under
the lock of :mod:`medseg.registry.lock` (concurrent promotions are serialised).

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
from pathlib import Path
from typing import Any

from medseg import schemas
from medseg.errors import MedsegError
from medseg.registry import gate
from medseg.registry.lock import DEFAULT_TIMEOUT_S, Held, promotion_lock

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"
LINEAGE_KEYS = ("manifest_hash", "git_commit", "pipeline_run_id", "plan_hash", "training_run_id", "medseg_version")
EVAL_DIR = "evaluation"
PER_CASE_JSON = "per_case.json"
#: Report files logged beside metrics.json when ``report_dir`` holds them.
REPORT_FILES = ("report.md", "report.html", schemas.PER_CASE_CSV, "cases.csv", "dice_boxplot.png")
UNKNOWN = "unknown"


# --------------------------------------------------------------------------- helpers
def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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


def _case_dice(entry: Mapping[str, Any], region: str) -> float | None:
    """Dice of ``region`` in one per-case entry (see :func:`medseg.registry.gate.case_dice`)."""
    return gate.case_dice(entry, region)


def check_thresholds(metrics: schemas.Metrics, thresholds: Mapping[str, float]) -> tuple[bool, str]:
    """Every ``{region: minimum mean Dice}`` must hold. Returns (passed, reason)."""
    if not thresholds:
        return True, "no thresholds set"
    failed, held = [], []
    for region, minimum in thresholds.items():
        value = (metrics.mean.get(region) or {}).get("dice")
        if value is None:
            failed.append(f"{region}: no mean Dice in the metrics")
        elif float(value) < float(minimum):
            failed.append(f"{region} Dice {float(value):.4f} < {float(minimum):.4f}")
        else:
            held.append(f"{region} Dice {float(value):.4f} >= {float(minimum):.4f}")
    if failed:
        return False, "below threshold: " + "; ".join(failed)
    return True, "thresholds met: " + "; ".join(held)


# --------------------------------------------------------------------------- register
def register_model(
    model_dir: Path,
    metrics: schemas.Metrics,
    name: str,
    tracking_uri: str,
    lineage: Mapping[str, str],
    thresholds: Mapping[str, float],
    run_name: str | None = None,
    experiment: str = "medseg",
    report_dir: Path | None = None,
    input_example: Any = None,
) -> dict[str, Any]:
    """Log ``model_dir`` as a pyfunc model in a new run, register it as a new version of ``name``.

    ``input_example``: a one-row DataFrame of image paths (see
    :func:`~medseg.registry.pyfunc_model.input_example_from_dataset`), stored with the model; MLflow
    predicts it once while logging.

    The run gets the training config as params, ``test_<NAME>_<dice|hd95>`` metrics from
    ``metrics.mean``, ``evaluation/metrics.json`` + ``evaluation/per_case.json`` (and the report files
    of ``report_dir`` if given), and the lineage as tags. The version gets the lineage tags
    (:data:`LINEAGE_KEYS`, ``"unknown"`` when not known), ``threshold_passed`` / ``threshold_reason``
    and, if every threshold holds, the alias ``challenger``.

    Returns ``{"name", "version", "run_id", "model_uri", "challenger", "reason"}``.
    """
    import mlflow

    from medseg.registry.pyfunc_model import log_model_package
    from medseg.tracking import ensure_experiment

    model_dir = Path(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    tags = _lineage_tags(model_dir, package, lineage)
    passed, reason = check_thresholds(metrics, thresholds)
    client = _client(tracking_uri)

    with _tracking(tracking_uri):
        exp_id = ensure_experiment(tracking_uri, experiment)
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name or f"register-{name}", tags={**tags, "medseg.stage": "register"}, nested=nested) as run:
            run_id = run.info.run_id
            params = _flat_params(package.training.get("config") or {})
            params["configuration"] = package.configuration
            mlflow.log_params(params)
            values = {"test_n_cases": float(metrics.n_cases)}
            for key, row in metrics.mean.items():
                for metric in ("dice", "hd95"):
                    if isinstance(row, Mapping) and row.get(metric) is not None:
                        values[_metric_key(f"test_{key}_{metric}")] = float(row[metric])
            for key in ("best_val_dice",):
                if isinstance(package.training.get(key), (int, float)):
                    values[key] = float(package.training[key])
            mlflow.log_metrics(values)
            mlflow.log_dict(metrics.to_dict(), f"{EVAL_DIR}/{schemas.METRICS_JSON}")
            mlflow.log_dict(list(metrics.per_case), f"{EVAL_DIR}/{PER_CASE_JSON}")
            if report_dir is not None:
                for fname in REPORT_FILES:
                    if (Path(report_dir) / fname).is_file():
                        mlflow.log_artifact(str(Path(report_dir) / fname), EVAL_DIR)
            info = log_model_package(model_dir, input_example=input_example)

        # still inside _tracking: MLflow resolves the logged model (models:/m-...) via the fluent URI
        _ensure_registered_model(client, name)
        mean_dice = {k: round(float(v["dice"]), 6) for k, v in metrics.mean.items() if isinstance(v, Mapping) and v.get("dice") is not None}
        version_tags = {
            **tags,
            "threshold_passed": "true" if passed else "false",
            "threshold_reason": reason,
            "thresholds": json.dumps(dict(thresholds), sort_keys=True),
            "test_mean_dice": json.dumps(mean_dice, sort_keys=True),
            "test_n_cases": str(metrics.n_cases),
        }
        mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=version_tags, model_id=getattr(info, "model_id", None))
    version = str(mv.version)
    if passed:
        client.set_registered_model_alias(name, CHALLENGER, version)
    return {"name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}", "challenger": passed, "reason": reason}


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _lineage_tags(model_dir: Path, package: schemas.ModelPackage, lineage: Mapping[str, str]) -> dict[str, str]:
    tags = {str(k): str(v) for k, v in (package.lineage or {}).items()}
    tags.update({str(k): str(v) for k, v in lineage.items() if v is not None and str(v) != ""})
    if not tags.get("medseg_version"):
        tags["medseg_version"] = package.medseg_version
    if not tags.get("plan_hash") and (model_dir / schemas.PLANS_JSON).is_file():
        tags["plan_hash"] = schemas.Plans.load(model_dir).content_hash()
    if not tags.get("training_run_id") and package.training.get("mlflow_run_id"):
        tags["training_run_id"] = str(package.training["mlflow_run_id"])
    for key in LINEAGE_KEYS:
        tags.setdefault(key, UNKNOWN)
    return tags


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


def compare_per_case(challenger: Sequence[Mapping[str, Any]], champion: Sequence[Mapping[str, Any]], region: str) -> tuple[list[str], float | None, float | None]:
    """Common case ids (both have a Dice for ``region``) and both means over them."""
    a = {str(e["case_id"]): d for e in challenger if "case_id" in e and (d := _case_dice(e, region)) is not None}
    b = {str(e["case_id"]): d for e in champion if "case_id" in e and (d := _case_dice(e, region)) is not None}
    common = sorted(a.keys() & b.keys())
    if not common:
        return [], None, None
    return common, sum(a[c] for c in common) / len(common), sum(b[c] for c in common) / len(common)


# --------------------------------------------------------------------------- promote / rollback
#: Regions the gate compares by default (those present in both models' per-case metrics; labels such as
#: NETC/SNFH, also in per_case, are not gated). ``regions=None`` gates every name with a Dice in both.
GATE_REGIONS: tuple[str, ...] | None = None  # every group with the metric in both (the task decides which: see medseg.task)
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
    primary_region: str = "WT",
    *,
    alpha: float = 0.05,
    n_bootstrap: int = 2000,
    seed: int = 0,
    regions: Sequence[str] | None = GATE_REGIONS,
    lock_timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Gate ``version`` to ``champion`` with the paired bootstrap gate of :mod:`medseg.registry.gate`.

    Refused when the version did not pass its thresholds at registration. With no champion yet it is
    promoted. Otherwise the challenger's per-case Dice (from ``metrics_per_case`` if given, else from
    its run) and the champion's (from its run) are compared over their common test cases: promoted iff
    every region of ``regions`` present in both is non-inferior (lower bound of the ``1 - alpha``
    bootstrap CI of the mean paired difference ``> -margin``) and the challenger's mean
    ``primary_region`` Dice is strictly above the champion's. Refused when there are no common cases.

    Everything from reading the champion to moving the aliases runs under :func:`promotion_lock`
    (a file lock beside a SQLite DB, a tag lease on a tracking server), so two concurrent promotions
    are serialised and the second is decided against the first one's outcome.

    On promotion the old champion becomes ``previous-champion`` and the ``challenger`` alias is removed
    if it pointed at this version. Every decision (a refusal is an outcome, not an error) is recorded
    as version tags ``promotion_*``, as a JSON record ``promotion/<seq>-v<version>-<decision>.json`` in
    the version's run, and as registered-model tags ``promotion_log/<seq>`` and ``promotion_last``.

    Returns ``{"promoted", "reason", "version", "champion_version", "previous_champion_version",
    "challenger_dice", "champion_dice", "n_common_cases", "compared_with", "primary_region", "margin",
    "alpha", "n_bootstrap", "seed", "gate", "log_seq", "record", "lock"}`` (``*_dice``: the primary
    region's means over the common cases; ``gate``: :meth:`GateDecision.to_dict`).
    """
    client = _client(tracking_uri)
    version = str(version)
    mv = _get_version(client, name, version)  # outside the lock: the version's own data do not change
    with promotion_lock(client, name, tracking_uri, lock_timeout) as lock:
        champion = _alias_version(client, name, CHAMPION)  # re-read inside the lock
        previous = _alias_version(client, name, PREVIOUS_CHAMPION)
        result: dict[str, Any] = {
            "promoted": False, "reason": "", "version": version, "champion_version": champion,
            "previous_champion_version": previous, "challenger_dice": None, "champion_dice": None,
            "n_common_cases": 0, "compared_with": None, "primary_region": primary_region, "margin": float(margin),
            "alpha": float(alpha), "n_bootstrap": int(n_bootstrap), "seed": int(seed), "gate": None,
            "log_seq": None, "record": None, "lock": lock.to_dict(),
        }
        if champion == version:
            result["reason"] = f"version {version} is already the champion"
            return result  # nothing decided: the tags of the original promotion stay

        params = {"regions": list(regions) if regions is not None else None, "primary_region": primary_region, "margin": float(margin),
                  "alpha": float(alpha), "n_bootstrap": int(n_bootstrap), "seed": int(seed)}
        tags = mv.tags or {}
        if tags.get("threshold_passed") != "true":
            why = tags.get("threshold_reason") or "no threshold_passed tag (not registered by medseg?)"
            return _record(client, name, mv, lock, result, gate.GateDecision(False, f"did not pass the registration thresholds ({why})", **_gate_params(params)))
        if champion is None:
            return _record(client, name, mv, lock, result, gate.decide([], None, **params))

        result["compared_with"] = champion
        challenger_cases = metrics_per_case if metrics_per_case is not None else read_version_per_case(client, mv)
        if not challenger_cases:
            return _record(client, name, mv, lock, result, gate.GateDecision(False, f"version {version} has no per-case metrics to compare", **_gate_params(params)))
        champion_cases = read_version_per_case(client, _get_version(client, name, champion))
        if not champion_cases:
            return _record(client, name, mv, lock, result, gate.GateDecision(False, f"champion version {champion} has no per-case metrics to compare", **_gate_params(params)))
        decision = gate.decide(challenger_cases, champion_cases, champion_label=f"champion v{champion}", **params)
        return _record(client, name, mv, lock, result, decision)


def _gate_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "regions"}


def _record(client: Any, name: str, mv: Any, lock: Held, result: dict[str, Any], decision: gate.GateDecision) -> dict[str, Any]:
    """Apply ``decision`` (aliases) and record it everywhere; called inside the promotion lock."""
    version, old = result["version"], result["champion_version"]
    primary = decision.regions.get(decision.primary_region)
    promoted = bool(decision.promote)
    seq = _next_log_seq(client, name)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result.update(promoted=promoted, reason=decision.reason, gate=decision.to_dict(), n_common_cases=decision.n_common,
                  challenger_dice=primary.challenger_mean if primary else None, champion_dice=primary.champion_mean if primary else None,
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
    # 2. the aliases (after checking a lease is still ours)
    lock.check()
    if promoted:
        if old is not None:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old)
            result["previous_champion_version"] = old
        client.set_registered_model_alias(name, CHAMPION, version)
        if _alias_version(client, name, CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        result["champion_version"] = version
    # 3. the version's tags and the registered model's log
    per_region = {r.region: {"n": r.n_cases, "diff": round(r.mean_diff, 6), "lower": round(r.ci_lower, 6), "upper": round(r.ci_upper, 6),
                             "challenger": round(r.challenger_mean, 6), "champion": round(r.champion_mean, 6), "non_inferior": r.non_inferior}
                  for r in decision.regions.values()}
    _set_tags(client, name, version, {
        "promotion_decision": record["decision"],
        "promotion_reason": decision.reason[:_REASON_MAX],
        "promotion_time": now,
        "promotion_compared_with": result["compared_with"] or "none",
        "promotion_primary_region": decision.primary_region,
        "promotion_margin": decision.margin,
        "promotion_alpha": decision.alpha,
        "promotion_n_bootstrap": decision.n_bootstrap,
        "promotion_seed": decision.seed,
        "promotion_n_common_cases": decision.n_common,
        "promotion_challenger_dice": _fmt(result["challenger_dice"]),
        "promotion_champion_dice": _fmt(result["champion_dice"]),
        "promotion_regions": json.dumps(per_region, sort_keys=True),
        "promotion_log_seq": seq,
        "promotion_record": result["record"] or "none",
    })
    entry = {k: record[k] for k in ("seq", "time", "action", "version", "decision", "compared_with", "champion_before", "champion_after", "previous_champion_after")}
    entry.update(reason=decision.reason[:_REASON_MAX], primary_region=decision.primary_region, margin=decision.margin, alpha=decision.alpha,
                 n_bootstrap=decision.n_bootstrap, seed=decision.seed, n_common=decision.n_common, regions=per_region, record=result["record"])
    _log(client, name, seq, entry)
    return result


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
    with promotion_lock(client, name, tracking_uri, lock_timeout) as lock:
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
    """Sub-commands of ``medseg registry``: list, show, promote, rollback."""
    from medseg.tracking import default_tracking_uri

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=None, metavar="URI",
                        help=f"MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI or {default_tracking_uri()})")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="{list,show,promote,rollback}")
    sub.add_parser("list", parents=[common], help="registered models with their aliases")
    p = sub.add_parser("show", parents=[common], help="a registered model's versions, aliases and tags")
    p.add_argument("name")
    p = sub.add_parser("promote", parents=[common], help="gate a version to champion against the current champion")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="parameter file whose registry section gives the gate's margin and primary region, as the pipeline uses them (default: params.yaml, if present)")
    p.add_argument("--margin", type=float, default=None,
                   help="non-inferiority margin: every region's CI lower bound of the Dice difference must be above -margin (default: registry.promotion_margin of --params, else 0)")
    p.add_argument("--primary-region", default=None,
                   help="region on which the challenger must be strictly better (mean Dice over the common cases; default: registry.primary_region of --params, else WT)")
    p.add_argument("--metrics", type=Path, default=None, metavar="FILE",
                   help="metrics.json whose per_case to use for the version (default: the one stored with its run)")
    p.add_argument("--alpha", type=float, default=0.05, help="the gate uses the lower bound of the (1-alpha) bootstrap CI (default 0.05)")
    p.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed: same inputs and seed, same decision (default 0)")
    p = sub.add_parser("rollback", parents=[common], help="swap champion and previous-champion")
    p.add_argument("name")


def gate_settings(params_path: Path | None, margin: float | None = None, primary_region: str | None = None) -> tuple[float, str]:
    """The gate's margin and primary region for ``medseg registry promote``: the options when given, else the
    ``registry`` section of the parameter file (what the pipeline's promote step uses), else 0 and WT."""
    registry_params: dict[str, Any] = {}
    if params_path is not None and Path(params_path).is_file():
        from medseg.pipeline.runner import load_params

        registry_params = load_params(params_path).get("registry") or {}
    if margin is None:
        margin = float(registry_params.get("promotion_margin", 0.0))
    if primary_region is None:
        primary_region = str(registry_params.get("primary_region", "WT"))
    return float(margin), primary_region


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
        margin, primary_region = gate_settings(args.params, args.margin, args.primary_region)
        result = promote(args.name, args.version, uri, per_case, margin=margin, primary_region=primary_region,
                         alpha=args.alpha, n_bootstrap=args.n_bootstrap, seed=args.seed)
    elif cmd == "rollback":
        result = rollback(args.name, uri)
    else:  # pragma: no cover - argparse restricts the choices
        raise MedsegError(f"unknown registry command {cmd!r}")
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_human(cmd, result, sys.stdout)
    return 0


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
            print(f"  v{v['version']}{mark}  run {v['run_id']}  thresholds: {t.get('threshold_passed', '?')}"
                  f"  promotion: {t.get('promotion_decision', '-')}  dice {t.get('test_mean_dice', '-')}", file=out)
            for key in LINEAGE_KEYS:
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
            for region, r in (last.get("regions") or {}).items():
                print(f"  {region}: diff {r['diff']:+.4f}  CI [{r['lower']:+.4f}, {r['upper']:+.4f}]  n={r['n']}"
                      f"  {'non-inferior' if r['non_inferior'] else 'NOT non-inferior'}", file=out)
        else:
            print("last decision: none", file=out)
    elif cmd == "promote":
        word = "promoted" if result["promoted"] else "refused"
        print(f"{word}: version {result['version']}: {result['reason']}", file=out)
        g = result.get("gate") or {}
        for region, r in (g.get("regions") or {}).items():
            print(f"  {region}: {r['challenger_mean']:.4f} vs {r['champion_mean']:.4f}  diff {r['mean_diff']:+.4f}"
                  f"  {100 * (1 - g['alpha']):g}% CI [{r['ci_lower']:+.4f}, {r['ci_upper']:+.4f}]  n={r['n_cases']}", file=out)
        print(f"champion: v{result['champion_version']}", file=out)
    elif cmd == "rollback":
        print(f"champion: v{result['champion_version']} (previous-champion: v{result['previous_champion_version']})", file=out)
