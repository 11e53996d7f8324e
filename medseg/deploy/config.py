"""Deployment settings: the ``deploy:`` section of ``params.yaml`` plus the Secrets of ``cluster.secrets``.

Everything a rollout needs besides the model name and version lives in :class:`DeployConfig`, so the
pipeline's deploy step, ``medseg deploy`` and the tests build the same InferenceService from the same
values. Secrets are referenced by name and key only: no credential ever passes through here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from medseg.errors import MedsegError

TARGETS = ("local", "kserve")
#: ``cluster.secrets`` entries the predictor gets: the registry URL and its own MLflow account (READ only;
#: the MLflow server proxies the artefacts, ``--serve-artifacts`` in k8s/base/mlflow.yaml, so no object-store
#: credentials in the pod). Set ``deploy.secret_env`` to give it more.
PREDICTOR_SECRETS = ("mlflow", "predictor_mlflow_user")
#: Without ``cluster.secrets``: the Secrets of k8s/base/inferenceservice.yaml.
DEFAULT_PREDICTOR_SECRET_ENV = {"MLFLOW_TRACKING_URI": ("medseg-mlflow", "tracking_uri"),
                                "MLFLOW_TRACKING_USERNAME": ("medseg-mlflow-predictor", "username"),
                                "MLFLOW_TRACKING_PASSWORD": ("medseg-mlflow-predictor", "password")}
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclasses.dataclass
class DeployConfig:
    """How to deploy a registered model.

    Args:
        target: ``kserve`` (server-side apply an InferenceService on the cluster of the current
            kubeconfig or service account) or ``local`` (the model server on 127.0.0.1).
        namespace: Kubernetes namespace of the InferenceService.
        image: Predictor image (``<registry>/medseg-serve:<tag>``); the pipeline passes the one it was
            compiled with.
        service_account: Service account of the predictor pods (``None``: the namespace default).
        min_replicas: Minimum predictor replicas (0 lets KServe scale to zero in serverless mode).
        max_replicas: Maximum predictor replicas.
        resources: ``<resource>_request`` / ``<resource>_limit`` of the predictor container (``cpu``,
            ``memory``, ``ephemeral_storage``: underscores become hyphens).
        gpu: GPUs per predictor pod (0: CPU only); ``gpu_resource`` names the extended resource. With a
            GPU the server runs with ``--device cuda``.
        scale_metric: KServe autoscaling metric (``concurrency``: in-flight requests per replica).
        scale_target: Target of ``scale_metric`` per replica (1: one 3D volume at a time).
        request_timeout_s: Per-request timeout of the predictor (sliding-window inference takes minutes on CPU).
        liveness_delay_s: Seconds before the first liveness probe (the port opens once the model is loaded).
        tmp_size: Size limit of the ``/tmp`` emptyDir the model package is downloaded to (read-only root).
        node_selector: Node labels the predictor pods must match (GPU node pools, usually).
        tolerations: Tolerations of the predictor pods (only rendered when ``gpu`` > 0).
        secret_env: Environment variable → ``(secret name, key)`` for the predictor container.
        port: Container port of the model server.
        ready_timeout_s: How long to wait for the InferenceService (or local server) to become Ready.
        field_manager: Server-side apply field manager.
        canary: Roll out a new version to ``canary_traffic_percent`` of the traffic first and promote it
            only if its error rate and p99 latency stay within bounds for ``canary_window_s``.
        canary_traffic_percent: Share of the traffic the canary receives (1-99).
        canary_window_s: Observation window of the canary.
        canary_interval_s: Seconds between two Prometheus checks within the window.
        max_error_rate: Highest acceptable share of 5xx answers of the canary.
        max_p99_latency_s: Highest acceptable p99 of the predictor time (``medseg_inference_seconds``).
        require_traffic: With no request to the canary during the window, roll back (``True``) or
            promote (``False``): no traffic proves nothing either way.
        prometheus_url: Prometheus HTTP API base URL the canary checks query.
    """

    target: str = "kserve"
    namespace: str = "medseg"
    image: str = ""
    service_account: str | None = "medseg-predictor"
    min_replicas: int = 1
    max_replicas: int = 3
    resources: dict[str, str] = dataclasses.field(default_factory=lambda: {"cpu_request": "2", "cpu_limit": "4", "memory_request": "4Gi", "memory_limit": "8Gi",
                                                                           "ephemeral_storage_request": "1Gi", "ephemeral_storage_limit": "4Gi"})
    gpu: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    scale_metric: str = "concurrency"
    scale_target: int = 1
    request_timeout_s: int = 600
    liveness_delay_s: int = 180
    tmp_size: str = "2Gi"
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    secret_env: dict[str, tuple[str, str]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PREDICTOR_SECRET_ENV))
    port: int = 8080
    ready_timeout_s: float = 600.0
    field_manager: str = "medseg-deploy"
    canary: bool = False
    canary_traffic_percent: int = 10
    canary_window_s: float = 600.0
    canary_interval_s: float = 30.0
    max_error_rate: float = 0.01
    max_p99_latency_s: float = 30.0
    require_traffic: bool = True
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MedsegError` naming the first setting out of range."""
        if self.target not in TARGETS:
            raise MedsegError(f"deploy target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not _DNS_1035.match(self.namespace or ""):
            raise MedsegError(f"deploy namespace {self.namespace!r} is not a valid Kubernetes namespace name")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise MedsegError(f"deploy replicas: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {self.min_replicas}..{self.max_replicas}")
        for key in self.resources:
            if not key.endswith(("_request", "_limit")):
                raise MedsegError(f"deploy resources: {key!r} is not <resource>_request or <resource>_limit")
        if self.gpu < 0:
            raise MedsegError(f"deploy gpu must be >= 0, got {self.gpu}")
        if not 1 <= int(self.canary_traffic_percent) <= 99:
            raise MedsegError(f"canary_traffic_percent must be between 1 and 99, got {self.canary_traffic_percent}")
        if self.canary_interval_s <= 0 or self.canary_window_s < 0:
            raise MedsegError("canary_interval_s must be > 0 and canary_window_s >= 0")
        if not 0.0 <= self.max_error_rate <= 1.0 or self.max_p99_latency_s <= 0:
            raise MedsegError("max_error_rate must be in [0, 1] and max_p99_latency_s > 0")
        for env, ref in self.secret_env.items():
            if len(ref) != 2 or not all(isinstance(x, str) and x for x in ref):
                raise MedsegError(f"secret_env[{env!r}] must be (secret name, key), got {ref!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DeployConfig:
        """From a flat mapping of the field names (the pipeline's ``deploy_config`` parameter); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedsegError(f"unknown deploy setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        kwargs = dict(values)
        if "secret_env" in kwargs:
            kwargs["secret_env"] = {str(k): (str(v[0]), str(v[1])) for k, v in dict(kwargs["secret_env"]).items()}
        for key in ("min_replicas", "max_replicas", "gpu", "port", "canary_traffic_percent", "scale_target", "request_timeout_s", "liveness_delay_s"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        for key in ("ready_timeout_s", "canary_window_s", "canary_interval_s", "max_error_rate", "max_p99_latency_s"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        if "resources" in kwargs:
            kwargs["resources"] = {str(k): str(v) for k, v in dict(kwargs["resources"] or {}).items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, the inverse of :meth:`from_dict` (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["secret_env"] = {k: list(v) for k, v in self.secret_env.items()}
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> DeployConfig:
        """``params.yaml`` → config: the ``deploy:`` section, the predictor's Secrets from ``cluster.secrets``
        (:data:`PREDICTOR_SECRETS`, by name and key) and the cluster tolerations for GPU predictors."""
        return cls.from_dict({**config_values(params), **overrides})


def config_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """The flat ``deploy_config`` mapping of ``params.yaml`` (what the pipeline passes to its deploy step)."""
    section = dict(params.get("deploy") or {})
    cluster = params.get("cluster") or {}
    section.setdefault("secret_env", secret_env_from_cluster(cluster.get("secrets") or {}))
    if "tolerations" not in section and cluster.get("tolerations"):
        section["tolerations"] = [dict(t) for t in cluster["tolerations"]]
    return section


def secret_env_from_cluster(secrets: Mapping[str, Any], which: tuple[str, ...] = PREDICTOR_SECRETS) -> dict[str, list[str]]:
    """``cluster.secrets`` (``{alias: {name, keys: {key: ENV}}}``) → ``{ENV: [secret name, key]}`` for ``which``."""
    out: dict[str, list[str]] = {}
    for alias in which:
        entry = secrets.get(alias)
        if not entry:
            continue
        for key, env in dict(entry.get("keys") or {}).items():
            out[str(env)] = [str(entry["name"]), str(key)]
    return out


def resource_name(model_name: str) -> str:
    """The InferenceService name for a registered model: lower case, ``[a-z0-9-]``, at most 45 characters
    (KServe derives longer service names from it), starting with a letter."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")[:45].rstrip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    if not _DNS_1035.match(name):
        raise MedsegError(f"cannot derive an InferenceService name from the model name {model_name!r}")
    return name
