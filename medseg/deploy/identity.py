"""The deploy step's own Kubernetes identity: a token of the ServiceAccount ``medseg/medseg-deployer``.

Kubeflow Pipelines runs every step of a run as one ServiceAccount (``pipeline-runner`` in standalone KFP);
kfp-kubernetes 2.17 sets no per-task account. So the Role that may get/create/patch InferenceServices in
``medseg`` is bound to ``medseg-deployer`` only (k8s/base/rbac.yaml), and the deploy step alone gets a token
of that account: the Secret ``medseg-deployer-token`` (keys ``token`` and ``ca.crt``, made with
``kubectl create token``; see k8s/README.md) mounted by the compiled pipeline on the deploy task only, at
:data:`DEFAULT_TOKEN_DIR`. Every other step keeps ``pipeline-runner``, which has no verb on InferenceServices
through this project.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

log = logging.getLogger(__name__)

#: Where the compiled pipeline mounts Secret medseg-deployer-token on the deploy task.
DEFAULT_TOKEN_DIR = "/var/run/secrets/medseg-deployer"
#: Overrides :data:`DEFAULT_TOKEN_DIR`.
TOKEN_DIR_ENV = "MEDSEG_DEPLOYER_TOKEN_DIR"
#: The API server URL (default: the in-cluster ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``).
API_SERVER_ENV = "MEDSEG_KUBE_API_SERVER"
IN_CLUSTER_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


def token_dir() -> Path:
    return Path(os.environ.get(TOKEN_DIR_ENV) or DEFAULT_TOKEN_DIR)


def api_server() -> str:
    if os.environ.get(API_SERVER_ENV):
        return os.environ[API_SERVER_ENV].rstrip("/")
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise MedsegError(f"a deployer token is mounted but the API server is unknown: not in a pod, and {API_SERVER_ENV} is not set")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def deployer_api_client(directory: str | Path | None = None) -> Any | None:
    """A ``kubernetes.client.ApiClient`` authenticated with the mounted deployer token, or ``None`` when no
    token is mounted (then the caller falls back to the pod's own account or a kubeconfig)."""
    folder = Path(directory) if directory else token_dir()
    token_file = folder / "token"
    if not token_file.is_file():
        return None
    token = token_file.read_text().strip()
    if not token:
        raise MedsegError(f"the deployer token {token_file} is empty: recreate Secret medseg-deployer-token (k8s/README.md)")
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = api_server()
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    ca = folder / "ca.crt"
    if ca.is_file():
        configuration.ssl_ca_cert = str(ca)
    elif Path(IN_CLUSTER_CA).is_file():
        configuration.ssl_ca_cert = IN_CLUSTER_CA
    log.info("Kubernetes API %s as the deployer account (token from %s)", configuration.host, token_file)
    return client.ApiClient(configuration)
