"""BraTS challenge layouts: one folder per case, one NIfTI file per MRI sequence and one label map.

All BraTS datasets are written with the BraTS 2023 channel names (``t1n``, ``t1c``, ``t2w``, ``t2f``)
so a model trained on any of them answers the same inference contract. Label maps are written in the
BraTS 2023 values (1 NETC, 2 SNFH, 3 ET; BraTS 2024 adds 4 RC), so BraTS 2021's ET (4) becomes 3.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np

from medseg.errors import MedsegError
from medseg.ingest.adapters.base import Adapter, Reporter, SourceCase, Volume, find_nifti, subfolders
from medseg.io import load_nifti
from medseg.task import BRATS2023, BRATS2023_METS, BRATS2024

_TIMEPOINT = re.compile(r"^(?P<patient>.+)-(?P<timepoint>\d{3})$")
_METS_CASE_ID = re.compile(r"^BraTS-MET-\d{5}-\d{3}$")


class BraTS2023Adapter(Adapter):
    """BraTS 2023 (GLI, MEN, MET, PED, SSA): ``SRC/<CASE>/<CASE>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

    Case folders are looked for directly in ``SRC`` and one level below (the challenge archives unpack
    to e.g. ``SRC/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/<CASE>/``). A folder is a case when
    it holds at least one ``<folder name>-<t1n|t1c|t2w|t2f|seg>.nii[.gz]`` file. A case without
    ``-seg`` is unlabelled (test only). The patient id is the case id without its ``-NNN`` timepoint.
    """

    name: ClassVar[str] = "brats2023"
    description: ClassVar[str] = "BraTS 2023 GLI/MEN/MET/PED/SSA: <CASE>/<CASE>-{t1n,t1c,t2w,t2f,seg}.nii.gz"
    channel_names = BRATS2023.channels
    labels = BRATS2023.labels_dict()
    regions = BRATS2023.regions_dict()
    label_remap: dict[int, int] = {}
    # file-name suffix of each channel in the source, in ``channel_names`` order
    source_suffixes: ClassVar[tuple[str, ...]] = BRATS2023.channels
    label_suffix: ClassVar[str] = "seg"
    separator: ClassVar[str] = "-"

    def detect(self, src: Path) -> bool:
        return any(True for _ in self._case_folders(src))

    def discover(self, src: Path) -> list[SourceCase]:
        cases = [self._case_from_folder(folder) for folder in self._case_folders(src)]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    def dataset_fields(self, cases: list[SourceCase]) -> dict[str, object]:
        """Metastasis cases (``BraTS-MET-…``, every case) are scored with the official metastasis lesion-wise setting."""
        if cases and all(_METS_CASE_ID.match(c.case_id) for c in cases):
            return {"lesionwise": BRATS2023_METS.lesionwise}
        return {}

    def patient_of(self, case_id: str) -> str:
        """The patient id of a case id: BraTS 2023 drops the ``-NNN`` timepoint."""
        match = _TIMEPOINT.match(case_id)
        return match.group("patient") if match else case_id

    # -- helpers
    def _stem(self, folder: Path, suffix: str) -> str:
        return f"{folder.name}{self.separator}{suffix}"

    def _is_case_folder(self, folder: Path) -> bool:
        suffixes = (*self.source_suffixes, self.label_suffix)
        return any(find_nifti(folder, self._stem(folder, s)) is not None for s in suffixes)

    def _case_folders(self, src: Path) -> Iterator[Path]:
        for child in subfolders(src):
            if self._is_case_folder(child):
                yield child
                continue
            for grandchild in subfolders(child):
                if self._is_case_folder(grandchild):
                    yield grandchild

    def _case_from_folder(self, folder: Path) -> SourceCase:
        case_id = folder.name
        channel_files = {
            channel: find_nifti(folder, self._stem(folder, suffix)) or folder / f"{self._stem(folder, suffix)}.nii.gz"
            for channel, suffix in zip(self.channel_names, self.source_suffixes)
        }
        return SourceCase(
            case_id=case_id,
            patient_id=self.patient_of(case_id),
            channel_files=channel_files,
            label_file=find_nifti(folder, self._stem(folder, self.label_suffix)),
            folder=folder,
        )


# BraTS 2023+ case ids: BraTS-<sub-challenge>-<5-digit patient>-<3-digit timepoint>, e.g. BraTS-GLI-00005-101.
_BRATS2023_CASE_ID = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d{5})-\d{3}$")
# "2024" as a number of its own (not part of a case number such as BraTS-GLI-02024-000).
_YEAR_2024 = re.compile(r"(?<!\d)2024(?!\d)")


def brats2023_patient_id(case_id: str) -> str | None:
    """The patient of a BraTS 2023-style case id (``BraTS-GLI-00005-101`` → ``BraTS-GLI-00005``), else None.

    Stricter than :meth:`BraTS2023Adapter.patient_of` (which drops any ``-NNN``) so that layouts with
    arbitrary case ids (nnU-Net raw) only group cases into patients when the id is unmistakably BraTS.
    """
    match = _BRATS2023_CASE_ID.match(case_id)
    return match.group("patient") if match else None


def check_source_label_values(
    volume: Volume, source_values: tuple[int, ...], dataset: str, report: Reporter
) -> Volume | None:
    """``volume`` if its integer values are all in ``source_values``; otherwise report and give None.

    Validation allows the declared canonical values *and* the keys of ``label_remap``, so for a source
    whose remap target is itself a canonical value (BraTS 2021: 4 → 3) a stray source 3 would pass as
    "already remapped". The adapter knows its source convention, so it checks it here. Non-integer
    values are left to validation, which reports them with its own message.
    """
    array = volume.array
    values = np.unique(array)
    if array.dtype.kind == "f":
        values = values[values == np.round(values)]
    unknown = sorted({int(v) for v in values} - set(source_values))
    if unknown:
        report(
            volume.source,
            f"label values {unknown} outside the declared set {sorted(source_values)} of {dataset} source label maps",
        )
        return None
    return volume


class BraTS2021Adapter(BraTS2023Adapter):
    """BraTS 2021 (and 2018-2020): ``SRC/<CASE>/<CASE>_{t1,t1ce,t2,flair,seg}.nii.gz``.

    Channels are written with the 2023 names in 2023 order: ``t1n`` ← t1, ``t1c`` ← t1ce, ``t2w`` ← t2,
    ``t2f`` ← flair. Source labels are 1 NCR, 2 ED, 4 ET; ET is remapped 4 → 3 so the written labels and
    regions equal BraTS 2023's. A source label map holding 3 (unused in 2021, likely a 2023 map in the
    wrong folder) is reported, not silently taken as ET. Case folders are found as for 2023 (directly
    in ``SRC`` or one level below, e.g. ``SRC/BraTS2021_Training_Data/BraTS2021_00000/``). The patient
    id is the case id (one scan per patient in 2021).

    Detection asks for one case folder holding all four channel files: the suffixes (``_flair`` …)
    are common enough that a single matching file says little about the layout.
    """

    name: ClassVar[str] = "brats2021"
    description: ClassVar[str] = "BraTS 2021 (also 2018-2020): <CASE>/<CASE>_{t1,t1ce,t2,flair,seg}.nii.gz, ET 4 → 3"
    channel_names = BRATS2023.channels
    labels = BRATS2023.labels_dict()
    regions = BRATS2023.regions_dict()
    label_remap: dict[int, int] = {4: 3}
    # label values a BraTS 2021 source map may hold (before remapping): background, NCR, ED, ET
    source_label_values: ClassVar[tuple[int, ...]] = (0, 1, 2, 4)
    source_suffixes: ClassVar[tuple[str, ...]] = ("t1", "t1ce", "t2", "flair")
    label_suffix: ClassVar[str] = "seg"
    separator: ClassVar[str] = "_"

    def detect(self, src: Path) -> bool:
        return any(
            all(find_nifti(folder, self._stem(folder, s)) is not None for s in self.source_suffixes)
            for folder in self._case_folders(src)
        )

    def patient_of(self, case_id: str) -> str:
        """The patient id of a case id: the case id itself (BraTS 2021 has one scan per patient)."""
        return case_id

    def read_label(self, case: SourceCase, report: Reporter) -> Volume | None:
        volume = super().read_label(case, report)
        if volume is None:
            return None
        return check_source_label_values(volume, self.source_label_values, "BraTS 2021", report)


class BraTS2024Adapter(BraTS2023Adapter):
    """BraTS 2024 adult glioma post-treatment: the 2023 layout, plus label 4 resection cavity (RC).

    Labels: 1 NETC, 2 SNFH, 3 ET, 4 RC. Regions as the 2024 evaluation reports them: WT = {1, 2, 3}
    (RC is not tumour), TC = {1, 3}, NETC, SNFH, ET and RC on their own.

    File names equal BraTS 2023's, so detection needs more than the layout. ``SRC`` is taken as
    BraTS 2024 when it has the 2023 layout and either

    * the name of ``SRC`` or of a (non-case) folder directly inside it contains both "brats" (any
      case) and the number 2024, e.g. ``SRC/BraTS2024-BraTS-GLI-TrainingData/``; or
    * one of the first three label maps found holds the value 4 (these are read in full: a few MB each).

    The name rule is narrow on purpose: folders above ``SRC`` (workspaces, test folders) and dated
    names without "brats" (``scans_2024``) are not looked at, so a 2023 dataset is not silently given
    an RC label. A 2024 dataset that is missed falls to ``brats2023``, which reports every label map
    with RC as holding a value outside its labels: loud, fixed with ``--format brats2024``.
    """

    name: ClassVar[str] = "brats2024"
    description: ClassVar[str] = "BraTS 2024 post-treatment glioma: 2023 layout, labels NETC/SNFH/ET/RC (1-4)"
    channel_names = BRATS2024.channels
    labels = BRATS2024.labels_dict()
    regions = BRATS2024.regions_dict()
    label_remap: dict[int, int] = {}
    n_label_maps_probed: ClassVar[int] = 3

    def detect(self, src: Path) -> bool:
        if not super().detect(src):  # not the 2023 layout at all
            return False
        return self._named_2024(src) or self._labels_hold_rc(src)

    def dataset_fields(self, cases: list[SourceCase]) -> dict[str, object]:
        return {}  # the 2024 labels and regions select the 2024 lesion-wise setting

    def _named_2024(self, src: Path) -> bool:
        names = [Path(src).resolve().name]
        names += [child.name for child in subfolders(src) if not self._is_case_folder(child)]
        return any("brats" in name.lower() and _YEAR_2024.search(name) for name in names)

    def _labels_hold_rc(self, src: Path) -> bool:
        probed = 0
        for folder in self._case_folders(src):
            label_file = find_nifti(folder, self._stem(folder, self.label_suffix))
            if label_file is None:
                continue
            probed += 1
            try:
                array, _, _ = load_nifti(label_file, dtype=None)  # type: ignore[arg-type]  # keep stored dtype
            except MedsegError:
                pass  # unreadable: validation will report it; detection just looks at the next one
            else:
                if bool((array == 4).any()):
                    return True
            if probed >= self.n_label_maps_probed:
                break
        return False
