"""What the dataset's task asks of every stage: one object, built from ``dataset.json``.

nnU-Net keeps labels, regions and the output activation in one place, its ``LabelManager``, which training
and inference both ask. :class:`Task` does the same for the whole platform: ingest writes ``dataset.json``,
and every later stage (planning, training, evaluation, the registry's gate, the model server, the viewer)
asks the task instead of deciding for itself. No module outside this one (and the ingest adapters, which
read the challenges' own layouts) names a challenge's regions or label values.

Kinds of task (``dataset.json`` fields in brackets):

============================  ===============================  ===========================  =======================
question                      segmentation (labels, regions)   2D slice set (slice_axis)    classification (task)
============================  ===============================  ===========================  =======================
configuration (auto)          3d_fullres (2d when strongly     2d                           3d_fullres (whole volume)
                              anisotropic, as nnU-Net)
network, loss (auto)          unet; region_bce_dice when       unet2d; dice_ce              classifier3d (+ covariates);
                              regions overlap, else dice_ce                                 ce
output activation             softmax over labels, sigmoid     softmax                      softmax over classes
                              per region
reported groups               regions, else each foreground    as segmentation              ``all`` (and per class)
                              label
primary metric                dice, or ``primary_metric``      ``primary_metric`` (iou for  log_loss (lower is better)
                              (higher is better)               the Kaggle LGG slices)
gate                          paired bootstrap of per-case     as segmentation              paired bootstrap of per-
                              metric per group                                              subject log-loss (or AUC)
endpoint outputs              ``segmentation`` NIfTI,          + one 2D image in, a mask    ``probabilities`` FP32 [K],
                              ``volumes_ml`` FP32 [G]          in the same format out       ``label`` BYTES [1]
============================  ===============================  ===========================  =======================

Known label conventions (the presets ingest adapters describe their layouts with) live here too:
:data:`BRATS2023`, :data:`BRATS2024`; the lesion-wise evaluation settings are named after them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError

KINDS = ("segmentation", "classification")
OUTPUTS = ("labels", "regions", "classes")
CONFIGURATIONS = ("auto", "2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
CASCADE = "3d_cascade_fullres"
#: nnU-Net's rule for choosing 2D: the coarsest axis more than 3× the finest (ExperimentPlanner's anisotropy threshold).
ANISOTROPY_FOR_2D = 3.0
#: The group name of a classifier's case-level metrics (``metrics.json`` ``mean["all"]``).
ALL = "all"
#: What a ``thresholds`` key of ``GROUP`` alone applies to: the task's primary metric.
THRESHOLD_SEPARATOR = "/"


# --------------------------------------------------------------------------- known conventions
@dataclass(frozen=True)
class LabelConvention:
    """A published label convention: channel names, label values, evaluation regions, lesion-wise setting."""

    name: str
    channels: tuple[str, ...]
    labels: Mapping[str, int]
    regions: Mapping[str, tuple[int, ...]]
    lesionwise: str | None = None

    def labels_dict(self) -> dict[str, int]:
        return dict(self.labels)

    def regions_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.regions.items()}


#: BraTS 2023 (GLI, MEN, MET, PED, SSA): 1 NETC, 2 SNFH, 3 ET; whole tumour, tumour core, enhancing tumour.
BRATS2023 = LabelConvention(
    "brats2023", ("t1n", "t1c", "t2w", "t2f"), {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3},
    {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}, lesionwise="brats2023",
)
#: BraTS 2023 metastases: the glioma labels, scored with the metastasis lesion-wise setting (dilation 1, 2 mm³).
BRATS2023_METS = LabelConvention("brats2023_mets", BRATS2023.channels, BRATS2023.labels, BRATS2023.regions, lesionwise="brats2023_mets")
#: BraTS 2024 post-treatment glioma: adds 4 RC (resection cavity, not tumour); every label is also reported alone.
BRATS2024 = LabelConvention(
    "brats2024", BRATS2023.channels, {**BRATS2023.labels, "RC": 4},
    {"WT": (1, 2, 3), "TC": (1, 3), "NETC": (1,), "SNFH": (2,), "ET": (3,), "RC": (4,)}, lesionwise="brats2024",
)
CONVENTIONS: dict[str, LabelConvention] = {c.name: c for c in (BRATS2023, BRATS2023_METS, BRATS2024)}
#: Label names of an enhancing / necrotic pair (the small-enhancing-tumour rule): enhancing, then necrosis names.
_ENHANCING, _NECROSIS = ("ET",), ("NETC", "NCR")


def configuration_stages(configuration: str) -> tuple[str, ...]:
    """The planned configurations a trained configuration consists of, in training order: nnU-Net's cascade is
    3d_lowres, then 3d_fullres on its segmentation; any other is itself. Tuning uses the first, and the model
    package's grid is the last's."""
    return ("3d_lowres", "3d_fullres") if configuration == CASCADE else (configuration,)


# --------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class MetricSpec:
    """One reported metric: its key in ``metrics.json`` and which direction is better."""

    name: str
    higher_is_better: bool

    def passes(self, value: float, threshold: float) -> bool:
        """An absolute threshold: at least ``threshold`` (higher is better) or at most (lower is better)."""
        return value >= threshold if self.higher_is_better else value <= threshold


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("dice", True), MetricSpec("iou", True), MetricSpec("sensitivity", True), MetricSpec("specificity", True),
    MetricSpec("hd95", False), MetricSpec("assd", False), MetricSpec("pq_dsc", True), MetricSpec("pq", True),
    MetricSpec("lesionwise_dice_2023", True), MetricSpec("lesionwise_hd95_2023", False),
    MetricSpec("lesionwise_dice_2024", True), MetricSpec("lesionwise_hd95_2024", False),
    MetricSpec("accuracy", True), MetricSpec("balanced_accuracy", True), MetricSpec("auc_macro", True), MetricSpec("auc", True),
    MetricSpec("log_loss", False),
)}
#: What every segmentation group reports to KFP Metrics and MLflow (when present in metrics.json).
SEGMENTATION_REPORTED = ("dice", "iou", "hd95", "assd", "sensitivity", "pq_dsc", "lesionwise_dice_2023", "lesionwise_hd95_2023",
                         "lesionwise_dice_2024", "lesionwise_hd95_2024")
#: What a classifier reports: for ``all``, and the one-vs-rest AUC per class.
CLASSIFICATION_REPORTED = ("accuracy", "balanced_accuracy", "auc_macro", "log_loss", "auc")
#: Gate statistics of a classifier: the mean paired difference of per-subject log-loss, or the macro AUC difference.
CLASSIFICATION_GATES = ("log_loss", "auc_macro")


def metric_spec(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise MedsegError(f"unknown metric {name!r} (known: {', '.join(METRICS)})") from None


# --------------------------------------------------------------------------- tensors of the endpoint
@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model's V2 endpoint, as ``GET /v2/models/NAME`` lists it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.optional:
            out["optional"] = True
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        return out


# --------------------------------------------------------------------------- labels ↔ regions
def region_signatures(regions: Mapping[str, Sequence[int]], labels: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
    """Labels (background 0 first) and their membership matrix (L, R): ``S[l, r] = 1`` when label l ∈ region r.

    Raises:
        ValueError: two labels (or a label and the background) in exactly the same regions: region outputs
            cannot tell them apart.
    """
    values = sorted({0, *(int(v) for vs in regions.values() for v in vs), *(int(v) for v in (labels or []))})
    sig = np.array([[v in set(map(int, members)) for members in regions.values()] for v in values], dtype=np.float32)
    seen: dict[tuple, int] = {}
    for v, row in zip(values, sig):
        key = tuple(row)
        if key in seen:
            raise ValueError(f"labels {seen[key]} and {v} belong to the same regions {[n for n, b in zip(regions, row) if b] or '(none)'}: "
                             f"regions {dict(regions)} cannot be turned back into labels")
        seen[key] = v
    return values, sig


def labels_to_regions(labels: Any, regions: Mapping[str, Sequence[int]]) -> Any:
    """Region targets from a label map: channel r is 1 where the label is one of ``regions[r]``'s labels.

    Args:
        labels: integer label map (B, 1, *S), a torch tensor or a numpy array.
        regions: name → labels, in output-channel order (dataset.json ``regions``).

    Returns:
        float32 (B, R, *S) of the same kind (torch or numpy) as ``labels``.
    """
    if not regions:
        raise ValueError("no regions: region-based training needs dataset.json `regions`")
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"expected a label map (B, 1, *S), got shape {tuple(labels.shape)}")
    if isinstance(labels, np.ndarray):
        return np.concatenate([np.isin(labels, list(v)) for v in regions.values()], axis=1).astype(np.float32)
    import torch

    return torch.cat([torch.isin(labels, torch.as_tensor(list(v), device=labels.device)) for v in regions.values()], dim=1).float()


def regions_to_labels(probs: Any, regions: Mapping[str, Sequence[int]], labels: Sequence[int] | None = None, channel_axis: int | None = None) -> Any:
    """A label map from region probabilities (sigmoid outputs): the inverse of :func:`labels_to_regions`.

    Each voxel gets the label whose region membership is most likely under independent regions:
    argmax_l Σ_r [S_lr log p_r + (1 − S_lr) log(1 − p_r)] (S from :func:`region_signatures`). Where the
    thresholded regions (p_r > 0.5) are consistent with a label, that label is the answer, which for nested
    regions equals nnU-Net's rule of painting regions from the largest to the smallest; inconsistent voxels get
    the nearest consistent label.

    Args:
        probs: (B, R, X, Y, Z) or (R, X, Y, Z) probabilities in [0, 1], torch or numpy.
        regions: name → labels, in the channel order of ``probs``.
        labels: every label value of the dataset (default: those the regions mention, and 0).
        channel_axis: the region axis; default 1 for 5-D input, else 0.

    Returns:
        Integer labels, ``probs``' shape without the region axis, int64, the same kind as ``probs``.
    """
    import torch

    values, sig = region_signatures(regions, labels)
    is_numpy = isinstance(probs, np.ndarray)
    p = torch.from_numpy(np.asarray(probs, dtype=np.float32)) if is_numpy else probs.float()
    channel = (1 if p.ndim == 5 else 0) if channel_axis is None else int(channel_axis)
    if p.shape[channel] != len(regions):
        raise ValueError(f"expected {len(regions)} region channels ({', '.join(regions)}), got shape {tuple(p.shape)}")
    p = p.clamp(1e-6, 1 - 1e-6)
    s = torch.from_numpy(sig).to(p.device)
    loglik = torch.einsum("lr,...r->...l", s, p.movedim(channel, -1).log()) + torch.einsum("lr,...r->...l", 1 - s, (1 - p).movedim(channel, -1).log())
    out = torch.as_tensor(values, device=p.device)[loglik.argmax(-1)]
    return out.cpu().numpy() if is_numpy else out


# --------------------------------------------------------------------------- the task
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


class Task:
    """The task of one dataset: kind, labels and regions or classes, channels, covariates, and every decision
    that follows from them. Build it with :meth:`from_dataset` (a :class:`~medseg.schemas.DatasetJson`) or
    :meth:`from_folder` (any folder holding ``dataset.json``: a dataset, a preprocessed folder, a model package).
    """

    def __init__(self, dataset: Any):
        kind = str(getattr(dataset, "task", "") or "segmentation")
        if kind not in KINDS:
            raise MedsegError(f"dataset.json task {kind!r} is not one of {', '.join(KINDS)}")
        self.dataset = dataset
        self.kind = kind
        self.name = str(dataset.name)
        self.channels: list[str] = list(dataset.channels)
        self.labels: dict[str, int] = {str(k): int(v) for k, v in dataset.labels.items()}
        self.regions: dict[str, list[int]] = {str(k): [int(x) for x in v] for k, v in (dataset.regions or {}).items()}
        self.slice_axis: int | None = None if getattr(dataset, "slice_axis", None) is None else int(dataset.slice_axis)
        self.covariates: list[str] = [str(c) for c in (getattr(dataset, "covariates", None) or [])]
        self.source_format = str(getattr(dataset, "source_format", "") or "")
        self._primary_metric = str(getattr(dataset, "primary_metric", "") or "")
        self._lesionwise = str(getattr(dataset, "lesionwise", "") or "")
        if self.is_classification:
            self.classes = self._classes()
        else:
            self.classes = []
            if 0 not in self.labels.values():
                raise MedsegError(f"segmentation labels must include the background 0, got {self.labels}")
            unknown = {r: [v for v in vs if v not in self.labels.values()] for r, vs in self.regions.items()}
            unknown = {r: vs for r, vs in unknown.items() if vs}
            if unknown:
                raise MedsegError(f"regions name label values that dataset.json labels do not define: {unknown}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise MedsegError(f"dataset.json slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self._primary_metric:
            metric_spec(self._primary_metric)

    @classmethod
    def from_dataset(cls, dataset: Any) -> Task:
        return cls(dataset)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Task:
        """The task of the ``dataset.json`` in ``folder`` (a dataset, a preprocessed folder or a model package)."""
        from medseg import schemas

        return cls(schemas.DatasetJson.load(Path(folder)))

    def __repr__(self) -> str:
        what = f"classes {self.classes}" if self.is_classification else (f"regions {list(self.regions)}" if self.regions else f"labels {list(self.labels)}")
        return f"Task({self.kind}{' 2D slices' if self.is_slice_set else ''}, {what}, channels {self.channels})"

    # -------------------------------------------------------------- kind
    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def is_segmentation(self) -> bool:
        return self.kind == "segmentation"

    @property
    def is_slice_set(self) -> bool:
        """A stack of 2D slices annotated slice by slice (Kaggle LGG): trained and served in 2D."""
        return self.is_segmentation and self.slice_axis is not None

    @property
    def signature(self) -> dict[str, Any]:
        """What must match between versions of one registered model: kind, channels, labels or classes, regions."""
        out: dict[str, Any] = {"kind": self.kind, "channels": list(self.channels)}
        if self.is_classification:
            out.update(classes=list(self.classes), covariates=list(self.covariates))
        else:
            out.update(labels=dict(sorted(self.labels.items(), key=lambda kv: kv[1])), regions=dict(self.regions))
        return out

    def default_model_name(self) -> str:
        """A registered-model name for this task when the parameters leave it to the task: ``<source>-<kind>``."""
        base = self.source_format or self.name
        return f"{_slug(base)}-{'classifier' if self.is_classification else 'segmentation'}"

    # -------------------------------------------------------------- labels, regions, classes
    def _classes(self) -> list[str]:
        items = sorted((int(v), str(k)) for k, v in self.labels.items())
        if [i for i, _ in items] != list(range(len(items))) or len(items) < 2:
            raise MedsegError(f"classification labels must map at least two classes to 0..n-1, got {self.labels}")
        return [name for _, name in items]

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels.values())

    @property
    def foreground_labels(self) -> list[int]:
        return [v for v in self.label_values if v != 0]

    @property
    def label_names(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items()}

    @property
    def n_label_values(self) -> int:
        """Softmax outputs of a label-based network: one per value 0..max label."""
        return max(self.label_values) + 1

    @property
    def has_regions(self) -> bool:
        """Overlapping (nested) regions, as BraTS's: trained region-based with one sigmoid per region (nnU-Net's
        ``has_regions``: some region unites more than one label)."""
        return self.is_segmentation and any(len(v) > 1 for v in self.regions.values())

    def labels_to_regions(self, labels: Any) -> Any:
        return labels_to_regions(labels, self.regions)

    def regions_to_labels(self, probs: Any, channel_axis: int | None = None) -> Any:
        return regions_to_labels(probs, self.regions, self.label_values, channel_axis)

    def check_regions_invertible(self) -> None:
        """Region outputs must be turnable back into labels (no two labels in exactly the same regions)."""
        try:
            region_signatures(self.regions, self.label_values)
        except ValueError as exc:
            raise MedsegError(f"region-based training: {exc}") from None

    @property
    def enhancing_pair(self) -> tuple[int, int] | None:
        """(enhancing, necrosis) label values when the labels have such a pair: the small-enhancing-tumour rule
        (a case whose whole predicted enhancing tumour is tiny gets it relabelled as necrosis) applies then."""
        upper = {name.upper(): value for name, value in self.labels.items()}
        enhancing = next((upper[n] for n in _ENHANCING if n in upper), None)
        necrosis = next((upper[n] for n in _NECROSIS if n in upper), None)
        return None if enhancing is None or necrosis is None else (enhancing, necrosis)

    # -------------------------------------------------------------- what is trained
    def output_for_loss(self, sigmoid_loss: bool) -> str:
        """What the network's outputs are: ``classes``, ``regions`` (a sigmoid loss on a dataset with regions) or ``labels``."""
        if self.is_classification:
            return "classes"
        return "regions" if sigmoid_loss and self.regions else "labels"

    @staticmethod
    def activation(output: str) -> str:
        """The output activation of ``output`` (``labels``/``classes``: softmax; ``regions``: sigmoid)."""
        if output not in OUTPUTS:
            raise MedsegError(f"unknown network output {output!r} (known: {', '.join(OUTPUTS)})")
        return "sigmoid" if output == "regions" else "softmax"

    def default_loss(self) -> str:
        """``auto`` loss: cross-entropy for a classifier, region BCE + Dice for overlapping regions (nnU-Net's BraTS
        recipe), else Dice + cross-entropy."""
        if self.is_classification:
            return "ce"
        return "region_bce_dice" if self.has_regions else "dice_ce"

    def default_network(self, configuration: str) -> str:
        """``auto`` network: the classifier, a 2D U-Net for the 2d configuration, else the plan's U-Net."""
        if self.is_classification:
            return "classifier3d"
        return "unet2d" if configuration == "2d" else "unet"

    def default_network_options(self) -> dict[str, Any]:
        """Options the ``auto`` network gets from the task: a classifier takes the age when the dataset has it."""
        return {"use_age": "age" in self.covariates} if self.is_classification else {}

    def choose_configuration(self, requested: str, planned: Sequence[str], spacing: Sequence[float] | None = None) -> tuple[str, str]:
        """The configuration to train and why: ``requested`` unless it is ``auto``, which picks as nnU-Net does.

        ``auto``: ``2d`` for a slice set, or when the full-resolution spacing is strongly anisotropic (the coarsest
        axis more than :data:`ANISOTROPY_FOR_2D` × the finest; nnU-Net trains 2D there); otherwise ``3d_fullres``.
        A classifier trains on whole volumes of the ``3d_fullres`` grid.

        Args:
            requested: one of :data:`CONFIGURATIONS`.
            planned: the configurations the plan has (``plans.configurations``).
            spacing: the ``3d_fullres`` target spacing (mm), for the anisotropy rule.

        Raises:
            MedsegError: an unknown name, or one the plan does not have.
        """
        if requested not in CONFIGURATIONS:
            raise MedsegError(f"unknown configuration {requested!r} (choose from {', '.join(CONFIGURATIONS)})")
        planned = list(planned)
        if requested != "auto":
            missing = [c for c in configuration_stages(requested) if c not in planned]
            if missing:
                raise MedsegError(f"configuration {requested!r} needs {', '.join(missing)}, which the plan does not have for this dataset "
                                  f"(planned: {', '.join(planned)})")
            return requested, "requested"
        if self.is_classification:
            return "3d_fullres", "classification: whole volumes on the 3d_fullres grid"
        if self.is_slice_set and "2d" in planned:
            return "2d", f"a stack of 2D slices (dataset.json slice_axis {self.slice_axis})"
        if "3d_fullres" not in planned:
            return "2d", "the data are 2D (no 3d_fullres configuration)"
        if spacing is not None and min(spacing) > 0 and max(spacing) / min(spacing) > ANISOTROPY_FOR_2D and "2d" in planned:
            return "2d", f"strongly anisotropic spacing {[round(float(s), 3) for s in spacing]} mm (ratio > {ANISOTROPY_FOR_2D:g})"
        return "3d_fullres", "3D volumes"

    def candidate_configurations(self, requested: str, planned: Sequence[str], chosen: str = "") -> list[str]:
        """The configurations cross-validation chooses among (nnU-Net's ``find_best_configuration``), ``chosen`` first.

        ``requested``: ``""``/``none`` → none (only the chosen configuration is trained, nothing is selected);
        ``all`` → nnU-Net's candidates for this task: ``2d`` and ``3d_fullres``, and ``3d_cascade_fullres`` when the
        plan has a ``3d_lowres`` (a slice set or a classifier has only one configuration, so none); or a
        comma-separated list of configurations the plan has (``2d,3d_fullres``). A single candidate selects nothing.

        Raises:
            MedsegError: an unknown name, or a configuration the plan does not have.
        """
        text = str(requested or "").strip().lower()
        planned = list(planned)
        if text in ("", "none"):
            return []
        if text == "all":
            if self.is_classification or self.is_slice_set or "3d_fullres" not in planned:
                return []
            names = [c for c in ("2d", "3d_fullres") if c in planned] + ([CASCADE] if "3d_lowres" in planned else [])
        else:
            names = [c.strip() for c in text.split(",") if c.strip()]
            for name in names:
                if name not in CONFIGURATIONS or name == "auto":
                    raise MedsegError(f"unknown candidate configuration {name!r} (choose from {', '.join(CONFIGURATIONS[1:])}, or all)")
                missing = [c for c in configuration_stages(name) if c not in planned]
                if missing:
                    raise MedsegError(f"candidate configuration {name!r} needs {', '.join(missing)}, which the plan does not have (planned: {', '.join(planned)})")
        ordered = ([chosen] if chosen in names else []) + [c for c in dict.fromkeys(names) if c != chosen]
        return ordered if len(ordered) > 1 else []

    def configurations_to_preprocess(self, requested: str) -> tuple[str, ...]:
        """What preprocessing prepares for ``requested``: every candidate for ``auto`` (the choice needs the plan)."""
        if requested == "auto":
            return ("2d", "3d_fullres") if not self.is_classification else ("3d_fullres",)
        return configuration_stages(requested)

    # -------------------------------------------------------------- reporting
    @property
    def reported_groups(self) -> dict[str, list[int]]:
        """What volumes and per-group metrics are reported for: the regions, or each foreground label alone.
        A classifier has none (its metrics are case-level, :data:`ALL`)."""
        if self.is_classification:
            return {}
        if self.regions:
            return {k: list(v) for k, v in self.regions.items()}
        return {k: [v] for k, v in self.labels.items() if v != 0}

    @property
    def primary_group(self) -> str:
        """The group the gate must see an improvement on: the first region (BraTS: whole tumour), else the first
        foreground label; ``all`` for a classifier."""
        if self.is_classification:
            return ALL
        return next(iter(self.reported_groups))

    @property
    def gate_groups(self) -> list[str]:
        """Groups compared by the gate (each must be non-inferior): every reported group; ``all`` for a classifier."""
        return [ALL] if self.is_classification else list(self.reported_groups)

    @property
    def primary_metric(self) -> str:
        """The per-case metric the gate compares and thresholds apply to: ``dataset.json`` ``primary_metric``, else
        ``dice`` (segmentation) or ``log_loss`` (classification)."""
        if self._primary_metric:
            return self._primary_metric
        return "log_loss" if self.is_classification else "dice"

    @property
    def primary_metric_spec(self) -> MetricSpec:
        return metric_spec(self.primary_metric)

    @property
    def validation_metric(self) -> str:
        """The per-epoch validation score that picks the best epoch (higher is better)."""
        return "val_balanced_accuracy" if self.is_classification else "val_dice_mean"

    def default_thresholds(self) -> dict[str, float]:
        """Absolute thresholds for the ``challenger`` alias when the parameters say ``auto``.

        Segmentation: the primary metric ≥ 0.5 on the primary group (a model that overlaps its target less than
        half is not a candidate). Classification: log-loss ≤ ln K, i.e. no worse than the uniform guess.
        """
        if self.is_classification:
            return {f"{ALL}{THRESHOLD_SEPARATOR}log_loss": round(math.log(len(self.classes)), 4)}
        return {f"{self.primary_group}{THRESHOLD_SEPARATOR}{self.primary_metric}": 0.5}

    def parse_threshold_key(self, key: str) -> tuple[str, str]:
        """``GROUP`` (the primary metric) or ``GROUP/METRIC`` → (group, metric)."""
        group, _, metric = str(key).partition(THRESHOLD_SEPARATOR)
        metric = metric or self.primary_metric
        metric_spec(metric)
        return group, metric

    @property
    def lesionwise(self) -> str | None:
        """The BraTS lesion-wise setting of the official scorer for this dataset (None when it does not apply).

        ``dataset.json`` ``lesionwise`` names it (``none`` turns it off); otherwise a dataset with exactly the labels
        and regions of a known convention gets that convention's setting."""
        if self.is_classification:
            return None
        if self._lesionwise:
            if self._lesionwise == "none":
                return None
            known = {c.lesionwise for c in CONVENTIONS.values()}
            if self._lesionwise not in known:
                raise MedsegError(f"dataset.json lesionwise {self._lesionwise!r} is not one of {sorted(known)} or 'none'")
            return self._lesionwise
        for conv in (BRATS2023, BRATS2024):
            if self.labels == dict(conv.labels) and {k: sorted(v) for k, v in self.regions.items()} == {k: sorted(v) for k, v in conv.regions.items()}:
                return conv.lesionwise
        return None

    @property
    def lesionwise_suffix(self) -> str | None:
        setting = self.lesionwise
        return None if setting is None else ("2024" if setting == "brats2024" else "2023")

    @property
    def postprocessing_metric(self) -> str:
        """What postprocessing choices (minimum component volumes) are scored by on validation cases."""
        suffix = self.lesionwise_suffix
        return f"lesionwise_dice_{suffix}" if suffix else "dice"

    def reported_metrics(self, mean: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The headline numbers of ``metrics.json`` ``mean`` as flat ``<GROUP>_<metric>`` → value: the same keys go
        to the KFP Metrics artefact and to MLflow (``test_<GROUP>_<metric>``). Non-finite values are left out."""
        out: dict[str, float] = {}
        if self.is_classification:
            for group, values in mean.items():
                for key in CLASSIFICATION_REPORTED:
                    value = (values or {}).get(key)
                    if isinstance(value, (int, float)) and math.isfinite(float(value)):
                        out[f"{group}_{key}"] = float(value)
            return out
        wanted = list(self.reported_groups) + [k for k in mean if k not in self.reported_groups]
        for group in wanted:
            values = mean.get(group) or {}
            for key in SEGMENTATION_REPORTED:
                value = values.get(key)
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    out[f"{group}_{key}"] = float(value)
        return out

    def headline(self, mean: Mapping[str, Mapping[str, float]]) -> str:
        """One line for logs: the primary metric per gate group."""
        metric = self.primary_metric
        parts = [f"{g} {metric} {float(mean[g][metric]):.4f}" for g in self.gate_groups if g in mean and metric in (mean[g] or {})]
        if self.is_classification and ALL in mean:
            parts += [f"{k} {float(mean[ALL][k]):.4f}" for k in ("accuracy", "balanced_accuracy", "auc_macro") if k in mean[ALL]]
        return ", ".join(parts)

    # -------------------------------------------------------------- the endpoint
    def endpoint_inputs(self) -> list[TensorSpec]:
        """The V2 inputs the model server takes: one NIfTI (BYTES) per channel, or one FP32 ``volume``; a slice set
        also one 2D ``image`` (PNG/TIFF, its colour channels the model's channels); a classifier its covariates."""
        out = [TensorSpec(c, "BYTES", (1,), optional=True, parameters={"content": "NIfTI-1 file (.nii or .nii.gz)"}) for c in self.channels]
        out.append(TensorSpec("volume", "FP32", (len(self.channels), -1, -1, -1), optional=True,
                              parameters={"content": "[C, Z, Y, X] intensities; parameters affine (required), spacing, channels"}))
        if self.is_slice_set:
            out.append(TensorSpec("image", "BYTES", (1,), optional=True,
                                  parameters={"content": f"one 2D PNG or TIFF image; colour channels = {','.join(self.channels)}"}))
        for name in self.covariates:
            if name == "age":
                out.append(TensorSpec("age", "FP32", (1,), optional=not self.uses_age_input, parameters={"unit": "years"}))
        return out

    @property
    def uses_age_input(self) -> bool:
        return self.is_classification and "age" in self.covariates

    def endpoint_outputs(self) -> list[TensorSpec]:
        """The V2 outputs the model server answers with."""
        if self.is_classification:
            return [TensorSpec("probabilities", "FP32", (len(self.classes),), parameters={"classes": ",".join(self.classes)}),
                    TensorSpec("label", "BYTES", (1,), parameters={"content": "the most probable class name"})]
        groups = list(self.reported_groups)
        out = [TensorSpec("segmentation", "BYTES", (1,), parameters={"content": "label map in the input's format and geometry (.nii.gz; PNG/TIFF for a 2D image)"}),
               TensorSpec("volumes_ml", "FP32", (len(groups),), parameters={"regions": ",".join(groups)})]
        return out

    @property
    def viewer_mode(self) -> str:
        """How the viewer shows an answer: ``volume`` (slices with the overlay), ``slices`` (2D images), ``classes``."""
        if self.is_classification:
            return "classes"
        return "slices" if self.is_slice_set else "volume"


__all__ = [
    "ALL", "ANISOTROPY_FOR_2D", "BRATS2023", "BRATS2023_METS", "BRATS2024", "CLASSIFICATION_GATES", "CONFIGURATIONS", "CONVENTIONS", "KINDS",
    "LabelConvention", "METRICS", "MetricSpec", "OUTPUTS", "Task", "TensorSpec", "configuration_stages", "labels_to_regions", "metric_spec",
    "region_signatures", "regions_to_labels",
]
