"""The KServe predictor: a model package behind the Open Inference Protocol (V2).

Request (``POST /v2/models/NAME/infer``): one input per channel, named as the model's channels
(BraTS 2023: ``t1n``, ``t1c``, ``t2w``, ``t2f``), each ``{"datatype": "BYTES", "shape": [1],
"data": ["<base64 of the .nii or .nii.gz file>"]}``. All channels must share shape and affine.

Response: outputs ``segmentation`` (BYTES, shape [1], base64 of a ``.nii.gz`` label map in the input's
geometry) and ``volumes_ml`` (FP32, one value per region, named in the output parameter ``regions``),
response parameters ``model_name`` and ``model_version``.

A client mistake (bad base64, not NIfTI, truncated gzip, missing channel, mismatched shapes, NaN voxels)
answers HTTP 400 with a message naming the input and the problem; the server keeps serving.

Decoding and inference run in worker threads (one inference at a time), so the event loop stays free
for health checks and ``/metrics`` while a volume is being segmented.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.predictor import Prediction, Predictor
from medseg.io import load_nifti_bytes, nifti_spacing, nifti_to_bytes, stack_channels
from medseg.registry.resolve import resolve_model_source
from medseg.serving import import_kserve
from medseg.serving.metrics import INFERENCE_SECONDS, INFLIGHT, INPUT_VOXELS, MODEL_INFO, REQUESTS

kserve = import_kserve()
from kserve.errors import InvalidInput  # noqa: E402  (after the guarded kserve import)
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402

log = logging.getLogger(__name__)



class SegmentationModel(kserve.Model):
    """``SegmentationModel(name, model_uri)``; ``load()`` before serving.

    ``model_uri``: a model package folder, or an MLflow registry URI ``models:/NAME@ALIAS`` /
    ``models:/NAME/VERSION`` whose MLflow model holds the package under ``artifacts/model_package/``.
    """

    def __init__(self, name: str, model_uri: str | Path, device: str = "auto", download_dir: str | Path | None = None):
        super().__init__(name)
        self.model_uri = str(model_uri)
        self.device = device
        self.download_dir = download_dir
        self.predictor: Predictor | None = None
        self.package_dir: Path | None = None
        self.model_version: str | None = None
        self.channels: list[str] = []
        self.regions: list[str] = []
        self._lock = threading.Lock()  # one inference at a time: the volumes are large, the cores few

    def load(self) -> bool:
        self.package_dir, self.model_version = resolve_model_source(self.model_uri, self.download_dir)
        self.predictor = Predictor.from_package(self.package_dir, device=self.device)
        self.channels = self.predictor.channels
        self.regions = self.predictor.region_names
        MODEL_INFO.labels(model=self.name).info({"version": self.model_version, "configuration": self.predictor.package.configuration})
        log.info("model %s version %s loaded from %s (channels %s)", self.name, self.model_version, self.package_dir, ",".join(self.channels))
        self.ready = True
        return self.ready

    async def preprocess(self, payload: InferRequest | dict, headers: dict[str, str] | None = None) -> dict[str, Any]:
        INFLIGHT.labels(model=self.name).inc()
        try:
            request_id, encoded = _request_inputs(payload, headers)
            case = await asyncio.to_thread(decode_case, encoded, self.channels)
        except BaseException as exc:
            raise _failed(self.name, exc) from None
        INPUT_VOXELS.labels(model=self.name).observe(float(np.prod(case["shape"])))
        case["request_id"] = request_id
        return case

    async def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            prediction, seconds = await asyncio.to_thread(_run_predictor, self.predictor, self._lock, payload)
        except BaseException as exc:
            raise _failed(self.name, exc) from None
        INFERENCE_SECONDS.labels(model=self.name).observe(seconds)
        return {"prediction": prediction, "header": payload["header"], "request_id": payload["request_id"]}

    async def postprocess(self, result: dict[str, Any], headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None) -> InferResponse:
        try:
            prediction: Prediction = result["prediction"]
            seg_bytes = await asyncio.to_thread(nifti_to_bytes, prediction.segmentation.astype(np.uint8), prediction.affine, result["header"])
            regions = list(prediction.volumes_ml)
            outputs = [
                InferOutput(name="segmentation", shape=[1], datatype="BYTES", data=[base64.b64encode(seg_bytes).decode("ascii")]),
                InferOutput(name="volumes_ml", shape=[len(regions)], datatype="FP32", data=[float(prediction.volumes_ml[r]) for r in regions],
                            parameters={"regions": ",".join(regions)}),
            ]
            response = InferResponse(
                response_id=result["request_id"],  # never None: a None id resets the connection
                model_name=self.name,
                model_version=self.model_version,
                infer_outputs=outputs,
                parameters={"model_name": self.name, "model_version": self.model_version},
            )
        except BaseException as exc:
            raise _failed(self.name, exc) from None
        REQUESTS.labels(model=self.name, status="2xx").inc()
        INFLIGHT.labels(model=self.name).dec()
        return response


# --------------------------------------------------------------------------- helpers (module level)
def _failed(model_name: str, exc: BaseException) -> BaseException:
    """Count a failed request and return the exception to raise: client mistakes become InvalidInput (400)."""
    INFLIGHT.labels(model=model_name).dec()
    if isinstance(exc, MedsegError):
        REQUESTS.labels(model=model_name, status="4xx").inc()
        return InvalidInput(str(exc))
    if isinstance(exc, InvalidInput):
        REQUESTS.labels(model=model_name, status="4xx").inc()
        return exc
    if isinstance(exc, Exception):
        REQUESTS.labels(model=model_name, status="5xx").inc()
    return exc  # cancellation (client gone) is not counted as an answer


def _request_inputs(payload: InferRequest | dict, headers: dict[str, str] | None) -> tuple[str, dict[str, str | bytes]]:
    """``(request id, {input name: base64 text})`` from a V2 request (or a V2-shaped dict on the V1 route)."""
    if isinstance(payload, InferRequest):
        request_id = payload.id
        items = [(inp.name, inp.datatype, _input_data(inp)) for inp in payload.inputs]
    elif isinstance(payload, dict) and isinstance(payload.get("inputs"), list):
        request_id = payload.get("id")
        try:
            items = [(inp["name"], str(inp.get("datatype", "")).upper(), inp.get("data")) for inp in payload["inputs"]]
        except (TypeError, KeyError):
            raise MedsegError("every input needs a 'name', 'datatype' and 'data'") from None
    else:
        raise MedsegError("expected an Open Inference Protocol v2 request (POST /v2/models/NAME/infer) with one BYTES input per channel")
    request_id = str(request_id or (headers or {}).get("x-request-id") or uuid.uuid4())
    encoded: dict[str, str | bytes] = {}
    for name, datatype, data in items:
        where = f"input '{name}'"
        if name in encoded:
            raise MedsegError("given more than once", where)
        if datatype != "BYTES":
            raise MedsegError(f"datatype {datatype}, expected BYTES (one element: the base64 text of the NIfTI file)", where)
        values = _flatten(data)
        if len(values) != 1 or not isinstance(values[0], (str, bytes)):
            raise MedsegError(f"expected exactly one element (the base64 text of the NIfTI file), got {len(values)}", where)
        encoded[name] = values[0]
    return request_id, encoded


def _input_data(inp: Any) -> Any:
    if inp.data is None and getattr(inp, "_raw_data", None) is not None:
        return inp.as_numpy().ravel().tolist()
    return inp.data


def _flatten(data: Any) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, np.ndarray):
        return data.ravel().tolist()
    if isinstance(data, (list, tuple)):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item) if isinstance(item, (list, tuple, np.ndarray)) else [item])
        return out
    return [data]


def _b64decode(text: str | bytes, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # line-wrapped base64 (e.g. from the `base64` tool): drop the whitespace and try once more
        compact = "".join(text.split()) if isinstance(text, str) else b"".join(text.split())
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MedsegError(f"not valid base64 ({exc})", where) from None


def decode_case(encoded: dict[str, str | bytes], channels: list[str]) -> dict[str, Any]:
    """Base64 NIfTI per channel → ``{"images" C×I×J×K float32, "affine", "spacing", "header", "shape"}``.

    Raises :class:`MedsegError` naming the input for every client mistake.
    """
    missing = [c for c in channels if c not in encoded]
    unexpected = [n for n in encoded if n not in channels]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing channel input(s): {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected input(s): {', '.join(unexpected)}")
        raise MedsegError(f"{'; '.join(problems)} (expected one BYTES input per channel: {', '.join(channels)})")
    volumes = []
    for channel in channels:
        where = f"input '{channel}'"
        raw = _b64decode(encoded[channel], where)
        if not raw:
            raise MedsegError("empty", where)
        try:
            array, aff, hdr = load_nifti_bytes(raw, name=where)
        except MedsegError:
            raise
        except Exception as exc:  # e.g. nibabel's HeaderDataError for a garbage header: still the client's bytes
            raise MedsegError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", where) from None
        volumes.append((array, aff, hdr))
    images, affine, header = stack_channels(volumes, [f"input '{c}'" for c in channels])
    return {"images": images, "affine": affine, "spacing": list(nifti_spacing(header)), "header": header, "shape": tuple(images.shape[1:])}


def _run_predictor(predictor: Predictor | None, lock: threading.Lock, case: dict[str, Any]) -> tuple[Prediction, float]:
    if predictor is None:
        raise RuntimeError("model not loaded")
    with lock:
        start = time.perf_counter()
        prediction = predictor.predict(case["images"], case["affine"], case["spacing"])
        return prediction, time.perf_counter() - start


# --------------------------------------------------------------------------- model source
