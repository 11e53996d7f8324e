"""Sliding-window geometry shared by the torch and the ONNX Runtime backends, in numpy only.

Both backends must place the same windows, weight them with the same Gaussian and pad the same way, or their
probabilities would differ by more than float rounding; keeping these here (no torch import) lets the model
server's torch-free backend (:mod:`medseg.inference.onnx_backend`) share them with
:mod:`medseg.inference.sliding_window`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size`` (≥ ``patch``).

    Step ``int(patch × (1 − overlap))`` (at least 1; one window when ``patch == size``); the last window
    is shifted back so it ends at ``size``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if patch >= size:
        return [0]
    step = max(int(patch * (1.0 - overlap)), 1)
    starts: list[int] = []
    start = 0
    while True:
        starts.append(min(start, size - patch))
        if start + patch >= size:
            return starts
        start += step


def gaussian_importance_np(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights float32 of shape ``patch_size`` (peak 1 at the centre), clamped below at max(min, 1e-3).

    The same float32 arithmetic as :func:`medseg.inference.sliding_window.gaussian_importance` (separable
    profiles multiplied axis by axis), so the two agree to the last bit or one ulp.
    """
    weights: np.ndarray | None = None
    for axis, size in enumerate(patch_size):
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        profile = np.exp(x**2 / np.float32(-2.0 * (sigma_scale * size) ** 2)).astype(np.float32)
        weights = profile if weights is None else weights[..., None] * profile[(None,) * axis]
    assert weights is not None
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def flip_sets(n_spatial: int, first_axis: int = 2) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (``first_axis`` … ``first_axis + n_spatial − 1``), the empty one first:
    mirroring test-time augmentation averages the network over these 2ⁿ flips."""
    axes = tuple(range(first_axis, first_axis + n_spatial))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def pad_widths(spatial: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Zero padding (before, after) per axis that makes a volume at least one patch: half before, half after (the
    extra voxel after), as the torch backend and MONAI pad."""
    out = []
    for s, p in zip(spatial, patch):
        diff = max(int(p) - int(s), 0)
        out.append((diff // 2, diff - diff // 2))
    return out


__all__ = ["flip_sets", "gaussian_importance_np", "pad_widths", "window_starts"]
