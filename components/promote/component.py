from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("promote"), **COMPONENT_OPTIONS)
def promote(model_name: str, version: str, evaluation: Input[Artifact], margin: float, gate_metric: str, mlflow_tracking_uri: str,
            decision: Output[Artifact]) -> NamedTuple("Promotion", [("promoted", bool), ("champion_version", str)]):
    """Gate the challenger against the champion on the same test cases, on the task's metric (``gate_metric`` ``auto``:
    the task's primary metric; per-case Dice/IoU per group for segmentation, per-subject log-loss for a classifier,
    ``auc_macro`` for the AUC gate); move ``champion`` if it passes. A refusal is recorded with its reason."""
    from collections import namedtuple
    from pathlib import Path

    from medseg import schemas
    from medseg.io import write_json
    from medseg.registry.registry import promote as run_promote
    from medseg.tracking import resolve_tracking_uri

    metrics = schemas.Metrics.load(Path(evaluation.path))
    out = run_promote(model_name, version, resolve_tracking_uri(mlflow_tracking_uri), metrics.per_case, margin=margin, gate_metric=gate_metric)
    write_json(decision.path, out)
    decision.metadata.update({"promoted": bool(out["promoted"]), "reason": str(out["reason"])})
    return namedtuple("Promotion", ["promoted", "champion_version"])(bool(out["promoted"]), str(out.get("champion_version") or ""))
