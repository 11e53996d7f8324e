"""Per-channel intensity normalisation schemes (as planned in ``plans.json``).

Isensee et al. 2021 (nnU-Net): the scheme follows from the channel name in ``dataset.json``:

- ``ct`` (channel "CT"): clip to the dataset's foreground 0.5/99.5 percentiles, then subtract the dataset's
  foreground mean and divide by its std (global z-score: HU values mean the same in every scan).
- ``zscore_nonzero`` (any other name, when the plan uses the nonzero mask): mean/std of the case's own voxels
  inside the nonzero mask; outside stays 0 (nnU-Net's ZScoreNormalization with ``use_mask_for_norm``).
- ``zscore``: the case's own mean/std over the whole (cropped) image.
- ``rescale`` (channel "rescale_0_1"): min–max of the case to [0, 1].
- ``none`` (channel "noNorm"): unchanged.

Each scheme can be changed per channel by editing ``plans.json`` and preprocessing again with that plan.
All arithmetic is float32, as nnU-Net's, so both give the same values to ~1e-6.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("zscore_nonzero", "zscore", "ct", "rescale", "none")
_BY_CHANNEL_NAME = {"ct": "ct", "nonorm": "none", "none": "none", "rescale_0_1": "rescale", "rescale_to_0_1": "rescale", "rescale": "rescale", "zscore": "zscore_nonzero"}


def scheme_for_channel(name: str) -> str:
    """The scheme for a ``dataset.json`` channel name (case-insensitive), as nnU-Net maps them.

    "CT" → ``ct``; "noNorm" → ``none``; "rescale_0_1" → ``rescale``; anything else (t1, T2, FLAIR,
    "zscore", ...) → ``zscore_nonzero``, which the planner turns into ``zscore`` when the dataset's crop
    does not remove much (the nonzero mask is then not meaningful).
    """
    return _BY_CHANNEL_NAME.get(name.lower(), "zscore_nonzero")


def normalize(image: np.ndarray, mask: np.ndarray, spec: dict, inplace: bool = False) -> np.ndarray:
    """Normalise one channel ``image`` (I×J×K) with ``spec`` = {scheme, mean, std, lower, upper}.

    ``mask``: bool I×J×K nonzero mask (used by ``zscore_nonzero`` only). ``inplace``: write into
    ``image`` when it is already float32 (saves a copy). Returns float32 I×J×K.

    Raises:
        ValueError: for an unknown scheme.
    """
    scheme = spec["scheme"]
    if scheme not in SCHEMES:
        raise ValueError(f"unknown normalisation scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    img = image.astype(np.float32, copy=not inplace)
    if scheme == "zscore_nonzero":
        inside = img[mask]
        if inside.size:
            mean, std = inside.mean(), inside.std()
            img -= mean
            img /= max(float(std), 1e-8)
        np.copyto(img, 0.0, where=~mask)
    elif scheme == "zscore":
        mean, std = img.mean(), img.std()
        img -= mean
        img /= max(float(std), 1e-8)
    elif scheme == "ct":
        np.clip(img, spec["lower"], spec["upper"], out=img)
        img -= np.float32(spec["mean"])
        img /= np.float32(max(float(spec["std"]), 1e-8))
    elif scheme == "rescale":
        lo = img.min() if img.size else 0.0
        img -= lo
        img /= max(float(img.max()) if img.size else 0.0, 1e-8)
    return img
