"""The predictor: a model package applied to a raw case, result in the input's geometry.

Used by evaluation, the MLflow pyfunc model and the KServe predictor alike, so all three run exactly the
preprocessing the model was trained with (:func:`~medseg.preprocessing.preprocess.preprocess_case`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.postprocess import enhancing_labels, relabel_small_enhancing, remove_small_components
from medseg.inference.sliding_window import predict_probabilities, select_device
from medseg.io import load_nifti, nifti_spacing, stack_channels
from medseg.preprocessing.preprocess import preprocess_case, restore_to_original
from medseg.training.ensemble import load_network


@dataclass
class Prediction:
    segmentation: np.ndarray  # uint8 I×J×K on the input grid
    affine: np.ndarray  # 4×4, the input's
    volumes_ml: dict[str, float]  # per region (or label) volume in millilitres
    header: nib.Nifti1Header | None = None  # the first input file's header, when predicted from files


class Predictor:
    """Load once, predict many. ``Predictor.from_package(dir)``; ``predict(images, affine, spacing)``."""

    def __init__(self, network: torch.nn.Module, plans: schemas.Plans, dataset: schemas.DatasetJson, package: schemas.ModelPackage, device: torch.device, overlap: float = 0.5, mirror: bool = False):
        self.network, self.plans, self.dataset, self.package = network, plans, dataset, package
        self.device, self.overlap, self.mirror = device, overlap, mirror
        self.config = plans.configuration(package.configuration)

    @classmethod
    def from_package(cls, model_dir: str | Path, device: str = "auto", overlap: float = 0.5, mirror: bool = False) -> Predictor:
        model_dir = Path(model_dir)
        if not (model_dir / schemas.MODEL_PACKAGE_JSON).is_file():
            raise MedsegError(f"not a model package (no {schemas.MODEL_PACKAGE_JSON})", model_dir)
        package = schemas.ModelPackage.load(model_dir)
        plans = schemas.Plans.load(model_dir)
        dataset = schemas.DatasetJson.load(model_dir)
        dev = select_device(device)
        # one network, or an ensemble package's folds averaging their softmax; weights_only loading (never pickled code)
        network = load_network(model_dir, package, dev)
        return cls(network, plans, dataset, package, dev, overlap, mirror)

    @property
    def channels(self) -> list[str]:
        return list(self.plans.channel_names)

    @property
    def region_names(self) -> list[str]:
        return list(self.plans.reported_groups)

    def predict(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> Prediction:
        """``images`` C×I×J×K raw intensities in ``self.channels`` order → segmentation on the same grid."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[0] != len(self.channels):
            raise MedsegError(f"expected {len(self.channels)} channels ({', '.join(self.channels)}) of 3D volumes, got an array of shape {tuple(images.shape)}")
        if not np.isfinite(images).all():
            raise MedsegError("input contains NaN/Inf voxels")
        data, _, props = preprocess_case(images, None, list(spacing), affine, self.plans, self.package.configuration)
        probs = predict_probabilities(self.network, data, self.config.patch_size, overlap=self.overlap, mirror=self.mirror, device=self.device)
        seg = restore_to_original(probs, props)
        min_volumes = self.package.postprocessing.get("min_volume_mm3") or {}
        if min_volumes:
            seg = remove_small_components(seg, min_volumes, spacing)
        et_threshold = int(self.package.postprocessing.get("et_to_netc_below_voxels") or 0)
        pair = enhancing_labels(self.dataset.labels)
        if et_threshold > 0 and pair is not None:
            seg = relabel_small_enhancing(seg, et_threshold, *pair)
        return Prediction(segmentation=seg, affine=np.asarray(affine), volumes_ml=self.volumes_ml(seg, spacing))

    def volumes_ml(self, seg: np.ndarray, spacing: list[float]) -> dict[str, float]:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        groups = self.plans.reported_groups
        return {name: float(np.isin(seg, values).sum() * voxel_ml) for name, values in groups.items()}

    def predict_files(self, paths: list[str | Path]) -> Prediction:
        """One NIfTI file per channel, in ``self.channels`` order; they must share shape and affine."""
        if len(paths) != len(self.channels):
            raise MedsegError(f"expected {len(self.channels)} image files ({', '.join(self.channels)}), got {len(paths)}")
        images, affine, header = stack_channels([load_nifti(p) for p in paths], [str(p) for p in paths])
        prediction = self.predict(images, affine, list(nifti_spacing(header)))
        prediction.header = header  # callers write the segmentation with it, without reading the file again
        return prediction
