"""Checkpoints and model packages: what a run leaves on disk, written atomically.

``checkpoint_latest.pt`` (every epoch): model, optimiser, scheduler, scaler, every rank's python/numpy/torch
(/CUDA) RNG state, epoch, best metric and weights, history: enough to resume a killed run after its last complete
epoch and end with the same weights as an uninterrupted one. Everything in it is tensors or plain data (format 3:
the RNG states too), so it is read with ``torch.load(..., weights_only=True)``: resuming never unpickles code.
A format-2 checkpoint (numpy RNG state pickled as an ``ndarray``) is refused with the one-time conversion to run,
``python -m medseg.training.checkpointing convert PATH`` (:func:`convert_checkpoint`; for files you trust). The model package (``weights.pt`` state_dict +
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
CHECKPOINT_FORMAT = 3
#: The last format whose RNG states were pickled objects (python tuples with numpy arrays): converted by :func:`convert_checkpoint`.
PICKLED_FORMAT = 2


def _python_rng(state: tuple[Any, ...]) -> dict[str, Any]:
    version, internal, gauss_next = state
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _numpy_rng(state: tuple[Any, ...]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    # uint32 words widened to int64: a tensor dtype every torch has, converted back exactly on restore
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states as tensors and plain data (``weights_only`` loadable)."""
    state: dict[str, Any] = {"python": _python_rng(random.getstate()), "numpy": _numpy_rng(np.random.get_state()), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((nps["bit_generator"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into python numbers and tensors, containers recursively:
    what ``weights_only`` loading accepts (a metric that came out as ``np.float64`` would otherwise be pickled)."""
    if isinstance(value, dict):
        out = type(value)((k, plain(v)) for k, v in value.items())  # an OrderedDict state_dict stays one ...
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # type: ignore[attr-defined]  # ... with the module versions load_state_dict reads
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a temporary file beside ``path``, flushed to disk, renamed over it (a kill leaves the old one).
    ``state`` is made :func:`plain` first, so the file loads with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(plain(state), fh)
            fh.flush()
            os.fsync(fh.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` (tensors and plain data only; never unpickled code).

    Raises:
        MedsegError: an unreadable file, or one holding pickled objects (a format-2 checkpoint: the message
            names the one-time conversion, :func:`convert_checkpoint`).
    """
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the refused global on one line of its long message ("Unsupported global: GLOBAL ...")
        refused = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), str(exc).splitlines()[0][:200])
        raise MedsegError(f"the checkpoint holds pickled objects, which are not loaded ({refused[:200]}). A checkpoint of an older medseg "
                          f"(format {PICKLED_FORMAT}) is converted once, if you trust the file, with: python -m medseg.training.checkpointing "
                          "convert PATH; or start without --resume", path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise MedsegError(f"cannot read the checkpoint ({str(exc).splitlines()[0][:200]})", path) from None


def convert_checkpoint(path: Path) -> Path:
    """Rewrite a format-2 checkpoint (RNG states pickled as numpy objects) in this version's format, in place and
    atomically. It unpickles the old file (``weights_only=False``): run it only on checkpoints you wrote yourself.
    A checkpoint that already loads with ``weights_only=True`` is left as it is.

    Raises:
        MedsegError: the file is unreadable or not a format-2 medseg checkpoint.
    """
    path = Path(path)
    try:
        load_checkpoint(path)
        return path  # already in the safe format: nothing to do
    except MedsegError:
        pass
    try:
        old = torch.load(path, map_location="cpu", weights_only=False)  # the one explicit, user-requested unpickling
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign file becomes one clear message
        raise MedsegError(f"cannot read the checkpoint ({str(exc).splitlines()[0][:200]})", path) from None
    if not isinstance(old, dict) or old.get("format") != PICKLED_FORMAT or not isinstance(old.get("rng"), list):
        raise MedsegError(f"not a format-{PICKLED_FORMAT} medseg checkpoint: not converted", path)
    old["rng"] = [{**r, "python": _python_rng(r["python"]), "numpy": _numpy_rng(r["numpy"])} for r in old["rng"]]
    old["format"] = CHECKPOINT_FORMAT
    save_checkpoint(path, old)
    load_checkpoint(path)  # proof: the converted file loads with weights_only=True
    return path


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
        # network.onnx for the torch-free model server, written with the weights so every package has it
        from medseg.inference.onnx_export import write_onnx

        write_onnx(tmp)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m medseg.training.checkpointing convert PATH...``: the one-time conversion of old checkpoints."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m medseg.training.checkpointing", description=convert_checkpoint.__doc__.split("\n")[0])
    parser.add_argument("command", choices=["convert"])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    args = parser.parse_args(argv)
    try:
        for path in args.paths:
            print(f"converted: {convert_checkpoint(path)}")
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["CHECKPOINT", "CHECKPOINT_FORMAT", "convert_checkpoint", "load_checkpoint", "plain", "restore", "rng_state", "save_checkpoint", "save_model_package", "set_rng_state",
           "write_training_curves"]


if __name__ == "__main__":
    raise SystemExit(main())
