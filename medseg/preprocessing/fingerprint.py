"""Dataset fingerprint: geometry and intensity statistics that the planner decides from.

Per case: shape, spacing, shape after crop-to-nonzero. Per channel: statistics of foreground (label > 0)
voxels, sampled as nnU-Net does (a bounded number per case, so the cost does not grow with voxel count).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg import schemas
from medseg.io import load_nifti, nifti_spacing
from medseg.preprocessing.cropping import bounding_box, nonzero_mask

SAMPLES_PER_CASE = 10_000


def case_files(dataset_dir: Path, case_id: str, n_channels: int, images_folder: str = schemas.IMAGES_TR) -> list[Path]:
    return [dataset_dir / images_folder / f"{case_id}_{c:04d}.nii.gz" for c in range(n_channels)]


def label_file(dataset_dir: Path, case_id: str) -> Path:
    return dataset_dir / schemas.LABELS_TR / f"{case_id}.nii.gz"


def load_case(dataset_dir: Path, case_id: str, n_channels: int, with_label: bool = True):
    """``(images C×I×J×K float32, seg I×J×K uint8 | None, affine, spacing)`` of one canonical case."""
    arrays, affine, spacing = [], None, None
    for path in case_files(dataset_dir, case_id, n_channels):
        arr, aff, hdr = load_nifti(path)
        arrays.append(arr)
        if affine is None:
            affine, spacing = aff, list(nifti_spacing(hdr))
    seg = None
    if with_label:
        seg_arr, _, _ = load_nifti(label_file(dataset_dir, case_id), dtype=np.float32)
        seg = np.rint(seg_arr).astype(np.uint8)
    return np.stack(arrays), seg, affine, spacing


def _case_fingerprint(args: tuple[Path, str, int, list[int], int]) -> dict:
    dataset_dir, case_id, n_channels, label_values, seed = args
    images, seg, _, spacing = load_case(dataset_dir, case_id, n_channels)
    box = bounding_box(nonzero_mask(images))
    fg = seg > 0
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(fg)
    if idx.size > SAMPLES_PER_CASE:
        idx = rng.choice(idx, SAMPLES_PER_CASE, replace=False)
    samples = [images[c].reshape(-1)[idx] for c in range(n_channels)]
    counts = {str(v): int((seg == v).sum()) for v in label_values}
    cropped = [b - a for a, b in box]
    return {
        "case_id": case_id,
        "spacing": spacing,
        "shape": list(images.shape[1:]),
        "shape_after_crop": cropped,
        "crop_fraction": float(np.prod(cropped) / np.prod(images.shape[1:])),
        "samples": samples,
        "counts": counts,
    }


def compute_fingerprint(dataset_dir: Path, case_ids: list[str], workers: int = 1, progress: bool = True) -> schemas.Fingerprint:
    """Fingerprint of ``case_ids`` (the cases used for training; never the held-out test cases)."""
    ds = schemas.DatasetJson.load(dataset_dir)
    jobs = [(dataset_dir, cid, len(ds.channel_names), ds.label_values, i) for i, cid in enumerate(case_ids)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(tqdm(pool.map(_case_fingerprint, jobs), total=len(jobs), desc="fingerprint", disable=not progress))
    else:
        rows = [_case_fingerprint(j) for j in tqdm(jobs, desc="fingerprint", disable=not progress)]
    channels = {}
    for c, name in enumerate(ds.channels):
        values = np.concatenate([r["samples"][c] for r in rows]) if rows else np.zeros(1)
        if values.size == 0:
            values = np.zeros(1)
        channels[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "p00_5": float(np.percentile(values, 0.5)),
            "p99_5": float(np.percentile(values, 99.5)),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    totals = {str(v): sum(r["counts"][str(v)] for r in rows) for v in ds.label_values}
    n_total = max(sum(totals.values()), 1)
    return schemas.Fingerprint(
        spacings=[r["spacing"] for r in rows],
        shapes=[r["shape"] for r in rows],
        shapes_after_crop=[r["shape_after_crop"] for r in rows],
        channels=channels,
        class_frequencies={k: v / n_total for k, v in totals.items()},
        case_ids=[r["case_id"] for r in rows],
        crop_fractions=[r["crop_fraction"] for r in rows],
    )
