"""The KServe predictor: a model package of any task behind the Open Inference Protocol (V2) and KServe's V1 protocol.

One class, :class:`MedsegModel`, serves every task; what the endpoint takes and answers comes from the package's
task (:class:`~medseg.serving.contract.Contract`), listed by ``GET /v2/models/NAME`` (:meth:`MedsegModel.get_input_types`,
:meth:`MedsegModel.get_output_types`, :meth:`MedsegModel.metadata`). Details and examples are in the README's wire
contract; input formats in :mod:`medseg.serving.decode` and :mod:`medseg.serving.image2d`.

Requests:

- ``POST /v2/models/NAME/infer``: one BYTES input per channel (named as the model's channels), each one element,
  the ``.nii``/``.nii.gz`` file (base64 in JSON, raw bytes with the binary extension); or one FP32 input ``volume``
  ``[C, Z, Y, X]`` with ``affine`` (and ``spacing``) parameters, in JSON or binary. A 2D slice-set model also takes
  one BYTES input ``image``: a PNG or TIFF picture whose colour channels are its channels. A classifier taking
  covariates gets them as named inputs (``age``: FP32 ``[1]``, years) or request parameters.
- ``POST /v1/models/NAME:predict``: ``{"instances": [{"<channel>": "<base64>", ..., "age": 71}]}`` (one case).

Responses (V2), by task:

- segmentation: ``segmentation`` (BYTES ``[1]``: base64 of a ``.nii.gz`` label map in the input's geometry, or for a
  picture the mask in its format; output parameter ``format``) and ``volumes_ml`` (FP32, one value per reported
  group, named in the output parameter ``regions``);
- classification: ``probabilities`` (FP32 ``[K]``, the class names in the output parameter ``classes``) and ``label``
  (BYTES ``[1]``, the most probable class name as text).

Response parameters ``model_name`` and ``model_version``. V1: ``{"predictions": [{"segmentation", "volumes_ml":
{group: ml}}]}`` or ``{"predictions": [{"probabilities": {class: p}, "label": name}]}``, with ``model_name`` and
``model_version``. Both carry the header ``x-model-version``: the version that answered (each request runs on the
version serving when it started, see :mod:`medseg.serving.reload`).

A client mistake answers 400 with a message naming the input and the problem; the server keeps serving.
Decoding, inference and encoding run in worker threads (inference in at most ``max_concurrent`` at once),
so the event loop stays free for health checks and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.predictor import Prediction
from medseg.io import nifti_to_bytes
from medseg.serving import import_kserve
from medseg.serving.decode import Case, DecodedRequest, decode_case, decode_request, request_tensors
from medseg.serving.image2d import encode_mask
from medseg.serving.drift import drift_zscores, observe_drift
from medseg.serving.limits import CURRENT_TICKET, RequestAbandoned, ServeLimits, run_in_worker
from medseg.serving.metrics import (INFERENCE_SECONDS, INFLIGHT, INPUT_VOXELS, MODEL_RELOADS, REQUESTS,
                                    STAGE_SECONDS)
from medseg.serving.reload import ServedVersion, ensure_poller, load_served_version, needs_reload, publish_version, retire

kserve = import_kserve()
from kserve.errors import InvalidInput  # noqa: E402  (after the guarded kserve import)
from kserve.protocol.infer_type import InferOutput, InferResponse  # noqa: E402

log = logging.getLogger(__name__)

__all__ = ["MedsegModel", "SegmentationModel", "decode_case"]

VERSION_HEADER = "x-model-version"


class MedsegModel(kserve.Model):
    """``MedsegModel(name, model_uri)``; ``load()`` before serving, ``load()`` again to reload. Serves a model
    package of any task (segmentation, 2D slice sets, classification) with the contract its task gives.

    ``model_uri``: a model package folder, or an MLflow registry URI ``models:/NAME@ALIAS`` /
    ``models:/NAME/VERSION`` whose MLflow model holds the package under ``artifacts/model_package/``.
    ``limits``: voxel limit, inference slots and alias polling interval (default: no polling).
    """

    def __init__(self, name: str, model_uri: str | Path, device: str = "auto", download_dir: str | Path | None = None,
                 limits: ServeLimits | None = None, backend: str | None = None):
        super().__init__(name, return_response_headers=True)
        self.model_uri = str(model_uri)
        self.device = device
        self.backend = backend  # torch | onnx | auto; None: MEDSEG_INFERENCE_BACKEND, else auto (medseg.inference.predictor)
        self.download_dir = download_dir
        self.limits = limits or ServeLimits(reload_interval_s=0.0)
        self.served: ServedVersion | None = None  # swapped as a whole; a request reads it once
        self.model_version: str | None = None
        self.package_dir: Path | None = None
        self.channels: list[str] = []
        self.regions: list[str] = []
        self.poller: Any = None
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)  # the volumes are large, the cores few
        self._load_lock = threading.Lock()

    def load(self) -> bool:
        """Load the version ``model_uri`` points to beside the one serving and swap; a no-op if it has not moved."""
        with self._load_lock:
            current = self.served
            try:
                if needs_reload(self.model_uri, current):
                    new = load_served_version(self.model_uri, self.device, self.download_dir, self.backend)
                    self.served = new  # the swap: requests that started before keep the bundle they read
                    self.model_version, self.package_dir, self.channels, self.regions = new.version, new.package_dir, new.channels, new.regions
                    publish_version(self.name, new)
                    if current is not None:
                        MODEL_RELOADS.labels(model=self.name, outcome="swapped").inc()
                        log.info("model %s: version %s replaced by %s", self.name, current.version, new.version)
                        retire(current)
            except Exception:
                if current is not None:
                    MODEL_RELOADS.labels(model=self.name, outcome="failed").inc()
                raise
            self.ready = True
            self.poller = ensure_poller(self, self.limits.reload_interval_s)
        return self.ready

    # -------------------------------------------------------------- GET /v2/models/NAME
    def get_input_types(self) -> list[dict[str, Any]]:
        """The V2 metadata of the inputs (KServe's dataplane answers the model metadata route with it)."""
        served = self.served
        return [] if served is None else [dict(i) for i in served.contract.inputs]

    def get_output_types(self) -> list[dict[str, Any]]:
        served = self.served
        return [] if served is None else [dict(o) for o in served.contract.outputs]

    def metadata(self) -> dict[str, Any] | None:
        """The whole model metadata answer (inputs and outputs with their ``parameters`` and ``optional`` flags, which
        KServe's own response model drops, and model-level parameters); None before the first load."""
        served = self.served
        return None if served is None else served.metadata(self.name)

    # -------------------------------------------------------------- inference
    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
        served = self.served
        INFLIGHT.labels(model=self.name).inc()
        start = time.perf_counter()
        try:
            if served is None:
                raise RuntimeError("model not loaded")
            ticket = CURRENT_TICKET.get()
            request = request_tensors(payload, headers, ticket.binary if ticket is not None else None)
            case, zscores = await run_in_worker(_decode_and_measure, request, served, self.limits.max_voxels)
        except BaseException as exc:
            raise _failed(self.name, exc) from None
        INPUT_VOXELS.labels(model=self.name).observe(float(np.prod(case.shape)))
        observe_drift(self.name, zscores)
        STAGE_SECONDS.labels(model=self.name, stage="preprocess").observe(time.perf_counter() - start)
        return {"case": case, "request": request, "served": served}

    async def predict(self, payload: dict[str, Any], headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            prediction, waited, seconds = await run_in_worker(_run_predictor, payload["served"], self._slots, payload["case"])
        except BaseException as exc:
            raise _failed(self.name, exc) from None
        STAGE_SECONDS.labels(model=self.name, stage="queue").observe(waited)
        STAGE_SECONDS.labels(model=self.name, stage="predict").observe(seconds)
        INFERENCE_SECONDS.labels(model=self.name).observe(seconds)
        return {**payload, "prediction": prediction}

    async def postprocess(self, result: dict[str, Any], headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> InferResponse | dict[str, Any]:
        start = time.perf_counter()
        try:
            served: ServedVersion = result["served"]
            case: Case = result["case"]
            encoded = await run_in_worker(_encode_answer, result["prediction"], case, served)
            response = _response(self.name, served, result["request"], result["prediction"], encoded, case)
            if response_headers is not None:
                response_headers[VERSION_HEADER] = served.version
        except BaseException as exc:
            raise _failed(self.name, exc) from None
        REQUESTS.labels(model=self.name, status="2xx").inc()
        INFLIGHT.labels(model=self.name).dec()
        STAGE_SECONDS.labels(model=self.name, stage="postprocess").observe(time.perf_counter() - start)
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
    if isinstance(exc, (RequestAbandoned, asyncio.CancelledError)):
        return exc  # the guard answered (504) or the client left: counted there, not here
    if isinstance(exc, Exception):
        REQUESTS.labels(model=model_name, status="5xx").inc()
        log.exception("model %s: request failed", model_name, exc_info=exc)
    return exc


def _decode_and_measure(request: DecodedRequest, served: ServedVersion, max_voxels: int) -> tuple[Case, dict[str, float]]:
    """Decode the case (all checks) and its drift z-scores; runs in a worker thread."""
    case = decode_request(request, served.contract.input_spec(), max_voxels, served.target_spacing)
    zscores = drift_zscores(case.images, served.channels, served.drift) if served.drift is not None else {}
    return case, zscores


def _run_predictor(served: ServedVersion, slots: threading.BoundedSemaphore, case: Case) -> tuple[Prediction | dict[str, float], float, float]:
    """``(answer, seconds waited for a slot, seconds in the predictor)``: a :class:`Prediction` (segmentation) or the
    class probabilities (classification); skips the work if the request timed out meanwhile."""
    queued = time.perf_counter()
    with slots:
        ticket = CURRENT_TICKET.get()
        if ticket is not None and ticket.abandoned:
            raise RequestAbandoned("the request timed out while queued")
        start = time.perf_counter()
        predictor = served.predictor
        if served.contract.is_classification:
            age = case.covariates.get("age") if predictor.uses_age else None
            answer: Prediction | dict[str, float] = predictor.predict_class(case.images, case.affine, case.spacing, age)
        else:
            answer = predictor.predict(case.images, case.affine, case.spacing)
        return answer, start - queued, time.perf_counter() - start


def _encode_answer(prediction: Prediction | dict[str, float], case: Case, served: ServedVersion) -> tuple[bytes, str] | None:
    """The segmentation file and its format: the mask in the picture's format for a 2D picture, else ``.nii.gz`` in
    the input's geometry; None for a classifier (nothing to encode)."""
    if not isinstance(prediction, Prediction):
        return None
    if case.image2d is not None:
        return encode_mask(prediction.segmentation, case.image2d, served.contract.foreground), case.image2d.format
    return nifti_to_bytes(prediction.segmentation.astype(np.uint8), prediction.affine, case.header), "nii.gz"


def _response(model_name: str, served: ServedVersion, request: DecodedRequest, prediction: Prediction | dict[str, float],
              encoded: tuple[bytes, str] | None, case: Case | None = None) -> InferResponse | dict[str, Any]:
    """The V2 ``InferResponse`` or, for a V1 ``instances`` request, the V1 ``{"predictions": [...]}`` body."""
    if isinstance(prediction, Prediction):
        assert encoded is not None
        seg_text = base64.b64encode(encoded[0]).decode("ascii")
        groups = list(prediction.volumes_ml)
        volumes = [float(prediction.volumes_ml[g]) for g in groups]
        if request.protocol == "v1":
            item: dict[str, Any] = {"segmentation": seg_text, "volumes_ml": dict(zip(groups, volumes))}
            if encoded[1] != "nii.gz":
                item["format"] = encoded[1]
            return {"predictions": [item], "model_name": model_name, "model_version": served.version}
        outputs = [
            InferOutput(name="segmentation", shape=[1], datatype="BYTES", data=[seg_text], parameters={"format": encoded[1]}),
            InferOutput(name="volumes_ml", shape=[len(groups)], datatype="FP32", data=volumes, parameters={"regions": ",".join(groups)}),
        ]
    else:
        classes = list(served.contract.classes) or list(prediction)
        probs = [float(prediction[c]) for c in classes]
        label = classes[int(np.argmax(probs))]
        if request.protocol == "v1":
            return {"predictions": [{"probabilities": dict(zip(classes, probs)), "label": label}], "model_name": model_name,
                    "model_version": served.version}
        outputs = [
            InferOutput(name="probabilities", shape=[len(classes)], datatype="FP32", data=probs, parameters={"classes": ",".join(classes)}),
            InferOutput(name="label", shape=[1], datatype="BYTES", data=[label]),
        ]
    return InferResponse(
        response_id=request.request_id,  # never None: a None id resets the connection
        model_name=model_name,
        model_version=served.version,
        infer_outputs=outputs,
        parameters={"model_name": model_name, "model_version": served.version},
    )


#: The name this class had when it served segmentation only (kept for callers and tests).
SegmentationModel = MedsegModel
