"""Canary rollout of a new registered version: a share of the traffic first, Prometheus decides the rest.

1. Apply the InferenceService pinned to the new version with ``canaryTrafficPercent = N``: KServe
   (serverless mode) sends N % of the requests to the new revision, the rest to the last rolled-out one.
2. Every ``canary_interval_s`` for ``canary_window_s``, read from the Prometheus HTTP API
   (``/api/v1/query``) the canary's request count, 5xx count and p99 predictor latency. The model server
   exports ``medseg_requests_total{model,status}``, ``medseg_inference_seconds`` (histogram, by model)
   and ``medseg_model_info{model,version}`` (:mod:`medseg.serving.metrics`); the canary's series are
   selected by joining on the scrape target (``instance``) with the info series of the new version, so
   the stable revision's traffic never counts.
3. Within bounds for the whole window: promote, i.e. apply again with ``canaryTrafficPercent: 100``
   (all traffic to the new revision, which becomes the last rolled-out one).
   Out of bounds (or never Ready): roll back, i.e. :func:`medseg.registry.registry.rollback` moves
   ``champion`` back to ``previous-champion``, and the InferenceService pinned to the previous version
   is applied again (a new revision with the previous model, 100 % of the traffic).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from medseg.deploy.apply import apply_and_wait
from medseg.deploy.config import DeployConfig
from medseg.deploy.inferenceservice import render_inferenceservice
from medseg.errors import MedsegError

log = logging.getLogger(__name__)

#: Scrape-target label(s) shared by a pod's series: joins the request metrics with the version's info series.
JOIN_LABELS = ("instance",)


# --------------------------------------------------------------------------- Prometheus
def prometheus_query(base_url: str, query: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """An instant query; the ``result`` list of a ``vector`` answer (``[]`` when nothing matches).

    Raises :class:`MedsegError` when Prometheus is unreachable, refuses the query, or answers another type.
    """
    import httpx

    url = base_url.rstrip("/") + "/api/v1/query"
    try:
        response = httpx.get(url, params={"query": query}, timeout=timeout_s)
        payload = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise MedsegError(f"Prometheus query failed ({type(exc).__name__}: {exc})", url) from None
    if response.status_code != 200 or payload.get("status") != "success":
        raise MedsegError(f"Prometheus refused the query (HTTP {response.status_code}: {payload.get('errorType', '')} {payload.get('error', '')})".rstrip(), url)
    data = payload.get("data") or {}
    if data.get("resultType") != "vector":
        raise MedsegError(f"expected a vector from Prometheus, got {data.get('resultType')!r}", url)
    return list(data.get("result") or [])


def vector_value(result: list[dict[str, Any]]) -> float | None:
    """The value of a one-sample vector (the queries here aggregate with ``sum``); ``None`` if empty or NaN."""
    if not result:
        return None
    try:
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise MedsegError(f"unexpected Prometheus sample {result[0]!r}") from None
    return None if math.isnan(value) or math.isinf(value) else value


def canary_queries(model_name: str, version: str, range_s: float, join_labels: tuple[str, ...] = JOIN_LABELS) -> dict[str, str]:
    """PromQL for the canary of ``model_name`` at ``version`` over the last ``range_s`` seconds:
    ``requests`` and ``errors`` (5xx) as counts, ``p99_s`` as the 0.99 quantile of the predictor time."""
    model = _escape(model_name)
    info = f'medseg_model_info{{model="{model}",version="{_escape(str(version))}"}}'
    join = f" * on({', '.join(join_labels)}) group_left() {info}"
    window = f"{max(60, int(math.ceil(range_s)))}s"  # at least a few scrapes
    return {
        "requests": f'sum(increase(medseg_requests_total{{model="{model}"}}[{window}]){join})',
        "errors": f'sum(increase(medseg_requests_total{{model="{model}",status="5xx"}}[{window}]){join})',
        "p99_s": f'histogram_quantile(0.99, sum by (le) (rate(medseg_inference_seconds_bucket{{model="{model}"}}[{window}]){join}))',
    }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclasses.dataclass
class CanaryReading:
    """One check of the canary: counts over the query range, the p99 and whether it is within bounds."""

    elapsed_s: float
    requests: float | None = None
    errors: float | None = None
    p99_s: float | None = None
    error: str | None = None

    @property
    def error_rate(self) -> float | None:
        if not self.requests:
            return None
        return (self.errors or 0.0) / self.requests

    def violation(self, config: DeployConfig) -> str | None:
        """Why this reading is out of bounds, or ``None``."""
        rate = self.error_rate
        if rate is not None and rate > config.max_error_rate:
            return f"error rate {rate:.4f} > {config.max_error_rate:.4f} ({self.errors:g} of {self.requests:g} requests answered 5xx)"
        if self.p99_s is not None and self.p99_s > config.max_p99_latency_s:
            return f"p99 latency {self.p99_s:.2f} s > {config.max_p99_latency_s:.2f} s"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "error_rate": self.error_rate}


def read_canary(prometheus_url: str, model_name: str, version: str, range_s: float, elapsed_s: float) -> CanaryReading:
    """Query the three canary numbers once; a failed query is recorded in ``error`` rather than raised."""
    reading = CanaryReading(elapsed_s=round(elapsed_s, 3))
    try:
        for key, query in canary_queries(model_name, version, range_s).items():
            setattr(reading, key, vector_value(prometheus_query(prometheus_url, query)))
    except MedsegError as exc:
        reading.error = str(exc)
    return reading


def observe_canary(config: DeployConfig, model_name: str, version: str, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> tuple[bool, str, list[CanaryReading]]:
    """Watch the canary for ``config.canary_window_s``; ``(within bounds, reason, readings)``.

    Fails at the first reading out of bounds. After the window it also fails when no reading could be
    taken, or when there was no request at all and ``config.require_traffic`` is set.
    """
    start = clock()
    readings: list[CanaryReading] = []
    while True:
        elapsed = clock() - start
        reading = read_canary(config.prometheus_url, model_name, version, max(elapsed, config.canary_window_s), elapsed)
        readings.append(reading)
        if reading.error:
            log.warning("canary check at %.0f s: %s", elapsed, reading.error)
        else:
            log.info("canary check at %.0f s: requests %s, error rate %s, p99 %s s", elapsed, reading.requests, reading.error_rate, reading.p99_s)
            why = reading.violation(config)
            if why:
                return False, f"canary v{version} out of bounds after {elapsed:.0f} s: {why}", readings
        if elapsed >= config.canary_window_s:
            break
        sleep(min(config.canary_interval_s, max(0.0, config.canary_window_s - elapsed)) or config.canary_interval_s)
    good = [r for r in readings if not r.error]
    if not good:
        return False, f"canary v{version}: no Prometheus reading succeeded ({readings[-1].error})", readings
    traffic = max((r.requests or 0.0) for r in good)
    if traffic <= 0 and config.require_traffic:
        return False, f"canary v{version}: no request reached it in {config.canary_window_s:.0f} s (require_traffic is set)", readings
    last = good[-1]
    return True, (f"canary v{version} within bounds for {config.canary_window_s:.0f} s: {traffic:g} requests, "
                  f"error rate {last.error_rate if last.error_rate is not None else 0:.4f}, p99 {last.p99_s if last.p99_s is not None else float('nan'):.2f} s"), readings


# --------------------------------------------------------------------------- rollout
def canary_rollout(api_client: Any, model_name: str, version: str, previous_version: str, config: DeployConfig, tracking_uri: str | None,
                   name: str | None = None, sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                   poll_s: float = 5.0) -> dict[str, Any]:
    """Canary ``version`` against the live ``previous_version``, then promote it fully or roll back.

    Returns ``{"decision": "promoted" | "rolled back", "reason", "version", "previous_version",
    "served_version", "registry_rollback", "readings"}``.
    """
    percent = int(config.canary_traffic_percent)
    canary = render_inferenceservice(model_name, version, config, canary_traffic_percent=percent, name=name)
    isvc_name = canary["metadata"]["name"]
    log.info("canary: %s v%s at %d %% of the traffic (previous v%s keeps the rest)", isvc_name, version, percent, previous_version)
    try:
        apply_and_wait(api_client, canary, config.field_manager, timeout_s=config.ready_timeout_s, poll_s=poll_s)
    except MedsegError as exc:
        ok, reason, readings = False, f"canary v{version} never became Ready: {exc}", []
    else:
        ok, reason, readings = observe_canary(config, model_name, version, sleep=sleep, clock=clock)
    out: dict[str, Any] = {"version": str(version), "previous_version": str(previous_version), "canary_traffic_percent": percent,
                           "readings": [r.to_dict() for r in readings], "reason": reason, "registry_rollback": None}
    if ok:
        log.info("%s: promoting v%s to 100 %%", reason, version)
        apply_and_wait(api_client, render_inferenceservice(model_name, version, config, name=isvc_name), config.field_manager,
                       timeout_s=config.ready_timeout_s, poll_s=poll_s)
        return {**out, "decision": "promoted", "served_version": str(version)}
    log.warning("%s: rolling back to v%s", reason, previous_version)
    out["registry_rollback"] = _rollback_registry(model_name, str(version), tracking_uri)
    apply_and_wait(api_client, render_inferenceservice(model_name, previous_version, config, name=isvc_name), config.field_manager,
                   timeout_s=config.ready_timeout_s, poll_s=poll_s)
    return {**out, "decision": "rolled back", "served_version": str(previous_version)}


def _rollback_registry(model_name: str, version: str, tracking_uri: str | None) -> dict[str, Any]:
    """Move ``champion`` back with :func:`medseg.registry.registry.rollback` when it still points at the
    failed canary; otherwise (moved meanwhile, no registry) leave the registry alone and say why."""
    if not tracking_uri:
        return {"done": False, "reason": "no MLflow tracking URI: registry aliases left unchanged"}
    from medseg.registry.registry import CHAMPION, rollback, show_model

    champion = show_model(model_name, tracking_uri)["aliases"].get(CHAMPION)
    if champion != version:
        return {"done": False, "reason": f"champion is v{champion}, not the canary v{version}: registry aliases left unchanged"}
    try:
        result = rollback(model_name, tracking_uri)
    except MedsegError as exc:
        return {"done": False, "reason": f"registry rollback refused: {exc}"}
    return {"done": True, **result}
