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
    pipeline(input_uri=str(brats), model_uri=str(package), overlap=0.25)
    outputs = list((tmp_path / "kfp").glob("medseg-batch-inference-*/predict/predictions/CASE-000.nii.gz"))
    assert len(outputs) == 1


# --------------------------------------------------------------------------- a classifier: a CSV of labels and probabilities
def _subjects(root: Path, ages: dict[str, float] | None = None) -> Path:
    from tests.factories import write_classifier_case

    for i, case in enumerate(["S01", "S02"]):
        path = write_classifier_case(root / "tmp", k=i, seed=i)
        (root / case).mkdir(parents=True)
        shutil.copy(path, root / case / f"{case}-image.nii.gz")
    shutil.rmtree(root / "tmp")
    if ages is not None:
        (root.parent / "ages.csv").write_text("case_id,age,sex\n" + "".join(f"{c},{a},F\n" for c, a in ages.items()))
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from tests.factories import make_classifier_package

    return make_classifier_package(tmp_path_factory.mktemp("cls") / "model", use_age=True)


def test_classifier_writes_probabilities_and_labels(tmp_path, classifier):
    import csv

    from medseg.inference.predictor import Predictor

    folder = _subjects(tmp_path / "in", {"S01": 64.5, "S02": 81})
    rows = predict_folder(classifier, folder, tmp_path / "out", progress=False, covariates=tmp_path / "ages.csv")
    assert not list((tmp_path / "out").glob("*.nii.gz"))  # no images for a classifier
    table = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert list(table[0]) == ["case_id", "model_version", "label", "age", "prob_CN", "prob_MCI", "prob_AD"]
    assert [r["case_id"] for r in table] == ["S01", "S02"] and [float(r["age"]) for r in table] == [64.5, 81.0]
    predictor = Predictor.from_package(classifier, device="cpu")
    direct = predictor.predict_class_files([folder / "S02" / "S02-image.nii.gz"], 81.0)
    assert {k: float(v) for k, v in table[1].items() if k.startswith("prob_")} == pytest.approx({f"prob_{k}": v for k, v in direct.items()}, abs=1e-6)
    assert table[1]["label"] == max(direct, key=direct.get) and rows[1]["label"] == table[1]["label"]


def test_classifier_without_ages_names_every_case(tmp_path, classifier):
    folder = _subjects(tmp_path / "in", {"S02": 70})
    with pytest.raises(ValidationError) as err:
        predict_folder(classifier, folder, tmp_path / "out", progress=False, covariates=tmp_path / "ages.csv")
    assert "S01" in str(err.value) and "age" in str(err.value) and "S02" not in str(err.value).split("ages are needed")[1]
    with pytest.raises(ValidationError, match="S01"):  # no covariates at all: every case is named, the manifest is suggested
        predict_folder(classifier, folder, tmp_path / "out", progress=False)


def test_cli_predict_classifier_folder(tmp_path, classifier):
    folder = _subjects(tmp_path / "in", {"S01": 60, "S02": 75})
    out = subprocess.run([sys.executable, "-m", "medseg.cli", "predict", "--model", str(classifier), "--input", str(folder), "--out", str(tmp_path / "out"),
                          "--covariates", str(tmp_path / "ages.csv")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "labels and probabilities" in out.stdout and (tmp_path / "out" / "predictions.csv").is_file()


def test_classifier_reads_the_ages_from_an_ingested_manifest(tmp_path, classifier):
    from medseg import schemas

    folder = _subjects(tmp_path / "in")
    schemas.Manifest(dataset_name="d", source="s", source_format="classification",
                     cases=[{"case_id": c, "patient_id": c, "files": [], "class_label": "CN", "covariates": {"age": a, "sex": "F"}}
                            for c, a in (("S01", 66.0), ("S02", 77.0))]).save(folder)
    rows = predict_folder(classifier, folder, tmp_path / "out", progress=False)
    assert [r["age"] for r in rows] == [66.0, 77.0]
