"""Networks built from a plan's topology.

The segmentation network is nnU-Net's plain convolutional U-Net (Isensee et al. 2021), instantiated as
MONAI's ``DynUNet``: per stage two 3×3×3 convolutions (no bias) + instance norm + leaky ReLU, strided
convolution for downsampling, transposed convolution for upsampling, a 1×1×1 output convolution.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_network(topology: dict[str, Any]) -> nn.Module:
    """A ``DynUNet`` from ``NetworkTopology`` fields. Input N×C×I×J×K → logits N×classes×I×J×K."""
    from monai.networks.nets import DynUNet

    strides = [list(s) for s in topology["strides"]]
    return DynUNet(
        spatial_dims=3,
        in_channels=int(topology["in_channels"]),
        out_channels=int(topology["out_channels"]),
        kernel_size=[list(k) for k in topology["kernel_sizes"]],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(topology["features"]),
        norm_name=topology.get("norm", "instance"),
        deep_supervision=bool(topology.get("deep_supervision", False)),
        deep_supr_num=max(1, min(2, len(strides) - 2)),
        res_block=bool(topology.get("residual", False)),
    )


def count_parameters(topology: dict[str, Any]) -> int:
    """Parameter count of :func:`build_network`'s U-Net, from the topology alone (no allocation).

    conv (no bias): k_I·k_J·k_K·c_in·c_out. Encoder stage s: c_{s-1}→c_s and c_s→c_s. Decoder stage s:
    transposed conv c_{s+1}→c_s with the stride as kernel, then 2c_s→c_s and c_s→c_s. Output: 1×1×1
    c_0→classes with bias (and one per deep-supervision head). Instance norm without affine parameters adds none.
    """
    feats = list(topology["features"])
    kernels = topology["kernel_sizes"]
    strides = topology["strides"]
    cin = int(topology["in_channels"])
    total = 0
    for s, f in enumerate(feats):
        k = math.prod(kernels[s])
        prev = cin if s == 0 else feats[s - 1]
        total += k * prev * f + k * f * f
    for s in range(len(feats) - 1):
        k = math.prod(kernels[s + 1])
        total += math.prod(strides[s + 1]) * feats[s + 1] * feats[s]
        total += k * 2 * feats[s] * feats[s] + k * feats[s] * feats[s]
    n_out = int(topology["out_channels"])
    total += feats[0] * n_out + n_out
    if topology.get("deep_supervision"):  # one extra 1×1×1 head per supervised decoder stage
        for s in range(1, 1 + max(1, min(2, len(feats) - 2))):
            total += feats[s] * n_out + n_out
    return int(total)


def count_activations(topology: dict[str, Any], patch_size: list[int]) -> int:
    """Feature-map elements stored for the backward pass of one sample (batch 1).

    Per convolution we count its output, the norm output and the activation output (3 tensors of
    c_s × voxels_s); a decoder stage adds the transposed-convolution output and the concatenation.
    This mirrors what autograd keeps for conv–norm–ReLU stacks closely enough to plan a patch size.
    """
    feats = list(topology["features"])
    strides = topology["strides"]
    voxels = []
    shape = list(patch_size)
    for s in range(len(feats)):
        shape = [max(1, n // st) for n, st in zip(shape, strides[s])]
        voxels.append(math.prod(shape))
    total = int(topology["in_channels"]) * math.prod(patch_size)
    for s, f in enumerate(feats):
        total += 2 * 3 * f * voxels[s]
    for s in range(len(feats) - 1):
        f = feats[s]
        total += f * voxels[s] + 2 * f * voxels[s] + 2 * 3 * f * voxels[s]
    total += int(topology["out_channels"]) * voxels[0] * 2  # logits and softmax for the loss
    return int(total)


def estimate_training_memory_gib(topology: dict[str, Any], patch_size: list[int], batch_size: int, bytes_per_activation: int = 4) -> float:
    """Estimated peak memory of one training step, GiB.

    activations × batch × bytes (4 fp32; 2 under AMP) + parameters × 4 bytes × 4 (weights, gradients,
    two optimiser moments) + a fixed 0.3 GiB for the framework's workspace (cuDNN, allocator slack).
    """
    act = count_activations(topology, patch_size) * batch_size * bytes_per_activation
    params = count_parameters(topology) * 4 * 4
    return (act + params) / 2**30 + 0.3


def channels_last(module: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA, 3D convolutions run faster in channels_last_3d layout; on CPU it only costs copies."""
    if device.type == "cuda":
        return module.to(memory_format=torch.channels_last_3d)
    return module
