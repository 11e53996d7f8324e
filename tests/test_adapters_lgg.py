"""Kaggle LGG adapter on tiny synthetic ``kaggle_3m`` folders (64×64 RGB TIFF slices written with Pillow)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.ingest import ADAPTERS, check_case, detect_format, ingest
from medseg.ingest.adapters.lgg import KaggleLGGAdapter
from medseg.schemas import DatasetJson, Manifest

SIZE = 64  # pixels per side of a slice (the real dataset has 256)


def write_patient(root: Path, folder_name: str, n_slices: int, seed: int, masks: bool = True) -> dict[str, np.ndarray]:
    """A patient folder of ``n_slices`` RGB slices (+ 0/255 masks); returns the pixels written, by slice number order."""
    rng = np.random.default_rng(seed)
    folder = root / folder_name
    folder.mkdir(parents=True)
    rgb = rng.integers(1, 256, size=(n_slices, SIZE, SIZE, 3), dtype=np.uint8)  # (K, rows, columns, RGB)
    mask = np.zeros((n_slices, SIZE, SIZE), np.uint8)
    mask[:, 20:30, 10:40] = 255  # wide, not square: a row/column swap would show
    mask[::2, 40:50, 5:12] = 255
    for index in range(n_slices):
        number = index + 1
        Image.fromarray(rgb[index], mode="RGB").save(folder / f"{folder_name}_{number}.tif")
        if masks:
            Image.fromarray(mask[index], mode="L").save(folder / f"{folder_name}_{number}_mask.tif")
    return {"rgb": rgb, "mask": mask}


def make_lgg_source(root: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """``root/lgg/kaggle_3m`` with 4 patients (one scanned twice); 11 slices each, so slice 10 follows 9."""
    kaggle = root / "lgg" / "kaggle_3m"
    written = {}
    for seed, name in enumerate(["TCGA_CS_4941_19960909", "TCGA_CS_4941_19970101", "TCGA_DU_7014_19860618",
                                 "TCGA_HT_A61A_20000127", "TCGA_FG_A4MT_20020212"]):
        written[name] = write_patient(kaggle, name, n_slices=11, seed=seed)
    (kaggle / "data.csv").write_text("Patient,RNASeqCluster\nTCGA_CS_4941,2\n")  # the real folder has one
    return kaggle, written


def write_brats_case(src: Path, case_id: str) -> None:
    folder = src / case_id
    folder.mkdir(parents=True)
    for suffix in ("t1n", "t1c", "t2w", "t2f", "seg"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(folder / f"{case_id}-{suffix}.nii.gz"))


def problems_of(src: Path) -> list[tuple[str, str, str]]:
    adapter = ADAPTERS["lgg"].configure(src)
    return [row for case in adapter.discover(src) for row in check_case(case, adapter).problems]


# --------------------------------------------------------------------------- happy path
def test_ingest_stacks_slices_in_numeric_order_voxel_by_voxel(tmp_path: Path) -> None:
    kaggle, written = make_lgg_source(tmp_path)
    out = tmp_path / "Dataset010_LGG"
    manifest = ingest(kaggle.parent, out, fmt="lgg", progress=False)  # SRC = parent of kaggle_3m

    dataset = DatasetJson.load(out)
    assert dataset.channel_names == {"0": "pre_contrast", "1": "flair", "2": "post_contrast"}
    assert dataset.labels == {"background": 0, "abnormality": 1}
    assert manifest.quarantined == [] and len(manifest.cases) == 5
    by_case = {c["case_id"]: c for c in manifest.cases}
    assert by_case["TCGA_CS_4941_19960909"]["patient_id"] == by_case["TCGA_CS_4941_19970101"]["patient_id"] == "TCGA_CS_4941"
    assert by_case["TCGA_HT_A61A_20000127"]["patient_id"] == "TCGA_HT_A61A"

    for case_id, pixels in written.items():
        expected_rgb = pixels["rgb"].transpose(2, 1, 0, 3)  # (K, rows, cols, RGB) → (cols, rows, K, RGB)
        for channel in range(3):
            img = nib.load(str(out / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"))
            assert img.shape == (SIZE, SIZE, 11)
            np.testing.assert_array_equal(np.asarray(img.dataobj), expected_rgb[..., channel])
            np.testing.assert_allclose(img.affine, np.eye(4))  # 1 mm isotropic, RAS, no geometry in TIFFs
        label = nib.load(str(out / "labelsTr" / f"{case_id}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(label.dataobj), (pixels["mask"].transpose(2, 1, 0) > 0).astype(np.uint8))
        assert label.get_data_dtype() == np.uint8
    # slice 10 is the tenth slice, not the second (lexicographic order would put it after 1)
    tenth = nib.load(str(out / "imagesTr" / "TCGA_CS_4941_19960909_0001.nii.gz")).dataobj[:, :, 9]
    np.testing.assert_array_equal(tenth, written["TCGA_CS_4941_19960909"]["rgb"][9, :, :, 1].T)
    assert Manifest.load(out).cases[0]["files"][0]["spacing"] == [1.0, 1.0, 1.0]


def test_voxel_spacing_is_an_adapter_setting(tmp_path: Path) -> None:
    write_patient(tmp_path / "kaggle_3m", "TCGA_CS_4941_19960909", n_slices=2, seed=0)

    class Spaced(KaggleLGGAdapter):
        voxel_spacing_mm = (0.9, 0.9, 3.0)

    adapter = Spaced()
    (case,) = adapter.discover(tmp_path / "kaggle_3m")
    check = check_case(case, adapter)
    assert check.ok, check.problems
    np.testing.assert_allclose(check.images["flair"].affine, np.diag([0.9, 0.9, 3.0, 1.0]))


def test_unlabelled_case_has_no_label(tmp_path: Path) -> None:
    write_patient(tmp_path / "kaggle_3m", "TCGA_CS_4941_19960909", n_slices=2, seed=0, masks=False)
    (case,) = KaggleLGGAdapter().discover(tmp_path / "kaggle_3m")
    assert case.label_file is None and not case.has_label
    check = check_case(case, KaggleLGGAdapter())
    assert check.ok and check.label is None and set(check.images) == {"pre_contrast", "flair", "post_contrast"}


# --------------------------------------------------------------------------- detection
def test_auto_detect_picks_lgg_and_not_on_brats(tmp_path: Path) -> None:
    kaggle, _ = make_lgg_source(tmp_path)
    assert detect_format(kaggle) is ADAPTERS["lgg"]
    assert detect_format(kaggle.parent) is ADAPTERS["lgg"]
    brats = tmp_path / "brats"
    write_brats_case(brats, "BraTS-GLI-00000-000")
    assert not ADAPTERS["lgg"].detect(brats)
    assert detect_format(brats) is ADAPTERS["brats2023"]
    stray = tmp_path / "stray" / "not_a_patient"  # TIFFs in a folder not named TCGA_..._<date>
    stray.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(stray / "x_1.tif")
    assert not ADAPTERS["lgg"].detect(tmp_path / "stray")


# --------------------------------------------------------------------------- bad input → problem rows
@pytest.fixture()
def one_patient(tmp_path: Path) -> tuple[Path, Path, str]:
    name = "TCGA_CS_4941_19960909"
    kaggle = tmp_path / "kaggle_3m"
    write_patient(kaggle, name, n_slices=4, seed=0)
    return kaggle, kaggle / name, name


def test_missing_mask_for_a_slice(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    (folder / f"{name}_3_mask.tif").unlink()
    assert (name, f"{name}_3_mask.tif", "mask missing for slice 3") in problems_of(kaggle)


def test_gap_in_slice_numbers(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    (folder / f"{name}_2.tif").unlink()
    (folder / f"{name}_2_mask.tif").unlink()
    rows = problems_of(kaggle)
    assert (name, f"{name}_2.tif", "slice 2 missing (gap in the slice numbers 1..4)") in rows


def test_slices_of_different_sizes(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    Image.fromarray(np.full((32, 48, 3), 7, np.uint8)).save(folder / f"{name}_4.tif")
    rows = problems_of(kaggle)
    assert (name, f"{name}_4.tif", f"slice size 48×32 differs from {name}_1.tif (64×64)") in rows


def test_unreadable_tiff(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    (folder / f"{name}_2.tif").write_bytes(b"not a tiff at all")
    rows = problems_of(kaggle)
    assert any(f == f"{name}_2.tif" and p.startswith("cannot read TIFF (") for _, f, p in rows), rows


def test_mask_values_other_than_0_255(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:5] = 128
    mask[5:9] = 255
    Image.fromarray(mask).save(folder / f"{name}_1_mask.tif")
    assert (name, f"{name}_1_mask.tif", "mask values [0, 128, 255] are not 0/255 (or 0/1)") in problems_of(kaggle)


def test_mask_with_0_1_values_is_accepted(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:6, 7:9] = 1
    Image.fromarray(mask).save(folder / f"{name}_2_mask.tif")
    adapter = KaggleLGGAdapter()
    (case,) = adapter.discover(kaggle)
    check = check_case(case, adapter)
    assert check.ok, check.problems
    np.testing.assert_array_equal(check.label.array[:, :, 1], mask.T)


def test_grey_slice_and_orphan_mask(one_patient: tuple[Path, Path, str]) -> None:
    kaggle, folder, name = one_patient
    Image.fromarray(np.full((SIZE, SIZE), 9, np.uint8)).save(folder / f"{name}_2.tif")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / f"{name}_9_mask.tif")
    rows = problems_of(kaggle)
    assert (name, f"{name}_2.tif", "expected an RGB slice (pre-contrast, FLAIR, post-contrast), got 1 channel(s) of uint8") in rows
    assert (name, f"{name}_9_mask.tif", "mask without its image slice 9") in rows


def test_bad_case_is_quarantined_by_ingest(tmp_path: Path) -> None:
    kaggle, _ = make_lgg_source(tmp_path)
    (kaggle / "TCGA_DU_7014_19860618" / "TCGA_DU_7014_19860618_5_mask.tif").unlink()
    manifest = ingest(kaggle, tmp_path / "out", fmt="auto", progress=False)
    assert {c["case_id"] for c in manifest.cases} == {
        "TCGA_CS_4941_19960909", "TCGA_CS_4941_19970101", "TCGA_HT_A61A_20000127", "TCGA_FG_A4MT_20020212"}
    assert manifest.quarantined == [{"case": "TCGA_DU_7014_19860618", "file": "TCGA_DU_7014_19860618_5_mask.tif",
                                     "problem": "mask missing for slice 5"}]
