"""``medseg synth --layout L``: every layout is written tiny, auto-detected by ingest as the right source
format, ingested without quarantine, holds the expected labels and contrasts, and is deterministic."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from medseg import synth, synth_layouts
from medseg.errors import MedsegError
from medseg.ingest.ingest import ingest

BRATS_CHANNELS = {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
BRATS_LABELS = {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}

# layout → (shape, cases, adapter, channel_names, labels, task, label values expected over all cases,
#           a file of case 0 relative to OUT, for the determinism check)
SPECS: dict[str, dict[str, Any]] = {
    "brats2023": dict(
        shape=(32, 32, 32), n=4, fmt="brats2023", channels=BRATS_CHANNELS, labels=BRATS_LABELS,
        task="segmentation", values={0, 1, 2, 3}, file="BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz",
    ),
    "brats2024": dict(
        shape=(32, 32, 32), n=4, fmt="brats2024", channels=BRATS_CHANNELS, labels={**BRATS_LABELS, "RC": 4},
        task="segmentation", values={0, 1, 2, 3, 4},
        file="BraTS2024-BraTS-GLI-TrainingData/BraTS-GLI-00000-100/BraTS-GLI-00000-100-seg.nii.gz",
    ),
    "mets": dict(
        shape=(40, 40, 40), n=4, fmt="brats2023", channels=BRATS_CHANNELS, labels=BRATS_LABELS,
        task="segmentation", values={0, 1, 2, 3},
        file="ASNR-MICCAI-BraTS2023-MET-Challenge-TrainingData/BraTS-MET-00000-000/BraTS-MET-00000-000-seg.nii.gz",
    ),
    "lgg": dict(
        shape=(48, 40, 8), n=4, fmt="lgg", channels={"0": "pre_contrast", "1": "flair", "2": "post_contrast"},
        labels={"background": 0, "abnormality": 1}, task="segmentation", values={0, 1}, file=None,
    ),
    "classification": dict(
        shape=(24, 28, 24), n=6, fmt="classification", channels={"0": "image"}, labels={"CN": 0, "MCI": 1, "AD": 2},
        task="classification", values=None, file="labels.csv",
    ),
    "dicom": dict(
        shape=(32, 28, 8), n=4, fmt="dicom", channels={"0": "flair", "1": "t1c"}, labels={"background": 0, "label_1": 1},
        task="segmentation", values={0, 1}, file="patient_0000/seg.nii.gz",
    ),
    "msd": dict(
        shape=(24, 32, 24), n=4, fmt="msd", channels={"0": "MRI"}, labels={"background": 0, "Anterior": 1, "Posterior": 2},
        task="segmentation", values={0, 1, 2}, file="Task04_Hippocampus/labelsTr/hippocampus_000.nii.gz",
    ),
}
SEED = 11


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _case_arrays(dataset: Path, case_id: str, channels: dict[str, str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    images = {name: _array(dataset / "imagesTr" / f"{case_id}_{int(index):04d}.nii.gz").astype(np.float64) for index, name in channels.items()}
    label = dataset / "labelsTr" / f"{case_id}.nii.gz"
    return images, (_array(label) if label.exists() else None)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """Every layout written once (seed SEED) into its own folder."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout, spec in SPECS.items():
        src = root / layout
        ids = synth_layouts.generate_layout(layout, src, spec["n"], SEED, shape=spec["shape"], progress=False)
        out[layout] = (src, ids)
    return out


@pytest.mark.parametrize("layout", list(SPECS))
def test_layout_ingests_as_its_format(layout: str, written: dict[str, tuple[Path, list[str]]], tmp_path: Path) -> None:
    spec = SPECS[layout]
    src, ids = written[layout]
    assert len(ids) == spec["n"] and len(set(ids)) == spec["n"]
    dataset = tmp_path / "dataset"
    manifest = ingest(src, dataset, fmt="auto", n_folds=2, test_fraction=0.25, progress=False)

    assert manifest.source_format == spec["fmt"]
    assert manifest.quarantined == []
    assert len(manifest.cases) == spec["n"] and all(c["has_label"] for c in manifest.cases)
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["channel_names"] == spec["channels"]
    assert dj["labels"] == spec["labels"]
    assert dj.get("task", "segmentation") == spec["task"]
    assert dj["synthetic"]["generator"] == "medseg synth" and dj["synthetic"]["layout"] == layout  # the model card's "synthetic data" limit
    if layout != "dicom":  # DICOM ids are pseudonymised by default
        assert sorted(c["case_id"] for c in manifest.cases) == sorted(ids)

    if spec["values"] is not None:
        found: set[int] = set()
        for case in manifest.cases:
            found |= {int(v) for v in np.unique(_array(dataset / "labelsTr" / f"{case['case_id']}.nii.gz"))}
        assert found == spec["values"]
    _check_content(layout, dataset, manifest.cases, spec)


def _check_content(layout: str, dataset: Path, cases: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    """The contrasts that make each layout learnable, on the ingested (RAS) data: also proves that the
    label lies on the image voxels it describes (a flipped or transposed label would fail)."""
    for case in cases:
        images, label = _case_arrays(dataset, case["case_id"], spec["channels"])
        if layout in ("brats2023", "brats2024", "mets"):
            brain = images["t1n"] > 0
            healthy = brain & (label == 0)
            assert images["t1c"][label == 3].mean() > 1.3 * images["t1c"][healthy].mean()  # ET enhances
            assert images["t2f"][label == 2].mean() > 1.3 * images["t2f"][healthy].mean()  # edema bright on FLAIR
            if (label == 4).any():  # resection cavity: fluid, bright on T2, dark on T1c
                assert images["t2w"][label == 4].mean() > 1.3 * images["t2w"][healthy].mean()
                assert images["t1c"][label == 4].mean() < 0.8 * images["t1c"][healthy].mean()
        elif layout == "lgg":
            assert label.shape == (spec["shape"][1], spec["shape"][0], spec["shape"][2])  # (cols, rows, slices)
            brain = images["flair"] > 0
            assert images["flair"][label == 1].mean() > 1.5 * images["flair"][brain & (label == 0)].mean()
            per_slice = (label > 0).any(axis=(0, 1))
            assert per_slice.any() and not per_slice[0] and not per_slice[-1]  # a run of slices, not all
        elif layout == "dicom":
            head = images["flair"] > 100  # background noise is ~25
            assert images["flair"][label == 1].mean() > 1.6 * images["flair"][head & (label == 0)].mean()
            assert images["t1c"][label == 1].mean() > 1.4 * images["t1c"][head & (label == 0)].mean()
        elif layout == "msd":
            rest = images["MRI"][label == 0].mean()
            anterior, posterior = images["MRI"][label == 1].mean(), images["MRI"][label == 2].mean()
            assert posterior < anterior < 0.9 * rest
            centre_y = [np.argwhere(label == v)[:, 1].mean() for v in (1, 2)]
            assert centre_y[0] > centre_y[1]  # anterior lies at larger A (RAS) than posterior
    if layout == "classification":
        by_class: dict[str, list[float]] = {}
        for case in cases:
            image = _case_arrays(dataset, case["case_id"], spec["channels"])[0]["image"]
            brain = image > 0
            csf_fraction = float((brain & (image < 450)).sum() / brain.sum())  # CSF is ~250, GM ~600, WM ~850
            by_class.setdefault(case["class_label"], []).append(csf_fraction)
            assert 55 <= case["covariates"]["age"] <= 92 and case["covariates"]["sex"] in ("M", "F")
        assert {k: len(v) for k, v in by_class.items()} == {"CN": 2, "MCI": 2, "AD": 2}  # balanced
        assert np.mean(by_class["CN"]) < np.mean(by_class["MCI"]) < np.mean(by_class["AD"])  # atrophy shows


@pytest.mark.parametrize("layout", list(SPECS))
def test_same_seed_same_bytes(layout: str, written: dict[str, tuple[Path, list[str]]], tmp_path: Path) -> None:
    """Case 0 written alone (n_cases=1) equals case 0 of the bigger run byte for byte."""
    spec = SPECS[layout]
    src, ids = written[layout]
    again = tmp_path / "again"
    ids_again = synth_layouts.generate_layout(layout, again, 1, SEED, shape=spec["shape"], progress=False)
    assert ids_again == ids[:1]
    if layout == "lgg":
        relative = [f"kaggle_3m/{ids[0]}/{ids[0]}_3.tif", f"kaggle_3m/{ids[0]}/{ids[0]}_3_mask.tif"]
    elif layout == "dicom":
        relative = [spec["file"], *(str(p.relative_to(src)) for p in sorted((src / "patient_0000" / "t1c").iterdir())[:2])]
    elif layout == "classification":
        relative = [f"images/{ids[0]}.nii.gz"]
    else:
        relative = [spec["file"]]
    for rel in relative:
        assert (again / rel).read_bytes() == (src / rel).read_bytes(), rel
    if layout == "classification":
        first_row = (src / "labels.csv").read_text().splitlines()[:2]
        assert (again / "labels.csv").read_text().splitlines() == first_row
    assert not list(again.rglob(".*.tmp"))  # no temporary folders or files left behind


def test_dicom_files_are_real_series(written: dict[str, tuple[Path, list[str]]]) -> None:
    import pydicom

    src, _ = written["dicom"]
    rows, cols, slices = SPECS["dicom"]["shape"]
    series = {}
    for channel in ("flair", "t1c"):
        files = sorted((src / "patient_0000" / channel).glob("*.dcm"))
        assert len(files) == slices
        datasets = [pydicom.dcmread(f) for f in files]
        first = datasets[0]
        assert (first.Rows, first.Columns) == (rows, cols) and first.Modality == "MR"
        assert first.pixel_array.shape == (rows, cols) and first.pixel_array.dtype == np.int16
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        z = [float(d.ImagePositionPatient[2]) for d in datasets]
        assert np.allclose(np.diff(z), float(first.SliceThickness), atol=1e-3)
        assert len({d.SeriesInstanceUID for d in datasets}) == 1 and len({d.SOPInstanceUID for d in datasets}) == slices
        series[channel] = first
    assert series["flair"].SeriesInstanceUID != series["t1c"].SeriesInstanceUID
    assert series["flair"].StudyInstanceUID == series["t1c"].StudyInstanceUID
    assert series["flair"].PatientID == series["t1c"].PatientID
    seg = nib.load(str(src / "patient_0000" / "seg.nii.gz"))
    assert seg.shape == (cols, rows, slices)  # (column, row, slice), the adapter's voxel order
    assert nib.aff2axcodes(seg.affine) == ("L", "P", "S")  # i → patient left, j → posterior: DICOM's LPS


def test_msd_dataset_json_and_test_images(tmp_path: Path) -> None:
    ids = synth_layouts.write_msd(tmp_path, 2, 0, shape=(16, 20, 16), progress=False, n_test=1)
    task = tmp_path / "Task04_Hippocampus"
    data = json.loads((task / "dataset.json").read_text())
    assert data["modality"] == {"0": "MRI"} and data["tensorImageSize"] == "3D"
    assert data["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert data["numTraining"] == 2 and len(data["training"]) == 2 and data["test"] == ["./imagesTs/hippocampus_002.nii.gz"]
    assert ids == ["hippocampus_000", "hippocampus_001", "hippocampus_002"]
    for entry in data["training"]:
        assert (task / entry["image"]).is_file() and (task / entry["label"]).is_file()
        assert len(nib.load(str(task / entry["image"])).shape) == 3
    assert (task / "imagesTs" / "hippocampus_002.nii.gz").is_file()
    manifest = ingest(tmp_path, tmp_path.parent / "msd_ds", n_folds=2, test_fraction=0.5, progress=False)
    assert manifest.quarantined == [] and sum(not c["has_label"] for c in manifest.cases) == 1


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="unknown layout"):
        synth_layouts.generate_layout("brats2019", tmp_path, 1, 0)
    with pytest.raises(MedsegError, match="ROWS COLS SLICES"):
        synth_layouts.generate_layout("lgg", tmp_path, 1, 0, shape=(64, 64, 2), progress=False)
    with pytest.raises(MedsegError):
        synth_layouts.generate_layout("msd", tmp_path, 0, 0, progress=False)
    with pytest.raises(MedsegError):
        synth_layouts.generate_layout("dicom", tmp_path, 1, -1, progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_layout_and_default_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    assert parser.parse_args(["--out", str(tmp_path)]).layout == "brats2023"
    # no --shape: the layout's own default (lgg: 64 rows, 64 columns, 16 slices)
    args = parser.parse_args(["--out", str(tmp_path / "lgg"), "--cases", "1", "--layout", "lgg", "--seed", "3"])
    args.progress = False
    assert synth.run(args) == 0
    assert "wrote 1 lgg cases" in capsys.readouterr().out
    folder = next((tmp_path / "lgg" / "kaggle_3m").glob("TCGA_*"))
    assert len(list(folder.glob("*_mask.tif"))) == 16
    # an explicit --shape is taken as given
    args = parser.parse_args(["--out", str(tmp_path / "cls"), "--cases", "3", "--layout", "classification", "--shape", "20", "22", "18"])
    args.progress = False
    assert synth.run(args) == 0
    image = next((tmp_path / "cls" / "images").glob("*.nii.gz"))
    assert nib.load(str(image)).shape == (20, 22, 18)
    assert (tmp_path / "cls" / "labels.csv").read_text().splitlines()[0] == "subject,label,age,sex"
