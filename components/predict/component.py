from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("predict"), **COMPONENT_OPTIONS)
def predict(model_uri: str, input_uri: str, overlap: float, mirror: bool, mlflow_tracking_uri: str, predictions: Output[Dataset], gpus: int = 0,
            output_uri: str = ""):
    """Segment every case under ``input_uri`` (``s3://bucket/prefix`` or a folder, e.g. on the data PVC) with a registered
    (models:/NAME@ALIAS) or packaged model into the ``predictions`` artefact, and copy it to ``output_uri`` (``s3://`` or
    a folder; "" = the artefact only). ``gpus`` (the pod's GPU limit) > 0: inference on CUDA (device ``cuda``); 0: the CPU."""
    import os
    from pathlib import Path

    from medseg.inference.batch import predict_batch
    from medseg.pipeline.gpu import step_device
    from medseg.tracking import resolve_tracking_uri

    device = step_device(int(gpus))
    if model_uri.startswith("models:/"):
        os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(mlflow_tracking_uri)
    rows = predict_batch(model_uri, input_uri, Path(predictions.path), overlap=overlap, mirror=mirror, device=device, progress=False, publish_to=output_uri)
    predictions.metadata.update({"device": device, "n_cases": len(rows), "model_version": rows[0]["model_version"] if rows else "",
                                 "input_uri": input_uri, "output_uri": output_uri})
