"""The training loop: patch-based, checkpointed every epoch, exactly resumable, CPU or CUDA, one process or DDP.

- Optimisers (``TrainConfig.optimizer``): ``sgd`` (Nesterov, momentum 0.99: nnU-Net's default) or ``adamw``;
  learning-rate schedule (``lr_schedule``) per epoch: ``poly`` lr·(1 − epoch/epochs)^0.9 (nnU-Net),
  ``cosine`` or ``constant``; weight decay; gradient-norm clipping (12, as nnU-Net).
- Precision (``precision``): ``auto`` is bf16 autocast on CUDA (fp16 + ``GradScaler`` where bf16 is not
  supported) and fp32 on CPU; ``bf16`` also runs on CPU (autocast); ``fp16`` needs CUDA. CUDA also gets
  the ``channels_last_3d`` layout and cuDNN autotuning; ``compile`` wraps the network in ``torch.compile``.
- Deterministic mode (``deterministic``): deterministic algorithms (strict on CPU), no cuDNN autotuning;
  together with the seeding below a run is bitwise repeatable on the same machine and thread count.
- Seeding: python, numpy and torch are seeded from ``seed`` once; the patch sampler is rebuilt every epoch
  with a seed derived from (seed, epoch, rank) (like ``DistributedSampler.set_epoch``), so the data a
  rank sees in an epoch does not depend on what happened before.
- Every epoch ends with validation Dice (sliding window on the fold's validation cases, on the
  preprocessed grid, mean over regions) and an atomic checkpoint ``checkpoint_latest.pt``: model,
  optimiser, scheduler, scaler, every rank's python/numpy/torch(/CUDA) RNG state, epoch, best metric and
  weights, history. ``resume=True`` continues after the last complete epoch of a killed run and ends with
  the same weights as an uninterrupted run (deterministic mode, same thread count).
- Distributed (``torchrun``, see :mod:`medseg.training.ddp`): each rank samples from its shard of the
  training cases, validates its share of the validation cases; metrics are all-reduced; rank 0 alone logs,
  checkpoints and writes the model package.
- The best epoch's weights are written as a model package (``weights.pt`` state_dict + plans +
  dataset.json + model_package.json).
- Cascade (``cascade_from``: a 3d_lowres model package): the run trains nnU-Net's 3d_cascade_fullres, the
  low-resolution stage's segmentation of each case (out-of-fold where the low-resolution folds allow) as
  extra one-hot input channels; the package carries the low-resolution package in ``previous_stage/``
  (:mod:`medseg.training.cascade`, :mod:`medseg.inference.cascade`).

What is trained follows the dataset and the loss (the package's ``network.output`` records it):

- ``labels`` (default): one softmax output per label value (``dice_ce`` and the other softmax losses).
- ``regions``: BraTS region-based training as nnU-Net does it (Isensee et al. 2021, "nnU-Net for brain tumor
  segmentation"): with a sigmoid loss (``loss: region_bce_dice``) the network has one sigmoid output per
  region of dataset.json ``regions`` (WT, TC, ET: overlapping, nested), trained on targets from
  :func:`~medseg.training.losses.labels_to_regions`; validation Dice per region from sigmoid > 0.5; the
  predictor turns the region probabilities back into labels (:func:`~medseg.training.losses.regions_to_labels`).
- ``classes``: a classification dataset (dataset.json ``task: "classification"``, e.g. CN / MCI / AD from T1
  MRI) trains ``classifier3d`` (the default network ``unet`` and loss ``dice_ce`` become ``classifier3d`` and
  ``ce``) on whole preprocessed volumes (:func:`~medseg.training.sampler.fit_volume`), with each case's class
  and, when ``network_options.use_age``, age from the ingested dataset's ``manifest.json`` (in the
  preprocessed folder, or ``dataset_dir``). Validation: accuracy, balanced accuracy and cross-entropy on
  every validation case of the fold; the best epoch is the one with the best balanced accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.predictor import class_probabilities, grid_labels, grid_probabilities
from medseg.io import atomic_path
from medseg.training import ddp
from medseg.training.network import build_network
from medseg.training.sampler import PatchSampler, PrefetchSampler, PreprocessedCase, VolumeCase, VolumeSampler, fit_volume

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_latest.pt"
CHECKPOINT_FORMAT = 2
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("poly", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    loss: str = "dice_ce"  # medseg.training.losses.LOSSES: softmax, or region_bce_dice (sigmoid per dataset.json region); classification: ce | focal
    loss_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"class_weights": [...]}
    network: str = "unet"  # medseg.training.networks.NETWORKS, built on the plan's topology; classification datasets: classifier3d
    network_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"deep_supervision": true}
    augmentation: bool = False  # nnU-Net's default augmentation pipeline; False: random mirroring only
    foreground_share: float = 1 / 3
    loader_prefetch: int = 2  # batches drawn ahead by a loader thread (0: draw in the training thread)
    batch_size: int = 0  # per process; 0: the plan's
    configuration: str = "3d_fullres"
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
    cascade_from: str = ""  # a 3d_lowres model package (or its training folder): train this stage as a cascade's full-resolution stage (medseg.training.cascade)

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise MedsegError(f"unknown {name} {getattr(self, name)!r} (known: {', '.join(allowed)})")
        for name in ("loss_options", "network_options"):
            if not isinstance(getattr(self, name), dict):
                raise MedsegError(f"{name} must be a mapping of option names to values, got {getattr(self, name)!r}")
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
    t = min(max(epoch, 0), epochs) / epochs
    if schedule == "poly":
        return (1.0 - t) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return 1.0
    raise MedsegError(f"unknown lr_schedule {schedule!r} (known: {', '.join(LR_SCHEDULES)})")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch :func:`lr_factor` schedule (stepped once at the end of each epoch)."""
    schedule, epochs = cfg.lr_schedule, cfg.epochs

    def factor(epoch: int) -> float:  # a plain function: LambdaLR keeps it out of its state_dict
        return lr_factor(schedule, epoch, epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_topology(cfg: TrainConfig, config: schemas.Configuration, out_channels: int | None = None) -> dict[str, Any]:
    """The segmentation network ``cfg.network`` (with ``cfg.network_options``) on the plan's topology and patch
    size, as the self-contained dict the model package stores (:func:`medseg.training.networks.network_topology`).
    ``out_channels``: instead of the plan's (one per label), e.g. one per region.

    Raises:
        MedsegError: an unknown network or option, a classification network, a patch size it cannot take.
    """
    from medseg.training import networks

    if cfg.network in networks.NETWORKS and networks.NETWORKS[cfg.network].task != "segmentation":
        raise MedsegError(f"network {cfg.network!r} is a {networks.NETWORKS[cfg.network].task} network: the trainer trains it on classification datasets "
                          "(dataset.json task: classification), this one is a segmentation dataset")
    try:
        return networks.network_topology(cfg.network, config.network, out_channels=out_channels, patch_size=config.patch_size, **cfg.network_options)
    except ValueError as exc:
        raise MedsegError(f"network: {exc}") from None


def _is_sigmoid_loss(cfg: TrainConfig) -> bool:
    from medseg.training import losses

    try:
        spec = losses.loss_spec(cfg.loss)
    except ValueError as exc:
        raise MedsegError(f"loss: {exc}") from None
    return spec.activation == "sigmoid" or bool(cfg.loss_options.get("sigmoid"))


def resolve_loss(cfg: TrainConfig) -> torch.nn.Module:
    """The loss ``cfg.loss`` with ``cfg.loss_options``: a softmax loss, or a sigmoid (region) loss whose
    ``loss_options`` hold the ``regions`` (:func:`train` fills them in from dataset.json).

    Raises:
        MedsegError: an unknown loss or option, or a sigmoid loss without regions.
    """
    from medseg.training import losses

    try:
        spec = losses.loss_spec(cfg.loss)
        if _is_sigmoid_loss(cfg) and not cfg.loss_options.get("regions"):
            softmax = ", ".join(n for n, s in losses.LOSSES.items() if s.activation == "softmax" and "segmentation" in s.tasks)
            raise MedsegError(f"loss {cfg.loss!r} trains one sigmoid output per region of dataset.json `regions` (BraTS: WT, TC, ET), and this "
                              f"dataset has no regions: use a softmax loss ({softmax})")
        if "segmentation" not in spec.tasks and "classification" not in spec.tasks:
            raise MedsegError(f"loss {cfg.loss!r} trains neither segmentation nor classification")
        return losses.build_loss(cfg.loss, **cfg.loss_options)
    except ValueError as exc:
        raise MedsegError(f"loss: {exc}") from None


# --------------------------------------------------------------------------- what is trained
@dataclass
class _Task:
    """What the network's outputs are (``labels`` | ``regions`` | ``classes``) and what the run needs to feed
    and score them."""

    output: str = "labels"
    regions: dict[str, list[int]] = field(default_factory=dict)  # regions: name → labels, in output-channel order
    labels: list[int] = field(default_factory=list)  # every label value of the dataset (regions → labels)
    classes: list[str] = field(default_factory=list)  # classes: names in output order
    input_size: list[int] = field(default_factory=list)  # classes: the network's input (fit_volume)
    input_scale: float = 1.0
    use_age: bool = False

    @property
    def metric(self) -> str:
        """The validation metric that picks the best epoch."""
        return "val_balanced_accuracy" if self.output == "classes" else "val_dice_mean"

    def package_fields(self) -> dict[str, Any]:
        """What the model package's ``network`` entry records about the outputs (:func:`~medseg.training.ensemble.network_output`)."""
        if self.output == "regions":
            return {"output": "regions", "regions": {k: list(v) for k, v in self.regions.items()}}
        if self.output == "classes":
            return {"output": "classes", "classes": list(self.classes)}
        return {"output": "labels"}


def dataset_classes(dataset: schemas.DatasetJson) -> list[str]:
    """A classification dataset's class names in index order (dataset.json ``labels``: class → 0..n-1)."""
    items = sorted((int(v), str(k)) for k, v in dataset.labels.items())
    if [i for i, _ in items] != list(range(len(items))) or len(items) < 2:
        raise MedsegError(f"classification labels must map at least two classes to 0..n-1, got {dataset.labels}")
    return [name for _, name in items]


def classification_targets(preprocessed_dir: Path, dataset_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Case id → ``{"class": name | None, "age": years | None}`` from the ingested dataset's ``manifest.json``
    (``cases[].class_label`` and ``cases[].covariates.age``): the one in ``preprocessed_dir``, else ``dataset_dir``'s.

    Raises:
        MedsegError: no manifest in either place.
    """
    for folder in (preprocessed_dir, dataset_dir):
        if folder is not None and (Path(folder) / schemas.MANIFEST_JSON).is_file():
            manifest = schemas.Manifest.load(folder)
            out = {}
            for case in manifest.cases:
                age = (case.get("covariates") or {}).get("age")
                out[str(case["case_id"])] = {"class": case.get("class_label"), "age": float(age) if isinstance(age, (int, float)) else None}
            return out
    raise MedsegError("classification training needs each case's class (and age): the ingested dataset's manifest.json, in the preprocessed "
                      "folder or in the dataset folder given as dataset_dir", Path(preprocessed_dir) / schemas.MANIFEST_JSON)


def _segmentation_task(cfg: TrainConfig, plans: schemas.Plans, config: schemas.Configuration) -> tuple[TrainConfig, _Task, dict[str, Any]]:
    labels = sorted(int(v) for v in plans.labels.values())
    if _is_sigmoid_loss(cfg) and (cfg.loss_options.get("regions") or plans.regions):
        from medseg.training import losses

        regions = {str(k): [int(v) for v in vs] for k, vs in (cfg.loss_options.get("regions") or plans.regions).items()}
        try:
            losses.region_signatures(regions, labels)  # the label map can be rebuilt from the region outputs
        except ValueError as exc:
            raise MedsegError(f"region-based training: {exc}") from None
        if "regions" in losses.loss_spec(cfg.loss).options:
            cfg = dataclasses.replace(cfg, loss_options={**cfg.loss_options, "regions": regions})
        task = _Task("regions", regions=regions, labels=labels)
        topology = resolve_topology(cfg, config, out_channels=len(regions))
    else:
        task = _Task("labels", labels=labels)
        topology = resolve_topology(cfg, config)
    return cfg, task, {**topology, **task.package_fields()}


def _classification_task(cfg: TrainConfig, plans: schemas.Plans, config: schemas.Configuration, dataset: schemas.DatasetJson) -> tuple[TrainConfig, _Task, dict[str, Any]]:
    from medseg.training import losses, networks

    network = "classifier3d" if cfg.network == "unet" else cfg.network  # the default network: the classifier
    if network not in networks.NETWORKS:
        raise MedsegError(f"network: unknown network {network!r} (known: {', '.join(networks.NETWORKS)})")
    if networks.NETWORKS[network].task != "classification":
        raise MedsegError(f"network {network!r} is a segmentation network; a classification dataset trains "
                          f"{', '.join(n for n, s in networks.NETWORKS.items() if s.task == 'classification')}")
    loss = "ce" if cfg.loss == "dice_ce" else cfg.loss  # the default loss: cross-entropy
    try:
        spec = losses.loss_spec(loss)
    except ValueError as exc:
        raise MedsegError(f"loss: {exc}") from None
    if "classification" not in spec.tasks:
        raise MedsegError(f"loss {loss!r} is not a classification loss (use one of {', '.join(n for n, s in losses.LOSSES.items() if 'classification' in s.tasks)})")
    cfg = dataclasses.replace(cfg, network=network, loss=loss)
    classes = dataset_classes(dataset)
    options = dict(cfg.network_options)
    size = [int(v) for v in (options.get("input_size") or config.patch_size)]
    if options.get("input_scale") is None:  # one zoom for every case: the median case fits the input (never enlarged)
        options["input_scale"] = min(1.0, *(s / max(int(m), 1) for s, m in zip(size, config.median_shape)))
    try:
        topology = networks.network_topology(network, None, in_channels=len(plans.channel_names), out_channels=len(classes), patch_size=size, **options)
    except ValueError as exc:
        raise MedsegError(f"network: {exc}") from None
    opts = topology["options"]
    task = _Task("classes", classes=classes, input_size=list(opts["input_size"]), input_scale=float(opts["input_scale"]), use_age=bool(opts.get("use_age")))
    return cfg, task, {**topology, **task.package_fields()}


def _volume_cases(folder: Path, ids: list[str], task: _Task, targets: dict[str, dict[str, Any]]) -> list[VolumeCase]:
    index = {name: i for i, name in enumerate(task.classes)}
    cases, problems = [], []
    for case_id in ids:
        target = targets.get(case_id)
        if target is None or target["class"] is None:
            problems.append(f"{case_id}: no class in manifest.json")
        elif target["class"] not in index:
            problems.append(f"{case_id}: class {target['class']!r} is not one of {task.classes}")
        elif task.use_age and target["age"] is None:
            problems.append(f"{case_id}: no age (covariates.age), which the network takes")
        else:
            cases.append(VolumeCase(folder, case_id, index[target["class"]], target["age"]))
    if problems:
        raise MedsegError(f"classification targets: {'; '.join(problems[:10])}" + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    return cases


def _make_sampler(cases: list[PreprocessedCase], patch_size: list[int], batch_size: int, cfg: TrainConfig, seed: int) -> PatchSampler:
    """The patch sampler of one rank for one epoch (the one place that knows the sampler's constructor).
    Patch positions, mirroring and augmentation all draw from its one generator, seeded with ``seed``."""
    return PatchSampler(cases, patch_size, batch_size, cfg.foreground_share, seed=seed, augmentation=True if cfg.augmentation else None)


def _make_volume_sampler(cases: list[VolumeCase], task: _Task, batch_size: int, cfg: TrainConfig, seed: int) -> VolumeSampler:
    """The whole-volume sampler of one rank for one epoch (classification); ``augmentation``: left-right mirroring."""
    return VolumeSampler(cases, task.input_size, task.input_scale, batch_size, seed=seed, mirror_axes=(0,) if cfg.augmentation else (), ages=task.use_age)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
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


# --------------------------------------------------------------------------- validation and postprocessing
def validation_sums(network: torch.nn.Module, cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], overlap: float, device: torch.device,
                    regions: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Per region (or label) the sum of the cases' Dice on the preprocessed grid (empty vs empty: 1).

    ``regions`` (name → labels, in output-channel order): the network has one sigmoid output per region and
    region r is predicted where its probability is > 0.5 (nnU-Net's region-based validation); otherwise the
    outputs are a softmax over the labels and each region (``plans.reported_groups``) is read from the arg-max.
    """
    groups = dict(regions) if regions else plans.reported_groups
    sums = {name: 0.0 for name in groups}
    for case in cases:
        probs = grid_probabilities(network, np.asarray(case.data), patch_size, "regions" if regions else "labels", overlap=overlap, device=device)
        ref = np.asarray(case.seg)
        pred = None if regions else np.argmax(probs, axis=0)
        for i, (name, values) in enumerate(groups.items()):
            p = probs[i] > 0.5 if regions else np.isin(pred, values)
            r = np.isin(ref, values)
            denom = p.sum() + r.sum()
            sums[name] += 1.0 if denom == 0 else 2.0 * np.logical_and(p, r).sum() / denom
    return sums


def validation_dice(network: torch.nn.Module, cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], overlap: float, device: torch.device,
                    regions: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Mean Dice per region (or per label when the dataset has no regions) on the preprocessed grid."""
    sums = validation_sums(network, cases, plans, patch_size, overlap, device, regions)
    return {name: s / max(len(cases), 1) for name, s in sums.items()}


def validation_pairs(network: torch.nn.Module, cases: list[PreprocessedCase], patch_size: list[int], overlap: float, device: torch.device,
                     regions: dict[str, list[int]] | None = None, labels: list[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) uint8 label maps of ``cases`` on the preprocessed grid; with ``regions`` the
    network's region outputs are turned into labels (:func:`~medseg.training.losses.regions_to_labels`)."""
    output = "regions" if regions else "labels"
    return [(grid_labels(grid_probabilities(network, np.asarray(c.data), patch_size, output, overlap=overlap, device=device), regions, labels),
             np.asarray(c.seg).astype(np.uint8)) for c in cases]


def classification_sums(network: torch.nn.Module, cases: list[VolumeCase], task: _Task, device: torch.device) -> dict[str, float]:
    """Sums over ``cases`` (so ranks can add theirs): the confusion matrix (``cm_<true>_<pred>``, class
    indices) and the cross-entropy (``loss``, natural log) of the classifier's whole-volume predictions."""
    n = len(task.classes)
    sums = {f"cm_{i}_{j}": 0.0 for i in range(n) for j in range(n)}
    sums["loss"] = 0.0
    for case in cases:
        x = fit_volume(case.data, task.input_size, task.input_scale)[None]
        probs = class_probabilities(network, x, np.array([case.age], np.float32) if task.use_age else None, device)[0]
        sums[f"cm_{case.target}_{int(np.argmax(probs))}"] += 1.0
        sums["loss"] -= float(np.log(max(float(probs[case.target]), 1e-12)))
    return sums


def classification_scores(sums: dict[str, float], n_classes: int, n_cases: float) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and mean cross-entropy from
    :func:`classification_sums` (added over ranks)."""
    cm = np.array([[sums[f"cm_{i}_{j}"] for j in range(n_classes)] for i in range(n_classes)])
    support = cm.sum(axis=1)
    present = support > 0
    return {"val_accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan"),
            "val_balanced_accuracy": float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan"),
            "val_loss": float(sums["loss"] / n_cases) if n_cases else float("nan")}


def postprocessing_from_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], plans: schemas.Plans, spacing: list[float]) -> dict[str, Any]:
    """Minimum component volume per label (mm³, so it carries over to any grid) chosen on validation
    predictions. Scored by BraTS 2023 lesion-wise Dice for BraTS data, else by Dice."""
    from medseg.evaluation.lesionwise import lesionwise_case
    from medseg.evaluation.metrics import dice
    from medseg.inference.postprocess import choose_enhancing_threshold, choose_min_volumes, enhancing_labels, remove_small_components

    if not pairs:
        return {}
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
    post: dict[str, Any] = {"min_volume_mm3": chosen, "metric": metric, "validation_cases": len(pairs), "score_before": before, "score_after": after}
    pair = enhancing_labels(plans.labels)
    if pair is not None:  # BraTS: the "small enhancing tumour is necrosis" rule, its threshold chosen here too
        cleaned = [(remove_small_components(p, chosen, spacing) if chosen else p, r) for p, r in pairs]
        voxels, et_before, et_after = choose_enhancing_threshold(cleaned, *pair)
        # stored in mm³ so the Predictor applies it on any input grid
        post["et_to_netc_below_mm3"] = float(voxels * np.prod(spacing))
        post["et_rule"] = {"voxels_at_training_spacing": int(voxels), "et_dice_before": et_before, "et_dice_after": et_after}
    return post


def choose_postprocessing(network: torch.nn.Module, state: dict[str, torch.Tensor], cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], spacing: list[float], overlap: float, device: torch.device,
                          regions: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """:func:`postprocessing_from_pairs` on the validation cases predicted with ``state`` (loaded into ``network``)."""
    if not cases:
        return {}
    network.load_state_dict(state)
    labels = sorted(int(v) for v in plans.labels.values())
    return postprocessing_from_pairs(validation_pairs(network, cases, patch_size, overlap, device, regions, labels), plans, spacing)


def save_model_package(model_dir: Path, state_dict: dict[str, torch.Tensor], preprocessed_dir: Path, configuration: str, training: dict[str, Any], lineage: dict[str, str] | None = None,
                       postprocessing: dict[str, Any] | None = None, network: dict[str, Any] | None = None, previous_stage: dict[str, Any] | None = None,
                       previous_stage_dir: Path | None = None) -> Path:
    """Write the model package folder (the contract the registry and the server load). ``network``: the
    resolved topology the weights belong to (default: the plan's). ``previous_stage`` (a cascade's entry,
    :mod:`medseg.inference.cascade`) with ``previous_stage_dir``: the low-resolution package, copied in."""
    from medseg.io import atomic_dir

    plans = schemas.Plans.load(preprocessed_dir)
    with atomic_dir(model_dir) as tmp:
        with open(tmp / schemas.WEIGHTS_FILE, "wb") as fh:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, fh)
        shutil.copy2(preprocessed_dir / schemas.PLANS_JSON, tmp / schemas.PLANS_JSON)
        shutil.copy2(preprocessed_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        if (preprocessed_dir / schemas.FINGERPRINT_JSON).is_file():  # the model server's input-drift reference
            shutil.copy2(preprocessed_dir / schemas.FINGERPRINT_JSON, tmp / schemas.FINGERPRINT_JSON)
        schemas.ModelPackage(
            configuration=configuration, network=dict(network or plans.configuration(configuration).network),
            medseg_version=medseg.__version__, training=training, lineage=dict(lineage or {}), postprocessing=dict(postprocessing or {}),
            previous_stage=dict(previous_stage or {}),
        ).save(tmp)
        if previous_stage and previous_stage_dir is not None:
            from medseg.training.cascade import copy_previous_stage

            copy_previous_stage(previous_stage_dir, tmp)
    return model_dir


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
    return _Engine(network, train_model, optimizer, scheduler, scaler, amp_dtype, memory_format, loss_fn if loss_fn is not None else resolve_loss(cfg))


def _train_step(engine: _Engine, images: np.ndarray, labels: np.ndarray, device: torch.device, grad_clip: float, ages: np.ndarray | None = None) -> torch.Tensor:
    """One optimiser step. ``labels``: N×1×… label maps (segmentation; region losses make their targets from
    them) or N×1 class indices; ``ages``: N years, a classifier's second input."""
    x = torch.from_numpy(images).to(device, non_blocking=True).contiguous(memory_format=engine.memory_format)
    y = torch.from_numpy(labels).to(device, non_blocking=True)
    extra = () if ages is None else (torch.from_numpy(ages).to(device, non_blocking=True),)
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
    dataset = schemas.DatasetJson.load(preprocessed_dir)
    config = plans.configuration(cfg.configuration)
    if not 0 <= cfg.fold < len(splits.folds):
        raise MedsegError(f"fold {cfg.fold} does not exist (splits have {len(splits.folds)} folds)")
    fold = splits.folds[cfg.fold]
    folder = preprocessed_dir / cfg.configuration
    # configuration errors before any process group; ``cfg`` becomes what is trained (e.g. the classifier, the regions)
    train_cases: list[Any]
    val_cases: list[Any]
    if dataset.task == "classification":
        cfg, task, topology = _classification_task(cfg, plans, config, dataset)
        targets = classification_targets(preprocessed_dir, dataset_dir)
        train_cases, val_cases = _volume_cases(folder, fold["train"], task, targets), _volume_cases(folder, fold["val"], task, targets)
    else:
        cfg, task, topology = _segmentation_task(cfg, plans, config)
        train_cases = [PreprocessedCase(folder, c) for c in fold["train"]]
        val_cases = [PreprocessedCase(folder, c) for c in fold["val"][: cfg.max_val_cases]]
    if not train_cases:
        raise MedsegError(f"fold {cfg.fold} has no training cases", preprocessed_dir / schemas.SPLITS_JSON)
    if cfg.cascade_from:
        if dataset.task == "classification":
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
        return _train(preprocessed_dir, out_dir, cfg, plans, config, topology, loss_fn, train_cases, val_cases, ctx, resume, on_epoch, progress and ctx.is_main, write_package, task,
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
           write_package: bool, task: _Task | None = None, previous: tuple[dict[str, Any], Path] | None = None) -> TrainResult:
    task = task or _Task()
    metric = task.metric
    device = ctx.device
    seed_everything(cfg.seed)
    engine = _build_engine(cfg, topology, ctx, loss_fn.to(device))
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
            start_epoch, best, best_epoch, history, best_state = _restore(ckpt, engine, cfg, ctx)
            if progress:
                log.info("resumed from %s after epoch %d/%d", ckpt_path, start_epoch, cfg.epochs)
        elif progress:
            log.info("no checkpoint in %s: starting from epoch 1", out_dir)

    step_times: list[float] = []
    stopped_by_main = False
    for epoch in range(start_epoch, cfg.epochs):
        metrics = _run_epoch(engine, cfg, epoch, train_cases, val_cases, plans, config, batch_size, ctx, progress, step_times, task)
        history.append({"epoch": epoch, **metrics})
        if best_state is None or not math.isfinite(best) or metrics[metric] > best:  # no validation cases: the last epoch
            best, best_epoch = metrics[metric], epoch
            best_state = {k: v.detach().cpu().clone() for k, v in engine.network.state_dict().items()} if ctx.is_main else {}
        if progress and task.output == "classes":
            log.info("epoch %d/%d: loss %.4f  val accuracy %.3f  balanced accuracy %.3f  val loss %.4f  best %.3f @ epoch %d  lr %.2e  %.1f s (data wait %.0f%%)",
                     epoch + 1, cfg.epochs, metrics["train_loss"], metrics["val_accuracy"], metrics["val_balanced_accuracy"], metrics["val_loss"], best, best_epoch + 1,
                     metrics["lr"], metrics["epoch_seconds"], 100 * metrics["data_wait_share"])
        elif progress:
            val_text = " ".join(f"{k[len('val_dice_'):]} {v:.3f}" for k, v in metrics.items() if k.startswith("val_dice_") and k != "val_dice_mean")
            log.info("epoch %d/%d: loss %.4f  val dice %.4f (%s)  best %.4f @ epoch %d  lr %.2e  %.1f s (data wait %.0f%%)", epoch + 1, cfg.epochs,
                     metrics["train_loss"], metrics["val_dice_mean"], val_text, best, best_epoch + 1, metrics["lr"], metrics["epoch_seconds"], 100 * metrics["data_wait_share"])
        rng_states = ddp.all_gather_object(_rng_state(device), ctx)
        if ctx.is_main:
            _save_checkpoint(out_dir / CHECKPOINT, {
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

    final_state = engine.network.state_dict()
    digests = ddp.check_in_sync(final_state, ctx) if not stopped_by_main else [ddp.state_digest(final_state)]
    result = TrainResult(best_val_dice=float(best), best_epoch=best_epoch, epochs_run=len(history), history=history,
                         seconds_per_step=float(np.median(step_times)) if step_times else 0.0, weights_sha256=digests[ctx.rank if len(digests) > 1 else 0],
                         world_size=ctx.world_size, rank_weights_sha256=digests, metric=metric)
    if write_package and ctx.is_main and best_state:
        score = {"best_val_dice": result.best_val_dice} if task.output != "classes" else {"best_val_balanced_accuracy": result.best_val_dice}
        training = {"config": dataclasses.asdict(cfg), **score, "val_metric": metric, "best_epoch": best_epoch, "epochs_run": result.epochs_run,
                    "seconds_per_step": result.seconds_per_step, "device": str(device), "world_size": ctx.world_size,
                    "precision": str(engine.amp_dtype or torch.float32).replace("torch.", "")}
        post = {} if task.output == "classes" else choose_postprocessing(engine.network, best_state, val_cases, plans, config.patch_size, list(config.spacing),
                                                                         cfg.val_overlap, device, task.regions or None)
        if post and progress:
            log.info("postprocessing chosen on %d validation case(s): minimum volumes %s mm³ (%s %.4f → %.4f)", post["validation_cases"],
                     post["min_volume_mm3"] or "none", post["metric"], post["score_before"], post["score_after"])
        result.model_dir = save_model_package(out_dir / "model", best_state, preprocessed_dir, cfg.configuration, training, postprocessing=post, network=topology,
                                              previous_stage=previous[0] if previous else None, previous_stage_dir=previous[1] if previous else None)
    return result


def _restore(ckpt: dict[str, Any], engine: _Engine, cfg: TrainConfig, ctx: ddp.DistContext) -> tuple[int, float, int, list[dict[str, float]], dict[str, torch.Tensor] | None]:
    """Load a checkpoint into the engine and this rank's RNGs; returns (next epoch, best, best epoch, history, best state)."""
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
    _set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0], ctx.device)
    return int(ckpt["epoch"]) + 1, float(ckpt["best"]), int(ckpt["best_epoch"]), list(ckpt["history"]), ckpt.get("best_state") or None


def _run_epoch(engine: _Engine, cfg: TrainConfig, epoch: int, train_cases: list[Any], val_cases: list[Any], plans: schemas.Plans,
               config: schemas.Configuration, batch_size: int, ctx: ddp.DistContext, progress: bool, step_times: list[float], task: _Task | None = None) -> dict[str, float]:
    """One epoch on this rank: training steps, validation, metrics reduced over the ranks."""
    task = task or _Task()
    device = ctx.device
    lr = float(engine.optimizer.param_groups[0]["lr"])
    shard, seed = ddp.shard(train_cases, ctx, epoch, cfg.seed), ddp.epoch_seed(cfg.seed, epoch, ctx.rank)
    if task.output == "classes":
        sampler: Any = _make_volume_sampler(shard, task, batch_size, cfg, seed)
    else:
        sampler = _make_sampler(shard, config.patch_size, batch_size, cfg, seed)
    if cfg.loader_prefetch > 0:  # batches prepared by a loader thread while the network trains
        sampler = PrefetchSampler(sampler, cfg.iterations_per_epoch, cfg.loader_prefetch)
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
    engine.scheduler.step()
    train_s = time.perf_counter() - t_epoch

    t_val = time.perf_counter()
    mine = ddp.split_evenly(val_cases, ctx)
    if task.output == "classes":
        sums = classification_sums(engine.network, mine, task, device)
    else:
        sums = validation_sums(engine.network, mine, plans, config.patch_size, cfg.val_overlap, device, task.regions or None)
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


def _deep_supervision_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain loss, or for deep supervision (N×S×K×…) a weighted sum over scales, weights halving per scale."""
    if out.ndim == y.ndim + 1:
        weights = [0.5**i for i in range(out.shape[1])]
        norm = sum(weights)
        return sum(w / norm * loss_fn(out[:, i], y) for i, w in enumerate(weights))
    return loss_fn(out, y)
