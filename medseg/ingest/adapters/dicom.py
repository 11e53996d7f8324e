"""DICOM series: one folder per case, one series per channel, optional NIfTI label beside them.

Layout::

    SRC/<CASE>/<channel>/*.dcm          one sub-folder per channel, each one series (multi-channel)
    SRC/<CASE>/*.dcm                    or the series directly in the case folder (one channel, "image")
    SRC/<CASE>/seg.nii.gz               optional label map (or label.nii.gz / .nii) in the series' grid

DICOM files are ``*.dcm`` / ``*.ima`` or files without an extension (scanner exports often name
files by number or by UID, e.g. ``IM0001`` or ``1.2.840.113619.2.55.3.1``). DICOM-SEG label objects
and RT-STRUCT contours are out of scope: convert them to a NIfTI label map first.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.ingest.adapters.base import Adapter, Reporter, SourceCase, Volume, find_nifti, read_nifti_volume, subfolders, fresh_header

SINGLE_CHANNEL_NAME = "image"  # channel name of a case whose series lies directly in its folder
LABEL_STEMS = ("seg", "label")  # ``<stem>.nii.gz`` / ``.nii`` in the case folder
_DICOM_SUFFIXES = {".dcm", ".ima", ".dicom"}
_GEOMETRY_TAGS = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient axes (L, P, S) → NIfTI (R, A, S)


@dataclass
class _Slice:
    """One DICOM image of a series: its file, geometry and rescaled-on-demand pixels."""

    path: Path
    orientation: np.ndarray  # (6,) row cosine then column cosine, LPS
    position: np.ndarray  # (3,) ImagePositionPatient, LPS mm: centre of the first transmitted pixel
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm, as DICOM orders them
    size: tuple[int, int]  # (Rows, Columns)
    dataset: Any  # pydicom Dataset, pixels not decoded yet


class DicomSeriesAdapter(Adapter):
    """DICOM series read with pydicom, one folder per case, one sub-folder (series) per channel.

    Channels: the sub-folder names, sorted, which must be the same set in every case (the set found in
    most cases is the dataset's; other cases get a problem row), or ``image`` when the series lies
    directly in the case folder. ``DicomSeriesAdapter(channel_names=(...))`` fixes them instead.
    Labels: given as ``labels=``, or the values found in the label files (``background`` for 0,
    ``label_<v>`` for the others).

    Reading: slices are sorted along the slice normal (row cosine × column cosine, dotted with
    ImagePositionPatient), RescaleSlope/Intercept applied per slice (integer result kept as int16/int32,
    otherwise float32). The array is (I, J, K) = (column, row, slice) and the affine maps it to RAS+ mm::

        world_LPS(i, j, k) = IPP_0 + i·Δc·row_cosine + j·Δr·column_cosine + k·step
        affine = diag(-1, -1, 1, 1) @ [[row_cosine·Δc, column_cosine·Δr, step, IPP_0], [0, 0, 0, 1]]

    with (Δr, Δc) = PixelSpacing and ``step`` the mean difference of consecutive positions (so a
    gantry tilt gives a sheared affine rather than misplaced slices).

    De-identification: only pixels and geometry are taken from the DICOM files; the NIfTI headers are
    built from scratch. Cases of one patient are grouped by PatientID, but the id is kept only as a
    salted hash (:attr:`patient_id_salt`), and ``pseudonymize_by_default`` makes ingest replace case
    and patient ids by pseudonyms. The hash groups cases; it is not anonymisation by itself (a short
    PatientID can be guessed by trying values), so keep pseudonymisation on.

    Problems reported (naming the file): unreadable or non-DICOM file, missing geometry tags,
    multi-frame or colour images, files of several series in one folder, orientation / size / pixel
    spacing differing within a series, duplicate slice positions, non-uniform slice spacing, channel
    folders differing from the dataset's.
    """

    name: ClassVar[str] = "dicom"
    description: ClassVar[str] = "DICOM series: <CASE>/<channel>/*.dcm (or <CASE>/*.dcm), optional <CASE>/seg.nii.gz"
    pseudonymize_by_default: ClassVar[bool] = True
    # orientation cosines may differ by this much within a series (rounding in the header strings)
    orientation_tolerance: ClassVar[float] = 1e-4
    # slice steps may differ from the mean step by max(this, 1 % of the step) mm
    slice_spacing_tolerance_mm: ClassVar[float] = 0.01
    # fixed, public salt: the hash only hides PatientID from casual reading of the manifest
    patient_id_salt: ClassVar[str] = "medseg-dicom-patient"

    def __init__(self, channel_names: Sequence[str] | None = None, labels: dict[str, int] | None = None):
        self.channel_names = tuple(channel_names) if channel_names else ()
        self.labels = dict(labels) if labels else {}
        self.regions = {}
        self.label_remap = {}
        self._fixed_channels = bool(channel_names)
        self._fixed_labels = bool(labels)

    def detect(self, src: Path) -> bool:
        for case_folder in subfolders(src):
            if _first_dicom(case_folder) is not None:
                return True
            if any(_first_dicom(channel) is not None for channel in subfolders(case_folder)):
                return True
        return False

    def configure(self, src: Path) -> DicomSeriesAdapter:
        """Channels from the case folders' layout, labels from the label files (unless given)."""
        definitions: dict[str, Any] = {}
        folders = list(self._case_folders(src))
        if not self._fixed_channels:
            layouts = Counter(_channel_layout(folder) for folder in folders)
            definitions["channel_names"] = layouts.most_common(1)[0][0] if layouts else ()
        if not self._fixed_labels:
            definitions["labels"] = _labels_found(folders)
        return self.with_definitions(**definitions) if definitions else self  # type: ignore[return-value]

    def discover(self, src: Path) -> list[SourceCase]:
        cases = [self._case_from_folder(folder) for folder in self._case_folders(src)]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    # -- reading
    def read_images(self, case: SourceCase, report: Reporter) -> dict[str, Volume]:
        folder = _case_folder(case)
        found = set(_channel_layout(folder))
        if found == {SINGLE_CHANNEL_NAME} and self.channel_names != (SINGLE_CHANNEL_NAME,):
            report(folder, f"the series lies directly in the case folder, but the dataset's channels are "
                           f"sub-folders {list(self.channel_names)}")
        else:
            for extra in sorted(found - set(self.channel_names)):
                report(folder / extra, f"channel folder {extra!r} is not one of the dataset's channels "
                                       f"{list(self.channel_names)} (every case needs the same channel folders)")
        images: dict[str, Volume] = {}
        for channel in self.channel_names:
            series = case.channel_files.get(channel)
            if series is None or channel not in found:
                report(series or folder / channel, f"missing {channel} channel series")
                continue
            volume = self.read_series(series, report)
            if volume is not None:
                images[channel] = volume
        return images

    def read_series(self, folder: Path, report: Reporter) -> Volume | None:
        """One DICOM series folder as a Volume (I, J, K) = (column, row, slice) in RAS+ mm; None on problems."""
        files = _dicom_candidates(folder)
        if not files:
            report(folder, "no DICOM files found")
            return None
        slices = [s for s in (self._read_slice(path, report) for path in files) if s is not None]
        if len(slices) != len(files) or not self._consistent(slices, report):
            return None
        row_cosine, column_cosine = slices[0].orientation[:3], slices[0].orientation[3:]
        normal = np.cross(row_cosine, column_cosine)
        slices.sort(key=lambda s: float(normal @ s.position))
        step = self._slice_step(slices, normal, report)
        if step is None:
            return None
        pixels = _rescaled_stack(slices, report)
        if pixels is None:
            return None
        row_spacing, column_spacing = slices[0].pixel_spacing
        lps = np.eye(4)
        lps[:3, 0] = row_cosine * column_spacing  # i = column index: moves along a row
        lps[:3, 1] = column_cosine * row_spacing  # j = row index: moves down a column
        lps[:3, 2] = step
        lps[:3, 3] = slices[0].position
        affine = _LPS_TO_RAS @ lps
        return Volume(pixels, affine, fresh_header(pixels, affine), folder)

    # -- helpers
    def _case_folders(self, src: Path) -> list[Path]:
        return [f for f in subfolders(src) if _channel_layout(f)]

    def _case_from_folder(self, folder: Path) -> SourceCase:
        layout = _channel_layout(folder)
        channel_files = {
            channel: folder if channel == SINGLE_CHANNEL_NAME and layout == (SINGLE_CHANNEL_NAME,) else folder / channel
            for channel in (self.channel_names or layout)
        }
        label = next((p for p in (find_nifti(folder, stem) for stem in LABEL_STEMS) if p is not None), None)
        return SourceCase(
            case_id=folder.name,
            patient_id=self._patient_key(folder),
            channel_files=channel_files,
            label_file=label,
            folder=folder,
        )

    def _patient_key(self, folder: Path) -> str:
        """Salted hash of the PatientID of the case's first DICOM file; the case id when there is none."""
        first = _first_dicom(folder) or next(
            (f for f in (_first_dicom(c) for c in subfolders(folder)) if f is not None), None
        )
        patient = None
        if first is not None:
            try:
                patient = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", "") or "")
            except Exception:  # noqa: BLE001 - unreadable files are reported when the series is read
                patient = None
        if not patient:
            return folder.name
        return "pid-" + hashlib.sha256(f"{self.patient_id_salt}:{patient}".encode()).hexdigest()[:16]

    def _read_slice(self, path: Path, report: Reporter) -> _Slice | None:
        try:
            with warnings.catch_warnings():
                # pydicom warns about damaged files and reads on; the checks below turn damage into problem rows
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(path)
        except InvalidDicomError:
            report(path, "not a DICOM file (no DICM header)")
            return None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for corrupt files; one row each
            report(path, f"cannot read DICOM ({type(exc).__name__}: {exc})")
            return None
        missing = [tag for tag in (*_GEOMETRY_TAGS, "PixelData") if dataset.get(tag) in (None, "")]
        if missing:
            report(path, f"missing DICOM tag(s) {', '.join(missing)}")
            return None
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            report(path, "multi-frame (enhanced) DICOM is not supported: export single-frame images")
            return None
        if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
            report(path, f"colour image ({dataset.get('PhotometricInterpretation', '?')}): expected grey values")
            return None
        try:
            orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient], dtype=np.float64)
            position = np.asarray([float(v) for v in dataset.ImagePositionPatient], dtype=np.float64)
            spacing = tuple(float(v) for v in dataset.PixelSpacing)
        except (TypeError, ValueError) as exc:
            report(path, f"unreadable geometry tags ({exc})")
            return None
        if orientation.shape != (6,) or position.shape != (3,) or len(spacing) != 2:
            report(path, "geometry tags have the wrong number of values "
                         f"(ImageOrientationPatient {orientation.size}/6, ImagePositionPatient {position.size}/3, "
                         f"PixelSpacing {len(spacing)}/2)")
            return None
        if not (np.isfinite(orientation).all() and np.isfinite(position).all() and all(v > 0 for v in spacing)):
            report(path, "geometry tags hold non-finite values or a non-positive pixel spacing")
            return None
        row, column = orientation[:3], orientation[3:]
        if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
            report(path, f"ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors")
            return None
        return _Slice(path, orientation, position, (spacing[0], spacing[1]), (int(dataset.Rows), int(dataset.Columns)), dataset)

    def _consistent(self, slices: list[_Slice], report: Reporter) -> bool:
        """One series, same orientation, size and pixel spacing in every slice (compared with the first)."""
        first = slices[0]
        first_series = first.dataset.get("SeriesInstanceUID")
        ok = True
        for s in slices[1:]:
            series = s.dataset.get("SeriesInstanceUID")
            if first_series and series and series != first_series:
                report(s.path, f"belongs to another series than {first.path.name} (SeriesInstanceUID differs): "
                               "put one series per folder")
                ok = False
                continue
            if np.max(np.abs(s.orientation - first.orientation)) > self.orientation_tolerance:
                report(s.path, f"orientation differs from {first.path.name} (mixed orientations in one series)")
                ok = False
            if s.size != first.size:
                report(s.path, f"size {s.size[1]}×{s.size[0]} differs from {first.path.name} ({first.size[1]}×{first.size[0]})")
                ok = False
            if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=0, atol=1e-4):
                report(s.path, f"pixel spacing {list(s.pixel_spacing)} differs from {first.path.name} ({list(first.pixel_spacing)})")
                ok = False
        return ok

    def _slice_step(self, slices: list[_Slice], normal: np.ndarray, report: Reporter) -> np.ndarray | None:
        """The mean vector between consecutive slice positions (LPS mm); duplicates and gaps reported."""
        if len(slices) == 1:
            dataset = slices[0].dataset
            thickness = float(dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0)
            return normal * thickness
        positions = np.stack([s.position for s in slices])
        steps = np.diff(positions, axis=0)  # (K-1, 3)
        along_normal = steps @ normal
        ok = True
        for index in np.flatnonzero(along_normal < 1e-3):  # sorted, so "not positive" means "same place"
            report(slices[index + 1].path, f"duplicate slice position: same place as {slices[index].path.name} "
                                           f"({float(normal @ slices[index].position):.3f} mm along the slice normal)")
            ok = False
        if not ok:
            return None
        mean_step = (positions[-1] - positions[0]) / (len(slices) - 1)
        tolerance = max(self.slice_spacing_tolerance_mm, 0.01 * float(np.linalg.norm(mean_step)))
        deviation = np.linalg.norm(steps - mean_step, axis=1)
        for index in np.flatnonzero(deviation > tolerance):
            report(slices[index + 1].path, f"non-uniform slice spacing: {float(along_normal[index]):.3f} mm from "
                                           f"{slices[index].path.name}, the series' mean step is "
                                           f"{float(mean_step @ normal):.3f} mm (tolerance {tolerance:.3g} mm)")
            ok = False
        return mean_step if ok else None


def _case_folder(case: SourceCase) -> Path:
    """The case folder (``folder`` as discovered; else the one holding the first series)."""
    if case.folder is not None:
        return case.folder
    first = next(iter(case.channel_files.values()))
    return first if _first_dicom(first) is not None else first.parent


def _is_dicom_name(path: Path) -> bool:
    """Could ``path`` be a DICOM file by its name: ``.dcm``-like, no extension, or a UID-like name."""
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    suffix = path.suffix.lower()
    return suffix in _DICOM_SUFFIXES or suffix == "" or suffix[1:].isdigit()


def _dicom_candidates(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_dicom_name(p))


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _first_dicom(folder: Path) -> Path | None:
    """The first file of ``folder`` that looks like DICOM (name and DICM marker), or None."""
    for path in _dicom_candidates(folder):
        if _has_dicom_preamble(path):
            return path
    return None


def _channel_layout(folder: Path) -> tuple[str, ...]:
    """The channels a case folder holds: its DICOM sub-folders (sorted), else ``("image",)``, else ()."""
    channels = tuple(sub.name for sub in subfolders(folder) if _first_dicom(sub) is not None)
    if channels:
        return channels
    return (SINGLE_CHANNEL_NAME,) if _first_dicom(folder) is not None else ()


def _labels_found(folders: list[Path]) -> dict[str, int]:
    """``background`` plus ``label_<v>`` for every other value in the cases' label files (unreadable ones skipped)."""
    values: set[int] = {0}
    for folder in folders:
        path = next((p for p in (find_nifti(folder, stem) for stem in LABEL_STEMS) if p is not None), None)
        if path is None:
            continue
        volume = read_nifti_volume(path, lambda *_: None)  # problems are reported when the case is read
        if volume is None:
            continue
        array = volume.array
        if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
            continue  # non-integer labels: reported by validation
        values.update(int(v) for v in np.unique(array))
    return {("background" if v == 0 else f"label_{v}"): v for v in sorted(values)}


def _rescaled_stack(slices: list[_Slice], report: Reporter) -> np.ndarray | None:
    """The slices' pixels with RescaleSlope/Intercept applied, as (column, row, slice)."""
    planes: list[np.ndarray] = []
    integral = True
    for s in slices:
        try:
            raw = s.dataset.pixel_array
        except Exception as exc:  # noqa: BLE001 - truncated pixels, or a compressed transfer syntax without its decoder
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            report(s.path, f"cannot decode pixel data ({type(exc).__name__}: {detail})")
            return None
        slope = float(s.dataset.get("RescaleSlope", 1) or 1)
        intercept = float(s.dataset.get("RescaleIntercept", 0) or 0)
        integral = integral and slope.is_integer() and intercept.is_integer()
        planes.append(raw.astype(np.float64) * slope + intercept)
    stack = np.stack([p.T for p in planes], axis=-1)  # each plane (rows, columns) → (columns, rows)
    if integral:
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if stack.min() >= info.min and stack.max() <= info.max:
                return stack.astype(dtype)
    return stack.astype(np.float32)



