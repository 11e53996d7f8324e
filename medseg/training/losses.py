"""Segmentation and classification losses, chosen by name: the registry :data:`LOSSES` and :func:`build_loss`.

Contract. Segmentation losses take logits (B, K, X, Y[, Z]) and integer labels (B, 1, X, Y[, Z]) and return
a scalar; ``ce`` and ``focal`` also take classification logits (B, K) with labels (B,) or (B, 1). Softmax
losses expect K = the number of labels (background included); ``region_bce_dice`` expects one sigmoid
output per region (K = R) and converts the label map to region targets itself. Deep supervision is the
trainer's business (a loss sees one output at a time).

=====================  =====================================================================================
``dice_ce`` (default)  soft Dice (foreground classes, batch Dice) + cross-entropy, as nnU-Net trains
                       (Isensee et al. 2021), MONAI ``DiceCELoss``
``dice``               soft Dice alone (Milletari et al. 2016, V-Net), MONAI ``DiceLoss``
``ce``                 cross-entropy (segmentation per voxel, or classification per sample)
``jaccard``            soft Jaccard distance 1 − ΣPT / (ΣP² + ΣT² − ΣPT) (seed report 001)
``focal``              focal loss −α_t (1 − p_t)^γ log p_t (Lin et al. 2017, "Focal loss for dense object
                       detection", ICCV); γ = 0 without α is cross-entropy
``hausdorff_dt``       distance-transform Hausdorff loss (Karimi & Salcudean 2019, IEEE TMI, "Reducing the
                       Hausdorff distance in medical image segmentation with CNNs"), one binary loss per
                       foreground label, averaged
``dice_ce_hausdorff``  ``dice_ce`` + λ × ``hausdorff_dt``, λ ramped from 0 to ``hausdorff_weight`` over the first
                       ``ramp`` share of the epochs (seed report 003)
``region_bce_dice``    region-based training of overlapping regions (dataset.json ``regions``): sigmoid per
                       region, binary cross-entropy + soft Dice per region, as nnU-Net trains BraTS
=====================  =====================================================================================

``class_weights`` (optional, one per output channel K, background first; for ``region_bce_dice`` one per
region) weight the classes in the cross-entropy / focal terms (α_t) and in the mean over classes of the
overlap terms. :func:`medseg.task.labels_to_regions` and :func:`medseg.task.regions_to_labels` convert
between label maps and region targets / region probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.task import labels_to_regions, region_signatures, regions_to_labels  # noqa: F401  (re-exported: the losses build region targets)

SMOOTH = 1e-5  # added to numerator and denominator of the overlap ratios (nnU-Net and MONAI default)


# --------------------------------------------------------------------------- helpers
def _as_index_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Integer labels (B, *S) from (B, 1, *S) or (B, *S) targets (classification: (B,) or (B, 1))."""
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"expected integer labels (B, 1, ...) for logits {tuple(logits.shape)}, got target {tuple(target.shape)}")
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)} (expected (B, 1, *S) labels)")
    return target.long()


def _one_hot(index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(B, *S) labels → (B, K, *S) float one-hot."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_classes):
        raise ValueError(f"labels must be in 0..{n_classes - 1} for {n_classes} output channels, got {int(index.min())}..{int(index.max())}")
    return F.one_hot(index, n_classes).movedim(-1, 1).float()


def _class_weights(weights: Sequence[float] | torch.Tensor | None, n: int, like: torch.Tensor, what: str = "output channels") -> torch.Tensor | None:
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32, device=like.device)
    if w.ndim != 1 or w.numel() != n:
        raise ValueError(f"class_weights must have one entry per {what} ({n}), got {list(w.shape)} entries")
    if (w < 0).any():
        raise ValueError("class_weights must be ≥ 0")
    return w


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-class values (..., C) with optional class weights (C,)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum(-1).mean() / weights.sum().clamp_min(1e-12)


# --------------------------------------------------------------------------- distribution losses
class CrossEntropy(nn.Module):
    """Cross-entropy −Σ_c t_c log softmax(z)_c, mean over voxels (or samples).

    Args:
        class_weights: rescaling weight per class (K,); the mean is then Σ w_t·ℓ / Σ w_t (PyTorch's convention).
        label_smoothing: PyTorch's label smoothing ε ∈ [0, 1).

    Shapes: logits (B, K, *S) with labels (B, 1, *S) or (B, *S); logits (B, K) with labels (B,) or (B, 1).
    """

    def __init__(self, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.class_weights, self.label_smoothing = class_weights, float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = _as_index_target(logits, target)
        w = _class_weights(self.class_weights, logits.shape[1], logits)
        return F.cross_entropy(logits.float(), index, weight=w, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017, ICCV, eq. 5): FL(p_t) = −α_t (1 − p_t)^γ log p_t, p_t = softmax(z)_target.

    The modulating factor (1 − p_t)^γ down-weights well-classified voxels so training concentrates on hard
    ones; γ = 2 is the paper's default. With ``class_weights`` as α the mean is Σ α_t·FL / Σ α_t, so
    ``gamma=0`` gives exactly :class:`CrossEntropy` with the same weights.

    Shapes: as :class:`CrossEntropy`.
    """

    def __init__(self, gamma: float = 2.0, class_weights: Sequence[float] | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be ≥ 0, got {gamma}")
        self.gamma, self.class_weights = float(gamma), class_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = _as_index_target(logits, target)
        logp = F.log_softmax(logits.float(), dim=1)
        logp_t = logp.gather(1, index.unsqueeze(1)).squeeze(1)
        loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t if self.gamma else -logp_t
        w = _class_weights(self.class_weights, logits.shape[1], logits)
        if w is None:
            return loss.mean()
        w_t = w[index]
        return (w_t * loss).sum() / w_t.sum().clamp_min(1e-12)


# --------------------------------------------------------------------------- overlap losses
class SoftJaccardLoss(nn.Module):
    """Soft Jaccard (IoU) distance over softmax probabilities P and one-hot targets T (seed report 001):

        J_c = (Σ P_c T_c + s) / (Σ P_c² + Σ T_c² − Σ P_c T_c + s)     (``squared=True``, the report's form)
        J_c = (Σ P_c T_c + s) / (Σ P_c + Σ T_c − Σ P_c T_c + s)       (``squared=False``)
        loss = 1 − mean_c J_c

    With the same sums, soft Dice D_c = 2ΣPT / (ΣP(²) + ΣT(²)) and J_c = D_c / (2 − D_c), the identity of the
    hard scores (up to the smoothing s = 1e-5).

    Args:
        include_background: include class 0 in the mean (default no, like ``dice``).
        batch: sum over the batch before the ratio (batch Dice/Jaccard, nnU-Net's default for 3D), else
            one ratio per sample, averaged.
        squared: squared denominators (see above).
        class_weights: weight per class K (background first) in the mean over classes.
    """

    def __init__(self, include_background: bool = False, batch: bool = True, squared: bool = True, smooth: float = SMOOTH, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.include_background, self.batch, self.squared, self.smooth, self.class_weights = include_background, batch, squared, float(smooth), class_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = _as_index_target(logits, target)
        k = logits.shape[1]
        probs = torch.softmax(logits.float(), dim=1)
        onehot = _one_hot(index, k)
        w = _class_weights(self.class_weights, k, logits)
        if not self.include_background:
            probs, onehot, w = probs[:, 1:], onehot[:, 1:], (w[1:] if w is not None else None)
        dims = [0, *range(2, probs.ndim)] if self.batch else list(range(2, probs.ndim))
        inter = (probs * onehot).sum(dims)
        p = (probs**2 if self.squared else probs).sum(dims)
        t = onehot.sum(dims)  # T is binary: ΣT² = ΣT
        jaccard = (inter + self.smooth) / (p + t - inter + self.smooth)
        return _weighted_mean(1 - jaccard, w)


def _monai_weight(class_weights: Sequence[float] | None) -> torch.Tensor | None:
    return None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)


def dice_loss(include_background: bool = False, batch: bool = True, squared: bool = False, class_weights: Sequence[float] | None = None) -> nn.Module:
    """Soft Dice loss 1 − mean_c (2ΣPT + s) / (ΣP + ΣT + s) on softmax probabilities (Milletari et al. 2016),
    MONAI ``DiceLoss``; ``class_weights`` (K, background first) weight the per-class terms."""
    from monai.losses import DiceLoss

    w = _monai_weight(class_weights)
    if w is not None and not include_background:
        w = w[1:]
    return DiceLoss(to_onehot_y=True, softmax=True, include_background=include_background, batch=batch, squared_pred=squared, weight=w)


def dice_ce_loss(include_background: bool = False, batch: bool = True, lambda_dice: float = 1.0, lambda_ce: float = 1.0, class_weights: Sequence[float] | None = None) -> nn.Module:
    """nnU-Net's default loss (Isensee et al. 2021): λ_dice·soft Dice (foreground, batch Dice) + λ_ce·CE,
    MONAI ``DiceCELoss``; ``class_weights`` (K, background first) weight CE and, without the background, Dice."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background, batch=batch,
                      lambda_dice=lambda_dice, lambda_ce=lambda_ce, weight=_monai_weight(class_weights))


class _FloatInput(nn.Module):
    """Casts logits to float32 (MONAI losses under autocast) and checks the label shape."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = _as_index_target(logits, target)
        return self.loss(logits.float(), index.unsqueeze(1))


# --------------------------------------------------------------------------- Hausdorff distance loss
def boundary_distance(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Unsigned distance of every voxel to the boundary of a binary ``mask`` (*S), in voxels or, with
    ``spacing``, in mm: inside, the distance to the nearest background voxel; outside, to the nearest
    foreground voxel (Karimi & Salcudean 2019, the distance map d_p). All zeros when the mask is empty or
    full (no boundary). Exact Euclidean distance transform (scipy), float32."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, np.float32)
    inside = distance_transform_edt(mask, sampling=spacing)
    outside = distance_transform_edt(~mask, sampling=spacing)
    return (inside + outside).astype(np.float32)


class HausdorffDTLoss(nn.Module):
    """Distance-transform Hausdorff loss (Karimi & Salcudean 2019, IEEE TMI 39(2), eq. 8):

        Loss_DT(q, p) = 1/|Ω| Σ_Ω (p − q)² ∘ (d_p^α + d_q^α)

    p: the binary reference of one label, q: its predicted probability (softmax), d_p / d_q: unsigned
    distance maps to the boundaries of p and of the thresholded prediction q > 0.5 (:func:`boundary_distance`,
    computed with scipy on the CPU for every batch, without gradient), α = 2 as in the paper. Errors far
    from the reference boundary cost ∝ distance^α, which is what the Hausdorff distance measures.
    Multi-label: one binary loss per label (foreground only unless ``include_background``), averaged
    (weighted by ``class_weights``, K entries background first). With regions (``sigmoid=True``) the
    outputs are per-region sigmoid probabilities and the target is (B, R, *S) binary or an integer label map
    converted with ``regions``.

    Scale: distances in voxels (or mm with ``spacing``), so the loss grows with the square of the error
    distance and is not bounded by 1; combine it with an overlap loss and a weight (``dice_ce_hausdorff``).
    Cost: 2 Euclidean distance transforms per label and sample per step.
    """

    def __init__(self, alpha: float = 2.0, include_background: bool = False, spacing: Sequence[float] | None = None,
                 class_weights: Sequence[float] | None = None, sigmoid: bool = False, regions: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        self.alpha, self.include_background, self.spacing = float(alpha), include_background, spacing
        self.class_weights, self.sigmoid, self.regions = class_weights, sigmoid, regions

    @torch.no_grad()
    def _distances(self, ref: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) binary reference and prediction → d_p^α + d_q^α, same shape, float32."""
        ref_np, pred_np = ref.detach().cpu().numpy().astype(bool), pred.detach().cpu().numpy().astype(bool)
        out = np.empty(ref_np.shape, np.float32)
        for b in range(ref_np.shape[0]):
            for c in range(ref_np.shape[1]):
                out[b, c] = boundary_distance(ref_np[b, c], self.spacing) ** self.alpha + boundary_distance(pred_np[b, c], self.spacing) ** self.alpha
        return torch.from_numpy(out).to(ref.device)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        w = _class_weights(self.class_weights, k, logits)
        if self.sigmoid:
            probs = torch.sigmoid(logits.float())
            if target.is_floating_point():
                ref = target.float()
            else:
                if self.regions is None:
                    raise ValueError("hausdorff_dt with sigmoid=True needs region targets (B, R, ...) as floats, or `regions` to convert a label map")
                ref = labels_to_regions(target, self.regions)
        else:
            probs = torch.softmax(logits.float(), dim=1)
            ref = _one_hot(_as_index_target(logits, target), k)
            if not self.include_background:
                probs, ref, w = probs[:, 1:], ref[:, 1:], (w[1:] if w is not None else None)
        if ref.shape != probs.shape:
            raise ValueError(f"target {tuple(ref.shape)} does not match the outputs {tuple(probs.shape)}")
        dist = self._distances(ref, probs > 0.5)
        per_class = ((ref - probs) ** 2 * dist).mean(dim=[0, *range(2, probs.ndim)])
        return _weighted_mean(per_class, w)


class WeightedSum(nn.Module):
    """Σ_i w_i · loss_i(logits, target) (e.g. ``dice_ce`` + λ·``hausdorff_dt``).

    ``ramps`` (optional, one per loss): the share of training over which that loss's weight grows linearly from 0
    to ``w_i`` (0 or None: the full weight from the start). The trainer calls :meth:`set_epoch` at the start of every
    epoch; until then (and outside a trainer) the weights are the full ones.
    """

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float], ramps: Sequence[float | None] | None = None):
        super().__init__()
        if len(losses) != len(weights) or (ramps is not None and len(ramps) != len(weights)):
            raise ValueError("one weight (and one ramp) per loss")
        self.losses = nn.ModuleList(losses)
        self.full_weights = [float(w) for w in weights]
        self.ramps = [float(r or 0.0) for r in (ramps or [None] * len(weights))]
        if any(not 0.0 <= r <= 1.0 for r in self.ramps):
            raise ValueError(f"ramps are shares of the training, in [0, 1]: got {self.ramps}")
        self.weights = list(self.full_weights)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Weights of ``epoch`` (0-based) of ``epochs``: w_i · min(1, epoch / (ramp_i · epochs)) for a ramped loss."""
        self.weights = [w if r <= 0 else w * min(1.0, epoch / max(r * epochs, 1e-9)) for w, r in zip(self.full_weights, self.ramps)]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(logits, target) for w, loss in zip(self.weights, self.losses) if w)  # type: ignore[return-value]


def dice_ce_hausdorff_loss(hausdorff_weight: float = 0.1, alpha: float = 2.0, spacing: Sequence[float] | None = None, class_weights: Sequence[float] | None = None,
                           ramp: float = 0.5) -> nn.Module:
    """``dice_ce`` + λ(epoch) × ``hausdorff_dt``, the combination seed report 003 adapts from Karimi & Salcudean 2019
    (who train the HD loss together with a Dice term). The HD term is in squared voxels, so its raw value dwarfs
    the Dice/CE terms early in training, when the predicted boundaries are far off; its weight λ therefore starts at
    0 and grows linearly to ``hausdorff_weight`` over the first ``ramp`` share of the epochs (the schedule of the
    boundary loss, Kervadec et al. 2019, MIDL: overlap first, boundary distances once the masks are roughly right;
    ``ramp: 0`` gives the full weight from the first epoch). 0.1 keeps the HD term from dominating on 64³ patches."""
    if hausdorff_weight < 0:
        raise ValueError(f"hausdorff_weight must be ≥ 0, got {hausdorff_weight}")
    return WeightedSum([_FloatInput(dice_ce_loss(class_weights=class_weights)), HausdorffDTLoss(alpha=alpha, spacing=spacing, class_weights=class_weights)],
                       [1.0, hausdorff_weight], [None, ramp])


# --------------------------------------------------------------------------- region-based training (BraTS)
class RegionBCEDiceLoss(nn.Module):
    """Region-based loss for overlapping regions (BraTS WT ⊃ TC ⊃ ET), as nnU-Net trains BraTS
    (Isensee et al. 2021, "nnU-Net for brain tumor segmentation", BrainLes 2020): one sigmoid output per
    region, λ_bce·binary cross-entropy (mean over voxels and regions) + λ_dice·(1 − mean_r soft Dice_r), Dice
    with the background excluded by construction (regions are foreground) and summed over the batch.

    Args:
        regions: name → labels in output-channel order (dataset.json ``regions``).
        batch: batch Dice (sums over the batch), else per-sample Dice averaged.
        class_weights: one weight per region in both means.

    Shapes: logits (B, R, *S); target an integer label map (B, 1, *S) (converted with
    :func:`labels_to_regions`) or float region targets (B, R, *S).
    """

    def __init__(self, regions: Mapping[str, Sequence[int]] | None = None, batch: bool = True, lambda_bce: float = 1.0, lambda_dice: float = 1.0,
                 smooth: float = SMOOTH, class_weights: Sequence[float] | None = None):
        super().__init__()
        if not regions:
            raise ValueError("region_bce_dice needs regions=dataset.json `regions` (name → the label values each region unites)")
        self.regions = {str(k): [int(v) for v in vs] for k, vs in regions.items()}
        self.batch, self.lambda_bce, self.lambda_dice, self.smooth, self.class_weights = batch, float(lambda_bce), float(lambda_dice), float(smooth), class_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r = len(self.regions)
        if logits.shape[1] != r:
            raise ValueError(f"region_bce_dice needs one output channel per region ({r}: {', '.join(self.regions)}), got {logits.shape[1]}")
        ref = target.float() if target.is_floating_point() else labels_to_regions(target, self.regions)
        if ref.shape != logits.shape:
            raise ValueError(f"target {tuple(ref.shape)} does not match logits {tuple(logits.shape)}")
        logits = logits.float()
        w = _class_weights(self.class_weights, r, logits, "region")
        spatial = list(range(2, logits.ndim))
        bce = F.binary_cross_entropy_with_logits(logits, ref, reduction="none").mean(dim=[0, *spatial])
        probs = torch.sigmoid(logits)
        dims = [0, *spatial] if self.batch else spatial
        dice = (2 * (probs * ref).sum(dims) + self.smooth) / (probs.sum(dims) + ref.sum(dims) + self.smooth)
        return self.lambda_bce * _weighted_mean(bce, w) + self.lambda_dice * _weighted_mean(1 - dice, w)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class LossSpec:
    """One registry entry: a factory taking the options, their defaults, and what the network must output."""

    name: str
    factory: Callable[..., nn.Module]
    options: Mapping[str, Any] = field(default_factory=dict)
    activation: str = "softmax"  # "softmax": K = labels; "sigmoid": K = regions
    tasks: tuple[str, ...] = ("segmentation",)
    summary: str = ""


def _wrapped(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def make(**options: Any) -> nn.Module:
        return _FloatInput(factory(**options))

    return make


LOSSES: dict[str, LossSpec] = {
    spec.name: spec for spec in (
        LossSpec("dice_ce", _wrapped(dice_ce_loss), {"include_background": False, "batch": True, "lambda_dice": 1.0, "lambda_ce": 1.0, "class_weights": None},
                 summary="soft Dice + cross-entropy (nnU-Net)"),
        LossSpec("dice", _wrapped(dice_loss), {"include_background": False, "batch": True, "squared": False, "class_weights": None}, summary="soft Dice"),
        LossSpec("ce", CrossEntropy, {"class_weights": None, "label_smoothing": 0.0}, tasks=("segmentation", "classification"), summary="cross-entropy"),
        LossSpec("jaccard", SoftJaccardLoss, {"include_background": False, "batch": True, "squared": True, "smooth": SMOOTH, "class_weights": None},
                 summary="soft Jaccard distance"),
        LossSpec("focal", FocalLoss, {"gamma": 2.0, "class_weights": None}, tasks=("segmentation", "classification"), summary="focal loss (Lin et al. 2017)"),
        LossSpec("hausdorff_dt", HausdorffDTLoss, {"alpha": 2.0, "include_background": False, "spacing": None, "class_weights": None, "sigmoid": False, "regions": None},
                 summary="distance-transform Hausdorff loss (Karimi & Salcudean 2019)"),
        LossSpec("dice_ce_hausdorff", dice_ce_hausdorff_loss, {"hausdorff_weight": 0.1, "alpha": 2.0, "spacing": None, "class_weights": None, "ramp": 0.5},
                 summary="dice_ce + weight × hausdorff_dt, the weight ramped up from 0 over the first `ramp` share of the epochs"),
        LossSpec("region_bce_dice", RegionBCEDiceLoss, {"regions": None, "batch": True, "lambda_bce": 1.0, "lambda_dice": 1.0, "smooth": SMOOTH, "class_weights": None},
                 activation="sigmoid", summary="BCE + soft Dice per region (nnU-Net's region-based training)"),
    )
}


def loss_spec(name: str) -> LossSpec:
    """The registry entry of ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
    return LOSSES[name]


def build_loss(name: str = "dice_ce", **options: Any) -> nn.Module:
    """The loss ``name`` with ``options`` (see ``LOSSES[name].options``; unknown options raise ``ValueError``).

    Returns a module ``loss(logits, target) → scalar`` (shapes in the module docstring). ``LOSSES[name].activation``
    says how to read the network's outputs: ``"softmax"`` (K = number of labels) or ``"sigmoid"`` (K = number of
    regions; turn probabilities into labels with :func:`regions_to_labels`).
    """
    spec = loss_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r} (known: {sorted(spec.options)})")
    return spec.factory(**{**spec.options, **options})
