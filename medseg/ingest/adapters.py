"""Source layouts: each one is an :class:`Adapter` that finds the cases of a folder.

Ingest knows nothing about any particular layout; it asks an adapter for :class:`SourceCase` objects
(which file holds which channel, which holds the label, which patient a case belongs to) and for the
label and region definitions. Supporting a new layout (BraTS 2021, Medical Segmentation Decathlon, ...)
means writing one ``Adapter`` subclass and adding an instance to :data:`ADAPTERS`, nothing more.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from medseg.errors import MedsegError
from medseg.schemas import BRATS_CHANNELS, BRATS_LABELS, BRATS_REGIONS

logger = logging.getLogger(__name__)


@dataclass
class SourceCase:
    """One case as found in the source folder, before anything is read.

    ``channel_files`` maps every channel name the adapter declares to the file expected for it; the
    file may be missing (validation reports it). ``label_file`` is None for an unlabelled case.
    """

    case_id: str
    patient_id: str
    channel_files: dict[str, Path]
    label_file: Path | None = None
    folder: Path | None = None  # where the case was found, for messages (duplicates)

    @property
    def has_label(self) -> bool:
        return self.label_file is not None


class Adapter:
    """A source layout: how to recognise it, find its cases, and what its channels and labels mean.

    ``channel_names`` is in channel order (index 0 is written as ``CASE_0000``). ``labels`` maps label
    name to the value in the *canonical* (written) label maps; ``label_remap`` maps a source value to
    its canonical value (e.g. BraTS 2021's 4 → 3) and is applied before the labels are checked.
    """

    name: ClassVar[str] = ""
    channel_names: ClassVar[tuple[str, ...]] = ()
    labels: ClassVar[dict[str, int]] = {}
    regions: ClassVar[dict[str, list[int]]] = {}
    label_remap: ClassVar[dict[int, int]] = {}

    def detect(self, src: Path) -> bool:
        """True when ``src`` looks like this layout (cheap: file names only, nothing is read)."""
        raise NotImplementedError

    def discover(self, src: Path) -> list[SourceCase]:
        """Every case of ``src``, sorted by case id; duplicates are kept (validation reports them)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- BraTS 2023
_NIFTI_ENDINGS = (".nii.gz", ".nii")
_TIMEPOINT = re.compile(r"^(?P<patient>.+)-(?P<timepoint>\d{3})$")


class BraTS2023Adapter(Adapter):
    """BraTS 2023 (GLI, MEN, MET, PED, SSA): ``SRC/<CASE>/<CASE>-{t1n,t1c,t2w,t2f,seg}.nii.gz``.

    Case folders are looked for directly in ``SRC`` and one level below (the challenge archives unpack
    to e.g. ``SRC/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData/<CASE>/``). A folder is a case when
    it holds at least one ``<folder name>-<t1n|t1c|t2w|t2f|seg>.nii[.gz]`` file. A case without
    ``-seg`` is unlabelled (test only). The patient id is the case id without its ``-NNN`` timepoint.
    """

    name: ClassVar[str] = "brats2023"
    channel_names: ClassVar[tuple[str, ...]] = BRATS_CHANNELS
    labels: ClassVar[dict[str, int]] = dict(BRATS_LABELS)
    regions: ClassVar[dict[str, list[int]]] = {k: list(v) for k, v in BRATS_REGIONS.items()}
    label_remap: ClassVar[dict[int, int]] = {}
    label_suffix: ClassVar[str] = "seg"

    def detect(self, src: Path) -> bool:
        return any(True for _ in self._case_folders(src))

    def discover(self, src: Path) -> list[SourceCase]:
        cases = [self._case_from_folder(folder) for folder in self._case_folders(src)]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    # -- helpers
    def _suffixes(self) -> tuple[str, ...]:
        return (*self.channel_names, self.label_suffix)

    def _is_case_folder(self, folder: Path) -> bool:
        return any(self._find_file(folder, suffix) is not None for suffix in self._suffixes())

    def _case_folders(self, src: Path) -> Iterator[Path]:
        if not src.is_dir():
            return
        for child in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if self._is_case_folder(child):
                yield child
                continue
            for grandchild in sorted(p for p in child.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if self._is_case_folder(grandchild):
                    yield grandchild

    @staticmethod
    def _find_file(folder: Path, suffix: str) -> Path | None:
        for ending in _NIFTI_ENDINGS:
            path = folder / f"{folder.name}-{suffix}{ending}"
            if path.is_file():
                return path
        return None

    def _case_from_folder(self, folder: Path) -> SourceCase:
        case_id = folder.name
        match = _TIMEPOINT.match(case_id)
        patient_id = match.group("patient") if match else case_id
        channel_files = {
            channel: self._find_file(folder, channel) or folder / f"{case_id}-{channel}.nii.gz"
            for channel in self.channel_names
        }
        return SourceCase(
            case_id=case_id,
            patient_id=patient_id,
            channel_files=channel_files,
            label_file=self._find_file(folder, self.label_suffix),
            folder=folder,
        )


# --------------------------------------------------------------------------- registry
ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (BraTS2023Adapter(),)}
"""Known source layouts by name, in the order ``--format auto`` tries them."""


def get_adapter(fmt: str) -> Adapter:
    """The adapter called ``fmt``; MedsegError listing the known ones otherwise."""
    try:
        return ADAPTERS[fmt]
    except KeyError:
        raise MedsegError(f"unknown source format {fmt!r} (known: {', '.join(ADAPTERS)})") from None


def detect_format(src: Path) -> Adapter:
    """The first adapter whose ``detect`` accepts ``src`` (for ``--format auto``); logs its choice."""
    src = Path(src)
    matching = [adapter for adapter in ADAPTERS.values() if adapter.detect(src)]
    if not matching:
        raise MedsegError(
            f"cannot tell the source layout: no known format matches (known: {', '.join(ADAPTERS)}); "
            "check the folder or pass --format",
            src,
        )
    chosen = matching[0]
    also = f" (also matching: {', '.join(a.name for a in matching[1:])})" if len(matching) > 1 else ""
    logger.info("source format: %s (auto-detected)%s", chosen.name, also)
    return chosen
