"""Preprocess cases for training and inference, and invert it for predictions.

One function, :func:`preprocess_case`, serves training (with a segmentation) and inference (without),
so a served model sees exactly the preprocessing it was trained on. Steps: crop to nonzero → resample
to the plan's spacing → normalise each channel. Properties recorded per case let
:func:`restore_to_original` put a prediction back on the original grid and affine.

Preprocessed folder layout::

    plans.json  fingerprint.json  dataset.json  splits.json
    <configuration>/<CASE>.npy       float32 C×I×J×K (read with mmap_mode="r" by the patch sampler)
    <configuration>/<CASE>_seg.npy   int8 I×J×K
    <configuration>/<CASE>.json      CaseProperties
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import atomic_dir, save_npy
from medseg.preprocessing.cropping import bounding_box, crop, nonzero_mask, uncrop
from medseg.preprocessing.fingerprint import compute_fingerprint, load_case
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.planner import make_plans
from medseg.preprocessing.resampling import anisotropic_axis, needs_resampling, resample, resample_segmentation, shape_for_spacing

CLASS_LOCATIONS_PER_LABEL = 2000


def preprocess_case(images: np.ndarray, seg: np.ndarray | None, spacing: list[float], affine: np.ndarray, plans: schemas.Plans, configuration: str | None = None, case_id: str = "case", seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, schemas.CaseProperties]:
    """Crop, resample and normalise one case.

    ``images``: C×I×J×K raw intensities; ``seg``: I×J×K labels or None; ``spacing`` in mm.
    Returns float32 C×I'×J'×K', int8 I'×J'×K' (or None) and the properties to invert it.
    """
    config = plans.configuration(configuration)
    if images.shape[0] != len(plans.channel_names):
        raise MedsegError(f"{case_id}: expected {len(plans.channel_names)} channels ({', '.join(plans.channel_names)}), got {images.shape[0]}")
    mask = nonzero_mask(images)
    box = bounding_box(mask)
    images_c, mask_c = crop(images, box), crop(mask, box)
    seg_c = crop(seg, box) if seg is not None else None
    shape_after_crop = list(images_c.shape[1:])
    target = list(config.spacing)
    new_shape = shape_for_spacing(shape_after_crop, spacing, target)
    if needs_resampling(spacing, target):
        aniso = anisotropic_axis(spacing)
        images_c = resample(images_c, new_shape, order=3, anisotropic_axis=aniso)
        mask_c = resample_segmentation(mask_c.astype(np.uint8), new_shape).astype(bool)
        if seg_c is not None:
            seg_c = resample_segmentation(seg_c, new_shape)
    data = np.stack([normalize(images_c[c], mask_c, spec) for c, spec in enumerate(plans.normalization)]).astype(np.float32)
    locations: dict[str, list[list[int]]] = {}
    if seg_c is not None:
        rng = np.random.default_rng(seed)
        for value in sorted(set(plans.labels.values()) - {0}):
            idx = np.argwhere(seg_c == value)
            if len(idx) > CLASS_LOCATIONS_PER_LABEL:
                idx = idx[rng.choice(len(idx), CLASS_LOCATIONS_PER_LABEL, replace=False)]
            locations[str(value)] = idx.astype(int).tolist()
    props = schemas.CaseProperties(
        case_id=case_id, original_shape=list(images.shape[1:]), original_spacing=[float(s) for s in spacing],
        original_affine=np.asarray(affine).tolist(), crop_bbox=box, shape_after_crop=shape_after_crop,
        shape_after_resample=list(data.shape[1:]), target_spacing=target, class_locations=locations,
    )
    return data, (seg_c.astype(np.int8) if seg_c is not None else None), props


def restore_to_original(probabilities: np.ndarray, props: schemas.CaseProperties) -> np.ndarray:
    """Class probabilities K×I'×J'×K' on the preprocessed grid → label map on the original grid.

    Probabilities are resampled linearly (smoother than resampling labels), then arg-maxed, then pasted
    into the crop box; voxels outside it are background.
    """
    if list(probabilities.shape[1:]) != list(props.shape_after_crop):
        probabilities = resample(probabilities.astype(np.float32), props.shape_after_crop, order=1)
    labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    return uncrop(labels, props.crop_bbox, props.original_shape, fill=0)


def restore_labels_to_original(labels: np.ndarray, props: schemas.CaseProperties) -> np.ndarray:
    """A label map on the preprocessed grid → the original grid (nearest neighbour)."""
    if list(labels.shape) != list(props.shape_after_crop):
        labels = resample_segmentation(labels, props.shape_after_crop)
    return uncrop(labels.astype(np.uint8), props.crop_bbox, props.original_shape, fill=0)


def _preprocess_one(job: tuple[Path, Path, str, schemas.Plans, str, int]) -> str:
    dataset_dir, out_dir, case_id, plans, configuration, seed = job
    images, seg, affine, spacing = load_case(dataset_dir, case_id, len(plans.channel_names))
    data, seg_p, props = preprocess_case(images, seg, spacing, affine, plans, configuration, case_id, seed)
    save_npy(out_dir / f"{case_id}.npy", data)
    save_npy(out_dir / f"{case_id}_seg.npy", seg_p)
    props.save(out_dir / f"{case_id}.json")
    return case_id


def training_case_ids(splits: schemas.Splits) -> list[str]:
    """All cases in the folds (train ∪ val), never the held-out test cases."""
    ids = {c for fold in splits.folds for part in ("train", "val") for c in fold.get(part, [])}
    return sorted(ids - set(splits.test))


def run_preprocessing(dataset_dir: Path, out_dir: Path, budget: str = "cpu", configurations: tuple[str, ...] = ("3d_fullres",), workers: int | None = None, progress: bool = True) -> schemas.Plans:
    """Fingerprint, plan and preprocess the training cases of a canonical dataset into ``out_dir``."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if not dataset_dir.is_dir():
        raise MedsegError("dataset folder not found", dataset_dir)
    dataset = schemas.DatasetJson.load(dataset_dir)
    splits = schemas.Splits.load(dataset_dir)
    case_ids = training_case_ids(splits)
    if not case_ids:
        raise MedsegError("splits.json has no training cases", dataset_dir / schemas.SPLITS_JSON)
    workers = workers or len(os.sched_getaffinity(0))
    fingerprint = compute_fingerprint(dataset_dir, case_ids, workers=workers, progress=progress)
    plans = make_plans(fingerprint, dataset, budget, configurations)
    with atomic_dir(out_dir) as tmp:
        fingerprint.save(tmp)
        plans.save(tmp)
        shutil.copy2(dataset_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        shutil.copy2(dataset_dir / schemas.SPLITS_JSON, tmp / schemas.SPLITS_JSON)
        for name in plans.configurations:
            (tmp / name).mkdir()
            jobs = [(dataset_dir, tmp / name, cid, plans, name, i) for i, cid in enumerate(case_ids)]
            desc = f"preprocess {name}"
            if workers > 1:
                with ProcessPoolExecutor(workers) as pool:
                    list(tqdm(pool.map(_preprocess_one, jobs), total=len(jobs), desc=desc, disable=not progress))
            else:
                for job in tqdm(jobs, desc=desc, disable=not progress):
                    _preprocess_one(job)
    return plans
