"""Lineage built in one place: medseg.registry.lineage.build_lineage (no MLflow)."""

from __future__ import annotations

import pytest

from medseg import schemas
from medseg.registry.lineage import LINEAGE_KEYS, UNKNOWN, build_lineage, merge_lineage
from tests.factories import make_model_package


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_model_package(tmp_path_factory.mktemp("lineage") / "model")


def test_build_lineage_reads_dataset_and_package(package, tmp_path, monkeypatch):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    manifest = schemas.Manifest(dataset_name="d", source="s", source_format="brats2023",
                                cases=[{"case_id": "c1", "files": [{"path": "imagesTr/c1_0000.nii.gz", "sha256": "a" * 64}]}])
    manifest.content_hash = manifest.compute_hash()
    manifest.save(dataset)
    pkg = schemas.ModelPackage.load(package)
    pkg.training["mlflow_run_id"] = "train-run-9"
    pkg.save(package)

    out = build_lineage(package, dataset, pipeline_run_id="pipe-7", git_commit="abc123")
    assert set(out) == set(LINEAGE_KEYS)
    assert out == {"manifest_hash": manifest.content_hash, "git_commit": "abc123", "pipeline_run_id": "pipe-7",
                   "plan_hash": schemas.Plans.load(package).content_hash(), "training_run_id": "train-run-9", "medseg_version": pkg.medseg_version,
                   # where the data were (a rebuild looks there first), DVC's md5 of them (none here), and whether the commit's tree
                   # was clean (not known for a commit the caller names)
                   "dataset_path": str(dataset.resolve()), "dataset_dvc_md5": UNKNOWN, "git_dirty": UNKNOWN}

    # nothing known but the package: unknown where not known; the commit from the source tree (MEDSEG_GIT_COMMIT in images)
    monkeypatch.setenv("MEDSEG_GIT_COMMIT", "feedface")
    bare = build_lineage(package)
    assert bare["manifest_hash"] == UNKNOWN and bare["pipeline_run_id"] == UNKNOWN and bare["git_commit"] == "feedface"
    assert bare["dataset_path"] == UNKNOWN and bare["git_dirty"] == UNKNOWN  # an image's commit: its tree is not here to look at
    monkeypatch.delenv("MEDSEG_GIT_COMMIT")
    assert build_lineage(package)["git_dirty"] in ("true", "false")  # this checkout's own commit: git status tells
    monkeypatch.setenv("MEDSEG_GIT_COMMIT", "feedface")
    # what training recorded in the package is used when the caller does not know better
    pkg.lineage = {"manifest_hash": "m" * 64, "git_commit": "trained-at", "pipeline_run_id": "pipe-1", "dataset_path": "/data/d", "git_dirty": "false"}
    pkg.save(package)
    recorded = build_lineage(package)
    assert (recorded["manifest_hash"], recorded["git_commit"], recorded["pipeline_run_id"]) == ("m" * 64, "trained-at", "pipe-1")
    assert (recorded["dataset_path"], recorded["git_dirty"]) == ("/data/d", "false")
    assert build_lineage(package, dataset, "", "")["manifest_hash"] == manifest.content_hash  # the dataset wins
    with pytest.raises(Exception, match="manifest"):
        build_lineage(package, tmp_path / "no-dataset-here")


def test_merge_lineage_caller_values_win_unless_unknown():
    base = {k: f"base-{k}" for k in LINEAGE_KEYS}
    merged = merge_lineage(base, {"git_commit": "given", "pipeline_run_id": "", "plan_hash": "unknown", "extra": "x", "manifest_hash": None})
    assert merged["git_commit"] == "given" and merged["pipeline_run_id"] == "base-pipeline_run_id" and merged["plan_hash"] == "base-plan_hash"
    assert merged["manifest_hash"] == "base-manifest_hash" and merged["extra"] == "x"
    assert merge_lineage({}, None) == {k: UNKNOWN for k in LINEAGE_KEYS}
    # git_dirty belongs to the base's commit: another commit named without its own state drops it
    base = {**base, "git_commit": "tree", "git_dirty": "true"}
    assert merge_lineage(base, {"git_commit": "tree"})["git_dirty"] == "true"
    assert merge_lineage(base, {"git_commit": "other"})["git_dirty"] == UNKNOWN
    assert merge_lineage(base, {"git_commit": "other", "git_dirty": "false"})["git_dirty"] == "false"
