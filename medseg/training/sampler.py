"""Patch sampling with foreground oversampling, and on-the-fly augmentation.

nnU-Net draws a share of its patches (one third by default) centred on a voxel of a randomly chosen
foreground class, so small structures are seen often enough; the rest are drawn uniformly.

Without ``augmentation`` each patch is only mirrored (each axis with p ½, ``mirror=True``). With it
(``augmentation=True`` for :func:`~medseg.training.augmentation.default_augmentation`, or a
:class:`~medseg.training.augmentation.Compose`) the sampler crops the pipeline's larger ``input_size``
around the same centre and passes the batch through the pipeline (which mirrors itself), drawing its random
numbers from the sampler's generator: one seed, one state to checkpoint. When the pipeline starts with its spatial
transform (always, for the built-in ones) that crop is not copied: the transform reads of each sample's window
only the region it resamples (:class:`~medseg.training.augmentation.LazyBatch`), with the same values.

Classification (dataset.json ``task: "classification"``) trains on whole volumes, not patches:
:class:`VolumeCase` is a preprocessed case with its class and age, :func:`fit_volume` turns a whole volume
into the classifier's fixed input, and :class:`VolumeSampler` draws batches of them.

Cascade (a 3d_lowres → 3d_fullres cascade's full-resolution stage, :mod:`medseg.training.cascade`): a
:class:`CascadeCase` carries the low-resolution stage's segmentation on the same grid (``prev``). The sampler
crops it with the patch, mirrors it with the patch and, with augmentation, moves it through the same spatial
transform as the labels (nearest neighbour; intensity transforms never touch it), then appends its one-hot
foreground masks to the image channels: the batch images have C + L channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.preprocessing.classifier_input import fit_volume
from medseg.training.augmentation import Compose, LazyBatch, SpatialTransform, default_augmentation


#: Cases opened in this process by unpickling, keyed by how they were opened. Loader workers receive a sampler
#: every epoch; the cache keeps them from re-reading every case's properties (class locations) each time.
#: Only :mod:`medseg.training.loader`'s workers switch it on, so pickling elsewhere keeps its usual meaning.
_REOPENED: dict[tuple, object] | None = None


def _reopen(cls: type, args: tuple) -> object:
    """Unpickle a case by opening it again from its files (the arrays are memory-mapped: sending them would copy
    whole volumes to every loader worker every epoch)."""
    key = (cls, args)
    if _REOPENED is not None and key in _REOPENED:
        return _REOPENED[key]
    case = cls(*args)
    if _REOPENED is not None:
        _REOPENED[key] = case
    return case


class PreprocessedCase:
    """One preprocessed case, memory-mapped: ``data`` C×I×J×K float32, ``seg`` I×J×K int8.

    Pickles as its folder and id (reopened, still memory-mapped, on the other side)."""

    prev: np.ndarray | None = None  # a cascade's previous-stage segmentation (CascadeCase)
    prev_labels: tuple[int, ...] | list[int] = ()

    def __init__(self, folder: Path, case_id: str):
        self.case_id = case_id
        self._opened_with: tuple = (Path(folder), case_id)
        for suffix in (schemas.CASE_IMAGE_SUFFIX, schemas.CASE_SEG_SUFFIX):
            if not (folder / f"{case_id}{suffix}").is_file():
                raise MedsegError(f"preprocessed case {case_id} is missing (rerun preprocess?)", folder / f"{case_id}{suffix}")
        self.data = np.load(folder / f"{case_id}{schemas.CASE_IMAGE_SUFFIX}", mmap_mode="r")
        self.seg = np.load(folder / f"{case_id}{schemas.CASE_SEG_SUFFIX}", mmap_mode="r")
        self.props = schemas.CaseProperties.load(folder / f"{case_id}{schemas.CASE_PROPERTIES_SUFFIX}")
        self.locations = {k: np.asarray(v, dtype=int) for k, v in self.props.class_locations.items() if v}

    def __reduce__(self) -> tuple:
        return _reopen, (type(self), self._opened_with)


class CascadeCase(PreprocessedCase):
    """A preprocessed case of a cascade's full-resolution stage: ``images`` C×I×J×K (memory-mapped), ``seg``,
    and ``prev`` I×J×K, the previous stage's segmentation on the same grid (``<case>_prev.npy`` in
    ``prev_folder``). ``data`` is the network's whole input, images followed by the one-hot masks of
    ``prev_labels`` (built on access: what validation and postprocessing predict on)."""

    def __init__(self, folder: Path, case_id: str, prev_folder: Path, prev_labels: list[int]):
        super().__init__(folder, case_id)
        self._opened_with = (Path(folder), case_id, Path(prev_folder), tuple(int(v) for v in prev_labels))
        path = Path(prev_folder) / f"{case_id}{schemas.CASE_PREVIOUS_STAGE_SUFFIX}"
        if not path.is_file():
            raise MedsegError(f"previous-stage segmentation of case {case_id} is missing (rerun the cascade preparation)", path)
        self.prev = np.load(path, mmap_mode="r")
        self.prev_labels = [int(v) for v in prev_labels]
        if tuple(self.prev.shape) != tuple(self.images.shape[1:]):
            raise MedsegError(f"previous-stage segmentation of case {case_id} has shape {tuple(self.prev.shape)}, the images {tuple(self.images.shape[1:])}", path)

    @property
    def data(self) -> np.ndarray:  # type: ignore[override]
        from medseg.inference.cascade import with_previous_stage

        return with_previous_stage(np.asarray(self.images), np.asarray(self.prev), self.prev_labels)

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self.images = value


def _images_of(case: PreprocessedCase) -> np.ndarray:
    """The image channels of a case (a cascade case's ``data`` also holds the previous stage)."""
    return case.images if isinstance(case, CascadeCase) else case.data


def _padded_crop(array: np.ndarray, start: np.ndarray, size: list[int], fill: float, out: np.ndarray | None = None) -> np.ndarray:
    """Crop ``size`` voxels from ``start`` (may be negative / beyond the end) out of the last 3 axes, padding.
    ``out``: write into this array instead (already holding ``fill``; its dtype converts the values)."""
    shape = np.array(array.shape[-3:])
    lo = np.maximum(start, 0)
    hi = np.maximum(np.minimum(start + np.array(size), shape), lo)  # a crop wholly beyond the array: all fill
    lead = array.shape[:-3]
    if out is None:
        out = np.full(tuple(lead) + tuple(size), fill, dtype=array.dtype)
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
    return out


class _Windows(LazyBatch):
    """The batch of padded crops ``size`` at ``starts`` (one per sample) of ``arrays`` (each C×I×J×K, or I×J×K: one
    channel), ``fill`` beyond the array, as ``dtype``: read box by box by the spatial transform, so only what it
    resamples is copied out of the (memory-mapped) cases. Reading a box gives exactly the values cropping the whole
    window first would."""

    def __init__(self, arrays: list[np.ndarray], starts: list[np.ndarray], size: list[int], fill: float, dtype: np.dtype):
        self.arrays, self.starts, self.fill, self.np_dtype = arrays, starts, fill, np.dtype(dtype)
        channels = arrays[0].shape[0] if arrays[0].ndim == 4 else 1
        self.shape = (len(arrays), channels, *size)
        self.dtype = torch.from_numpy(np.empty(0, self.np_dtype)).dtype

    def read(self, b: int, box: tuple[slice, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        array, size = self.arrays[b], [s.stop - s.start for s in box]
        if out is None:  # zeros: calloc'd, pages of the padding never written
            target = np.zeros((self.shape[1], *size), self.np_dtype) if self.fill == 0 else np.full((self.shape[1], *size), self.fill, self.np_dtype)
        else:
            target = out.fill_(self.fill).numpy()
        start = np.asarray(self.starts[b]) + np.array([s.start for s in box])
        _padded_crop(array, start, size, self.fill, out=target if array.ndim == 4 else target[0])
        return torch.from_numpy(target) if out is None else out


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
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        if augmentation is True:
            augmentation = default_augmentation(self.patch_size)
        self.augmentation: Compose | None = augmentation or None
        if self.augmentation is not None and list(self.augmentation.patch_size) != self.patch_size:
            raise ValueError(f"the augmentation produces patches of {self.augmentation.patch_size}, the sampler needs {self.patch_size}")
        self.crop_size = list(self.augmentation.input_size) if self.augmentation is not None else self.patch_size

    def _start(self, case: PreprocessedCase, force_fg: bool) -> np.ndarray:
        shape = np.array(_images_of(case).shape[1:])
        patch = np.array(self.patch_size)
        if force_fg and case.locations:
            label = self.rng.choice(sorted(case.locations))
            centre = case.locations[label][self.rng.integers(len(case.locations[label]))]
            return centre - patch // 2
        # uniform: allow the patch to hang over the border by up to half its size, like nnU-Net
        lo = -(patch // 2) * (shape < patch)
        hi = np.maximum(shape - patch, lo) + 1
        return np.array([self.rng.integers(a, b) for a, b in zip(lo, hi)])

    def sample_at(self, iteration: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch number ``iteration`` of the epoch: drawn from a generator seeded with (seed, iteration) only, so
        the batch does not depend on which batches were drawn before, in which process or in which order
        (what lets K loader workers share an epoch and a resumed run repeat it; see :mod:`medseg.training.loader`)."""
        self.rng = iteration_rng(self.seed, iteration)
        return self.sample()

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch from the sampler's running generator (:meth:`sample_at` restarts it per batch)."""
        images, labels, prevs = [], [], []
        for b in range(self.batch_size):
            case = self.cases[self.rng.integers(len(self.cases))]
            # each patch is centred on foreground with probability foreground_share (nnU-Net: 1/3)
            force_fg = self.rng.random() < self.foreground_share
            start = self._start(case, force_fg)
            previous = getattr(case, "prev", None)  # cascade: the previous stage's map (CascadeCase only)
            if self.augmentation is not None:  # the larger crop around the same centre; the pipeline mirrors
                start = start - (np.array(self.crop_size) - np.array(self.patch_size)) // 2
                images.append((_images_of(case), start))  # cropped below (or read box by box by the spatial transform)
                labels.append((case.seg, start))
                if previous is not None:
                    prevs.append(_padded_crop(previous, start, self.crop_size, 0))
                continue
            img = _padded_crop(_images_of(case), start, self.patch_size, 0.0)
            seg = _padded_crop(case.seg, start, self.patch_size, 0)
            prev = _padded_crop(previous, start, self.patch_size, 0) if previous is not None else None
            if self.mirror:
                for axis in range(3):
                    if self.rng.random() < 0.5:
                        img = np.flip(img, axis=1 + axis)
                        seg = np.flip(seg, axis=axis)
                        prev = np.flip(prev, axis=axis) if prev is not None else None
            images.append(np.ascontiguousarray(img))
            labels.append(np.ascontiguousarray(seg))
            if prev is not None:
                prevs.append(np.ascontiguousarray(prev))
        if prevs and len(prevs) != len(images):
            raise MedsegError("a batch mixes cascade cases (with a previous-stage segmentation) and plain ones")
        if self.augmentation is not None and not prevs and self.augmentation.transforms and isinstance(self.augmentation.transforms[0], SpatialTransform):
            # the pipeline's spatial transform reads of each window only what it resamples (an untouched sample: its
            # central patch); the same values as cropping the windows first, without copying ~250³ voxels a sample
            windows = _Windows([a for a, _ in images], [s for _, s in images], self.crop_size, 0.0, np.float32)
            seg_windows = _Windows([a for a, _ in labels], [s for _, s in labels], self.crop_size, 0, np.result_type(*[a.dtype for a, _ in labels]))
            batch_img, batch_seg = self.augmentation(windows, seg_windows, self.rng)
            return batch_img, batch_seg.astype(np.int64)
        if self.augmentation is not None:
            labels = [_padded_crop(array, start, self.crop_size, 0) for array, start in labels]
            # one float32 batch array filled in place: with 128³ patches the augmentation's input is ~250³ voxels a
            # sample and channel, and stacking then converting would copy all of it twice more (same values)
            batch_img = np.zeros((len(images), images[0][0].shape[0], *self.crop_size), dtype=np.float32)
            for b, (array, start) in enumerate(images):
                _padded_crop(array, start, self.crop_size, 0.0, out=batch_img[b])
        else:
            batch_img = np.stack(images).astype(np.float32)
        batch_seg = np.stack(labels)[:, None]
        batch_prev = np.stack(prevs)[:, None] if prevs else None
        if self.augmentation is not None:
            if batch_prev is None:
                batch_img, batch_seg = self.augmentation(batch_img, batch_seg, self.rng)
            else:
                # one integer map carries both label maps through the spatial transform (nearest neighbour: each
                # output voxel takes both values from the same input voxel; the border fill 0 decodes to 0, 0)
                base = int(max(int(batch_seg.max(initial=0)), int(batch_prev.max(initial=0)))) + 1
                joint = batch_seg.astype(np.int64) + base * batch_prev.astype(np.int64)
                batch_img, joint = self.augmentation(batch_img, joint, self.rng)
                batch_seg, batch_prev = joint % base, joint // base
        if batch_prev is not None:
            from medseg.inference.cascade import one_hot

            labels_of = self.cases[0].prev_labels
            batch_img = np.concatenate([batch_img, np.stack([one_hot(p[0], labels_of) for p in batch_prev])], axis=1)
        return batch_img, batch_seg.astype(np.int64)


# --------------------------------------------------------------------------- whole volumes (classification)
class VolumeCase:
    """One preprocessed case of a classification dataset: ``data`` C×I×J×K float32 (memory-mapped), its
    class index ``target`` and the subject's ``age`` in years (None when unknown). No segmentation is read."""

    def __init__(self, folder: Path, case_id: str, target: int, age: float | None = None):
        self.case_id, self.target, self.age = case_id, int(target), (None if age is None else float(age))
        self._opened_with: tuple = (Path(folder), case_id, self.target, self.age)
        path = folder / f"{case_id}{schemas.CASE_IMAGE_SUFFIX}"
        if not path.is_file():
            raise MedsegError(f"preprocessed case {case_id} is missing (rerun preprocess?)", path)
        self.data = np.load(path, mmap_mode="r")

    def __reduce__(self) -> tuple:
        return _reopen, (type(self), self._opened_with)


class VolumeSampler:
    """Draws classification batches ``(images N×C×size float32, classes N×1 int64, ages N float32 | None)``.

    Cases come in a random order, each once before any repeats (a new order every pass), so an epoch of
    ``len(cases) / batch_size`` steps sees every training case once. ``mirror_axes``: axes (0, 1, 2) flipped
    each with p ½ (left-right, axis 0 in RAS, for brains). ``ages``: return the cases' ages (all must have one).
    """

    def __init__(self, cases: list[VolumeCase], size: list[int], scale: float, batch_size: int, seed: int = 0,
                 mirror_axes: tuple[int, ...] = (), ages: bool = False):
        if not cases:
            raise ValueError("no cases to sample from")
        if ages:
            missing = [c.case_id for c in cases if c.age is None]
            if missing:
                raise MedsegError(f"the network takes the age, which case(s) {missing[:10]} do not have (manifest.json covariates.age)")
        self.cases, self.size, self.scale, self.batch_size = cases, list(size), float(scale), int(batch_size)
        self.mirror_axes, self.ages = tuple(mirror_axes), ages
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self._drawn = 0  # batches drawn by sample(): the next one is sample_at(_drawn)
        self._pass: tuple[int, list[int]] = (-1, [])  # the last pass's case order (a pass spans several batches)

    def _order_of(self, n_pass: int) -> list[int]:
        """The case order of pass ``n_pass`` over the cases: a permutation seeded with (seed, pass) alone."""
        if self._pass[0] != n_pass:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, int(n_pass)]))
            self._pass = (n_pass, rng.permutation(len(self.cases)).tolist())
        return self._pass[1]

    def sample_at(self, iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Batch number ``iteration``: its cases are the slots ``iteration·batch_size …`` of the concatenated
        per-pass permutations (each case once per pass), its mirroring drawn from (seed, iteration) alone, so
        the batch is the same whichever process draws it and whatever was drawn before."""
        n = len(self.cases)
        picks = [self._order_of(slot // n)[slot % n] for slot in range(iteration * self.batch_size, (iteration + 1) * self.batch_size)]
        self.rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0, int(iteration)]))
        images, targets, ages = [], [], []
        for index in picks:
            case = self.cases[index]
            img = fit_volume(case.data, self.size, self.scale)
            for axis in self.mirror_axes:
                if self.rng.random() < 0.5:
                    img = np.flip(img, axis=1 + axis)
            images.append(np.ascontiguousarray(img))
            targets.append(case.target)
            ages.append(case.age if case.age is not None else np.nan)
        return np.stack(images), np.asarray(targets, dtype=np.int64)[:, None], (np.asarray(ages, dtype=np.float32) if self.ages else None)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The next batch: :meth:`sample_at` of the number of batches drawn so far."""
        batch = self.sample_at(self._drawn)
        self._drawn += 1
        return batch


def iteration_rng(seed: int, iteration: int) -> np.random.Generator:
    """The generator of batch ``iteration`` of a sampler seeded with ``seed`` (already a function of the run's
    seed, the epoch and the rank: :func:`medseg.training.ddp.epoch_seed`)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(iteration)]))


class PrefetchSampler:
    """Draw the batches of ``sampler`` in a background thread, up to ``depth`` ahead of the training step.

    Patch cropping and augmentation run in numpy/scipy/torch code that releases the GIL, so one loader
    thread overlaps them with the network's forward and backward pass; the step then rarely waits (the
    trainer logs the share of time it still does). One thread draws the batches in order from the
    sampler's single generator, so the batches, and therefore training, are exactly those of the plain
    sampler (resume and DDP stay bit-exact). Exactly ``n_batches`` are drawn: batch i is ``sample_at(i)``
    when the sampler has it (the loader workers' batches), else the i-th ``sample()``.

    An error in the loader thread is raised by the next :meth:`sample`. Call :meth:`close` when done.
    """

    def __init__(self, sampler, n_batches: int, depth: int = 2):
        import queue
        import threading

        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._sampler, self._remaining = sampler, int(n_batches)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._load, name="medseg-loader", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import queue

        # by index where the sampler can (the batches then match the loader workers'); plain samplers in order
        draw = getattr(self._sampler, "sample_at", None)
        for i in range(self._remaining):
            try:
                item = ("batch", draw(i) if callable(draw) else self._sampler.sample())
            except BaseException as exc:  # handed to the training thread
                item = ("error", exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[0] == "error":
                return

    def sample(self):
        if self._remaining <= 0:
            raise RuntimeError("all prefetched batches were used")
        kind, value = self._queue.get()
        self._remaining -= 1
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the loader thread (drop batches not taken) and wait for it."""
        import queue

        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)
