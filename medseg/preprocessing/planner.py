"""Experiment planning: from a fingerprint to ``plans.json`` under a device budget.

Follows nnU-Net's rules (Isensee et al. 2021, "nnU-Net: a self-configuring method for deep learning-based
biomedical image segmentation", and its v2 ``ExperimentPlanner``):

- target spacing: the per-axis median spacing. When the coarsest axis is > 3× the largest other spacing
  *and* has < 1/3 of the voxels of the others (median shape after cropping), that axis takes the 10th
  percentile of its spacings instead (keeps more slices on anisotropic data), never below the other axes.
- configurations: ``3d_fullres`` at the target spacing (unless the data are 2D: a median shape of 1 voxel
  along an axis); ``3d_lowres`` when the full-resolution patch covers < 25 % of the median image: the
  spacing grows by 3 % steps (anisotropic axes first, until within 2× of the others) until the patch
  covers ≥ 25 %, dropped when the low-resolution image is not at least 2× smaller; ``2d``: slices along
  the coarsest axis (the singleton axis of 2D data), in-plane at the target spacing, the spacing between
  slices left as it is. All applicable ones are planned; which are preprocessed (and trained) is the
  ``configurations`` parameter, recorded as ``trained_configurations``.
- topology: downsample an axis by 2 while its feature map stays ≥ 4 voxels and its spacing is at most
  twice the finest current spacing (so anisotropic axes are pooled later); 3×3(×3) kernels, 1 along an
  axis > 3× coarser than the finest (and along the slice axis of ``2d``); features double per stage up
  to a cap.
- patch size: start from a box isotropic in mm with 256³ (3D) or 2048² (2D) voxels, clipped to the
  median shape; shrink the axis largest relative to the median shape until the budget holds at batch 2.
- network patch sizes: the transformer networks take only some sizes (UNETR multiples of 16, Swin UNETR of
  32); each configuration records the patch each of them trains on (``network_patch_sizes``), the smallest
  that fits at least the U-Net's patch (:func:`medseg.networks.registry.accepted_patch`).
- batch size: as large as the budget allows (GPU) or nnU-Net's reference batch (CPU: 2 in 3D, 12 in 2D),
  capped so that one batch covers at most 5 % of the dataset's voxels, never below 2.
- normalisation (per channel, from ``dataset.json`` channel names, see
  :mod:`~medseg.preprocessing.normalization`): z-score inside the nonzero mask when cropping to nonzero
  reduced the median image to < 75 % of its voxels (nnU-Net's ``use_mask_for_norm``), else over the image.

Budgets: ``gpu:<GiB>`` estimates training memory (:func:`~medseg.networks.unet.estimate_training_memory_gib`,
fp16 activations) and keeps it under the budget (nnU-Net's reference: 8 GiB → ~112³ patches with
32…320 features); ``cpu`` bounds compute instead: 16…128 features and at most 64³ voxels per 3D patch
(128² per 2D patch), a network that trains to useful Dice in minutes on 2 cores (nnU-Net's default plan
takes ~66 s per step there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.preprocessing.normalization import scheme_for_channel
from medseg.preprocessing.resampling import ANISOTROPY_THRESHOLD, shape_for_spacing

MIN_FEATURE_MAP = 4
MAX_STAGES = {"3d": 6, "2d": 7}
INITIAL_PATCH_VOXELS = {"3d": 256**3, "2d": 2048**2}
CPU_MAX_PATCH_VOXELS = {"3d": 64**3, "2d": 128**2}
REFERENCE_BATCH = {"3d": 2, "2d": 12}
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05
LOWRES_CREATION_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


def parse_budget(budget: str) -> tuple[str, float]:
    """``"cpu"`` → ("cpu", 0); ``"gpu:8"`` → ("gpu", 8.0) (GiB)."""
    if budget == "cpu":
        return "cpu", 0.0
    if budget.startswith("gpu:"):
        try:
            gib = float(budget.split(":", 1)[1])
        except ValueError:
            gib = -1
        if gib > 0 and math.isfinite(gib):
            return "gpu", gib
    raise MedsegError(f"device budget {budget!r} not understood: use 'cpu' or 'gpu:<GiB>' (e.g. gpu:8)")


def target_spacing(spacings: list[list[float]], shapes_after_crop: list[list[int]] | None = None, threshold: float = ANISOTROPY_THRESHOLD) -> list[float]:
    """Full-resolution target spacing (mm) from per-case ``spacings`` (N×3) and shapes after cropping (N×3).

    Median spacing; nnU-Net's anisotropy rule for the coarsest axis (see the module docstring). Without
    ``shapes_after_crop`` the voxel-count condition is taken as met.
    """
    arr = np.asarray(spacings, dtype=float)
    target = np.median(arr, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(arr.shape[1]) if a != worst]
    max_other = max(target[a] for a in others)
    aniso_spacing = target[worst] > threshold * max_other
    if shapes_after_crop is not None:
        sizes = np.median(np.asarray(shapes_after_crop, dtype=float), axis=0)
        aniso_voxels = sizes[worst] * threshold < min(sizes[a] for a in others)
    else:
        aniso_voxels = True
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(arr[:, worst], 10))
        if low < max_other:  # never finer than the other axes
            low = max(max_other, low) + 1e-5
        target[worst] = low
    return [float(t) for t in target]


def topology_for_patch(patch: list[int], spacing: list[float], in_channels: int, n_classes: int, base_features: int, max_features: int, deep_supervision: bool, slice_axis: int | None = None) -> dict[str, Any]:
    """Strides, kernels and features for ``patch`` (voxels) at ``spacing`` (mm), nnU-Net's pooling rule.

    ``slice_axis`` (2D configurations): that axis gets kernel 1 and stride 1 at every stage.
    """
    axes = [a for a in range(3) if a != slice_axis]
    current_spacing = [float(s) for s in spacing]
    current_shape = [int(p) for p in patch]

    def kernels_for(sp: list[float]) -> list[int]:
        finest = min(sp[a] for a in axes)
        return [1 if (a == slice_axis or sp[a] / finest > ANISOTROPY_THRESHOLD) else 3 for a in range(3)]

    strides, kernels = [[1, 1, 1]], [kernels_for(current_spacing)]
    for _ in range(MAX_STAGES["2d" if slice_axis is not None else "3d"] - 1):
        finest = min(current_spacing[a] for a in axes)
        stride = [2 if (a != slice_axis and current_shape[a] >= 2 * MIN_FEATURE_MAP and current_spacing[a] <= 2 * finest) else 1 for a in range(3)]
        if stride == [1, 1, 1]:
            break
        current_shape = [n // st for n, st in zip(current_shape, stride)]
        current_spacing = [s * st for s, st in zip(current_spacing, stride)]
        strides.append(stride)
        kernels.append(kernels_for(current_spacing))
    features = [min(base_features * 2**i, max_features) for i in range(len(strides))]
    return schemas.NetworkTopology(
        name="unet", in_channels=in_channels, out_channels=n_classes, kernel_sizes=kernels, strides=strides,
        features=features, deep_supervision=deep_supervision,
    ).__dict__


def _divisor(topology: dict[str, Any]) -> list[int]:
    return [math.prod(s[a] for s in topology["strides"]) for a in range(3)]


def initial_patch(median_shape: list[int], spacing: list[float], slice_axis: int | None = None) -> list[int]:
    """A box isotropic in mm with nnU-Net's starting voxel count, clipped to ``median_shape``."""
    kind = "2d" if slice_axis is not None else "3d"
    axes = [a for a in range(3) if a != slice_axis]
    inv = {a: 1.0 / spacing[a] for a in axes}
    scale = (INITIAL_PATCH_VOXELS[kind] / math.prod(inv.values())) ** (1 / len(axes))
    patch = [1] * 3
    for a in axes:
        patch[a] = max(1, min(int(round(inv[a] * scale)), int(median_shape[a])))
    return patch


def plan_patch(median_shape: list[int], spacing: list[float], in_channels: int, n_classes: int, budget: str, slice_axis: int | None = None, n_cases: int | None = None) -> dict[str, Any]:
    """A :class:`~medseg.schemas.Configuration` (as dict) fitting ``budget``.

    ``median_shape`` (voxels at ``spacing``, mm) is the median image after cropping and resampling;
    ``slice_axis`` makes it a 2D configuration; ``n_cases`` (the dataset size) caps the batch at 5 % of the
    dataset's voxels.

    Raises:
        MedsegError: for a budget that is not understood or too small for any patch.
    """
    # the networks module imports torch: imported here, so that preprocessing a case for inference (the torch-free
    # model server imports this module through medseg.preprocessing.preprocess) never needs it
    from medseg.networks.unet import count_parameters, estimate_training_memory_gib

    kind, gib = parse_budget(budget)
    dim = "2d" if slice_axis is not None else "3d"
    base, cap = (32, 320 if dim == "3d" else 512) if kind == "gpu" else (16, 128)
    bytes_per_activation = 2 if kind == "gpu" else 4
    deep_supervision = kind == "gpu"
    axes = [a for a in range(3) if a != slice_axis]
    patch = initial_patch(median_shape, spacing, slice_axis)
    for _ in range(1000):
        topo = topology_for_patch(patch, spacing, in_channels, n_classes, base, cap, deep_supervision, slice_axis)
        div = _divisor(topo)
        patch = [max(d, int(math.ceil(p / d) * d)) for p, d in zip(patch, div)]
        mem = estimate_training_memory_gib(topo, patch, MIN_BATCH, bytes_per_activation)
        fits = mem <= gib if kind == "gpu" else math.prod(patch) <= CPU_MAX_PATCH_VOXELS[dim]
        if fits:
            break
        shrinkable = [a for a in axes if patch[a] > div[a]]
        if not shrinkable:
            raise MedsegError(f"no patch fits the device budget {budget!r} (smallest patch {patch} needs {mem:.2f} GiB)")
        # shrink the axis largest relative to the median shape, by one step of its divisor
        axis = max(shrinkable, key=lambda a: patch[a] / max(median_shape[a], 1))
        patch[axis] = max(patch[axis] - div[axis], div[axis])
    else:
        raise MedsegError(f"no patch fits the device budget {budget!r}")
    batch = _batch_size(kind, gib, dim, topo, patch, bytes_per_activation)
    if n_cases:
        covered = int(round(MAX_DATASET_COVERED * n_cases * math.prod(median_shape) / math.prod(patch)))
        batch = max(min(batch, covered), MIN_BATCH)
    mem = estimate_training_memory_gib(topo, patch, batch, bytes_per_activation)
    return schemas.Configuration(
        spacing=[float(s) for s in spacing], patch_size=[int(p) for p in patch], batch_size=int(batch),
        median_shape=[int(m) for m in median_shape], network=topo, n_parameters=count_parameters(topo),
        estimated_memory_gib=round(mem, 3), slice_axis=slice_axis,
    ).__dict__


def _batch_size(kind: str, gib: float, dim: str, topo: dict[str, Any], patch: list[int], bytes_per_activation: int) -> int:
    if kind == "cpu":
        return REFERENCE_BATCH[dim]
    from medseg.networks.unet import estimate_training_memory_gib  # torch: see plan_patch

    batch = MIN_BATCH
    while batch < 512 and estimate_training_memory_gib(topo, patch, batch + 1, bytes_per_activation) <= gib:
        batch += 1
    return batch


def _median_shape(fingerprint: schemas.Fingerprint, spacing: list[float]) -> list[int]:
    shapes = [shape_for_spacing(s, sp, spacing) for s, sp in zip(fingerprint.shapes_after_crop, fingerprint.spacings)]
    return [int(v) for v in np.median(np.asarray(shapes, dtype=float), axis=0)]


def plan_lowres(full: dict[str, Any], median_shape: list[int], in_channels: int, n_classes: int, budget: str, n_cases: int) -> dict[str, Any] | None:
    """nnU-Net's 3d_lowres search (module docstring), or None when not needed or not worth it."""
    full_spacing = np.asarray(full["spacing"], dtype=float)
    median = np.asarray(median_shape, dtype=float)
    if math.prod(full["patch_size"]) / math.prod(median_shape) >= LOWRES_CREATION_THRESHOLD:
        return None
    spacing = full_spacing.copy()
    low, low_median = None, median
    for _ in range(500):
        ratio = spacing.max() / spacing
        if np.any(ratio > 2):
            spacing[ratio > 2] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        low_median = full_spacing / spacing * median
        low = plan_patch([max(int(round(m)), 1) for m in low_median], list(spacing), in_channels, n_classes, budget, n_cases=n_cases)
        if math.prod(low["patch_size"]) / math.prod(low_median) >= LOWRES_CREATION_THRESHOLD:
            break
    if low is None or math.prod(median) / math.prod(low_median) < 2:
        return None
    return low


def make_plans(fingerprint: schemas.Fingerprint, dataset: schemas.DatasetJson, budget: str = "cpu", configurations: tuple[str, ...] = ("3d_fullres",)) -> schemas.Plans:
    """``plans.json`` for ``dataset`` from its fingerprint.

    ``configurations``: the ones to preprocess and train (recorded as ``trained_configurations``; ones
    that do not apply to this dataset are left out, and a 2D dataset falls back to ``2d``).

    Raises:
        MedsegError: for an unknown configuration name or an unusable budget.
    """
    unknown = [c for c in configurations if c not in CONFIGURATIONS]
    if unknown:
        raise MedsegError(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGURATIONS)}")
    parse_budget(budget)
    spacing = target_spacing(fingerprint.spacings, fingerprint.shapes_after_crop)
    median_shape = _median_shape(fingerprint, spacing)
    n_channels, n_classes, n_cases = len(dataset.channel_names), dataset.n_classes, len(fingerprint.spacings)
    flat_axes = [a for a in range(3) if median_shape[a] == 1]
    planned: dict[str, dict[str, Any]] = {}
    if not flat_axes:
        full = plan_patch(median_shape, spacing, n_channels, n_classes, budget, n_cases=n_cases)
        planned["3d_fullres"] = full
        low = plan_lowres(full, median_shape, n_channels, n_classes, budget, n_cases)
        if low is not None:
            planned["3d_lowres"] = low
    slice_axis = flat_axes[0] if flat_axes else int(np.argmax(spacing))
    planned["2d"] = plan_patch(median_shape, spacing, n_channels, n_classes, budget, slice_axis=slice_axis, n_cases=n_cases)
    from medseg.networks.registry import network_patch_sizes

    for config in planned.values():  # the patch each network with size constraints of its own trains on
        config["network_patch_sizes"] = network_patch_sizes(config)
    default = "3d_fullres" if "3d_fullres" in planned else "2d"
    trained = [c for c in configurations if c in planned] or [default]
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
        configurations={k: planned[k] for k in CONFIGURATIONS if k in planned}, default_configuration=default,
        use_nonzero_mask=use_mask, trained_configurations=trained,
    )
