"""Bad input through the command line: one clear error line naming the file, a non-zero exit, no traceback,
nothing half-written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.synth import generate_dataset


@pytest.fixture(scope="module")
def good_source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "raw"
    generate_dataset(src, 3, (24, 24, 24), seed=5, progress=False, anatomy="procedural")
    return src


def _medseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True, timeout=120)


def _broken_copy(good: Path, tmp: Path, how: str) -> tuple[Path, str]:
    src = tmp / f"raw-{how}"
    shutil.copytree(good, src)
    case = sorted(p for p in src.iterdir() if p.is_dir())[0]
    name = case.name
    if how == "truncated":
        f = case / f"{name}-t1c.nii.gz"
        f.write_bytes(f.read_bytes()[:-200])
        return src, f.name
    if how == "missing_modality":
        (case / f"{name}-t2w.nii.gz").unlink()
        return src, f"{name}-t2w.nii.gz"
    if how == "shape_mismatch":
        f = case / f"{name}-t2f.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((20, 24, 24), np.float32), np.eye(4)), str(f))
        return src, f.name
    if how == "unknown_label":
        f = case / f"{name}-seg.nii.gz"
        img = nib.load(str(f))
        seg = np.asarray(img.dataobj).astype(np.uint8)
        seg[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(seg, img.affine, img.header), str(f))
        return src, f.name
    if how == "nan":
        f = case / f"{name}-t1n.nii.gz"
        img = nib.load(str(f))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        arr[1, 1, 1] = np.nan
        nib.save(nib.Nifti1Image(arr, img.affine), str(f))
        return src, f.name
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "missing_modality", "shape_mismatch", "unknown_label", "nan"])
def test_strict_ingest_refuses_with_the_file_named(good_source, tmp_path, how):
    src, bad_file = _broken_copy(good_source, tmp_path, how)
    out = tmp_path / "dataset"
    result = _medseg("ingest", "--source", str(src), "--out", str(out), "--strict", "--no-progress")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert bad_file in result.stderr, result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dataset")]  # no temp leftovers


def test_wrong_path(tmp_path):
    result = _medseg("ingest", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert str(tmp_path / "nope") in result.stderr and "Traceback" not in result.stderr


def test_failed_ingest_keeps_what_was_stored(good_source, tmp_path):
    out = tmp_path / "dataset"
    assert _medseg("ingest", "--source", str(good_source), "--out", str(out), "--no-progress").returncode == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    src, _ = _broken_copy(good_source, tmp_path, "truncated")
    assert _medseg("ingest", "--source", str(src), "--out", str(out), "--strict", "--no-progress").returncode != 0
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_predict_client_reports_an_unreadable_file(tmp_path):
    bad = tmp_path / "t1n.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    # the client refuses before sending when it cannot reach the server; point it nowhere on loopback
    result = _medseg("predict", "--url", "http://127.0.0.1:9", "--model", "m", "--images", str(bad), str(bad), str(bad), str(bad), "--out", str(tmp_path / "seg.nii.gz"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "seg.nii.gz").exists()
