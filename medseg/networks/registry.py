"""Networks chosen by name: the registry :data:`NETWORKS` and one entry point for the trainer.

- ``unet``: the plan-driven U-Net (nnU-Net's plain conv U-Net as MONAI ``DynUNet``, deep supervision when
  the plan says so); 2D when the topology's kernels have 2 entries. Input: each axis divisible by the
  product of the strides along it.
- ``resunet``: the same U-Net with residual encoder blocks (``DynUNet(res_block=True)``; seed report 004).
  Input: as ``unet``.
- ``unet2d``: a 2D U-Net applied slice by slice (slice tasks such as Kaggle LGG, seed report 002); a 3D
  topology loses its ``slice_axis``. Takes (B, C, X, Y) or (B, C, X, Y, Z). Input: in-plane axes as ``unet``.
- ``unetr``: UNETR (Hatamizadeh et al. 2022, WACV; MONAI ``UNETR``), a ViT encoder on 16³-voxel tokens with a
  convolutional decoder, the transformer hybrid of seed report 003. Input: exactly ``img_size`` (the patch
  size; sliding-window inference with the same patch satisfies it), each axis divisible by 16.
- ``swinunetr``: Swin UNETR (Hatamizadeh et al. 2022, BrainLes; MONAI ``SwinUNETR``), a shifted-window
  transformer encoder with a convolutional decoder. Input: each axis divisible by 32, one axis ≥ 64 in
  training (the instance norm of the 1/32 bottleneck needs more than one voxel).
- ``transunet``: a TransUNet-style hybrid (Chen et al. 2021/2023; seed report 003): the plan's U-Net encoder,
  a ViT over the tokens of the lowest feature map, the U-Net decoder with skips (:mod:`medseg.networks.transunet`).
  Input: as ``unet`` (each axis divisible by the product of the strides), at least two bottleneck tokens.
- ``classifier3d``: a 3D classification CNN after Liu et al. 2020 ("On the design of convolutional neural
  networks for automatic detection of Alzheimer's disease", ML4H workshop; seed report 000): instance norm,
  no early downsampling, a widening factor, optional age input concatenated before the head; logits over
  ``n_classes`` (CN, MCI, AD). Input: each axis ≥ 2**blocks. Its ``input_size`` (default: the patch size)
  and ``input_scale`` options say how a whole preprocessed volume becomes the network's input (one zoom
  factor for every case, then centre crop/pad: :func:`medseg.preprocessing.classifier_input.fit_volume`); the trainer
  fills them in, the predictor reads them back from the package.

The MONAI transformer networks need the ``einops`` package.

The trainer and the predictor need one call each::

    topology = network_topology(cfg.network, config.network, patch_size=config.patch_size, **cfg.network_options)
    network = build_network(topology)          # also what a model package stores and the predictor rebuilds

:func:`network_topology` resolves a name, the plan's topology (a :class:`~medseg.schemas.NetworkTopology` as a
dict) and options into a self-contained JSON-friendly dict (``name``, ``in_channels``, ``out_channels``, the
U-Net fields where they apply, ``options``), validating the options and the input size constraints with
clear errors; :func:`build_network` builds the module from it. Segmentation networks map (B, C, *S) to
logits (B, K, *S), deep-supervised U-Nets in training mode to a stack (B, 1 + heads, K, *S), full
resolution first; ``classifier3d`` maps (B, C, X, Y, Z) (+ age (B,) in years) to logits (B, n_classes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medseg.networks.transunet import TRANSUNET_OPTIONS, check_transunet_input, transunet_from_topology
from medseg.networks.unet import UNET_FAMILY, build_unet, topology_dims

ADNI_CLASSES = ("CN", "MCI", "AD")  # cognitively normal, mild cognitive impairment, Alzheimer's disease
UNETR_TOKEN = 16  # MONAI UNETR's fixed ViT patch (token) edge, voxels
SWIN_DIVISOR = 32  # Swin UNETR: patch embedding 2 × four 2× patch mergings → 2**5


@dataclass(frozen=True)
class NetworkSpec:
    """One registry entry: how to build a network from a resolved topology, and its options' defaults."""

    name: str
    summary: str
    task: str  # "segmentation" | "classification"
    needs_topology: bool  # needs the plan's U-Net fields (kernel_sizes, strides, features)
    options: Mapping[str, Any] = field(default_factory=dict)
    build: Callable[[dict[str, Any]], nn.Module] | None = None
    constraint: str = ""


# --------------------------------------------------------------------------- 2D slice-wise U-Net
def to_2d_topology(topology: Mapping[str, Any], slice_axis: int | None = None) -> dict[str, Any]:
    """A 2D U-Net topology: ``topology`` as it is when its kernels are 2D, else without ``slice_axis``
    (spatial index 0, 1 or 2; default ``topology["options"]["slice_axis"]`` or 2, the slice axis of the
    Kaggle LGG volumes (columns, rows, slices)) in every kernel and stride."""
    topo = dict(topology)
    if topology_dims(topology) == 2:
        return topo
    axis = int(slice_axis if slice_axis is not None else (topology.get("options") or {}).get("slice_axis", 2))
    if axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis), got {axis}")
    topo["kernel_sizes"] = [[k for a, k in enumerate(ks) if a != axis] for ks in topology["kernel_sizes"]]
    topo["strides"] = [[s for a, s in enumerate(ss) if a != axis] for ss in topology["strides"]]
    return topo


class SliceWise2D(nn.Module):
    """Applies a 2D network to every slice of a volume, so 3D patches and 3D sliding windows can feed it.

    (B, C, X, Y) → the 2D network's output unchanged. (B, C, *S) with three spatial axes → the slices along
    ``slice_axis`` are folded into the batch, (B·Z, C, X', Y'), and the output is unfolded back: logits
    (B, K, *S), or with deep supervision in training (B, 1 + heads, K, *S). A patch of thickness 1 along
    ``slice_axis`` (e.g. 256×256×1) is one 2D sample per patch, as a 2D nnU-Net trains.
    """

    def __init__(self, net2d: nn.Module, slice_axis: int = 2):
        super().__init__()
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis), got {slice_axis}")
        self.net2d = net2d
        self.slice_axis = slice_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.net2d(x)
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        a = 2 + self.slice_axis
        xs = x.movedim(a, 1)  # (B, Z, C, X', Y')
        b, z = xs.shape[:2]
        out = self.net2d(xs.reshape(b * z, *xs.shape[2:]))
        out = out.reshape(b, z, *out.shape[1:])  # (B, Z, K, X', Y') or (B, Z, S, K, X', Y')
        lead = out.ndim - 3  # axes before the two in-plane axes, after moving Z back to the end
        out = out.movedim(1, -1)  # (..., X', Y', Z)
        return out.movedim(-1, lead + self.slice_axis)


# --------------------------------------------------------------------------- 3D classification CNN
def age_encoding(age: torch.Tensor, dim: int = 16, min_period: float = 2.0, max_period: float = 240.0) -> torch.Tensor:
    """Sinusoidal encoding of age in years (B,) → (B, dim): sin and cos at ``dim // 2`` periods spaced
    geometrically from ``min_period`` to ``max_period`` years (the transformer positional encoding applied
    to age, as Liu et al. 2020 encode it before concatenating it to the image features)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"age encoding dimension must be even and ≥ 2, got {dim}")
    age = age.reshape(-1, 1).float()
    periods = torch.logspace(math.log10(min_period), math.log10(max_period), dim // 2, device=age.device)
    phase = 2 * math.pi * age / periods
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)


class Classifier3D(nn.Module):
    """3D CNN classifier for whole (skull-stripped, registered) volumes, after Liu et al. 2020.

    Design choices of the paper kept here: instance normalisation (not batch norm: small batches of large
    volumes), no early downsampling (the first 3×3×3 convolution runs at full resolution with stride 1;
    resolution is only halved by max pooling after each block), width multiplied by a widening factor
    (the paper's expansion factor, 8), and the subject's age encoded sinusoidally and concatenated to the
    pooled image features before the fully connected head.

    Layers: for each entry c of ``channels``: conv 3×3×3 (c_prev → c·widening) + instance norm (affine) +
    ReLU + max pool 3×3×3 stride 2; global average pool; linear → ``feature_dim`` + ReLU; [concatenate the
    age encoding]; dropout; linear → ``hidden`` + ReLU; linear → ``n_classes``.

    Args:
        in_channels: image channels C (1 for T1-weighted MRI).
        n_classes: output logits (3: CN, MCI, AD — :data:`ADNI_CLASSES`).
        widening: channel multiplier of every convolution.
        channels: base channels per block before widening.
        feature_dim: size of the image feature vector (seed 000: 1024).
        hidden: size of the hidden layer of the head (seed 000: 512).
        use_age: expect ``age`` (B,) in years in :meth:`forward`.
        age_dim: size of the age encoding.
        dropout: dropout probability in the head.

    Input (B, C, X, Y, Z), each axis ≥ 2**len(channels) voxels; output logits (B, n_classes).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 3, widening: int = 8, channels: Sequence[int] = (4, 32, 64, 64),
                 feature_dim: int = 1024, hidden: int = 512, use_age: bool = False, age_dim: int = 16, dropout: float = 0.5):
        super().__init__()
        if widening < 1 or not channels or n_classes < 1:
            raise ValueError(f"classifier3d needs widening ≥ 1, at least one block and n_classes ≥ 1 (got widening={widening}, channels={list(channels)}, n_classes={n_classes})")
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            width = int(c) * int(widening)
            layers += [nn.Conv3d(prev, width, kernel_size=3, padding=1, bias=False), nn.InstanceNorm3d(width, affine=True),
                       nn.ReLU(inplace=True), nn.MaxPool3d(kernel_size=3, stride=2, padding=1)]
            prev = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(prev, feature_dim), nn.ReLU(inplace=True))
        self.use_age, self.age_dim = bool(use_age), int(age_dim)
        head_in = feature_dim + (self.age_dim if self.use_age else 0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor, age: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"classifier3d expects (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        f = self.features(x)
        if self.use_age:
            if age is None:
                raise ValueError("this classifier was built with use_age=True: pass age (B,) in years")
            f = torch.cat([f, age_encoding(torch.as_tensor(age, device=x.device), self.age_dim).to(f.dtype)], dim=1)
        elif age is not None:
            raise ValueError("this classifier was built with use_age=False: it takes no age")
        return self.head(f)


# --------------------------------------------------------------------------- builders from a resolved topology
def _build_unet(topo: dict[str, Any]) -> nn.Module:
    return build_unet(topo)


def _build_unet2d(topo: dict[str, Any]) -> nn.Module:
    axis = int(topo["options"].get("slice_axis", 2))
    return SliceWise2D(build_unet(to_2d_topology(topo, axis)), axis)


def _require_einops(name: str) -> None:
    try:
        import einops  # noqa: F401  (MONAI's transformer blocks import it lazily and fail at build time)
    except ImportError:
        raise ImportError(f"network {name!r} needs the einops package (MONAI's optional dependency): pip install einops") from None


def _build_unetr(topo: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import UNETR

    _require_einops("unetr")
    o = topo["options"]
    return UNETR(in_channels=topo["in_channels"], out_channels=topo["out_channels"], img_size=tuple(o["img_size"]),
                 feature_size=o["feature_size"], hidden_size=o["hidden_size"], mlp_dim=o["mlp_dim"], num_heads=o["num_heads"],
                 norm_name=o["norm"], dropout_rate=o["dropout_rate"], spatial_dims=len(o["img_size"]))


def _build_swinunetr(topo: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    _require_einops("swinunetr")
    o = topo["options"]
    return SwinUNETR(in_channels=topo["in_channels"], out_channels=topo["out_channels"], feature_size=o["feature_size"],
                     depths=tuple(o["depths"]), num_heads=tuple(o["num_heads"]), window_size=o["window_size"],
                     norm_name=o["norm"], drop_rate=o["drop_rate"], attn_drop_rate=o["attn_drop_rate"], dropout_path_rate=o["dropout_path_rate"],
                     use_checkpoint=o["use_checkpoint"], spatial_dims=o["spatial_dims"], use_v2=o["use_v2"])


def _build_transunet(topo: dict[str, Any]) -> nn.Module:
    return transunet_from_topology(topo)


def _build_classifier3d(topo: dict[str, Any]) -> nn.Module:
    o = topo["options"]
    return Classifier3D(in_channels=topo["in_channels"], n_classes=topo["out_channels"], widening=o["widening"], channels=tuple(o["channels"]),
                        feature_dim=o["feature_dim"], hidden=o["hidden"], use_age=o["use_age"], age_dim=o["age_dim"], dropout=o["dropout"])


_UNET_OPTIONS = {"deep_supervision": None, "norm": None}  # None: the plan's value

NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec for spec in (
        NetworkSpec("unet", "plan-driven U-Net (DynUNet), 2D or 3D after the topology's kernels", "segmentation", True,
                    dict(_UNET_OPTIONS), _build_unet, "each spatial axis divisible by the product of the strides along it"),
        NetworkSpec("resunet", "plan-driven U-Net with residual blocks (DynUNet res_block=True)", "segmentation", True,
                    dict(_UNET_OPTIONS), _build_unet, "each spatial axis divisible by the product of the strides along it"),
        NetworkSpec("unet2d", "2D U-Net applied slice by slice (a 3D plan loses its slice axis)", "segmentation", True,
                    {**_UNET_OPTIONS, "slice_axis": 2, "residual": False}, _build_unet2d, "in-plane axes divisible by the product of the in-plane strides"),
        NetworkSpec("unetr", "UNETR: ViT encoder + convolutional decoder (MONAI)", "segmentation", False,
                    {"img_size": None, "feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "norm": "instance", "dropout_rate": 0.0},
                    _build_unetr, f"input exactly img_size (the patch size), each axis divisible by {UNETR_TOKEN}; hidden_size divisible by num_heads"),
        NetworkSpec("swinunetr", "Swin UNETR: shifted-window transformer encoder + convolutional decoder (MONAI)", "segmentation", False,
                    {"feature_size": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "norm": "instance", "drop_rate": 0.0,
                     "attn_drop_rate": 0.0, "dropout_path_rate": 0.0, "use_checkpoint": False, "spatial_dims": 3, "use_v2": False},
                    _build_swinunetr, f"each spatial axis divisible by {SWIN_DIVISOR} and one axis ≥ {2 * SWIN_DIVISOR} (the instance norm of the 1/{SWIN_DIVISOR} bottleneck needs more than one voxel in training); feature_size divisible by 12"),
        NetworkSpec("transunet", "TransUNet: the plan's U-Net encoder + ViT on the bottleneck tokens + U-Net decoder", "segmentation", True,
                    {k: v for k, v in TRANSUNET_OPTIONS.items()}, _build_transunet,
                    "each spatial axis divisible by the product of the strides along it, at least 2 bottleneck tokens; hidden_size divisible by num_heads"),
        NetworkSpec("classifier3d", "3D classification CNN (instance norm, no early downsampling, widening, optional age)", "classification", False,
                    {"widening": 8, "channels": [4, 32, 64, 64], "feature_dim": 1024, "hidden": 512, "use_age": False, "age_dim": 16, "dropout": 0.5,
                     "input_size": None, "input_scale": None},
                    _build_classifier3d, "each spatial axis ≥ 2**len(channels)"),
    )
}


def _spec(name: str) -> NetworkSpec:
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r} (known: {', '.join(NETWORKS)})")
    return NETWORKS[name]


def _check_divisible(name: str, size: Sequence[int], divisor: Sequence[int] | int, what: str) -> None:
    divs = [divisor] * len(size) if isinstance(divisor, int) else list(divisor)
    bad = [(int(n), int(d)) for n, d in zip(size, divs) if int(n) % int(d) or int(n) < int(d)]
    if bad:
        raise ValueError(f"{name}: patch size {list(size)} does not fit: {what} (per axis size/divisor that fail: {bad})")


def network_topology(name: str, topology: Mapping[str, Any] | None = None, *, in_channels: int | None = None, out_channels: int | None = None,
                     patch_size: Sequence[int] | None = None, **options: Any) -> dict[str, Any]:
    """Resolve a network name, the plan's topology and options into a self-contained topology dict.

    Args:
        name: a key of :data:`NETWORKS`.
        topology: the plan's ``Configuration.network`` (needed by the U-Net family; for the others only its
            ``in_channels``/``out_channels`` are used, and earlier ``options`` are kept).
        in_channels: image channels C; default ``topology["in_channels"]`` (classifier3d: 1).
        out_channels: logits K: classes (softmax losses), regions (``region_bce_dice``) or ``n_classes``;
            default ``topology["out_channels"]`` (classifier3d: 3).
        patch_size: the training patch (X, Y[, Z]) voxels: required by ``unetr`` (its fixed input size),
            checked against the constraints of every segmentation network.
        **options: network options (see ``NETWORKS[name].options``); unknown ones raise ``ValueError``.

    Returns:
        ``{"name", "in_channels", "out_channels", [U-Net fields], "options": {...}}``, JSON-friendly; pass it
        to :func:`build_network`, and store it in the model package so the predictor rebuilds the same network.

    Raises:
        ValueError: unknown name or option, missing topology or channels, or a patch size the network cannot take.
    """
    spec = _spec(name)
    base = dict(topology or {})
    prev_options = dict(base.get("options") or {}) if base.get("name", name) == name else {}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for network {name!r} (known: {sorted(spec.options)})")
    opts = {**spec.options, **{k: v for k, v in prev_options.items() if k in spec.options}, **options}
    default_in, default_out = (1, len(ADNI_CLASSES)) if spec.task == "classification" else (None, None)
    cin = in_channels if in_channels is not None else base.get("in_channels", default_in)
    cout = out_channels if out_channels is not None else base.get("out_channels", default_out)
    if cin is None or cout is None:
        raise ValueError(f"network {name!r} needs in_channels and out_channels (from the topology or as arguments)")
    out: dict[str, Any] = {"name": name, "in_channels": int(cin), "out_channels": int(cout)}

    if name == "transunet":
        missing = [k for k in ("kernel_sizes", "strides", "features") if k not in base]
        if missing:
            raise ValueError(f"network {name!r} is built from the plan's topology, which lacks {missing}")
        out.update({k: [list(map(int, v)) for v in base[k]] for k in ("kernel_sizes", "strides")})
        out["features"] = [int(f) for f in base["features"]]
        out["norm"] = base.get("norm", "instance") if opts["norm"] is None else opts["norm"]
        out["deep_supervision"] = False
        out["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items() if k != "norm"}
        if int(out["options"]["hidden_size"]) % int(out["options"]["num_heads"]):
            raise ValueError(f"transunet: hidden_size {out['options']['hidden_size']} is not divisible by num_heads {out['options']['num_heads']}")
        if patch_size is not None:
            check_transunet_input(list(patch_size), out["strides"])
        return out

    if spec.needs_topology:
        missing = [k for k in ("kernel_sizes", "strides", "features") if k not in base]
        if missing:
            raise ValueError(f"network {name!r} is built from the plan's topology, which lacks {missing}")
        out.update({k: [list(map(int, v)) for v in base[k]] for k in ("kernel_sizes", "strides")})
        out["features"] = [int(f) for f in base["features"]]
        out["deep_supervision"] = bool(base.get("deep_supervision", False) if opts["deep_supervision"] is None else opts["deep_supervision"])
        out["norm"] = base.get("norm", "instance") if opts["norm"] is None else opts["norm"]
        out["residual"] = name == "resunet" or (name == "unet2d" and bool(opts["residual"]))
        out["options"] = {"slice_axis": int(opts["slice_axis"]), "residual": out["residual"]} if name == "unet2d" else {}
        if name == "unet2d":
            flat = to_2d_topology(out)
            if patch_size is not None and len(patch_size) == 3:
                patch_size = [p for a, p in enumerate(patch_size) if a != out["options"]["slice_axis"]]
        else:
            flat = out
        if patch_size is not None:
            dims = topology_dims(flat)
            if len(patch_size) != dims:
                raise ValueError(f"{name}: patch size {list(patch_size)} has {len(patch_size)} axes, the topology {dims}")
            _check_divisible(name, patch_size, [math.prod(s[a] for s in flat["strides"]) for a in range(dims)], spec.constraint)
        return out

    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
    if name == "unetr":
        size = patch_size if patch_size is not None else opts["img_size"]
        if size is None:
            raise ValueError("unetr needs the patch size (its input size is fixed): pass patch_size or img_size")
        opts["img_size"] = [int(s) for s in size]
        if len(opts["img_size"]) not in (2, 3):
            raise ValueError(f"unetr: img_size must have 2 or 3 axes, got {opts['img_size']}")
        _check_divisible(name, opts["img_size"], UNETR_TOKEN, spec.constraint)
        if opts["hidden_size"] % opts["num_heads"]:
            raise ValueError(f"unetr: hidden_size {opts['hidden_size']} is not divisible by num_heads {opts['num_heads']}")
    elif name == "swinunetr":
        if patch_size is not None:
            opts["spatial_dims"] = len(patch_size)
            _check_divisible(name, patch_size, SWIN_DIVISOR, spec.constraint)
            if math.prod(int(p) // SWIN_DIVISOR for p in patch_size) < 2:
                raise ValueError(f"swinunetr: patch size {list(patch_size)} does not fit: {spec.constraint}")
        if opts["feature_size"] % 12:
            raise ValueError(f"swinunetr: feature_size must be divisible by 12, got {opts['feature_size']}")
        if len(opts["depths"]) != len(opts["num_heads"]):
            raise ValueError(f"swinunetr: depths {opts['depths']} and num_heads {opts['num_heads']} need one entry per stage")
    elif name == "classifier3d":
        opts["channels"] = [int(c) for c in opts["channels"]]
        size = opts["input_size"] if opts["input_size"] is not None else patch_size
        if size is not None:
            size = [int(s) for s in size]
            if len(size) != 3:
                raise ValueError(f"classifier3d: input_size must have 3 axes, got {size}")
            if min(size) < 2 ** len(opts["channels"]):
                raise ValueError(f"classifier3d: input {size} is too small for {len(opts['channels'])} pooling blocks ({spec.constraint})")
        opts["input_size"] = size
        if opts["input_scale"] is not None:
            opts["input_scale"] = float(opts["input_scale"])
            if not 0 < opts["input_scale"] < float("inf"):
                raise ValueError(f"classifier3d: input_scale must be > 0, got {opts['input_scale']}")
    out["options"] = opts
    return out


def accepted_patch(name: str, patch: Sequence[int], median_shape: Sequence[int] | None = None, strides: Sequence[Sequence[int]] | None = None) -> list[int] | None:
    """The patch (voxels per axis) network ``name`` trains on for a plan's ``patch``: the plan's own where the network
    takes it, else the smallest patch at least as large whose every axis fits the network's constraint; None when the
    network cannot run on this configuration (a 2D configuration for the 3D transformers).

    ``unetr``: each axis a multiple of 16 (its token edge). ``swinunetr``: each axis a multiple of 32, and more than one
    bottleneck voxel (the axis with the largest ``median_shape`` grows to 64 when every axis is 32). The U-Net family
    and ``transunet`` take the plan's patch (the planner made it divisible by the strides); ``transunet`` also needs two
    bottleneck tokens, which a patch of exactly the stride product lacks (its largest axis is doubled then).
    A patch larger than a case is padded by the sampler and the sliding window, as nnU-Net pads small images.
    """
    patch = [int(p) for p in patch]
    spec = _spec(name)
    if spec.task != "segmentation":
        return None
    if name in ("unetr", "swinunetr") and (len(patch) != 3 or min(patch) == 1):
        return None  # a 2D configuration (slices of thickness 1): the 3D transformers need volumes
    if name == "unetr":
        return [max(UNETR_TOKEN, -(-p // UNETR_TOKEN) * UNETR_TOKEN) for p in patch]
    if name == "swinunetr":
        out = [max(SWIN_DIVISOR, -(-p // SWIN_DIVISOR) * SWIN_DIVISOR) for p in patch]
        if math.prod(p // SWIN_DIVISOR for p in out) < 2:
            order = list(median_shape) if median_shape is not None else out
            axis = max(range(len(out)), key=lambda a: order[a])
            out[axis] = 2 * SWIN_DIVISOR
        return out
    if name == "transunet" and strides is not None:
        divisor = [math.prod(s[a] for s in strides) for a in range(len(patch))]
        if math.prod(p // d for p, d in zip(patch, divisor)) < 2:
            axis = max(range(len(patch)), key=lambda a: patch[a] // divisor[a] if divisor[a] else 0)
            patch[axis] *= 2
    return patch


def network_patch_sizes(configuration: Mapping[str, Any]) -> dict[str, list[int]]:
    """For a planned configuration (``plans.json``), the patch every segmentation network would train on, where it
    differs from the plan's (:func:`accepted_patch`); the planner records it as ``network_patch_sizes``."""
    patch = [int(p) for p in configuration["patch_size"]]
    strides = (configuration.get("network") or {}).get("strides")
    out = {}
    for name, spec in NETWORKS.items():
        if spec.task != "segmentation":
            continue
        fitted = accepted_patch(name, patch, configuration.get("median_shape"), strides)
        if fitted is not None and fitted != patch:
            out[name] = fitted
    return out


def build_network(topology: Mapping[str, Any], **options: Any) -> nn.Module:
    """The network ``topology["name"]`` (default ``"unet"``) names, built from a (plan or resolved) topology.

    ``options`` override ``topology["options"]``; see :func:`network_topology`. A plan's U-Net topology
    without ``name`` or ``options`` builds exactly the U-Net the planner counted.
    """
    # a plan topology without a name is a U-Net; ``residual: true`` there meant the residual variant
    name = topology.get("name") or ("resunet" if topology.get("residual") else "unet")
    resolved = network_topology(name, topology, **options)
    return _spec(name).build(resolved)  # type: ignore[misc]


def build_network_by_name(name: str, topology: Mapping[str, Any] | None = None, *, in_channels: int | None = None, out_channels: int | None = None,
                          patch_size: Sequence[int] | None = None, **options: Any) -> nn.Module:
    """``build_network(network_topology(name, topology, ...))``: the network ``name`` for a plan's topology."""
    topo = network_topology(name, topology, in_channels=in_channels, out_channels=out_channels, patch_size=patch_size, **options)
    return _spec(name).build(topo)  # type: ignore[misc]


def n_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a built network (all, or those with ``requires_grad``)."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


__all__ = ["ADNI_CLASSES", "accepted_patch", "network_patch_sizes", "NETWORKS", "UNET_FAMILY", "Classifier3D", "NetworkSpec", "SliceWise2D", "age_encoding", "build_network",
           "build_network_by_name", "n_parameters", "network_topology", "to_2d_topology"]
