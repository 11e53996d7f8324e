"""Distributed data-parallel training: sharding and launch helpers, and a real 2-process gloo job started
with torchrun on 127.0.0.1 (``run_train(..., nproc_per_node=2)``) on the mini dataset of
tests/test_training_loop.py: both ranks end with identical weights and the loss is finite.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.training import ddp
from medseg.training.trainer import CHECKPOINT, TrainConfig
from tests.test_training_loop import MINI, build_mini_preprocessed

# two processes on the shared cores: one thread each (num_threads 0 → cores // processes per node)
DDP = {**MINI, "num_threads": 0, "lr_schedule": "constant", "deterministic": True}


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mini_preprocessed(tmp_path_factory.mktemp("mini_ddp") / "pre")


def _two(rank: int) -> ddp.DistContext:
    return ddp.DistContext(rank=rank, local_rank=rank, world_size=2, backend="gloo")


# --------------------------------------------------------------------------- helpers (no processes)
def test_shard_is_distributed_sampler_like() -> None:
    items = list(range(7))
    for epoch in (0, 1):
        a, b = ddp.shard(items, _two(0), epoch, seed=3), ddp.shard(items, _two(1), epoch, seed=3)
        assert len(a) == len(b) == 4  # padded to a multiple of the world size
        assert set(a) | set(b) == set(items)
        assert len(set(a) & set(b)) <= 1  # only the padding repeats
    assert ddp.shard(items, _two(0), 0, 3) != ddp.shard(items, _two(0), 1, 3)  # reshuffled per epoch
    assert ddp.shard(items, _two(0), 1, 3) == ddp.shard(items, _two(0), 1, 3)  # a function of (seed, epoch, rank)
    assert ddp.shard(items, ddp.DistContext(), 5, 3) == items  # one process: everything, in order
    assert ddp.split_evenly(items, _two(0)) + ddp.split_evenly(items, _two(1)) == [0, 2, 4, 6, 1, 3, 5]


def test_epoch_seeds_differ_per_rank_and_epoch() -> None:
    seeds = {ddp.epoch_seed(0, e, r) for e in range(3) for r in range(2)}
    assert len(seeds) == 6 and ddp.epoch_seed(0, 1, 1) == ddp.epoch_seed(0, 1, 1)


def test_single_process_collectives_are_identity() -> None:
    ctx = ddp.DistContext()
    assert ddp.all_reduce_sum([1.0, 2.5], ctx) == [1.0, 2.5]
    assert ddp.all_reduce_mean({"a": 3.0}, ctx) == {"a": 3.0}
    assert ddp.all_gather_object({"x": 1}, ctx) == [{"x": 1}] and ddp.broadcast_object(7, ctx) == 7
    state = {"w": torch.ones(2, 3), "b": torch.zeros(3, dtype=torch.int64)}
    assert ddp.check_in_sync(state, ctx) == [ddp.state_digest(state)]
    assert ddp.state_digest(state) != ddp.state_digest({**state, "w": torch.ones(2, 3) * 2})


def test_init_distributed_needs_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ddp.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert not ddp.init_distributed("cpu").enabled
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MedsegError, match="start distributed training with torchrun"):
        ddp.init_distributed("cpu")


def test_torchrun_command() -> None:
    one = ddp.torchrun_command(2, 1, env={})
    assert one[1:3] == ["-m", "torch.distributed.run"] and one[-2:] == ["-m", "medseg.training.ddp"]
    assert "127.0.0.1:0" in one and "--nproc-per-node" in one
    with pytest.raises(MedsegError, match="PyTorchJob"):
        ddp.torchrun_command(1, 2, env={})
    multi = ddp.torchrun_command(4, 2, env={"MASTER_ADDR": "medseg-train-master-0", "MASTER_PORT": "23456", "RANK": "1"})
    assert multi[multi.index("--node-rank") + 1] == "1" and multi[multi.index("--master-addr") + 1] == "medseg-train-master-0"


# --------------------------------------------------------------------------- a real 2-process job
@pytest.fixture(scope="module")
def ddp_run(mini: Path, tmp_path_factory: pytest.TempPathFactory):
    from medseg.training.stage import run_train

    out = tmp_path_factory.mktemp("ddp")
    cfg = TrainConfig(**DDP)
    return cfg, out, run_train(mini, out, cfg, tracking_uri=None, progress=False, nproc_per_node=2)


def test_two_gloo_ranks_end_with_identical_weights(ddp_run) -> None:
    cfg, out, result = ddp_run
    assert result.world_size == 2 and len(result.rank_weights_sha256) == 2
    assert result.rank_weights_sha256[0] == result.rank_weights_sha256[1]  # computed on each rank, gathered
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ddp.state_digest(ckpt["model"]) == result.weights_sha256
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # every rank's RNG state
    assert all(np.isfinite(h["train_loss"]) for h in result.history) and result.epochs_run == cfg.epochs
    assert schemas.ModelPackage.load(out / "model").training["world_size"] == 2  # written once, by rank 0


@pytest.mark.slow  # two more torchrun jobs (~25 s each on 2 shared cores)
def test_ddp_resume_matches_the_uninterrupted_job(mini: Path, tmp_path: Path, ddp_run) -> None:
    """Rank 0 reads the checkpoint and broadcasts it; each rank restores its own RNG state."""
    from medseg.training.stage import run_train

    cfg, _, straight = ddp_run
    run_train(mini, tmp_path, dataclasses.replace(cfg, epochs=1), progress=False, nproc_per_node=2)
    resumed = run_train(mini, tmp_path, cfg, resume=True, progress=False, nproc_per_node=2)  # constant LR: 1 + 1 epochs = 2 epochs
    assert resumed.weights_sha256 == straight.weights_sha256
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
