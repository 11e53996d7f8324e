from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def train(preprocessed: Input[Dataset], best_params: Input[Artifact], train_params: dict, mlflow_tracking_uri: str, pipeline_run_id: str, model: Output[Model],
          nproc_per_node: int = 1, nnodes: int = 1):
    """Final training with the tuned parameters; writes the model package.

    Multi-process (DDP) training: ``nproc_per_node`` > 1 runs torchrun with that many workers in this
    container, one per GPU (give the task as many GPUs) or sharing the CPU cores. ``nnodes`` > 1 is for this
    image running as the replicas of a Kubeflow ``PyTorchJob``, whose operator sets ``MASTER_ADDR``,
    ``MASTER_PORT`` and ``RANK`` in every pod (see medseg/training/ddp.py); rank 0's pod writes the model.
    """
    import shutil
    from pathlib import Path

    from medseg.tracking import resolve_tracking_uri
    from medseg.training.stage import merged_params, run_train

    cfg = merged_params(train_params, Path(best_params.path))
    work = Path(model.path + ".work")
    result = run_train(Path(preprocessed.path), work, cfg, tracking_uri=resolve_tracking_uri(mlflow_tracking_uri),
                       tags={"pipeline_run_id": pipeline_run_id, "stage": "train"}, progress=True, nproc_per_node=nproc_per_node, nnodes=nnodes)
    if result.model_dir is None:  # a node other than rank 0's: the master replica writes the model
        return
    shutil.move(str(result.model_dir), model.path)
    shutil.rmtree(work, ignore_errors=True)
    model.metadata.update({"best_val_dice": result.best_val_dice, "best_epoch": result.best_epoch, "seconds_per_step": result.seconds_per_step,
                           "world_size": result.world_size, "val_metric": result.metric})  # best_val_dice: balanced accuracy for a classifier
