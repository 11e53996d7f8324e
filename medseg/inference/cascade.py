"""The 3d_lowres → 3d_fullres cascade at inference: the previous stage's segmentation as extra input channels.

nnU-Net's ``3d_cascade_fullres`` (Isensee et al. 2021): a low-resolution network segments the whole image
with more context; its segmentation, brought onto the full-resolution grid, is given to the full-resolution
network as one extra binary input channel per foreground label (the one-hot map without background).

One function, :func:`previous_stage_on_grid`, brings a previous-stage segmentation (on the input's own
voxel grid) onto a case's preprocessed full-resolution grid: the crop box of the preprocessing, then the
configuration's segmentation resampling (per-label linear or nearest, "separate z" along a coarse axis),
exactly as :func:`~medseg.preprocessing.preprocess.preprocess_case` treats a reference segmentation.
Training (the ``<case>_prev.npy`` maps of :mod:`medseg.training.cascade`) and inference
(:meth:`~medseg.inference.predictor.Predictor.predict` of a cascade package) both go through it, so the
full-resolution network sees at inference exactly the kind of map it was trained on.

A cascade model package is self-contained: the low-resolution package is copied into its
``previous_stage/`` folder, and ``model_package.json`` records it::

    previous_stage: {configuration: "3d_lowres", package: "previous_stage", labels: [1, 2, 3], image_channels: 4, ...}

``labels`` are the foreground label values whose masks are the extra channels, in channel order, after the
``image_channels`` image channels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.preprocessing.cropping import crop
from medseg.preprocessing.resampling import resample_segmentation, separate_z_axis

PREVIOUS_STAGE_DIR = "previous_stage"


def foreground_labels(labels: dict[str, int] | list[int]) -> list[int]:
    """The label values other than background (0), ascending: the previous stage's input channels."""
    values = labels.values() if isinstance(labels, dict) else labels
    return sorted(int(v) for v in values if int(v) != 0)


def previous_stage_on_grid(segmentation: np.ndarray, props: schemas.CaseProperties, config: schemas.Configuration) -> np.ndarray:
    """A label map on a case's original grid (I×J×K) → the case's preprocessed grid of ``config``.

    ``props``: the :class:`~medseg.schemas.CaseProperties` of the case preprocessed with ``config`` (crop box,
    original and target spacing, shape after resampling). Crop, then ``config.seg_resampling`` with the
    same "separate z" rule as the images. Returns uint8.

    Raises:
        MedsegError: a segmentation whose shape is not the case's original shape.
    """
    seg = np.asarray(segmentation)
    if list(seg.shape) != list(props.original_shape):
        raise MedsegError(f"previous-stage segmentation of shape {tuple(seg.shape)} for a case of shape {tuple(props.original_shape)}")
    if seg.dtype.kind == "i":
        seg = np.clip(seg, 0, None)
    seg = np.ascontiguousarray(crop(seg.astype(np.uint8, copy=False), props.crop_bbox))
    axis = separate_z_axis(list(props.original_spacing), list(props.target_spacing))
    out = resample_segmentation(seg, props.shape_after_resample, config.seg_resampling, anisotropic_axis=axis)
    return np.asarray(out, dtype=np.uint8)


def one_hot(prev: np.ndarray, labels: list[int]) -> np.ndarray:
    """float32 L×(spatial): one binary mask per value of ``labels`` (the foreground labels), in that order."""
    prev = np.asarray(prev)
    out = np.empty((len(labels), *prev.shape), dtype=np.float32)
    for i, value in enumerate(labels):
        np.equal(prev, value, out=out[i], casting="unsafe")
    return out


def with_previous_stage(data: np.ndarray, prev: np.ndarray, labels: list[int]) -> np.ndarray:
    """The full-resolution network's input: images C×(spatial) followed by the one-hot previous stage."""
    if tuple(np.shape(prev)) != tuple(data.shape[1:]):
        raise MedsegError(f"previous-stage map of shape {tuple(np.shape(prev))} for preprocessed images of shape {tuple(data.shape[1:])}")
    return np.concatenate([np.asarray(data, dtype=np.float32), one_hot(prev, labels)], axis=0)


def previous_stage_spec(package: schemas.ModelPackage) -> dict[str, Any]:
    """A package's ``previous_stage`` entry (empty for a single-stage model), checked.

    Raises:
        MedsegError: an entry without its configuration, folder or labels.
    """
    spec = dict(package.previous_stage or {})
    if not spec:
        return {}
    missing = [k for k in ("configuration", "package", "labels") if k not in spec]
    if missing:
        raise MedsegError(f"the model package's previous_stage lacks {missing}")
    return spec


__all__ = ["PREVIOUS_STAGE_DIR", "foreground_labels", "one_hot", "previous_stage_on_grid", "previous_stage_spec", "with_previous_stage"]
