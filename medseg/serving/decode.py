"""From a request body to a case: ``C×I×J×K`` float32 images, affine, spacing; every client mistake is a
:class:`~medseg.errors.MedsegError` naming the input and the problem (the model turns it into a 400).

Accepted inputs (see the README's wire contract):

- **BYTES, one input per channel** named as the model's channels, each one element: the ``.nii`` or
  ``.nii.gz`` file, base64 text in JSON, or the raw file bytes through the binary tensor extension.
- **FP32, one input named ``volume``** of shape ``[C, Z, Y, X]``: ``volume[c, z, y, x]`` is channel ``c`` at
  NIfTI voxel ``(i, j, k) = (x, y, z)``, i.e. a nibabel array ``I×J×K`` sent as ``array.transpose(2, 1, 0)``.
  Parameters (on the input, else on the request): ``affine`` (required: the NIfTI voxel-to-world matrix for
  ``(i, j, k)``, 16 numbers row-major or 12 for the top three rows, in mm), ``spacing`` (optional: voxel size
  along ``(i, j, k)`` = ``(x, y, z)`` in mm; must match the affine's), ``channels`` (optional: the order of
  ``C``, comma separated; default the model's order). Values are strings (V2 parameters are scalars):
  ``"[1, 1, 1]"`` or ``"1,1,1"``.

- **BYTES, one input named ``image``** (2D slice-set models only): one PNG or TIFF picture whose colour channels
  are the model's channels (:mod:`medseg.serving.image2d`); the answer's mask comes back in the same format.
- **Covariates** (classifiers): a named numeric input of shape ``[1]`` (``age``, years), or the request parameter
  of the same name; required when the model takes it (:class:`InputSpec` ``covariates``), ignored otherwise.

Checked before heavy work: the voxel count (from the NIfTI header, before decompressing the data; from the
declared shape for FP32; from the picture's header) and the voxel count after resampling to the model's
spacing, both against ``max_voxels``; the NIfTI data type (real numbers only: no complex, RGB or 1-bit data)
and voxel sizes (``pixdim``, which nibabel would silently replace by 1 mm when zero) from the header.
After reading: the affine must be invertible, every spacing finite and > 0, and the volume resampled to the
model's spacing at least ``min_shape`` (the network's total downsampling: smaller, its coarsest feature map
would hold less than one voxel of the case).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from medseg.errors import MedsegError
from medseg.io import load_nifti_bytes, nifti_spacing, stack_channels
from medseg.preprocessing.resampling import shape_for_spacing
from medseg.serving.image2d import IMAGE_INPUT, Image2D, decode_image

VOLUME_INPUT = "volume"
#: Datatypes a covariate input may have (V2 JSON); the binary extension carries FP32 only.
NUMERIC_DATATYPES = ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
#: Plausible values of a covariate, by name (a subject's age in years).
COVARIATE_RANGES = {"age": (0.0, 150.0)}
NIFTI1_HEADER_BYTES = 348
GZIP_MAGIC = b"\x1f\x8b"
SPACING_RTOL = 1e-3
#: NIfTI-1 datatype codes of real numbers (nifti1.h): uint8, int16, int32, float32, float64, int8, uint16, uint32, int64, uint64.
REAL_NIFTI_DATATYPES = {2: "uint8", 4: "int16", 8: "int32", 16: "float32", 64: "float64", 256: "int8", 512: "uint16", 768: "uint32",
                        1024: "int64", 1280: "uint64"}
#: The other codes, named for the error message (an image of these is not one real value per voxel).
OTHER_NIFTI_DATATYPES = {0: "unknown", 1: "1-bit binary", 32: "complex64", 128: "RGB24", 1536: "float128", 1792: "complex128",
                         2048: "complex256", 2304: "RGBA32"}
#: |det| of the affine's 3×3 part below which it counts as singular (mm³ per voxel: 1e-9 is far below any scanner's).
SINGULAR_DET = 1e-9


@dataclass
class TensorIn:
    """One input tensor as received: ``data`` is a (nested) list, an ndarray (binary FP32) or a list of bytes (binary BYTES)."""

    name: str
    datatype: str
    shape: list[Any]
    data: Any
    parameters: dict[str, Any]


@dataclass
class Case:
    """A decoded request: images ``C×I×J×K`` float32 in the model's channel order, the 4×4 affine, the spacing in mm
    along (I, J, K), the NIfTI header to write the answer with (None for an FP32 volume or a picture), the
    covariates sent (name → value), and for one 2D picture what the answer's mask must look like."""

    images: np.ndarray
    affine: np.ndarray
    spacing: list[float]
    header: nib.Nifti1Header | None
    covariates: dict[str, float] = field(default_factory=dict)
    image2d: Image2D | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """What a model's endpoint takes: its image ``channels`` (in order), its ``covariates`` (name → required), and
    ``slice_axis`` when it also takes one 2D picture (input ``image``) of a slice-set task (else None)."""

    channels: tuple[str, ...]
    covariates: tuple[tuple[str, bool], ...] = ()
    slice_axis: int | None = None
    min_shape: tuple[int, ...] | None = None  # smallest volume (I, J, K) at the model's spacing; None: no minimum

    @property
    def takes_image(self) -> bool:
        return self.slice_axis is not None and IMAGE_INPUT not in self.channels

    @property
    def covariate_names(self) -> list[str]:
        return [name for name, _ in self.covariates]


@dataclass
class DecodedRequest:
    request_id: str
    protocol: str  # "v2" (answer an InferResponse) or "v1" (answer {"predictions": [...]})
    tensors: list[TensorIn]
    parameters: dict[str, Any]


# --------------------------------------------------------------------------- safe text
def printable(value: object, limit: int = 80) -> str:
    """``value`` as text safe to put in a JSON error message: no lone surrogates or control characters, at most ``limit`` characters."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _where(name: object) -> str:
    return f"input '{printable(name)}'"


# --------------------------------------------------------------------------- request → tensors
def request_tensors(payload: Any, headers: dict[str, str] | None, binary: dict[str, Any] | None = None) -> DecodedRequest:
    """The inputs of a V2 ``InferRequest``, a V2-shaped dict (``{"inputs": [...]}`` on the V1 route) or a V1
    ``{"instances": [{channel: base64, ...}]}`` body. ``binary``: tensors the guard read from a binary-extension
    body, by input name (their JSON ``data`` is empty)."""
    binary = binary or {}
    if hasattr(payload, "inputs") and hasattr(payload, "parameters") and not isinstance(payload, dict):  # kserve InferRequest
        tensors = [TensorIn(str(i.name), str(i.datatype).upper(), list(i.shape or []), binary.get(i.name, i.data), dict(i.parameters or {}))
                   for i in payload.inputs]
        return DecodedRequest(_request_id(payload.id, headers), "v2", tensors, _plain_parameters(payload.parameters))
    if isinstance(payload, (bytes, bytearray, str)):
        raise MedsegError("the body is not a JSON object: send Content-Type: application/json with a V1 {\"instances\": [...]} "
                          "or a V2 {\"inputs\": [...]} request")
    if not isinstance(payload, dict):
        raise MedsegError(f"the body is JSON {type(payload).__name__}, expected an object with \"inputs\" (V2) or \"instances\" (V1)")
    if "instances" in payload:
        return _v1_instances(payload, headers)
    if "inputs" not in payload:
        raise MedsegError("the body has neither \"inputs\" (V2) nor \"instances\" (V1)")
    inputs = payload["inputs"]
    if not isinstance(inputs, list):
        raise MedsegError(f"\"inputs\" must be a list, got {type(inputs).__name__}")
    tensors = []
    for n, item in enumerate(inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise MedsegError(f"inputs[{n}] must be an object with a string 'name', 'datatype', 'shape' and 'data'")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise MedsegError("'parameters' must be an object", _where(item["name"]))
        tensors.append(TensorIn(item["name"], str(item.get("datatype", "")).upper(), item.get("shape") or [], item.get("data"), params))
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise MedsegError("request 'parameters' must be an object")
    return DecodedRequest(_request_id(payload.get("id"), headers), "v2", tensors, params)  # V2-shaped body: V2-shaped answer


def _plain_parameters(params: Any) -> dict[str, Any]:
    """Request parameters as plain values: a gRPC request carries a protobuf map of ``InferParameter`` messages."""
    out: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        if hasattr(value, "WhichOneof"):  # InferParameter: one of bool_param, int64_param, string_param, double_param, uint64_param
            field_name = value.WhichOneof("parameter_choice")
            value = getattr(value, field_name) if field_name else None
        out[str(key)] = value
    return out


def _v1_instances(payload: dict[str, Any], headers: dict[str, str] | None) -> DecodedRequest:
    instances = payload["instances"]
    if not isinstance(instances, list) or len(instances) != 1:
        count = len(instances) if isinstance(instances, list) else type(instances).__name__
        raise MedsegError(f"\"instances\" must be a list of exactly one case, got {count} (send one request per case)")
    instance = instances[0]
    if not isinstance(instance, dict):
        raise MedsegError("the instance must be an object {channel: base64 of the NIfTI file, ...}")
    tensors = []
    for name, value in instance.items():
        if isinstance(value, dict) and set(value) == {"b64"}:
            value = value["b64"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # a covariate such as {"age": 71}
            tensors.append(TensorIn(str(name), "FP32", [1], [value], {}))
            continue
        tensors.append(TensorIn(str(name), "BYTES", [1], [value], {}))
    return DecodedRequest(_request_id(payload.get("id"), headers), "v1", tensors, {})


def _request_id(given: Any, headers: dict[str, str] | None) -> str:
    text = given if isinstance(given, str) and given else (headers or {}).get("x-request-id")
    return printable(text, 200) if text else str(uuid.uuid4())


def _flatten(data: Any, max_depth: int = 8, where: str | None = None) -> list[Any]:
    """The leaves of nested lists/tuples/arrays, in order; deeper nesting than ``max_depth`` is a client mistake."""
    if data is None:
        return []
    if isinstance(data, np.ndarray):
        return data.ravel().tolist()
    if not isinstance(data, (list, tuple)):
        return [data]
    out: list[Any] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple)):
            if depth >= max_depth:
                raise MedsegError(f"nested more than {max_depth} levels deep", where)
            stack.extend((x, depth + 1) for x in reversed(item))
        elif isinstance(item, np.ndarray):
            out.extend(item.ravel().tolist())
        else:
            out.append(item)
    return out


# --------------------------------------------------------------------------- tensors → case
def decode_tensors(request: DecodedRequest, channels: list[str], max_voxels: int, target_spacing: list[float] | None) -> Case:
    """The case of a request to a model taking ``channels`` and nothing else (see :func:`decode_request`)."""
    return decode_request(request, InputSpec(tuple(channels)), max_voxels, target_spacing)


def decode_request(request: DecodedRequest, spec: InputSpec, max_voxels: int | None, target_spacing: list[float] | None) -> Case:
    """The case of a request: the covariates first, then one 2D picture ``image`` (slice-set models), one FP32
    ``volume``, or one BYTES NIfTI input per channel."""
    channels = list(spec.channels)
    seen: set[str] = set()
    for t in request.tensors:
        if t.name in seen:
            raise MedsegError("given more than once", _where(t.name))
        seen.add(t.name)
    covariates = decode_covariates(request, spec)
    tensors = [t for t in request.tensors if t.name not in spec.covariate_names]
    if request.protocol == "v1":  # V1 numbers are covariates; anything else is a file, base64 text
        for t in tensors:
            if t.datatype != "BYTES":
                raise MedsegError("expected the base64 text of a file, got a number (numbers are covariates such as age, which this model "
                                  f"{'does not take' if not spec.covariates else 'takes as ' + ', '.join(spec.covariate_names)})", _where(t.name))
    if not tensors:
        alternatives = f"; or one BYTES input '{IMAGE_INPUT}' (a PNG or TIFF slice)" if spec.takes_image else ""
        raise MedsegError(f"no {'image ' if request.tensors else ''}inputs (expected one BYTES input per channel: {', '.join(channels)}; "
                          f"or one FP32 input '{VOLUME_INPUT}' [C,Z,Y,X]{alternatives})")
    if spec.takes_image and any(t.name == IMAGE_INPUT for t in tensors):
        case = _decode_image_input(tensors, spec, max_voxels, target_spacing)
    else:
        case = _decode_volume_inputs(tensors, request.parameters, channels, max_voxels, target_spacing, spec.min_shape)
    case.covariates = covariates
    return case


def _decode_volume_inputs(tensors: list[TensorIn], parameters: dict[str, Any], channels: list[str], max_voxels: int | None,
                          target_spacing: list[float] | None, min_shape: tuple[int, ...] | None = None) -> Case:
    fp32 = [t for t in tensors if t.datatype == "FP32"]
    if fp32 and len(tensors) == 1:
        return decode_volume(fp32[0], parameters, channels, max_voxels, target_spacing, min_shape)
    if len(tensors) == 1 and tensors[0].name == VOLUME_INPUT and tensors[0].datatype != "BYTES":
        raise MedsegError(f"datatype {printable(tensors[0].datatype, 20) or 'missing'}: the volume must be FP32 (real 32-bit floats; "
                          "convert complex, boolean or integer data to float32 first)", _where(VOLUME_INPUT))
    for t in tensors:
        if t.datatype != "BYTES" and t.name not in channels and t.name != VOLUME_INPUT:
            raise MedsegError(f"unexpected input (this model takes one BYTES input per channel: {', '.join(channels)}; or one FP32 input "
                              f"'{VOLUME_INPUT}' [C,Z,Y,X])", _where(t.name))
    for t in tensors:
        if t.datatype != "BYTES":
            raise MedsegError(f"datatype {printable(t.datatype, 20) or 'missing'}, expected BYTES (one element: the NIfTI file, base64 in JSON) — "
                              f"or send the whole case as one FP32 input '{VOLUME_INPUT}' [C,Z,Y,X]", _where(t.name))
    encoded = {t.name: _one_bytes_element(t, "the NIfTI file") for t in tensors}
    return decode_case(encoded, channels, max_voxels, target_spacing, min_shape)


def _one_bytes_element(t: TensorIn, what: str) -> str | bytes:
    values = _flatten(t.data, where=_where(t.name))
    if len(values) != 1:
        raise MedsegError(f"expected exactly one element ({what}, base64 text in JSON), got {len(values)}", _where(t.name))
    if not isinstance(values[0], (str, bytes)):
        raise MedsegError(f"expected exactly one element, a string ({what}, base64 text), got a {type(values[0]).__name__}", _where(t.name))
    return values[0]


def _decode_image_input(tensors: list[TensorIn], spec: InputSpec, max_voxels: int | None, target_spacing: list[float] | None) -> Case:
    """One 2D picture (PNG/TIFF) as the whole case; nothing else but covariates may come with it."""
    where = _where(IMAGE_INPUT)
    others = [printable(t.name) for t in tensors if t.name != IMAGE_INPUT]
    if others:
        raise MedsegError(f"send either one picture '{IMAGE_INPUT}' or the channel inputs ({', '.join(spec.channels)}), not both "
                          f"(also given: {', '.join(others)})", where)
    t = tensors[0]
    if t.datatype != "BYTES":
        raise MedsegError(f"datatype {printable(t.datatype, 20) or 'missing'}, expected BYTES (one element: the PNG or TIFF file, base64 in JSON)", where)
    value = _one_bytes_element(t, "the PNG or TIFF file")
    raw = value if isinstance(value, bytes) else _b64decode(value, where)
    if not raw:
        raise MedsegError("empty", where)
    assert spec.slice_axis is not None
    images, affine, spacing, info = decode_image(raw, list(spec.channels), spec.slice_axis, max_voxels, where)
    check_geometry(images.shape[1:], spacing, target_spacing, max_voxels, where)
    return Case(images, affine, spacing, None, image2d=info)


def decode_covariates(request: DecodedRequest, spec: InputSpec) -> dict[str, float]:
    """``{name: value}`` of the covariates the model accepts, from their inputs (numeric, one element) or else the
    request parameters of the same names; a required one missing, or a value out of range, is a client mistake."""
    out: dict[str, float] = {}
    by_name = {t.name: t for t in request.tensors}
    for name, required in spec.covariates:
        where = _where(name)
        t = by_name.get(name)
        if t is not None:
            if t.datatype not in NUMERIC_DATATYPES:
                raise MedsegError(f"datatype {printable(t.datatype, 20) or 'missing'}, expected FP32 (one number, shape [1])", where)
            values = _flatten(t.data, where=where)
            if len(values) != 1:
                raise MedsegError(f"expected exactly one number (shape [1]), got {len(values)} values", where)
            value: Any = values[0]
        elif request.parameters.get(name) is not None:
            value = request.parameters[name]
            where = f"request parameter '{printable(name)}'"
        elif required:
            raise MedsegError(f"missing: this model takes the subject's {name}{' in years' if name == 'age' else ''}: send an FP32 input "
                              f"'{name}' of shape [1] (or the request parameter '{name}')", where)
        else:
            continue
        out[name] = _covariate_value(name, value, where)
    return out


def _covariate_value(name: str, value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MedsegError(f"{printable(value)!r} is not a number", where) from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MedsegError(f"expected a number, got {type(value).__name__}", where)
    number = float(value)
    lo, hi = COVARIATE_RANGES.get(name, (-math.inf, math.inf))
    if not math.isfinite(number):
        raise MedsegError(f"{name} must be a finite number, got {printable(value, 30)}", where)
    if not lo <= number <= hi:
        raise MedsegError(f"{name} {number:g} is outside [{lo:g}, {hi:g}]{' years' if name == 'age' else ''}", where)
    return number


def decode_case(encoded: dict[str, str | bytes], channels: list[str], max_voxels: int | None = None, target_spacing: list[float] | None = None,
                min_shape: tuple[int, ...] | None = None) -> Case:
    """One NIfTI file per channel (``str``: base64 text; ``bytes``: the file itself) → the case.

    Raises :class:`MedsegError` naming the input for every client mistake.
    """
    missing = [c for c in channels if c not in encoded]
    unexpected = [printable(n) for n in encoded if n not in channels]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing channel input(s): {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected input(s): {', '.join(unexpected)}")
        raise MedsegError(f"{'; '.join(problems)} (expected one BYTES input per channel: {', '.join(channels)})")
    volumes = []
    for channel in channels:
        where = _where(channel)
        value = encoded[channel]
        raw = value if isinstance(value, bytes) else _b64decode(value, where)
        if not raw:
            raise MedsegError("empty", where)
        volumes.append(read_nifti_limited(raw, where, max_voxels))
    images, affine, header = stack_channels(volumes, [_where(c) for c in channels])
    spacing = list(nifti_spacing(header))
    check_geometry(images.shape[1:], spacing, target_spacing, max_voxels, _where(channels[0]), min_shape)
    return Case(images, affine, spacing, header)


def _b64decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # line-wrapped base64 (e.g. from the `base64` tool): drop the whitespace and try once more
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MedsegError(f"not valid base64 ({printable(exc, 120)})", where) from None


def read_nifti_limited(raw: bytes, where: str, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI-1 file (``.nii`` or ``.nii.gz`` bytes) after checking its header's dimensions.

    The header is read first (decompressing only its bytes); the data are decompressed only up to the size
    the header declares, so a compressed "bomb" or an absurd header cannot exhaust memory.
    """
    gz = raw[:2] == GZIP_MAGIC
    head = _gunzip(raw, NIFTI1_HEADER_BYTES, where) if gz else raw[:NIFTI1_HEADER_BYTES]
    shape, itemsize, vox_offset = _nifti_header_dims(head, where)
    voxels = math.prod(shape)
    if max_voxels is not None and voxels > max_voxels:
        raise MedsegError(f"{'×'.join(map(str, shape))} = {voxels} voxels, more than the limit of {max_voxels} voxels per volume (--max-voxels)", where)
    need = vox_offset + voxels * itemsize
    data = _gunzip(raw, need, where) if gz else raw[:need]
    if len(data) < need:
        raise MedsegError(f"truncated or corrupt: the header declares {need} bytes (header + data), the file holds {len(data)}", where)
    try:
        array, affine, header = load_nifti_bytes(data, name=where)
    except MedsegError:
        raise
    except Exception as exc:  # e.g. nibabel's HeaderDataError for a garbage header: still the client's bytes
        raise MedsegError(f"cannot read NIfTI ({type(exc).__name__}: {printable(exc, 120)})", where) from None
    if not np.isfinite(affine).all():
        raise MedsegError("the header's affine (sform/qform) holds NaN/Inf", where)
    if abs(np.linalg.det(affine[:3, :3])) < SINGULAR_DET:
        raise MedsegError("the header's affine (sform/qform) is singular (a zero voxel size or collinear axes): voxels have no "
                          "position in mm", where)
    return array, affine, header


def _gunzip(raw: bytes, max_bytes: int, where: str) -> bytes:
    """At most ``max_bytes`` of the decompressed content of gzip ``raw`` (several members are joined)."""
    out = bytearray()
    rest = raw
    try:
        while rest and len(out) < max_bytes:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += d.decompress(rest, max_bytes - len(out))
            if not d.eof:
                break  # stopped at max_bytes, or the input ended (truncated): the caller checks the length
            rest = d.unused_data
            if rest[:2] != GZIP_MAGIC:
                break  # trailing bytes after the last member
    except zlib.error as exc:
        raise MedsegError(f"truncated or corrupt compressed data ({printable(exc, 120)})", where) from None
    return bytes(out)


def _nifti_header_dims(head: bytes, where: str) -> tuple[tuple[int, int, int], int, int]:
    """``(shape I,J,K, bytes per voxel, data offset)`` from the first 348 bytes, or a MedsegError saying what is wrong."""
    if len(head) < NIFTI1_HEADER_BYTES:
        raise MedsegError(f"cannot read NIfTI: {len(head)} bytes, too short for a NIfTI-1 header ({NIFTI1_HEADER_BYTES} bytes)", where)
    endian = next((e for e in "<>" if struct.unpack(e + "i", head[:4])[0] == NIFTI1_HEADER_BYTES), None)
    if endian is None:
        if 540 in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]):
            raise MedsegError("cannot read NIfTI: this is NIfTI-2; send NIfTI-1 (.nii / .nii.gz)", where)
        raise MedsegError("cannot read NIfTI: not a NIfTI-1 file (the header size field is not 348)", where)
    magic = head[344:348]
    if magic == b"ni1\x00":
        raise MedsegError("cannot read NIfTI: a header-only .hdr file; send the single-file .nii / .nii.gz", where)
    if magic != b"n+1\x00":
        raise MedsegError(f"cannot read NIfTI: bad magic {magic!r} (expected n+1)", where)
    dims = struct.unpack(endian + "8h", head[40:56])
    datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
    pixdim = struct.unpack(endian + "8f", head[76:108])
    vox_offset = struct.unpack(endian + "f", head[108:112])[0]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise MedsegError(f"cannot read NIfTI: the header declares {ndim} dimensions", where)
    shape = dims[1:1 + ndim]
    if any(d <= 0 for d in shape):
        raise MedsegError(f"the header declares a non-positive size {tuple(shape)}", where)
    if ndim < 3:
        raise MedsegError(f"expected a 3D volume, the header declares a {ndim}D image of shape {tuple(shape)}", where)
    if math.prod(shape[3:]) != 1:
        raise MedsegError(f"expected a 3D volume, the header declares shape {tuple(shape)} ({math.prod(shape[3:])} volumes)", where)
    if datatype not in REAL_NIFTI_DATATYPES:
        kind = OTHER_NIFTI_DATATYPES.get(datatype, "not a NIfTI-1 datatype")
        raise MedsegError(f"NIfTI datatype {datatype} ({kind}): the model takes real-valued images (one of "
                          f"{', '.join(sorted(set(REAL_NIFTI_DATATYPES.values())))}); convert to float32", where)
    if bitpix <= 0 or bitpix % 8 or bitpix > 256:
        raise MedsegError(f"cannot read NIfTI: bitpix {bitpix} in the header", where)
    sizes = pixdim[1:4]
    if not all(math.isfinite(s) and s != 0 for s in sizes):  # nibabel would read a zero as 1 mm: a wrong geometry, silently
        raise MedsegError(f"the header's voxel sizes pixdim[1..3] = {tuple(round(s, 6) for s in sizes)} mm: every voxel size must be "
                          "finite and non-zero", where)
    if not (math.isfinite(vox_offset) and NIFTI1_HEADER_BYTES <= vox_offset <= 1 << 24):
        raise MedsegError(f"cannot read NIfTI: vox_offset {vox_offset} in the header", where)
    return (int(shape[0]), int(shape[1]), int(shape[2])), bitpix // 8, int(vox_offset)


def check_geometry(shape: tuple[int, ...] | list[int], spacing: list[float], target_spacing: list[float] | None, max_voxels: int | None, where: str,
                   min_shape: tuple[int, ...] | None = None) -> None:
    """Spacing finite and > 0; the volume resampled to ``target_spacing`` at most ``max_voxels`` voxels and at least
    ``min_shape`` along each axis."""
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MedsegError(f"voxel spacing {tuple(round(s, 6) for s in spacing)} mm: every spacing must be finite and > 0", where)
    if target_spacing is None:
        return
    resampled = shape_for_spacing(list(shape), spacing, list(target_spacing))
    if min_shape is not None and any(r < m for r, m in zip(resampled, min_shape)):
        raise MedsegError(f"volume too small: {'×'.join(map(str, shape))} voxels at {tuple(round(s, 4) for s in spacing)} mm resample to "
                          f"{'×'.join(map(str, resampled))} at the model's {tuple(round(s, 4) for s in target_spacing)} mm; the network needs "
                          f"at least {'×'.join(map(str, min_shape))} (one cell of its coarsest feature map)", where)
    if max_voxels is None:
        return
    count = math.prod(resampled)
    if count > max_voxels:
        raise MedsegError(f"at spacing {tuple(round(s, 4) for s in spacing)} mm the volume resamples to {'×'.join(map(str, resampled))} = {count} voxels "
                          f"at the model's {tuple(round(s, 4) for s in target_spacing)} mm, more than the limit of {max_voxels} voxels (--max-voxels)", where)


# --------------------------------------------------------------------------- FP32 volume
def decode_volume(t: TensorIn, request_params: dict[str, Any], channels: list[str], max_voxels: int | None, target_spacing: list[float] | None,
                  min_shape: tuple[int, ...] | None = None) -> Case:
    """One FP32 ``volume`` ``[C, Z, Y, X]`` with ``affine`` (and optionally ``spacing``, ``channels``) parameters."""
    where = _where(t.name)
    if t.name != VOLUME_INPUT:
        raise MedsegError(f"an FP32 input must be named '{VOLUME_INPUT}' (the whole case, shape [C,Z,Y,X])", where)
    shape = t.shape
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise MedsegError(f"shape {printable(shape)}: expected [C, Z, Y, X] with C = {len(channels)} ({', '.join(channels)})", where)
    if any(s <= 0 for s in shape):
        raise MedsegError(f"shape {shape}: every size must be > 0", where)
    if shape[0] != len(channels):
        raise MedsegError(f"shape {shape}: C = {shape[0]}, the model takes {len(channels)} channels ({', '.join(channels)})", where)
    voxels = math.prod(shape[1:])
    if max_voxels is not None and voxels > max_voxels:
        raise MedsegError(f"{'×'.join(map(str, shape[1:]))} = {voxels} voxels, more than the limit of {max_voxels} voxels per volume (--max-voxels)", where)
    params = {**request_params, **t.parameters}
    affine = parse_affine(params.get("affine"), where)
    spacing = [float(s) for s in nib.affines.voxel_sizes(affine)]
    if params.get("spacing") is not None:
        given = parse_numbers(params["spacing"], 3, "spacing", where)
        if not all(math.isfinite(s) and s > 0 for s in given):
            raise MedsegError(f"spacing {tuple(given)}: every spacing must be finite and > 0", where)
        if not np.allclose(given, spacing, rtol=SPACING_RTOL, atol=0):
            raise MedsegError(f"spacing {tuple(given)} mm disagrees with the affine's voxel sizes {tuple(round(s, 6) for s in spacing)} mm "
                              "(spacing is along (x, y, z) = NIfTI (i, j, k))", where)
    order = _channel_order(params.get("channels"), channels, where)
    check_geometry((shape[3], shape[2], shape[1]), spacing, target_spacing, max_voxels, where, min_shape)
    array = _volume_array(t.data, shape, where)
    if not np.isfinite(array).all():
        raise MedsegError(f"contains {int((~np.isfinite(array)).sum())} NaN/Inf voxels", where)
    images = array[order].transpose(0, 3, 2, 1)  # [C, Z, Y, X] → C × I × J × K (I = X, J = Y, K = Z)
    return Case(images, affine, spacing, None)


def _volume_array(data: Any, shape: list[int], where: str) -> np.ndarray:
    expected = math.prod(shape)
    if isinstance(data, np.ndarray):  # binary extension: already float32 of the declared shape (checked by the guard)
        array = data
    else:
        if not isinstance(data, list):
            raise MedsegError("'data' must be a list of numbers", where)
        try:
            parsed = np.asarray(data)  # dtype inferred first: booleans and strings must not pass as 0/1 or parsed numbers
        except (ValueError, TypeError, OverflowError) as exc:
            raise MedsegError(f"'data' is not a (nested) list of numbers ({printable(exc, 100)})", where) from None
        if parsed.dtype.kind not in "iuf":
            kind = {"b": "booleans", "U": "strings", "S": "strings", "O": "mixed or ragged values"}.get(parsed.dtype.kind, str(parsed.dtype))
            raise MedsegError(f"'data' is not a (nested) list of numbers: it holds {kind}; FP32 data are real numbers", where)
        try:
            array = parsed.astype(np.float32)
        except (ValueError, OverflowError) as exc:
            raise MedsegError(f"'data' does not fit FP32 ({printable(exc, 100)})", where) from None
    if array.size != expected:
        raise MedsegError(f"shape {shape} declares {expected} values, 'data' holds {array.size}", where)
    return array.reshape(shape)


def parse_numbers(value: Any, count: int | tuple[int, ...], what: str, where: str) -> list[float]:
    """Numbers from a parameter: a JSON array text ``"[1, 2, 3]"``, ``"1,2,3"`` / ``"1 2 3"``, or a list."""
    counts = (count,) if isinstance(count, int) else count
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 10_000:
            raise MedsegError(f"parameter '{what}' is {len(text)} characters long, not a short list of numbers", where)
        try:
            items = json.loads(text) if text.startswith("[") else [float(x) for x in re.split(r"[,\s]+", text) if x]
        except (ValueError, OverflowError, RecursionError):
            raise MedsegError(f"parameter '{what}' {printable(value)!r} is not a list of numbers", where) from None
    flat = _flatten(items, max_depth=3, where=where)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        raise MedsegError(f"parameter '{what}' {printable(value)!r} is not a list of numbers", where)
    try:
        numbers = [float(x) for x in flat]
    except OverflowError:
        raise MedsegError(f"parameter '{what}' holds a number too large for a float", where) from None
    if len(numbers) not in counts:
        raise MedsegError(f"parameter '{what}' has {len(numbers)} numbers, expected {' or '.join(map(str, counts))}", where)
    if not all(math.isfinite(x) for x in numbers):
        raise MedsegError(f"parameter '{what}' holds NaN/Inf", where)
    return numbers


def parse_affine(value: Any, where: str) -> np.ndarray:
    """A 4×4 affine from 16 numbers (row-major) or 12 (the top three rows); the 3×3 part must be invertible."""
    if value is None:
        raise MedsegError("an FP32 volume needs the parameter 'affine' (the NIfTI voxel-to-world 4×4 matrix in mm, "
                          "16 numbers row-major, for voxel indices (i, j, k) = (x, y, z))", where)
    numbers = parse_numbers(value, (12, 16), "affine", where)
    affine = np.eye(4)
    affine[: len(numbers) // 4] = np.asarray(numbers, dtype=np.float64).reshape(-1, 4)
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise MedsegError(f"the affine's last row is {affine[3].tolist()}, expected [0, 0, 0, 1]", where)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MedsegError("the affine is singular (a zero voxel size or collinear axes)", where)
    return affine


def _channel_order(value: Any, channels: list[str], where: str) -> list[int]:
    if value is None:
        return list(range(len(channels)))
    if not isinstance(value, str):
        raise MedsegError("parameter 'channels' must be a comma-separated string", where)
    given = [c.strip() for c in value.split(",") if c.strip()]
    if sorted(given) != sorted(channels):
        raise MedsegError(f"parameter 'channels' {printable(value)!r} must name each of the model's channels once ({', '.join(channels)})", where)
    return [given.index(c) for c in channels]
