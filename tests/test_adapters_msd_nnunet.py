"""Medical Segmentation Decathlon and nnU-Net v2 raw adapters on tiny synthetic sources (16³ volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError, ValidationError
from medseg.ingest import ADAPTERS, detect_format, ingest
from medseg.io import load_nifti_4d
from medseg.schemas import DatasetJson
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()

SHAPE = (16, 16, 16)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])  # RAS+ already: voxel comparisons survive a reorientation at write time


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def image(seed: int, n_channels: int) -> np.ndarray:
    """I×J×K×C float32; channel c lies in [100(c+1), 100(c+1)+50) so a swapped channel shows."""
    rng = np.random.default_rng(seed)
    channels = [100.0 * (c + 1) + rng.random(SHAPE, dtype=np.float32) * 50 for c in range(n_channels)]
    return np.stack(channels, axis=-1).astype(np.float32)


def label(seed: int, values: tuple[int, ...]) -> np.ndarray:
    seg = np.random.default_rng(seed + 1000).choice(np.array(values, np.uint8), size=SHAPE)
    seg.ravel()[: len(values)] = values  # every value present
    return seg


def written(out: Path, relative: str) -> np.ndarray:
    return np.asarray(nib.load(str(out / relative)).dataobj)


# --------------------------------------------------------------------------- MSD
BRAIN_TUMOUR_JSON = {
    "name": "BRATS",
    "tensorImageSize": "4D",
    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}


def make_msd(task: Path, dataset_json: dict, cases: dict[str, np.ndarray], labels: dict[str, np.ndarray],
             test: dict[str, np.ndarray] | None = None, listed_missing: tuple[str, ...] = ()) -> None:
    """An MSD task folder: images (3D or 4D) in imagesTr/imagesTs, labels in labelsTr, the lists in
    dataset.json, and macOS ``._`` resource forks beside every file (as the Decathlon tars hold)."""
    test = test or {}
    for case, array in cases.items():
        save(task / "imagesTr" / f"{case}.nii.gz", array)
        save(task / "labelsTr" / f"{case}.nii.gz", labels[case])
        (task / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
        (task / "labelsTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    for case, array in test.items():
        save(task / "imagesTs" / f"{case}.nii.gz", array)
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in (*cases, *listed_missing)]
    write_json(task / "dataset.json", {
        **dataset_json, "numTraining": len(training), "numTest": len(test),
        "training": training, "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    })


def test_msd_brain_tumour_maps_onto_brats(tmp_path: Path) -> None:
    cases = {f"BRATS_{i:03d}": image(i, 4) for i in (1, 2, 3)}
    labels = {case: label(i, (0, 1, 2, 3)) for i, case in enumerate(cases)}
    src = tmp_path / "src"
    make_msd(src / "Task01_BrainTumour", BRAIN_TUMOUR_JSON, cases, labels, test={"BRATS_900": image(900, 4)})
    assert detect_format(src) is ADAPTERS["msd"]

    out = tmp_path / "Dataset001_MSDBrainTumour"
    manifest = ingest(src, out, n_folds=2, progress=False)
    assert manifest.source_format == "msd" and manifest.quarantined == []  # ._ files skipped, not reported
    dataset = DatasetJson.load(out)
    # the same contract as a BraTS 2023 dataset
    assert dataset.channel_names == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    assert dataset.labels == BRATS_LABELS and dataset.regions == BRATS_REGIONS
    assert dataset.numTraining == 3

    source_axis = {"t1n": 1, "t1c": 2, "t2w": 3, "t2f": 0}  # T1w, t1gd, T2w, FLAIR
    for case, array in cases.items():
        for index, channel in enumerate(("t1n", "t1c", "t2w", "t2f")):
            np.testing.assert_array_equal(written(out, f"imagesTr/{case}_{index:04d}.nii.gz"), array[..., source_axis[channel]])
        expected = np.choose(labels[case], [0, 2, 1, 3])  # edema 1 → 2, non-enhancing 2 → 1, enhancing 3 → 3
        np.testing.assert_array_equal(written(out, f"labelsTr/{case}.nii.gz"), expected)
    np.testing.assert_array_equal(written(out, "imagesTs/BRATS_900_0003.nii.gz"), image(900, 4)[..., 0])
    header = nib.load(str(out / "imagesTr/BRATS_001_0000.nii.gz")).header
    assert header["dim"][0] == 3 and tuple(header.get_zooms()) == (1.5, 1.5, 2.0)
    by_case = {c["case_id"]: c for c in manifest.cases}
    assert by_case["BRATS_002"]["patient_id"] == "BRATS_002"
    assert {f["source"] for f in by_case["BRATS_002"]["files"]} == {"BRATS_002.nii.gz"}


def test_msd_wrong_4d_length_and_listed_missing_file_are_reported(tmp_path: Path) -> None:
    cases = {"BRATS_001": image(1, 4), "BRATS_002": image(2, 4), "BRATS_003": image(3, 3)}  # 003: a modality short
    labels = {case: label(i, (0, 1, 2, 3)) for i, case in enumerate(cases)}
    task = tmp_path / "Task01_BrainTumour"
    make_msd(task, BRAIN_TUMOUR_JSON, cases, labels, listed_missing=("BRATS_004",))

    with pytest.raises(ValidationError) as info:
        ingest(task, tmp_path / "out", strict=True, progress=False)
    assert info.value.problems == [
        ("BRATS_003", "BRATS_003.nii.gz",
         "image 16×16×16×3 holds 3 volume(s) along its 4th axis, but dataset.json declares 4 modalities"),
        ("BRATS_004", "BRATS_004.nii.gz", "missing image file (channels t1n, t1c, t2w, t2f)"),
        ("BRATS_004", "BRATS_004.nii.gz", "missing label file (the case is a training case: in imagesTr or 'training')"),
    ]


def test_msd_other_tasks_take_names_from_dataset_json(tmp_path: Path) -> None:
    # 3D, one modality (Task02_Heart-like)
    heart = tmp_path / "Task02_Heart"
    cases = {f"la_{i:03d}": image(i, 1)[..., 0] for i in range(3)}
    labels = {case: label(i, (0, 1)) for i, case in enumerate(cases)}
    make_msd(heart, {"name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"}},
             cases, labels)
    manifest = ingest(heart, tmp_path / "heart", fmt="msd", n_folds=2, progress=False)
    dataset = DatasetJson.load(tmp_path / "heart")
    assert dataset.channel_names == {"0": "MRI"}
    assert dataset.labels == {"background": 0, "left atrium": 1} and dataset.regions == {"left atrium": [1]}
    assert len(manifest.cases) == 3
    for case, array in cases.items():
        np.testing.assert_array_equal(written(tmp_path / "heart", f"imagesTr/{case}_0000.nii.gz"), array)
        np.testing.assert_array_equal(written(tmp_path / "heart", f"labelsTr/{case}.nii.gz"), labels[case])

    # 4D, two modalities kept in their order (Task05_Prostate-like); a 3D image there is a problem
    prostate = tmp_path / "Task05_Prostate"
    cases = {f"prostate_{i:02d}": image(i, 2) for i in range(3)}
    cases["prostate_09"] = image(9, 2)[..., 0]
    labels = {case: label(i, (0, 1, 2)) for i, case in enumerate(cases)}
    make_msd(prostate, {"name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"},
                        "labels": {"0": "background", "1": "PZ", "2": "TZ"}}, cases, labels)
    manifest = ingest(prostate, tmp_path / "prostate", n_folds=2, progress=False)
    dataset = DatasetJson.load(tmp_path / "prostate")
    assert dataset.channel_names == {"0": "T2", "1": "ADC"}
    assert dataset.labels == {"background": 0, "PZ": 1, "TZ": 2} and dataset.regions == {"PZ": [1], "TZ": [2]}
    assert [(q["case"], q["problem"]) for q in manifest.quarantined] == [
        ("prostate_09", "image 16×16×16×1 holds 1 volume(s) along its 4th axis, but dataset.json declares 2 modalities")
    ]
    for index in (0, 1):
        np.testing.assert_array_equal(written(tmp_path / "prostate", f"imagesTr/prostate_01_{index:04d}.nii.gz"),
                                      cases["prostate_01"][..., index])


def test_msd_bad_dataset_json_names_the_file(tmp_path: Path) -> None:
    task = tmp_path / "Task09_Spleen"
    make_msd(task, {"modality": {"0": "CT"}, "labels": {"1": "spleen"}}, {"spleen_1": image(1, 1)[..., 0]},
             {"spleen_1": label(1, (0, 1))})
    with pytest.raises(MedsegError, match="must declare the background value 0") as info:
        ingest(task, tmp_path / "out", progress=False)
    assert str(task / "dataset.json") in str(info.value)


# --------------------------------------------------------------------------- nnU-Net v2 raw
def make_nnunet(root: Path, dataset_json: dict, cases: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                test: dict[str, np.ndarray] | None = None, ending: str = ".nii.gz") -> None:
    """An nnU-Net v2 raw folder: ``imagesTr/CASE_XXXX<ending>`` per channel, ``labelsTr/CASE<ending>``."""
    for folder, group in (("imagesTr", cases), ("imagesTs", test or {})):
        for case, array in group.items():
            for c in range(array.shape[-1]):
                save(root / folder / f"{case}_{c:04d}{ending}", array[..., c])
    for case, seg in labels.items():
        save(root / "labelsTr" / f"{case}{ending}", seg)
    write_json(root / "dataset.json", {**dataset_json, "numTraining": len(cases), "file_ending": ending})


PROSTATE_JSON = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2}}


def test_nnunet_raw_passes_through(tmp_path: Path) -> None:
    cases = {f"prostate_{i:02d}": image(i, 2) for i in range(3)}
    labels = {case: label(i, (0, 1, 2)) for i, case in enumerate(cases)}
    src = tmp_path / "nnUNet_raw"
    make_nnunet(src / "Dataset005_Prostate", PROSTATE_JSON, cases, labels, test={"prostate_90": image(90, 2)})
    (src / "Dataset005_Prostate" / "imagesTr" / "._prostate_00_0000.nii.gz").write_bytes(b"junk")
    assert detect_format(src) is ADAPTERS["nnunet"]

    out = tmp_path / "Dataset005_Prostate"
    manifest = ingest(src, out, n_folds=2, progress=False)
    assert manifest.source_format == "nnunet" and manifest.quarantined == []
    dataset = DatasetJson.load(out)
    assert dataset.channel_names == {"0": "T2", "1": "ADC"}
    assert dataset.labels == {"background": 0, "PZ": 1, "TZ": 2} and dataset.regions == {}
    for case, array in cases.items():
        for c in (0, 1):
            np.testing.assert_array_equal(written(out, f"imagesTr/{case}_{c:04d}.nii.gz"), array[..., c])
        np.testing.assert_array_equal(written(out, f"labelsTr/{case}.nii.gz"), labels[case])
    np.testing.assert_array_equal(written(out, "imagesTs/prostate_90_0001.nii.gz"), image(90, 2)[..., 1])
    assert {c["case_id"]: c["patient_id"] for c in manifest.cases}["prostate_01"] == "prostate_01"


def test_nnunet_region_labels_nii_ending_and_brats_patients(tmp_path: Path) -> None:
    # nnU-Net's region-based BraTS: labels name regions (lists); the label maps hold 1..3
    dataset_json = {
        "channel_names": {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        "regions_class_order": [1, 2, 3],
    }
    case_ids = ("BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000")
    cases = {case: image(i, 4) for i, case in enumerate(case_ids)}
    labels = {case: label(i, (0, 1, 2, 3)) for i, case in enumerate(case_ids)}
    src = tmp_path / "Dataset137_BraTS"
    make_nnunet(src, dataset_json, cases, labels, ending=".nii")
    manifest = ingest(src, tmp_path / "out", fmt="nnunet", n_folds=2, progress=False)
    dataset = DatasetJson.load(tmp_path / "out")
    assert dataset.labels == {"background": 0, "label_1": 1, "label_2": 2, "label_3": 3}
    assert dataset.regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert dataset.file_ending == ".nii.gz"  # the canonical dataset is always .nii.gz
    patients = {c["case_id"]: c["patient_id"] for c in manifest.cases}
    assert patients == {"BraTS-GLI-00001-000": "BraTS-GLI-00001", "BraTS-GLI-00001-001": "BraTS-GLI-00001",
                        "BraTS-GLI-00002-000": "BraTS-GLI-00002"}
    np.testing.assert_array_equal(written(tmp_path / "out", "imagesTr/BraTS-GLI-00001-001_0002.nii.gz"),
                                  cases["BraTS-GLI-00001-001"][..., 2])


def test_nnunet_missing_channel_and_label_are_reported(tmp_path: Path) -> None:
    cases = {f"prostate_{i:02d}": image(i, 2) for i in range(4)}
    labels = {case: label(i, (0, 1, 2)) for i, case in enumerate(cases)}
    src = tmp_path / "Dataset005_Prostate"
    make_nnunet(src, PROSTATE_JSON, cases, labels)
    (src / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    (src / "labelsTr" / "prostate_02.nii.gz").unlink()
    (src / "imagesTr" / "prostate_03_0000.nii.gz").unlink()
    (src / "imagesTr" / "prostate_03_0001.nii.gz").unlink()  # only its label is left

    manifest = ingest(src, tmp_path / "out", n_folds=2, progress=False)
    assert [c["case_id"] for c in manifest.cases] == ["prostate_00"]
    assert [(q["case"], q["file"], q["problem"]) for q in manifest.quarantined] == [
        ("prostate_01", "prostate_01_0001.nii.gz", "missing ADC channel file"),
        ("prostate_02", "prostate_02.nii.gz", "missing label file (the case has images in imagesTr)"),
        ("prostate_03", "prostate_03_0000.nii.gz", "missing T2 channel file"),
        ("prostate_03", "prostate_03_0001.nii.gz", "missing ADC channel file"),
    ]


def test_nnunet_bad_dataset_json_is_an_error_naming_it(tmp_path: Path) -> None:
    src = tmp_path / "Dataset010_Slices"
    make_nnunet(src, PROSTATE_JSON, {"p_00": image(0, 2)}, {"p_00": label(0, (0, 1, 2))})
    write_json(src / "dataset.json", {**PROSTATE_JSON, "file_ending": ".png", "numTraining": 1})
    assert detect_format(src) is ADAPTERS["nnunet"]
    with pytest.raises(MedsegError, match=r"file_ending '\.png' is not supported: only NIfTI") as info:
        ingest(src, tmp_path / "out", progress=False)
    assert str(src / "dataset.json") in str(info.value)
    assert not (tmp_path / "out").exists()

    write_json(src / "dataset.json", {"channel_names": {"1": "T2"}, "labels": {"background": 0}, "file_ending": ".nii.gz"})
    with pytest.raises(MedsegError, match=r"'channel_names' keys must be 0\.\.0"):
        ingest(src, tmp_path / "out", progress=False)
    write_json(src / "dataset.json", {**PROSTATE_JSON, "labels": {"background": 0, "PZ": "one"}})
    with pytest.raises(MedsegError, match="label 'PZ': expected an integer or a non-empty list of integers"):
        ingest(src, tmp_path / "out", progress=False)


def test_dataset_folder_must_be_one(tmp_path: Path) -> None:
    for name in ("Dataset001_A", "Dataset002_B"):
        make_nnunet(tmp_path / "raw" / name, PROSTATE_JSON, {"p_00": image(0, 2)}, {"p_00": label(0, (0, 1, 2))})
    with pytest.raises(MedsegError, match=r"several nnU-Net v2 raw datasets here \(Dataset001_A, Dataset002_B\)"):
        ingest(tmp_path / "raw", tmp_path / "out", progress=False)


def test_auto_detect_tells_msd_from_nnunet(tmp_path: Path) -> None:
    make_msd(tmp_path / "msd" / "Task04_Hippocampus", {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior"}},
             {"hippocampus_001": image(0, 1)[..., 0]}, {"hippocampus_001": label(0, (0, 1))})
    make_nnunet(tmp_path / "nnunet" / "Dataset004_Hippocampus",
                {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1}},
                {"hippocampus_001": image(0, 1)}, {"hippocampus_001": label(0, (0, 1))})
    assert detect_format(tmp_path / "msd") is ADAPTERS["msd"]
    assert detect_format(tmp_path / "nnunet") is ADAPTERS["nnunet"]
    assert not ADAPTERS["nnunet"].detect(tmp_path / "msd") and not ADAPTERS["msd"].detect(tmp_path / "nnunet")
    assert not any(ADAPTERS[name].detect(tmp_path / "msd") for name in ("brats2024", "brats2023", "brats2021"))


# --------------------------------------------------------------------------- load_nifti_4d
def test_load_nifti_4d_shapes_and_clear_errors(tmp_path: Path) -> None:
    save(tmp_path / "four.nii.gz", image(0, 3))
    array, affine, _ = load_nifti_4d(tmp_path / "four.nii.gz")
    assert array.shape == (*SHAPE, 3) and array.dtype == np.float32
    np.testing.assert_array_equal(affine, AFFINE)
    save(tmp_path / "three.nii", image(0, 1)[..., 0])
    assert load_nifti_4d(tmp_path / "three.nii")[0].shape == (*SHAPE, 1)
    save(tmp_path / "vector.nii.gz", image(0, 2)[:, :, :, np.newaxis, :])  # I×J×K×1×N
    assert load_nifti_4d(tmp_path / "vector.nii.gz")[0].shape == (*SHAPE, 2)

    save(tmp_path / "flat.nii.gz", np.ones((4, 4), np.float32))
    with pytest.raises(MedsegError, match=r"expected a 3D or 4D image, got shape \(4, 4\)"):
        load_nifti_4d(tmp_path / "flat.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    data = (tmp_path / "four.nii.gz").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedsegError, match="truncated or corrupt compressed data") as info:
        load_nifti_4d(cut)
    assert str(cut) in str(info.value)
    with pytest.raises(MedsegError, match="file not found"):
        load_nifti_4d(tmp_path / "nowhere.nii.gz")
    nan = image(0, 2)
    nan[1, 1, 1, 1] = np.nan
    save(tmp_path / "nan.nii.gz", nan)
    with pytest.raises(MedsegError, match="1 NaN/Inf voxels"):
        load_nifti_4d(tmp_path / "nan.nii.gz")
