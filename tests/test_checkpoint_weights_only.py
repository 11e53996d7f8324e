"""Checkpoints load with ``torch.load(..., weights_only=True)`` (issue 15, point 5): the RNG states are tensors and
plain data, resume is still exact, and a format-2 checkpoint (pickled numpy RNG state) is refused with the
one-time conversion, which then resumes to the same weights as an uninterrupted run.

Uses the mini preprocessed dataset of tests/test_training_loop.py (16³ voxels, 8³ patches, a 3-stage U-Net).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import MedsegError
from medseg.training import checkpointing as ck
from medseg.training.trainer import CHECKPOINT, TrainConfig, train
from tests.test_training_loop import MINI, build_mini_preprocessed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mini_preprocessed(tmp_path_factory.mktemp("mini") / "pre")


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train() sets the thread count (process-wide): put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _draws() -> tuple[list[float], list[float], list[float]]:
    return [random.random() for _ in range(3)], np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both generators: part of the state
    ck.save_checkpoint(tmp_path / "c.pt", {"rng": [ck.rng_state(torch.device("cpu"))]})
    expected = _draws()
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # would raise on any pickled object
    rng = loaded["rng"][0]
    assert isinstance(rng["python"]["state"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)
    _draws()  # move every generator on, then restore
    ck.set_rng_state(rng, torch.device("cpu"))
    assert _draws() == expected


def test_plain_turns_numpy_values_into_loadable_data(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path / "c.pt", {"best": np.float64(0.5), "history": [{"epoch": np.int64(0), "dice": np.float32(0.25)}],
                                           "arr": np.arange(3, dtype=np.uint8)})
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["best"] == 0.5 and type(loaded["best"]) is float
    assert loaded["history"] == [{"epoch": 0, "dice": 0.25}]
    assert torch.equal(loaded["arr"], torch.tensor([0, 1, 2], dtype=torch.uint8))


def _as_format_2(path: Path) -> None:
    """Rewrite a current checkpoint as medseg wrote it before format 3: python/numpy RNG states as the pickled
    tuples ``random.getstate()`` / ``np.random.get_state()`` return."""
    ckpt = torch.load(path, weights_only=True)
    for r in ckpt["rng"]:
        py, nps = r["python"], r["numpy"]
        r["python"] = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
        r["numpy"] = (nps["bit_generator"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    ckpt["format"] = ck.PICKLED_FORMAT
    torch.save(ckpt, path)


@pytest.mark.slow
def test_format_2_checkpoint_refused_then_converted_and_resumed_exactly(mini: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**{**MINI, "epochs": 2}, deterministic=True, augmentation=True)
    run = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
        raise Stop  # after epoch 1's checkpoint: an interrupted two-epoch run

    with pytest.raises(Stop):
        train(mini, run, cfg, on_epoch=stop_after_first_epoch, progress=False)
    assert torch.load(run / CHECKPOINT, weights_only=True)["format"] == ck.CHECKPOINT_FORMAT
    _as_format_2(run / CHECKPOINT)
    old_bytes = (run / CHECKPOINT).read_bytes()

    with pytest.raises(MedsegError, match=r"pickled objects.*python -m medseg\.training\.checkpointing convert"):
        train(mini, run, cfg, resume=True, progress=False)
    assert (run / CHECKPOINT).read_bytes() == old_bytes  # the refusal touched nothing

    done = subprocess.run([sys.executable, "-m", "medseg.training.checkpointing", "convert", str(run / CHECKPOINT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ck.load_checkpoint(run / CHECKPOINT)["format"] == ck.CHECKPOINT_FORMAT
    assert ck.convert_checkpoint(run / CHECKPOINT) == run / CHECKPOINT  # a second conversion is a no-op

    train(mini, run, cfg, resume=True, progress=False)
    straight = tmp_path / "straight"
    train(mini, straight, cfg, progress=False)
    a, b = ck.load_checkpoint(straight / CHECKPOINT), ck.load_checkpoint(run / CHECKPOINT)
    assert a["epoch"] == b["epoch"] == 1
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]  # timings differ, losses must not
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"resumed weights differ from an uninterrupted run: {different[:3]}"


def test_convert_refuses_a_file_that_is_not_a_medseg_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedsegError, match="cannot read the checkpoint"):
        ck.convert_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": 1, "weights": np.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(MedsegError, match="not a format-2 medseg checkpoint"):
        ck.convert_checkpoint(tmp_path / "other.pt")
