"""Ingest stage on tiny synthetic BraTS 2023 folders (12³ volumes written with nibabel directly)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError, ValidationError
from medseg.ingest import ADAPTERS, add_arguments, detect_format, ingest, make_splits, run
from medseg.ingest.ingest import case_key
from medseg.io import sha256_file
from medseg.schemas import DatasetJson, Manifest, Splits
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()

CHANNELS = ("t1n", "t1c", "t2w", "t2f")
SHAPE = (12, 12, 12)
AFFINE = np.diag([1.0, 1.0, 1.2, 1.0])


def write_case(src: Path, case_id: str, seed: int, label: bool = True, shape=SHAPE, affine=AFFINE) -> Path:
    """A BraTS 2023 case folder with random float32 images and (optionally) a 0..3 label map."""
    rng = np.random.default_rng(seed)
    folder = src / case_id
    folder.mkdir(parents=True)
    for channel in CHANNELS:
        img = nib.Nifti1Image(rng.random(shape, dtype=np.float32) * 100 + 1, affine)
        img.header["descrip"] = b"patient name here"
        nib.save(img, str(folder / f"{case_id}-{channel}.nii.gz"))
    if label:
        seg = rng.integers(0, 4, size=shape, dtype=np.uint8)
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{case_id}-seg.nii.gz"))
    return folder


def make_source(root: Path, patients: int = 6, timepoints: dict[int, int] | None = None, unlabelled: int = 0) -> Path:
    """``patients`` labelled patients (patient i has ``timepoints[i]`` scans, default 1) + unlabelled cases."""
    src = root / "src"
    src.mkdir()
    timepoints = timepoints or {}
    seed = 0
    for p in range(patients):
        for t in range(timepoints.get(p, 1)):
            write_case(src, f"BraTS-GLI-{p:05d}-{t:03d}", seed)
            seed += 1
    for u in range(unlabelled):
        write_case(src, f"BraTS-GLI-{900 + u:05d}-000", 1000 + u, label=False)
    return src


def rows_for(problems, case_id: str) -> list[tuple[str, str, str]]:
    return [row for row in problems if row[0] == case_id]


# --------------------------------------------------------------------------- happy path
def test_layout_and_artefacts(tmp_path: Path) -> None:
    src = make_source(tmp_path, patients=5, timepoints={0: 2}, unlabelled=1)
    out = tmp_path / "Dataset001_BraTS"
    manifest = ingest(src, out, progress=False)

    labelled = sorted([f"BraTS-GLI-{p:05d}-000" for p in range(5)] + ["BraTS-GLI-00000-001"])
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in labelled]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(
        f"{c}_{i:04d}.nii.gz" for c in labelled for i in range(4)
    )
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"BraTS-GLI-00900-000_{i:04d}.nii.gz" for i in range(4)]
    assert not list(tmp_path.glob(".*tmp"))  # no temp folder left behind

    dataset = DatasetJson.load(out)
    assert dataset.channel_names == {"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"}
    assert dataset.labels == BRATS_LABELS and dataset.regions == BRATS_REGIONS
    assert dataset.source_format == "brats2023" and dataset.numTraining == 6 and dataset.file_ending == ".nii.gz"

    loaded = Manifest.load(out)
    assert loaded.to_dict() == manifest.to_dict()
    assert loaded.content_hash == loaded.compute_hash() and loaded.created and loaded.quarantined == []
    by_case = {c["case_id"]: c for c in loaded.cases}
    assert by_case["BraTS-GLI-00000-001"]["patient_id"] == "BraTS-GLI-00000"
    assert by_case["BraTS-GLI-00900-000"]["has_label"] is False
    for case in loaded.cases:
        for f in case["files"]:
            path = out / f["path"]
            assert f["sha256"] == sha256_file(path)
            assert f["shape"] == list(SHAPE)
            np.testing.assert_allclose(f["spacing"], [1.0, 1.0, 1.2])
            np.testing.assert_allclose(f["affine"], AFFINE)
    t2w = by_case["BraTS-GLI-00001-000"]["files"][2]
    assert t2w == {**t2w, "path": "imagesTr/BraTS-GLI-00001-000_0002.nii.gz", "role": "image", "channel": "t2w",
                   "source": "BraTS-GLI-00001-000-t2w.nii.gz"}
    label_record = by_case["BraTS-GLI-00001-000"]["files"][4]
    assert label_record["role"] == "label" and label_record["path"] == "labelsTr/BraTS-GLI-00001-000.nii.gz"

    # Data as read, header text cleared, labels uint8 with the same values.
    original = nib.load(str(src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2w.nii.gz"))
    written = nib.load(str(out / t2w["path"]))
    np.testing.assert_array_equal(written.get_fdata(), original.get_fdata())
    assert written.header["descrip"].item() == b""
    seg_written = nib.load(str(out / label_record["path"]))
    assert seg_written.get_data_dtype() == np.uint8
    seg_original = nib.load(str(src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(seg_written.dataobj), np.asarray(seg_original.dataobj))

    splits = Splits.load(out)
    assert sorted(splits.test + splits.folds[0]["train"] + splits.folds[0]["val"]) == labelled
    assert len(splits.test) >= 1


def test_reingest_gives_same_hash_and_replaces_out(tmp_path: Path) -> None:
    src = make_source(tmp_path, patients=3)
    out = tmp_path / "out"
    first = ingest(src, out, progress=False)
    (out / "stale.txt").write_text("old")
    second = ingest(src, out, progress=False)
    assert first.content_hash == second.content_hash
    assert not (out / "stale.txt").exists()


# --------------------------------------------------------------------------- case identity
def test_case_keys_survive_reingest_with_renumbered_pseudonyms(tmp_path: Path) -> None:
    """The same cases ingested again, once with an extra case that renumbers every pseudonym: equal keys for
    equal cases (the written NIfTI bytes are deterministic), different pseudonymous ids."""
    first_src, second_src = tmp_path / "a", tmp_path / "b"
    for p in range(1, 5):
        for src in (first_src, second_src):
            write_case(src, f"BraTS-GLI-{p:05d}-000", seed=p)
    write_case(second_src, "BraTS-GLI-00000-000", seed=99)  # sorts first: every pseudonym moves up by one
    first = ingest(first_src, tmp_path / "out1", progress=False, pseudonymize=True, id_map=tmp_path / "map1.json")
    second = ingest(second_src, tmp_path / "out2", progress=False, pseudonymize=True, id_map=tmp_path / "map2.json")

    def by_original(manifest: Manifest, id_map: Path) -> dict[str, dict]:
        rows = {r["case_id"]: r["original_case_id"] for r in json.loads(id_map.read_text())["cases"]}
        return {rows[c["case_id"]]: c for c in manifest.cases}

    a, b = by_original(first, tmp_path / "map1.json"), by_original(second, tmp_path / "map2.json")
    assert set(b) - set(a) == {"BraTS-GLI-00000-000"}
    for original in a:
        assert a[original]["case_key"] and a[original]["case_key"] == b[original]["case_key"]
        assert a[original]["case_id"] != b[original]["case_id"]  # renumbered
        assert a[original]["case_key"] == case_key(a[original])
    assert len({c["case_key"] for c in second.cases}) == len(second.cases)  # different cases, different keys
    assert Manifest.load(tmp_path / "out2").cases == second.cases  # the key is in manifest.json


def test_case_key_covers_files_class_and_covariates() -> None:
    files = [{"path": "imagesTr/x_0000.nii.gz", "role": "image", "channel": "t1", "sha256": "a" * 64},
             {"path": "labelsTr/x.nii.gz", "role": "label", "channel": "label", "sha256": "b" * 64}]
    base = {"case_id": "x", "patient_id": "p", "files": files}
    key = case_key(base)
    assert len(key) == 64 and key == case_key({**base, "case_id": "y", "patient_id": "q", "files": files[::-1]})  # ids and order do not count
    assert key == case_key({**base, "files": [{**f, "path": "elsewhere/" + f["path"]} for f in files]})  # nor paths
    assert key != case_key({**base, "files": [files[0], {**files[1], "sha256": "c" * 64}]})  # contents do
    assert key != case_key({**base, "files": [files[0], {**files[1], "channel": "t2"}]})
    from medseg.schemas import CaseRecord

    subject = CaseRecord(case_id="s", patient_id="s", files=files[:1], class_label="AD", covariates={"age": 71.0})
    assert case_key(subject) == case_key(dataclasses_asdict(subject))
    assert case_key(subject) != case_key(CaseRecord(case_id="s", patient_id="s", files=files[:1], class_label="CN", covariates={"age": 71.0}))
    assert case_key(subject) != case_key(CaseRecord(case_id="s", patient_id="s", files=files[:1], class_label="AD", covariates={"age": 72.0}))
    assert case_key(subject) != case_key(CaseRecord(case_id="s", patient_id="s", files=files[:1]))
    with pytest.raises(MedsegError, match="no files"):
        case_key({"case_id": "z", "files": []})


def dataclasses_asdict(obj):
    import dataclasses

    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- splits
def test_splits_by_patient_disjoint_and_deterministic() -> None:
    case_to_patient = {f"P{p:02d}-{t:03d}": f"P{p:02d}" for p in range(12) for t in range(1 + p % 3)}
    splits = make_splits(case_to_patient, n_folds=5, test_fraction=0.2, seed=3)
    assert len(splits.folds) == 5 and splits.n_folds == 5
    test = set(splits.test)
    assert test and splits.test == sorted(splits.test)
    test_patients = {case_to_patient[c] for c in test}
    vals: list[str] = []
    for fold in splits.folds:
        train, val = set(fold["train"]), set(fold["val"])
        assert fold["train"] == sorted(fold["train"]) and fold["val"] == sorted(fold["val"])
        assert not train & val and not (train | val) & test
        assert train | val | test == set(case_to_patient)
        assert not {case_to_patient[c] for c in train} & {case_to_patient[c] for c in val}
        assert not {case_to_patient[c] for c in train | val} & test_patients
        vals += fold["val"]
    assert sorted(vals) == sorted(set(case_to_patient) - test)  # each case validated exactly once

    assert make_splits(case_to_patient, 5, 0.2, seed=3) == splits
    assert make_splits(dict(reversed(list(case_to_patient.items()))), 5, 0.2, seed=3) == splits
    assert any(make_splits(case_to_patient, 5, 0.2, seed=s) != splits for s in range(4, 8))


def test_adding_patients_does_not_reshuffle_the_others() -> None:
    before = {f"P{p:03d}-000": f"P{p:03d}" for p in range(60)}
    after = dict(before)
    for added in range(15):  # one patient at a time: each moves at most 1 test + 1 per fold boundary
        previous = make_splits(after, 5, 0.2, seed=1)
        after[f"N{added:03d}-000"] = f"N{added:03d}"
        new = make_splits(after, 5, 0.2, seed=1)
        side = lambda splits, c: "test" if c in splits.test else next(i for i, f in enumerate(splits.folds) if c in f["val"])
        moved = [c for c in previous.test + [c for f in previous.folds for c in f["val"]] if side(previous, c) != side(new, c)]
        assert len(moved) <= 1 + 4, moved
    final = make_splits(after, 5, 0.2, seed=1)
    assert len(final.test) == round(0.2 * 75)
    sizes = [len(f["val"]) for f in final.folds]
    assert max(sizes) - min(sizes) <= 1  # exact sizes, not binomial ones


def test_stratified_splits_put_every_class_in_the_test_set() -> None:
    # a rare class (5 of 40 patients) would often miss a 20 % test set by chance alone
    classes = {f"S{p:02d}": ("AD" if p < 5 else "CN") for p in range(40)}
    case_to_patient = {f"{p}-000": p for p in classes}
    strata = {f"{p}-000": c for p, c in classes.items()}
    for seed in range(10):
        splits = make_splits(case_to_patient, 5, 0.2, seed=seed, case_to_stratum=strata)
        assert splits.stratified and {strata[c] for c in splits.test} == {"AD", "CN"}


def test_splits_with_few_patients_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        three = make_splits({"a-000": "a", "b-000": "b", "c-000": "c"}, n_folds=5, test_fraction=0.2, seed=0)
    assert len(three.test) == 1 and len(three.folds) == 2 and "asked" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        two = make_splits({"a-000": "a", "b-000": "b"}, n_folds=5, test_fraction=0.2, seed=0)
    assert two.test == [] and len(two.folds) == 2 and "no held-out test set" in caplog.text
    with caplog.at_level(logging.WARNING):
        one = make_splits({"a-000": "a", "a-001": "a"}, n_folds=5, test_fraction=0.2, seed=0)
    assert one.test == [] and one.folds == [{"train": ["a-000", "a-001"], "val": ["a-000", "a-001"]}]
    with pytest.raises(MedsegError, match="test fraction"):
        make_splits({"a-000": "a"}, n_folds=5, test_fraction=1.0, seed=0)


# --------------------------------------------------------------------------- bad input
def make_bad_source(root: Path) -> tuple[Path, dict[str, str]]:
    """3 good patients + one case per kind of problem; returns the source and {case: expected problem}."""
    src = make_source(root, patients=3)
    expected: dict[str, str] = {}

    case = "BraTS-GLI-00101-000"
    write_case(src, case, 101)
    (src / case / f"{case}-t2w.nii.gz").unlink()
    expected[case] = "missing t2w channel file"

    case = "BraTS-GLI-00102-000"
    write_case(src, case, 102)
    path = src / case / f"{case}-t1c.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expected[case] = "truncated"

    case = "BraTS-GLI-00103-000"
    write_case(src, case, 103)
    short = np.random.default_rng(0).random((12, 12, 10), dtype=np.float32)
    nib.save(nib.Nifti1Image(short, AFFINE), str(src / case / f"{case}-t2f.nii.gz"))
    expected[case] = "shape 12×12×10 differs from t1n 12×12×12"

    case = "BraTS-GLI-00104-000"
    write_case(src, case, 104)
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.5
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:5, 2:5, 2:5] = 2
    nib.save(nib.Nifti1Image(seg, shifted), str(src / case / f"{case}-seg.nii.gz"))
    expected[case] = "affine differs from t1n by up to 2.5 mm"

    case = "BraTS-GLI-00105-000"
    write_case(src, case, 105)
    seg[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(seg, AFFINE), str(src / case / f"{case}-seg.nii.gz"))
    expected[case] = "label values [5] outside the declared set [0, 1, 2, 3]"

    case = "BraTS-GLI-00106-000"
    write_case(src, case, 106)
    data = np.ones(SHAPE, np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, AFFINE), str(src / case / f"{case}-t1n.nii.gz"))
    expected[case] = "1 NaN/Inf voxels"
    return src, expected


EXPECTED_FILES = {
    "BraTS-GLI-00101-000": "BraTS-GLI-00101-000-t2w.nii.gz",
    "BraTS-GLI-00102-000": "BraTS-GLI-00102-000-t1c.nii.gz",
    "BraTS-GLI-00103-000": "BraTS-GLI-00103-000-t2f.nii.gz",
    "BraTS-GLI-00104-000": "BraTS-GLI-00104-000-seg.nii.gz",
    "BraTS-GLI-00105-000": "BraTS-GLI-00105-000-seg.nii.gz",
    "BraTS-GLI-00106-000": "BraTS-GLI-00106-000-t1n.nii.gz",
}


def test_strict_raises_with_every_problem_and_leaves_out_untouched(tmp_path: Path) -> None:
    src, expected = make_bad_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous dataset")

    with pytest.raises(ValidationError) as info:
        ingest(src, out, strict=True, progress=False)
    problems = info.value.problems
    assert {case for case, _, _ in problems} == set(expected)
    assert len(problems) == len(expected)  # one row per injected problem, nothing spurious
    for case, problem in expected.items():
        rows = rows_for(problems, case)
        assert any(f == EXPECTED_FILES[case] and problem in p for _, f, p in rows), (case, rows)
        assert problem in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous dataset"
    assert not list(tmp_path.glob(".out.*"))  # temp folder removed


def test_default_quarantines_bad_cases_and_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, expected = make_bad_source(tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        manifest = ingest(src, out, progress=False)
    assert sorted(c["case_id"] for c in manifest.cases) == [f"BraTS-GLI-{p:05d}-000" for p in range(3)]
    quarantined = {(q["case"], q["file"]) for q in manifest.quarantined}
    assert {case for case, _ in quarantined} == set(expected)
    for case, problem in expected.items():
        assert any(q["case"] == case and q["file"] == EXPECTED_FILES[case] and problem in q["problem"]
                   for q in manifest.quarantined)
    assert "6 case(s) quarantined" in caplog.text and "BraTS-GLI-00103-000" in caplog.text
    assert not any(p.name.startswith("BraTS-GLI-001") for p in (out / "imagesTr").iterdir())
    assert Manifest.load(out).quarantined == manifest.quarantined


def test_constant_image_zero_spacing_and_duplicate_ids(tmp_path: Path) -> None:
    src = make_source(tmp_path, patients=3)
    case = "BraTS-GLI-00201-000"
    write_case(src, case, 201)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), str(src / case / f"{case}-t2w.nii.gz"))
    case = "BraTS-GLI-00202-000"
    write_case(src, case, 202)
    flat = AFFINE.copy()
    flat[1, 1] = 0.0  # zero spacing along J
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32) + np.arange(12, dtype=np.float32), AFFINE)
    img.set_sform(flat, code=1)  # nibabel refuses a singular qform; the sform wins when read back
    img.set_qform(None)
    nib.save(img, str(src / case / f"{case}-t1c.nii.gz"))
    write_case(src / "extra", "BraTS-GLI-00000-000", 7)  # same id as a case in src (found one level down)

    with pytest.raises(ValidationError) as info:
        ingest(src, tmp_path / "out", strict=True, progress=False)
    problems = info.value.problems
    assert any("empty (all voxels are 0)" in p for _, _, p in rows_for(problems, "BraTS-GLI-00201-000"))
    assert any("affine is singular (voxel spacing from affine (1, 0, 1.2))" in p
               for _, _, p in rows_for(problems, "BraTS-GLI-00202-000"))
    duplicates = rows_for(problems, "BraTS-GLI-00000-000")
    assert sorted(f for _, f, _ in duplicates) == ["BraTS-GLI-00000-000", "extra/BraTS-GLI-00000-000"]
    assert all("duplicate case id" in p for _, _, p in duplicates)


def test_no_valid_case_raises(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_case(src, "BraTS-GLI-00001-000", 1)
    (src / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1n.nii.gz").unlink()
    with pytest.raises(ValidationError, match="no valid case") as info:
        ingest(src, tmp_path / "out", progress=False)
    assert info.value.problems[0][2] == "missing t1n channel file"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- source / format errors
def test_missing_source_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MedsegError, match="source folder not found") as info:
        ingest(missing, tmp_path / "out", progress=False)
    assert str(missing) in str(info.value)


def test_auto_detect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = make_source(tmp_path, patients=1)
    with caplog.at_level(logging.INFO):
        assert detect_format(src) is ADAPTERS["brats2023"]
    assert "brats2023" in caplog.text

    unknown = tmp_path / "unknown"
    (unknown / "case1").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), str(unknown / "case1" / "case1_flair.nii.gz"))
    with pytest.raises(MedsegError, match="no known format matches.*brats2023"):
        detect_format(unknown)
    with pytest.raises(MedsegError, match="unknown source format 'nope'"):
        ingest(src, tmp_path / "out", fmt="nope", progress=False)


def test_cli_run_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_source(tmp_path, patients=3)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--source", str(src), "--out", str(tmp_path / "out"), "--folds", "2", "--no-progress"])
    assert run(args) == 0
    text = capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "3 case(s)" in text and "2 fold(s)" in text and manifest["content_hash"] in text
