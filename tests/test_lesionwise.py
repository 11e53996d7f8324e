"""BraTS lesion-wise metrics: crafted volumes with known answers, and agreement with a plain port of
the official scorers (full volume, one lesion at a time, as ``rachitsaluja/BraTS-2023-Metrics`` and
``BraTS-2024-Metrics`` do it, with scipy's labelling in place of cc3d)."""

from __future__ import annotations

import csv
import dataclasses
import io as _stdio
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.evaluation import lesionwise as lw
from medseg.evaluation.lesionwise import (
    BRATS2023_GLIOMA,
    BRATS2023_METS,
    BRATS2024_POST,
    lesionwise_case,
    lesionwise_scores,
    robust_hausdorff,
)
from medseg.evaluation.metrics import aggregate, evaluate_case
from medseg.evaluation.report import CASES_CSV, cases_long_csv, evaluate_arrays
from medseg.schemas import PER_CASE_CSV, DatasetJson, Metrics
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()

GLI = dict(dilation_iterations=3, volume_threshold=50, hd95_penalty=374.0)
METS = dict(dilation_iterations=1, volume_threshold=2, hd95_penalty=374.0)
LABELS_2024 = {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}
REGIONS_2024 = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}


def _box(shape, *slices):
    m = np.zeros(shape, bool)
    for s in slices:
        m[s] = True
    return m


# --------------------------------------------------------------------------- plain port of the official code
def _official_hd95(gt, pred, spacing):
    """DeepMind compute_surface_distances + compute_robust_hausdorff(95), on the whole volume."""
    normals = lw._normals_table()
    areas_table = np.zeros(256)
    for code in range(256):
        total = 0
        for n in normals[code]:
            total += np.linalg.norm(
                np.array([n[0] * spacing[1] * spacing[2], n[1] * spacing[0] * spacing[2], n[2] * spacing[0] * spacing[1]])
            )
        areas_table[code] = total
    both = gt | pred
    if not both.any():
        return math.inf
    lo = [int(np.flatnonzero(np.any(both, axis=tuple(a for a in range(3) if a != ax)))[0]) for ax in range(3)]
    hi = [int(np.flatnonzero(np.any(both, axis=tuple(a for a in range(3) if a != ax)))[-1]) for ax in range(3)]
    box = tuple(slice(lo[a], hi[a] + 1) for a in range(3))
    shape = [hi[a] - lo[a] + 2 for a in range(3)]
    out = []
    for mask in (gt, pred):
        crop = np.zeros(shape, np.uint8)
        crop[0:-1, 0:-1, 0:-1] = mask[box]
        out.append(ndimage.correlate(crop, np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]]), mode="constant", cval=0))
    code_gt, code_pred = out
    b_gt, b_pred = (code_gt != 0) & (code_gt != 255), (code_pred != 0) & (code_pred != 255)
    dm_gt = ndimage.distance_transform_edt(~b_gt, sampling=spacing) if b_gt.any() else np.inf * np.ones(b_gt.shape)
    dm_pred = ndimage.distance_transform_edt(~b_pred, sampling=spacing) if b_pred.any() else np.inf * np.ones(b_pred.shape)
    result = []
    for dist, area in ((dm_pred[b_gt], areas_table[code_gt[b_gt]]), (dm_gt[b_pred], areas_table[code_pred[b_pred]])):
        if len(dist) == 0:
            result.append(math.inf)
            continue
        srt = np.array(sorted(zip(dist, area)))
        dist, area = srt[:, 0], srt[:, 1]
        cum = np.cumsum(area) / np.sum(area)
        result.append(dist[min(np.searchsorted(cum, 0.95), len(dist) - 1)])
    return max(result)


_S18 = ndimage.generate_binary_structure(3, 2)
_S26 = np.ones((3, 3, 3), bool)


def _official_combined(gt, dil):
    gt_cc = ndimage.label(gt, _S26)[0]
    dil_cc = ndimage.label(ndimage.binary_dilation(gt, _S18, iterations=dil), _S26)[0]
    combined = np.zeros_like(dil_cc)
    for comp in range(1, dil_cc.max() + 1):
        tmp = gt_cc * (dil_cc == comp)
        tmp[tmp > 0] = comp
        combined += tmp
    return combined


def _official_scores(pred, gt_labels, spacing, dil, thresh, penalty=374.0, pred_labels=None):
    """get_LesionWiseScores + the thresholding of get_LesionWiseResults; gt_labels = lesion label map;
    pred_labels = the predicted lesion map (2024), else the components of pred (2023)."""
    pred_cc = ndimage.label(pred, _S26)[0] if pred_labels is None else pred_labels
    tp_comps, rows, gt_tp, fn = [], [], [], []
    for comp in range(1, int(gt_labels.max()) + 1):
        gt_tmp = gt_labels == comp
        roi = ndimage.binary_dilation(gt_tmp, _S18, iterations=dil)
        vol = np.sum(gt_tmp) * spacing[0] * spacing[1] * spacing[2]
        inter = np.unique(pred_cc * roi)
        inter = inter[inter != 0]
        tp_comps += list(inter)
        p = np.isin(pred_cc, inter) & (pred_cc > 0)
        dice = 2.0 * np.sum(p & gt_tmp) / (p.sum() + gt_tmp.sum())
        hd = _official_hd95(gt_tmp, p, spacing)
        rows.append((len(inter), vol, dice, penalty if math.isinf(hd) else hd))
        (gt_tp if len(inter) else fn).append(comp)
    fp = np.unique(pred_cc[np.isin(pred_cc, tp_comps + [0], invert=True)])
    kept = [r for r in rows if r[1] > thresh]
    n = len(kept) + len(fp)
    dice = sum(r[2] for r in kept) / n if n else 1.0
    hd = (sum(r[3] for r in kept) + len(fp) * penalty) / n if n else 0.0
    small_tp = sum(1 for r in rows if r[0] and r[1] <= thresh)
    small_fn = sum(1 for r in rows if not r[0] and r[1] <= thresh)
    return {"dice": dice, "hd95": hd, "tp": len(gt_tp) - small_tp, "fp": len(fp), "fn": len(fn) - small_fn}


def _official_touching(a, b):
    """get_touching_labels: (la, lb) with dilate(a == la) ∩ (b == lb) non-empty (the structure is
    symmetric, so the official second test, dilate(b == lb) ∩ (a == la), gives the same pairs)."""
    pairs = set()
    for la in np.unique(a)[1:]:
        for lb in np.unique(b[ndimage.binary_dilation(a == la, _S18)]):
            if lb:
                pairs.add((la, lb))
    return pairs


def _official_relabel(pairs, data):
    if len(pairs) <= 1:
        return data
    current = int(data.max()) + 1
    seen, mapping = {}, {}
    for orig, common in sorted(pairs):
        if common not in seen:
            seen[common] = current
            current += 1
    for orig, common in sorted(pairs):
        mapping.setdefault(orig, seen[common])
    out = data.copy()
    for orig, new in mapping.items():
        out[data == orig] = new
    return out


# metrics_GLI.py (current revision): NETC and RC dilated 5 times, the rest 3 ("SFNH" misspelt there)
DIL_2024 = {"WT": 3, "TC": 3, "NETC": 5, "SNFH": 3, "ET": 3, "RC": 5}


def _official_2024_lesions(label_map, drop_at_or_below=None):
    """save_tmp_files + combine_lesions_tissues + reorder_labels_nifti: the lesion map of every 2024
    tissue of one label map. ``drop_at_or_below`` (prediction): tissue → voxel count at or below which
    a dilation-combined lesion is removed first."""
    cc = {}
    for t, v in BRATS2024_POST.regions.items():
        data = _official_combined(np.isin(label_map, v), DIL_2024[t])
        if drop_at_or_below is not None:
            values, counts = np.unique(data, return_counts=True)
            data = np.where(np.isin(data, values[counts <= drop_at_or_below[t]]), 0, data)
        cc[t] = data
    order = {"NETC": ("ET", "RC"), "ET": ("NETC", "RC"), "RC": ("ET", "NETC"), "SNFH": ("ET", "RC", "NETC")}
    combined = dict(cc)
    for _ in range(2):
        for t, partners in order.items():
            data = cc[t]
            for partner in partners:
                data = _official_relabel(_official_touching(data, cc[partner]), data)
            combined[t] = data
    for t in order:  # reorder_labels_nifti: labels 1..n (WT and TC are used as they are)
        values = np.unique(combined[t])
        combined[t] = np.searchsorted(values, combined[t]) if values[0] == 0 else np.searchsorted(values, combined[t]) + 1
    return combined


def _blobs(rng, shape, sigma, q):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, q)


def _random_case(seed, shape=(56, 48, 40)):
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    tumour = _blobs(rng, shape, 2.5, 0.985)
    ref[tumour] = 2
    for label in (1, 3, 4, 3, 1):
        ref[tumour & _blobs(rng, shape, 1.5, 0.85)] = label
    cc, n = ndimage.label(ref > 0, np.ones((3, 3, 3)))
    pred = np.where(np.isin(cc, rng.choice(np.arange(1, n + 1), max(n // 4, 1), replace=False)), 0, ref)  # misses
    pred = np.roll(pred, tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
    pred[(rng.random(shape) < 0.15) & ~ndimage.binary_erosion(pred > 0)] = 0  # ragged borders
    pred[ndimage.binary_dilation(rng.random(shape) < 0.002) & (pred > 0)] = rng.integers(1, 5)  # label errors
    pred[_blobs(rng, shape, 2.0, 0.9993) & (pred == 0)] = rng.integers(1, 5)  # false positives
    return pred, ref


# --------------------------------------------------------------------------- known answers
SHAPE = (64, 48, 48)
A = (slice(5, 11), slice(5, 11), slice(5, 11))  # 216 voxels
B = (slice(45, 51), slice(30, 36), slice(30, 36))  # 216 voxels, far from A


def test_one_found_one_missed():
    ref, pred = _box(SHAPE, A, B), _box(SHAPE, A)
    s = lesionwise_scores(pred, ref, 1.0, **GLI)
    assert s["dice"] == pytest.approx((1 + 0) / 2)
    assert s["hd95"] == pytest.approx((0 + 374) / 2)
    assert (s["tp"], s["fp"], s["fn"], s["n_lesions"]) == (1, 0, 1, 2)


def test_false_positive_adds_to_the_denominator():
    ref = _box(SHAPE, A, B)
    pred = _box(SHAPE, A, (slice(50, 54), slice(5, 9), slice(5, 9)))  # + a component far from both
    s = lesionwise_scores(pred, ref, 1.0, **GLI)
    assert s["dice"] == pytest.approx(1 / 3)
    assert s["hd95"] == pytest.approx((0 + 374 + 374) / 3)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)


def test_nearby_lesions_merge_under_dilation_3_not_1():
    a2 = (slice(14, 20), slice(5, 11), slice(5, 11))  # 3 empty planes (x = 11..13) after A
    ref, pred = _box(SHAPE, A, a2), _box(SHAPE, A)  # only A is predicted
    merged = lesionwise_scores(pred, ref, 1.0, **GLI)
    assert merged["n_lesions"] == 1 and (merged["tp"], merged["fn"]) == (1, 0)
    assert merged["dice"] == pytest.approx(2 * 216 / (216 + 432))
    for kwargs in (METS, {**METS, "dilation_iterations": 0}):
        apart = lesionwise_scores(pred, ref, 1.0, **kwargs)
        assert apart["n_lesions"] == 2 and (apart["tp"], apart["fn"], apart["fp"]) == (1, 1, 0)
        assert apart["dice"] == pytest.approx(0.5)
    # the same through the settings: GLI (dilation 3) merges, METS (dilation 1) does not
    labels_ref, labels_pred = ref.astype(np.uint8) * 3, pred.astype(np.uint8) * 3
    assert lesionwise_case(labels_pred, labels_ref, 1.0, BRATS2023_GLIOMA)["ET"]["lesion_fn_2023"] == 0
    assert lesionwise_case(labels_pred, labels_ref, 1.0, BRATS2023_METS)["ET"]["lesion_fn_2023"] == 1


def test_prediction_near_but_outside_a_lesion_still_matches():
    # a predicted component 2 voxels beside the lesion lies in its dilated neighbourhood (dilation 3):
    # a true positive with Dice 0, not a false positive
    ref = _box(SHAPE, A)
    pred = _box(SHAPE, (slice(13, 16), slice(5, 11), slice(5, 11)))
    s = lesionwise_scores(pred, ref, 1.0, **GLI)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0) and s["dice"] == 0.0 and 0 < s["hd95"] < 374
    s = lesionwise_scores(pred, ref, 1.0, **METS)  # dilation 1 does not reach it
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1) and s["hd95"] == 374.0


def test_small_lesions_are_left_out():
    tiny = (slice(40, 45), slice(30, 35), slice(30, 32))  # 50 voxels: at the threshold
    ref, pred = _box(SHAPE, A, tiny), _box(SHAPE, A)
    s = lesionwise_scores(pred, ref, 1.0, **GLI)
    assert s["dice"] == 1.0 and s["hd95"] == 0.0 and (s["tp"], s["fn"], s["n_lesions"]) == (1, 0, 1)
    # 51 voxels is above it
    bigger = _box(SHAPE, A, tiny)
    bigger[40, 30, 32] = True
    assert lesionwise_scores(pred, bigger, 1.0, **GLI)["fn"] == 1
    # the volume is in mm³: 50 voxels of 1.1 mm³ are 55 mm³ > 50
    assert lesionwise_scores(pred, ref, (1.1, 1.0, 1.0), **GLI)["fn"] == 1
    # a prediction of the small lesion is neither scored nor a false positive
    s = lesionwise_scores(_box(SHAPE, A, tiny), ref, 1.0, **GLI)
    assert (s["dice"], s["tp"], s["fp"], s["fn"]) == (1.0, 1, 0, 0)


def test_empty_cases():
    empty = np.zeros(SHAPE, bool)
    s = lesionwise_scores(empty, empty, 1.0, **GLI)
    assert s == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fp": 0, "fn": 0, "n_lesions": 0}
    s = lesionwise_scores(_box(SHAPE, A), empty, 1.0, **GLI)
    assert (s["dice"], s["hd95"], s["fp"], s["fn"]) == (0.0, 374.0, 1, 0)
    s = lesionwise_scores(_box(SHAPE, A), empty, 1.0, **{**GLI, "hd95_penalty": 337.0})
    assert s["hd95"] == 337.0
    s = lesionwise_scores(empty, _box(SHAPE, A), 1.0, **GLI)
    assert (s["dice"], s["hd95"], s["tp"], s["fn"]) == (0.0, 374.0, 0, 1)


def test_anisotropic_spacing_changes_hd95_not_dice():
    big = (slice(10, 30), slice(10, 30), slice(10, 30))
    ref = _box(SHAPE, big)
    pred = np.roll(ref, 1, axis=0)  # one voxel along I
    iso = lesionwise_scores(pred, ref, (1.0, 1.0, 1.0), **GLI)
    aniso = lesionwise_scores(pred, ref, (2.0, 1.0, 1.0), **GLI)
    assert iso["dice"] == aniso["dice"] == pytest.approx(2 * 19 / 40)
    assert iso["hd95"] == pytest.approx(1.0) and aniso["hd95"] == pytest.approx(2.0)
    assert lesionwise_scores(np.roll(ref, 1, axis=1), ref, (2.0, 1.0, 1.0), **GLI)["hd95"] == pytest.approx(1.0)


def test_robust_hausdorff_matches_the_official_port_and_rejects_empty():
    rng = np.random.default_rng(3)
    for seed in range(4):
        gt = ndimage.gaussian_filter(rng.standard_normal((20, 18, 16)), 1.5) > 0.2
        pred = ndimage.binary_dilation(gt) if seed % 2 else np.roll(gt, 2, axis=seed % 3)
        sp = (1.0, 1.0, 1.0) if seed == 0 else (0.9, 1.3, 2.5)
        assert robust_hausdorff(gt, pred, sp) == _official_hd95(gt, pred, sp)
    assert math.isinf(robust_hausdorff(gt, np.zeros_like(gt), 1.0))


# --------------------------------------------------------------------------- 2024 post-treatment
def test_2024_regions_thresholds_and_penalty():
    ref = np.zeros(SHAPE, np.uint8)
    ref[A] = 4  # a resection cavity only
    s = lesionwise_case(np.zeros(SHAPE, np.uint8), ref, 1.0, BRATS2024_POST)
    assert list(s) == ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    assert s["WT"]["lesionwise_dice_2024"] == 1.0 and s["WT"]["lesion_fn_2024"] == 0  # RC is not in WT
    assert s["RC"]["lesionwise_dice_2024"] == 0.0 and s["RC"]["lesion_fn_2024"] == 1
    assert s["RC"]["lesionwise_hd95_2024"] == BRATS2024_POST.hd95_penalty == 337.0  # as metrics_GLI.py
    custom = dataclasses.replace(BRATS2024_POST, hd95_penalty=374.0)
    assert lesionwise_case(np.zeros(SHAPE, np.uint8), ref, 1.0, custom)["RC"]["lesionwise_hd95_2024"] == 374.0
    # a cavity predicted as oedema is a false positive for WT
    pred = np.where(ref == 4, 2, 0).astype(np.uint8)
    assert lesionwise_case(pred, ref, 1.0, "brats2024")["WT"]["lesion_fp_2024"] == 1
    # thresholds: 15-voxel lesions count for ET (10 mm³), not for SNFH or RC (20 mm³)
    small = np.zeros(SHAPE, np.uint8)
    small[5:8, 5:10, 5] = 3
    small[30:33, 5:10, 5] = 2
    small[55:58, 5:10, 5] = 4
    s = lesionwise_case(np.zeros(SHAPE, np.uint8), small, 1.0, BRATS2024_POST)
    assert (s["ET"]["lesion_fn_2024"], s["RC"]["lesion_fn_2024"], s["SNFH"]["lesion_fn_2024"]) == (1, 0, 0)


def test_2024_lesions_touching_one_partner_merge():
    # two NETC blobs far apart (no merging by dilation) both touching one long ET lesion
    ref = np.zeros(SHAPE, np.uint8)
    ref[10:50, 20:24, 20:24] = 3
    ref[10:16, 24:30, 20:24] = 1
    ref[44:50, 24:30, 20:24] = 1
    pred = np.where(ref == 3, 3, 0).astype(np.uint8)
    pred[10:16, 24:30, 20:24] = 1  # only the first NETC blob predicted
    s = lesionwise_case(pred, ref, 1.0, BRATS2024_POST)["NETC"]
    assert (s["lesion_tp_2024"], s["lesion_fn_2024"]) == (1, 0)  # one lesion
    assert s["lesionwise_dice_2024"] == pytest.approx(2 * 144 / (144 + 288))
    netc_2023_rules = lesionwise_scores(pred == 1, ref == 1, 1.0, dilation_iterations=3, volume_threshold=20, hd95_penalty=374)
    assert (netc_2023_rules["tp"], netc_2023_rules["fn"]) == (1, 1)  # two lesions without the 2024 merge


def test_2024_crafted_multilesion_case():
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    found, missed, shifted = A, B, (slice(25, 31), slice(5, 11), slice(30, 36))  # three 216-voxel ET lesions
    for lesion in (found, missed, shifted):
        ref[lesion] = 3
    pred[found] = 3
    pred[27:33, 5:11, 30:36] = 3  # the third lesion predicted 2 voxels off: Dice 2 * 144 / 432
    pred[50:54, 5:9, 5:9] = 3  # a 64-voxel false positive
    pred[5:7, 40:42, 40:42] = 3  # an 8-voxel false positive: dropped by the 2024 rules (<= 10 voxels)
    # NETC: two 27-voxel lesions 8 planes apart, merged by NETC's 5 dilations; only the first predicted
    ref[30:33, 35:38, 5:8] = 1
    ref[41:44, 35:38, 5:8] = 1
    pred[30:33, 35:38, 5:8] = 1
    s = lesionwise_case(pred, ref, 1.0, "brats2024")
    gt_c, pred_c = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    gt_c[shifted] = True
    pred_c[27:33, 5:11, 30:36] = True
    hd_shifted = robust_hausdorff(gt_c, pred_c, 1.0)
    et = s["ET"]
    assert (et["lesion_tp_2024"], et["lesion_fp_2024"], et["lesion_fn_2024"]) == (2, 1, 1)
    assert et["lesionwise_dice_2024"] == pytest.approx((1 + 0 + 2 * 144 / 432 + 0) / 4)
    assert et["lesionwise_hd95_2024"] == pytest.approx((0 + 337 + hd_shifted + 337) / 4)
    # the same with the 2023 rules (components, penalty 374): the 8-voxel blob is a false positive too
    old = lesionwise_scores(pred == 3, ref == 3, 1.0, dilation_iterations=3, volume_threshold=10, hd95_penalty=374)
    assert (old["tp"], old["fp"], old["fn"]) == (2, 2, 1)
    assert old["dice"] == pytest.approx((1 + 2 * 144 / 432) / 5)
    netc = s["NETC"]
    assert (netc["lesion_tp_2024"], netc["lesion_fp_2024"], netc["lesion_fn_2024"]) == (1, 0, 0)
    assert netc["lesionwise_dice_2024"] == pytest.approx(2 * 27 / (27 + 54))
    three = lesionwise_scores(pred == 1, ref == 1, 1.0, dilation_iterations=3, volume_threshold=20, hd95_penalty=337)
    assert (three["tp"], three["fn"]) == (1, 1)  # 3 dilations (SNFH's) keep them apart
    assert list(BRATS2024_POST.region_dilation.items()) == [("NETC", 5), ("RC", 5)]


def test_2024_predicted_fragments_merge_like_reference_lesions():
    # two 64-voxel predicted ET fragments 4 planes apart and far from any reference: one false positive
    # in 2024 (3 dilations merge them), two with connected components (2023)
    ref = np.zeros(SHAPE, np.uint8)
    ref[A] = 3
    pred = ref.copy()
    pred[40:44, 30:34, 30:34] = 3
    pred[48:52, 30:34, 30:34] = 3
    assert lesionwise_case(pred, ref, 1.0, "brats2024")["ET"]["lesion_fp_2024"] == 1
    assert lesionwise_case(pred, ref, 1.0, "brats2023")["ET"]["lesion_fp_2023"] == 2


def test_stage_chooses_the_setting_from_the_dataset():
    from medseg.evaluation.stage import lesionwise_setting
    from medseg.task import BRATS2024

    post = DatasetJson(name="p", channel_names={"0": "t1c"}, labels=LABELS_2024, numTraining=1,
                       regions=BRATS2024.regions_dict(), source_format="brats2024")
    assert lesionwise_setting(post) == "brats2024"
    pre = DatasetJson(name="g", channel_names={"0": "t1c"}, labels=BRATS_LABELS, numTraining=1,
                      regions=BRATS_REGIONS, source_format="brats2023")
    assert lesionwise_setting(pre) == "brats2023"
    assert lesionwise_setting(dataclasses.replace(pre, lesionwise="brats2023_mets")) == "brats2023_mets"  # metastases: ingest says so
    assert lesionwise_setting(dataclasses.replace(pre, lesionwise="none")) is None
    assert lesionwise_setting(dataclasses.replace(pre, regions={"WT": [1, 2, 3]})) is None
    # the labels and regions decide, not the source format's name: 2023 labels under a 2024 name are scored as 2023
    assert lesionwise_setting(dataclasses.replace(post, labels=BRATS_LABELS, regions=REGIONS_2024)) == "brats2023"
    with pytest.raises(MedsegError, match="lesionwise"):
        lesionwise_setting(dataclasses.replace(pre, lesionwise="brats2099"))


def test_evaluate_arrays_writes_the_2024_names(tmp_path):
    from medseg.task import BRATS2024

    pred, ref = _random_case(10)
    ds = DatasetJson(name="p", channel_names={"0": "t1c"}, labels=LABELS_2024, numTraining=1,
                     regions=BRATS2024.regions_dict(), source_format="brats2024")
    evaluate_arrays([("c0", pred, ref, (1.0, 1.0, 1.0))], ds, tmp_path, lesionwise="brats2024")
    rows = list(csv.reader(_stdio.StringIO((tmp_path / CASES_CSV).read_text())))
    names = {(r[1], r[2]) for r in rows[1:]}
    for region in ("WT", "TC", "ET", "NETC", "SNFH", "RC"):
        for metric in ("lesionwise_dice_2024", "lesionwise_hd95_2024", "lesion_tp_2024", "lesion_fp_2024", "lesion_fn_2024"):
            assert (region, metric) in names
    assert not any(m.endswith("_2023") for _, m in names)


# --------------------------------------------------------------------------- agreement with the official port
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_port_2023(seed):
    pred, ref = _random_case(seed)
    sp = (1.0, 1.0, 1.0) if seed == 0 else (1.0, 0.8, 1.5)
    for setting in (BRATS2023_GLIOMA, BRATS2023_METS, dataclasses.replace(BRATS2023_GLIOMA, volume_thresholds={"WT": 5, "TC": 5, "ET": 5})):
        got = lesionwise_case(pred, ref, sp, setting)
        for region, values in setting.regions.items():
            gt = np.isin(ref, values)
            want = _official_scores(np.isin(pred, values), _official_combined(gt, setting.dilation_iterations), sp,
                                    setting.dilation_iterations, setting.volume_thresholds[region])
            g = got[region]
            assert (g["lesion_tp_2023"], g["lesion_fp_2023"], g["lesion_fn_2023"]) == (want["tp"], want["fp"], want["fn"])
            assert g["lesionwise_dice_2023"] == pytest.approx(want["dice"], abs=1e-12)
            assert g["lesionwise_hd95_2023"] == pytest.approx(want["hd95"], abs=1e-9)


@pytest.mark.parametrize("seed", [3, 4])
def test_matches_official_port_2024(seed):
    pred, ref = _random_case(seed)
    thresholds = {r: 4 for r in BRATS2024_POST.regions}
    setting = dataclasses.replace(BRATS2024_POST, volume_thresholds=thresholds)
    got = lesionwise_case(pred, ref, 1.0, setting)
    lesions = _official_2024_lesions(ref)
    pred_lesions = _official_2024_lesions(pred, thresholds)
    merged_any = False
    for region, values in setting.regions.items():
        want = _official_scores(np.isin(pred, values), lesions[region], (1.0, 1.0, 1.0), DIL_2024[region], 4,
                                penalty=337.0, pred_labels=pred_lesions[region])
        merged_any |= len(np.unique(lesions[region])) < len(np.unique(_official_combined(np.isin(ref, values), DIL_2024[region])))
        g = got[region]
        assert (g["lesion_tp_2024"], g["lesion_fp_2024"], g["lesion_fn_2024"]) == (want["tp"], want["fp"], want["fn"])
        assert g["lesionwise_dice_2024"] == pytest.approx(want["dice"], abs=1e-12)
        assert g["lesionwise_hd95_2024"] == pytest.approx(want["hd95"], abs=1e-9)
    assert merged_any  # the random case exercises the cross-tissue merge


# --------------------------------------------------------------------------- integration
def test_evaluate_case_lesionwise_keys():
    pred, ref = _random_case(5)
    pred[pred == 4], ref[ref == 4] = 2, 2
    plain = evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS)
    full = evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, lesionwise="brats2023")
    assert plain == evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, lesionwise=None)
    lesion = lesionwise_case(pred, ref, 1.0, "brats2023")
    for name in plain:
        extra = lesion.get(name, {})
        assert full[name] == {**plain[name], **extra}
    assert set(lesion) == {"WT", "TC", "ET"} and "lesion_tp_2023" in full["ET"] and "lesion_tp_2023" not in full["NETC"]
    with pytest.raises(MedsegError, match="unknown lesion-wise"):
        evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, lesionwise="brats2099")
    with pytest.raises(MedsegError, match="RC"):  # no RC label in a pre-treatment dataset
        evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, lesionwise="brats2024")
    both_empty = evaluate_case(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), 1.0, BRATS_LABELS, BRATS_REGIONS, lesionwise="brats2023_mets")
    assert both_empty["WT"]["lesionwise_dice_2023"] == 1.0 and both_empty["WT"]["lesionwise_hd95_2023"] == 0.0


def test_evaluate_case_2024():
    pred, ref = _random_case(6)
    out = evaluate_case(pred, ref, 1.0, LABELS_2024, REGIONS_2024, lesionwise="brats2024")
    assert list(out) == ["WT", "TC", "ET", "NETC", "SNFH", "RC"]
    assert all("lesionwise_dice_2024" in out[n] for n in out)


def test_aggregate_spread_and_long_csv(tmp_path):
    cases = [("c0", *_random_case(7)), ("c1", *_random_case(8)), ("c2", *_random_case(9))]
    pairs = [(c, np.where(p == 4, 2, p), np.where(r == 4, 2, r), (1.0, 1.0, 1.0)) for c, p, r in cases]
    per_case = [{"case_id": c, **evaluate_case(p, r, s, BRATS_LABELS, BRATS_REGIONS, lesionwise="brats2023")} for c, p, r, s in pairs]
    agg = aggregate(per_case)
    dices = np.array([c["WT"]["lesionwise_dice_2023"] for c in per_case])
    assert agg["WT"]["lesionwise_dice_2023"] == pytest.approx(dices.mean())
    assert agg["WT"]["lesionwise_dice_2023_std"] == pytest.approx(dices.std(ddof=1))
    assert agg["WT"]["lesionwise_dice_2023_q25"] == pytest.approx(np.percentile(dices, 25))
    assert agg["WT"]["dice_q75"] == pytest.approx(np.percentile([c["WT"]["dice"] for c in per_case], 75))
    assert "dice_median" in agg["WT"] and "iou_std" in agg["NETC"] and "lesion_tp_2023_std" not in agg["NETC"]
    assert aggregate(per_case[:1])["WT"]["dice_std"] == 0.0

    metrics = Metrics(n_cases=3, mean=agg, per_case=per_case)
    rows = list(csv.reader(_stdio.StringIO(cases_long_csv(metrics))))
    assert rows[0] == ["case", "region", "metric", "value"]
    n_numbers = sum(len(v) for c in per_case for v in c.values() if isinstance(v, dict))
    assert len(rows) == 1 + n_numbers
    assert ["c1", "WT", "lesion_fp_2023", repr(float(per_case[1]["WT"]["lesion_fp_2023"]))] in rows
    assert rows[1][:3] == ["c0", "WT", "dice"]

    ds = DatasetJson(name="t", channel_names={"0": "t1c"}, labels=BRATS_LABELS, numTraining=3, regions=BRATS_REGIONS)
    evaluate_arrays(pairs, ds, tmp_path)
    assert (tmp_path / PER_CASE_CSV).is_file()
    assert (tmp_path / CASES_CSV).read_text().startswith("case,region,metric,value\n")


def test_fast_on_a_128_cube():
    import time

    rng = np.random.default_rng(0)
    shape = (128, 128, 128)
    ref = np.zeros(shape, np.uint8)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 4)
    ref[field > 2.0 * field.std()] = 2
    ref[field > 2.6 * field.std()] = 1
    ref[field > 3.0 * field.std()] = 3
    pred = np.roll(ref, 2, axis=0)
    lesionwise_case(pred[:8, :8, :8], ref[:8, :8, :8], 1.0, BRATS2023_GLIOMA)  # import MONAI's table first
    robust_hausdorff(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), 1.0)
    t0 = time.perf_counter()
    out = lesionwise_case(pred, ref, 1.0, BRATS2023_GLIOMA)
    elapsed = time.perf_counter() - t0
    assert out["WT"]["lesion_tp_2023"] >= 2
    assert elapsed < 5.0  # ~0.2 s alone; generous for a shared machine
