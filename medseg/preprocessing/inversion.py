"""Inverting the preprocessing: a prediction on the preprocessed grid → the original grid and affine.

The preprocessing is crop → (normalise) → resample; the inverse is resample back to the cropped shape →
paste into the crop box (background outside). The original grid is the input file's own voxel grid, so
the result is written with the case's original affine (``CaseProperties.original_affine``), unchanged.

Probabilities are resampled linearly and arg-maxed afterwards (nnU-Net's export: smoother than resampling
labels), with the same "separate z" rule as the forward resampling (nearest neighbour along a coarse axis).
"""

from __future__ import annotations

import numpy as np

from medseg import schemas
from medseg.preprocessing.cropping import uncrop
from medseg.preprocessing.resampling import resample, resample_segmentation, separate_z_axis


def _axis_back(props: schemas.CaseProperties) -> int | None:
    return separate_z_axis(props.target_spacing, props.original_spacing)


def restore_to_original(probabilities: np.ndarray, props: schemas.CaseProperties) -> np.ndarray:
    """Class probabilities (or logits) K×I'×J'×K' on the preprocessed grid → uint8 labels I×J×K on the original grid.

    Write the result with ``props.original_affine``.
    """
    if list(probabilities.shape[1:]) != list(props.shape_after_crop):
        probabilities = resample(probabilities.astype(np.float32, copy=False), props.shape_after_crop, order=1, anisotropic_axis=_axis_back(props))
    labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    return uncrop(labels, props.crop_bbox, props.original_shape, fill=0)


def probabilities_to_original(probabilities: np.ndarray, props: schemas.CaseProperties, background_channel: int | None = 0) -> np.ndarray:
    """Probabilities K×I'×J'×K' on the preprocessed grid → float32 K×I×J×K on the original grid (resampled linearly,
    as :func:`restore_to_original` before its arg-max): what an ensemble of configurations with different grids
    averages. Outside the crop box every channel is 0 except ``background_channel`` (1; None for sigmoid outputs,
    whose channels are independent regions)."""
    probabilities = probabilities.astype(np.float32, copy=False)
    if list(probabilities.shape[1:]) != list(props.shape_after_crop):
        probabilities = resample(probabilities, props.shape_after_crop, order=1, anisotropic_axis=_axis_back(props))
    out = np.stack([uncrop(channel, props.crop_bbox, props.original_shape, fill=1.0 if k == background_channel else 0.0)
                    for k, channel in enumerate(probabilities)])
    return out.astype(np.float32, copy=False)


def restore_labels_to_original(labels: np.ndarray, props: schemas.CaseProperties, method: str = "nearest") -> np.ndarray:
    """A label map I'×J'×K' on the preprocessed grid → uint8 I×J×K on the original grid.

    ``method``: ``"nearest"`` (default) or ``"linear"`` (per label on the one-hot map, see
    :func:`~medseg.preprocessing.resampling.resample_segmentation`).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind == "i":
        labels = np.clip(labels, 0, None)
    labels = labels.astype(np.uint8, copy=False)
    if list(labels.shape) != list(props.shape_after_crop):
        labels = resample_segmentation(labels, props.shape_after_crop, method, anisotropic_axis=_axis_back(props))
    return uncrop(labels, props.crop_bbox, props.original_shape, fill=0)


def original_affine(props: schemas.CaseProperties) -> np.ndarray:
    """The 4×4 affine (mm) of the original grid, to write restored predictions with."""
    return np.asarray(props.original_affine, dtype=np.float64)
