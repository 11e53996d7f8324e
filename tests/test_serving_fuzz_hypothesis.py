"""Property-based fuzzing of the serving contract: generated requests against one real KServe model server.

Hypothesis strategies generate, systematically rather than by hand-picked kinds (those are in
tests/test_serving_robustness.py):

- NIfTI files with header fields rewritten (dim, pixdim, datatype/bitpix, qform/sform codes and matrices,
  quaternions, vox_offset, scl_slope/scl_inter, magic, sizeof_hdr), optionally truncated and/or gzipped, in one
  channel or all;
- FP32 ``volume`` tensors: shapes, datatypes, data of every JSON kind, affine/spacing/channels parameters, JSON or
  the binary extension;
- arbitrary JSON structure in the V2 body, the inputs and their fields; the V1 route;
- binary-extension bodies with inconsistent header lengths, sizes and tails; Content-Types.

Every request must answer 200 or a 4xx with a JSON ``{"error": "<text>"}`` body (never a 5xx: the server is never
overloaded here, requests go one at a time), and the server must be healthy and answer a good request after.
Derandomized (a fixed seed per test, no example database), so CI runs the same examples every time;
``MEDSEG_FUZZ_EXAMPLES`` sets the examples per strategy (default 500: 2000 in all, ~2-3 minutes on 2 cores).
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import string
import struct
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medseg.errors import MedsegError  # noqa: E402
from medseg.serving import client, server  # noqa: E402
from medseg.task import BRATS2023  # noqa: E402
from tests.factories import make_model_package  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "brats"
CHANNELS = list(BRATS2023.channels)
EXAMPLES = int(os.environ.get("MEDSEG_FUZZ_EXAMPLES", "500"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
V2 = f"/v2/models/{NAME}/infer"
V1 = f"/v1/models/{NAME}:predict"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (8, 8, 8)  # at the model's 2 mm: bigger than the network's minimum (4³), small enough to predict fast
COUNTS: dict[str, int] = {}
STATUSES: dict[str, dict[int, int]] = {}  # kind → status → count
MESSAGES: dict[str, set[str]] = {}  # kind → distinct error messages (their first 60 characters)


class Served(dict):
    """The fixture's values; a short repr, since Hypothesis prints the arguments of a failing example."""

    def __repr__(self) -> str:
        return f"<server {self.get('url')}>"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Any:
    folder = tmp_path_factory.mktemp("hypothesis")
    package = make_model_package(folder / "model")
    port = server.free_port()
    log_file = folder / "server.log"
    proc = server.start_server_process(package, NAME, port, log_file=log_file, env={"OMP_NUM_THREADS": "1"},
                                       extra_args=["--reload-interval", "0", "--max-request-mb", "2", "--max-voxels", "40000",
                                                   "--max-concurrent", "1", "--max-queue", "4", "--timeout", "30"])
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until_ready(url, NAME, timeout_s=90, proc=proc)
    except MedsegError:
        server.stop_server(proc)
        pytest.fail(f"model server did not start:\n{log_file.read_text()[-3000:]}")
    rng = np.random.default_rng(0)
    base = {c: nib.Nifti1Image((rng.random(SHAPE) * 100 + 1).astype(np.float32), AFFINE).to_bytes() for c in CHANNELS}
    with httpx.Client(base_url=url, timeout=60) as http:
        yield Served(url=url, http=http, base=base, proc=proc, log=log_file)
    server.stop_server(proc)


def check(served: dict[str, Any], kind: str, path: str, content: bytes, headers: dict[str, str]) -> None:
    """One request: 200, or a 4xx with a JSON error message; never a 5xx."""
    response = served["http"].post(path, content=content, headers=headers)
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    by_status = STATUSES.setdefault(kind, {})
    by_status[response.status_code] = by_status.get(response.status_code, 0) + 1
    assert response.status_code < 500, f"{kind}: {response.status_code} {response.text[:500]}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    if response.status_code >= 400:
        error = response.json().get("error")
        assert isinstance(error, str) and error.strip(), response.text[:300]
        MESSAGES.setdefault(kind, set()).add(error[:60])
    else:
        assert response.status_code == 200, response.text[:300]


def v2_files(files: dict[str, bytes]) -> bytes:
    return json.dumps({"inputs": [{"name": n, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b).decode()]}
                                  for n, b in files.items()]}).encode()


JSON = {"content-type": "application/json"}

# --------------------------------------------------------------------------- NIfTI header fields
f32 = st.floats(width=32)  # NaN and ±Inf included
small_f32 = st.one_of(f32, st.sampled_from([0.0, -0.0, 1.0, 2.0, -2.0, 1e-30, 1e30]))
int16 = st.integers(-32768, 32767)
codes = st.one_of(st.integers(-2, 5), int16)
REAL = [(2, 8), (4, 16), (8, 32), (16, 32), (64, 64), (256, 8), (512, 16), (768, 32), (1024, 64), (1280, 64)]
OTHER = [(0, 0), (1, 1), (32, 64), (128, 24), (1536, 128), (1792, 128), (2048, 256), (2304, 32)]

# (offset, struct format, strategy of the values)
HEADER_FIELDS = {
    "sizeof_hdr": (0, "i", st.tuples(st.sampled_from([348, 540, 0, -1, 1 << 30, 0x5C010000]))),
    "dim": (40, "8h", st.tuples(st.integers(-2, 9), *[st.one_of(st.integers(-3, 40), int16)] * 7)),
    "datatype_bitpix": (70, "hh", st.one_of(st.sampled_from(REAL + OTHER), st.tuples(int16, int16))),
    "pixdim": (76, "8f", st.tuples(*[small_f32] * 8)),
    "vox_offset": (108, "f", st.tuples(st.one_of(f32, st.sampled_from([0.0, 348.0, 352.0, 353.0, 1e9, -352.0])))),
    "scl": (112, "ff", st.tuples(small_f32, small_f32)),
    "codes": (252, "hh", st.tuples(codes, codes)),
    "quatern": (256, "6f", st.tuples(*[small_f32] * 6)),
    "srow": (280, "12f", st.tuples(*[small_f32] * 12)),
    "magic": (344, "4s", st.tuples(st.one_of(st.sampled_from([b"n+1\x00", b"ni1\x00", b"n+2\x00"]), st.binary(min_size=4, max_size=4)))),
}
header_edit = st.sampled_from(sorted(HEADER_FIELDS)).flatmap(lambda f: st.tuples(st.just(f), HEADER_FIELDS[f][2]))


def edited(raw: bytes, edits: list[tuple[str, tuple]]) -> bytes:
    out = bytearray(raw)
    for name, values in edits:
        offset, fmt, _ = HEADER_FIELDS[name]
        struct.pack_into("<" + fmt, out, offset, *values)
    return bytes(out)


@SETTINGS
@given(edits=st.lists(header_edit, min_size=1, max_size=4), cut=st.one_of(st.none(), st.integers(0, 2500)), gz=st.booleans(),
       all_channels=st.booleans(), v1=st.booleans())
def test_nifti_headers(served, edits, cut, gz, all_channels, v1):
    data = edited(served["base"]["t1c"], edits)
    if cut is not None:
        data = data[:cut]
    if gz:
        data = gzip.compress(data, compresslevel=1)
    files = {c: (data if all_channels or c == "t1c" else b) for c, b in served["base"].items()}
    if v1:
        check(served, "nifti_header", V1, json.dumps({"instances": [{c: base64.b64encode(b).decode() for c, b in files.items()}]}).encode(), JSON)
    else:
        check(served, "nifti_header", V2, v2_files(files), JSON)


# --------------------------------------------------------------------------- FP32 volume tensors
DATATYPES = ["FP32", "FP64", "FP16", "BOOL", "INT8", "INT32", "UINT8", "BYTES", "BF16", "COMPLEX64", "", "fp32"]
numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.booleans())
json_leaf = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**70), 2**70), st.text(max_size=20))
shapes = st.one_of(st.lists(st.one_of(st.integers(-2, 12), st.integers(-(2**40), 2**40)), max_size=6),
                   st.just([4, 8, 8, 8]), st.just([4, 4, 4, 4]), st.lists(json_leaf, max_size=4))
affines = st.one_of(st.lists(small_f32, min_size=0, max_size=20).map(lambda v: " ".join(repr(float(x)) for x in v)),
                    st.lists(numbers, max_size=20).map(json.dumps), st.text(max_size=40), st.just("2 0 0 0 0 2 0 0 0 0 2 0 0 0 0 1"),
                    st.lists(small_f32, min_size=9, max_size=9).map(lambda v: " ".join(repr(float(x)) for x in v[:3]) + " 0 "
                                                                   + " ".join(repr(float(x)) for x in v[3:6]) + " 0 "
                                                                   + " ".join(repr(float(x)) for x in v[6:]) + " 0"))


def _fill(shape: list[Any], value: Any) -> list[Any]:
    count = 1
    for s in shape:
        count *= s if isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 16 else 1
    return [value] * min(count, 10_000)


VALID_VOLUME: dict[str, Any] = {"name": "volume", "datatype": "FP32", "shape": [4, 8, 8, 8], "data": "fill", "value": 5.0,
                                 "affine": "2 0 0 0 0 2 0 0 0 0 2 0 0 0 0 1", "spacing": None, "channels": None}
WILD_VOLUME = {
    "name": st.sampled_from(["t1n", "image", "x", "VOLUME", ""]),
    "datatype": st.sampled_from(DATATYPES),
    "shape": shapes,
    "data": st.sampled_from(["random", "nested", "none", "short", "long"]),
    "value": numbers,
    "affine": affines,
    "spacing": st.one_of(st.lists(small_f32, max_size=4).map(lambda v: ",".join(repr(float(x)) for x in v)), st.text(max_size=10),
                         st.just("2,2,2"), st.just("[2, 2, 2.1]")),
    "channels": st.one_of(st.permutations(CHANNELS).map(",".join), st.text(max_size=20)),
}


@SETTINGS
@given(mutate=st.sets(st.sampled_from(sorted(WILD_VOLUME)), min_size=1, max_size=3),  # ≥ 1: a valid request costs a prediction
       data=st.data(), random_data=st.lists(json_leaf, max_size=40),
       binary=st.booleans())
def test_fp32_volumes(served, mutate, data, random_data, binary):
    """A valid FP32 volume request with one to three of its fields replaced by generated values."""
    f = {k: (data.draw(WILD_VOLUME[k], label=k) if k in mutate else v) for k, v in VALID_VOLUME.items()}
    params: dict[str, Any] = {"affine": f["affine"]}
    if f["spacing"] is not None:
        params["spacing"] = f["spacing"]
    if f["channels"] is not None:
        params["channels"] = f["channels"]
    shape = f["shape"]
    fill = _fill(shape, f["value"])
    values: Any = {"fill": fill, "random": random_data, "nested": [[random_data]], "none": None, "short": fill[:-1], "long": fill + fill[:1]}[f["data"]]
    valid_shape = isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 16 for s in shape)
    if binary and valid_shape and f["datatype"] in ("FP32", "BOOL", "INT8", "FP64"):
        itemsize = {"FP32": 4, "BOOL": 1, "INT8": 1, "FP64": 8}[f["datatype"]]
        count = int(np.prod(shape)) if shape else 1
        value = f["value"] if isinstance(f["value"], float) else 1.0
        with np.errstate(over="ignore"):  # a huge value becomes inf on purpose: the server must refuse it
            payload = np.full(count, value, np.float32).tobytes()[: count * itemsize] if count else b""
        if f["data"] == "short":
            payload = payload[:-1]
        head = json.dumps({"inputs": [{"name": f["name"], "datatype": f["datatype"], "shape": shape,
                                       "parameters": {**params, "binary_data_size": len(payload)}}]}).encode()
        check(served, "fp32_volume", V2, head + payload, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))})
        return
    body = {"inputs": [{"name": f["name"], "datatype": f["datatype"], "shape": shape, "data": values, "parameters": params}]}
    check(served, "fp32_volume", V2, json.dumps(body, allow_nan=True).encode(), JSON)


# --------------------------------------------------------------------------- JSON structure
json_values = st.recursive(json_leaf, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
                           max_leaves=20)
input_dicts = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from([*CHANNELS, "volume", "image", "age"]), json_values),
    "datatype": st.one_of(st.sampled_from(DATATYPES), json_values),
    "shape": st.one_of(st.lists(st.integers(-3, 5), max_size=4), json_values),
    "data": json_values,
    "parameters": st.one_of(st.dictionaries(st.sampled_from(["affine", "spacing", "channels", "binary_data_size", "x"]), json_values, max_size=3),
                            json_values),
})
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": st.one_of(st.lists(st.one_of(input_dicts, json_values), max_size=5), json_values)},
                          optional={"id": json_values, "parameters": json_values, "outputs": json_values}),
    st.fixed_dictionaries({"instances": st.one_of(st.lists(st.dictionaries(st.sampled_from([*CHANNELS, "age", "x"]), json_values, max_size=5),
                                                           max_size=3), json_values)}),
)
CONTENT_TYPES = ["application/json", None, "application/json; charset=utf-8", "text/plain", "application/octet-stream", "application/x+json", ""]


@SETTINGS
@given(body=bodies, route=st.sampled_from([V2, V2, V1]), content_type=st.sampled_from(CONTENT_TYPES), mangle=st.sampled_from(["none", "none", "cut", "prefix"]))
def test_json_structure(served, body, route, content_type, mangle):
    content = json.dumps(body, allow_nan=True).encode()
    if mangle == "cut":
        content = content[: len(content) // 2]
    elif mangle == "prefix":
        content = b"\xef\xbb\xbf" + content  # a UTF-8 byte order mark
    headers = {} if content_type is None else {"content-type": content_type}
    check(served, "json_structure", route, content, headers)


# --------------------------------------------------------------------------- binary extension framing
@SETTINGS
@given(inputs=st.lists(input_dicts, min_size=0, max_size=3), sizes=st.lists(st.one_of(st.integers(-5, 600), json_values), max_size=3),
       tail=st.binary(max_size=600), length_delta=st.one_of(st.just(0), st.integers(-50, 50)), length_text=st.one_of(st.none(), st.text(string.ascii_letters + string.digits + "-+.", min_size=1, max_size=8)),
       real_file=st.booleans())
def test_binary_extension(served, inputs, sizes, tail, length_delta, length_text, real_file):
    inputs = [dict(i) for i in inputs]
    for i, size in zip(inputs, sizes):
        params = i.get("parameters") if isinstance(i.get("parameters"), dict) else {}
        i["parameters"] = {**params, "binary_data_size": size}
    if real_file:  # a well-framed BYTES channel among the generated ones
        raw = served["base"]["t1n"]
        inputs.append({"name": "t1n", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(raw) + 4}})
        tail = struct.pack("<I", len(raw)) + raw + tail
    head = json.dumps({"inputs": inputs}, allow_nan=True).encode()
    length = length_text if length_text is not None else str(len(head) + length_delta)
    check(served, "binary_extension", V2, head + tail, {"content-type": "application/octet-stream", "inference-header-content-length": length})


# --------------------------------------------------------------------------- afterwards
def test_server_healthy_after_fuzzing(served):
    """Runs last in this module: the server answers health and a good request, and logged no traceback."""
    http = served["http"]
    assert served["proc"].poll() is None
    assert http.get("/v2/health/ready").status_code == 200
    body, headers = client.volume_request(np.stack([np.asanyarray(nib.Nifti1Image.from_bytes(b).dataobj) for b in served["base"].values()]),
                                          AFFINE, binary=True)
    assert http.post(V2, content=body, headers=headers).status_code == 200
    assert http.post(V2, content=v2_files(served["base"]), headers=JSON).status_code == 200
    total = sum(COUNTS.values())
    print(f"\nhypothesis fuzz: {total} requests, none 5xx; by status {STATUSES}; distinct error messages "
          f"{ {k: len(v) for k, v in MESSAGES.items()} }")
    assert total >= 4 * min(EXAMPLES, 50), COUNTS  # every strategy ran (Hypothesis may stop early when it has exhausted a space)
    # the strategies reach past the first checks: many different refusals, and answers too
    assert all(len(MESSAGES.get(k, ())) >= 10 for k in COUNTS), {k: sorted(v)[:20] for k, v in MESSAGES.items()}
    assert STATUSES["nifti_header"].get(200, 0) > 0 and STATUSES["fp32_volume"].get(200, 0) > 0, STATUSES
    assert "Traceback" not in served["log"].read_text()
