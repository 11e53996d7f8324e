"""Small-component removal and its choice on validation cases."""

from __future__ import annotations

import numpy as np
import pytest

from medseg import schemas
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
