"""Model server robustness: malformed requests, limits, admission, timeout, FP32/binary/V1 inputs, drift, hot reload.

One real KServe server for the module (127.0.0.1, small limits so the limits are cheap to hit: 2 MiB bodies,
40 000 voxels, 1 running + 1 queued request, 4 s timeout). Every fuzz kind asserts its 4xx (or documented)
status and a JSON ``{"error": ...}`` message, then that the server still answers ``/v2/health/ready`` and a
good request. The hot-reload test runs its own server on a real MLflow SQLite registry.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from medseg import schemas
from medseg.task import BRATS2023
from medseg.errors import MedsegError
from medseg.io import load_nifti, load_nifti_bytes, nifti_to_bytes
from medseg.serving import client, server
from tests.factories import make_model_package, write_case

NAME = "brats"
CHANNELS = list(BRATS2023.channels)
LIMIT_MB = 2
MAX_VOXELS = 40_000
TIMEOUT_S = 4
SERVER_ARGS = ["--max-request-mb", str(LIMIT_MB), "--max-voxels", str(MAX_VOXELS), "--max-concurrent", "1", "--max-queue", "1",
               "--timeout", str(TIMEOUT_S), "--reload-interval", "0"]
TRAIN_STATS = {c: {"mean": 100.0 + 10 * i, "std": 20.0, "p00_5": 0.0, "p99_5": 200.0, "min": 0.0, "max": 250.0} for i, c in enumerate(CHANNELS)}


# --------------------------------------------------------------------------- fixtures
def write_fingerprint(package: Path) -> None:
    schemas.Fingerprint(spacings=[[2.0, 2.0, 2.0]], shapes_after_crop=[[24, 24, 24]], shapes=[[24, 24, 24]], channels=TRAIN_STATS,
                        class_frequencies={"0": 0.9, "1": 0.1}, case_ids=["c1"]).save(package)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """The factory's untrained package plus a fingerprint.json (so input drift is measured)."""
    pkg = make_model_package(tmp_path_factory.mktemp("robust") / "model")
    write_fingerprint(pkg)
    return pkg


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("robust-case")
    paths, _ = write_case(folder / "case")
    files = {c: p.read_bytes() for c, p in zip(CHANNELS, paths)}
    images = np.stack([load_nifti(p)[0] for p in paths])
    affine = load_nifti(paths[0])[1]
    return {"paths": paths, "files": files, "raw": gzip.decompress(files["t1c"]), "images": images, "affine": affine}


@pytest.fixture(scope="module")
def served(package, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("robust-log") / "server.log"
    port = server.free_port()
    proc = server.start_server_process(package, NAME, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"}, extra_args=SERVER_ARGS)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until_ready(url, NAME, timeout_s=90, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    yield url, port, log_file
    server.stop_server(proc)


# --------------------------------------------------------------------------- request builders
def v2_body(files: dict[str, bytes | str]) -> dict[str, Any]:
    return {"id": "fuzz", "inputs": [{"name": n, "datatype": "BYTES", "shape": [1],
                                      "data": [b if isinstance(b, str) else base64.b64encode(b).decode()]} for n, b in files.items()]}


def as_json(body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


def with_t1c(ctx: dict[str, Any], value: bytes | str) -> dict[str, Any]:
    return as_json(v2_body({**ctx["files"], "t1c": value}))


def patched(raw: bytes, edits: list[tuple[int, str, tuple]]) -> bytes:
    """An uncompressed NIfTI-1 file with header fields overwritten: (offset, struct format, values)."""
    out = bytearray(raw)
    for offset, fmt, values in edits:
        struct.pack_into("<" + fmt, out, offset, *values)
    return bytes(out)


def zero_spacing(raw: bytes) -> bytes:  # sform only, with a zero first column
    return patched(raw, [(252, "hh", (0, 1)), (280, "4f", (0.0, 0.0, 0.0, 0.0))])


def fp32(ctx: dict[str, Any], images: np.ndarray | None = None, affine: Any = None, binary: bool = True, **kw: Any) -> tuple[bytes, dict[str, str]]:
    return client.volume_request(ctx["images"] if images is None else images, ctx["affine"] if affine is None else affine, binary=binary, **kw)


def fp32_json(shape: list[Any], data: Any, params: dict[str, Any] | None = None, name: str = "volume") -> dict[str, Any]:
    identity = "2 0 0 0 0 2 0 0 0 0 2 0 0 0 0 1"  # the model's 2 mm: a 4³ volume is just big enough for its network
    tensor = {"name": name, "datatype": "FP32", "shape": shape, "data": data, "parameters": {"affine": identity} if params is None else params}
    return as_json({"inputs": [tensor]})


def binary_edit(ctx: dict[str, Any], edit: Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]]) -> dict[str, Any]:
    body, headers = fp32(ctx)
    body, headers = edit(body, dict(headers))
    return {"content": body, "headers": headers}


def binary_header(tensor: dict[str, Any], payload: bytes) -> dict[str, Any]:
    head = json.dumps({"inputs": [tensor]}).encode()
    return {"content": head + payload, "headers": {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}}


def fp32_req(ctx: dict[str, Any], **kw: Any) -> dict[str, Any]:
    body, headers = fp32(ctx, **kw)
    return {"content": body, "headers": headers}


def _nan_json(ctx: dict[str, Any]) -> dict[str, Any]:
    images = ctx["images"].copy()
    images[1, 2, 3, 4] = np.nan
    return fp32_req(ctx, images=images, binary=False)  # JSON text with a NaN literal


def _gzip_bomb(c: dict[str, Any]) -> dict[str, Any]:
    """A valid header + data followed by 300 MiB of zeros in the same gzip stream (300 KB sent)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = z.compress(c["raw"]) + b"".join(z.compress(b"\0" * 2**20) for _ in range(300)) + z.flush()
    return with_t1c(c, data)


def _mismatched_shape(ctx: dict[str, Any]) -> dict[str, Any]:
    return with_t1c(ctx, nifti_to_bytes(np.ones((20, 24, 24), np.float32), ctx["affine"]))


def _mismatched_affine(ctx: dict[str, Any]) -> dict[str, Any]:
    return with_t1c(ctx, nifti_to_bytes(ctx["images"][1], np.diag([2.0, 2.0, 3.0, 1.0])))


def _volumes(ctx: dict[str, Any], array: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    return as_json(v2_body({c: nifti_to_bytes(array, affine) for c in CHANNELS}))


def nifti_to_bytes_any(array: np.ndarray, affine: np.ndarray) -> bytes:
    """An uncompressed NIfTI-1 file of any dtype nibabel writes (complex, RGB), unlike medseg.io's float writer."""
    return nib.Nifti1Image(array, affine).to_bytes()


def _nan_volume() -> np.ndarray:
    a = np.ones((24, 24, 24), np.float32)
    a[3, 4, 5] = np.nan
    return a


def _inf_volume() -> np.ndarray:
    a = np.ones((24, 24, 24), np.float32)
    a[1, 1, 1] = np.inf
    return a


V2 = f"/v2/models/{NAME}/infer"
V1 = f"/v1/models/{NAME}:predict"

# kind → (builder(ctx) → httpx request kwargs incl. optional method/path, expected status, words expected in the message)
KINDS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], int, tuple[str, ...]]] = {
    # body is not a V2 request
    "not_json": (lambda c: {"content": b"hello{", "headers": {"content-type": "application/json"}}, 400, ("must be a JSON object",)),
    "invalid_json_object": (lambda c: {"content": b'{"inputs": [}', "headers": {"content-type": "application/json"}}, 400, ("JSON decode error",)),
    "json_array": (lambda c: as_json([1, 2]), 400, ("must be a JSON object",)),
    "json_string": (lambda c: as_json("abc"), 400, ("must be a JSON object",)),
    "empty_body": (lambda c: {"content": b"", "headers": {"content-type": "application/json"}}, 400, ("JSON object",)),
    "missing_inputs": (lambda c: as_json({"id": "x"}), 400, ("inputs", "Field required")),
    "inputs_not_list": (lambda c: as_json({"inputs": 5}), 400, ("inputs", "valid list")),
    "inputs_empty": (lambda c: as_json({"inputs": []}), 400, ("no inputs",)),
    "input_not_object": (lambda c: as_json({"inputs": [5]}), 400, ("inputs.0",)),
    "deeply_nested_json": (lambda c: {"content": b'{"inputs": ' + b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400, ("error parsing the body",)),
    # channel inputs
    "wrong_channel_names": (lambda c: as_json(v2_body({k.upper(): v for k, v in c["files"].items()})), 400, ("missing channel", "unexpected input", "T1N")),
    "duplicate_channel": (lambda c: as_json({"inputs": v2_body(c["files"])["inputs"] + v2_body({"t1n": c["files"]["t1n"]})["inputs"]}), 400, ("t1n", "more than once")),
    "missing_channel": (lambda c: as_json(v2_body({k: v for k, v in c["files"].items() if k != "t2f"})), 400, ("missing channel", "t2f")),
    "extra_channel": (lambda c: as_json(v2_body({**c["files"], "flair": c["files"]["t2f"]})), 400, ("unexpected input", "flair")),
    "wrong_datatype": (lambda c: as_json({"inputs": [{**i, "datatype": "INT32", "data": [1]} if i["name"] == "t1c" else i for i in v2_body(c["files"])["inputs"]]}),
                       400, ("t1c", "expected BYTES")),
    "two_elements": (lambda c: as_json({"inputs": [{**i, "shape": [2], "data": i["data"] * 2} if i["name"] == "t1c" else i for i in v2_body(c["files"])["inputs"]]}),
                     400, ("t1c", "exactly one element")),
    "element_not_string": (lambda c: as_json({"inputs": [{**i, "data": [123]} if i["name"] == "t1c" else i for i in v2_body(c["files"])["inputs"]]}),
                           400, ("t1c", "a string")),
    "data_nested_deep": (lambda c: as_json({"inputs": [{**i, "data": [[[[[[[[[["x"]]]]]]]]]]} if i["name"] == "t1c" else i for i in v2_body(c["files"])["inputs"]]}),
                         400, ("t1c", "nested")),
    "lone_surrogate_name": (lambda c: {"content": json.dumps(v2_body({**c["files"], "\ud800x": c["files"]["t1n"]})).encode(),
                                       "headers": {"content-type": "application/json"}}, 400, ("unexpected input", "\\ud800x")),
    # the NIfTI bytes
    "base64_garbage": (lambda c: with_t1c(c, "this is *not* base64!"), 400, ("t1c", "not valid base64")),
    "empty_bytes": (lambda c: with_t1c(c, ""), 400, ("t1c", "empty")),
    "not_nifti": (lambda c: with_t1c(c, b"hello, I am a text file, not an image" * 20), 400, ("t1c", "cannot read NIfTI")),
    "truncated_gzip": (lambda c: with_t1c(c, c["files"]["t1c"][: len(c["files"]["t1c"]) // 2]), 400, ("t1c", "truncated or corrupt")),
    "truncated_nii": (lambda c: with_t1c(c, c["raw"][: len(c["raw"]) // 2]), 400, ("t1c", "truncated")),
    "gzip_of_garbage": (lambda c: with_t1c(c, gzip.compress(b"garbage" * 100)), 400, ("t1c", "not a NIfTI-1 file")),
    "corrupt_deflate": (lambda c: with_t1c(c, b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"\xff" * 50), 400, ("t1c", "corrupt compressed data")),
    "nifti_2d": (lambda c: with_t1c(c, nifti_to_bytes(np.ones((24, 24), np.float32), np.eye(4))), 400, ("t1c", "2D image")),
    "nifti_4d": (lambda c: with_t1c(c, nifti_to_bytes(np.ones((24, 24, 24, 3), np.float32), c["affine"])), 400, ("t1c", "3 volumes")),
    "nifti2": (lambda c: with_t1c(c, nib.Nifti2Image(np.ones((24, 24, 24), np.float32), c["affine"]).to_bytes()), 400, ("t1c", "NIfTI-2")),
    "absurd_header_dims": (lambda c: with_t1c(c, gzip.compress(patched(c["raw"][:352], [(40, "8h", (3, 32767, 32767, 32767, 1, 1, 1, 1))]))),
                           400, ("t1c", "32767×32767×32767", "35181150961663 voxels", f"limit of {MAX_VOXELS}")),
    "negative_header_dim": (lambda c: with_t1c(c, patched(c["raw"], [(40, "8h", (3, 24, -24, 24, 1, 1, 1, 1))])), 400, ("t1c", "non-positive")),
    "gzip_bomb_tail": (lambda c: _gzip_bomb(c), 200, ()),  # documented: read only as far as the header says
    "nan_voxels": (lambda c: with_t1c(c, nifti_to_bytes(_nan_volume(), c["affine"])), 400, ("t1c", "NaN")),
    "inf_voxels": (lambda c: with_t1c(c, nifti_to_bytes(_inf_volume(), c["affine"])), 400, ("t1c", "NaN/Inf")),
    "mismatched_shapes": (_mismatched_shape, 400, ("t1c", "shape (20, 24, 24) differs")),
    "mismatched_affines": (_mismatched_affine, 400, ("t1c", "affine differs")),
    "complex64_nifti": (lambda c: as_json(v2_body({ch: nifti_to_bytes_any(np.ones((24, 24, 24), np.complex64), c["affine"]) for ch in CHANNELS})), 400, ("t1n", "datatype 32 (complex64)", "real-valued")),
    "complex128_nifti": (lambda c: with_t1c(c, nifti_to_bytes_any(np.ones((24, 24, 24), np.complex128), c["affine"])), 400, ("t1c", "complex128")),
    "rgb24_nifti": (lambda c: with_t1c(c, nifti_to_bytes_any(np.zeros((24, 24, 24), [("R", "u1"), ("G", "u1"), ("B", "u1")]), c["affine"])),
                    400, ("t1c", "RGB24")),
    "binary_1bit_datatype": (lambda c: with_t1c(c, patched(c["raw"], [(70, "hh", (1, 1))])), 400, ("t1c", "1-bit binary")),
    "unknown_datatype": (lambda c: with_t1c(c, patched(c["raw"], [(70, "hh", (4242, 32))])), 400, ("t1c", "datatype 4242", "not a NIfTI-1 datatype")),
    "zero_pixdim_qform": (lambda c: as_json(v2_body({k: patched(gzip.decompress(v), [(76, "4f", (1, 0, 2, 2)), (252, "hh", (1, 0))]) for k, v in c["files"].items()})),
                          400, ("pixdim[1..3] = (0.0, 2.0, 2.0)", "non-zero")),
    "zero_pixdim_no_codes": (lambda c: with_t1c(c, patched(c["raw"], [(76, "4f", (1, 0, 0, 0)), (252, "hh", (0, 0))])), 400, ("t1c", "pixdim")),
    "singular_sform": (lambda c: as_json(v2_body({k: patched(gzip.decompress(v), [(252, "hh", (0, 1)), (280, "12f", (2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0))])
                                                 for k, v in c["files"].items()})), 400, ("singular",)),
    "too_small_for_the_network": (lambda c: _volumes(c, np.ones((3, 12, 12), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                                  400, ("volume too small", "3×12×12", "at least 4×4×4")),
    "fp32_too_small": (lambda c: fp32_json([4, 2, 2, 2], [1.0] * 32, params={"affine": "2 0 0 0 0 2 0 0 0 0 2 0 0 0 0 1"}), 400, ("volume too small", "at least 4×4×4")),
    "fp32_bool_data": (lambda c: fp32_json([4, 4, 4, 4], [True] * 256), 400, ("booleans",)),
    "fp32_complex_as_pairs": (lambda c: fp32_json([4, 4, 4, 4], [[1.0, 0.0]] * 256), 400, ("declares 256 values", "holds 512")),
    "volume_fp64_datatype": (lambda c: as_json({"inputs": [{"name": "volume", "datatype": "FP64", "shape": [4, 2, 2, 2], "data": [1.0] * 32,
                                                            "parameters": {"affine": "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"}}]}), 400, ("datatype FP64", "must be FP32")),
    "volume_bool_datatype": (lambda c: as_json({"inputs": [{"name": "volume", "datatype": "BOOL", "shape": [4, 2, 2, 2], "data": [True] * 32,
                                                            "parameters": {"affine": "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1"}}]}), 400, ("datatype BOOL", "must be FP32")),
    "binary_bool_volume": (lambda c: binary_header({"name": "volume", "datatype": "BOOL", "shape": [4, 2, 2, 2], "parameters": {"binary_data_size": 32}},
                                                   b"\x01" * 32), 400, ("FP32", "BOOL")),
    "zero_spacing": (lambda c: as_json(v2_body({k: zero_spacing(gzip.decompress(v)) for k, v in c["files"].items()})), 400, ("singular", "zero voxel size")),
    "nan_affine": (lambda c: with_t1c(c, patched(c["raw"], [(252, "hh", (0, 1)), (280, "4f", (float("nan"), 0, 0, 0))])), 400, ("t1c", "NaN/Inf")),
    "resampling_blowup": (lambda c: _volumes(c, np.ones((24, 24, 24), np.float32), np.diag([20.0, 20.0, 20.0, 1.0])), 400, ("resamples to 240×240×240", "limit of 40000")),
    "too_many_voxels": (lambda c: _volumes(c, np.ones((40, 40, 40), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                        400, ("40×40×40 = 64000 voxels", f"limit of {MAX_VOXELS}")),
    # limits and transport
    "huge_body": (lambda c: {"content": b" " * (3 * 2**20), "headers": {"content-type": "application/json"}}, 413, ("too large", "3145728")),
    "huge_chunked_body": (lambda c: {"content": iter([b" " * 2**20] * 3), "headers": {"content-type": "application/json"}}, 413, ("too large",)),
    "wrong_content_type": (lambda c: {**as_json(v2_body(c["files"])), "headers": {"content-type": "text/plain"}}, 415, ("text/plain", "application/json")),
    "no_content_type": (lambda c: {"content": json.dumps(v2_body(c["files"])).encode()}, 200, ()),  # tritonclient.http sends JSON so
    # binary tensor extension
    "binary_header_length_wrong": (lambda c: binary_edit(c, lambda b, h: (b, {**h, "inference-header-content-length": str(int(h["inference-header-content-length"]) + 5)})),
                                   400, ("binary tensor extension", "not a JSON object")),
    "binary_header_length_not_number": (lambda c: binary_edit(c, lambda b, h: (b, {**h, "inference-header-content-length": "abc"})), 400, ("not a byte count",)),
    "binary_header_length_beyond_body": (lambda c: binary_edit(c, lambda b, h: (b, {**h, "inference-header-content-length": str(len(b) + 10)})), 400, ("the body has",)),
    "binary_truncated": (lambda c: binary_edit(c, lambda b, h: (b[:-8], h)), 400, ("binary_data_size", "remain")),
    "binary_trailing_bytes": (lambda c: binary_edit(c, lambda b, h: (b + b"1234", h)), 400, ("4 bytes after",)),
    "binary_size_vs_shape": (lambda c: binary_header({"name": "volume", "datatype": "FP32", "shape": [4, 24, 24, 24], "parameters": {"binary_data_size": 8}},
                                                     b"\x00" * 8), 400, ("binary_data_size is 8",)),
    "binary_unsupported_datatype": (lambda c: binary_header({"name": "volume", "datatype": "INT32", "shape": [2], "parameters": {"binary_data_size": 8}},
                                                            b"\x00" * 8), 400, ("FP32", "BYTES", "INT32")),
    "binary_bytes_bad_prefix": (lambda c: binary_header({"name": "t1n", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}},
                                                        struct.pack("<I", 1000) + b"ab"), 400, ("declares 1000 bytes",)),
    "binary_data_and_size": (lambda c: binary_header({"name": "volume", "datatype": "FP32", "shape": [1], "data": [1.0], "parameters": {"binary_data_size": 4}},
                                                     b"\x00" * 4), 400, ("both 'data' and binary_data_size",)),
    # FP32 volume
    "fp32_negative_shape": (lambda c: fp32_json([4, 24, 24, -24], [1.0]), 400, ("every size must be > 0",)),
    "fp32_absurd_shape": (lambda c: fp32_json([4, 10**6, 10**6, 10**6], [1.0]), 400, ("1000000×1000000×1000000", "1000000000000000000 voxels", f"limit of {MAX_VOXELS}")),
    "fp32_wrong_channel_count": (lambda c: fp32_req(c, images=c["images"][:3]), 400, ("C = 3", "4 channels")),
    "fp32_three_axes": (lambda c: fp32_json([4, 8, 8], [1.0] * 256), 400, ("[C, Z, Y, X]",)),
    "fp32_count_mismatch": (lambda c: fp32_json([4, 4, 4, 4], [1.0]), 400, ("declares 256 values", "holds 1")),
    "fp32_not_numbers": (lambda c: fp32_json([4, 4, 4, 4], ["a"] * 256), 400, ("not a (nested) list of numbers",)),
    "fp32_missing_affine": (lambda c: fp32_json([4, 2, 2, 2], [1.0] * 32, params={}), 400, ("needs the parameter 'affine'",)),
    "fp32_singular_affine": (lambda c: fp32_req(c, affine=np.diag([0.0, 2, 2, 1])), 400, ("singular",)),
    "fp32_spacing_disagrees": (lambda c: fp32_req(c, spacing=[1, 2, 2]), 400, ("disagrees",)),
    "fp32_unicode_garbage_params": (lambda c: fp32_json([4, 2, 2, 2], [1.0] * 32, params={"affine": "ℵ∞\u0000\u202e garbage", "spacing": "\ud7ff"}),
                                    400, ("affine", "not a list of numbers")),
    "fp32_huge_number_in_affine": (lambda c: fp32_json([4, 2, 2, 2], [1.0] * 32, params={"affine": "[" + "9" * 400 + ",0,0,0,0,1,0,0,0,0,1,0,0,0,0,1]"}),
                                   400, ("too large for a float",)),
    "fp32_nan_voxels": (_nan_json, 400, ("NaN",)),
    "fp32_wrong_name": (lambda c: fp32_json([4, 2, 2, 2], [1.0] * 32, name="image"), 400, ("must be named 'volume'",)),
    "fp32_mixed_with_bytes": (lambda c: as_json({"inputs": v2_body(c["files"])["inputs"] + json.loads(fp32_json([4, 2, 2, 2], [1.0] * 32)["content"])["inputs"]}),
                              400, ("volume", "expected BYTES")),
    "fp32_bad_channels_param": (lambda c: fp32_req(c, channels=["t1n", "t1n", "t2w", "t2f"]), 400, ("channels",)),
    # routes
    "get_on_infer": (lambda c: {"method": "GET"}, 405, ("Method Not Allowed",)),
    "unknown_model": (lambda c: {"path": "/v2/models/nope/infer", **as_json(v2_body(c["files"]))}, 404, ("nope", "does not exist")),
    "very_long_model_name": (lambda c: {"path": f"/v2/models/{'m' * 4000}/infer", **as_json(v2_body(c["files"]))}, 404, ("does not exist",)),
    "versioned_route": (lambda c: {"path": f"/v2/models/{NAME}/versions/1/infer", **as_json(v2_body(c["files"]))}, 404,
                        ("version 1 is not served here", "serving: version local")),
    "versioned_route_served": (lambda c: {"path": f"/v2/models/{NAME}/versions/local/infer", **as_json(v2_body(c["files"]))}, 200, ()),
    "explain_route": (lambda c: {"path": f"/v1/models/{NAME}:explain", **as_json({"instances": []})}, 404, ("explanations",)),
    "load_unknown_model": (lambda c: {"path": "/v2/repository/models/nope/load"}, 403, ("repository", "disabled")),
    "load_served_model": (lambda c: {"path": f"/v2/repository/models/{NAME}/load"}, 403, ("repository", "disabled")),
    "unload_served_model": (lambda c: {"path": f"/v2/repository/models/{NAME}/unload"}, 403, ("repository", "disabled")),
    # V1
    "v1_not_object": (lambda c: {"path": V1, **as_json([1])}, 400, ("expected an object",)),
    "v1_two_instances": (lambda c: {"path": V1, **as_json({"instances": [{}, {}]})}, 400, ("exactly one case",)),
    "v1_missing_channel": (lambda c: {"path": V1, **as_json({"instances": [{"t1n": base64.b64encode(c["files"]["t1n"]).decode()}]})}, 400, ("missing channel",)),
    "v1_text_plain": (lambda c: {"path": V1, "content": b"zz", "headers": {"content-type": "text/plain"}}, 415, ("text/plain",)),
    "v1_not_json": (lambda c: {"path": V1, "content": b"{zz", "headers": {"content-type": "application/json"}}, 400, ("Unrecognized request format",)),
}


FUZZ_KINDS = sorted(KINDS)


def good_request(url: str, ctx: dict[str, Any]) -> httpx.Response:
    body, headers = fp32(ctx)
    return httpx.post(f"{url}{V2}", content=body, headers=headers, timeout=60)


def test_at_least_30_fuzz_kinds():
    assert len([k for k, (_, status, _) in KINDS.items() if status >= 400]) >= 30


@pytest.mark.parametrize("kind", FUZZ_KINDS)
def test_fuzz(served, ctx, kind):
    url = served[0]
    build, status, words = KINDS[kind]
    request = build(ctx)
    method = request.pop("method", "POST")
    path = request.pop("path", V2)
    response = httpx.request(method, f"{url}{path}", timeout=60, **request)
    assert response.status_code == status, f"{kind}: {response.status_code} {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json")
    if status >= 400:
        message = response.json()["error"]
        assert isinstance(message, str) and message
        for word in words:
            assert word in message, f"{kind}: {word!r} not in {message!r}"
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert good_request(url, ctx).status_code == 200


# --------------------------------------------------------------------------- good inputs over HTTP
def test_fp32_binary_json_files_and_v1_agree(served, ctx, tmp_path):
    """A non-cubic anisotropic case: the FP32 volume [C,Z,Y,X] (binary and JSON), the NIfTI files (V2) and V1 give the same answer."""
    url = served[0]
    paths, _ = write_case(tmp_path / "aniso", shape=(14, 18, 22))
    affine = np.array([[0, 0, 2.5, -10], [2.0, 0, 0, 5], [0, 2.2, 0, 1], [0, 0, 0, 1]])  # permuted, anisotropic axes
    arrays = [load_nifti(p)[0] for p in paths]
    files = {c: nifti_to_bytes(a, affine) for c, a in zip(CHANNELS, arrays)}
    images = np.stack(arrays)
    by_files = httpx.post(f"{url}{V2}", **as_json(v2_body(files)), timeout=60)
    assert by_files.status_code == 200, by_files.text
    reference = client.parse_response(by_files.json())
    seg, seg_affine, _ = load_nifti_bytes(reference["segmentation_bytes"], dtype=np.uint8)
    assert seg.shape == (14, 18, 22) and np.allclose(seg_affine, affine, atol=1e-4)
    for binary in (True, False):
        answer = client.infer_volume(url, NAME, images, affine, spacing=[2.0, 2.2, 2.5], binary=binary, timeout=60)
        other, other_affine, _ = load_nifti_bytes(answer["segmentation_bytes"], dtype=np.uint8)
        assert other.shape == seg.shape and np.array_equal(other, seg) and np.allclose(other_affine, affine, atol=1e-4)
        assert answer["volumes_ml"] == pytest.approx(reference["volumes_ml"])
    v1 = httpx.post(f"{url}{V1}", json={"instances": [{c: base64.b64encode(b).decode() for c, b in files.items()}]}, timeout=60)
    assert v1.status_code == 200, v1.text
    body = v1.json()
    assert body["model_version"] == "local" and body["model_name"] == NAME and v1.headers["x-model-version"] == "local"
    v1_seg, _, _ = load_nifti_bytes(base64.b64decode(body["predictions"][0]["segmentation"]), dtype=np.uint8)
    assert np.array_equal(v1_seg, seg) and body["predictions"][0]["volumes_ml"] == pytest.approx(reference["volumes_ml"])
    v1_b64 = httpx.post(f"{url}{V1}", json={"instances": [{c: {"b64": base64.b64encode(b).decode()} for c, b in files.items()}]}, timeout=60)
    assert v1_b64.status_code == 200, v1_b64.text


def test_binary_bytes_inputs_are_raw_nifti_files(served, ctx):
    """BYTES channel inputs through the binary extension carry the file bytes themselves (no base64)."""
    url = served[0]
    tensors, payload = [], b""
    for name, data in ctx["files"].items():
        element = struct.pack("<I", len(data)) + data
        tensors.append({"name": name, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(element)}})
        payload += element
    head = json.dumps({"id": "bin", "inputs": tensors}).encode()
    response = httpx.post(f"{url}{V2}", content=head + payload, timeout=60,
                          headers={"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "bin" and response.headers["x-model-version"] == "local"


def test_unknown_request_parameters_are_ignored(served, ctx):
    """Documented: parameters the model does not read (any value) do not fail a request."""
    body = v2_body(ctx["files"])
    body["parameters"] = {"note": "ℵ∞\u202e\u0000", "n": 1e308, "flag": True}
    response = httpx.post(f"{served[0]}{V2}", **as_json(body), timeout=60)
    assert response.status_code == 200, response.text


def _stalled_upload(port: int, length: int = 1000) -> socket.socket:
    """A request whose body never finishes arriving: it holds an admission slot until it times out or disconnects."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {V2} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{".encode())
    return sock


def _admitted(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("medseg_admitted_requests "):
            return float(line.split()[1])
    return -1.0


def _wait_admitted(url: str, value: float, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while _admitted(url) != value:
        assert time.monotonic() < deadline, f"admitted requests stay {_admitted(url)}, expected {value}"
        time.sleep(0.05)


def test_overload_answers_503_with_retry_after(served, ctx):
    url, port, _ = served
    socks = [_stalled_upload(port) for _ in range(2)]  # --max-concurrent 1 + --max-queue 1
    try:
        _wait_admitted(url, 2)
        response = good_request(url, ctx)
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert "busy" in response.json()["error"] and "--max-queue 1" in response.json()["error"]
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200  # health is never queued
    finally:
        for s in socks:
            s.close()
    _wait_admitted(url, 0)
    assert good_request(url, ctx).status_code == 200
    assert f'medseg_rejected_requests_total{{model="{NAME}",reason="overloaded"}}' in httpx.get(f"{url}/metrics").text


def test_timeout_answers_504_and_frees_the_slot(served, ctx):
    url, port, _ = served
    sock = _stalled_upload(port)
    try:
        sock.settimeout(TIMEOUT_S + 20)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), answer[:300]
    assert f"within {TIMEOUT_S} s" in json.loads(body)["error"]
    _wait_admitted(url, 0)
    assert good_request(url, ctx).status_code == 200


def test_metrics_drift_and_stages(served, ctx):
    url = served[0]
    assert client.infer(url, NAME, ctx["paths"], timeout=60)["model_version"] == "local"
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for stage in ("preprocess", "queue", "predict", "postprocess"):
        assert f'medseg_stage_seconds_count{{model="{NAME}",stage="{stage}"}}' in text
    assert f'medseg_model_info{{backend="torch",configuration="3d_fullres",drift_reference="voxel_foreground",model="{NAME}",version="local"}} 1.0' in text
    for i, channel in enumerate(CHANNELS):
        image = ctx["images"][i]
        expected = abs(image[image != 0].mean() - TRAIN_STATS[channel]["mean"]) / TRAIN_STATS[channel]["std"]
        line = next(x for x in text.splitlines() if x.startswith(f'medseg_input_drift_last_zscore{{channel="{channel}",model="{NAME}"}}'))
        assert float(line.split()[-1]) == pytest.approx(expected, rel=1e-4)
        assert f'medseg_input_drift_zscore_bucket{{channel="{channel}",le="+Inf",model="{NAME}"}}' in text


def test_server_log_has_no_tracebacks_for_client_mistakes(served, ctx):
    url, _, log_file = served
    httpx.post(f"{url}{V2}", **with_t1c(ctx, "%%"), timeout=30)
    assert "Traceback" not in log_file.read_text()


# --------------------------------------------------------------------------- in process: limits, guard, drift
def test_limits_resolve_from_options_env_and_defaults():
    from medseg.serving.limits import ServeLimits

    limits = ServeLimits.resolve(env={"MEDSEG_SERVE_MAX_QUEUE": "7", "MEDSEG_SERVE_TIMEOUT_S": "12.5"}, max_queue=2)
    assert limits.max_queue == 2 and limits.timeout_s == 12.5 and limits.max_voxels == 2**25 and limits.capacity == 3
    assert ServeLimits.resolve(env={"MEDSEG_SERVE_MAX_REQUEST_MB": "0.5"}).max_request_bytes == 2**19
    with pytest.raises(MedsegError, match="MEDSEG_SERVE_MAX_VOXELS"):
        ServeLimits.resolve(env={"MEDSEG_SERVE_MAX_VOXELS": "lots"})
    with pytest.raises(MedsegError, match="max_concurrent must be >= 1"):
        ServeLimits(max_concurrent=0)


def _guarded(app: Any, **limits: Any) -> Any:
    from medseg.serving.guard import ServingGuard
    from medseg.serving.limits import ServeLimits

    return ServingGuard(app, ServeLimits(**limits), known_models=lambda: {NAME})


def test_guard_timeout_keeps_the_slot_until_the_worker_thread_ends():
    """504 at the timeout; the admission slot stays taken while the abandoned thread still runs (memory bound)."""
    from medseg.serving.limits import run_in_worker

    done = threading.Event()

    def work() -> None:
        time.sleep(1.0)
        done.set()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await receive()
        await run_in_worker(work)

    guard = _guarded(app, timeout_s=0.2, max_queue=0)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t") as c:
            response = await c.post(V2, json={"inputs": []})
            assert response.status_code == 504 and "within 0.2 s" in response.json()["error"]
            assert guard.gate.admitted == 1 and not done.is_set()  # the thread still holds the slot
            busy = await c.post(V2, json={"inputs": []})
            assert busy.status_code == 503 and busy.headers["retry-after"]
            await asyncio.to_thread(done.wait, 5)
            for _ in range(100):
                if guard.gate.admitted == 0:
                    break
                await asyncio.sleep(0.01)
            assert guard.gate.admitted == 0

    asyncio.run(scenario())


def test_ticket_released_once_after_http_side_and_threads():
    """A worker that had not started when its request was given up does not run; the slot is freed exactly once."""
    from medseg.serving.limits import Gate

    gate = Gate(2)
    ticket = gate.try_admit()
    assert gate.admitted == 1 and ticket.enter()  # a worker thread starts
    ticket.finish(abandoned=True)  # 504 sent: the HTTP side lets go
    assert gate.admitted == 1  # the running worker still holds the slot
    assert not ticket.enter()  # a worker queued behind it skips its work
    ticket.leave()
    assert gate.admitted == 0
    assert not ticket.enter() and gate.admitted == 0  # closed for good: no double release
    second = gate.try_admit()
    second.finish()
    assert gate.admitted == 0 and 1 <= gate.retry_after_s() <= 5


def test_rewrite_binary_request_views_the_body_without_copying():
    from medseg.serving.guard import rewrite_binary_request
    from medseg.serving.limits import Gate

    volume = np.arange(2 * 3 * 4 * 5, dtype="<f4").reshape(2, 3, 4, 5)
    head = json.dumps({"inputs": [{"name": "volume", "datatype": "FP32", "shape": [2, 3, 4, 5],
                                   "parameters": {"binary_data_size": volume.nbytes, "affine": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}}],
                       "parameters": {"spacing": [1, 1, 1]}}).encode()
    body = head + volume.tobytes()
    ticket = Gate(1).try_admit()
    rewritten = json.loads(rewrite_binary_request(body, str(len(head)), ticket))
    array = ticket.binary["volume"]
    assert np.array_equal(array, volume) and not array.flags.owndata and not array.flags.writeable
    assert rewritten["inputs"][0]["data"] == [] and "binary_data_size" not in rewritten["inputs"][0]["parameters"]
    assert json.loads(rewritten["inputs"][0]["parameters"]["affine"])[3] == [0, 0, 0, 1]  # lists become JSON text
    assert rewritten["parameters"]["spacing"] == "[1, 1, 1]"


def test_drift_reference_sources(tmp_path, caplog):
    import logging

    from medseg.serving.drift import DRIFT_REFERENCE_JSON, drift_zscores, load_drift_reference, write_drift_reference

    pkg = make_model_package(tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="medseg.serving.drift"):
        assert load_drift_reference(pkg, CHANNELS) is None  # the factory's plans hold placeholders only
    assert "input drift disabled" in caplog.text
    write_fingerprint(pkg)
    ref = load_drift_reference(pkg, CHANNELS)
    assert ref is not None and ref.statistic == "voxel_foreground" and ref.channels["t1c"] == (110.0, 20.0)
    cases = [np.full((4, 3, 3, 3), v, np.float32) for v in (90.0, 110.0)]
    for c in cases:
        c[:, 0] = 0  # background voxels do not count
    write_drift_reference(pkg, cases, CHANNELS)
    ref = load_drift_reference(pkg, CHANNELS)
    assert ref.statistic == "case_mean_nonzero" and ref.source == DRIFT_REFERENCE_JSON and ref.channels["t1n"] == (100.0, 10.0)
    assert drift_zscores(np.full((4, 2, 2, 2), 130.0, np.float32), CHANNELS, ref) == {c: pytest.approx(3.0) for c in CHANNELS}
    assert drift_zscores(np.zeros((4, 2, 2, 2), np.float32), CHANNELS, ref) == {}  # no foreground: nothing observed


# --------------------------------------------------------------------------- hot reload on a real registry
@pytest.fixture(scope="module")
def registry(package, tmp_path_factory):
    """A SQLite MLflow registry with two versions of ``tiny-brats`` (alias champion → 1); MLFLOW_TRACKING_URI set for the module."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tmp = tmp_path_factory.mktemp("reload-registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    saved_uris = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    tracking_utils._tracking_uri, registry_utils._registry_uri = None, None

    class Wrapper(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    experiment = mlflow.MlflowClient().create_experiment("reload-test", artifact_location=(tmp / "artifacts").as_uri())
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(name="model", python_model=Wrapper(), artifacts={"model_package": str(package)},
                                    registered_model_name="tiny-brats", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("tiny-brats", "champion", 1)
    yield {"uri": uri, "tmp": tmp, "client": mlflow.MlflowClient()}
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved_uris
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_repository_load_reloads_a_moved_alias_in_process(registry):
    """``POST /v2/repository/models/NAME/load`` → the repository's load(): the new version is loaded and swapped;
    requests that read the old bundle keep it; after an unload, load registers the model again."""
    from medseg.serving.reload import make_repository
    from medseg.serving.model import SegmentationModel

    model = SegmentationModel("reg", "models:/tiny-brats@champion", device="cpu", download_dir=registry["tmp"] / "dl")
    repo = make_repository()
    assert model.load() and model.model_version == "1" and model.poller is None  # in-process default: no polling
    repo.update(model)
    old = model.served
    assert asyncio.run(repo.load("reg")) and model.served is old  # alias unchanged: nothing reloaded
    registry["client"].set_registered_model_alias("tiny-brats", "champion", 2)
    try:
        assert asyncio.run(repo.load("reg"))
        assert model.model_version == "2" and model.served is not old and old.version == "1"
        assert not old.download_root.exists() and model.served.download_root.exists()  # old files removed, weights stay in memory
        repo.unload("reg")
        assert repo.get_model("reg") is None
        assert asyncio.run(repo.load("reg")) and repo.get_model("reg") is model and model.ready
    finally:
        registry["client"].set_registered_model_alias("tiny-brats", "champion", 1)


@pytest.mark.slow  # a second server on an MLflow registry: ~20 s on 2 shared cores
def test_alias_move_hot_reloads_without_dropping_requests(registry, ctx, tmp_path):
    """Serve models:/tiny-brats@champion polling every 1 s; move the alias while requests loop: every request
    succeeds, answers switch from version 1 to 2 once and for all; the repository load endpoint reloads too."""
    port = server.free_port()
    url = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "server.log"
    proc = server.start_server_process("models:/tiny-brats@champion", NAME, port, log_file=log_file,
                                       env={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": registry["uri"], "TMPDIR": str(tmp_path)},
                                       extra_args=["--reload-interval", "1", "--max-queue", "8"])
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                body, headers = fp32(ctx)
                try:
                    r = c.post(f"{url}{V2}", content=body, headers=headers)
                    results.append((r.status_code, r.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    results.append((0, repr(exc)))

    try:
        server.wait_until_ready(url, NAME, timeout_s=90, proc=proc)
        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while len(results) < 3:
                assert time.monotonic() < deadline, "no answers"
                time.sleep(0.05)
            registry["client"].set_registered_model_alias("tiny-brats", "champion", 2)
            while not results or results[-1][1] != "2":
                assert time.monotonic() < deadline + 30, f"still version {results[-1:]} long after the alias moved"
                time.sleep(0.1)
            n = len(results)
            while len(results) < n + 3:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(60)
        assert all(status == 200 for status, _ in results), results
        versions = [v for _, v in results]
        assert versions[0] == "1" and versions[-1] == "2" and versions == sorted(versions), versions  # 1…1 then 2…2
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert f'medseg_model_reloads_total{{model="{NAME}",outcome="swapped"}} 1.0' in text
        assert 'version="2"' in next(x for x in text.splitlines() if x.startswith("medseg_model_info{"))
        # the repository endpoint cannot force a version: only the alias moves what is served
        refused = httpx.post(f"{url}/v2/repository/models/{NAME}/load", timeout=60)
        assert refused.status_code == 403 and "disabled" in refused.json()["error"]
    finally:
        registry["client"].set_registered_model_alias("tiny-brats", "champion", 1)
        server.stop_server(proc)
    assert "Traceback" not in log_file.read_text()
