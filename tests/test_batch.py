"""Batch prediction: case discovery in both layouts, outputs in the inputs' geometry, the CLI, and the
batch-inference pipeline run by kfp.local."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError, ValidationError
from medseg.inference.batch import find_cases, predict_folder
from medseg.io import load_nifti
from tests.factories import make_model_package, write_case

CHANNELS = ["t1n", "t1c", "t2w", "t2f"]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("pkg") / "model")


def _brats_folder(root: Path, n: int = 2) -> Path:
    for i in range(n):
        case = f"CASE-{i:03d}"
        paths, _ = write_case(root / "tmp" / case, shape=(20, 22, 18), seed=i)
        (root / case).mkdir(parents=True)
        for path, channel in zip(paths, CHANNELS):
            shutil.copy(path, root / case / f"{case}-{channel}.nii.gz")
    shutil.rmtree(root / "tmp")
    return root


def test_find_cases_brats_and_nnunet_layouts(tmp_path):
    brats = _brats_folder(tmp_path / "brats")
    cases = find_cases(brats, CHANNELS)
    assert list(cases) == ["CASE-000", "CASE-001"]
    assert [p.name for p in cases["CASE-000"]] == [f"CASE-000-{c}.nii.gz" for c in CHANNELS]
    nnunet = tmp_path / "nnunet"
    nnunet.mkdir()
    for i, path in enumerate(cases["CASE-001"]):
        shutil.copy(path, nnunet / f"X_{i:04d}.nii.gz")
    assert [p.name for p in find_cases(nnunet, CHANNELS)["X"]] == [f"X_{i:04d}.nii.gz" for i in range(4)]


def test_find_cases_reports_every_incomplete_case(tmp_path):
    brats = _brats_folder(tmp_path / "brats")
    (brats / "CASE-000" / "CASE-000-t2w.nii.gz").unlink()
    (brats / "CASE-001" / "CASE-001-t1n.nii.gz").unlink()
    with pytest.raises(ValidationError) as err:
        find_cases(brats, CHANNELS)
    assert "CASE-000" in str(err.value) and "t2w" in str(err.value) and "CASE-001" in str(err.value)
    with pytest.raises(MedsegError, match="no cases found"):
        find_cases(tmp_path / "brats" / "CASE-000" / "..", ["flair"])


def test_predict_folder_writes_segmentations_in_input_geometry(tmp_path, package):
    brats = _brats_folder(tmp_path / "in")
    rows = predict_folder(package, brats, tmp_path / "out", overlap=0.25, progress=False)
    assert [r["case_id"] for r in rows] == ["CASE-000", "CASE-001"] and rows[0]["model_version"] == "local"
    seg, affine, _ = load_nifti(tmp_path / "out" / "CASE-000.nii.gz")
    img, img_affine, _ = load_nifti(brats / "CASE-000" / "CASE-000-t1n.nii.gz")
    assert seg.shape == img.shape and np.allclose(affine, img_affine)
    assert set(np.unique(seg)) <= {0, 1, 2, 3}
    assert (tmp_path / "out" / "volumes.csv").read_text().splitlines()[0] == "case_id,model_version,WT_ml,TC_ml,ET_ml"


def test_cli_predict_folder(tmp_path, package):
    brats = _brats_folder(tmp_path / "in", n=1)
    out = subprocess.run([sys.executable, "-m", "medseg.cli", "predict", "--model", str(package), "--input", str(brats), "--out", str(tmp_path / "out"), "--overlap", "0.25"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "CASE-000.nii.gz").is_file()
    bad = subprocess.run([sys.executable, "-m", "medseg.cli", "predict", "--model", str(tmp_path / "nope"), "--input", str(brats), "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_batch_inference_pipeline_runs_with_kfp_local(tmp_path, package):
    from kfp import local

    from medseg.pipeline.runner import _import_pipeline

    brats = _brats_folder(tmp_path / "in", n=1)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    _, pipeline = _import_pipeline("batch-inference")
    pipeline(input_dir=str(brats), model_uri=str(package), overlap=0.25)
    outputs = list((tmp_path / "kfp").glob("medseg-batch-inference-*/predict/predictions/CASE-000.nii.gz"))
    assert len(outputs) == 1
