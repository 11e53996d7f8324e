"""Loader worker processes (``train.loader_workers``, medseg/training/loader.py): the same batches for any number
of workers, exact resume after SIGKILL with two workers, no process left behind, worker failures reported.

Tiny on purpose (the mini dataset of tests/test_training_loop.py: 16³ cases, 8³ patches): each test spawns one or
two workers, which costs a torch import each.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from medseg.errors import MedsegError
from medseg.training import trainer
from medseg.training.loader import LoaderPool, LoaderWorkerError
from medseg.training.sampler import PatchSampler, PrefetchSampler, PreprocessedCase
from medseg.training.trainer import TrainConfig, train
from tests.test_training_loop import MINI, ROOT, _assert_same_weights, _ckpt, build_mini_preprocessed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mini_preprocessed(tmp_path_factory.mktemp("mini") / "pre")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """train() sets the thread count (process-wide): put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _sampler(mini: Path, seed: int = 4) -> PatchSampler:
    folder = mini / "3d_fullres"
    cases = [PreprocessedCase(folder, f"mini_{i:03d}") for i in range(4)]
    # the full augmentation pipeline: its random draws are the part most likely to depend on who draws
    return PatchSampler(cases, [8, 8, 8], batch_size=2, seed=seed, augmentation=True)


def _children() -> set[int]:
    """Live child processes of this one, except multiprocessing's resource tracker (one per interpreter, started by
    the first spawn and kept on purpose: it unlinks shared memory a crashed process leaves behind)."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return set(alive)


def _assert_same_batches(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x, y):
            u, v = np.asarray(u), np.asarray(v)
            assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), f"batch {i} differs"


# --------------------------------------------------------------------------- the same batches for any K
def test_batches_are_a_function_of_the_iteration_for_0_1_2_workers(mini: Path) -> None:
    """Batch i is sample_at(i) whoever draws it: the training thread, the loader thread, one or two workers
    (iteration i goes to worker i mod K; out-of-order arrivals are put back in order)."""
    n = 5
    reference = [_sampler(mini).sample_at(i) for i in range(n)]
    # a pure function of (seed, i): drawing batch 3 alone on a fresh sampler gives the same batch 3
    _assert_same_batches([_sampler(mini).sample_at(3)], [reference[3]])
    assert not np.array_equal(reference[0][0], reference[1][0]), "consecutive batches should differ"

    thread = PrefetchSampler(_sampler(mini), n, depth=2)
    _assert_same_batches([thread.sample() for _ in range(n)], reference)
    thread.close()

    for workers in (1, 2):
        with LoaderPool(workers, depth=2, pin_memory=False) as pool:
            first = pool.epoch(_sampler(mini), n)
            _assert_same_batches([first.sample() for _ in range(n)], reference)
            with pytest.raises(RuntimeError, match="all 5 batches"):
                first.sample()
            # the next epoch's sampler (another seed) reaches the same workers and changes the batches
            second = pool.epoch(_sampler(mini, seed=5), 2)
            other = [second.sample() for _ in range(2)]
            _assert_same_batches(other, [_sampler(mini, seed=5).sample_at(i) for i in range(2)])
            assert not np.array_equal(other[0][0], reference[0][0])


# --------------------------------------------------------------------------- exact resume with 2 workers
_ENTRY = """
import json, sys, time
from pathlib import Path
from medseg.training import trainer

pre, out, cfg_json, resume, hang_marker = sys.argv[1:6]
real_step, steps = trainer._train_step, []


def step(*args, **kwargs):
    steps.append(1)
    # stop in the second epoch (3 steps an epoch), after its first step: say so and wait to be killed
    if hang_marker and len(steps) == 5:
        Path(hang_marker).write_text("in epoch 2")
        time.sleep(600)
    return real_step(*args, **kwargs)


trainer._train_step = step
result = trainer.train(Path(pre), Path(out), trainer.TrainConfig.from_dict(json.loads(cfg_json)), resume=resume == "1", progress=False)
print(len(steps), result.weights_sha256)
"""


def _start(mini: Path, out: Path, cfg: TrainConfig, resume: bool, marker: Path | None) -> subprocess.Popen:
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _ENTRY, str(mini), str(out), json.dumps(dataclasses.asdict(cfg)), "1" if resume else "0", str(marker or "")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_epoch_with_two_workers_then_resume_gives_the_uninterrupted_weights(mini: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL) in its second epoch with two loader workers, resumed with two workers: the weights, the
    optimiser state and the loss history equal an uninterrupted run's, and that run used the loader thread (K = 0):
    the batches do not depend on the worker count. The killed run's workers do not outlive it."""
    cfg = TrainConfig(**{**MINI, "epochs": 3, "iterations_per_epoch": 3}, deterministic=True, augmentation=True, loader_workers=2)
    killed, marker = tmp_path / "killed", tmp_path / "in_epoch_2"
    proc = _start(mini, killed, cfg, resume=False, marker=marker)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the run did not reach epoch 2 within 180 s"
            time.sleep(0.05)
        assert _ckpt(killed)["epoch"] == 0  # epoch 1 checkpointed, epoch 2 under way
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) >= 2, "two loader workers should be running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # orphaned workers notice their parent is gone and exit (they poll it while idle)
    deadline = time.monotonic() + 30
    while [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of the killed run are still alive: {left}"

    resumed = _start(mini, killed, cfg, resume=True, marker=None)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    steps, digest = out.strip().splitlines()[-1].split()
    assert steps == "6", "the resumed process should train epochs 2 and 3 only"

    straight = train(mini, tmp_path / "straight", dataclasses.replace(cfg, loader_workers=0), progress=False)
    a, b = _ckpt(tmp_path / "straight"), _ckpt(killed)
    _assert_same_weights(a["model"], b["model"])
    assert digest == straight.weights_sha256
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_weights(sa, sb)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


# --------------------------------------------------------------------------- shutdown and failures
def test_workers_are_gone_after_close_and_after_an_interrupted_run(mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _children()
    pool = LoaderPool(2, pin_memory=False)
    pids = pool.pids
    assert len(pids) == 2 and set(pids) <= _children()
    batches = pool.epoch(_sampler(mini), 4)
    batches.sample()  # stop after one of four batches: the other three are in flight or done, never claimed
    pool.close()
    assert not [p for p in pids if psutil.pid_exists(p)], "a worker outlived close()"

    # Ctrl-C in the training step: train() closes its workers on the way out
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_train_step", interrupted)
    cfg = TrainConfig(**MINI, loader_workers=2)
    with pytest.raises(KeyboardInterrupt):
        train(mini, tmp_path / "interrupted", cfg, progress=False)
    assert _children() <= before, f"processes left behind: {_children() - before}"


class _FailingSampler:
    """Fails on batch 1 at once; batch 0 takes longer (picklable: the workers import this module to unpickle it)."""

    def sample_at(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        if iteration == 1:
            raise ValueError("case mini_007: unreadable block")
        time.sleep(1.0)  # the error arrives first: it must still wait for batch 0 to be handed out
        return np.full((1, 2), iteration, np.float32), np.zeros((1, 1), np.int64)


class _DyingSampler:
    """The worker process dies (as under the OOM killer) on batch 0."""

    def sample_at(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def test_a_worker_exception_and_a_dead_worker_are_raised_with_what_happened() -> None:
    with LoaderPool(2, pin_memory=False) as pool:
        batches = pool.epoch(_FailingSampler(), 3)
        assert batches.sample()[0].tolist() == [[0.0, 0.0]]
        with pytest.raises(LoaderWorkerError, match=r"(?s)worker 1 failed on batch 1.*ValueError: case mini_007: unreadable block") as info:
            batches.sample()
        assert isinstance(info.value, MedsegError)
    with LoaderPool(1, pin_memory=False) as pool:
        batches = pool.epoch(_DyingSampler(), 2)
        with pytest.raises(LoaderWorkerError, match="loader worker 0 .* died with exit code -9"):
            batches.sample()


def test_loader_settings_are_checked() -> None:
    with pytest.raises(MedsegError, match="loader_workers and loader_prefetch must be >= 0"):
        TrainConfig(loader_workers=-1)
    assert TrainConfig.from_dict({"loader_workers": 2.0}).loader_workers == 2  # KFP hands numbers as floats
    with pytest.raises(ValueError, match="at least one worker"):
        LoaderPool(0)


def test_cases_travel_to_workers_as_paths_and_come_back_memory_mapped(mini: Path, tmp_path: Path) -> None:
    """A sampler goes to every worker each epoch: its cases must pickle as where they live, not as their voxels."""
    import pickle

    from medseg import schemas
    from medseg.training.sampler import CascadeCase, VolumeCase

    folder = mini / "3d_fullres"
    plain = PreprocessedCase(folder, "mini_000")
    np.save(tmp_path / f"mini_000{schemas.CASE_PREVIOUS_STAGE_SUFFIX}", np.asarray(plain.seg))
    cascade = CascadeCase(folder, "mini_000", tmp_path, [1])
    volume = VolumeCase(folder, "mini_000", target=1, age=63.5)
    for case in (plain, cascade, volume):
        blob = pickle.dumps(case)
        assert len(blob) < 2_000 < case.data.nbytes, f"{type(case).__name__} pickles its voxels ({len(blob)} bytes)"
        back = pickle.loads(blob)
        assert type(back) is type(case) and back.case_id == case.case_id
        assert np.array_equal(np.asarray(back.data), np.asarray(case.data))
    assert isinstance(pickle.loads(pickle.dumps(plain)).seg, np.memmap)
    back = pickle.loads(pickle.dumps(cascade))
    assert back.prev_labels == [1] and np.array_equal(back.prev, cascade.prev)
    back = pickle.loads(pickle.dumps(volume))
    assert (back.target, back.age) == (1, 63.5)


def test_whole_volume_batches_with_and_without_ages_through_a_worker(mini: Path) -> None:
    """The classifier's sampler through a worker: (images, classes, ages or None), as sample_at draws them."""
    from medseg.training.sampler import VolumeCase, VolumeSampler

    folder = mini / "3d_fullres"
    cases = [VolumeCase(folder, f"mini_{i:03d}", target=i % 2, age=40.0 + i) for i in range(5)]
    with LoaderPool(1, pin_memory=False) as pool:
        for ages in (True, False):
            sampler = VolumeSampler(cases, [8, 8, 8], 0.5, batch_size=2, seed=9, mirror_axes=(0,), ages=ages)
            reference = [VolumeSampler(cases, [8, 8, 8], 0.5, batch_size=2, seed=9, mirror_axes=(0,), ages=ages).sample_at(i) for i in range(3)]
            batches = pool.epoch(sampler, 3)
            got = [batches.sample() for _ in range(3)]
            for want, have in zip(reference, got):
                assert (have[2] is None) is (not ages)
                _assert_same_batches([tuple(a for a in want if a is not None)], [tuple(a for a in have if a is not None)])
            if ages:  # every case once in the first pass (5 cases: slots 0-4 of batches 0-2; the age tells the case)
                assert sorted(np.concatenate([g[2] for g in got])[:5].tolist()) == [40.0, 41.0, 42.0, 43.0, 44.0]


def test_batches_cross_shared_memory_unchanged_and_labels_travel_narrow() -> None:
    """A batch through one shared-memory block: every array arrives equal, with its own dtype (pinned too, where CUDA is); int64
    label maps whose values fit in int8 take an eighth of the block, wider values travel as they are."""
    from medseg.training.loader import _pack, _unpack

    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 4, 8, 8, 8)).astype(np.float32)
    labels = rng.integers(-1, 4, (2, 1, 8, 8, 8)).astype(np.int64)
    wide = np.array([0, 1000, -5], dtype=np.int64)
    for pin in (False, True) if torch.cuda.is_available() else (False,):  # pinned memory needs CUDA
        name, meta = _pack((images, labels, None, wide))
        assert meta[1] is not None and np.dtype(meta[1][3]) == np.int8 and meta[2] is None and np.dtype(meta[3][3]) == np.int64
        out = _unpack(name, meta, pin)
        got = [o.numpy() if hasattr(o, "numpy") else o for o in (out[0], out[1], out[3])]
        for sent, arrived in zip((images, labels, wide), got):
            assert arrived.dtype == sent.dtype and np.array_equal(arrived, sent)
        assert out[2] is None
