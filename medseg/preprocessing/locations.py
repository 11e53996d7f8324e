"""Foreground voxel locations per class, for the patch sampler's foreground oversampling.

nnU-Net (Isensee et al. 2021) centres a share of its training patches (1/3) on a voxel of a randomly
chosen foreground class; to do that without scanning the segmentation at every draw, preprocessing stores
a sample of each class's voxel indices with the case. nnU-Net keeps up to 10 000 (at least 1 %) per class;
we keep at most :data:`CLASS_LOCATIONS_PER_LABEL`, drawn uniformly without replacement, because they are
stored in the case's JSON properties (``class_locations``: label value as a string → list of [i, j, k]
indices on the preprocessed grid), which :class:`~medseg.training.sampler.PreprocessedCase` reads.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASS_LOCATIONS_PER_LABEL = 2000


def sample_class_locations(seg: np.ndarray, labels: list[int], rng: np.random.Generator, max_per_label: int = CLASS_LOCATIONS_PER_LABEL) -> dict[str, list[list[int]]]:
    """``{str(label): [[i, j, k], ...]}`` for each foreground label in ``labels`` (0 is skipped).

    ``seg``: I×J×K integer labels (≥ 0). A label absent from ``seg`` maps to an empty list. Each label is
    searched only inside its bounding box, so small structures cost little on large volumes.
    """
    out: dict[str, list[list[int]]] = {}
    wanted = sorted({int(v) for v in labels} - {0})
    if seg.dtype.kind not in "iu" or (seg.dtype.kind == "i" and seg.size and int(seg.min()) < 0):
        raise ValueError(f"segmentation must hold integer labels ≥ 0 (got {seg.dtype})")
    boxes = ndimage.find_objects(seg) if seg.size else []
    for value in wanted:
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        if box is None:
            out[str(value)] = []
            continue
        idx = np.argwhere(seg[box] == value)
        idx += np.array([s.start for s in box])
        if len(idx) > max_per_label:
            idx = idx[np.sort(rng.choice(len(idx), max_per_label, replace=False))]
        out[str(value)] = idx.astype(int).tolist()
    return out
