"""KServe's gRPC V2 inference service (``inference.GRPCInferenceService``) bound to one host, under the REST limits.

KServe 0.21's own ``GRPCServer`` listens on ``[::]`` (every interface) with no option to change it, admits every
request and logs each client mistake with a traceback. :class:`GuardedGRPCServer` serves KServe's servicer
(the same data plane and model as REST) on ``host:port`` only, and :func:`make_servicer` wraps it with what the
ASGI guard (:mod:`medseg.serving.guard`) does for REST, giving the status codes a gRPC client expects:

===========================================  ======  ======================
problem                                       REST    gRPC
===========================================  ======  ======================
bad input (decode, raw contents, sizes)       400     INVALID_ARGUMENT
message above ``--max-request-mb``            413     RESOURCE_EXHAUSTED (gRPC's own receive limit)
parse memory alone above the budget           413     RESOURCE_EXHAUSTED
busy (slots or parse-memory budget taken)     503     UNAVAILABLE (+ ``retry-after`` trailing metadata)
no answer within ``--timeout``                504     DEADLINE_EXCEEDED
unknown model, or a version not serving       404     NOT_FOUND
repository load/unload                        403     PERMISSION_DENIED
===========================================  ======  ======================

Admission shares the REST guard's :class:`~medseg.serving.limits.Gate`, so both protocols together stay within
``max_concurrent + max_queue`` requests and the parse-memory budget. ``raw_input_contents`` (what
``tritonclient.grpc`` sends) are read like the REST binary extension (FP32 viewed without copying, BYTES as
length-prefixed elements) into the request's :class:`~medseg.serving.limits.Ticket`; typed ``contents`` reach
KServe's parser as Python lists and are counted at the JSON growth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any

from medseg.errors import MedsegError
from medseg.serving.decode import printable
from medseg.serving.limits import CURRENT_TICKET, PARSE_GROWTH, Gate, RequestAbandoned, ServeLimits

log = logging.getLogger(__name__)


def listen_address(host: str, port: int) -> str:
    """``host:port`` for grpc (an IPv6 literal in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def make_servicer(data_plane: Any, repository_extension: Any, gate: Gate, limits: ServeLimits, known_models: Callable[[], Collection[str]],
                  describe: Callable[[str], dict[str, Any] | None]) -> Any:
    """KServe's ``InferenceServicer`` with admission, timeout, version checks, raw-content parsing and the metadata
    of ``describe`` (the same answer as ``GET /v2/models/NAME``, as far as the protobuf message carries it)."""
    from grpc_interceptor.exceptions import (DeadlineExceeded, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
                                             Unavailable)
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.servicer import InferenceServicer

    from medseg.serving.guard import binary_tensor

    def serving_version(name: str) -> str | None:
        body = describe(name) if name in known_models() else None
        versions = (body or {}).get("versions") or []
        return str(versions[0]) if versions else None

    def check_version(name: str, version: str) -> str:
        serving = serving_version(name)
        if serving is None:
            raise NotFound(f"Model with name {printable(name)} does not exist.")
        if version and version != serving:
            raise NotFound(f"model {printable(name)} version {printable(version)} is not served here (serving: version {printable(serving)})")
        return serving

    def tensor(v: Any) -> Any:
        return pb.ModelMetadataResponse.TensorMetadata(name=str(v["name"]), datatype=str(v["datatype"]), shape=[int(s) for s in v["shape"]])

    class GuardedInferenceServicer(InferenceServicer):
        async def ModelMetadata(self, request: Any, context: Any) -> Any:
            check_version(request.name, request.version)
            body = describe(request.name) or {}
            return pb.ModelMetadataResponse(name=body["name"], versions=[str(v) for v in body.get("versions", [])], platform=body.get("platform", ""),
                                            inputs=[tensor(i) for i in body.get("inputs", [])], outputs=[tensor(o) for o in body.get("outputs", [])])

        async def ModelReady(self, request: Any, context: Any) -> Any:
            if request.version and serving_version(request.name) not in (None, request.version):
                return pb.ModelReadyResponse(ready=False)
            return await super().ModelReady(request, context)

        async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
            raise PermissionDenied("the model repository API (load/unload) is disabled on this server")

        async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
            raise PermissionDenied("the model repository API (load/unload) is disabled on this server")

        async def ModelInfer(self, request: Any, context: Any) -> Any:
            check_version(request.model_name, request.model_version)
            raw = list(request.raw_input_contents)
            growth = PARSE_GROWTH["binary" if raw or not request.inputs else "json"]
            cost = int(request.ByteSize() * growth)
            if not gate.fits_alone(cost):
                raise ResourceExhausted(f"the request of {request.ByteSize()} bytes would take about {cost / 2**20:.0f} MiB once parsed, more than "
                                        f"the server's whole parse-memory budget of {(gate.budget_bytes or 0) / 2**20:.0f} MiB (--memory-budget-mb)")
            ticket = gate.try_admit(cost)
            if ticket is None:
                retry = gate.retry_after_s()
                context.set_trailing_metadata((("retry-after", str(retry)),))
                raise Unavailable(f"the server is busy ({gate.admitted} of {gate.capacity} requests running or queued, "
                                  f"{gate.reserved_bytes / 2**20:.0f} MiB parse memory reserved); retry after {retry} s")
            abandoned = True
            token = CURRENT_TICKET.set(ticket)
            try:
                async with asyncio.timeout(limits.timeout_s):
                    if raw:
                        if len(raw) != len(request.inputs):
                            raise InvalidArgument(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents: one per input")
                        for inp, data in zip(request.inputs, raw):
                            where = f"input '{printable(inp.name)}'"
                            if inp.name in ticket.binary:
                                raise InvalidArgument(f"{where}: given more than once")
                            try:
                                ticket.binary[inp.name] = binary_tensor(data, 0, len(data), {"datatype": inp.datatype, "shape": list(inp.shape)}, where)
                            except MedsegError as exc:
                                raise InvalidArgument(f"raw_input_contents: {exc}") from None
                        del request.raw_input_contents[:]  # the tensors are in the ticket; KServe's parser would copy them again
                    answer = await super().ModelInfer(request, context)
                abandoned = False
                return raw_outputs(answer)
            except TimeoutError:
                raise DeadlineExceeded(f"no answer within {limits.timeout_s:g} s (the server's --timeout); the request was abandoned") from None
            finally:
                CURRENT_TICKET.reset(token)
                ticket.finish(abandoned=abandoned)

    return GuardedInferenceServicer(data_plane, repository_extension)


#: numpy dtype of each V2 datatype the typed ``contents`` can hold, and the ``contents`` field holding it.
_CONTENTS = {"BOOL": ("?", "bool_contents"), "INT8": ("<i1", "int_contents"), "INT16": ("<i2", "int_contents"), "INT32": ("<i4", "int_contents"),
             "INT64": ("<i8", "int64_contents"), "UINT8": ("<u1", "uint_contents"), "UINT16": ("<u2", "uint_contents"),
             "UINT32": ("<u4", "uint_contents"), "UINT64": ("<u8", "uint64_contents"), "FP32": ("<f4", "fp32_contents"),
             "FP64": ("<f8", "fp64_contents")}


def raw_outputs(response: Any) -> Any:
    """The response with every output in ``raw_output_contents`` (as Triton answers, and as ``tritonclient.grpc``
    reads numbers: it ignores typed numeric ``contents``). BYTES elements are 4-byte little-endian length-prefixed."""
    import struct

    import numpy as np

    if len(response.raw_output_contents) or not response.outputs:
        return response
    raw = []
    for out in response.outputs:
        if out.datatype == "BYTES":
            raw.append(b"".join(struct.pack("<I", len(b)) + b for b in out.contents.bytes_contents))
        else:
            dtype, field_name = _CONTENTS.get(out.datatype, ("<f4", "fp32_contents"))
            raw.append(np.asarray(list(getattr(out.contents, field_name)), dtype=dtype).tobytes())
        out.ClearField("contents")
    response.raw_output_contents.extend(raw)
    return response


def make_interceptor() -> Any:
    """KServe's exception → status interceptor, with client mistakes logged as one line (KServe logs a traceback each)."""
    from grpc import StatusCode
    from grpc_interceptor.exceptions import GrpcException
    from kserve.errors import InvalidInput, ModelNotFound
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor

    class QuietClientErrors(ExceptionToStatusInterceptor):
        async def handle_exception(self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str) -> Any:
            if isinstance(ex, (MedsegError, InvalidInput)):
                message = printable(getattr(ex, "reason", None) or ex, 2000)
                log.info("gRPC %s → INVALID_ARGUMENT: %s", method_name, printable(message, 300))
                await context.abort(StatusCode.INVALID_ARGUMENT, message)
            if isinstance(ex, ModelNotFound):
                await context.abort(StatusCode.NOT_FOUND, printable(ex.reason, 300))
            if isinstance(ex, GrpcException):
                log.info("gRPC %s → %s: %s", method_name, ex.status_code.name, printable(ex.details, 300))
                await context.abort(ex.status_code, ex.details)
            if isinstance(ex, (RequestAbandoned, asyncio.CancelledError)):
                await context.abort(StatusCode.CANCELLED, "the request was abandoned")
            await super().handle_exception(ex, request_or_iterator, context, method_name)

    return QuietClientErrors()


class GuardedGRPCServer:
    """The gRPC server of :func:`make_servicer`, listening on ``host:port`` only; ``start()`` runs until ``stop()``."""

    def __init__(self, host: str, port: int, servicer: Any, limits: ServeLimits, grace_period_s: float = 30.0):
        self.host, self.port, self.servicer, self.limits = host, port, servicer, limits
        self.grace_period_s = grace_period_s
        self._server: Any = None

    async def start(self) -> None:
        from grpc import aio
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

        # gRPC refuses larger messages itself, with RESOURCE_EXHAUSTED, before any of ours is read
        self._server = aio.server(interceptors=(make_interceptor(),),
                                  options=[("grpc.max_receive_message_length", self.limits.max_request_bytes)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self._server)
        address = listen_address(self.host, self.port)
        if self._server.add_insecure_port(address) == 0:
            raise MedsegError(f"cannot listen for gRPC on {address}")
        log.info("gRPC server listening on %s", address)
        await self._server.start()
        await self._server.wait_for_termination()

    async def stop(self, sig: int | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace=self.grace_period_s)


__all__ = ["GuardedGRPCServer", "listen_address", "make_interceptor", "make_servicer"]
