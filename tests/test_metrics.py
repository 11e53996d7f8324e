"""Segmentation metrics: hand-computed values, brute-force surface distances, empty masks, MONAI."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.errors import MedsegError
from medseg.evaluation.metrics import (
    HD95_PENALTY_MM,
    METRIC_NAMES,
    aggregate,
    as_label_map,
    average_surface_distance,
    dice,
    evaluate_case,
    evaluation_keys,
    hd95,
    iou,
    sensitivity,
    specificity,
    surface_distances,
    volume_ml,
)
from medseg.evaluation.panoptic import PANOPTIC_NAMES
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()


def _blobs(shape, seed, threshold=1.0, sigma=2.0):
    """Random irregular blobs (smoothed noise above a threshold)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > threshold * field.std()


def _brute_force(pred, ref, spacing):
    """Surface distances on the full volume with all-pairs distances (no bbox, no EDT)."""
    sp = np.asarray(spacing, float)
    surf_p = pred ^ ndimage.binary_erosion(pred)
    surf_r = ref ^ ndimage.binary_erosion(ref)
    pts_p, pts_r = np.argwhere(surf_p) * sp, np.argwhere(surf_r) * sp
    d = cdist(pts_p, pts_r)
    return d.min(axis=1), d.min(axis=0)


# --------------------------------------------------------------------------- overlap
def test_overlap_metrics_on_known_counts():
    # pred: 4 voxels, ref: 6 voxels, 3 in common, 8*8*8 = 512 voxels in all.
    pred = np.zeros((8, 8, 8), bool)
    ref = np.zeros((8, 8, 8), bool)
    pred[0, 0, 0:4] = True  # k = 0..3
    ref[0, 0, 1:7] = True  # k = 1..6 → overlap k = 1..3
    assert dice(pred, ref) == pytest.approx(2 * 3 / (4 + 6))  # 0.6
    assert iou(pred, ref) == pytest.approx(3 / 7)
    assert sensitivity(pred, ref) == pytest.approx(3 / 6)
    # TN = 512 - |P ∪ R| = 512 - 7 = 505, FP = 1
    assert specificity(pred, ref) == pytest.approx(505 / 506)
    assert iou(pred, ref) == pytest.approx(dice(pred, ref) / (2 - dice(pred, ref)))


def test_identical_masks_are_perfect():
    mask = _blobs((20, 20, 20), seed=1)
    assert mask.any()
    assert dice(mask, mask) == 1.0 and iou(mask, mask) == 1.0
    assert hd95(mask, mask, (1.0, 2.0, 3.0)) == 0.0
    assert average_surface_distance(mask, mask, 1.0) == 0.0


def test_volume_ml_uses_spacing():
    mask = np.zeros((10, 10, 10), bool)
    mask[:5, :4, :2] = True  # 40 voxels of 0.5 * 1 * 3 mm³ = 60 mm³
    assert volume_ml(mask, (0.5, 1.0, 3.0)) == pytest.approx(0.06)
    assert volume_ml(mask, 2.0) == pytest.approx(40 * 8 / 1000)


def test_shape_mismatch_raises():
    with pytest.raises(MedsegError, match="shape"):
        dice(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
    with pytest.raises(MedsegError, match="spacing"):
        hd95(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1.0, 1.0))


# --------------------------------------------------------------------------- surface distances
def test_hd95_offset_cubes_anisotropic():
    # 4³ cubes, the second shifted by 2 voxels along axis 2 where voxels are 3 mm: 6 mm apart.
    spacing = (1.0, 1.0, 3.0)
    a = np.zeros((12, 12, 16), bool)
    b = np.zeros_like(a)
    a[4:8, 4:8, 4:8] = True
    b[4:8, 4:8, 6:10] = True
    # Per direction, the 56 surface voxels of a cube are at distance
    #   6 mm (16: the face left behind), 3 mm (12: the ring next to it),
    #   0 mm (24: rings that coincide), 1 mm (4: face centre next to the other's ring).
    # The 95th percentile falls among the 6 mm ones; ASSD = (16*6 + 12*3 + 4*1) / 56.
    assert hd95(a, b, spacing) == pytest.approx(6.0)
    assert average_surface_distance(a, b, spacing) == pytest.approx(136 / 56)
    # The same shift along axis 0 (1 mm voxels) is 2 mm: the spacing is applied per axis, in order.
    c = np.zeros((16, 12, 12), bool)
    d = np.zeros_like(c)
    c[4:8, 4:8, 4:8] = True
    d[6:10, 4:8, 4:8] = True
    assert hd95(c, d, spacing) == pytest.approx(2.0)


def test_hd95_parallel_slabs_all_distances_equal():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2:8, 2:8, 3] = True
    b[2:8, 2:8, 5] = True  # every surface voxel is 2 slices = 6 mm from the other slab
    d_ab, d_ba = surface_distances(a, b, (1.0, 1.0, 3.0))
    assert np.allclose(d_ab, 6.0) and np.allclose(d_ba, 6.0)
    assert average_surface_distance(a, b, (1.0, 1.0, 3.0)) == pytest.approx(6.0)


def test_hd95_is_max_of_directed_percentiles():
    # Same 14³ cube in both (1016 surface voxels), plus a far 4³ blob only in ref (56): 5.2% of ref's
    # surface is far from pred, so the directed ref→pred 95th percentile is large; pooled with pred's
    # all-zero distances (2.7% far) it would be 0. The convention is the max of the directed percentiles.
    pred = np.zeros((40, 40, 40), bool)
    pred[5:19, 5:19, 5:19] = True
    ref = pred.copy()
    ref[30:34, 30:34, 30:34] = True
    d_pr, d_rp = surface_distances(pred, ref, 1.0)
    assert np.percentile(d_pr, 95) == 0.0
    assert np.percentile(np.concatenate([d_pr, d_rp]), 95) == 0.0
    assert hd95(pred, ref, 1.0) == pytest.approx(np.percentile(d_rp, 95))
    assert hd95(pred, ref, 1.0) > 15.0
    assert hd95(ref, pred, 1.0) == hd95(pred, ref, 1.0)  # symmetric


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bbox_cropped_distances_equal_brute_force(seed):
    shape, spacing = (36, 30, 24), (0.8, 1.1, 2.5)
    pred, ref = _blobs(shape, seed), _blobs(shape, seed + 100)
    if seed == 2:  # masks touching the image border: border voxels are surface in both methods
        pred[:3, :, :4] = True
        ref[-2:, :5, :] = True
    fast_pr, fast_rp = surface_distances(pred, ref, spacing)
    slow_pr, slow_rp = _brute_force(pred, ref, spacing)
    np.testing.assert_allclose(fast_pr, slow_pr, atol=1e-9)
    np.testing.assert_allclose(fast_rp, slow_rp, atol=1e-9)
    expected_hd95 = max(np.percentile(slow_pr, 95), np.percentile(slow_rp, 95))
    expected_assd = (slow_pr.sum() + slow_rp.sum()) / (slow_pr.size + slow_rp.size)
    assert hd95(pred, ref, spacing) == pytest.approx(expected_hd95)
    assert average_surface_distance(pred, ref, spacing) == pytest.approx(expected_assd)


def test_small_blobs_far_apart_in_a_large_volume():
    # Tiny masks far apart: the box spans both, and the distance is still exact.
    pred = np.zeros((64, 64, 64), bool)
    ref = np.zeros_like(pred)
    pred[2, 2, 2] = True
    ref[60, 50, 40] = True
    dist = np.sqrt(58.0**2 + 48.0**2 + (38.0 * 2) ** 2)
    assert hd95(pred, ref, (1.0, 1.0, 2.0)) == pytest.approx(dist)


# --------------------------------------------------------------------------- empty masks
def test_empty_masks():
    empty = np.zeros((8, 8, 8), bool)
    full = np.zeros_like(empty)
    full[2:5, 2:5, 2:5] = True
    # both empty: a correct "nothing here"
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert hd95(empty, empty, 1.0) == 0.0 and average_surface_distance(empty, empty, 1.0) == 0.0
    assert sensitivity(empty, empty) == 1.0 and specificity(empty, empty) == 1.0
    # exactly one empty: worst score, never NaN
    for p, r in ((full, empty), (empty, full)):
        assert dice(p, r) == 0.0 and iou(p, r) == 0.0
        assert hd95(p, r, 1.0) == HD95_PENALTY_MM
        assert average_surface_distance(p, r, 1.0) == HD95_PENALTY_MM
        assert hd95(p, r, 1.0, penalty_mm=99.0) == 99.0
    assert sensitivity(full, empty) == 0.0 and sensitivity(empty, full) == 0.0
    with pytest.raises(MedsegError):
        surface_distances(full, empty, 1.0)


# --------------------------------------------------------------------------- label maps
def _brats_case():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[4:16, 4:16, 4:16] = 2  # oedema
    ref[7:13, 7:13, 7:13] = 3  # enhancing
    ref[9:11, 9:11, 9:11] = 1  # necrosis
    return ref


def test_regions_unite_labels():
    ref = _brats_case()
    pred = ref.copy()
    pred[pred == 1] = 2  # necrosis called oedema: WT unchanged, TC loses the necrosis
    out = evaluate_case(pred, ref, (1.0, 1.0, 1.0), BRATS_LABELS, BRATS_REGIONS)
    assert list(out) == ["WT", "TC", "ET", "NETC", "SNFH"]  # regions first, background left out
    assert all(list(v)[: len(METRIC_NAMES)] == list(METRIC_NAMES) for v in out.values())
    assert all(list(v)[len(METRIC_NAMES):] == list(PANOPTIC_NAMES) for v in out.values())  # instance-wise last
    assert list(evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, panoptic=None)["WT"]) == list(METRIC_NAMES)
    assert out["WT"]["dice"] == 1.0 and out["WT"]["hd95"] == 0.0
    assert out["ET"]["dice"] == 1.0
    n_core, n_netc = 6**3, 2**3
    assert out["TC"]["dice"] == pytest.approx(2 * (n_core - n_netc) / (n_core - n_netc + n_core))
    # NETC missing from the prediction: Dice 0, HD95 = penalty, sensitivity 0
    assert out["NETC"]["dice"] == 0.0 and out["NETC"]["hd95"] == HD95_PENALTY_MM
    assert out["NETC"]["sensitivity"] == 0.0
    assert out["NETC"]["volume_pred_ml"] == 0.0 and out["NETC"]["volume_ref_ml"] == pytest.approx(0.008)
    assert out["WT"]["volume_ref_ml"] == pytest.approx(12**3 / 1000)
    # the region metrics equal the binary metrics of the unions
    wt_p, wt_r = np.isin(pred, [1, 2, 3]), np.isin(ref, [1, 2, 3])
    assert out["WT"]["specificity"] == specificity(wt_p, wt_r)
    tc_p, tc_r = np.isin(pred, [1, 3]), np.isin(ref, [1, 3])
    assert out["TC"]["hd95"] == pytest.approx(hd95(tc_p, tc_r, 1.0))
    assert out["TC"]["iou"] == pytest.approx(iou(tc_p, tc_r))


def test_evaluate_case_all_background_and_errors():
    zero = np.zeros((6, 6, 6), np.int16)
    out = evaluate_case(zero, zero, (1, 1, 1), BRATS_LABELS, BRATS_REGIONS)
    assert all(v["dice"] == 1.0 and v["hd95"] == 0.0 and v["specificity"] == 1.0 for v in out.values())
    with pytest.raises(MedsegError, match="shape"):
        evaluate_case(zero, np.zeros((6, 6, 7), np.int16), (1, 1, 1), BRATS_LABELS, BRATS_REGIONS)
    bad = zero.copy()
    bad[1, 1, 1] = 4  # BraTS 2021 ET value: not a BraTS 2023 label
    with pytest.raises(MedsegError, match=r"\[4\]"):
        evaluate_case(bad, zero, (1, 1, 1), BRATS_LABELS, BRATS_REGIONS)
    with pytest.raises(MedsegError, match="non-integer"):
        as_label_map(np.full((2, 2, 2), 0.5))
    # float maps holding whole numbers (as nibabel returns) are fine
    ref = _brats_case()
    as_float = evaluate_case(ref.astype(np.float32), ref, 1.0, BRATS_LABELS, BRATS_REGIONS)
    assert as_float["WT"]["dice"] == 1.0


def test_evaluation_keys_conflicts():
    assert evaluation_keys(BRATS_LABELS, BRATS_REGIONS)["ET"] == (3,)
    with pytest.raises(MedsegError, match="both label"):
        evaluation_keys(BRATS_LABELS, {"ET": [1, 3]})
    with pytest.raises(MedsegError, match="background"):
        evaluation_keys(BRATS_LABELS, {"ALL": [0, 1]})
    assert list(evaluation_keys({"background": 0, "liver": 1}, {})) == ["liver"]


def test_aggregate_mean_and_median():
    cases = [
        {"case_id": "a", "WT": {"dice": 1.0, "hd95": 0.0, "iou": 1.0}},
        {"case_id": "b", "WT": {"dice": 0.5, "hd95": 10.0, "iou": 0.4}},
        {"case_id": "c", "WT": {"dice": 0.0, "hd95": 373.13, "iou": 0.0}},
    ]
    agg = aggregate(cases)
    assert agg["WT"]["dice"] == pytest.approx(0.5) and agg["WT"]["dice_median"] == 0.5
    assert agg["WT"]["hd95"] == pytest.approx(383.13 / 3) and agg["WT"]["hd95_median"] == 10.0
    assert agg["WT"]["iou"] == pytest.approx(1.4 / 3) and "iou_median" not in agg["WT"]
    assert aggregate([]) == {}
    with pytest.raises(MedsegError, match="case b"):
        aggregate([cases[0], {"case_id": "b", "TC": {"dice": 1.0}}])


# --------------------------------------------------------------------------- agreement with MONAI
@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside MONAI
def test_agrees_with_monai():
    torch = pytest.importorskip("torch")
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    rng = np.random.default_rng(7)
    shape, spacing = (24, 22, 20), (1.0, 1.5, 2.0)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for value, seed in ((2, 0), (3, 1), (1, 2)):  # later labels overwrite earlier ones
        ref[_blobs(shape, seed, threshold=0.8)] = value
        pred[_blobs(shape, seed + 10 * value + int(rng.integers(1, 5)), threshold=0.8) | (ref == value) & (rng.random(shape) < 0.7)] = value
    ours = evaluate_case(pred, ref, spacing, BRATS_LABELS, {})

    def one_hot(a):
        return torch.from_numpy(np.stack([a == v for v in range(4)])[None].astype(np.float32))

    theirs = DiceMetric(include_background=False, reduction="none")(one_hot(pred), one_hot(ref))[0]
    for name, value in (("NETC", 1), ("SNFH", 2), ("ET", 3)):
        assert ours[name]["dice"] == pytest.approx(float(theirs[value - 1]), abs=1e-6)
        monai_hd95 = compute_hausdorff_distance(
            one_hot(pred)[:, value : value + 1], one_hot(ref)[:, value : value + 1], percentile=95, spacing=spacing
        )
        assert ours[name]["hd95"] == pytest.approx(float(monai_hd95), abs=1e-5)
