"""The 3d_lowres → 3d_fullres cascade: previous-stage maps (out-of-fold), cascade batches, the self-contained
cascade package, and its prediction against the two stages run by hand.

The tiny dataset of tests/test_preprocessing.py (32³ synthetic cases, 2 folds) is too small for the planner
to emit 3d_lowres, so its plan is edited: the full-resolution patch shrinks to 16³ and a 3d_lowres
configuration at 1.45× the spacing (the planner's own ``plan_patch``) is added, then both are preprocessed.
The low-resolution stage trains both folds (an ensemble, so every training case has an out-of-fold
prediction), 1 epoch × 2 iterations; the cascade trains through the CLI.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.cascade import foreground_labels, one_hot, previous_stage_on_grid
from medseg.inference.predictor import Predictor
from medseg.io import read_json
from medseg.preprocessing.cropping import crop
from medseg.preprocessing.fingerprint import load_case
from medseg.preprocessing.planner import plan_patch
from medseg.preprocessing.preprocess import preprocess_case, restore_to_original, run_preprocessing, training_case_ids
from medseg.preprocessing.resampling import resample_segmentation, separate_z_axis
from medseg.training import cascade
from medseg.training.augmentation import Compose, GaussianNoise, Mirror, SpatialTransform
from medseg.training.ensemble import load_network
from medseg.training.sampler import CascadeCase, PatchSampler
from medseg.training.stage import run_train_folds
from medseg.training.trainer import TrainConfig
from tests.test_preprocessing import build_tiny_dataset

TINY = dict(epochs=1, iterations_per_epoch=2, max_val_cases=1, device="cpu", seed=0, num_threads=1, loss="dice_ce")  # label outputs: the test predicts them by hand
FULL, LOW = "3d_fullres", "3d_lowres"


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _edited_plans(pre: Path, out: Path) -> Path:
    plans = schemas.Plans.load(pre)
    full = copy.deepcopy(plans.configurations[FULL])
    full["patch_size"] = [16, 16, 16]
    spacing = [s * 1.45 for s in full["spacing"]]
    median = [max(1, round(m / 1.45)) for m in full["median_shape"]]
    plans.configurations[FULL] = full
    plans.configurations[LOW] = plan_patch(median, spacing, len(plans.channel_names), len(plans.labels), "cpu")
    return plans.save(out / "plans.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tiny = build_tiny_dataset(tmp_path_factory)
    root = tmp_path_factory.mktemp("cascade")
    edited = _edited_plans(tiny["pre"], root)
    pre = root / "pre"
    run_preprocessing(tiny["dataset"], pre, configurations=(FULL, LOW), workers=1, progress=False, plans=edited)
    low = run_train_folds(pre, root / "low", TrainConfig(**TINY, configuration=LOW), [0, 1], progress=False)
    assert low.model_dir is not None
    (root / "params.yaml").write_text("train:\n  iterations_per_epoch: 2\n  max_val_cases: 1\n  device: cpu\n  num_threads: 1\n  loss: dice_ce\n")
    from medseg.cli import main

    code = main(["train", "--preprocessed", str(pre), "--config", FULL, "--cascade-from", str(root / "low"), "--fold", "0", "--epochs", "1",
                 "--out", str(root / "casc"), "--tracking-uri", "none", "--params", str(root / "params.yaml")])
    assert code == 0
    return {"root": root, "pre": pre, "dataset": tiny["dataset"], "low": low.model_dir, "casc": root / "casc" / "model"}


def _raw(dataset: Path, case: str):
    images, _, affine, spacing = load_case(dataset, case, 4, with_label=False)
    return images, affine, list(spacing)


# --------------------------------------------------------------------------- training-time maps
def test_previous_stage_maps_are_out_of_fold_on_the_fullres_grid(setup: dict[str, Path]) -> None:
    pre = setup["pre"]
    folder = cascade.cascade_folder(pre, FULL)
    assert folder == pre / "3d_cascade_fullres"
    manifest = read_json(folder / cascade.CASCADE_MANIFEST)
    splits = schemas.Splits.load(pre)
    cases = training_case_ids(splits)
    assert manifest["n_out_of_fold"] == len(cases) and manifest["n_in_sample"] == 0 and manifest["labels"] == [1, 2, 3]
    for case in cases:
        prev = np.load(folder / f"{case}_prev.npy")
        data = np.load(pre / FULL / f"{case}.npy", mmap_mode="r")
        assert prev.shape == data.shape[1:] and prev.dtype == np.uint8
        assert set(np.unique(prev)) <= {0, 1, 2, 3}
        # predicted by the fold that held the case out
        held_out = [f for f, fold in enumerate(splits.folds) if case in fold["val"]]
        assert manifest["cases"][case]["predicted_by"] == f"fold {held_out[0]}" and manifest["cases"][case]["out_of_fold"]

    # the map of a case equals what inference computes from the raw images with the same low-res member
    case = splits.folds[1]["val"][0]
    low_package = schemas.ModelPackage.load(setup["low"])
    member = cascade._predictors(setup["low"], low_package, torch.device("cpu"), 0.5, False)[1]
    images, affine, spacing = _raw(setup["dataset"], case)
    props = schemas.CaseProperties.load(pre / FULL / f"{case}.json")
    expected = previous_stage_on_grid(member.segment(images, affine, spacing), props, schemas.Plans.load(pre).configuration(FULL))
    np.testing.assert_array_equal(np.load(folder / f"{case}_prev.npy"), expected)


def test_maps_are_reused_and_in_sample_predictions_warn(setup: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = cascade.cascade_folder(setup["pre"], FULL)
    before = (folder / cascade.CASCADE_MANIFEST).stat().st_mtime_ns
    stage = cascade.prepare_previous_stage(setup["pre"], setup["root"] / "low", FULL, progress=False)
    assert stage.folder == folder and (folder / cascade.CASCADE_MANIFEST).stat().st_mtime_ns == before  # reused, not predicted again

    # a single-fold low-res model trained on fold 0's training cases: those are in-sample, with a warning
    pre = shutil.copytree(setup["pre"], tmp_path / "pre", ignore=shutil.ignore_patterns("3d_cascade_fullres"))
    with caplog.at_level(logging.WARNING, logger="medseg.training.cascade"):
        single = cascade.prepare_previous_stage(pre, setup["root"] / "low" / "fold_0" / "model", FULL, progress=False)
    fold0 = schemas.Splits.load(pre).folds[0]
    assert single.manifest["n_in_sample"] == len(fold0["train"]) and single.manifest["n_out_of_fold"] == len(fold0["val"])
    assert all(not single.manifest["cases"][c]["out_of_fold"] for c in fold0["train"])
    assert "over-trust" in caplog.text

    with pytest.raises(MedsegError, match="must be a model package"):
        cascade.prepare_previous_stage(pre, tmp_path, FULL, progress=False)
    from medseg.cli import main

    assert main(["train", "--preprocessed", str(pre), "--config", "3d_cascade_fullres", "--out", str(tmp_path / "x"), "--tracking-uri", "none"]) == 2
    assert TrainConfig.from_dict({"cascade_from": None}).cascade_from == ""
    with pytest.raises(MedsegError, match="cascades of more than two stages"):
        cascade.prepare_previous_stage(pre, setup["casc"], FULL, progress=False)


def test_cascade_batches_carry_the_previous_stage_through_the_same_transform(setup: dict[str, Path], tmp_path: Path) -> None:
    pre = setup["pre"]
    ids = schemas.Splits.load(pre).folds[0]["train"]
    for case in ids:  # previous stage == reference: after augmentation both must still agree voxel by voxel
        np.save(tmp_path / f"{case}_prev.npy", np.load(pre / FULL / f"{case}_seg.npy").astype(np.uint8))
    cases = [CascadeCase(pre / FULL, c, tmp_path, [1, 2, 3]) for c in ids]
    assert cases[0].data.shape[0] == 7 and np.array_equal(cases[0].data[:4], np.asarray(cases[0].images))
    strong = Compose([SpatialTransform([16, 16, 16], p_rotation=1.0, p_scaling=1.0), GaussianNoise(p=1.0), Mirror()], [16, 16, 16])
    for augmentation in (None, strong):
        sampler = PatchSampler(cases, [16, 16, 16], 4, foreground_share=1.0, seed=3, augmentation=augmentation)
        for _ in range(2):
            images, labels = sampler.sample()
            assert images.shape == (4, 7, 16, 16, 16) and labels.shape == (4, 1, 16, 16, 16)
            np.testing.assert_array_equal(images[:, 4:], np.stack([one_hot(lab[0], [1, 2, 3]) for lab in labels]))
            assert labels.max() > 0  # foreground patches: the check is not vacuous


# --------------------------------------------------------------------------- the package and inference
def test_cascade_package_network_and_previous_stage(setup: dict[str, Path]) -> None:
    package = schemas.ModelPackage.load(setup["casc"])
    spec = package.previous_stage
    assert spec["configuration"] == LOW and spec["package"] == "previous_stage" and spec["labels"] == [1, 2, 3] and spec["image_channels"] == 4
    assert (setup["casc"] / "previous_stage" / schemas.MODEL_PACKAGE_JSON).is_file()
    assert package.network["in_channels"] == 4 + 3 and package.training["config"]["cascade_from"]
    first_conv = next(m for m in load_network(setup["casc"], package).modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == 7
    state = torch.load(setup["casc"] / package.weights_file, weights_only=True)
    assert next(v for v in state.values() if v.ndim == 5).shape[1] == 7


def test_predict_equals_the_two_stages_by_hand(setup: dict[str, Path]) -> None:
    case = schemas.Splits.load(setup["pre"]).test[0]
    images, affine, spacing = _raw(setup["dataset"], case)
    predictor = Predictor.from_package(setup["casc"], device="cpu")
    assert predictor.previous is not None and predictor.previous.package.configuration == LOW
    got = predictor.predict(images, affine, spacing)

    from medseg.inference.postprocess import remove_small_components
    from medseg.inference.sliding_window import predict_probabilities

    low_dir, plans = setup["casc"] / "previous_stage", schemas.Plans.load(setup["casc"])
    low_data, _, low_props = preprocess_case(images, None, spacing, affine, plans, LOW)
    low_probs = predict_probabilities(load_network(low_dir, schemas.ModelPackage.load(low_dir)), low_data, plans.configuration(LOW).patch_size, overlap=0.5)
    low_seg = restore_to_original(low_probs, low_props)
    data, _, props = preprocess_case(images, None, spacing, affine, plans, FULL)
    prev = resample_segmentation(np.ascontiguousarray(crop(low_seg, props.crop_bbox)), props.shape_after_resample, "linear",
                                 anisotropic_axis=separate_z_axis(props.original_spacing, props.target_spacing))
    x = np.concatenate([data, np.stack([(prev == v).astype(np.float32) for v in foreground_labels(plans.labels)])])
    package = schemas.ModelPackage.load(setup["casc"])
    probs = predict_probabilities(load_network(setup["casc"], package), x, plans.configuration(FULL).patch_size, overlap=0.5)
    expected = restore_to_original(probs, props)
    if package.postprocessing.get("min_volume_mm3"):
        expected = remove_small_components(expected, package.postprocessing["min_volume_mm3"], spacing)
    np.testing.assert_array_equal(got.segmentation, expected)
    assert got.segmentation.shape == images.shape[1:] and np.array_equal(got.affine, affine)


def test_cascade_package_is_self_contained(setup: dict[str, Path], tmp_path: Path) -> None:
    moved = shutil.copytree(setup["casc"], tmp_path / "elsewhere" / "cascade")
    hidden = [(p, p.with_name(p.name + ".hidden")) for p in (setup["root"] / "low", setup["root"] / "casc", cascade.cascade_folder(setup["pre"], FULL))]
    for src, dst in hidden:  # the originals gone: the low-res training, the cascade training, the maps
        src.rename(dst)
    try:
        case = schemas.Splits.load(setup["pre"]).test[0]
        images, affine, spacing = _raw(setup["dataset"], case)
        prediction = Predictor.from_package(moved, device="cpu").predict(images, affine, spacing)
        assert prediction.segmentation.shape == images.shape[1:] and prediction.segmentation.dtype == np.uint8
        assert set(np.unique(prediction.segmentation)) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(prediction.affine, affine)
        assert set(prediction.volumes_ml) == {"WT", "TC", "ET"}
    finally:
        for src, dst in hidden:
            dst.rename(src)


def test_cascade_fold_ensemble_carries_the_previous_stage(setup: dict[str, Path]) -> None:
    out = setup["root"] / "casc_folds"
    result = run_train_folds(setup["pre"], out, TrainConfig(**TINY, configuration=FULL, cascade_from=str(setup["low"])), [0, 1], progress=False)
    assert result.model_dir is not None and set(result.cv_dice) == {"WT", "TC", "ET"}
    package = schemas.ModelPackage.load(result.model_dir)
    assert package.previous_stage["configuration"] == LOW and (result.model_dir / "previous_stage" / schemas.MODEL_PACKAGE_JSON).is_file()
    case = schemas.Splits.load(setup["pre"]).test[0]
    images, affine, spacing = _raw(setup["dataset"], case)
    seg = Predictor.from_package(result.model_dir, device="cpu").predict(images, affine, spacing).segmentation
    assert seg.shape == images.shape[1:] and set(np.unique(seg)) <= {0, 1, 2, 3}
