"""Data from S3 and data versioning with DVC on S3, against a real ``moto_server`` on 127.0.0.1.

* :mod:`medseg.data.s3`: ``download_prefix`` / ``stage_source`` (checksums, atomicity, unsafe keys, clear
  errors for an empty prefix, a missing bucket, missing or rejected credentials, an unreachable endpoint).
* :mod:`medseg.data.dvc_remote` and ``medseg data``: ``dvc add`` → remote on the moto bucket → push →
  ``git clone`` → pull with credentials from the environment only → identical files; no secret committed.
* ``dvc repro`` of the project's own ``dvc.yaml`` with the smallest parameters, twice (slow).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.cli import main
from medseg.data import dvc_remote, s3
from medseg.errors import MedsegError

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Dummy credentials: moto accepts any; they exist only in the environment of these tests.
DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "medsegtestkeyid0001", "AWS_SECRET_ACCESS_KEY": "medseg-test-secret-value-0002", "AWS_DEFAULT_REGION": "us-east-1"}
GIT_ID = ["-c", "user.name=medseg tests", "-c", "user.email=tests@medseg.invalid"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _restore_dvc_logging():
    """DVC's commands attach log handlers bound to the stdout of the moment (pytest's capture, closed
    after the test); put the handlers back so later DVC use in the session does not log into a closed file."""
    import logging

    names = ("dvc", "")
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level) for n in names}
    yield
    for n, (handlers, level) in saved.items():
        logging.getLogger(n).handlers[:] = handlers
        logging.getLogger(n).setLevel(level)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A real ``moto_server`` on 127.0.0.1 (S3-compatible), for the whole module."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {url} within 30 s")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Dummy credentials and the moto endpoint in this test's environment only; DVC isolated and offline."""
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MEDSEG_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _isolate_dvc(monkeypatch, tmp_path)
    return moto_endpoint


def _isolate_dvc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")  # no usage report leaves the machine
    for key in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):
        path = tmp_path / "dvc-env" / key.lower()
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(key, str(path))


@pytest.fixture
def bucket(s3_env: str) -> str:
    name = f"medseg-{uuid.uuid4().hex[:12]}"
    s3.make_client().create_bucket(Bucket=name)
    return name


def _nifti_bytes(seed: int, shape: tuple[int, int, int] = (10, 9, 8)) -> bytes:
    """A small gzipped NIfTI file written by nibabel."""
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    return gzip.compress(img.to_bytes(), mtime=0)


def _upload_tree(bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    client = s3.make_client()
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


TREE = {
    "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz": _nifti_bytes(0),
    "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz": _nifti_bytes(1),
    "notes.txt": b"two cases\n",
}


# --------------------------------------------------------------------------- pure functions
def test_parse_s3_uri() -> None:
    assert s3.parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert s3.parse_s3_uri("s3://bucket") == ("bucket", "")
    assert s3.parse_s3_uri(Path("s3://bucket/a")) == ("bucket", "a")  # Path() collapsed the "//"
    for bad in ("/data/raw", "http://bucket/a", "s3://", "s3://Bad_Bucket/x", "s3://ab/x"):
        with pytest.raises(MedsegError, match="S3 URI|bucket name"):
            s3.parse_s3_uri(bad)


@pytest.mark.parametrize("key", ["p/../evil", "p/a/../../evil", "p//abs", "p/./a", "p/", "p/a\\b", "q/other"])
def test_relative_key_refuses_unsafe_keys(key: str) -> None:
    with pytest.raises(MedsegError, match="refusing|not under"):
        s3.relative_key(key, "p/")
    assert s3.relative_key("p/c1/x.nii.gz", "p/").parts == ("c1", "x.nii.gz")


def test_verify_object_catches_size_and_checksum_mismatch() -> None:
    data = b"voxels" * 100
    md5 = hashlib.md5(data).hexdigest()
    s3.verify_object("s3://b/k", len(data), md5, len(data), f'"{md5}"')  # intact
    with pytest.raises(MedsegError, match=r"s3://b/k: size mismatch: received 599 bytes, S3 announced 600"):
        s3.verify_object("s3://b/k", len(data) - 1, md5, len(data), f'"{md5}"')
    with pytest.raises(MedsegError, match="checksum mismatch"):
        s3.verify_object("s3://b/k", len(data), md5, len(data), '"' + "0" * 32 + '"')
    # a multipart ETag, or one under SSE-KMS/SSE-C, is not an MD5: only the size can be checked
    s3.verify_object("s3://b/k", len(data), md5, len(data), '"' + "0" * 32 + '-3"')
    s3.verify_object("s3://b/k", len(data), md5, len(data), '"' + "0" * 32 + '"', etag_is_md5=False)


def test_client_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in s3.ENDPOINT_ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    assert s3.endpoint_url_from_env() is None  # AWS itself
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:8")  # the cluster's S3 Secret
    assert s3.endpoint_url_from_env() == "http://127.0.0.1:8"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert s3.endpoint_url_from_env() == "http://127.0.0.1:9"
    monkeypatch.setenv("MEDSEG_S3_ENDPOINT_URL", "http://127.0.0.1:10")  # ours wins
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    client = s3.make_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:10" and client.meta.region_name == "eu-west-3"


# --------------------------------------------------------------------------- download_prefix / stage_source
def test_download_prefix_round_trip(bucket: str, tmp_path: Path) -> None:
    _upload_tree(bucket, "raw/brats", TREE)
    s3.make_client().put_object(Bucket=bucket, Key="raw/brats/BraTS-GLI-00000-000/", Body=b"")  # a "folder" marker
    s3.make_client().put_object(Bucket=bucket, Key="raw/brats-other/x.txt", Body=b"not this one")  # same start, other folder

    out = tmp_path / "out"
    records = s3.download_prefix(f"s3://{bucket}/raw/brats", out / "dl", progress=False)

    assert [r["key"] for r in records] == sorted(f"raw/brats/{k}" for k in TREE)
    assert _tree_hashes(out / "dl") == {k: _sha256(v) for k, v in TREE.items()}
    for r in records:
        rel = r["key"][len("raw/brats/"):]
        assert r["sha256"] == _sha256(TREE[rel]) and r["size"] == len(TREE[rel])
        assert Path(r["path"]) == out / "dl" / rel and Path(r["path"]).is_file()
    img = nib.load(out / "dl" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1n.nii.gz")
    assert img.shape == (10, 9, 8)
    assert [p.name for p in out.iterdir()] == ["dl"]  # no temporary folder left behind


def test_stage_source(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    assert s3.stage_source(local, tmp_path / "work") == local  # unchanged, even if absent
    assert s3.stage_source(str(local), tmp_path / "work") == local
    _upload_tree(bucket, "datasets/brats", TREE)
    for source in (f"s3://{bucket}/datasets/brats/", Path(f"s3://{bucket}/datasets/brats")):  # argparse type=Path
        staged = s3.stage_source(source, tmp_path / "work", progress=False)
        assert staged == tmp_path / "work" / bucket / "datasets" / "brats"
        assert _tree_hashes(staged) == {k: _sha256(v) for k, v in TREE.items()}


class _TamperingClient:
    """A real S3 client whose GET answers are altered the way a broken transfer would alter them."""

    def __init__(self, client: Any, mode: str):
        self._client, self._mode = client, mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        response = self._client.get_object(**kwargs)
        if self._mode == "etag":
            response["ETag"] = '"' + "0" * 32 + '"'
        else:  # "truncate": the stream ends one byte early
            response["Body"] = _Truncated(response["Body"])
        return response


class _Truncated:
    def __init__(self, body: Any):
        self._data, self._body = body.read()[:-1], body

    def iter_chunks(self, size: int):
        yield self._data

    def close(self) -> None:
        self._body.close()


@pytest.mark.parametrize("mode, message", [("etag", "checksum mismatch"), ("truncate", "size mismatch")])
def test_corrupted_transfer_leaves_destination_untouched(bucket: str, tmp_path: Path, mode: str, message: str) -> None:
    _upload_tree(bucket, "raw", TREE)
    dest = tmp_path / "out" / "dl"
    dest.mkdir(parents=True)
    (dest / "previous.txt").write_text("an earlier complete download")
    with pytest.raises(MedsegError, match=message) as info:
        s3.download_prefix(f"s3://{bucket}/raw", dest, progress=False, client=_TamperingClient(s3.make_client(), mode))
    assert str(info.value).startswith(f"s3://{bucket}/raw/")  # names the object
    assert [p.name for p in dest.parent.iterdir()] == ["dl"]  # temp folder removed
    assert [p.name for p in dest.iterdir()] == ["previous.txt"]  # the old content stays as it was


class _OverwritingClient(_TamperingClient):
    """Someone replaces the object between the listing and its GET."""

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self._client.put_object(Bucket=kwargs["Bucket"], Key=kwargs["Key"], Body=b"a newer version")
        return self._client.get_object(**kwargs)


def test_object_replaced_during_download_is_an_error(bucket: str, tmp_path: Path) -> None:
    _upload_tree(bucket, "raw", TREE)
    with pytest.raises(MedsegError, match="the object changed while it was being downloaded"):
        s3.download_prefix(f"s3://{bucket}/raw", tmp_path / "out" / "dl", progress=False, client=_OverwritingClient(s3.make_client(), ""))
    assert not (tmp_path / "out" / "dl").exists()


def test_dotdot_key_is_refused_before_writing(bucket: str, tmp_path: Path) -> None:
    _upload_tree(bucket, "raw", {"ok.txt": b"fine", "../evil.txt": b"outside"})
    workdir = tmp_path / "a" / "b"
    with pytest.raises(MedsegError, match=rf"s3://{bucket}/raw/\.\./evil\.txt: refusing"):
        s3.stage_source(f"s3://{bucket}/raw", workdir, progress=False)
    assert not list(tmp_path.rglob("*.txt"))


def test_empty_prefix_and_missing_bucket_are_clear_errors(bucket: str, tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match=rf"^s3://{bucket}/nothing/here: no objects under this prefix$"):
        s3.download_prefix(f"s3://{bucket}/nothing/here", tmp_path / "dl", progress=False)
    s3.make_client().put_object(Bucket=bucket, Key="only-markers/", Body=b"")
    with pytest.raises(MedsegError, match="only folder markers"):
        s3.download_prefix(f"s3://{bucket}/only-markers", tmp_path / "dl", progress=False)
    with pytest.raises(MedsegError, match=r"^s3://medseg-no-such-bucket/x: bucket not found$"):
        s3.download_prefix("s3://medseg-no-such-bucket/x", tmp_path / "dl", progress=False)
    assert not (tmp_path / "dl").exists()


def test_unreachable_endpoint_is_a_clear_error(s3_env: str, tmp_path: Path) -> None:
    client = s3.make_client(endpoint_url=f"http://127.0.0.1:{_free_port()}", max_attempts=1)  # nothing listens there
    with pytest.raises(MedsegError, match=r"^s3://data/raw: cannot reach the S3 endpoint http://127\.0\.0\.1:\d+ \(EndpointConnectionError\)") as info:
        s3.download_prefix("s3://data/raw", tmp_path / "dl", progress=False, client=client)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no botocore traceback attached


def test_missing_and_rejected_credentials_are_clear_errors(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.stub import Stubber

    client = s3.make_client()
    with Stubber(client) as stub:  # moto accepts any key: the rejection AWS/MinIO would send, as it arrives
        stub.add_client_error("list_objects_v2", service_error_code="InvalidAccessKeyId", service_message="The AWS Access Key Id you provided does not exist in our records.", http_status_code=403)
        with pytest.raises(MedsegError, match="rejected the credentials \\(InvalidAccessKeyId\\)"):
            s3.download_prefix(f"s3://{bucket}/raw", tmp_path / "dl", progress=False, client=client)
    with Stubber(client) as stub:
        stub.add_client_error("list_objects_v2", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(MedsegError, match="access denied"):
            s3.download_prefix(f"s3://{bucket}/raw", tmp_path / "dl", progress=False, client=client)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(MedsegError, match="no S3 credentials found: set AWS_ACCESS_KEY_ID"):
        s3.download_prefix(f"s3://{bucket}/raw", tmp_path / "dl", progress=False)


# --------------------------------------------------------------------------- DVC round trip on the moto bucket
def _run(cmd: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=kwargs.pop("timeout", 120), **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _write_dataset(folder: Path) -> None:
    """A small canonical-looking dataset: NIfTI files and a manifest whose content_hash versions them."""
    from medseg.io import sha256_file
    from medseg.schemas import Manifest

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    files = {"imagesTr/CASE001_0000.nii.gz": _nifti_bytes(10), "imagesTr/CASE002_0000.nii.gz": _nifti_bytes(11), "labelsTr/CASE001.nii.gz": _nifti_bytes(12)}
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    cases = [{"case_id": "CASE001", "files": [{"path": rel, "sha256": sha256_file(folder / rel)} for rel in files]}]
    manifest = Manifest(dataset_name="tiny", source="s3://x/y", source_format="brats2023", cases=cases)
    manifest.content_hash = manifest.compute_hash()
    manifest.save(folder)


def test_dvc_push_clone_pull_round_trip(bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    _run(["git", "init", "-q"], origin)
    _run(["dvc", "init", "-q"], origin)
    _write_dataset(origin / "dataset")
    _run(["dvc", "add", "-q", "dataset"], origin)

    # the remote, through the CLI: endpoint from MEDSEG_S3_ENDPOINT_URL, nothing secret written
    assert main(["data", "remote", "--url", f"s3://{bucket}/dvcstore", "--repo", str(origin)]) == 0
    assert "remote 'storage'" in capsys.readouterr().out
    config = (origin / ".dvc" / "config").read_text()
    assert f"url = s3://{bucket}/dvcstore" in config and f"endpointurl = {os.environ['MEDSEG_S3_ENDPOINT_URL']}" in config
    assert "remote = storage" in config

    assert dvc_remote.push(origin) == 5  # 3 NIfTI files + manifest.json + the directory listing
    assert dvc_remote.push(origin) == 0  # nothing new
    assert main(["data", "push", "--repo", str(origin)]) == 0 and "up to date" in capsys.readouterr().out
    stored = [o["Key"] for o in s3.list_objects(s3.make_client(), bucket, "dvcstore/")]
    assert len(stored) == 5

    _run(["git", "add", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore", "dataset.dvc"], origin)
    _run(["git", *GIT_ID, "commit", "-q", "-m", "dataset v1"], origin)
    committed = _run(["git", "show", "HEAD:.dvc/config"], origin).stdout
    for secret in (DUMMY_ENV["AWS_ACCESS_KEY_ID"], DUMMY_ENV["AWS_SECRET_ACCESS_KEY"], "access_key_id", "secret_access_key", "session_token"):
        assert secret not in committed
    assert dvc_remote.secrets_in_config(origin) == []
    tracked = _run(["git", "ls-files"], origin).stdout.split()
    assert not any(p.startswith("dataset/") for p in tracked) and ".dvc/config.local" not in tracked

    # clean clones: credentials from the environment only, data from the bucket; plain `dvc pull` works too
    plain = tmp_path / "plain-clone"
    _run(["git", "clone", "-q", str(origin), str(plain)], tmp_path)
    _run(["dvc", "pull", "-q"], plain)
    assert _tree_hashes(plain / "dataset") == _tree_hashes(origin / "dataset")
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "dataset").exists() and not (clone / ".dvc" / "config.local").exists()
    assert main(["data", "pull", "--repo", str(clone), str(clone / "dataset.dvc")]) == 0
    assert "fetched 5 file(s)" in capsys.readouterr().out
    assert _tree_hashes(clone / "dataset") == _tree_hashes(origin / "dataset")

    version = dvc_remote.dataset_version(clone / "dataset")
    dvc_md5 = yaml.safe_load((clone / "dataset.dvc").read_text())["outs"][0]["md5"]
    assert version["content_hash"] == json.loads((origin / "dataset" / "manifest.json").read_text())["content_hash"]
    assert (version["dvc_md5"], version["dvc_file"], version["cases"]) == (dvc_md5, "dataset.dvc", 1)
    assert main(["data", "version", "--dataset", str(clone / "dataset")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dvc_md5"] == dvc_md5


def test_dvc_remote_errors_are_clear(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert main(["data", "push", "--repo", str(repo)]) == 2
    assert "not inside a DVC repository" in capsys.readouterr().err
    _run(["dvc", "init", "-q", "--no-scm"], repo)
    with pytest.raises(MedsegError, match="no DVC remote configured: run `medseg data remote"):
        dvc_remote.push(repo)
    with pytest.raises(MedsegError, match="not an S3 URI"):
        dvc_remote.configure_remote("/mnt/store", repo=repo)

    dvc_remote.configure_remote("s3://medseg-missing-bucket/store", repo=repo)
    with pytest.raises(MedsegError, match=r"DVC remote 'storage' \(s3://medseg-missing-bucket/store\): bucket not found"):
        dvc_remote.push(repo)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(MedsegError, match="no S3 credentials found"):
        dvc_remote.pull(repo)

    # a later call without an endpoint (env unset) drops the old one: the remote is AWS itself then
    monkeypatch.delenv("MEDSEG_S3_ENDPOINT_URL")
    info = dvc_remote.configure_remote("s3://medseg-other/store", repo=repo, level="local")
    assert info["endpointurl"] is None and info["config"].endswith("config.local")
    assert "endpointurl" not in (repo / ".dvc" / "config.local").read_text()


def test_dataset_version_without_dvc(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "dataset")
    version = dvc_remote.dataset_version(tmp_path / "dataset")
    assert len(version["content_hash"]) == 64 and version["dvc_md5"] is None and version["dvc_file"] is None
    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    manifest["content_hash"] = "0" * 64
    (tmp_path / "dataset" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MedsegError, match="manifest.json: manifest content_hash does not match"):
        dvc_remote.dataset_version(tmp_path / "dataset")
    with pytest.raises(MedsegError, match="nothing: dataset folder not found"):
        dvc_remote.dataset_version(tmp_path / "nothing")
    (tmp_path / "dataset" / "manifest.json").unlink()
    with pytest.raises(MedsegError, match="dataset: no manifest.json: not a dataset written by `medseg ingest`"):
        dvc_remote.dataset_version(tmp_path / "dataset")


# --------------------------------------------------------------------------- dvc repro of the project's pipeline
TINY_PARAMS = {
    "synth": {"cases": 6, "shape": [32, 32, 32], "seed": 0},
    "ingest": {"n_folds": 2, "test_fraction": 0.2},
    "train": {"epochs": 1, "iterations_per_epoch": 2, "max_val_cases": 1},
    "tune": {"n_trials": 1, "trial_params": {"epochs": 1, "iterations_per_epoch": 2, "max_val_cases": 1}},
}


@pytest.mark.slow
def test_dvc_repro_of_the_project_pipeline_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "medseg", repo / "medseg", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _isolate_dvc(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _run(["dvc", "init", "-q", "--no-scm"], repo)

    start = time.perf_counter()
    first = _run(["dvc", "repro"], repo, timeout=1500)
    first_s = time.perf_counter() - start
    for stage in ("synth", "ingest", "preprocess", "tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout[-3000:]
    metrics = json.loads((repo / "work" / "evaluation" / "metrics.json").read_text())
    assert metrics  # the evaluate stage wrote its metrics

    start = time.perf_counter()
    second = _run(["dvc", "repro"], repo, timeout=300)
    second_s = time.perf_counter() - start
    assert "Running stage" not in second.stdout and "Data and pipelines are up to date" in second.stdout, second.stdout
    status = _run(["dvc", "status"], repo)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    print(f"dvc repro: first {first_s:.1f} s, second {second_s:.1f} s")


# --------------------------------------------------------------------------- ingest from S3
def test_ingest_reads_an_s3_source(bucket: str, tmp_path: Path) -> None:
    from medseg.ingest import ingest
    from medseg.schemas import Manifest
    from tests.test_ingest import make_source

    local = make_source(tmp_path, patients=3)  # tmp_path/src
    files = {str(p.relative_to(local)): p.read_bytes() for p in sorted(local.rglob("*.nii.gz"))}
    _upload_tree(bucket, "brats/raw", files)
    out = tmp_path / "dataset"
    manifest = ingest(f"s3://{bucket}/brats/raw", out, progress=False)
    assert manifest.source == f"s3://{bucket}/brats/raw" and manifest.source_format == "brats2023"
    assert {c["case_id"] for c in manifest.cases} == {p.name for p in local.iterdir()}
    # the same files ingested from the local copy give the same dataset version
    assert ingest(local, tmp_path / "from-local", progress=False).content_hash == manifest.content_hash
    assert Manifest.load(out).content_hash == manifest.content_hash
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s3-source-")]  # staging removed


# --------------------------------------------------------------------------- upload_folder
def test_upload_folder_round_trips_every_file_and_puts_the_named_ones_last(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "out"
    files = {"volumes.csv": b"case_id,WT_ml\nA,1.5\n", "A.nii.gz": _nifti_bytes(1), "sub/B.nii.gz": _nifti_bytes(2), "z.txt": b"z"}
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    (local / ".A.nii.gz.tmp").write_bytes(b"a leftover temporary name")  # not uploaded
    records = s3.upload_folder(local, f"s3://{bucket}/pred/", last=("volumes.csv",), progress=False)
    assert [r["key"] for r in records] == ["pred/A.nii.gz", "pred/sub/B.nii.gz", "pred/z.txt", "pred/volumes.csv"]
    assert all(r["md5"] == hashlib.md5(files[r["key"][len("pred/"):]]).hexdigest() for r in records)
    back = tmp_path / "back"
    s3.download_prefix(f"s3://{bucket}/pred", back, progress=False)
    assert _tree_hashes(back) == {rel: _sha256(data) for rel, data in files.items()}
    # a second upload replaces objects of the same name and leaves the others
    (local / "z.txt").unlink()
    (local / "A.nii.gz").write_bytes(_nifti_bytes(3))
    s3.upload_folder(local, f"s3://{bucket}/pred", progress=False)
    s3.download_prefix(f"s3://{bucket}/pred", back, progress=False)
    assert _tree_hashes(back)["A.nii.gz"] == _sha256(_nifti_bytes(3)) and (back / "z.txt").read_bytes() == b"z"


def test_upload_folder_errors_name_the_folder_or_the_uri(s3_env: str, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="folder to upload not found") as err:
        s3.upload_folder(tmp_path / "missing", f"s3://{bucket}/x", progress=False)
    assert str(tmp_path / "missing") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsegError, match="no files to upload"):
        s3.upload_folder(tmp_path / "empty", f"s3://{bucket}/x", progress=False)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.csv").write_text("a\n")
    with pytest.raises(MedsegError, match="bucket not found") as err:
        s3.upload_folder(tmp_path / "one", "s3://medseg-no-such-bucket/x", progress=False)
    assert "s3://medseg-no-such-bucket/x/a.csv" in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(MedsegError, match="not an S3 URI"):
        s3.upload_folder(tmp_path / "one", "/tmp/x", progress=False)
