"""BraTS 2021 and 2024 adapters on tiny synthetic sources in the challenges' exact layouts (16³ volumes)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import ValidationError
from medseg.ingest import ADAPTERS, detect_format, ingest
from medseg.ingest.adapters.brats import brats2023_patient_id
from medseg.schemas import DatasetJson, Manifest
from medseg.task import BRATS2023
BRATS_CHANNELS, BRATS_LABELS, BRATS_REGIONS = BRATS2023.channels, BRATS2023.labels_dict(), BRATS2023.regions_dict()

SHAPE = (16, 16, 16)
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])  # RAS+ already: voxel comparisons survive a reorientation at write time


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def write_case(
    folder: Path, separator: str, suffixes: tuple[str, ...], label_values: tuple[int, ...], seed: int
) -> dict[str, np.ndarray]:
    """A case folder ``folder/<name><sep><suffix>.nii.gz`` per suffix + ``seg``; returns suffix → array.

    Each channel has its own intensity range (100·i + noise) so a swapped channel cannot go unnoticed;
    the label map holds every value of ``label_values`` at least once.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for i, suffix in enumerate(suffixes):
        arrays[suffix] = (100.0 * (i + 1) + rng.random(SHAPE, dtype=np.float32) * 50).astype(np.float32)
        save(folder / f"{folder.name}{separator}{suffix}.nii.gz", arrays[suffix])
    seg = rng.choice(np.array(label_values, np.uint8), size=SHAPE)
    seg.ravel()[: len(label_values)] = label_values
    arrays["seg"] = seg
    save(folder / f"{folder.name}{separator}seg.nii.gz", seg)
    return arrays


def written(out: Path, relative: str) -> np.ndarray:
    return np.asarray(nib.load(str(out / relative)).dataobj)


# --------------------------------------------------------------------------- BraTS 2021
BRATS2021_SUFFIXES = ("t1", "t1ce", "t2", "flair")


def make_brats2021(root: Path, n_cases: int = 3) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """``root/src/BraTS2021_Training_Data/BraTS2021_0000i/…`` (one level below the source, as unpacked)."""
    src = root / "src"
    arrays = {}
    for i in range(n_cases):
        case = f"BraTS2021_{i:05d}"
        arrays[case] = write_case(src / "BraTS2021_Training_Data" / case, "_", BRATS2021_SUFFIXES, (0, 1, 2, 4), seed=i)
    return src, arrays


def test_brats2021_channels_renamed_and_et_remapped(tmp_path: Path) -> None:
    src, arrays = make_brats2021(tmp_path)
    assert detect_format(src) is ADAPTERS["brats2021"]
    out = tmp_path / "Dataset021_BraTS2021"
    manifest = ingest(src, out, n_folds=2, progress=False)

    assert manifest.source_format == "brats2021" and manifest.quarantined == []
    dataset = DatasetJson.load(out)
    assert dataset.channel_names == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    assert dataset.labels == BRATS_LABELS and dataset.regions == BRATS_REGIONS
    assert dataset.numTraining == 3

    by_case = {c["case_id"]: c for c in manifest.cases}
    assert sorted(by_case) == sorted(arrays)
    for case, source in arrays.items():
        assert by_case[case]["patient_id"] == case  # one scan per patient in 2021
        # t1n ← t1, t1c ← t1ce, t2w ← t2, t2f ← flair, voxel for voxel
        for index, suffix in enumerate(BRATS2021_SUFFIXES):
            np.testing.assert_array_equal(written(out, f"imagesTr/{case}_{index:04d}.nii.gz"), source[suffix])
        label = written(out, f"labelsTr/{case}.nii.gz")
        expected = np.where(source["seg"] == 4, 3, source["seg"])
        np.testing.assert_array_equal(label, expected)
        assert set(np.unique(label)) == {0, 1, 2, 3}
    files = by_case["BraTS2021_00001"]["files"]
    assert [(f["channel"], f["source"]) for f in files] == [
        ("t1n", "BraTS2021_00001_t1.nii.gz"),
        ("t1c", "BraTS2021_00001_t1ce.nii.gz"),
        ("t2w", "BraTS2021_00001_t2.nii.gz"),
        ("t2f", "BraTS2021_00001_flair.nii.gz"),
        ("label", "BraTS2021_00001_seg.nii.gz"),
    ]


def test_brats2021_label_3_is_reported(tmp_path: Path) -> None:
    src, _ = make_brats2021(tmp_path, n_cases=2)
    # label 3 is unused in BraTS 2021: with the remap 4 → 3 it would otherwise pass as "already ET"
    write_case(src / "BraTS2021_Training_Data" / "BraTS2021_00009", "_", BRATS2021_SUFFIXES, (0, 1, 3), seed=9)
    with pytest.raises(ValidationError) as info:
        ingest(src, tmp_path / "out", fmt="brats2021", strict=True, progress=False)
    assert len(info.value.problems) == 1
    case, file, problem = info.value.problems[0]
    assert (case, file) == ("BraTS2021_00009", "BraTS2021_00009_seg.nii.gz")
    assert "label values [3] outside the declared set [0, 1, 2, 4]" in problem

    manifest = ingest(src, tmp_path / "out", fmt="brats2021", n_folds=2, progress=False)  # default: quarantined
    assert sorted(c["case_id"] for c in manifest.cases) == ["BraTS2021_00000", "BraTS2021_00001"]
    assert [q["case"] for q in manifest.quarantined] == ["BraTS2021_00009"]


def test_brats2021_missing_channel_is_reported(tmp_path: Path) -> None:
    src, _ = make_brats2021(tmp_path, n_cases=3)
    (src / "BraTS2021_Training_Data" / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz").unlink()
    manifest = ingest(src, tmp_path / "out", n_folds=2, progress=False)
    assert manifest.source_format == "brats2021"
    assert manifest.quarantined == [
        {"case": "BraTS2021_00002", "file": "BraTS2021_00002_t1ce.nii.gz", "problem": "missing t1c channel file"}
    ]


def test_brats2021_needs_a_complete_case_to_be_detected(tmp_path: Path) -> None:
    # a lone "<case>_flair.nii.gz" is too weak a hint: it should not make any folder a BraTS 2021 source
    lone = tmp_path / "lone" / "case1"
    save(lone / "case1_flair.nii.gz", np.ones(SHAPE, np.float32))
    assert not ADAPTERS["brats2021"].detect(tmp_path / "lone")
    # BraTS 2020 uses the same names (BraTS20_Training_001_flair.nii): covered by the same adapter
    src = tmp_path / "brats2020"
    write_case(src / "BraTS20_Training_001", "_", BRATS2021_SUFFIXES, (0, 1, 2, 4), seed=0)
    assert detect_format(src) is ADAPTERS["brats2021"]


# --------------------------------------------------------------------------- BraTS 2024
def make_brats2023_layout(src: Path, n_cases: int, label_values: tuple[int, ...]) -> dict[str, dict[str, np.ndarray]]:
    arrays = {}
    for i in range(n_cases):
        case = f"BraTS-GLI-{i:05d}-100"
        arrays[case] = write_case(src / case, "-", BRATS_CHANNELS, label_values, seed=i)
    return arrays


def test_brats2024_detected_by_resection_cavity_label(tmp_path: Path) -> None:
    src = tmp_path / "training_data1_v2"  # the name says nothing about the year
    arrays = make_brats2023_layout(src, 3, (0, 1, 2, 3))
    assert detect_format(src) is ADAPTERS["brats2023"]  # no 4 in the label maps: 2023
    # one case now has a resection cavity (4): rewritten over its 2023-like files
    arrays["BraTS-GLI-00002-100"] = write_case(src / "BraTS-GLI-00002-100", "-", BRATS_CHANNELS, (0, 1, 2, 3, 4), seed=7)

    out = tmp_path / "Dataset024_BraTS2024"
    manifest = ingest(src, out, n_folds=2, progress=False)
    assert manifest.source_format == "brats2024" and manifest.quarantined == []
    dataset = DatasetJson.load(out)
    assert dataset.channel_names == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    assert dataset.labels == {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}
    assert dataset.regions == {"WT": [1, 2, 3], "TC": [1, 3], "NETC": [1], "SNFH": [2], "ET": [3], "RC": [4]}
    by_case = {c["case_id"]: c for c in manifest.cases}
    assert by_case["BraTS-GLI-00002-100"]["patient_id"] == "BraTS-GLI-00002"
    for case, source in arrays.items():
        for index, channel in enumerate(BRATS_CHANNELS):
            np.testing.assert_array_equal(written(out, f"imagesTr/{case}_{index:04d}.nii.gz"), source[channel])
        np.testing.assert_array_equal(written(out, f"labelsTr/{case}.nii.gz"), source["seg"])  # no remap
    assert 4 in written(out, "labelsTr/BraTS-GLI-00002-100.nii.gz")


def test_brats2024_detected_by_folder_name(tmp_path: Path) -> None:
    # in the source's own name, or in the archive folder one level below
    named = tmp_path / "BraTS2024-GLI-post-treatment"
    make_brats2023_layout(named, 1, (0, 1, 2, 3))
    assert detect_format(named) is ADAPTERS["brats2024"]
    archive = tmp_path / "src"
    make_brats2023_layout(archive / "BraTS2024-BraTS-GLI-TrainingData", 1, (0, 1, 2, 3))
    assert detect_format(archive) is ADAPTERS["brats2024"]

    # a "2024" that is a case number, or a dated folder without "brats", says nothing about the year
    above = tmp_path / "BraTS2024-work" / "src"  # folders above the source are not looked at
    write_case(above / "BraTS-GLI-00001-000", "-", BRATS_CHANNELS, (0, 1, 2, 3), seed=1)
    assert detect_format(above) is ADAPTERS["brats2023"]
    dated = tmp_path / "scans_2024"
    write_case(dated / "BraTS-GLI-02024-000", "-", BRATS_CHANNELS, (0, 1, 2, 3), seed=0)
    assert detect_format(dated) is ADAPTERS["brats2023"]


def test_brats2024_label_4_under_brats2023_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_brats2023_layout(src, 2, (0, 1, 2, 3, 4))
    with pytest.raises(ValidationError) as info:
        ingest(src, tmp_path / "out", fmt="brats2023", strict=True, progress=False)
    assert {p for _, _, p in info.value.problems} == {"label values [4] outside the declared set [0, 1, 2, 3]"}


def test_brats2024_unreadable_label_does_not_break_detection(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_brats2023_layout(src, 2, (0, 1, 2, 3))
    seg = src / "BraTS-GLI-00000-100" / "BraTS-GLI-00000-100-seg.nii.gz"
    seg.write_bytes(seg.read_bytes()[:100])  # truncated: validation reports it, detection looks further
    assert detect_format(src) is ADAPTERS["brats2023"]
    manifest = ingest(src, tmp_path / "out", n_folds=2, progress=False)
    assert [(q["case"], q["file"]) for q in manifest.quarantined] == [("BraTS-GLI-00000-100", seg.name)]
    assert "truncated" in manifest.quarantined[0]["problem"]
    assert Manifest.load(tmp_path / "out").source_format == "brats2023"


def test_brats2023_patient_id_rule() -> None:
    assert brats2023_patient_id("BraTS-GLI-00005-101") == "BraTS-GLI-00005"
    assert brats2023_patient_id("BraTS-MET-00123-000") == "BraTS-MET-00123"
    assert brats2023_patient_id("liver-001") is None  # not a BraTS id: its cases must not merge into "liver"
    assert brats2023_patient_id("BraTS2021_00000") is None
