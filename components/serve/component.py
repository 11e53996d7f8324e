from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import COMPONENT_OPTIONS, image


# the predict image: the serve-torch extra plus KFP's executor (the predictor image medseg-serve leaves kfp and torch out)
@dsl.component(base_image=image("predict"), **COMPONENT_OPTIONS)
def serve(model_name: str, alias: str, dataset: Input[Dataset], mlflow_tracking_uri: str, result: Output[Artifact]) -> NamedTuple("Served", [("endpoint_ok", bool), ("model_version", str)]):
    """Start the KServe model server on 127.0.0.1 with ``models:/NAME@ALIAS``, send one held-out case over
    the V2 protocol, write the returned segmentation (NIfTI + PNG overlay) and stop the server.

    On a cluster the same model URI is what the InferenceService loads.
    """
    from collections import namedtuple
    from pathlib import Path

    from medseg.io import write_json
    from medseg.registry.registry import show_model
    from medseg.serving.smoke import smoke_test
    from medseg.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(mlflow_tracking_uri)
    if alias not in show_model(model_name, tracking_uri)["aliases"]:
        out = {"endpoint_ok": False, "model_version": "", "reason": f"no version of {model_name} has the alias {alias!r}: nothing to serve"}
        Path(result.path).mkdir(parents=True, exist_ok=True)
        write_json(Path(result.path) / "smoke.json", out)
    else:
        out = smoke_test(f"models:/{model_name}@{alias}", model_name, Path(dataset.path), Path(result.path), tracking_uri=tracking_uri)
    result.metadata.update(out)
    return namedtuple("Served", ["endpoint_ok", "model_version"])(bool(out["endpoint_ok"]), str(out["model_version"]))
