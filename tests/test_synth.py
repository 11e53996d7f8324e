"""Tests of the synthetic BraTS generator (small grids, a few cases: runs in seconds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg import synth
from medseg.errors import MedsegError
from medseg.schemas import SYNTH_MARKER_JSON
from medseg.task import BRATS2023
BRATS_CHANNELS, BRATS_LABELS = BRATS2023.channels, BRATS2023.labels_dict()

SHAPE = (40, 48, 36)  # deliberately not cubic: catches axis mix-ups
SUFFIXES = (*BRATS_CHANNELS, "seg")


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine), img.header


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("synth")
    ids = synth.generate_dataset(out, 3, SHAPE, seed=7, progress=False)
    return out, ids


def _cases(out: Path, ids: list[str]) -> list[dict[str, tuple[np.ndarray, np.ndarray, nib.Nifti1Header]]]:
    return [{s: _load(out / cid / f"{cid}-{s}.nii.gz") for s in SUFFIXES} for cid in ids]


def test_files_and_names(dataset: tuple[Path, list[str]]) -> None:
    out, ids = dataset
    assert ids == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    assert sorted(p.name for p in out.iterdir() if p.name != SYNTH_MARKER_JSON) == ids  # no temp folders left behind
    assert json.loads((out / SYNTH_MARKER_JSON).read_text())["cases"] == 3  # the marker ingest records as dataset.json synthetic
    for cid in ids:
        assert sorted(p.name for p in (out / cid).iterdir()) == sorted(f"{cid}-{s}.nii.gz" for s in SUFFIXES)


def test_dtypes_shapes_affines_agree(dataset: tuple[Path, list[str]]) -> None:
    out, ids = dataset
    spacing = np.array(synth.FOV_MM) / np.array(SHAPE)
    for case in _cases(out, ids):
        affines = [a for _, a, _ in case.values()]
        for suffix, (array, affine, header) in case.items():
            assert array.shape == SHAPE
            np.testing.assert_allclose(affine, affines[0])
            assert array.dtype == (np.uint8 if suffix == "seg" else np.int16)
            assert header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(np.diag(affines[0])[:3], spacing)
        np.testing.assert_allclose(affines[0][:3, :3], np.diag(spacing))


def test_labels_and_tumour_size(dataset: tuple[Path, list[str]]) -> None:
    out, ids = dataset
    for case in _cases(out, ids):
        seg = case["seg"][0]
        assert set(np.unique(seg)) == set(BRATS_LABELS.values())  # subset of {0..3}, every one present
        brain = case["t1n"][0] > 0  # skull-stripped: background exactly 0, brain ≥ 1
        assert not (seg[~brain] > 0).any(), "tumour outside the brain"
        wt = seg > 0
        assert 0.02 <= wt.sum() / brain.sum() <= 0.08
        counts = {k: int((seg == v).sum()) for k, v in BRATS_LABELS.items()}
        assert counts["SNFH"] > counts["ET"] and counts["SNFH"] > counts["NETC"]  # edema is the largest part
        for name in BRATS_CHANNELS:  # images share the brain mask
            assert ((case[name][0] > 0) == brain).all()


def test_contrasts(dataset: tuple[Path, list[str]]) -> None:
    out, ids = dataset
    net, snfh, et = BRATS_LABELS["NETC"], BRATS_LABELS["SNFH"], BRATS_LABELS["ET"]
    for case in _cases(out, ids):
        seg = case["seg"][0]
        normal = (case["t1n"][0] > 0) & (seg == 0)
        t1c, t2w, t2f = (case[c][0].astype(float) for c in ("t1c", "t2w", "t2f"))
        assert t1c[seg == et].mean() > t1c[seg == snfh].mean()
        assert t1c[seg == et].mean() > 1.1 * t1c[normal].mean()  # thin rims lose some contrast to blur
        assert t1c[seg == net].mean() < t1c[normal].mean()
        assert t2f[seg == snfh].mean() > 1.2 * t2f[normal].mean()
        assert t2w[seg == snfh].mean() > t2w[normal].mean()
        assert t2w[seg == net].mean() > t2w[normal].mean()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, dataset: tuple[Path, list[str]]) -> None:
    out, ids = dataset
    again = synth.generate_dataset(tmp_path / "a", 2, SHAPE, seed=7, progress=False)
    for cid in again:  # a case does not depend on how many cases were asked for
        for s in SUFFIXES:
            name = f"{cid}/{cid}-{s}.nii.gz"
            assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name
    synth.generate_dataset(tmp_path / "b", 1, SHAPE, seed=8, progress=False)
    cid = ids[0]
    for s in SUFFIXES:
        name = f"{cid}/{cid}-{s}.nii.gz"
        assert (tmp_path / "b" / name).read_bytes() != (out / name).read_bytes(), name


def test_procedural_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "mni_template_dir", lambda: None)
    assert synth.resolve_anatomy("auto") == "procedural"
    with pytest.raises(MedsegError):
        synth.resolve_anatomy("mni")
    ids = synth.generate_dataset(tmp_path, 2, (32, 32, 32), seed=1, progress=False, anatomy="auto")
    for cid in ids:
        seg = _load(tmp_path / cid / f"{cid}-seg.nii.gz")[0]
        brain = _load(tmp_path / cid / f"{cid}-t1n.nii.gz")[0] > 0
        assert set(np.unique(seg)) == {0, 1, 2, 3}
        assert 0.02 <= (seg > 0).sum() / brain.sum() <= 0.08
        t2f = _load(tmp_path / cid / f"{cid}-t2f.nii.gz")[0].astype(float)
        assert t2f[seg == 2].mean() > t2f[brain & (seg == 0)].mean()


def test_mni_template_found() -> None:
    # nilearn is a dependency, so the real anatomy should be in use in this environment.
    assert synth.mni_template_dir() is not None
    assert synth.resolve_anatomy("auto") == "mni"


def test_generate_case_in_memory() -> None:
    vols = synth.generate_case("c", (32, 32, 32), [3, 0], anatomy="procedural")
    assert set(vols) == set(SUFFIXES)
    again = synth.generate_case("c", (32, 32, 32), [3, 0], anatomy="procedural")
    for k in vols:
        np.testing.assert_array_equal(vols[k][0], again[k][0])


@pytest.mark.parametrize("bad", [(8, 32, 32), (32, 32)])
def test_bad_shape(tmp_path: Path, bad: tuple[int, ...]) -> None:
    with pytest.raises(MedsegError):
        synth.generate_dataset(tmp_path, 1, bad, seed=0, progress=False)  # type: ignore[arg-type]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(MedsegError):
        synth.generate_dataset(tmp_path, 0, (32, 32, 32), seed=0, progress=False)
    with pytest.raises(MedsegError):
        synth.resolve_anatomy("atlas")


def test_cli_hooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    defaults = parser.parse_args(["--out", str(tmp_path)])
    assert (defaults.cases, defaults.shape, defaults.seed, defaults.anatomy) == (20, [96, 96, 96], 0, "auto")
    args = parser.parse_args(["--out", str(tmp_path), "--cases", "1", "--shape", "32", "32", "32", "--seed", "2"])
    args.progress = False
    assert synth.run(args) == 0
    assert "wrote 1 cases" in capsys.readouterr().out
    assert (tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-seg.nii.gz").is_file()
