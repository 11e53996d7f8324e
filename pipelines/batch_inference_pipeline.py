"""Batch inference: segment a batch of cases (from S3 or the data PVC) with the registry's champion (or any model URI)."""

from kfp import dsl

from components.predict.component import predict
from pipelines.training_pipeline import DEFAULTS, _gpu_tolerations, _gpus, _mount_secrets, _mount_source_data

PIPELINE_NAME = "medseg-batch-inference"


@dsl.pipeline(name=PIPELINE_NAME, description="Segment every case under an s3:// prefix or a folder of the data PVC with a registered model; NIfTI "
                                              "outputs in the inputs' geometry and a volumes table, as an artefact and under output_uri.")
def batch_inference_pipeline(
    input_uri: str,
    output_uri: str = "",
    model_uri: str = "models:/brats-segmentation@champion",
    mlflow_tracking_uri: str = "",
    overlap: float = 0.5,
    mirror: bool = False,
    gpus: int = 0,
    accelerator_type: str = DEFAULTS["accelerator_type"],
):
    """Predict a batch of cases.

    Args:
        input_uri: The cases: s3://bucket/prefix, or a folder under the data PVC's mount path (params.yaml cluster.data_pvc,
            e.g. /data/cases): CASE_0000.nii.gz … or CASE/CASE-t1n.nii.gz ….
        output_uri: Where the segmentations and volumes.csv (a classifier: predictions.csv) are copied: s3://bucket/prefix or
            a folder under the data PVC's mount path; the table is written last. Empty = the run's output artefact only.
        model_uri: models:/NAME@ALIAS, models:/NAME/VERSION, or a model package folder.
        mlflow_tracking_uri: MLflow tracking server URL; empty = MLFLOW_TRACKING_URI from the medseg-mlflow Secret.
        overlap: Sliding-window overlap (0 to <1).
        mirror: Mirroring test-time augmentation (8× the compute).
        gpus: GPUs of the predict pod (inference on cuda when > 0); 0 predicts on the CPU.
        accelerator_type: Kubernetes resource name of the GPUs (nvidia.com/gpu, amd.com/gpu); empty = no GPU.
    """
    task = predict(model_uri=model_uri, input_uri=input_uri, output_uri=output_uri, overlap=overlap, mirror=mirror,
                   mlflow_tracking_uri=mlflow_tracking_uri, gpus=gpus)
    task.set_display_name("Batch predict")
    task.set_caching_options(False)  # the registry alias may point elsewhere by the next run
    _gpus(task, accelerator_type, gpus)
    _gpu_tolerations(task)
    _mount_source_data(task)  # folders on the data PVC as input and output; s3:// needs only the S3 Secret
    _mount_secrets(task, "mlflow", "mlflow_user", "s3")
