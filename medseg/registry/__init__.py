"""MLflow model registry: the model package as a pyfunc model, lineage tags, challenger/champion gate.

:mod:`medseg.registry.registry` holds the functions (no MLflow import at module level, so the CLI starts
fast); :mod:`medseg.registry.pyfunc_model` the pyfunc wrapper (imports MLflow; loaded on first use).
"""

from __future__ import annotations

from typing import Any

from medseg.registry.registry import (
    CHALLENGER,
    CHAMPION,
    LINEAGE_KEYS,
    PREVIOUS_CHAMPION,
    check_thresholds,
    list_models,
    promote,
    register_model,
    rollback,
    show_model,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "PREVIOUS_CHAMPION", "LINEAGE_KEYS",
    "register_model", "promote", "rollback", "list_models", "show_model", "check_thresholds",
    "SegmentationPyfunc", "log_model_package", "package_dir_of", "PACKAGE_SUBDIR",
]


def __getattr__(name: str) -> Any:  # lazy: importing the pyfunc module imports mlflow
    if name in ("SegmentationPyfunc", "log_model_package", "package_dir_of", "PACKAGE_SUBDIR", "MODEL_PACKAGE_ARTIFACT"):
        from medseg.registry import pyfunc_model

        return getattr(pyfunc_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
