"""Sliding-window inference with Gaussian importance weighting (nnU-Net, MONAI).

Windows of the training patch size tile the volume with ``overlap``; each window's logits are weighted
by a Gaussian centred on the window (σ = 1/8 of its size) so the less reliable borders count less.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


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


@torch.inference_mode()
def predict_probabilities(network: nn.Module, data: np.ndarray, patch_size: list[int], overlap: float = 0.5, mirror: bool = False, sw_batch_size: int = 2, device: torch.device | None = None) -> np.ndarray:
    """Softmax class probabilities K×I×J×K for a preprocessed volume ``data`` C×I×J×K.

    Volumes smaller than the patch are padded by MONAI and cropped back. ``mirror`` averages over the 8
    axis flips (test-time augmentation, 8× the cost).
    """
    from monai.inferers import sliding_window_inference

    device = device or next(network.parameters()).device
    network.eval()
    x = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))[None].to(device)  # mmap arrays are read-only

    def forward(window: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            out = network(window)
        if isinstance(out, (list, tuple)) or (out.ndim == window.ndim + 1):  # deep supervision stack
            out = out[0] if isinstance(out, (list, tuple)) else out[:, 0]
        return out.float()

    flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if mirror else [])
    total = None
    for axes in flips:
        xin = torch.flip(x, axes) if axes else x
        logits = sliding_window_inference(xin, roi_size=list(patch_size), sw_batch_size=sw_batch_size, predictor=forward, overlap=overlap, mode="gaussian", sigma_scale=0.125)
        probs = torch.softmax(logits, dim=1)
        probs = torch.flip(probs, axes) if axes else probs
        total = probs if total is None else total + probs
    return (total / len(flips))[0].cpu().numpy()
