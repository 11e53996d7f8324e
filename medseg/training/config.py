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
    augmentation: bool | dict[str, Any] = False  # True: nnU-Net's default pipeline; a mapping: its knobs (AugmentationConfig); False: random mirroring only
    foreground_share: float = 1 / 3
    loader_prefetch: int = 2  # batches drawn ahead by a loader thread (0: draw in the training thread); with loader_workers: per worker
    loader_workers: int = 0  # > 0: this many loader processes sample and augment (medseg.training.loader); 0: the loader thread
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
        if self.loader_workers < 0 or self.loader_prefetch < 0:
            raise MedsegError(f"loader_workers and loader_prefetch must be >= 0, got {self.loader_workers} and {self.loader_prefetch}")
        if self.epochs < 1 or self.iterations_per_epoch < 1:
            raise MedsegError(f"epochs and iterations_per_epoch must be >= 1, got {self.epochs} and {self.iterations_per_epoch}")
        if isinstance(self.augmentation, str):  # a CLI or KFP string "true"/"false"
            try:
                self.augmentation = _as_bool(self.augmentation)
            except ValueError:
                raise MedsegError(f"augmentation must be true, false or a mapping of knobs, got {self.augmentation!r}") from None
        AugmentationConfig.from_value(self.augmentation)  # refuses a bad knob now, not at the first batch

    def augmentation_config(self) -> AugmentationConfig | None:
        """The parsed ``augmentation`` setting: ``None`` for false (random mirroring only)."""
        return AugmentationConfig.from_value(self.augmentation)

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


def split_train_section(train: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """A parameter file's ``train:`` section as (its :class:`TrainConfig` fields, its ``folds`` choice or None).

    ``folds`` (``N``, ``N,M,...`` or ``all``) says which folds to train, one run each, so it is not a field of one
    run's config; ``medseg train`` and the pipeline both read it here."""
    fields = dict(train or {})
    folds = fields.pop("folds", None)
    return fields, None if folds is None else str(folds)


# --------------------------------------------------------------------------- augmentation knobs
#: group → knob → nnU-Net v2's default (``auto``: derived from the patch, see :class:`AugmentationConfig`; a string, not
#: null, because a KFP dict parameter cannot carry a null).
AUGMENTATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "rotation": {"p": 0.2, "degrees": AUTO, "axes": AUTO},
    "scaling": {"p": 0.2, "range": (0.7, 1.4), "axes": AUTO},
    "elastic": {"p": 0.0, "alpha": AUTO, "sigma": (9.0, 13.0)},
    "noise": {"p": 0.1, "variance": (0.0, 0.1)},
    "blur": {"p": 0.2, "sigma": (0.5, 1.0), "p_per_channel": 0.5},
    "brightness": {"p": 0.15, "range": (0.75, 1.25)},
    "contrast": {"p": 0.15, "range": (0.75, 1.25), "preserve_range": True},
    "low_resolution": {"p": 0.25, "zoom": (0.5, 1.0), "p_per_channel": 0.5},
    "gamma_inverted": {"p": 0.1, "range": (0.7, 1.5), "retain_stats": True},
    "gamma": {"p": 0.3, "range": (0.7, 1.5), "retain_stats": True},
    "mirror": {"p": 0.5, "axes": AUTO},
}
#: ``GROUP: true`` switches a group on with this probability where its default is 0 (elastic: nnU-Net v1's 0.2).
AUGMENTATION_ON_P: dict[str, float] = {"elastic": 0.2}
#: top-level knobs besides the groups: the augmentation's dimensionality and the slice axis of 2D-style augmentation.
AUGMENTATION_LAYOUT: dict[str, Any] = {"dim": AUTO, "slice_axis": AUTO}

# what each knob must be: (kind, bounds), checked by _knob
_RANGES_POSITIVE = {"scaling.range", "brightness.range", "contrast.range", "gamma_inverted.range", "gamma.range", "blur.sigma", "elastic.sigma"}
_RANGES_NONNEGATIVE = {"noise.variance", "elastic.alpha"}


@dataclass(frozen=True)
class AugmentationConfig:
    """Every knob of the training augmentation (``train.augmentation`` as a mapping), validated.

    ``train.augmentation`` is ``false`` (random mirroring only), ``true`` (nnU-Net v2's default set: exactly
    :data:`AUGMENTATION_DEFAULTS`) or a mapping that overrides some of those defaults::

        augmentation:
          elastic: true                    # or {p: 0.2, alpha: [0, 900], sigma: [9, 13]}; false: off
          rotation: {p: 0.3, degrees: [-15, 15], axes: [2]}
          mirror: {axes: [0, 1]}
          gamma: false                     # a group set to false: probability 0
          dim: 2                           # auto | 2 | 3; slice_axis: auto | 0 | 1 | 2

    Knobs: ``p`` (probability per sample), ``range``/``variance``/``zoom``/``sigma``/``alpha``/``degrees``
    (``[low, high]``), ``axes`` (spatial axes), ``p_per_channel``, ``preserve_range``, ``retain_stats``.
    ``auto`` (or null) follows the patch as nnU-Net does: rotation ±30° (3D) or ±180° (2D; ±15° for elongated
    patches), elastic α (0, 900) in 3D and (0, 200) in 2D, every spatial axis for scaling and mirroring.
    An unknown or ill-typed knob raises :class:`~medseg.errors.MedsegError` naming it (``augmentation.GROUP.KNOB``).
    """

    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {g: dict(k) for g, k in AUGMENTATION_DEFAULTS.items()})
    dim: int | str = AUTO
    slice_axis: int | str = AUTO

    @classmethod
    def from_value(cls, value: Any) -> AugmentationConfig | None:
        """``false`` → ``None``; ``true`` → the defaults; a mapping → the defaults with its overrides."""
        if value is False or value is None:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise MedsegError(f"augmentation must be true, false or a mapping of knobs, got {value!r}")
        known = [*AUGMENTATION_DEFAULTS, *AUGMENTATION_LAYOUT]
        groups = {g: dict(k) for g, k in AUGMENTATION_DEFAULTS.items()}
        layout = dict(AUGMENTATION_LAYOUT)
        for name, setting in value.items():
            if name not in known:
                raise MedsegError(f"unknown augmentation knob {f'augmentation.{name}'!r} (known: {', '.join(known)})")
            if name in AUGMENTATION_LAYOUT:
                layout[name] = _layout_knob(name, setting)
            elif isinstance(setting, bool):
                groups[name]["p"] = (AUGMENTATION_ON_P.get(name, AUGMENTATION_DEFAULTS[name]["p"]) or 0.0) if setting else 0.0
            elif isinstance(setting, dict):
                for knob, v in setting.items():
                    if knob not in groups[name]:
                        raise MedsegError(f"unknown augmentation knob {f'augmentation.{name}.{knob}'!r} "
                                          f"(known: {', '.join(f'{name}.{k}' for k in AUGMENTATION_DEFAULTS[name])})")
                    groups[name][knob] = _knob(f"{name}.{knob}", v)
            else:
                raise MedsegError(f"augmentation.{name} must be true, false or a mapping of {', '.join(AUGMENTATION_DEFAULTS[name])}, got {setting!r}")
        return cls(groups=groups, **layout)

    def to_dict(self) -> dict[str, Any]:
        """Every knob, explicit (a mapping :meth:`from_value` reads back to the same config)."""
        return {**{g: {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()} for g, knobs in self.groups.items()},
                "dim": self.dim, "slice_axis": self.slice_axis}


def _layout_knob(name: str, value: Any) -> int | str:
    if value == AUTO:
        return AUTO
    allowed = (2, 3) if name == "dim" else (0, 1, 2)
    try:
        v = _as_int(value)
    except (TypeError, ValueError):
        v = None
    if v not in allowed or isinstance(value, bool):
        raise MedsegError(f"augmentation.{name} must be auto or one of {', '.join(map(str, allowed))}, got {value!r}")
    return v


def _knob(key: str, value: Any) -> Any:
    """One validated knob value (KFP may hand numbers over as floats: whole numbers become ints where needed)."""
    knob = key.split(".")[1]
    if knob in ("p", "p_per_channel"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) <= 1:
            raise MedsegError(f"augmentation.{key} must be a probability in [0, 1], got {value!r}")
        return float(value)
    if knob in ("preserve_range", "retain_stats"):
        if not isinstance(value, bool):
            raise MedsegError(f"augmentation.{key} must be true or false, got {value!r}")
        return value
    if value is None or value == AUTO:  # degrees, alpha and axes may follow the patch
        if knob in ("degrees", "alpha", "axes"):
            return AUTO
        raise MedsegError(f"augmentation.{key} has no automatic value, give it explicitly (default {AUGMENTATION_DEFAULTS[key.split('.')[0]][knob]!r})")
    if knob == "axes":
        try:
            axes = [_as_int(a) for a in value] if isinstance(value, (list, tuple)) and not any(isinstance(a, bool) for a in value) else None
        except (TypeError, ValueError):
            axes = None
        if axes is None or any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
            raise MedsegError(f"augmentation.{key} must be a list of distinct spatial axes among 0, 1, 2, got {value!r}")
        return axes
    # a [low, high] range
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
          and float(value[0]) <= float(value[1]))
    if not ok:
        raise MedsegError(f"augmentation.{key} must be a range [low, high] with low <= high, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if key in _RANGES_POSITIVE and lo <= 0:
        raise MedsegError(f"augmentation.{key} must be above 0, got {value!r}")
    if key in _RANGES_NONNEGATIVE and lo < 0:
        raise MedsegError(f"augmentation.{key} must be >= 0, got {value!r}")
    if knob == "zoom" and not (0 < lo and hi <= 1):
        raise MedsegError(f"augmentation.{key} must lie in (0, 1] (a downsampling factor), got {value!r}")
    if knob == "degrees" and not (-180 <= lo and hi <= 180):
        raise MedsegError(f"augmentation.{key} must lie in [-180, 180] degrees, got {value!r}")
    return (lo, hi)


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


__all__ = ["split_train_section", "AUGMENTATION_DEFAULTS", "AUGMENTATION_LAYOUT", "AUGMENTATION_ON_P", "AUTO", "AugmentationConfig", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS", "TrainConfig", "TrainResult"]
