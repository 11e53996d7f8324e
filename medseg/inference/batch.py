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
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medseg import schemas
from medseg.errors import MedsegError, ValidationError
from medseg.inference.predictor import Predictor
from medseg.io import NIFTI_SUFFIXES, save_nifti, strip_nifti_suffix, write_text
from medseg.registry.resolve import resolve_model_source

VOLUMES_CSV = schemas.VOLUMES_CSV
PREDICTIONS_CSV = schemas.PREDICTIONS_CSV
#: Column name prefix of a class probability (``prob_AD``), shared with the MLflow pyfunc model.
PROB_PREFIX = "prob_"


def find_cases(input_dir: Path, channels: list[str]) -> dict[str, list[Path]]:
    """``{case id: one file per channel, in channel order}``; every problem (a case missing a channel) is
    reported at once."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MedsegError("input folder not found", input_dir)
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
        raise MedsegError(f"no cases found: expected CASE_0000.nii.gz … or CASE-{channels[0]}.nii.gz … for channels {', '.join(channels)}", input_dir)
    problems = [(case, "", f"missing channel(s) {', '.join(channels[i] for i in range(len(channels)) if i not in got)}")
                for case, got in sorted(found.items()) if len(got) < len(channels)]
    if problems:
        raise ValidationError(f"{input_dir}: incomplete cases", problems)
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
                   covariates: Path | None = None, backend: str | None = None) -> list[dict]:
    """Predict every case of ``input_dir`` with ``model`` (a package folder or ``models:/…``). Segmentation: writes
    ``out_dir/CASE.nii.gz`` and ``out_dir/volumes.csv``; classification: ``out_dir/predictions.csv`` (see the module
    docstring; ``covariates``: the CSV of the subjects' ages; ``backend``: torch, onnx or auto, see
    :meth:`~medseg.inference.predictor.Predictor.from_package`). Returns one row per case."""
    package_dir, version = resolve_model_source(model)
    predictor = Predictor.from_package(package_dir, device=device, overlap=overlap, mirror=mirror, backend=backend)
    cases = find_cases(input_dir, predictor.channels)
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
