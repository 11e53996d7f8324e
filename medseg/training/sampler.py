"""Patch sampling with foreground oversampling, and on-the-fly augmentation.

nnU-Net draws a share of its patches (one third by default) centred on a voxel of a randomly chosen
foreground class, so small structures are seen often enough; the rest are drawn uniformly.

Without ``augmentation`` each patch is only mirrored (each axis with p ½, ``mirror=True``). With it
(``augmentation=True`` for :func:`~medseg.training.augmentation.default_augmentation`, or a
:class:`~medseg.training.augmentation.Compose`) the sampler crops the pipeline's larger ``input_size``
around the same centre and passes the batch through the pipeline (which mirrors itself), drawing its random
numbers from the sampler's generator: one seed, one state to checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.training.augmentation import Compose, default_augmentation


class PreprocessedCase:
    """One preprocessed case, memory-mapped: ``data`` C×I×J×K float32, ``seg`` I×J×K int8."""

    def __init__(self, folder: Path, case_id: str):
        self.case_id = case_id
        for suffix in (".npy", "_seg.npy"):
            if not (folder / f"{case_id}{suffix}").is_file():
                raise MedsegError(f"preprocessed case {case_id} is missing (rerun preprocess?)", folder / f"{case_id}{suffix}")
        self.data = np.load(folder / f"{case_id}.npy", mmap_mode="r")
        self.seg = np.load(folder / f"{case_id}_seg.npy", mmap_mode="r")
        self.props = schemas.CaseProperties.load(folder / f"{case_id}.json")
        self.locations = {k: np.asarray(v, dtype=int) for k, v in self.props.class_locations.items() if v}


def _padded_crop(array: np.ndarray, start: np.ndarray, size: list[int], fill: float) -> np.ndarray:
    """Crop ``size`` voxels from ``start`` (may be negative / beyond the end) out of the last 3 axes, padding."""
    shape = np.array(array.shape[-3:])
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.array(size), shape)
    lead = array.shape[:-3]
    out = np.full(tuple(lead) + tuple(size), fill, dtype=array.dtype)
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
    return out


class PatchSampler:
    """Draws training batches ``(images N×C×P×P×P float32, labels N×1×P×P×P int64)``.

    ``augmentation``: ``None``/``False`` (mirroring only, as ``mirror`` says), ``True`` (nnU-Net's default
    pipeline for ``patch_size``) or a :class:`~medseg.training.augmentation.Compose` producing ``patch_size``.
    """

    def __init__(self, cases: list[PreprocessedCase], patch_size: list[int], batch_size: int, foreground_share: float = 1 / 3, mirror: bool = True, seed: int = 0,
                 augmentation: Compose | bool | None = None):
        if not cases:
            raise ValueError("no cases to sample from")
        self.cases, self.patch_size, self.batch_size = cases, list(patch_size), batch_size
        self.foreground_share, self.mirror = foreground_share, mirror
        self.rng = np.random.default_rng(seed)
        if augmentation is True:
            augmentation = default_augmentation(self.patch_size)
        self.augmentation: Compose | None = augmentation or None
        if self.augmentation is not None and list(self.augmentation.patch_size) != self.patch_size:
            raise ValueError(f"the augmentation produces patches of {self.augmentation.patch_size}, the sampler needs {self.patch_size}")
        self.crop_size = list(self.augmentation.input_size) if self.augmentation is not None else self.patch_size

    def _start(self, case: PreprocessedCase, force_fg: bool) -> np.ndarray:
        shape = np.array(case.data.shape[1:])
        patch = np.array(self.patch_size)
        if force_fg and case.locations:
            label = self.rng.choice(sorted(case.locations))
            centre = case.locations[label][self.rng.integers(len(case.locations[label]))]
            return centre - patch // 2
        # uniform: allow the patch to hang over the border by up to half its size, like nnU-Net
        lo = -(patch // 2) * (shape < patch)
        hi = np.maximum(shape - patch, lo) + 1
        return np.array([self.rng.integers(a, b) for a, b in zip(lo, hi)])

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for b in range(self.batch_size):
            case = self.cases[self.rng.integers(len(self.cases))]
            # each patch is centred on foreground with probability foreground_share (nnU-Net: 1/3)
            force_fg = self.rng.random() < self.foreground_share
            start = self._start(case, force_fg)
            if self.augmentation is not None:  # the larger crop around the same centre; the pipeline mirrors
                start = start - (np.array(self.crop_size) - np.array(self.patch_size)) // 2
                images.append(_padded_crop(case.data, start, self.crop_size, 0.0))
                labels.append(_padded_crop(case.seg, start, self.crop_size, 0))
                continue
            img = _padded_crop(case.data, start, self.patch_size, 0.0)
            seg = _padded_crop(case.seg, start, self.patch_size, 0)
            if self.mirror:
                for axis in range(3):
                    if self.rng.random() < 0.5:
                        img = np.flip(img, axis=1 + axis)
                        seg = np.flip(seg, axis=axis)
            images.append(np.ascontiguousarray(img))
            labels.append(np.ascontiguousarray(seg))
        batch_img, batch_seg = np.stack(images).astype(np.float32), np.stack(labels)[:, None]
        if self.augmentation is not None:
            batch_img, batch_seg = self.augmentation(batch_img, batch_seg, self.rng)
        return batch_img, batch_seg.astype(np.int64)
