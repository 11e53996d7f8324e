"""Experiment planning: from a fingerprint to ``plans.json`` under a device budget.

Follows nnU-Net's rules (Isensee et al. 2021, "nnU-Net: a self-configuring method..."):

- target spacing: the median spacing; when the coarsest axis is > 3× the finest, that axis takes the
  10th percentile of its spacings instead (keeps more slices on anisotropic data);
- topology: downsample an axis by 2 while its feature map stays ≥ 4 voxels and its spacing is at most
  twice the finest current spacing (so anisotropic axes are pooled later); 3×3×3 kernels, 1 along an
  axis still much coarser than the others; features double per stage up to a cap;
- patch size: start from the median shape after resampling and shrink the axis that is largest relative
  to the median shape until the device budget holds.

Budgets: ``gpu:<GiB>`` estimates training memory (:func:`~medseg.training.network.estimate_training_memory_gib`)
and keeps it under the budget (nnU-Net's reference: 8 GiB → ~112³ patches with 32…320 features);
``cpu`` bounds compute instead: 16…128 features and at most 64³ voxels per patch, a network that trains to
useful Dice in minutes on 2 cores (nnU-Net's default plan takes ~66 s per step there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.preprocessing.normalization import scheme_for_channel
from medseg.preprocessing.resampling import ANISOTROPY_THRESHOLD, shape_for_spacing
from medseg.training.network import count_parameters, estimate_training_memory_gib

MIN_FEATURE_MAP = 4
MAX_STAGES = 6


def parse_budget(budget: str) -> tuple[str, float]:
    """``"cpu"`` → ("cpu", 0); ``"gpu:8"`` → ("gpu", 8.0)."""
    if budget == "cpu":
        return "cpu", 0.0
    if budget.startswith("gpu:"):
        try:
            gib = float(budget.split(":", 1)[1])
        except ValueError:
            gib = -1
        if gib > 0:
            return "gpu", gib
    raise MedsegError(f"device budget {budget!r} not understood: use 'cpu' or 'gpu:<GiB>' (e.g. gpu:8)")


def target_spacing(spacings: list[list[float]]) -> list[float]:
    arr = np.asarray(spacings, dtype=float)
    target = np.median(arr, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] / target.min() > ANISOTROPY_THRESHOLD:
        target[coarse] = np.percentile(arr[:, coarse], 10)
    return [float(t) for t in target]


def topology_for_patch(patch: list[int], spacing: list[float], in_channels: int, n_classes: int, base_features: int, max_features: int, deep_supervision: bool) -> dict[str, Any]:
    """Strides, kernels and features for ``patch`` at ``spacing`` (nnU-Net's pooling rule)."""
    strides, kernels = [[1, 1, 1]], []
    current_spacing = list(spacing)
    current_shape = list(patch)
    kernels.append([1 if s / min(current_spacing) > ANISOTROPY_THRESHOLD else 3 for s in current_spacing])
    for _ in range(MAX_STAGES - 1):
        finest = min(current_spacing)
        stride = [2 if (n >= 2 * MIN_FEATURE_MAP and s <= 2 * finest) else 1 for n, s in zip(current_shape, current_spacing)]
        if stride == [1, 1, 1]:
            break
        current_shape = [n // st for n, st in zip(current_shape, stride)]
        current_spacing = [s * st for s, st in zip(current_spacing, stride)]
        strides.append(stride)
        finest = min(current_spacing)
        kernels.append([1 if s / finest > ANISOTROPY_THRESHOLD else 3 for s in current_spacing])
    features = [min(base_features * 2**i, max_features) for i in range(len(strides))]
    return schemas.NetworkTopology(
        name="unet", in_channels=in_channels, out_channels=n_classes, kernel_sizes=kernels, strides=strides,
        features=features, deep_supervision=deep_supervision,
    ).__dict__


def _divisor(topology: dict[str, Any]) -> list[int]:
    return [math.prod(s[a] for s in topology["strides"]) for a in range(3)]


def plan_patch(median_shape: list[int], spacing: list[float], in_channels: int, n_classes: int, budget: str) -> dict[str, Any]:
    """A :class:`~medseg.schemas.Configuration` (as dict) fitting ``budget``."""
    kind, gib = parse_budget(budget)
    base, cap, batch = (32, 320, 2) if kind == "gpu" else (16, 128, 2)
    max_voxels = 64**3 if kind == "cpu" else None
    deep_supervision = kind == "gpu"
    patch = [min(int(n), 256) for n in median_shape]
    for _ in range(200):
        topo = topology_for_patch(patch, spacing, in_channels, n_classes, base, cap, deep_supervision)
        div = _divisor(topo)
        patch = [max(d, int(math.ceil(p / d) * d)) for p, d in zip(patch, div)]
        mem = estimate_training_memory_gib(topo, patch, batch, bytes_per_activation=2 if kind == "gpu" else 4)
        fits = mem <= gib if kind == "gpu" else math.prod(patch) <= max_voxels
        if fits:
            break
        # shrink the axis largest relative to the median shape, by one step of its divisor
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = int(np.argmax(ratios))
        patch[axis] = max(patch[axis] - div[axis], div[axis])
    else:
        raise MedsegError(f"no patch fits the device budget {budget!r}")
    return schemas.Configuration(
        spacing=[float(s) for s in spacing], patch_size=[int(p) for p in patch], batch_size=batch,
        median_shape=[int(m) for m in median_shape], network=topo, n_parameters=count_parameters(topo),
        estimated_memory_gib=round(mem, 3),
    ).__dict__


def make_plans(fingerprint: schemas.Fingerprint, dataset: schemas.DatasetJson, budget: str = "cpu", configurations: tuple[str, ...] = ("3d_fullres",)) -> schemas.Plans:
    """``plans.json`` for ``dataset`` from its fingerprint."""
    spacing = target_spacing(fingerprint.spacings)
    shapes = [shape_for_spacing(s, sp, spacing) for s, sp in zip(fingerprint.shapes_after_crop, fingerprint.spacings)]
    median_shape = [int(v) for v in np.median(np.asarray(shapes), axis=0)]
    n_channels, n_classes = len(dataset.channel_names), dataset.n_classes
    plans_configs = {"3d_fullres": plan_patch(median_shape, spacing, n_channels, n_classes, budget)}
    full = plans_configs["3d_fullres"]
    # 3d_lowres when the patch covers much less than the median image (nnU-Net: < 1/4 of its voxels)
    if "3d_lowres" in configurations and math.prod(full["patch_size"]) < 0.25 * math.prod(median_shape):
        factor = (math.prod(median_shape) / (4 * math.prod(full["patch_size"]))) ** (1 / 3)
        low_spacing = [s * factor for s in spacing]
        low_shape = [max(int(round(m / factor)), 1) for m in median_shape]
        plans_configs["3d_lowres"] = plan_patch(low_shape, low_spacing, n_channels, n_classes, budget)
    # nnU-Net masks normalisation when cropping removed a lot (the rest is background, not anatomy)
    use_mask = float(np.median(fingerprint.crop_fractions or [1.0])) < 0.75
    normalization = []
    for name in dataset.channels:
        stats = fingerprint.channels.get(name, {})
        scheme = scheme_for_channel(name)
        if scheme == "zscore_nonzero" and not use_mask:
            scheme = "zscore"
        normalization.append({
            "channel": name, "scheme": scheme,
            "mean": stats.get("mean", 0.0), "std": stats.get("std", 1.0),
            "lower": stats.get("p00_5", 0.0), "upper": stats.get("p99_5", 0.0),
        })
    return schemas.Plans(
        dataset_name=dataset.name, device_budget=budget, channel_names=dataset.channels,
        labels=dict(dataset.labels), regions=dict(dataset.regions), normalization=normalization,
        configurations=plans_configs, default_configuration="3d_fullres", use_nonzero_mask=use_mask,
    )
