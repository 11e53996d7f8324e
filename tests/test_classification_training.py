"""Classification end to end (seed 000: CN / MCI / AD from a 3D T1 MRI): a tiny synthetic classification
source (12 subjects, 16³ volumes whose dark central blob grows with the class, a labels CSV with age and
sex) → ingest → preprocess → train ``classifier3d`` with the age input → resume → Predictor.predict_class
→ the evaluate stage writing the classification report.

The numbers are only checked to be in range: a few steps on 4–5 training cases learn nothing reliably.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.preprocessing.classifier_input import fit_volume
from medseg.training.sampler import VolumeCase, VolumeSampler
from medseg.training.trainer import CHECKPOINT, TrainConfig, train

SHAPE = (16, 16, 16)
CLASSES = ("CN", "MCI", "AD")
NET = {"widening": 1, "channels": [4, 8], "feature_dim": 16, "hidden": 16, "dropout": 0.0}
FAST = dict(epochs=4, iterations_per_epoch=2, batch_size=4, learning_rate=1e-3, device="cpu", seed=3, num_threads=1, deterministic=True,
            network_options={**NET, "use_age": True})


def write_source(src: Path, n_subjects: int = 12) -> Path:
    """``n_subjects`` 16³ 'heads' at 1.5 mm: a bright ball with a dark central blob of radius 0.2 + 0.2·class
    (atrophy, as it were), noise; labels.csv with subject, label, age, sex."""
    rng = np.random.default_rng(0)
    src.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    rows = ["subject,label,age,sex"]
    for i in range(n_subjects):
        k = i % len(CLASSES)
        image = (r < 0.85) * (100.0 + rng.normal(0, 3, SHAPE))
        image[r < 0.2 + 0.2 * k] = 20.0
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), str(src / f"S{i:02d}.nii.gz"))
        rows.append(f"S{i:02d},{CLASSES[k]},{62 + 6 * k + rng.normal(0, 2):.1f},{'MF'[i % 2]}")
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    return src


def preprocess(dataset: Path, out: Path) -> None:
    """``run_preprocessing`` of the classification dataset: no label maps, the manifest travels along."""
    from medseg.preprocessing.preprocess import run_preprocessing

    run_preprocessing(dataset, out, budget="cpu", workers=1, progress=False)
    assert (out / schemas.MANIFEST_JSON).is_file()
    config = schemas.Plans.load(out).default_configuration
    assert list((out / config).glob("*.npy")) and not list((out / config).glob("*_seg.npy"))


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from medseg.ingest.ingest import ingest

    root = tmp_path_factory.mktemp("classification")
    ingest(write_source(root / "src"), root / "dataset", fmt="classification", n_folds=2, test_fraction=0.25, seed=0, progress=False)
    preprocess(root / "dataset", root / "pre")
    return {"dataset": root / "dataset", "pre": root / "pre"}


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_globals():
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


@pytest.fixture(scope="module")
def straight(cls_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cls-run")
    return out, train(cls_data["pre"], out, TrainConfig(**FAST), progress=False, dataset_dir=cls_data["dataset"])


# --------------------------------------------------------------------------- whole-volume inputs
def test_fit_volume_zooms_once_then_centre_crops_or_pads() -> None:
    data = np.arange(2 * 4 * 6 * 8, dtype=np.float32).reshape(2, 4, 6, 8)
    out = fit_volume(data, [6, 6, 6])
    assert out.shape == (2, 6, 6, 6) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 1:5, :, :], data[:, :, :, 1:7])  # axis 0 padded by 1 each side, axis 2 cropped by 1
    assert not out[:, 0].any() and not out[:, 5].any()
    half = fit_volume(np.ones((1, 8, 8, 8), np.float32), [8, 8, 8], scale=0.5)
    assert half[0, 2:6, 2:6, 2:6].min() == pytest.approx(1.0) and half.sum() == pytest.approx(64.0)  # 4³ in the middle


def test_volume_sampler_sees_every_case_once_per_pass(tmp_path: Path) -> None:
    for i in range(5):
        np.save(tmp_path / f"c{i}.npy", np.full((1, 4, 4, 4), i, np.float32))
    cases = [VolumeCase(tmp_path, f"c{i}", target=i % 3, age=60.0 + i) for i in range(5)]
    sampler = VolumeSampler(cases, [4, 4, 4], 1.0, batch_size=5, seed=0, ages=True)
    images, targets, ages = sampler.sample()
    assert images.shape == (5, 1, 4, 4, 4) and targets.shape == (5, 1) and targets.dtype == np.int64
    assert sorted(images[:, 0, 0, 0, 0].tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(ages, 60.0 + images[:, 0, 0, 0, 0])
    np.testing.assert_array_equal(targets[:, 0], images[:, 0, 0, 0, 0].astype(int) % 3)
    with pytest.raises(MedsegError, match="age"):
        VolumeSampler([VolumeCase(tmp_path, "c0", 0, None)], [4, 4, 4], 1.0, 1, ages=True)


# --------------------------------------------------------------------------- training
def test_classifier_training_package_and_resume(cls_data: dict[str, Path], straight, tmp_path: Path) -> None:
    out, result = straight
    assert result.epochs_run == 4 and result.metric == "val_balanced_accuracy"
    for row in result.history:
        assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["val_balanced_accuracy"] <= 1.0
    assert result.best_val_dice == max(h["val_balanced_accuracy"] for h in result.history)

    package = schemas.ModelPackage.load(result.model_dir)
    assert package.network["name"] == "classifier3d" and package.network["output"] == "classes"
    assert package.network["classes"] == list(CLASSES) and package.network["out_channels"] == 3
    options = package.network["options"]
    assert options["use_age"] is True and len(options["input_size"]) == 3 and 0 < options["input_scale"] <= 1
    assert package.training["config"]["network"] == "classifier3d" and package.training["config"]["loss"] == "ce"  # the task's defaults
    assert package.training["val_metric"] == "val_balanced_accuracy" and package.postprocessing == {}

    # interrupted after 2 epochs (their checkpoint written), resumed: the same weights as the straight run
    class Interrupted(Exception):
        pass

    def stop_after_second(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Interrupted

    cfg = TrainConfig(**FAST)
    with pytest.raises(Interrupted):
        train(cls_data["pre"], tmp_path, cfg, on_epoch=stop_after_second, progress=False, dataset_dir=cls_data["dataset"])
    assert torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=False)["epoch"] == 1
    resumed = train(cls_data["pre"], tmp_path, cfg, resume=True, progress=False, write_package=False, dataset_dir=cls_data["dataset"])
    assert resumed.epochs_run == 4
    assert resumed.weights_sha256 == result.weights_sha256


def test_classification_settings_that_cannot_work(cls_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="segmentation network"):
        train(cls_data["pre"], tmp_path, TrainConfig(**{**FAST, "network": "resunet", "network_options": {}}), progress=False, dataset_dir=cls_data["dataset"])
    with pytest.raises(MedsegError, match="not a classification loss"):
        train(cls_data["pre"], tmp_path, TrainConfig(**{**FAST, "loss": "jaccard"}), progress=False, dataset_dir=cls_data["dataset"])
    bare = tmp_path / "pre-without-manifest"
    shutil.copytree(cls_data["pre"], bare)
    (bare / schemas.MANIFEST_JSON).unlink(missing_ok=True)
    with pytest.raises(MedsegError, match="manifest.json"):
        train(bare, tmp_path / "run", TrainConfig(**FAST), progress=False)


def test_predict_class_and_evaluate_stage(cls_data: dict[str, Path], straight, tmp_path: Path) -> None:
    from medseg.evaluation.stage import run_evaluate
    from medseg.inference.predictor import Predictor
    from medseg.preprocessing.fingerprint import case_files, load_case

    _, result = straight
    predictor = Predictor.from_package(result.model_dir, device="cpu")
    assert predictor.output == "classes" and predictor.classes == list(CLASSES) and predictor.uses_age
    case = schemas.Splits.load(cls_data["dataset"]).test[0]
    images, _, affine, spacing = load_case(cls_data["dataset"], case, 1, with_label=False)
    probs = predictor.predict_class(images, affine, spacing, age=70.0)
    assert list(probs) == list(CLASSES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5) and min(probs.values()) >= 0
    assert predictor.predict_class_files(case_files(cls_data["dataset"], case, 1), age=70.0) == pytest.approx(probs)
    assert predictor.predict_class(images, affine, spacing, age=90.0) != pytest.approx(probs)  # the age reaches the network
    with pytest.raises(MedsegError, match="age"):
        predictor.predict_class(images, affine, spacing)
    with pytest.raises(MedsegError, match="classifier"):
        predictor.predict(images, affine, spacing)

    metrics = run_evaluate(result.model_dir, cls_data["dataset"], tmp_path / "eval", progress=False)
    test_ids = schemas.Splits.load(cls_data["dataset"]).test
    assert metrics.n_cases == len(test_ids) == 3
    written = json.loads((tmp_path / "eval" / schemas.METRICS_JSON).read_text())
    overall = written["mean"]["all"]
    assert 0.0 <= overall["accuracy"] <= 1.0 and 0.0 <= overall["balanced_accuracy"] <= 1.0 and 0.0 <= overall["auc_macro"] <= 1.0
    for name in CLASSES:  # the stratified test split holds one subject per class: every one-vs-rest AUC is defined
        assert 0.0 <= written["mean"][name]["auc"] <= 1.0
    assert [c["case_id"] for c in written["per_case"]] == test_ids
    for name in ("cases.csv", "confusion_matrix.csv", "report.md", "report.html", "roc_CN.png"):
        assert (tmp_path / "eval" / name).is_file(), name

    with pytest.raises(MedsegError, match="segmentation model"):  # a segmentation model cannot score a classification dataset
        from tests.factories import make_model_package

        run_evaluate(make_model_package(tmp_path / "seg-model"), cls_data["dataset"], tmp_path / "eval2", progress=False)


def test_a_trivially_strong_signal_is_learned(cls_data: dict[str, Path], tmp_path: Path) -> None:
    """The blob size alone (no age input) separates the classes: 30 short epochs learn it (every seed tried,
    0–5, reached validation and test accuracy 1 by epoch 20; < 1 s on one thread). Asserted with a margin."""
    from medseg.evaluation.stage import run_evaluate

    cfg = TrainConfig(epochs=30, iterations_per_epoch=3, batch_size=4, learning_rate=3e-3, lr_schedule="constant", device="cpu", seed=0, num_threads=1,
                      network_options=NET)
    result = train(cls_data["pre"], tmp_path, cfg, progress=False, dataset_dir=cls_data["dataset"])
    assert result.best_val_dice == 1.0  # balanced accuracy on the fold's validation subjects
    metrics = run_evaluate(result.model_dir, cls_data["dataset"], tmp_path / "eval", progress=False)
    assert metrics.mean["all"]["accuracy"] >= 2 / 3 and metrics.mean["all"]["auc_macro"] >= 0.75


def test_fold_ensemble_of_classifiers(cls_data: dict[str, Path], tmp_path: Path) -> None:
    from medseg.inference.predictor import Predictor
    from medseg.preprocessing.fingerprint import load_case
    from medseg.training import ensemble, stage

    cfg = TrainConfig(**{**FAST, "epochs": 2})
    result = stage.run_train_folds(cls_data["pre"], tmp_path, cfg, [0, 1], progress=False, dataset_dir=cls_data["dataset"])
    assert set(result.cv_dice) == {"accuracy", "balanced_accuracy", "loss"} and 0.0 <= result.cv_dice["accuracy"] <= 1.0
    package = schemas.ModelPackage.load(result.model_dir)
    assert package.training["ensemble"]["combine"] == "mean_softmax" and package.postprocessing == {}
    assert package.training["cv_classification"] == result.cv_dice and package.network["output"] == "classes"

    predictor = Predictor.from_package(result.model_dir, device="cpu")
    assert isinstance(predictor.network, ensemble.EnsembleNetwork)
    case = schemas.Splits.load(cls_data["dataset"]).test[0]
    images, _, affine, spacing = load_case(cls_data["dataset"], case, 1, with_label=False)
    probs = predictor.predict_class(images, affine, spacing, age=70.0)
    members = [Predictor.from_package(tmp_path / f"fold_{f}" / "model", device="cpu").predict_class(images, affine, spacing, age=70.0) for f in (0, 1)]
    assert probs == pytest.approx({c: (members[0][c] + members[1][c]) / 2 for c in CLASSES}, abs=1e-5)  # the mean softmax
