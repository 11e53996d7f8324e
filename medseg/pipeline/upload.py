"""Put a compiled pipeline on a Kubeflow Pipelines server: a new pipeline, or a new version of it, and
optionally a run in an experiment. Uses ``kfp.Client`` (REST API v2beta1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import MedsegError
from medseg.pipeline.runner import compile_pipeline


def upload(host: str, which: str = "training", package: Path | None = None, run: bool = False, experiment: str = "medseg", arguments: dict[str, Any] | None = None, client: Any = None) -> dict[str, Any]:
    """Upload ``package`` (default: compile ``which`` now) as pipeline ``<name>`` version ``<file stem>``.

    Returns {pipeline_id, version_id, version_name, created (bool), run_id?, experiment_id?}.
    """
    from medseg.optional import needs_extra

    with needs_extra("pipelines", "uploading a pipeline"):
        import kfp
        import urllib3
        from kfp_server_api.exceptions import ApiException

    package = Path(package) if package else compile_pipeline(which=which)
    if not package.is_file():
        raise MedsegError("compiled pipeline not found", package)
    try:
        name = next(yaml.safe_load_all(package.read_text()))["pipelineInfo"]["name"]
    except (yaml.YAMLError, KeyError, TypeError, StopIteration):
        raise MedsegError("not a compiled KFP pipeline (no pipelineInfo.name)", package) from None
    version_name = package.stem
    try:
        client = client or kfp.Client(host=host)
        pipeline_id = client.get_pipeline_id(name)
        created = pipeline_id is None
        if created:
            pipeline = client.upload_pipeline(str(package), pipeline_name=name, description=f"medseg-ops {which} pipeline")
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(pipeline_id).pipeline_versions or []
            version_id = versions[0].pipeline_version_id if versions else None
        else:
            version = client.upload_pipeline_version(str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id)
            version_id = version.pipeline_version_id
        result: dict[str, Any] = {"pipeline": name, "pipeline_id": pipeline_id, "version_id": version_id, "version_name": version_name, "created": created}
        if run:
            exp = client.create_experiment(experiment)
            job = client.run_pipeline(exp.experiment_id, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", pipeline_id=pipeline_id, version_id=version_id, params=arguments or {})
            result.update({"experiment_id": exp.experiment_id, "run_id": job.run_id})
    except ApiException as exc:
        raise MedsegError(f"Kubeflow Pipelines API answered {exc.status} {exc.reason}: {(exc.body or '')[:300]}", host) from None
    except (OSError, ValueError, urllib3.exceptions.HTTPError) as exc:
        raise MedsegError(f"cannot reach Kubeflow Pipelines ({exc})", host) from None
    return result
