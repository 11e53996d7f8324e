"""Hyperparameter search with Optuna: short pruned trainings on one fold.

The study lives in an RDB storage (a SQLite file by default, any SQLAlchemy URL, e.g. PostgreSQL on a
cluster, so trials in parallel pods share it). Each trial trains for a few epochs and reports the
validation Dice after every epoch; the median pruner stops trials that fall behind the median of
earlier trials at the same epoch.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg import schemas
from medseg.optional import require
from medseg.training.trainer import TrainConfig, train

log = logging.getLogger(__name__)

# name → (kind, low, high[, log]) : the search space, also documented in params.yaml
SEARCH_SPACE: dict[str, tuple] = {
    "learning_rate": ("float", 3e-4, 1e-2, True),
    "foreground_share": ("float", 0.2, 0.7, False),
    "weight_decay": ("float", 1e-6, 1e-3, True),
}


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _storage(url: str):
    optuna = require("optuna", "train", "tuning (Optuna)")

    if url.startswith("sqlite"):
        # several worker processes may share one SQLite file: wait for locks instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}})
    return optuna.storages.RDBStorage(url)


def suggest(trial, space: dict[str, tuple]) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        kind = spec[0]
        if kind == "float":
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=bool(spec[3]) if len(spec) > 3 else False)
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2])
        elif kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        else:
            raise ValueError(f"unknown search space kind {kind!r} for {name}")
    return params


def baseline_params(base: TrainConfig, space: dict[str, tuple]) -> dict[str, Any]:
    """The configured values of the searched parameters, when every one lies inside its search range (else none:
    a value outside the space is not a point of it)."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        value = getattr(base, name, None)
        if spec[0] in ("float", "int") and isinstance(value, (int, float)) and spec[1] <= value <= spec[2]:
            values[name] = value
        elif spec[0] == "categorical" and value in spec[1]:
            values[name] = value
        else:
            return {}
    return values


def tune(preprocessed_dir: Path, base: TrainConfig, n_trials: int, storage: str, study_name: str, space: dict[str, tuple] | None = None, seed: int = 0, on_trial: Callable[[int, dict[str, Any], float, str], None] | None = None, progress: bool = True) -> schemas.BestParams:
    """Run ``n_trials`` short trainings; returns the best parameters (merged into ``base`` by the caller).

    ``on_trial(number, params, value, state)`` is called after each trial (for MLflow logging).
    """
    optuna = require("optuna", "train", "tuning (Optuna)")

    space = space or SEARCH_SPACE
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, n_trials // 3))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    study = optuna.create_study(study_name=study_name, storage=_storage(storage), direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True)
    baseline = baseline_params(base, space)
    if baseline and not study.trials:
        # the configured values are the study's first trial (Optuna's enqueue_trial): the tuned result is never a
        # sample that merely beat nothing, and a budget of few trials still measures the defaults. Workers sharing
        # a new study may each enqueue it; skip_if_exists drops the copies it can see
        study.enqueue_trial(baseline, skip_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        cfg = dataclasses.replace(base, **params, seed=base.seed + trial.number)

        def report(epoch: int, metrics: dict[str, float]) -> None:
            # the validation score the trainer selects on: mean Dice, or balanced accuracy for a classifier
            name = "val_dice_mean" if "val_dice_mean" in metrics else "val_balanced_accuracy"
            trial.report(metrics[name], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {name} {metrics[name]:.4f} below the median")

        with tempfile.TemporaryDirectory(prefix="medseg-trial-") as tmp:
            result = train(preprocessed_dir, Path(tmp), cfg, on_epoch=report, progress=False, write_package=False)
        return result.best_val_dice

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = trial.value if trial.value is not None else (max(trial.intermediate_values.values()) if trial.intermediate_values else float("nan"))
        msg = f"trial {trial.number}: {trial.state.name.lower()} value={value:.4f} " + " ".join(f"{k}={v:.3g}" for k, v in trial.params.items())
        if progress:
            log.info(msg)
        if on_trial is not None:
            on_trial(trial.number, dict(trial.params), float(value), trial.state.name)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials, callbacks=[after], catch=())
    return _summarize(study, base, space, storage, study_name)


def _summarize(study, base: TrainConfig, space: dict[str, tuple], storage: str, study_name: str) -> schemas.BestParams:
    optuna = require("optuna", "train", "tuning (Optuna)")

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    if completed:
        best_params, best_value = dict(study.best_trial.params), float(study.best_value)
    else:  # every trial pruned: keep the defaults, say so
        best_params, best_value = {k: getattr(base, k) for k in space}, float("nan")
    return schemas.BestParams(params=best_params, best_value=best_value, study_name=study_name, storage=_redact(storage),
                              n_trials=len(study.trials), n_pruned=len(pruned))


# --------------------------------------------------------------------------- parallel workers
def pipeline_study_name(pipeline_run_id: str) -> str:
    """The study every tune worker of one pipeline run shares (and the step after them reads)."""
    return f"medseg-{pipeline_run_id}"


def prepare_study(storage: str, study_name: str) -> None:
    """Create the storage's tables and the (maximised) study once, before parallel workers start: several
    processes initialising a fresh database at the same time race on its schema version row."""
    optuna = require("optuna", "train", "tuning (Optuna)")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=study_name, storage=_storage(storage), direction="maximize", load_if_exists=True)


def worker_trials(n_trials: int, n_workers: int, index: int) -> int:
    """Trials of worker ``index`` when ``n_trials`` are shared by ``n_workers`` workers of one study
    (the first ``n_trials % n_workers`` workers run one more; a worker may get 0)."""
    if n_workers < 1 or not 0 <= index < n_workers:
        raise ValueError(f"worker index {index} is not in 0..{n_workers - 1}")
    if n_trials < 0:
        raise ValueError(f"n_trials must be >= 0, got {n_trials}")
    return n_trials // n_workers + (1 if index < n_trials % n_workers else 0)


def worker_seed(seed: int, index: int) -> int:
    """The seed of worker ``index``: workers of one study must not draw the same startup trials."""
    return int(seed) + 1000 * int(index)


def study_best(storage: str, study_name: str, base: TrainConfig, space: dict[str, tuple] | None = None) -> schemas.BestParams:
    """The best parameters of an existing study (after parallel workers filled it); the defaults of
    ``base`` when every trial was pruned. Raises :class:`~medseg.errors.MedsegError` if the study does
    not exist or holds no finished trial."""
    optuna = require("optuna", "train", "tuning (Optuna)")

    from medseg.errors import MedsegError

    try:
        study = optuna.load_study(study_name=study_name, storage=_storage(storage))
    except KeyError:
        raise MedsegError(f"no Optuna study {study_name!r} in {_redact(storage)}") from None
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    if not finished:
        raise MedsegError(f"Optuna study {study_name!r} has no finished trial ({len(study.trials)} trials in {_redact(storage)})")
    return _summarize(study, base, space or SEARCH_SPACE, storage, study_name)


def _redact(url: str) -> str:
    """Drop a password from a database URL before it is written to an artefact."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
