"""Crafted BraTS 2024-style cases (labels 1 NETC, 2 SNFH, 3 ET, 4 RC) for the panoptic reference test.

Pure numpy/scipy, so the same arrays are built in the project's venv (tests/test_panoptic.py) and in
the throw-away venv that ran panoptica (tests/data/make_panoptic_reference.py). ``SEED`` fixes the
random cases; changing anything here invalidates tests/data/panoptic_reference.json.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SEED = 20250
SHAPE = (48, 44, 40)
#: Region name → label values (the BraTS 2024 post-treatment regions).
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "NETC": (1,), "SNFH": (2,), "ET": (3,), "RC": (4,)}


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing)], indexing="ij")
    return sum(g**2 for g in grid) <= radius**2


def crafted_multilesion():
    """ET: lesion 1 predicted exactly, lesion 2 predicted shifted (IoU < 0.5 but overlapping), lesion 3
    missed, lesion 4 split into two predicted fragments; one predicted ET blob far from everything.
    SNFH shells around the ET lesions, NETC cores in two of them, one RC cavity predicted too small."""
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    centres = [(10, 10, 10), (10, 32, 12), (36, 10, 28), (34, 30, 26)]
    for c in centres:
        ref[_ball(SHAPE, c, 6) & (ref == 0)] = 2
    for c in centres:
        ref[_ball(SHAPE, c, 4)] = 3
    ref[_ball(SHAPE, centres[0], 1.8)] = 1
    ref[_ball(SHAPE, centres[3], 2.2)] = 1
    ref[_ball(SHAPE, (24, 22, 34), 4)] = 4
    # prediction
    pred[_ball(SHAPE, centres[0], 6)] = 2
    pred[_ball(SHAPE, centres[0], 4)] = 3
    pred[_ball(SHAPE, centres[0], 1.8)] = 1
    shifted = (centres[1][0] + 4, centres[1][1] + 3, centres[1][2])
    pred[_ball(SHAPE, centres[1], 6) & (pred == 0)] = 2
    pred[_ball(SHAPE, shifted, 4)] = 3
    pred[_ball(SHAPE, centres[2], 6) & (pred == 0)] = 2  # lesion 3: oedema only, ET missed
    pred[_ball(SHAPE, centres[3], 6) & (pred == 0)] = 2
    split = _ball(SHAPE, centres[3], 4)
    split[:, 29:31, :] = False  # a 2-voxel gap splits ET lesion 4 in two predicted fragments
    pred[split] = 3
    pred[_ball(SHAPE, centres[3], 2.2)] = 1
    pred[_ball(SHAPE, (24, 22, 34), 2.5)] = 4
    pred[_ball(SHAPE, (44, 40, 6), 2)] = 3  # a false-positive blob
    return pred, ref, (1.0, 1.0, 1.0)


def _blobs(rng, shape, sigma, q):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, q)


def random_case(seed, spacing=(1.0, 0.9, 1.5)):
    """Irregular multi-lesion tumours with label errors, misses, ragged borders and false positives."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(SHAPE, np.uint8)
    tumour = _blobs(rng, SHAPE, 3.0, 0.95)
    ref[tumour] = 2
    for label in (1, 3, 4, 3):
        ref[tumour & _blobs(rng, SHAPE, 2.5, 0.8)] = label
    cc, n = ndimage.label(ref > 0, np.ones((3, 3, 3)))
    drop = rng.choice(np.arange(1, n + 1), max(n // 5, 1), replace=False)
    pred = np.where(np.isin(cc, drop), 0, ref)
    pred = np.roll(pred, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
    pred[(rng.random(SHAPE) < 0.1) & ~ndimage.binary_erosion(pred > 0)] = 0
    pred[_blobs(rng, SHAPE, 1.8, 0.998) & (pred == 0)] = int(rng.integers(1, 5))
    return pred.astype(np.uint8), ref, spacing


def empty_cases():
    """ET predicted where there is none and NETC missed (tp = 0 with instances); RC in neither."""
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    ref[_ball(SHAPE, (20, 20, 20), 7)] = 2
    ref[_ball(SHAPE, (20, 20, 20), 3)] = 1
    pred[_ball(SHAPE, (21, 20, 20), 7)] = 2
    pred[_ball(SHAPE, (21, 20, 20), 3)] = 3
    return pred, ref, (1.0, 1.0, 1.0)


def cases():
    """``{case_id: (pred, ref, spacing)}`` of every crafted case."""
    return {
        "crafted_multilesion": crafted_multilesion(),
        "random_a": random_case(SEED),
        "random_b": random_case(SEED + 1, spacing=(1.2, 1.0, 1.0)),
        "empty_regions": empty_cases(),
    }
