"""Admission counts bytes: admitted bodies × their measured parse growth stay within a memory budget.

In process: the budget from the cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, "max"/huge = none →
half the RAM), the option and environment override, the gate's arithmetic. Against the real KServe model server
with ``--memory-budget-mb 40`` (and room for 9 requests by count, so only bytes refuse): while one large JSON
body is admitted (a stalled upload declaring 2.5 MiB = 32.5 MiB parsed), concurrent large bodies get 503 with
Retry-After, small binary ones are answered 200, a body too large for the whole budget gets 413, gRPC obeys the
same gate, and the server stays healthy.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import load_nifti
from medseg.serving import client, server
from medseg.serving.limits import MIB, PARSE_GROWTH, Gate, ServeLimits, container_memory_bytes, default_memory_budget_bytes
from tests.factories import make_model_package, write_case

NAME = "brats"
BUDGET_MB = 40
STALLED_BYTES = int(2.5 * MIB)  # JSON: 2.5 MiB × 13 = 32.5 MiB of the 40
V2 = f"/v2/models/{NAME}/infer"


# --------------------------------------------------------------------------- in process
def _cgroup(tmp_path: Path, v2: str | None = None, v1: str | None = None) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "memory.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "memory").mkdir()
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text(v1 + "\n")
    return str(tmp_path)


def test_container_memory_limit_from_cgroup_v2_and_v1(tmp_path):
    assert container_memory_bytes(_cgroup(tmp_path / "a", v2=str(8 * 1024**3))) == 8 * 1024**3
    assert container_memory_bytes(_cgroup(tmp_path / "b", v2="max")) is None
    assert container_memory_bytes(_cgroup(tmp_path / "c", v1=str(2 * 1024**3))) == 2 * 1024**3
    assert container_memory_bytes(_cgroup(tmp_path / "d", v1="9223372036854771712")) is None  # v1's "no limit"
    assert container_memory_bytes(str(tmp_path / "none")) is None


def test_default_budget_is_half_the_limit_else_half_the_ram(tmp_path):
    budget, source = default_memory_budget_bytes(_cgroup(tmp_path / "a", v2=str(8 * 1024**3)))
    assert budget == 4 * 1024**3 and "container" in source
    budget, source = default_memory_budget_bytes(_cgroup(tmp_path / "b", v2="max"))
    assert 0 < budget < 1 << 50 and "RAM" in source


def test_budget_option_and_environment_override():
    assert ServeLimits.resolve(env={}, memory_budget_mb=64).memory_budget() == (64 * MIB, "--memory-budget-mb")
    assert ServeLimits.resolve(env={"MEDSEG_SERVE_MEMORY_BUDGET_MB": "128"}).memory_budget()[0] == 128 * MIB
    with pytest.raises(MedsegError, match="memory_budget_mb must be >= 0"):
        ServeLimits(memory_budget_mb=-1)


def test_gate_admits_by_count_and_bytes():
    gate = Gate(capacity=3, budget_bytes=100)
    first = gate.try_admit(60)
    assert first is not None and gate.reserved_bytes == 60
    assert gate.try_admit(50) is None  # 110 > 100
    second = gate.try_admit(40)
    assert second is not None and gate.reserved_bytes == 100
    assert gate.try_admit(0) is not None  # a count slot is left, no bytes needed
    assert gate.try_admit(0) is None  # capacity 3 reached
    assert not gate.fits_alone(101) and gate.fits_alone(100)
    first.finish()
    assert gate.reserved_bytes == 40 and gate.admitted == 2
    assert gate.try_reserve(second, 60) and gate.reserved_bytes == 100 and not gate.try_reserve(second, 1)
    second.finish()
    assert gate.reserved_bytes == 0


# --------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Any:
    folder = tmp_path_factory.mktemp("admission")
    package = make_model_package(folder / "model")
    port, grpc_port = server.free_port(), server.free_port()
    log_file = folder / "server.log"
    proc = server.start_server_process(package, NAME, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"},
                                       extra_args=["--reload-interval", "0", "--memory-budget-mb", str(BUDGET_MB), "--max-concurrent", "1",
                                                   "--max-queue", "8", "--timeout", "60", "--grpc-port", str(grpc_port)])
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until_ready(url, NAME, timeout_s=90, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    paths, _ = write_case(folder / "case")
    images = np.stack([load_nifti(p)[0] for p in paths])
    yield {"url": url, "port": port, "grpc": f"127.0.0.1:{grpc_port}", "images": images, "affine": load_nifti(paths[0])[1], "log": log_file}
    server.stop_server(proc)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return -1.0


def _wait_metric(url: str, name: str, value: float, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while _metric(url, name) != value:
        assert time.monotonic() < deadline, f"{name} stays {_metric(url, name)}, expected {value}"
        time.sleep(0.05)


def _stalled_json_upload(port: int, length: int) -> socket.socket:
    """A JSON request declaring ``length`` bytes whose body never finishes: admitted (and charged) from its headers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {V2} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{".encode())
    return sock


def _big_json(mib: float) -> bytes:
    """A syntactically valid V2 JSON body of about ``mib`` MiB (refused or answered 400: only its size matters here)."""
    count = int(mib * MIB / 5)
    return b'{"inputs": [{"name": "volume", "datatype": "FP32", "shape": [4, 1, 1, %d], "data": [' % count + b", ".join([b"5.0"] * count) + b"]}]}"


def test_concurrent_big_bodies_refused_small_ones_pass(served):
    url = served["url"]
    small_body, small_headers = client.volume_request(served["images"], served["affine"], binary=True)  # ~0.2 MiB × 2.5
    assert len(small_body) * PARSE_GROWTH["binary"] < (BUDGET_MB * MIB - STALLED_BYTES * PARSE_GROWTH["json"])
    sock = _stalled_json_upload(served["port"], STALLED_BYTES)
    try:
        _wait_metric(url, "medseg_admitted_parse_bytes", STALLED_BYTES * PARSE_GROWTH["json"])
        big = _big_json(1.0)  # 13 MiB parsed: does not fit beside the 32.5 held
        results: dict[str, list[httpx.Response]] = {"big": [], "small": []}

        def send(kind: str) -> None:
            if kind == "big":
                response = httpx.post(f"{url}{V2}", content=big, headers={"content-type": "application/json"}, timeout=60)
            else:
                response = httpx.post(f"{url}{V2}", content=small_body, headers=small_headers, timeout=60)
            results[kind].append(response)

        threads = [threading.Thread(target=send, args=(kind,)) for kind in ["big"] * 3 + ["small"] * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results["big"]) == 3 and len(results["small"]) == 3
        for response in results["big"]:
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1
            message = response.json()["error"]
            assert "busy" in message and f"of {BUDGET_MB} MiB parse memory reserved" in message
        for response in results["small"]:
            assert response.status_code == 200, response.text
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        sock.close()
    _wait_metric(url, "medseg_admitted_parse_bytes", 0)
    _wait_metric(url, "medseg_admitted_requests", 0)
    # the same big body fits once the stalled one has left (decoded and answered 400: too small for the network)
    response = httpx.post(f"{url}{V2}", content=_big_json(1.0), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert 'reason="overloaded"' in httpx.get(f"{url}/metrics", timeout=10).text


def test_body_beyond_the_whole_budget_is_413(served):
    url = served["url"]
    body = _big_json(3.5)  # 45.5 MiB parsed > 40 MiB: never admissible as JSON
    response = httpx.post(f"{url}{V2}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413, response.text
    message = response.json()["error"]
    assert "parse-memory budget of 40 MiB" in message and "binary tensor extension" in message
    body, headers = client.volume_request(served["images"], served["affine"], binary=True)
    assert httpx.post(f"{url}{V2}", content=body, headers=headers, timeout=60).status_code == 200


def test_grpc_shares_the_gate(served, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tritonclient.grpc") is None:
        pytest.skip("tritonclient[grpc] not installed")
    from tests.test_serving_clients import run_grpc_client  # tritonclient.grpc runs in a child process (see there)

    case = {"images": served["images"], "affine": served["affine"], "files": {c: b"" for c in ("t1n", "t1c", "t2w", "t2f")}}
    sock = _stalled_json_upload(served["port"], int(3.05 * MIB))  # 39.65 MiB of the 40 held over REST; the volume needs 0.55
    try:
        _wait_metric(served["url"], "medseg_admitted_parse_bytes", int(3.05 * MIB) * PARSE_GROWTH["json"])
        busy = run_grpc_client(served["grpc"], case, tmp_path, mode="volume")["volume"]
        assert busy.get("status") == "StatusCode.UNAVAILABLE" and "retry after" in busy["message"], busy
    finally:
        sock.close()
    _wait_metric(served["url"], "medseg_admitted_parse_bytes", 0)
    answered = run_grpc_client(served["grpc"], case, tmp_path, mode="volume")["volume"]
    assert len(answered["ok"]["volumes_ml"]) == 3, answered
    assert "Traceback" not in served["log"].read_text()
