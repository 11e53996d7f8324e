"""The training loop: patch-based, checkpointed every epoch, resumable, CPU or CUDA.

- Optimisers: AdamW (default on CPU: converges in few iterations) or SGD with Nesterov momentum 0.99
  and poly learning-rate decay (nnU-Net's default).
- CUDA: mixed precision (bf16, or fp16 with a GradScaler) and channels_last_3d. CPU: fp32.
- Every epoch ends with validation Dice (sliding window on the fold's validation cases, on the
  preprocessed grid, mean over regions) and an atomic checkpoint (model, optimiser, scheduler, scaler,
  RNG states, epoch, best metric), so ``resume=True`` continues where a killed run stopped.
- The best epoch's weights are written as a model package (``weights.pt`` state_dict + plans +
  dataset.json + model_package.json).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.sliding_window import autocast, predict_probabilities, select_device
from medseg.io import atomic_path
from medseg.training.losses import build_loss
from medseg.training.network import build_network, channels_last
from medseg.training.sampler import PatchSampler, PreprocessedCase

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_latest.pt"


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (``params.yaml`` → ``train``; tuned ones come from Optuna)."""

    epochs: int = 10
    iterations_per_epoch: int = 50
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"  # adamw | sgd
    loss: str = "dice_ce"
    foreground_share: float = 1 / 3
    batch_size: int = 0  # 0: the plan's
    configuration: str = "3d_fullres"
    fold: int = 0
    seed: int = 0
    grad_clip: float = 12.0
    val_overlap: float = 0.25
    max_val_cases: int = 8
    deterministic: bool = False
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MedsegError(f"unknown training parameter(s) {sorted(unknown)} (known: {sorted(names)})")
        # KFP passes dict parameters as protobuf Structs, where every number is a float: coerce by field type
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        casts = {"int": _as_int, "float": float, "bool": _as_bool, "str": str}
        try:
            return cls(**{k: casts[kinds[k]](v) if kinds[k] in casts else v for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise MedsegError(f"invalid training parameter: {exc}") from None


def _as_int(value: Any) -> int:
    if float(value) != int(float(value)):
        raise ValueError(f"{value!r} is not a whole number")
    return int(float(value))


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{value!r} is not true/false")
    return bool(value)


@dataclass
class TrainResult:
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    model_dir: Path | None = None
    seconds_per_step: float = 0.0


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def validation_dice(network: torch.nn.Module, cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], overlap: float, device: torch.device) -> dict[str, float]:
    """Mean Dice per region (or per label when the dataset has no regions) on the preprocessed grid."""
    groups = plans.reported_groups
    sums = {name: 0.0 for name in groups}
    for case in cases:
        probs = predict_probabilities(network, np.asarray(case.data), patch_size, overlap=overlap, device=device)
        pred = np.argmax(probs, axis=0)
        ref = np.asarray(case.seg)
        for name, values in groups.items():
            p, r = np.isin(pred, values), np.isin(ref, values)
            denom = p.sum() + r.sum()
            sums[name] += 1.0 if denom == 0 else 2.0 * np.logical_and(p, r).sum() / denom
    return {name: s / max(len(cases), 1) for name, s in sums.items()}


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    raise MedsegError(f"unknown optimizer {cfg.optimizer!r} (known: adamw, sgd)")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def choose_postprocessing(network: torch.nn.Module, state: dict[str, torch.Tensor], cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], spacing: list[float], overlap: float, device: torch.device) -> dict[str, Any]:
    """Minimum component volume per label, chosen on the validation cases (preprocessed grid, mm³ so it
    carries over to any grid). Scored by BraTS 2023 lesion-wise Dice for BraTS data, else by Dice."""
    from medseg.evaluation.lesionwise import lesionwise_case
    from medseg.evaluation.metrics import dice
    from medseg.inference.postprocess import choose_min_volumes

    if not cases:
        return {}
    network.load_state_dict(state)
    pairs = [(np.argmax(predict_probabilities(network, np.asarray(c.data), patch_size, overlap=overlap, device=device), axis=0).astype(np.uint8),
              np.asarray(c.seg).astype(np.uint8)) for c in cases]
    groups = plans.reported_groups
    brats = {k: int(v) for k, v in plans.labels.items()} == schemas.BRATS_LABELS and {k: sorted(v) for k, v in plans.regions.items()} == schemas.BRATS_REGIONS
    if brats:
        metric = "lesionwise_dice_2023"

        def score(pred: np.ndarray, ref: np.ndarray) -> float:
            per_region = lesionwise_case(pred, ref, spacing, "brats2023")
            return float(np.mean([v["lesionwise_dice_2023"] for v in per_region.values()]))
    else:
        metric = "dice"

        def score(pred: np.ndarray, ref: np.ndarray) -> float:
            return float(np.mean([dice(np.isin(pred, vals), np.isin(ref, vals)) for vals in groups.values()]))

    labels = sorted(v for v in plans.labels.values() if v != 0)
    chosen, before, after = choose_min_volumes(pairs, spacing, labels, score)
    return {"min_volume_mm3": chosen, "metric": metric, "validation_cases": len(pairs), "score_before": before, "score_after": after}


def save_model_package(model_dir: Path, state_dict: dict[str, torch.Tensor], preprocessed_dir: Path, configuration: str, training: dict[str, Any], lineage: dict[str, str] | None = None, postprocessing: dict[str, Any] | None = None) -> Path:
    """Write the model package folder (the contract the registry and the server load)."""
    from medseg.io import atomic_dir

    plans = schemas.Plans.load(preprocessed_dir)
    with atomic_dir(model_dir) as tmp:
        with open(tmp / schemas.WEIGHTS_FILE, "wb") as fh:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, fh)
        shutil.copy2(preprocessed_dir / schemas.PLANS_JSON, tmp / schemas.PLANS_JSON)
        shutil.copy2(preprocessed_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        schemas.ModelPackage(
            configuration=configuration, network=plans.configuration(configuration).network,
            medseg_version=medseg.__version__, training=training, lineage=dict(lineage or {}), postprocessing=dict(postprocessing or {}),
        ).save(tmp)
    return model_dir


def train(preprocessed_dir: Path, out_dir: Path, cfg: TrainConfig, resume: bool = False, on_epoch: Callable[[int, dict[str, float]], None] | None = None, progress: bool = True, write_package: bool = True) -> TrainResult:
    """Train one fold; ``on_epoch(epoch, metrics)`` is called after each validation (MLflow, Optuna).

    ``on_epoch`` may raise (e.g. ``optuna.TrialPruned``) to stop the run early.
    """
    preprocessed_dir, out_dir = Path(preprocessed_dir), Path(out_dir)
    plans = schemas.Plans.load(preprocessed_dir)
    splits = schemas.Splits.load(preprocessed_dir)
    config = plans.configuration(cfg.configuration)
    if not 0 <= cfg.fold < len(splits.folds):
        raise MedsegError(f"fold {cfg.fold} does not exist (splits have {len(splits.folds)} folds)")
    fold = splits.folds[cfg.fold]
    folder = preprocessed_dir / cfg.configuration
    train_cases = [PreprocessedCase(folder, c) for c in fold["train"]]
    val_cases = [PreprocessedCase(folder, c) for c in fold["val"][: cfg.max_val_cases]]
    seed_everything(cfg.seed, cfg.deterministic)
    device = select_device(cfg.device)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (container CPU set)

    network = channels_last(build_network(config.network).to(device), device)
    optimizer = _optimizer(cfg, network.parameters())
    total_steps = cfg.epochs * cfg.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - min(step, total_steps - 1) / total_steps) ** 0.9)
    use_fp16_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16_scaler)
    loss_fn = build_loss(cfg.loss)
    sampler = PatchSampler(train_cases, config.patch_size, cfg.batch_size or config.batch_size, cfg.foreground_share, seed=cfg.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    start_epoch, best, best_epoch, history = 0, -1.0, -1, []
    best_state: dict[str, torch.Tensor] | None = None
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.exists():
        # our own checkpoint: it holds numpy RNG state, which weights_only loading refuses
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        network.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, best_epoch, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["best_epoch"], ckpt["history"]
        best_state = ckpt.get("best_state")
        sampler.rng.bit_generator.state = ckpt["sampler_rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)

    step_times: list[float] = []
    for epoch in range(start_epoch, cfg.epochs):
        network.train()
        losses, data_wait = [], 0.0
        t_epoch = time.perf_counter()
        # a live bar on a terminal only: in pipeline logs each redraw would become a line
        bar = tqdm(range(cfg.iterations_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or not sys.stderr.isatty(), leave=False)
        for _ in bar:
            t0 = time.perf_counter()
            images, labels = sampler.sample()
            x = torch.from_numpy(images).to(device, non_blocking=True)
            y = torch.from_numpy(labels).to(device, non_blocking=True)
            t1 = time.perf_counter()
            data_wait += t1 - t0
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                out = network(x)
                loss = _deep_supervision_loss(loss_fn, out, y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            step_times.append(time.perf_counter() - t1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        epoch_s = time.perf_counter() - t_epoch
        val = {k: float(v) for k, v in validation_dice(network, val_cases, plans, config.patch_size, cfg.val_overlap, device).items()} if val_cases else {}
        val_mean = float(np.mean(list(val.values()))) if val else float("nan")
        metrics = {"train_loss": float(np.mean(losses)), "val_dice_mean": val_mean, **{f"val_dice_{k}": v for k, v in val.items()},
                   "lr": float(scheduler.get_last_lr()[0]), "data_wait_share": data_wait / max(epoch_s, 1e-9), "epoch_seconds": epoch_s}
        history.append({"epoch": epoch, **metrics})
        if val_mean > best or best_state is None:
            best, best_epoch = val_mean, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        if progress:
            log.info("epoch %d/%d: loss %.4f  val dice %.4f (%s)  best %.4f @ epoch %d  %.0fs", epoch + 1, cfg.epochs, metrics["train_loss"], val_mean,
                     " ".join(f"{k} {v:.3f}" for k, v in val.items()), best, best_epoch + 1, epoch_s)
        _save_checkpoint(ckpt_path, {
            "model": network.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch, "history": history,
            "best_state": best_state, "sampler_rng": sampler.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "config": dataclasses.asdict(cfg),
        })
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    result = TrainResult(best_val_dice=float(best), best_epoch=best_epoch, epochs_run=len(history), history=history,
                         seconds_per_step=float(np.median(step_times)) if step_times else 0.0)
    if write_package and best_state is not None:
        training = {"config": dataclasses.asdict(cfg), "best_val_dice": result.best_val_dice, "best_epoch": best_epoch,
                    "epochs_run": result.epochs_run, "seconds_per_step": result.seconds_per_step, "device": str(device)}
        post = choose_postprocessing(network, best_state, val_cases, plans, config.patch_size, list(config.spacing), cfg.val_overlap, device)
        if post and progress:
            log.info("postprocessing chosen on %d validation case(s): minimum volumes %s mm³ (%s %.4f → %.4f)", post["validation_cases"],
                     post["min_volume_mm3"] or "none", post["metric"], post["score_before"], post["score_after"])
        result.model_dir = save_model_package(out_dir / "model", best_state, preprocessed_dir, cfg.configuration, training, postprocessing=post)
    return result


def _deep_supervision_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain loss, or for deep supervision (N×S×K×…) a weighted sum over scales, weights halving per scale."""
    if out.ndim == y.ndim + 1:
        weights = [0.5**i for i in range(out.shape[1])]
        norm = sum(weights)
        return sum(w / norm * loss_fn(out[:, i], y) for i, w in enumerate(weights))
    return loss_fn(out, y)

