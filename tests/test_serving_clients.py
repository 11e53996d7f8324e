"""Standard clients, unchanged, against the real KServe model server (REST and gRPC on 127.0.0.1).

Each client is its real package: ``tritonclient.http`` (JSON, which it sends without a Content-Type, and the
binary extension), ``tritonclient.grpc`` (KServe's gRPC V2 service, raw contents) and kserve's
``InferenceRESTClient``. ``tritonclient.grpc`` and kserve run in child processes: their generated protobuf modules
both register the package ``inference`` in protobuf's default descriptor pool, so whichever is imported second
in a process fails (and other test modules import kserve in the pytest process). One server for the module (``--grpc-port``, small limits: 8 MiB requests). Also: the
metadata route lists the real inputs and outputs, the ``/versions/N`` routes answer for the version serving and
404 for others, gRPC errors carry the codes a gRPC client expects, and the model repository routes are refused.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import load_nifti, load_nifti_bytes
from medseg.serving import server
from medseg.task import BRATS2023
from tests.factories import make_model_package, write_case

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

NAME = "brats"
VERSION = "local"  # a package folder serves as version "local"
CHANNELS = list(BRATS2023.channels)
LIMIT_MB = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Any:
    folder = tmp_path_factory.mktemp("clients")
    package = make_model_package(folder / "model")
    port, grpc_port = server.free_port(), server.free_port()
    log_file = folder / "server.log"
    proc = server.start_server_process(package, NAME, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"},
                                       extra_args=["--reload-interval", "0", "--grpc-port", str(grpc_port), "--max-request-mb", str(LIMIT_MB),
                                                   "--timeout", "60"])
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until_ready(url, NAME, timeout_s=90, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    yield {"url": url, "http": f"127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}", "log": log_file}
    server.stop_server(proc)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Any]:
    paths, _ = write_case(tmp_path_factory.mktemp("clients-case") / "case")
    images = np.stack([load_nifti(p)[0] for p in paths])
    return {"files": {c: p.read_bytes() for c, p in zip(CHANNELS, paths)}, "images": images, "affine": load_nifti(paths[0])[1]}


@pytest.fixture(scope="module")
def reference(served, case) -> np.ndarray:
    """volumes_ml answered to a plain V2 JSON request (httpx, Content-Type set): what every client must get too."""
    body = {"inputs": [{"name": c, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b).decode()]} for c, b in case["files"].items()]}
    response = httpx.post(f"{served['url']}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(next(o for o in response.json()["outputs"] if o["name"] == "volumes_ml")["data"], np.float32)


def _bytes_inputs(module: Any, files: dict[str, bytes], base64_text: bool = False, binary: bool = True) -> list[Any]:
    inputs = []
    for channel, data in files.items():
        tensor = module.InferInput(channel, [1], "BYTES")
        value = np.array([base64.b64encode(data) if base64_text else data], dtype=object)
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
    return inputs


def _volume_input(module: Any, images: np.ndarray) -> Any:
    tensor = module.InferInput("volume", list(images.shape[:1]) + list(images.shape[1:][::-1]), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(images.transpose(0, 3, 2, 1), dtype=np.float32))
    return tensor


def _affine_text(affine: np.ndarray) -> str:
    return " ".join(f"{v:g}" for v in np.asarray(affine, dtype=float).ravel())


def _check_segmentation(result: Any, affine: np.ndarray, shape: tuple[int, ...]) -> None:
    raw = result.as_numpy("segmentation")
    assert raw.shape == (1,)
    text = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
    _check_segmentation_text(text, affine, shape)


def _check_segmentation_text(text: str, affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """The answer's segmentation: base64 text of a .nii.gz in the input's geometry, whatever the transport."""
    seg, seg_affine, _ = load_nifti_bytes(base64.b64decode(text))
    assert seg.shape == shape and np.allclose(seg_affine, affine)


# --------------------------------------------------------------------------- metadata and versions
def test_metadata_lists_real_inputs_and_outputs(served, grpc_calls):
    meta = httpx.get(f"{served['url']}/v2/models/{NAME}", timeout=30).json()
    triton = httpclient.InferenceServerClient(served["http"])
    try:
        via_http = triton.get_model_metadata(NAME)
        via_http_version = triton.get_model_metadata(NAME, model_version=VERSION)
    finally:
        triton.close()
    via_grpc = grpc_calls["metadata"]
    names = [i["name"] for i in meta["inputs"]]
    assert names == [*CHANNELS, "volume"] and [o["name"] for o in meta["outputs"]] == ["segmentation", "volumes_ml"]
    assert meta["versions"] == [VERSION] and via_http == meta and via_http_version == meta
    assert [i["name"] for i in via_grpc["inputs"]] == names and via_grpc["versions"] == [VERSION]
    assert [o["datatype"] for o in via_grpc["outputs"]] == ["BYTES", "FP32"]
    assert via_grpc["inputs"][-1]["shape"] == ["4", "-1", "-1", "-1"]  # int64 shapes come back as text in JSON form


def test_version_routes_answer_for_the_served_version_only(served, case):
    base = f"{served['url']}/v2/models/{NAME}"
    assert httpx.get(f"{base}/versions/{VERSION}", timeout=30).json()["versions"] == [VERSION]
    assert httpx.get(f"{base}/versions/{VERSION}/ready", timeout=30).status_code == 200
    for path in ("versions/2", "versions/2/ready", "versions/2/infer"):
        response = httpx.request("POST" if path.endswith("infer") else "GET", f"{base}/{path}", timeout=30, json={"inputs": []})
        assert response.status_code == 404, (path, response.text)
        assert "version 2 is not served here (serving: version local)" in response.json()["error"]
    triton = httpclient.InferenceServerClient(served["http"])
    try:
        assert triton.is_model_ready(NAME, VERSION) and not triton.is_model_ready(NAME, "2")
        result = triton.infer(NAME, _bytes_inputs(httpclient, case["files"]), model_version=VERSION)
        assert result.get_response()["model_version"] == VERSION
        with pytest.raises(InferenceServerException, match="version 3 is not served"):
            triton.infer(NAME, _bytes_inputs(httpclient, case["files"]), model_version="3")
    finally:
        triton.close()


# --------------------------------------------------------------------------- tritonclient.http
def test_tritonclient_http_json_without_content_type(served, case, reference):
    """tritonclient.http sends JSON requests without a Content-Type: answered, not 415."""
    triton = httpclient.InferenceServerClient(served["http"], network_timeout=120)
    try:
        result = triton.infer(NAME, _bytes_inputs(httpclient, case["files"], base64_text=True, binary=False))
        volume = triton.infer(NAME, [_volume_input(httpclient, case["images"])], parameters={"affine": _affine_text(case["affine"])})
    finally:
        triton.close()
    np.testing.assert_allclose(result.as_numpy("volumes_ml"), reference, rtol=1e-5)
    _check_segmentation(result, case["affine"], (24, 24, 24))
    np.testing.assert_allclose(volume.as_numpy("volumes_ml"), reference, rtol=1e-4)


def test_tritonclient_http_binary(served, case, reference):
    triton = httpclient.InferenceServerClient(served["http"], network_timeout=120)
    try:
        files = triton.infer(NAME, _bytes_inputs(httpclient, case["files"], binary=True))
        tensor = _volume_input(httpclient, case["images"])  # set_data_from_numpy defaults to binary data
        volume = triton.infer(NAME, [tensor], parameters={"affine": _affine_text(case["affine"])})
        with pytest.raises(InferenceServerException) as bad:
            triton.infer(NAME, _bytes_inputs(httpclient, {**case["files"], "t1c": b"not a NIfTI file"}))
    finally:
        triton.close()
    np.testing.assert_allclose(files.as_numpy("volumes_ml"), reference, rtol=1e-5)
    np.testing.assert_allclose(volume.as_numpy("volumes_ml"), reference, rtol=1e-4)
    assert bad.value.status() == "400" and "t1c" in bad.value.message()


# --------------------------------------------------------------------------- tritonclient.grpc (in a child process)
GRPC_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

address, name, version, path, mode = sys.argv[1:6]
case = np.load(path)
files = {k: bytes(case[k]) for k in ("t1n", "t1c", "t2w", "t2f")}
affine = str(case["affine"])
g = grpcclient.InferenceServerClient(address)

def bytes_inputs(f):
    out = []
    for channel, data in f.items():
        t = grpcclient.InferInput(channel, [1], "BYTES")
        t.set_data_from_numpy(np.array([data], dtype=object))
        out.append(t)
    return out

def volume(array):
    t = grpcclient.InferInput("volume", list(array.shape), "FP32")
    t.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return t

def answer(r):
    seg = r.as_numpy("segmentation")
    return {"volumes_ml": r.as_numpy("volumes_ml").tolist(), "segmentation": seg[0].decode(), "model_version": r.get_response().model_version}

def attempt(fn):
    try:
        return {"ok": fn()}
    except InferenceServerException as e:
        return {"status": str(e.status()), "message": e.message()}

out = {}
if mode == "all":
    out["ready"] = [g.is_server_live(), g.is_server_ready(), g.is_model_ready(name), g.is_model_ready(name, version), g.is_model_ready(name, "2")]
    out["metadata"] = g.get_model_metadata(name, as_json=True)
    out["files"] = attempt(lambda: answer(g.infer(name, bytes_inputs(files), model_version=version)))
    out["volume"] = attempt(lambda: answer(g.infer(name, [volume(case["volume"])], parameters={"affine": affine})))
    out["garbage"] = attempt(lambda: answer(g.infer(name, bytes_inputs({**files, "t1c": b"hello, not a NIfTI file" * 20}))))
    out["complex"] = attempt(lambda: answer(g.infer(name, bytes_inputs({**files, "t1n": bytes(case["complex"])}))))
    out["singular"] = attempt(lambda: answer(g.infer(name, [volume(np.ones((4, 2, 2, 2)))], parameters={"affine": "0 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"})))
    out["too_big"] = attempt(lambda: answer(g.infer(name, [volume(np.zeros((4, 64, 64, 160)))], parameters={"affine": affine})))
    out["wrong_version"] = attempt(lambda: answer(g.infer(name, bytes_inputs(files), model_version="9")))
    out["unknown_model"] = attempt(lambda: answer(g.infer("nope", bytes_inputs(files))))
    out["load"] = attempt(lambda: g.load_model(name))
    out["unload"] = attempt(lambda: g.unload_model(name))
    out["after"] = attempt(lambda: answer(g.infer(name, bytes_inputs(files))))
    out["ready_after"] = g.is_model_ready(name)
else:
    out["volume"] = attempt(lambda: answer(g.infer(name, [volume(case["volume"])], parameters={"affine": affine})))
g.close()
print(json.dumps(out))
"""


def run_grpc_client(address: str, case: dict[str, Any], folder: Path, mode: str = "all") -> dict[str, Any]:
    """Run :data:`GRPC_CLIENT` against ``address`` with the case; its JSON results (``mode``: all, or volume only)."""
    import json
    import subprocess
    import sys

    import nibabel as nib

    complex_file = nib.Nifti1Image(np.ones((24, 24, 24), np.complex64), case["affine"]).to_bytes()
    np.savez(folder / "case.npz", volume=np.ascontiguousarray(case["images"].transpose(0, 3, 2, 1), dtype=np.float32),
             affine=np.array(_affine_text(case["affine"])), complex=np.frombuffer(complex_file, np.uint8),
             **{c: np.frombuffer(b, np.uint8) for c, b in case["files"].items()})
    done = subprocess.run([sys.executable, "-c", GRPC_CLIENT, address, NAME, VERSION, str(folder / "case.npz"), mode], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def grpc_calls(served, case, tmp_path_factory) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("tritonclient.grpc") is None:  # find_spec: importing it here would break kserve's protobuf
        pytest.skip("tritonclient[grpc] not installed")
    return run_grpc_client(served["grpc"], case, tmp_path_factory.mktemp("grpc"))


def test_tritonclient_grpc(grpc_calls, case, reference):
    assert grpc_calls["ready"] == [True, True, True, True, False]  # live, ready, model ready, served version ready, version 2 not
    for key in ("files", "volume"):
        answer = grpc_calls[key].get("ok")
        assert answer is not None, grpc_calls[key]
        np.testing.assert_allclose(np.asarray(answer["volumes_ml"], np.float32), reference, rtol=1e-4)
        assert answer["model_version"] == VERSION
        _check_segmentation_text(answer["segmentation"], case["affine"], (24, 24, 24))


def test_grpc_errors_match_rest(served, grpc_calls):
    """The same mistakes as REST, with gRPC's codes: INVALID_ARGUMENT (400), RESOURCE_EXHAUSTED (413),
    NOT_FOUND (404), PERMISSION_DENIED (403); the server keeps serving."""
    expected = {"garbage": ("INVALID_ARGUMENT", ("input 't1c'", "not a NIfTI-1 file")), "complex": ("INVALID_ARGUMENT", ("input 't1n'", "complex64")),
                "singular": ("INVALID_ARGUMENT", ("singular",)), "too_big": ("RESOURCE_EXHAUSTED", ()),
                "wrong_version": ("NOT_FOUND", ("version 9 is not served",)), "unknown_model": ("NOT_FOUND", ("nope",)),
                "load": ("PERMISSION_DENIED", ("disabled",)), "unload": ("PERMISSION_DENIED", ("disabled",))}
    for key, (code, words) in expected.items():
        result = grpc_calls[key]
        assert result.get("status") == f"StatusCode.{code}", (key, result)
        for word in words:
            assert word in result["message"], (key, result)
    assert grpc_calls["ready_after"] and grpc_calls["after"]["ok"]["volumes_ml"]
    assert "Traceback" not in served["log"].read_text()


def test_grpc_listens_on_loopback_only(served):
    port = int(served["grpc"].rsplit(":", 1)[1])
    import socket

    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None) if not info[4][0].startswith(("127.", "::1"))}
    for address in addresses:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
            s.settimeout(2)
            assert s.connect_ex((address, port)) != 0, f"gRPC reachable on {address}"


# --------------------------------------------------------------------------- kserve's InferenceRESTClient
# In a child process: kserve's and tritonclient.grpc's generated protobuf modules both register the package
# "inference" in protobuf's default descriptor pool, so one process cannot import both.
KSERVE_CLIENT = r"""
import asyncio, base64, json, sys
import numpy as np
from medseg.serving import import_kserve
import_kserve()
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
url, name, case = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
files = {k: bytes(case[k]) for k in ("t1n", "t1c", "t2w", "t2f")}

async def run():
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    try:
        out = {"ready": await client.is_model_ready(url, name)}
        inputs = []
        for channel, data in files.items():
            tensor = InferInput(channel, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([base64.b64encode(data).decode()], dtype=object), binary_data=False)
            inputs.append(tensor)
        answers = [await client.infer(url, InferRequest(model_name=name, infer_inputs=inputs), model_name=name)]
        volume = InferInput("volume", list(case["volume"].shape), "FP32", parameters={"affine": str(case["affine"])})
        volume.set_data_from_numpy(case["volume"], binary_data=True)
        answers.append(await client.infer(url, InferRequest(model_name=name, infer_inputs=[volume]), model_name=name))
        out["answers"] = [{"version": a.model_version or (a.parameters or {}).get("model_version"),  # from_bytes drops model_version
                            "volumes_ml": [float(v) for v in next(o for o in a.outputs if o.name == "volumes_ml").data]}
                          for a in answers]
        return out
    finally:
        await client.close()

print(json.dumps(asyncio.run(run())))
"""


def test_kserve_inference_rest_client(served, case, reference, tmp_path):
    import json
    import subprocess
    import sys

    arrays = {c: np.frombuffer(b, np.uint8) for c, b in case["files"].items()}
    np.savez(tmp_path / "case.npz", volume=np.ascontiguousarray(case["images"].transpose(0, 3, 2, 1), dtype=np.float32),
             affine=np.array(_affine_text(case["affine"])), **arrays)
    done = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, served["url"], NAME, str(tmp_path / "case.npz")], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ready"]
    for answer in result["answers"]:  # JSON BYTES, then the FP32 volume over the binary extension
        assert answer["version"] == VERSION  # KServe's client drops model_version; the parameters carry it too
        np.testing.assert_allclose(np.asarray(answer["volumes_ml"], np.float32), reference, rtol=1e-4)


# --------------------------------------------------------------------------- control plane
@pytest.mark.parametrize("path", [f"/v2/repository/models/{NAME}/load", f"/v2/repository/models/{NAME}/unload", "/v2/repository/index",
                                  "/v2/repository/models/nope/load"])
def test_repository_routes_are_refused(served, path):
    response = httpx.post(f"{served['url']}{path}", timeout=30)
    assert response.status_code == 403 and "disabled" in response.json()["error"]
    assert httpx.get(f"{served['url']}/v2/models/{NAME}/ready", timeout=30).status_code == 200  # still loaded
