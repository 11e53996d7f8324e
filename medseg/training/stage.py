"""The tune and train stages: what the CLI, the DVC stages and the KFP components call.

Both log to MLflow when a tracking URI is given: tuning as one parent run with a nested run per trial,
training as one run with per-epoch loss and validation Dice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from medseg import schemas
from medseg.tracking import mlflow_run
from medseg.training.trainer import TrainConfig, TrainResult, train
from medseg.training.tuning import SEARCH_SPACE, tune


def _plain(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def run_tune(preprocessed_dir: Path, out_file: Path, train_params: dict[str, Any], n_trials: int, storage: str, study_name: str, tracking_uri: str | None = None, tags: dict[str, str] | None = None, progress: bool = True) -> schemas.BestParams:
    """Optuna study over :data:`~medseg.training.tuning.SEARCH_SPACE`; writes ``best_params.json``."""
    base = TrainConfig.from_dict(train_params)
    with mlflow_run(tracking_uri, f"tune-{study_name}", tags) as run:
        def on_trial(number: int, params: dict[str, Any], value: float, state: str) -> None:
            if run is None:
                return
            import mlflow

            # the parent's experiment: without it a nested run goes to MLflow's "Default" experiment
            with mlflow.start_run(experiment_id=run.info.experiment_id, run_name=f"trial-{number}", nested=True, tags={"trial_state": state, **(tags or {})}):
                mlflow.log_params(params)
                if value == value:  # not NaN
                    mlflow.log_metric("val_dice_mean", value)

        best = tune(preprocessed_dir, base, n_trials, storage, study_name, SEARCH_SPACE, seed=base.seed, on_trial=on_trial, progress=progress)
        if run is not None:
            import mlflow

            mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
            mlflow.log_metrics({"best_val_dice_mean": best.best_value if best.best_value == best.best_value else 0.0, "n_pruned": best.n_pruned})
    best.save(out_file)
    return best


def merged_params(train_params: dict[str, Any], best_params: Path | None) -> TrainConfig:
    """``params.yaml``'s training parameters overridden by the tuned ones (``best_params.json`` or its folder)."""
    params = dict(train_params)
    if best_params is not None:
        params.update(schemas.BestParams.load(best_params).params)
    return TrainConfig.from_dict(params)


def run_train(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, tracking_uri: str | None = None, tags: dict[str, str] | None = None, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train and write the model package to ``out_dir/model``; returns the result with its MLflow run id."""
    with mlflow_run(tracking_uri, f"train-fold{cfg.fold}", tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_params(dataclasses.asdict(cfg))
            plans = schemas.Plans.load(preprocessed_dir)
            mlflow.log_dict(plans.to_dict(), "plans.json")

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if run is not None:
                import mlflow

                mlflow.log_metrics(_plain(metrics), step=epoch)

        result = train(preprocessed_dir, out_dir, cfg, resume=resume, on_epoch=on_epoch, progress=progress)
        if run is not None:
            import mlflow

            mlflow.log_metrics({"best_val_dice_mean": result.best_val_dice, "seconds_per_step": result.seconds_per_step})
            if result.model_dir is not None:
                # record the training run in the package: the registry copies it into lineage tags
                package = schemas.ModelPackage.load(result.model_dir)
                package.training["mlflow_run_id"] = run.info.run_id
                package.save(result.model_dir)
    return result


__all__ = ["SEARCH_SPACE", "merged_params", "run_train", "run_tune"]
