from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def train(preprocessed: Input[Dataset], best_params: Input[Artifact], train_params: dict, mlflow_tracking_uri: str, pipeline_run_id: str,
          model: Output[Model], gpus: int = 0, nproc_per_node: int = 1, nnodes: int = 1, checkpoint_store: str = "", resume_run: str = "",
          fold: int = -1, accelerator_type: str = "", configuration: str = ""):
    """Final training of the chosen configuration with the tuned parameters; writes the model package. Network and
    loss follow the dataset's task unless ``train_params`` name them; ``3d_cascade_fullres`` trains both stages.

    ``gpus`` (the run's ``train_gpus``, also the pod's GPU limit) > 0: torchrun with one process per GPU on CUDA
    (NCCL; 1 GPU = one plain process), failing if the container sees fewer GPUs. ``gpus`` 0: the CPU, with
    ``nproc_per_node`` processes (DDP on gloo sharing the cores; 1 = plain training). ``nnodes`` > 1 is for this image
    running as the replicas of a Kubeflow ``PyTorchJob``, whose operator sets ``MASTER_ADDR``, ``MASTER_PORT`` and
    ``RANK`` in every pod (see medseg/training/ddp.py); rank 0's pod writes the model.

    ``checkpoint_store`` (``s3://bucket/prefix`` or a mounted folder): every epoch's checkpoint is copied there under
    ``<run>/<configuration>/fold_<k>``, ``<run>`` being ``resume_run`` or else this pipeline run; a restarted pod or a
    retried task finds it and resumes (medseg/training/checkpoint_store.py). Deleted once the model is written.

    ``configuration``: empty = the one preprocessing chose, read from the plan (inside a ``ParallelFor``, kfp.local
    hands a task the loop item in place of an upstream task's output parameter, so the pipeline does not pass it).
    ``fold`` ≥ 0: train that fold of the splits (the pipeline's ``ParallelFor`` over folds); -1: ``train_params``' fold.
    ``accelerator_type`` is the pod's GPU resource name, recorded with the model; it is an argument so that KFP 2.17
    hands it into the ``ParallelFor`` body (see the tune worker).
    """
    import dataclasses
    import shutil
    from pathlib import Path

    from medseg import schemas
    from medseg.pipeline.gpu import train_launch
    from medseg.tracking import resolve_tracking_uri
    from medseg.training.checkpoint_store import CheckpointMirror, checkpoint_key
    from medseg.training.stage import merged_params, run_train_configuration

    launch = train_launch(int(gpus), int(nproc_per_node))
    configuration = configuration or schemas.Plans.load(Path(preprocessed.path)).chosen_configuration or "3d_fullres"
    cfg = dataclasses.replace(merged_params(train_params, Path(best_params.path)), device=launch.device)
    if int(fold) >= 0:
        cfg = dataclasses.replace(cfg, fold=int(fold))
    work = Path(model.path + ".work")
    key = checkpoint_key(resume_run or pipeline_run_id, configuration, cfg.fold)
    with CheckpointMirror(checkpoint_store, key, work) as mirror:
        result = run_train_configuration(Path(preprocessed.path), work, cfg, configuration, tracking_uri=resolve_tracking_uri(mlflow_tracking_uri),
                                         tags={"pipeline_run_id": pipeline_run_id, "stage": "train", "gpus": str(int(gpus)), "checkpoint_key": key},
                                         progress=True, nproc_per_node=launch.nproc_per_node, nnodes=nnodes, resume=mirror.enabled)
    if result.model_dir is None:  # a node other than rank 0's: the master replica writes the model
        return
    shutil.move(str(result.model_dir), model.path)
    mirror.clear()  # the model is the run's artefact now: nothing is left to resume
    shutil.rmtree(work, ignore_errors=True)
    trained = schemas.ModelPackage.load(Path(model.path)).training.get("config") or {}
    model.metadata.update({"val_metric": result.metric, "best_val_score": result.best_val_dice, "best_epoch": result.best_epoch,
                           "seconds_per_step": result.seconds_per_step, "world_size": result.world_size, "configuration": configuration,
                           "device": launch.device, "gpus": int(gpus), "network": trained.get("network"), "loss": trained.get("loss"), "fold": cfg.fold,
                           "accelerator_type": accelerator_type})


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def training_folds(preprocessed: Input[Dataset], folds: str, candidates: str = "") -> list:
    """The train tasks, one pod each: ``{"configuration", "fold"}`` for every fold of ``folds`` (a fold number, a list
    ``N,M,...`` or ``all``: every fold of the splits the ingest step wrote) and every configuration: the one preprocessing
    chose, plus with ``candidates`` (``all``, or a list such as ``2d,3d_fullres``) the others cross-validation chooses among."""
    from pathlib import Path

    from medseg.training.stage import training_units

    return training_units(Path(preprocessed.path), folds, candidates)


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def fold_ensemble(preprocessed: Input[Dataset], dataset: Input[Dataset], fold_models: Input[List[Model]], train_params: dict, mlflow_tracking_uri: str,
                  pipeline_run_id: str, model: Output[Model]):
    """The run's model from the trained folds: one fold's package as it is, or the ensemble package of several (their
    probabilities averaged at inference) with postprocessing chosen on their out-of-fold predictions, as nnU-Net
    ensembles its five folds; with several configurations, the best one or the best pair by cross-validation, as
    nnU-Net's find_best_configuration (scored on the dataset's raw cases, in their own geometry)."""
    from pathlib import Path

    from medseg import schemas
    from medseg.tracking import resolve_tracking_uri
    from medseg.training.stage import build_selected_model, merged_params

    cfg = merged_params(train_params, None)
    built, report = build_selected_model(Path(preprocessed.path), Path(dataset.path), [Path(m.path) for m in fold_models], Path(model.path), cfg,
                                         resolve_tracking_uri(mlflow_tracking_uri), {"pipeline_run_id": pipeline_run_id, "stage": "ensemble"})
    package = schemas.ModelPackage.load(built)
    if len(fold_models) == 1:  # one fold of one configuration: its package as it is, with what its train task recorded
        model.metadata.update(fold_models[0].metadata)
    selection = report.pop("selection", None) or {}
    folds = package.training.get("folds") or [(package.training.get("config") or {}).get("fold")]
    model.metadata.update({"configuration": package.configuration, "folds": folds, "network": package.network.get("name"),
                           **{k: v for k, v in report.items() if isinstance(v, (int, float))}})
    if selection:
        model.metadata.update({"chosen_configuration": selection["chosen"], **{f"cv_score_{k}": v for k, v in selection["scores"].items()}})


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def plan_budget(device_budget: str, gpus: int, gpu_memory_gib: float, node_selector: dict) -> str:
    """The planner's budget for this run: ``auto`` → ``cpu`` when the run trains on 0 GPUs, else ``gpu:<GiB>`` of
    its GPU (``gpu_memory_gib``, or the GPU model named by the train pods' node selector); ``cpu`` / ``gpu:<GiB>`` as given.
    A step of its own because the GPU count is a run parameter, known only when the run starts."""
    from medseg.pipeline.gpu import resolve_device_budget

    return resolve_device_budget(device_budget, int(gpus), float(gpu_memory_gib), node_selector)
