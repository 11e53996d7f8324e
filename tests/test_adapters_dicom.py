"""DICOM series adapter on tiny series written with pydicom (8 slices of 12 rows × 16 columns, shuffled)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medseg.ingest import ADAPTERS, check_case, detect_format, ingest
from medseg.ingest.adapters.dicom import DicomSeriesAdapter
from medseg.schemas import DatasetJson, Manifest

ROWS, COLUMNS, SLICES = 12, 16, 8  # not square: a row/column swap would show
PIXEL_SPACING = (0.8, 0.6)  # DICOM order: (row spacing, column spacing), mm
THICKNESS = 2.5
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_orientation() -> tuple[float, ...]:
    """Row and column cosines of a rotation about two axes (a non-identity ImageOrientationPatient)."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = rz @ rx
    return tuple(float(v) for v in (*rotation[:, 0], *rotation[:, 1]))


def write_series(
    folder: Path,
    seed: int,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-40.0, 25.0, 10.0),
    patient_id: str = "MRN-0001",
    slope: float = 2.0,
    intercept: float = -1024.0,
    extension: str = ".dcm",
    positions: list[int] | None = None,
) -> dict:
    """Write a series in shuffled file order; return what was written (stored pixels per slice index, geometry)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    positions = list(range(SLICES)) if positions is None else positions
    stored = rng.integers(0, 2000, size=(len(positions), ROWS, COLUMNS), dtype=np.int16)
    series_uid = generate_uid()
    file_order = rng.permutation(len(positions))  # file names do not follow the slice order
    for index, k in enumerate(positions):
        ipp = np.array(origin) + k * THICKNESS * normal
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID, series_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, "Doe^Jane", "19500101"
        ds.Modality = "MR"
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = THICKNESS
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.InstanceNumber = index + 1
        ds.PixelData = stored[index].tobytes()
        ds.save_as(folder / f"IM{file_order[index]:04d}{extension}", enforce_file_format=True)
    return {"stored": stored, "orientation": orientation, "origin": np.array(origin), "normal": normal,
            "slope": slope, "intercept": intercept}


def expected_volume(written: dict) -> tuple[np.ndarray, np.ndarray]:
    """The (column, row, slice) array with rescale applied, and the RAS affine, computed from what was written."""
    array = (written["stored"].astype(np.float64) * written["slope"] + written["intercept"]).transpose(2, 1, 0)
    row, column = np.array(written["orientation"][:3]), np.array(written["orientation"][3:])
    lps = np.eye(4)
    lps[:3, 0] = row * PIXEL_SPACING[1]
    lps[:3, 1] = column * PIXEL_SPACING[0]
    lps[:3, 2] = written["normal"] * THICKNESS
    lps[:3, 3] = written["origin"]
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_brats_case(src: Path, case_id: str) -> None:
    folder = src / case_id
    folder.mkdir(parents=True)
    for suffix in ("t1n", "t1c", "t2w", "t2f", "seg"):
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(folder / f"{case_id}-{suffix}.nii.gz"))


def problems_of(src: Path) -> list[tuple[str, str, str]]:
    adapter = ADAPTERS["dicom"].configure(src)
    return [row for case in adapter.discover(src) for row in check_case(case, adapter).problems]


# --------------------------------------------------------------------------- reading a series
@pytest.mark.parametrize("orientation", [AXIAL, oblique_orientation()], ids=["axial", "oblique"])
def test_series_voxels_and_world_coordinates(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    written = write_series(tmp_path / "series", seed=1, orientation=orientation, extension="")  # extension-less files
    volume = DicomSeriesAdapter().read_series(tmp_path / "series", lambda f, p: pytest.fail(f"{f}: {p}"))
    assert volume is not None and volume.array.shape == (COLUMNS, ROWS, SLICES) and volume.array.dtype == np.int16

    row, column, normal = np.array(orientation[:3]), np.array(orientation[3:]), written["normal"]
    for k in range(SLICES):
        # voxel value: file of slice k, pixel (row j, column i), rescaled
        np.testing.assert_array_equal(volume.array[:, :, k], (written["stored"][k] * 2 - 1024).T)
        for i, j in [(0, 0), (COLUMNS - 1, 0), (0, ROWS - 1), (5, 7)]:
            ipp = written["origin"] + k * THICKNESS * normal
            lps = ipp + i * PIXEL_SPACING[1] * row + j * PIXEL_SPACING[0] * column
            ras = volume.affine @ [i, j, k, 1]
            np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-4)
    assert volume.header["descrip"] == b"" and volume.header.get_data_dtype() == np.int16


def test_non_integer_rescale_gives_float32(tmp_path: Path) -> None:
    written = write_series(tmp_path / "s", seed=2, slope=0.25, intercept=1.5)
    volume = DicomSeriesAdapter().read_series(tmp_path / "s", lambda f, p: pytest.fail(f"{f}: {p}"))
    assert volume is not None and volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, expected_volume(written)[0], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- ingest
def make_dicom_source(root: Path) -> tuple[Path, dict]:
    """3 cases (2 of the same patient), channels flair + t1 (one oblique), a label NIfTI beside each series."""
    src = root / "dicom_src"
    written = {}
    for seed, (case_id, patient) in enumerate([("case_a", "MRN-111"), ("case_b", "MRN-111"), ("case_c", "MRN-222")]):
        orientation = oblique_orientation() if case_id == "case_b" else AXIAL
        channels = {name: write_series(src / case_id / name, seed=10 * seed + c, orientation=orientation, patient_id=patient)
                    for c, name in enumerate(["t1", "flair"])}
        array, affine = expected_volume(channels["t1"])
        label = np.zeros(array.shape, np.uint8)
        label[2:9, 3:7, 1:5] = 1
        label[4:6, 4:6, 2:4] = 2
        nib.save(nib.Nifti1Image(label, affine), str(src / case_id / "seg.nii.gz"))
        written[case_id] = {"channels": channels, "label": label}
    return src, written


def world_lookup(out_image: nib.Nifti1Image, expected: np.ndarray, expected_affine: np.ndarray) -> np.ndarray:
    """For every voxel of ``out_image``: the value of ``expected`` at the same world position."""
    grid = np.indices(out_image.shape).reshape(3, -1)
    world = out_image.affine @ np.vstack([grid, np.ones(grid.shape[1])])
    source = np.rint((np.linalg.inv(expected_affine) @ world)[:3]).astype(int)
    return expected[tuple(source)].reshape(out_image.shape)


def test_ingest_voxels_geometry_and_deidentification(tmp_path: Path) -> None:
    src, written = make_dicom_source(tmp_path)
    out, id_map = tmp_path / "Dataset020_Dicom", tmp_path / "private" / "ids.json"
    manifest = ingest(src, out, fmt="dicom", progress=False, id_map=id_map)

    dataset = DatasetJson.load(out)
    assert dataset.channel_names == {"0": "flair", "1": "t1"}  # sorted sub-folder names
    assert dataset.labels == {"background": 0, "label_1": 1, "label_2": 2}
    assert manifest.quarantined == [] and len(manifest.cases) == 3
    mapping = {row["original_case_id"]: row for row in json.loads(id_map.read_text())["cases"]}
    assert {row["case_id"] for row in mapping.values()} == {"case_0000", "case_0001", "case_0002"}  # pseudonyms
    assert mapping["case_a"]["patient_id"] == mapping["case_b"]["patient_id"] != mapping["case_c"]["patient_id"]
    assert "MRN-111" not in mapping["case_a"]["original_patient_id"]  # PatientID kept only as a salted hash

    for case_id, parts in written.items():
        new_id = mapping[case_id]["case_id"]
        for index, channel in enumerate(["flair", "t1"]):
            expected, affine = expected_volume(parts["channels"][channel])
            img = nib.load(str(out / "imagesTr" / f"{new_id}_{index:04d}.nii.gz"))
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S") or case_id == "case_b"
            np.testing.assert_array_equal(np.asarray(img.dataobj), world_lookup(img, expected, affine))
        label = nib.load(str(out / "labelsTr" / f"{new_id}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(label.dataobj), world_lookup(label, parts["label"], affine))

    # nothing from the DICOM headers but geometry and pixels: no patient id, name or birth date anywhere
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            data = gzip.decompress(data) if path.name.endswith(".gz") else data
            for secret in (b"MRN-111", b"MRN-222", b"Doe^Jane", b"19500101", b"case_a"):
                assert secret not in data, f"{secret!r} found in {path.name}"


def test_single_series_case_folder_is_one_channel(tmp_path: Path) -> None:
    src = tmp_path / "src"
    written = {name: write_series(src / name, seed=s) for s, name in enumerate(["p1", "p2"])}
    out = tmp_path / "out"
    manifest = ingest(src, out, progress=False, pseudonymize=False)
    assert manifest.source_format == "dicom" and manifest.quarantined == []
    assert DatasetJson.load(out).channel_names == {"0": "image"}
    assert DatasetJson.load(out).labels == {"background": 0}
    for name, series in written.items():
        expected, affine = expected_volume(series)
        img = nib.load(str(out / "imagesTs" / f"{name}_0000.nii.gz"))  # no label: unlabelled
        np.testing.assert_array_equal(np.asarray(img.dataobj), world_lookup(img, expected, affine))
    assert {c["case_id"] for c in Manifest.load(out).cases} == {"p1", "p2"}


def test_given_channels_and_labels_are_kept(tmp_path: Path) -> None:
    src, _ = make_dicom_source(tmp_path)
    adapter = DicomSeriesAdapter(channel_names=("t1",), labels={"background": 0, "a": 1, "b": 2}).configure(src)
    assert adapter.channel_names == ("t1",) and adapter.labels == {"background": 0, "a": 1, "b": 2}
    rows = [row for case in adapter.discover(src) for row in check_case(case, adapter).problems]
    assert rows and all("'flair' is not one of the dataset's channels" in p for _, _, p in rows)


# --------------------------------------------------------------------------- detection
def test_auto_detect_picks_dicom_and_not_on_brats(tmp_path: Path) -> None:
    src, _ = make_dicom_source(tmp_path)
    assert detect_format(src) is ADAPTERS["dicom"]
    brats = tmp_path / "brats"
    write_brats_case(brats, "BraTS-GLI-00000-000")
    (brats / "BraTS-GLI-00000-000" / "README").write_text("not DICOM")
    assert not ADAPTERS["dicom"].detect(brats)
    assert detect_format(brats) is ADAPTERS["brats2023"]


# --------------------------------------------------------------------------- bad input → problem rows
def test_missing_geometry_tag(tmp_path: Path) -> None:
    write_series(tmp_path / "src" / "p1", seed=0)
    path = tmp_path / "src" / "p1" / "IM0003.dcm"
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    ds.save_as(path, enforce_file_format=True)
    assert ("p1", "IM0003.dcm", "missing DICOM tag(s) ImagePositionPatient") in problems_of(tmp_path / "src")


def test_mixed_orientation_and_size(tmp_path: Path) -> None:
    write_series(tmp_path / "src" / "p1", seed=0)
    first = tmp_path / "src" / "p1" / "IM0000.dcm"
    for name, change in [("IM0002.dcm", "orientation"), ("IM0005.dcm", "size")]:
        path = tmp_path / "src" / "p1" / name
        ds = pydicom.dcmread(path)
        if change == "orientation":
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        else:
            ds.Rows = ROWS // 2
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(path, enforce_file_format=True)
    rows = problems_of(tmp_path / "src")
    assert ("p1", "IM0002.dcm", f"orientation differs from {first.name} (mixed orientations in one series)") in rows
    assert ("p1", "IM0005.dcm", f"size {COLUMNS}×{ROWS // 2} differs from {first.name} ({COLUMNS}×{ROWS})") in rows


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    write_series(tmp_path / "src" / "p1", seed=0, extension=".dcm")
    write_series(tmp_path / "src" / "p1", seed=1, extension="")  # same geometry, another series
    rows = problems_of(tmp_path / "src")
    assert rows and all(p.startswith("belongs to another series than IM0000") for _, _, p in rows)
    assert len(rows) == SLICES


def test_non_uniform_spacing_and_duplicate_positions(tmp_path: Path) -> None:
    write_series(tmp_path / "src" / "gap", seed=0, positions=[0, 1, 2, 4, 5, 6])  # slice 3 missing
    write_series(tmp_path / "src" / "dup", seed=1, positions=[0, 1, 2, 2, 3])
    rows = problems_of(tmp_path / "src")
    gap = [p for c, _, p in rows if c == "gap"]
    assert gap and all(p.startswith("non-uniform slice spacing") for p in gap)
    assert any("5.000 mm from" in p for p in gap)
    dup = [p for c, _, p in rows if c == "dup"]
    assert len(dup) == 1 and dup[0].startswith("duplicate slice position: same place as IM")


def test_unreadable_file_and_mismatched_channels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("p1", "p2", "p3"):
        for channel in ("flair", "t1"):
            write_series(src / name / channel, seed=len(name), patient_id=name)
    (src / "p1" / "t1" / "IM9999").write_bytes(b"\0" * 10)  # extension-less, not DICOM
    truncated = src / "p2" / "flair" / "IM0001.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-10])  # cut inside the pixel data
    write_series(src / "p3" / "t2", seed=5, patient_id="p3")  # an extra channel folder
    rows = problems_of(src)
    assert ("p1", "IM9999", "not a DICOM file (no DICM header)") in rows
    assert any(c == "p2" and f == "IM0001.dcm" and p.startswith("cannot decode pixel data (ValueError: ")
               for c, f, p in rows), rows
    assert ("p3", "t2", "channel folder 't2' is not one of the dataset's channels ['flair', 't1'] "
                        "(every case needs the same channel folders)") in rows


def test_missing_channel_folder_and_patient_key(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("p1", "p2", "p3"):
        write_series(src / name / "t1", seed=1, patient_id="SAME")
        if name != "p3":
            write_series(src / name / "flair", seed=2, patient_id="SAME")
    adapter = ADAPTERS["dicom"].configure(src)
    cases = adapter.discover(src)
    assert len({c.patient_id for c in cases}) == 1 and "SAME" not in cases[0].patient_id
    rows = [row for case in cases for row in check_case(case, adapter).problems]
    assert rows == [("p3", "flair", "missing flair channel series")]
