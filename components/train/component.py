from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def train(preprocessed: Input[Dataset], best_params: Input[Artifact], train_params: dict, configuration: str, mlflow_tracking_uri: str, pipeline_run_id: str,
          model: Output[Model], nproc_per_node: int = 1, nnodes: int = 1):
    """Final training of the chosen configuration with the tuned parameters; writes the model package. Network and
    loss follow the dataset's task unless ``train_params`` name them; ``3d_cascade_fullres`` trains both stages.

    Multi-process (DDP) training: ``nproc_per_node`` > 1 runs torchrun with that many workers in this
    container, one per GPU (give the task as many GPUs) or sharing the CPU cores. ``nnodes`` > 1 is for this
    image running as the replicas of a Kubeflow ``PyTorchJob``, whose operator sets ``MASTER_ADDR``,
    ``MASTER_PORT`` and ``RANK`` in every pod (see medseg/training/ddp.py); rank 0's pod writes the model.
    """
    import shutil
    from pathlib import Path

    from medseg import schemas
    from medseg.tracking import resolve_tracking_uri
    from medseg.training.stage import merged_params, run_train_configuration

    cfg = merged_params(train_params, Path(best_params.path))
    work = Path(model.path + ".work")
    result = run_train_configuration(Path(preprocessed.path), work, cfg, configuration, tracking_uri=resolve_tracking_uri(mlflow_tracking_uri),
                                     tags={"pipeline_run_id": pipeline_run_id, "stage": "train"}, progress=True, nproc_per_node=nproc_per_node, nnodes=nnodes)
    if result.model_dir is None:  # a node other than rank 0's: the master replica writes the model
        return
    shutil.move(str(result.model_dir), model.path)
    shutil.rmtree(work, ignore_errors=True)
    trained = schemas.ModelPackage.load(Path(model.path)).training.get("config") or {}
    model.metadata.update({"val_metric": result.metric, "best_val_score": result.best_val_dice, "best_epoch": result.best_epoch,
                           "seconds_per_step": result.seconds_per_step, "world_size": result.world_size, "configuration": configuration,
                           "network": trained.get("network"), "loss": trained.get("loss")})
