"""Client of the model server, for every task: ask the model what it takes, send a case, read the answer.

``GET /v2/models/NAME`` (:func:`model_info`) tells the channel inputs (their names and order), the covariates the
model requires (a classifier's ``age``), whether it takes one 2D picture (a slice-set model's ``image``) and what
it answers (``segmentation`` + ``volumes_ml``, or ``probabilities`` + ``label``); the client needs no task
knowledge of its own.

``medseg predict --url http://127.0.0.1:8080 --model NAME --images CH1.nii.gz … [--age 71] [--out seg.nii.gz]``
or ``--image slice.png --out mask.png`` for a 2D slice-set model.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io import write_bytes, write_json

logger = logging.getLogger(__name__)

IMAGE_INPUT = "image"
VOLUME_INPUT = "volume"
#: The model-level metadata parameter holding the served version's model card (Markdown; medseg's server sets it).
MODEL_CARD_PARAMETER = "model_card"
NUMERIC = ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
#: File name extensions of a 2D picture by the format the server names.
PICTURE_EXTENSIONS = {"png": ("png",), "tiff": ("tif", "tiff")}


@dataclass(frozen=True)
class RetryPolicy:
    """A bounded retry of a request the server never answered: refused, reset or closed before an answer
    (a server restarting, a pod replaced). ``attempts`` tries in all; before try n+1 the client sleeps
    ``backoff_s * 2**(n-1)`` capped at ``max_backoff_s``, between half and all of it (jitter, so that many
    clients do not come back at once). Every call of this module is idempotent (metadata reads, and inference,
    which gives the same answer for the same case), so a retry is safe. An answer (4xx/5xx, 503 included) and a
    read timeout are never retried: the server did answer, or may still be working on the case.

    The default comes from ``MEDSEG_CLIENT_RETRIES`` (attempts, default 3) and ``MEDSEG_CLIENT_BACKOFF_S``
    (default 0.5); ``medseg predict --url`` takes ``--retries``.
    """

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise MedsegError(f"retry policy needs attempts >= 1 and backoffs >= 0, got {self}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RetryPolicy:
        """From ``MEDSEG_CLIENT_RETRIES`` and ``MEDSEG_CLIENT_BACKOFF_S`` (unset: the defaults)."""
        env = os.environ if environ is None else environ
        try:
            attempts = int(env.get("MEDSEG_CLIENT_RETRIES") or cls.attempts)
            backoff = float(env.get("MEDSEG_CLIENT_BACKOFF_S") or cls.backoff_s)
        except ValueError:
            raise MedsegError("MEDSEG_CLIENT_RETRIES must be an integer and MEDSEG_CLIENT_BACKOFF_S a number of seconds") from None
        return cls(attempts=attempts, backoff_s=backoff)

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed try number ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class ModelInfo:
    """What a served model takes and answers, read from its V2 metadata (:func:`model_info`)."""

    name: str
    version: str
    kind: str  # "segmentation" | "classification"
    view: str  # "volume" | "slices" | "classes" (how the viewer shows it)
    channels: list[str]
    covariates: dict[str, bool]  # name → required
    takes_image: bool
    classes: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)  # label value → name (segmentation, when the server says)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def requires(self) -> list[str]:
        return [name for name, required in self.covariates.items() if required]

    @property
    def model_card(self) -> str:
        """The served version's model card (Markdown text), "" when the server gives none."""
        params = self.metadata.get("parameters")
        return str(params.get(MODEL_CARD_PARAMETER) or "") if isinstance(params, dict) else ""

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ModelInfo:
        """From a ``GET /v2/models/NAME`` answer: medseg's (with parameters) or any V2 server's plain one."""
        inputs = [i for i in meta.get("inputs") or [] if isinstance(i, dict) and isinstance(i.get("name"), str)]
        outputs = {o["name"]: o for o in meta.get("outputs") or [] if isinstance(o, dict) and isinstance(o.get("name"), str)}
        params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
        covariates = {i["name"]: not i.get("optional", False) for i in inputs
                      if str(i.get("datatype", "")).upper() in NUMERIC and i["name"] != VOLUME_INPUT and list(i.get("shape") or []) == [1]}
        if params.get("channels"):
            channels = [c for c in str(params["channels"]).split(",") if c]
        else:  # a plain metadata answer: the BYTES inputs of one element, but the 2D picture
            picture = any(i["name"] == IMAGE_INPUT for i in inputs) and sum(str(i.get("datatype")).upper() == "BYTES" for i in inputs) > 1
            channels = [i["name"] for i in inputs if str(i.get("datatype", "")).upper() == "BYTES" and not (picture and i["name"] == IMAGE_INPUT)]
        kind = str(params.get("task") or ("classification" if "probabilities" in outputs else "segmentation"))
        takes_image = IMAGE_INPUT in {i["name"] for i in inputs} and IMAGE_INPUT not in channels
        classes = _split((outputs.get("probabilities", {}).get("parameters") or {}).get("classes") or params.get("classes"))
        groups = _split((outputs.get("volumes_ml", {}).get("parameters") or {}).get("regions") or params.get("regions"))
        labels: dict[int, str] = {}
        for item in _split(params.get("labels")):
            name, _, value = item.rpartition(":")
            if name and value.lstrip("-").isdigit():
                labels[int(value)] = name
        view = str(params.get("view") or ("classes" if kind == "classification" else ("slices" if takes_image else "volume")))
        version = str(params.get("model_version") or ((meta.get("versions") or [""])[-1]) or "")
        return cls(name=str(meta.get("name", "")), version=version, kind=kind, view=view, channels=channels, covariates=covariates,
                   takes_image=takes_image, classes=classes, groups=groups, labels=labels, metadata=meta)


def _split(text: Any) -> list[str]:
    return [part for part in str(text).split(",") if part] if text else []


def model_info(url: str, model_name: str, timeout: float = 30, retry: RetryPolicy | None = None) -> ModelInfo:
    """``GET /v2/models/NAME`` as a :class:`ModelInfo`; :class:`MedsegError` with the server's message otherwise.

    ``retry``: on connection errors (default: :meth:`RetryPolicy.from_env`)."""
    endpoint = f"{url.rstrip('/')}/v2/models/{model_name}"
    response = _request("GET", endpoint, timeout, retry=retry)
    try:
        return ModelInfo.from_metadata(response.json())
    except (ValueError, TypeError, AttributeError) as exc:
        raise MedsegError(f"unexpected model metadata from the model server ({type(exc).__name__}: {exc})", endpoint) from None


# --------------------------------------------------------------------------- requests
def covariate_inputs(covariates: dict[str, float | None] | None) -> list[dict[str, Any]]:
    """FP32 ``[1]`` inputs of the covariates given (None values left out)."""
    return [{"name": name, "datatype": "FP32", "shape": [1], "data": [float(value)]} for name, value in (covariates or {}).items() if value is not None]


def build_request(image_paths: list[Path], channels: list[str], request_id: str | None = None,
                  covariates: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The V2 request body: one BYTES input per channel holding the base64 text of the file as stored, then the
    covariates (``{"age": 71}``) as FP32 ``[1]`` inputs."""
    if len(image_paths) != len(channels):
        raise MedsegError(f"got {len(image_paths)} image file(s) for {len(channels)} channel(s) ({', '.join(channels)})")
    inputs = []
    for path, channel in zip(image_paths, channels):
        path = Path(path)
        if not path.is_file():
            raise MedsegError("file not found", path)
        inputs.append({"name": channel, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(path.read_bytes()).decode("ascii")]})
    return {"id": request_id or str(uuid.uuid4()), "inputs": inputs + covariate_inputs(covariates)}


def image_request(picture: Path | bytes, request_id: str | None = None, covariates: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The V2 request body of one 2D picture (PNG or TIFF file, or its bytes) for a slice-set model: BYTES input ``image``."""
    if isinstance(picture, (bytes, bytearray)):
        raw = bytes(picture)
    else:
        path = Path(picture)
        if not path.is_file():
            raise MedsegError("file not found", path)
        raw = path.read_bytes()
    inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(raw).decode("ascii")]}]
    return {"id": request_id or str(uuid.uuid4()), "inputs": inputs + covariate_inputs(covariates)}


def volume_request(images: Any, affine: Any, spacing: list[float] | None = None, channels: list[str] | None = None,
                   request_id: str | None = None, binary: bool = True, covariates: dict[str, float | None] | None = None) -> tuple[bytes, dict[str, str]]:
    """A V2 request with the whole case as one FP32 input ``volume`` ``[C, Z, Y, X]``: ``(body, headers)``.

    ``images``: ``C×I×J×K`` (nibabel's voxel order, channels first), sent as ``images.transpose(0, 3, 2, 1)``;
    ``affine``: the 4×4 NIfTI voxel-to-world matrix of ``(i, j, k)``; ``spacing`` (optional): mm along (i, j, k).
    ``binary``: the binary tensor extension (the voxels as raw little-endian float32 after the JSON header),
    else the voxels as a JSON list (much larger and slower). ``covariates``: FP32 ``[1]`` inputs after the volume.
    """
    import numpy as np

    volume = np.ascontiguousarray(np.asarray(images, dtype="<f4").transpose(0, 3, 2, 1))
    params: dict[str, Any] = {"affine": json.dumps(np.asarray(affine, dtype=float).tolist())}
    if spacing is not None:
        params["spacing"] = json.dumps([float(s) for s in spacing])
    if channels is not None:
        params["channels"] = ",".join(channels)
    tensor: dict[str, Any] = {"name": "volume", "datatype": "FP32", "shape": list(volume.shape), "parameters": params}
    extra = covariate_inputs(covariates)
    rid = request_id or str(uuid.uuid4())
    if not binary:
        tensor["data"] = volume.ravel().tolist()
        return json.dumps({"id": rid, "inputs": [tensor, *extra]}).encode(), {"content-type": "application/json", "x-request-id": rid}
    raw = volume.tobytes()
    tensor["parameters"]["binary_data_size"] = len(raw)
    tail = b""
    for item in extra:  # covariates in binary too: 4 bytes of float32 each
        value = np.asarray(item.pop("data"), dtype="<f4").tobytes()
        item["parameters"] = {"binary_data_size": len(value)}
        tail += value
    header = json.dumps({"id": rid, "inputs": [tensor, *extra]}).encode()
    return header + raw + tail, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header)), "x-request-id": rid}


# --------------------------------------------------------------------------- calls
def infer_volume(url: str, model_name: str, images: Any, affine: Any, spacing: list[float] | None = None, binary: bool = True,
                 timeout: float = 300, covariates: dict[str, float | None] | None = None, retry: RetryPolicy | None = None) -> dict[str, Any]:
    """Send a ``C×I×J×K`` array (see :func:`volume_request`); returns what :func:`infer` returns."""
    body, headers = volume_request(images, affine, spacing, binary=binary, covariates=covariates)
    return _post(f"{url.rstrip('/')}/v2/models/{model_name}/infer", body, headers, timeout, retry)


def infer(url: str, model_name: str, image_paths: list[Path], channels: list[str] | None = None, timeout: float = 300,
          age: float | None = None, covariates: dict[str, float | None] | None = None, retry: RetryPolicy | None = None) -> dict[str, Any]:
    """POST ``/v2/models/NAME/infer`` with one NIfTI file per channel (``channels``: their names, in the order of
    ``image_paths``; default: the model's channels from ``GET /v2/models/NAME``) and the covariates (``age`` in years).

    Returns, for a segmentation model, ``{"segmentation_bytes" (a .nii.gz file's content), "format", "volumes_ml",
    ...}``; for a classifier ``{"probabilities": {class: p}, "label", ...}``; both with ``task``, ``model_version``,
    ``model_name`` and ``id``. Raises :class:`MedsegError` with the server's message on a 4xx/5xx answer, or when
    the server cannot be reached after the ``retry`` policy's attempts (default: :meth:`RetryPolicy.from_env`).
    """
    covariates = dict(covariates or {})
    if age is not None:
        covariates["age"] = age
    if channels is None:
        channels = model_info(url, model_name, timeout=min(timeout, 30), retry=retry).channels
    body = build_request(list(image_paths), list(channels), covariates=covariates)
    headers = {"x-request-id": body["id"], "content-type": "application/json"}  # KServe's latency log line shows the id
    return _post(f"{url.rstrip('/')}/v2/models/{model_name}/infer", json.dumps(body).encode(), headers, timeout, retry)


def infer_image(url: str, model_name: str, picture: Path | bytes, timeout: float = 300, covariates: dict[str, float | None] | None = None,
                retry: RetryPolicy | None = None) -> dict[str, Any]:
    """POST one 2D picture (PNG/TIFF) to a slice-set model; ``segmentation_bytes`` is the mask in the same format."""
    body = image_request(picture, covariates=covariates)
    headers = {"x-request-id": body["id"], "content-type": "application/json"}
    return _post(f"{url.rstrip('/')}/v2/models/{model_name}/infer", json.dumps(body).encode(), headers, timeout, retry)


def _retryable(exc: Exception) -> bool:
    """A connection the server refused, reset or closed before answering (not a read timeout: it may be working)."""
    import httpx

    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))


def _request(method: str, endpoint: str, timeout: float, retry: RetryPolicy | None = None, **kwargs: Any) -> Any:
    """One HTTP call to the model server, tried again on connection errors as ``retry`` says (default:
    :meth:`RetryPolicy.from_env`); a timeout, a server still unreachable after the last attempt or a 4xx/5xx
    answer is a MedsegError naming the endpoint (and the server's own message)."""
    import httpx

    policy = retry or RetryPolicy.from_env()
    started = time.monotonic()
    attempt = 0
    first: Exception | None = None
    while True:
        attempt += 1
        try:
            response = httpx.request(method, endpoint, timeout=timeout, **kwargs)
            break
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
                raise MedsegError(f"no answer within {timeout:.0f} s", endpoint) from None
            first = first or exc
            if not _retryable(exc) or attempt >= policy.attempts:
                tried = f" after {attempt} attempts over {time.monotonic() - started:.1f} s" if attempt > 1 else ""
                cause = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
                if type(first) is not type(exc):  # e.g. the connection lost mid-request, then refused while the server is down
                    cause = f"first {type(first).__name__}: {str(first).rstrip('.')}; last {cause}"
                raise MedsegError(f"cannot reach the model server{tried} ({cause})", endpoint) from None
            pause = policy.delay(attempt)
            logger.warning("model server %s: %s (%s); trying again in %.1f s (attempt %d of %d)", endpoint,
                           "no connection" if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)) else "connection lost before an answer",
                           type(exc).__name__, pause, attempt + 1, policy.attempts)
            time.sleep(pause)
    if response.status_code >= 400:
        raise MedsegError(f"model server answered {response.status_code}: {_error_text(response)}", endpoint)
    return response


def _post(endpoint: str, body: bytes, headers: dict[str, str], timeout: float, retry: RetryPolicy | None = None) -> dict[str, Any]:
    response = _request("POST", endpoint, timeout, retry=retry, content=body, headers=headers)
    try:
        return parse_response(response.json())
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise MedsegError(f"unexpected answer from the model server ({type(exc).__name__}: {exc})", endpoint) from None


def parse_response(payload: dict[str, Any]) -> dict[str, Any]:
    """A V2 answer as a dict: ``segmentation_bytes``/``format``/``volumes_ml`` or ``probabilities``/``label``."""
    outputs = {o["name"]: o for o in payload["outputs"]}
    params = payload.get("parameters") or {}
    out: dict[str, Any] = {
        "model_version": params.get("model_version") or payload.get("model_version"),
        "model_name": params.get("model_name") or payload.get("model_name"),
        "id": payload.get("id"),
    }
    if "probabilities" in outputs:
        probs = outputs["probabilities"]
        classes = _split((probs.get("parameters") or {}).get("classes"))
        values = [float(v) for v in _flat(probs["data"])]
        if len(classes) != len(values):
            raise ValueError(f"{len(values)} probabilities for classes {classes}")
        label = _flat(outputs["label"]["data"])[0] if "label" in outputs else classes[max(range(len(values)), key=values.__getitem__)]
        return {**out, "task": "classification", "probabilities": dict(zip(classes, values)), "label": str(label)}
    seg = outputs["segmentation"]
    seg_text = _flat(seg["data"])[0]
    vol = outputs["volumes_ml"]
    regions = _split((vol.get("parameters") or {}).get("regions"))
    values = [float(v) for v in _flat(vol["data"])]
    if len(regions) != len(values):
        raise ValueError(f"{len(values)} volumes for regions {regions}")
    return {**out, "task": "segmentation", "segmentation_bytes": base64.b64decode(seg_text, validate=True),
            "format": str((seg.get("parameters") or {}).get("format") or "nii.gz"), "volumes_ml": dict(zip(regions, values))}


def _extension(name: str) -> str:
    return Path(name).suffix.lower().lstrip(".")


def _flat(data: Any) -> list[Any]:
    return list(data) if isinstance(data, list) else [data]


def _error_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    if isinstance(body, dict) and "detail" in body:  # pydantic validation (422)
        return str(body["detail"])[:500]
    return str(body)[:500]


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg predict --url``."""
    parser.add_argument("--url", required=True, help="model server base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", required=True, help="model name on the server")
    add_case_arguments(parser)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the answer (default: 300)")


def add_case_arguments(parser: argparse.ArgumentParser, out_help: str = "") -> None:
    """The case options of ``medseg predict --url`` (shared with ``medseg predict``; ``out_help`` is added to --out's help)."""
    parser.add_argument("--images", nargs="+", type=Path, default=None,
                        help="one NIfTI file per channel, in the model's channel order (GET /v2/models/NAME) or in --channels order")
    parser.add_argument("--image", type=Path, default=None, help="a 2D slice-set model: one PNG or TIFF slice (colour channels = the model's channels)")
    parser.add_argument("--channels", nargs="+", default=None, help="channel names of --images (default: the model's, asked from the server)")
    parser.add_argument("--age", type=float, default=None, help="a classifier taking the age: the subject's age in years")
    parser.add_argument("--retries", type=int, default=None,
                        help="with --url: tries per request when the connection is refused or lost before an answer, with backoff "
                             "(default: $MEDSEG_CLIENT_RETRIES or 3; 1 = no retry)")
    parser.add_argument("--out", type=Path, default=None,
                        help="segmentation to write (.nii.gz or .nii; for --image a .png/.tif mask); a classifier: a .json of the probabilities (optional)"
                             + out_help)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg predict --url``: write the answer atomically and print it."""
    if bool(args.images) == bool(args.image):
        raise MedsegError("give either --images (one NIfTI file per channel) or --image (one PNG/TIFF slice of a 2D model)")
    for path in ([args.image] if args.image is not None else list(args.images)):
        if not Path(path).is_file():
            raise MedsegError("file not found", path)
    retry = RetryPolicy.from_env()
    if getattr(args, "retries", None) is not None:
        retry = RetryPolicy(attempts=int(args.retries), backoff_s=retry.backoff_s, max_backoff_s=retry.max_backoff_s)
    info = model_info(args.url, args.model, timeout=min(float(args.timeout), 30), retry=retry)
    if args.image is not None and not info.takes_image:
        raise MedsegError(f"model {args.model} takes no 2D picture (it is not a 2D slice-set model): send --images, one NIfTI file per channel "
                          f"({', '.join(info.channels)})")
    covariates = {"age": args.age} if args.age is not None else {}
    missing = [c for c in info.requires if c not in covariates]
    if missing:
        raise MedsegError(f"model {args.model} takes the subject's {', '.join(missing)}: give --{missing[0]}")
    out = None if args.out is None else str(args.out)
    if not info.is_classification:
        if out is None:
            raise MedsegError("give --out, the segmentation file to write")
        if args.image is not None:
            fmt = "png" if Path(args.image).read_bytes()[:4] == b"\x89PNG" else "tiff"
            if _extension(out) not in PICTURE_EXTENSIONS[fmt]:
                raise MedsegError(f"the mask comes back as {fmt.upper()} like the slice: name --out ….{PICTURE_EXTENSIONS[fmt][0]}", args.out)
        elif not out.endswith((".nii.gz", ".nii")):
            raise MedsegError("the segmentation file name must end in .nii.gz or .nii", args.out)
    elif out is not None and _extension(out) != "json":
        raise MedsegError("a classifier answers probabilities: name --out ….json (or leave it out)", args.out)
    if args.image is not None:
        result = infer_image(args.url, args.model, args.image, timeout=args.timeout, covariates=covariates, retry=retry)
    else:
        result = infer(args.url, args.model, args.images, args.channels or info.channels, timeout=args.timeout, covariates=covariates, retry=retry)
    print(f"model:        {result['model_name']} (version {result['model_version']})")
    if result["task"] == "classification":
        for name, p in result["probabilities"].items():
            print(f"p({name}){'':<{max(1, 10 - len(name))}}{p:8.4f}")
        print(f"label:        {result['label']}")
        if out is not None:
            write_json(Path(out), {k: result[k] for k in ("model_name", "model_version", "label", "probabilities")})
            print(f"answer:       {out}")
        return 0
    data = result["segmentation_bytes"]
    write_bytes(args.out, gzip.decompress(data) if out.endswith(".nii") and data[:2] == b"\x1f\x8b" else data)
    for region, ml in result["volumes_ml"].items():
        print(f"volume {region:<6} {ml:10.2f} ml")
    print(f"segmentation: {args.out}")
    return 0
