"""Render the KServe ``InferenceService`` (``serving.kserve.io/v1beta1``) that serves one registered version.

The object mirrors ``k8s/base/inferenceservice.yaml`` (Serverless mode, Prometheus scraping, the
``medseg-predictor`` pod label the PodMonitor and NetworkPolicies select, one custom predictor container
``kserve-container`` running ``medseg serve`` on port 8080, the MLflow URL from a Secret, probes, a
read-only root with ``/tmp`` as an emptyDir, a restricted security context). What the rollout sets:

- the model URI pinned, ``models:/NAME/VERSION`` (env ``MODEL_URI``, expanded into the container
  arguments by Kubernetes), so moving an alias in the registry never changes a running deployment behind
  its back; the version is also a label and an annotation for ``kubectl`` and PromQL;
- replicas, resources and, optionally, GPUs (``--device cuda``) with node selector and tolerations;
- ``canaryTrafficPercent``: N during a canary rollout, 100 otherwise (all traffic to the latest ready
  revision; stating 100 explicitly also overrides a canary share another field manager left behind).

Secrets appear by name and key only (``valueFrom.secretKeyRef``); nothing here reads a secret's value.
"""

from __future__ import annotations

import re
from typing import Any

from medseg.deploy.config import DeployConfig, resource_name
from medseg.errors import MedsegError

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER_NAME = "kserve-container"
MODEL_URI_ENV = "MODEL_URI"
DEVICE_ENV = "MEDSEG_DEVICE"
#: Pod label of every predictor pod: the PodMonitor and the NetworkPolicies of k8s/base select it.
POD_LABELS = {"app.kubernetes.io/name": "medseg-predictor"}
FULL_TRAFFIC = 100
VERSION_LABEL = "medseg.io/model-version"
MODEL_LABEL = "medseg.io/model"
MODEL_URI_ANNOTATION = "medseg.io/model-uri"
PROMETHEUS_ANNOTATION = "serving.kserve.io/enable-prometheus-scraping"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def model_uri(model_name: str, version: str) -> str:
    """``models:/NAME/VERSION`` for a version number; refuses an alias (a deployment is always pinned)."""
    version = str(version).strip()
    if not version.isdigit():
        raise MedsegError(f"an InferenceService is pinned to a version number, got {version!r} for {model_name!r} (resolve the alias first)")
    return f"models:/{model_name}/{version}"


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    if not _LABEL_VALUE.match(value):
        raise MedsegError(f"cannot use {text!r} as a Kubernetes label value")
    return value


def _resources(config: DeployConfig) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in config.resources.items():
        resource, kind = key.rsplit("_", 1)
        out.setdefault("requests" if kind == "request" else "limits", {})[resource.replace("_", "-")] = str(value)
    if config.gpu > 0:  # extended resources: request and limit must be equal
        for kind in ("requests", "limits"):
            out.setdefault(kind, {})[config.gpu_resource] = str(config.gpu)
    return out


def render_inferenceservice(model_name: str, version: str, config: DeployConfig, canary_traffic_percent: int | None = FULL_TRAFFIC,
                            name: str | None = None) -> dict[str, Any]:
    """The InferenceService serving ``models:/model_name/version``, as a dict ready for server-side apply.

    Args:
        model_name: Registered model name (also the model's name on the V2 endpoint:
            ``/v2/models/<model_name>/infer``).
        version: Registered version number (an alias must be resolved by the caller: see
            :func:`medseg.deploy.rollout.resolve_version`).
        config: Namespace, image, replicas, resources, GPU, Secrets, port.
        canary_traffic_percent: Share of the traffic for this revision: 1-99 during a canary rollout,
            100 (default) for all of it; ``None`` leaves the field out.
        name: InferenceService name (default: derived from ``model_name``).

    Raises:
        MedsegError: no image configured, an alias instead of a version, a traffic share outside 1-100.
    """
    if not config.image:
        raise MedsegError("no predictor image configured (deploy config 'image', e.g. ghcr.io/medseg-ops/medseg-serve:<tag>)")
    uri = model_uri(model_name, version)
    name = name or resource_name(model_name)
    port = int(config.port)
    env: list[dict[str, Any]] = [{"name": MODEL_URI_ENV, "value": uri}, {"name": DEVICE_ENV, "value": "cuda" if config.gpu > 0 else "cpu"}]
    for env_name, (secret, key) in sorted(config.secret_env.items()):
        env.append({"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    env.append({"name": "HOME", "value": "/tmp"})  # the root file system is read-only
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": config.image,
        # $(VAR) is expanded by Kubernetes from the container's env: the pinned URI is stated once
        "args": ["serve", "--model", f"$({MODEL_URI_ENV})", "--name", model_name, "--host", "0.0.0.0", "--port", str(port), "--device", f"$({DEVICE_ENV})"],
        "env": env,
        "ports": [{"name": "http1", "containerPort": port, "protocol": "TCP"}],
        # the server listens only once the model is downloaded and loaded: readiness gates traffic, and
        # liveness starts late enough for a slow artefact download
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": port}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": port}, "initialDelaySeconds": int(config.liveness_delay_s), "periodSeconds": 20,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        # no runAsGroup: Knative rejects it on the user container
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    resources = _resources(config)
    if resources:
        container["resources"] = resources
    predictor: dict[str, Any] = {"labels": dict(POD_LABELS), "minReplicas": int(config.min_replicas), "maxReplicas": int(config.max_replicas),
                                 "scaleMetric": config.scale_metric, "scaleTarget": int(config.scale_target), "timeout": int(config.request_timeout_s),
                                 "containers": [container], "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": config.tmp_size}}]}
    if config.service_account:
        predictor["serviceAccountName"] = config.service_account
    if config.node_selector:
        predictor["nodeSelector"] = {str(k): str(v) for k, v in config.node_selector.items()}
    if config.gpu > 0 and config.tolerations:
        predictor["tolerations"] = [dict(t) for t in config.tolerations]
    if canary_traffic_percent is not None:
        percent = int(canary_traffic_percent)
        if not 1 <= percent <= FULL_TRAFFIC:
            raise MedsegError(f"canaryTrafficPercent must be between 1 and 100, got {percent}")
        predictor["canaryTrafficPercent"] = percent
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": config.namespace,
            "labels": {"app.kubernetes.io/part-of": "medseg-ops", MODEL_LABEL: _label_value(model_name), VERSION_LABEL: _label_value(str(version))},
            # canary rollouts need Serverless (Knative revisions)
            "annotations": {"serving.kserve.io/deploymentMode": "Serverless", PROMETHEUS_ANNOTATION: "true", MODEL_URI_ANNOTATION: uri},
        },
        "spec": {"predictor": predictor},
    }


def deployed_version(isvc: dict[str, Any] | None) -> str | None:
    """The registered version an InferenceService (as read from the API) serves: from the pinned
    ``MODEL_URI`` of its predictor container, else the version label; ``None`` if neither."""
    if not isvc:
        return None
    containers = (((isvc.get("spec") or {}).get("predictor") or {}).get("containers")) or []
    for container in containers:
        for env in container.get("env") or []:
            if env.get("name") == MODEL_URI_ENV and isinstance(env.get("value"), str):
                match = re.match(r"^models:/[^/@]+/(\d+)$", env["value"])
                if match:
                    return match.group(1)
    label = ((isvc.get("metadata") or {}).get("labels") or {}).get(VERSION_LABEL)
    return str(label) if label else None


def is_ready(isvc: dict[str, Any] | None) -> tuple[bool, str]:
    """``(ready, reason)``: the ``Ready`` condition is ``True`` for the current generation."""
    if not isvc:
        return False, "not found"
    status = isvc.get("status") or {}
    generation = (isvc.get("metadata") or {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and int(observed) < int(generation):
        return False, f"status is for generation {observed}, the spec is at {generation}"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            if str(cond.get("status")) == "True":
                return True, "Ready"
            return False, f"Ready={cond.get('status')}: {cond.get('reason') or ''} {cond.get('message') or ''}".strip()
    return False, "no Ready condition yet"
