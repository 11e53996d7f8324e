"""The adapter contract: how a source layout tells ingest where its cases are and how to read them.

Ingest knows nothing about any particular layout. It asks an :class:`Adapter` for
:class:`SourceCase` objects (which file holds which channel, which holds the label, which patient a
case belongs to), for the channel, label and region definitions, and to read a case's volumes. The
default reading is one 3D NIfTI file per channel; layouts whose files are not like that (4D NIfTI,
TIFF slices, DICOM series) override :meth:`Adapter.read_images` / :meth:`Adapter.read_label`.

Supporting a new layout means writing one ``Adapter`` subclass in its own module of this package and
adding an instance to :data:`medseg.ingest.adapters.ADAPTERS`, nothing more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np

from medseg.errors import MedsegError
from medseg.io import load_nifti

Reporter = Callable[[Path | str, str], None]
"""``report(file, problem)``: records one problem row for the case being read."""

NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A volume as read: array (I, J, K) in the stored dtype, affine (RAS+ mm), header, source path."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    source: Path


@dataclass
class SourceCase:
    """One case as found in the source folder, before anything is read.

    ``channel_files`` maps every channel name the adapter declares to the file (or folder, for a DICOM
    series) expected for it; the file may be missing (validation reports it). ``label_file`` is None
    for an unlabelled case. For classification datasets ``class_label`` holds the case's class name
    and ``covariates`` extra per-subject values (age, sex) that a model may use.
    """

    case_id: str
    patient_id: str
    channel_files: dict[str, Path]
    label_file: Path | None = None
    folder: Path | None = None  # where the case was found, for messages (duplicates)
    class_label: str | None = None
    covariates: dict[str, Any] = field(default_factory=dict)
    # problems found while discovering the case (a CSV row without image, ...): (file, problem),
    # reported with the case's other problems by validation
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_label(self) -> bool:
        return self.label_file is not None or self.class_label is not None


class Adapter:
    """A source layout: how to recognise it, find its cases, read them, and what channels/labels mean.

    ``channel_names`` is in channel order (index 0 is written as ``CASE_0000``). ``labels`` maps label
    name to the value in the *canonical* (written) label maps; ``label_remap`` maps a source value to
    its canonical value (e.g. BraTS 2021's 4 → 3) and is applied before the labels are checked.
    ``task`` is ``"segmentation"`` or ``"classification"``; for classification ``labels`` maps class
    name → class index and no label map is read.

    Layouts whose definitions come from the source itself (a ``dataset.json``) override
    :meth:`configure`, which returns a copy of the adapter with the definitions filled in.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    task: str = "segmentation"
    channel_names: tuple[str, ...] = ()
    labels: dict[str, int] = {}
    regions: dict[str, list[int]] = {}
    label_remap: dict[int, int] = {}
    # dataset.json task fields (medseg.task.Task reads them): a stack of 2D slices along this voxel axis; the
    # covariates a classifier may take; the metric the task is judged by ("" = the task's default)
    slice_axis: ClassVar[int | None] = None
    covariates: tuple[str, ...] = ()
    primary_metric: ClassVar[str] = ""
    # True when the case ids of the source may identify a person (DICOM PatientID, subject codes):
    # ingest then writes pseudonymous ids (``--id-map`` keeps the mapping outside the dataset).
    pseudonymize_by_default: ClassVar[bool] = False

    def detect(self, src: Path) -> bool:
        """True when ``src`` looks like this layout (cheap: file names, at most one small file read)."""
        raise NotImplementedError

    def discover(self, src: Path) -> list[SourceCase]:
        """Every case of ``src``, sorted by case id; duplicates are kept (validation reports them)."""
        raise NotImplementedError

    def configure(self, src: Path) -> Adapter:
        """This adapter with definitions read from ``src`` (default: the class's own, unchanged)."""
        return self

    def dataset_fields(self, cases: list[SourceCase]) -> dict[str, Any]:
        """``dataset.json`` task fields that depend on the cases found (default: none), e.g. which official
        lesion-wise setting scores them."""
        return {}

    def with_definitions(self, **definitions: Any) -> Adapter:
        """A copy of this adapter whose channel/label/region definitions are replaced."""
        clone = copy.copy(self)
        for key, value in definitions.items():
            if not hasattr(clone, key):
                raise AttributeError(f"{type(self).__name__} has no definition {key!r}")
            setattr(clone, key, value)
        return clone

    # -- reading (override for layouts that are not one 3D NIfTI file per channel)
    def read_images(self, case: SourceCase, report: Reporter) -> dict[str, Volume]:
        """The channel volumes of ``case`` that could be read; problems go to ``report``."""
        images: dict[str, Volume] = {}
        for channel in self.channel_names:
            path = case.channel_files.get(channel)
            if path is None or not path.exists():
                report(path or f"{case.case_id}-{channel}", f"missing {channel} channel file")
                continue
            volume = read_nifti_volume(path, report)
            if volume is not None:
                images[channel] = volume
        return images

    def read_label(self, case: SourceCase, report: Reporter) -> Volume | None:
        """The label map of ``case`` in *source* values (remapping is ingest's job), or None."""
        if case.label_file is None:
            return None
        return read_nifti_volume(case.label_file, report)


def read_nifti_volume(path: Path, report: Reporter) -> Volume | None:
    """Read a 3D NIfTI file keeping its stored dtype; a problem is reported and gives None."""
    try:
        array, affine, header = load_nifti(path, dtype=None)  # type: ignore[arg-type]  # keep stored dtype
    except MedsegError as exc:
        report(path, problem_text(exc))
        return None
    if array.dtype == np.float64 and header.get_data_dtype() != np.float64:
        array = array.astype(np.float32)  # scaled integers: float32 is exact enough, half the size
    return Volume(array, affine, header, path)


def fresh_header(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Header:
    """A new NIfTI header for ``array`` in ``affine``: nothing of the source's own header carried over."""
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists."""
    for ending in NIFTI_ENDINGS:
        path = folder / f"{stem}{ending}"
        if path.is_file():
            return path
    return None


def strip_nifti_ending(name: str) -> str | None:
    """``name`` without ``.nii.gz`` / ``.nii``; None when it is not a NIfTI file name."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted (macOS ``._`` and dot folders skipped)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def problem_text(exc: MedsegError) -> str:
    """The message of ``exc`` without the path prefix (the file is in its own column)."""
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text
