"""medseg.io (atomic writes, NIfTI reading with clear errors, JSON) and the artefact schemas."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import schemas
from medseg.task import BRATS2023
from medseg.errors import MedsegError
from medseg.io import (
    atomic_dir,
    atomic_path,
    load_nifti,
    load_nifti_bytes,
    nifti_to_bytes,
    read_json,
    save_nifti,
    write_json,
    write_text,
)

AFFINE = np.array([[1.5, 0, 0, -10], [0, 2.0, 0, 20], [0, 0, 3.0, 5], [0, 0, 0, 1]])


def _volume(shape=(8, 9, 10), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- atomic writes
def test_atomic_path_keeps_old_content_and_leaves_no_temp_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    write_text(dest, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half-written new content")
            assert tmp.parent == dest.parent and tmp != dest
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert _leftovers(tmp_path, {"out.json"}) == []


def test_atomic_path_on_error_creates_nothing_when_there_was_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "new.bin"
    with pytest.raises(KeyboardInterrupt):  # BaseException too: a Ctrl-C mid-write leaves no debris
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    write_text(dest, "old")
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
        assert dest.read_text() == "old"  # not visible before the block ends
    assert dest.read_text() == "new"
    assert _leftovers(tmp_path, {"out.txt"}) == []


def test_atomic_dir_replaces_folder_only_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "dataset"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    with pytest.raises(ValueError):
        with atomic_dir(dest) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("stage failed")
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]
    assert _leftovers(tmp_path, {"dataset"}) == []

    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()  # the old content stays until the new one is complete
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path, {"dataset"}) == []


def test_atomic_dir_without_overwrite_refuses_existing(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(MedsegError, match="exists already") as err:
        with atomic_dir(dest, overwrite=False):
            pass
    assert str(dest) in str(err.value)


# --------------------------------------------------------------------------- NIfTI reading
def test_save_and_load_nifti_round_trip(tmp_path: Path) -> None:
    vol = _volume()
    path = save_nifti(tmp_path / "v.nii.gz", vol, AFFINE)
    arr, affine, header = load_nifti(path)
    np.testing.assert_array_equal(arr, vol)
    np.testing.assert_allclose(affine, AFFINE)
    assert tuple(float(z) for z in header.get_zooms()[:3]) == (1.5, 2.0, 3.0)


def test_load_nifti_missing_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(MedsegError, match="file not found") as err:
        load_nifti(path)
    assert err.value.path == str(path)


def test_load_nifti_folder_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="is not a file") as err:
        load_nifti(tmp_path)
    assert err.value.path == str(tmp_path)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, -8, -1], ids=["header", "half", "most", "no-trailer", "last-byte"])
def test_load_nifti_truncated_gz_names_file(tmp_path: Path, keep: float) -> None:
    good = save_nifti(tmp_path / "good.nii.gz", _volume((16, 16, 16)), AFFINE)
    data = good.read_bytes()
    cut = int(len(data) * keep) if keep > 0 else len(data) + int(keep)
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[:cut])
    with pytest.raises(MedsegError, match="cannot read NIfTI") as err:
        load_nifti(bad)
    assert err.value.path == str(bad)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_load_nifti_corrupt_gz_byte_is_detected(tmp_path: Path) -> None:
    """A flipped bit in the compressed data must not load as silently different voxels."""
    vol = _volume((16, 16, 16))
    good = save_nifti(tmp_path / "good.nii.gz", vol, AFFINE)
    data = bytearray(good.read_bytes())
    data[len(data) // 3] ^= 0x10
    bad = tmp_path / "flipped.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(MedsegError, match="corrupt") as err:
        load_nifti(bad)
    assert err.value.path == str(bad)


@pytest.mark.parametrize("name", ["garbage.nii.gz", "garbage.nii", "empty.nii.gz"])
def test_load_nifti_not_a_nifti_names_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not an image\n" * 50)
    with pytest.raises(MedsegError, match="cannot read NIfTI") as err:
        load_nifti(path)
    assert err.value.path == str(path)


def test_load_nifti_gzip_of_garbage_names_file(tmp_path: Path) -> None:
    path = tmp_path / "gzipped-garbage.nii.gz"
    path.write_bytes(gzip.compress(b"\x07" * 600))
    with pytest.raises(MedsegError, match="cannot read NIfTI") as err:
        load_nifti(path)
    assert err.value.path == str(path)


def test_load_nifti_4d_rejected_singleton_squeezed(tmp_path: Path) -> None:
    four = save_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 5, 6, 2), np.float32), np.eye(4))
    with pytest.raises(MedsegError, match=r"expected a 3D volume, got shape \(4, 5, 6, 2\)") as err:
        load_nifti(four)
    assert err.value.path == str(four)
    single = save_nifti(tmp_path / "4d1.nii.gz", np.ones((4, 5, 6, 1), np.float32), np.eye(4))
    assert load_nifti(single)[0].shape == (4, 5, 6)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_load_nifti_non_finite_voxel_names_file(tmp_path: Path, bad_value: float) -> None:
    vol = _volume()
    vol[1, 2, 3] = bad_value
    path = save_nifti(tmp_path / "nan.nii.gz", vol, AFFINE)
    with pytest.raises(MedsegError, match="contains 1 NaN/Inf voxels") as err:
        load_nifti(path)
    assert err.value.path == str(path)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_nifti_bytes_round_trip(compress: bool) -> None:
    vol = _volume()
    data = nifti_to_bytes(vol, AFFINE, compress=compress)
    assert (data[:2] == b"\x1f\x8b") is compress
    arr, affine, header = load_nifti_bytes(data, name="x")
    np.testing.assert_array_equal(arr, vol)
    np.testing.assert_allclose(affine, AFFINE)
    assert isinstance(header, nib.Nifti1Header)

    labels = np.random.default_rng(1).integers(0, 4, (6, 7, 8)).astype(np.uint8)
    arr, _, header = load_nifti_bytes(nifti_to_bytes(labels, AFFINE, compress=compress), dtype=np.uint8)
    assert arr.dtype == np.uint8 and header.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(arr, labels)


@pytest.mark.parametrize("data", [b"", b"short", b"not a nifti header at all " * 40], ids=["empty", "short", "garbage"])
def test_load_nifti_bytes_garbage_is_medseg_error(data: bytes) -> None:
    with pytest.raises(MedsegError, match="cannot read NIfTI") as err:
        load_nifti_bytes(data, name="input 't1n'")
    assert err.value.path == "input 't1n'"


def test_load_nifti_bytes_truncated_gz() -> None:
    data = nifti_to_bytes(_volume(), AFFINE, compress=True)
    with pytest.raises(MedsegError, match="truncated or corrupt compressed data"):
        load_nifti_bytes(data[:-3], name="upload")


def test_save_nifti_clears_free_text_fields(tmp_path: Path) -> None:
    src = tmp_path / "src.nii"
    img = nib.Nifti1Image(_volume(), AFFINE)
    img.header["descrip"] = b"Doe^John 1970-01-01"
    img.header["aux_file"] = b"secret.txt"
    img.header["intent_name"] = b"name"
    nib.save(img, str(src))
    arr, affine, header = load_nifti(src)
    assert bytes(header["descrip"]).startswith(b"Doe^John")  # the test input really carries it

    out = save_nifti(tmp_path / "clean.nii.gz", arr, affine, header)
    written = nib.load(str(out)).header
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        assert bytes(written[field]).strip(b"\x00") == b"", field
    assert b"Doe^John" not in gzip.decompress(out.read_bytes())
    np.testing.assert_allclose(nib.load(str(out)).affine, AFFINE)
    assert _leftovers(tmp_path, {"src.nii", "clean.nii.gz"}) == []


# --------------------------------------------------------------------------- JSON and schemas
def test_read_json_invalid_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,,}')
    with pytest.raises(MedsegError, match="not valid JSON") as err:
        read_json(path)
    assert err.value.path == str(path)
    with pytest.raises(MedsegError, match="file not found"):
        read_json(tmp_path / "absent.json")


def test_write_json_handles_numpy_and_paths(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": np.arange(3), "c": Path("/p")})
    assert read_json(path) == {"a": 1.5, "b": [0, 1, 2], "c": "/p"}


def test_dataset_json_round_trip(tmp_path: Path) -> None:
    ds = schemas.DatasetJson(
        name="Dataset001_BraTS", channel_names={str(i): c for i, c in enumerate(BRATS2023.channels)},
        labels=dict(BRATS2023.labels_dict()), numTraining=7, regions={k: list(v) for k, v in BRATS2023.regions_dict().items()},
        source_format="brats2023",
    )
    path = ds.save(tmp_path)
    assert path == tmp_path / schemas.DATASET_JSON
    loaded = schemas.DatasetJson.load(tmp_path)
    assert loaded == ds
    assert loaded.channels == list(BRATS2023.channels)
    assert loaded.label_values == [0, 1, 2, 3] and loaded.n_classes == 4
    # nnU-Net's fields are spelled as nnU-Net spells them
    raw = json.loads(path.read_text())
    assert raw["numTraining"] == 7 and raw["file_ending"] == ".nii.gz" and raw["channel_names"]["0"] == "t1n"


def test_artifact_load_missing_field_names_file(tmp_path: Path) -> None:
    path = tmp_path / schemas.DATASET_JSON
    write_json(path, {"name": "x", "channel_names": {"0": "t1n"}, "labels": {"background": 0}})  # no numTraining
    with pytest.raises(MedsegError, match=r"missing field\(s\) \['numTraining'\]") as err:
        schemas.DatasetJson.load(tmp_path)
    assert err.value.path == str(path)


def test_artifact_load_wrong_type_and_missing_file(tmp_path: Path) -> None:
    write_json(tmp_path / schemas.SPLITS_JSON, ["not", "an", "object"])
    with pytest.raises(MedsegError, match="expected a JSON object") as err:
        schemas.Splits.load(tmp_path)
    assert err.value.path == str(tmp_path / schemas.SPLITS_JSON)
    with pytest.raises(MedsegError, match="file not found"):
        schemas.Plans.load(tmp_path)


def test_plans_configuration_unknown_name() -> None:
    plans = schemas.Plans(dataset_name="d", device_budget="cpu", channel_names=["t1n"], labels={"background": 0, "x": 1},
                          regions={}, normalization=[], configurations={"3d_fullres": {}})
    with pytest.raises(MedsegError, match="no configuration '2d'"):
        plans.configuration("2d")
