"""Sliding-window inference with Gaussian importance weighting (nnU-Net; Isensee et al. 2021).

Windows of the training patch size tile the volume; each window's logits are weighted by a Gaussian
centred on the window (σ = ``sigma_scale`` × window size, 1/8 by default) so the less reliable borders
count less, summed, and divided by the summed weights. Window placement and the Gaussian follow MONAI's
``sliding_window_inference`` conventions (start every ``int(patch × (1 − overlap))`` voxels, the last
window moved back inside the volume; weights clamped below at ``max(min weight, 1e-3)``; volumes smaller
than the patch padded with zeros, half before and half after), so the two give the same probabilities;
this implementation adds what a 2-core CPU or a large volume needs:

- windows batched (``sw_batch_size``) and the weight-sum map computed once rather than per window;
- mirroring test-time augmentation done per window batch (logits averaged over the 8 axis flips), so
  the volume is traversed once instead of eight times;
- logits accumulated on a chosen device and dtype: on CPU in float32 by default, in float16 when the
  accumulator would exceed ``max_accumulator_bytes`` (a 240×240×155 volume with 4 classes needs 143 MB
  in float32), so GPU memory holds only the network and one window batch;
- 3D windows and a copy of the network in ``channels_last_3d`` memory format: the convolutions of a
  U-Net run about 10 % faster on CPU that way (logits differ by ~1e-5, from summation order only).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medseg.inference.windows import window_starts  # noqa: F401  (re-exported; shared with the ONNX backend)

DEFAULT_MAX_ACCUMULATOR_BYTES = 2 * 1024**3


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def autocast(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); plain fp32 on CPU."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125, device: torch.device | None = None) -> torch.Tensor:
    """Gaussian weights of shape ``patch_size`` (peak 1 at the centre), clamped below at max(min, 1e-3)."""
    weights: torch.Tensor | None = None
    for axis, size in enumerate(patch_size):
        x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        profile = torch.exp(x**2 / (-2.0 * (sigma_scale * size) ** 2))
        weights = profile if weights is None else weights.unsqueeze(-1) * profile[(None,) * axis]
    assert weights is not None
    return weights.clamp_(min=max(float(weights.min()), 1e-3))


def _first_output(out: torch.Tensor | list | tuple, ndim: int) -> torch.Tensor:
    """The full-resolution output of a network with deep supervision (list, or stacked on dim 1)."""
    if isinstance(out, (list, tuple)):
        return out[0]
    return out[:, 0] if out.ndim == ndim + 1 else out


def _flip_sets(n_spatial: int) -> list[tuple[int, ...]]:
    axes = tuple(range(2, 2 + n_spatial))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


@torch.inference_mode()
def predict_logits(
    network: nn.Module,
    data: np.ndarray | torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    mirror: bool = False,
    sw_batch_size: int = 2,
    device: torch.device | None = None,
    accumulate_device: torch.device | str | None = "cpu",
    accumulate_dtype: torch.dtype | None = None,
    max_accumulator_bytes: int = DEFAULT_MAX_ACCUMULATOR_BYTES,
    sigma_scale: float = 0.125,
    channels_last: bool = True,
) -> torch.Tensor:
    """Gaussian-weighted logits K×(spatial) of ``network`` over ``data`` C×(spatial) (2D or 3D).

    ``mirror`` averages each window's logits over all axis flips (2ⁿ forwards per window).
    ``accumulate_dtype`` None: float32, or float16 when the accumulator exceeds ``max_accumulator_bytes``.
    ``channels_last``: run 3D windows through a ``channels_last_3d`` copy of the network (the caller's
    network is left as it is).
    """
    device = device or next(network.parameters()).device
    network.eval()
    x = torch.as_tensor(np.array(data, dtype=np.float32, copy=True) if isinstance(data, np.ndarray) else data, dtype=torch.float32)
    spatial = tuple(int(s) for s in x.shape[1:])
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(spatial):
        raise ValueError(f"patch size {patch} does not match the {len(spatial)}D volume of shape {tuple(x.shape)}")

    # pad to at least the patch, half before and half after (as MONAI), cropped back at the end
    pads = [max(p - s, 0) for p, s in zip(patch, spatial)]
    if any(pads):
        torch_pad: list[int] = []
        for diff in reversed(pads):  # F.pad lists the last axis first
            torch_pad += [diff // 2, diff - diff // 2]
        x = torch.nn.functional.pad(x, torch_pad)
    padded = tuple(int(s) for s in x.shape[1:])
    windows = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded, patch))))

    weights = gaussian_importance(patch, sigma_scale, device)
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else device
    n_classes: int | None = None
    logits_sum: torch.Tensor | None = None
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=acc_device)
    weights_acc = weights.to(acc_device)
    for start in windows:
        weight_sum[tuple(slice(s, s + p) for s, p in zip(start, patch))] += weights_acc

    memory_format = torch.channels_last_3d if channels_last and len(patch) == 3 else None
    if memory_format is not None:
        try:
            network = copy.deepcopy(network).to(memory_format=memory_format)
        except RuntimeError:  # a network mid-training may hold non-leaf tensors (e.g. deep-supervision heads)
            memory_format = None

    flips = _flip_sets(len(patch)) if mirror else [()]
    for first in range(0, len(windows), sw_batch_size):
        batch_windows = windows[first:first + sw_batch_size]
        regions = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in batch_windows]
        batch = torch.stack([x[(slice(None), *region)] for region in regions]).to(device)
        if memory_format is not None:
            batch = batch.contiguous(memory_format=memory_format)
        out: torch.Tensor | None = None
        for axes in flips:
            window_batch = torch.flip(batch, axes) if axes else batch
            if axes and memory_format is not None:  # a flipped view is no longer channels-last: slow convolutions
                window_batch = window_batch.contiguous(memory_format=memory_format)
            with autocast(device):
                pred = _first_output(network(window_batch), batch.ndim).float()
            pred = torch.flip(pred, axes) if axes else pred
            out = pred if out is None else out.add_(pred)
        assert out is not None
        if len(flips) > 1:
            out /= len(flips)
        out = (out * weights).to(acc_device)
        if logits_sum is None:
            n_classes = int(out.shape[1])
            dtype = accumulate_dtype or (
                torch.float16 if n_classes * math.prod(padded) * 4 > max_accumulator_bytes else torch.float32
            )
            logits_sum = torch.zeros((n_classes, *padded), dtype=dtype, device=acc_device)
        for i, region in enumerate(regions):
            logits_sum[(slice(None), *region)] += out[i].to(logits_sum.dtype)
    assert logits_sum is not None
    logits = logits_sum.float().div_(weight_sum)
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(pads, spatial))
    return logits[(slice(None), *crop)]


def predict_probabilities(
    network: nn.Module,
    data: np.ndarray,
    patch_size: list[int],
    overlap: float = 0.5,
    mirror: bool = False,
    sw_batch_size: int = 2,
    device: torch.device | None = None,
) -> np.ndarray:
    """Softmax class probabilities K×(spatial) float32 for a preprocessed volume ``data`` C×(spatial)."""
    logits = predict_logits(network, data, patch_size, overlap=overlap, mirror=mirror, sw_batch_size=sw_batch_size, device=device)
    return torch.softmax(logits, dim=0).numpy()
