"""The plan-driven U-Net, and what the planner needs to know about it without building it.

The segmentation network is nnU-Net's plain convolutional U-Net (Isensee et al. 2021, "nnU-Net: a
self-configuring method for deep learning-based biomedical image segmentation", Nature Methods),
instantiated as MONAI's ``DynUNet``: per stage two k×k(×k) convolutions (no bias) + instance norm + leaky
ReLU, strided convolution for downsampling, transposed convolution for upsampling, a 1×1(×1) output
convolution. The number of spatial dimensions follows the topology: 3-element kernels give a 3D U-Net,
2-element kernels a 2D one. With ``residual`` each encoder stage's two convolutions become a residual
block (He et al. 2016; the "residual 3D U-Net" of seed report 004), with a 1×1(×1) projection on the skip
path where the channels or the resolution change; the decoder keeps plain blocks (MONAI's DynUNet).

A topology is a :class:`~medseg.schemas.NetworkTopology` as a dict. :func:`build_network` builds any
network of :data:`medseg.networks.registry.NETWORKS` from it (by its ``name``, default ``"unet"``); the
counting functions here model the U-Net family (``unet``, ``resunet``, ``unet2d``) so the planner can size
patches without allocating anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

UNET_FAMILY = ("unet", "resunet", "unet2d")


def n_deep_supervision_heads(n_stages: int) -> int:
    """Extra low-resolution output heads of a deep-supervised U-Net with ``n_stages`` resolution stages.

    The two decoder stages below full resolution are supervised (nnU-Net supervises all but the two
    lowest; with our shallow CPU plans two extra heads is the useful maximum), at least one.
    """
    return max(1, min(2, n_stages - 2))


def topology_dims(topology: Mapping[str, Any]) -> int:
    """Spatial dimensions (2 or 3) of a U-Net topology: the length of its kernel sizes."""
    dims = {len(k) for k in topology["kernel_sizes"]} | {len(s) for s in topology["strides"]}
    if len(dims) != 1 or not dims <= {2, 3}:
        raise ValueError(f"kernel sizes and strides must all have 2 or 3 entries, got kernel_sizes={topology['kernel_sizes']} strides={topology['strides']}")
    return dims.pop()


def build_unet(topology: Mapping[str, Any], residual: bool | None = None) -> nn.Module:
    """A ``DynUNet`` from ``NetworkTopology`` fields.

    Args:
        topology: ``in_channels``, ``out_channels``, ``kernel_sizes`` and ``strides`` (one entry per stage,
            each of length 2 or 3), ``features`` (channels per stage), optional ``deep_supervision``,
            ``norm`` (default ``"instance"``, without affine parameters) and ``residual``.
        residual: overrides ``topology["residual"]``: residual blocks instead of plain conv blocks.

    Returns:
        A module mapping (B, C_in, X, Y[, Z]) to logits (B, C_out, X, Y[, Z]); in training mode with deep
        supervision a stack (B, 1 + heads, C_out, X, Y[, Z]), every head interpolated to full resolution,
        full resolution first (MONAI's convention). Each spatial size must be divisible by the product of
        the strides along its axis.
    """
    from monai.networks.nets import DynUNet

    dims = topology_dims(topology)
    strides = [list(s) for s in topology["strides"]]
    return DynUNet(
        spatial_dims=dims,
        in_channels=int(topology["in_channels"]),
        out_channels=int(topology["out_channels"]),
        kernel_size=[list(k) for k in topology["kernel_sizes"]],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(topology["features"]),
        norm_name=topology.get("norm", "instance"),
        deep_supervision=bool(topology.get("deep_supervision", False)),
        deep_supr_num=n_deep_supervision_heads(len(strides)),
        res_block=bool(topology.get("residual", False) if residual is None else residual),
    )


def build_network(topology: Mapping[str, Any], **options: Any) -> nn.Module:
    """The network a topology names (``topology["name"]``, default ``"unet"``), see
    :func:`medseg.networks.registry.build_network`. Kept here for the planner, the trainer and the predictor."""
    from medseg.networks.registry import build_network as _build

    return _build(topology, **options)


def count_parameters(topology: Mapping[str, Any]) -> int:
    """Parameter count of the network :func:`build_network` makes from ``topology``, without allocating it
    for the U-Net family (for other networks: built on the CPU and counted).

    conv (no bias): Π(k)·c_in·c_out. Encoder stage s: c_{s-1}→c_s and c_s→c_s. Decoder stage s:
    transposed conv c_{s+1}→c_s with the stride as kernel, then 2c_s→c_s and c_s→c_s. Output: 1×1(×1)
    c_0→classes with bias (and one per deep-supervision head). Residual encoder blocks add a 1×1(×1)
    projection c_in·c_out wherever the channels or the resolution change (DynUNet keeps plain blocks in
    the decoder). Instance norm without affine parameters adds none.
    """
    from medseg.networks.registry import build_network as _build
    from medseg.networks.registry import network_topology, to_2d_topology

    name = topology.get("name") or ("resunet" if topology.get("residual") else "unet")
    if name not in UNET_FAMILY:
        return int(sum(p.numel() for p in _build(topology).parameters()))
    topology = network_topology(name, topology)
    if name == "unet2d":
        topology = to_2d_topology(topology)
    residual = bool(topology["residual"])
    feats = list(topology["features"])
    kernels = topology["kernel_sizes"]
    strides = topology["strides"]
    cin = int(topology["in_channels"])
    total = 0
    for s, f in enumerate(feats):
        k = math.prod(kernels[s])
        prev = cin if s == 0 else feats[s - 1]
        total += k * prev * f + k * f * f
        if residual and (prev != f or any(st != 1 for st in strides[s])):
            total += prev * f
    for s in range(len(feats) - 1):
        k = math.prod(kernels[s + 1])
        total += math.prod(strides[s + 1]) * feats[s + 1] * feats[s]
        total += k * 2 * feats[s] * feats[s] + k * feats[s] * feats[s]
    n_out = int(topology["out_channels"])
    total += feats[0] * n_out + n_out
    if topology.get("deep_supervision"):  # one extra 1×1(×1) head per supervised decoder stage
        for s in range(1, 1 + n_deep_supervision_heads(len(feats))):
            total += feats[s] * n_out + n_out
    return int(total)


def count_activations(topology: Mapping[str, Any], patch_size: list[int]) -> int:
    """Feature-map elements stored for the backward pass of one sample (batch 1) of the plain U-Net.

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


def estimate_training_memory_gib(topology: Mapping[str, Any], patch_size: list[int], batch_size: int, bytes_per_activation: int = 4) -> float:
    """Estimated peak memory of one training step, GiB.

    activations × batch × bytes (4 fp32; 2 under AMP) + parameters × 4 bytes × 4 (weights, gradients,
    two optimiser moments) + a fixed 0.3 GiB for the framework's workspace (cuDNN, allocator slack).
    """
    act = count_activations(topology, patch_size) * batch_size * bytes_per_activation
    params = count_parameters(topology) * 4 * 4
    return (act + params) / 2**30 + 0.3


def channels_last(module: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA, convolutions run faster in channels-last layout (``channels_last_3d`` for 3D, ``channels_last``
    for 2D weights); on CPU it only costs copies. Networks mixing 2D and 3D convolutions are left as they are."""
    if device.type != "cuda":
        return module
    ranks = {p.dim() for p in module.parameters()} & {4, 5}
    if ranks == {5}:
        return module.to(memory_format=torch.channels_last_3d)
    if ranks == {4}:
        return module.to(memory_format=torch.channels_last)
    return module
