"""Small synthetic datasets in the on-disk layout of every source format ``medseg ingest`` reads.

``medseg synth --layout L`` (or :func:`generate_layout`) writes ``n_cases`` cases of layout ``L`` into
``OUT``, in the folder structure the matching ingest adapter auto-detects. The data are meant for
end-to-end tests and demos: tiny, quick to write (tens of milliseconds per case at test sizes),
deterministic, and easy to learn (each label or class has a strong, simple contrast), not realistic.

Layouts (``--shape`` meaning, default):

``brats2023``  :func:`medseg.synth.generate_dataset`, unchanged: ``OUT/BraTS-GLI-00000-000/...``.
    Shape X Y Z voxels over the 197×233×189 mm MNI field of view (default 96 96 96, ~2 mm).
``brats2024``  BraTS 2024 post-treatment glioma, adapter ``brats2024`` (detected by the folder name)::

        OUT/BraTS2024-BraTS-GLI-TrainingData/BraTS-GLI-00000-100/BraTS-GLI-00000-100-{t1n,t1c,t2w,t2f,seg}.nii.gz

    Labels 1 NETC, 2 SNFH, 3 ET (the synth glioma) and, in ~85 % of cases, 4 RC: a resection cavity
    touching the tumour core, fluid-like (dark on t1n/t1c and FLAIR, bright on t2w). Shape as brats2023.
``mets``  BraTS 2023 brain metastases, adapter ``brats2023``::

        OUT/ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData/BraTS-MET-00000-000/BraTS-MET-00000-000-{...}.nii.gz

    1–4 small round lesions per case at the grey/white-matter junction: ET (3) shell, NETC (1) core in
    the larger ones (when the grid resolves it), SNFH (2) edema around, extent 1.3–3 lesion radii.
    Shape as brats2023.
``lgg``  Kaggle LGG (``kaggle_3m``), adapter ``lgg``::

        OUT/kaggle_3m/TCGA_<inst>_<patient>_<YYYYMMDD>/TCGA_..._<n>.tif        RGB uint8 slice n = 1..K
        OUT/kaggle_3m/TCGA_<inst>_<patient>_<YYYYMMDD>/TCGA_..._<n>_mask.tif   its mask, 0/255 (mode L)
        OUT/kaggle_3m/data.csv                                                 as in the real folder

    R pre-contrast T1, G FLAIR, B post-contrast T1. One lesion per case (bright in FLAIR, slightly dark
    on T1) over a run of slices; the first and last slices are always lesion-free. Shape ROWS COLS
    SLICES (default 64 64 16); an axial brain spanning ~200 mm in-plane and the middle ~100 mm through-plane.
``classification``  CN / MCI / AD with covariates, adapter ``classification``::

        OUT/labels.csv                       subject,label,age,sex  (ADNI-like ids 012_S_4000)
        OUT/images/<subject>.nii.gz          one skull-stripped 3D T1-like volume, int16

    Classes balanced (case i is CN, MCI, AD for i mod 3). The class shows as atrophy: from CN to AD
    the parenchyma shrinks inside a constant intracranial volume (wider CSF film and sulci), the
    cortex thins and the ventricles grow (volume ~×1.3 CN, ~×2.8 MCI, ~×5 AD of the base size),
    with per-subject scatter. Age is correlated with the class (means 71/74/76 years, sd 6) and adds
    a little atrophy, but does not decide it. Shape X Y Z over 176×208×176 mm (default 64 64 64).
``dicom``  DICOM series, adapter ``dicom``::

        OUT/patient_0000/{flair,t1c}/IM-000<s>-<nnnn>.dcm   one axial series per channel
        OUT/patient_0000/seg.nii.gz                         uint8 0/1 label in the series' voxel grid

    Real single-frame MR Image Storage files (Explicit VR Little Endian, int16, RescaleSlope 1 /
    Intercept 0, ImageOrientationPatient 1\\0\\0\\0\\1\\0, ImagePositionPatient per slice, PixelSpacing,
    SliceThickness, SpacingBetweenSlices, deterministic UIDs). A head with scalp, skull and background
    noise; one lesion (label 1): bright on FLAIR, enhancing on t1c. The label's affine is the
    adapter's (``diag(-1, -1, 1) @ [row·Δc, col·Δr, step, IPP₀]``), its array (column, row, slice).
    Shape ROWS COLS SLICES (default 64 64 24) over 220×220 mm in-plane, 150 mm through-plane.
``msd``  Medical Segmentation Decathlon Task04_Hippocampus, adapter ``msd``::

        OUT/Task04_Hippocampus/dataset.json
        OUT/Task04_Hippocampus/imagesTr/hippocampus_000.nii.gz   3D (one modality "MRI"), int16
        OUT/Task04_Hippocampus/labelsTr/hippocampus_000.nii.gz   uint8: 1 Anterior, 2 Posterior
        OUT/Task04_Hippocampus/imagesTs/                         empty unless ``n_test`` > 0

    A T1-like crop (1 mm isotropic) around one hippocampus: a curved tube along the A-P axis, thick
    head (Anterior, label 1) and thinner body/tail (Posterior, label 2), darker than the surrounding
    white matter, with a CSF temporal horn beside the head. Shape X Y Z (default 32 48 32 voxels).

What is approximated: everything but the layout. The brain-like layouts reuse the synth glioma
generator's anatomy, pose, bias field and Rician noise (:mod:`medseg.synth`); the others use a
procedural ellipsoidal head. The head poses, lesion shapes and intensities are hand-made; the
anterior/posterior hippocampus labels differ by ~15 % in intensity (not so in real scans) so that a
tiny network can tell them apart after a few steps; DICOM headers hold only what a reader needs plus
a few descriptive tags.

Determinism: case ``i`` draws from ``numpy.random.default_rng([seed, i])`` only (its content does not
depend on ``n_cases``), gzip streams are written with ``mtime=0``, DICOM UIDs are derived from
(seed, case, series, slice), so the same arguments give byte-identical files.

Writing: case folders (brats2024, mets, lgg, dicom) are each built beside their final place and
renamed into it (replacing a folder of the same name; other content of ``OUT`` is left alone). For
``msd`` the whole task folder, and for ``classification`` the ``images/`` folder, is replaced as a
whole, then ``labels.csv`` is written (atomically) to list exactly the subjects written.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from medseg import synth
from medseg.errors import MedsegError
from medseg.io import atomic_dir, write_bytes, write_text
from medseg.task import BRATS2024

NETC, SNFH, ET, RC = (BRATS2024.labels[k] for k in ("NETC", "SNFH", "ET", "RC"))

LAYOUT_NAMES: tuple[str, ...] = ("brats2023", "brats2024", "mets", "lgg", "classification", "dicom", "msd")

DEFAULT_SHAPES: dict[str, tuple[int, int, int]] = {
    "brats2023": (96, 96, 96),  # X Y Z voxels
    "brats2024": (96, 96, 96),
    "mets": (96, 96, 96),
    "lgg": (64, 64, 16),  # rows cols slices
    "classification": (64, 64, 64),  # X Y Z voxels
    "dicom": (64, 64, 24),  # rows cols slices
    "msd": (32, 48, 32),  # X Y Z voxels (1 mm)
}
SHAPE_MEANING: dict[str, str] = {
    "brats2023": "X Y Z",
    "brats2024": "X Y Z",
    "mets": "X Y Z",
    "lgg": "ROWS COLS SLICES",
    "classification": "X Y Z",
    "dicom": "ROWS COLS SLICES",
    "msd": "X Y Z",
}

BRATS2024_FOLDER = "BraTS2024-BraTS-GLI-TrainingData"
METS_FOLDER = "ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData"
LGG_FOLDER = "kaggle_3m"
MSD_TASK = "Task04_Hippocampus"
CLASSES: tuple[str, ...] = ("CN", "MCI", "AD")
DICOM_CHANNELS: tuple[str, ...] = ("flair", "t1c")

# Resection cavity appearance (t1n, t1c, t2w, t2f): fluid, near CSF (synth.TISSUE_INTENSITY["csf"]).
RC_INTENSITY: tuple[float, float, float, float] = (330.0, 320.0, 1750.0, 260.0)


# --------------------------------------------------------------------------- shared helpers
def default_shape(layout: str) -> tuple[int, int, int]:
    """The shape used when none is given (see :data:`DEFAULT_SHAPES`)."""
    _check_layout(layout)
    return DEFAULT_SHAPES[layout]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUT_NAMES:
        raise MedsegError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUT_NAMES)})")


def _check_common(n_cases: int, seed: int) -> None:
    if int(n_cases) < 1:
        raise MedsegError(f"--cases must be at least 1, got {n_cases}")
    if int(seed) < 0:
        raise MedsegError(f"--seed must be ≥ 0, got {seed}")


def _shape3(shape: Sequence[int] | None, layout: str, minimum: tuple[int, int, int]) -> tuple[int, int, int]:
    if shape is None:
        return DEFAULT_SHAPES[layout]
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise MedsegError(f"shape must be three integers ({SHAPE_MEANING[layout]}), got {shape!r}") from None
    if len(dims) != 3 or any(d < m for d, m in zip(dims, minimum)):
        raise MedsegError(
            f"{layout}: shape must be three integers {SHAPE_MEANING[layout]} ≥ {' '.join(map(str, minimum))}, got {tuple(shape)}"
        )
    return dims  # type: ignore[return-value]


def _progress(iterable: range, layout: str, progress: bool):
    from tqdm import tqdm  # keeps `import medseg.synth_layouts` light

    return tqdm(iterable, desc=f"synth {layout}", unit="case", disable=not progress)


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``img`` plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _centred_axes(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Voxel-centre coordinates (mm) along each axis, 0 at the grid centre."""
    return [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def _rotated_radius(rng: np.random.Generator, d: Sequence[np.ndarray], semi: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid radius of the offsets ``d`` (mm, broadcastable) for a random orientation."""
    rot = synth._rotation(rng.uniform(-math.pi, math.pi, 3))
    u = [sum(float(rot[j, k]) * d[j] for j in range(3)) for k in range(3)]
    return np.sqrt(sum((u[k] / float(semi[k])) ** 2 for k in range(3)))


@dataclass(frozen=True)
class _Head:
    """A procedural brain on a grid: tissue fractions (sum 1 inside ``brain``), masks, geometry."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool: intracranial (skull-stripped) mask
    axes: list[np.ndarray]  # mm from the grid centre, per axis
    semi: np.ndarray  # intracranial semi-axes (mm)


def _brain_phantom(
    shape: tuple[int, int, int],
    spacing: Sequence[float],
    rng: np.random.Generator,
    atrophy: float = 0.0,
    scale: float = 1.0,
    centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> _Head:
    """An ellipsoidal brain (axis 0 left-right, 1 posterior-anterior, 2 inferior-superior).

    Layers by normalised radius: a CSF film under the skull, a folded cortical ribbon with CSF-filled
    sulci, white matter, two lateral ventricles and deep grey nuclei; the folds and the outline are
    per-case smooth random fields. ``atrophy`` in [0, 1] widens the CSF film and the sulci, thins the
    cortex and enlarges the ventricles while the intracranial volume (``brain``) stays the same.
    """
    axes = _centred_axes(shape, spacing)
    x = axes[0][:, None, None] - float(centre_mm[0])
    y = axes[1][None, :, None] - float(centre_mm[1])
    z = axes[2][None, None, :] - float(centre_mm[2])
    semi = np.array([68.0, 84.0, 60.0]) * scale
    rho = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    rho = rho * (1.0 + 0.03 * synth._smooth_noise(rng, axes, 40.0))
    mean_r = float(semi.mean())
    film_mm = 1.5 + 5.0 * atrophy
    ribbon_mm = np.clip(5.0 + 2.0 * synth._smooth_noise(rng, axes, 10.0), 3.0, 8.0) * (1.0 - 0.35 * atrophy)
    labels = np.zeros(shape, np.uint8)  # 0 outside, 1 csf, 2 gm, 3 wm
    labels[rho < 1.0] = 1
    labels[rho < 1.0 - film_mm / mean_r] = 2
    labels[rho < 1.0 - (film_mm + ribbon_mm) / mean_r] = 3
    sulci = (labels == 2) & (synth._smooth_noise(rng, axes, 6.0) > 1.0 - 0.9 * atrophy)
    labels[sulci] = 1
    v = (1.0 + 0.9 * atrophy) * scale
    for sx in (-1.0, 1.0):
        nuc1 = ((x - sx * 20.0 * scale) / (9.0 * scale)) ** 2 + ((y - 10.0 * scale) / (12.0 * scale)) ** 2 + (z / (9.0 * scale)) ** 2 < 1.0
        nuc2 = ((x - sx * 10.0 * scale) / (8.0 * scale)) ** 2 + ((y + 10.0 * scale) / (11.0 * scale)) ** 2 + (z / (8.0 * scale)) ** 2 < 1.0
        vent = ((x - sx * (6.0 + 3.0 * v)) / (5.0 * v)) ** 2 + ((y - 5.0 * scale) / (24.0 * v)) ** 2 + ((z - 8.0 * scale) / (9.0 * v)) ** 2 < 1.0
        labels[(nuc1 | nuc2) & (labels == 3)] = 2
        labels[vent & (labels > 0)] = 1
    sigma = [0.6 * min(spacing) / s for s in spacing]  # ~half a voxel of partial volume
    frac = [ndi.gaussian_filter((labels == k).astype(np.float32), sigma) for k in (1, 2, 3)]
    brain = labels > 0
    total = frac[0] + frac[1] + frac[2]
    safe = np.where(total > 1e-3, total, 1.0)
    csf, gm, wm = (np.where(brain, f / safe, 0.0).astype(np.float32) for f in frac)
    csf[brain & (total <= 1e-3)] = 1.0
    return _Head(gm, wm, csf, brain, axes, semi)


def _bias(rng: np.random.Generator, axes: Sequence[np.ndarray], strength: tuple[float, float] = (0.05, 0.15)) -> np.ndarray:
    return np.exp(rng.uniform(*strength) * synth._smooth_noise(rng, axes, 80.0)).astype(np.float32)


def _add_cavity(anat: Any, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with a resection cavity (RC) touching the tumour core, in brain tissue or edema.

    An irregular ellipsoid of 0.6–1.0 times the core's equivalent radius (at least 1.5 voxels),
    centred just outside the core on a random side with room in the brain; it replaces edema and
    healthy tissue only, so NETC and ET stay as they were.
    """
    spacing = np.array(anat.spacing)
    core = (labels == NETC) | (labels == ET)
    if not core.any():
        core = labels > 0
    voxel_mm3 = float(np.prod(spacing))
    r_core = (3.0 * float(core.sum()) * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    r_c = max(rng.uniform(0.6, 1.0) * r_core, 1.5 * float(spacing.max()))
    centre_core = (np.argwhere(core).mean(axis=0) + 0.5) * spacing
    best: tuple[float, np.ndarray] | None = None
    for _ in range(24):
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        centre = centre_core + u * (r_core + 0.4 * r_c)
        idx = tuple(int(np.clip(math.floor(c / s), 0, n - 1)) for c, s, n in zip(centre, spacing, anat.shape))
        depth = float(anat.depth_mm[idx]) if anat.brain[idx] and not core[idx] else -1.0
        if best is None or depth > best[0]:
            best = (depth, centre)
        if depth >= 0.8 * r_c:
            break
    assert best is not None
    centre = best[1]
    c_idx = centre / spacing - 0.5
    half = np.ceil(1.6 * r_c / spacing).astype(int)
    lo = np.maximum(np.floor(c_idx).astype(int) - half, 0)
    hi = np.minimum(np.ceil(c_idx).astype(int) + half + 1, anat.shape)
    if np.any(hi <= lo):
        return labels
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes_mm = synth._axes_mm(anat.shape, anat.spacing)
    box_axes = [ax[s] for ax, s in zip(axes_mm, box)]
    d = [box_axes[0][:, None, None] - centre[0], box_axes[1][None, :, None] - centre[1], box_axes[2][None, None, :] - centre[2]]
    semi = np.exp(rng.uniform(-0.25, 0.25, 3))
    semi = semi / np.prod(semi) ** (1.0 / 3.0) * r_c
    radius = _rotated_radius(rng, d, semi) + 0.15 * synth._smooth_noise(rng, box_axes, max(0.6 * r_c, 4.0))
    sub = labels[box]
    cavity = (radius < 1.0) & anat.brain[box] & ((sub == 0) | (sub == SNFH)) & (anat.csf[box] < 0.6)
    if int(cavity.sum()) < 4:
        return labels
    out = labels.copy()
    out[box][cavity] = RC
    if not (out == SNFH).any():  # never let the cavity swallow all edema
        return labels
    return out


def _metastases(anat: Any, rng: np.random.Generator) -> np.ndarray:
    """Label map (before the pose) with 1–4 metastases at the grey/white-matter junction.

    Each: a randomly oriented, slightly elongated ball of radius r (3–12 mm, at least 1.3 voxels)
    that is enhancing (ET), with a necrotic core (NETC) of radius r − rim when r ≥ 6 mm and the grid
    resolves it (rim = max(2 mm, 1 voxel)); edema (SNFH) around it out to 1.3–3 r, irregular, pulled
    along white matter and kept out of CSF. Lesions keep apart by the sum of their edema radii.
    """
    spacing = np.array(anat.spacing)
    vmax = float(spacing.max())
    axes_mm = synth._axes_mm(anat.shape, anat.spacing)
    rank = np.zeros(anat.shape, np.uint8)  # 1 SNFH, 2 ET, 3 NETC: inner parts win
    junction = (anat.gm > 0.2) & (anat.wm > 0.2)
    tissue = (anat.gm + anat.wm) > 0.6
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(1, 5))):
        r = max(rng.uniform(3.0, 12.0), 1.3 * vmax)
        r_e = r * rng.uniform(1.3, 3.0)
        centre = None
        for depth_factor, region in ((1.0, junction), (1.0, tissue), (0.5, tissue), (0.0, anat.brain)):
            cand = region & (anat.depth_mm > depth_factor * r + 0.5 * vmax)
            idx = np.flatnonzero(cand)
            if idx.size and placed:
                pos = (np.stack(np.unravel_index(idx, anat.shape), axis=1) + 0.5) * spacing
                ok = np.ones(idx.size, bool)
                for c, re in placed:
                    ok &= np.linalg.norm(pos - c, axis=1) > re + r_e
                idx = idx[ok]
            if idx.size:
                choice = idx[rng.integers(idx.size)]
                centre = (np.array(np.unravel_index(choice, anat.shape), float) + 0.5) * spacing
                break
        if centre is None:
            break  # no room left (tiny grid): fewer lesions
        placed.append((centre, r_e))
        c_idx = centre / spacing - 0.5
        half = np.ceil(1.3 * r_e / spacing).astype(int) + 1
        lo = np.maximum(np.floor(c_idx).astype(int) - half, 0)
        hi = np.minimum(np.ceil(c_idx).astype(int) + half + 1, anat.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        box_axes = [ax[s] for ax, s in zip(axes_mm, box)]
        d = [box_axes[0][:, None, None] - centre[0], box_axes[1][None, :, None] - centre[1], box_axes[2][None, None, :] - centre[2]]
        semi = np.exp(rng.uniform(-0.15, 0.15, 3))
        semi /= np.prod(semi) ** (1.0 / 3.0)
        rho = _rotated_radius(rng, d, semi)  # mm, ellipsoidal
        brain_box = anat.brain[box]
        lesion = (rho < r) & brain_box
        if not lesion.any():  # coarse grid: keep the centre voxel
            lesion[tuple(int(np.clip(c - a, 0, n - 1)) for c, a, n in zip(np.floor(c_idx).astype(int), lo, lesion.shape))] = True
        rim = max(2.0, vmax)
        core = (rho < r - rim) & lesion if (r >= 6.0 and r - rim >= 0.8 * vmax) else np.zeros_like(lesion)
        d_e = rho / r_e + 0.25 * synth._smooth_noise(rng, box_axes, max(0.7 * r_e, 5.0))
        d_e = d_e - 0.2 * anat.wm[box] + 0.5 * anat.csf[box]
        edema = (d_e < 1.0) & brain_box & ~lesion
        part = np.where(core, 3, np.where(lesion, 2, np.where(edema, 1, 0))).astype(np.uint8)
        np.maximum(rank[box], part, out=rank[box])
    return np.array([0, SNFH, ET, NETC], np.uint8)[rank]


def _brats_like(
    layout: str,
    out: Path,
    folder: str,
    id_format: str,
    make_labels: Callable[[Any, np.random.Generator], np.ndarray],
    appearance: dict[int, tuple[float, float, float, float]],
    n_cases: int,
    seed: int,
    shape: Sequence[int] | None,
    progress: bool,
    anatomy: str,
) -> list[str]:
    _check_common(n_cases, seed)
    dims = synth._check_shape(shape if shape is not None else DEFAULT_SHAPES[layout])
    kind = synth.resolve_anatomy(anatomy)
    anat = synth._anatomy(kind, dims)
    root = Path(out) / folder
    root.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for i in _progress(range(int(n_cases)), layout, progress):
        case_id = id_format.format(i)
        rng = np.random.default_rng([int(seed), i])
        labels = make_labels(anat, rng)
        synth.write_case(root, case_id, synth.render_case(case_id, anat, labels, rng, appearance))
        ids.append(case_id)
    return ids


def write_brats2023(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True, anatomy: str = "auto") -> list[str]:
    """Today's ``medseg synth`` output (:func:`medseg.synth.generate_dataset`), cases directly in ``out``.

    Shape X Y Z (default 96³) over the 197×233×189 mm field of view; labels 1 NETC, 2 SNFH, 3 ET.
    """
    dims = synth._check_shape(shape if shape is not None else DEFAULT_SHAPES["brats2023"])
    return synth.generate_dataset(out, n_cases, dims, seed, progress=progress, anatomy=anatomy)  # type: ignore[arg-type]


def write_brats2024(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True, anatomy: str = "auto", cavity_fraction: float = 0.85) -> list[str]:
    """BraTS 2024 post-treatment glioma cases ``BraTS-GLI-0000i-100`` in ``out/BraTS2024-BraTS-GLI-TrainingData/``.

    The synth glioma (labels 1 NETC, 2 SNFH, 3 ET) plus, with probability ``cavity_fraction``, a
    resection cavity (4 RC) touching the core: dark on t1n/t1c/FLAIR, bright on t2w. Geometry as
    brats2023 (shape X Y Z, default 96³, over 197×233×189 mm; int16 images, uint8 labels).
    """
    appearance = {**synth.TUMOUR_INTENSITY, RC: RC_INTENSITY}

    def labels(anat: Any, rng: np.random.Generator) -> np.ndarray:
        glioma = synth._tumour(anat, rng)
        return _add_cavity(anat, glioma, rng) if rng.random() < cavity_fraction else glioma

    return _brats_like("brats2024", out, BRATS2024_FOLDER, "BraTS-GLI-{:05d}-100", labels, appearance, n_cases, seed, shape, progress, anatomy)


def write_mets(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True, anatomy: str = "auto") -> list[str]:
    """BraTS 2023 metastases cases ``BraTS-MET-0000i-000`` in ``out/ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData/``.

    1–4 lesions per case (see :func:`_metastases`), labels 1 NETC, 2 SNFH, 3 ET with the synth glioma's
    intensities (ET bright on t1c, edema bright on t2w/FLAIR). Geometry as brats2023.
    """
    return _brats_like("mets", out, METS_FOLDER, "BraTS-MET-{:05d}-000", _metastases, dict(synth.TUMOUR_INTENSITY), n_cases, seed, shape, progress, anatomy)


# --------------------------------------------------------------------------- lgg
# (R pre-contrast T1, G FLAIR, B post-contrast T1) per tissue, uint8 units
_LGG_TISSUE = {"csf": (40.0, 30.0, 45.0), "gm": (105.0, 125.0, 110.0), "wm": (145.0, 95.0, 150.0)}
_LGG_LESION = (85.0, 225.0, 100.0)
_LGG_INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")


def lgg_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One LGG patient: ``(rgb (K, rows, cols, 3) uint8, mask (K, rows, cols) uint8 0/255)``.

    In-plane the brain spans ~200 mm of the slice (square pixels of 220/cols mm), the K slices cover
    ~100 mm (the middle of the brain, every slice holds brain). The lesion is an irregular ellipsoid
    of 12–28 mm in-plane radius in one hemisphere, over a run of slices that never includes the
    first or the last one.
    """
    rows, cols, k = shape
    d_plane = 220.0 / max(rows, cols)
    dz = 100.0 / k
    grid = (cols, rows, k)  # (i = column → left-right, j = row → anterior-posterior, k = slice)
    spacing = (d_plane, d_plane, dz)
    head = _brain_phantom(grid, spacing, rng, scale=rng.uniform(0.92, 1.05))
    ax = head.axes
    # lesion over slices k0..k1 (inclusive), 1 ≤ k0 ≤ k1 ≤ K − 2
    half = max(1, int(round(rng.uniform(0.15, 0.3) * k)))
    kc = int(rng.integers(1 + half // 2, max(2 + half // 2, k - 1 - half // 2)))
    k0, k1 = max(1, kc - half), min(k - 2, kc + half)
    cz = float(np.mean(ax[2][[k0, k1]]))
    cx = float(rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 35.0))
    cy = float(rng.uniform(-30.0, 30.0))
    r_plane = rng.uniform(12.0, 28.0)
    r_z = 0.5 * (ax[2][k1] - ax[2][k0]) + 0.75 * dz
    d = [ax[0][:, None, None] - cx, ax[1][None, :, None] - cy, ax[2][None, None, :] - cz]
    rho = _rotated_radius(rng, d[:2] + [d[2] * (r_plane / r_z)], [r_plane * s for s in np.exp(rng.uniform(-0.2, 0.2, 3))])
    rho = rho + 0.2 * synth._smooth_noise(rng, ax, 12.0)
    lesion = (rho < 1.0) & head.brain & (head.csf < 0.7)
    lesion[:, :, :k0] = False
    lesion[:, :, k1 + 1:] = False
    if not lesion.any():  # tiny grid: a single voxel at the centre
        lesion[np.argmin(np.abs(ax[0] - cx)), np.argmin(np.abs(ax[1] - cy)), (k0 + k1) // 2] = True
    w = ndi.gaussian_filter(lesion.astype(np.float32), (0.5, 0.5, 0.0))
    gain = rng.uniform(0.9, 1.1, 3)
    bias = _bias(rng, ax)
    rgb = np.zeros((*grid, 3), np.uint8)
    for c in range(3):
        healthy = sum(getattr(head, t) * _LGG_TISSUE[t][c] for t in ("csf", "gm", "wm"))
        img = (healthy * (1.0 - w) + w * _LGG_LESION[c] * rng.uniform(0.93, 1.07)) * bias * gain[c]
        img = _rician(img, 4.0, rng)
        rgb[..., c] = np.where(head.brain, np.clip(np.rint(img), 1, 255), 0).astype(np.uint8)
    mask = np.where(lesion, 255, 0).astype(np.uint8)
    # (cols, rows, K) → (K, rows, cols): volume[i, j, k] = slice_k[row j, column i], as the adapter reads
    return np.ascontiguousarray(rgb.transpose(2, 1, 0, 3)), np.ascontiguousarray(mask.transpose(2, 1, 0))


def _tiff_bytes(array: np.ndarray) -> bytes:
    from PIL import Image  # only for this layout

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def write_lgg(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True) -> list[str]:
    """Kaggle LGG patients ``out/kaggle_3m/TCGA_<inst>_<patient>_<YYYYMMDD>/`` of RGB TIFF slices + 0/255 masks.

    Shape ROWS COLS SLICES (default 64 64 16, at least 16 16 4); see :func:`lgg_case`. The adapter
    reads them as 1 mm voxels (TIFFs carry no geometry). Every patient has one scan (one date).
    """
    _check_common(n_cases, seed)
    dims = _shape3(shape, "lgg", (16, 16, 4))
    root = Path(out) / LGG_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    rows_csv = ["Patient,RNASeqCluster,MethylationCluster,death01"]
    for i in _progress(range(int(n_cases)), "lgg", progress):
        rng = np.random.default_rng([int(seed), i])
        inst = _LGG_INSTITUTIONS[int(rng.integers(len(_LGG_INSTITUTIONS)))]
        patient = f"{inst}_{7000 + i:04d}"
        day = int(rng.integers(0, 365 * 12))
        date = np.datetime64("1994-01-01") + np.timedelta64(day, "D")
        folder = f"TCGA_{patient}_{str(date).replace('-', '')}"
        rgb, mask = lgg_case(dims, rng)
        with atomic_dir(root / folder) as tmp:
            for n in range(dims[2]):
                write_bytes(tmp / f"{folder}_{n + 1}.tif", _tiff_bytes(rgb[n]))
                write_bytes(tmp / f"{folder}_{n + 1}_mask.tif", _tiff_bytes(mask[n]))
        rows_csv.append(f"TCGA_{patient},{int(rng.integers(1, 5))},{int(rng.integers(1, 6))},{int(rng.integers(0, 2))}")
        ids.append(folder)
    write_text(root / "data.csv", "\n".join(rows_csv) + "\n")
    return ids


# --------------------------------------------------------------------------- classification
CLASSIFICATION_FOV_MM = (176.0, 208.0, 176.0)
_CLASS_ATROPHY = {"CN": 0.1, "MCI": 0.45, "AD": 0.8}
_CLASS_AGE = {"CN": 71.0, "MCI": 73.5, "AD": 76.0}
_T1_TISSUE = {"csf": 250.0, "gm": 600.0, "wm": 850.0}


def classification_subject(index: int, shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """``(row {subject, label, age, sex}, int16 volume, affine)`` of subject ``index``.

    Class CN/MCI/AD = ``index mod 3``; atrophy = class level (0.1 / 0.45 / 0.8) + 0.012 per year of
    age over 73 + N(0, 0.08), clipped to [0, 1]; intracranial size ±7 % (men 4 % larger). The volume
    is skull-stripped T1-like (WM 850 > GM 600 > CSF 250, bias field, Rician noise 3 %), background 0,
    on a diagonal RAS affine with spacing FOV/shape (176×208×176 mm), centred on the origin.
    """
    label = CLASSES[index % len(CLASSES)]
    age = float(np.clip(_CLASS_AGE[label] + rng.normal(0.0, 6.0), 55.0, 92.0))
    age = round(age, 1)
    sex = "M" if rng.random() < 0.5 else "F"
    atrophy = float(np.clip(_CLASS_ATROPHY[label] + 0.012 * (age - 73.0) + rng.normal(0.0, 0.08), 0.0, 1.0))
    scale = rng.uniform(0.93, 1.07) * (1.04 if sex == "M" else 1.0)
    spacing = tuple(f / n for f, n in zip(CLASSIFICATION_FOV_MM, shape))
    head = _brain_phantom(shape, spacing, rng, atrophy=atrophy, scale=scale * 0.97)
    gain = rng.uniform(0.85, 1.2)
    img = sum(getattr(head, t) * _T1_TISSUE[t] * rng.uniform(0.95, 1.05) for t in ("csf", "gm", "wm"))
    img = _rician(img * _bias(rng, head.axes) * gain, 0.03 * 600.0 * gain, rng)
    volume = np.where(head.brain, np.clip(np.rint(img), 1, 32767), 0).astype(np.int16)
    affine = np.eye(4)
    for a in range(3):
        affine[a, a] = spacing[a]
        affine[a, 3] = -0.5 * (shape[a] - 1) * spacing[a]
    row = {"label": label, "age": f"{age:.1f}", "sex": sex}
    return row, volume, affine


def write_classification(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True) -> list[str]:
    """CN/MCI/AD subjects: ``out/images/<subject>.nii.gz`` and ``out/labels.csv`` (subject,label,age,sex).

    Shape X Y Z (default 64³, at least 16³); see :func:`classification_subject`. Subject ids are
    ADNI-like (``<site>_S_<4000 + i>``). ``out/images`` is replaced as a whole, then the CSV.
    """
    _check_common(n_cases, seed)
    dims = _shape3(shape, "classification", (16, 16, 16))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with atomic_dir(out / "images") as tmp:
        for i in _progress(range(int(n_cases)), "classification", progress):
            rng = np.random.default_rng([int(seed), i])
            subject = f"{int(rng.integers(2, 142)):03d}_S_{4000 + i:04d}"
            row, volume, affine = classification_subject(i, dims, rng)
            write_bytes(tmp / f"{subject}.nii.gz", synth.nifti_gz_bytes(volume, affine))
            rows.append({"subject": subject, **row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["subject", "label", "age", "sex"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "labels.csv", buffer.getvalue())
    return [row["subject"] for row in rows]


# --------------------------------------------------------------------------- dicom
DICOM_FOV_MM = 220.0  # in-plane
DICOM_COVERAGE_MM = 150.0  # through-plane
# (FLAIR, T1 post-contrast) per tissue, and for the lesion and the scalp
_DICOM_TISSUE = {"csf": (120.0, 300.0), "gm": (900.0, 620.0), "wm": (700.0, 850.0)}
_DICOM_LESION = (1700.0, 1500.0)
_DICOM_SCALP = (500.0, 1000.0)


def dicom_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """One DICOM case in memory: ``({channel: int16 (cols, rows, slices)}, uint8 label, geometry)``.

    Arrays are indexed (i = column, j = row, k = slice) like the adapter's volume; axial slices with
    ImageOrientationPatient (1, 0, 0, 0, 1, 0) so i runs to the patient's left and j to posterior
    (LPS), slices from inferior to superior. ``geometry`` holds PixelSpacing (row, column), slice
    thickness, the per-slice ImagePositionPatient (LPS mm, rounded as written) and the RAS affine the
    adapter computes from them.
    """
    rows, cols, k = shape
    pixel = (round(DICOM_FOV_MM / rows, 4), round(DICOM_FOV_MM / cols, 4))  # (row spacing, column spacing)
    thickness = round(DICOM_COVERAGE_MM / k, 4)
    grid = (cols, rows, k)
    spacing = (pixel[1], pixel[0], thickness)
    scale = rng.uniform(0.9, 1.05)
    # LPS axes: i → +x (left), j → +y (posterior): the phantom's "y" (anterior) is −j
    head = _brain_phantom(grid, spacing, rng, scale=scale)
    ax = head.axes
    x, y, z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
    outer = np.sqrt((x / (head.semi[0] + 9.0)) ** 2 + (y / (head.semi[1] + 9.0)) ** 2 + (z / (head.semi[2] + 9.0)) ** 2)
    scalp = (outer < 1.0) & (outer > 1.0 - 4.0 / float(head.semi.mean() + 9.0)) & ~head.brain
    # lesion: irregular ellipsoid in one hemisphere, 12–25 mm radius
    r = rng.uniform(12.0, 25.0)
    centre = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 35.0), rng.uniform(-30.0, 30.0), rng.uniform(-15.0, 25.0)]) * scale
    semi = np.exp(rng.uniform(-0.2, 0.2, 3)) * r
    rho = _rotated_radius(rng, [x - centre[0], y - centre[1], z - centre[2]], semi) + 0.2 * synth._smooth_noise(rng, ax, 10.0)
    lesion = (rho < 1.0) & head.brain & (head.csf < 0.7)
    if not lesion.any():
        lesion[tuple(int(np.argmin(np.abs(a - c))) for a, c in zip(ax, centre))] = True
    w = ndi.gaussian_filter(lesion.astype(np.float32), 0.5)
    enhancing = ndi.gaussian_filter((lesion & ~ndi.binary_erosion(lesion)).astype(np.float32), 0.5)
    bias = _bias(rng, ax)
    images: dict[str, np.ndarray] = {}
    for c, channel in enumerate(DICOM_CHANNELS):
        gain = rng.uniform(0.9, 1.1)
        healthy = sum(getattr(head, t) * _DICOM_TISSUE[t][c] for t in ("csf", "gm", "wm")) + scalp * _DICOM_SCALP[c]
        lesion_value = _DICOM_LESION[c] * (1.0 + (0.3 * enhancing if channel == "t1c" else 0.0))
        img = (healthy * (1.0 - w) + w * lesion_value) * bias * gain
        img = _rician(img, 20.0, rng)  # also the background noise of a magnitude image
        images[channel] = np.clip(np.rint(img), 0, 32767).astype(np.int16)
    # geometry, written as the tags will hold it
    origin = np.array([-0.5 * (cols - 1) * pixel[1], -0.5 * (rows - 1) * pixel[0], -0.5 * (k - 1) * thickness + 20.0])
    positions = [np.round(origin + np.array([0.0, 0.0, kk * thickness]), 4) for kk in range(k)]
    lps = np.eye(4)
    lps[:3, 0] = (pixel[1], 0.0, 0.0)  # i = column: along the row cosine (1, 0, 0), column spacing
    lps[:3, 1] = (0.0, pixel[0], 0.0)  # j = row: along the column cosine (0, 1, 0), row spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (k - 1) if k > 1 else (0.0, 0.0, thickness)
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    geometry = {"pixel_spacing": pixel, "thickness": thickness, "positions": positions, "affine": affine}
    return images, lesion.astype(np.uint8), geometry


def _dicom_series_files(
    images: np.ndarray, geometry: dict[str, Any], uid: Callable[..., str], meta: dict[str, Any], channel: str, series_number: int
) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of every slice of one series (single-frame MR Image Storage)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    files: list[tuple[str, bytes]] = []
    series_uid = uid("series", channel)
    for kk in range(images.shape[2]):
        plane = np.ascontiguousarray(images[:, :, kk].T)  # (cols, rows) → stored (rows, cols)
        sop_uid = uid("sop", channel, kk)
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = MRImageStorage
        fm.MediaStorageSOPInstanceUID = sop_uid
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = fm
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = meta["date"]
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = meta["time"]
        ds.AccessionNumber = meta["accession"]
        ds.Modality = "MR"
        ds.Manufacturer = "medseg synth"
        ds.StudyDescription = "synthetic brain MRI"
        ds.SeriesDescription = channel
        ds.PatientName = meta["patient_name"]
        ds.PatientID = meta["patient_id"]
        ds.PatientBirthDate = meta["birth_date"]
        ds.PatientSex = meta["sex"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = geometry["thickness"]
        ds.SpacingBetweenSlices = geometry["thickness"]
        ds.MagneticFieldStrength = 3
        ds.StudyInstanceUID = uid("study")
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = uid("frame")
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = kk + 1
        position = geometry["positions"][kk]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.PixelSpacing = [f"{v:.4f}" for v in geometry["pixel_spacing"]]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = int(np.percentile(plane, 99) // 2), max(int(np.percentile(plane, 99)), 1)
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = plane.astype("<i2").tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((f"IM-{series_number:04d}-{kk + 1:04d}.dcm", buffer.getvalue()))
    return files


def write_dicom(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True) -> list[str]:
    """DICOM cases ``out/patient_000i/{flair,t1c}/*.dcm`` + ``out/patient_000i/seg.nii.gz`` (label 1 = lesion).

    Shape ROWS COLS SLICES (default 64 64 24, at least 16 16 4); see :func:`dicom_case`. Each case is
    its own patient (PatientID ``SYN-<seed>-<i>``; ingest pseudonymises DICOM ids by default).
    """
    _check_common(n_cases, seed)
    dims = _shape3(shape, "dicom", (16, 16, 4))
    from pydicom.uid import generate_uid

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for i in _progress(range(int(n_cases)), "dicom", progress):
        rng = np.random.default_rng([int(seed), i])
        case_id = f"patient_{i:04d}"
        images, label, geometry = dicom_case(dims, rng)
        day = int(rng.integers(0, 365 * 10))
        meta = {
            "date": str(np.datetime64("2015-01-01") + np.timedelta64(day, "D")).replace("-", ""),
            "time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
            "accession": f"A{int(rng.integers(10**6, 10**7))}",
            "patient_name": f"SYNTH^{i:04d}",
            "patient_id": f"SYN-{int(seed)}-{i:04d}",
            "birth_date": f"{int(rng.integers(1940, 1990))}0101",
            "sex": "M" if rng.random() < 0.5 else "F",
        }

        def uid(*parts: Any, _case: str = case_id) -> str:
            return str(generate_uid(entropy_srcs=["medseg-synth-dicom", str(int(seed)), _case, *map(str, parts)]))

        with atomic_dir(root / case_id) as tmp:
            for number, channel in enumerate(DICOM_CHANNELS, start=1):
                for name, data in _dicom_series_files(images[channel], geometry, uid, meta, channel, number):
                    write_bytes(tmp / channel / name, data)
            write_bytes(tmp / "seg.nii.gz", synth.nifti_gz_bytes(label, geometry["affine"]))
        ids.append(case_id)
    return ids


# --------------------------------------------------------------------------- msd
MSD_SPACING_MM = (1.0, 1.0, 1.0)
_MSD_INTENSITY = {"wm": 850.0, "gm": 600.0, "csf": 250.0, "anterior": 640.0, "posterior": 540.0}


def msd_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One hippocampus crop: ``(int16 image, uint8 label, affine)``, 1 mm, diagonal RAS affine.

    The structure runs along axis 1 (posterior → anterior) over 60–75 % of the crop, its centreline
    curving medially and upward toward the tail; radius ~2.5 mm (tail) to ~5 mm (head), scaled with
    the crop. Head (anterior 45–55 %) = label 1, body and tail = label 2. Background: white matter
    with grey-matter patches, a CSF temporal horn lateral-superior to the head, bias field, Rician
    noise (3 %).
    """
    sx, sy, sz = shape
    axes = _centred_axes(shape, MSD_SPACING_MM)
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    size = min(sx, sz) / 32.0  # radii scale with the crop's cross-section
    length = rng.uniform(0.6, 0.75) * sy
    y_post = -0.5 * length + rng.uniform(-2.0, 2.0)
    x0, z0 = rng.uniform(-2.0, 2.0), rng.uniform(-2.0, 2.0)
    bend_x, bend_z = rng.uniform(3.0, 6.0) * size, rng.uniform(3.0, 6.0) * size
    r_head, r_tail = rng.uniform(4.5, 5.5) * size, rng.uniform(2.2, 2.8) * size
    t_split = rng.uniform(0.45, 0.55)
    t_raw = (y - y_post) / length  # 0 at the tail end, 1 at the head end
    t = np.clip(t_raw, 0.0, 1.0)
    cx = x0 + bend_x * (1.0 - t) ** 2  # tail curves medially (+x) ...
    cz = z0 + bend_z * (1.0 - t) ** 2  # ... and upward
    radius = r_tail + (r_head - r_tail) * t**1.5
    beyond = (t_raw - t) * length  # mm past either end (0 inside)
    rho = np.sqrt(((x - cx) ** 2 + (z - cz) ** 2 + beyond**2)) / radius
    rho = rho + 0.12 * synth._smooth_noise(rng, axes, 4.0)
    hippo = rho < 1.0
    label = np.where(hippo, np.where(t >= t_split, 1, 2), 0).astype(np.uint8)
    # temporal horn: thin CSF tube beside the anterior half (lateral = −x here, superior = +z)
    horn_r = rng.uniform(1.2, 1.8) * size
    horn = (np.sqrt((x - (cx - radius - horn_r - 0.5)) ** 2 + (z - (cz + 0.5 * radius)) ** 2) < horn_r) & (t_raw > 0.4) & (t_raw < 1.0)
    horn &= ~hippo
    gm = np.clip(0.5 + 0.5 * synth._smooth_noise(rng, axes, 6.0), 0.0, 1.0) * 0.3
    healthy = (1.0 - gm) * _MSD_INTENSITY["wm"] + gm * _MSD_INTENSITY["gm"]
    weights = {v: ndi.gaussian_filter((label == v).astype(np.float32), 0.5) for v in (1, 2)}
    w_horn = ndi.gaussian_filter(horn.astype(np.float32), 0.5)
    w_all = np.clip(weights[1] + weights[2] + w_horn, 0.0, 1.0)
    img = healthy * (1.0 - w_all) + weights[1] * _MSD_INTENSITY["anterior"] + weights[2] * _MSD_INTENSITY["posterior"] + w_horn * _MSD_INTENSITY["csf"]
    gain = rng.uniform(0.85, 1.2)
    img = _rician(img * _bias(rng, axes, (0.03, 0.08)) * gain, 0.03 * 700.0 * gain, rng)
    image = np.clip(np.rint(img), 0, 32767).astype(np.int16)
    affine = np.diag([*MSD_SPACING_MM, 1.0])
    affine[:3, 3] = [rng.uniform(-40.0, -20.0), rng.uniform(-30.0, -10.0), rng.uniform(-25.0, -5.0)]
    return image, label, affine


def write_msd(out: Path, n_cases: int, seed: int, shape: Sequence[int] | None = None, progress: bool = True, n_test: int = 0) -> list[str]:
    """``out/Task04_Hippocampus`` in Decathlon layout: ``dataset.json`` (MSD fields), ``imagesTr/``,
    ``labelsTr/`` (``hippocampus_000.nii.gz`` …), ``imagesTs/`` (``n_test`` unlabelled images, default none).

    3D single-modality images ("MRI"), labels 0 background, 1 Anterior, 2 Posterior; shape X Y Z at
    1 mm (default 32 48 32, at least 16³); see :func:`msd_case`. Test cases are numbered after the
    training ones and drawn as case ``n_cases + j``. Returns the ids of the training cases, then of
    the test cases. The task folder is replaced as a whole.
    """
    _check_common(n_cases, seed)
    if int(n_test) < 0:
        raise MedsegError(f"n_test must be ≥ 0, got {n_test}")
    dims = _shape3(shape, "msd", (16, 16, 16))
    training: list[dict[str, str]] = []
    test: list[str] = []
    ids: list[str] = []
    with atomic_dir(Path(out) / MSD_TASK) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        for i in _progress(range(int(n_cases) + int(n_test)), "msd", progress):
            rng = np.random.default_rng([int(seed), i])
            case_id = f"hippocampus_{i:03d}"
            image, label, affine = msd_case(dims, rng)
            if i < int(n_cases):
                write_bytes(tmp / "imagesTr" / f"{case_id}.nii.gz", synth.nifti_gz_bytes(image, affine))
                write_bytes(tmp / "labelsTr" / f"{case_id}.nii.gz", synth.nifti_gz_bytes(label, affine))
                training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
            else:
                write_bytes(tmp / "imagesTs" / f"{case_id}.nii.gz", synth.nifti_gz_bytes(image, affine))
                test.append(f"./imagesTs/{case_id}.nii.gz")
            ids.append(case_id)
        dataset = {
            "name": "Hippocampus",
            "description": "Left and right hippocampus segmentation (synthetic, made by medseg synth)",
            "reference": "medseg synth (layout of the Medical Segmentation Decathlon, Vanderbilt University Medical Center data)",
            "licence": "CC-BY-SA 4.0",
            "relase": "1.0 04/05/2018",  # sic: the Decathlon's own files spell the key this way
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        }
        write_text(tmp / "dataset.json", json.dumps(dataset, indent=4) + "\n")
    return ids


# --------------------------------------------------------------------------- registry
LAYOUTS: dict[str, Callable[..., list[str]]] = {
    "brats2023": write_brats2023,
    "brats2024": write_brats2024,
    "mets": write_mets,
    "lgg": write_lgg,
    "classification": write_classification,
    "dicom": write_dicom,
    "msd": write_msd,
}
"""Writer of each layout: ``writer(out, n_cases, seed, shape=None, progress=True, **options) -> ids``."""


def generate_layout(
    layout: str,
    out: str | Path,
    n_cases: int,
    seed: int,
    shape: Sequence[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> list[str]:
    """Write ``n_cases`` synthetic cases of ``layout`` into ``out``; returns the ids written.

    ``shape`` None takes :data:`DEFAULT_SHAPES`; its meaning depends on the layout
    (:data:`SHAPE_MEANING`). ``options`` go to the writer (``anatomy`` for brats2023/brats2024/mets,
    ``n_test`` for msd, ``cavity_fraction`` for brats2024).
    """
    _check_layout(layout)
    ids = LAYOUTS[layout](Path(out), n_cases, seed, shape=shape, progress=progress, **options)
    synth.write_marker(out, layout, len(ids), seed, shape=list(shape or default_shape(layout)), **options)
    return ids
