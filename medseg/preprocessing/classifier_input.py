"""A classifier's fixed-size input from a whole preprocessed volume: the same transform in training and inference."""

from __future__ import annotations

import numpy as np


def fit_volume(data: np.ndarray, size: list[int], scale: float = 1.0) -> np.ndarray:
    """A whole preprocessed volume C×I×J×K as the classifier's fixed input C×``size``: zoomed by ``scale``
    (trilinear; the same factor for every case, so sizes stay comparable between subjects: atrophy is a
    signal), then centre-cropped or zero-padded (the background of a z-scored, cropped-to-nonzero volume)
    to ``size``. float32."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: ``data`` is often a read-only memory map
    if scale != 1.0:
        shape = [max(1, int(round(n * scale))) for n in x.shape[1:]]
        if shape != list(x.shape[1:]):
            x = F.interpolate(x[None], size=shape, mode="trilinear", align_corners=False)[0]
    out = np.zeros((x.shape[0], *size), dtype=np.float32)
    src, dst = [], []
    for n, m in zip(x.shape[1:], size):
        if n >= m:  # crop the centre
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:  # pad around it
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[(slice(None), *dst)] = x[(slice(None), *src)].numpy()
    return out
