from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("register"), **COMPONENT_OPTIONS)
def register(model: Input[Model], evaluation: Input[Artifact], dataset: Input[Dataset], model_name: str, thresholds: dict, mlflow_tracking_uri: str,
             pipeline_run_id: str) -> NamedTuple("Registered", [("version", str), ("challenger", bool), ("model_name", str)]):
    """Log and register the model with its lineage and every metric its task reports; alias ``challenger`` (under the
    promotion lock) when it clears the thresholds (``{"auto": true}``: the task's own). ``model_name`` ``auto``: one
    registered model per task (``<source format>-<kind>``)."""
    from collections import namedtuple
    from pathlib import Path

    from medseg import schemas
    from medseg.registry.lineage import build_lineage
    from medseg.registry.pyfunc_model import synthetic_input_example
    from medseg.registry.registry import register_model
    from medseg.tracking import resolve_tracking_uri

    lineage = build_lineage(Path(model.path), Path(dataset.path), pipeline_run_id=pipeline_run_id)
    metrics = schemas.Metrics.load(Path(evaluation.path))
    # a retried task finds the version an interrupted attempt created and completes it (register_model is idempotent);
    # the input example is inline (no path of this pod), the dataset is the run's input
    out = register_model(Path(model.path), metrics, model_name, resolve_tracking_uri(mlflow_tracking_uri), lineage, thresholds, report_dir=Path(evaluation.path),
                         input_example=synthetic_input_example(Path(model.path)), dataset_dir=Path(dataset.path))
    return namedtuple("Registered", ["version", "challenger", "model_name"])(str(out["version"]), bool(out["challenger"]), str(out["name"]))
