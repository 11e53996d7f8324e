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
