"""Kaggle LGG MRI segmentation (TCGA lower-grade glioma): one folder of 2D TIFF slices per patient.

Layout (``SRC`` is the ``kaggle_3m`` folder or its parent)::

    kaggle_3m/TCGA_<inst>_<patient>_<date>/TCGA_<inst>_<patient>_<date>_<n>.tif       RGB slice n
    kaggle_3m/TCGA_<inst>_<patient>_<date>/TCGA_<inst>_<patient>_<date>_<n>_mask.tif  its mask (0/255)

Each RGB slice holds three MRI sequences as its colour channels (red = pre-contrast, green = FLAIR,
blue = post-contrast), so one TIFF gives one slice of all three channels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from medseg.ingest.adapters.base import Adapter, Reporter, SourceCase, Volume, subfolders, fresh_header

# ``TCGA_CS_4941_19960909``: institution and patient code, then the acquisition date
_CASE_FOLDER = re.compile(r"^(?P<patient>TCGA_[A-Za-z0-9]+_[A-Za-z0-9]+)_(?P<date>\d{8})$")
# ``<stem>_<n>.tif`` / ``<stem>_<n>_mask.tif``; the greedy stem leaves the *last* number as the slice
_SLICE_FILE = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
_MASK_VALUE_SETS = ({0, 255}, {0, 1})  # a mask slice must use one of these (background, abnormality)


@dataclass
class _SliceFiles:
    """The TIFF files of one case folder by slice number (lists: a number may be claimed twice)."""

    images: dict[int, list[Path]] = field(default_factory=dict)
    masks: dict[int, list[Path]] = field(default_factory=dict)


class KaggleLGGAdapter(Adapter):
    """Kaggle "LGG MRI Segmentation" (``kaggle_3m``): TCGA patients as stacks of RGB TIFF slices.

    One patient folder is one case; its slices are stacked in the order of their slice number ``<n>``
    (numeric: 10 comes after 9) into volumes of shape (I, J, K) = (columns, rows, slices), i.e.
    ``volume[i, j, k] = slice_k[row j, column i]``. The three colour channels become the channels
    ``pre_contrast``, ``flair`` and ``post_contrast``; the mask (0/255, or 0/1) becomes label 1
    ``abnormality`` (the FLAIR abnormality, tumour included) on background 0. A folder without any
    ``_mask`` file is an unlabelled case.

    The patient id is the folder name without its date (``TCGA_CS_4941``), so scans of the same
    patient on different dates stay in the same split.

    Geometry: the TIFFs carry none, so every volume gets :attr:`voxel_spacing_mm` (1 × 1 × 1 mm by
    default) on a diagonal, positive (RAS+) affine. Distances and volumes computed downstream are
    therefore in voxel units, not true millimetres.

    The dataset is a natural 2D task: about 20-90 slices of 256 × 256 per patient, annotated slice by
    slice, with no reliable through-plane spacing. The planner's ``2d`` configuration fits it better
    than ``3d_fullres``.

    Problems reported (naming the file): unreadable TIFF, image that is not RGB, slices of different
    sizes, a gap in the slice numbers, two files for one slice number, a missing mask for a slice (when
    the case has masks), a mask without its image, mask values other than 0/255 or 0/1.
    """

    name: ClassVar[str] = "lgg"
    description: ClassVar[str] = (
        "Kaggle LGG (TCGA) 2D slices: kaggle_3m/TCGA_<inst>_<patient>_<date>/<folder>_<n>[_mask].tif"
    )
    channel_names = ("pre_contrast", "flair", "post_contrast")  # the R, G, B channels of each slice
    labels = {"background": 0, "abnormality": 1}
    regions = {"abnormality": [1]}
    label_remap: dict[int, int] = {}
    # slices stacked along K, annotated one by one: a 2D task; seed report 002 judges it by IoU
    slice_axis: ClassVar[int | None] = 2
    primary_metric: ClassVar[str] = "iou"
    # No geometry in the TIFFs: an assumed isotropic 1 mm grid (I, J, K).
    voxel_spacing_mm: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)

    def detect(self, src: Path) -> bool:
        return any(True for _ in self._case_folders(src))

    def discover(self, src: Path) -> list[SourceCase]:
        cases = [self._case_from_folder(folder) for folder in self._case_folders(src)]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    # -- reading
    def read_images(self, case: SourceCase, report: Reporter) -> dict[str, Volume]:
        """The three channel volumes (uint8, (I, J, K) = (columns, rows, slices)) of ``case``."""
        folder = _case_folder(case)
        files = _list_slice_files(folder)
        if not files.images:
            report(folder, "no image slices (<folder>_<n>.tif) found")
            return {}
        numbers = _check_numbering(folder, files.images, report)
        slices: list[np.ndarray] = []
        expected_size: tuple[int, int] | None = None
        first_file: Path | None = None
        for number in numbers:
            path = files.images[number][0]
            pixels = _read_tiff(path, report)
            if pixels is None:
                continue
            if pixels.ndim != 3 or pixels.shape[2] != 3:
                report(path, f"expected an RGB slice (pre-contrast, FLAIR, post-contrast), got {_describe_pixels(pixels)}")
                continue
            size = (pixels.shape[1], pixels.shape[0])  # (width, height) as image viewers give it
            if expected_size is None:
                expected_size, first_file = size, path
            elif size != expected_size:
                report(path, f"slice size {_size(size)} differs from {first_file.name if first_file else '?'} ({_size(expected_size)})")
                continue
            slices.append(pixels)
        if not slices or len(slices) != len(numbers):
            return {}  # something was reported: a partial stack would only hide it
        stack = np.stack(slices, axis=0)  # (K, rows, columns, RGB)
        affine = self._affine()
        volumes: dict[str, Volume] = {}
        for index, channel in enumerate(self.channel_names):
            array = np.ascontiguousarray(stack[..., index].transpose(2, 1, 0))  # → (columns, rows, K)
            volumes[channel] = Volume(array, affine, fresh_header(array, affine), folder)
        return volumes

    def read_label(self, case: SourceCase, report: Reporter) -> Volume | None:
        """The mask stack as a uint8 0/1 label map of the same (I, J, K) layout as the images."""
        if case.label_file is None:
            return None
        folder = _case_folder(case)
        files = _list_slice_files(folder)
        ok = True
        for number, paths in sorted(files.images.items()):
            if number not in files.masks:
                report(_mask_path(paths[0]), f"mask missing for slice {number}")
                ok = False
        for number, paths in sorted(files.masks.items()):
            if len(paths) > 1:
                report(paths[1], f"second mask for slice {number} (also {paths[0].name})")
                ok = False
            if number not in files.images:
                report(paths[0], f"mask without its image slice {number}")
                ok = False
        if not ok:
            return None
        masks: list[np.ndarray] = []
        expected_size: tuple[int, int] | None = None
        first_file: Path | None = None
        for number in sorted(files.masks):
            path = files.masks[number][0]
            mask = _read_mask(path, report)
            if mask is None:
                ok = False
                continue
            size = (mask.shape[1], mask.shape[0])
            if expected_size is None:
                expected_size, first_file = size, path
            elif size != expected_size:
                report(path, f"mask size {_size(size)} differs from {first_file.name if first_file else '?'} ({_size(expected_size)})")
                ok = False
                continue
            masks.append(mask)
        if not ok or not masks:
            return None
        array = np.ascontiguousarray(np.stack(masks, axis=0).transpose(2, 1, 0))  # (K, rows, cols) → (cols, rows, K)
        affine = self._affine()
        return Volume(array, affine, fresh_header(array, affine), folder)

    # -- helpers
    def _affine(self) -> np.ndarray:
        return np.diag([*self.voxel_spacing_mm, 1.0]).astype(np.float64)

    def _case_folders(self, src: Path) -> Iterator[Path]:
        for child in subfolders(src):
            if _is_case_folder(child):
                yield child
                continue
            for grandchild in subfolders(child):  # SRC may be the parent of kaggle_3m
                if _is_case_folder(grandchild):
                    yield grandchild

    def _case_from_folder(self, folder: Path) -> SourceCase:
        match = _CASE_FOLDER.match(folder.name)
        patient_id = match.group("patient") if match else folder.name
        has_masks = bool(_list_slice_files(folder).masks)
        return SourceCase(
            case_id=folder.name,
            patient_id=patient_id,
            # all three channels come from the same RGB slices: each "file" is the case folder
            channel_files={channel: folder for channel in self.channel_names},
            label_file=folder if has_masks else None,
            folder=folder,
        )


def _is_case_folder(folder: Path) -> bool:
    """A ``TCGA_<inst>_<patient>_<date>`` folder holding at least one slice TIFF."""
    if not _CASE_FOLDER.match(folder.name):
        return False
    return any(p.is_file() and _SLICE_FILE.match(p.name) for p in folder.iterdir())


def _case_folder(case: SourceCase) -> Path:
    return case.folder if case.folder is not None else next(iter(case.channel_files.values()))


def _list_slice_files(folder: Path) -> _SliceFiles:
    files = _SliceFiles()
    for path in sorted(folder.iterdir()):
        match = _SLICE_FILE.match(path.name)
        if match is None or not path.is_file() or path.name.startswith("."):
            continue
        target = files.masks if match.group("mask") else files.images
        target.setdefault(int(match.group("number")), []).append(path)
    return files


def _check_numbering(folder: Path, by_number: dict[int, list[Path]], report: Reporter) -> list[int]:
    """The slice numbers in numeric order; gaps (from 1 on) and numbers used twice are reported."""
    numbers = sorted(by_number)
    example = by_number[numbers[0]][0]
    stem = _SLICE_FILE.match(example.name).group("stem")  # type: ignore[union-attr]
    missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
    for number in missing:
        report(folder / f"{stem}_{number}{example.suffix}", f"slice {number} missing (gap in the slice numbers 1..{numbers[-1]})")
    for number in numbers:
        paths = by_number[number]
        if len(paths) > 1:
            report(paths[1], f"second file for slice {number} (also {paths[0].name})")
    return numbers


def _read_tiff(path: Path, report: Reporter) -> np.ndarray | None:
    """The pixels of a TIFF as an array (rows, columns[, samples]); unreadable → reported, None."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here rather than later
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report(path, f"cannot read TIFF ({type(exc).__name__}{': ' + detail if detail else ''})")
        return None


def _read_mask(path: Path, report: Reporter) -> np.ndarray | None:
    """A mask slice as uint8 0/1 (rows, columns); other values, or differing RGB channels, are reported."""
    pixels = _read_tiff(path, report)
    if pixels is None:
        return None
    if pixels.ndim == 3:  # a mask saved as RGB(A): usable only when its colour channels agree
        if pixels.shape[2] >= 3 and np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
            pixels = pixels[..., 0]
        else:
            report(path, f"expected a one-channel mask, got {_describe_pixels(pixels)}")
            return None
    values = {int(v) for v in np.unique(pixels)}
    if not any(values <= allowed for allowed in _MASK_VALUE_SETS):
        shown = sorted(values)[:8]
        report(path, f"mask values {shown}{' ...' if len(values) > 8 else ''} are not 0/255 (or 0/1)")
        return None
    return (pixels > 0).astype(np.uint8)


def _mask_path(image: Path) -> Path:
    return image.with_name(f"{image.stem}_mask{image.suffix}")


def _describe_pixels(pixels: np.ndarray) -> str:
    samples = 1 if pixels.ndim == 2 else pixels.shape[2]
    return f"{samples} channel(s) of {pixels.dtype}"


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"


