"""The ASGI guard in front of KServe's REST app: size limit, admission, timeout, binary extension, JSON errors.

KServe 0.21 builds its FastAPI app (``kserve.model_server.app``) at import and uvicorn serves it;
:func:`medseg.serving.server.make_model_server` hands uvicorn ``ServingGuard(app)`` instead, so every
request passes here first. For the inference routes (``POST /v2/models/NAME/infer``,
``POST /v1/models/NAME:predict``), in this order, before any heavy work:

1. Content-Type must be JSON or absent (``tritonclient.http`` sends none with JSON bodies; the binary extension is
   recognised by its ``Inference-Header-Content-Length`` header) → else 415.
2. ``Content-Length`` above ``max_request_bytes`` → 413 (a body sent without a length is counted while read).
3. Admission: at most ``max_concurrent + max_queue`` requests in the server, and their bodies' bytes times the
   parse growth of their encoding (:data:`~medseg.serving.limits.PARSE_GROWTH`) within the memory budget → else
   503 with ``Retry-After`` (load shedding: the only 5xx a client can cause, and a retryable one). A body whose
   parse memory alone exceeds the budget → 413 (never admissible; the binary extension needs far less).
4. From here ``timeout_s`` runs: reading the body, decoding, waiting, predicting, encoding → else 504.
5. Binary tensor extension (``Inference-Header-Content-Length``): the guard splits the JSON header from the
   binary tail itself (``numpy.frombuffer``, no copy for FP32; length-prefixed elements for BYTES), checks every
   declared size against the body, and passes KServe a small JSON request whose binary inputs have empty
   ``data``; the model reads the tensors from the request's :class:`~medseg.serving.limits.Ticket`. (KServe's
   own parser turns every tensor into Python lists: seconds for one volume, and 500 for malformed sizes.)

Also: the version routes (``/v2/models/NAME/versions/V``, ``.../ready``, ``.../infer``) are the unversioned ones
when V is the version serving, else 404 naming it (KServe would answer 501); ``:explain`` answers 404; the model
repository routes (``/v2/repository/...``: load, unload, index) answer 403: nobody on the data plane may unload
the model or make it load another version (alias moves reach the server through ``--reload-interval``). ``GET /v2/models/NAME`` (the model metadata)
is answered from the model's own ``metadata()`` when ``describe`` is given: KServe's route answers from the same
``get_input_types()``/``get_output_types()`` but its response model keeps only name, datatype and shape of each
tensor, and the clients need the inputs' ``optional`` flags and the outputs' ``parameters`` (class names, groups). :func:`install_error_handlers` makes
FastAPI's own errors JSON ``{"error": ...}`` too (422 validation errors become 400, without echoing the body).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import struct
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.serving.decode import printable
from medseg.serving.limits import CURRENT_TICKET, PARSE_GROWTH, Gate, ServeLimits, Ticket
from medseg.serving.memory import HeapTrimmer
from medseg.serving.metrics import ADMITTED, ADMITTED_BYTES, REJECTED, REQUESTS

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BINARY_HEADER = "inference-header-content-length"
DRAIN_EXTRA_BYTES = 64 * 1024 * 1024  # read (and drop) up to this much beyond the limit so the client sees the 413
DRAIN_SECONDS = 10.0

_V2_INFER = re.compile(r"^/v2/models/([^/]+)/infer/?$")
_V1_PREDICT = re.compile(r"^/v1/models/([^/]+):predict/?$")
_V2_VERSIONED = re.compile(r"^/v2/models/([^/]+)/versions/([^/]*)(/.*)?$")
_V1_EXPLAIN = re.compile(r"^/v1/models/([^/]+):explain/?$")
_REPOSITORY = re.compile(r"^/v2/repository(/|$)")
_V2_MODEL = re.compile(r"^/v2/models/([^/]+)/?$")


class ClientGone(Exception):
    """The client disconnected before its body was read."""


class ServingGuard:
    """ASGI middleware: ``ServingGuard(app, limits, known_models, describe)``; ``known_models()`` → the names served
    now; ``describe(name)`` → the model metadata answer of ``GET /v2/models/NAME`` (None: KServe answers)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limits: ServeLimits, known_models: Callable[[], Collection[str]],
                 describe: Callable[[str], dict[str, Any] | None] | None = None):
        self.app = app
        self.limits = limits
        self.known_models = known_models
        self.describe = describe
        self.heap_trimmer = HeapTrimmer()
        budget, source = limits.memory_budget()
        self.gate = Gate(limits.capacity, on_change=ADMITTED.set, on_release=self.heap_trimmer.request, budget_bytes=budget,
                         on_bytes=ADMITTED_BYTES.set)
        log.info("parse-memory budget for admitted bodies: %.0f MiB (%s)", budget / 2**20, source)
        self._handlers_installed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._handlers_installed:
            # First call (the lifespan startup, else the first request): KServe has registered its exception handlers
            # by now (RESTServer.create_application) and FastAPI builds its stack later, on its own first call.
            if hasattr(self.app, "add_exception_handler"):
                install_error_handlers(self.app)
            self._handlers_installed = True
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        versioned = _V2_VERSIONED.match(path)
        if versioned:
            name, version, rest = versioned.group(1), versioned.group(2), versioned.group(3) or ""
            if rest not in ("", "/", "/ready", "/infer"):
                await _json_error(send, 404, "Not Found")
                return
            serving = self.serving_version(name)
            if serving is None or version != serving:
                await _json_error(send, 404, f"model {printable(name)} version {printable(version)} is not served here"
                                             + (f" (serving: version {printable(serving)})" if serving is not None else ""))
                return
            path = f"/v2/models/{name}{rest.rstrip('/')}"  # the served version: the unversioned route answers
            scope = {**scope, "path": path, "raw_path": path.encode("utf-8")}
        if _V1_EXPLAIN.match(path):
            await _json_error(send, 404, "this model server offers no explanations (:explain)")
            return
        if _REPOSITORY.match(path):
            await _json_error(send, 403, "the model repository API (load/unload) is disabled on this server: the served version "
                                         "changes only when its registry alias moves")
            return
        described = _V2_MODEL.match(path)
        if described and method == "GET" and self.describe is not None:
            body = self.describe(described.group(1))
            if body is not None:
                version = str((body.get("parameters") or {}).get("model_version") or "")
                await _json_answer(send, 200, body, [(b"x-model-version", version.encode("latin-1", "replace"))] if version else None)
                return
        infer = _V2_INFER.match(path) or _V1_PREDICT.match(path)
        if infer and method == "POST":
            await self._inference(scope, receive, send, infer.group(1), v2=path.startswith("/v2/"))
            return
        await self.app(scope, receive, send)

    def serving_version(self, name: str) -> str | None:
        """The version of ``name`` serving now (None: not ours or not loaded)."""
        body = self.describe(name) if self.describe is not None else None
        versions = (body or {}).get("versions") or []
        return str(versions[0]) if versions else None

    async def _inference(self, scope: Scope, receive: Receive, send: Send, model: str, v2: bool) -> None:
        label = model if model in self.known_models() else None  # unknown names never become metric labels
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.limits.max_request_bytes
        binary = v2 and BINARY_HEADER in headers
        content_type = headers.get("content-type")
        if not binary and not _json_content_type(content_type, v2):
            await _drain(receive, limit)
            await self._refuse(send, label, 415, "bad_content_type",
                               f"Content-Type {printable(content_type) if content_type else '(none)'}: send application/json"
                               + (" (or the binary tensor extension with the Inference-Header-Content-Length header)" if v2 else ""))
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            if declared.isdigit() and int(declared) <= limit + DRAIN_EXTRA_BYTES:
                await _drain(receive, int(declared))
            await self._refuse(send, label, 413, "too_large", _too_large(declared, limit))
            return
        growth = PARSE_GROWTH["binary" if binary else "json"]
        cost = int(int(declared) * growth) if declared is not None else 0  # no length: counted once read
        if not self.gate.fits_alone(cost):
            await _drain(receive, int(declared or 0))
            await self._refuse(send, label, 413, "too_large", _over_budget(int(declared or 0), cost, self.gate.budget_bytes or 0, binary))
            return
        ticket = self.gate.try_admit(cost)
        if ticket is None:
            await _drain(receive, limit)
            await self._busy(send, label)
            return
        started = {"response": False}

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        abandoned = True
        token = CURRENT_TICKET.set(ticket)
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                body = await _read_body(receive, limit)
                if body is None:
                    await _drain(receive, DRAIN_EXTRA_BYTES)
                    await self._refuse(send_tracked, label, 413, "too_large", _too_large(None, limit))
                    abandoned = False
                    return
                if declared is None and not self.gate.try_reserve(ticket, int(len(body) * growth)):
                    await (self._busy(send_tracked, label) if self.gate.fits_alone(int(len(body) * growth)) else
                           self._refuse(send_tracked, label, 413, "too_large",
                                        _over_budget(len(body), int(len(body) * growth), self.gate.budget_bytes or 0, binary)))
                    abandoned = False
                    return
                first = _leading_space(body)
                if v2 and not binary and body[first:first + 1] != b"{":
                    await self._refuse(send_tracked, label, 400, "not_an_object", "the V2 request body must be a JSON object {\"inputs\": [...]}")
                    abandoned = False
                    return
                if binary:
                    try:
                        body = rewrite_binary_request(body, headers[BINARY_HEADER], ticket)
                    except MedsegError as exc:
                        await self._refuse(send_tracked, label, 400, "bad_binary", f"binary tensor extension: {exc}")
                        abandoned = False
                        return
                    scope = {**scope, "headers": _json_headers(scope.get("headers", []), len(body))}
                elif content_type is None:  # KServe's V2 route reads JSON only when told so
                    scope = {**scope, "headers": _json_headers(scope.get("headers", []), len(body))}
                await self.app(scope, _replay(body, receive), send_tracked)
                abandoned = False
        except ClientGone:
            log.info("client gone before its request to %s was read", printable(model))
        except TimeoutError:
            log.warning("request to %s timed out after %.0f s", printable(model), self.limits.timeout_s)
            if not started["response"]:
                await self._refuse(send, label, 504, "timeout",
                                   f"no answer within {self.limits.timeout_s:g} s (the server's --timeout); the request was abandoned")
        finally:
            CURRENT_TICKET.reset(token)
            ticket.finish(abandoned=abandoned)

    async def _busy(self, send: Send, label: str | None) -> None:
        retry = self.gate.retry_after_s()
        budget = self.gate.budget_bytes
        await self._refuse(send, label, 503, "overloaded",
                           f"the server is busy ({self.gate.admitted} of {self.gate.capacity} requests running or queued: --max-concurrent "
                           f"{self.limits.max_concurrent} + --max-queue {self.limits.max_queue}"
                           + (f"; {self.gate.reserved_bytes / 2**20:.0f} of {budget / 2**20:.0f} MiB parse memory reserved, --memory-budget-mb"
                              if budget is not None else "") + f"); retry after {retry} s",
                           extra_headers=[(b"retry-after", str(retry).encode())])

    async def _refuse(self, send: Send, label: str | None, status: int, reason: str, message: str,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        if label is not None:
            REJECTED.labels(model=label, reason=reason).inc()
            REQUESTS.labels(model=label, status=f"{status // 100}xx").inc()
        await _json_error(send, status, message, extra_headers)


# --------------------------------------------------------------------------- binary tensor extension
def rewrite_binary_request(body: bytes, json_length: str, ticket: Ticket) -> bytes:
    """Split a binary-extension body: tensors into ``ticket.binary`` (by input name), a JSON request for KServe back.

    FP32 tensors become read-only float32 arrays of the declared shape viewing ``body``; BYTES tensors lists of
    ``bytes`` (the 4-byte little-endian length-prefixed elements). List or object parameter values become JSON
    text (V2 parameters are scalars). Raises :class:`MedsegError` for every inconsistency.
    """
    text = json_length.strip()
    if not text.isdigit():
        raise MedsegError(f"the Inference-Header-Content-Length header {printable(text)!r} is not a byte count")
    length = int(text)
    if not 0 < length <= len(body):
        raise MedsegError(f"Inference-Header-Content-Length is {length}, the body has {len(body)} bytes")
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError) as exc:
        raise MedsegError(f"the first {length} bytes are not a JSON object ({printable(exc, 100)})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise MedsegError("the JSON header must be an object with an \"inputs\" list")
    offset = length
    for n, inp in enumerate(header["inputs"]):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not isinstance(inp.get("datatype"), str):
            raise MedsegError(f"inputs[{n}] must be an object with a string name and datatype")
        name = inp["name"]
        where = f"input '{printable(name)}'"
        params = inp.get("parameters")
        if params is None:
            params = inp["parameters"] = {}
        if not isinstance(params, dict):
            raise MedsegError(f"{where}: 'parameters' must be an object")
        if "binary_data_size" in params:
            size = params.pop("binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise MedsegError(f"{where}: binary_data_size {printable(size)!r} is not a byte count")
            if "data" in inp:
                raise MedsegError(f"{where}: both 'data' and binary_data_size")
            if offset + size > len(body):
                raise MedsegError(f"{where}: binary_data_size {size}, but only {len(body) - offset} bytes remain in the body")
            if name in ticket.binary:
                raise MedsegError(f"{where}: given more than once")
            ticket.binary[name] = binary_tensor(body, offset, size, inp, where)
            inp["data"] = []
            offset += size
        inp["parameters"] = _scalar_parameters(params)
    if offset != len(body):
        raise MedsegError(f"{len(body) - offset} bytes after the declared binary data (the binary_data_size values add up to {offset - length})")
    if isinstance(header.get("parameters"), dict):
        header["parameters"] = _scalar_parameters(header["parameters"])
    return json.dumps(header).encode("utf-8")


def binary_tensor(body: bytes, offset: int, size: int, inp: dict[str, Any], where: str) -> Any:
    """The tensor in ``body[offset:offset + size]`` of input ``inp`` (its ``datatype`` and ``shape``): a read-only
    float32 view for FP32, a list of ``bytes`` for BYTES (4-byte little-endian length prefixes). Shared by the REST
    binary extension and gRPC's ``raw_input_contents``; raises :class:`MedsegError` naming ``where``."""
    datatype = inp["datatype"].upper()
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise MedsegError(f"{where}: shape {printable(shape)} must be a list of sizes >= 0")
    count = math.prod(shape)
    if datatype == "FP32":
        if count * 4 != size:
            raise MedsegError(f"{where}: shape {shape} holds {count} FP32 values = {count * 4} bytes, binary_data_size is {size}")
        return np.frombuffer(body, dtype="<f4", count=count, offset=offset).reshape(shape)
    if datatype == "BYTES":
        elements = []
        pos, end = offset, offset + size
        while pos < end:
            if pos + 4 > end:
                raise MedsegError(f"{where}: a BYTES element's 4-byte length prefix is cut off")
            (n,) = struct.unpack_from("<I", body, pos)
            pos += 4
            if pos + n > end:
                raise MedsegError(f"{where}: a BYTES element declares {n} bytes, {end - pos} remain in the tensor")
            elements.append(body[pos:pos + n])
            pos += n
        if len(elements) != count:
            raise MedsegError(f"{where}: shape {shape} holds {count} elements, the binary data {len(elements)}")
        return elements
    raise MedsegError(f"{where}: binary data is accepted for FP32 (the volume) and BYTES (NIfTI files) inputs, not {printable(datatype, 20)}")


def _scalar_parameters(params: dict[str, Any]) -> dict[str, Any]:
    return {str(k): (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items() if v is not None}


# --------------------------------------------------------------------------- ASGI helpers
def _json_content_type(value: str | None, v2: bool) -> bool:
    if value is None:
        return True  # tritonclient.http sends JSON without a Content-Type; the guard tells KServe it is JSON
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or (not v2 and media == "application/octet-stream")


_SPACE = re.compile(rb"[ \t\r\n]*")


def _leading_space(body: bytes) -> int:
    match = _SPACE.match(body)
    return match.end() if match else 0


def _over_budget(body_bytes: int, cost: int, budget: int, binary: bool) -> str:
    hint = "" if binary else "; the same case over the binary tensor extension takes 7-10x less"
    return (f"request body of {body_bytes} bytes would take about {cost / 2**20:.0f} MiB once parsed, more than the server's whole "
            f"parse-memory budget of {budget / 2**20:.0f} MiB (--memory-budget-mb){hint}")


def _too_large(declared: str | None, limit: int) -> str:
    size = f"{printable(declared)} bytes" if declared and declared.isdigit() else "the body"
    return f"request body too large: {size}, more than the limit of {limit} bytes ({limit / 2**20:g} MiB, --max-request-mb)"


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _drain(receive: Receive, max_bytes: int) -> None:
    """Read and drop up to ``max_bytes`` of the body (for a few seconds at most), so the client can read the refusal."""
    total = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while total <= max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                total += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


def _json_headers(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    drop = {b"content-length", b"content-type", BINARY_HEADER.encode(), b"transfer-encoding"}
    kept = [(k, v) for k, v in headers if k.lower() not in drop]
    return [*kept, (b"content-type", b"application/json"), (b"content-length", str(length).encode())]


async def _json_error(send: Send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _json_answer(send, status, {"error": message}, extra_headers)


async def _json_answer(send: Send, status: int, content: Any, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(content).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def install_error_handlers(app: Any) -> None:
    """JSON ``{"error": ...}`` for FastAPI's own errors: request validation (400 instead of 422, without echoing the
    body) and HTTP errors such as 404 unknown route / 405 wrong method (status kept). Client mistakes KServe
    signals (``InvalidInput`` 400, ``ModelNotFound`` 404) are logged as one line instead of a traceback each."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve.errors import InvalidInput, ModelNotFound
    from starlette.exceptions import HTTPException

    async def client_mistake(request: Any, exc: Exception) -> JSONResponse:
        if isinstance(exc, ModelNotFound):
            status, message = 404, f"Model with name {printable(request.path_params.get('model_name', '?'))} does not exist."
        else:
            status, message = 400, printable(exc, 2000)
        log.info("%s %s → %d: %s", request.method, printable(request.url.path, 120), status, printable(message, 300))
        return JSONResponse(status_code=status, content={"error": message})

    async def validation_error(_: Any, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(printable(p, 40) for p in err.get("loc", ()))
            problems.append(f"{loc}: {printable(err.get('msg', ''), 200)}")
        more = f" (and {len(exc.errors()) - 5} more)" if len(exc.errors()) > 5 else ""
        return JSONResponse(status_code=400, content={"error": "invalid request: " + "; ".join(problems) + more})

    async def http_error(_: Any, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": printable(exc.detail, 500)}, headers=getattr(exc, "headers", None))

    app.add_exception_handler(InvalidInput, client_mistake)
    app.add_exception_handler(ModelNotFound, client_mistake)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
