"""The tune and train stages: what the CLI, the DVC stages and the KFP components call.

Both log to MLflow when a tracking URI is given: tuning as one parent run with a nested run per trial,
training as one run with per-epoch loss, validation Dice, learning rate, seconds and data-wait share, and the
same history drawn as the artefact ``training_curves.png`` (an ensemble's run: every fold's curves).
``run_train`` can start a multi-process (DDP) job; ``run_train_folds`` trains several folds and combines
them into an ensemble package.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.tracking import log_dataset_input, mlflow_run
from medseg.training import ddp
from medseg.training.trainer import TrainConfig, TrainResult, train
from medseg.training.tuning import SEARCH_SPACE, tune

log = logging.getLogger(__name__)


def _plain(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def run_tune(preprocessed_dir: Path, out_file: Path, train_params: dict[str, Any], n_trials: int, storage: str, study_name: str, tracking_uri: str | None = None, tags: dict[str, str] | None = None, progress: bool = True) -> schemas.BestParams:
    """Optuna study over :data:`~medseg.training.tuning.SEARCH_SPACE`; writes ``best_params.json``."""
    base = TrainConfig.from_dict(train_params)
    from medseg.task import Task

    metric = Task.from_folder(preprocessed_dir).validation_metric  # what each trial is scored by
    with mlflow_run(tracking_uri, f"tune-{study_name}", tags, system_metrics=True) as run:
        if run is not None:
            log_dataset_input(preprocessed_dir, "tuning")

        def on_trial(number: int, params: dict[str, Any], value: float, state: str) -> None:
            if run is None:
                return
            import mlflow

            # the parent's experiment: without it a nested run goes to MLflow's "Default" experiment
            with mlflow.start_run(experiment_id=run.info.experiment_id, run_name=f"trial-{number}", nested=True, tags={"trial_state": state, **(tags or {})}):
                mlflow.log_params(params)
                if value == value:  # not NaN
                    mlflow.log_metric(metric, value)

        best = tune(preprocessed_dir, base, n_trials, storage, study_name, SEARCH_SPACE, seed=base.seed, on_trial=on_trial, progress=progress)
        if run is not None:
            import mlflow

            mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
            mlflow.log_metrics({f"best_{metric}": best.best_value if best.best_value == best.best_value else 0.0, "n_pruned": best.n_pruned})
    best.metric = metric
    best.save(out_file)
    return best


def log_training_curves(model_dir: Path) -> None:
    """Log the package's ``training_curves.png`` (loss and validation per epoch) as an artefact of the active MLflow run,
    at the run's root; nothing when the package has none."""
    import mlflow

    curves = Path(model_dir) / schemas.TRAINING_CURVES_PNG
    if curves.is_file():
        mlflow.log_artifact(str(curves))


def merged_params(train_params: dict[str, Any], best_params: Path | None) -> TrainConfig:
    """``params.yaml``'s training parameters overridden by the tuned ones (``best_params.json`` or its folder)."""
    params = dict(train_params)
    if best_params is not None:
        params.update(schemas.BestParams.load(best_params).params)
    return TrainConfig.from_dict(params)


def run_train(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, tracking_uri: str | None = None, tags: dict[str, str] | None = None, resume: bool = False,
              progress: bool = True, nproc_per_node: int = 1, nnodes: int = 1, dataset_dir: Path | None = None) -> TrainResult:
    """Train and write the model package to ``out_dir/model``; returns the result with its MLflow run id.

    ``dataset_dir``: the ingested dataset, read for a classification dataset's per-case classes and ages when
    the preprocessed folder holds no ``manifest.json`` (see :func:`~medseg.training.trainer.train`).

    ``nproc_per_node`` × ``nnodes`` > 1 starts a DDP job with torchrun (:func:`medseg.training.ddp.launch`)
    whose rank 0 tracks and writes the package; inside a torchrun worker (the job itself, or ``torchrun -m
    medseg.cli train``) only rank 0 logs to MLflow. On a node other than rank 0's the returned result is empty.
    """
    if nproc_per_node * nnodes > 1 and not ddp.in_torchrun_worker():
        if dataset_dir is not None:
            raise MedsegError("dataset_dir is not passed to DDP workers: put the dataset's manifest.json in the preprocessed folder")
        if cfg.cascade_from:  # the previous-stage maps once, here: the workers find them ready
            from medseg.inference.sliding_window import select_device
            from medseg.training.cascade import prepare_previous_stage

            prepare_previous_stage(preprocessed_dir, cfg.cascade_from, cfg.configuration, device=select_device(cfg.device), progress=progress)
        spec = {"preprocessed_dir": str(Path(preprocessed_dir).resolve()), "cfg": dataclasses.asdict(cfg), "tracking_uri": tracking_uri,
                "tags": dict(tags or {}), "resume": resume, "progress": progress}
        data = ddp.launch(spec, Path(out_dir).resolve(), nproc_per_node, nnodes)
        return TrainResult.from_dict(data) if data else TrainResult(best_val_dice=float("nan"), best_epoch=-1, epochs_run=0)
    main = ddp.env_rank() == 0
    with mlflow_run(tracking_uri if main else None, f"train-fold{cfg.fold}", tags, system_metrics=True) as run:
        if run is not None:
            import mlflow

            log_dataset_input(dataset_dir if dataset_dir is not None else preprocessed_dir, "training")
            mlflow.log_params({**dataclasses.asdict(cfg), "world_size": ddp.env_world_size()})
            plans = schemas.Plans.load(preprocessed_dir)
            mlflow.log_dict(plans.to_dict(), schemas.PLANS_JSON)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if run is not None:
                import mlflow

                mlflow.log_metrics(_plain(metrics), step=epoch)

        result = train(preprocessed_dir, out_dir, cfg, resume=resume, on_epoch=on_epoch, progress=progress, dataset_dir=dataset_dir)
        if run is not None:
            import mlflow

            mlflow.log_metrics({f"best_{result.metric}": result.best_val_dice, "seconds_per_step": result.seconds_per_step})
            if result.model_dir is not None:
                # record the training run in the package: the registry copies it into lineage tags
                package = schemas.ModelPackage.load(result.model_dir)
                package.training["mlflow_run_id"] = run.info.run_id
                package.save(result.model_dir)
                trained = package.training.get("config") or {}  # what "auto" became for this task
                mlflow.log_params({"trained_network": trained.get("network"), "trained_loss": trained.get("loss"), "network_output": package.network.get("output", "labels")})
                log_training_curves(result.model_dir)
    return result


def run_train_configuration(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, configuration: str, tracking_uri: str | None = None,
                            tags: dict[str, str] | None = None, resume: bool = False, progress: bool = True, nproc_per_node: int = 1,
                            nnodes: int = 1) -> TrainResult:
    """Train ``configuration`` (a planned one, or ``3d_cascade_fullres``): the model package lands in ``out_dir/model``.

    ``3d_cascade_fullres`` is nnU-Net's two stages: ``3d_lowres`` trained first (into ``out_dir/lowres``), then
    ``3d_fullres`` with the low-resolution segmentation as extra input channels (``cascade_from``); the cascade's
    package carries its low-resolution stage.
    """
    out_dir = Path(out_dir)
    launch = {"tracking_uri": tracking_uri, "resume": resume, "progress": progress, "nproc_per_node": nproc_per_node, "nnodes": nnodes}
    if configuration != "3d_cascade_fullres":
        return run_train(preprocessed_dir, out_dir, dataclasses.replace(cfg, configuration=configuration), tags={**(tags or {}), "configuration": configuration}, **launch)
    low = run_train(preprocessed_dir, out_dir / "lowres", dataclasses.replace(cfg, configuration="3d_lowres", cascade_from=""),
                    tags={**(tags or {}), "configuration": "3d_lowres", "cascade_stage": "1 of 2"}, **launch)
    if low.model_dir is None:  # a DDP node other than rank 0's
        return low
    if progress:
        log.info("cascade: 3d_lowres trained (%s %.4f); training the 3d_fullres stage on top of it", low.metric, low.best_val_dice)
    return run_train(preprocessed_dir, out_dir, dataclasses.replace(cfg, configuration="3d_fullres", cascade_from=str(Path(low.model_dir).resolve())),
                     tags={**(tags or {}), "configuration": "3d_cascade_fullres", "cascade_stage": "2 of 2"}, **launch)


# --------------------------------------------------------------------------- k-fold cross-validation
def parse_folds(value: str | int | None, n_folds: int) -> list[int] | None:
    """``--fold``: None → None (the config's fold), ``all`` → every fold, ``N`` or ``N,M,…`` → those folds.

    Raises:
        MedsegError: not a fold number, or a fold the splits do not have.
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "all":
        return list(range(n_folds))
    try:
        folds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedsegError(f"--fold takes a fold number, a comma-separated list or 'all', got {value!r}") from None
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad or not folds:
        raise MedsegError(f"fold(s) {bad or value!r} do not exist (splits have {n_folds} folds: 0..{n_folds - 1})")
    return folds


@dataclass
class FoldsResult:
    """Training of several folds: one result per fold and the ensemble package of them all."""

    results: dict[int, TrainResult]
    model_dir: Path | None  # the ensemble package (``out/model``)
    cv_dice: dict[str, float] = field(default_factory=dict)  # out-of-fold Dice per region, before postprocessing

    @property
    def best_val_dice(self) -> float:
        return float(np.mean([r.best_val_dice for r in self.results.values()])) if self.results else float("nan")


def fold_dir(out_dir: Path, fold: int) -> Path:
    return Path(out_dir) / f"fold_{fold}"


def _finished(run_dir: Path, cfg: TrainConfig) -> TrainResult | None:
    """The result of a fold whose run is complete (last epoch checkpointed, package written), else None."""
    from medseg.training.trainer import CHECKPOINT, load_checkpoint

    ckpt_path, model_dir = run_dir / CHECKPOINT, run_dir / "model"
    if not ckpt_path.is_file() or not (model_dir / schemas.MODEL_PACKAGE_JSON).is_file():
        return None
    ckpt = load_checkpoint(ckpt_path)
    if int(ckpt.get("epoch", -1)) + 1 < cfg.epochs:
        return None
    metric = str(schemas.ModelPackage.load(model_dir).training.get("val_metric") or "val_dice_mean")
    return TrainResult(best_val_dice=float(ckpt["best"]), best_epoch=int(ckpt["best_epoch"]), epochs_run=len(ckpt["history"]), history=list(ckpt["history"]),
                       model_dir=model_dir, world_size=int(ckpt.get("world_size", 1)), metric=metric)


def run_train_folds(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, folds: list[int], tracking_uri: str | None = None, tags: dict[str, str] | None = None,
                    resume: bool = False, progress: bool = True, nproc_per_node: int = 1, nnodes: int = 1, ensemble: bool = True,
                    dataset_dir: Path | None = None) -> FoldsResult:
    """Train ``folds`` one after the other, each into ``out_dir/fold_N`` (its own checkpoint, package and MLflow
    run), then combine them into the ensemble package ``out_dir/model``
    (:func:`~medseg.training.ensemble.save_ensemble_package`) with postprocessing chosen on the out-of-fold
    predictions. With ``resume`` a finished fold is skipped and an unfinished one continues. Classifiers
    (classification datasets) get no postprocessing; ``cv_dice`` then holds their out-of-fold accuracy,
    balanced accuracy and cross-entropy (``loss``).
    """
    from medseg.training import ensemble as ens

    out_dir = Path(out_dir)
    results: dict[int, TrainResult] = {}
    for fold in folds:
        run_dir = fold_dir(out_dir, fold)
        fold_cfg = dataclasses.replace(cfg, fold=fold)
        done = _finished(run_dir, fold_cfg) if resume else None
        if done is not None:
            log.info("fold %d was trained already (%d epochs): skipped", fold, done.epochs_run)
            results[fold] = done
            continue
        if progress:
            log.info("training fold %d (%d of %d) → %s", fold, len(results) + 1, len(folds), run_dir)
        results[fold] = run_train(preprocessed_dir, run_dir, fold_cfg, tracking_uri=tracking_uri, tags={**(tags or {}), "fold": str(fold)}, resume=resume,
                                  progress=progress, nproc_per_node=nproc_per_node, nnodes=nnodes, dataset_dir=dataset_dir)
    members = [r.model_dir for r in results.values() if r.model_dir is not None]
    if not ensemble or len(members) < 2 or ddp.env_rank() != 0:
        return FoldsResult(results, None)
    model_dir, cv_dice = build_fold_ensemble(preprocessed_dir, members, out_dir / "model", cfg, tracking_uri, tags, progress, dataset_dir)
    return FoldsResult(results, model_dir, cv_dice)


def build_fold_ensemble(preprocessed_dir: Path, members: list[Path], model_dir: Path, cfg: TrainConfig, tracking_uri: str | None = None,
                        tags: dict[str, str] | None = None, progress: bool = True, dataset_dir: Path | None = None) -> tuple[Path, dict[str, float]]:
    """The ensemble package of single-fold packages ``members`` at ``model_dir``, with postprocessing chosen on their
    out-of-fold predictions (nnU-Net's cross-validation postprocessing); returns it and the out-of-fold scores
    (Dice per region or label; a classifier's accuracy, balanced accuracy and cross-entropy). Logged as one MLflow
    run (``train-ensemble``). Used by ``medseg train --fold all`` and by the pipeline's ensemble step, whose folds
    trained in parallel pods."""
    from medseg.inference.sliding_window import select_device
    from medseg.training import ensemble as ens

    members = [Path(m) for m in members]
    device = select_device(cfg.device)
    packages = [schemas.ModelPackage.load(m) for m in members]
    first = packages[0]
    classifier = ens.network_output(first.network) == "classes"
    cascade_members = bool(cfg.cascade_from) or bool(first.previous_stage)
    if classifier:
        post, cv_dice = {}, ens.cross_validation_classification(preprocessed_dir, members, device, dataset_dir)
        training = {"cv_classification": cv_dice}
    elif cascade_members:  # a cascade's folds: validation inputs carry the previous stage
        from medseg.training import cascade

        cascade.members_previous_stage(members)
        post, cv_dice = cascade.cross_validation_postprocessing(preprocessed_dir, members, cfg.max_val_cases, cfg.val_overlap, device)
        training = {"cv_dice": cv_dice}
    else:
        post, cv_dice = ens.cross_validation_postprocessing(preprocessed_dir, members, cfg.max_val_cases, cfg.val_overlap, device)
        training = {"cv_dice": cv_dice}
    model_dir = ens.save_ensemble_package(model_dir, members, training=training, postprocessing=post)
    if cascade_members:  # the ensemble carries the folds' shared low-resolution stage
        from medseg.training import cascade

        cascade.attach_previous_stage(model_dir, members[0])
    folds = sorted(int((p.training.get("config") or {}).get("fold", i)) for i, p in enumerate(packages))
    if progress:
        log.info("ensemble of folds %s → %s (out-of-fold %s %s)", folds, model_dir, "scores" if classifier else "Dice", " ".join(f"{k} {v:.3f}" for k, v in cv_dice.items()))
    score = "best_val_balanced_accuracy" if classifier else "best_val_dice"
    fold_scores = [float(p.training[score]) for p in packages if isinstance(p.training.get(score), (int, float))]
    with mlflow_run(tracking_uri, "train-ensemble", tags) as run:
        if run is not None:
            import mlflow

            metric = str(first.training.get("val_metric") or ("val_balanced_accuracy" if classifier else "val_dice_mean"))
            prefix, mean_key = ("cv_", f"mean_fold_{metric}") if classifier else ("cv_dice_", "mean_fold_val_dice")
            mlflow.log_params({"folds": ",".join(map(str, folds)), "combine": ens.combine_rule(first.network)})
            mlflow.log_metrics({**{f"{prefix}{k}": v for k, v in cv_dice.items()}, **({mean_key: float(np.mean(fold_scores))} if fold_scores else {})})
            package = schemas.ModelPackage.load(model_dir)
            package.training["mlflow_run_id"] = run.info.run_id
            package.save(model_dir)
            log_training_curves(model_dir)
    return Path(model_dir), cv_dice


def training_units(preprocessed_dir: Path, folds: str | int, candidates: str = "") -> list[dict[str, Any]]:
    """The train tasks of a pipeline run, one pod each: ``{"configuration", "fold"}`` for every fold of ``folds``
    (:func:`parse_folds`) and every configuration: the one preprocessing chose, and with ``candidates`` (``all`` or a
    list, :meth:`medseg.task.Task.candidate_configurations`) the others cross-validation will choose among.

    Raises:
        MedsegError: a fold the splits lack, an unknown candidate, or one that was not preprocessed.
    """
    from medseg.task import Task, configuration_stages

    preprocessed_dir = Path(preprocessed_dir)
    plans = schemas.Plans.load(preprocessed_dir)
    chosen = plans.chosen_configuration or (plans.trained_configurations[-1] if plans.trained_configurations else "3d_fullres")
    configurations = Task.from_folder(preprocessed_dir).candidate_configurations(candidates, list(plans.configurations), chosen) or [chosen]
    for configuration in configurations:
        missing = [c for c in configuration_stages(configuration) if c not in plans.trained_configurations]
        if missing:
            raise MedsegError(f"candidate {configuration} needs {', '.join(missing)} preprocessed (preprocess with the same candidates)", preprocessed_dir)
    fold_list = parse_folds(folds, len(schemas.Splits.load(preprocessed_dir).folds)) or [0]
    return [{"configuration": c, "fold": f} for c in configurations for f in fold_list]


def build_selected_model(preprocessed_dir: Path, dataset_dir: Path | None, fold_packages: list[Path], model_dir: Path, cfg: TrainConfig,
                         tracking_uri: str | None = None, tags: dict[str, str] | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The run's model from its trained single-fold packages: per configuration the fold ensemble (one fold: its
    package as is), then, with several configurations, the best one or the best pair by cross-validation
    (:func:`medseg.training.model_selection.select_configuration`, on ``dataset_dir``'s raw cases). Returns the
    package folder (``model_dir``) and what to report: ``cv_*`` scores of the fold ensemble and, after a selection,
    ``selection`` (:meth:`~medseg.training.model_selection.Selection.to_dict`). Logged to MLflow as ``select-configuration``."""
    import shutil

    from medseg.training import model_selection as sel

    model_dir = Path(model_dir)
    work = model_dir.parent / f".{model_dir.name}.work"
    by_configuration: dict[str, list[Path]] = {}
    for folder in fold_packages:
        by_configuration.setdefault(sel.trained_configuration(schemas.ModelPackage.load(folder)), []).append(Path(folder))
    models: dict[str, Path] = {}
    report: dict[str, Any] = {}
    for configuration, members in by_configuration.items():
        if len(members) == 1:
            models[configuration] = members[0]
            continue
        # one configuration: its fold ensemble is the model, written in place (no copy out of the work folder)
        target = model_dir if len(by_configuration) == 1 else work / configuration / "model"
        built, cv = build_fold_ensemble(preprocessed_dir, members, target, cfg, tracking_uri,
                                        {**(tags or {}), "configuration": configuration}, progress)
        models[configuration] = built
        report.update({f"cv_{configuration}_{k}" if len(by_configuration) > 1 else f"cv_{k}": v for k, v in cv.items()})
    if len(models) == 1:
        only = next(iter(models.values()))
        if only.resolve() != model_dir.resolve():
            if model_dir.exists():
                shutil.rmtree(model_dir)
            shutil.copytree(only, model_dir)
        shutil.rmtree(work, ignore_errors=True)
        return model_dir, report
    if dataset_dir is None:
        raise MedsegError("choosing among configurations needs the ingested dataset (its raw cases are scored in their own geometry)")
    selection, winner_pairs = sel.select_configuration(dataset_dir, by_configuration, work, cfg.max_val_cases, cfg.val_overlap, cfg.device, progress=progress)
    if progress:
        log.info("configurations by out-of-fold Dice: %s → %s", ", ".join(f"{k} {v:.4f}" for k, v in sorted(selection.scores.items(), key=lambda kv: -kv[1])), selection.name)
    if len(selection.chosen) == 1:
        winner = models[selection.chosen[0]]
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(winner, model_dir)
        package = schemas.ModelPackage.load(model_dir)
        package.training["configuration_selection"] = selection.to_dict()
        package.save(model_dir)
    else:
        from medseg.task import Task
        from medseg.training.validation import postprocessing_from_pairs

        plans = schemas.Plans.load(models[selection.chosen[0]])
        post = postprocessing_from_pairs(winner_pairs, plans, selection.spacing, Task.from_folder(dataset_dir))
        if post:
            post["chosen_on"] = "out-of-fold predictions of the configuration ensemble, input geometry"
        sel.save_configuration_ensemble(model_dir, {c: models[c] for c in selection.chosen}, selection, post)
    report["selection"] = selection.to_dict()
    with mlflow_run(tracking_uri, "select-configuration", tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_params({"candidates": ",".join(by_configuration), "chosen": selection.name, "cases": selection.n_cases})
            mlflow.log_metrics({f"cv_dice_{name.replace(sel.PAIR_JOIN, '_and_')}": v for name, v in selection.scores.items()})
            mlflow.log_dict(selection.to_dict(), schemas.CONFIGURATION_SELECTION_JSON)
            package = schemas.ModelPackage.load(model_dir)
            package.training["selection_mlflow_run_id"] = run.info.run_id
            package.training.setdefault("mlflow_run_id", run.info.run_id)  # a pair's package: this run is its training lineage
            package.save(model_dir)
    shutil.rmtree(work, ignore_errors=True)
    return model_dir, report


__all__ = ["SEARCH_SPACE", "FoldsResult", "build_fold_ensemble", "build_selected_model", "training_units", "log_training_curves", "merged_params", "parse_folds", "run_train", "run_train_configuration", "run_train_folds", "run_tune"]
