"""Instance-wise (panoptic) metrics: hand-computed cases, and agreement with numbers panoptica 2.1.7
produced itself on crafted cases (tests/data/panoptic_reference.json, see make_panoptic_reference.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.errors import MedsegError
from medseg.evaluation.metrics import HD95_PENALTY_MM, evaluate_case, hd95
from medseg.evaluation.panoptic import (
    BRATS2025,
    PANOPTIC_NAMES,
    PANOPTICA_DEFAULT,
    PanopticSetting,
    instances,
    match_instances,
    panoptic_scores,
    pooled_hd95,
)
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("panoptic_cases", DATA / "panoptic_cases.py")
panoptic_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(panoptic_cases)

SHAPE = (30, 30, 30)


def _box(*slices):
    m = np.zeros(SHAPE, bool)
    for s in slices:
        m[s] = True
    return m


# --------------------------------------------------------------------------- hand-computed
def test_single_instance_shifted():
    ref = _box((slice(5, 15), slice(5, 15), slice(5, 15)))  # 1000 voxels
    pred = np.roll(ref, 2, axis=0)  # 800 in common: IoU 800 / 1200 = 2/3, Dice 0.8
    s = panoptic_scores(pred, ref, 1.0)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)
    assert s["sq_dsc"] == pytest.approx(0.8) and s["rq"] == 1.0 and s["pq_dsc"] == pytest.approx(0.8)
    assert s["pairs"] == [{"ref": 1, "pred": 1, "dsc": pytest.approx(0.8), "hd95": s["sq_hd95"]}]
    # the pooled percentile: all surface distances of both directions together (brute force)
    sp = (1.0, 1.5, 2.0)
    surf = lambda m: np.argwhere(m ^ ndimage.binary_erosion(m)) * np.asarray(sp)  # noqa: E731
    d = cdist(surf(pred), surf(ref))
    want = np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)
    assert panoptic_scores(pred, ref, sp)["sq_hd95"] == pytest.approx(want)
    assert pooled_hd95(pred, ref, sp) <= hd95(pred, ref, sp)  # never above the max of the directed ones


def test_iou_threshold_is_inclusive_unless_strict():
    ref = _box((slice(4, 8), slice(4, 8), slice(4, 8)))  # 64 voxels
    pred = _box((slice(4, 6), slice(4, 8), slice(4, 8)))  # its half: IoU exactly 0.5, Dice 2/3
    s = panoptic_scores(pred, ref, 1.0)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0) and s["sq_dsc"] == pytest.approx(2 / 3)
    strict = PanopticSetting("strict", matching_threshold=0.5, strict=True)
    s = panoptic_scores(pred, ref, 1.0, strict)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1)
    assert (s["sq_dsc"], s["sq_hd95"], s["pq_dsc"]) == (0.0, HD95_PENALTY_MM, 0.0)


def test_split_prediction_naive_versus_bipartite():
    ref = _box((slice(5, 15), slice(5, 15), slice(5, 15)))  # 1000 voxels
    big = _box((slice(5, 9), slice(5, 15), slice(5, 15)))  # 400 voxels: IoU 0.4
    small = _box((slice(11, 14), slice(5, 15), slice(5, 15)))  # 300 voxels: IoU 0.3
    pred = big | small
    naive = panoptic_scores(pred, ref, 1.0, "panoptica")
    assert (naive["tp"], naive["fp"], naive["fn"]) == (0, 2, 1) and naive["pq_dsc"] == 0.0
    bip = panoptic_scores(pred, ref, 1.0, "brats2025")  # any overlap; the larger Dice wins
    assert (bip["tp"], bip["fp"], bip["fn"]) == (1, 1, 0)
    assert bip["sq_dsc"] == pytest.approx(2 * 400 / 1400)
    assert bip["rq"] == pytest.approx(1 / (1 + 0.5)) and bip["pq_dsc"] == pytest.approx(bip["sq_dsc"] / 1.5)


def test_one_prediction_over_two_references_matches_the_better():
    a = _box((slice(2, 8), slice(2, 8), slice(2, 8)))  # 216
    b = _box((slice(2, 8), slice(2, 8), slice(10, 13)))  # 108, 2 planes apart
    pred = _box((slice(2, 8), slice(2, 8), slice(2, 9)))  # a plus one plane: IoU(a) = 216/252
    ref_labels, n_ref = instances(a | b)
    pred_labels, n_pred = instances(pred)
    assert (n_ref, n_pred) == (2, 1)
    assert match_instances(ref_labels, n_ref, pred_labels, n_pred) == [(1, 1)]
    s = panoptic_scores(pred, a | b, 1.0)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1) and s["rq"] == pytest.approx(1 / 1.5)
    assert s["sq_dsc"] == pytest.approx(2 * 216 / (216 + 252))


def test_26_connectivity_and_many_instances():
    ref = np.zeros(SHAPE, bool)
    ref[3, 3, 3] = ref[4, 4, 4] = True  # diagonal neighbours: one instance
    ref[10:12, 10:12, 10:12] = True
    _, n = instances(ref)
    assert n == 2
    s = panoptic_scores(ref, ref, 1.0)
    assert (s["tp"], s["fp"], s["fn"], s["sq_dsc"], s["sq_hd95"], s["pq_dsc"]) == (2, 0, 0, 1.0, 0.0, 1.0)


def test_empty_conventions():
    empty = np.zeros(SHAPE, bool)
    cube = _box((slice(5, 9), slice(5, 9), slice(5, 9)))
    s = panoptic_scores(empty, empty, 1.0)
    assert {k: s[k] for k in PANOPTIC_NAMES} == {"sq_dsc": 1.0, "sq_hd95": 0.0, "pq_dsc": 1.0, "tp": 0, "fp": 0, "fn": 0}
    s = panoptic_scores(cube, empty, 1.0)
    assert (s["sq_dsc"], s["sq_hd95"], s["pq_dsc"], s["tp"], s["fp"], s["fn"]) == (0.0, HD95_PENALTY_MM, 0.0, 0, 1, 0)
    s = panoptic_scores(empty, cube, 1.0, PanopticSetting("p", hd95_penalty=337.0))
    assert (s["sq_hd95"], s["fn"]) == (337.0, 1)


def test_settings_and_errors():
    assert PANOPTICA_DEFAULT.matcher == "naive" and PANOPTICA_DEFAULT.matching_metric == "iou"
    assert PANOPTICA_DEFAULT.matching_threshold == 0.5 and not PANOPTICA_DEFAULT.strict
    assert BRATS2025.matcher == "bipartite" and BRATS2025.matching_metric == "dsc"
    with pytest.raises(MedsegError, match="unknown panoptic setting"):
        panoptic_scores(np.zeros(SHAPE), np.zeros(SHAPE), 1.0, "nope")
    with pytest.raises(MedsegError, match="matcher"):
        PanopticSetting("x", matcher="hungarian")  # type: ignore[arg-type]
    with pytest.raises(MedsegError, match="shape"):
        panoptic_scores(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), 1.0)


def test_evaluate_case_adds_the_instance_numbers():
    ref = np.zeros(SHAPE, np.uint8)
    ref[5:15, 5:15, 5:15] = 2
    ref[8:12, 8:12, 8:12] = 3
    pred = np.roll(ref, 1, axis=0)
    pred[25:27, 25:27, 25:27] = 3  # a false-positive ET instance
    out = evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS)
    assert list(out["ET"])[-6:] == list(PANOPTIC_NAMES)
    et = panoptic_scores(pred == 3, ref == 3, 1.0)
    assert {k: out["ET"][k] for k in PANOPTIC_NAMES} == {k: et[k] for k in PANOPTIC_NAMES}
    assert (out["ET"]["tp"], out["ET"]["fp"], out["ET"]["fn"]) == (1, 1, 0)
    assert out["NETC"]["sq_dsc"] == 1.0 and out["NETC"]["tp"] == 0  # no NETC anywhere
    bip = evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, panoptic="brats2025")
    assert bip["ET"]["pq_dsc"] == pytest.approx(panoptic_scores(pred == 3, ref == 3, 1.0, BRATS2025)["pq_dsc"])
    assert "sq_dsc" not in evaluate_case(pred, ref, 1.0, BRATS_LABELS, BRATS_REGIONS, panoptic=None)["ET"]


# --------------------------------------------------------------------------- panoptica's own numbers
def _reference():
    return json.loads((DATA / "panoptic_reference.json").read_text())


def _reference_rows():
    doc = _reference()
    return [(m, c) for m, cases in doc["results"].items() for c in cases]


def test_reference_file_documents_its_origin():
    doc = _reference()
    assert doc["produced_with"]["panoptica"] == "2.1.7" and doc["produced_with"]["brats_evaluation"] == "0.0.10"
    assert doc["seed"] == panoptic_cases.SEED
    assert set(doc["results"]) == {"panoptica", "brats2025"}
    assert set(doc["results"]["panoptica"]) == set(panoptic_cases.cases())


@pytest.fixture(scope="module")
def crafted():
    return panoptic_cases.cases()


@pytest.mark.parametrize(("matcher", "case_id"), _reference_rows())
def test_agrees_with_panoptica(matcher, case_id, crafted):
    pred, ref, spacing = crafted[case_id]
    want_regions = _reference()["results"][matcher][case_id]
    assert set(want_regions) == set(panoptic_cases.REGIONS)
    for region, want in want_regions.items():
        values = panoptic_cases.REGIONS[region]
        got = panoptic_scores(np.isin(pred, values), np.isin(ref, values), spacing, matcher)
        where = f"{matcher} {case_id} {region}"
        for key in ("tp", "fp", "fn"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), where
        if want["rq"] == "nan":  # no instance in either: panoptica NaN, ours the "both empty" values
            assert (got["sq_dsc"], got["sq_hd95"], got["pq_dsc"], got["rq"]) == (1.0, 0.0, 1.0, 1.0), where
            continue
        for key in ("rq", "sq_dsc", "pq_dsc"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), f"{where} {key}"
        if want["sq_hd95"] == "inf":  # nothing matched: panoptica inf, ours the penalty
            assert got["tp"] == 0 and got["sq_hd95"] == HD95_PENALTY_MM, where
        else:
            assert got["sq_hd95"] == pytest.approx(want["sq_hd95"], abs=1e-3), f"{where} sq_hd95"


def test_reference_covers_matches_misses_and_edge_cases():
    rows = [r for cases in _reference()["results"].values() for regions in cases.values() for r in regions.values()]
    assert any(isinstance(r["tp"], float) and r["tp"] >= 10 for r in rows)  # many instances matched
    assert any(r["sq_hd95"] == "inf" for r in rows) and any(r["rq"] == "nan" for r in rows)
    naive, bip = (_reference()["results"][m]["crafted_multilesion"]["ET"] for m in ("panoptica", "brats2025"))
    assert naive["tp"] < bip["tp"]  # the shifted and the split lesions match only with any-overlap matching
