"""Process entry points for the registry concurrency tests (importable by ``spawn`` children; no torch)."""

from __future__ import annotations

import os
from typing import Any


def promote_after_barrier(barrier: Any, queue: Any, name: str, version: str, uri: str, kwargs: dict) -> None:
    """Wait until every racer is ready, then promote; put ``(version, result or error text)`` on ``queue``."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        from medseg.registry import registry as reg

        reg._client(uri).get_registered_model(name)  # warm up (imports, DB connection) before the start line
        barrier.wait(timeout=120)
        queue.put((version, reg.promote(name, version, uri, None, **kwargs)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((version, f"ERROR {type(exc).__name__}: {exc}"))


def register_and_promote_after_barrier(barrier: Any, queue: Any, tag: str, package: str, metrics: dict, name: str, uri: str, kwargs: dict) -> None:
    """Wait until every racer is ready, then register ``package`` with ``metrics`` (a metrics.json dict) and
    promote the new version; put ``(tag, {"register": ..., "promote": ...} or error text)`` on ``queue``."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        from pathlib import Path

        from medseg import schemas
        from medseg.registry import registry as reg

        reg._client(uri).search_registered_models(max_results=1)  # warm up (imports, DB connection) before the start line
        import mlflow.pyfunc  # noqa: F401 - imported by register_model; not part of the race

        barrier.wait(timeout=120)
        registered = reg.register_model(Path(package), schemas.Metrics.from_dict(metrics), name, uri, {"pipeline_run_id": f"race-{tag}"}, {"auto": True})
        queue.put((tag, {"register": registered, "promote": reg.promote(name, registered["version"], uri, None, **kwargs)}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((tag, f"ERROR {type(exc).__name__}: {exc}"))
