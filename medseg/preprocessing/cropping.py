"""Crop to the nonzero region (the brain, for skull-stripped MRI).

Isensee et al. 2021, nnU-Net: cropping to nonzero removes background and, for MRI, defines the mask
inside which intensities are normalised. The mask is the union over channels of nonzero voxels with
its holes filled (zero voxels enclosed by tissue count as inside), as nnU-Net's ``create_nonzero_mask``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool I×J×K) with every background region that does not reach the border set to True.

    Same result as ``scipy.ndimage.binary_fill_holes`` (6-connected background), computed by labelling the
    background inside the mask's bounding box only: a background component touching a face of that box
    is connected to the outside, every other one is a hole. About 2× faster on brain masks.
    """
    box = bounding_box(mask)
    if not mask.any():
        return mask.copy()
    inner = crop(mask, box)
    labels, n = ndimage.label(~inner)
    if n == 0:
        return mask.copy()
    faces = [labels[(slice(None),) * a + (i,)] for a in range(labels.ndim) for i in (0, -1)]
    outside = np.unique(np.concatenate([f.ravel() for f in faces]))
    is_hole = np.ones(n + 1, dtype=bool)
    is_hole[outside] = False
    is_hole[0] = False  # label 0 is the mask itself
    if not is_hole.any():
        return mask.copy()
    out = mask.copy()
    out[tuple(slice(a, b) for a, b in box)] |= is_hole[labels]
    return out


def nonzero_mask(images: np.ndarray, fill: bool = True) -> np.ndarray:
    """Voxels where any channel is nonzero, holes filled. ``images``: C×I×J×K → bool I×J×K."""
    mask = images[0] != 0
    for c in range(1, images.shape[0]):
        mask |= images[c] != 0
    return fill_holes(mask) if fill else mask


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
    """Crop the last ``len(box)`` axes of ``array`` to ``box`` (a view, no copy)."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[lead + tuple(slice(a, b) for a, b in box)]


def uncrop(array: np.ndarray, box: list[list[int]], shape: list[int] | tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Paste ``array`` (cropped with ``box``) back into a volume of ``shape`` (last axes)."""
    lead_shape = array.shape[: array.ndim - len(box)]
    out = np.full(tuple(lead_shape) + tuple(shape), fill, dtype=array.dtype)
    lead = (slice(None),) * len(lead_shape)
    out[lead + tuple(slice(a, b) for a, b in box)] = array
    return out
