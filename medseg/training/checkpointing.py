"""Checkpoints and model packages: what a run leaves on disk, written atomically.

``checkpoint_latest.pt`` (every epoch): model, optimiser, scheduler, scaler, every rank's python/numpy/torch
(/CUDA) RNG state, epoch, best metric and weights, history: enough to resume a killed run after its last complete
epoch and end with the same weights as an uninterrupted one. The model package (``weights.pt`` state_dict +
``plans.json`` + ``dataset.json`` + ``model_package.json``) is what evaluation, the registry and the server load; it
also carries the run's per-epoch history (``model_package.json`` ``training.history``) drawn as ``training_curves.png``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import atomic_dir, atomic_path, write_bytes
from medseg.training import ddp
from medseg.training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT = schemas.CHECKPOINT_FILE
CHECKPOINT_FORMAT = 2


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a temporary file beside ``path``, flushed to disk, renamed over it (a kill leaves the old one)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Our own checkpoint file (it holds numpy RNG states, which ``weights_only`` loading refuses)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MedsegError(f"cannot read the checkpoint ({str(exc).splitlines()[0][:200]})", path) from None


def restore(ckpt: dict[str, Any], engine: Any, cfg: TrainConfig, ctx: ddp.DistContext) -> tuple[int, float, int, list[dict[str, float]], dict[str, torch.Tensor] | None]:
    """Load a checkpoint into the engine (network, optimizer, scheduler, scaler) and this rank's RNGs; returns (next epoch, best, best epoch, history, best state)."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedsegError(f"checkpoint format {ckpt.get('format', 1)} is not this version's ({CHECKPOINT_FORMAT}): start without --resume")
    changed = {k: (v, getattr(cfg, k)) for k, v in ckpt.get("config", {}).items() if hasattr(cfg, k) and getattr(cfg, k) != v and k not in ("device", "num_threads")}
    if changed and ctx.is_main:
        log.warning("resuming with changed settings %s: the run will not match an uninterrupted one", {k: f"{a!r} → {b!r}" for k, (a, b) in changed.items()})
    engine.network.load_state_dict(ckpt["model"])
    engine.optimizer.load_state_dict(ckpt["optimizer"])
    engine.scheduler.load_state_dict(ckpt["scheduler"])
    engine.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if ckpt.get("world_size", 1) != ctx.world_size and ctx.is_main:
        log.warning("checkpoint of %d process(es) resumed with %d: random states are not per rank any more", ckpt.get("world_size", 1), ctx.world_size)
    set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0], ctx.device)
    return int(ckpt["epoch"]) + 1, float(ckpt["best"]), int(ckpt["best_epoch"]), list(ckpt["history"]), ckpt.get("best_state") or None


def write_training_curves(model_dir: Path, training: dict[str, Any], histories: dict[str, list[dict[str, float]]] | None = None,
                          best_epochs: dict[str, int] | None = None) -> Path:
    """Write ``training_curves.png`` into ``model_dir``: loss and validation scores per epoch of ``training["history"]``,
    its best epoch marked, or of ``histories`` (run label → history, with ``best_epochs``: an ensemble's folds).
    ``training`` also gives the score that picks the best epoch (``val_metric``) and the title (network, configuration)."""
    from medseg.visualize import training_curves_png

    if histories is None:
        histories = {"": list(training.get("history") or [])}
        best_epochs = {"": int(training["best_epoch"])} if isinstance(training.get("best_epoch"), int) else {}
    config = training.get("config") or {}
    single_fold = f"fold {config['fold']}" if "fold" in config and len(histories) == 1 else None
    title = " · ".join(str(v) for v in (config.get("network"), config.get("configuration"), single_fold) if v)
    png = training_curves_png(histories, str(training.get("val_metric") or ""), best_epochs, title)
    return write_bytes(Path(model_dir) / schemas.TRAINING_CURVES_PNG, png)


def save_model_package(model_dir: Path, state_dict: dict[str, torch.Tensor], preprocessed_dir: Path, configuration: str, training: dict[str, Any], lineage: dict[str, str] | None = None,
                       postprocessing: dict[str, Any] | None = None, network: dict[str, Any] | None = None, previous_stage: dict[str, Any] | None = None,
                       previous_stage_dir: Path | None = None) -> Path:
    """Write the model package folder (the contract the registry and the server load) atomically. ``network``: the
    resolved topology the weights belong to (default: the plan's). ``previous_stage`` (a cascade's entry,
    :mod:`medseg.inference.cascade`) with ``previous_stage_dir``: the low-resolution package, copied in."""
    plans = schemas.Plans.load(preprocessed_dir)
    with atomic_dir(model_dir) as tmp:
        with open(tmp / schemas.WEIGHTS_FILE, "wb") as fh:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, fh)
        shutil.copy2(preprocessed_dir / schemas.PLANS_JSON, tmp / schemas.PLANS_JSON)
        shutil.copy2(preprocessed_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        if (preprocessed_dir / schemas.FINGERPRINT_JSON).is_file():  # the model server's input-drift reference
            shutil.copy2(preprocessed_dir / schemas.FINGERPRINT_JSON, tmp / schemas.FINGERPRINT_JSON)
        if training.get("history"):  # the curves travel with the weights: evaluation and the registry find them here
            write_training_curves(tmp, training)
        schemas.ModelPackage(
            configuration=configuration, network=dict(network or plans.configuration(configuration).network),
            medseg_version=medseg.__version__, training=training, lineage=dict(lineage or {}), postprocessing=dict(postprocessing or {}),
            previous_stage=dict(previous_stage or {}),
        ).save(tmp)
        if previous_stage and previous_stage_dir is not None:
            from medseg.training.cascade import copy_previous_stage

            copy_previous_stage(previous_stage_dir, tmp)
    return model_dir


__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "load_checkpoint", "restore", "rng_state", "save_checkpoint", "save_model_package", "set_rng_state",
           "write_training_curves"]
