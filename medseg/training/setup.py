"""What a run trains, decided from the dataset's task and the configuration: network, loss, outputs, cases.

The dataset's task (:class:`medseg.task.Task`) fills in what :class:`~medseg.training.config.TrainConfig` leaves
to it (``network: auto``, ``loss: auto``) and says what the network's outputs are:

- ``labels``: one softmax output per label value (``dice_ce`` and the other softmax losses);
- ``regions``: overlapping regions trained as nnU-Net trains BraTS (Isensee et al. 2021, "nnU-Net for brain
  tumor segmentation"): one sigmoid output per region of dataset.json ``regions`` with a sigmoid loss
  (``region_bce_dice``); validation Dice per region from sigmoid > 0.5; inference turns the region
  probabilities back into labels (:func:`medseg.task.regions_to_labels`);
- ``classes``: a classification dataset trains ``classifier3d`` on whole preprocessed volumes
  (:func:`~medseg.preprocessing.classifier_input.fit_volume`), with each case's class and, when the dataset
  has the ``age`` covariate, the age from the ingested dataset's ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.task import Task
from medseg.training.config import AUTO, TrainConfig
from medseg.training.sampler import PatchSampler, PreprocessedCase, VolumeCase, VolumeSampler


@dataclass
class TrainingTarget:
    """What the network's outputs are (``labels`` | ``regions`` | ``classes``) and what the run needs to feed and
    score them."""

    output: str = "labels"
    regions: dict[str, list[int]] = field(default_factory=dict)  # regions: name → labels, in output-channel order
    labels: list[int] = field(default_factory=list)  # every label value of the dataset (regions → labels)
    classes: list[str] = field(default_factory=list)  # classes: names in output order
    input_size: list[int] = field(default_factory=list)  # classes: the network's input (fit_volume)
    input_scale: float = 1.0
    use_age: bool = False
    task: Task | None = None  # the dataset's task (postprocessing, reporting)

    @property
    def metric(self) -> str:
        """The validation metric that picks the best epoch (higher is better)."""
        return "val_balanced_accuracy" if self.output == "classes" else "val_dice_mean"

    def package_fields(self) -> dict[str, Any]:
        """What the model package's ``network`` entry records about the outputs (:func:`~medseg.inference.package.network_output`)."""
        if self.output == "regions":
            return {"output": "regions", "regions": {k: list(v) for k, v in self.regions.items()}}
        if self.output == "classes":
            return {"output": "classes", "classes": list(self.classes)}
        return {"output": "labels"}


def resolve_auto(cfg: TrainConfig, task: Task, config: schemas.Configuration) -> TrainConfig:
    """``cfg`` with ``network: auto`` / ``loss: auto`` replaced by the task's choice for ``cfg.configuration``, and the
    options the task implies: a 2D U-Net slices along the plan's slice axis; a classifier takes the age when the
    dataset has it (unless ``network_options`` say otherwise)."""
    network = task.default_network(cfg.configuration) if cfg.network == AUTO else cfg.network
    loss = task.default_loss() if cfg.loss == AUTO else cfg.loss
    options = dict(cfg.network_options)
    if cfg.network == AUTO:
        for key, value in task.default_network_options().items():
            options.setdefault(key, value)
    if network == "unet2d" and config.slice_axis is not None:
        options.setdefault("slice_axis", int(config.slice_axis))
    return dataclasses.replace(cfg, network=network, loss=loss, network_options=options)


def resolve_topology(cfg: TrainConfig, config: schemas.Configuration, out_channels: int | None = None) -> dict[str, Any]:
    """The segmentation network ``cfg.network`` (with ``cfg.network_options``) on the plan's topology and patch
    size, as the self-contained dict the model package stores (:func:`medseg.networks.registry.network_topology`).
    ``out_channels``: instead of the plan's (one per label), e.g. one per region.

    Raises:
        MedsegError: an unknown network or option, a classification network, a patch size it cannot take.
    """
    from medseg.networks import registry as networks

    if cfg.network in networks.NETWORKS and networks.NETWORKS[cfg.network].task != "segmentation":
        raise MedsegError(f"network {cfg.network!r} is a {networks.NETWORKS[cfg.network].task} network: the trainer trains it on classification datasets "
                          "(dataset.json task: classification), this one is a segmentation dataset")
    patch = training_patch(cfg.network, config)
    try:
        topology = networks.network_topology(cfg.network, config.network, out_channels=out_channels, patch_size=patch, **cfg.network_options)
    except ValueError as exc:
        raise MedsegError(f"network: {exc}") from None
    return {**topology, "patch_size": [int(p) for p in patch]}


def training_patch(network: str, config: schemas.Configuration) -> list[int]:
    """The patch ``network`` trains on (and the sliding window uses): the plan's ``network_patch_sizes`` entry for it,
    else the plan's patch; plans written before that field existed get it computed here."""
    from medseg.networks import registry as networks

    if network in config.network_patch_sizes:
        return [int(p) for p in config.network_patch_sizes[network]]
    fitted = networks.accepted_patch(network, config.patch_size, config.median_shape, config.network.get("strides")) if network in networks.NETWORKS else None
    return fitted if fitted is not None else [int(p) for p in config.patch_size]


def is_sigmoid_loss(cfg: TrainConfig) -> bool:
    """The loss trains one sigmoid output per region (``region_bce_dice``, or a loss with ``sigmoid: true``)."""
    from medseg.training import losses

    try:
        spec = losses.loss_spec(cfg.loss)
    except ValueError as exc:
        raise MedsegError(f"loss: {exc}") from None
    return spec.activation == "sigmoid" or bool(cfg.loss_options.get("sigmoid"))


def resolve_loss(cfg: TrainConfig) -> torch.nn.Module:
    """The loss ``cfg.loss`` with ``cfg.loss_options``: a softmax loss, or a sigmoid (region) loss whose
    ``loss_options`` hold the ``regions`` (:func:`segmentation_target` fills them in from dataset.json).

    Raises:
        MedsegError: an unknown loss or option, or a sigmoid loss without regions.
    """
    from medseg.training import losses

    try:
        spec = losses.loss_spec(cfg.loss)
        if is_sigmoid_loss(cfg) and not cfg.loss_options.get("regions"):
            softmax = ", ".join(n for n, s in losses.LOSSES.items() if s.activation == "softmax" and "segmentation" in s.tasks)
            raise MedsegError(f"loss {cfg.loss!r} trains one sigmoid output per region of dataset.json `regions`, and this "
                              f"dataset has no regions: use a softmax loss ({softmax})")
        if "segmentation" not in spec.tasks and "classification" not in spec.tasks:
            raise MedsegError(f"loss {cfg.loss!r} trains neither segmentation nor classification")
        return losses.build_loss(cfg.loss, **cfg.loss_options)
    except ValueError as exc:
        raise MedsegError(f"loss: {exc}") from None


def segmentation_target(cfg: TrainConfig, task: Task, config: schemas.Configuration) -> tuple[TrainConfig, TrainingTarget, dict[str, Any]]:
    """``(cfg resolved, target, topology)`` of a segmentation run: region outputs for a sigmoid loss on a dataset
    with regions, else label outputs."""
    from medseg.training import losses

    cfg = resolve_auto(cfg, task, config)
    labels = task.label_values
    if is_sigmoid_loss(cfg) and (cfg.loss_options.get("regions") or task.regions):
        regions = {str(k): [int(v) for v in vs] for k, vs in (cfg.loss_options.get("regions") or task.regions).items()}
        try:
            from medseg.task import region_signatures

            region_signatures(regions, labels)  # the label map can be rebuilt from the region outputs
        except ValueError as exc:
            raise MedsegError(f"region-based training: {exc}") from None
        if "regions" in losses.loss_spec(cfg.loss).options:
            cfg = dataclasses.replace(cfg, loss_options={**cfg.loss_options, "regions": regions})
        target = TrainingTarget("regions", regions=regions, labels=labels, task=task)
        topology = resolve_topology(cfg, config, out_channels=len(regions))
    else:
        target = TrainingTarget("labels", labels=labels, task=task)
        topology = resolve_topology(cfg, config)
    return cfg, target, {**topology, **target.package_fields()}


def classification_target(cfg: TrainConfig, task: Task, plans: schemas.Plans, config: schemas.Configuration) -> tuple[TrainConfig, TrainingTarget, dict[str, Any]]:
    """``(cfg resolved, target, topology)`` of a classifier run: ``classifier3d`` (or another classification network)
    with a classification loss, its input size and zoom chosen once for every case."""
    from medseg.networks import registry as networks
    from medseg.training import losses

    cfg = resolve_auto(cfg, task, config)
    if cfg.network not in networks.NETWORKS:
        raise MedsegError(f"network: unknown network {cfg.network!r} (known: {', '.join(networks.NETWORKS)})")
    if networks.NETWORKS[cfg.network].task != "classification":
        raise MedsegError(f"network {cfg.network!r} is a segmentation network; a classification dataset trains "
                          f"{', '.join(n for n, s in networks.NETWORKS.items() if s.task == 'classification')} (or network: auto)")
    try:
        spec = losses.loss_spec(cfg.loss)
    except ValueError as exc:
        raise MedsegError(f"loss: {exc}") from None
    if "classification" not in spec.tasks:
        raise MedsegError(f"loss {cfg.loss!r} is not a classification loss (use one of {', '.join(n for n, s in losses.LOSSES.items() if 'classification' in s.tasks)}, "
                          "or loss: auto)")
    options = dict(cfg.network_options)
    size = [int(v) for v in (options.get("input_size") or config.patch_size)]
    if options.get("input_scale") is None:  # one zoom for every case: the median case fits the input (never enlarged)
        options["input_scale"] = min(1.0, *(s / max(int(m), 1) for s, m in zip(size, config.median_shape)))
    if options.get("use_age") and not task.uses_age_input:
        raise MedsegError("network_options use_age: this dataset has no age covariate (dataset.json covariates)")
    try:
        topology = networks.network_topology(cfg.network, None, in_channels=len(plans.channel_names), out_channels=len(task.classes), patch_size=size, **options)
    except ValueError as exc:
        raise MedsegError(f"network: {exc}") from None
    opts = topology["options"]
    target = TrainingTarget("classes", classes=list(task.classes), input_size=list(opts["input_size"]), input_scale=float(opts["input_scale"]),
                            use_age=bool(opts.get("use_age")), task=task)
    return cfg, target, {**topology, **target.package_fields()}


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


def volume_cases(folder: Path, ids: list[str], target: TrainingTarget, targets: dict[str, dict[str, Any]]) -> list[VolumeCase]:
    """The classifier's cases ``ids`` with their class index and age; every problem listed in one error."""
    index = {name: i for i, name in enumerate(target.classes)}
    cases, problems = [], []
    for case_id in ids:
        found = targets.get(case_id)
        if found is None or found["class"] is None:
            problems.append(f"{case_id}: no class in manifest.json")
        elif found["class"] not in index:
            problems.append(f"{case_id}: class {found['class']!r} is not one of {target.classes}")
        elif target.use_age and found["age"] is None:
            problems.append(f"{case_id}: no age (covariates.age), which the network takes")
        else:
            cases.append(VolumeCase(folder, case_id, index[found["class"]], found["age"]))
    if problems:
        raise MedsegError(f"classification targets: {'; '.join(problems[:10])}" + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    return cases


def make_sampler(cases: list[PreprocessedCase], patch_size: list[int], batch_size: int, cfg: TrainConfig, seed: int) -> PatchSampler:
    """The patch sampler of one rank for one epoch (the one place that knows the sampler's constructor).
    Patch positions, mirroring and augmentation all draw from its one generator, seeded with ``seed``."""
    settings = cfg.augmentation_config()
    if settings is None:
        return PatchSampler(cases, patch_size, batch_size, cfg.foreground_share, seed=seed, augmentation=None)
    from medseg.training.augmentation import build_augmentation

    return PatchSampler(cases, patch_size, batch_size, cfg.foreground_share, seed=seed, augmentation=build_augmentation(patch_size, settings))


def make_volume_sampler(cases: list[VolumeCase], target: TrainingTarget, batch_size: int, cfg: TrainConfig, seed: int) -> VolumeSampler:
    """The whole-volume sampler of one rank for one epoch (classification); ``augmentation``: left-right mirroring.

    Raises:
        MedsegError: ``augmentation`` is a mapping of knobs, which the whole-volume sampler cannot honour."""
    if isinstance(cfg.augmentation, dict):  # refused rather than reduced to mirroring without a word
        raise MedsegError("a classifier trains on whole volumes with augmentation true (left-right mirroring) or false; the knobs of an "
                          f"augmentation mapping ({', '.join(sorted(cfg.augmentation))}) apply to segmentation patches only")
    return VolumeSampler(cases, target.input_size, target.input_scale, batch_size, seed=seed, mirror_axes=(0,) if cfg.augmentation else (), ages=target.use_age)


__all__ = ["TrainingTarget", "classification_target", "classification_targets", "is_sigmoid_loss", "make_sampler", "make_volume_sampler", "resolve_auto",
           "resolve_loss", "resolve_topology", "segmentation_target", "volume_cases"]
