"""Training curves: the per-epoch history drawn as ``training_curves.png`` beside the weights, logged to the training
run in MLflow, and shown in the evaluation report, for a segmentation model and a classifier (folds and ensemble).

Tiny real runs: the mini preprocessed segmentation set of tests/test_training_loop.py (2 epochs of 2 steps) and the
12-subject classification source of tests/test_classification_training.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg import schemas
from medseg.evaluation.report import evaluate_arrays
from medseg.evaluation.report_html import png_data_uri
from medseg.evaluation.stage import training_curves
from medseg.training.trainer import TrainConfig
from medseg.visualize import training_curves_png, validation_keys
from tests.test_classification_training import FAST, preprocess, write_source
from tests.test_training_loop import MINI, build_mini_preprocessed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(data: bytes) -> tuple[int, int]:
    """A decodable PNG of some size; returns (width, height)."""
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.width > 100 and image.height > 100
    return image.size


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _artifacts(uri: str, run_id: str) -> set[str]:
    import mlflow

    return {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run_id)}


def _download(uri: str, run_id: str, path: str, dest: Path) -> bytes:
    import mlflow

    return Path(mlflow.MlflowClient(uri).download_artifacts(run_id, path, str(dest))).read_bytes()


# --------------------------------------------------------------------------- the picture
def test_curves_of_segmentation_classification_and_folds() -> None:
    seg = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_dice_mean": 0.5 + 0.1 * e, "val_dice_WT": 0.6 + 0.1 * e, "lr": 0.01,
            "epoch_seconds": 30.0, "val_seconds": 3.0} for e in range(4)]
    seg[0]["val_dice_mean"] = float("nan")  # an epoch without a usable score is left out, not drawn as a gap of garbage
    assert validation_keys(seg) == ["val_dice_mean", "val_dice_WT"]  # not the validation time
    cls = [{"epoch": e, "train_loss": 1.1 - 0.1 * e, "val_loss": 1.0, "val_accuracy": 0.5, "val_balanced_accuracy": 0.4 + 0.1 * e} for e in range(3)]
    assert validation_keys(cls) == ["val_accuracy", "val_balanced_accuracy"]
    one = training_curves_png({"": seg}, "val_dice_mean", {"": 3}, "unet · 3d_fullres")
    assert_png(one)
    assert_png(training_curves_png({"": cls}, "val_balanced_accuracy", {"": 2}))
    assert training_curves_png({"fold 0": seg, "fold 1": seg[:2]}, "val_dice_mean", {"fold 0": 3, "fold 1": 1}) != one
    assert_png(training_curves_png({"": [{"epoch": 0, "train_loss": 0.7}]}))  # no validation at all: still a picture


# --------------------------------------------------------------------------- segmentation: package, MLflow, report
def test_segmentation_run_writes_curves_beside_the_weights_and_to_mlflow(tmp_path: Path) -> None:
    from medseg.training.stage import run_train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    pre = build_mini_preprocessed(tmp_path / "pre")
    result = run_train(pre, tmp_path / "run", TrainConfig(**MINI), tracking_uri=uri, progress=False)
    package = schemas.ModelPackage.load(result.model_dir)
    history = package.training["history"]
    assert [e["epoch"] for e in history] == [0, 1] and all("train_loss" in e and "val_dice_mean" in e for e in history)
    png = (result.model_dir / schemas.TRAINING_CURVES_PNG).read_bytes()
    assert_png(png)
    run_id = package.training["mlflow_run_id"]
    assert schemas.TRAINING_CURVES_PNG in _artifacts(uri, run_id)
    assert _download(uri, run_id, schemas.TRAINING_CURVES_PNG, tmp_path / "dl") == png
    assert training_curves(result.model_dir, package) == png  # what the evaluate stage shows


def test_segmentation_report_shows_the_curves(tmp_path: Path) -> None:
    png = training_curves_png({"": [{"epoch": e, "train_loss": 1.0 - 0.2 * e, "val_dice_mean": 0.3 + 0.2 * e} for e in range(3)]}, "val_dice_mean")
    dataset = schemas.DatasetJson(name="tiny", channel_names={"0": "a"}, labels={"background": 0, "lesion": 1}, numTraining=2)
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[3:8, 3:8, 3:8] = 1
    pred = np.roll(ref, 1, axis=0)
    evaluate_arrays([("c1", pred, ref, (1.0, 1.0, 1.0)), ("c2", ref, ref, (1.0, 1.0, 1.0))], dataset, tmp_path / "with", panoptic=None,
                    training_curves=png)
    page = (tmp_path / "with" / schemas.REPORT_HTML).read_text()
    assert '<h2 id="training">Training</h2>' in page and png_data_uri(png) in page
    assert (tmp_path / "with" / schemas.TRAINING_CURVES_PNG).read_bytes() == png
    assert f"![Loss and validation per epoch]({schemas.TRAINING_CURVES_PNG})" in (tmp_path / "with" / schemas.REPORT_MD).read_text()

    evaluate_arrays([("c1", pred, ref, (1.0, 1.0, 1.0))], dataset, tmp_path / "without", panoptic=None)
    assert 'id="training"' not in (tmp_path / "without" / schemas.REPORT_HTML).read_text()
    assert not (tmp_path / "without" / schemas.TRAINING_CURVES_PNG).exists()


def test_evaluate_stage_draws_the_history_when_the_picture_is_missing(tmp_path: Path) -> None:
    from tests.factories import make_model_package

    model = make_model_package(tmp_path / "model")  # a package without history: no curves
    package = schemas.ModelPackage.load(model)
    assert training_curves(model, package) is None
    package.training.update(history=[{"epoch": e, "train_loss": 1.0 / (e + 1), "val_dice_mean": 0.2 * e} for e in range(3)], best_epoch=2,
                            val_metric="val_dice_mean")
    package.save(model)
    assert_png(training_curves(model, package))


# --------------------------------------------------------------------------- classification: folds, ensemble, MLflow, report
def test_classifier_folds_ensemble_mlflow_and_report(tmp_path: Path) -> None:
    from medseg.evaluation.stage import run_evaluate
    from medseg.ingest.ingest import ingest
    from medseg.training.stage import run_train_folds

    ingest(write_source(tmp_path / "src"), tmp_path / "dataset", fmt="classification", n_folds=2, test_fraction=0.25, seed=0, progress=False)
    preprocess(tmp_path / "dataset", tmp_path / "pre")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_train_folds(tmp_path / "pre", tmp_path / "run", TrainConfig(**{**FAST, "epochs": 2}), [0, 1], tracking_uri=uri, progress=False,
                             dataset_dir=tmp_path / "dataset")
    folds = {}
    for fold, fold_result in result.results.items():
        package = schemas.ModelPackage.load(fold_result.model_dir)
        assert {"val_accuracy", "val_balanced_accuracy"} <= set(validation_keys(package.training["history"]))
        folds[fold] = (fold_result.model_dir / schemas.TRAINING_CURVES_PNG).read_bytes()
        assert_png(folds[fold])
        assert schemas.TRAINING_CURVES_PNG in _artifacts(uri, package.training["mlflow_run_id"])
    ensemble = schemas.ModelPackage.load(result.model_dir)
    combined = (result.model_dir / schemas.TRAINING_CURVES_PNG).read_bytes()  # every fold's curves in one picture
    assert_png(combined) and combined not in folds.values()
    assert _download(uri, ensemble.training["mlflow_run_id"], schemas.TRAINING_CURVES_PNG, tmp_path / "dl") == combined

    run_evaluate(result.model_dir, tmp_path / "dataset", tmp_path / "eval", progress=False)
    page = (tmp_path / "eval" / schemas.REPORT_HTML).read_text()
    assert '<h2 id="training">Training</h2>' in page and png_data_uri(combined) in page
    assert (tmp_path / "eval" / schemas.TRAINING_CURVES_PNG).read_bytes() == combined
