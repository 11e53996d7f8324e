"""Ingest: a source dataset folder → the canonical dataset (nnU-Net v2 raw layout) with its manifest.

Output folder::

    imagesTr/<CASE>_0000.nii.gz ... _0003   labelled cases, one file per channel (dataset.json order)
    labelsTr/<CASE>.nii.gz                  uint8 label map in canonical values
    imagesTs/<CASE>_0000.nii.gz ...         unlabelled cases (not in any split)
    dataset.json  manifest.json  splits.json

Everything is written into a temporary folder that replaces ``out`` only when complete, so ``out``
either holds a whole dataset or is left as it was. Every volume is reoriented to RAS+ (the source
orientation is recorded per file) and re-saved through :func:`medseg.io.save_nifti`, which clears the
free-text header fields (descrip, aux_file, intent_name, db_name: a de-identification step), then
hashed; the manifest's ``content_hash`` over those hashes is the dataset version.

Case identity: every case gets a ``case_key`` (:func:`case_key`), a hash over its files' contents (and, for
classification, its class and covariates). Pseudonyms are renumbered whenever the set of cases changes; the key
is not: the same data ingested again gets the same keys, which is how the registry's gate pairs a challenger's
test cases with the champion's.

Synthetic data: a source made by ``medseg synth`` holds its marker ``medseg_synth.json``; its content goes into
``dataset.json`` ``synthetic`` (:func:`synthetic_marker`), which the model package and its model card carry on.

De-identification of ids: with ``pseudonymize`` (the default for layouts whose ids may name a person,
such as DICOM) cases and patients get sequential pseudonyms and original file names are not
recorded; the original → new mapping is written only to ``id_map``, which must lie outside the
dataset (the dataset is shared and versioned, the map is not).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations
from tqdm import tqdm

from medseg.errors import MedsegError
from medseg.ingest.adapters import ADAPTERS, Adapter, SourceCase, detect_format, get_adapter
from medseg.ingest.splits import check_split_parameters, make_splits
from medseg.ingest.adapters.base import Volume
from medseg.ingest.validate import CaseCheck, Problem, check_case, find_duplicate_case_ids, settle_problems
from medseg.io import atomic_dir, nifti_spacing, read_json, save_nifti, sha256_file, sha256_json, write_json
from medseg.schemas import IMAGES_TR, IMAGES_TS, LABELS_TR, SYNTH_MARKER_JSON, CaseRecord, DatasetJson, FileRecord, Manifest, Splits

logger = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"


def ingest(
    source: Path | str,
    out: Path,
    fmt: str = "auto",
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
    pseudonymize: bool | None = None,
    id_map: Path | None = None,
) -> Manifest:
    """Validate the cases of ``source`` and write the canonical dataset to ``out``; return the manifest.

    ``source`` is a folder or an ``s3://bucket/prefix`` URI (downloaded and checksummed first, see
    :func:`medseg.data.s3.stage_source`). ``fmt`` is an adapter name from
    :data:`~medseg.ingest.adapters.ADAPTERS` or ``"auto"``. Bad cases are quarantined (listed in
    ``manifest.quarantined``, warned about as a table) unless ``strict``, which raises
    :class:`~medseg.errors.ValidationError` with every problem instead. An existing ``out`` is
    replaced only on success. ``pseudonymize`` None follows the adapter's default.
    """
    out = Path(out)
    if str(source).startswith("s3://"):
        from medseg.data.s3 import stage_source  # boto3 only when an S3 source is used

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".s3-source-", dir=out.parent) as staging:
            staged = stage_source(str(source), Path(staging), progress=progress)
            return _ingest_folder(
                Path(staged), out, fmt, n_folds, test_fraction, seed, strict, progress, pseudonymize, id_map,
                source_label=str(source),
            )
    return _ingest_folder(Path(source), out, fmt, n_folds, test_fraction, seed, strict, progress, pseudonymize, id_map)


def _ingest_folder(
    source: Path,
    out: Path,
    fmt: str,
    n_folds: int,
    test_fraction: float,
    seed: int,
    strict: bool,
    progress: bool,
    pseudonymize: bool | None,
    id_map: Path | None,
    source_label: str | None = None,
) -> Manifest:
    if not source.exists():
        raise MedsegError("source folder not found", source)
    if not source.is_dir():
        raise MedsegError("source is not a folder", source)
    src_abs, out_abs = source.resolve(), out.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        raise MedsegError("output folder must not be the source folder or contain it", out)
    if id_map is not None and (Path(id_map).resolve() == out_abs or out_abs in Path(id_map).resolve().parents):
        raise MedsegError("the id map must be written outside the dataset folder (the dataset is shared, the map is not)", id_map)
    check_split_parameters(n_folds, test_fraction)  # fail before any work

    adapter = detect_format(source) if fmt == "auto" else get_adapter(fmt)
    adapter = adapter.configure(source)
    cases = adapter.discover(source)
    if not cases:
        raise MedsegError(f"no {adapter.name} case found", source)
    if pseudonymize is None:
        pseudonymize = adapter.pseudonymize_by_default
    new_ids = _pseudonyms(cases) if pseudonymize else {}

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
            case_id, patient_id = new_ids.get(case.case_id, (case.case_id, case.patient_id))
            records.append(_write_case(tmp, check, adapter, case_id, patient_id, keep_source_names=not pseudonymize))
        problems.sort(key=lambda row: row[0])  # stable: keeps each case's rows in check order
        settle_problems(problems, len(records), strict, source)
        if pseudonymize:
            # quarantine rows name original ids and files: keep them out of the shared manifest
            problems = [(new_ids.get(c, (c, ""))[0], "", p) for c, _, p in problems]

        labelled = {r.case_id: r.patient_id for r in records if r.has_label}
        strata = {r.case_id: r.class_label for r in records if r.has_label and r.class_label is not None}
        splits = make_splits(labelled, n_folds, test_fraction, seed, case_to_stratum=strata or None)
        dataset = DatasetJson(
            name=out.name,
            channel_names={str(i): name for i, name in enumerate(adapter.channel_names)},
            labels=dict(adapter.labels),
            numTraining=len(labelled),
            file_ending=FILE_ENDING,
            regions={k: list(v) for k, v in adapter.regions.items()},
            task=adapter.task,
            source_format=adapter.name,
            description=f"ingested by medseg from a {adapter.name} folder",
            slice_axis=adapter.slice_axis,
            covariates=list(adapter.covariates),
            primary_metric=adapter.primary_metric,
            synthetic=synthetic_marker(source),
            **adapter.dataset_fields(cases),
        )
        manifest = Manifest(
            dataset_name=out.name,
            source="(pseudonymized)" if pseudonymize else (source_label or str(src_abs)),
            source_format=adapter.name,
            cases=[_as_dict(r) for r in records],
            quarantined=[{"case": c, "file": f, "problem": p} for c, f, p in problems],
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.content_hash = manifest.compute_hash()
        dataset.save(tmp)
        splits.save(tmp)
        manifest.save(tmp)
        if id_map is not None:
            _write_id_map(Path(id_map), cases, new_ids)
    logger.info(
        "ingested %d case(s) into %s (%d quarantined), dataset hash %s",
        len(records), out, len({c for c, _, _ in problems}), manifest.content_hash[:12],
    )
    return manifest


def synthetic_marker(source: Path) -> dict[str, Any]:
    """What ``medseg synth`` recorded in ``source`` (its ``medseg_synth.json``: generator, layout, cases, seed, ...), or
    ``{}`` when the source holds no such marker (data not known to be synthetic). Written into ``dataset.json``
    ``synthetic``, so every later artefact (the model package, its model card) knows the data were synthetic."""
    path = Path(source) / SYNTH_MARKER_JSON
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise MedsegError("expected a JSON object (the synthetic-data marker of medseg synth)", path)
    return data


def _pseudonyms(cases: list[SourceCase]) -> dict[str, tuple[str, str]]:
    """original case id → (pseudonymous case id, pseudonymous patient id), numbered in sorted order."""
    patients = {p: f"P{i:04d}" for i, p in enumerate(sorted({c.patient_id for c in cases}))}
    ids = sorted({c.case_id for c in cases})
    patient_of = {c.case_id: c.patient_id for c in cases}
    return {case_id: (f"case_{i:04d}", patients[patient_of[case_id]]) for i, case_id in enumerate(ids)}


def _write_id_map(path: Path, cases: list[SourceCase], new_ids: dict[str, tuple[str, str]]) -> None:
    """The original → new id mapping (identity when ids were kept), readable by its owner only."""
    rows = [
        {"original_case_id": c.case_id, "original_patient_id": c.patient_id,
         "case_id": new_ids.get(c.case_id, (c.case_id, c.patient_id))[0],
         "patient_id": new_ids.get(c.case_id, (c.case_id, c.patient_id))[1]}
        for c in cases
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"pseudonymized": bool(new_ids), "cases": rows})
    path.chmod(0o600)
    logger.info("id map written to %s (keep it private: it links pseudonyms to original ids)", path)


def to_ras(volume: Volume) -> tuple[Volume, str]:
    """``volume`` reoriented to RAS+ by axis flips/permutations only (no resampling); its source axis codes.

    The voxel grid is only re-indexed, so world coordinates of every voxel are unchanged.
    """
    source_ornt = orientations.io_orientation(volume.affine)
    codes = "".join(orientations.ornt2axcodes(source_ornt))
    if codes == "RAS":
        return volume, codes
    transform = orientations.ornt_transform(source_ornt, orientations.axcodes2ornt("RAS"))
    array = np.ascontiguousarray(orientations.apply_orientation(volume.array, transform))
    affine = volume.affine @ orientations.inv_ornt_aff(transform, volume.array.shape)
    return Volume(array, affine, volume.header, volume.source), codes


def _write_case(
    folder: Path, check: CaseCheck, adapter: Adapter, case_id: str, patient_id: str, keep_source_names: bool = True
) -> CaseRecord:
    """Write the images (and label) of a valid case; return its record with hashes and geometry."""
    case = check.case
    labelled = check.label is not None or case.class_label is not None
    image_dir = IMAGES_TR if labelled else IMAGES_TS
    files: list[dict[str, Any]] = []
    for index, channel in enumerate(adapter.channel_names):
        relative = f"{image_dir}/{case_id}_{index:04d}{FILE_ENDING}"
        files.append(_write_volume(folder, relative, check.images[channel], "image", channel, keep_source_names))
    if check.label is not None:
        relative = f"{LABELS_TR}/{case_id}{FILE_ENDING}"
        files.append(_write_volume(folder, relative, check.label, "label", "label", keep_source_names))
    record = CaseRecord(
        case_id=case_id, patient_id=patient_id, files=files, has_label=labelled,
        class_label=case.class_label, covariates=dict(case.covariates),
    )
    record.case_key = case_key(record)
    return record


def case_key(record: CaseRecord | dict[str, Any]) -> str:
    """The case's identity by content: sha256 over its files' sorted (role, channel, file sha256) and, when it
    has a class label (classification), the label and its covariates.

    Ids, paths and pseudonyms are left out, so the same case ingested again (even renumbered) gets the same key,
    and two cases differing in any written byte, label or covariate get different ones.

    Args:
        record: a :class:`~medseg.schemas.CaseRecord` or its dict (a ``manifest.json`` case).
    """
    data = _as_dict(record) if dataclasses.is_dataclass(record) else dict(record)
    files = sorted((str(f["role"]), str(f["channel"]), str(f["sha256"])) for f in data.get("files") or [])
    if not files:
        raise MedsegError(f"case {data.get('case_id', '?')!r} has no files to key it by")
    content: dict[str, Any] = {"files": files}
    if data.get("class_label") is not None:
        content["class_label"] = str(data["class_label"])
        content["covariates"] = dict(data.get("covariates") or {})
    return sha256_json(content)


def _write_volume(folder: Path, relative: str, volume: Volume, role: str, channel: str, keep_source_name: bool) -> dict[str, Any]:
    dest = folder / relative
    volume, source_orientation = to_ras(volume)
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
        source=volume.source.name if keep_source_name else "",
        orientation=source_orientation,
    )
    return _as_dict(record)


def _as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg ingest``."""
    parser.add_argument("--source", required=True, help="source dataset folder, or s3://bucket/prefix (credentials and endpoint from the environment)")
    parser.add_argument("--out", required=True, type=Path, help="canonical dataset folder to write (replaced on success)")
    parser.add_argument("--format", default="auto", choices=["auto", *ADAPTERS], help="source layout (default: auto-detect)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out test fraction of the labelled cases (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits (default: 0)")
    parser.add_argument("--strict", action="store_true", help="fail on any problem instead of quarantining bad cases")
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument("--pseudonymize", dest="pseudonymize", action="store_true", default=None, help="replace case and patient ids by pseudonyms (default for DICOM)")
    ids.add_argument("--keep-ids", dest="pseudonymize", action="store_false", help="keep the source's case ids")
    parser.add_argument("--id-map", type=Path, default=None, help="write the original -> new id mapping to this file (outside the dataset; private)")
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
        pseudonymize=getattr(args, "pseudonymize", None),
        id_map=getattr(args, "id_map", None),
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
