"""What a model package says about its network, read without torch.

The parts of :mod:`medseg.inference.package` that only read ``model_package.json`` and ``plans.json``: the model
server's ONNX backend (:mod:`medseg.inference.onnx_backend`) runs where torch is not installed and still needs
them. :mod:`medseg.inference.package` re-exports every name, so callers that load weights keep one import.
"""

from __future__ import annotations

from typing import Any

from medseg import schemas
from medseg.errors import MedsegError
from medseg.task import OUTPUTS, Task

COMBINE = "mean_softmax"


def network_output(network: dict[str, Any]) -> str:
    """What a stored topology's outputs are: ``labels`` (default), ``regions`` or ``classes`` (see :mod:`medseg.inference.package`)."""
    kind = str(network.get("output") or "labels")
    if kind not in OUTPUTS:
        raise MedsegError(f"unknown network output {kind!r} in the model package (known: {', '.join(OUTPUTS)})")
    if kind == "regions" and not network.get("regions"):
        raise MedsegError("a region-output model package must list its regions (network.regions, name → labels)")
    return kind


def combine_rule(network: dict[str, Any]) -> str:
    """How an ensemble of this network combines its members: ``mean_sigmoid`` for region outputs, else ``mean_softmax``."""
    return f"mean_{Task.activation(network_output(network))}"


def member_weights(package: schemas.ModelPackage) -> list[str]:
    """The weights files of a package's members (one for a single model), relative to its folder."""
    ensemble = package.training.get("ensemble") or {}
    return list(ensemble.get("weights_files") or []) or [package.weights_file]


def is_ensemble(package: schemas.ModelPackage) -> bool:
    return len(member_weights(package)) > 1


def network_patch_size(package: schemas.ModelPackage, plans: schemas.Plans) -> list[int]:
    """The patch the package's network was trained on (the sliding window's): recorded in ``network.patch_size``
    (networks with size constraints of their own train on another patch than the plan's), else the plan's."""
    recorded = package.network.get("patch_size")
    return [int(p) for p in recorded] if recorded else [int(p) for p in plans.configuration(package.configuration).patch_size]


__all__ = ["COMBINE", "OUTPUTS", "combine_rule", "is_ensemble", "member_weights", "network_output", "network_patch_size"]
