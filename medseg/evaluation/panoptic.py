"""Instance-wise ("panoptic") quality of one binary region, as the panoptica library computes it.

Panoptic quality comes from Kirillov et al., "Panoptic Segmentation" (CVPR 2019); the medical-image
form used here is panoptica's (Kofler et al., "Panoptica -- instance-wise evaluation of 3D semantic
and instance segmentation maps", 2023), which the BraTS 2025 evaluation package (``brats-evaluation``)
runs. Neither package is imported: panoptica 2.1 needs numpy < 2.3 and brats-evaluation is AGPL, so
this module re-implements the rules below and ``tests/test_panoptic.py`` checks it against numbers
panoptica 2.1.7 produced (``tests/data/panoptic_reference.json``).

Per region (a binary mask) and case:

1. **Instances** are the 26-connected components of the reference and of the prediction (panoptica's
   ``ConnectedComponentsInstanceApproximator``: cc3d with its default 26-connectivity in 3D).
2. **Matching** pairs reference and predicted instances one-to-one; only pairs that overlap are
   candidates. Two matchers:

   * ``"naive"`` (panoptica's default ``NaiveThresholdMatching``): candidates sorted by the matching
     score, best first; a pair is taken when neither instance is taken yet and the score reaches the
     threshold. The default threshold is IoU >= 0.5 (``>=``: panoptica compares non-strictly unless
     ``strict_threshold`` is set; with IoU > 0.5 at most one partner can qualify anyway, so the
     greedy order only matters at exactly 0.5).
   * ``"bipartite"`` (``MaxBipartiteMatching``, the BraTS 2025 configuration with DSC >= 1e-6): the
     assignment maximising the summed score (``scipy.optimize.linear_sum_assignment`` on the cost
     ``1 - score`` for qualifying pairs and ``1 + 1e-6`` otherwise; assigned pairs with a cost >= 1
     are dropped), i.e. any overlap can match, larger overlaps first.

3. **Counts.** TP = matched pairs, FP = predicted instances without a partner, FN = reference
   instances without one.
4. **Segmentation quality** per matched pair: Dice of the two instance masks, and HD95 in the
   panoptica convention: the 95th percentile (``numpy.percentile``, linear) of the *pooled* surface
   distances of both directions, with the surfaces of :mod:`medseg.evaluation.metrics` (mask minus its
   6-connected erosion, distances between voxel centres in mm). This is *not* the maximum of the two
   directed percentiles that :func:`medseg.evaluation.metrics.hd95` reports: the pooled value is
   smaller or equal. ``sq_dsc`` / ``sq_hd95`` are the means over the matched pairs.
5. **Recognition quality** ``rq = tp / (tp + fp/2 + fn/2)`` (the instance F1) and **panoptic
   quality** ``pq_dsc = sq_dsc x rq``.

Edge cases (panoptica returns NaN or inf here; we keep the BraTS conventions of
:mod:`medseg.evaluation.metrics`, so no value is NaN and means over cases drop nothing):

=========================================  ======  ========  ======  ===================
case                                       sq_dsc  sq_hd95   pq_dsc  panoptica
=========================================  ======  ========  ======  ===================
no instance in either mask                 1.0     0.0       1.0     NaN, NaN, NaN
instances but no match (tp = 0)            0.0     penalty   0.0     0.0, inf, 0.0
=========================================  ======  ========  ======  ===================

The penalty is :data:`~medseg.evaluation.metrics.HD95_PENALTY_MM` (373.13 mm) unless the setting
says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.evaluation.metrics import HD95_PENALTY_MM, _bbox, _mask_pair, _spacing, surface_distances

__all__ = [
    "PANOPTIC_NAMES",
    "PanopticSetting",
    "PANOPTICA_DEFAULT",
    "BRATS2025",
    "PANOPTIC_SETTINGS",
    "instances",
    "match_instances",
    "pooled_hd95",
    "panoptic_scores",
    "panoptic_case",
    "panoptic_setting",
]

#: The metrics :func:`panoptic_scores` adds to a region, in this order.
PANOPTIC_NAMES = ("sq_dsc", "sq_hd95", "pq_dsc", "tp", "fp", "fn")
#: 26-connectivity of the instances (cc3d's default in 3D, which panoptica uses).
CC_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
# Cost of a pair that may not match in the bipartite assignment (panoptica: 1 + 1e-6).
_NO_MATCH_COST = 1.0 + 1e-6


@dataclass(frozen=True)
class PanopticSetting:
    """How instances are matched.

    Attributes:
        name: the value of ``evaluate_case(panoptic=...)``.
        matcher: ``"naive"`` (greedy one-to-one by score) or ``"bipartite"`` (maximum summed score).
        matching_metric: ``"iou"`` or ``"dsc"`` of the two instance masks.
        matching_threshold: smallest score that may match.
        strict: the score must exceed the threshold (``>``) instead of reaching it (``>=``).
        hd95_penalty: ``sq_hd95`` (mm) when instances exist but none matched.
    """

    name: str
    matcher: Literal["naive", "bipartite"] = "naive"
    matching_metric: Literal["iou", "dsc"] = "iou"
    matching_threshold: float = 0.5
    strict: bool = False
    hd95_penalty: float = HD95_PENALTY_MM

    def __post_init__(self) -> None:
        if self.matcher not in ("naive", "bipartite"):
            raise MedsegError(f"panoptic setting {self.name!r}: unknown matcher {self.matcher!r}")
        if self.matching_metric not in ("iou", "dsc"):
            raise MedsegError(f"panoptic setting {self.name!r}: unknown matching metric {self.matching_metric!r}")

    def passes(self, score: float) -> bool:
        return score > self.matching_threshold if self.strict else score >= self.matching_threshold


#: panoptica's default ``Panoptica_Evaluator``: ``NaiveThresholdMatching(IOU, 0.5)``, one-to-one.
PANOPTICA_DEFAULT = PanopticSetting(name="panoptica", matcher="naive", matching_metric="iou", matching_threshold=0.5)
#: The BraTS 2025 ``brats-evaluation`` configs (gli, mets, ped, ...): ``MaxBipartiteMatching(DSC, 1e-6)``.
BRATS2025 = PanopticSetting(name="brats2025", matcher="bipartite", matching_metric="dsc", matching_threshold=1e-6)
#: ``evaluate_case(panoptic=name)`` → setting.
PANOPTIC_SETTINGS: dict[str, PanopticSetting] = {s.name: s for s in (PANOPTICA_DEFAULT, BRATS2025)}
#: The instance matcher evaluation uses unless told otherwise (``"default"``): the challenge's current one (Dice-based
#: bipartite matching).
DEFAULT_MATCHER = "default"
PANOPTIC_SETTINGS[DEFAULT_MATCHER] = BRATS2025


def panoptic_setting(setting: PanopticSetting | str) -> PanopticSetting:
    """The setting itself, or the one called ``setting``."""
    if isinstance(setting, PanopticSetting):
        return setting
    if setting not in PANOPTIC_SETTINGS:
        raise MedsegError(f"unknown panoptic setting {setting!r}; choose from {sorted(PANOPTIC_SETTINGS)}")
    return PANOPTIC_SETTINGS[setting]


def instances(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask: ``(labels, n)``, labels 1..n in C raster order."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=CC_STRUCTURE)
    return labels, int(n)


def _overlaps(ref_labels: np.ndarray, n_ref: int, pred_labels: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Overlapping pairs ``(ref_ids, pred_ids, intersections)`` (sorted by ref, then pred id) and the
    instance sizes ``(ref_sizes, pred_sizes)`` indexed by id (index 0 unused)."""
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    both = (ref_labels > 0) & (pred_labels > 0)
    codes = ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    pairs, counts = np.unique(codes, return_counts=True)
    return pairs // (n_pred + 1), pairs % (n_pred + 1), counts, ref_sizes, pred_sizes


def match_instances(
    ref_labels: np.ndarray,
    n_ref: int,
    pred_labels: np.ndarray,
    n_pred: int,
    setting: PanopticSetting | str = PANOPTICA_DEFAULT,
) -> list[tuple[int, int]]:
    """One-to-one matches ``[(ref_id, pred_id), ...]`` (sorted by ref id) between two instance maps.

    Args:
        ref_labels: reference instance map, integer ids 1..n_ref, 0 = background; any shape.
        n_ref: number of reference instances.
        pred_labels: predicted instance map, same shape, ids 1..n_pred.
        n_pred: number of predicted instances.
        setting: the matcher (see the module docstring), or its name.
    """
    setting = panoptic_setting(setting)
    if n_ref == 0 or n_pred == 0:
        return []
    r_ids, p_ids, inter, r_size, p_size = _overlaps(ref_labels, n_ref, pred_labels, n_pred)
    inter = inter.astype(np.float64)
    total = (r_size[r_ids] + p_size[p_ids]).astype(np.float64)
    scores = inter / (total - inter) if setting.matching_metric == "iou" else 2.0 * inter / total
    ok = np.array([setting.passes(float(s)) for s in scores], dtype=bool)
    matches: list[tuple[int, int]] = []
    if setting.matcher == "naive":
        order = np.argsort(-scores, kind="stable")  # best first; ties in (ref, pred) order
        taken_ref: set[int] = set()
        taken_pred: set[int] = set()
        for i in order:
            r, p = int(r_ids[i]), int(p_ids[i])
            if not ok[i] or r in taken_ref or p in taken_pred:
                continue
            taken_ref.add(r)
            taken_pred.add(p)
            matches.append((r, p))
    else:
        from scipy.optimize import linear_sum_assignment

        cost = np.full((n_ref, n_pred), _NO_MATCH_COST)
        cost[r_ids[ok] - 1, p_ids[ok] - 1] = 1.0 - scores[ok]
        rows, cols = linear_sum_assignment(cost)
        matches = [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols) if cost[r, c] < 1.0]
    return sorted(matches)


def pooled_hd95(pred: np.ndarray, ref: np.ndarray, spacing_mm: float | Sequence[float]) -> float:
    """HD95 in mm as panoptica computes it: the 95th percentile (linear interpolation) of the surface
    distances of both directions pooled. Both masks must be non-empty."""
    d_pr, d_rp = surface_distances(pred, ref, spacing_mm)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))


def panoptic_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: float | Sequence[float],
    setting: PanopticSetting | str = PANOPTICA_DEFAULT,
) -> dict[str, Any]:
    """Instance matching, segmentation, recognition and panoptic quality of one binary region.

    Args:
        pred: predicted mask, shape (I, J, K); bool, or nonzero = inside.
        ref: reference mask, same shape.
        spacing_mm: voxel size in mm per axis, (I, J, K) order, or one number.
        setting: the matcher, :data:`PANOPTICA_DEFAULT` (IoU >= 0.5, greedy) or :data:`BRATS2025`
            (maximum bipartite, DSC >= 1e-6), or their names.

    Returns:
        ``{"sq_dsc", "sq_hd95", "pq_dsc", "tp", "fp", "fn"}`` (:data:`PANOPTIC_NAMES`) plus ``"rq"``
        and ``"pairs"`` (one ``{"ref", "pred", "dsc", "hd95"}`` per match, instance ids as numbered by
        :func:`instances`). Dice in [0, 1], HD95 in mm, counts as int; never NaN (see the module
        docstring for the empty cases).
    """
    setting = panoptic_setting(setting)
    p, r = _mask_pair(pred, ref)
    sp = _spacing(spacing_mm, p.ndim)
    box = _bbox(p | r, pad=1)
    if box is None:
        return {"sq_dsc": 1.0, "sq_hd95": 0.0, "pq_dsc": 1.0, "tp": 0, "fp": 0, "fn": 0, "rq": 1.0, "pairs": []}
    p, r = p[box], r[box]
    ref_labels, n_ref = instances(r)
    pred_labels, n_pred = instances(p)
    matches = match_instances(ref_labels, n_ref, pred_labels, n_pred, setting)
    ref_boxes = ndimage.find_objects(ref_labels)
    pred_boxes = ndimage.find_objects(pred_labels)
    pairs = []
    for ref_id, pred_id in matches:
        rb, pb = ref_boxes[ref_id - 1], pred_boxes[pred_id - 1]
        # the union of both boxes grown by one voxel: the surfaces there equal those of the full masks
        crop = tuple(
            slice(max(min(a.start, b.start) - 1, 0), min(max(a.stop, b.stop) + 1, n))
            for a, b, n in zip(rb, pb, r.shape)
        )
        ri, pi = ref_labels[crop] == ref_id, pred_labels[crop] == pred_id
        n_inter, n_r, n_p = int(np.count_nonzero(ri & pi)), int(np.count_nonzero(ri)), int(np.count_nonzero(pi))
        pairs.append({"ref": ref_id, "pred": pred_id, "dsc": 2.0 * n_inter / (n_r + n_p), "hd95": pooled_hd95(pi, ri, sp)})
    tp = len(pairs)
    fp, fn = n_pred - tp, n_ref - tp
    if tp == 0:
        sq_dsc, sq_hd95, rq = 0.0, float(setting.hd95_penalty), 0.0
    else:
        sq_dsc = float(np.mean([q["dsc"] for q in pairs]))
        sq_hd95 = float(np.mean([q["hd95"] for q in pairs]))
        rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"sq_dsc": sq_dsc, "sq_hd95": sq_hd95, "pq_dsc": sq_dsc * rq, "tp": tp, "fp": fp, "fn": fn, "rq": rq, "pairs": pairs}


def panoptic_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_mm: float | Sequence[float],
    keys: Mapping[str, Sequence[int]],
    setting: PanopticSetting | str = PANOPTICA_DEFAULT,
) -> dict[str, dict[str, Any]]:
    """:data:`PANOPTIC_NAMES` of every region / label of ``keys`` (name → label values) for one case
    (label maps of shape (I, J, K)); the counts stay int, as the lesion-wise counts."""
    setting = panoptic_setting(setting)
    out: dict[str, dict[str, Any]] = {}
    for name, values in keys.items():
        values = list(values)
        s = panoptic_scores(np.isin(pred_labels, values), np.isin(ref_labels, values), spacing_mm, setting)
        out[name] = {k: s[k] for k in PANOPTIC_NAMES}
    return out
