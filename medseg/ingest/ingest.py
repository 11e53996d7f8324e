"""Ingest: a source dataset folder → the canonical dataset (nnU-Net v2 raw layout) with its manifest.

Output folder::

    imagesTr/<CASE>_0000.nii.gz ... _0003   labelled cases, one file per channel (dataset.json order)
    labelsTr/<CASE>.nii.gz                  uint8 label map in canonical values
    imagesTs/<CASE>_0000.nii.gz ...         unlabelled cases (not in any split)
    dataset.json  manifest.json  splits.json

Everything is written into a temporary folder that replaces ``out`` only when complete, so ``out``
either holds a whole dataset or is left as it was. Every file is re-saved through
:func:`medseg.io.save_nifti`, which clears free-text header fields (a de-identification step), and
hashed after writing; the manifest's ``content_hash`` over those hashes is the dataset version.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
from tqdm import tqdm

from medseg.errors import MedsegError
from medseg.ingest.adapters import ADAPTERS, Adapter, detect_format, get_adapter
from medseg.ingest.splits import check_split_parameters, make_splits
from medseg.ingest.adapters.base import Volume
from medseg.ingest.validate import CaseCheck, Problem, check_case, find_duplicate_case_ids, settle_problems
from medseg.io import atomic_dir, nifti_spacing, save_nifti, sha256_file
from medseg.schemas import IMAGES_TR, IMAGES_TS, LABELS_TR, CaseRecord, DatasetJson, FileRecord, Manifest, Splits

logger = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"


def ingest(
    source: Path,
    out: Path,
    fmt: str = "auto",
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
) -> Manifest:
    """Validate the cases of ``source`` and write the canonical dataset to ``out``; return the manifest.

    ``fmt`` is an adapter name from :data:`~medseg.ingest.adapters.ADAPTERS` or ``"auto"``. Bad cases
    are quarantined (listed in ``manifest.quarantined``, warned about as a table) unless ``strict``,
    which raises :class:`~medseg.errors.ValidationError` with every problem instead. An existing
    ``out`` is replaced only on success.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise MedsegError("source folder not found", source)
    if not source.is_dir():
        raise MedsegError("source is not a folder", source)
    src_abs, out_abs = source.resolve(), out.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        raise MedsegError("output folder must not be the source folder or contain it", out)
    check_split_parameters(n_folds, test_fraction)  # fail before any work

    adapter = detect_format(source) if fmt == "auto" else get_adapter(fmt)
    cases = adapter.discover(source)
    if not cases:
        raise MedsegError(f"no {adapter.name} case found", source)

    problems: list[Problem] = find_duplicate_case_ids(cases, source)
    duplicated = {case_id for case_id, _, _ in problems}
    records: list[CaseRecord] = []
    with atomic_dir(out) as tmp:
        for sub in (IMAGES_TR, LABELS_TR, IMAGES_TS):
            (tmp / sub).mkdir()
        for case in tqdm(cases, desc=f"ingest {adapter.name}", unit="case", disable=not progress):
            check = check_case(case, adapter)
            problems.extend(check.problems)
            if not check.ok or case.case_id in duplicated or (strict and problems):
                continue  # quarantined, or strict mode will fail: no point in writing
            records.append(_write_case(tmp, check, adapter))
        problems.sort(key=lambda row: row[0])  # stable: keeps each case's rows in check order
        settle_problems(problems, len(records), strict, source)

        labelled = {r.case_id: r.patient_id for r in records if r.has_label}
        splits = make_splits(labelled, n_folds, test_fraction, seed)
        dataset = DatasetJson(
            name=out.name,
            channel_names={str(i): name for i, name in enumerate(adapter.channel_names)},
            labels=dict(adapter.labels),
            numTraining=len(labelled),
            file_ending=FILE_ENDING,
            regions={k: list(v) for k, v in adapter.regions.items()},
            source_format=adapter.name,
            description=f"ingested by medseg from a {adapter.name} folder",
        )
        manifest = Manifest(
            dataset_name=out.name,
            source=str(src_abs),
            source_format=adapter.name,
            cases=[_as_dict(r) for r in records],
            quarantined=[{"case": c, "file": f, "problem": p} for c, f, p in problems],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.content_hash = manifest.compute_hash()
        dataset.save(tmp)
        splits.save(tmp)
        manifest.save(tmp)
    logger.info(
        "ingested %d case(s) into %s (%d quarantined), dataset hash %s",
        len(records), out, len({c for c, _, _ in problems}), manifest.content_hash[:12],
    )
    return manifest


def _write_case(folder: Path, check: CaseCheck, adapter: Adapter) -> CaseRecord:
    """Write the images (and label) of a valid case; return its record with hashes and geometry."""
    case = check.case
    labelled = check.label is not None
    image_dir = IMAGES_TR if labelled else IMAGES_TS
    files: list[dict[str, Any]] = []
    for index, channel in enumerate(adapter.channel_names):
        relative = f"{image_dir}/{case.case_id}_{index:04d}{FILE_ENDING}"
        files.append(_write_volume(folder, relative, check.images[channel], role="image", channel=channel))
    if check.label is not None:
        relative = f"{LABELS_TR}/{case.case_id}{FILE_ENDING}"
        files.append(_write_volume(folder, relative, check.label, role="label", channel="label"))
    return CaseRecord(case_id=case.case_id, patient_id=case.patient_id, files=files, has_label=labelled)


def _write_volume(folder: Path, relative: str, volume: Volume, role: str, channel: str) -> dict[str, Any]:
    dest = folder / relative
    save_nifti(dest, volume.array, volume.affine, volume.header)
    written = nib.load(str(dest))  # header only: the geometry downstream stages will see
    record = FileRecord(
        path=relative,
        role=role,
        channel=channel,
        sha256=sha256_file(dest),
        shape=[int(n) for n in written.shape[:3]],
        spacing=[float(s) for s in nifti_spacing(written.header)],  # type: ignore[arg-type]
        affine=[[float(v) for v in row] for row in written.affine],
        source=volume.source.name,
    )
    return _as_dict(record)


def _as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg ingest``."""
    parser.add_argument("--source", required=True, type=Path, help="source dataset folder")
    parser.add_argument("--out", required=True, type=Path, help="canonical dataset folder to write (replaced on success)")
    parser.add_argument("--format", default="auto", choices=["auto", *ADAPTERS], help="source layout (default: auto-detect)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out test fraction of the labelled cases (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    parser.add_argument("--strict", action="store_true", help="fail on any problem instead of quarantining bad cases")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in pipeline logs)")


def run(args: argparse.Namespace) -> int:
    """Run ``medseg ingest`` and print a short summary; returns the exit code."""
    manifest = ingest(
        args.source,
        args.out,
        fmt=args.format,
        n_folds=args.folds,
        test_fraction=args.test_fraction,
        seed=args.seed,
        strict=args.strict,
        progress=not getattr(args, "no_progress", False),
    )
    splits = Splits.load(args.out)
    n_labelled = sum(1 for c in manifest.cases if c["has_label"])
    n_quarantined = len({q["case"] for q in manifest.quarantined})
    print(f"format:      {manifest.source_format}")
    print(f"ingested:    {len(manifest.cases)} case(s) ({n_labelled} labelled, {len(manifest.cases) - n_labelled} unlabelled)")
    print(f"quarantined: {n_quarantined} case(s)" + (" (see manifest.json 'quarantined')" if n_quarantined else ""))
    print(f"splits:      {len(splits.folds)} fold(s), test set {len(splits.test)} case(s)")
    print(f"dataset:     {args.out} (hash {manifest.content_hash})")
    return 0
