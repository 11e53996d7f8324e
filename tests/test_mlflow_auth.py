"""MLflow with authentication, for real: ``mlflow server --app-name basic-auth`` on 127.0.0.1 (SQLite stores in a
temporary folder) with the auth settings the manifests ship (k8s/base/mlflow-auth/basic_auth.ini), the users and
grants made by ``medseg.registry.auth_setup`` (what the Job mlflow-users runs), then the real ``MlflowClient``
under each identity: the pipeline registers a version and moves ``champion``, the predictor reads the alias and
downloads the version but is refused (403) every write, anonymous requests get 401, an account without grants
sees nothing (default NO_PERMISSIONS)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (mlflow[auth]); not installed")

ROOT = Path(__file__).resolve().parents[1]
AUTH_INI = ROOT / "k8s" / "base" / "mlflow-auth" / "basic_auth.ini"
ADMIN = ("medseg-admin", "admin-" + "a1" * 12)
PIPELINE = ("medseg-pipeline", "pipe-" + "b2" * 12)
PREDICTOR = ("medseg-predictor", "pred-" + "c3" * 12)
OUTSIDER = ("someone-else", "else-" + "d4" * 12)
MODEL = "brats-segmentation"
EXPERIMENT = "medseg"

pytestmark = pytest.mark.slow   # ~20 s: the server's first start migrates two fresh databases


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_auth_config(path: Path, database_uri: str) -> Path:
    """The shipped ini plus ``database_uri``, as the MLflow container writes it at start (k8s/base/mlflow.yaml)."""
    path.write_text(AUTH_INI.read_text() + f"database_uri = {database_uri.replace('%', '%%')}\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(root / "basic_auth.ini", f"sqlite:///{root / 'auth.db'}")),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-" + "e5" * 12,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    })
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(mlflow_bin), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except (OSError, urllib.error.HTTPError):
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not up in 120 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        try:   # the server and its uvicorn workers: our own process group
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def as_user(monkeypatch):
    """Switch the MLflow client's identity (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD per request)."""
    def switch(user: tuple[str, str] | None) -> None:
        if user is None:
            monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
            monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        else:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return switch


def _run_setup(server: str, monkeypatch, capsys) -> dict:
    import json

    from medseg.registry import auth_setup

    for prefix, (user, password) in (("ADMIN", ADMIN), ("PIPELINE", PIPELINE), ("PREDICTOR", PREDICTOR)):
        monkeypatch.setenv(f"MLFLOW_{prefix}_USERNAME", user)
        monkeypatch.setenv(f"MLFLOW_{prefix}_PASSWORD", password)
    assert auth_setup.main(["--tracking-uri", server, "--model", MODEL, "--experiment", EXPERIMENT, "--wait-s", "30"]) == 0
    return json.loads(capsys.readouterr().out)


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind an MLflow client error (RestException / MlflowException)."""
    import re

    match = re.search(r"error code (\d{3})", str(exc))
    return int(match.group(1)) if match else getattr(exc, "get_http_status_code", lambda: None)()


def test_identities_and_their_permissions(server, as_user, monkeypatch, capsys, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medseg.registry.auth_setup import AuthAdmin

    first = _run_setup(server, monkeypatch, capsys)
    assert first[PIPELINE[0]]["user"] == "created" and first[PREDICTOR[0]]["user"] == "created"
    assert set(first[PIPELINE[0]]["grants"].values()) == {"granted"}
    again = _run_setup(server, monkeypatch, capsys)   # idempotent: passwords re-set, grants kept
    assert again[PIPELINE[0]]["user"] == "updated"
    assert set(again[PIPELINE[0]]["grants"].values()) == set(again[PREDICTOR[0]]["grants"].values()) == {"kept"}
    grants = AuthAdmin(server, *ADMIN).grants_of(PREDICTOR[0])
    assert grants[("registered_model", MODEL)] == "READ"
    assert set(grants.values()) == {"READ"}

    client = MlflowClient(server)
    # the pipeline: log a run with a model package, register it, move champion
    as_user(PIPELINE)
    mlflow.set_tracking_uri(server)
    package = tmp_path / "model_package"
    package.mkdir()
    (package / "weights.txt").write_text("w")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.log_artifacts(str(package), "model_package")
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model_package", run_id=run.info.run_id).version
    client.set_registered_model_alias(MODEL, "champion", version)
    assert client.get_model_version_by_alias(MODEL, "champion").version == version

    # the predictor: reads the alias and downloads the version, nothing more
    as_user(PREDICTOR)
    assert client.get_model_version_by_alias(MODEL, "champion").version == version
    downloaded = mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "dl"))
    assert (Path(downloaded) / "weights.txt").read_text() == "w"
    writes = {
        "set_registered_model_alias": lambda: client.set_registered_model_alias(MODEL, "champion", version),
        "delete_registered_model_alias": lambda: client.delete_registered_model_alias(MODEL, "champion"),
        "create_model_version": lambda: client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model_package", run_id=run.info.run_id),
        "log to the experiment": lambda: client.create_run(experiment.experiment_id),
    }
    for what, call in writes.items():
        with pytest.raises(MlflowException) as refused:
            call()
        assert _status(refused.value) == 403, f"predictor {what}: {refused.value}"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version   # unchanged

    # anonymous: 401 on reads and writes
    as_user(None)
    for call in (lambda: client.get_model_version_by_alias(MODEL, "champion"), lambda: client.set_registered_model_alias(MODEL, "champion", version)):
        with pytest.raises(MlflowException) as refused:
            call()
        assert _status(refused.value) == 401, str(refused.value)
    # a wrong password is anonymous too
    as_user((PIPELINE[0], "wrong-password-123"))
    with pytest.raises(MlflowException) as refused:
        client.get_model_version_by_alias(MODEL, "champion")
    assert _status(refused.value) == 401

    # another account without grants sees nothing (default_permission = NO_PERMISSIONS)
    as_user(ADMIN)
    client.search_experiments()   # the admin works
    AuthAdmin(server, *ADMIN).ensure_user(*OUTSIDER)
    as_user(OUTSIDER)
    with pytest.raises(MlflowException) as refused:
        client.get_model_version_by_alias(MODEL, "champion")
    assert _status(refused.value) == 403

    # why the predictor also reads the experiment: READ on the model alone resolves the alias but cannot
    # download the version (its artefacts belong to the experiment's run)
    as_user(ADMIN)
    model_only = ("model-only-reader", "mor-" + "f6" * 12)
    admin = AuthAdmin(server, *ADMIN)
    admin.ensure_user(*model_only)
    admin.ensure_grant(model_only[0], "registered_model", MODEL, "READ")
    as_user(model_only)
    assert client.get_model_version_by_alias(MODEL, "champion").version == version
    with pytest.raises(MlflowException) as refused:
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path / "dl2"))
    assert _status(refused.value) == 403


def test_setup_refuses_short_passwords_and_the_admin_as_workload(server):
    from medseg.errors import MedsegError
    from medseg.registry.auth_setup import AuthAdmin, UserSpec, setup_users

    with pytest.raises(MedsegError, match="shorter than 12"):
        AuthAdmin(server, *ADMIN).ensure_user("short-pw", "abc")
    with pytest.raises(MedsegError, match="is the admin"):
        setup_users(server, *ADMIN, [UserSpec(ADMIN[0], ADMIN[1])])
    with pytest.raises(MedsegError, match="refused the admin credentials"):
        setup_users(server, ADMIN[0], "not-the-admin-password", [UserSpec("x-user", "x" * 16)])


def test_the_shipped_auth_config_denies_by_default_and_holds_no_credentials():
    import configparser

    shipped = configparser.ConfigParser()
    shipped.read_string(AUTH_INI.read_text())
    assert shipped["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert not {"database_uri", "admin_username", "admin_password"} & set(shipped["mlflow"])
