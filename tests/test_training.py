"""Training: config coercion, patch sampling, the training loop (checkpoint, package, resume, determinism),
Optuna tuning on SQLite, and the tune/train stages with and without MLflow tracking.

Everything runs on the tiny real dataset of tests/test_preprocessing.py (6 synthetic 32³ cases, 2 folds),
with 1–2 epochs of 1–2 iterations on the CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.training.sampler import PatchSampler, PreprocessedCase
from medseg.training.trainer import CHECKPOINT, TrainConfig, train
from tests.test_preprocessing import build_tiny_dataset

FAST = dict(epochs=2, iterations_per_epoch=2, max_val_cases=1, device="cpu", seed=7)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_restore_torch_globals():
    """train() sets torch's thread count to the core count and (deterministic=True) deterministic
    algorithms, both process-wide: here it gets one thread (the 2 cores are shared, and OpenMP threads
    competing for them make tiny steps erratically slow), and both settings are put back afterwards."""
    from medseg.training import trainer

    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "available_cores", lambda: 1)  # one thread: the tests share 2 cores
        yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def straight_run(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A deterministic 2 epochs × 2 iterations run, shared by the package and resume tests."""
    out = tmp_path_factory.mktemp("straight")
    cfg = TrainConfig(**FAST, deterministic=True)
    return cfg, out, train(tiny["pre"], out, cfg, progress=False)


# --------------------------------------------------------------------------- config
def test_train_config_coerces_kfp_floats() -> None:
    cfg = TrainConfig.from_dict({"epochs": 2.0, "iterations_per_epoch": 12.0, "learning_rate": 1, "batch_size": 0.0,
                                 "deterministic": 1.0, "max_val_cases": 3.0, "optimizer": "sgd"})
    assert cfg.epochs == 2 and type(cfg.epochs) is int
    assert cfg.iterations_per_epoch == 12 and type(cfg.iterations_per_epoch) is int
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.batch_size == 0 and cfg.max_val_cases == 3 and cfg.deterministic is True
    assert cfg.optimizer == "sgd" and cfg.weight_decay == TrainConfig().weight_decay  # defaults kept
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_train_config_rejects_unknown_and_invalid() -> None:
    with pytest.raises(MedsegError, match=r"unknown training parameter\(s\) \['epoch', 'lr'\]"):
        TrainConfig.from_dict({"epoch": 3, "lr": 0.1})
    with pytest.raises(MedsegError, match="invalid training parameter"):
        TrainConfig.from_dict({"epochs": "many"})


# --------------------------------------------------------------------------- sampling
def _cases(tiny: dict[str, Path], part: str = "train") -> list[PreprocessedCase]:
    splits = schemas.Splits.load(tiny["pre"])
    return [PreprocessedCase(tiny["pre"] / "3d_fullres", c) for c in splits.folds[0][part]]


def test_patch_sampler_shapes_and_dtypes(tiny: dict[str, Path]) -> None:
    cases = _cases(tiny)
    plans = schemas.Plans.load(tiny["pre"])
    patch = plans.configuration().patch_size
    images, labels = PatchSampler(cases, patch, batch_size=3, seed=0).sample()
    assert images.shape == (3, 4, *patch) and images.dtype == np.float32
    assert labels.shape == (3, 1, *patch) and labels.dtype == np.int64
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # a patch larger than the volume is padded (images 0, labels background)
    big = [s + 8 for s in cases[0].data.shape[1:]]
    images, labels = PatchSampler(cases[:1], big, batch_size=2, seed=1).sample()
    assert images.shape == (2, 4, *big) and labels.shape == (2, 1, *big)
    # the same seed draws the same batch
    a = PatchSampler(cases, patch, 2, seed=5).sample()
    b = PatchSampler(cases, patch, 2, seed=5).sample()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_patch_sampler_foreground_share_one_always_hits_foreground(tiny: dict[str, Path]) -> None:
    cases = _cases(tiny) + _cases(tiny, "val")
    assert all(c.locations for c in cases)
    sampler = PatchSampler(cases, [8, 8, 8], batch_size=4, foreground_share=1.0, seed=3)  # small patch: not by chance
    for _ in range(10):
        _, labels = sampler.sample()
        assert all((labels[b] > 0).any() for b in range(labels.shape[0]))


def test_patch_sampler_needs_cases() -> None:
    with pytest.raises(ValueError, match="no cases"):
        PatchSampler([], [8, 8, 8], 2)


# --------------------------------------------------------------------------- training
def test_train_writes_checkpoint_and_loadable_package(tiny: dict[str, Path], straight_run) -> None:
    from medseg.inference.predictor import Predictor
    from medseg.preprocessing.fingerprint import case_files, load_case

    cfg, out, result = straight_run
    assert (out / CHECKPOINT).is_file()
    assert result.epochs_run == 2 and [h["epoch"] for h in result.history] == [0, 1]
    for row in result.history:
        assert np.isfinite(row["train_loss"]) and 0.0 <= row["val_dice_mean"] <= 1.0
        assert {"val_dice_WT", "val_dice_TC", "val_dice_ET", "lr"} <= row.keys()
    assert result.best_epoch in (0, 1) and result.best_val_dice == max(h["val_dice_mean"] for h in result.history)

    model_dir = result.model_dir
    assert model_dir == out / "model"
    for name in (schemas.WEIGHTS_FILE, schemas.PLANS_JSON, schemas.DATASET_JSON, schemas.MODEL_PACKAGE_JSON):
        assert (model_dir / name).is_file(), name
    package = schemas.ModelPackage.load(model_dir)
    assert package.training["epochs_run"] == 2 and package.training["config"]["epochs"] == 2

    predictor = Predictor.from_package(model_dir, device="cpu")
    test_case = schemas.Splits.load(tiny["dataset"]).test[0]
    images, _, affine, spacing = load_case(tiny["dataset"], test_case, 4, with_label=False)
    prediction = predictor.predict(images, affine, spacing)
    assert prediction.segmentation.shape == images.shape[1:]
    assert prediction.segmentation.dtype == np.uint8
    assert set(np.unique(prediction.segmentation)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(prediction.affine, affine)
    assert set(prediction.volumes_ml) == {"WT", "TC", "ET"}
    from_files = predictor.predict_files(case_files(tiny["dataset"], test_case, 4))
    np.testing.assert_array_equal(from_files.segmentation, prediction.segmentation)


def test_resume_continues_at_next_epoch(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    first = train(tiny["pre"], tmp_path, cfg, progress=False, write_package=False)
    assert first.epochs_run == 1
    seen: list[int] = []
    second = train(tiny["pre"], tmp_path, dataclasses.replace(cfg, epochs=2), resume=True, progress=False,
                   on_epoch=lambda epoch, metrics: seen.append(epoch), write_package=False)
    assert seen == [1]  # only epoch index 1 was trained
    assert second.epochs_run == 2 and [h["epoch"] for h in second.history] == [0, 1]
    assert second.history[0] == first.history[0]  # carried over from the checkpoint
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["epoch"] == 1


class _Killed(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tiny: dict[str, Path], tmp_path: Path, straight_run) -> None:
    """A run stopped after its first epoch's checkpoint, then resumed, ends exactly where an
    uninterrupted run with the same config and seed ends (sampler and torch RNG states restored).

    The stop happens in ``on_epoch``, which runs after the checkpoint is written, so the folder is what
    a killed process leaves. (Resuming a finished 1-epoch run with ``epochs=2`` is a different run:
    the poly learning-rate schedule depends on the total epochs, so its first epoch already differs.)
    """
    cfg, straight_dir, straight = straight_run

    def kill_after_first(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 0:
            raise _Killed

    with pytest.raises(_Killed):
        train(tiny["pre"], tmp_path, cfg, on_epoch=kill_after_first, progress=False)
    assert not (tmp_path / "model").exists()
    resumed = train(tiny["pre"], tmp_path, cfg, resume=True, progress=False)

    _assert_same_weights(_model_state(straight_dir), _model_state(tmp_path))
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert [h["val_dice_mean"] for h in resumed.history] == [h["val_dice_mean"] for h in straight.history]
    _assert_same_weights(torch.load(straight_dir / "model" / schemas.WEIGHTS_FILE, weights_only=True),
                         torch.load(tmp_path / "model" / schemas.WEIGHTS_FILE, weights_only=True))


def test_train_rejects_missing_fold(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="fold 5 does not exist"):
        train(tiny["pre"], tmp_path, TrainConfig(**{**FAST, "fold": 5}), progress=False)


# --------------------------------------------------------------------------- tuning
def test_tune_two_trials_on_sqlite(tiny: dict[str, Path], tmp_path: Path) -> None:
    import optuna

    from medseg.training.tuning import SEARCH_SPACE, sqlite_url, tune

    storage = sqlite_url(tmp_path / "optuna.db")
    base = TrainConfig(**{**FAST, "epochs": 1, "iterations_per_epoch": 1})
    seen: list[tuple[int, str]] = []
    best = tune(tiny["pre"], base, n_trials=2, storage=storage, study_name="unit", seed=0, progress=False,
                on_trial=lambda number, params, value, state: seen.append((number, state)))
    assert isinstance(best, schemas.BestParams)
    assert set(best.params) == set(SEARCH_SPACE)
    for name, (_, low, high, *_) in SEARCH_SPACE.items():
        assert low <= best.params[name] <= high
    assert best.n_trials == 2 and best.n_pruned == 0 and 0.0 <= best.best_value <= 1.0
    assert best.storage == storage and best.study_name == "unit"
    assert seen == [(0, "COMPLETE"), (1, "COMPLETE")]

    study = optuna.load_study(study_name="unit", storage=storage)
    assert len(study.trials) == 2
    assert study.best_value == pytest.approx(best.best_value) and study.best_params == best.params
    # the configured values are measured first; the second trial is the sampler's
    assert study.trials[0].params == {k: getattr(base, k) for k in SEARCH_SPACE}
    assert study.trials[1].params != study.trials[0].params

    # resuming the study does not measure the defaults again
    tune(tiny["pre"], base, n_trials=1, storage=storage, study_name="unit", seed=0, progress=False)
    study = optuna.load_study(study_name="unit", storage=storage)
    assert len(study.trials) == 3 and study.trials[2].params != study.trials[0].params


def test_tune_baseline_is_the_configured_values_inside_the_space() -> None:
    from medseg.training.tuning import SEARCH_SPACE, baseline_params

    assert baseline_params(TrainConfig(), SEARCH_SPACE) == {"learning_rate": 3e-3, "foreground_share": 1 / 3, "weight_decay": 1e-5}
    assert baseline_params(TrainConfig(learning_rate=0.5), SEARCH_SPACE) == {}  # outside the range: no baseline trial
    assert baseline_params(TrainConfig(optimizer="sgd"), {"optimizer": ("categorical", ("adamw", "sgd"))}) == {"optimizer": "sgd"}


def test_tune_redacts_database_password() -> None:
    from medseg.training.tuning import _redact

    assert _redact("postgresql://optuna:s3cret@db:5432/optuna") == "postgresql://optuna:***@db:5432/optuna"
    assert _redact("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


# --------------------------------------------------------------------------- stages (MLflow on / off)
@pytest.fixture
def _restore_mlflow_uri(monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # put back whatever was set before


TRIAL = {"epochs": 1, "iterations_per_epoch": 1, "max_val_cases": 1, "device": "cpu", "seed": 3}


def test_run_tune_and_run_train_without_tracking(tiny: dict[str, Path], tmp_path: Path) -> None:
    from medseg.training.stage import merged_params, run_train, run_tune
    from medseg.training.tuning import sqlite_url

    best_file = tmp_path / "best_params.json"
    best = run_tune(tiny["pre"], best_file, {k: float(v) if isinstance(v, int) else v for k, v in TRIAL.items()}, 1,
                    sqlite_url(tmp_path / "optuna.db"), "nomlflow", tracking_uri=None, progress=False)
    assert schemas.BestParams.load(best_file) == best
    cfg = merged_params(TRIAL, best_file)
    assert cfg.learning_rate == best.params["learning_rate"] and cfg.epochs == 1
    result = run_train(tiny["pre"], tmp_path / "train", cfg, tracking_uri=None, progress=False)
    package = schemas.ModelPackage.load(result.model_dir)
    assert "mlflow_run_id" not in package.training
    assert package.training["config"]["learning_rate"] == best.params["learning_rate"]


@pytest.mark.slow  # creating the MLflow SQLite schema alone takes several seconds
@pytest.mark.usefixtures("_restore_mlflow_uri")
def test_run_tune_and_run_train_log_to_mlflow(tiny: dict[str, Path], tmp_path: Path) -> None:
    import mlflow

    from medseg.training.stage import run_train, run_tune
    from medseg.training.tuning import sqlite_url

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best = run_tune(tiny["pre"], tmp_path / "best.json", TRIAL, 2, sqlite_url(tmp_path / "optuna.db"), "tracked",
                    tracking_uri=uri, tags={"purpose": "unit"}, progress=False)
    result = run_train(tiny["pre"], tmp_path / "train", TrainConfig(**{**TRIAL, "epochs": 2}), tracking_uri=uri,
                       tags={"purpose": "unit"}, progress=False)
    assert mlflow.active_run() is None

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("medseg")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"tune-tracked", "trial-0", "trial-1", "train-fold0"} <= set(runs)
    assert all(r.data.tags.get("purpose") == "unit" for r in runs.values())

    train_run = runs["train-fold0"]
    history = client.get_metric_history(train_run.info.run_id, "val_dice_mean")
    assert sorted(m.step for m in history) == [0, 1]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([h["val_dice_mean"] for h in result.history])
    assert train_run.data.params["epochs"] == "2"
    assert train_run.data.metrics["best_val_dice_mean"] == pytest.approx(result.best_val_dice)
    assert schemas.ModelPackage.load(result.model_dir).training["mlflow_run_id"] == train_run.info.run_id

    parent = runs["tune-tracked"]
    for trial in ("trial-0", "trial-1"):
        run = runs[trial]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(client.get_metric_history(run.info.run_id, "val_dice_mean")) == 1
    assert parent.data.metrics["best_val_dice_mean"] == pytest.approx(best.best_value)
    assert {f"best_{k}" for k in best.params} <= set(parent.data.params)
