"""Classification adapter on tiny folders of 16³ NIfTI images with a labels CSV."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.ingest import ADAPTERS, check_case, detect_format, ingest
from medseg.ingest.adapters.classification import ClassificationAdapter, class_order
from medseg.schemas import DatasetJson, Manifest, Splits

SHAPE = (16, 16, 16)
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])
CSV_TEXT = """Subject,Label,Age,Sex,Site
S01,CN,71.5,M,a
S02,MCI,68,F,a
S03,AD,80.25,female,b
S04,CN,65,F,b
S05,AD,77,m,a
S06,MCI,73,,b
"""


def write_image(path: Path, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).random(SHAPE, dtype=np.float32) * 100 + 1
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return array


def make_classification_source(root: Path, csv_text: str = CSV_TEXT, csv_name: str = "labels.csv") -> tuple[Path, dict[str, np.ndarray]]:
    """Images in all three accepted places: SRC/<s>.nii.gz, SRC/images/<s>.nii, SRC/<s>/<any>.nii.gz."""
    src = root / "adni"
    places = {"S01": "S01.nii.gz", "S02": "images/S02.nii", "S03": "S03/T1w.nii.gz",
              "S04": "S04.nii", "S05": "images/S05.nii.gz", "S06": "S06/scan_1.nii.gz"}
    written = {subject: write_image(src / place, seed) for seed, (subject, place) in enumerate(places.items())}
    (src / csv_name).write_text(csv_text)
    return src, written


def write_brats_case(src: Path, case_id: str) -> None:
    folder = src / case_id
    folder.mkdir(parents=True)
    for suffix in ("t1n", "t1c", "t2w", "t2f", "seg"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(folder / f"{case_id}-{suffix}.nii.gz"))


def problems_of(src: Path) -> list[tuple[str, str, str]]:
    adapter = ADAPTERS["classification"].configure(src)
    return [row for case in adapter.discover(src) for row in check_case(case, adapter).problems]


# --------------------------------------------------------------------------- configure / discover / check
def test_configure_discover_and_check(tmp_path: Path) -> None:
    src, written = make_classification_source(tmp_path)
    adapter = ADAPTERS["classification"].configure(src)
    assert adapter.task == "classification" and not adapter.pseudonymize_by_default
    assert adapter.labels == {"CN": 0, "MCI": 1, "AD": 2}  # the clinical order, not sorted
    assert adapter.regions == {} and adapter.channel_names == ("image",)
    assert ADAPTERS["classification"].labels == {}  # the registry instance is left unconfigured

    cases = adapter.discover(src)
    assert [c.case_id for c in cases] == ["S01", "S02", "S03", "S04", "S05", "S06"]
    by_id = {c.case_id: c for c in cases}
    assert by_id["S01"].class_label == "CN" and by_id["S01"].covariates == {"age": 71.5, "sex": "M"}
    assert by_id["S03"].covariates == {"age": 80.25, "sex": "F"} and by_id["S05"].covariates["sex"] == "M"
    assert by_id["S06"].covariates == {"age": 73.0}  # empty sex: left out
    assert all(c.patient_id == c.case_id and c.has_label for c in cases)
    assert by_id["S02"].channel_files["image"] == src / "images" / "S02.nii"
    assert by_id["S06"].channel_files["image"] == src / "S06" / "scan_1.nii.gz"
    for case in cases:
        check = check_case(case, adapter)
        assert check.ok, check.problems
        assert check.label is None
        np.testing.assert_array_equal(check.images["image"].array, written[case.case_id])


def test_class_order() -> None:
    assert class_order({"AD", "CN", "MCI"}) == ["CN", "MCI", "AD"]
    assert class_order({"AD", "CN"}) == ["CN", "AD"]
    assert class_order({"tumour", "healthy", "benign"}) == ["benign", "healthy", "tumour"]
    assert class_order({"CN", "AD", "other"}) == ["AD", "CN", "other"]


def test_ingest_writes_classes_and_covariates(tmp_path: Path) -> None:
    src, written = make_classification_source(tmp_path)
    out = tmp_path / "Dataset030_ADNI"
    manifest = ingest(src, out, n_folds=2, test_fraction=0.0, progress=False)
    dataset = DatasetJson.load(out)
    assert manifest.source_format == "classification" and dataset.task == "classification"
    assert dataset.labels == {"CN": 0, "MCI": 1, "AD": 2} and dataset.channel_names == {"0": "image"}
    assert manifest.quarantined == []
    cases = {c["case_id"]: c for c in Manifest.load(out).cases}
    assert cases["S03"]["class_label"] == "AD" and cases["S03"]["covariates"] == {"age": 80.25, "sex": "F"}
    assert all(c["has_label"] for c in cases.values())
    assert not list((out / "labelsTr").iterdir())  # classification: no label maps
    for subject, array in written.items():
        img = nib.load(str(out / "imagesTr" / f"{subject}_0000.nii.gz"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), array)
    splits = Splits.load(out)
    assert sorted(c for fold in splits.folds for c in fold["val"]) == sorted(written)


# --------------------------------------------------------------------------- CSV variants and detection
def test_csv_names_delimiters_and_header_case(tmp_path: Path) -> None:
    text = "SUBJECT;label;AGE\nS01;healthy;50\nS02;tumour;60\nS03;healthy;55\nS04;tumour;61\nS05;healthy;70\nS06;tumour;40\n"
    src, _ = make_classification_source(tmp_path, csv_text=text, csv_name="cohort_2024.csv")  # the only .csv
    adapter = ADAPTERS["classification"].configure(src)
    assert adapter.labels == {"healthy": 0, "tumour": 1}
    assert all(check_case(c, adapter).ok for c in adapter.discover(src))
    assert detect_format(src) is ADAPTERS["classification"]

    (src / "other.csv").write_text("a,b\n")
    with pytest.raises(MedsegError, match="several CSV files"):
        ADAPTERS["classification"].configure(src)
    (src / "cohort_2024.csv").rename(src / "subjects.csv")  # a known name wins over other CSVs
    assert ADAPTERS["classification"].configure(src).labels == {"healthy": 0, "tumour": 1}


def test_auto_detect_not_on_brats(tmp_path: Path) -> None:
    src, _ = make_classification_source(tmp_path)
    assert detect_format(src) is ADAPTERS["classification"]
    brats = tmp_path / "brats"
    write_brats_case(brats, "BraTS-GLI-00000-000")
    assert not ADAPTERS["classification"].detect(brats)
    assert detect_format(brats) is ADAPTERS["brats2023"]
    (brats / "notes.csv").write_text("case,comment\nBraTS-GLI-00000-000,ok\n")  # a CSV without subject/label
    assert not ADAPTERS["classification"].detect(brats)


def test_missing_column_names_the_csv(tmp_path: Path) -> None:
    src, _ = make_classification_source(tmp_path, csv_text="subject,label\nS01,CN\n")
    with pytest.raises(MedsegError, match="no column\\(s\\) age") as info:
        ClassificationAdapter().configure(src)
    assert "labels.csv" in str(info.value)


# --------------------------------------------------------------------------- bad input → problem rows
def test_bad_rows_and_files_give_problem_rows(tmp_path: Path) -> None:
    text = CSV_TEXT + "S07,AD,70,M,a\nS08,CN,seventy,F,a\nS02,AD,50,F,b\nS09,,60,M,a\n"
    src, _ = make_classification_source(tmp_path, csv_text=text)
    write_image(src / "S08.nii.gz", 8)
    write_image(src / "S09.nii.gz", 9)
    write_image(src / "images" / "S99.nii.gz", 99)  # no CSV row
    write_image(src / "S04" / "other.nii.gz", 4)  # S04 is also SRC/S04.nii: two images
    write_image(src / "S06" / "scan_2.nii.gz", 6)  # a subject folder with two images
    rows = problems_of(src)
    assert ("S07", "labels.csv", "row 8: no image for subject 'S07' (looked for S07.nii[.gz] in the folder "
                                 "and in images/, and for a folder S07/)") in rows
    assert ("S08", "labels.csv", "row 9: age 'seventy' is not a number") in rows
    assert ("S02", "labels.csv", "row 3: subject listed 2 times (rows 3, 10)") in rows
    assert ("S09", "labels.csv", "row 11: empty label") in rows
    assert ("S99", "S99.nii.gz", "image has no row in labels.csv (no class label)") in rows
    assert ("S04", "other.nii.gz", "second image for subject 'S04' (also S04.nii)") in rows
    assert ("S06", "S06", "subject folder holds 2 NIfTI files (scan_1.nii.gz, scan_2.nii.gz); expected one") in rows
    assert {case for case, _, _ in rows} == {"S02", "S04", "S06", "S07", "S08", "S09", "S99"}

    manifest = ingest(src, tmp_path / "out", progress=False, n_folds=2, test_fraction=0.0)
    assert sorted(c["case_id"] for c in manifest.cases) == ["S01", "S03", "S05"]
    assert {q["case"] for q in manifest.quarantined} == {"S02", "S04", "S06", "S07", "S08", "S09", "S99"}


def test_class_outside_configured_set_is_reported(tmp_path: Path) -> None:
    src, _ = make_classification_source(tmp_path)
    adapter = ClassificationAdapter().with_definitions(labels={"CN": 0, "AD": 1})
    rows = [row for case in adapter.discover(src) for row in check_case(case, adapter).problems]
    assert {case for case, _, _ in rows} == {"S02", "S06"}
    assert all("class 'MCI' outside the declared classes" in p for _, _, p in rows)
