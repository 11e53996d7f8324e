"""Ingest: reorientation to RAS+, header de-identification, pseudonymous ids and the private id map."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.ingest import ingest
from medseg.ingest.adapters.base import Volume
from medseg.ingest.ingest import to_ras
from medseg.schemas import Manifest, Splits
from tests.test_ingest import make_source, write_case

LPS_AFFINE = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 1.5, -60], [0, 0, 0, 1]])


def world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.append(ijk, 1.0))[:3]


def test_to_ras_keeps_every_voxel_at_its_world_position() -> None:
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    # a permuted, flipped grid: voxel axis 0 runs anterior→posterior, axis 1 along z, axis 2 right→left
    affine = np.array([[0, 0, -2.0, 10], [-1.0, 0, 0, 20], [0, 1.5, 0, -5], [0, 0, 0, 1]])
    ras, codes = to_ras(Volume(array, affine, nib.Nifti1Header(), Path("x.nii.gz")))
    assert codes == "PSL"
    assert "".join(nib.aff2axcodes(ras.affine)) == "RAS"
    inverse = np.linalg.inv(ras.affine)
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        new = np.rint((inverse @ np.append(world(affine, np.array(ijk)), 1.0))[:3]).astype(int)
        assert ras.array[tuple(new)] == array[ijk]


def test_lps_source_is_written_ras_with_same_world_geometry(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for p in range(3):
        write_case(src, f"BraTS-GLI-{p:05d}-000", seed=p, affine=LPS_AFFINE)
    out = tmp_path / "dataset"
    manifest = ingest(src, out, fmt="brats2023", progress=False)
    case = "BraTS-GLI-00001-000"
    source = nib.load(str(src / case / f"{case}-t1c.nii.gz"))
    written = nib.load(str(out / "imagesTr" / f"{case}_0001.nii.gz"))
    assert "".join(nib.aff2axcodes(written.affine)) == "RAS"
    src_data, new_data = np.asarray(source.dataobj), np.asarray(written.dataobj)
    inverse = np.linalg.inv(written.affine)
    for ijk in np.ndindex(*src_data.shape):
        new = tuple(np.rint((inverse @ np.append(world(source.affine, np.array(ijk)), 1.0))[:3]).astype(int))
        assert new_data[new] == src_data[ijk]
    label_src = np.asarray(nib.load(str(src / case / f"{case}-seg.nii.gz")).dataobj)
    label_new = np.asarray(nib.load(str(out / "labelsTr" / f"{case}.nii.gz")).dataobj)
    assert np.array_equal(label_new, label_src[::-1, ::-1, :])  # LPS → RAS flips the first two axes
    files = [f for c in manifest.cases for f in c["files"]]
    assert {f["orientation"] for f in files} == {"LPS"}


def test_header_text_fields_are_cleared(tmp_path: Path) -> None:
    src = make_source(tmp_path, patients=3)  # sources carry descrip "patient name here"
    case = next(p.name for p in sorted(src.iterdir()))
    img = nib.load(str(src / case / f"{case}-t1n.nii.gz"))
    img.header["aux_file"], img.header["intent_name"], img.header["db_name"] = b"aux", b"intent", b"db"
    nib.save(img, str(src / case / f"{case}-t1n.nii.gz"))
    out = tmp_path / "dataset"
    ingest(src, out, progress=False)
    for path in sorted((out / "imagesTr").glob("*.nii.gz")) + sorted((out / "labelsTr").glob("*.nii.gz")):
        header = nib.load(str(path)).header
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            assert header[field].item() in (b"", ""), (path.name, field)


def test_pseudonymized_ids_and_private_id_map(tmp_path: Path) -> None:
    src = make_source(tmp_path, patients=3, timepoints={0: 2})
    out, id_map = tmp_path / "dataset", tmp_path / "private" / "ids.json"
    manifest = ingest(src, out, progress=False, pseudonymize=True, id_map=id_map)
    ids = {c["case_id"] for c in manifest.cases}
    assert ids == {"case_0000", "case_0001", "case_0002", "case_0003"}
    assert manifest.source == "(pseudonymized)"
    assert all(f["source"] == "" for c in manifest.cases for f in c["files"])
    text = "".join(p.read_text() for p in out.glob("*.json"))
    assert "BraTS-GLI" not in text  # no original id anywhere in the shared dataset
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[0] == "case_0000_0000.nii.gz"
    mapping = json.loads(id_map.read_text())
    assert id_map.stat().st_mode & 0o777 == 0o600
    rows = {r["original_case_id"]: r for r in mapping["cases"]}
    # both timepoints of patient 0 share one pseudonymous patient (splits stay by patient)
    assert rows["BraTS-GLI-00000-000"]["patient_id"] == rows["BraTS-GLI-00000-001"]["patient_id"]
    assert rows["BraTS-GLI-00002-000"]["case_id"] in ids
    splits = Splits.load(out)
    assert set(splits.test) | {c for f in splits.folds[:1] for c in f["train"] + f["val"]} == ids
    assert Manifest.load(out).content_hash == manifest.content_hash


def test_ids_kept_by_default_and_map_refused_inside_dataset(tmp_path: Path) -> None:
    src = make_source(tmp_path, patients=3)
    out = tmp_path / "dataset"
    manifest = ingest(src, out, progress=False, id_map=tmp_path / "ids.json")
    assert {c["case_id"] for c in manifest.cases} == {p.name for p in src.iterdir()}
    mapping = json.loads((tmp_path / "ids.json").read_text())
    assert not mapping["pseudonymized"] and all(r["case_id"] == r["original_case_id"] for r in mapping["cases"])
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(MedsegError, match="outside the dataset"):
        ingest(src, out, progress=False, pseudonymize=True, id_map=out / "ids.json")
    assert sorted(p.name for p in out.rglob("*")) == before  # refused before anything was touched
