"""Model server: the real KServe ModelServer in a subprocess on 127.0.0.1, a tiny untrained model package.

One server process for the module (started once, stopped at the end); every HTTP call goes to loopback.
In-process tests cover the request decoding, the model source resolution (incl. an MLflow registry on
SQLite) and the preprocess → predict → postprocess chain without HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil
import pytest

from medseg.errors import MedsegError
from medseg.io import load_nifti, load_nifti_bytes, save_nifti
from medseg.task import BRATS2023
BRATS_CHANNELS = BRATS2023.channels
from medseg.serving import client, server
from tests.factories import make_model_package, write_case

NAME = "brats"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("serving") / "model")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> list[Path]:
    paths, _ = write_case(tmp_path_factory.mktemp("case"))
    return paths


@pytest.fixture(scope="module")
def served(package, tmp_path_factory):
    """``(base url, server process)`` of a real model server on 127.0.0.1:free port."""
    log_file = tmp_path_factory.mktemp("server-log") / "server.log"
    port = server.free_port()
    proc = server.start_server_process(package, NAME, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until_ready(url, NAME, timeout_s=60, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    yield url, proc
    server.stop_server(proc)
    assert proc.returncode is not None


def _body(files: dict[str, bytes]) -> dict:
    return {"id": "req-1", "inputs": [{"name": n, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b).decode()]} for n, b in files.items()]}


def _files(paths: list[Path]) -> dict[str, bytes]:
    return {c: p.read_bytes() for c, p in zip(BRATS_CHANNELS, paths)}


# --------------------------------------------------------------------------- over HTTP
def test_health_and_model_ready(served):
    url, _ = served
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/{NAME}/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/nope/ready").status_code == 404


def test_infer_returns_segmentation_in_input_geometry(served, case):
    url, _ = served
    result = client.infer(url, NAME, case, list(BRATS_CHANNELS), timeout=60)
    seg, affine, _ = load_nifti_bytes(result["segmentation_bytes"], dtype=np.uint8)
    image, image_affine, _ = load_nifti(case[0])
    assert seg.shape == image.shape
    np.testing.assert_allclose(affine, image_affine, atol=1e-5)
    assert set(np.unique(seg)) <= {0, 1, 2, 3}
    assert set(result["volumes_ml"]) == {"WT", "TC", "ET"}
    assert all(v >= 0 for v in result["volumes_ml"].values())
    assert result["model_version"] == "local"
    assert result["model_name"] == NAME


def test_raw_response_has_id_parameters_and_outputs(served, case):
    url, _ = served
    response = httpx.post(f"{url}/v2/models/{NAME}/infer", json=_body(_files(case)), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-1"
    assert body["parameters"] == {"model_name": NAME, "model_version": "local"}
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["segmentation"]["datatype"] == "BYTES" and outputs["segmentation"]["shape"] == [1]
    assert outputs["volumes_ml"]["datatype"] == "FP32" and outputs["volumes_ml"]["shape"] == [3]
    assert outputs["volumes_ml"]["parameters"] == {"regions": "WT,TC,ET"}


def test_uncompressed_nii_input_is_accepted(served, case):
    url, _ = served
    files = {c: gzip.decompress(b) for c, b in _files(case).items()}
    response = httpx.post(f"{url}/v2/models/{NAME}/infer", json=_body(files), timeout=60)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def bad_files(case, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    small, _ = write_case(folder / "small", shape=(20, 24, 24))
    nan = np.ones((24, 24, 24), np.float32)
    nan[3, 4, 5] = np.nan
    save_nifti(folder / "nan.nii.gz", nan, np.diag([2.0, 2.0, 2.0, 1.0]))
    shifted = nib.load(str(case[1]))
    save_nifti(folder / "shifted.nii.gz", np.asarray(shifted.dataobj), np.diag([2.0, 2.0, 3.0, 1.0]))
    return {"small": small[1], "nan": folder / "nan.nii.gz", "shifted": folder / "shifted.nii.gz"}


BAD_CASES = ["not_base64", "not_nifti", "truncated_gzip", "missing_channel", "unexpected_channel", "mismatched_shape",
             "mismatched_affine", "nan_voxels", "wrong_datatype", "two_elements"]


@pytest.mark.parametrize("kind", BAD_CASES)
def test_client_mistakes_answer_400_with_message(served, case, bad_files, kind):
    url, _ = served
    files = _files(case)
    body = _body(files)
    expect = {
        "not_base64": ("t1c", "not valid base64"),
        "not_nifti": ("t1c", "cannot read NIfTI"),
        "truncated_gzip": ("t1c", "truncated or corrupt"),
        "missing_channel": ("t2f", "missing channel"),
        "unexpected_channel": ("flair", "unexpected input"),
        "mismatched_shape": ("t1c", "shape (20, 24, 24) differs"),
        "mismatched_affine": ("t1c", "affine differs"),
        "nan_voxels": ("t1c", "NaN"),
        "wrong_datatype": ("t1c", "expected BYTES"),
        "two_elements": ("t1c", "exactly one element"),
    }[kind]
    second = body["inputs"][1]
    if kind == "not_base64":
        second["data"] = ["this is *not* base64!"]
    elif kind == "not_nifti":
        second["data"] = [base64.b64encode(b"hello, I am a text file, not an image" * 20).decode()]
    elif kind == "truncated_gzip":
        second["data"] = [base64.b64encode(files["t1c"][: len(files["t1c"]) // 2]).decode()]
    elif kind == "missing_channel":
        body["inputs"].pop()
    elif kind == "unexpected_channel":
        body["inputs"].append({**body["inputs"][0], "name": "flair"})
    elif kind == "mismatched_shape":
        second["data"] = [base64.b64encode(bad_files["small"].read_bytes()).decode()]
    elif kind == "mismatched_affine":
        second["data"] = [base64.b64encode(bad_files["shifted"].read_bytes()).decode()]
    elif kind == "nan_voxels":
        second["data"] = [base64.b64encode(bad_files["nan"].read_bytes()).decode()]
    elif kind == "wrong_datatype":
        second.update(datatype="FP32", data=[1.0])
    elif kind == "two_elements":
        second.update(shape=[2], data=second["data"] * 2)
    response = httpx.post(f"{url}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    for word in expect:
        assert word in message, message
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_still_serving_after_errors(served, case):
    url, _ = served
    httpx.post(f"{url}/v2/models/{NAME}/infer", json={"inputs": [{"name": "t1n", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}, timeout=30)
    assert httpx.get(f"{url}/v2/models/{NAME}/ready").status_code == 200
    assert set(client.infer(url, NAME, case, timeout=60)["volumes_ml"]) == {"WT", "TC", "ET"}


def test_client_raises_server_message(served, case):
    url, _ = served
    with pytest.raises(MedsegError, match="missing channel input"):
        client.infer(url, NAME, case[:3], ["t1n", "t1c", "t2w"], timeout=30)
    with pytest.raises(MedsegError, match="404"):
        client.infer(url, "unknown-model", case, timeout=30)
    with pytest.raises(MedsegError, match="got 3 image file"):
        client.infer(url, NAME, case[:3], timeout=30)


def test_metrics_exposed(served, case):
    url, _ = served
    client.infer(url, NAME, case, timeout=60)
    httpx.post(f"{url}/v2/models/{NAME}/infer", json={"inputs": []}, timeout=30)  # missing every channel: 4xx
    text = httpx.get(f"{url}/metrics").text
    assert f'medseg_requests_total{{model="{NAME}",status="2xx"}}' in text
    assert f'medseg_requests_total{{model="{NAME}",status="4xx"}}' in text
    assert f'medseg_inflight_requests{{model="{NAME}"}} 0.0' in text
    assert "medseg_inference_seconds_bucket" in text and "medseg_input_voxels_bucket" in text
    # the test package's plans hold the planner's placeholders (mean 0, std 1): no drift reference
    assert f'medseg_model_info{{backend="torch",configuration="3d_fullres",drift_reference="none",model="{NAME}",version="local"}} 1.0' in text
    assert f'medseg_stage_seconds_count{{model="{NAME}",stage="predict"}}' in text
    assert f'request_predict_seconds_count{{model_name="{NAME}"}}' in text


def test_cli_predict_writes_segmentation(served, case, tmp_path, capsys):
    url, _ = served
    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    out = tmp_path / "out" / "seg.nii.gz"
    args = parser.parse_args(["--url", url, "--model", NAME, "--images", *map(str, case), "--out", str(out)])
    assert client.run(args) == 0
    seg, affine, _ = load_nifti(out, dtype=np.uint8)
    assert seg.shape == (24, 24, 24)
    assert "WT" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]  # atomic write, no leftovers


def test_listens_on_loopback_only(served):
    url, proc = served
    port = int(url.rsplit(":", 1)[1])
    p = psutil.Process(proc.pid)
    conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections(kind="inet")
    listening = [c for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening, "server process listens on nothing"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}, listening
    assert {c.laddr.port for c in listening} == {port}  # REST only: no gRPC port
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


# --------------------------------------------------------------------------- in process, no HTTP
def test_preprocess_predict_postprocess_in_process(package, case):
    from medseg.serving.model import SegmentationModel  # first: imports kserve with the sys.argv guard

    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferRequest
    from prometheus_client import REGISTRY

    model = SegmentationModel("unit", package, device="cpu")
    assert model.load() and model.ready and model.model_version == "local"
    assert model.channels == list(BRATS_CHANNELS)

    def request(files: dict[str, bytes], request_id: str | None = "abc") -> InferRequest:
        inputs = [InferInput(n, [1], "BYTES", data=[base64.b64encode(b).decode()]) for n, b in files.items()]
        return InferRequest(model_name="unit", infer_inputs=inputs, request_id=request_id)

    async def chain(req: InferRequest):
        payload = await model.preprocess(req, {})
        return await model.postprocess(await model.predict(payload, {}), {})

    response = asyncio.run(chain(request(_files(case))))
    assert response.id == "abc"
    rest, _ = response.to_rest()
    seg_text = next(o for o in rest["outputs"] if o["name"] == "segmentation")["data"][0]
    seg, _, _ = load_nifti_bytes(base64.b64decode(seg_text), dtype=np.uint8)
    assert seg.shape == (24, 24, 24)
    assert rest["parameters"]["model_version"] == "local"
    assert asyncio.run(chain(request(_files(case), request_id=None))).id  # an id even when the client sent none

    files = _files(case)
    del files["t2w"]
    with pytest.raises(InvalidInput, match="missing channel input.*t2w"):
        asyncio.run(chain(request(files)))
    assert REGISTRY.get_sample_value("medseg_inflight_requests", {"model": "unit"}) == 0
    assert REGISTRY.get_sample_value("medseg_requests_total", {"model": "unit", "status": "4xx"}) == 1
    assert REGISTRY.get_sample_value("medseg_requests_total", {"model": "unit", "status": "2xx"}) == 2


def test_decode_case_and_request_errors(case):
    from medseg.registry.resolve import parse_models_uri
    from medseg.serving.model import decode_case

    encoded = {c: base64.b64encode(b).decode() for c, b in _files(case).items()}
    out = decode_case(encoded, list(BRATS_CHANNELS))
    assert out.images.shape == (4, 24, 24, 24) and out.spacing == [2.0, 2.0, 2.0]
    wrapped = {c: "\n".join(t[i:i + 76] for i in range(0, len(t), 76)) for c, t in encoded.items()}  # `base64` tool output
    assert decode_case(wrapped, list(BRATS_CHANNELS)).images.shape == (4, 24, 24, 24)
    with pytest.raises(MedsegError, match="input 't1n': empty"):
        decode_case({**encoded, "t1n": ""}, list(BRATS_CHANNELS))
    assert parse_models_uri("models:/brats@champion") == ("brats", "champion", None)
    assert parse_models_uri("models:/brats/3") == ("brats", None, "3")
    with pytest.raises(MedsegError, match="models:/NAME@ALIAS"):
        parse_models_uri("models:/brats")


def test_resolve_local_package_errors(tmp_path):
    from medseg.registry.resolve import resolve_model_source

    with pytest.raises(MedsegError, match="model not found"):
        resolve_model_source(tmp_path / "nothing")
    with pytest.raises(MedsegError, match="not a model package"):
        resolve_model_source(tmp_path)


def test_load_from_mlflow_registry_alias(package, tmp_path, monkeypatch):
    """``models:/NAME@ALIAS`` on a SQLite registry: the package is found in the download, the version recorded."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from medseg.serving.model import SegmentationModel

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    class Wrapper(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    # artifacts in tmp_path, not ./mlruns of whatever folder the tests run from
    experiment = mlflow.MlflowClient().create_experiment("serving-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    for _ in range(2):  # two versions: the alias must pick the one it points to
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Wrapper(), artifacts={"model_package": str(package)},
                                           registered_model_name="tiny-brats", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("tiny-brats", "champion", 1)
    assert str(info.registered_model_version) == "2"

    model = SegmentationModel("reg", "models:/tiny-brats@champion", device="cpu", download_dir=tmp_path / "dl")
    assert model.load()
    assert model.model_version == "1"
    assert (model.package_dir / "model_package.json").is_file()
    assert SegmentationModel("reg2", "models:/tiny-brats/2", device="cpu", download_dir=tmp_path / "dl2").load()
    with pytest.raises(MedsegError, match="cannot resolve the registered model"):
        SegmentationModel("reg3", "models:/tiny-brats@nope", device="cpu").load()


def test_kserve_import_ignores_foreign_command_line():
    """Without the guard, kserve's import-time argparse would exit on this command line."""
    code = ("import sys; sys.argv = ['medseg', 'serve', '--http_port', 'not-a-number', '--pr', 'x'];"
            "from medseg.serving import import_kserve; k = import_kserve(); import kserve.model_server as m;"
            "assert m.args.http_port == 8080; assert sys.argv[3] == 'not-a-number'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
