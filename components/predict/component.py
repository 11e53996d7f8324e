from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("predict"), **COMPONENT_OPTIONS)
def predict(model_uri: str, input_dir: str, overlap: float, mirror: bool, mlflow_tracking_uri: str, predictions: Output[Dataset]):
    """Segment every case in a folder with a registered (models:/NAME@ALIAS) or packaged model."""
    import os
    from pathlib import Path

    from medseg.inference.batch import predict_folder
    from medseg.tracking import resolve_tracking_uri

    if model_uri.startswith("models:/"):
        os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(mlflow_tracking_uri)
    rows = predict_folder(model_uri, Path(input_dir), Path(predictions.path), overlap=overlap, mirror=mirror, progress=False)
    predictions.metadata.update({"n_cases": len(rows), "model_version": rows[0]["model_version"] if rows else ""})
