"""BraTS lesion-wise Dice and HD95, computed as the official BraTS 2023 / 2024 scorers compute them.

Reference implementations (read, not imported; they need cc3d, pandas and temporary NIfTI files):

* BraTS 2023 (GLI, MET, MEN, PED, SSA): ``rachitsaluja/BraTS-2023-Metrics``, ``eval.py`` /
  ``brats_2023_metrics/surface_distance/brats_metrics.py`` (``get_LesionWiseScores``,
  ``get_LesionWiseResults``, ``get_GTseg_combinedByDilation``).
* BraTS 2024 adult glioma post-treatment: ``rachitsaluja/BraTS-2024-Metrics``, ``metrics_GLI.py``,
  which the Synapse scorer ``Sage-Bionetworks-Challenges/brats2023`` (``evaluation/lesionwise/score.py``)
  calls for "BraTS-GLI".
* HD95: DeepMind ``surface-distance`` (``compute_surface_distances`` + ``compute_robust_hausdorff``),
  vendored by both repositories.

Per region (a set of label values) and case:

1. **GT lesions.** The region's reference mask is dilated ``dilation_iterations`` times with the
   18-neighbourhood structuring element (``generate_binary_structure(3, 2)``; the official code uses
   this, not the full 3x3x3 cube). The 26-connected components of the dilated mask define the lesions:
   every reference voxel belongs to the dilated component containing it, so reference components
   closer than the dilation reach are one lesion. (With ``dilation_iterations=0`` the lesions are the
   plain 26-connected components; the official code has no such setting, and scipy would read 0 as
   "dilate until nothing changes".)
2. **2024 only, NETC / SNFH / ET / RC:** lesions of one tissue that touch (18-neighbourhood) the same
   lesion of another tissue are merged, tissue by tissue in the official order (NETC by ET then RC;
   ET by NETC then RC; RC by ET then NETC; SNFH by ET, RC, NETC). Within a step, lesions whose
   smallest-numbered touching partner lesion is the same become one lesion (the official
   ``relabel_nifti_image``). Partner lesions are numbered in C raster order of their first voxel
   (scipy's numbering; we take cc3d's on the C-ordered dilated mask to be the same). The numbering
   only matters when one lesion touches two partner lesions.
3. **Predicted lesions.** 2023: the 26-connected components of the predicted region mask. 2024: formed
   like the GT lesions (steps 1 and 2 on the prediction, with the prediction's own partner lesions),
   after dropping every dilation-merged predicted lesion of ``<= volume_threshold`` *voxels* (the
   official ``save_tmp_files`` counts voxels here, where step 4 uses mm³). A GT lesion's match is the
   union of the *whole* predicted lesions that intersect the GT lesion dilated again as often as in
   step 1 (so, equal to its dilated component from step 1). A predicted lesion may match several GT
   lesions.
4. **Small lesions.** A GT lesion whose volume ``voxels x sx x sy x sz`` (mm³, from the spacing, as
   the official code multiplies by the NIfTI zooms) is ``<= volume_threshold`` is left out of the
   score and of the TP/FN counts; predicted lesions matching it are not false positives.
5. **Per GT lesion** Dice against its match, and HD95 with DeepMind's surface-distance convention
   (surface elements on the voxel-corner grid, area-weighted 95th percentile, nearest rank, the max
   of both directions); an unmatched lesion scores Dice 0 and HD95 = ``hd95_penalty``.
6. **False positives** are predicted lesions intersecting no dilated GT lesion (of any size); each
   adds Dice 0 and HD95 ``hd95_penalty``.
7. **Case score** = (sum over scored lesions + FP terms) / (scored lesions + FPs); with neither:
   Dice 1, HD95 0. TP = scored lesions with a match, FN = scored lesions without, FP as above.

The lesion-wise HD95 therefore differs slightly from :func:`medseg.evaluation.metrics.hd95` (voxel
surfaces, linear-interpolated percentile) even for a single lesion: it follows the BraTS scorer.
The surface-element areas come from the DeepMind marching-cubes normals table shipped in MONAI
(``monai.metrics.utils``); the first HD95 computed imports MONAI (and torch) once.

Official parameter values (checked against the source above; the 2024 values are those of the
current ``metrics_GLI.py``, whose earlier revisions used the 2023 penalty 374, one dilation of 3,
connected components for the prediction and a threshold that stayed at 10 after ET):

============================  =====================  =========================================  =======
setting                       dilation               volume threshold (mm³; voxels for step 3)  penalty
============================  =====================  =========================================  =======
BraTS 2023 glioma (GLI)       3                      50                                         374
BraTS 2023 metastases (MET)   1                      2                                          374
BraTS 2024 post-treatment     NETC, RC 5; others 3   ET 10; WT, TC, NETC, SNFH, RC 20           337
============================  =====================  =========================================  =======

(The 2024 code means to dilate SNFH by 5 as well but tests the misspelt name "SFNH", so SNFH is
dilated by 3; we follow the code.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.evaluation.metrics import _bbox, _spacing, as_label_map

__all__ = [
    "LesionwiseSetting",
    "BRATS2023_GLIOMA",
    "BRATS2023_METS",
    "BRATS2024_POST",
    "SETTINGS",
    "lesionwise_scores",
    "lesionwise_case",
    "lesionwise_keys",
    "robust_hausdorff",
    "with_penalty",
]

#: Structuring element of every dilation in the official code: ``generate_binary_structure(3, 2)``.
DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)
#: 26-connectivity of the connected components (``cc3d.connected_components(..., connectivity=26)``).
CC_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
#: The official HD95 for a missed lesion or a false positive (BraTS 2023).
BRATS_LESION_PENALTY = 374.0
#: The same in the current BraTS 2024 post-treatment code (``metrics_GLI.py``).
BRATS2024_LESION_PENALTY = 337.0
# 2x2x2 neighbourhood code of DeepMind's surface-distance (correlated, so corner (i, j, k) sees the
# voxels (i-1..i, j-1..j, k-1..k) with weight 128 at (i-1, j-1, k-1) down to 1 at (i, j, k)).
_CODE_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@dataclass(frozen=True)
class LesionwiseSetting:
    """One official parameter set.

    Attributes:
        name: the value of ``evaluate_case(lesionwise=...)``.
        suffix: appended to the metric names (``lesionwise_dice_2023``).
        regions: region name → label values it unites (WT = (1, 2, 3), ...).
        dilation_iterations: dilations (18-neighbourhood) that merge nearby GT lesions and define
            the neighbourhood in which predicted lesions match a GT lesion.
        volume_thresholds: region name → volume (mm³; = voxels at 1 mm) at or below which a GT
            lesion is left out (and, with ``prediction_lesions="as_reference"``, the number of
            voxels at or below which a predicted lesion is dropped).
        hd95_penalty: HD95 of a missed lesion or a false-positive lesion (mm).
        merge_touching: region name → the regions whose touching lesions merge its lesions, in
            order (2024 sub-regions only).
        region_dilation: region name → its own number of dilations, instead of
            ``dilation_iterations`` (2024: NETC and RC 5).
        prediction_lesions: ``"components"`` (2023: a predicted lesion is a 26-connected
            component) or ``"as_reference"`` (2024: predicted lesions are formed like the GT ones,
            small ones dropped; see the module docstring).
    """

    name: str
    suffix: str
    regions: Mapping[str, tuple[int, ...]]
    dilation_iterations: int
    volume_thresholds: Mapping[str, float]
    hd95_penalty: float = BRATS_LESION_PENALTY
    merge_touching: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    region_dilation: Mapping[str, int] = field(default_factory=dict)
    prediction_lesions: Literal["components", "as_reference"] = "components"

    def __post_init__(self) -> None:
        missing = [r for r in self.regions if r not in self.volume_thresholds]
        if missing:
            raise MedsegError(f"lesion-wise setting {self.name!r}: no volume threshold for {missing}")
        for region, partners in self.merge_touching.items():
            unknown = [p for p in (region, *partners) if p not in self.regions]
            if unknown:
                raise MedsegError(f"lesion-wise setting {self.name!r}: merge_touching names unknown regions {unknown}")
        unknown = [r for r in self.region_dilation if r not in self.regions]
        if unknown:
            raise MedsegError(f"lesion-wise setting {self.name!r}: region_dilation names unknown regions {unknown}")
        if self.prediction_lesions not in ("components", "as_reference"):
            raise MedsegError(f"lesion-wise setting {self.name!r}: unknown prediction_lesions {self.prediction_lesions!r}")

    def dilation(self, region: str) -> int:
        """Dilations of ``region``'s lesions."""
        return int(self.region_dilation.get(region, self.dilation_iterations))

    def keys(self) -> tuple[str, ...]:
        """The metric names this setting adds to each region."""
        return lesionwise_keys(self.suffix)


def lesionwise_keys(suffix: str) -> tuple[str, ...]:
    return tuple(
        f"{m}_{suffix}"
        for m in ("lesionwise_dice", "lesionwise_hd95", "lesion_tp", "lesion_fp", "lesion_fn")
    )


_GLIOMA_REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

#: BraTS 2023 adult glioma (also SSA and PED: same dilation and threshold).
BRATS2023_GLIOMA = LesionwiseSetting(
    name="brats2023",
    suffix="2023",
    regions=_GLIOMA_REGIONS,
    dilation_iterations=3,
    volume_thresholds={"WT": 50, "TC": 50, "ET": 50},
)
#: BraTS 2023 brain metastases (same labels and regions as glioma).
BRATS2023_METS = LesionwiseSetting(
    name="brats2023_mets",
    suffix="2023",
    regions=_GLIOMA_REGIONS,
    dilation_iterations=1,
    volume_thresholds={"WT": 2, "TC": 2, "ET": 2},
)
#: BraTS 2024 adult glioma post-treatment (labels NETC 1, SNFH 2, ET 3, RC 4; RC is not in WT).
BRATS2024_POST = LesionwiseSetting(
    name="brats2024",
    suffix="2024",
    regions={"WT": (1, 2, 3), "TC": (1, 3), "NETC": (1,), "SNFH": (2,), "ET": (3,), "RC": (4,)},
    dilation_iterations=3,
    volume_thresholds={"WT": 20, "TC": 20, "NETC": 20, "SNFH": 20, "ET": 10, "RC": 20},
    hd95_penalty=BRATS2024_LESION_PENALTY,
    region_dilation={"NETC": 5, "RC": 5},
    prediction_lesions="as_reference",
    merge_touching={
        "NETC": ("ET", "RC"),
        "ET": ("NETC", "RC"),
        "RC": ("ET", "NETC"),
        "SNFH": ("ET", "RC", "NETC"),
    },
)
#: ``evaluate_case(lesionwise=name)`` → setting.
SETTINGS: dict[str, LesionwiseSetting] = {s.name: s for s in (BRATS2023_GLIOMA, BRATS2023_METS, BRATS2024_POST)}


# --------------------------------------------------------------------------- HD95 (DeepMind convention)
@lru_cache(maxsize=1)
def _normals_table() -> np.ndarray:
    """DeepMind's marching-cubes normals per 2x2x2 neighbourhood code, (256, 4, 3) float64.

    Taken from MONAI (``monai.metrics.utils``), which ships the table of DeepMind's
    ``surface_distance.lookup_tables``; its entries are multiples of 1/8, exact in float32.
    """
    try:
        from monai.metrics.utils import _get_neighbour_code_to_normals_table
    except ImportError as exc:  # pragma: no cover - depends on the installed MONAI
        raise MedsegError(f"lesion-wise HD95 needs MONAI's surface-area table: {exc}") from None
    table = np.asarray(_get_neighbour_code_to_normals_table().cpu().numpy(), dtype=np.float64)
    if table.shape != (256, 4, 3):  # pragma: no cover
        raise MedsegError(f"unexpected MONAI normals table of shape {table.shape}")
    return table


@lru_cache(maxsize=32)
def _surfel_areas(spacing: tuple[float, float, float]) -> np.ndarray:
    """Area (mm²) of the surface element of every neighbourhood code, summed in the same order as
    DeepMind's ``compute_surface_distances`` so the floats agree to the last bit."""
    normals = _normals_table()
    s0, s1, s2 = spacing
    areas = np.zeros(256)
    for code in range(256):
        total = 0.0
        for normal in normals[code]:
            n = np.array([normal[0] * s1 * s2, normal[1] * s0 * s2, normal[2] * s0 * s1])
            total += np.linalg.norm(n)
        areas[code] = total
    return areas


def _weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    if distances.size == 0:
        return float("inf")
    order = np.lexsort((areas, distances))  # = sorted(zip(distances, areas))
    distances, areas = distances[order], areas[order]
    cumulative = np.cumsum(areas) / np.sum(areas)
    idx = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[min(idx, distances.size - 1)])


def robust_hausdorff(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], percent: float = 95.0
) -> float:
    """DeepMind / BraTS robust Hausdorff distance in mm (``compute_surface_distances`` followed by
    ``compute_robust_hausdorff``): ``inf`` when exactly one mask is empty, also ``inf`` (not 0) when
    both are (callers handle that case).

    Surface elements sit on the voxel-corner grid (2x2x2 neighbourhoods that are neither empty nor
    full), each weighted by its marching-cubes area; the percentile is the first distance at which
    the cumulative area fraction reaches ``percent``/100, per direction; the result is the larger.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    sp = _spacing(spacing, 3)
    box = _bbox(gt | pred)
    if box is None:
        return float("inf")
    shape = tuple(s.stop - s.start + 1 for s in box)  # one empty plane after the box on every axis
    codes = []
    for mask in (gt, pred):
        crop = np.zeros(shape, np.uint8)
        crop[tuple(slice(0, s.stop - s.start) for s in box)] = mask[box]
        codes.append(ndimage.correlate(crop, _CODE_KERNEL, mode="constant", cval=0))
    code_gt, code_pred = codes
    border_gt = (code_gt != 0) & (code_gt != 255)
    border_pred = (code_pred != 0) & (code_pred != 255)
    if not border_gt.any() or not border_pred.any():
        return float("inf")
    areas = _surfel_areas(sp)
    to_gt = ndimage.distance_transform_edt(~border_gt, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~border_pred, sampling=sp)
    gt_to_pred = _weighted_percentile(to_pred[border_gt], areas[code_gt[border_gt]], percent)
    pred_to_gt = _weighted_percentile(to_gt[border_pred], areas[code_pred[border_pred]], percent)
    return max(gt_to_pred, pred_to_gt)


# --------------------------------------------------------------------------- lesions
def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    if iterations <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=DILATION_STRUCTURE, iterations=int(iterations))


def _dilated_components(ref: np.ndarray, iterations: int) -> tuple[np.ndarray, int]:
    """26-connected components of the dilated reference (labels in C raster order, as scipy and
    cc3d number them); every reference voxel lies in exactly one."""
    labels, n = ndimage.label(_dilate(ref, iterations), structure=CC_STRUCTURE)
    return labels, int(n)


def _touching_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(label in ``a``, label in ``b``) pairs with voxels at most one 18-neighbourhood step apart
    (the official ``get_touching_labels``: dilate one mask once, intersect with the other)."""
    nb = int(b.max()) + 1 if b.size else 1
    if not a.any() or not b.any():
        return np.zeros((0, 2), np.int64)
    pb = np.pad(b, 1)
    a_in = a > 0
    codes = []
    for off in np.argwhere(DILATION_STRUCTURE) - 1:
        shifted = pb[tuple(slice(1 + o, 1 + o + s) for o, s in zip(off, a.shape))]
        both = a_in & (shifted > 0)
        if both.any():
            codes.append(a[both].astype(np.int64) * nb + shifted[both])
    if not codes:
        return np.zeros((0, 2), np.int64)
    pairs = np.unique(np.concatenate(codes))
    return np.stack([pairs // nb, pairs % nb], axis=1)


def _merge_by_partner(group: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """One official ``relabel_nifti_image`` step: groups whose smallest touching partner label is the
    same become one group; groups touching nothing stay as they are. ``group`` maps base lesion →
    group id (index 0 = background; a base lesion in group 0 is dropped and stays so); returns the
    new map, ids renumbered 1..n."""
    if pairs.size == 0:
        return group
    min_partner: dict[int, int] = {}
    for base, partner in pairs:
        g = int(group[base])
        min_partner[g] = min(min_partner.get(g, int(partner)), int(partner))
    keys: dict[tuple[int, int], int] = {}
    out = np.zeros_like(group)
    for base in range(1, group.size):
        g = int(group[base])
        if g == 0:  # a dropped (small predicted) lesion stays dropped
            continue
        key = (1, min_partner[g]) if g in min_partner else (0, g)
        out[base] = keys.setdefault(key, len(keys) + 1)
    return out


# --------------------------------------------------------------------------- scoring
def _score(
    pred_cc: np.ndarray,
    n_pred: int,
    ref: np.ndarray,
    sp: tuple[float, ...],
    dil_labels: np.ndarray,
    group: np.ndarray,
    volume_threshold: float,
    hd95_penalty: float,
) -> dict[str, Any]:
    """Score the predicted lesions ``pred_cc`` (ids 1..n_pred, 0 = background) against the GT lesions
    ``group[dil_labels] & ref`` (``group`` maps each dilated component to its lesion id; a lesion's
    dilated neighbourhood is ``group[dil_labels] == id``)."""
    n_lesions = int(group.max()) if group.size else 0
    pred = pred_cc > 0
    roi = group[dil_labels]  # lesion id on its dilated neighbourhood, 0 elsewhere
    gt_lesion = np.where(ref, roi, 0)

    hit = (pred_cc > 0) & (roi > 0)
    pairs = np.unique(roi[hit].astype(np.int64) * (n_pred + 1) + pred_cc[hit])
    pair_lesion, pair_comp = pairs // (n_pred + 1), pairs % (n_pred + 1)
    matched = np.zeros(n_pred + 1, bool)
    matched[pair_comp] = True
    n_fp = int(n_pred - np.count_nonzero(matched[1:]))

    gt_voxels = np.bincount(gt_lesion.ravel(), minlength=n_lesions + 1)
    pred_voxels = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    overlap = np.bincount(gt_lesion[pred], minlength=n_lesions + 1)  # pred ∩ lesion ⊂ its match
    gt_boxes = ndimage.find_objects(gt_lesion, max_label=n_lesions) if n_lesions else []
    pred_boxes = ndimage.find_objects(pred_cc, max_label=n_pred) if n_pred else []

    dice_sum = hd_sum = 0.0
    tp = fn = scored = 0
    for k in range(1, n_lesions + 1):
        volume = float(gt_voxels[k]) * sp[0] * sp[1] * sp[2]  # the official product order
        if volume <= volume_threshold:
            continue
        scored += 1
        comps = pair_comp[pair_lesion == k]
        if comps.size == 0:
            fn += 1
            hd_sum += hd95_penalty
            continue
        tp += 1
        dice_sum += 2.0 * float(overlap[k]) / float(int(pred_voxels[comps].sum()) + int(gt_voxels[k]))
        boxes = [gt_boxes[k - 1]] + [pred_boxes[c - 1] for c in comps]
        box = tuple(
            slice(min(b[ax].start for b in boxes), max(b[ax].stop for b in boxes)) for ax in range(pred.ndim)
        )
        hd = robust_hausdorff(gt_lesion[box] == k, np.isin(pred_cc[box], comps), sp)
        hd_sum += hd95_penalty if not np.isfinite(hd) else hd

    denominator = scored + n_fp
    if denominator == 0:
        dice_score, hd_score = 1.0, 0.0
    else:
        dice_score = dice_sum / denominator
        hd_score = (hd_sum + n_fp * hd95_penalty) / denominator
    return {"dice": dice_score, "hd95": hd_score, "tp": tp, "fp": n_fp, "fn": fn, "n_lesions": scored}


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise MedsegError(f"prediction shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)}")
    if pred.ndim != 3:
        raise MedsegError(f"lesion-wise metrics need 3D volumes, got {pred.ndim}D")
    return pred, ref


def _crop(pred: np.ndarray, ref: np.ndarray, dilation: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the foreground of both, padded by the dilation reach + 1: every dilation, component
    and surface stays the same as on the full volume (the dilated reference fits in the box)."""
    box = _bbox((pred != 0) | (ref != 0), pad=max(int(dilation), 0) + 1)
    if box is None:  # nothing anywhere: one background voxel scores the same
        return pred[:1, :1, :1], ref[:1, :1, :1]
    return pred[box], ref[box]


def lesionwise_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float],
    *,
    dilation_iterations: int,
    volume_threshold: float,
    hd95_penalty: float,
) -> dict[str, Any]:
    """Lesion-wise Dice and HD95 of one binary region, BraTS 2023 rules (see the module docstring).

    Args:
        pred: predicted mask, shape (I, J, K); bool, or nonzero = inside.
        ref: reference mask, same shape.
        spacing: voxel size in mm per axis, (I, J, K) order, or one number.
        dilation_iterations: 18-neighbourhood dilations that merge nearby GT lesions (3 glioma,
            1 metastases; 0 = no merging).
        volume_threshold: GT lesions with ``voxels x prod(spacing)`` (mm³) at or below this are
            left out (50 glioma, 2 metastases; equals voxels at 1 mm isotropic).
        hd95_penalty: HD95 (mm) of a missed lesion or a false-positive component (374 in BraTS).

    Returns:
        ``{"dice", "hd95", "tp", "fp", "fn", "n_lesions"}``: the lesion-wise Dice and HD95 (mm),
        the numbers of detected scored lesions, false-positive components, missed scored lesions,
        and scored lesions (``tp + fn``). Dice 1 / HD95 0 when there is nothing to score.
    """
    pred, ref = _pair(pred, ref)
    sp = _spacing(spacing, 3)
    p, r = _crop(pred != 0, ref != 0, dilation_iterations)
    dil_labels, n = _dilated_components(r, dilation_iterations)
    pred_cc, n_pred = ndimage.label(p, structure=CC_STRUCTURE)
    return _score(pred_cc, int(n_pred), r, sp, dil_labels, np.arange(n + 1), float(volume_threshold), float(hd95_penalty))


def lesionwise_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: float | Sequence[float],
    setting: LesionwiseSetting | str = BRATS2023_GLIOMA,
) -> dict[str, dict[str, float | int]]:
    """Lesion-wise metrics of every region of ``setting`` for one case.

    Args:
        pred_labels: predicted label map, shape (I, J, K), integer labels.
        ref_labels: reference label map, same shape.
        spacing: voxel size in mm per axis, (I, J, K) order.
        setting: a :class:`LesionwiseSetting` or its name (``"brats2023"``, ``"brats2023_mets"``,
            ``"brats2024"``).

    Returns:
        ``{region: {lesionwise_dice_<sfx>, lesionwise_hd95_<sfx>, lesion_tp_<sfx>, lesion_fp_<sfx>,
        lesion_fn_<sfx>}}`` in the setting's region order, ``<sfx>`` = ``setting.suffix``.
    """
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise MedsegError(f"unknown lesion-wise setting {setting!r}; choose from {sorted(SETTINGS)}")
        setting = SETTINGS[setting]
    pred, ref = _pair(as_label_map(pred_labels, "prediction"), as_label_map(ref_labels, "reference"))
    sp = _spacing(spacing, 3)
    pred, ref = _crop(pred, ref, max(setting.dilation(r) for r in setting.regions))
    gt_side = _Lesions(ref, setting, drop_small=False)
    pred_side = _Lesions(pred, setting, drop_small=True) if setting.prediction_lesions == "as_reference" else None

    sfx = setting.suffix
    out: dict[str, dict[str, float | int]] = {}
    for region in setting.regions:
        labels, group = gt_side.lesions(region)
        if pred_side is not None:
            base, pred_group = pred_side.lesions(region)
            pred_cc = np.where(pred_side.mask(region), pred_group[base], 0)
            n_pred = int(pred_group.max()) if pred_group.size else 0
        else:
            pred_cc, n_pred = ndimage.label(_region_mask(pred, setting, region), structure=CC_STRUCTURE)
        s = _score(
            pred_cc, int(n_pred), gt_side.mask(region), sp, labels, group,
            float(setting.volume_thresholds[region]), float(setting.hd95_penalty),
        )
        out[region] = {
            f"lesionwise_dice_{sfx}": s["dice"],
            f"lesionwise_hd95_{sfx}": s["hd95"],
            f"lesion_tp_{sfx}": s["tp"],
            f"lesion_fp_{sfx}": s["fp"],
            f"lesion_fn_{sfx}": s["fn"],
        }
    return out


def _region_mask(label_map: np.ndarray, setting: LesionwiseSetting, region: str) -> np.ndarray:
    """The binary mask of ``region`` in a label map."""
    return np.isin(label_map, list(setting.regions[region]))


def _compact(group: np.ndarray) -> np.ndarray:
    """Renumber the nonzero ids of ``group`` to 1..n in order (0 stays 0)."""
    ids = np.unique(group[group > 0])
    out = np.zeros_like(group)
    if ids.size:
        out[group > 0] = np.searchsorted(ids, group[group > 0]) + 1
    return out


class _Lesions:
    """The lesions of every region of one label map (reference, or a 2024 prediction).

    ``lesions(region)`` gives ``(dilated_labels, group)``: the 26-connected components of the region's
    mask dilated ``setting.dilation(region)`` times, and the map component → lesion id (0: none) after
    dropping small components (``drop_small``: ``<= volume_threshold`` voxels, the 2024 prediction
    rule) and the cross-tissue merges of ``setting.merge_touching``. A lesion's voxels are
    ``mask & (group[dilated_labels] == id)``; for the reference, its dilated neighbourhood is
    ``group[dilated_labels] == id``.
    """

    def __init__(self, label_map: np.ndarray, setting: LesionwiseSetting, drop_small: bool) -> None:
        self.label_map, self.setting, self.drop_small = label_map, setting, drop_small
        self._masks: dict[str, np.ndarray] = {}
        self._base: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lesions: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def mask(self, region: str) -> np.ndarray:
        if region not in self._masks:
            self._masks[region] = _region_mask(self.label_map, self.setting, region)
        return self._masks[region]

    def base(self, region: str) -> tuple[np.ndarray, np.ndarray]:
        """(dilated component labels, component → kept id: itself, or 0 when dropped)."""
        if region not in self._base:
            mask = self.mask(region)
            labels, n = _dilated_components(mask, self.setting.dilation(region))
            keep = np.arange(n + 1)
            if self.drop_small and n:
                voxels = np.bincount(labels[mask], minlength=n + 1)
                keep[voxels <= self.setting.volume_thresholds[region]] = 0
                keep[0] = 0
            self._base[region] = (labels, keep)
        return self._base[region]

    def base_lesions(self, region: str) -> np.ndarray:
        """The official ``_cc`` map: the kept component id on the region's voxels, 0 elsewhere."""
        labels, keep = self.base(region)
        return np.where(self.mask(region), keep[labels], 0)

    def lesions(self, region: str) -> tuple[np.ndarray, np.ndarray]:
        if region not in self._lesions:
            labels, group = self.base(region)
            partners = self.setting.merge_touching.get(region, ())
            if partners and group.any():
                own = self.base_lesions(region)
                for partner in partners:
                    group = _merge_by_partner(group, _touching_pairs(own, self.base_lesions(partner)))
            self._lesions[region] = (labels, _compact(group))
        return self._lesions[region]


def with_penalty(setting: LesionwiseSetting, hd95_penalty: float) -> LesionwiseSetting:
    """A copy of ``setting`` with another HD95 penalty (e.g. 373.13 to match the full-volume HD95)."""
    return dataclasses.replace(setting, hd95_penalty=float(hd95_penalty))
