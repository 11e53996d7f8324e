"""Medical Segmentation Decathlon tasks: ``TaskXX_Name/{dataset.json, imagesTr/, labelsTr/, imagesTs/}``.

An MSD image holds every modality of a case in one NIfTI file: 4D with the modality on the last axis
(Task01_BrainTumour: FLAIR, T1w, t1gd, T2w) or 3D when there is one modality. Ingest writes one file
per channel, so :meth:`MSDAdapter.read_images` splits them. Task01_BrainTumour is BraTS 2016/2017
data with other channel order and label values; it is mapped onto the BraTS 2023 contract so a model
trained on it answers the same requests as one trained on BraTS 2023.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medseg.errors import MedsegError
from medseg.ingest.adapters.base import (
    NIFTI_ENDINGS,
    Adapter,
    Reporter,
    SourceCase,
    Volume,
    problem_text,
    strip_nifti_ending,
)
from medseg.ingest.adapters.nnunet_raw import dataset_folder, dataset_folders, parse_channel_names, visible_files
from medseg.io import load_nifti_4d, read_json
from medseg.schemas import DATASET_JSON, IMAGES_TR, IMAGES_TS, LABELS_TR
from medseg.task import BRATS2023

logger = logging.getLogger(__name__)

# Task01_BrainTumour: MSD modality name (lower case) of each BraTS 2023 channel, in BRATS2023.channels order.
_BRAIN_TUMOUR_MODALITIES = {"t1n": "t1w", "t1c": "t1gd", "t2w": "t2w", "t2f": "flair"}
# Task01_BrainTumour: MSD label name (lower case, British or American spelling) → BraTS 2023 label value.
_BRAIN_TUMOUR_LABELS = {
    "edema": BRATS2023.labels["SNFH"],
    "non-enhancing tumor": BRATS2023.labels["NETC"],
    "non-enhancing tumour": BRATS2023.labels["NETC"],
    "enhancing tumor": BRATS2023.labels["ET"],
    "enhancing tumour": BRATS2023.labels["ET"],
}


def _is_msd_json(data: dict[str, Any]) -> bool:
    # nnU-Net v1 kept MSD's keys; nnU-Net v2 has channel_names (handled by the nnunet adapter)
    return "modality" in data and "labels" in data and "channel_names" not in data


class MSDAdapter(Adapter):
    """Medical Segmentation Decathlon: ``SRC/{dataset.json, imagesTr/CASE.nii.gz, labelsTr/CASE.nii.gz, imagesTs/}``.

    ``SRC`` is the task folder or holds exactly one (``SRC/Task01_BrainTumour/``). :meth:`configure`
    reads ``dataset.json``: channel names from ``modality`` (``{"0": "CT"}``), labels from ``labels``
    (``{"0": "background", "1": "liver", ...}``, value → name) and one region per foreground label.
    For Task01_BrainTumour (modalities FLAIR, T1w, t1gd, T2w; labels edema, non-enhancing and
    enhancing tumour) the BraTS 2023 contract is used instead: channels ``t1n`` ← T1w, ``t1c`` ← t1gd,
    ``t2w`` ← T2w, ``t2f`` ← FLAIR, labels edema 1 → 2, non-enhancing 2 → 1, enhancing 3 → 3, regions
    WT/TC/ET.

    Cases are the files of ``imagesTr`` (label: the same name in ``labelsTr``) and ``imagesTs``
    (unlabelled), plus any listed in ``training`` / ``test`` of ``dataset.json`` (a listed file that
    is missing is reported). macOS ``._*`` files are skipped. The patient id is the case id.
    """

    name: ClassVar[str] = "msd"
    description: ClassVar[str] = "Medical Segmentation Decathlon: TaskXX_Name/dataset.json + imagesTr/ (3D or 4D NIfTI)"
    # For each written channel, its index along the 4th axis of the source images.
    source_channel_index: tuple[int, ...] = ()

    def detect(self, src: Path) -> bool:
        return bool(dataset_folders(src, _is_msd_json))

    def configure(self, src: Path) -> MSDAdapter:
        path = dataset_folder(src, _is_msd_json, "Medical Segmentation Decathlon") / DATASET_JSON
        data = read_json(path)
        modalities = parse_channel_names(data.get("modality"), path, "modality")
        source_labels = _parse_msd_labels(data.get("labels"), path)
        brats = _brain_tumour_mapping(modalities, source_labels)
        if brats is not None:
            channel_index, label_remap = brats
            logger.info("%s: Task01_BrainTumour, mapped onto the BraTS 2023 channels and labels", path)
            clone = self.with_definitions(
                channel_names=BRATS2023.channels,
                source_channel_index=channel_index,
                labels=BRATS2023.labels_dict(),
                regions=BRATS2023.regions_dict(),
                label_remap=label_remap,
            )
        else:
            labels = {label: value for value, label in sorted(source_labels.items())}
            clone = self.with_definitions(
                channel_names=modalities,
                source_channel_index=tuple(range(len(modalities))),
                labels=labels,
                regions={label: [value] for label, value in labels.items() if value != 0},
                label_remap={},
            )
        return clone  # type: ignore[return-value]

    def discover(self, src: Path) -> list[SourceCase]:
        adapter = self if self.channel_names else self.configure(src)
        root = dataset_folder(src, _is_msd_json, "Medical Segmentation Decathlon")
        return adapter._discover(root, read_json(root / DATASET_JSON))

    def read_images(self, case: SourceCase, report: Reporter) -> dict[str, Volume]:
        """Split the case's one (3D or 4D) image file into the channel volumes."""
        path = next(iter(case.channel_files.values()), None)
        if path is None or not path.is_file():
            report(path or case.case_id, f"missing image file (channels {', '.join(self.channel_names)})")
            return {}
        try:
            array, affine, header = load_nifti_4d(path, dtype=None)
        except MedsegError as exc:
            report(path, problem_text(exc))
            return {}
        n_declared = len(self.source_channel_index)
        if array.shape[3] != n_declared:
            shape = "×".join(str(n) for n in array.shape)
            report(
                path,
                f"image {shape} holds {array.shape[3]} volume(s) along its 4th axis, "
                f"but dataset.json declares {n_declared} modalities",
            )
            return {}
        if array.dtype == np.float64 and header.get_data_dtype() != np.float64:
            array = array.astype(np.float32)  # scaled integers: float32 is exact enough, half the size
        header = header.copy()
        header.set_data_shape(array.shape[:3])  # each channel is written as a 3D file
        return {
            channel: Volume(array[..., index], affine, header, path)
            for channel, index in zip(self.channel_names, self.source_channel_index)
        }

    def read_label(self, case: SourceCase, report: Reporter) -> Volume | None:
        if case.label_file is not None and not case.label_file.exists():
            report(case.label_file, f"missing label file (the case is a training case: in {IMAGES_TR} or 'training')")
            return None
        return super().read_label(case, report)

    # -- helpers
    def _discover(self, root: Path, data: dict[str, Any]) -> list[SourceCase]:
        path = root / DATASET_JSON
        training: dict[str, tuple[Path, Path | None]] = {}  # case id → (image, label)
        for image in _nifti_files(root / IMAGES_TR):
            training[_case_id(image)] = (image, root / LABELS_TR / image.name)
        for entry in _listed(data, "training", path):
            if not (isinstance(entry, dict) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)):
                raise MedsegError(f"'training' entries must be {{\"image\": path, \"label\": path}}, got {entry!r}", path)
            image = root / entry["image"]
            training.setdefault(_case_id(image), (image, root / entry["label"]))
        testing: dict[str, Path] = {_case_id(image): image for image in _nifti_files(root / IMAGES_TS)}
        for entry in _listed(data, "test", path):
            if not isinstance(entry, str):
                raise MedsegError(f"'test' entries must be image paths, got {entry!r}", path)
            testing.setdefault(_case_id(root / entry), root / entry)

        cases = [self._case(case_id, image, label) for case_id, (image, label) in training.items()]
        cases += [self._case(case_id, image, None) for case_id, image in testing.items()]
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    def _case(self, case_id: str, image: Path, label: Path | None) -> SourceCase:
        return SourceCase(
            case_id=case_id,
            patient_id=case_id,
            channel_files={channel: image for channel in self.channel_names},
            label_file=label,
            folder=image.parent,
        )


def _nifti_files(folder: Path) -> list[Path]:
    return [p for p in visible_files(folder) if p.name.endswith(NIFTI_ENDINGS)]


def _case_id(image: Path) -> str:
    return strip_nifti_ending(image.name) or image.name


def _listed(data: dict[str, Any], key: str, path: Path) -> list[Any]:
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise MedsegError(f"{key!r} must be a list, got {type(entries).__name__}", path)
    return entries


def _parse_msd_labels(value: Any, path: Path) -> dict[int, str]:
    """MSD ``labels`` (``{"0": "background", "1": "edema"}``) as value → name; MedsegError naming
    ``path`` for non-integer keys, a missing background 0 or a repeated name."""
    if not isinstance(value, dict) or not value:
        raise MedsegError(f"'labels' must be a non-empty object {{\"0\": \"background\", ...}}, got {value!r}", path)
    labels: dict[int, str] = {}
    for key, label in value.items():
        try:
            labels[int(key)] = str(label)
        except ValueError:
            raise MedsegError(f"'labels' keys must be integer label values, got {key!r}", path) from None
    if 0 not in labels:
        raise MedsegError(f"'labels' must declare the background value 0, got {value!r}", path)
    if len(set(labels.values())) != len(labels):
        raise MedsegError(f"'labels' repeats a name: {value!r}", path)
    if any(v < 0 for v in labels):
        raise MedsegError(f"'labels' values must be >= 0, got {sorted(labels)}", path)
    return labels


def _brain_tumour_mapping(
    modalities: tuple[str, ...], labels: dict[int, str]
) -> tuple[tuple[int, ...], dict[int, int]] | None:
    """``(source channel index per BraTS channel, label remap)`` for Task01_BrainTumour, else None.

    Recognised by content (its four modality names and three label names), not by folder name, so a
    renamed copy maps the same way and another task never does. Indices and values are looked up by
    name, not assumed, in case a copy lists them in another order.
    """
    lowered = [m.lower() for m in modalities]
    if sorted(lowered) != sorted(_BRAIN_TUMOUR_MODALITIES.values()):
        return None
    foreground = {value: name.lower() for value, name in labels.items() if value != 0}
    if len(foreground) != 3 or not all(name in _BRAIN_TUMOUR_LABELS for name in foreground.values()):
        return None
    remap = {value: _BRAIN_TUMOUR_LABELS[name] for value, name in foreground.items()}
    if sorted(remap.values()) != [1, 2, 3]:
        return None
    channel_index = tuple(lowered.index(_BRAIN_TUMOUR_MODALITIES[channel]) for channel in BRATS2023.channels)
    return channel_index, remap
