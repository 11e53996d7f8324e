"""TransUNet: a convolutional U-Net whose bottleneck is a Vision Transformer (2D or 3D).

After Chen et al. 2021, "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation"
(arXiv 2102.04306), and its 3D successor Chen et al. 2023, "3D TransUNet: Advancing Medical Image
Segmentation through Vision Transformers" (arXiv 2310.07781), in the configuration with the transformer in
the encoder (seed report 003, brain-metastasis segmentation). Our own implementation, sized by the plan's
U-Net topology so that it is a drop-in alternative to the plan-driven U-Net:

- **CNN encoder** (nnU-Net style): one stage per entry of ``kernel_sizes``/``strides``/``features``; stage
  ``s`` is conv(k_s, stride s_s) → norm → LeakyReLU(0.01) → conv(k_s) → norm → LeakyReLU, so downsampling is
  the strided first convolution (stage 0 has stride 1). Convolutions have no bias; ``norm="instance"`` is
  instance norm without affine parameters, as MONAI's ``DynUNet`` of the plan's U-Net.
- **Tokens**: the lowest-resolution feature map (B, F_last, *S_b), S_b = S / (product of the strides), is
  flattened to one token per bottleneck voxel (B, N = ΠS_b, F_last) and projected linearly to
  ``hidden_size`` — the hybrid CNN-ViT embedding of TransUNet with a 1×1(×1) "patch", so every input size
  the U-Net takes gives a valid token grid and no voxel is dropped.
- **Positional information**: a fixed sinusoidal encoding per axis (the transformer's sin/cos of Vaswani et
  al. 2017 applied separately to the x, y (and z) bottleneck index, concatenated along the channels, zero-
  padded to ``hidden_size``), added to the projected tokens. Chosen over a learned table interpolated to the
  grid because (1) it needs no reference grid size, so the network is built from the topology alone (no
  patch size) and takes any input the strides allow; (2) positions are in bottleneck voxels, not
  normalised to [0, 1], so a larger input (whole-volume inference) *extends* the encoding instead of
  stretching it: the same anatomy offset gets the same relative phase whatever the input size, which
  matches what sliding-window training and inference see; (3) sin/cos dot products depend on relative
  offsets, which is what attention between lesion and context needs; (4) no parameters to under-train on
  small medical datasets. Wavelengths run geometrically from 2π to 2π·:data:`POSITION_TEMPERATURE`
  bottleneck voxels (100: a few hundred voxels, beyond any bottleneck grid).
- **Transformer**: ``num_layers`` pre-norm encoder blocks (x + MHSA(LN(x)); x + MLP(LN(x)), GELU MLP of
  ``mlp_ratio``·hidden_size), ``dropout`` on the embedding, the attention output projection and the MLP,
  ``attention_dropout`` on the attention weights; a final LayerNorm. ``num_layers=0`` is allowed as an
  ablation (a per-token MLP bottleneck, no global mixing).
- **Back to the grid**: linear hidden_size → F_last, reshaped to (B, F_last, *S_b), then conv(k_last) → norm
  → LeakyReLU (TransUNet's "conv_more").
- **U-Net decoder**: for each stage from the bottleneck up, a transposed convolution with kernel = stride =
  the stride of the stage below (F_{s+1} → F_s), concatenation with the encoder skip of stage ``s``
  (→ 2F_s), two conv(k_s) → norm → LeakyReLU; a 1×1(×1) convolution (with bias) to ``out_channels`` logits
  at full resolution. (The decoder convolution at stage ``s`` uses that stage's kernel k_s, as nnU-Net.)

No deep supervision: the output is always logits (B, K, *S).

Constraints: each spatial axis a positive multiple of the product of the strides along it
(:func:`transunet_divisor`), and at least 2 bottleneck tokens (:func:`check_transunet_input`); attention
memory grows with N², N = the number of bottleneck voxels (384 for a 64×64×12 patch with divisor 8×8×2).

Uses only torch (and the standard library).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: default options of :func:`transunet_from_topology` (``topology["options"]``); ``norm: None`` = the
#: topology's ``norm`` (default ``"instance"``).
TRANSUNET_OPTIONS: dict[str, Any] = {
    "hidden_size": 192,
    "num_layers": 4,
    "num_heads": 6,
    "mlp_ratio": 4.0,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "norm": None,
}

#: longest wavelength of the sinusoidal positional encoding, in units of 2π bottleneck voxels
POSITION_TEMPERATURE = 100.0

NORMS = ("instance", "batch")
LEAKY_SLOPE = 0.01  # nnU-Net's LeakyReLU negative slope


# --------------------------------------------------------------------------- input constraints
def _as_int_lists(name: str, value: Sequence[Sequence[int]]) -> list[list[int]]:
    try:
        return [[int(v) for v in entry] for entry in value]
    except TypeError:
        raise ValueError(f"transunet: {name} must be a list of per-stage lists, got {value!r}") from None


def transunet_divisor(strides: Sequence[Sequence[int]]) -> list[int]:
    """Per spatial axis the product of the strides of all stages: every input axis must be a multiple of it.

    Args:
        strides: per stage the stride along each spatial axis, e.g. ``[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]]``.

    Returns:
        One divisor per axis (voxels), e.g. ``[8, 8, 2]``.
    """
    st = _as_int_lists("strides", strides)
    if not st:
        raise ValueError("transunet: strides needs at least one stage")
    dims = {len(s) for s in st}
    if len(dims) != 1:
        raise ValueError(f"transunet: every stride must have the same number of axes, got {st}")
    n = dims.pop()
    return [math.prod(s[a] for s in st) for a in range(n)]


def check_transunet_input(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """Check that a patch (or any input's spatial shape) fits a TransUNet with these strides.

    Args:
        patch_size: spatial size (X, Y[, Z]) in voxels.
        strides: per stage strides, as in the plan's topology.

    Returns:
        The bottleneck grid (voxels per axis): one transformer token per bottleneck voxel.

    Raises:
        ValueError: a different number of axes, an axis that is not a positive multiple of the product of
            the strides along it, or fewer than 2 bottleneck tokens (attention needs context, and instance
            norm in training needs more than one voxel).
    """
    size = [int(p) for p in patch_size]
    div = transunet_divisor(strides)
    if len(size) != len(div):
        raise ValueError(f"transunet: patch size {size} has {len(size)} axes, the strides {len(div)}")
    bad = [a for a, (p, d) in enumerate(zip(size, div)) if p < d or p % d]
    if bad:
        raise ValueError(f"transunet: patch size {size} does not fit: each axis must be a positive multiple of the product of the "
                         f"strides along it, divisor {div} (failing axes {bad}: {[(size[a], div[a]) for a in bad]})")
    grid = [p // d for p, d in zip(size, div)]
    if math.prod(grid) < 2:
        raise ValueError(f"transunet: patch size {size} with divisor {div} leaves a bottleneck of {grid} = {math.prod(grid)} token; "
                         f"the transformer needs at least 2 (use a larger patch or fewer downsampling stages)")
    return grid


# --------------------------------------------------------------------------- positional encoding
def sinusoidal_position_encoding(grid: Sequence[int], dim: int, temperature: float = POSITION_TEMPERATURE,
                                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 2D/3D sin/cos positional encoding of a token grid.

    Each of the ``len(grid)`` axes gets ``f = dim // (2·len(grid))`` frequencies ω_k = temperature^(-k/f),
    k = 0…f-1, applied to the integer index along that axis (bottleneck voxels): channels
    [sin(ω·x), cos(ω·x), sin(ω·y), cos(ω·y), …], the remainder (``dim`` not a multiple of 2·len(grid))
    zero.

    Args:
        grid: tokens per axis, e.g. the bottleneck shape (8, 8, 6).
        dim: channels (the transformer's hidden size), ≥ 2·len(grid).

    Returns:
        (N, dim), N = Πgrid, tokens in row-major (C) order of the grid, as ``flatten`` orders them.
    """
    n_axes = len(grid)
    f = dim // (2 * n_axes)
    if f < 1:
        raise ValueError(f"transunet: hidden_size {dim} is too small for a {n_axes}D positional encoding (need ≥ {2 * n_axes})")
    omega = temperature ** (-torch.arange(f, device=device, dtype=torch.float32) / f)  # (f,)
    coords = torch.meshgrid(*[torch.arange(int(n), device=device, dtype=torch.float32) for n in grid], indexing="ij")
    parts = []
    for c in coords:
        phase = c.reshape(-1, 1) * omega  # (N, f)
        parts += [torch.sin(phase), torch.cos(phase)]
    pe = torch.cat(parts, dim=1)
    if pe.shape[1] < dim:
        pe = F.pad(pe, (0, dim - pe.shape[1]))
    return pe.to(dtype)


# --------------------------------------------------------------------------- building blocks
def _conv_cls(dims: int) -> tuple[type[nn.Module], type[nn.Module]]:
    return (nn.Conv3d, nn.ConvTranspose3d) if dims == 3 else (nn.Conv2d, nn.ConvTranspose2d)


def _norm(norm: str, dims: int, channels: int) -> nn.Module:
    if norm == "instance":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels)  # affine=False, as DynUNet
    return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)


class ConvNormAct(nn.Module):
    """conv (no bias, 'same' padding for odd kernels, optional stride) → norm → LeakyReLU(0.01)."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int] | int = 1, norm: str = "instance"):
        super().__init__()
        conv, _ = _conv_cls(dims)
        self.conv = conv(c_in, c_out, kernel_size=tuple(kernel), stride=stride, padding=tuple(k // 2 for k in kernel), bias=False)
        self.norm = _norm(norm, dims, c_out)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D) → (B, N, D) (scaled dot product, Vaswani et al. 2017)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_dropout = float(attention_dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d_h)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=self.attention_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class TransformerBlock(nn.Module):
    """Pre-norm ViT encoder block (Dosovitskiy et al. 2021): x + MHSA(LN(x)), then x + MLP(LN(x)); GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, attention_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- the network
class TransUNet(nn.Module):
    """TransUNet (Chen et al. 2021, arXiv 2102.04306; 3D: Chen et al. 2023, arXiv 2310.07781): a U-Net
    from the plan's topology with a ViT on the tokens of its lowest-resolution feature map. See the module
    docstring for the architecture and the choice of positional encoding.

    Args:
        in_channels: image channels C.
        out_channels: logits K (classes for softmax losses, regions for sigmoid ones).
        kernel_sizes: per stage the convolution kernel per spatial axis (2 or 3 entries each, odd).
        strides: per stage the downsampling stride per axis; the first stage's must be all 1.
        features: per stage the channels of the convolutions (F_0 … F_last).
        hidden_size: transformer width D (divisible by ``num_heads``, ≥ 2 × spatial dims).
        num_layers: transformer blocks (0: no attention, an ablation).
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        dropout: dropout on the token embedding, attention output and MLP.
        attention_dropout: dropout on the attention weights.
        norm: ``"instance"`` (no affine parameters) or ``"batch"`` for the convolutions.

    Input (B, C, *S), S = (X, Y[, Z]) voxels, each axis a positive multiple of :func:`transunet_divisor`
    (strides) with at least 2 bottleneck tokens; output logits (B, K, *S).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 features: Sequence[int], hidden_size: int = 192, num_layers: int = 4, num_heads: int = 6, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, attention_dropout: float = 0.0, norm: str = "instance"):
        super().__init__()
        kernels = _as_int_lists("kernel_sizes", kernel_sizes)
        st = _as_int_lists("strides", strides)
        feats = [int(f) for f in features]
        if not (len(kernels) == len(st) == len(feats)) or len(feats) < 2:
            raise ValueError(f"transunet: kernel_sizes, strides and features need one entry per stage and at least 2 stages, "
                             f"got {len(kernels)}, {len(st)} and {len(feats)}")
        dims_set = {len(k) for k in kernels} | {len(s) for s in st}
        if len(dims_set) != 1 or not dims_set <= {2, 3}:
            raise ValueError(f"transunet: kernel sizes and strides must all have 2 or 3 entries, got kernel_sizes={kernels} strides={st}")
        dims = dims_set.pop()
        if any(s != 1 for s in st[0]):
            raise ValueError(f"transunet: the first stage runs at full resolution, its stride must be all 1, got {st[0]}")
        if any(v < 1 for s in st for v in s) or any(k < 1 or k % 2 == 0 for ks in kernels for k in ks):
            raise ValueError(f"transunet: strides must be ≥ 1 and kernel sizes odd, got strides={st} kernel_sizes={kernels}")
        if min(feats) < 1 or int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"transunet: channels must be ≥ 1, got in_channels={in_channels} out_channels={out_channels} features={feats}")
        if int(num_heads) < 1 or int(hidden_size) % int(num_heads):
            raise ValueError(f"transunet: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if int(hidden_size) < 2 * dims:
            raise ValueError(f"transunet: hidden_size {hidden_size} is too small for a {dims}D positional encoding (need ≥ {2 * dims})")
        if int(num_layers) < 0 or float(mlp_ratio) <= 0:
            raise ValueError(f"transunet: num_layers must be ≥ 0 and mlp_ratio > 0, got {num_layers} and {mlp_ratio}")
        for what, p in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"transunet: {what} must be in [0, 1), got {p}")
        norm = str(norm).lower()
        if norm not in NORMS:
            raise ValueError(f"transunet: norm must be one of {NORMS}, got {norm!r}")

        self.dims, self.kernel_sizes, self.strides, self.features = dims, kernels, st, feats
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.hidden_size, self.num_layers, self.num_heads = int(hidden_size), int(num_layers), int(num_heads)
        _, tconv = _conv_cls(dims)

        self.encoder = nn.ModuleList()
        prev = self.in_channels
        for k, s, f in zip(kernels, st, feats):
            self.encoder.append(nn.Sequential(ConvNormAct(dims, prev, f, k, s, norm), ConvNormAct(dims, f, f, k, 1, norm)))
            prev = f

        self.embed = nn.Linear(feats[-1], self.hidden_size)
        self.embed_drop = nn.Dropout(float(dropout))
        self.blocks = nn.ModuleList(TransformerBlock(self.hidden_size, self.num_heads, float(mlp_ratio), float(dropout), float(attention_dropout))
                                    for _ in range(self.num_layers))
        self.token_norm = nn.LayerNorm(self.hidden_size)
        self.unembed = nn.Linear(self.hidden_size, feats[-1])
        self.conv_more = ConvNormAct(dims, feats[-1], feats[-1], kernels[-1], 1, norm)

        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for s in range(len(feats) - 2, -1, -1):  # from just above the bottleneck to full resolution
            up = tuple(st[s + 1])
            self.upsample.append(tconv(feats[s + 1], feats[s], kernel_size=up, stride=up, bias=False))
            self.decoder.append(nn.Sequential(ConvNormAct(dims, 2 * feats[s], feats[s], kernels[s], 1, norm),
                                              ConvNormAct(dims, feats[s], feats[s], kernels[s], 1, norm)))
        conv, _ = _conv_cls(dims)
        self.head = conv(feats[0], self.out_channels, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and name.startswith("blocks."):
                nn.init.trunc_normal_(m.weight, std=0.02)  # ViT initialisation inside the transformer
                nn.init.zeros_(m.bias)
            # embed/unembed keep PyTorch's default (fan-in scaled) so features and positions are of similar size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) image → (B, K, *S) logits; see the class docstring for the size constraints."""
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"transunet: expected (B, {self.in_channels}, {'X, Y, Z' if self.dims == 3 else 'X, Y'}), got shape {tuple(x.shape)}")
        check_transunet_input(x.shape[2:], self.strides)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        b, c, *grid = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, F_last), N = Π grid, row-major
        h = self.embed(tokens) + sinusoidal_position_encoding(grid, self.hidden_size, device=x.device, dtype=tokens.dtype)
        h = self.embed_drop(h)
        for block in self.blocks:
            h = block(h)
        h = self.unembed(self.token_norm(h))  # (B, N, F_last)
        x = self.conv_more(h.transpose(1, 2).reshape(b, c, *grid))
        for up, dec, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def transunet_from_topology(topology: Mapping[str, Any]) -> TransUNet:
    """A :class:`TransUNet` from a plan-style topology dict.

    Args:
        topology: ``in_channels``, ``out_channels``, ``kernel_sizes``, ``strides``, ``features`` (the plan's
            U-Net fields), optional ``norm`` (default ``"instance"``), and optional ``options`` overriding
            :data:`TRANSUNET_OPTIONS` (``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_ratio``,
            ``dropout``, ``attention_dropout``, ``norm``). ``deep_supervision`` is ignored (no deep supervision).

    Raises:
        ValueError: missing fields, unknown options, ``hidden_size`` not divisible by ``num_heads``, or any
            other invalid setting (see :class:`TransUNet`).
    """
    missing = [k for k in ("in_channels", "out_channels", "kernel_sizes", "strides", "features") if k not in topology]
    if missing:
        raise ValueError(f"transunet: the topology lacks {missing}")
    given = dict(topology.get("options") or {})
    unknown = sorted(set(given) - set(TRANSUNET_OPTIONS))
    if unknown:
        raise ValueError(f"transunet: unknown option(s) {unknown} (known: {sorted(TRANSUNET_OPTIONS)})")
    o = {**TRANSUNET_OPTIONS, **given}
    if int(o["num_heads"]) < 1 or int(o["hidden_size"]) % int(o["num_heads"]):
        raise ValueError(f"transunet: hidden_size {o['hidden_size']} is not divisible by num_heads {o['num_heads']}")
    norm = o["norm"] if o["norm"] is not None else topology.get("norm", "instance")
    return TransUNet(in_channels=int(topology["in_channels"]), out_channels=int(topology["out_channels"]),
                     kernel_sizes=topology["kernel_sizes"], strides=topology["strides"], features=topology["features"],
                     hidden_size=int(o["hidden_size"]), num_layers=int(o["num_layers"]), num_heads=int(o["num_heads"]),
                     mlp_ratio=float(o["mlp_ratio"]), dropout=float(o["dropout"]), attention_dropout=float(o["attention_dropout"]), norm=norm)


__all__ = ["POSITION_TEMPERATURE", "TRANSUNET_OPTIONS", "TransUNet", "TransformerBlock", "check_transunet_input",
           "sinusoidal_position_encoding", "transunet_divisor", "transunet_from_topology"]
