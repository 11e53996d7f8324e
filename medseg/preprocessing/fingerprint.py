"""Dataset fingerprint: the geometry and intensity statistics the planner decides from.

Isensee et al. 2021 (nnU-Net), "dataset fingerprint". Per case: shape, spacing (mm), the crop-to-nonzero
box and the fraction of voxels it keeps. Per channel: mean, std, median, 0.5/99.5 percentiles, min and max
of *foreground* (label > 0) voxels. As in nnU-Net the statistics come from a fixed number of foreground
voxels drawn per case with replacement (so every case weighs the same and the cost does not grow with the
image size); nnU-Net draws 10⁸ / n_cases per case, we draw :data:`SAMPLES_PER_CASE` (10⁴: percentiles of
the pooled sample are then stable to well under 1 %), and at most :data:`MAX_SAMPLES` per channel in all
(:func:`capped_samples_per_case`: fewer per case beyond 50 cases, so the pooled sample, held in memory until the
statistics are taken, does not grow with the dataset). The draw is seeded per case id, so the result does
not depend on case order or worker count. Class voxel frequencies are counted exactly.

Written as ``fingerprint.json`` beside ``plans.json``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import load_nifti, nifti_spacing
from medseg.preprocessing.cropping import bounding_box, crop, nonzero_mask
from medseg.preprocessing.parallel import run_cases

SAMPLES_PER_CASE = 10_000
#: The pooled sample's cap per channel (float32: 2 MB a channel), reached at 50 cases of :data:`SAMPLES_PER_CASE`.
MAX_SAMPLES = 500_000
SEED = 1234


def capped_samples_per_case(n_cases: int, wanted: int = SAMPLES_PER_CASE, total: int = MAX_SAMPLES) -> int:
    """Foreground voxels drawn per case: ``wanted``, or fewer so that ``n_cases`` of them stay within ``total`` (as
    nnU-Net's 10⁸ / n_cases; at least one, so every case is seen)."""
    return int(min(wanted, max(1, total // max(int(n_cases), 1))))


def case_files(dataset_dir: Path, case_id: str, n_channels: int, images_folder: str = schemas.IMAGES_TR) -> list[Path]:
    return [Path(dataset_dir) / images_folder / f"{case_id}_{c:04d}.nii.gz" for c in range(n_channels)]


def label_file(dataset_dir: Path, case_id: str) -> Path:
    return Path(dataset_dir) / schemas.LABELS_TR / f"{case_id}.nii.gz"


def describe_case(case_id: str) -> str:
    """How messages name a case: ``case <id>``, or "the input" for an unnamed one (a request to the model server)."""
    return "the input" if case_id in ("", "case") else f"case {case_id}"


def check_spacing(spacing: list[float], case_id: str, path: Path | str | None = None) -> None:
    """Raise :class:`MedsegError` naming the case (and file) unless every spacing is finite and > 0."""
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise MedsegError(f"{describe_case(case_id)}: voxel spacing {tuple(round(float(s), 6) for s in spacing)} mm is not usable (every axis must be > 0)", path)


def check_channels(images: np.ndarray, case_id: str, names: list[str] | None = None, paths: list[Path] | None = None) -> None:
    """Raise :class:`MedsegError` naming the case, channel and file when a channel is all zero.

    An all-zero channel is a failed export or a wrong file, never data: it would silently train the network
    to ignore that channel (and z-scoring it divides by a zero std).
    """
    for c in range(images.shape[0]):
        if not images[c].any():
            name = names[c] if names else str(c)
            raise MedsegError(f"{describe_case(case_id)}: channel {c} ({name}) is all zero", paths[c] if paths else None)


def load_case(dataset_dir: Path, case_id: str, n_channels: int, with_label: bool = True, channel_names: list[str] | None = None, images_folder: str = schemas.IMAGES_TR):
    """``(images C×I×J×K float32, seg I×J×K uint8 | None, affine 4×4, spacing [mm]×3)`` of one canonical case.

    Raises:
        MedsegError: naming the file, for a missing/corrupt file, channels or label of different shapes,
            a spacing that is not > 0, or a label with non-integer or negative values.
    """
    paths = case_files(dataset_dir, case_id, n_channels, images_folder)
    arrays, affine, spacing = [], None, None
    for path in paths:
        arr, aff, hdr = load_nifti(path)
        if affine is None:
            affine, spacing = aff, list(nifti_spacing(hdr))
            check_spacing(spacing, case_id, path)
        elif arr.shape != arrays[0].shape:
            raise MedsegError(f"case {case_id}: shape {arr.shape} differs from channel 0's {arrays[0].shape}", path)
        arrays.append(arr)
    images = np.stack(arrays)
    seg = None
    if with_label:
        path = label_file(dataset_dir, case_id)
        seg_arr, _, _ = load_nifti(path, dtype=None)  # type: ignore[arg-type]  # the stored dtype (uint8 usually)
        if seg_arr.shape != images.shape[1:]:
            raise MedsegError(f"case {case_id}: label shape {seg_arr.shape} differs from the images' {images.shape[1:]}", path)
        if seg_arr.dtype.kind not in "iu" and not np.array_equal(np.rint(seg_arr), seg_arr):
            raise MedsegError(f"case {case_id}: labels must be integers", path)
        if seg_arr.dtype != np.uint8 and (seg_arr.min() < 0 or seg_arr.max() > 255):
            raise MedsegError(f"case {case_id}: labels must be integers in 0..255", path)
        seg = seg_arr.astype(np.uint8, copy=False)
    return images, seg, affine, spacing


def _case_seed(seed: int, case_id: str) -> list[int]:
    return [int(seed), zlib.crc32(case_id.encode())]


def case_fingerprint(images: np.ndarray, seg: np.ndarray | None, spacing: list[float], case_id: str, n_labels: int, samples_per_case: int = SAMPLES_PER_CASE, seed: int = SEED) -> dict:
    """Fingerprint of one loaded case (see the module docstring). ``seg`` values must be < ``n_labels``;
    ``seg`` None (a classification dataset: no label map) samples the intensities inside the nonzero mask."""
    mask = nonzero_mask(images)
    box = bounding_box(mask)
    images_c = crop(images, box)
    seg_c = crop(seg, box) if seg is not None else crop(mask, box)
    fg = np.flatnonzero(seg_c > 0)
    rng = np.random.default_rng(_case_seed(seed, case_id))
    if fg.size:
        picks = fg[rng.integers(0, fg.size, samples_per_case)]
        samples = [np.ascontiguousarray(images_c[c]).reshape(-1)[picks] for c in range(images.shape[0])]
    else:
        samples = [np.zeros(0, np.float32) for _ in range(images.shape[0])]
    counts = np.bincount(seg.reshape(-1), minlength=n_labels) if seg is not None else np.zeros(n_labels, np.int64)
    shape_after_crop = [b - a for a, b in box]
    # per channel, the mean of its nonzero voxels: what the model server compares each request with (drift)
    nonzero_means = []
    for channel in images_c:
        n = int(np.count_nonzero(channel))
        nonzero_means.append(float(np.sum(channel, dtype=np.float64)) / n if n else None)
    return {
        "case_id": case_id,
        "spacing": [float(s) for s in spacing],
        "shape": list(images.shape[1:]),
        "crop_box": box,
        "shape_after_crop": shape_after_crop,
        "crop_fraction": float(np.prod(shape_after_crop) / np.prod(images.shape[1:])),
        "samples": samples,
        "counts": [int(c) for c in counts],
        "nonzero_means": nonzero_means,
    }


def _fingerprint_job(args: tuple[Path, str, int, list[str], int, int, int, bool]) -> dict:
    dataset_dir, case_id, n_channels, names, n_labels, samples, seed, with_label = args
    images, seg, _, spacing = load_case(dataset_dir, case_id, n_channels, with_label=with_label)
    check_channels(images, case_id, names, case_files(dataset_dir, case_id, n_channels))
    if seg is not None and int(seg.max()) >= n_labels:
        raise MedsegError(f"case {case_id}: label value {int(seg.max())} is not in dataset.json's labels", label_file(dataset_dir, case_id))
    return case_fingerprint(images, seg, spacing, case_id, n_labels, samples, seed)


def channel_statistics(values: np.ndarray) -> dict[str, float]:
    """mean, std, median, p00_5, p99_5, min, max of a 1-D sample (float64 arithmetic)."""
    v = values.astype(np.float64, copy=False)
    p00_5, median, p99_5 = np.percentile(v, [0.5, 50.0, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(median), "p00_5": float(p00_5), "p99_5": float(p99_5), "min": float(v.min()), "max": float(v.max())}


def compute_fingerprint(dataset_dir: Path, case_ids: list[str], workers: int = 1, progress: bool = True, samples_per_case: int = SAMPLES_PER_CASE, seed: int = SEED) -> schemas.Fingerprint:
    """Fingerprint of ``case_ids`` (the cases used for training; never the held-out test cases).

    Cases are read in ``workers`` processes, one case per worker at a time.

    Raises:
        MedsegError: naming the case and file for unreadable files, a spacing that is not > 0, an all-zero
            channel, or label values not declared in ``dataset.json``.
    """
    dataset_dir = Path(dataset_dir)
    ds = schemas.DatasetJson.load(dataset_dir)
    n_labels = max(ds.label_values) + 1
    samples_per_case = capped_samples_per_case(len(case_ids), samples_per_case)  # the pooled sample is capped
    with_label = ds.task != "classification"  # a classification case has a class, not a label map
    jobs = [(dataset_dir, cid, len(ds.channel_names), ds.channels, n_labels, samples_per_case, seed, with_label) for cid in case_ids]
    rows = run_cases(_fingerprint_job, jobs, workers, "fingerprint", progress)
    channels = {}
    for c, name in enumerate(ds.channels):
        values = np.concatenate([r["samples"][c] for r in rows]) if rows else np.zeros(0)
        channels[name] = channel_statistics(values if values.size else np.zeros(1))
    counts = np.sum([r["counts"] for r in rows], axis=0) if rows else np.zeros(n_labels, int)
    n_total = max(int(counts.sum()), 1)
    return schemas.Fingerprint(
        spacings=[r["spacing"] for r in rows],
        shapes=[r["shape"] for r in rows],
        shapes_after_crop=[r["shape_after_crop"] for r in rows],
        channels=channels,
        class_frequencies={str(v): float(counts[v]) / n_total for v in ds.label_values},
        case_ids=[r["case_id"] for r in rows],
        crop_fractions=[r["crop_fraction"] for r in rows],
        crop_boxes=[r["crop_box"] for r in rows],
        class_voxel_counts={str(v): int(counts[v]) for v in ds.label_values},
        samples_per_case=int(samples_per_case),
        seed=int(seed),
        case_nonzero_means={name: [r["nonzero_means"][c] for r in rows if r["nonzero_means"][c] is not None] for c, name in enumerate(ds.channels)},
    )
