"""Distributed data-parallel training: process group, per-rank data sharding, reductions, launching.

One process per device (one per GPU; on CPU, processes sharing the cores), started by ``torchrun``:

- ``torchrun`` (or a Kubeflow ``PyTorchJob``) sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``
  and ``MASTER_PORT`` in every worker's environment. :func:`~medseg.training.trainer.train` reads them
  through :func:`distributed`: with ``WORLD_SIZE`` > 1 it joins the process group (NCCL on CUDA, gloo on
  CPU), wraps the network in ``DistributedDataParallel`` (gradients averaged over ranks in the backward
  pass, so every rank takes the same optimiser step), draws its patches from its own shard of the
  training cases (:func:`shard`, like ``DistributedSampler``), validates its share of the validation
  cases and all-reduces the metrics; only rank 0 logs, writes checkpoints and the model package.
- :func:`launch` starts ``torchrun`` itself for ``run_train(..., nproc_per_node=P, nnodes=N)`` (the CLI and
  the KFP train component), with this module as the worker entry point (``python -m medseg.training.ddp``).

How a cluster runs it:

- one pod, P GPUs: the run parameter ``train_gpus=P`` is both the train pod's GPU limit and the train
  component's ``gpus``, which runs torchrun with P workers on CUDA (NCCL) inside its container (rendezvous on
  127.0.0.1; :func:`medseg.pipeline.gpu.train_launch`); ``train_gpus=0`` trains on the CPU (gloo when the
  component's ``nproc_per_node`` > 1).
- N pods: the same container image as the N replicas of a ``PyTorchJob`` (Kubeflow Training Operator).
  The operator gives every pod ``MASTER_ADDR``/``MASTER_PORT`` (the master replica's service) and its
  index in ``RANK``; each pod runs ``medseg train ... --nnodes N --nproc-per-node P`` (or
  ``torchrun --nnodes N --nproc-per-node P --node-rank $RANK --master-addr $MASTER_ADDR
  --master-port $MASTER_PORT -m medseg.cli train ...``). Rank 0 alone reads and writes the checkpoint
  (on resume it broadcasts it to the other ranks) and writes the model package, so the output folder has
  to persist on the master replica's volume only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from medseg import schemas
from medseg.errors import MedsegError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: environment of a worker started by torchrun / a PyTorchJob
ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RESULT_FILE = schemas.DDP_RESULT_JSON


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. ``world_size`` 1: a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes on this node (torchrun sets ``LOCAL_WORLD_SIZE``): they share the node's CPU cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _wants_cuda(device_preference: str) -> bool:
    if device_preference == "auto":
        return torch.cuda.is_available()
    return device_preference.startswith("cuda")


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by the environment, or return a single-process context.

    Args:
        device_preference: ``auto`` | ``cpu`` | ``cuda`` (``TrainConfig.device``). With CUDA each rank
            takes ``cuda:LOCAL_RANK`` and the backend is NCCL; on CPU the backend is gloo.
        timeout_s: how long collectives wait for a missing rank before failing.

    Raises:
        MedsegError: ``WORLD_SIZE`` > 1 but the rendezvous variables are missing, or CUDA is asked for
            with fewer GPUs than local ranks.
    """
    if dist.is_available() and dist.is_initialized():  # the caller set it up: use it as it is
        backend = dist.get_backend()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), backend, device)
    world = env_world_size()
    if world <= 1:
        from medseg.inference.sliding_window import select_device

        return DistContext(device=select_device(device_preference))
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MedsegError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start distributed training with torchrun (or a PyTorchJob)")
    if not dist.is_available():
        raise MedsegError("this PyTorch build has no torch.distributed")
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if _wants_cuda(device_preference):
        if local_rank >= torch.cuda.device_count():
            raise MedsegError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): use nproc_per_node <= GPUs per node")
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(backend, init_method="env://", world_size=world, rank=rank, timeout=datetime.timedelta(seconds=timeout_s))
    log.debug("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    return DistContext(rank, local_rank, world, backend, device)


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_preference: str = "auto") -> Iterator[DistContext]:
    """:func:`init_distributed` for the duration of a ``with`` block; leaves the group it joined
    (a group the caller had set up already stays)."""
    owned = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(device_preference)
    try:
        yield ctx
    finally:
        if ctx.enabled and owned:
            cleanup()


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` (already on ``ctx.device``); the module itself
    when not distributed. DDP broadcasts rank 0's parameters and buffers at construction."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


# --------------------------------------------------------------------------- data sharding
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of rank ``rank``'s patch sampler in ``epoch``: a function of (seed, epoch, rank) only, so a
    resumed run draws the same patches and ranks draw different ones (``DistributedSampler.set_epoch``)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def shard(items: Sequence[T], ctx: DistContext, epoch: int, seed: int) -> list[T]:
    """This rank's share of ``items`` in ``epoch``, like ``DistributedSampler``: the items are shuffled
    with (seed, epoch) (the same permutation on every rank), padded by repetition to a multiple of the
    world size, and rank r takes every world_size-th item from r. One process: all items."""
    if not ctx.enabled:
        return list(items)
    if not items:
        return []
    order = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(len(items)).tolist()
    per_rank = -(-len(order) // ctx.world_size)
    order = (order * ctx.world_size)[: per_rank * ctx.world_size]
    return [items[i] for i in order[ctx.rank :: ctx.world_size]]


def split_evenly(items: Sequence[T], ctx: DistContext) -> list[T]:
    """Rank r's items r, r + world, …: every item exactly once over the ranks (validation, no padding)."""
    return list(items)[ctx.rank :: ctx.world_size] if ctx.enabled else list(items)


# --------------------------------------------------------------------------- collectives
def _reduce_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise sum over ranks (float64); the values themselves when not distributed."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean over ranks of each value (same keys on every rank)."""
    if not ctx.enabled:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    sums = all_reduce_sum([values[k] for k in keys], ctx)
    return {k: s / ctx.world_size for k, s in zip(keys, sums)}


def all_gather_object(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_reduce_device(ctx) if ctx.backend == "nccl" else None)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of a state_dict."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_in_sync(state: dict[str, torch.Tensor], ctx: DistContext) -> list[str]:
    """Digests of ``state`` on every rank; raises if the ranks' weights differ (a desynchronised job)."""
    digests = all_gather_object(state_digest(state), ctx)
    if len(set(digests)) > 1:
        raise MedsegError(f"the ranks' weights differ after training (digests {[d[:12] for d in digests]}): the job lost synchronisation")
    return digests


# --------------------------------------------------------------------------- launching
def in_torchrun_worker() -> bool:
    """True in a process started by torchrun (its workers get ``TORCHELASTIC_RUN_ID``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_command(nproc_per_node: int, nnodes: int = 1, env: dict[str, str] | None = None) -> list[str]:
    """The ``python -m torch.distributed.run`` arguments for this module's worker entry point.

    One node: a local c10d rendezvous on a free port of 127.0.0.1 (what ``--standalone`` does, on the loopback
    address only: nothing outside the pod or machine can join). Several nodes: static rendezvous at
    ``MASTER_ADDR:MASTER_PORT`` with this node's rank from ``NODE_RANK`` (or ``PET_NODE_RANK``, or
    ``RANK``, which a PyTorchJob sets to the pod's index).
    """
    env = dict(os.environ if env is None else env)
    if nproc_per_node < 1 or nnodes < 1:
        raise MedsegError(f"nproc_per_node and nnodes must be >= 1, got {nproc_per_node} and {nnodes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes)]
    if nnodes == 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", f"medseg-{uuid.uuid4().hex[:12]}"]
    else:
        node_rank = env.get("NODE_RANK", env.get("PET_NODE_RANK", env.get("RANK")))
        missing = [k for k, v in (("MASTER_ADDR", env.get("MASTER_ADDR")), ("MASTER_PORT", env.get("MASTER_PORT")), ("NODE_RANK", node_rank)) if v is None]
        if missing:
            raise MedsegError(f"nnodes={nnodes} needs the rendezvous address in the environment ({', '.join(missing)} missing): "
                              "run the image as the replicas of a PyTorchJob, which sets MASTER_ADDR, MASTER_PORT and RANK per pod")
        cmd += ["--node-rank", str(node_rank), "--master-addr", env["MASTER_ADDR"], "--master-port", env["MASTER_PORT"]]
    return cmd + ["-m", "medseg.training.ddp"]


def launch(spec: dict[str, Any], out_dir: Path, nproc_per_node: int, nnodes: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`~medseg.training.stage.run_train` in ``nproc_per_node`` × ``nnodes`` processes with torchrun.

    ``spec`` holds run_train's arguments as JSON (``preprocessed_dir``, ``cfg``, ``tracking_uri``, ``tags``,
    ``resume``, ``progress``); it is written to ``out_dir/ddp_spec.json``. Returns the result rank 0 wrote
    to ``out_dir/train_result.json`` (on other nodes than rank 0's: ``{}``).

    Raises:
        MedsegError: torchrun exits with an error (a worker failed).
    """
    from medseg.io import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_file = write_json(out_dir / schemas.DDP_SPEC_JSON, {**spec, "out_dir": str(out_dir)})
    (out_dir / RESULT_FILE).unlink(missing_ok=True)
    cmd = torchrun_command(nproc_per_node, nnodes, env) + ["--spec", str(spec_file)]
    run_env = dict(os.environ if env is None else env)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a PyTorchJob's pod-level values are torchrun's to set
        run_env.pop(key, None)
    run_env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc_per_node)))
    log.info("launching %d × %d training processes: %s", nnodes, nproc_per_node, " ".join(cmd))
    code = subprocess.call(cmd, env=run_env)
    if code != 0:
        raise MedsegError(f"distributed training failed (torchrun exit code {code}); the workers' logs are above")
    result_file = out_dir / RESULT_FILE
    return json.loads(result_file.read_text()) if result_file.is_file() else {}


def _worker_main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun worker: ``python -m medseg.training.ddp --spec ddp_spec.json``."""
    from medseg.io import read_json, write_json
    from medseg.training.stage import run_train
    from medseg.training.trainer import TrainConfig

    parser = argparse.ArgumentParser(prog="medseg.training.ddp", description="one worker of a distributed training (started by torchrun)")
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s rank{env_rank()} %(name)s: %(message)s")
    spec = read_json(args.spec)
    try:
        result = run_train(Path(spec["preprocessed_dir"]), Path(spec["out_dir"]), TrainConfig.from_dict(spec["cfg"]), tracking_uri=spec.get("tracking_uri"),
                           tags=spec.get("tags"), resume=bool(spec.get("resume", False)), progress=bool(spec.get("progress", True)))
    except MedsegError as exc:
        print(f"error (rank {env_rank()}): {exc}", file=sys.stderr)
        return 2
    if env_rank() == 0:
        write_json(Path(spec["out_dir"]) / RESULT_FILE, result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
