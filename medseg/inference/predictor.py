"""The predictor: a model package applied to a raw case, result in the input's geometry.

Used by evaluation, the MLflow pyfunc model and the KServe predictor alike, so all three run exactly the
preprocessing the model was trained with (:func:`~medseg.preprocessing.preprocess.preprocess_case`).

What the task is comes from the package's ``dataset.json`` (:class:`~medseg.task.Task`); what the network's
outputs mean comes from the package (:func:`~medseg.inference.package.network_output`):

- ``labels``: softmax over the label values, arg-maxed (probabilities resampled back to the input grid);
- ``regions`` (region-based training of overlapping regions): a sigmoid per region, turned into a label map
  on the preprocessed grid with :func:`~medseg.task.regions_to_labels`, then put back on the input grid;
  postprocessing and volumes as for ``labels``;
- ``classes`` (a classifier): :meth:`Predictor.predict_class` gives one probability per class for the
  whole volume (the subject's age too when the network takes it).

A cascade package (``previous_stage`` in ``model_package.json``, :mod:`medseg.inference.cascade`) loads its
low-resolution stage too: :meth:`Predictor.predict` runs that stage on the input first, brings its
segmentation onto the full-resolution grid as at training time and gives it to the network as extra input
channels; restoring, postprocessing and volumes are those of any package.

Two backends run the network (``backend`` of :meth:`Predictor.from_package`, ``MEDSEG_INFERENCE_BACKEND``):
``torch`` (the package's weights in PyTorch; every network, GPUs) and ``onnx`` (the package's ``network.onnx`` in
ONNX Runtime, :mod:`medseg.inference.onnx_backend`; segmentation U-Nets, no torch installed). ``auto`` takes torch
when it can be imported, else ONNX. Everything around the network (preprocessing, windows, activation,
restoring, postprocessing) is the same numpy code for both; this module imports torch only for the torch backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.cascade import previous_stage_on_grid, previous_stage_spec, with_previous_stage
from medseg.inference.onnx_backend import ONNX_FILE, OnnxNetwork, onnx_probabilities
from medseg.inference.package_info import network_output, network_patch_size
from medseg.inference.postprocess import relabel_small_enhancing, remove_small_components
from medseg.io import load_nifti, nifti_spacing, stack_channels
from medseg.preprocessing.classifier_input import fit_volume
from medseg.preprocessing.inversion import probabilities_to_original
from medseg.preprocessing.preprocess import preprocess_case, restore_labels_to_original, restore_to_original
from medseg.task import Task, regions_to_labels

if TYPE_CHECKING:  # annotations only: the ONNX backend runs without torch
    import torch

BACKENDS = ("auto", "torch", "onnx")
BACKEND_ENV = "MEDSEG_INFERENCE_BACKEND"


def torch_available() -> bool:
    """Whether torch can be imported here (the ``auto`` backend's choice). Imported, not only looked up: a broken or
    hidden torch must count as absent."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None = None) -> str:
    """``torch`` or ``onnx``: ``backend`` (default ``MEDSEG_INFERENCE_BACKEND``, else ``auto``), ``auto`` resolved to
    torch when it imports, else ONNX."""
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in BACKENDS:
        raise MedsegError(f"unknown inference backend {choice!r} (one of {', '.join(BACKENDS)})")
    if choice == "auto":
        return "torch" if torch_available() else "onnx"
    return choice


def grid_probabilities(network: torch.nn.Module | OnnxNetwork, data: np.ndarray, patch_size: list[int], output: str = "labels", overlap: float = 0.5,
                       mirror: bool = False, device: torch.device | None = None) -> np.ndarray:
    """Sliding-window probabilities K×(spatial) float32 of a preprocessed volume: the softmax over the labels,
    or for ``output="regions"`` a sigmoid per region channel. ``network``: a torch module, or an
    :class:`~medseg.inference.onnx_backend.OnnxNetwork` (then ``device`` is its session's and ignored here)."""
    if isinstance(network, OnnxNetwork):
        return onnx_probabilities(network, data, patch_size, output, overlap=overlap, mirror=mirror)
    import torch

    from medseg.inference.sliding_window import predict_logits, predict_probabilities

    if output == "regions":
        return torch.sigmoid(predict_logits(network, data, patch_size, overlap=overlap, mirror=mirror, device=device)).numpy()
    return predict_probabilities(network, data, patch_size, overlap=overlap, mirror=mirror, device=device)


def grid_labels(probs: np.ndarray, regions: dict[str, list[int]] | None = None, labels: list[int] | None = None) -> np.ndarray:
    """uint8 label map from :func:`grid_probabilities`: the arg-max over labels, or with ``regions`` (name →
    labels, in channel order) :func:`~medseg.task.regions_to_labels` (``labels``: every label value)."""
    if regions:
        return np.asarray(regions_to_labels(probs, regions, labels, channel_axis=0)).astype(np.uint8)
    return np.argmax(probs, axis=0).astype(np.uint8)


def class_probabilities(network: torch.nn.Module, images: np.ndarray, ages: np.ndarray | None = None, device: torch.device | None = None) -> np.ndarray:
    """Softmax class probabilities N×K of a classifier for inputs N×C×X×Y×Z (:func:`~medseg.preprocessing.classifier_input.fit_volume`),
    with the subjects' ages N (years) when the network takes them (torch backend: classifiers are not exported)."""
    import torch

    with torch.inference_mode():
        device = device or next(network.parameters()).device
        network.eval()
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
        out = network(x) if ages is None else network(x, torch.from_numpy(np.asarray(ages, dtype=np.float32)).to(device))
        return torch.softmax(out.float(), dim=1).cpu().numpy()


@dataclass
class Prediction:
    segmentation: np.ndarray  # uint8 I×J×K on the input grid
    affine: np.ndarray  # 4×4, the input's
    volumes_ml: dict[str, float]  # per region (or label) volume in millilitres
    header: nib.Nifti1Header | None = None  # the first input file's header, when predicted from files


class Predictor:
    """Load once, predict many. ``Predictor.from_package(dir)``; ``predict(images, affine, spacing)``."""

    def __init__(self, network: torch.nn.Module | OnnxNetwork, plans: schemas.Plans, dataset: schemas.DatasetJson, package: schemas.ModelPackage, device: Any,
                 overlap: float = 0.5, mirror: bool = False, previous: Predictor | None = None):
        self.network, self.plans, self.dataset, self.package = network, plans, dataset, package
        self.task = Task.from_dataset(dataset)
        self.device, self.overlap, self.mirror = device, overlap, mirror
        self.config = plans.configuration(package.configuration)
        self.patch_size = network_patch_size(package, plans)  # the network's own (transformers: not always the plan's)
        self.output = network_output(package.network)
        # a cascade's low-resolution stage (None for a single-stage model)
        self.previous_stage = previous_stage_spec(package)
        if self.previous_stage and previous is None:
            raise MedsegError("this model package is a cascade's full-resolution stage: give its previous stage (Predictor.from_package loads it)")
        self.previous = previous
        # which runtime runs the network: told by its type (a Predictor built by hand from a torch module is torch)
        self.backend = "onnx" if isinstance(network, OnnxNetwork) else "torch"

    @classmethod
    def from_package(cls, model_dir: str | Path, device: str = "auto", overlap: float = 0.5, mirror: bool = False, backend: str | None = None) -> Predictor:
        """Load a package. ``backend``: ``torch``, ``onnx`` or ``auto`` (default: ``MEDSEG_INFERENCE_BACKEND``, else
        ``auto``: torch when it imports, else the package's ``network.onnx`` in ONNX Runtime)."""
        model_dir = Path(model_dir)
        if not (model_dir / schemas.MODEL_PACKAGE_JSON).is_file():
            raise MedsegError(f"not a model package (no {schemas.MODEL_PACKAGE_JSON})", model_dir)
        package = schemas.ModelPackage.load(model_dir)
        if package.configuration_ensemble:  # several configurations' packages inside this one, averaged on the input grid
            from medseg.inference.configuration_ensemble import ConfigurationEnsemblePredictor

            return ConfigurationEnsemblePredictor.load(model_dir, package, device, overlap, mirror, backend)
        plans = schemas.Plans.load(model_dir)
        dataset = schemas.DatasetJson.load(model_dir)
        backend = resolve_backend(backend)
        network: Any
        if backend == "onnx":
            if network_output(package.network) == "classes":
                raise MedsegError("classifier packages are not exported to ONNX: serve them with the torch backend (medseg-ops[serve-torch])", model_dir)
            dev: Any = device
            network = OnnxNetwork(model_dir / ONNX_FILE, device)
            network.check_patch(network_patch_size(package, plans))
        else:
            from medseg.optional import needs_extra

            with needs_extra("serve-torch", "the torch inference backend"):  # [serve] alone has ONNX Runtime only
                from medseg.inference.package import load_network
                from medseg.inference.sliding_window import select_device

            dev = select_device(device)
            # one network, or an ensemble package's folds averaging their probabilities; weights_only loading (never pickled code)
            network = load_network(model_dir, package, dev)
        previous = None
        spec = previous_stage_spec(package)
        if spec:  # a cascade: the low-resolution stage travels inside the package
            folder = model_dir / str(spec["package"])
            if not (folder / schemas.MODEL_PACKAGE_JSON).is_file():
                raise MedsegError(f"the cascade's previous stage ({spec['configuration']}) is missing from the package", folder)
            previous = cls.from_package(folder, device, overlap, mirror, backend)
            if previous.previous is not None:
                raise MedsegError("cascades of more than two stages are not supported", folder)
        return cls(network, plans, dataset, package, dev, overlap, mirror, previous)

    @property
    def channels(self) -> list[str]:
        return list(self.plans.channel_names)

    @property
    def region_names(self) -> list[str]:
        """The groups volumes are reported for (the task's reported groups; none for a classifier)."""
        return list(self.task.reported_groups)

    @property
    def regions(self) -> dict[str, list[int]]:
        """A region model's regions (name → labels) in output-channel order; empty for other models."""
        return {str(k): [int(v) for v in vs] for k, vs in (self.package.network.get("regions") or {}).items()} if self.output == "regions" else {}

    @property
    def classes(self) -> list[str]:
        """A classifier's class names in output order; empty for segmentation models."""
        return [str(c) for c in self.package.network.get("classes") or []] if self.output == "classes" else []

    @property
    def uses_age(self) -> bool:
        """The classifier takes the subject's age (years) as a second input."""
        return self.output == "classes" and bool((self.package.network.get("options") or {}).get("use_age"))

    def _preprocess(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[0] != len(self.channels):
            raise MedsegError(f"expected {len(self.channels)} channels ({', '.join(self.channels)}) of 3D volumes, got an array of shape {tuple(images.shape)}")
        if not np.isfinite(images).all():
            raise MedsegError("input contains NaN/Inf voxels")
        data, _, props = preprocess_case(images, None, list(spacing), affine, self.plans, self.package.configuration)
        return data, props

    def segment_preprocessed(self, data: np.ndarray, props: schemas.CaseProperties) -> np.ndarray:
        """The network's segmentation (uint8, on the case's original grid, before postprocessing) of a case
        preprocessed for this package (``data``: the network's whole input, previous-stage channels included)."""
        probs = grid_probabilities(self.network, data, self.patch_size, self.output, overlap=self.overlap, mirror=self.mirror, device=self.device)
        if self.output == "regions":
            labels = grid_labels(probs, self.regions, self.dataset.label_values)
            return restore_labels_to_original(labels, props, method="linear")
        return restore_to_original(probs, props)

    def network_input(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> tuple[np.ndarray, schemas.CaseProperties]:
        """The preprocessed input of the network and the case properties: for a cascade, the images followed by
        the previous stage's one-hot segmentation on the same grid (:mod:`medseg.inference.cascade`)."""
        data, props = self._preprocess(images, affine, spacing)
        if self.previous is not None:
            prev = previous_stage_on_grid(self.previous.segment(images, affine, spacing), props, self.config)
            data = with_previous_stage(data, prev, [int(v) for v in self.previous_stage["labels"]])
        return data, props

    def original_probabilities(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> np.ndarray:
        """The network's probabilities on the input grid, K×I×J×K float32: the softmax over the label values, or a
        sigmoid per region (before any label decision; what an ensemble of configurations averages)."""
        if self.output == "classes":
            raise MedsegError("this model package is a classifier (output: classes): use predict_class")
        data, props = self.network_input(images, affine, spacing)
        probs = grid_probabilities(self.network, data, self.patch_size, self.output, overlap=self.overlap, mirror=self.mirror, device=self.device)
        return probabilities_to_original(probs, props, background_channel=None if self.output == "regions" else 0)

    def segment(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> np.ndarray:
        """The segmentation (uint8) on the input grid before postprocessing: what a cascade's next stage receives."""
        if self.output == "classes":
            raise MedsegError("this model package is a classifier (output: classes): use predict_class")
        data, props = self.network_input(images, affine, spacing)
        return self.segment_preprocessed(data, props)

    def predict(self, images: np.ndarray, affine: np.ndarray, spacing: list[float]) -> Prediction:
        """``images`` C×I×J×K raw intensities in ``self.channels`` order → segmentation on the same grid."""
        seg = self.segment(images, affine, spacing)
        min_volumes = self.package.postprocessing.get("min_volume_mm3") or {}
        if min_volumes:
            seg = remove_small_components(seg, min_volumes, spacing)
        post = self.package.postprocessing
        # threshold chosen on validation, in mm³ (voxels only in packages written by hand)
        et_threshold = int(round(float(post.get("et_to_netc_below_mm3") or 0.0) / float(np.prod(spacing)))) or int(post.get("et_to_netc_below_voxels") or 0)
        pair = self.task.enhancing_pair
        if et_threshold > 0 and pair is not None:
            seg = relabel_small_enhancing(seg, et_threshold, *pair)
        return Prediction(segmentation=seg, affine=np.asarray(affine), volumes_ml=self.volumes_ml(seg, spacing))

    def predict_class(self, images: np.ndarray, affine: np.ndarray, spacing: list[float], age: float | None = None) -> dict[str, float]:
        """A classifier's probability per class (``self.classes`` order) for one subject: ``images`` C×I×J×K raw
        intensities in ``self.channels`` order, ``age`` in years (required when :attr:`uses_age`, else ignored)."""
        if self.output != "classes":
            raise MedsegError(f"this model package segments (output: {self.output}): use predict")
        if self.uses_age and (age is None or not np.isfinite(float(age))):
            raise MedsegError("this classifier takes the subject's age: pass age (years)")
        data, _ = self._preprocess(images, affine, spacing)
        options = self.package.network.get("options") or {}
        size = options.get("input_size") or list(self.config.patch_size)
        x = fit_volume(data, list(size), float(options.get("input_scale") or 1.0))[None]
        probs = class_probabilities(self.network, x, np.array([float(age)]) if self.uses_age else None, self.device)[0]  # type: ignore[arg-type]
        return {name: float(p) for name, p in zip(self.classes, probs)}

    def predict_class_files(self, paths: list[str | Path], age: float | None = None) -> dict[str, float]:
        """:meth:`predict_class` of one NIfTI file per channel, in ``self.channels`` order."""
        if len(paths) != len(self.channels):
            raise MedsegError(f"expected {len(self.channels)} image files ({', '.join(self.channels)}), got {len(paths)}")
        images, affine, header = stack_channels([load_nifti(p) for p in paths], [str(p) for p in paths])
        return self.predict_class(images, affine, list(nifti_spacing(header)), age)

    def volumes_ml(self, seg: np.ndarray, spacing: list[float]) -> dict[str, float]:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        groups = self.task.reported_groups
        return {name: float(np.isin(seg, values).sum() * voxel_ml) for name, values in groups.items()}

    def predict_files(self, paths: list[str | Path]) -> Prediction:
        """One NIfTI file per channel, in ``self.channels`` order; they must share shape and affine."""
        if len(paths) != len(self.channels):
            raise MedsegError(f"expected {len(self.channels)} image files ({', '.join(self.channels)}), got {len(paths)}")
        images, affine, header = stack_channels([load_nifti(p) for p in paths], [str(p) for p in paths])
        prediction = self.predict(images, affine, list(nifti_spacing(header)))
        prediction.header = header  # callers write the segmentation with it, without reading the file again
        return prediction
