"""An ensemble of configurations (e.g. ``3d_fullres`` + ``2d``) as one model package and one predictor.

nnU-Net's ``find_best_configuration`` may find that the average of two configurations' probabilities beats either
alone. Their networks see different grids (spacing, patch, 2D slices or 3D windows), so the average is taken where
the grids meet: in the input's own geometry, each member's probabilities resampled back there first
(:func:`~medseg.preprocessing.inversion.probabilities_to_original`), then one label decision (arg-max, or the
regions' thresholds) and the package's postprocessing, chosen on the ensemble's out-of-fold predictions.

The package holds its members as complete packages (each a single fold, a fold ensemble or a cascade, with its own
plans and, when exported, its own ``network.onnx``)::

    model/
      model_package.json   configuration: "3d_fullres+2d", network: the first member's (same outputs for all),
                           configuration_ensemble: [{configuration, package: members/3d_fullres, cv_score}, ...]
      plans.json, dataset.json, fingerprint.json   the first member's
      members/3d_fullres/  members/2d/

Written by :func:`medseg.training.model_selection.save_configuration_ensemble`; read here (inference imports
nothing of training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.predictor import Predictor, grid_labels

#: Folder of the member packages inside a configuration ensemble.
MEMBERS_DIR = "members"


def is_configuration_ensemble(package: schemas.ModelPackage) -> bool:
    return bool(package.configuration_ensemble)


def member_folders(model_dir: str | Path, package: schemas.ModelPackage) -> list[Path]:
    """The member packages' folders, in the package's order (best first).

    Raises:
        MedsegError: a member is missing or lies outside the package.
    """
    model_dir = Path(model_dir)
    folders = []
    for member in package.configuration_ensemble:
        relative = Path(str(member.get("package") or ""))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise MedsegError(f"configuration ensemble member {member.get('configuration')!r} has no package inside this one ({relative})", model_dir)
        folder = model_dir / relative
        if not (folder / schemas.MODEL_PACKAGE_JSON).is_file():
            raise MedsegError(f"configuration ensemble member {member.get('configuration')!r} is missing", folder)
        folders.append(folder)
    return folders


class ConfigurationEnsemblePredictor(Predictor):
    """Several :class:`Predictor` of one task on different configurations, as one: the mean of their probabilities on
    the input grid, then one label decision and the ensemble package's postprocessing. Channels, task, outputs and
    reported groups are the members' (checked equal); :attr:`config` and :attr:`patch_size` are the first member's."""

    def __init__(self, members: list[Predictor], package: schemas.ModelPackage):
        if len(members) < 2:
            raise MedsegError("a configuration ensemble needs at least two members")
        first = members[0]
        for other in members[1:]:
            if other.output != first.output or other.channels != first.channels or other.task.signature != first.task.signature:
                raise MedsegError(f"configuration ensemble members disagree: {first.package.configuration} and {other.package.configuration} "
                                  "must share the task, the input channels and the kind of output")
            if first.output == "regions" and other.regions != first.regions:
                raise MedsegError(f"configuration ensemble members {first.package.configuration} and {other.package.configuration} predict other regions")
        if first.output == "classes":
            raise MedsegError("classifiers are not ensembled across configurations")
        self.members = members
        # what callers read of any predictor: the first (best) member's, the package itself for outputs and postprocessing
        self.network, self.plans, self.dataset, self.package = None, first.plans, first.dataset, package  # type: ignore[assignment]
        self.task, self.device, self.overlap, self.mirror = first.task, first.device, first.overlap, first.mirror
        self.config, self.patch_size, self.output = first.config, first.patch_size, first.output
        self.previous_stage, self.previous = {}, None
        self.backend = first.backend

    @classmethod
    def load(cls, model_dir: str | Path, package: schemas.ModelPackage, device: str = "auto", overlap: float = 0.5, mirror: bool = False,
             backend: str | None = None) -> ConfigurationEnsemblePredictor:
        members = [Predictor.from_package(folder, device, overlap, mirror, backend) for folder in member_folders(model_dir, package)]
        return cls(members, package)

    def network_input(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> Any:
        raise MedsegError("a configuration ensemble has one network input per member: use segment or original_probabilities")

    def segment_preprocessed(self, data: np.ndarray, props: schemas.CaseProperties) -> np.ndarray:
        raise MedsegError("a configuration ensemble has no single preprocessed grid: use segment")

    def original_probabilities(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> np.ndarray:
        """The mean of the members' probabilities on the input grid (K×I×J×K float32)."""
        total: np.ndarray | None = None
        for member in self.members:
            probs = member.original_probabilities(images, affine, spacing)
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(self.members)

    def segment(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> np.ndarray:
        return grid_labels(self.original_probabilities(images, affine, spacing), self.regions, self.dataset.label_values)


__all__ = ["MEMBERS_DIR", "ConfigurationEnsemblePredictor", "is_configuration_ensemble", "member_folders"]
