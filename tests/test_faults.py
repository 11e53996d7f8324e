"""Faults injected into the real local parts (issue 15, point 7), and what must survive them.

* The S3 endpoint (a real ``moto_server``) is killed during ``medseg ingest --source s3://…`` (between objects and
  mid-body) and during ``medseg data push`` / ``pull``: a bounded retry with backoff, then one clear line naming
  the endpoint and the object; no half-written dataset or workspace; after a restart a re-run completes (same
  manifest hash as a clean run, the push uploads everything, the pull brings the same files).
* The disk fills during ``medseg preprocess``: a real tmpfs that is too small when the tests run as root and
  may mount, else a simulated ``ENOSPC`` (the test says which in its output); a clear error naming the file,
  nothing half-written left, a re-run with space gives the clean run's files.
* The model server is killed mid-request and restarted: the client's bounded retry ends in a clear error, the
  restarted server serves the same version, and the same request gives the same answer; a client retrying long
  enough rides over a restart. The retry policy itself is checked against a real socket server.

moto keeps its data in memory: a restarted endpoint is empty, so the tests upload the source again (a real
S3 or MinIO keeps it; the retry and rerun paths are the same).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from medseg.cli import main
from medseg.data import s3
from medseg.errors import MedsegError

VENV_BIN = Path(sys.executable).parent
# Dummy credentials: moto accepts any; they exist only in the environment of these tests.
DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "medsegfaultkey0001", "AWS_SECRET_ACCESS_KEY": "medseg-fault-secret-0002", "AWS_DEFAULT_REGION": "us-east-1"}
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- a moto_server that can be killed and restarted
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """A real ``moto_server`` on 127.0.0.1:port, which a test may kill (SIGKILL: no goodbye) and start again."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "moto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it on the same port as before and wait until it answers."""
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90  # ~2 s when idle; far more on a loaded 2-core machine
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"moto_server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {self.url} within 90 s")
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost node would stop it; returns once the process is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog) but nothing answers, as a hung server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh moto_server per test (the tests kill it), with dummy credentials and its endpoint in this test's
    environment only; DVC isolated from the user's config and offline."""
    server = MotoServer(tmp_path)
    server.start()
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MEDSEG_S3_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for key in ("DVC_GLOBAL_CONFIG_DIR", "DVC_SYSTEM_CONFIG_DIR", "DVC_SITE_CACHE_DIR"):
        path = tmp_path / "dvc-env" / key.lower()
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(key, str(path))
    yield server
    server.kill()


def _upload(bucket: str, prefix: str, folder: Path) -> int:
    """Create ``bucket`` and upload every file of ``folder`` under ``prefix``; returns the object count."""
    client = s3.make_client()
    client.create_bucket(Bucket=bucket)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return len(files)


def _tree(folder: Path) -> dict[str, str]:
    """relative path → sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary names (``.NAME.….tmp``, staging folders) in ``folder``: what a half-finished write leaves."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- S3 endpoint stops during ingest
@pytest.mark.slow
def test_s3_endpoint_killed_during_ingest(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg.ingest import ingest
    from medseg.schemas import Manifest
    from tests.test_ingest import make_source

    source = make_source(tmp_path, patients=4)  # 4 cases × 5 NIfTI files
    bucket, prefix = f"faults-{uuid.uuid4().hex[:8]}", "brats/raw"
    n_objects = _upload(bucket, prefix, source)
    uri = f"s3://{bucket}/{prefix}"
    work = tmp_path / "work"
    out = work / "dataset"
    clean = ingest(uri, out, progress=False)  # a clean run: the version to reach again
    clean_tree = _tree(out)

    # Kill the endpoint as the 7th object is asked for (mid-way through the second case), through botocore's own
    # event hooks on the real client; record every attempt at the object that met the dead endpoint.
    kill_at = 7
    gets: list[str] = []
    attempts: list[float] = []
    real_make_client = s3.make_client

    def make_client(*args: Any, **kwargs: Any) -> Any:
        client = real_make_client(*args, **kwargs)

        def on_call(params: dict[str, Any], **_: Any) -> None:
            gets.append(params["Key"])
            if len(gets) == kill_at:
                moto.kill()

        def on_send(request: Any, **_: Any) -> None:
            if len(gets) >= kill_at:
                attempts.append(time.monotonic())

        client.meta.events.register("before-parameter-build.s3.GetObject", on_call)
        client.meta.events.register("before-send.s3.GetObject", on_send)
        return client

    monkeypatch.setattr(s3, "make_client", make_client)
    t0 = time.monotonic()
    code = main(["ingest", "--source", uri, "--out", str(out), "--no-progress"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ningest with the endpoint killed at object {kill_at}/{n_objects}: {len(attempts)} attempt(s), failed after {elapsed:.1f} s\n{err.strip()}")

    # a clear error, one line, naming the endpoint and the object; bounded retry with backoff, no hang
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert line.startswith(f"error: s3://{bucket}/{gets[kill_at - 1]}: ")
    assert f"cannot reach the S3 endpoint {moto.url}" in line
    assert len(attempts) == 3, "make_client's max_attempts=3 (standard mode, first request included) bounds the retries"
    assert "(3 attempts with backoff)" in line
    assert elapsed < 30
    # nothing half-written: the dataset of the clean run is untouched, no temporary or staging folder is left
    assert _tree(out) == clean_tree
    assert _leftovers(work) == []

    # the endpoint comes back (empty: moto keeps data in memory), the source is uploaded again, the re-run completes
    monkeypatch.setattr(s3, "make_client", real_make_client)
    moto.start()
    _upload(bucket, prefix, source)
    assert main(["ingest", "--source", uri, "--out", str(out), "--no-progress"]) == 0
    assert Manifest.load(out).content_hash == clean.content_hash
    assert {k: v for k, v in _tree(out).items() if k != "manifest.json"} == {k: v for k, v in clean_tree.items() if k != "manifest.json"}
    assert _leftovers(work) == []


@pytest.mark.slow
def test_s3_endpoint_frozen_during_ingest(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A hung endpoint (accepts, never answers) must not hang ingest: the read timeout and the attempts bound it
    (set short here through MEDSEG_S3_READ_TIMEOUT / MEDSEG_S3_MAX_ATTEMPTS); once it answers again the re-run
    completes with the clean run's version."""
    from medseg.ingest import ingest
    from medseg.schemas import Manifest
    from tests.test_ingest import make_source

    source = make_source(tmp_path, patients=2)
    bucket, prefix = f"faults-{uuid.uuid4().hex[:8]}", "raw"
    _upload(bucket, prefix, source)
    uri = f"s3://{bucket}/{prefix}"
    work = tmp_path / "work"
    clean = ingest(uri, work / "clean", progress=False)

    monkeypatch.setenv("MEDSEG_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("MEDSEG_S3_MAX_ATTEMPTS", "2")
    gets: list[str] = []
    real_make_client = s3.make_client

    def make_client(*args: Any, **kwargs: Any) -> Any:
        client = real_make_client(*args, **kwargs)

        def on_call(params: dict[str, Any], **_: Any) -> None:
            gets.append(params["Key"])
            if len(gets) == 3:
                moto.freeze()

        client.meta.events.register("before-parameter-build.s3.GetObject", on_call)
        return client

    monkeypatch.setattr(s3, "make_client", make_client)
    t0 = time.monotonic()
    try:
        code = main(["ingest", "--source", uri, "--out", str(work / "dataset"), "--no-progress"])
    finally:
        moto.thaw()
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ningest with the endpoint frozen at object 3: failed after {elapsed:.1f} s\n{err.strip()}")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: s3://{bucket}/{gets[2]}: the S3 endpoint {moto.url} accepted the connection but sent no answer")
    assert "(2 attempts with backoff)" in line
    assert elapsed < 20, "bounded by the read timeout and the attempts"
    assert sorted(p.name for p in work.iterdir()) == ["clean"]  # no dataset, no temporary or staging folder

    monkeypatch.setattr(s3, "make_client", real_make_client)
    assert ingest(uri, work / "dataset", progress=False).content_hash == clean.content_hash  # it answers again


def test_s3_endpoint_killed_mid_body(moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Killed while an object's body streams (headers in, body not): the object is downloaded again from the start,
    which meets the dead endpoint, and the download ends in the clear error; nothing is left in ``dest``'s folder."""
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    client = s3.make_client()
    client.create_bucket(Bucket=bucket)
    big = os.urandom(48 << 20)  # larger than the loopback socket buffers: most of it is still in moto when it dies
    client.put_object(Bucket=bucket, Key="raw/a/big.bin", Body=big)
    client.put_object(Bucket=bucket, Key="raw/b/small.bin", Body=b"small")

    def kill_once_headers_are_in(http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name == "GetObject" and parsed.get("ContentLength") == len(big):
            moto.kill()

    client.meta.events.register("after-call.s3.GetObject", kill_once_headers_are_in)
    caplog.set_level(logging.WARNING, logger="medseg.data.s3")
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "dl"
    with pytest.raises(MedsegError) as info:
        s3.download_prefix(f"s3://{bucket}/raw", dest, progress=False, client=client)
    message = str(info.value)
    print(f"\nkilled mid-body: {[r.getMessage() for r in caplog.records]}\n{message}")
    assert message.startswith(f"s3://{bucket}/raw/a/big.bin: ")
    assert f"cannot reach the S3 endpoint {moto.url}" in message and "(3 attempts with backoff)" in message
    cuts = [r.getMessage() for r in caplog.records if "transfer interrupted" in r.getMessage()]
    assert len(cuts) == 1 and "downloading it again" in cuts[0]
    assert list((tmp_path / "out").iterdir()) == []  # no dest, no temporary folder, no partial file


# --------------------------------------------------------------------------- S3 endpoint stops during `medseg data push`
def _dvc(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _kill_on_request(moto: MotoServer, marker: str, stop: threading.Event) -> threading.Thread:
    """A thread that kills the endpoint as soon as its request log shows ``marker`` (from now on)."""
    start = len(moto.log_text())

    def watch() -> None:
        while not stop.is_set():
            if marker in moto.log_text()[start:]:
                moto.kill()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_s3_endpoint_killed_during_data_push(moto: MotoServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _dvc(["git", "init", "-q"], repo)
    _dvc(["dvc", "init", "-q"], repo)
    data = repo / "data"
    data.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    n_files = 40
    for i in range(n_files):
        (data / f"part{i:03d}.bin").write_bytes(rng.bytes(40_000))
    _dvc(["dvc", "add", "-q", "data"], repo)
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.make_client().create_bucket(Bucket=bucket)
    assert main(["data", "remote", "--url", f"s3://{bucket}/store", "--repo", str(repo)]) == 0
    capsys.readouterr()

    stop = threading.Event()
    watcher = _kill_on_request(moto, f"PUT /{bucket}/store/files/", stop)  # the first upload of a DVC object
    t0 = time.monotonic()
    code = main(["data", "push", "--repo", str(repo)])
    elapsed = time.monotonic() - t0
    stop.set()
    watcher.join(timeout=5)
    captured = capsys.readouterr()
    with capsys.disabled():
        print(f"\ndata push with the endpoint killed at the first upload: failed after {elapsed:.1f} s")
        print("\n".join(line for line in captured.err.splitlines() if line.startswith("error:")))

    assert code == 2
    assert moto.proc is not None and moto.proc.poll() is not None, "the endpoint was killed mid-push"
    lines = [line for line in (captured.err + captured.out).splitlines() if line.strip()]
    assert "Traceback" not in captured.err
    assert not [line for line in lines if "failed to transfer" in line and not line.startswith("error:")], "one summary line, not one per file"
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1
    assert f"dvc push to s3://{bucket}/store failed" in error[0] and "files failed to upload" in error[0]
    assert f"{moto.url}/{bucket}/store/files/md5/" in error[0], "names the endpoint and an object"
    assert f"cannot reach the S3 endpoint {moto.url}" in error[0]
    assert "run `medseg data push` again" in error[0]
    assert elapsed < 60, "bounded retries (3 attempts per request), not ~7 s per file"
    assert os.environ.get("AWS_MAX_ATTEMPTS") is None, "the retry bound is not left in the environment"

    # the endpoint restarts (empty): a second push completes and the remote holds all the data
    moto.start()
    s3.make_client().create_bucket(Bucket=bucket)
    assert main(["data", "push", "--repo", str(repo)]) == 0
    assert f"pushed {n_files + 1} file(s)" in capsys.readouterr().out  # the files and the directory listing
    assert len(s3.list_objects(s3.make_client(), bucket, "store/")) == n_files + 1
    assert main(["data", "push", "--repo", str(repo)]) == 0 and "up to date" in capsys.readouterr().out

    # `medseg data pull` into a workspace without the data (as a fresh clone), the endpoint killed at the first download
    expected = _tree(data)
    cache = repo / ".dvc" / "cache"
    cache.rename(tmp_path / "cache-aside")
    for path in sorted(data.iterdir()):
        path.unlink()
    data.rmdir()
    stop = threading.Event()
    watcher = _kill_on_request(moto, f"GET /{bucket}/store/files/", stop)
    code = main(["data", "pull", "--repo", str(repo)])
    stop.set()
    watcher.join(timeout=5)
    captured = capsys.readouterr()
    error = [line for line in captured.err.splitlines() if line.startswith("error:")]
    with capsys.disabled():
        print(f"data pull with the endpoint killed at the first download:\n{error}")
    assert code == 2 and moto.proc is not None and moto.proc.poll() is not None
    assert "Traceback" not in captured.err and len(error) == 1
    assert f"dvc pull from s3://{bucket}/store failed" in error[0] and f"cannot reach the S3 endpoint {moto.url}" in error[0]
    assert not data.exists() or _tree(data).items() <= expected.items(), "no half-written file in the workspace"

    # back (empty): the data pushed again from the copy aside, then the pull completes with the same files
    moto.start()
    s3.make_client().create_bucket(Bucket=bucket)
    shutil.rmtree(cache, ignore_errors=True)
    (tmp_path / "cache-aside").rename(cache)
    assert main(["data", "push", "--repo", str(repo)]) == 0
    shutil.rmtree(cache)
    assert main(["data", "pull", "--repo", str(repo)]) == 0
    assert _tree(data) == expected


# --------------------------------------------------------------------------- the disk fills during preprocessing
def _mount_tmpfs(folder: Path, size_bytes: int) -> str | None:
    """Mount a tmpfs of ``size_bytes`` on ``folder``; ``None`` when it worked, else why not (not root, no mount,
    or ``MEDSEG_FAULTS_SIMULATE_ENOSPC=1``, which tries the simulated path where root could mount)."""
    if os.environ.get("MEDSEG_FAULTS_SIMULATE_ENOSPC") == "1":
        return "MEDSEG_FAULTS_SIMULATE_ENOSPC=1"
    if os.geteuid() != 0:
        return "not root"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount failed: {done.stderr.strip()[:200]}"


class _FillingDisk:
    """The simulated disk where a real tmpfs cannot be mounted: ``numpy.save`` (the preprocessed arrays, the bulk
    of the bytes) writes into the file until ``capacity`` bytes are used, then fails with ``ENOSPC``."""

    def __init__(self, capacity: int, real_save: Any) -> None:
        self.capacity, self.used, self.real_save = capacity, 0, real_save

    def save(self, file: Any, arr: Any, *args: Any, **kwargs: Any) -> None:
        import io

        buffer = io.BytesIO()
        self.real_save(buffer, arr, *args, **kwargs)
        data = buffer.getvalue()
        room = max(0, self.capacity - self.used)
        file.write(data[:room])  # what fits is written, as the kernel would, then the disk is full
        self.used += min(room, len(data))
        if len(data) > room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``(folder, mode, grow)``: a folder that fills up, with ``mode`` "tmpfs" (a real tmpfs that is too small,
    when root may mount one) or "simulated ENOSPC"; ``grow()`` gives it room for a re-run. Unmounted afterwards."""
    import numpy

    from tests.test_preprocessing import build_tiny_dataset

    holder: dict[str, Path] = {}

    class _Factory:  # build_tiny_dataset wants a TempPathFactory; one folder of this test will do
        @staticmethod
        def mktemp(name: str) -> Path:
            holder[name] = tmp_path / name
            holder[name].mkdir()
            return holder[name]

    tiny = build_tiny_dataset(_Factory())  # type: ignore[arg-type]
    clean_bytes = sum(p.stat().st_size for p in tiny["pre"].rglob("*") if p.is_file())
    capacity = (clean_bytes // 2) // 4096 * 4096  # room for about half of the preprocessed output
    folder = tmp_path / "small-disk"
    folder.mkdir()
    why_not = _mount_tmpfs(folder, capacity)
    if why_not is None:
        mode = "tmpfs"

        def grow() -> None:
            subprocess.run(["mount", "-o", f"remount,size={clean_bytes * 4}", str(folder)], check=True)
    else:
        mode = f"simulated ENOSPC ({why_not})"
        disk = _FillingDisk(capacity, numpy.save)
        monkeypatch.setattr(numpy, "save", disk.save)

        def grow() -> None:
            monkeypatch.setattr(numpy, "save", disk.real_save)
    log.warning("disk-full test uses %s: %d bytes for %d bytes of output", mode, capacity, clean_bytes)
    try:
        yield folder, mode, grow, tiny
    finally:
        if mode == "tmpfs":
            subprocess.run(["umount", str(folder)], check=False)
            if os.path.ismount(folder):
                subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_fills_during_preprocessing(small_disk: tuple[Path, str, Any, dict[str, Path]], capsys: pytest.CaptureFixture[str]) -> None:
    folder, mode, grow, tiny = small_disk
    out = folder / "pre"
    # two worker processes on the real tmpfs (the error crosses a process boundary); one where the disk is simulated
    # (the byte count of the patched numpy.save lives in one process)
    argv = ["preprocess", "--dataset", str(tiny["dataset"]), "--out", str(out), "--workers", "2" if mode == "tmpfs" else "1"]
    code = main(argv)
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\ndisk full during preprocessing, {mode}:\n" + "\n".join(line for line in err.splitlines() if "error" in line))

    # a clear error naming the output file (its final name, not the vanished temporary one) and the full disk
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # stderr also holds tqdm's bar, closed first
    assert len(errors) == 1
    line = errors[0]
    assert line.startswith(f"error: {out}/3d_fullres/") and ".npy: no space left on device (ENOSPC)" in line, line
    assert ".tmp" not in line
    # nothing half-written: no preprocessed folder, no temporary file or folder, no plan
    assert list(folder.iterdir()) == []

    # with room again the re-run completes, with the clean run's files
    grow()
    assert main(argv) == 0
    assert _tree(out) == _tree(tiny["pre"])
    assert _leftovers(folder) == []


# --------------------------------------------------------------------------- the model server is killed mid-request
SERVED_NAME = "brats"


def _start_server(package: Path, port: int, log_file: Path) -> subprocess.Popen:
    from medseg.serving import server

    proc = server.start_server_process(package, SERVED_NAME, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"})
    try:
        server.wait_until_ready(f"http://127.0.0.1:{port}", SERVED_NAME, timeout_s=120, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    return proc


def _kill_mid_request(proc: subprocess.Popen, port: int, request: threading.Thread) -> None:
    """SIGKILL the server once the client's request is on an established connection and the server works on it
    (no answer yet); fails the test if the answer came first (the kill would not be mid-request)."""
    import psutil

    deadline = time.monotonic() + 30
    server_proc = psutil.Process(proc.pid)
    connections = getattr(server_proc, "net_connections", None) or server_proc.connections  # psutil < 6 (kserve's cap)
    while not any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in connections(kind="tcp")):
        if time.monotonic() > deadline or not request.is_alive():
            pytest.fail("the request never reached the server")
        time.sleep(0.01)
    time.sleep(0.1)  # the body is (mostly) in; the server is decoding or predicting
    assert request.is_alive(), "the answer came before the kill: the case is too small to kill the server mid-request"
    assert server_proc.children() == [], "the server is one process: killing it kills the model server"
    proc.kill()  # SIGKILL: no graceful drain, as an OOM kill or a lost node
    proc.wait(timeout=10)


def _answer(result: dict[str, Any]) -> tuple[Any, ...]:
    from medseg.io import load_nifti_bytes

    array, affine, _ = load_nifti_bytes(result["segmentation_bytes"], name="answer")
    return result["model_version"], result["model_name"], array.tobytes(), affine.tobytes(), result["volumes_ml"]


@pytest.mark.slow
def test_model_server_killed_mid_request_and_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medseg.serving import client, server
    from tests.factories import make_model_package, write_case

    package = make_model_package(tmp_path / "model")
    case, _ = write_case(tmp_path / "case", shape=(64, 64, 64))  # a few seconds of sliding window on 1 thread: time to kill it
    port = server.free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "server.log"
    proc = _start_server(package, port, log_file)
    try:
        info = client.model_info(url, SERVED_NAME)
        clean = _answer(client.infer(url, SERVED_NAME, case, info.channels, timeout=120))

        # 1. killed mid-request, not back: the request in flight ends in a clear error after a bounded retry
        outcome: dict[str, Any] = {}
        short = client.RetryPolicy(attempts=3, backoff_s=0.2)

        def send(policy: client.RetryPolicy) -> None:
            t0 = time.monotonic()
            try:
                outcome["answer"] = client.infer(url, SERVED_NAME, case, info.channels, timeout=120, retry=policy)
            except MedsegError as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - t0

        request = threading.Thread(target=send, args=(short,))
        caplog.set_level(logging.WARNING, logger="medseg.serving.client")
        request.start()
        _kill_mid_request(proc, port, request)
        request.join(timeout=60)
        assert not request.is_alive(), "the client hangs on a killed server"
        error = str(outcome.get("error"))
        print(f"\nmodel server killed mid-request: {error} ({outcome['seconds']:.1f} s)")
        assert "answer" not in outcome
        assert error.startswith(f"{url}/v2/models/{SERVED_NAME}/infer: cannot reach the model server after 3 attempts")
        assert "RemoteProtocolError" in error or "ReadError" in error, "the connection was lost mid-request"
        assert "last ConnectError" in error, "then refused while the server is down"
        assert "Traceback" not in error
        retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
        assert len(retries) == 2 and "attempt 3 of 3" in retries[-1]
        assert outcome["seconds"] < 10

        # 2. restarted: the same version, the same metadata, the same answer to the same request
        proc = _start_server(package, port, log_file)
        again = client.model_info(url, SERVED_NAME)
        assert (again.version, again.metadata) == (info.version, info.metadata)
        assert _answer(client.infer(url, SERVED_NAME, case, info.channels, timeout=120)) == clean

        # 3. killed mid-request and restarted at once: a client retrying long enough rides over the restart
        patient = client.RetryPolicy(attempts=12, backoff_s=1.0, max_backoff_s=4.0)  # >= 20 s of backoff in all
        outcome.clear()
        request = threading.Thread(target=send, args=(patient,))
        request.start()
        _kill_mid_request(proc, port, request)
        proc = _start_server(package, port, log_file)
        request.join(timeout=120)
        print(f"killed mid-request, restarted at once: answered after {outcome.get('seconds', 0):.1f} s, {outcome.get('error', 'no error')}")
        assert "error" not in outcome and _answer(outcome["answer"]) == clean
    finally:
        server.stop_server(proc)


# --------------------------------------------------------------------------- the client's retry policy, against a real socket
class _FlakyServer:
    """A real HTTP server on 127.0.0.1 that drops the first ``drops`` connections without an answer (as a server
    killed mid-request), then answers ``status`` with a V2 metadata body; it counts the requests it saw."""

    def __init__(self, drops: int, status: int = 200) -> None:
        import http.server
        import json

        owner = self
        self.requests = 0
        body = json.dumps({"name": "m", "versions": ["7"], "inputs": [{"name": "t1n", "datatype": "BYTES", "shape": [1]}], "outputs": []}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.requests += 1
                if owner.requests <= drops:
                    self.connection.shutdown(socket.SHUT_RDWR)  # gone without a word
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_client_retry_is_bounded_configurable_and_only_for_lost_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.serving import client

    fast = client.RetryPolicy(attempts=3, backoff_s=0.05)
    flaky = _FlakyServer(drops=2)
    try:  # two connections lost before an answer, the third answered
        assert client.model_info(flaky.url, "m", retry=fast).version == "7" and flaky.requests == 3
    finally:
        flaky.close()
    flaky = _FlakyServer(drops=5)
    try:  # never answered: bounded, then a clear error
        with pytest.raises(MedsegError, match=r"/v2/models/m: cannot reach the model server after 3 attempts over [\d.]+ s \(RemoteProtocolError"):
            client.model_info(flaky.url, "m", retry=fast)
        assert flaky.requests == 3
    finally:
        flaky.close()
    busy = _FlakyServer(drops=0, status=503)
    try:  # an answer, even 503, is not retried here: the server said what it wants
        with pytest.raises(MedsegError, match="model server answered 503"):
            client.model_info(busy.url, "m", retry=fast)
        assert busy.requests == 1
    finally:
        busy.close()

    # configurable from the environment; 1 = no retry
    monkeypatch.setenv("MEDSEG_CLIENT_RETRIES", "1")
    monkeypatch.setenv("MEDSEG_CLIENT_BACKOFF_S", "0.01")
    assert client.RetryPolicy.from_env() == client.RetryPolicy(attempts=1, backoff_s=0.01)
    flaky = _FlakyServer(drops=1)
    try:
        with pytest.raises(MedsegError, match=r"cannot reach the model server \(RemoteProtocolError"):
            client.model_info(flaky.url, "m")
        assert flaky.requests == 1
    finally:
        flaky.close()
    monkeypatch.setenv("MEDSEG_CLIENT_RETRIES", "many")
    with pytest.raises(MedsegError, match="MEDSEG_CLIENT_RETRIES must be an integer"):
        client.RetryPolicy.from_env()
    with pytest.raises(MedsegError, match="attempts >= 1"):
        client.RetryPolicy(attempts=0)
    # the backoff doubles, capped, with jitter between half and all of it
    policy = client.RetryPolicy(attempts=10, backoff_s=0.5, max_backoff_s=4.0)
    for attempt, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        assert all(ceiling / 2 <= policy.delay(attempt) <= ceiling for _ in range(50))
