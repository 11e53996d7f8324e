"""Small-component removal and its choice on validation cases."""

from __future__ import annotations

import numpy as np
import pytest

from medseg import schemas
from medseg.task import BRATS2023
from medseg.inference.postprocess import choose_min_volumes, remove_small_components


def _tumour() -> np.ndarray:
    seg = np.zeros((24, 24, 24), np.uint8)
    seg[4:20, 4:20, 4:20] = 2  # oedema
    seg[9:14, 9:14, 9:14] = 3  # a real enhancing lesion, 125 voxels
    return seg


def test_islands_take_the_label_they_sit_in():
    seg = _tumour()
    seg[17, 17, 17] = 3  # an island inside the oedema
    seg[1, 1, 1] = 3  # an island in the background
    out = remove_small_components(seg, {"3": 5.0}, spacing=[1, 1, 1])
    assert out[17, 17, 17] == 2 and out[1, 1, 1] == 0
    assert (out == 3).sum() == 125  # the real lesion stays
    assert np.array_equal(remove_small_components(seg, {}, [1, 1, 1]), seg)


def test_threshold_is_in_cubic_millimetres():
    seg = _tumour()
    seg[17, 17, 17] = 3
    # one voxel is 8 mm³ at 2 mm spacing: a 5 mm³ threshold keeps it, 10 mm³ removes it
    assert remove_small_components(seg, {"3": 5.0}, [2, 2, 2])[17, 17, 17] == 3
    assert remove_small_components(seg, {"3": 10.0}, [2, 2, 2])[17, 17, 17] == 2


def test_choice_removes_islands_only_when_it_helps():
    from medseg.evaluation.lesionwise import lesionwise_case

    ref = _tumour()
    noisy = ref.copy()
    noisy[17, 17, 17] = 3
    noisy[6, 17, 6] = 3

    def score(pred, truth):
        return float(np.mean([v["lesionwise_dice_2023"] for v in lesionwise_case(pred, truth, [1, 1, 1], "brats2023").values()]))

    chosen, before, after = choose_min_volumes([(noisy, ref)], [1, 1, 1], [1, 2, 3], score)
    assert chosen.get("3", 0) > 1 and after > before
    assert remove_small_components(noisy, chosen, [1, 1, 1]).tolist() == ref.tolist()
    clean_choice, before, after = choose_min_volumes([(ref, ref)], [1, 1, 1], [1, 2, 3], score)
    assert clean_choice == {} and before == after  # nothing to gain: no postprocessing


def test_predictor_applies_the_package_postprocessing(tmp_path):
    from medseg.inference.predictor import Predictor
    from tests.factories import make_model_package, write_case

    package = make_model_package(tmp_path / "model")
    paths, _ = write_case(tmp_path / "case")
    meta = schemas.ModelPackage.load(package)
    meta.postprocessing = {"min_volume_mm3": {"1": 1e9, "2": 1e9, "3": 1e9}}
    meta.save(package)
    seg = Predictor.from_package(package, overlap=0.25).predict_files(paths).segmentation
    assert not seg.any()  # every component is below a billion mm³


# --------------------------------------------------------------------------- BraTS ET → NETC rule
def test_enhancing_labels_of_brats_label_sets() -> None:
    from medseg.task import Task

    def pair(labels: dict[str, int]):
        return Task(schemas.DatasetJson(name="d", channel_names={"0": "c"}, labels=labels, numTraining=1)).enhancing_pair

    assert pair({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}) == (3, 1)
    assert pair({"background": 0, "NCR": 1, "ED": 2, "ET": 3}) == (3, 1)
    assert pair({"background": 0, "tumour": 1}) is None


def test_small_enhancing_becomes_necrosis_and_large_stays() -> None:
    from medseg.inference.postprocess import relabel_small_enhancing

    seg = np.zeros((10, 10, 10), np.uint8)
    seg[2:8, 2:8, 2:8] = 2
    seg[4:6, 4:6, 4:6] = 3  # 8 ET voxels
    small = relabel_small_enhancing(seg, min_voxels=10)
    assert (small == 3).sum() == 0 and (small == 1).sum() == 8 and (small == 2).sum() == (seg == 2).sum()
    assert np.array_equal(relabel_small_enhancing(seg, min_voxels=8), seg)  # 8 is not below 8
    assert np.array_equal(relabel_small_enhancing(seg, min_voxels=0), seg)


def test_threshold_chosen_on_validation_cases() -> None:
    from medseg.inference.postprocess import choose_enhancing_threshold

    ref_no_et = np.zeros((12, 12, 12), np.uint8)
    ref_no_et[3:9, 3:9, 3:9] = 1
    pred_spurious = ref_no_et.copy()
    pred_spurious[5:7, 5:7, 5:7] = 3  # 8 spurious ET voxels: ET Dice 0 without the rule, 1 with it
    ref_et = ref_no_et.copy()
    ref_et[4:8, 4:8, 4:8] = 3  # 64 true ET voxels, predicted exactly
    cases = [(pred_spurious, ref_no_et), (ref_et.copy(), ref_et)]
    threshold, before, after = choose_enhancing_threshold(cases, candidates=(0, 5, 50, 100))
    assert threshold == 50 and before == pytest.approx(0.5) and after == pytest.approx(1.0)  # 100 would erase true ET
    assert choose_enhancing_threshold([(ref_et, ref_et)], candidates=(0, 50))[0] == 0  # nothing to gain: rule off


def test_predictor_applies_the_rule_from_the_package(tmp_path) -> None:
    from medseg.inference.predictor import Predictor
    from tests.factories import make_model_package

    model_dir = make_model_package(tmp_path / "model")
    package = schemas.ModelPackage.load(model_dir)
    package.postprocessing = {**package.postprocessing, "et_to_netc_below_voxels": 10**9}
    package.save(model_dir)
    predictor = Predictor.from_package(model_dir)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(len(predictor.channels), 20, 20, 20)).astype(np.float32)
    seg = predictor.predict(images, np.eye(4), [1.0, 1.0, 1.0]).segmentation
    pair = predictor.task.enhancing_pair
    assert pair is not None and not (seg == pair[0]).any()  # every ET voxel relabelled (threshold above any volume)


def test_enhancing_rule_threshold_is_chosen_with_the_component_sizes_on_validation() -> None:
    from medseg.training.trainer import postprocessing_from_pairs

    plans = schemas.Plans(dataset_name="t", device_budget="cpu", channel_names=list(BRATS2023.channels),
                          labels=dict(BRATS2023.labels_dict()), regions={k: list(v) for k, v in BRATS2023.regions_dict().items()},
                          normalization=[], configurations={})
    ref_no_et = np.zeros((16, 16, 16), np.uint8)
    ref_no_et[3:13, 3:13, 3:13] = 2
    ref_no_et[6:10, 6:10, 6:10] = 1
    spurious = ref_no_et.copy()
    # 36 spurious ET voxels (288 mm³: above every component-size candidate, so only the ET rule can fix it)
    spurious[6:9, 6:9, 6:10] = 3
    ref_et = ref_no_et.copy()
    ref_et[5:11, 5:11, 5:11] = 3  # 216 true ET voxels, predicted exactly
    ref_et[7:9, 7:9, 7:9] = 1
    post = postprocessing_from_pairs([(spurious, ref_no_et), (ref_et.copy(), ref_et)], plans, [2.0, 2.0, 2.0])
    rule = post["et_rule"]
    assert 36 < rule["voxels_at_training_spacing"] <= 216 and rule["et_dice_after"] > rule["et_dice_before"]
    assert post["et_to_netc_below_mm3"] == rule["voxels_at_training_spacing"] * 8.0  # stored in mm³ (2 mm voxels)
