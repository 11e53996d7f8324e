"""On-the-fly data augmentation of training batches, nnU-Net's default pipeline (Isensee et al. 2021).

Every transform works on a whole batch at once — images (B, C, X, Y[, Z]) float32 and label maps
(B, 1, X, Y[, Z]) integer — as torch tensors on the CPU (vectorised: one ``grid_sample`` per spatially
transformed sample over the bounding box of its sampling positions, an index gather for its labels, separable
convolutions for the filters), decides per sample with its probability
``p`` whether it applies, and draws every random number from the ``numpy.random.Generator`` it is given,
so a batch is reproducible from the sampler's seed and a resumed run continues the same sequence. Labels
follow the spatial transforms (rotation, scaling, elastic deformation: nearest-neighbour sampling;
mirroring) and are never touched by the intensity transforms, so they stay in the label set.

nnU-Net v2's defaults (``nnUNetTrainer.get_training_transforms``), in this order:

===================================  =====  ==========================================================
transform                            p      parameters
===================================  =====  ==========================================================
rotation (spatial)                   0.2    each axis U(−30°, 30°) in 3D; in-plane U(−180°, 180°) for
                                            2D (±15° when the patch's aspect ratio exceeds 1.5)
scaling (spatial)                    0.2    one factor for all axes in (0.7, 1.4)
elastic deformation (spatial)        0      off in nnU-Net v2 (v1: p 0.2, α U(0, 900) in 3D, U(0, 200)
                                            in 2D, σ U(9, 13) voxels)
Gaussian noise                       0.1    variance U(0, 0.1), the same for all channels
Gaussian blur                        0.2    σ U(0.5, 1) per channel and axis; each channel with p 0.5
multiplicative brightness            0.15   factor (0.75, 1.25) per channel
contrast                             0.15   factor (0.75, 1.25) per channel, range preserved
low-resolution simulation            0.25   zoom U(0.5, 1) (same for all axes) per channel with p 0.5;
                                            nearest down, linear up
gamma, inverted image                0.1    γ (0.7, 1.5) per channel, mean and std retained
gamma                                0.3    as above, image not inverted
mirroring                            0.5    per axis, every spatial axis
===================================  =====  ==========================================================

Factors "(a, b)" with a < 1 < b are drawn as nnU-Net's ``BGContrast`` does: with probability ½ from
U(a, 1), else from U(1, b), so shrinking and growing are equally likely. Differences from nnU-Net: the
low-resolution simulation upsamples (tri)linearly, not cubically; spatial resampling of images is
(tri)linear.

Every probability and range above is a knob of ``train.augmentation`` in the parameter file
(:class:`~medseg.training.config.AugmentationConfig`, built by :func:`build_augmentation`).

The spatial transform turns a larger crop into the patch: :func:`default_augmentation` reports
``input_size``, the crop the sampler must take around the patch's centre so that rotated and scaled patches
stay inside real data (nnU-Net's "initial patch size").
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.training.config import AUTO, AugmentationConfig

Pair = tuple[torch.Tensor, torch.Tensor | None]


def _bg_factor(rng: np.random.Generator, lo: float, hi: float, size: int | tuple[int, ...] | None = None) -> np.ndarray:
    """nnU-Net's ``BGContrast`` draw: with p ½ from U(lo, 1), else U(1, hi) (plain U(lo, hi) if 1 ∉ (lo, hi))."""
    if not lo < 1 < hi:
        return rng.uniform(lo, hi, size)
    below = rng.random(size) < 0.5
    return np.where(below, rng.uniform(lo, 1.0, size), rng.uniform(1.0, hi, size))


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(x: torch.Tensor, sigmas: Sequence[float], mode: str = "reflect") -> torch.Tensor:
    """Separable Gaussian filter of (N, 1, *S) along each spatial axis with its own σ (voxels; σ ≤ 0 skips
    the axis). ``mode``: border handling, ``"reflect"`` (scipy's default), ``"replicate"`` or ``"constant"`` (zeros)."""
    dims = x.ndim - 2
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0 or x.shape[2 + axis] < 2:
            continue
        k = _gaussian_kernel(float(sigma))
        r = (k.numel() - 1) // 2
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = r
        size = x.shape[2 + axis]
        m = mode if mode == "constant" or r < size else "replicate"  # reflect needs pad < size
        xp = F.pad(x, pad, mode=m) if m != "constant" else F.pad(x, pad)
        conv = F.conv3d if dims == 3 else F.conv2d
        x = conv(xp, k.reshape(shape))
    return x


class Transform:
    """Base class: ``transform(image, label, rng) → (image, label)`` on batches, applied to each sample with
    probability ``p``. ``image`` (B, C, *S) float32, ``label`` (B, 1, *S) integer or ``None``.

    The inputs are left as they are (a transform that changes something returns new tensors) unless
    ``inplace=True``: then the transform may write into ``image`` and ``label`` and return them (what
    :class:`Compose` does with the tensors it owns; the values are the same either way)."""

    p: float = 1.0

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator, inplace: bool = False) -> Pair:
        chosen = np.flatnonzero(rng.random(image.shape[0]) < self.p)
        if chosen.size == 0:
            return image, label
        return self.apply(image if inplace else image.clone(), label, chosen, rng)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        """Transform the ``chosen`` samples of ``image`` (a tensor the transform may write into) and ``label`` (not
        to be written into: only :class:`Mirror`, which has its own ``__call__``, changes labels)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------- spatial
def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation (d×d) for angles in radians: 2D one angle; 3D about axes 0, 1, 2 in turn (R = R2·R1·R0)."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    r = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = m @ r
    return r


class LazyBatch(abc.ABC):
    """A batch (B, C, *S) that is read region by region instead of held in memory: what the sampler hands the
    spatial transform, which reads of each sample only the voxels it resamples (the central patch of an untouched
    sample, the bounding box of a rotated or scaled one). ``read(b, box)`` returns sample ``b``'s ``box`` (a tuple
    of slices within S) as a (C, *box) tensor, the same values as slicing the whole batch would give; with ``out``
    (a (C, *box) tensor of ``dtype``) it writes them there."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @abc.abstractmethod
    def read(self, b: int, box: tuple[slice, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``b``'s ``box`` as a (C, *box) tensor (written into ``out`` when given)."""


def _region(x: torch.Tensor | LazyBatch, b: int, box: tuple[slice, ...]) -> torch.Tensor:
    """Sample ``b``'s ``box``, (C, *box): a view of a tensor, or read from a :class:`LazyBatch`."""
    return x.read(b, box) if isinstance(x, LazyBatch) else x[(b, slice(None), *box)]


def _box(u: torch.Tensor, in_size: Sequence[int]) -> tuple[slice, ...]:
    """The input region resampling at positions ``u`` (*patch, d) can touch: from floor(min u) to floor(max u) + 1
    per axis (the far corner of linear interpolation, which also holds every nearest voxel), clipped to the input,
    at least 2 voxels where the input has them (a 1-voxel box would pin every position to it)."""
    low, high = (m.floor().tolist() for m in torch.aminmax(u.reshape(-1, u.shape[-1]), dim=0))
    box = []
    for a, n in enumerate(in_size):
        lo = int(min(max(low[a], 0), max(n - 2, 0)))
        hi = int(min(max(high[a] + 1, lo + 1), n - 1))
        box.append(slice(lo, hi + 1))
    return tuple(box)


def _nearest(label: torch.Tensor, u: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """Nearest-neighbour resampling of one label map at positions ``u`` (*patch, d), voxels of the whole input;
    ``label`` is the map's ``box`` (from :func:`_box`, so every nearest voxel inside the input lies in it). The
    value of the voxel at round-half-to-even(u) (``grid_sample``'s ``nearbyint``), 0 outside the input. An index
    gather: no float copy of the map, the values (any integer) are taken as they are."""
    shape = label.shape
    flat = torch.zeros(u.shape[:-1], dtype=torch.int64)
    inside = torch.ones(u.shape[:-1], dtype=torch.bool)
    for a in range(u.shape[-1]):
        r = torch.round(u[..., a]).to(torch.int64).sub_(box[a].start)
        inside &= (r >= 0) & (r < shape[a])
        flat.mul_(shape[a]).add_(r)
    flat.masked_fill_(~inside, 0)
    out = torch.take(label if label.is_contiguous() else label.contiguous(), flat)
    return out.masked_fill_(~inside, 0)


def _linear_in_box(image: torch.Tensor, u: torch.Tensor, box: tuple[slice, ...]) -> torch.Tensor:
    """(Tri)linear resampling of one sample's channels at positions ``u`` (*patch, d), voxels of the whole input,
    zeros outside it (``grid_sample(align_corners=True, padding_mode="zeros")``); ``image`` (C, *box) is the
    input's ``box`` (:func:`_box`: every voxel interpolation can touch). ``u`` is shifted into the box and
    normalised to it (overwritten), so the result is that of resampling the whole input up to float rounding of
    the shifted positions."""
    view = image[None] if image.dtype == torch.float32 else image[None].float()  # a copy of the box only
    u.sub_(torch.tensor([float(b.start) for b in box], dtype=torch.float32)).mul_(2)
    u.div_(torch.tensor([float(max(b.stop - b.start - 1, 1)) for b in box], dtype=torch.float32)).sub_(1)
    return F.grid_sample(view, u.flip(-1)[None], mode="bilinear", padding_mode="zeros", align_corners=True)[0]


class SpatialTransform(Transform):
    """Rotation, scaling and elastic deformation in one resampling, then the central ``patch_size``.

    For output voxel offset o from the patch centre (voxels) the input is sampled at
    c_in + s·R·o + d(o): c_in the centre of the (larger) input, R a rotation, s a scale (s < 1 magnifies,
    s > 1 shows more context), d an elastic displacement α·G_σ * U(−1, 1) per axis (Gaussian-smoothed
    uniform noise, zeros beyond the patch, as batchgenerators builds it). Images are sampled (tri)linearly,
    labels by nearest neighbour; outside the input images and labels are 0. Each of rotation, scaling and
    elastic deformation is drawn per sample with its own probability; a sample with none is just cropped.

    Args:
        patch_size: output spatial size (X, Y[, Z]).
        rotation: (low, high) angle range in radians for every rotated axis.
        rotation_axes: the axes rotations turn about (3D: any of 0, 1, 2; a single axis = in-plane rotation;
            2D patches: ignored, one in-plane angle).
        p_rotation, scaling, p_scaling, p_elastic, elastic_alpha, elastic_sigma: see the module table.
        scale_axes: the axes scaled and elastically displaced (default all; leave out a slice axis for
            2D-style augmentation of 3D data).
    """

    def __init__(self, patch_size: Sequence[int], rotation: tuple[float, float] = (-math.pi / 6, math.pi / 6), rotation_axes: Sequence[int] | None = None,
                 p_rotation: float = 0.2, scaling: tuple[float, float] = (0.7, 1.4), p_scaling: float = 0.2, scale_axes: Sequence[int] | None = None,
                 p_elastic: float = 0.0, elastic_alpha: tuple[float, float] = (0.0, 900.0), elastic_sigma: tuple[float, float] = (9.0, 13.0)):
        self.patch_size = [int(p) for p in patch_size]
        dims = len(self.patch_size)
        if dims not in (2, 3):
            raise ValueError(f"patch size must have 2 or 3 axes, got {list(patch_size)}")
        self.rotation = (float(rotation[0]), float(rotation[1]))
        self.rotation_axes = [0] if dims == 2 else list(range(3) if rotation_axes is None else rotation_axes)
        self.scale_axes = list(range(dims) if scale_axes is None else scale_axes)
        self.p_rotation, self.scaling, self.p_scaling = float(p_rotation), (float(scaling[0]), float(scaling[1])), float(p_scaling)
        self.p_elastic, self.elastic_alpha, self.elastic_sigma = float(p_elastic), elastic_alpha, elastic_sigma
        self.p = 1.0  # the per-transform probabilities decide; cropping always happens

    @property
    def input_size(self) -> list[int]:
        """The crop that keeps every rotated and scaled patch inside data: the bounding box of the patch
        corners under the extreme angles (every combination of low, 0, high per axis, 2D: a fine sweep) times
        the largest scale up to 1/0.85 (nnU-Net's compromise: the strongest zoom-outs may reach the zero
        padding in the corners), at least the patch size (elastic displacements are not added)."""
        half = (np.array(self.patch_size, dtype=float) - 1) / 2
        corners = np.array(list(itertools.product(*[(-h, h) for h in half])))
        lo, hi = self.rotation
        if self.p_rotation > 0 and (lo or hi):
            if len(self.patch_size) == 2:
                grid = [np.linspace(lo, hi, 73)]
            else:
                grid = [np.unique(np.r_[np.linspace(lo, hi, 7), 0.0]) if a in self.rotation_axes else np.zeros(1) for a in range(3)]
            mats = [rotation_matrix(list(angles)) for angles in itertools.product(*grid)]
            extent = np.max([np.abs(corners @ m.T).max(0) for m in mats], axis=0)
        else:
            extent = half
        scale = min(max(1.0, self.scaling[1]), 1 / 0.85) if self.p_scaling > 0 else 1.0
        extent = extent * np.where(np.isin(np.arange(len(half)), self.scale_axes), scale, 1.0)
        return [max(p, int(math.ceil(2 * e + 1 - 1e-6))) for p, e in zip(self.patch_size, extent)]

    def _matrices(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(n, d, d) sampling matrices s·R, and which samples they change."""
        dims = len(self.patch_size)
        mats = np.repeat(np.eye(dims)[None], n, axis=0)
        rotate = rng.random(n) < self.p_rotation
        scale = rng.random(n) < self.p_scaling
        for b in range(n):
            if rotate[b]:
                if dims == 2:
                    angles = [rng.uniform(*self.rotation)]
                else:
                    angles = [rng.uniform(*self.rotation) if a in self.rotation_axes else 0.0 for a in range(3)]
                mats[b] = rotation_matrix(angles) @ mats[b]
            if scale[b]:
                s = float(_bg_factor(rng, *self.scaling))
                mats[b] = mats[b] @ np.diag([s if a in self.scale_axes else 1.0 for a in range(dims)])
        return mats, rotate | scale

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, torch.Tensor], np.ndarray]:
        """The random part for a batch of ``n``, in the order the generator is read: the (n, d, d) sampling matrices,
        the elastic displacement fields of the samples that get one (index → (d, *patch)), and which samples change."""
        mats, changed = self._matrices(n, rng)
        elastic = rng.random(n) < self.p_elastic
        fields = {int(i): self._elastic(rng) for i in np.flatnonzero(elastic)}
        return mats, fields, changed | elastic

    def _elastic(self, rng: np.random.Generator) -> torch.Tensor:
        """One displacement field (d, *patch) in voxels."""
        dims = len(self.patch_size)
        alpha, sigma = rng.uniform(*self.elastic_alpha), rng.uniform(*self.elastic_sigma)
        noise = torch.from_numpy(rng.uniform(-1, 1, (dims, 1, *self.patch_size)).astype(np.float32))
        field = gaussian_smooth(noise, [sigma] * dims, mode="constant")[:, 0] * alpha
        for a in range(dims):
            if a not in self.scale_axes:  # 2D-style augmentation: no displacement through the slices
                field[a] = 0
        return field

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator, inplace: bool = False) -> Pair:
        b, dims = image.shape[0], len(image.shape) - 2
        if dims != len(self.patch_size):
            raise ValueError(f"patch size {self.patch_size} has {len(self.patch_size)} axes, the batch {tuple(image.shape)} has {dims}")
        in_size = np.array(image.shape[2:])
        if (in_size < self.patch_size).any():
            raise ValueError(f"input {list(in_size)} is smaller than the patch {self.patch_size}")
        mats, fields, changed = self.draw(b, rng)
        # unchanged samples: the central crop, exactly (changed ones are written below)
        start = (in_size - self.patch_size) // 2
        crop = tuple(slice(int(s), int(s) + p) for s, p in zip(start, self.patch_size))
        out_img = torch.empty((b, image.shape[1], *self.patch_size), dtype=image.dtype)
        out_lab = torch.empty((b, 1, *self.patch_size), dtype=label.dtype) if label is not None else None
        for i in np.flatnonzero(~changed):
            for x, out in ((image, out_img), (label, out_lab)):
                if x is None or out is None:
                    continue
                if isinstance(x, LazyBatch):
                    x.read(int(i), crop, out=out[i])
                else:
                    out[i] = x[(int(i), slice(None), *crop)]
        idx = np.flatnonzero(changed)
        if idx.size == 0:
            return out_img, out_lab
        source = self._source_coordinates(mats[idx], [fields.get(int(i)) for i in idx], in_size)  # (n, *patch, d)
        for k, i in enumerate(idx):
            u = source[k]
            box = _box(u, in_size)  # all the resampling reads of the input
            if label is not None and out_lab is not None:
                out_lab[i, 0] = _nearest(_region(label, int(i), box)[0], u, box)
            out_img[i] = _linear_in_box(_region(image, int(i), box), u, box)
        return out_img, out_lab

    def _source_coordinates(self, mats: np.ndarray, fields: list[torch.Tensor | None], in_size: np.ndarray) -> torch.Tensor:
        """The input position (voxels, float32) every output voxel samples, (n, *patch, d) for n sampling
        matrices (and elastic fields or None).

        Computed with the float32 operations ``grid_sample(align_corners=True)`` performs on the whole input's
        normalised grid g = 2c/(N−1) − 1, i.e. u = (g + 1)/2·(N−1), so the positions (and with them the
        nearest-neighbour voxels, ties included) are bit for bit those of resampling the whole input."""
        offsets = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in self.patch_size], indexing="ij"), dim=-1)
        a = torch.from_numpy(mats.astype(np.float32))  # (n, d, d)
        coords = torch.einsum("nij,...j->n...i", a, offsets)  # (n, *patch, d)
        for k, field in enumerate(fields):
            if field is not None:
                coords[k] += field.movedim(0, -1)
        coords += torch.as_tensor((in_size - 1) / 2, dtype=torch.float32)
        coords.mul_(2).div_(torch.as_tensor(np.maximum(in_size - 1, 1), dtype=torch.float32)).sub_(1)  # the normalised grid
        return coords.add_(1).div_(2).mul_(torch.as_tensor(in_size - 1, dtype=torch.float32))


class Mirror(Transform):
    """Flips each of ``axes`` (spatial indices) with probability ``p`` per sample and axis, image and labels together."""

    def __init__(self, axes: Sequence[int] = (0, 1, 2), p: float = 0.5):
        self.axes, self.p = [int(a) for a in axes], float(p)

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator, inplace: bool = False) -> Pair:
        flips = rng.random((image.shape[0], len(self.axes))) < self.p
        if not flips.any():
            return image, label
        if not inplace:
            image, label = image.clone(), (label.clone() if label is not None else None)
        for b in np.flatnonzero(flips.any(1)):
            dims = [1 + a for a, f in zip(self.axes, flips[b]) if f and a < image.ndim - 2]  # image[b] is (C, *S)
            if dims:
                image[b] = torch.flip(image[b], dims)
                if label is not None:
                    label[b] = torch.flip(label[b], dims)
        return image, label


# --------------------------------------------------------------------------- intensity (image only)
class GaussianNoise(Transform):
    """Adds N(0, σ²) noise, σ² ~ U(variance), one σ for all channels of a sample."""

    def __init__(self, variance: tuple[float, float] = (0.0, 0.1), p: float = 0.1):
        self.variance, self.p = variance, float(p)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        for b in chosen:
            std = math.sqrt(rng.uniform(*self.variance))
            image[b] += torch.from_numpy(rng.standard_normal(image.shape[1:], dtype=np.float32) * std).to(image.dtype)
        return image, label


class GaussianBlur(Transform):
    """Gaussian smoothing with σ ~ U(sigma) drawn per channel and axis; each channel blurred with ``p_per_channel``."""

    def __init__(self, sigma: tuple[float, float] = (0.5, 1.0), p: float = 0.2, p_per_channel: float = 0.5, axes: Sequence[int] | None = None):
        self.sigma, self.p, self.p_per_channel, self.axes = sigma, float(p), float(p_per_channel), axes

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        dims = image.ndim - 2
        axes = list(range(dims)) if self.axes is None else list(self.axes)
        for b in chosen:
            for c in np.flatnonzero(rng.random(image.shape[1]) < self.p_per_channel):
                sig = [rng.uniform(*self.sigma) if a in axes else 0.0 for a in range(dims)]
                image[b, c] = gaussian_smooth(image[b, c][None, None].float(), sig)[0, 0].to(image.dtype)
        return image, label


class MultiplicativeBrightness(Transform):
    """Multiplies each channel by a factor from ``multiplier`` (BGContrast draw)."""

    def __init__(self, multiplier: tuple[float, float] = (0.75, 1.25), p: float = 0.15):
        self.multiplier, self.p = multiplier, float(p)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        f = _bg_factor(rng, *self.multiplier, (len(chosen), image.shape[1])).astype(np.float32)
        shape = (len(chosen), image.shape[1]) + (1,) * (image.ndim - 2)
        image[torch.from_numpy(chosen)] *= torch.from_numpy(f).reshape(shape).to(image.dtype)
        return image, label


class Contrast(Transform):
    """Per channel x ← (x − mean)·f + mean, f from ``contrast`` (BGContrast draw); with ``preserve_range``
    clipped back to the channel's previous [min, max]."""

    def __init__(self, contrast: tuple[float, float] = (0.75, 1.25), preserve_range: bool = True, p: float = 0.15):
        self.contrast, self.preserve_range, self.p = contrast, preserve_range, float(p)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        sel = torch.from_numpy(chosen)
        x = image[sel]
        flat = x.flatten(2)
        mean = flat.mean(-1).reshape(*x.shape[:2], *([1] * (x.ndim - 2)))
        f = torch.from_numpy(_bg_factor(rng, *self.contrast, x.shape[:2]).astype(np.float32)).reshape(mean.shape)
        y = (x - mean) * f + mean
        if self.preserve_range:
            lo = flat.amin(-1).reshape(mean.shape)
            hi = flat.amax(-1).reshape(mean.shape)
            y = torch.minimum(torch.maximum(y, lo), hi)
        image[sel] = y.to(image.dtype)
        return image, label


class SimulateLowResolution(Transform):
    """Downsamples a channel by a zoom ~ U(zoom) (nearest neighbour) and upsamples it back ((tri)linear):
    simulates a coarser acquisition. Each channel with ``p_per_channel``; ``ignore_axes`` keep their size."""

    def __init__(self, zoom: tuple[float, float] = (0.5, 1.0), p: float = 0.25, p_per_channel: float = 0.5, ignore_axes: Sequence[int] = ()):
        self.zoom, self.p, self.p_per_channel, self.ignore_axes = zoom, float(p), float(p_per_channel), list(ignore_axes)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        shape = list(image.shape[2:])
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        for b in chosen:
            for c in np.flatnonzero(rng.random(image.shape[1]) < self.p_per_channel):
                z = rng.uniform(*self.zoom)
                small = [n if a in self.ignore_axes else max(1, int(round(n * z))) for a, n in enumerate(shape)]
                x = image[b, c][None, None].float()
                down = F.interpolate(x, size=small, mode="nearest")
                image[b, c] = F.interpolate(down, size=shape, mode=mode, align_corners=False)[0, 0].to(image.dtype)
        return image, label


class Gamma(Transform):
    """Gamma correction per channel: x ← (x − min)/(max − min)^γ·(max − min) + min, γ from ``gamma``
    (BGContrast draw); ``invert`` applies it to −x (darkens bright structures instead); ``retain_stats``
    restores the channel's mean and standard deviation afterwards."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5), invert: bool = False, retain_stats: bool = True, p: float = 0.3):
        self.gamma, self.invert, self.retain_stats, self.p = gamma, invert, retain_stats, float(p)

    def apply(self, image: torch.Tensor, label: torch.Tensor | None, chosen: np.ndarray, rng: np.random.Generator) -> Pair:
        eps = 1e-7
        for b in chosen:
            for c in range(image.shape[1]):
                # y = ((x − lo)/(range + eps)).clamp(0, 1)^γ·(range + eps) + lo, then mean and std restored: the same
                # float32 operations in place on one array (negation is exact, so inverting in place is too)
                x = image[b, c] if image.dtype == torch.float32 else image[b, c].float()
                if self.invert:
                    x.neg_()
                mean, std = x.mean(), x.std()
                lo, hi = torch.aminmax(x)
                scale = (hi - lo) + eps
                g = float(_bg_factor(rng, *self.gamma))
                x.sub_(lo).div_(scale).clamp_(0, 1).pow_(g).mul_(scale).add_(lo)
                if self.retain_stats:
                    y_mean, y_std = x.mean(), x.std()
                    x.sub_(y_mean).div_(y_std + 1e-8).mul_(std).add_(mean)
                if self.invert:
                    x.neg_()
                if x.data_ptr() != image[b, c].data_ptr():
                    image[b, c] = x.to(image.dtype)
        return image, label


# --------------------------------------------------------------------------- pipeline
class Compose:
    """A sequence of transforms applied in order to (image, label) batches.

    ``__call__(image, label, rng)`` takes numpy arrays or torch tensors (images (B, C, *S) float, labels
    (B, 1, *S) integer or ``None``) and returns the same kind, shapes (the spatial transform yields
    ``patch_size``) and dtypes. ``input_size`` is the spatial size the first spatial transform expects (the
    crop the sampler takes), the patch size when there is none. A pipeline that starts with its spatial
    transform also takes :class:`LazyBatch` images and labels (returning numpy arrays): it reads of them only
    what it resamples. The transforms after the spatial transform work in place on the new tensors it returns
    (never on the caller's arrays).
    """

    def __init__(self, transforms: Sequence[Transform], patch_size: Sequence[int] | None = None):
        self.transforms = list(transforms)
        spatial = [t for t in self.transforms if isinstance(t, SpatialTransform)]
        self.patch_size = [int(p) for p in (patch_size or (spatial[0].patch_size if spatial else []))]
        self._spatial = spatial[0] if spatial else None

    @property
    def input_size(self) -> list[int]:
        return self._spatial.input_size if self._spatial is not None else list(self.patch_size)

    def __call__(self, image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor | None, rng: np.random.Generator) -> tuple:
        is_numpy = not isinstance(image, torch.Tensor)
        if isinstance(image, LazyBatch) and not (self.transforms and isinstance(self.transforms[0], SpatialTransform)):
            raise ValueError("a LazyBatch is read by a spatial transform: the pipeline must start with one")
        img = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        lab = None if label is None else (torch.from_numpy(np.ascontiguousarray(label)) if isinstance(label, np.ndarray) else label)
        if len(img.shape) not in (4, 5):
            raise ValueError(f"expected a batch (B, C, X, Y[, Z]), got shape {tuple(img.shape)}")
        if lab is not None and (lab.shape[0] != img.shape[0] or lab.shape[1] != 1 or tuple(lab.shape[2:]) != tuple(img.shape[2:])):
            raise ValueError(f"labels {tuple(lab.shape)} do not match the images {tuple(img.shape)} (expected (B, 1, *S))")
        img_dtype = img.dtype
        img = img.float() if isinstance(img, torch.Tensor) else img  # a LazyBatch reads float32 (its dtype)
        owned = False  # img and lab are new tensors of the pipeline's (not the caller's): transforms may write into them
        for t in self.transforms:
            img, lab = t(img, lab, rng, inplace=owned)
            owned = owned or isinstance(t, SpatialTransform)  # its outputs are always new tensors
        img = img.to(img_dtype)
        if is_numpy:
            return img.numpy(), (None if lab is None else lab.numpy())
        return img, lab

    def __repr__(self) -> str:
        return "Compose(\n  " + ",\n  ".join(map(repr, self.transforms)) + "\n)"


def default_augmentation(patch_size: Sequence[int], dim: int | None = None, slice_axis: int = 2, p_elastic: float = 0.0) -> Compose:
    """nnU-Net v2's default training augmentation for ``patch_size`` (see the module table).

    Args:
        patch_size: the training patch (X, Y[, Z]).
        dim: 3 (default for 3-axis patches without a singleton axis): 3D rotations about all axes ±30°. 2 (default for 2-axis
            patches): 2D augmentation — in-plane rotation ±180° (±15° when the in-plane aspect ratio exceeds
            1.5) and scaling; for 3-axis patches (nnU-Net's "dummy 2D" augmentation of anisotropic data, or
            slice stacks) ``slice_axis`` is neither rotated, scaled nor low-resolution simulated.
            Default for a 3-axis patch with an axis of size 1 (one slice, e.g. 256×256×1): 2, with that
            axis as ``slice_axis``.
        slice_axis: the through-plane axis of 3-axis patches with ``dim=2``.
        p_elastic: elastic deformation probability (nnU-Net v2: 0; v1: 0.2), α U(0, 900) for ``dim=3``,
            U(0, 200) for ``dim=2``, σ U(9, 13) voxels (nnU-Net v1).

    Returns:
        A :class:`Compose`; crop ``.input_size`` around the patch centre and pass the batch through it.
    """
    config = AugmentationConfig()
    config.groups["elastic"]["p"] = float(p_elastic)
    return _build(patch_size, config, dim, slice_axis)


def build_augmentation(patch_size: Sequence[int], config: AugmentationConfig) -> Compose:
    """The training augmentation for ``patch_size`` with the knobs of ``config`` (``train.augmentation``);
    ``AugmentationConfig()`` (``augmentation: true``) gives exactly :func:`default_augmentation`.

    Raises:
        MedsegError: a knob that does not fit this patch (an axis it does not have, ``dim: 3`` for a 2D patch).
    """
    patch = [int(p) for p in patch_size]
    dim = None if config.dim == AUTO else int(config.dim)
    if dim is not None and dim > len(patch):
        raise MedsegError(f"augmentation.dim {dim} needs a patch with at least {dim} axes, the training patch is {patch}")
    for group in ("rotation", "scaling", "mirror"):
        axes = config.groups[group]["axes"]
        if axes != AUTO and any(a >= len(patch) for a in axes):
            raise MedsegError(f"augmentation.{group}.axes {axes} names an axis the {len(patch)}-axis training patch {patch} does not have")
    if config.slice_axis != AUTO and int(config.slice_axis) >= len(patch):
        raise MedsegError(f"augmentation.slice_axis {config.slice_axis} is not an axis of the training patch {patch}")
    if config.slice_axis != AUTO and dim is None and len(patch) == 3 and 1 in patch and patch.index(1) != int(config.slice_axis):
        raise MedsegError(f"augmentation.slice_axis {config.slice_axis} contradicts the one-slice training patch {patch} (its slice axis is {patch.index(1)})")
    return _build(patch, config, dim, None if config.slice_axis == AUTO else int(config.slice_axis))


def _build(patch_size: Sequence[int], config: AugmentationConfig, dim: int | None, slice_axis: int | None) -> Compose:
    """The pipeline of the module table with ``config``'s knobs; ``dim``/``slice_axis`` as in :func:`default_augmentation`
    (``slice_axis`` ``None``: the singleton axis of a one-slice patch, else 2)."""
    patch = [int(p) for p in patch_size]
    dims = len(patch)
    if dim is None and dims == 3 and 1 in patch:  # a one-slice patch: its singleton axis is the slice axis
        dim, slice_axis = 2, patch.index(1)
    slice_axis = 2 if slice_axis is None else slice_axis
    dim = dims if dim is None else int(dim)
    if dims not in (2, 3) or dim not in (2, 3) or dim > dims:
        raise ValueError(f"dim must be 2 or 3 and at most the patch's axes, got dim={dim} for patch {patch}")
    if dim == 3:
        rotation, rot_axes, scale_axes, ignore = (-math.pi / 6, math.pi / 6), [0, 1, 2], None, []
    else:
        in_plane = [p for a, p in enumerate(patch) if dims == 2 or a != slice_axis]
        limit = math.pi / 12 if max(in_plane) / min(in_plane) > 1.5 else math.pi
        rotation = (-limit, limit)
        rot_axes = [slice_axis] if dims == 3 else [0]  # 3D patch: turn about the slice axis, i.e. in-plane
        scale_axes = [a for a in range(dims) if dims == 2 or a != slice_axis]
        ignore = [slice_axis] if dims == 3 else []
    g = config.groups
    # knobs left at auto keep the patch-derived nnU-Net values above, so `augmentation: true` builds the same pipeline as before
    if g["rotation"]["degrees"] != AUTO:
        rotation = (math.radians(g["rotation"]["degrees"][0]), math.radians(g["rotation"]["degrees"][1]))
    rot_axes = list(g["rotation"]["axes"]) if g["rotation"]["axes"] != AUTO else rot_axes
    scale_axes = list(g["scaling"]["axes"]) if g["scaling"]["axes"] != AUTO else scale_axes
    alpha = g["elastic"]["alpha"] if g["elastic"]["alpha"] != AUTO else ((0.0, 900.0) if dim == 3 else (0.0, 200.0))
    mirror_axes = list(g["mirror"]["axes"]) if g["mirror"]["axes"] != AUTO else list(range(dims))
    return Compose([
        SpatialTransform(patch, rotation=rotation, rotation_axes=rot_axes, p_rotation=g["rotation"]["p"], scaling=tuple(g["scaling"]["range"]),
                         p_scaling=g["scaling"]["p"], scale_axes=scale_axes, p_elastic=g["elastic"]["p"], elastic_alpha=tuple(alpha),
                         elastic_sigma=tuple(g["elastic"]["sigma"])),
        GaussianNoise(tuple(g["noise"]["variance"]), p=g["noise"]["p"]),
        GaussianBlur(tuple(g["blur"]["sigma"]), p=g["blur"]["p"], p_per_channel=g["blur"]["p_per_channel"], axes=[a for a in range(dims) if a not in ignore]),
        MultiplicativeBrightness(tuple(g["brightness"]["range"]), p=g["brightness"]["p"]),
        Contrast(tuple(g["contrast"]["range"]), preserve_range=g["contrast"]["preserve_range"], p=g["contrast"]["p"]),
        SimulateLowResolution(tuple(g["low_resolution"]["zoom"]), p=g["low_resolution"]["p"], p_per_channel=g["low_resolution"]["p_per_channel"], ignore_axes=ignore),
        Gamma(tuple(g["gamma_inverted"]["range"]), invert=True, retain_stats=g["gamma_inverted"]["retain_stats"], p=g["gamma_inverted"]["p"]),
        Gamma(tuple(g["gamma"]["range"]), invert=False, retain_stats=g["gamma"]["retain_stats"], p=g["gamma"]["p"]),
        Mirror(axes=mirror_axes, p=g["mirror"]["p"]),
    ], patch)
