"""Batch prediction: every case in a folder through one model, whatever its task.

Case layouts recognised in ``input_dir`` (channel names from the model's dataset.json):

- nnU-Net: ``CASE_0000.nii.gz`` … (channel index suffix), e.g. an ingested dataset's ``imagesTr``;
- one folder per case, or files side by side: ``CASE/CASE-<channel>.nii.gz`` ….

What is written follows the model's task:

- segmentation (3D, and 2D slice sets as stacks): ``CASE.nii.gz`` in the input's geometry per case and
  ``volumes.csv`` (``case_id, model_version, <GROUP>_ml`` …);
- classification: ``predictions.csv`` (``case_id, model_version, label, prob_<CLASS>`` …, and the covariates the
  model took), no image files. A classifier taking the subject's age reads it from ``--covariates`` /
  ``covariates`` (a CSV with ``case_id`` and ``age`` columns), else from an ingested dataset's ``manifest.json``
  in ``input_dir`` (``cases[].covariates.age``); a case without it is an error, all such cases named at once.

Where the cases come from and the results go (:func:`predict_batch`, for ``medseg predict`` and the batch-inference
pipeline): a folder (on a cluster, under the mount path of the data PVC) or ``s3://bucket/prefix``. An S3 input is
downloaded and verified first (:func:`medseg.data.s3.stage_source`); an S3 output is uploaded object by object, the
table last, so whoever sees the table sees every segmentation it lists (:func:`publish_outputs`).
"""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medseg import schemas
from medseg.data.s3 import is_s3_uri, parse_s3_uri, stage_source, upload_folder
from medseg.errors import MedsegError, ValidationError
from medseg.inference.predictor import Predictor
from medseg.io import NIFTI_SUFFIXES, atomic_path, save_nifti, strip_nifti_suffix, write_text
from medseg.registry.resolve import resolve_model_source

VOLUMES_CSV = schemas.VOLUMES_CSV
PREDICTIONS_CSV = schemas.PREDICTIONS_CSV
#: Column name prefix of a class probability (``prob_AD``), shared with the MLflow pyfunc model.
PROB_PREFIX = "prob_"


def find_cases(input_dir: Path, channels: list[str], source_name: str | None = None) -> dict[str, list[Path]]:
    """``{case id: one file per channel, in channel order}``; every problem (a case missing a channel) is
    reported at once. Errors name ``source_name`` (default: ``input_dir``), e.g. the ``s3://`` URI it was downloaded from."""
    input_dir = Path(input_dir)
    where = source_name or str(input_dir)
    if not input_dir.is_dir():
        raise MedsegError("input folder not found", where)
    files = [p for p in sorted(input_dir.rglob("*")) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)]
    found: dict[str, dict[int, Path]] = {}
    index_pattern = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")
    by_name = {name: i for i, name in enumerate(channels)}
    for path in files:
        stem = strip_nifti_suffix(path.name)
        match = index_pattern.match(stem)
        if match and int(match["index"]) < len(channels):
            found.setdefault(match["case"], {})[int(match["index"])] = path
            continue
        case, _, channel = stem.rpartition("-")
        if case and channel in by_name:
            found.setdefault(case, {})[by_name[channel]] = path
    if not found:
        raise MedsegError(f"no cases found: expected CASE_0000.nii.gz … or CASE-{channels[0]}.nii.gz … for channels {', '.join(channels)}", where)
    problems = [(case, "", f"missing channel(s) {', '.join(channels[i] for i in range(len(channels)) if i not in got)}")
                for case, got in sorted(found.items()) if len(got) < len(channels)]
    if problems:
        raise ValidationError(f"{where}: incomplete cases", problems)
    return {case: [got[i] for i in range(len(channels))] for case, got in sorted(found.items())}


def read_covariates(input_dir: Path, covariates: Path | None = None) -> dict[str, dict[str, float]]:
    """Case id → ``{covariate: value}`` from ``covariates`` (a CSV with a ``case_id`` column), else from
    ``input_dir``'s ``manifest.json`` (an ingested dataset); empty when there is neither. Values that are not
    finite numbers are left out."""
    input_dir = Path(input_dir)
    out: dict[str, dict[str, float]] = {}
    if covariates is not None:
        source = Path(covariates)
        if not source.is_file():
            raise MedsegError("covariates file not found", source)
        with open(source, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "case_id" not in reader.fieldnames:
                raise MedsegError(f"expected a CSV with a case_id column and one column per covariate, got columns {reader.fieldnames}", source)
            for row in reader:
                values = {k: _number(v) for k, v in row.items() if k and k != "case_id"}
                out[str(row["case_id"]).strip()] = {k: v for k, v in values.items() if v is not None}
        return out
    if (input_dir / schemas.MANIFEST_JSON).is_file():
        for case in schemas.Manifest.load(input_dir).cases:
            values = {str(k): _number(v) for k, v in (case.get("covariates") or {}).items()}
            out[str(case["case_id"])] = {k: v for k, v in values.items() if v is not None}
    return out


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def predict_folder(model: str | Path, input_dir: Path, out_dir: Path, overlap: float = 0.5, mirror: bool = False, device: str = "auto", progress: bool = True,
                   covariates: Path | None = None, backend: str | None = None, source_name: str | None = None) -> list[dict]:
    """Predict every case of ``input_dir`` with ``model`` (a package folder or ``models:/…``). Segmentation: writes
    ``out_dir/CASE.nii.gz`` and ``out_dir/volumes.csv``; classification: ``out_dir/predictions.csv`` (see the module
    docstring; ``covariates``: the CSV of the subjects' ages; ``backend``: torch, onnx or auto, see
    :meth:`~medseg.inference.predictor.Predictor.from_package`; ``source_name``: what errors about the cases name,
    default ``input_dir``). Each file is written atomically, the table last. Returns one row per case."""
    package_dir, version = resolve_model_source(model)
    predictor = Predictor.from_package(package_dir, device=device, overlap=overlap, mirror=mirror, backend=backend)
    cases = find_cases(input_dir, predictor.channels, source_name)
    out_dir = Path(out_dir)
    if predictor.output == "classes":
        rows = _classify(predictor, cases, version, Path(input_dir), covariates, progress)
        _write_csv(out_dir / PREDICTIONS_CSV, rows)
        return rows
    rows = []
    for case_id, paths in tqdm(cases.items(), desc="predict", disable=not progress):
        prediction = predictor.predict_files(paths)
        save_nifti(out_dir / f"{case_id}.nii.gz", prediction.segmentation, prediction.affine, prediction.header)
        rows.append({"case_id": case_id, "model_version": version, **{f"{k}_ml": round(v, 3) for k, v in prediction.volumes_ml.items()}})
    _write_csv(out_dir / VOLUMES_CSV, rows)
    return rows


def predict_batch(model: str | Path, source: str | Path, output: str | Path, overlap: float = 0.5, mirror: bool = False, device: str = "auto",
                  progress: bool = True, covariates: Path | None = None, backend: str | None = None, work_dir: Path | None = None,
                  publish_to: str | Path = "") -> list[dict]:
    """:func:`predict_folder` from and to a folder or ``s3://bucket/prefix``.

    Args:
        model: a model package folder or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        source: folder of cases, or ``s3://bucket/prefix`` (downloaded and verified into a temporary folder first).
        output: folder (segmentations and the table written there, file by file, each atomically), or
            ``s3://bucket/prefix`` (predicted into a temporary folder, then uploaded: :func:`publish_outputs`).
        work_dir: where the temporary folders go (default: the system's temporary folder); removed at the end.
        publish_to: a second place (folder or ``s3://bucket/prefix``) the results are copied to once complete, e.g.
            when ``output`` is a pipeline's artefact folder (:func:`publish_outputs`); "" = none.
        overlap, mirror, device, progress, covariates, backend: as :func:`predict_folder`.

    Returns:
        One row per case, as :func:`predict_folder`.

    Raises:
        MedsegError: ``source`` and ``output`` the same place, a missing or empty input prefix or folder (naming it),
            and whatever :func:`predict_folder` and the S3 transfer refuse.
    """
    check_locations(source, output)
    check_locations(source, publish_to)  # before the prediction, not after it
    with tempfile.TemporaryDirectory(prefix="medseg-predict-", dir=work_dir) as tmp:
        input_dir = stage_source(source, Path(tmp) / "input", progress=progress)
        out_dir = Path(tmp) / "output" if is_s3_uri(output) else Path(output)
        rows = predict_folder(model, input_dir, out_dir, overlap=overlap, mirror=mirror, device=device, progress=progress, covariates=covariates,
                              backend=backend, source_name=str(source) if is_s3_uri(source) else None)
        if is_s3_uri(output):
            publish_outputs(out_dir, output, progress=progress)
        if str(publish_to).strip():
            publish_outputs(out_dir, publish_to, progress=progress)
    return rows


def check_locations(source: str | Path, output: str | Path) -> None:
    """Refuse an output that is the input itself (the predictions would land among the cases)."""
    def place(where: str | Path) -> tuple[str, str]:
        if is_s3_uri(where):
            bucket, key = parse_s3_uri(where)
            return bucket, key.rstrip("/")
        return "", str(Path(where).resolve())

    if str(output).strip() and place(source) == place(output):
        raise MedsegError("the output is the input itself: give another folder or prefix for the predictions", str(output))


def publish_outputs(out_dir: Path, destination: str | Path, progress: bool = True) -> list[str]:
    """Copy what :func:`predict_folder` wrote in ``out_dir`` to ``destination`` (``s3://bucket/prefix`` or a folder, e.g.
    on the data PVC): every file, each atomically (one verified PUT; a temporary name then a rename), the table
    (``volumes.csv`` / ``predictions.csv``) last, so its presence means the whole batch is there. Files of other names
    already at ``destination`` are left. Returns the written URIs or paths, in order."""
    out_dir = Path(out_dir)
    tables = (VOLUMES_CSV, PREDICTIONS_CSV)
    if is_s3_uri(destination):
        return [r["uri"] for r in upload_folder(out_dir, destination, last=tables, progress=progress)]
    dest = Path(destination)
    # hidden names are temporary files, as upload_folder skips them
    files = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(out_dir).parts))
    if not files:
        raise MedsegError("no predictions to publish", out_dir)
    written = []
    for rel in sorted(files, key=lambda r: r.as_posix() in tables):  # stable: the tables move to the end
        try:
            with atomic_path(dest / rel) as tmp:
                shutil.copyfile(out_dir / rel, tmp)
        except OSError as exc:
            raise MedsegError(f"cannot write the prediction: {exc.strerror or exc}", dest / rel) from None
        written.append(str(dest / rel))
    return written


def _classify(predictor: Predictor, cases: dict[str, list[Path]], version: str, input_dir: Path, covariates: Path | None, progress: bool) -> list[dict]:
    ages: dict[str, float] = {}
    if predictor.uses_age:
        table = read_covariates(input_dir, covariates)
        ages = {case: values["age"] for case, values in table.items() if "age" in values}
        missing = [(case, "", "no age (years) for a classifier that takes it") for case in cases if case not in ages]
        if missing:
            where = f"the covariates CSV {covariates} (case_id and age columns)" if covariates else \
                f"{input_dir / schemas.MANIFEST_JSON}, or a covariates CSV with case_id and age columns (--covariates)"
            raise ValidationError(f"{input_dir}: the subjects' ages are needed (from {where})", missing)
    rows = []
    for case_id, paths in tqdm(cases.items(), desc="classify", disable=not progress):
        age = ages.get(case_id) if predictor.uses_age else None
        probs = predictor.predict_class_files(paths, age)
        row: dict[str, Any] = {"case_id": case_id, "model_version": version, "label": max(probs, key=probs.__getitem__)}
        if predictor.uses_age:
            row["age"] = age
        row.update({f"{PROB_PREFIX}{name}": round(p, 6) for name, p in probs.items()})
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
