"""nnU-Net v2 raw datasets: ``DatasetXXX_Name/{dataset.json, imagesTr/, labelsTr/, imagesTs/}``.

The canonical layout *is* nnU-Net v2 raw, so this adapter passes a dataset through, validating every
file on the way (and re-saving it, which clears free-text header fields). Also holds the helpers for
finding a dataset folder by its ``dataset.json``, shared with the Medical Segmentation Decathlon
adapter (:mod:`medseg.ingest.adapters.msd`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from medseg.errors import MedsegError
from medseg.ingest.adapters.base import NIFTI_ENDINGS, Adapter, Reporter, SourceCase, Volume, subfolders
from medseg.ingest.adapters.brats import brats2023_patient_id
from medseg.io import read_json
from medseg.schemas import DATASET_JSON, IMAGES_TR, IMAGES_TS, LABELS_TR

logger = logging.getLogger(__name__)

DatasetJsonTest = Callable[[dict[str, Any]], bool]


# --------------------------------------------------------------------------- finding the dataset folder
def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None (unreadable files are logged: detection must not raise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("%s: not readable as JSON (%s); ignored when detecting the source layout", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _is_dataset_folder(folder: Path, accepts: DatasetJsonTest) -> bool:
    if not (folder / DATASET_JSON).is_file():
        return False
    if not ((folder / IMAGES_TR).is_dir() or (folder / IMAGES_TS).is_dir()):
        return False
    data = _json_object(folder / DATASET_JSON)
    return data is not None and accepts(data)


def dataset_folders(src: Path, accepts: DatasetJsonTest) -> list[Path]:
    """Dataset folders for ``src``: ``src`` itself, else its sub-folders, that hold ``imagesTr/`` (or
    ``imagesTs/``) and a ``dataset.json`` for which ``accepts(content)`` is true."""
    src = Path(src)
    if _is_dataset_folder(src, accepts):
        return [src]
    return [child for child in subfolders(src) if _is_dataset_folder(child, accepts)]


def dataset_folder(src: Path, accepts: DatasetJsonTest, what: str) -> Path:
    """The one dataset folder of ``src`` (see :func:`dataset_folders`); MedsegError if none or several."""
    found = dataset_folders(src, accepts)
    if not found:
        raise MedsegError(f"no {what} dataset here: expected a dataset.json beside imagesTr/ (in this folder or one below)", src)
    if len(found) > 1:
        names = ", ".join(folder.name for folder in found)
        raise MedsegError(f"several {what} datasets here ({names}); pass one of them as the source", src)
    return found[0]


def visible_files(folder: Path) -> list[Path]:
    """Files of ``folder``, sorted; hidden files and macOS ``._*`` resource forks are skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def is_int(value: Any) -> bool:
    """True for a JSON integer (bool is an int in Python, but not a label value)."""
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- the adapter
def _is_nnunet_v2_json(data: dict[str, Any]) -> bool:
    return "channel_names" in data and "labels" in data


class NnUNetRawAdapter(Adapter):
    """nnU-Net v2 raw: ``SRC/{dataset.json, imagesTr/CASE_XXXX.nii.gz, labelsTr/CASE.nii.gz, imagesTs/}``.

    ``SRC`` is the dataset folder or holds exactly one (e.g. ``SRC/Dataset137_BraTS2021/``).
    :meth:`configure` reads ``dataset.json``:

    * ``channel_names`` (``{"0": "T2", "1": "ADC"}``) gives the channels, in index order;
    * ``labels`` maps a name to an integer value, or, in region-based datasets, to a list of values
      (``"whole tumor": [1, 2, 3]``). Lists become ``regions``; integers the ``labels``. Label values
      used by a region but not named by an integer entry are named ``label_<value>``;
    * ``file_ending`` must be ``.nii.gz`` or ``.nii``: only NIfTI is ingested.

    Cases are the ids found in ``imagesTr`` (``CASE_0000.nii.gz`` …) and ``labelsTr``; every case of
    ``imagesTr`` expects every channel file and its label (missing ones are reported), ``imagesTs``
    cases are unlabelled. The patient id is the case id, or for BraTS 2023-style ids
    (``BraTS-GLI-00005-101``) the id without its timepoint.
    """

    name: ClassVar[str] = "nnunet"
    description: ClassVar[str] = "nnU-Net v2 raw: dataset.json + imagesTr/CASE_XXXX.nii.gz + labelsTr/CASE.nii.gz"
    file_ending: str = ".nii.gz"

    def detect(self, src: Path) -> bool:
        return bool(dataset_folders(src, _is_nnunet_v2_json))

    def configure(self, src: Path) -> NnUNetRawAdapter:
        path = dataset_folder(src, _is_nnunet_v2_json, "nnU-Net v2 raw") / DATASET_JSON
        data = read_json(path)
        file_ending = data.get("file_ending", ".nii.gz")
        if file_ending not in NIFTI_ENDINGS:
            raise MedsegError(
                f"file_ending {file_ending!r} is not supported: only NIfTI ({', '.join(NIFTI_ENDINGS)}) can be ingested", path
            )
        labels, regions = parse_nnunet_labels(data.get("labels"), path)
        clone = self.with_definitions(
            channel_names=parse_channel_names(data.get("channel_names"), path, "channel_names"),
            labels=labels,
            regions=regions,
            label_remap={},
            file_ending=file_ending,
        )
        return clone  # type: ignore[return-value]

    def discover(self, src: Path) -> list[SourceCase]:
        adapter = self if self.channel_names else self.configure(src)
        return adapter._discover(dataset_folder(src, _is_nnunet_v2_json, "nnU-Net v2 raw"))

    def read_label(self, case: SourceCase, report: Reporter) -> Volume | None:
        if case.label_file is not None and not case.label_file.exists():
            report(case.label_file, f"missing label file (the case has images in {IMAGES_TR})")
            return None
        return super().read_label(case, report)

    # -- helpers
    def _discover(self, root: Path) -> list[SourceCase]:
        ending = self.file_ending
        image_name = re.compile(rf"^(?P<case>.+)_(?P<index>\d{{4}}){re.escape(ending)}$")
        n_channels = len(self.channel_names)

        def image_cases(folder: Path) -> set[str]:
            ids: set[str] = set()
            for path in visible_files(folder):
                match = image_name.match(path.name)
                if match is None or int(match.group("index")) >= n_channels:
                    logger.warning("%s: not a %s_XXXX%s file of channel 0..%d; ignored", path, "CASE", ending, n_channels - 1)
                    continue
                ids.add(match.group("case"))
            return ids

        training = image_cases(root / IMAGES_TR)
        training |= {p.name[: -len(ending)] for p in visible_files(root / LABELS_TR) if p.name.endswith(ending)}
        cases = [self._case(root / IMAGES_TR, case_id, root / LABELS_TR / f"{case_id}{ending}") for case_id in training]
        cases += [self._case(root / IMAGES_TS, case_id, None) for case_id in image_cases(root / IMAGES_TS)]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    def _case(self, folder: Path, case_id: str, label_file: Path | None) -> SourceCase:
        return SourceCase(
            case_id=case_id,
            patient_id=brats2023_patient_id(case_id) or case_id,
            channel_files={
                channel: folder / f"{case_id}_{index:04d}{self.file_ending}" for index, channel in enumerate(self.channel_names)
            },
            label_file=label_file,
            folder=folder,
        )


# --------------------------------------------------------------------------- dataset.json parsing
def parse_channel_names(value: Any, path: Path, key: str) -> tuple[str, ...]:
    """Channel names in index order from ``{"0": name, "1": name, ...}`` (nnU-Net ``channel_names``,
    MSD ``modality``); MedsegError naming ``path`` when keys are not 0..N-1 or names repeat."""
    if not isinstance(value, dict) or not value:
        raise MedsegError(f"{key!r} must be a non-empty object {{\"0\": name, ...}}, got {value!r}", path)
    if sorted(value) != [str(i) for i in range(len(value))]:
        raise MedsegError(f"{key!r} keys must be 0..{len(value) - 1}, got {sorted(value)}", path)
    names = tuple(str(value[str(i)]) for i in range(len(value)))
    if len(set(names)) != len(names):
        raise MedsegError(f"{key!r} repeats a name: {list(names)}", path)
    return names


def parse_nnunet_labels(value: Any, path: Path) -> tuple[dict[str, int], dict[str, list[int]]]:
    """``(labels, regions)`` from nnU-Net v2 ``labels``: integer entries are labels, list entries regions.

    Raises:
        MedsegError: naming ``path``, when ``labels`` is not an object of integers / integer lists,
            has no background 0, or a region is empty or includes 0.
    """
    if not isinstance(value, dict) or not value:
        raise MedsegError(f"'labels' must be a non-empty object {{name: value}}, got {value!r}", path)
    labels: dict[str, int] = {}
    regions: dict[str, list[int]] = {}
    for name, entry in value.items():
        if is_int(entry):
            labels[str(name)] = int(entry)
        elif isinstance(entry, list) and entry and all(is_int(v) for v in entry):
            if 0 in entry:
                raise MedsegError(f"region {name!r} = {entry} includes the background value 0", path)
            regions[str(name)] = sorted({int(v) for v in entry})
        else:
            raise MedsegError(f"label {name!r}: expected an integer or a non-empty list of integers, got {entry!r}", path)
    if 0 not in labels.values():
        raise MedsegError(f"'labels' must declare the background value 0 (e.g. \"background\": 0), got {value!r}", path)
    if len(set(labels.values())) != len(labels):
        raise MedsegError(f"'labels' gives one value several names: {labels}", path)
    named = set(labels.values())
    for v in sorted({v for members in regions.values() for v in members} - named):
        labels[f"label_{v}"] = v  # region-based datasets name regions, not the values of the label maps
    return dict(sorted(labels.items(), key=lambda item: item[1])), regions
