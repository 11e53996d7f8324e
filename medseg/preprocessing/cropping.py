"""Crop to the nonzero region (the brain, for skull-stripped MRI).

Isensee et al. 2021, nnU-Net: cropping to nonzero removes background and, for MRI, defines the mask
inside which intensities are normalised.
"""

from __future__ import annotations

import numpy as np


def nonzero_mask(images: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero. ``images``: C×I×J×K → bool I×J×K."""
    return np.any(images != 0, axis=0)


def bounding_box(mask: np.ndarray, margin: int = 0) -> list[list[int]]:
    """Per axis ``[start, stop)`` of the True voxels (the whole volume when the mask is empty)."""
    if not mask.any():
        return [[0, int(s)] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])])
    return box


def crop(array: np.ndarray, box: list[list[int]]) -> np.ndarray:
    """Crop the last ``len(box)`` axes of ``array`` to ``box``."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(a, b) for a, b in box)]


def uncrop(array: np.ndarray, box: list[list[int]], shape: list[int] | tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Paste ``array`` (cropped with ``box``) back into a volume of ``shape`` (last axes)."""
    lead_shape = array.shape[: array.ndim - len(box)]
    out = np.full(tuple(lead_shape) + tuple(shape), fill, dtype=array.dtype)
    lead = (slice(None),) * len(lead_shape)
    out[lead + tuple(slice(a, b) for a, b in box)] = array
    return out
