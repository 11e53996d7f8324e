"""Resampling between voxel spacings.

Images: 3rd-order spline; segmentations: nearest neighbour; probability maps (for inverting
predictions): linear. When one axis is much coarser than the others (ratio > 3), that axis is
resampled with order 0 and the in-plane axes with the requested order, as nnU-Net's "separate z"
handling does, so slices are not blurred into each other.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0


def shape_for_spacing(shape: list[int] | tuple[int, ...], spacing: list[float], target_spacing: list[float]) -> list[int]:
    """Voxel counts after resampling ``shape`` from ``spacing`` to ``target_spacing`` (same extent in mm)."""
    return [max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing, target_spacing)]


def needs_resampling(spacing: list[float], target_spacing: list[float], rtol: float = 1e-3) -> bool:
    return not np.allclose(spacing, target_spacing, rtol=rtol)


def resample(volume: np.ndarray, new_shape: list[int] | tuple[int, ...], order: int, anisotropic_axis: int | None = None) -> np.ndarray:
    """Resample the last three axes of ``volume`` (any leading axes kept) to ``new_shape``.

    ``anisotropic_axis``: when given, that axis is resampled with nearest neighbour (separate z).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(volume.shape[-3:]) == new_shape:
        return volume
    lead = volume.shape[:-3]
    flat = volume.reshape((-1,) + volume.shape[-3:])
    out = np.empty((flat.shape[0],) + new_shape, dtype=volume.dtype if order == 0 else np.float32)
    for c in range(flat.shape[0]):
        out[c] = _resample_one(flat[c], new_shape, order, anisotropic_axis)
    return out.reshape(lead + new_shape)


def _resample_one(vol: np.ndarray, new_shape: tuple[int, ...], order: int, anisotropic_axis: int | None) -> np.ndarray:
    factors = [n / o for n, o in zip(new_shape, vol.shape)]
    src = vol if order == 0 else vol.astype(np.float32, copy=False)
    if anisotropic_axis is None or order == 0:
        return _zoom_exact(src, factors, new_shape, order)
    in_plane = list(factors)
    in_plane[anisotropic_axis] = 1.0
    tmp_shape = list(new_shape)
    tmp_shape[anisotropic_axis] = vol.shape[anisotropic_axis]
    tmp = _zoom_exact(src, in_plane, tuple(tmp_shape), order)
    along = [1.0, 1.0, 1.0]
    along[anisotropic_axis] = factors[anisotropic_axis]
    return _zoom_exact(tmp, along, new_shape, 0)


def _zoom_exact(vol: np.ndarray, factors: list[float], new_shape: tuple[int, ...], order: int) -> np.ndarray:
    # grid_mode=True maps voxel *areas* (edges to edges), the right model for images of a fixed extent.
    out = ndimage.zoom(vol, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != new_shape:  # zoom may be off by one from rounding: pad or cut to the exact shape
        fixed = np.zeros(new_shape, dtype=out.dtype)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, new_shape))
        fixed[sl] = out[sl]
        out = fixed
    return out


def anisotropic_axis(spacing: list[float]) -> int | None:
    """The axis whose spacing exceeds ``ANISOTROPY_THRESHOLD`` × the finest one, if any."""
    spacing_arr = np.asarray(spacing, dtype=float)
    coarse = int(np.argmax(spacing_arr))
    return coarse if spacing_arr[coarse] / spacing_arr.min() > ANISOTROPY_THRESHOLD else None


def resample_segmentation(seg: np.ndarray, new_shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (values preserved exactly)."""
    return resample(seg, new_shape, order=0)
