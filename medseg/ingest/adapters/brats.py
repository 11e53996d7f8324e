"""BraTS challenge layouts: one folder per case, one NIfTI file per MRI sequence and one label map.

All BraTS datasets are written with the BraTS 2023 channel names (``t1n``, ``t1c``, ``t2w``, ``t2f``)
so a model trained on any of them answers the same inference contract.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from medseg.ingest.adapters.base import Adapter, SourceCase, find_nifti, subfolders
from medseg.schemas import BRATS_CHANNELS, BRATS_LABELS, BRATS_REGIONS

_TIMEPOINT = re.compile(r"^(?P<patient>.+)-(?P<timepoint>\d{3})$")


class BraTS2023Adapter(Adapter):
    """BraTS 2023 (GLI, MEN, MET, PED, SSA): ``SRC/<CASE>/<CASE>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

    Case folders are looked for directly in ``SRC`` and one level below (the challenge archives unpack
    to e.g. ``SRC/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/<CASE>/``). A folder is a case when
    it holds at least one ``<folder name>-<t1n|t1c|t2w|t2f|seg>.nii[.gz]`` file. A case without
    ``-seg`` is unlabelled (test only). The patient id is the case id without its ``-NNN`` timepoint.
    """

    name: ClassVar[str] = "brats2023"
    description: ClassVar[str] = "BraTS 2023 GLI/MEN/MET/PED/SSA: <CASE>/<CASE>-{t1n,t1c,t2w,t2f,seg}.nii.gz"
    channel_names = BRATS_CHANNELS
    labels = dict(BRATS_LABELS)
    regions = {k: list(v) for k, v in BRATS_REGIONS.items()}
    label_remap: dict[int, int] = {}
    # file-name suffix of each channel in the source, in ``channel_names`` order
    source_suffixes: ClassVar[tuple[str, ...]] = BRATS_CHANNELS
    label_suffix: ClassVar[str] = "seg"
    separator: ClassVar[str] = "-"

    def detect(self, src: Path) -> bool:
        return any(True for _ in self._case_folders(src))

    def discover(self, src: Path) -> list[SourceCase]:
        cases = [self._case_from_folder(folder) for folder in self._case_folders(src)]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

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
