"""The training loop: patch-based, checkpointed every epoch, exactly resumable, CPU or CUDA, one process or DDP.

The run is split by concern: :mod:`medseg.training.config` (the hyperparameters), :mod:`medseg.training.setup`
(what is trained, from the dataset's task: network, loss, outputs, cases), :mod:`medseg.training.validation`
(validation and postprocessing), :mod:`medseg.training.checkpointing` (checkpoints and the model package) and
this module, the loop itself.

- Optimisers (``TrainConfig.optimizer``): ``sgd`` (Nesterov, momentum 0.99: nnU-Net's default) or ``adamw``;
  learning-rate schedule (``lr_schedule``) per epoch: ``poly`` lr·(1 − epoch/epochs)^0.9 (nnU-Net),
  ``cosine`` or ``constant``; weight decay; gradient-norm clipping (12, as nnU-Net).
- Precision (``precision``): ``auto`` is bf16 autocast on CUDA (fp16 + ``GradScaler`` where bf16 is not
  supported) and fp32 on CPU; ``bf16`` also runs on CPU (autocast); ``fp16`` needs CUDA. CUDA also gets
  the ``channels_last_3d`` layout and cuDNN autotuning; ``compile`` wraps the network in ``torch.compile``.
- Deterministic mode (``deterministic``): deterministic algorithms (strict on CPU), no cuDNN autotuning;
  together with the seeding below a run is bitwise repeatable on the same machine and thread count.
- Seeding: python, numpy and torch are seeded from ``seed`` once; the patch sampler is rebuilt every epoch
  with a seed derived from (seed, epoch, rank) (like ``DistributedSampler.set_epoch``), and batch i of the
  epoch is drawn from (that seed, i) alone (``sample_at``), so the data a rank sees does not depend on what
  happened before, nor on who draws it: the training thread, the loader thread or ``loader_workers`` processes.
- Every epoch ends with validation (Dice per reported group, or a classifier's balanced accuracy) and an
  atomic checkpoint; ``resume=True`` continues after the last complete epoch of a killed run and ends with the
  same weights as an uninterrupted run (deterministic mode, same thread count).
- Distributed (``torchrun``, see :mod:`medseg.training.ddp`): each rank samples from its shard of the
  training cases, validates its share of the validation cases; metrics are all-reduced; rank 0 alone logs,
  checkpoints and writes the model package.
- Loss weights that change over training (a ramped Hausdorff term) follow the epoch: the loss's ``set_epoch``
  is called at the start of every epoch.
- Cascade (``cascade_from``: a 3d_lowres model package): the run trains nnU-Net's 3d_cascade_fullres, the
  low-resolution stage's segmentation of each case (out-of-fold where the low-resolution folds allow) as
  extra one-hot input channels; the package carries the low-resolution package in ``previous_stage/``
  (:mod:`medseg.training.cascade`, :mod:`medseg.inference.cascade`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.networks import build_network
from medseg.task import Task
from medseg.training import ddp
from medseg.training.checkpointing import CHECKPOINT, CHECKPOINT_FORMAT, load_checkpoint, restore, rng_state, save_checkpoint, save_model_package
from medseg.training.config import LR_SCHEDULES, OPTIMIZERS, PRECISIONS, TrainConfig, TrainResult
from medseg.training.loader import LoaderPool
from medseg.training.sampler import PreprocessedCase, PrefetchSampler
from medseg.training.setup import (TrainingTarget, classification_target, classification_targets, make_sampler, make_volume_sampler, resolve_loss,
                                   segmentation_target, volume_cases)
from medseg.training.validation import (choose_postprocessing, classification_scores, classification_sums, postprocessing_from_pairs, validation_dice,
                                        validation_pairs, validation_sums)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- building blocks
def available_cores() -> int:
    """CPU cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0))


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms for the duration of a run; the process-wide settings are put back after.

    On CPU ``torch.use_deterministic_algorithms(True)`` is strict (an op without a deterministic
    implementation raises). On CUDA it warns instead, cuDNN is pinned to deterministic kernels and
    ``CUBLAS_WORKSPACE_CONFIG`` is set when missing (it only takes effect if set before CUDA starts:
    set it in the environment of the job). Without determinism CUDA runs autotune cuDNN (fixed patch size).
    """
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic, cudnn.benchmark)
    if enabled:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        cudnn.deterministic, cudnn.benchmark = True, False
    else:
        cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; ``None`` means fp32 (no autocast).

    Raises:
        MedsegError: an unknown name, fp16 off CUDA, or bf16 on a GPU without bf16 support.
    """
    if precision not in PRECISIONS:
        raise MedsegError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not cuda):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16":
        if not cuda:
            raise MedsegError("precision fp16 needs CUDA (its gradient scaler is CUDA's): use bf16 or fp32 on the CPU")
        return torch.float16
    if cuda and not torch.cuda.is_bf16_supported():
        raise MedsegError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support: use precision fp16 or auto")
    return torch.bfloat16


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (``cfg.momentum``) or AdamW, both with ``cfg.weight_decay``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    raise MedsegError(f"unknown optimizer {cfg.optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the initial learning rate in ``epoch`` (0-based) of ``epochs``.

    poly: (1 − epoch/epochs)^0.9 (nnU-Net); cosine: ½(1 + cos(π·epoch/epochs)); constant: 1.
    """
    return lr_factor_at(schedule, min(max(epoch, 0), epochs) / epochs)


def lr_factor_at(schedule: str, t: float) -> float:
    """Multiplier of the initial learning rate at training progress ``t`` in [0, 1] (epochs or budget spent)."""
    t = min(max(t, 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return 1.0
    raise MedsegError(f"unknown lr_schedule {schedule!r} (known: {', '.join(LR_SCHEDULES)})")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch :func:`lr_factor` schedule (stepped once at the end of each epoch); with a time budget
    (``cfg.time_budget_minutes``) the progress is the share of the budget spent when the step is taken."""
    schedule, epochs = cfg.lr_schedule, cfg.epochs
    budget_s, started = cfg.time_budget_minutes * 60.0, time.monotonic()

    def factor(epoch: int) -> float:  # a plain function: LambdaLR keeps it out of its state_dict
        if budget_s > 0:
            return lr_factor_at(schedule, (time.monotonic() - started) / budget_s)
        return lr_factor(schedule, epoch, epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- the loop
@dataclass
class _Engine:
    """The per-run objects of one process."""

    network: torch.nn.Module  # the plain module: state_dict, validation, checkpoints
    train_model: torch.nn.Module  # what the training step calls (DDP and/or compiled around ``network``)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    loss_fn: torch.nn.Module
    patch_size: tuple[int, ...] = ()  # what the network trains on and validates with (the topology's, else the plan's)


def _build_engine(cfg: TrainConfig, topology: dict[str, Any], ctx: ddp.DistContext, loss_fn: torch.nn.Module | None = None) -> _Engine:
    device = ctx.device
    amp_dtype = resolve_precision(cfg.precision, device)
    network = build_network(topology).to(device)
    # channels_last_3d speeds up 3D convolutions on CUDA (cuDNN NDHWC kernels, tensor cores under AMP); a network
    # with 2D convolutions (slice-wise) keeps the default layout, and the CPU gains nothing but copies
    conv3d_only = all(p.dim() != 4 for p in network.parameters())
    memory_format = torch.channels_last_3d if (cfg.channels_last and device.type == "cuda" and conv3d_only) else torch.contiguous_format
    if memory_format is not torch.contiguous_format:
        network = network.to(memory_format=memory_format)
    optimizer = build_optimizer(cfg, network.parameters())
    scheduler = build_scheduler(cfg, optimizer)
    # a loss scale is needed for fp16 only (bf16 has fp32's exponent range)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train_model = ddp.wrap(network, ctx)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return _Engine(network, train_model, optimizer, scheduler, scaler, amp_dtype, memory_format, loss_fn if loss_fn is not None else resolve_loss(cfg),
                   tuple(int(p) for p in topology.get("patch_size") or ()))


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A batch array as a tensor; loader workers hand pinned tensors, kept as they are so the copy to the GPU is
    asynchronous and the pinned block is held until that copy is done."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(array)


def _train_step(engine: _Engine, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, device: torch.device, grad_clip: float,
                ages: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step. ``labels``: N×1×… label maps (segmentation; region losses make their targets from
    them) or N×1 class indices; ``ages``: N years, a classifier's second input."""
    x = _as_tensor(images).to(device, non_blocking=True).contiguous(memory_format=engine.memory_format)
    y = _as_tensor(labels).to(device, non_blocking=True)
    extra = () if ages is None else (_as_tensor(ages).to(device, non_blocking=True),)
    engine.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=engine.amp_dtype, enabled=engine.amp_dtype is not None):
        out = engine.train_model(x, *extra)
    loss = _deep_supervision_loss(engine.loss_fn, out.float(), y)  # the loss in fp32: softmax and log are precision-sensitive
    engine.scaler.scale(loss).backward()
    if grad_clip > 0:
        engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), grad_clip)
    engine.scaler.step(engine.optimizer)
    engine.scaler.update()
    return loss.detach()


def train(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, resume: bool = False, on_epoch: Callable[[int, dict[str, float]], None] | None = None, progress: bool = True, write_package: bool = True,
          dataset_dir: Path | None = None) -> TrainResult:
    """Train one fold; writes ``out_dir/checkpoint_latest.pt`` every epoch and the model package to ``out_dir/model``.

    Args:
        preprocessed_dir: output of ``medseg preprocess`` (plans.json, splits.json, the cases).
        out_dir: the run's folder (checkpoint, model package).
        cfg: the hyperparameters.
        resume: continue after the last complete epoch in ``out_dir``'s checkpoint (a fresh start without one).
        on_epoch: ``on_epoch(epoch, metrics)`` after each epoch's validation and checkpoint (MLflow, Optuna);
            called on rank 0 only. It may raise (e.g. ``optuna.TrialPruned``) to stop the run: the exception
            propagates on rank 0, the other ranks stop too.
        progress: a progress bar (on a terminal) and a log line per epoch.
        write_package: write the model package (with postprocessing chosen on the validation cases).
        dataset_dir: the ingested dataset, for a classification dataset whose preprocessed folder holds no
            ``manifest.json`` (the per-case classes and ages are read from it).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this is one rank of a DDP job: see :mod:`medseg.training.ddp`.

    Raises:
        MedsegError: a missing fold, invalid settings, a non-finite training loss, an unreadable checkpoint.
    """
    preprocessed_dir, out_dir = Path(preprocessed_dir), Path(out_dir)
    plans = schemas.Plans.load(preprocessed_dir)
    splits = schemas.Splits.load(preprocessed_dir)
    task = Task.from_folder(preprocessed_dir)
    config = plans.configuration(cfg.configuration)
    if not 0 <= cfg.fold < len(splits.folds):
        raise MedsegError(f"fold {cfg.fold} does not exist (splits have {len(splits.folds)} folds)")
    fold = splits.folds[cfg.fold]
    folder = preprocessed_dir / cfg.configuration
    # configuration errors before any process group; ``cfg`` becomes what is trained (e.g. the classifier, the regions)
    train_cases: list[Any]
    val_cases: list[Any]
    if task.is_classification:
        cfg, target, topology = classification_target(cfg, task, plans, config)
        targets = classification_targets(preprocessed_dir, dataset_dir)
        train_cases, val_cases = volume_cases(folder, fold["train"], target, targets), volume_cases(folder, fold["val"], target, targets)
    else:
        cfg, target, topology = segmentation_target(cfg, task, config)
        train_cases = [PreprocessedCase(folder, c) for c in fold["train"]]
        val_cases = [PreprocessedCase(folder, c) for c in fold["val"][: cfg.max_val_cases]]
    if not train_cases:
        raise MedsegError(f"fold {cfg.fold} has no training cases", preprocessed_dir / schemas.SPLITS_JSON)
    if cfg.cascade_from:
        if task.is_classification:
            raise MedsegError("cascade_from trains a segmentation cascade; this is a classification dataset")
        from medseg.inference.cascade import foreground_labels
        from medseg.training.cascade import resolve_lowres_package

        resolve_lowres_package(cfg.cascade_from)  # fail early
        topology = {**topology, "in_channels": int(topology["in_channels"]) + len(foreground_labels(plans.labels))}
    loss_fn = resolve_loss(cfg)

    with ddp.distributed(cfg.device) as ctx, determinism(cfg.deterministic, ctx.device):
        torch.set_num_threads(cfg.num_threads or max(1, available_cores() // ddp.local_world_size()))
        previous = None
        if cfg.cascade_from:
            train_cases, val_cases, previous = _cascade_inputs(preprocessed_dir, cfg, fold, len(plans.channel_names), ctx, progress and ctx.is_main)
        return _train(preprocessed_dir, out_dir, cfg, plans, config, topology, loss_fn, train_cases, val_cases, ctx, resume, on_epoch, progress and ctx.is_main, write_package, target,
                      previous)


def _cascade_inputs(preprocessed_dir: Path, cfg: TrainConfig, fold: dict[str, list[str]], image_channels: int, ctx: ddp.DistContext,
                    progress: bool) -> tuple[list[Any], list[Any], tuple[dict[str, Any], Path]]:
    """A cascade's cases: rank 0 prepares the previous-stage maps (or reuses them), the other ranks wait for it;
    returns the training and validation cases and the package's ``previous_stage`` entry with the low-resolution package."""
    from medseg.training.cascade import cascade_cases, prepare_previous_stage, resolve_lowres_package

    failure = None
    if ctx.is_main:
        try:
            stage = prepare_previous_stage(preprocessed_dir, cfg.cascade_from, cfg.configuration, device=ctx.device, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = exc
    if ddp.broadcast_object(failure is not None, ctx):  # also the barrier: the maps exist once rank 0 answers
        if failure is not None:
            raise failure
        raise MedsegError("rank 0 could not prepare the cascade's previous-stage maps")
    if not ctx.is_main:  # reuses rank 0's maps (the folder must be shared); predicts nothing when they are there
        stage = prepare_previous_stage(preprocessed_dir, resolve_lowres_package(cfg.cascade_from), cfg.configuration, device=ctx.device, progress=False)
    train_cases = cascade_cases(preprocessed_dir, cfg.configuration, fold["train"], stage)
    val_cases = cascade_cases(preprocessed_dir, cfg.configuration, fold["val"][: cfg.max_val_cases], stage)
    return train_cases, val_cases, (stage.package_entry(image_channels), stage.package_dir)


def _train(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, plans: schemas.Plans, config: schemas.Configuration, topology: dict[str, Any],
           loss_fn: torch.nn.Module, train_cases: list[Any], val_cases: list[Any], ctx: ddp.DistContext, resume: bool, on_epoch: Callable[[int, dict[str, float]], None] | None, progress: bool,
           write_package: bool, task: TrainingTarget | None = None, previous: tuple[dict[str, Any], Path] | None = None) -> TrainResult:
    task = task or TrainingTarget()
    metric = task.metric
    device = ctx.device
    seed_everything(cfg.seed)
    engine = _build_engine(cfg, topology, ctx, loss_fn.to(device))
    if not engine.patch_size:
        engine.patch_size = tuple(int(p) for p in config.patch_size)
    patch = list(engine.patch_size)
    batch_size = cfg.batch_size or config.batch_size

    start_epoch, best, best_epoch, history = 0, -1.0, -1, []
    best_state: dict[str, torch.Tensor] | None = None
    ckpt_path = out_dir / CHECKPOINT
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        # rank 0 owns the checkpoint: it reads it and hands it to the other ranks (no shared volume needed)
        ckpt = ddp.broadcast_object(load_checkpoint(ckpt_path) if ctx.is_main and ckpt_path.exists() else None, ctx)
        if ckpt is not None:
            start_epoch, best, best_epoch, history, best_state = restore(ckpt, engine, cfg, ctx)
            if progress:
                log.info("resumed from %s after epoch %d/%d", ckpt_path, start_epoch, cfg.epochs)
        elif progress:
            log.info("no checkpoint in %s: starting from epoch 1", out_dir)

    step_times: list[float] = []
    stopped_by_main = False
    loop_started, budget_s = time.monotonic(), cfg.time_budget_minutes * 60.0
    # loader processes live for the whole run (spawning one costs a torch import); closed however the loop ends
    with contextlib.ExitStack() as stack:
        # pinned batches only help a copy to a GPU
        pool = (stack.enter_context(LoaderPool(cfg.loader_workers, max(cfg.loader_prefetch, 1), pin_memory=device.type == "cuda"))
                if cfg.loader_workers > 0 and start_epoch < cfg.epochs else None)
        for epoch in range(start_epoch, cfg.epochs):
            metrics = _run_epoch(engine, cfg, epoch, train_cases, val_cases, plans, config, batch_size, ctx, progress, step_times, task, pool)
            history.append({"epoch": epoch, **metrics})
            if best_state is None or not math.isfinite(best) or metrics[metric] > best:  # no validation cases: the last epoch
                best, best_epoch = metrics[metric], epoch
                best_state = {k: v.detach().cpu().clone() for k, v in engine.network.state_dict().items()} if ctx.is_main else {}
            if progress and task.output == "classes":
                log.info("epoch %d/%s: loss %.4f  val accuracy %.3f  balanced accuracy %.3f  val loss %.4f  best %.3f @ epoch %d  lr %.2e  %.1f s (data wait %.0f%%)",
                         epoch + 1, _of_total(cfg, loop_started), metrics["train_loss"], metrics["val_accuracy"], metrics["val_balanced_accuracy"], metrics["val_loss"], best, best_epoch + 1,
                         metrics["lr"], metrics["epoch_seconds"], 100 * metrics["data_wait_share"])
            elif progress:
                val_text = " ".join(f"{k[len('val_dice_'):]} {v:.3f}" for k, v in metrics.items() if k.startswith("val_dice_") and k != "val_dice_mean")
                log.info("epoch %d/%s: loss %.4f  val dice %.4f (%s)  best %.4f @ epoch %d  lr %.2e  %.1f s (data wait %.0f%%)", epoch + 1, _of_total(cfg, loop_started),
                         metrics["train_loss"], metrics["val_dice_mean"], val_text, best, best_epoch + 1, metrics["lr"], metrics["epoch_seconds"], 100 * metrics["data_wait_share"])
            rng_states = ddp.all_gather_object(rng_state(device), ctx)
            if ctx.is_main:
                save_checkpoint(out_dir / CHECKPOINT, {
                    "format": CHECKPOINT_FORMAT, "model": engine.network.state_dict(), "optimizer": engine.optimizer.state_dict(),
                    "scheduler": engine.scheduler.state_dict(), "scaler": engine.scaler.state_dict(), "epoch": epoch, "best": best,
                    "best_epoch": best_epoch, "history": history, "best_state": best_state, "rng": rng_states, "world_size": ctx.world_size,
                    "config": dataclasses.asdict(cfg), "medseg_version": medseg.__version__,
                })
            stop: BaseException | None = None
            if on_epoch is not None and ctx.is_main:
                try:
                    on_epoch(epoch, metrics)
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                    stop = exc
            if ddp.broadcast_object(stop is not None, ctx):  # every rank learns whether rank 0's callback stopped the run
                if stop is not None:
                    raise stop
                stopped_by_main = True
                break
            if budget_s > 0 and _budget_spent(loop_started, budget_s, epoch + 1 - start_epoch, ctx):
                if progress:
                    log.info("time budget of %.1f min: stopping after epoch %d (the next would not fit)", cfg.time_budget_minutes, epoch + 1)
                break

    final_state = engine.network.state_dict()
    digests = ddp.check_in_sync(final_state, ctx) if not stopped_by_main else [ddp.state_digest(final_state)]
    result = TrainResult(best_val_dice=float(best), best_epoch=best_epoch, epochs_run=len(history), history=history,
                         seconds_per_step=float(np.median(step_times)) if step_times else 0.0, weights_sha256=digests[ctx.rank if len(digests) > 1 else 0],
                         world_size=ctx.world_size, rank_weights_sha256=digests, metric=metric)
    if write_package and ctx.is_main and best_state:
        score = {"best_val_dice": result.best_val_dice} if task.output != "classes" else {"best_val_balanced_accuracy": result.best_val_dice}
        training = {"config": dataclasses.asdict(cfg), **score, "val_metric": metric, "best_epoch": best_epoch, "epochs_run": result.epochs_run,
                    "seconds_per_step": result.seconds_per_step, "device": str(device), "world_size": ctx.world_size,
                    "precision": str(engine.amp_dtype or torch.float32).replace("torch.", ""), "history": history}
        post = {} if task.output == "classes" else choose_postprocessing(engine.network, best_state, val_cases, plans, patch, list(config.spacing),
                                                                         cfg.val_overlap, device, task.regions or None, task.task)
        if post and progress:
            log.info("postprocessing chosen on %d validation case(s): minimum volumes %s mm³ (%s %.4f → %.4f)", post["validation_cases"],
                     post["min_volume_mm3"] or "none", post["metric"], post["score_before"], post["score_after"])
        result.model_dir = save_model_package(out_dir / "model", best_state, preprocessed_dir, cfg.configuration, training, postprocessing=post, network=topology,
                                              previous_stage=previous[0] if previous else None, previous_stage_dir=previous[1] if previous else None)
    return result


def _of_total(cfg: TrainConfig, started: float) -> str:
    """How a log line names the end of the run: the epoch count, or the time budget and how much of it is spent."""
    if cfg.time_budget_minutes > 0:
        return f"budget ({(time.monotonic() - started) / 60:.1f} of {cfg.time_budget_minutes:g} min)"
    return str(cfg.epochs)


def _budget_spent(started: float, budget_s: float, epochs_done: int, ctx: ddp.DistContext) -> bool:
    """Whether another epoch of the mean length so far would overrun the time budget; rank 0 decides for every rank
    (their clocks differ)."""
    elapsed = time.monotonic() - started
    return bool(ddp.broadcast_object(elapsed + elapsed / max(epochs_done, 1) > budget_s, ctx))


def _run_epoch(engine: _Engine, cfg: TrainConfig, epoch: int, train_cases: list[Any], val_cases: list[Any], plans: schemas.Plans,
               config: schemas.Configuration, batch_size: int, ctx: ddp.DistContext, progress: bool, step_times: list[float], task: TrainingTarget | None = None,
               pool: LoaderPool | None = None) -> dict[str, float]:
    """One epoch on this rank: training steps, validation, metrics reduced over the ranks. ``pool``: loader
    workers drawing the batches (else the loader thread, or the training thread with ``loader_prefetch`` 0).
    Whoever draws them, batch i is the sampler's ``sample_at(i)``: the same batches for every loader setting."""
    task = task or TrainingTarget()
    device = ctx.device
    lr = float(engine.optimizer.param_groups[0]["lr"])
    set_epoch = getattr(engine.loss_fn, "set_epoch", None)
    if callable(set_epoch):  # a loss whose weights follow training progress (the ramped Hausdorff term)
        set_epoch(epoch, cfg.epochs)
    sampler: Any
    if pool is not None:  # batches prepared by loader processes while the network trains (maybe since the last validation)
        sampler = pool.ahead.pop(epoch, None) or pool.epoch(_epoch_sampler(engine, cfg, epoch, train_cases, batch_size, ctx, task), cfg.iterations_per_epoch)
    elif cfg.loader_prefetch > 0:  # batches prepared by a loader thread while the network trains
        sampler = PrefetchSampler(_epoch_sampler(engine, cfg, epoch, train_cases, batch_size, ctx, task), cfg.iterations_per_epoch, cfg.loader_prefetch)
    else:
        sampler = _InOrder(_epoch_sampler(engine, cfg, epoch, train_cases, batch_size, ctx, task))
    engine.train_model.train()
    # summed on the device (no synchronisation per step); non-finite losses are counted apart: with fp16 the
    # scaler skips those steps, in fp32/bf16 they would poison the weights
    loss_sum, n_bad, data_wait = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device), 0.0
    t_epoch = time.perf_counter()
    # a live bar on a terminal only: in pipeline logs each redraw would become a line
    bar = tqdm(range(cfg.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or not sys.stderr.isatty(), leave=False)
    for _ in bar:
        t0 = time.perf_counter()
        batch = sampler.sample()
        t1 = time.perf_counter()
        data_wait += t1 - t0
        loss = _train_step(engine, batch[0], batch[1], device, cfg.grad_clip, batch[2] if len(batch) > 2 else None)
        finite = torch.isfinite(loss)
        loss_sum += torch.where(finite, loss.double(), 0.0)
        n_bad += (~finite).long()
        step_times.append(time.perf_counter() - t1)
        if not bar.disable:
            bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.2e}")
    close = getattr(sampler, "close", None)
    if callable(close):
        close()
    if pool is not None and epoch + 1 < cfg.epochs:
        # the workers would idle through validation: they start on the next epoch, whose batches depend on
        # (seed, epoch + 1, rank) only (dropped unclaimed if the run stops after this epoch)
        pool.ahead[epoch + 1] = pool.epoch(_epoch_sampler(engine, cfg, epoch + 1, train_cases, batch_size, ctx, task), cfg.iterations_per_epoch)
    engine.scheduler.step()
    train_s = time.perf_counter() - t_epoch

    t_val = time.perf_counter()
    mine = ddp.split_evenly(val_cases, ctx)
    if task.output == "classes":
        sums = classification_sums(engine.network, mine, task, device)
    else:
        sums = validation_sums(engine.network, mine, plans, list(engine.patch_size), cfg.val_overlap, device, task.regions or None,
                               task.task.reported_groups if task.task is not None else None)
    names = sorted(sums)
    totals = ddp.all_reduce_sum([sums[n] for n in names] + [len(mine)], ctx)
    n_val = totals[-1]
    if task.output == "classes":
        val_metrics = classification_scores(dict(zip(names, totals)), len(task.classes), n_val)
    else:
        val = {n: totals[i] / n_val for i, n in enumerate(names)} if n_val else {}
        val_metrics = {"val_dice_mean": float(np.mean(list(val.values()))) if val else float("nan"), **{f"val_dice_{k}": float(v) for k, v in val.items()}}
    val_s = time.perf_counter() - t_val

    bad = int(n_bad)
    local = {"train_loss": float(loss_sum) / max(cfg.iterations_per_epoch - bad, 1), "data_wait_share": data_wait / max(train_s, 1e-9),
             "train_seconds": train_s, "val_seconds": val_s, "non_finite_steps": float(bad)}
    reduced = ddp.all_reduce_mean(local, ctx)
    if reduced["non_finite_steps"] and (not engine.scaler.is_enabled() or reduced["non_finite_steps"] >= cfg.iterations_per_epoch):
        raise MedsegError(f"the training loss was NaN/Inf in {reduced['non_finite_steps']:.0f} of {cfg.iterations_per_epoch} steps of epoch {epoch + 1}: "
                          "lower the learning rate, or use precision fp32")
    return {"train_loss": reduced["train_loss"], **val_metrics, "lr": lr, "epoch_seconds": reduced["train_seconds"] + reduced["val_seconds"],
            "train_seconds": reduced["train_seconds"], "val_seconds": reduced["val_seconds"], "data_wait_share": reduced["data_wait_share"]}


def _epoch_sampler(engine: _Engine, cfg: TrainConfig, epoch: int, train_cases: list[Any], batch_size: int, ctx: ddp.DistContext, task: TrainingTarget) -> Any:
    """This rank's sampler for ``epoch``: its shard of the cases and its seed are functions of (seed, epoch, rank) only."""
    shard, seed = ddp.shard(train_cases, ctx, epoch, cfg.seed), ddp.epoch_seed(cfg.seed, epoch, ctx.rank)
    if task.output == "classes":
        return make_volume_sampler(shard, task, batch_size, cfg, seed)
    return make_sampler(shard, list(engine.patch_size), batch_size, cfg, seed)


class _InOrder:
    """Batches drawn in the training thread, by index (``sample_at``) like the loader thread and workers do."""

    def __init__(self, sampler: Any):
        self._sampler, self._next = sampler, 0

    def sample(self) -> tuple:
        draw = getattr(self._sampler, "sample_at", None)
        batch = draw(self._next) if callable(draw) else self._sampler.sample()
        self._next += 1
        return batch


def _deep_supervision_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain loss, or for deep supervision (N×S×K×…) a weighted sum over scales, weights halving per scale."""
    if out.ndim == y.ndim + 1:
        weights = [0.5**i for i in range(out.shape[1])]
        norm = sum(weights)
        return sum(w / norm * loss_fn(out[:, i], y) for i, w in enumerate(weights))
    return loss_fn(out, y)


__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS", "TrainConfig", "TrainResult", "available_cores", "build_optimizer",
           "build_scheduler", "choose_postprocessing", "classification_scores", "classification_sums", "classification_targets", "determinism", "load_checkpoint",
           "lr_factor", "postprocessing_from_pairs", "resolve_loss", "resolve_precision", "save_model_package", "seed_everything", "train", "validation_dice",
           "validation_pairs", "validation_sums"]
