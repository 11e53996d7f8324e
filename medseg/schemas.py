"""The artefacts passed between stages, in one place.

Every artefact is plain JSON a person can read and edit (as nnU-Net's plans are). Each has a dataclass
here with ``to_dict`` / ``from_dict`` and a ``load`` / ``save`` pair; ``save`` writes atomically and
``load`` raises :class:`~medseg.errors.MedsegError` naming the file when a field is missing or wrong.

Files and their producers::

    dataset.json      ingest      nnU-Net v2 raw dataset description + the task (regions, classes, slices, covariates)
    manifest.json     ingest      per file: sha256, shape, spacing, affine; patient ids; quarantine
    splits.json       ingest      patient-level k folds + a held-out test set
    fingerprint.json  preprocess  per-case geometry and per-channel foreground intensity statistics
    plans.json        preprocess  target spacing, normalisation, configurations (patch, batch, network)
    <case>.json       preprocess  per preprocessed case: what is needed to invert the preprocessing
    best_params.json  tune        the chosen hyperparameters and the study they came from
    model_package.json train      what the model folder holds and where it came from (with the per-epoch history)
    training_curves.png train     loss and validation metrics per epoch, beside the weights (and in the training run)
    metrics.json      evaluate    per label and per region metrics, per case and aggregated
    model_card.md     register    the registered version's model card (model_card.json: what it is rendered from)

Array axes: every volume is kept in nibabel's voxel order (I, J, K) as stored in the NIfTI file, with
channels first for images (C, I, J, K); spacings are in millimetres in the same order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from medseg.errors import MedsegError
from medseg.io import read_json, sha256_json, write_json

SCHEMA_VERSION = 1

# File names inside the artefact folders: the only place they are spelled.
DATASET_JSON = "dataset.json"
MANIFEST_JSON = "manifest.json"
SPLITS_JSON = "splits.json"
FINGERPRINT_JSON = "fingerprint.json"
PLANS_JSON = "plans.json"
BEST_PARAMS_JSON = "best_params.json"
MODEL_PACKAGE_JSON = "model_package.json"
WEIGHTS_FILE = "weights.pt"
ONNX_NETWORK_FILE = "network.onnx"  # the network exported for the torch-free backend (medseg.inference.onnx_export)
TRAINING_CURVES_PNG = "training_curves.png"  # loss and validation metrics per epoch (model package, training run, report)
CONFIGURATION_SELECTION_JSON = "configuration_selection.json"  # MLflow artefact of the select-configuration run: every candidate's score
MODEL_CARD_MD = "model_card.md"  # a registered version's model card, in its run
MODEL_CARD_JSON = "model_card.json"  # what the card is rendered from (re-rendered with the gate decision at promotion)
SYNTH_MARKER_JSON = "medseg_synth.json"  # written by `medseg synth` beside the cases it makes: the data are synthetic
METRICS_JSON = "metrics.json"
PER_CASE_CSV = "per_case.csv"
PER_CASE_JSON = "per_case.json"  # the per-case metrics as logged with a registered version
CASES_CSV = "cases.csv"  # metrics in long form: case, region, metric, value
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
DICE_BOXPLOT_PNG = "dice_boxplot.png"
EXAMPLE_OVERLAY_PNG = "example_overlay.png"
CONFUSION_CSV = "confusion_matrix.csv"
PREDICTIONS_DIR = "predictions"
DRIFT_REFERENCE_JSON = "drift_reference.json"
CHECKPOINT_FILE = "checkpoint_latest.pt"
MODEL_DIR = "model"  # the model package inside a training folder
SMOKE_JSON = "smoke.json"
DECISION_JSON = "decision.json"
CASE_PROPERTIES_SUFFIX = ".json"  # <configuration>/<CASE>.json beside <CASE>.npy
CASE_IMAGE_SUFFIX = ".npy"  # <configuration>/<CASE>.npy: the preprocessed image
CASE_SEG_SUFFIX = "_seg.npy"  # <configuration>/<CASE>_seg.npy: the preprocessed segmentation
CASE_PREVIOUS_STAGE_SUFFIX = "_prev.npy"  # <configuration>_cascade/<CASE>_prev.npy: a cascade's previous-stage map
CASCADE_JSON = "cascade.json"  # which low-resolution package made the previous-stage maps
VOLUMES_CSV = "volumes.csv"  # batch prediction: volumes per case and group (a classifier: probabilities)
PREDICTIONS_CSV = "predictions.csv"  # batch prediction of a classifier: label and probabilities per case
DEMO_SUMMARY_JSON = "summary.json"
SERVER_LOG = "server.log"
SEGMENTATION_SUFFIX = "_seg.nii.gz"  # a served answer written beside its case: <CASE>_seg.nii.gz
OVERLAY_SUFFIX = "_overlay.png"
DDP_SPEC_JSON = "ddp_spec.json"  # what a torchrun job's workers train
DDP_RESULT_JSON = "train_result.json"  # what rank 0 of a torchrun job hands back
KFP_EXECUTOR_OUTPUT_JSON = "executor_output.json"  # kfp.local's record of a task's output parameters and metrics
FOLD_WEIGHTS_PATTERN = "weights_fold{fold}.pt"  # an ensemble package's members
ROC_PNG_PATTERN = "roc_{name}.png"  # a classifier's one-vs-rest ROC curve per class
PIPELINE_LOG_PATTERN = "pipeline-{stamp}.log"  # make demo's full pipeline log
PROMOTION_RECORD_PATTERN = "{seq:06d}-v{version}-{decision}.json"  # one gate decision in the version's run
PARAMS_YAML = "params.yaml"  # the parameter file (not an artefact: the project's defaults)
MLFLOW_DB, OPTUNA_DB = "mlflow.db", "optuna.db"  # the local SQLite stores under the work folder
IMAGES_TR, LABELS_TR, IMAGES_TS, LABELS_TS = "imagesTr", "labelsTr", "imagesTs", "labelsTs"

T = TypeVar("T", bound="Artifact")


class Artifact:
    """Base class: JSON round trip with a clear error naming the file."""

    FILENAME: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        required = {
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if not isinstance(data, dict):
            raise MedsegError(f"{cls.__name__}: expected a JSON object")
        missing = required - data.keys()
        if missing:
            raise MedsegError(f"{cls.__name__}: missing field(s) {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})  # type: ignore[call-arg]

    def save(self, folder_or_file: str | Path) -> Path:
        path = Path(folder_or_file)
        if path.suffix != ".json":
            path = path / self.FILENAME
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], folder_or_file: str | Path) -> T:
        path = Path(folder_or_file)
        if path.suffix != ".json":
            path = path / cls.FILENAME
        try:
            return cls.from_dict(read_json(path))
        except MedsegError as exc:
            if exc.path:
                raise
            raise MedsegError(str(exc), path) from None
        except TypeError as exc:
            raise MedsegError(f"malformed {cls.__name__}: {exc}", path) from None


# --------------------------------------------------------------------------- ingest
@dataclass
class DatasetJson(Artifact):
    """nnU-Net v2 ``dataset.json`` plus the task fields ingest writes (:class:`medseg.task.Task` reads them).

    ``channel_names`` maps channel index (as a string, nnU-Net style) to its name; image file
    ``imagesTr/CASE_0000.nii.gz`` holds channel "0". ``labels`` maps name → integer value (for a
    classification dataset: class name → index 0..K-1). ``regions`` maps an evaluation region to the label
    values it unites (overlapping regions are trained region-based). ``slice_axis``: the dataset is a stack of
    2D slices annotated slice by slice along that voxel axis (trained and served in 2D). ``covariates``: per-case
    values a classifier may take besides the image (``age``). ``primary_metric``: the per-case metric the task
    is judged by (default Dice, or log-loss for classification). ``lesionwise``: the official BraTS
    lesion-wise setting to score with (empty: chosen from the labels; ``none``: off). A ``dataset.json``
    without ``name`` (nnU-Net does not require one) takes its folder's name.
    """

    FILENAME: ClassVar[str] = DATASET_JSON
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    numTraining: int
    file_ending: str = ".nii.gz"
    regions: dict[str, list[int]] = field(default_factory=dict)
    task: str = "segmentation"
    source_format: str = ""
    description: str = ""
    slice_axis: int | None = None
    covariates: list[str] = field(default_factory=list)
    primary_metric: str = ""
    lesionwise: str = ""
    # made by ``medseg synth`` (its marker file found by ingest): generator, layout, cases, seed, ...; empty: not known to be
    synthetic: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder_or_file: str | Path) -> DatasetJson:
        path = Path(folder_or_file)
        if path.suffix != ".json":
            path = path / cls.FILENAME
        try:
            data = read_json(path)
        except MedsegError as exc:
            if exc.path:
                raise
            raise MedsegError(str(exc), path) from None
        if isinstance(data, dict) and not data.get("name"):
            data = {**data, "name": path.parent.name}
        try:
            return cls.from_dict(data)
        except MedsegError as exc:
            raise MedsegError(str(exc), path) from None
        except TypeError as exc:
            raise MedsegError(f"malformed {cls.__name__}: {exc}", path) from None

    @property
    def channels(self) -> list[str]:
        return [self.channel_names[str(i)] for i in range(len(self.channel_names))]

    @property
    def label_values(self) -> list[int]:
        return sorted(int(v) for v in self.labels.values())

    @property
    def n_classes(self) -> int:
        return max(self.label_values) + 1


@dataclass
class FileRecord:
    """One NIfTI file of the canonical dataset. ``path`` is relative to the dataset folder."""

    path: str
    role: str  # "image" or "label"
    channel: str  # channel name, or "label"
    sha256: str
    shape: list[int]
    spacing: list[float]
    affine: list[list[float]]
    source: str = ""  # original file name (no folders: they may hold identifiers)
    orientation: str = "RAS"  # axis codes of the source file; written files are always RAS+


@dataclass
class CaseRecord:
    case_id: str
    patient_id: str
    files: list[dict[str, Any]]  # FileRecord as dicts (JSON-friendly)
    has_label: bool = True
    class_label: str | None = None  # classification datasets: the case's class name
    covariates: dict[str, Any] = field(default_factory=dict)  # classification: age, sex, ...
    # the case's identity by content: sha256 over its files' roles, channels and sha256 (and its class and covariates);
    # the same data ingested again gets the same key whatever its (pseudonymous) case id (medseg.ingest.ingest.case_key)
    case_key: str = ""


@dataclass
class Manifest(Artifact):
    """What was ingested: every file with its hash and geometry, and the cases left out with why."""

    FILENAME: ClassVar[str] = MANIFEST_JSON
    dataset_name: str
    source: str
    source_format: str
    cases: list[dict[str, Any]]  # CaseRecord as dicts
    quarantined: list[dict[str, str]] = field(default_factory=list)  # {case, file, problem}
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    content_hash: str = ""  # sha256 over the file hashes: the dataset version

    def compute_hash(self) -> str:
        return sha256_json(sorted((f["path"], f["sha256"]) for c in self.cases for f in c["files"]))


@dataclass
class Splits(Artifact):
    """Patient-level splits: a held-out ``test`` list and ``folds`` of {train, val} case ids."""

    FILENAME: ClassVar[str] = SPLITS_JSON
    test: list[str]
    folds: list[dict[str, list[str]]]
    seed: int = 0
    n_folds: int = 5
    test_fraction: float = 0.2
    method: str = "patient-hash-rank"  # how patients were assigned (see medseg.ingest.splits)
    stratified: bool = False  # True when assignment was stratified by class
    schema_version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------- preprocess
@dataclass
class Fingerprint(Artifact):
    FILENAME: ClassVar[str] = FINGERPRINT_JSON
    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    shapes: list[list[int]]
    channels: dict[str, dict[str, float]]  # channel name → mean, std, p00_5, p99_5, min, max
    class_frequencies: dict[str, float]
    case_ids: list[str]
    crop_fractions: list[float] = field(default_factory=list)  # voxels after crop / before
    schema_version: int = SCHEMA_VERSION
    crop_boxes: list[list[list[int]]] = field(default_factory=list)  # per case, per axis [start, stop) of the nonzero crop
    class_voxel_counts: dict[str, int] = field(default_factory=dict)  # label value → voxels over the fingerprinted cases
    samples_per_case: int = 0  # foreground voxels drawn per case (with replacement) for the channel statistics
    seed: int = 0  # seed of that sampling
    # channel → per case the mean raw intensity of its nonzero voxels: the serving drift reference
    case_nonzero_means: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class NetworkTopology:
    """A U-Net as nnU-Net plans it: one entry per resolution stage."""

    name: str  # "unet" (plain conv U-Net, MONAI DynUNet)
    in_channels: int
    out_channels: int
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    features: list[int]
    deep_supervision: bool = False
    norm: str = "instance"


@dataclass
class Configuration:
    """One trainable configuration (``3d_fullres``, ``3d_lowres``, ``2d``)."""

    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    median_shape: list[int]
    network: dict[str, Any]  # NetworkTopology as dict
    n_parameters: int = 0
    estimated_memory_gib: float = 0.0
    seg_resampling: str = "linear"  # "linear": argmax of the linearly resampled one-hot maps (nnU-Net); "nearest"
    slice_axis: int | None = None  # 2d only: slices are taken along this axis, whose spacing is left as it is
    # network name → the patch it trains on where it differs from patch_size (networks with size constraints of
    # their own: unetr, swinunetr; medseg.networks.registry.accepted_patch)
    network_patch_sizes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Plans(Artifact):
    """``plans.json``: how to preprocess and which network to train, chosen from the fingerprint."""

    FILENAME: ClassVar[str] = PLANS_JSON
    dataset_name: str
    device_budget: str
    channel_names: list[str]
    labels: dict[str, int]
    regions: dict[str, list[int]]
    normalization: list[dict[str, Any]]  # per channel: {channel, scheme, mean, std, lower, upper}
    configurations: dict[str, dict[str, Any]]  # name → Configuration as dict
    default_configuration: str = "3d_fullres"
    use_nonzero_mask: bool = True
    schema_version: int = SCHEMA_VERSION
    trained_configurations: list[str] = field(default_factory=list)  # the configurations preprocessed for training
    # what the run trains, when the preprocessing was asked for one (``configuration: auto`` picks from the task and the
    # plan, medseg.task.Task.choose_configuration): the configuration name and why
    chosen_configuration: str = ""
    configuration_reason: str = ""

    def configuration(self, name: str | None = None) -> Configuration:
        name = name or self.default_configuration
        if name not in self.configurations:
            raise MedsegError(f"plans have no configuration {name!r} (have: {sorted(self.configurations)})")
        return Configuration(**self.configurations[name])

    def content_hash(self) -> str:
        return sha256_json(self.to_dict())


@dataclass
class CaseProperties(Artifact):
    """Everything needed to map a prediction on the preprocessed grid back to the original file."""

    FILENAME: ClassVar[str] = "case.json"
    case_id: str
    original_shape: list[int]
    original_spacing: list[float]
    original_affine: list[list[float]]
    crop_bbox: list[list[int]]  # per axis [start, stop) in the original grid
    shape_after_crop: list[int]
    shape_after_resample: list[int]
    target_spacing: list[float]
    class_locations: dict[str, list[list[int]]] = field(default_factory=dict)  # label → sampled voxel indices


# --------------------------------------------------------------------------- tune / train
@dataclass
class BestParams(Artifact):
    FILENAME: ClassVar[str] = BEST_PARAMS_JSON
    params: dict[str, Any]
    best_value: float
    study_name: str
    storage: str
    n_trials: int
    n_pruned: int = 0
    metric: str = "val_dice_mean"


@dataclass
class ModelPackage(Artifact):
    """``model_package.json`` beside ``weights.pt`` (a state_dict), ``plans.json`` and ``dataset.json``."""

    FILENAME: ClassVar[str] = MODEL_PACKAGE_JSON
    configuration: str
    network: dict[str, Any]
    medseg_version: str
    training: dict[str, Any] = field(default_factory=dict)  # epochs, params, best val dice, run id
    lineage: dict[str, str] = field(default_factory=dict)  # manifest hash, plan hash, git commit, ...
    postprocessing: dict[str, Any] = field(default_factory=dict)  # {"min_volume_mm3": {label: mm³}, how it was chosen}
    weights_file: str = WEIGHTS_FILE
    schema_version: int = SCHEMA_VERSION
    # a cascade's full-resolution stage: {configuration, package (folder inside this one), labels, image_channels, ...}
    # (medseg.inference.cascade); empty for a single-stage model
    previous_stage: dict[str, Any] = field(default_factory=dict)
    # the network exported for the torch-free backend (medseg.inference.onnx_export): {file: "network.onnx", opset,
    # patch_size, torch, max_abs_diff} or {file: None, reason}; empty in packages written before the export existed
    onnx: dict[str, Any] = field(default_factory=dict)
    # an ensemble of configurations chosen by cross-validation (medseg.inference.configuration_ensemble): one entry per
    # member, {configuration, package (folder inside this one), cv_score}, best first; empty for any other package
    configuration_ensemble: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- evaluate
@dataclass
class Metrics(Artifact):
    """``metrics.json``: ``mean`` maps each label/region name to {dice, hd95, ...} averaged over cases."""

    FILENAME: ClassVar[str] = METRICS_JSON
    n_cases: int
    mean: dict[str, dict[str, float]]
    per_case: list[dict[str, Any]]
    hd95_convention: str = "max of the two directed 95th percentile surface distances, in mm"
    empty_handling: str = "both empty: Dice/IoU 1, HD95/ASSD 0; one empty: Dice/IoU 0, HD95/ASSD = penalty"
    hd95_penalty_mm: float = 373.13
    schema_version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------- register / promote
@dataclass
class ModelCard(Artifact):
    """``model_card.json``: what a registered version's model card (``model_card.md``) is rendered from.

    Written at registration (:func:`medseg.registry.model_card.build_card`) into the version's run, read back and
    completed with the gate decision at promotion. ``metrics``: per group (a region, label or class; ``all``) and
    metric ``{group, metric, mean, lower, upper, n_cases, higher_is_better}``, the bootstrap CI of the mean over the
    test cases. ``gate``: empty until promotion decides.
    """

    FILENAME: ClassVar[str] = MODEL_CARD_JSON
    model_name: str
    version: str
    task: dict[str, Any]  # kind, channels, groups or classes, labels, primary metric, endpoint inputs and outputs, network
    training: dict[str, Any]  # network, loss, configuration, epochs, best epoch and its validation score
    data: dict[str, Any]  # training cases, spacing, per-channel intensity statistics (the fingerprint), synthetic origin
    metrics: list[dict[str, Any]]
    evaluation: dict[str, Any]  # n_cases, test_set_hash, confidence level, n_bootstrap, seed
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_passed: bool = False
    threshold_reason: str = ""
    gate: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
