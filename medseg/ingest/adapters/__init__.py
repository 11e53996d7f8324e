"""Source layouts, one module per family; :data:`ADAPTERS` is the registry ``--format`` chooses from."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.errors import MedsegError
from medseg.ingest.adapters.base import Adapter, Reporter, SourceCase, Volume, read_nifti_volume
from medseg.ingest.adapters.brats import BraTS2021Adapter, BraTS2023Adapter, BraTS2024Adapter
from medseg.ingest.adapters.classification import ClassificationAdapter
from medseg.ingest.adapters.dicom import DicomSeriesAdapter
from medseg.ingest.adapters.lgg import KaggleLGGAdapter
from medseg.ingest.adapters.msd import MSDAdapter
from medseg.ingest.adapters.nnunet_raw import NnUNetRawAdapter

logger = logging.getLogger(__name__)

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (
    BraTS2024Adapter(),
    BraTS2023Adapter(),
    BraTS2021Adapter(),
    MSDAdapter(),
    NnUNetRawAdapter(),
    KaggleLGGAdapter(),
    ClassificationAdapter(),
    DicomSeriesAdapter(),
)}
"""Known source layouts by name, in the order ``--format auto`` tries them (most specific first)."""


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


__all__ = [
    "ADAPTERS",
    "Adapter",
    "BraTS2021Adapter",
    "BraTS2023Adapter",
    "BraTS2024Adapter",
    "ClassificationAdapter",
    "DicomSeriesAdapter",
    "KaggleLGGAdapter",
    "MSDAdapter",
    "NnUNetRawAdapter",
    "Reporter",
    "SourceCase",
    "Volume",
    "detect_format",
    "get_adapter",
    "read_nifti_volume",
]
