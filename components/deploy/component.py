from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("deploy"), **COMPONENT_OPTIONS)
def deploy(model_name: str, champion_version: str, target: str, config: dict, serve_image: str, mlflow_tracking_uri: str,
           deployment: Output[Artifact]) -> NamedTuple("Deployed", [("decision", str), ("served_version", str)]):
    """Deploy the champion pinned as ``models:/NAME/VERSION``: ``kserve`` server-side applies the
    InferenceService (canary + Prometheus checks + rollback when ``config["canary"]``), ``local`` starts
    the model server on 127.0.0.1 and checks it is ready with that version. Writes ``deployment.json``.
    """
    from collections import namedtuple
    from pathlib import Path

    from medseg.deploy.config import DeployConfig
    from medseg.deploy.rollout import deploy as run_deploy
    from medseg.io import write_json
    from medseg.tracking import resolve_tracking_uri

    out_dir = Path(deployment.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not champion_version:  # the gate refused a first model: there is no champion to deploy
        out = {"decision": "nothing to deploy", "served_version": "", "reason": f"{model_name} has no champion"}
    else:
        cfg = DeployConfig.from_dict({**config, "target": target, "image": serve_image})
        out = run_deploy(model_name, champion_version, cfg, tracking_uri=resolve_tracking_uri(mlflow_tracking_uri), log_file=out_dir / "server.log")
    write_json(out_dir / "deployment.json", out)
    deployment.metadata.update({k: out[k] for k in ("decision", "served_version", "target", "endpoint", "url", "name", "namespace") if out.get(k) is not None})
    return namedtuple("Deployed", ["decision", "served_version"])(str(out["decision"]), str(out.get("served_version") or ""))
