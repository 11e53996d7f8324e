"""``medseg registry rebuild``: a registered version trained again from its lineage comes out the same.

The full test (slow) synthesises a tiny dataset, trains a deterministic CPU model with this repository's HEAD
commit (run from a worktree, as the rebuild runs it, so uncommitted changes in the working tree play no part),
registers it with HEAD as its commit, rebuilds it and expects equal metrics and bitwise equal weights. The fast
tests cover the refusals (a commit the repository does not hold, data of another revision), the worktree's
clean-up on failure, the data fetched from DVC by the recorded md5, and the comparisons.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medseg import schemas
from medseg.cli import main
from medseg.errors import MedsegError
from medseg.io import sha256_file, write_text
from medseg.registry import rebuild as rb
from medseg.registry import registry as reg
from medseg.task import Task
from tests.factories import make_model_package, write_case
from tests.test_data_s3 import _isolate_dvc, _restore_dvc_logging, bucket, moto_endpoint, s3_env  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
UNKNOWN_COMMIT = "0123456789abcdef0123456789abcdef01234567"
# num_threads=1: the same thread count in both trainings, so CPU results are bitwise comparable
TINY_TRAIN = {"epochs": 1, "iterations_per_epoch": 2, "max_val_cases": 1, "device": "cpu", "seed": 7, "num_threads": 1, "deterministic": True}


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _worktrees() -> str:
    return _git("worktree", "list", "--porcelain")


@pytest.fixture(scope="module")
def head() -> str:
    return _git("rev-parse", "HEAD")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import mlflow

    tmp = tmp_path_factory.mktemp("rebuild-store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("medseg", artifact_location=(tmp / "artifacts").as_uri())
    package = make_model_package(tmp / "model")
    recorded = schemas.ModelPackage.load(package)
    recorded.training["config"] = dict(TINY_TRAIN)  # what a trained package records
    recorded.save(package)
    return {"uri": uri, "tmp": tmp, "package": package}


def _manifest_dataset(folder: Path, seed: int = 0) -> Path:
    """A canonical-looking dataset: one case's NIfTI files and a manifest versioning them."""
    paths, label = write_case(folder / "imagesTr", shape=(12, 12, 12), seed=seed)
    files = [{"path": p.relative_to(folder).as_posix(), "sha256": sha256_file(p)} for p in [*paths, label]]
    manifest = schemas.Manifest(dataset_name="tiny", source="test", source_format="brats2023", cases=[{"case_id": "c1", "files": files}])
    manifest.content_hash = manifest.compute_hash()
    manifest.save(folder)
    return folder


def _fake_metrics(dice: float = 0.8) -> schemas.Metrics:
    per_case = [{"case_id": "c1", "case_key": "k1", **{g: {"dice": dice, "hd95": 3.0} for g in ("WT", "TC", "ET")}}]
    return schemas.Metrics(n_cases=1, mean={g: {"dice": dice, "hd95": 3.0} for g in ("WT", "TC", "ET")}, per_case=per_case)


def _register(store: dict, name: str, dataset: Path, commit: str) -> str:
    out = reg.register_model(store["package"], _fake_metrics(), name, store["uri"], {"git_commit": commit, "pipeline_run_id": "test"}, {},
                             dataset_dir=dataset)
    return str(out["version"])


# --------------------------------------------------------------------------- refusals (fast)
def test_a_commit_the_repository_does_not_hold_is_refused(store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = _manifest_dataset(tmp_path / "dataset")
    version = _register(store, "rebuild-unknown-commit", dataset, UNKNOWN_COMMIT)
    tags = reg._client(store["uri"]).get_model_version("rebuild-unknown-commit", version).tags
    assert tags["dataset_path"] == str(dataset.resolve()) and tags["manifest_hash"] == schemas.Manifest.load(dataset).content_hash
    assert tags["dataset_dvc_md5"] == "unknown" and tags["git_commit"] == UNKNOWN_COMMIT
    before = _worktrees()
    with pytest.raises(MedsegError, match=f"commit {UNKNOWN_COMMIT} is not in the repository"):
        rb.rebuild("rebuild-unknown-commit", version, store["uri"], repo=ROOT)
    assert main(["registry", "rebuild", "rebuild-unknown-commit", "--version", version, "--tracking-uri", store["uri"], "--repo", str(ROOT)]) == 2
    assert f"commit {UNKNOWN_COMMIT} is not in the repository" in capsys.readouterr().err
    assert _worktrees() == before
    with pytest.raises(MedsegError, match="has no version 9"):
        rb.rebuild("rebuild-unknown-commit", "9", store["uri"], repo=ROOT)


def test_data_of_another_revision_is_refused(store: dict, head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = _manifest_dataset(tmp_path / "dataset")
    expected = schemas.Manifest.load(dataset).content_hash
    version = _register(store, "rebuild-other-data", dataset, head)
    other = _manifest_dataset(tmp_path / "other", seed=1)
    before = _worktrees()

    # another revision given explicitly: refused, naming both hashes
    code = main(["registry", "rebuild", "rebuild-other-data", "--version", version, "--tracking-uri", store["uri"], "--repo", str(ROOT), "--dataset", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "manifest hash mismatch" in err and schemas.Manifest.load(other).content_hash in err and expected in err
    # the recorded folder changed behind the manifest's back, and nothing else records the revision
    image = next((dataset / "imagesTr").glob("*t1n*"))
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(MedsegError, match=rf"1 of 5 file\(s\) differ from the manifest of revision {expected}: imagesTr/{image.name} changed.*no DVC md5 is recorded"):
        rb.rebuild("rebuild-other-data", version, store["uri"], repo=ROOT)
    image.unlink()
    with pytest.raises(MedsegError, match=f"imagesTr/{image.name} missing"):
        rb.rebuild("rebuild-other-data", version, store["uri"], repo=ROOT)
    assert _worktrees() == before  # refused before any worktree was made


def test_verify_dataset_checks_the_manifest_against_its_own_list(tmp_path: Path) -> None:
    dataset = _manifest_dataset(tmp_path / "dataset")
    manifest = schemas.Manifest.load(dataset)
    assert rb.verify_dataset(dataset, manifest.content_hash) == 5
    manifest.cases[0]["files"][0]["sha256"] = "0" * 64  # an edited list under the old hash
    manifest.save(dataset)
    with pytest.raises(MedsegError, match="does not match its own list of files"):
        rb.verify_dataset(dataset, manifest.content_hash)
    with pytest.raises(MedsegError, match="no manifest.json"):
        rb.verify_dataset(tmp_path, manifest.content_hash)


def test_the_worktree_is_removed_also_on_failure(head: str, tmp_path: Path) -> None:
    where = tmp_path / "source"
    with pytest.raises(RuntimeError, match="boom"):
        with rb.worktree(ROOT, head, where) as source:
            assert (source / "medseg" / "cli.py").is_file() and str(source) in _worktrees()
            raise RuntimeError("boom")
    assert not where.exists() and str(where) not in _worktrees()
    assert rb.resolve_commit(ROOT, head[:12]) == head
    with pytest.raises(MedsegError, match="not a commit id"):
        rb.resolve_commit(ROOT, "--all")
    with pytest.raises(MedsegError, match="records no git_commit"):
        rb.resolve_commit(ROOT, None)


@pytest.mark.parametrize("remote", ["local", "s3"])
def test_the_data_come_back_from_dvc_by_the_recorded_md5(remote: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """A dataset `dvc add`ed and pushed (to a folder, or to an S3 bucket on a moto server with credentials from the
    environment), then gone from the workspace: back from DVC's cache first, from the remote once the cache is gone too."""
    import shutil

    from medseg.data import dvc_remote
    from medseg.registry.lineage import build_lineage

    if remote == "s3":
        bucket = request.getfixturevalue("bucket")  # moto server, dummy credentials, DVC isolated (tests/test_data_s3.py)
    else:
        _isolate_dvc(monkeypatch, tmp_path)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    dataset = _manifest_dataset(repo / "dataset")
    expected = schemas.Manifest.load(dataset).content_hash
    subprocess.run(["dvc", "add", "-q", "dataset"], cwd=repo, env=env, check=True, capture_output=True)
    if remote == "s3":
        dvc_remote.configure_remote(f"s3://{bucket}/store", repo=repo)
    else:
        subprocess.run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], cwd=repo, env=env, check=True, capture_output=True)
    assert dvc_remote.push(repo) == 7  # 5 files + manifest.json + the directory listing

    lineage = build_lineage(make_model_package(tmp_path / "model"), dataset)
    assert lineage["dataset_dvc_md5"].endswith(".dir") and lineage["manifest_hash"] == expected
    shutil.rmtree(dataset)
    for step in ("cache", "remote"):
        if step == "remote":
            shutil.rmtree(repo / ".dvc" / "cache")
        with contextlib.ExitStack() as stack:
            found = rb.locate_dataset(lineage, None, repo, stack)
            assert found.how == f"DVC {lineage['dataset_dvc_md5']}" and found.files_checked == 5 and found.path.is_dir()
            assert found.path.parent.parent == repo  # inside the repository while in use
        assert not found.path.exists(), step  # and removed afterwards
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".medseg-rebuild")]

    with contextlib.ExitStack() as stack, pytest.raises(MedsegError, match=f"the version was trained on {'f' * 64}"):
        rb.locate_dataset({**lineage, "manifest_hash": "f" * 64}, None, repo, stack)


# --------------------------------------------------------------------------- comparisons (fast)
def test_metrics_are_compared_per_group_and_the_primary_metric_decides(tmp_path: Path) -> None:
    task = Task.from_folder(make_model_package(tmp_path / "model"))
    registered = {"test_WT_dice": 0.80, "test_TC_dice": 0.70, "test_ET_dice": 0.60, "test_WT_hd95": 3.0, "test_TC_hd95": 3.0, "test_ET_hd95": 3.0,
                  "test_n_cases": 1.0}
    rebuilt = schemas.Metrics(n_cases=1, mean={"WT": {"dice": 0.805, "hd95": 9.0}, "TC": {"dice": 0.72, "hd95": 3.0}, "ET": {"dice": 0.60, "hd95": 3.0}},
                              per_case=[])
    rows = {(r.group, r.metric): r for r in rb.compare_metrics(registered, rebuilt, task, 0.01)}
    assert rows[("WT", "dice")].within and rows[("WT", "dice")].diff == pytest.approx(0.005)
    assert not rows[("TC", "dice")].within and rows[("TC", "dice")].checked
    assert rows[("WT", "hd95")].within and not rows[("WT", "hd95")].checked  # distances are shown, not judged
    same = {"same": True, "rebuilt_cases": 1, "registered_cases": 1, "rebuilt": "h", "registered": "h"}
    ok, why = rb._verdict(list(rows.values()), same, {}, "dice", 0.01, False)
    assert not ok and "1 of 3 dice value(s) differ by more than 0.01: TC 0.7000 → 0.7200" in why
    looser = rb.compare_metrics(registered, rebuilt, task, 0.05)
    assert rb._verdict(looser, same, {}, "dice", 0.05, False) == (True, "every dice within 0.05 of the registered value (largest difference 0.02)")
    ok, why = rb._verdict(looser, {**same, "same": False}, {}, "dice", 0.05, False)
    assert not ok and "another test set" in why


def test_weights_are_compared_tensor_by_tensor(tmp_path: Path) -> None:
    a, b = make_model_package(tmp_path / "a"), make_model_package(tmp_path / "b")
    same = rb.compare_weights(a, b)
    assert same["bitwise_equal"] and same["n_different"] == 0 and same["n_tensors"] > 4
    weights = torch.load(b / schemas.WEIGHTS_FILE, weights_only=True)
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] += 1e-6
    torch.save(weights, b / schemas.WEIGHTS_FILE)
    differ = rb.compare_weights(a, b)
    assert not differ["bitwise_equal"] and differ["different"] == [key] and 0 < differ["max_abs_diff"] < 1e-5


# --------------------------------------------------------------------------- the whole rebuild (slow)
@pytest.mark.slow  # two trainings and evaluations in subprocesses of the commit's code: about a minute on 2 shared cores
def test_a_registered_version_rebuilt_from_its_lineage_is_the_same(store: dict, head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.ingest.ingest import ingest
    from medseg.synth import generate_dataset

    generate_dataset(tmp_path / "raw", 6, (32, 32, 32), seed=0, progress=False, anatomy="procedural")
    dataset = tmp_path / "dataset"
    ingest(tmp_path / "raw", dataset, n_folds=2, test_fraction=0.2, seed=0, progress=False)

    # the registered model: trained and evaluated by HEAD's code, as the rebuild will run it
    original = tmp_path / "original"
    original.mkdir()
    params = write_text(original / schemas.PARAMS_YAML, json.dumps({"train": TINY_TRAIN}))
    with rb.worktree(ROOT, head, tmp_path / "source") as source:
        for args in (["preprocess", "--dataset", dataset, "--out", original / "pre", "--device-budget", "cpu", "--configuration", "auto"],
                     ["train", "--preprocessed", original / "pre", "--params", params, "--out", original / "train", "--tracking-uri", store["uri"]],
                     ["evaluate-model", "--model", original / "train" / "model", "--dataset", dataset, "--out", original / "evaluation", "--overlap", "0.5"]):
            rb.run_medseg(source, args, original, original / f"{args[0]}.txt", head)
    name = "rebuild-tiny"
    registered = reg.register_model(original / "train" / "model", schemas.Metrics.load(original / "evaluation"), name, store["uri"],
                                    {"git_commit": head, "git_dirty": "false", "pipeline_run_id": "test"}, {}, dataset_dir=dataset)  # trained from a clean worktree
    tags = reg._client(store["uri"]).get_model_version(name, registered["version"]).tags
    assert tags["training_run_id"] != "unknown" and tags["dataset_path"] == str(dataset.resolve())

    code = main(["registry", "rebuild", name, "--version", registered["version"], "--tracking-uri", store["uri"], "--repo", str(ROOT), "--json"])
    out = capsys.readouterr().out
    result = json.loads(out)
    assert code == 0, out
    assert result["reproduced"] and result["commit"] == head and result["data"]["how"] == "recorded dataset_path"
    assert result["test_set"]["same"] and result["test_set"]["rebuilt_cases"] >= 1
    assert result["weights"]["bitwise_expected"] and result["weights"]["bitwise_equal"], result["weights"]
    checked = [m for m in result["metrics"] if m["checked"]]
    assert {"WT", "TC", "ET"} <= {m["group"] for m in checked}  # every region (and label group) the task reports
    assert all(m["diff"] == pytest.approx(0.0, abs=1e-9) for m in checked)
    assert result["warnings"] == [], result["warnings"]
    assert result["overlap"] == 0.5 and result["params"]["deterministic"] is True
    assert str(tmp_path / "source") not in _worktrees()

    text = io.StringIO()
    rb.print_result(rb.RebuildResult(**result), text)
    lines = text.getvalue().splitlines()
    assert lines[0].startswith(f"rebuild of {name} v1 at commit {head[:12]}") and lines[-1].startswith("reproduced: every dice within 0.01")
    assert any(line.split()[:2] == ["WT", "dice"] and line.endswith("ok") for line in lines)
    assert any("weights: bitwise equal" in line for line in lines)
