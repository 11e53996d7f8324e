"""Batch prediction: every case in a folder through one model, segmentations in the inputs' geometry.

Case layouts recognised in ``input_dir`` (channel names from the model's dataset.json, e.g. t1n t1c t2w t2f):

- nnU-Net: ``CASE_0000.nii.gz`` … ``CASE_0003.nii.gz`` (channel index suffix);
- BraTS: ``CASE/CASE-t1n.nii.gz`` … (a folder per case) or the same files side by side.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from tqdm import tqdm

from medseg.errors import MedsegError, ValidationError
from medseg.inference.predictor import Predictor
from medseg.io import NIFTI_SUFFIXES, save_nifti, strip_nifti_suffix, write_text
from medseg.registry.resolve import resolve_model_source


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


def predict_folder(model: str | Path, input_dir: Path, out_dir: Path, overlap: float = 0.5, mirror: bool = False, device: str = "auto", progress: bool = True) -> list[dict]:
    """Predict every case of ``input_dir`` with ``model`` (a package folder or ``models:/…``); writes
    ``out_dir/CASE.nii.gz`` and ``out_dir/volumes.csv``. Returns one row per case."""
    package_dir, version = resolve_model_source(model)
    predictor = Predictor.from_package(package_dir, device=device, overlap=overlap, mirror=mirror)
    cases = find_cases(input_dir, predictor.channels)
    out_dir = Path(out_dir)
    rows = []
    for case_id, paths in tqdm(cases.items(), desc="predict", disable=not progress):
        prediction = predictor.predict_files(paths)
        save_nifti(out_dir / f"{case_id}.nii.gz", prediction.segmentation, prediction.affine, prediction.header)
        rows.append({"case_id": case_id, "model_version": version, **{f"{k}_ml": round(v, 3) for k, v in prediction.volumes_ml.items()}})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "volumes.csv", buf.getvalue())
    return rows
