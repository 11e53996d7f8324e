"""The MLflow tracking server stops during register or promote (issue 15, point 7).

A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artefact root) is SIGKILLed at a chosen step: a hook
wraps the registry's MLflow client (or the model logging) and kills the server right before the named call. Each
fault must end in a clear :class:`MedsegError` within MLflow's bounded retries (or, when the server comes back
within them, in success), leave nothing counted as done that is half done, and a re-run after the restart must
complete with the same versions and aliases as a clean run of the same steps:

- "half-registered" = a version whose registration_state is ``incomplete`` (created, but its challenger alias, log
  entry or model card not yet written), or a run left RUNNING without a version; promote refuses the former;
- "half-promoted" = aliases moved but the decision not recorded (the ``medseg.promotion_pending`` marker is still on
  the registered model); the next promote or rollback puts the aliases back before deciding again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from medseg import schemas
from medseg.errors import MedsegError
from medseg.registry import lock as lk
from medseg.registry import registry as reg
from tests.factories import make_model_package

pytestmark = pytest.mark.slow  # a real tracking server, killed and restarted several times

START_TIMEOUT_S = 240  # a loaded 2-core machine: a first start (migrations) has taken over a minute


class Server:
    """``mlflow server`` on a fixed port, database and artefact folder: killed and started again, it is the same store."""

    def __init__(self, tmp: Path) -> None:
        from medseg.serving.server import free_port

        self.tmp, self.port = tmp, free_port("127.0.0.1")
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        self.starts += 1
        log = open(self.tmp / f"server-{self.starts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.tmp}/srv.db",
                                      "--artifacts-destination", str(self.tmp / "art"), "--host", "127.0.0.1", "--port", str(self.port),
                                      "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                text = (self.tmp / f"server-{self.starts}.log").read_text(errors="replace")[-3000:]
                self.kill()
                raise RuntimeError(f"mlflow server not healthy after {time.monotonic() - t0:.0f} s:\n{text}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the server and its workers (the process group this object started)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("mlflow-faults"))
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("faults-pkg") / "model")


@pytest.fixture(autouse=True)
def _bounded_fast_retries(monkeypatch: pytest.MonkeyPatch, server: Server):
    """Two retries (backoff 0 s, 2 s) so a dead server fails a call within seconds; the server up before each test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    if server.proc is None:
        server.start()
    yield


class FaultyClient:
    """The registry's MLflow client with one fault: ``fault()`` runs right before the first call of ``method`` whose
    arguments satisfy ``match``."""

    def __init__(self, real: Any, method: str, fault: Callable[[], None], match: Callable[..., bool] | None = None) -> None:
        self._real, self._method, self._fault, self._match = real, method, fault, match
        self.fired = False

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._real, attr)
        if attr != self._method or self.fired or not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.fired and (self._match is None or self._match(*args, **kwargs)):
                self.fired = True
                self._fault()
            return target(*args, **kwargs)

        return call


def inject(monkeypatch: pytest.MonkeyPatch, method: str, fault: Callable[[], None], match: Callable[..., bool] | None = None) -> list[FaultyClient]:
    """Make the registry's clients faulty (``monkeypatch``: a ``monkeypatch.context()``, undone when it ends)."""
    made: list[FaultyClient] = []
    real_client = reg._client

    def faulty(uri: str) -> FaultyClient:
        made.append(FaultyClient(real_client(uri), method, fault, match))
        return made[-1]

    monkeypatch.setattr(reg, "_client", faulty)
    return made


def metrics(value: float, groups: list[str]) -> schemas.Metrics:
    """Per-case Dice ``value`` + 0.01·i for 4 cases keyed by content, in every group the gate compares."""
    per_case = [{"case_id": f"c{i}", "case_key": f"key-{i}", **{g: {"dice": value + 0.01 * i} for g in groups}} for i in range(4)]
    mean = {g: {"dice": sum(c[g]["dice"] for c in per_case) / len(per_case)} for g in groups}
    return schemas.Metrics(n_cases=len(per_case), mean=mean, per_case=per_case)


WEAK, STRONG = 0.80, 0.90


def register(package: Path, name: str, uri: str, value: float) -> dict[str, Any]:
    """One pipeline run's registration (its own pipeline run id): the same call again is a re-run of it."""
    from medseg.task import Task

    groups = list(Task.from_folder(package).gate_groups)
    return reg.register_model(package, metrics(value, groups), name, uri, {"pipeline_run_id": f"pipe-{value}"}, {})


def final_state(name: str, uri: str) -> dict[str, Any]:
    shown = reg.show_model(name, uri)
    return {
        "aliases": shown["aliases"],
        "versions": [v["version"] for v in shown["versions"]],
        "states": {v["version"]: v["tags"].get(reg.REGISTRATION_STATE_TAG) for v in shown["versions"]},
        "decisions": {v["version"]: v["tags"].get("promotion_decision") for v in shown["versions"]},
        "log": [(e["action"], str(e["version"]), e.get("decision")) for e in shown["promotion_log"]],
        "pending": reg.PENDING_TAG in shown["tags"],
        "lease": lk.LEASE_TAG in shown["tags"],
    }


@pytest.fixture(scope="module")
def clean(server: Server, package: Path) -> dict[str, Any]:
    """What a clean run of register weak, register strong, promote 1, promote 2 leaves."""
    register(package, "clean", server.uri, WEAK)
    register(package, "clean", server.uri, STRONG)
    assert reg.promote("clean", "1", server.uri)["promoted"]
    assert reg.promote("clean", "2", server.uri, n_bootstrap=300)["promoted"]
    state = final_state("clean", server.uri)
    assert state["aliases"] == {"champion": "2", "previous-champion": "1"} and state["states"] == {"1": "complete", "2": "complete"}
    return state


def _expect_clear_error(call: Callable[[], Any], what: str) -> MedsegError:
    t0 = time.monotonic()
    with pytest.raises(MedsegError) as info:
        call()
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert "did not answer" in message and what in message and "again" in message, message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert elapsed < 90, f"a dead server took {elapsed:.0f} s to give up: the retries are not bounded"
    return info.value


def test_register_cut_after_the_version_was_created_is_completed_by_a_rerun(server: Server, package: Path, clean: dict,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name, uri = "cut-register", server.uri
    with monkeypatch.context() as m:
        made = inject(m, "set_registered_model_alias", server.kill)  # the version exists, its challenger alias does not
        _expect_clear_error(lambda: register(package, name, uri, WEAK), "registration")
        assert made[-1].fired
    server.start()

    half = final_state(name, uri)
    assert half["versions"] == ["1"] and half["states"] == {"1": "incomplete"} and "challenger" not in half["aliases"]
    with pytest.raises(MedsegError, match="registration did not complete"):  # a half-registered version is never promoted
        reg.promote(name, "1", uri)

    again = register(package, name, uri, WEAK)  # the re-run: the same registration
    assert again["version"] == "1" and again["resumed"] and not again["already_registered"]
    assert register(package, name, uri, WEAK)["already_registered"]  # and once more: nothing new
    register(package, name, uri, STRONG)
    assert reg.promote(name, "1", uri)["promoted"] and reg.promote(name, "2", uri, n_bootstrap=300)["promoted"]
    assert final_state(name, uri) == clean
    card = reg._client(uri).download_artifacts(again["run_id"], schemas.MODEL_CARD_MD, str(server.tmp))
    assert Path(card).is_file()  # the card the cut-off attempt never wrote


def test_register_cut_while_logging_the_model_registers_the_same_version_on_rerun(server: Server, package: Path, clean: dict,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.registry import pyfunc_model

    name, uri = "cut-logging", server.uri
    real_log = pyfunc_model.log_model_package

    def dying_log(*args: Any, **kwargs: Any) -> Any:
        server.kill()
        return real_log(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pyfunc_model, "log_model_package", dying_log)
        _expect_clear_error(lambda: register(package, name, uri, WEAK), "registration")
    server.start()

    client = reg._client(uri)
    exp = client.get_experiment_by_name("medseg")
    cut = [r for r in client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = 'register-{name}'")]
    assert [r.info.status for r in cut] == ["RUNNING"]  # the attempt's run, never ended: the server was gone
    first = register(package, name, uri, WEAK)
    assert first["version"] == "1" and not first["resumed"]  # no version had been created: registered anew, as number 1
    assert client.get_run(cut[0].info.run_id).info.status == "FAILED"  # the cut-off run is closed, not left RUNNING
    register(package, name, uri, STRONG)
    assert reg.promote(name, "1", uri)["promoted"] and reg.promote(name, "2", uri, n_bootstrap=300)["promoted"]
    assert final_state(name, uri) == clean


def test_promote_cut_after_champion_moved_is_undone_and_redone(server: Server, package: Path, clean: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    name, uri = "cut-promote", server.uri
    register(package, name, uri, WEAK)
    register(package, name, uri, STRONG)
    assert reg.promote(name, "1", uri)["promoted"]
    # champion already on v2, previous-champion on v1: the decision's tags and log entry not yet written
    with monkeypatch.context() as m:
        inject(m, "set_model_version_tag", server.kill, match=lambda n, v, key, value: key == "promotion_decision")
        _expect_clear_error(lambda: reg.promote(name, "2", uri, n_bootstrap=300), "promotion")
    server.start()

    half = final_state(name, uri)
    assert half["pending"] and half["lease"]  # visibly half done, and the lease of the dead attempt still there
    assert half["aliases"]["champion"] == "2" and half["decisions"]["2"] is None
    t0 = time.monotonic()
    redone = reg.promote(name, "2", uri, n_bootstrap=300)  # not "already the champion": undone, then decided again
    assert redone["promoted"] and redone["compared_with"] == "1"
    assert time.monotonic() - t0 < lk.DEFAULT_TTL_S / 2  # the dead attempt's lease was taken over, not waited out
    state = final_state(name, uri)
    assert state == clean
    assert reg._client(uri).get_model_version(name, "2").tags.get("promotion_interrupted_at")


def test_server_restarted_within_the_retries_promotion_completes(server: Server, package: Path, clean: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies right before champion moves and is back while MLflow's client still retries: no error at all."""
    name, uri = "blip-promote", server.uri
    register(package, name, uri, WEAK)
    register(package, name, uri, STRONG)
    assert reg.promote(name, "1", uri)["promoted"]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # backoff 0, 2, 4, ... 64 s: at most ~2 min in all
    restarted = threading.Event()

    def kill_and_restart() -> None:
        server.kill()
        threading.Thread(target=lambda: (server.start(), restarted.set()), daemon=True).start()

    with monkeypatch.context() as m:
        inject(m, "set_registered_model_alias", kill_and_restart, match=lambda n, alias, v: alias == reg.CHAMPION)
        t0 = time.monotonic()
        result = reg.promote(name, "2", uri, n_bootstrap=300)
    assert restarted.wait(timeout=START_TIMEOUT_S) and result["promoted"]
    assert time.monotonic() - t0 < 200
    assert final_state(name, uri) == clean
