"""The hyperparameters of a training run and what a run returns.

``params.yaml`` → ``train`` holds :class:`TrainConfig`'s fields (tuned ones come from Optuna); ``auto`` for the
network and the loss means "what the dataset's task asks for" (:class:`medseg.task.Task`), resolved when the run
starts (:mod:`medseg.training.setup`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("poly", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTO = "auto"


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (``params.yaml`` → ``train``; tuned ones come from Optuna).

    Invalid names (optimizer, schedule, precision) raise :class:`~medseg.errors.MedsegError` at construction.
    """

    epochs: int = 10
    iterations_per_epoch: int = 50
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    optimizer: str = "adamw"  # adamw | sgd (Nesterov)
    momentum: float = 0.99  # sgd only (nnU-Net: 0.99)
    lr_schedule: str = "poly"  # poly | cosine | constant, stepped per epoch
    loss: str = "auto"  # medseg.training.losses.LOSSES; auto: the task's (medseg.task.Task.default_loss: region_bce_dice for overlapping regions, dice_ce, ce for a classifier)
    loss_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"class_weights": [...]}
    network: str = "auto"  # medseg.networks.registry.NETWORKS; auto: the task's (unet, unet2d for the 2d configuration, classifier3d for a classifier)
    network_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"deep_supervision": true}
    augmentation: bool = False  # nnU-Net's default augmentation pipeline; False: random mirroring only
    foreground_share: float = 1 / 3
    loader_prefetch: int = 2  # batches drawn ahead by a loader thread (0: draw in the training thread)
    batch_size: int = 0  # per process; 0: the plan's
    configuration: str = "3d_fullres"  # a planned configuration (the pipeline resolves auto before training)
    fold: int = 0
    seed: int = 0
    grad_clip: float = 12.0  # max gradient norm; 0 disables clipping
    val_overlap: float = 0.25
    max_val_cases: int = 8  # segmentation (sliding-window validation); a classifier validates on every case of the fold
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (CUDA: bf16, or fp16 without bf16 support; CPU: fp32) | fp32 | bf16 | fp16
    channels_last: bool = True  # channels_last_3d memory layout, CUDA only
    compile: bool = False  # torch.compile the network (slow first steps; pays off on long GPU runs)
    num_threads: int = 0  # CPU threads per process; 0: the cores this process may use / processes per node
    time_budget_minutes: float = 0.0  # > 0: train for this wall-clock budget: stop after the last epoch that fits, the lr schedule runs over the budget (epochs is then an upper bound)
    cascade_from: str = ""  # a 3d_lowres model package (or its training folder): train this stage as a cascade's full-resolution stage (medseg.training.cascade)

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise MedsegError(f"unknown {name} {getattr(self, name)!r} (known: {', '.join(allowed)})")
        for name in ("loss_options", "network_options"):
            if not isinstance(getattr(self, name), dict):
                raise MedsegError(f"{name} must be a mapping of option names to values, got {getattr(self, name)!r}")
        if self.time_budget_minutes < 0:
            raise MedsegError(f"time_budget_minutes must be >= 0 (0: no budget), got {self.time_budget_minutes}")
        if self.epochs < 1 or self.iterations_per_epoch < 1:
            raise MedsegError(f"epochs and iterations_per_epoch must be >= 1, got {self.epochs} and {self.iterations_per_epoch}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise MedsegError(f"unknown training parameter(s) {sorted(unknown)} (known: {sorted(names)})")
        if "cascade_from" in data and data["cascade_from"] is None:  # `cascade_from: null` in params.yaml: no cascade
            data = {**data, "cascade_from": ""}
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
    """What :func:`train` returns (on every rank; ``model_dir`` is set on rank 0 only).

    ``best_val_dice`` is the best epoch's validation score, named by ``metric``: mean Dice for segmentation,
    balanced accuracy for classification."""

    best_val_dice: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    model_dir: Path | None = None
    seconds_per_step: float = 0.0
    weights_sha256: str = ""  # sha256 of the final weights (:func:`~medseg.training.ddp.state_digest`)
    world_size: int = 1
    rank_weights_sha256: list[str] = field(default_factory=list)  # every rank's digest, checked equal (DDP)
    metric: str = "val_dice_mean"  # what best_val_dice measures: val_dice_mean | val_balanced_accuracy

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_dir"] = str(self.model_dir) if self.model_dir is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in data.items() if k in names}
        d["model_dir"] = Path(d["model_dir"]) if d.get("model_dir") else None
        return cls(**d)


__all__ = ["AUTO", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS", "TrainConfig", "TrainResult"]
