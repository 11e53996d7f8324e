"""Per-channel intensity normalisation schemes (as planned in ``plans.json``).

- ``zscore_nonzero``: MRI. Mean/std of the case's own voxels inside the nonzero mask; outside stays 0
  (nnU-Net's ZScoreNormalization with ``use_mask_for_norm``).
- ``zscore``: MRI without masking: the case's own mean/std over the whole image.
- ``ct``: clip to the dataset's foreground 0.5/99.5 percentiles, then the dataset's foreground mean/std.
- ``rescale``: min–max of the case to [0, 1].
- ``none``: unchanged.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("zscore_nonzero", "zscore", "ct", "rescale", "none")


def scheme_for_channel(name: str) -> str:
    """Pick a scheme from a channel name, as nnU-Net does from ``channel_names``."""
    lowered = name.lower()
    if lowered == "ct":
        return "ct"
    if lowered in ("none", "noNorm".lower()):
        return "none"
    if lowered in ("rescale", "rescale_to_0_1"):
        return "rescale"
    return "zscore_nonzero"


def normalize(image: np.ndarray, mask: np.ndarray, spec: dict) -> np.ndarray:
    """Normalise one channel ``image`` (I×J×K) with ``spec`` = {scheme, mean, std, lower, upper}."""
    scheme = spec["scheme"]
    img = image.astype(np.float32, copy=True)
    if scheme == "zscore_nonzero":
        inside = img[mask]
        if inside.size:
            mean, std = float(inside.mean()), float(inside.std())
            img = np.where(mask, (img - mean) / max(std, 1e-8), 0.0).astype(np.float32)
        return img
    if scheme == "zscore":
        return ((img - img.mean()) / max(float(img.std()), 1e-8)).astype(np.float32)
    if scheme == "ct":
        img = np.clip(img, spec["lower"], spec["upper"])
        return ((img - spec["mean"]) / max(spec["std"], 1e-8)).astype(np.float32)
    if scheme == "rescale":
        lo, hi = float(img.min()), float(img.max())
        return ((img - lo) / max(hi - lo, 1e-8)).astype(np.float32)
    if scheme == "none":
        return img
    raise ValueError(f"unknown normalisation scheme {scheme!r} (known: {', '.join(SCHEMES)})")
