"""Preprocess cases for training and inference (fingerprint → plan → preprocess, as nnU-Net).

One function, :func:`preprocess_case`, serves training (with a segmentation) and inference (without),
so a served model sees exactly the preprocessing it was trained on. Steps, in nnU-Net's order
(Isensee et al. 2021): crop to the nonzero box → normalise each channel (before resampling, so the
nonzero mask fits the image exactly) → resample to the configuration's spacing (images: cubic spline,
segmentations: linear on the one-hot map or nearest, "separate z" on anisotropic data) → sample
foreground locations per class. The properties recorded per case let
:func:`~medseg.preprocessing.inversion.restore_to_original` put a prediction back on the original grid.

Preprocessed folder layout::

    plans.json  fingerprint.json  dataset.json  splits.json
    <configuration>/<CASE>.npy       float32 C×I×J×K (read with mmap_mode="r" by the patch sampler)
    <configuration>/<CASE>_seg.npy   int8 I×J×K (int16 for label values > 127)
    <configuration>/<CASE>.json      CaseProperties (incl. class_locations)

Cases run in parallel (``workers`` processes, one case per worker at a time); each case is read once and
written for every configuration to preprocess (files shared by hard links when two configurations give
the same grid, e.g. ``2d`` and ``3d_fullres`` on data already at the target spacing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import atomic_dir, save_npy, write_text
from medseg.preprocessing.cropping import bounding_box, crop, nonzero_mask
from medseg.preprocessing.fingerprint import describe_case, case_files, check_channels, check_spacing, compute_fingerprint, load_case
from medseg.preprocessing.inversion import restore_labels_to_original, restore_to_original
from medseg.preprocessing.locations import CLASS_LOCATIONS_PER_LABEL, sample_class_locations
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.parallel import default_workers, run_cases
from medseg.preprocessing.planner import make_plans
from medseg.preprocessing.resampling import resample, resample_segmentation, separate_z_axis, shape_for_spacing

__all__ = [  # the inversion and the location count are re-exported: callers import them from here
    "CLASS_LOCATIONS_PER_LABEL", "case_target_spacing", "preprocess_case", "restore_labels_to_original",
    "restore_to_original", "run_preprocessing", "save_case_properties", "training_case_ids",
]

logger = logging.getLogger(__name__)


def case_target_spacing(config: schemas.Configuration, spacing: list[float]) -> list[float]:
    """The spacing (mm) a case is resampled to: the configuration's, except along a ``2d`` slice axis,
    which keeps the case's own spacing (slices are never interpolated into each other)."""
    target = [float(s) for s in config.spacing]
    if config.slice_axis is not None:
        target[config.slice_axis] = float(spacing[config.slice_axis])
    return target


def preprocess_case(images: np.ndarray, seg: np.ndarray | None, spacing: list[float], affine: np.ndarray, plans: schemas.Plans, configuration: str | None = None, case_id: str = "case", seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, schemas.CaseProperties]:
    """Crop, normalise and resample one case.

    Args:
        images: C×I×J×K raw intensities (channels in ``plans.channel_names`` order).
        seg: I×J×K integer labels, or None (inference).
        spacing: voxel size in mm along I, J, K. affine: 4×4 of the original grid.
        configuration: a name in ``plans.configurations`` (default: the plan's default).
        seed: with ``case_id``, seeds the sampling of foreground locations.

    Returns:
        float32 C×I'×J'×K', int8 I'×J'×K' (or None) and the :class:`~medseg.schemas.CaseProperties` that
        invert it.

    Raises:
        MedsegError: naming ``case_id`` for a wrong channel count, a spacing that is not > 0, an all-zero
            channel, or a segmentation of another shape.
    """
    config = plans.configuration(configuration)
    if images.ndim != 4 or images.shape[0] != len(plans.channel_names):
        raise MedsegError(f"{describe_case(case_id)}: expected {len(plans.channel_names)} channels ({', '.join(plans.channel_names)}) of 3D volumes, got an array of shape {tuple(images.shape)}")
    check_spacing(list(spacing), case_id)
    check_channels(images, case_id, list(plans.channel_names))
    if seg is not None and tuple(seg.shape) != tuple(images.shape[1:]):
        raise MedsegError(f"{describe_case(case_id)}: segmentation shape {tuple(seg.shape)} differs from the images' {tuple(images.shape[1:])}")
    mask = nonzero_mask(images)
    box = bounding_box(mask)
    mask_c = crop(mask, box)
    shape_after_crop = [b - a for a, b in box]
    # normalise on the cropped grid, before resampling (nnU-Net: a resampled mask would no longer fit)
    data = np.empty((images.shape[0], *shape_after_crop), dtype=np.float32)
    for c, spec in enumerate(plans.normalization):
        data[c] = crop(images[c], box)
        normalize(data[c], mask_c, spec, inplace=True)
    target = case_target_spacing(config, list(spacing))
    new_shape = shape_for_spacing(shape_after_crop, list(spacing), target)
    seg_c = crop(seg, box) if seg is not None else None
    if new_shape != shape_after_crop:
        axis = separate_z_axis(list(spacing), target)
        data = resample(data, new_shape, order=3, anisotropic_axis=axis)
        if seg_c is not None:
            seg_c = resample_segmentation(np.ascontiguousarray(seg_c), new_shape, config.seg_resampling, anisotropic_axis=axis, outside=~mask_c)
    locations: dict[str, list[list[int]]] = {}
    if seg_c is not None:
        rng = np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])
        locations = sample_class_locations(seg_c, list(plans.labels.values()), rng)
        seg_c = seg_c.astype(np.int16 if int(seg_c.max(initial=0)) > 127 else np.int8)
    props = schemas.CaseProperties(
        case_id=case_id, original_shape=list(images.shape[1:]), original_spacing=[float(s) for s in spacing],
        original_affine=np.asarray(affine).tolist(), crop_bbox=box, shape_after_crop=shape_after_crop,
        shape_after_resample=list(data.shape[1:]), target_spacing=target, class_locations=locations,
    )
    return data, seg_c, props


def _grid_key(config: schemas.Configuration, spacing: list[float]) -> tuple:
    return (tuple(round(s, 9) for s in case_target_spacing(config, spacing)), config.seg_resampling)


def _preprocess_job(job: tuple[Path, Path, str, schemas.Plans, list[str], int, bool]) -> str:
    """One case for every configuration in the job; files written into ``out_root/<configuration>/``
    (no ``_seg.npy`` for a classification case, which has no label map)."""
    dataset_dir, out_root, case_id, plans, configurations, seed, with_label = job
    images, seg, affine, spacing = load_case(dataset_dir, case_id, len(plans.channel_names), with_label=with_label)
    check_channels(images, case_id, list(plans.channel_names), case_files(dataset_dir, case_id, len(plans.channel_names)))
    written: dict[tuple, Path] = {}
    for name in configurations:
        config = plans.configuration(name)
        folder = out_root / name
        key = _grid_key(config, spacing)
        if key in written:  # same grid as a configuration done already: share the files
            _link_case(written[key], folder, case_id)
            continue
        data, seg_p, props = preprocess_case(images, seg, spacing, affine, plans, name, case_id, seed)
        save_npy(folder / f"{case_id}{schemas.CASE_IMAGE_SUFFIX}", data)
        if seg_p is not None:
            save_npy(folder / f"{case_id}{schemas.CASE_SEG_SUFFIX}", seg_p)
        save_case_properties(props, folder / f"{case_id}{schemas.CASE_PROPERTIES_SUFFIX}")
        written[key] = folder
    return case_id


def save_case_properties(props: schemas.CaseProperties, path: Path) -> Path:
    """Write ``<case>.json`` compactly: the class locations are thousands of index triples, and the
    indented, deep-copying generic writer spent more time on them than the whole case took to preprocess."""
    fields = {f.name: getattr(props, f.name) for f in dataclasses.fields(props)}
    return write_text(path, json.dumps(fields, separators=(",", ":")) + "\n")


def _link_case(src: Path, dst: Path, case_id: str) -> None:
    for suffix in (schemas.CASE_IMAGE_SUFFIX, schemas.CASE_SEG_SUFFIX, schemas.CASE_PROPERTIES_SUFFIX):
        try:
            os.link(src / f"{case_id}{suffix}", dst / f"{case_id}{suffix}")
        except OSError:
            shutil.copy2(src / f"{case_id}{suffix}", dst / f"{case_id}{suffix}")


def training_case_ids(splits: schemas.Splits) -> list[str]:
    """All cases in the folds (train ∪ val), never the held-out test cases."""
    ids = {c for fold in splits.folds for part in ("train", "val") for c in fold.get(part, [])}
    return sorted(ids - set(splits.test))


def _load_plans(plans: schemas.Plans | str | Path, dataset: schemas.DatasetJson) -> tuple[schemas.Plans, Path | None]:
    source = None
    if not isinstance(plans, schemas.Plans):
        source = Path(plans)
        plans = schemas.Plans.load(source)
    if list(plans.channel_names) != dataset.channels:
        raise MedsegError(f"the plan's channels {plans.channel_names} differ from the dataset's {dataset.channels}", source)
    if len(plans.normalization) != len(plans.channel_names):
        raise MedsegError(f"the plan has {len(plans.normalization)} normalisation entries for {len(plans.channel_names)} channels", source)
    for spec in plans.normalization:
        if spec.get("scheme") not in ("zscore_nonzero", "zscore", "ct", "rescale", "none"):
            raise MedsegError(f"channel {spec.get('channel')!r}: unknown normalisation scheme {spec.get('scheme')!r}", source)
    return plans, source


def run_preprocessing(dataset_dir: Path, out_dir: Path, budget: str = "cpu", configurations: tuple[str, ...] = ("3d_fullres",), workers: int | None = None, progress: bool = True, plans: schemas.Plans | str | Path | None = None, timings: dict[str, Any] | None = None,
                      configuration: str | None = None, candidates: str = "") -> schemas.Plans:
    """Fingerprint, plan and preprocess the training cases of a canonical dataset into ``out_dir``.

    Args:
        dataset_dir: canonical dataset (``dataset.json``, ``splits.json``, ``imagesTr``, ``labelsTr``).
        out_dir: written atomically (replaced as a whole only on success).
        budget: ``cpu`` or ``gpu:<GiB>``. configurations: which to preprocess (and train).
        workers: parallel cases (default: the cores this process may use).
        plans: an existing (possibly hand-edited) ``plans.json`` or Plans to use instead of planning;
            its budget is kept and no fingerprint is computed (the one beside the file is copied).
        configuration: the configuration to train (``auto``, ``2d``, ``3d_fullres``, ``3d_lowres``,
            ``3d_cascade_fullres``) instead of ``configurations``: planned first, then the dataset's task picks
            (:meth:`medseg.task.Task.choose_configuration`: ``auto`` is 2d for slice sets and strongly anisotropic
            data, else 3d_fullres) and only what the choice trains is preprocessed; the plan records the choice
            and why (``chosen_configuration``, ``configuration_reason``).
        candidates: with ``configuration``, the configurations cross-validation will choose among
            (:meth:`medseg.task.Task.candidate_configurations`: ``all`` or ``2d,3d_fullres``...): every one of them is
            preprocessed too. Empty: only what the chosen configuration trains.
        timings: when given, filled with wall seconds per phase (``fingerprint_s``, ``plan_s``,
            ``preprocess_s``, ``total_s``) and the case and worker counts.

    Raises:
        MedsegError: naming the folder, case or file for a missing dataset, no training cases, an
            unusable budget or plan, or bad case data (see :func:`preprocess_case`).
    """
    t_start = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not dataset_dir.is_dir():
        raise MedsegError("dataset folder not found", dataset_dir)
    dataset = schemas.DatasetJson.load(dataset_dir)
    splits = schemas.Splits.load(dataset_dir)
    case_ids = training_case_ids(splits)
    if not case_ids:
        raise MedsegError("splits.json has no training cases", dataset_dir / schemas.SPLITS_JSON)
    workers = int(workers or default_workers())
    phase: dict[str, Any] = {"n_cases": len(case_ids), "workers": workers}
    fingerprint, fingerprint_source = None, None
    if plans is None:
        from medseg.preprocessing.planner import parse_budget

        parse_budget(budget)  # fail before the costly part
        t0 = time.perf_counter()
        fingerprint = compute_fingerprint(dataset_dir, case_ids, workers=workers, progress=progress)
        phase["fingerprint_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = make_plans(fingerprint, dataset, budget, tuple(configurations) if configuration is None else ("2d", "3d_fullres", "3d_lowres"))
        phase["plan_s"] = time.perf_counter() - t0
    else:
        plan, source = _load_plans(plans, dataset)
        wanted = [c for c in configurations if c in plan.configurations] or [plan.default_configuration]
        plan.trained_configurations = wanted
        phase["fingerprint_s"] = phase["plan_s"] = 0.0
        if source is not None and (source.parent / schemas.FINGERPRINT_JSON).is_file():
            fingerprint_source = source.parent / schemas.FINGERPRINT_JSON
            fingerprint = schemas.Fingerprint.load(fingerprint_source)
    if configuration is not None:
        from medseg.task import Task, configuration_stages

        task = Task.from_dataset(dataset)
        full = plan.configurations.get("3d_fullres")
        chosen, reason = task.choose_configuration(configuration, list(plan.configurations), full["spacing"] if full else None)
        plan.chosen_configuration, plan.configuration_reason = chosen, reason
        plan.trained_configurations = list(task.configurations_to_preprocess(chosen))
        for candidate in task.candidate_configurations(candidates, list(plan.configurations), chosen):
            plan.trained_configurations += [c for c in configuration_stages(candidate) if c not in plan.trained_configurations]
        configurations = tuple(plan.trained_configurations)
        logger.info("configuration %s: %s (requested %s)", chosen, reason, configuration)
    skipped = [c for c in configurations if c not in plan.trained_configurations]
    if skipped:
        logger.warning("configuration(s) %s not planned for this dataset: preprocessing %s", skipped, plan.trained_configurations)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        if fingerprint is not None:
            fingerprint.save(tmp)
        plan.save(tmp)
        shutil.copy2(dataset_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        shutil.copy2(dataset_dir / schemas.SPLITS_JSON, tmp / schemas.SPLITS_JSON)
        for name in plan.trained_configurations:
            (tmp / name).mkdir()
        if (dataset_dir / schemas.MANIFEST_JSON).is_file():  # classes and covariates of classification cases
            shutil.copy2(dataset_dir / schemas.MANIFEST_JSON, tmp / schemas.MANIFEST_JSON)
        with_label = schemas.DatasetJson.load(dataset_dir).task != "classification"
        jobs = [(dataset_dir, tmp, cid, plan, list(plan.trained_configurations), 0, with_label) for cid in case_ids]
        run_cases(_preprocess_job, jobs, workers, f"preprocess {'+'.join(plan.trained_configurations)}", progress)
    phase["preprocess_s"] = time.perf_counter() - t0
    phase["total_s"] = time.perf_counter() - t_start
    if timings is not None:
        timings.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in phase.items()})
    return plan
