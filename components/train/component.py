from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def train(preprocessed: Input[Dataset], best_params: Input[Artifact], train_params: dict, configuration: str, mlflow_tracking_uri: str, pipeline_run_id: str,
          model: Output[Model], gpus: int = 0, nproc_per_node: int = 1, nnodes: int = 1, checkpoint_store: str = "", resume_run: str = ""):
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
    cfg = dataclasses.replace(merged_params(train_params, Path(best_params.path)), device=launch.device)
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
                           "device": launch.device, "gpus": int(gpus), "network": trained.get("network"), "loss": trained.get("loss")})


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def plan_budget(device_budget: str, gpus: int, gpu_memory_gib: float, node_selector: dict) -> str:
    """The planner's budget for this run: ``auto`` → ``cpu`` when the run trains on 0 GPUs, else ``gpu:<GiB>`` of
    its GPU (``gpu_memory_gib``, or the GPU model named by the train pods' node selector); ``cpu`` / ``gpu:<GiB>`` as given.
    A step of its own because the GPU count is a run parameter, known only when the run starts."""
    from medseg.pipeline.gpu import resolve_device_budget

    return resolve_device_budget(device_budget, int(gpus), float(gpu_memory_gib), node_selector)
