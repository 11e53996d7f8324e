"""Synthetic BraTS 2023-style glioma cases, made offline and deterministically.

``medseg synth --out DIR --cases N --shape X Y Z --seed S`` writes::

    DIR/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f}.nii.gz   int16 images
    DIR/BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz                 uint8 labels

with the BraTS 2023 labels 0 background, 1 NETC (necrotic / non-enhancing core), 2 SNFH (surrounding
FLAIR hyperintensity, i.e. edema), 3 ET (enhancing tumour).

``--layout`` (default ``brats2023``, this module's output) selects another source layout that ingest
reads: ``brats2024``, ``mets``, ``lgg``, ``classification``, ``dicom``, ``msd``; those writers live in
:mod:`medseg.synth_layouts`, imported only when used.

Anatomy (``anatomy=``):

* ``"mni"``: the MNI ICBM152 2009a symmetric template (1 mm, 197×233×189, skull-stripped) that the
  nilearn wheel ships in ``nilearn/datasets/data/``; its GM and WM probability maps give the tissue
  fractions and CSF = brain − GM − WM (brain = template T1 > 0). nilearn itself is never imported
  and nothing is downloaded.
* ``"procedural"``: an ellipsoidal brain with a folded cortical ribbon, sulcal CSF, ventricles and
  deep grey nuclei, for when the template files are missing.
* ``"auto"``: ``"mni"`` when the files are found, else ``"procedural"``.

Geometry: the template field of view (197×233×189 mm) is kept whatever the requested shape, so the
voxel spacing is ``FOV / shape`` mm (possibly anisotropic) and the affine is diagonal (RAS, positive
spacings) with the MNI origin. Every case has a random rigid head pose (rotation up to ±10° per axis
about the FOV centre, translation up to ±6 mm) applied to the voxel data, as in real scans; the pose
is *not* written into the affine (a scanner does not know the head pose).

What is approximated (this is a test-data generator, not a simulator): intensities are a linear mix
of per-tissue values (no relaxation physics, no vessels, no skull); the tumour has no mass effect and
no infiltration model beyond a bias of edema toward white matter; the bias field is a smooth random
multiplicative field; noise is Rician (Gaussian in the real and imaginary channels) inside the brain
while the background stays exactly 0, as in skull-stripped BraTS data.

Determinism: case ``i`` draws from ``numpy.random.default_rng([seed, i])`` only, and gzip is written
with ``mtime=0`` and no file name, so the same seed, shape and anatomy give byte-identical files.

Every layout also leaves ``medseg_synth.json`` in ``DIR`` (:func:`write_marker`: generator, layout, cases, seed,
shape): ingest copies it into ``dataset.json`` ``synthetic``, so a model trained on these cases says so in its model
card.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib.util
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

import medseg
from medseg.errors import MedsegError
from medseg.io import atomic_dir, make_nifti, write_bytes, write_json
from medseg.schemas import SYNTH_MARKER_JSON
from medseg.task import BRATS2023

BRATS_CHANNELS, BRATS_LABELS = BRATS2023.channels, BRATS2023.labels

Anatomy = Literal["auto", "mni", "procedural"]
ANATOMIES: tuple[str, ...] = ("auto", "mni", "procedural")

CASE_ID_FORMAT = "BraTS-GLI-{:05d}-000"
SEG_SUFFIX = "seg"
MIN_SHAPE = 16  # below this the tumour sub-regions no longer fit in a few voxels each

# The MNI ICBM152 2009a template grid: 1 mm voxels, diagonal affine with this origin (mm).
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
FOV_MM = (197.0, 233.0, 189.0)
MNI_ORIGIN_MM = (-98.0, -134.0, -72.0)  # world position of template voxel (0, 0, 0)'s centre

NETC, SNFH, ET = BRATS_LABELS["NETC"], BRATS_LABELS["SNFH"], BRATS_LABELS["ET"]

# Healthy tissue intensities per channel (t1n, t1c, t2w, t2f), arbitrary units of typical 3 T ranges.
# Ordering is what matters: T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR GM > WM, CSF suppressed.
TISSUE_INTENSITY: dict[str, tuple[float, float, float, float]] = {
    "csf": (300.0, 300.0, 1800.0, 150.0),
    "gm": (600.0, 650.0, 950.0, 750.0),
    "wm": (850.0, 880.0, 650.0, 550.0),
}
# Tumour sub-regions: ET enhances on t1c; SNFH is bright on t2w/FLAIR; NETC is dark on t1c and
# bright on t2w; t1n changes are modest (slightly hypointense).
TUMOUR_INTENSITY: dict[int, tuple[float, float, float, float]] = {
    NETC: (420.0, 350.0, 1500.0, 600.0),
    SNFH: (560.0, 600.0, 1350.0, 1150.0),
    ET: (600.0, 1400.0, 1050.0, 900.0),
}


# --------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class _Anatomy:
    """Healthy anatomy on the output grid (all arrays shape ``shape``, read-only, cached).

    ``gm``/``wm``/``csf`` are tissue fractions in [0, 1] summing to 1 inside ``brain`` and 0 outside;
    ``depth_mm`` is the distance (mm) from each brain voxel to the nearest non-brain voxel.
    """

    kind: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # mm
    affine: np.ndarray  # 4×4, voxel → world mm
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool
    depth_mm: np.ndarray


def mni_template_dir() -> Path | None:
    """The folder holding the MNI ICBM152 2009a files shipped inside nilearn, or None when absent.

    Uses the import machinery only to find the package folder; nilearn is not imported.
    """
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "data"
        if all((folder / name).is_file() for name in MNI_FILES.values()):
            return folder
    return None


def resolve_anatomy(anatomy: str) -> str:
    """``"auto"`` → ``"mni"`` when the template is found, else ``"procedural"``; checks the name."""
    if anatomy not in ANATOMIES:
        raise MedsegError(f"unknown anatomy {anatomy!r} (choose from {', '.join(ANATOMIES)})")
    if anatomy == "auto":
        return "mni" if mni_template_dir() is not None else "procedural"
    if anatomy == "mni" and mni_template_dir() is None:
        raise MedsegError("the MNI ICBM152 template files were not found in the nilearn package; use anatomy='procedural'")
    return anatomy


@functools.lru_cache(maxsize=1)
def _load_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template's T1, GM and WM volumes as stored (uint8, 197×233×189); loaded once per process.

    Kept as uint8 (26 MB in all) rather than float so the cache stays small.
    """
    folder = mni_template_dir()
    if folder is None:
        raise MedsegError("the MNI ICBM152 template files were not found in the nilearn package")
    out = []
    for key in ("t1", "gm", "wm"):
        img = nib.load(str(folder / MNI_FILES[key]))
        arr = np.asarray(img.dataobj)
        if arr.shape != (197, 233, 189):
            raise MedsegError(f"unexpected template shape {arr.shape}", folder / MNI_FILES[key])
        arr.setflags(write=False)
        out.append(arr)
    return out[0], out[1], out[2]


def _grid_geometry(shape: tuple[int, int, int]) -> tuple[tuple[float, float, float], np.ndarray]:
    """Spacing (mm) and affine of a ``shape`` grid covering the template FOV exactly.

    Voxel ``i``'s centre sits at ``(i + 0.5) * spacing`` mm from the FOV corner, the corner being half
    a template voxel before the template's voxel 0 centre.
    """
    spacing = tuple(f / n for f, n in zip(FOV_MM, shape))
    affine = np.eye(4)
    for ax in range(3):
        affine[ax, ax] = spacing[ax]
        affine[ax, 3] = MNI_ORIGIN_MM[ax] - 0.5 + 0.5 * spacing[ax]
    return spacing, affine  # type: ignore[return-value]


def _resample_fov(volume: np.ndarray, shape: tuple[int, int, int], order: int = 1) -> np.ndarray:
    """Resample a volume to ``shape`` keeping its field of view (voxel edges stay aligned).

    Same mapping as ``scipy.ndimage.zoom(..., grid_mode=True)`` but with the output shape exact.
    When shrinking, a Gaussian pre-filter (sigma = (factor − 1) / 2 input voxels) avoids aliasing.
    """
    factors = np.array(volume.shape, float) / np.array(shape, float)
    sigma = np.maximum(factors - 1.0, 0.0) / 2.0
    src = volume.astype(np.float32)
    if np.any(sigma > 0):
        src = ndi.gaussian_filter(src, sigma)
    return ndi.affine_transform(
        src, factors, offset=0.5 * factors - 0.5, output_shape=shape, order=order, mode="nearest"
    ).astype(np.float32)


def _finish_anatomy(kind: str, shape: tuple[int, int, int], gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, brain_frac: np.ndarray) -> _Anatomy:
    """Threshold the brain at half a voxel, renormalise tissue fractions inside it, freeze arrays."""
    spacing, affine = _grid_geometry(shape)
    brain = brain_frac > 0.5
    # Partial volume with background would make edge voxels dark; skull-stripped data have no such rim.
    total = gm + wm + csf
    safe = np.where(total > 1e-3, total, 1.0)
    gm, wm, csf = (np.where(brain, t / safe, 0.0).astype(np.float32) for t in (gm, wm, csf))
    csf[brain & (total <= 1e-3)] = 1.0
    depth = ndi.distance_transform_edt(brain, sampling=spacing).astype(np.float32)
    for arr in (gm, wm, csf, brain, depth):
        arr.setflags(write=False)
    return _Anatomy(kind, shape, spacing, affine, gm, wm, csf, brain, depth)


@functools.lru_cache(maxsize=4)
def _mni_anatomy(shape: tuple[int, int, int]) -> _Anatomy:
    """MNI tissue fractions resampled to ``shape`` (cached per shape: ~1 s once, then free)."""
    t1, gm8, wm8 = _load_mni()
    brain1 = t1 > 0  # the template is skull-stripped: background is exactly 0
    gm1 = np.where(brain1, gm8.astype(np.float32) / 255.0, 0.0)
    wm1 = np.where(brain1, wm8.astype(np.float32) / 255.0, 0.0)
    csf1 = np.where(brain1, np.clip(1.0 - gm1 - wm1, 0.0, 1.0), 0.0)
    return _finish_anatomy(
        "mni",
        shape,
        _resample_fov(gm1, shape),
        _resample_fov(wm1, shape),
        _resample_fov(csf1, shape),
        _resample_fov(brain1.astype(np.float32), shape),
    )


@functools.lru_cache(maxsize=4)
def _procedural_anatomy(shape: tuple[int, int, int]) -> _Anatomy:
    """An ellipsoidal brain in the same FOV, roughly MNI-sized (~1.5 L), fixed (not per case).

    Layers by normalised radius: outer CSF film, a 3–8 mm folded cortical ribbon with CSF-filled
    sulci, white matter inside, two lateral ventricles and four deep grey nuclei.
    """
    rng = np.random.default_rng(20230)  # fixed: the procedural brain is the same for every case
    spacing, _ = _grid_geometry(shape)
    axes_mm = _axes_mm(shape, spacing)
    centre = np.array([98.0, 117.0, 82.0])  # mm from the FOV corner: where the MNI brain sits
    semi = np.array([70.0, 86.0, 64.0])
    x = axes_mm[0][:, None, None] - centre[0]
    y = axes_mm[1][None, :, None] - centre[1]
    z = axes_mm[2][None, None, :] - centre[2]
    rho = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    rho = rho * (1.0 + 0.03 * _smooth_noise(rng, axes_mm, 40.0))  # lumpy outline
    mean_r = float(semi.mean())
    folds = _smooth_noise(rng, axes_mm, 10.0)  # gyri/sulci scale
    ribbon_mm = 5.5 + 2.5 * folds
    labels = np.zeros(shape, np.uint8)  # 0 bg, 1 csf, 2 gm, 3 wm
    labels[rho < 1.0] = 1
    labels[rho < 1.0 - 1.5 / mean_r] = 2
    labels[rho < 1.0 - (1.5 + np.clip(ribbon_mm, 3.0, 8.0)) / mean_r] = 3
    sulci = (labels == 2) & (_smooth_noise(rng, axes_mm, 6.0) > 1.0)
    labels[sulci] = 1
    for sx in (-1.0, 1.0):
        # Lateral ventricles (CSF) and deep grey nuclei (thalamus/basal ganglia), symmetric.
        vent = ((x - sx * 9.0) / 5.0) ** 2 + ((y - 5.0) / 24.0) ** 2 + ((z - 10.0) / 9.0) ** 2 < 1.0
        nuc1 = ((x - sx * 20.0) / 9.0) ** 2 + ((y - 10.0) / 12.0) ** 2 + ((z - 2.0) / 9.0) ** 2 < 1.0
        nuc2 = ((x - sx * 10.0) / 8.0) ** 2 + ((y + 10.0) / 11.0) ** 2 + ((z - 2.0) / 8.0) ** 2 < 1.0
        labels[(nuc1 | nuc2) & (labels == 3)] = 2
        labels[vent & (labels > 0)] = 1
    # Half-voxel blur turns hard labels into partial-volume fractions.
    frac = [ndi.gaussian_filter((labels == k).astype(np.float32), 0.6) for k in (1, 2, 3)]
    brain_frac = ndi.gaussian_filter((labels > 0).astype(np.float32), 0.6)
    return _finish_anatomy("procedural", shape, frac[1], frac[2], frac[0], brain_frac)


def _anatomy(kind: str, shape: tuple[int, int, int]) -> _Anatomy:
    return _mni_anatomy(shape) if kind == "mni" else _procedural_anatomy(shape)


# --------------------------------------------------------------------------- random fields
def _axes_mm(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Voxel-centre coordinates (mm from the FOV corner) along each axis."""
    return [((np.arange(n) + 0.5) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def _smooth_noise(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], corr_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth Gaussian random field on the grid ``axes_mm`` (mm per axis).

    White noise on a control grid (step corr/2 mm, extending one correlation length past the
    grid) is interpolated with a separable Gaussian kernel (sigma corr/2 mm): three small matrix
    products, far cheaper than blurring a full-resolution volume, and independent of voxel size.
    """
    step = sigma = corr_mm / 2.0
    mats, norms = [], []
    for x in axes_mm:
        lo = float(x[0]) - corr_mm
        n_ctrl = int(math.ceil((float(x[-1]) + corr_mm - lo) / step)) + 1
        ctrl = lo + step * np.arange(n_ctrl, dtype=np.float32)
        w = np.exp(-0.5 * ((x[:, None] - ctrl[None, :]) / sigma) ** 2).astype(np.float32)
        mats.append(w)
        norms.append(np.sqrt((w**2).sum(axis=1)))
    field = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    # Three matmuls arranged so none needs a transposed copy: (i,j,k) → (i,j,c) → (i,b,c) → (a,b,c).
    field = field @ mats[2].T
    field = np.matmul(mats[1], field)
    n_i = field.shape[0]
    field = (mats[0] @ field.reshape(n_i, -1)).reshape(len(axes_mm[0]), field.shape[1], field.shape[2])
    # Dividing by the kernel norm per voxel makes the variance exactly 1 everywhere.
    field /= norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :]
    return field.astype(np.float32)


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    """3×3 rotation matrix from rotations about the x, y and z axes (applied in that order)."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def _smallest(values: np.ndarray, among: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` voxels of ``among`` with the smallest ``values`` (a level set of exact size)."""
    idx = np.flatnonzero(among)
    count = int(min(max(count, 1), idx.size))
    out = np.zeros(values.shape, bool)
    if idx.size:
        vals = values.ravel()[idx]
        out.ravel()[idx[np.argpartition(vals, count - 1)[:count]]] = True
    return out


# --------------------------------------------------------------------------- tumour
def _tumour(anat: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Label map (uint8, ``anat.shape``) with 1 or (15 %) 2 lesions, before the head pose.

    Whole tumour = 2.5–7 % of the brain volume; tumour core = 20–40 % of each lesion (so edema is
    always the largest part); necrosis = 25–50 % of the core, nested inside it with an ET rim around.
    Shapes are level sets of a randomly oriented ellipsoidal distance plus smooth noise whose
    correlation length scales with the lesion, so they look alike at any resolution.
    """
    brain_voxels = int(anat.brain.sum())
    wt_fraction = rng.uniform(0.025, 0.07)
    if rng.random() < 0.15:
        share = rng.uniform(0.55, 0.75)
        budgets = [wt_fraction * share, wt_fraction * (1.0 - share)]
    else:
        budgets = [wt_fraction]
    voxel_mm3 = float(np.prod(anat.spacing))
    spacing = np.array(anat.spacing)
    axes_mm = _axes_mm(anat.shape, anat.spacing)
    # Gliomas are mostly supratentorial and lobar, in one hemisphere: prefer the upper part of the
    # brain and points at least 10 mm off the midsagittal plane (world x = 0).
    z_idx = np.flatnonzero(anat.brain.any(axis=(0, 1)))
    z_floor = z_idx[0] + 0.35 * (z_idx[-1] - z_idx[0])
    tissue = (anat.gm + anat.wm) > 0.6
    tissue_upper = tissue.copy()
    tissue_upper[:, :, : int(z_floor)] = False
    world_x = anat.affine[0, 0] * np.arange(anat.shape[0]) + anat.affine[0, 3]
    tissue_upper[np.abs(world_x) < 10.0] = False

    rank = np.zeros(anat.shape, np.uint8)  # 0 none, 1 SNFH, 2 ET, 3 NETC: inner parts win on overlap
    centres: list[tuple[np.ndarray, float]] = []
    for budget in budgets:
        n_wt = max(int(round(budget * brain_voxels)), 8)
        r_eq = (3.0 * n_wt * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm, radius of a ball of that volume
        centre = _pick_centre(anat, rng, tissue_upper, tissue, r_eq, centres, spacing)
        centres.append((centre, r_eq))

        # Work in a box of ±3 radii around the centre: the lesion never reaches further.
        c_idx = centre / spacing - 0.5
        half = np.ceil(3.0 * r_eq / spacing).astype(int)
        lo = np.maximum(np.floor(c_idx).astype(int) - half, 0)
        hi = np.minimum(np.ceil(c_idx).astype(int) + half + 1, anat.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        box_axes = [ax[s] for ax, s in zip(axes_mm, box)]
        d = [box_axes[0][:, None, None] - centre[0], box_axes[1][None, :, None] - centre[1], box_axes[2][None, None, :] - centre[2]]

        def ellipsoid_radius(stretch: float) -> np.ndarray:
            rot = _rotation(rng.uniform(-math.pi, math.pi, 3))
            semi = np.exp(rng.uniform(-stretch, stretch, 3))
            semi /= np.prod(semi) ** (1.0 / 3.0)  # unit volume: r_eq keeps its meaning
            u = [sum(float(rot[j, k]) * d[j] for j in range(3)) for k in range(3)]
            return np.sqrt(sum((u[k] / semi[k]) ** 2 for k in range(3))) / r_eq

        brain_box = anat.brain[box]
        # Edema: irregular, pulled along white matter and kept out of CSF spaces.
        d_wt = ellipsoid_radius(0.3) + 0.35 * _smooth_noise(rng, box_axes, max(0.7 * r_eq, 6.0))
        d_wt = d_wt - 0.25 * anat.wm[box] + 0.4 * anat.csf[box]
        wt = _largest_component(_smallest(d_wt, brain_box, n_wt))
        # Core: its own, more compact shape; necrosis is an inner level set of the same field so
        # that enhancing tumour forms a rim around it.
        n_wt_kept = int(wt.sum())
        n_tc = max(int(round(rng.uniform(0.2, 0.4) * n_wt_kept)), 4)
        d_tc = ellipsoid_radius(0.2) + 0.2 * _smooth_noise(rng, box_axes, max(0.5 * r_eq, 4.0))
        tc = _largest_component(_smallest(d_tc, wt, n_tc))
        n_netc = max(int(round(rng.uniform(0.25, 0.5) * tc.sum())), 1)
        netc = _smallest(d_tc, tc, n_netc) & ndi.binary_erosion(tc)
        if not netc.any():  # tiny core at a coarse grid: keep its innermost voxel
            netc = _smallest(d_tc, tc, 1)
        lesion = np.where(netc, 3, np.where(tc, 2, np.where(wt, 1, 0))).astype(np.uint8)
        np.maximum(rank[box], lesion, out=rank[box])

    to_label = np.array([0, SNFH, ET, NETC], np.uint8)
    return to_label[rank]


def _pick_centre(
    anat: _Anatomy,
    rng: np.random.Generator,
    preferred: np.ndarray,
    tissue: np.ndarray,
    r_eq: float,
    others: list[tuple[np.ndarray, float]],
    spacing: np.ndarray,
) -> np.ndarray:
    """A lesion centre (mm from the FOV corner) in GM/WM, at least ~0.45 radii from the brain edge
    (lesions may reach the cortex, as real ones do; the brain clips them) and clear of earlier
    lesions; requirements relax step by step if nothing qualifies."""
    for depth_factor, region in ((0.45, preferred), (0.45, tissue), (0.2, tissue), (0.0, anat.brain)):
        cand = region & (anat.depth_mm > depth_factor * r_eq)
        idx = np.flatnonzero(cand)
        if idx.size and others:
            pos = (np.stack(np.unravel_index(idx, anat.shape), axis=1) + 0.5) * spacing
            ok = np.ones(idx.size, bool)
            for c, r in others:
                ok &= np.linalg.norm(pos - c, axis=1) > 1.3 * (r + r_eq)
            idx = idx[ok]
        if idx.size:
            choice = idx[rng.integers(idx.size)]
            return (np.array(np.unravel_index(choice, anat.shape), float) + 0.5) * spacing
    raise MedsegError("no room for a tumour in the brain (grid too small?)")  # pragma: no cover


# --------------------------------------------------------------------------- images
def _pose_matrix(anat: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) for ``scipy.ndimage.affine_transform``: output voxel → input voxel of a rigid
    pose (rotation ≤ ±10° per axis about the FOV centre, translation ≤ ±6 mm per axis), in mm."""
    rot = _rotation(np.deg2rad(rng.uniform(-10.0, 10.0, 3)))
    shift = rng.uniform(-6.0, 6.0, 3)
    sp = np.array(anat.spacing)
    centre = np.array(FOV_MM) / 2.0
    # Output voxel o sits at p = (o + 0.5)·sp; it shows the anatomy at p_in = Rᵀ(p − c − t) + c.
    matrix = (rot.T * sp[None, :]) / sp[:, None]
    offset = (rot.T @ (0.5 * sp - centre - shift) + centre) / sp - 0.5
    return matrix, offset


def _pose(volume: np.ndarray, matrix: np.ndarray, offset: np.ndarray, order: int) -> np.ndarray:
    """Resample ``volume`` under the rigid pose (same grid; outside the input is background 0)."""
    return ndi.affine_transform(volume, matrix, offset=offset, output_shape=volume.shape, order=order, mode="constant", cval=0.0)


def generate_case(
    case_id: str,
    shape: tuple[int, int, int],
    rng_seed: int | Sequence[int] | np.random.SeedSequence,
    anatomy: Anatomy = "auto",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Make one case in memory: ``{"t1n"|"t1c"|"t2w"|"t2f"|"seg": (array, affine)}``.

    Images are int16 arrays of shape ``shape`` (arbitrary units, ~100–3000 in the brain, exactly 0
    outside it); ``seg`` is uint8 with BraTS labels {0, 1, 2, 3}, all present, and only inside the
    brain. The affine (4×4, mm) is the same diagonal one for all five. ``case_id`` is only used in
    error messages; all randomness comes from ``rng_seed`` (anything ``numpy.random.default_rng``
    takes), so a case is fully reproducible.
    """
    shape = _check_shape(shape)
    kind = resolve_anatomy(anatomy)
    anat = _anatomy(kind, shape)
    rng = np.random.default_rng(rng_seed)
    labels = _tumour(anat, rng)
    return render_case(case_id, anat, labels, rng, TUMOUR_INTENSITY, require_every_label=True)


def render_case(
    case_id: str,
    anat: _Anatomy,
    labels: np.ndarray,
    rng: np.random.Generator,
    appearance: dict[int, tuple[float, float, float, float]],
    require_every_label: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images for a lesion label map made on ``anat`` (before the head pose): ``{"t1n"|"t1c"|"t2w"|"t2f"|"seg": (array, affine)}``.

    ``appearance`` gives the (t1n, t1c, t2w, t2f) intensity of every lesion label. The pose moves the healthy
    images (trilinear) and the labels (nearest); the lesion appearance is painted afterwards from the posed
    labels, so image contrast matches the written seg voxel for voxel even on coarse grids. A label can fall
    between output voxels under the pose: up to 8 poses are tried; ``require_every_label`` raises when none keeps
    every label, else the pose keeping most is used.
    """
    shape = anat.shape
    axes_mm = _axes_mm(shape, anat.spacing)
    # Per-case contrast variation: tissue values ±6 %, overall gain per channel (scanner scaling).
    n_ch = len(BRATS_CHANNELS)
    jitter = {k: np.array(v) * rng.uniform(0.94, 1.06, n_ch) for k, v in TISSUE_INTENSITY.items()}
    tjitter = {k: np.array(v) * rng.uniform(0.92, 1.08, n_ch) for k, v in appearance.items()}
    gain = rng.uniform(0.8, 1.25, n_ch)

    wanted = {int(v) for v in np.unique(labels)} - {0}
    best: tuple[int, Any] | None = None
    for _attempt in range(8):
        matrix, offset = _pose_matrix(anat, rng)
        brain_frac = _pose(anat.brain.astype(np.float32), matrix, offset, 1)
        brain = brain_frac > 0.5
        seg = _pose(labels, matrix, offset, 0).astype(np.uint8)
        seg[~brain] = 0
        found = sum(1 for v in wanted if (seg == v).any())
        if best is None or found > best[0]:
            best = (found, (matrix, offset, brain_frac, brain, seg))
        if found == len(wanted):
            break
    assert best is not None
    if require_every_label and best[0] < len(wanted):  # only on absurdly small grids
        raise MedsegError(f"a tumour label vanished on the {shape} grid (grid too small?)", case_id)
    matrix, offset, brain_frac, brain, seg = best[1]
    # Dividing by the posed brain fraction undoes the blend with background at the brain edge.
    norm = np.where(brain, np.maximum(brain_frac, 1e-3), 1.0)
    # Soft (partial-volume) lesion weights, ~80 % own label at a voxel so small regions keep their
    # contrast on coarse grids; the masks are disjoint, so the weights sum to ≤ 1.
    weights = {k: ndi.gaussian_filter((seg == k).astype(np.float32), 0.4) for k in appearance}
    w_total = sum(weights.values())
    # Lesion heterogeneity, only computed around the lesions (a fine-grained field is the costly one).
    texture = np.ones(shape, np.float32)
    objects = ndi.find_objects((w_total > 0).astype(np.uint8))
    if objects and objects[0] is not None:
        near = objects[0]
        texture[near] += 0.08 * _smooth_noise(rng, [ax[s] for ax, s in zip(axes_mm, near)], 5.0)
    # Posing the three tissue fractions (rather than four images) is one resample fewer per case.
    tissue = {t: _pose(getattr(anat, t), matrix, offset, 1) / norm for t in ("gm", "wm", "csf")}

    volumes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    n_brain = int(brain.sum())
    for c, name in enumerate(BRATS_CHANNELS):
        healthy = sum(tissue[t] * float(jitter[t][c]) for t in ("gm", "wm", "csf"))
        tumour = sum(weights[k] * float(tjitter[k][c]) for k in appearance) * texture
        img = healthy * (1.0 - w_total) + tumour
        bias = np.exp(rng.uniform(0.05, 0.15) * _smooth_noise(rng, axes_mm, 80.0))
        img = img * bias * gain[c]
        # Rician magnitude noise, sigma 2–5 % of the channel's mean tissue level.
        sigma = rng.uniform(0.02, 0.05) * gain[c] * float(np.mean([jitter[t][c] for t in jitter]))
        inside = img[brain]
        real = inside + sigma * rng.standard_normal(n_brain, dtype=np.float32)
        imag = sigma * rng.standard_normal(n_brain, dtype=np.float32)
        out = np.zeros(shape, np.int16)
        # ≥ 1 inside the brain so that "nonzero" stays a faithful brain mask, as in BraTS files.
        out[brain] = np.clip(np.rint(np.sqrt(real * real + imag * imag)), 1, 32767).astype(np.int16)
        volumes[name] = (out, anat.affine.copy())
    volumes[SEG_SUFFIX] = (seg, anat.affine.copy())
    return volumes


# --------------------------------------------------------------------------- writing
def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes that depend only on the data: gzip ``mtime=0`` and no stored file name
    (nibabel's own gzip writer stamps the current time, which breaks byte-for-byte reproducibility)."""
    img = make_nifti(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def case_id_for(index: int) -> str:
    return CASE_ID_FORMAT.format(index)


def write_case(out: str | Path, case_id: str, volumes: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write one case folder ``out/case_id/`` atomically (built beside it, then renamed into place)."""
    dest = Path(out) / case_id
    with atomic_dir(dest, overwrite=True) as tmp:
        for suffix, (array, affine) in volumes.items():
            path = write_bytes(tmp / f"{case_id}-{suffix}.nii.gz", nifti_gz_bytes(array, affine))
            path.chmod(0o644)  # mkstemp makes 0600 files; a dataset is meant to be shared
        tmp.chmod(0o755)  # likewise mkdtemp's 0700
    return dest


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise MedsegError(f"shape must be three integers, got {shape!r}") from None
    if len(dims) != 3 or any(s < MIN_SHAPE for s in dims):
        raise MedsegError(f"shape must be three integers ≥ {MIN_SHAPE}, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


def generate_dataset(
    out: str | Path,
    n_cases: int,
    shape: tuple[int, int, int],
    seed: int,
    progress: bool = True,
    anatomy: Anatomy = "auto",
) -> list[str]:
    """Write ``n_cases`` cases ``BraTS-GLI-00000-000`` … into ``out``; returns their case ids.

    Case ``i`` uses ``default_rng([seed, i])``, so a case does not depend on how many others are
    made. Existing folders with the same ids are replaced (each atomically); other content of
    ``out`` is left alone. ``anatomy`` is resolved once, so all cases share it.
    """
    if int(n_cases) < 1:
        raise MedsegError(f"--cases must be at least 1, got {n_cases}")
    if int(seed) < 0:
        raise MedsegError(f"--seed must be ≥ 0, got {seed}")
    shape = _check_shape(shape)
    kind = resolve_anatomy(anatomy)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm  # only needed here; keeps `import medseg.synth` light

    ids: list[str] = []
    for i in tqdm(range(int(n_cases)), desc="synth", unit="case", disable=not progress):
        case_id = case_id_for(i)
        write_case(out, case_id, generate_case(case_id, shape, [int(seed), i], anatomy=kind))  # type: ignore[arg-type]
        ids.append(case_id)
    write_marker(out, "brats2023", len(ids), seed, shape=list(shape), anatomy=kind)
    return ids


def write_marker(out: str | Path, layout: str, n_cases: int, seed: int, **details: Any) -> Path:
    """Write ``medseg_synth.json`` into ``out``: these cases are synthetic, made by ``medseg synth`` (``layout``,
    ``n_cases``, ``seed`` and ``details`` such as the shape and anatomy). Ingest records it in ``dataset.json``."""
    return write_json(Path(out) / SYNTH_MARKER_JSON, {"generator": "medseg synth", "medseg_version": medseg.__version__, "layout": layout,
                                                      "cases": int(n_cases), "seed": int(seed), **details})


# --------------------------------------------------------------------------- CLI hooks
# Layouts of ``--layout`` (writers in :mod:`medseg.synth_layouts`, imported only when one is used).
LAYOUT_CHOICES: tuple[str, ...] = ("brats2023", "brats2024", "mets", "lgg", "classification", "dicom", "msd")


class _DefaultShape(list):
    """The ``--shape`` default, [96, 96, 96]: its own type so ``run`` can tell "not given" (other layouts
    then use their own default size) from an explicit ``--shape 96 96 96``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg synth``."""
    parser.add_argument("--out", type=Path, required=True, help="folder to write the cases into (the layout's folders are made inside it)")
    parser.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=_DefaultShape([96, 96, 96]), metavar=("A", "B", "C"),
        help="size in voxels; what it means depends on --layout: brats2023, brats2024, mets: X Y Z over the "
             "197×233×189 mm FOV (default 96 96 96); lgg: ROWS COLS SLICES of the TIFF stack (default 64 64 16); "
             "classification: X Y Z of the T1 volume over 176×208×176 mm (default 64 64 64); dicom: ROWS COLS "
             "SLICES of each series (default 64 64 24); msd: X Y Z of the 1 mm hippocampus crop (default 32 48 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)")
    parser.add_argument("--anatomy", choices=ANATOMIES, default="auto", help="brats2023, brats2024, mets: mni: the MNI152 template shipped with nilearn; procedural: a synthetic ellipsoid brain; auto (default): mni when available")
    parser.add_argument(
        "--layout", choices=LAYOUT_CHOICES, default="brats2023",
        help="on-disk layout, one per ingest source format: brats2023 (default: BraTS 2023 glioma, as always), "
             "brats2024 (post-treatment glioma with resection cavity), mets (BraTS 2023 metastases), lgg "
             "(Kaggle LGG TIFF slices), classification (CN/MCI/AD + labels.csv), dicom (DICOM series + seg.nii.gz), "
             "msd (Decathlon Task04_Hippocampus)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``medseg synth`` from parsed arguments; prints a one-line summary and returns 0."""
    layout = getattr(args, "layout", "brats2023")
    if layout != "brats2023":
        return _run_layout(args, layout)
    shape = _check_shape(args.shape)
    kind = resolve_anatomy(getattr(args, "anatomy", "auto"))
    start = time.perf_counter()
    ids = generate_dataset(args.out, args.cases, shape, args.seed, progress=getattr(args, "progress", True), anatomy=kind)  # type: ignore[arg-type]
    spacing, _ = _grid_geometry(shape)
    print(
        f"synth: wrote {len(ids)} cases ({'×'.join(map(str, shape))} voxels, "
        f"{'×'.join(f'{s:.2f}' for s in spacing)} mm, {kind} anatomy, seed {args.seed}) "
        f"to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _run_layout(args: argparse.Namespace, layout: str) -> int:
    """``medseg synth --layout L`` for the layouts other than brats2023 (see :mod:`medseg.synth_layouts`)."""
    from medseg import synth_layouts

    given = getattr(args, "shape", None)
    shape = None if given is None or isinstance(given, _DefaultShape) else tuple(int(s) for s in given)
    options = {"anatomy": resolve_anatomy(getattr(args, "anatomy", "auto"))} if layout in ("brats2024", "mets") else {}
    start = time.perf_counter()
    ids = synth_layouts.generate_layout(layout, args.out, args.cases, args.seed, shape=shape, progress=getattr(args, "progress", True), **options)
    dims = shape or synth_layouts.default_shape(layout)
    print(
        f"synth: wrote {len(ids)} {layout} cases ({synth_layouts.SHAPE_MEANING[layout]} {' '.join(map(str, dims))}, seed {args.seed}) "
        f"to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
