"""Server-side apply of an InferenceService with the official ``kubernetes`` client, then wait for Ready.

Server-side apply is a ``PATCH`` with content type ``application/apply-patch+yaml``, a field manager and
(here) ``force=true``: the API server merges the applied fields, records this manager as their owner
(taking over fields another manager such as ``kubectl apply`` set), and removes fields this manager
applied before and now leaves out. JSON is valid YAML, so the body is sent as JSON.

The generated ``CustomObjectsApi.patch_namespaced_custom_object`` of kubernetes-client 30 always sends
``application/merge-patch+json`` (it has no content-type argument), so the apply goes through the same
``ApiClient.call_api`` the generated methods use, with the apply content type; reads use
``CustomObjectsApi``. The ``DynamicClient`` would do the same after an API discovery round trip.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from medseg.deploy.inferenceservice import GROUP, PLURAL, VERSION, is_ready
from medseg.errors import MedsegError

log = logging.getLogger(__name__)

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
DEFAULT_FIELD_MANAGER = "medseg-deploy"


def load_api_client(kubeconfig: str | None = None, context: str | None = None, host: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``.

    ``host`` alone (tests, ``kubectl proxy``): that URL without credentials. Otherwise the in-cluster
    service account when running in a pod (the pipeline's deploy step), else ``kubeconfig`` / ``context``
    (default ``~/.kube/config`` and its current context).
    """
    from medseg.optional import needs_extra

    with needs_extra("pipelines", "deploying to Kubernetes"):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

    if host:
        configuration = client.Configuration()
        configuration.host = host.rstrip("/")
        return client.ApiClient(configuration)
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except ConfigException:
            pass
    try:
        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (ConfigException, OSError) as exc:
        raise MedsegError(f"no Kubernetes cluster configured: not in a pod, and the kubeconfig could not be loaded ({exc})") from None
    return client.ApiClient(configuration)


def _api_error(action: str, name: str, namespace: str, exc: Exception) -> MedsegError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or type(exc).__name__
    body = str(getattr(exc, "body", "") or "")[:500]
    hint = {401: "the credentials were refused", 403: "the service account may not patch/get inferenceservices in this namespace (RBAC)",
            404: "is KServe installed (the serving.kserve.io/v1beta1 API)?", 409: "a conflict with another field manager"}.get(status or 0, "")
    detail = f"HTTP {status} {reason}" if status else f"{reason}: {exc}"
    return MedsegError(f"{action} InferenceService {namespace}/{name} failed: {detail}" + (f" ({hint})" if hint else "") + (f": {body}" if body else ""))


def apply_inferenceservice(api_client: Any, body: dict[str, Any], field_manager: str = DEFAULT_FIELD_MANAGER, force: bool = True) -> dict[str, Any]:
    """Server-side apply ``body`` (an InferenceService dict with ``metadata.name`` and ``metadata.namespace``).

    Returns the object as the API server answered it.
    """
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    path = "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"
    path_params = {"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL, "name": name}
    query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
    headers = {"Accept": "application/json", "Content-Type": APPLY_CONTENT_TYPE}
    try:
        return api_client.call_api(path, "PATCH", path_params, query, headers, body=body, response_type="object",
                                   auth_settings=["BearerToken"], _return_http_data_only=True, _request_timeout=60)
    except Exception as exc:  # ApiException, urllib3 errors
        raise _api_error("applying", name, namespace, exc) from None


def get_inferenceservice(api_client: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """The InferenceService as stored, or ``None`` if it does not exist."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        return client.CustomObjectsApi(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=30)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error("reading", name, namespace, exc) from None
    except Exception as exc:  # connection errors
        raise _api_error("reading", name, namespace, exc) from None


def wait_until_ready(api_client: Any, name: str, namespace: str, timeout_s: float = 600.0, poll_s: float = 5.0) -> dict[str, Any]:
    """Poll until the InferenceService's ``Ready`` condition is ``True`` for its current generation.

    Returns the ready object. Raises :class:`MedsegError` with the last condition seen after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    last = "not read yet"
    while True:
        isvc = get_inferenceservice(api_client, name, namespace)
        ready, last = is_ready(isvc)
        if ready:
            assert isvc is not None
            return isvc
        if time.monotonic() >= deadline:
            raise MedsegError(f"InferenceService {namespace}/{name} not Ready after {timeout_s:.0f} s ({last})")
        log.info("waiting for InferenceService %s/%s: %s", namespace, name, last)
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())) or 0.01)


def apply_and_wait(api_client: Any, body: dict[str, Any], field_manager: str = DEFAULT_FIELD_MANAGER, timeout_s: float = 600.0, poll_s: float = 5.0) -> dict[str, Any]:
    """:func:`apply_inferenceservice`, then :func:`wait_until_ready`; returns the ready object."""
    applied = apply_inferenceservice(api_client, body, field_manager=field_manager)
    generation = (applied or {}).get("metadata", {}).get("generation")
    log.info("applied InferenceService %s/%s (generation %s)", body["metadata"]["namespace"], body["metadata"]["name"], generation)
    return wait_until_ready(api_client, body["metadata"]["name"], body["metadata"]["namespace"], timeout_s=timeout_s, poll_s=poll_s)
