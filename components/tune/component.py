"""Hyperparameter search as parallel Optuna workers sharing one study, then the best parameters.

``tune_shards`` (creates the study) → ``dsl.ParallelFor`` of ``tune_worker`` (each runs its share of the trials against the
study in the RDB storage: PostgreSQL from the medseg-optuna Secret on a cluster, a SQLite file locally)
→ ``tune`` reads the study's best parameters into the ``best_params`` artefact the train step uses.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def tune_shards(n_workers: int, n_trials: int, optuna_storage: str, pipeline_run_id: str) -> List[int]:
    """Create the run's study (and the storage's tables) before the workers start; return their indices
    ``0..W-1``, ``W = min(n_workers, n_trials)`` (at least 1)."""
    from medseg.errors import MedsegError
    from medseg.tracking import resolve_optuna_storage
    from medseg.training.tuning import pipeline_study_name, prepare_study

    if int(n_workers) < 1:
        raise MedsegError(f"tune_workers must be >= 1, got {n_workers}")
    prepare_study(resolve_optuna_storage(optuna_storage), pipeline_study_name(pipeline_run_id))
    return list(range(max(1, min(int(n_workers), int(n_trials)))))


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def tune_worker(preprocessed: Input[Dataset], worker_index: int, n_workers: int, train_params: dict, tune_params: dict, n_trials: int,
                optuna_storage: str, mlflow_tracking_uri: str, pipeline_run_id: str, partial_best: Output[Artifact], gpus: int = 0,
                accelerator_type: str = "") -> dict:
    """One Optuna worker: its share of ``n_trials`` short pruned trainings of the chosen configuration in the run's
    shared study (a cascade is tuned on its 3d_lowres stage). The configuration is the one preprocessing chose, read from the
    plan (kfp.local hands a ParallelFor task the loop item for an upstream task's output parameter). ``gpus`` (the run's
    ``tune_gpus``, the pod's GPU limit) > 0: the trials run on CUDA, one at a time on the first GPU; 0: on the CPU.
    ``accelerator_type`` (the pod's GPU resource name) is recorded with the worker's result; it is also an argument so that
    KFP 2.17 hands it into the ``ParallelFor`` body, whose inputs its compiler builds from the tasks' arguments only
    (a parameter used only by ``set_accelerator_type`` inside a loop is missing there and the run fails)."""
    import math
    from pathlib import Path

    from medseg import schemas
    from medseg.pipeline.gpu import step_device
    from medseg.task import configuration_stages
    from medseg.tracking import resolve_optuna_storage, resolve_tracking_uri
    from medseg.training.stage import run_tune
    from medseg.training.tuning import pipeline_study_name, worker_seed, worker_trials

    index = int(worker_index)  # loop items arrive as floats from kfp.local
    share = worker_trials(int(n_trials), int(n_workers), index)
    chosen = schemas.Plans.load(Path(preprocessed.path)).chosen_configuration or "3d_fullres"
    params = {**train_params, **tune_params, "configuration": configuration_stages(chosen)[0], "device": step_device(int(gpus))}
    params["seed"] = worker_seed(int(params.get("seed", 0)), index)  # distinct sampler draws per worker
    best = run_tune(Path(preprocessed.path), Path(partial_best.path), params, share, resolve_optuna_storage(optuna_storage), pipeline_study_name(pipeline_run_id),
                    tracking_uri=resolve_tracking_uri(mlflow_tracking_uri), tags={"pipeline_run_id": pipeline_run_id, "stage": "tune", "tune_worker": str(index)}, progress=True)
    value = best.best_value if math.isfinite(best.best_value) else None
    partial_best.metadata.update({"worker": index, "n_trials": share, "study_best_value_seen": value, "device": params["device"], "accelerator_type": accelerator_type})
    return {"worker": index, "n_trials": share, "study_best_value_seen": value}


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def tune(workers: list, train_params: dict, tune_params: dict, optuna_storage: str, pipeline_run_id: str, best_params: Output[Artifact]):
    """The best parameters of the run's study once every worker has finished (``workers``: their summaries)."""
    import math
    from pathlib import Path

    from medseg.tracking import resolve_optuna_storage
    from medseg.training.trainer import TrainConfig
    from medseg.training.tuning import pipeline_study_name, study_best

    base = TrainConfig.from_dict({**train_params, **tune_params})
    best = study_best(resolve_optuna_storage(optuna_storage), pipeline_study_name(pipeline_run_id), base)
    best.save(Path(best_params.path))
    best_value = best.best_value if math.isfinite(best.best_value) else None
    best_params.metadata.update({"best_value": best_value, "n_trials": best.n_trials, "n_pruned": best.n_pruned, "n_workers": len(workers),
                                 **{k: float(v) for k, v in best.params.items()}})
