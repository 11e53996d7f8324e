"""One endpoint contract per task, same server: the real KServe model server (a subprocess on 127.0.0.1) with
(a) an untrained CN/MCI/AD classifier taking the age, (b) an untrained 2D slice-set model (Kaggle LGG layout),
(c) the BraTS-like segmentation package of tests/factories.py. Each: the metadata route (raw HTTP and
tritonclient), requests over V2 JSON, the V2 binary extension and V1, and client mistakes answering 400.

The servers start one after the other (module fixtures, first use) and idle between the tests of the others.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from medseg.errors import MedsegError
from medseg.io import load_nifti, load_nifti_bytes
from medseg.serving import client, server
from medseg.serving.image2d import decode_image, encode_mask, pixels_from_volume, volume_from_pixels
from tests.factories import (SLICE_CHANNELS, make_classifier_package, make_model_package, make_slice_package, slice_rgb, write_case,
                             write_classifier_case, write_slice_stack)

CLASSES = ["CN", "MCI", "AD"]
SLICE_MAX_VOXELS = 20_000


# --------------------------------------------------------------------------- fixtures
def _serve(package: Path, name: str, folder: Path, extra: list[str] | None = None):
    log_file = folder / f"{name}.log"
    port = server.free_port()
    proc = server.start_server_process(package, name, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"},
                                       extra_args=["--reload-interval", "0", *(extra or [])])
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until_ready(url, name, timeout_s=90, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    return url, proc, log_file


@pytest.fixture(scope="module")
def cls_served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    url, proc, log_file = _serve(make_classifier_package(folder / "model", use_age=True), "adni", folder)
    yield url, log_file
    server.stop_server(proc)


@pytest.fixture(scope="module")
def slice_served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slices")
    url, proc, log_file = _serve(make_slice_package(folder / "model"), "lgg", folder, ["--max-voxels", str(SLICE_MAX_VOXELS)])
    yield url, log_file
    server.stop_server(proc)


@pytest.fixture(scope="module")
def seg_served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    url, proc, log_file = _serve(make_model_package(folder / "model"), "tumour", folder)
    yield url, log_file
    server.stop_server(proc)


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    return write_classifier_case(tmp_path_factory.mktemp("subject"), k=2)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Any]:
    """One RGB slice as PNG and TIFF, and the NIfTI stack of 4 copies of it (the LGG adapter's layout)."""
    folder = tmp_path_factory.mktemp("pictures")
    pixels = slice_rgb(48, 40)
    out: dict[str, Any] = {"pixels": pixels, "stack": write_slice_stack(folder / "stack", pixels, n_slices=4)}
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        out[fmt.lower()] = buf.getvalue()
    return out


# --------------------------------------------------------------------------- helpers
def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _post(url: str, name: str, body: Any, v1: bool = False) -> httpx.Response:
    path = f"/v1/models/{name}:predict" if v1 else f"/v2/models/{name}/infer"
    return httpx.post(url + path, json=body, timeout=120)


def _binary(url: str, name: str, tensors: list[tuple[str, str, list[int], bytes]], parameters: dict | None = None) -> httpx.Response:
    """A V2 binary-extension request: tensors (name, datatype, shape, raw bytes as the extension lays them out)."""
    inputs, tail = [], b""
    for tname, datatype, shape, raw in tensors:
        inputs.append({"name": tname, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}})
        tail += raw
    header = json.dumps({"inputs": inputs, **({"parameters": parameters} if parameters else {})}).encode()
    return httpx.post(f"{url}/v2/models/{name}/infer", content=header + tail, timeout=120,
                      headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})


def _bytes_element(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw)) + raw


def _outputs(response: httpx.Response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def _bad(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message


def _metadata(url: str, name: str) -> dict:
    response = httpx.get(f"{url}/v2/models/{name}", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "local"
    return response.json()


def _triton_metadata(url: str, name: str) -> dict:
    httpclient = pytest.importorskip("tritonclient.http")
    triton = httpclient.InferenceServerClient(url.removeprefix("http://"), connection_timeout=30, network_timeout=60)
    try:
        assert triton.is_model_ready(name)
        return triton.get_model_metadata(name)
    finally:
        triton.close()


def _png(array: np.ndarray, **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def _mask(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)))


# --------------------------------------------------------------------------- in process: pictures ↔ volumes
def test_picture_orientation_is_the_lgg_adapters(tmp_path):
    """A TIFF slice decoded by the model server is the same C×I×J array as that slice of the Kaggle LGG adapter's
    stack, and a mask encoded from the adapter's label slice is the mask file it read."""
    from medseg.ingest import check_case
    from medseg.ingest.adapters.lgg import KaggleLGGAdapter

    folder = tmp_path / "kaggle_3m" / "TCGA_CS_4941_19960909"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    slices = rng.integers(1, 256, size=(2, 40, 56, 3), dtype=np.uint8)  # (K, rows, columns, RGB), not square
    masks = np.zeros((2, 40, 56), np.uint8)
    masks[:, 5:12, 30:50] = 255
    for k in range(2):
        Image.fromarray(slices[k], mode="RGB").save(folder / f"{folder.name}_{k + 1}.tif")
        Image.fromarray(masks[k], mode="L").save(folder / f"{folder.name}_{k + 1}_mask.tif")
    adapter = KaggleLGGAdapter()
    (case,) = adapter.discover(tmp_path / "kaggle_3m")
    check = check_case(case, adapter)
    assert check.ok, check.problems
    tiff = (folder / f"{folder.name}_2.tif").read_bytes()
    images, affine, spacing, info = decode_image(tiff, list(SLICE_CHANNELS), 2, None, "input 'image'")
    assert images.shape == (3, 56, 40, 1) and (info.width, info.height, info.format) == (56, 40, "tiff")
    for c, channel in enumerate(SLICE_CHANNELS):
        np.testing.assert_array_equal(images[c, :, :, 0], check.images[channel].array[:, :, 1])
    np.testing.assert_array_equal(affine, np.eye(4))
    assert spacing == [1.0, 1.0, 1.0]
    label = np.asarray(check.label.array)[:, :, 1:2]
    np.testing.assert_array_equal(_mask(encode_mask(label, info, [1])), masks[1])
    # the other slice axes: columns along the lower in-plane voxel axis, rows along the higher one
    for axis in (0, 1, 2):
        volume = volume_from_pixels(slices[0], axis)
        assert volume.shape[1 + axis] == 1
        np.testing.assert_array_equal(pixels_from_volume(volume[0], axis), slices[0][..., 0])


def test_picture_problems_name_the_input():
    rgb = slice_rgb(16, 12)
    channels = list(SLICE_CHANNELS)

    def refused(raw: bytes, *words: str, max_pixels: int | None = None) -> None:
        with pytest.raises(MedsegError) as err:
            decode_image(raw, channels, 2, max_pixels, "input 'image'")
        for word in ("input 'image'", *words):
            assert word in str(err.value), str(err.value)

    refused(b"\xff\xd8\xff\xe0 a JPEG", "not a PNG or TIFF")
    refused(_png(rgb)[:60], "cannot")
    refused(_png(rgb[..., 0]), "grey", "3 (pre_contrast, flair, post_contrast)")
    refused(_png(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])), "transparency")
    refused(_png(rgb), "192 pixels", "limit of 100", max_pixels=100)
    pages = io.BytesIO()
    Image.fromarray(rgb).save(pages, format="TIFF", save_all=True, append_images=[Image.fromarray(rgb)])
    refused(pages.getvalue(), "2 pages", "3D stack")
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="TIFF")
    refused(cmyk.getvalue(), "CMYK")
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])  # an opaque alpha channel is dropped
    assert decode_image(_png(opaque), channels, 2, None, "x")[0].shape == (3, 16, 12, 1)
    grey16 = decode_image(_png((rgb[..., 0].astype(np.uint16) * 200)), ["t"], 2, None, "x")[0]
    assert grey16.shape == (1, 16, 12, 1) and grey16.max() > 255


def test_kserve_dataplane_answers_the_metadata_route_from_the_model(tmp_path):
    """Without the guard (KServe's own route): the dataplane asks the model's get_input_types/get_output_types; its
    response model keeps name, datatype and shape of each tensor (which is why the guard answers with the model's
    whole metadata, parameters and optional flags included)."""
    import asyncio

    from medseg.serving.model import MedsegModel  # first: imports kserve with the sys.argv guard
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse

    model = MedsegModel("adni", make_classifier_package(tmp_path / "model", use_age=True), device="cpu")
    assert model.get_input_types() == [] and model.metadata() is None  # before the first load
    model.load()
    repository = ModelRepository()
    repository.update(model)
    answer = ModelMetadataResponse.model_validate(asyncio.run(DataPlane(repository).model_metadata("adni"))).model_dump()
    assert [(i["name"], i["datatype"], i["shape"]) for i in answer["inputs"]] == [("image", "BYTES", [1]), ("volume", "FP32", [1, -1, -1, -1]),
                                                                                   ("age", "FP32", [1])]
    assert [(o["name"], o["shape"]) for o in answer["outputs"]] == [("probabilities", [3]), ("label", [1])]
    full = model.metadata()
    assert [i["name"] for i in full["inputs"]] == [i["name"] for i in answer["inputs"]] and full["outputs"][0]["parameters"]["classes"] == "CN,MCI,AD"


# --------------------------------------------------------------------------- (a) classifier with age
def test_classifier_metadata(cls_served):
    url, _ = cls_served
    meta = _metadata(url, "adni")
    inputs = {i["name"]: i for i in meta["inputs"]}
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert list(inputs) == ["image", "volume", "age"] and meta["versions"] == ["local"]
    assert inputs["image"]["datatype"] == "BYTES" and inputs["image"]["shape"] == [1] and inputs["image"]["optional"] is True
    assert inputs["volume"]["datatype"] == "FP32" and inputs["volume"]["shape"] == [1, -1, -1, -1]
    assert inputs["age"] == {"name": "age", "datatype": "FP32", "shape": [1], "parameters": {"unit": "years"}}  # required
    assert list(outputs) == ["probabilities", "label"]
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [3]
    assert outputs["probabilities"]["parameters"]["classes"] == "CN,MCI,AD"
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [1]
    assert meta["parameters"]["task"] == "classification" and meta["parameters"]["required_covariates"] == "age"
    info = client.model_info(url, "adni")
    assert info.is_classification and info.channels == ["image"] and info.requires == ["age"] and info.classes == CLASSES
    triton = _triton_metadata(url, "adni")
    assert [i["name"] for i in triton["inputs"]] == ["image", "volume", "age"] and triton["outputs"][0]["shape"] == [3]


def test_classifier_answers_over_v2_json_binary_and_v1(cls_served, subject):
    url, _ = cls_served
    raw = subject.read_bytes()
    v2 = _outputs(_post(url, "adni", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(raw)]},
                                                 {"name": "age", "datatype": "FP32", "shape": [1], "data": [71.0]}]}))
    probs = v2["probabilities"]
    assert probs["datatype"] == "FP32" and probs["shape"] == [3] and probs["parameters"] == {"classes": "CN,MCI,AD"}
    assert sum(probs["data"]) == pytest.approx(1.0, abs=1e-5) and all(0 <= p <= 1 for p in probs["data"])
    assert v2["label"]["datatype"] == "BYTES" and v2["label"]["data"] == [CLASSES[int(np.argmax(probs["data"]))]]
    binary = _outputs(_binary(url, "adni", [("image", "BYTES", [1], _bytes_element(raw)), ("age", "FP32", [1], np.float32(71).tobytes())]))
    np.testing.assert_allclose(binary["probabilities"]["data"], probs["data"], rtol=1e-5)
    v1 = _post(url, "adni", {"instances": [{"image": _b64(raw), "age": 71}]}, v1=True)
    assert v1.status_code == 200, v1.text
    pred = v1.json()["predictions"][0]
    assert list(pred["probabilities"]) == CLASSES and pred["label"] == v2["label"]["data"][0]
    np.testing.assert_allclose(list(pred["probabilities"].values()), probs["data"], rtol=1e-5)
    as_parameter = _outputs(_post(url, "adni", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(raw)]}],
                                                "parameters": {"age": "71"}}))
    np.testing.assert_allclose(as_parameter["probabilities"]["data"], probs["data"], rtol=1e-5)
    images, affine, _ = load_nifti(subject)
    volume = client.infer_volume(url, "adni", images[None], affine, covariates={"age": 71.0}, timeout=60)
    np.testing.assert_allclose(list(volume["probabilities"].values()), probs["data"], rtol=1e-4)
    older = client.infer(url, "adni", [subject], age=90.0, timeout=60)  # the age reaches the network
    assert older["task"] == "classification" and list(older["probabilities"]) == CLASSES
    assert not np.allclose(list(older["probabilities"].values()), probs["data"], rtol=1e-6)


def test_classifier_client_mistakes_are_400(cls_served, subject):
    url, log_file = cls_served
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(subject.read_bytes())]}

    def age(**kw: Any) -> dict:
        return {"name": "age", "datatype": "FP32", "shape": [1], "data": [70.0], **kw}

    _bad(_post(url, "adni", {"inputs": [image]}), "input 'age'", "missing")
    _bad(_post(url, "adni", {"instances": [{"image": image["data"][0]}]}, v1=True), "input 'age'")
    _bad(_post(url, "adni", {"inputs": [image, age(datatype="BYTES", data=["seventy"])]}), "input 'age'", "expected FP32")
    _bad(_post(url, "adni", {"inputs": [image, age(shape=[2], data=[70.0, 71.0])]}), "input 'age'", "exactly one number")
    _bad(_post(url, "adni", {"inputs": [image, age(data=[-4.0])]}), "input 'age'", "outside")
    _bad(_post(url, "adni", {"inputs": [image], "parameters": {"age": "old"}}), "request parameter 'age'", "not a number")
    _bad(_post(url, "adni", {"inputs": [image, age(), {**image, "name": "t1"}]}), "unexpected input", "t1")
    _bad(_post(url, "adni", {"inputs": [{**image, "data": [_b64(b"not an image" * 40)]}, age()]}), "input 'image'", "NIfTI")
    with pytest.raises(MedsegError, match="age"):
        client.infer(url, "adni", [subject], timeout=60)
    assert httpx.get(f"{url}/v2/models/adni/ready").status_code == 200
    assert "Traceback" not in log_file.read_text()


def test_classifier_cli(cls_served, subject, tmp_path, capsys):
    url, _ = cls_served
    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    out = tmp_path / "answer.json"
    assert client.run(parser.parse_args(["--url", url, "--model", "adni", "--images", str(subject), "--age", "71", "--out", str(out)])) == 0
    answer = json.loads(out.read_text())
    assert list(answer["probabilities"]) == CLASSES and answer["label"] in CLASSES and answer["model_version"] == "local"
    assert "label:" in capsys.readouterr().out
    with pytest.raises(MedsegError, match="--age"):
        client.run(parser.parse_args(["--url", url, "--model", "adni", "--images", str(subject)]))


# --------------------------------------------------------------------------- (b) 2D slice set
def test_slice_model_metadata(slice_served):
    url, _ = slice_served
    meta = _metadata(url, "lgg")
    inputs = {i["name"]: i for i in meta["inputs"]}
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert list(inputs) == [*SLICE_CHANNELS, "volume", "image"]
    assert inputs["image"]["datatype"] == "BYTES" and inputs["image"]["shape"] == [1] and "PNG or TIFF" in inputs["image"]["parameters"]["content"]
    assert inputs["volume"]["shape"] == [3, -1, -1, -1]
    assert outputs["segmentation"]["datatype"] == "BYTES" and outputs["volumes_ml"]["shape"] == [1]
    assert outputs["volumes_ml"]["parameters"] == {"regions": "abnormality"}
    assert meta["parameters"]["view"] == "slices" and meta["parameters"]["slice_axis"] == "2"
    info = client.model_info(url, "lgg")
    assert info.takes_image and info.channels == list(SLICE_CHANNELS) and info.labels == {0: "background", 1: "abnormality"}
    assert [o["name"] for o in _triton_metadata(url, "lgg")["outputs"]] == ["segmentation", "volumes_ml"]


def test_slice_picture_gets_the_mask_of_that_slice_of_the_stack(slice_served, pictures):
    url, _ = slice_served
    stack = client.infer(url, "lgg", pictures["stack"], timeout=60)
    assert stack["format"] == "nii.gz"
    seg, _, _ = load_nifti_bytes(stack["segmentation_bytes"], dtype=np.uint8)
    assert seg.shape == (48, 40, 4)
    expected = np.where(pixels_from_volume(seg[:, :, 2:3], 2) > 0, 255, 0)  # rows × columns, 0/255
    assert 0 < (expected > 0).mean() < 1, "the untrained model's mask is all one value: the check would see nothing"

    png = _outputs(_post(url, "lgg", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(pictures["png"])]}]}))
    assert png["segmentation"]["parameters"] == {"format": "png"}
    raw = base64.b64decode(png["segmentation"]["data"][0])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    mask = _mask(raw)
    assert mask.shape == (40, 48) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask, expected)
    assert png["volumes_ml"]["data"][0] == pytest.approx((mask > 0).sum() / 1000.0, rel=1e-5)  # 1 mm pixels, 1 mm thick

    tiff = client.infer_image(url, "lgg", pictures["tiff"], timeout=60)
    assert tiff["format"] == "tiff" and tiff["segmentation_bytes"][:4] in (b"II*\x00", b"MM\x00*")
    np.testing.assert_array_equal(_mask(tiff["segmentation_bytes"]), expected)
    binary = _outputs(_binary(url, "lgg", [("image", "BYTES", [1], _bytes_element(pictures["png"]))]))
    np.testing.assert_array_equal(_mask(base64.b64decode(binary["segmentation"]["data"][0])), expected)
    v1 = _post(url, "lgg", {"instances": [{"image": {"b64": _b64(pictures["png"])}}]}, v1=True)
    assert v1.status_code == 200, v1.text
    pred = v1.json()["predictions"][0]
    assert pred["format"] == "png" and list(pred["volumes_ml"]) == ["abnormality"]
    np.testing.assert_array_equal(_mask(base64.b64decode(pred["segmentation"])), expected)


def test_slice_picture_mistakes_are_400(slice_served, pictures):
    url, log_file = slice_served
    rgb = pictures["pixels"]

    def picture(raw: bytes, **kw: Any) -> dict:
        return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(raw)], **kw}]}

    pages = io.BytesIO()
    Image.fromarray(rgb).save(pages, format="TIFF", save_all=True, append_images=[Image.fromarray(rgb)] * 2)
    big = np.zeros((160, 160, 3), np.uint8)
    big[40:120, 40:120] = 100
    _bad(_post(url, "lgg", picture(b"GIF89a not what we take" * 5)), "input 'image'", "not a PNG or TIFF")
    _bad(_post(url, "lgg", picture(_png(rgb[..., 1]))), "input 'image'", "grey", "pre_contrast")
    _bad(_post(url, "lgg", picture(pages.getvalue())), "input 'image'", "3 pages")
    _bad(_post(url, "lgg", picture(_png(big))), "input 'image'", "25600 pixels", f"limit of {SLICE_MAX_VOXELS}")
    _bad(_post(url, "lgg", picture(pictures["png"][: len(pictures["png"]) // 2])), "input 'image'", "cannot")
    _bad(_post(url, "lgg", picture(pictures["png"], datatype="FP32", data=[1.0])), "input 'image'", "expected BYTES")
    _bad(_post(url, "lgg", picture(_png(np.zeros_like(rgb)))), "all zero")
    both = picture(pictures["png"])
    both["inputs"].append({"name": "flair", "datatype": "BYTES", "shape": [1], "data": [_b64(pictures["stack"][1].read_bytes())]})
    _bad(_post(url, "lgg", both), "either one picture", "flair")
    _bad(_post(url, "lgg", {"instances": [{"image": "%%% not base64"}]}, v1=True), "input 'image'", "base64")
    assert httpx.get(f"{url}/v2/models/lgg/ready").status_code == 200
    assert "Traceback" not in log_file.read_text()


def test_slice_cli_writes_the_mask_in_the_pictures_format(slice_served, pictures, tmp_path):
    url, _ = slice_served
    slice_png = tmp_path / "slice.png"
    slice_png.write_bytes(pictures["png"])
    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    out = tmp_path / "mask.png"
    assert client.run(parser.parse_args(["--url", url, "--model", "lgg", "--image", str(slice_png), "--out", str(out)])) == 0
    assert _mask(out.read_bytes()).shape == (40, 48)
    with pytest.raises(MedsegError, match="PNG"):
        client.run(parser.parse_args(["--url", url, "--model", "lgg", "--image", str(slice_png), "--out", str(tmp_path / "mask.nii.gz")]))
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "medseg.cli", "predict", "--url", url, "--model", "lgg", "--image", str(slice_png),
                           "--out", str(tmp_path / "cli-mask.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli-mask.png").read_bytes() == out.read_bytes() and "abnormality" in done.stdout


# --------------------------------------------------------------------------- (c) BraTS-like 3D segmentation
def test_segmentation_metadata_and_answers(seg_served, tmp_path):
    url, _ = seg_served
    meta = _metadata(url, "tumour")
    channels = meta["parameters"]["channels"].split(",")
    assert [i["name"] for i in meta["inputs"]] == [*channels, "volume"] and len(channels) == 4
    assert all(i["datatype"] == "BYTES" and i["shape"] == [1] for i in meta["inputs"][:4])
    outputs = {o["name"]: o for o in meta["outputs"]}
    groups = outputs["volumes_ml"]["parameters"]["regions"].split(",")
    assert outputs["volumes_ml"]["shape"] == [len(groups)] == [3] and outputs["segmentation"]["datatype"] == "BYTES"
    assert meta["parameters"]["view"] == "volume" and "image" not in {i["name"] for i in meta["inputs"]}
    assert [i["name"] for i in _triton_metadata(url, "tumour")["inputs"]] == [*channels, "volume"]

    paths, _ = write_case(tmp_path / "case")
    files = {c: p.read_bytes() for c, p in zip(channels, paths)}
    v2 = _outputs(_post(url, "tumour", {"inputs": [{"name": c, "datatype": "BYTES", "shape": [1], "data": [_b64(b)]} for c, b in files.items()]}))
    assert v2["segmentation"]["parameters"] == {"format": "nii.gz"} and v2["volumes_ml"]["parameters"]["regions"] == ",".join(groups)
    binary = _outputs(_binary(url, "tumour", [(c, "BYTES", [1], _bytes_element(b)) for c, b in files.items()]))
    assert binary["volumes_ml"]["data"] == pytest.approx(v2["volumes_ml"]["data"])
    v1 = _post(url, "tumour", {"instances": [{c: _b64(b) for c, b in files.items()}]}, v1=True)
    assert v1.status_code == 200 and list(v1.json()["predictions"][0]["volumes_ml"]) == groups
    answer = client.infer(url, "tumour", paths, timeout=60)  # the channels from the metadata route
    assert answer["volumes_ml"] == pytest.approx(dict(zip(groups, v2["volumes_ml"]["data"])))

    body = {"inputs": [{"name": c, "datatype": "BYTES", "shape": [1], "data": [_b64(b)]} for c, b in files.items()]}
    _bad(_post(url, "tumour", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(_png(slice_rgb()))]}]}),
         "unexpected input", "image")  # a 3D model takes no picture
    _bad(_post(url, "tumour", {"inputs": [*body["inputs"], {"name": "age", "datatype": "FP32", "shape": [1], "data": [50.0]}]}),
         "unexpected input", "age")  # nor covariates
    _bad(_post(url, "tumour", {"instances": [{channels[0]: 5}]}, v1=True), f"input '{channels[0]}'", "a number")


def test_unknown_model_metadata_is_404(seg_served):
    url, _ = seg_served
    response = httpx.get(f"{url}/v2/models/nope", timeout=30)
    assert response.status_code == 404 and "nope" in response.json()["error"]
    with pytest.raises(MedsegError, match="404"):
        client.model_info(url, "nope")


# --------------------------------------------------------------------------- the smoke test (the pipeline's serve step) per task
def _dataset(root: Path, package: Path, images: list[Path], label: np.ndarray | None = None, case: dict | None = None) -> Path:
    """A minimal canonical dataset around one held-out case ``C00``: dataset.json (the package's), splits.json,
    imagesTr (+ labelsTr), manifest.json."""
    import shutil

    from medseg import schemas
    from medseg.io import save_nifti

    (root / schemas.IMAGES_TR).mkdir(parents=True)
    shutil.copy(package / schemas.DATASET_JSON, root / schemas.DATASET_JSON)
    for i, path in enumerate(images):
        shutil.copy(path, root / schemas.IMAGES_TR / f"C00_{i:04d}.nii.gz")
    if label is not None:
        (root / schemas.LABELS_TR).mkdir()
        save_nifti(root / schemas.LABELS_TR / "C00.nii.gz", label, load_nifti(images[0])[1])
    schemas.Splits(test=["C00"], folds=[]).save(root)
    schemas.Manifest(dataset_name="d", source="s", source_format="x", cases=[{"case_id": "C00", "patient_id": "P0", "files": [], **(case or {})}]).save(root)
    return root


@pytest.mark.parametrize("task", ["classification", "slices", "segmentation"])
def test_smoke_test_sends_the_case_in_the_tasks_form(task, tmp_path, subject, pictures):
    from medseg.serving.smoke import smoke_test

    if task == "classification":
        package = make_classifier_package(tmp_path / "model", use_age=True)
        dataset = _dataset(tmp_path / "dataset", package, [subject], case={"class_label": "AD", "covariates": {"age": 77, "sex": "F"}})
    elif task == "slices":
        package = make_slice_package(tmp_path / "model")
        label = np.zeros((48, 40, 4), np.uint8)
        label[20:40, 5:20, 1:3] = 1
        dataset = _dataset(tmp_path / "dataset", package, pictures["stack"], label)
    else:
        package = make_model_package(tmp_path / "model")
        paths, label_path = write_case(tmp_path / "case")
        dataset = _dataset(tmp_path / "dataset", package, paths, np.rint(load_nifti(label_path)[0]).astype(np.uint8))
    result = smoke_test(str(package), "smoke", dataset, tmp_path / "out", timeout_s=90)
    assert result["endpoint_ok"] is True and result["model_version"] == "local" and result["case_id"] == "C00", result
    saved = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert saved["endpoint_ok"] is True
    if task == "classification":
        assert list(result["probabilities"]) == CLASSES and result["true_label"] == "AD" and result["covariates"] == {"age": 77.0}
        assert result["label_correct"] == (result["label"] == "AD")
    elif task == "slices":
        assert set(result) >= {"abnormality_dice", "slice_ok", "slice_dice", "volumes_ml"} and result["slice_index"] in (1, 2)
        assert result["slice_ok"] is True and 0 <= result["abnormality_dice"] <= 1
    else:
        groups = [k.removesuffix("_dice") for k in result if k.endswith("_dice")]  # <GROUP>_dice per reported group
        assert len(groups) == 3 and groups == list(result["volumes_ml"])
        assert (tmp_path / "out" / "C00_seg.nii.gz").is_file() and (tmp_path / "out" / "C00_overlay.png").is_file()
