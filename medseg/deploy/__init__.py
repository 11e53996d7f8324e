"""Deploy a registered model version: a KServe InferenceService on a cluster, or the model server on 127.0.0.1.

Modules:

- :mod:`~medseg.deploy.config`: :class:`~medseg.deploy.config.DeployConfig` from ``params.yaml`` (``deploy:``
  plus the Secrets of ``cluster.secrets``, by name only);
- :mod:`~medseg.deploy.inferenceservice`: render the ``serving.kserve.io/v1beta1`` InferenceService pinned to
  ``models:/NAME/VERSION``;
- :mod:`~medseg.deploy.apply`: server-side apply with the ``kubernetes`` client, wait for ``Ready``;
- :mod:`~medseg.deploy.identity`: the deploy step's own account (a mounted token of ``medseg/medseg-deployer``);
- :mod:`~medseg.deploy.canary`: canary share, Prometheus checks, full promotion or registry rollback;
- :mod:`~medseg.deploy.local`: the local target;
- :mod:`~medseg.deploy.rollout`: :func:`~medseg.deploy.rollout.deploy`, which picks among them.

``medseg deploy`` is :func:`add_arguments` / :func:`run`. Heavy imports (kubernetes, mlflow, kserve) happen
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medseg import schemas
from medseg.errors import MedsegError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg deploy``."""
    parser.add_argument("--model", default=None, help="registered model name (default: registry.model_name of --params)")
    parser.add_argument("--version", default="champion", help="version number, or an alias resolved now and pinned (default: champion)")
    parser.add_argument("--target", choices=["kserve", "local"], default=None, help="kserve (the cluster of the kubeconfig / service account) or local (127.0.0.1); default: deploy.target of --params")
    parser.add_argument("--params", type=Path, default=Path(schemas.PARAMS_YAML), help="parameter file with the deploy: and cluster: sections (default: params.yaml)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///WORK/mlflow.db)")
    parser.add_argument("--namespace", default=None, help="Kubernetes namespace (default: deploy.namespace)")
    parser.add_argument("--image", default=None, help="predictor image (default: <MEDSEG_IMAGE_REGISTRY>/medseg-serve:<MEDSEG_IMAGE_TAG>, as the pipeline compiles it)")
    parser.add_argument("--canary", action=argparse.BooleanOptionalAction, default=None, help="canary rollout with Prometheus checks (default: deploy.canary)")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, else ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--dry-run", action="store_true", help="print the InferenceService that would be applied and stop")
    parser.add_argument("--keep-running", action="store_true", help="local target: keep the server running until interrupted")


def default_image() -> str:
    """The serve image the compiled pipeline uses (``components/image.py``), when the project folder is at hand."""
    from medseg.pipeline.runner import PROJECT_ROOT

    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    try:
        from components.image import image
    except ImportError:
        raise MedsegError("no predictor image: pass --image (components/image.py is not available here)") from None
    return image("serve")


def run(args: argparse.Namespace) -> int:
    """``medseg deploy``: prints the InferenceService (``--dry-run``) or the deployment summary as JSON."""
    from medseg.deploy.config import DeployConfig
    from medseg.pipeline.runner import load_params, work_paths

    params = load_params(args.params) if Path(args.params).is_file() else {}
    overrides = {k: v for k, v in {"target": args.target, "namespace": args.namespace, "canary": args.canary}.items() if v is not None}
    config = DeployConfig.from_params(params, **overrides)
    if args.image:
        config.image = args.image
    elif not config.image and (config.target == "kserve" or args.dry_run):
        config.image = default_image()
    model = args.model or (params.get("registry") or {}).get("model_name")
    if not model:
        raise MedsegError("no model name: pass --model or set registry.model_name in the parameter file")
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work_paths(params)['mlflow_db']}"
    from medseg.deploy.rollout import deploy, resolve_version

    if args.dry_run:
        from medseg.deploy.inferenceservice import render_inferenceservice

        print(json.dumps(render_inferenceservice(model, resolve_version(model, args.version, tracking), config), indent=2))
        return 0
    api = None
    if config.target == "kserve":
        from medseg.deploy.apply import load_api_client

        api = load_api_client(args.kubeconfig, args.context)
    result = deploy(model, args.version, config, tracking_uri=tracking, api_client=api, keep_running=args.keep_running)
    local = result.pop("_deployment", None)
    print(json.dumps(result, indent=2, default=str), flush=True)
    if local is not None:
        print(f"serving {model} v{result['version']} at {result['endpoint']} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        try:
            local.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            local.stop()
    return 0 if result.get("decision") != "rolled back" else 1
