"""Deploy one registered version: on a cluster as a KServe InferenceService (optionally as a canary), or
locally on 127.0.0.1. What the pipeline's deploy step and ``medseg deploy`` call."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from medseg.deploy.config import DeployConfig, resource_name
from medseg.errors import MedsegError

log = logging.getLogger(__name__)


def resolve_version(model_name: str, version_or_alias: str, tracking_uri: str | None) -> str:
    """A version number as given, or the version an alias (``champion``, ...) points at now.

    Raises :class:`MedsegError` when the alias is not set or the registry cannot be reached.
    """
    value = str(version_or_alias).strip()
    if value.isdigit():
        return value
    if not tracking_uri:
        raise MedsegError(f"resolving the alias {value!r} of {model_name!r} needs an MLflow tracking URI")
    from medseg.registry.registry import show_model

    aliases = show_model(model_name, tracking_uri)["aliases"]
    if value not in aliases:
        known = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "none"
        raise MedsegError(f"registered model {model_name!r} has no alias {value!r} (aliases: {known})")
    return str(aliases[value])


def deploy(model_name: str, version_or_alias: str, config: DeployConfig, tracking_uri: str | None = None, api_client: Any = None,
           log_file: str | Path | None = None, keep_running: bool = False, poll_s: float = 5.0) -> dict[str, Any]:
    """Deploy ``model_name`` at a version (or the version an alias points at now) to ``config.target``.

    ``kserve``: read the live InferenceService; if it serves another version and ``config.canary`` is
    set, run :func:`medseg.deploy.canary.canary_rollout`; otherwise server-side apply the pinned
    InferenceService and wait until it is Ready. ``local``: :func:`medseg.deploy.local.deploy_local`.

    Returns a JSON-able summary with ``decision`` (``created``, ``updated``, ``unchanged``, ``promoted``,
    ``rolled back`` or ``served locally``) and ``served_version``.
    """
    t0 = time.perf_counter()
    version = resolve_version(model_name, version_or_alias, tracking_uri)
    base = {"target": config.target, "model_name": model_name, "requested": str(version_or_alias), "version": version}
    if config.target == "local":
        from medseg.deploy.local import deploy_local

        local = deploy_local(model_name, version, tracking_uri=tracking_uri, timeout_s=config.ready_timeout_s, log_file=log_file, keep_running=keep_running)
        result = {**base, **local.to_dict(), "decision": "served locally"}
        if keep_running:
            result["_deployment"] = local  # the CLI waits on it; not JSON
        return {**result, "seconds": round(time.perf_counter() - t0, 2)}

    from medseg.deploy.apply import apply_and_wait, get_inferenceservice, load_api_client
    from medseg.deploy.inferenceservice import deployed_version, model_uri, render_inferenceservice

    from medseg.deploy.identity import deployer_api_client

    api = api_client or deployer_api_client() or load_api_client()   # the deploy step: its own account's token
    name = resource_name(model_name)
    live = get_inferenceservice(api, name, config.namespace)
    previous = deployed_version(live)
    base.update({"name": name, "namespace": config.namespace, "model_uri": model_uri(model_name, version), "previous_version": previous})
    if config.canary and previous is not None and previous != version:
        from medseg.deploy.canary import canary_rollout

        log.info("%s/%s serves v%s: canary rollout of v%s", config.namespace, name, previous, version)
        out = canary_rollout(api, model_name, version, previous, config, tracking_uri, name=name, poll_s=poll_s)
        return {**base, **out, "seconds": round(time.perf_counter() - t0, 2)}
    if live is None:
        decision, reason = "created", "no InferenceService yet" + (": the first version takes all traffic, no canary" if config.canary else "")
    elif previous is None:
        decision, reason = "updated", "the live InferenceService serves no pinned version (e.g. an alias): replaced without canary"
    elif previous == version:
        decision, reason = "unchanged", f"v{version} is already deployed (applied again: other settings may have changed)"
    else:
        decision, reason = "updated", f"v{previous} replaced by v{version} (canary off)"
    log.info("%s/%s: %s (%s)", config.namespace, name, decision, reason)
    ready = apply_and_wait(api, render_inferenceservice(model_name, version, config, name=name), config.field_manager,
                           timeout_s=config.ready_timeout_s, poll_s=poll_s)
    url = (ready.get("status") or {}).get("url")
    return {**base, "decision": decision, "reason": reason, "served_version": version, "url": url, "seconds": round(time.perf_counter() - t0, 2)}
