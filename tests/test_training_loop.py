"""The training engine: optimisers and LR schedules, precision, determinism, exact resume after SIGKILL,
k-fold training and fold ensembles.

Runs on a mini preprocessed dataset written directly (no synth/ingest/preprocess): 6 cases of 16³ voxels,
2 channels, one foreground label, 2 folds, 8³ patches, a 3-stage U-Net with 4–16 features.
``build_mini_preprocessed`` is shared with tests/test_ddp.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.training import ddp
from medseg.training.trainer import CHECKPOINT, TrainConfig, build_optimizer, build_scheduler, lr_factor, resolve_precision, train

ROOT = Path(__file__).resolve().parents[1]
SHAPE, PATCH = (16, 16, 16), [8, 8, 8]
TOPOLOGY = {"name": "unet", "in_channels": 2, "out_channels": 2, "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            "features": [4, 8, 16], "deep_supervision": False, "norm": "instance"}
# num_threads=1: the same thread count in every process, so CPU results are bitwise comparable
MINI = dict(epochs=2, iterations_per_epoch=2, max_val_cases=2, device="cpu", seed=11, num_threads=1, val_overlap=0.0)


def build_mini_preprocessed(root: Path, n_cases: int = 6, n_folds: int = 2, seed: int = 0) -> Path:
    """A preprocessed folder as ``medseg preprocess`` writes it: plans.json, dataset.json, splits.json and per
    case ``CASE.npy`` (C×16³ float32), ``CASE_seg.npy`` (int8) and ``CASE.json``. Each case: noise plus a
    bright ball (label 1) at a random place."""
    rng = np.random.default_rng(seed)
    pre = Path(root)
    folder = pre / "3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"mini_{i:03d}" for i in range(n_cases)]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    for case_id in ids:
        centre = rng.integers(5, 11, size=3)
        ball = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= rng.integers(9, 17)
        data = rng.normal(0, 0.5, size=(2, *SHAPE)).astype(np.float32)
        data[0][ball] += 2.0
        data[1][ball] -= 1.0
        seg = ball.astype(np.int8)
        np.save(folder / f"{case_id}.npy", data)
        np.save(folder / f"{case_id}_seg.npy", seg)
        schemas.CaseProperties(case_id=case_id, original_shape=list(SHAPE), original_spacing=[1.0] * 3, original_affine=np.eye(4).tolist(),
                               crop_bbox=[[0, s] for s in SHAPE], shape_after_crop=list(SHAPE), shape_after_resample=list(SHAPE), target_spacing=[1.0] * 3,
                               class_locations={"1": np.argwhere(seg == 1)[:50].tolist()}).save(folder / f"{case_id}.json")
    folds = [{"train": [c for j, c in enumerate(ids) if j % n_folds != f], "val": [c for j, c in enumerate(ids) if j % n_folds == f]} for f in range(n_folds)]
    schemas.Splits(test=[], folds=folds, n_folds=n_folds).save(pre)
    schemas.DatasetJson(name="mini", channel_names={"0": "a", "1": "b"}, labels={"background": 0, "lesion": 1}, numTraining=n_cases).save(pre)
    config = {"spacing": [1.0] * 3, "patch_size": PATCH, "batch_size": 2, "median_shape": list(SHAPE), "network": TOPOLOGY}
    schemas.Plans(dataset_name="mini", device_budget="cpu", channel_names=["a", "b"], labels={"background": 0, "lesion": 1}, regions={},
                  normalization=[{"channel": c, "scheme": "zscore_nonzero", "mean": 0.0, "std": 1.0, "lower": 0.0, "upper": 1.0} for c in ("a", "b")],
                  configurations={"3d_fullres": config}).save(pre)
    return pre


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mini_preprocessed(tmp_path_factory.mktemp("mini") / "pre")


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train() sets the thread count (process-wide): put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------- config, optimisers, schedules, precision
def test_config_rejects_unknown_names() -> None:
    for bad in ({"optimizer": "adam"}, {"lr_schedule": "step"}, {"precision": "fp8"}, {"epochs": 0}):
        with pytest.raises(MedsegError, match="unknown|must be >= 1"):
            TrainConfig.from_dict(bad)
    cfg = TrainConfig.from_dict({"optimizer": "sgd", "lr_schedule": "cosine", "precision": "bf16", "compile": "false", "num_threads": 2.0})
    assert (cfg.optimizer, cfg.lr_schedule, cfg.precision, cfg.compile, cfg.num_threads) == ("sgd", "cosine", "bf16", False, 2)


def test_lr_schedules_per_epoch() -> None:
    assert lr_factor("poly", 0, 10) == 1.0 and lr_factor("poly", 5, 10) == pytest.approx(0.5**0.9)
    assert lr_factor("poly", 10, 10) == 0.0
    assert lr_factor("cosine", 0, 4) == 1.0 and lr_factor("cosine", 2, 4) == pytest.approx(0.5) and lr_factor("cosine", 4, 4) == pytest.approx(0.0)
    assert lr_factor("constant", 3, 4) == 1.0
    cfg = TrainConfig(epochs=4, learning_rate=0.01, optimizer="sgd")
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01 * (1 - e / 4) ** 0.9 for e in range(4)])
    assert sched.state_dict()["lr_lambdas"] == [None]  # the schedule follows the config, not the checkpoint


def test_time_budget_schedule_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.training import trainer as trainer_module

    now = [100.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: now[0])
    cfg = TrainConfig(epochs=1000, learning_rate=0.01, optimizer="sgd", time_budget_minutes=1.0)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    sched = build_scheduler(cfg, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    for spent_s in (15.0, 30.0, 60.0, 90.0):  # a quarter, half, all and more of the 60 s budget
        now[0] = 100.0 + spent_s
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - min(spent_s / 60.0, 1.0)) ** 0.9)
    with pytest.raises(MedsegError, match="time_budget_minutes"):
        TrainConfig(time_budget_minutes=-1)


def test_time_budget_stops_after_the_last_epoch_that_fits(mini: Path, tmp_path: Path) -> None:
    # a 6 ms budget: the first epoch overruns it, so the run stops after it with a model package, far from 50 epochs
    cfg = TrainConfig(**{**MINI, "epochs": 50}, time_budget_minutes=0.0001)
    result = train(mini, tmp_path, cfg, progress=False)
    assert result.epochs_run == 1 and _ckpt(tmp_path)["epoch"] == 0
    assert (tmp_path / "model").is_dir()


def test_optimizers_are_configured_as_named() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(TrainConfig(optimizer="sgd", learning_rate=0.01, weight_decay=3e-5), params)
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.99 and group["weight_decay"] == 3e-5
    adamw = build_optimizer(TrainConfig(optimizer="adamw", weight_decay=1e-4), params)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 1e-4


def test_precision_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(MedsegError, match="fp16 needs CUDA"):
        resolve_precision("fp16", cpu)


# --------------------------------------------------------------------------- training runs
def test_sgd_poly_run_logs_epoch_metrics(mini: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**{**MINI, "epochs": 3}, optimizer="sgd", learning_rate=0.01, lr_schedule="poly", grad_clip=12.0)
    seen: list[dict[str, float]] = []
    result = train(mini, tmp_path, cfg, progress=False, write_package=False, on_epoch=lambda e, m: seen.append(m))
    assert result.epochs_run == 3 and len(seen) == 3
    assert [m["lr"] for m in seen] == pytest.approx([0.01 * (1 - e / 3) ** 0.9 for e in range(3)])
    for m in seen:
        assert np.isfinite(m["train_loss"]) and 0.0 <= m["val_dice_mean"] <= 1.0 and "val_dice_lesion" in m
        assert 0.0 <= m["data_wait_share"] <= 1.0 and m["epoch_seconds"] >= m["train_seconds"] > 0.0
    ckpt = _ckpt(tmp_path)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 1 and len(ckpt["rng"]) == 1
    assert {"model", "optimizer", "scheduler", "scaler", "best_state", "history"} <= ckpt.keys()
    assert {"python", "numpy", "torch"} <= ckpt["rng"][0].keys()
    assert ckpt["optimizer"]["param_groups"][0]["nesterov"] is True
    assert result.weights_sha256 == ddp.state_digest(ckpt["model"])


def test_bf16_autocast_on_cpu_trains_one_step(mini: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**{**MINI, "epochs": 1, "iterations_per_epoch": 1}, precision="bf16")
    result = train(mini, tmp_path, cfg, progress=False)
    assert np.isfinite(result.history[0]["train_loss"])
    weights = torch.load(result.model_dir / schemas.WEIGHTS_FILE, weights_only=True)
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())  # autocast: fp32 master weights
    assert schemas.ModelPackage.load(result.model_dir).training["precision"] == "bfloat16"


def test_deterministic_runs_repeat_bitwise_and_settings_are_restored(mini: Path, tmp_path: Path) -> None:
    before = torch.are_deterministic_algorithms_enabled()
    cfg = TrainConfig(**MINI, deterministic=True)
    a = train(mini, tmp_path / "a", cfg, progress=False, write_package=False)
    assert torch.are_deterministic_algorithms_enabled() == before
    b = train(mini, tmp_path / "b", cfg, progress=False, write_package=False)
    c = train(mini, tmp_path / "c", dataclasses.replace(cfg, seed=12), progress=False, write_package=False)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_compile_flag_builds_the_compiled_model(mini: Path) -> None:
    """The compile path wraps the network (compilation itself happens at the first step: see the slow test)."""
    from medseg.training.trainer import _build_engine

    plans = schemas.Plans.load(mini)
    engine = _build_engine(TrainConfig(**MINI, compile=True, loss="dice_ce"), plans.configuration().network, ddp.DistContext())
    assert engine.train_model is not engine.network and hasattr(engine.train_model, "_orig_mod")
    assert not any(k.startswith("_orig_mod") for k in engine.network.state_dict())  # checkpoints hold the plain keys


@pytest.mark.slow  # inductor compiles C++ for the forward and backward graphs: tens of seconds on 2 shared cores
def test_compiled_training_step_on_cpu(mini: Path, tmp_path: Path) -> None:
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    result = train(mini, tmp_path, TrainConfig(**{**MINI, "epochs": 1, "iterations_per_epoch": 1}, compile=True), progress=False, write_package=False)
    assert np.isfinite(result.history[0]["train_loss"])


def test_network_loss_and_augmentation_by_name(mini: Path, tmp_path: Path) -> None:
    """The registries' names reach the run; the package stores the resolved topology the predictor rebuilds."""
    from medseg.training import ensemble

    cfg = TrainConfig(**{**MINI, "epochs": 1, "iterations_per_epoch": 1}, network="resunet", network_options={"deep_supervision": True},
                      loss="jaccard", augmentation=True)
    result = train(mini, tmp_path, cfg, progress=False)
    assert np.isfinite(result.history[0]["train_loss"])
    package = schemas.ModelPackage.load(result.model_dir)
    assert package.network["name"] == "resunet" and package.network["deep_supervision"] is True and package.network["residual"] is True
    ensemble.load_network(result.model_dir, package)  # the stored topology rebuilds the trained network
    with pytest.raises(MedsegError, match="softmax"):
        train(mini, tmp_path / "x", dataclasses.replace(cfg, loss="region_bce_dice", network="unet", network_options={}), progress=False)
    with pytest.raises(MedsegError, match="classification"):
        train(mini, tmp_path / "x", dataclasses.replace(cfg, network="classifier3d", network_options={}, loss="dice_ce"), progress=False)
    with pytest.raises(MedsegError, match="unknown option"):
        train(mini, tmp_path / "x", dataclasses.replace(cfg, network_options={"depth": 3}, loss="dice_ce"), progress=False)


def test_non_finite_loss_stops_the_run(mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.training import trainer

    class NaNLoss(torch.nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return logits.mean() * float("nan")

    monkeypatch.setattr(trainer, "resolve_loss", lambda cfg: NaNLoss())
    with pytest.raises(MedsegError, match=r"NaN/Inf in 2 of 2 steps of epoch 1"):
        train(mini, tmp_path, TrainConfig(**MINI), progress=False)


def test_on_epoch_can_stop_a_run(mini: Path, tmp_path: Path) -> None:
    class Stop(Exception):
        pass

    def stop(epoch: int, metrics: dict[str, float]) -> None:
        raise Stop

    with pytest.raises(Stop):
        train(mini, tmp_path, TrainConfig(**MINI), on_epoch=stop, progress=False)
    assert _ckpt(tmp_path)["epoch"] == 0 and not (tmp_path / "model").exists()


# --------------------------------------------------------------------------- resume after SIGKILL
_ENTRY = """
import json, sys, time
from pathlib import Path
from medseg.training import trainer

pre, out, cfg_json, resume, hang_marker = sys.argv[1:6]
real, calls = trainer.make_sampler, []  # one sampler per epoch trained in this process


def make_sampler(*args, **kwargs):
    sampler = real(*args, **kwargs)
    calls.append(1)
    if hang_marker and len(calls) == 2:
        # stop inside the second epoch: after its second batch is drawn, say so and wait to be killed
        draw, drawn = sampler.sample, []

        def sample():
            drawn.append(1)
            if len(drawn) == 2:
                Path(hang_marker).write_text("in epoch 2")
                time.sleep(600)
            return draw()

        sampler.sample = sample
    return sampler


trainer.make_sampler = make_sampler
result = trainer.train(Path(pre), Path(out), trainer.TrainConfig.from_dict(json.loads(cfg_json)), resume=resume == "1", progress=False)
print(len(calls), result.weights_sha256)
"""


def _start(mini: Path, out: Path, cfg: TrainConfig, resume: bool, hang_marker: Path | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _ENTRY, str(mini), str(out), json.dumps(dataclasses.asdict(cfg)), "1" if resume else "0", str(hang_marker or "")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(mini: Path, tmp_path: Path) -> None:
    """A training process killed (SIGKILL) in its second epoch, after the first epoch's checkpoint, and
    resumed ends with exactly the weights, optimiser state and history of an uninterrupted run (with the
    augmentation pipeline on: its random draws must repeat too)."""
    cfg = TrainConfig(**{**MINI, "epochs": 3, "iterations_per_epoch": 3}, deterministic=True, augmentation=True)
    killed, marker = tmp_path / "killed", tmp_path / "in_epoch_2"
    proc = _start(mini, killed, cfg, resume=False, hang_marker=marker)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the run did not reach epoch 2 within 60 s"
            time.sleep(0.05)
        assert _ckpt(killed)["epoch"] == 0  # epoch 1 checkpointed, epoch 2 under way
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(killed.glob(f".{CHECKPOINT}.*.tmp")), "a temporary checkpoint was left behind"

    resumed = _start(mini, killed, cfg, resume=True, hang_marker=None)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-3000:]

    straight = train(mini, tmp_path / "straight", cfg, progress=False)
    a, b = _ckpt(tmp_path / "straight"), _ckpt(killed)
    _assert_same_weights(a["model"], b["model"])
    epochs_trained, digest = out.strip().splitlines()[-1].split()
    assert epochs_trained == "2", "the resumed process should train epochs 2 and 3 only"
    assert digest == straight.weights_sha256
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_weights(sa, sb)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert [h["val_dice_mean"] for h in a["history"]] == [h["val_dice_mean"] for h in b["history"]]
    _assert_same_weights(torch.load(tmp_path / "straight" / "model" / schemas.WEIGHTS_FILE, weights_only=True),
                         torch.load(killed / "model" / schemas.WEIGHTS_FILE, weights_only=True))


# --------------------------------------------------------------------------- k-fold and ensembles
def test_parse_folds() -> None:
    from medseg.training.stage import parse_folds

    assert parse_folds(None, 5) is None and parse_folds("all", 3) == [0, 1, 2] and parse_folds("2", 5) == [2] and parse_folds(1, 5) == [1]
    assert parse_folds("0,2", 5) == [0, 2]
    for bad in ("5", "x", "-1", ""):
        with pytest.raises(MedsegError):
            parse_folds(bad, 5)


def test_train_all_folds_then_ensemble_averages_softmax(mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.inference.sliding_window import predict_probabilities
    from medseg.training import ensemble, stage

    cfg = TrainConfig(**{**MINI, "epochs": 1})
    result = stage.run_train_folds(mini, tmp_path, cfg, [0, 1], tracking_uri=None, progress=False)
    assert sorted(result.results) == [0, 1]
    for fold in (0, 1):
        assert schemas.ModelPackage.load(tmp_path / f"fold_{fold}" / "model").training["config"]["fold"] == fold
    assert result.model_dir == tmp_path / "model" and set(result.cv_dice) == {"lesion"}

    package = schemas.ModelPackage.load(result.model_dir)
    assert ensemble.member_weights(package) == ["weights_fold0.pt", "weights_fold1.pt"] and package.weights_file == "weights_fold0.pt"
    assert package.training["ensemble"]["combine"] == "mean_softmax" and package.training["folds"] == [0, 1]
    assert package.postprocessing.get("validation_cases") == 4  # max_val_cases 2 per fold, each predicted out of fold

    network = ensemble.load_network(result.model_dir, package)
    assert isinstance(network, ensemble.EnsembleNetwork) and not network.training
    data = np.load(mini / "3d_fullres" / "mini_000.npy")
    ens_probs = predict_probabilities(network, data, PATCH, overlap=0.0)
    members = [ensemble.load_network(tmp_path / f"fold_{f}" / "model", schemas.ModelPackage.load(tmp_path / f"fold_{f}" / "model")) for f in (0, 1)]
    mean = np.mean([predict_probabilities(m, data, PATCH, overlap=0.0) for m in members], axis=0)
    np.testing.assert_allclose(ens_probs, mean, atol=1e-5)  # no window overlap: exactly the mean softmax
    np.testing.assert_allclose(ens_probs.sum(0), 1.0, atol=1e-5)

    # resuming skips the finished folds and rebuilds the ensemble only
    def fail(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(stage, "run_train", fail)
    again = stage.run_train_folds(mini, tmp_path, cfg, [0, 1], resume=True, progress=False)
    assert {f: r.best_val_dice for f, r in again.results.items()} == {f: r.best_val_dice for f, r in result.results.items()}


def test_ensemble_package_rejects_members_that_do_not_fit(mini: Path, tmp_path: Path) -> None:
    from medseg.training import ensemble
    from medseg.training.trainer import save_model_package
    from medseg.networks.unet import build_network

    state = build_network(TOPOLOGY).state_dict()
    a = save_model_package(tmp_path / "a", state, mini, "3d_fullres", {"config": {"fold": 0}})
    b = save_model_package(tmp_path / "b", state, mini, "3d_fullres", {"config": {"fold": 0}})
    with pytest.raises(MedsegError, match="different folds"):
        ensemble.save_ensemble_package(tmp_path / "ens", [a, b])
    single = ensemble.load_network(a, schemas.ModelPackage.load(a))
    assert not isinstance(single, ensemble.EnsembleNetwork)
    (a / schemas.WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(MedsegError, match="cannot load the weights"):
        ensemble.load_network(a, schemas.ModelPackage.load(a))


def test_prefetch_sampler_yields_the_plain_sampler_batches_in_order() -> None:
    import numpy as np

    from medseg.training.sampler import PrefetchSampler

    class Counting:
        def __init__(self) -> None:
            self.rng, self.drawn = np.random.default_rng(3), 0

        def sample(self):
            self.drawn += 1
            return self.rng.normal(size=(2, 3)), np.full(2, self.drawn)

    plain, prefetched = Counting(), PrefetchSampler(Counting(), n_batches=5, depth=2)
    for _ in range(5):
        a, b = plain.sample(), prefetched.sample()
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    prefetched.close()
    assert prefetched._sampler.drawn == 5  # exactly the batches asked for, none drawn ahead past the end
    with pytest.raises(RuntimeError, match="all prefetched"):
        prefetched.sample()


def test_prefetch_sampler_passes_loader_errors_on_and_stops_early() -> None:
    from medseg.training.sampler import PrefetchSampler

    class Failing:
        def sample(self):
            raise ValueError("case 7: unreadable")

    loader = PrefetchSampler(Failing(), n_batches=3)
    with pytest.raises(ValueError, match="case 7"):
        loader.sample()
    loader.close()
    assert not loader._thread.is_alive()
