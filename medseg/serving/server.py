"""Run the real KServe ``ModelServer`` (REST, and gRPC with ``--grpc-port``; one worker) for one model, bound to one host.

KServe 0.21's REST server always builds its uvicorn config with ``host="0.0.0.0"``. ``ModelServer.start()``
creates that REST server, then calls ``setup_event_loop()``, and only then runs the event loop that
binds the socket. :class:`HostBoundModelServer` (built lazily, see :func:`make_model_server`) overrides that
hook to set the uvicorn config's host before anything listens, and refuses to run if KServe's own gRPC or
multi-process server was configured (those would bind every interface); gRPC is served instead by
:class:`~medseg.serving.grpc_server.GuardedGRPCServer` on the same host, same event loop, same data plane and the
same admission gate as REST. Default host: 127.0.0.1.
The same hook hands uvicorn the :class:`~medseg.serving.guard.ServingGuard` wrapping KServe's app (limits,
admission, timeout, binary extension), and the model repository is :func:`~medseg.serving.reload.make_repository`'s
(its load() reloads in process; the guard refuses the repository routes: 403).

``medseg serve --model URI --name NAME [--host 127.0.0.1] [--port 8080] [--grpc-port 0] [--max-request-mb 200]
[--max-voxels N] [--max-concurrent 1] [--max-queue 4] [--timeout 300] [--reload-interval 60] [--memory-budget-mb 0]``; each limit also reads a
``MEDSEG_SERVE_*`` environment variable (see :mod:`medseg.serving.limits`). Tests and local runs use
:func:`start_server_process`, :func:`wait_until_ready` and :func:`stop_server`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from medseg.errors import MedsegError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: gRPC is off unless asked for (0): one port fewer to expose and secure where only REST is routed (KServe's
#: ingress and the medseg client speak REST); the InferenceService's gRPC port is 8081 when enabled.
DEFAULT_GRPC_PORT = 0


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on ``host`` right now (bind to port 0 and read what the OS chose)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_model_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, limits: Any = None, grpc_port: int = DEFAULT_GRPC_PORT) -> Any:
    """A ``kserve.ModelServer`` (1 worker) whose REST server listens on ``host`` only, behind the
    :class:`~medseg.serving.guard.ServingGuard` with ``limits`` (a :class:`~medseg.serving.limits.ServeLimits`;
    default: from the environment); with ``grpc_port`` > 0 also KServe's gRPC V2 service on ``host:grpc_port``
    under the same limits (:mod:`medseg.serving.grpc_server`)."""
    from medseg.serving import import_kserve
    from medseg.serving.guard import ServingGuard
    from medseg.serving.limits import ServeLimits
    from medseg.serving.reload import make_repository

    kserve = import_kserve()
    limits = limits or ServeLimits.resolve()

    class HostBoundModelServer(kserve.ModelServer):
        def __init__(self, host: str, **kwargs: Any):
            super().__init__(**kwargs)
            self.host = host

        def setup_event_loop(self) -> None:
            # Called by start() after the REST server object exists and before the loop runs it.
            if self._grpc_server is not None or self._rest_multiprocess_server is not None or self._rest_server is None:
                raise RuntimeError("HostBoundModelServer serves REST with one worker only (gRPC/multi-process would bind all interfaces)")
            from kserve.model_server import app

            config = self._rest_server.config
            config.host = self.host
            known = lambda: self.registered_models.get_models().keys()  # noqa: E731
            guard = ServingGuard(app, limits, known_models=known, describe=self.describe)
            config.app = guard
            log.info("REST server will listen on %s:%d (limits: %s)", self.host, self.http_port, limits)
            if grpc_port > 0:
                from medseg.serving.grpc_server import GuardedGRPCServer, make_servicer

                servicer = make_servicer(self.dataplane, self.model_repository_extension, guard.gate, limits, known, self.describe)
                self._grpc_server = GuardedGRPCServer(self.host, grpc_port, servicer, limits, grace_period_s=self.grace_period)
                self.servers.append(self._grpc_server.start())  # KServe's stop() stops it on SIGTERM
            super().setup_event_loop()

        def describe(self, name: str) -> dict[str, Any] | None:
            """``GET /v2/models/NAME``: the model's full metadata (None: not ours or not loaded; KServe answers)."""
            model = self.registered_models.get_model(name)
            metadata = getattr(model, "metadata", None)
            return metadata() if callable(metadata) and getattr(model, "ready", False) else None

    return HostBoundModelServer(host=host, http_port=port, enable_grpc=False, workers=1, registered_models=make_repository())


def serve(model_uri: str, name: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "auto", limits: Any = None,
          grpc_port: int = DEFAULT_GRPC_PORT, backend: str | None = None) -> None:
    """Load the model (package folder or ``models:/NAME@ALIAS``) and serve it until SIGTERM/SIGINT (gRPC too if ``grpc_port`` > 0).
    ``backend``: torch, onnx or auto (None: ``MEDSEG_INFERENCE_BACKEND``, else auto; see :mod:`medseg.inference.predictor`)."""
    from medseg.serving.limits import ServeLimits
    from medseg.serving.memory import configure_allocator
    from medseg.serving.model import MedsegModel

    limits = limits or ServeLimits.resolve()
    configure_allocator()  # before the model's arrays are allocated: large arrays go back to the OS when freed
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("model server listening on %s: reachable from other machines (no authentication)", host)
    server = make_model_server(host, port, limits, grpc_port=grpc_port)  # configures KServe logging first, so load() logs show
    model = MedsegModel(name, model_uri, device=device, limits=limits, backend=backend)
    model.load()
    server.start([model])


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medseg serve``."""
    from medseg.serving.limits import env_help  # light: no kserve/torch import at CLI start-up

    parser.add_argument("--model", required=True, help="model package folder, or models:/NAME@ALIAS or models:/NAME/VERSION (MLflow registry)")
    parser.add_argument("--name", required=True, help="model name on the endpoint: /v2/models/NAME/infer")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}; 0.0.0.0 inside a container)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default: {DEFAULT_PORT})")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help="also serve KServe's gRPC V2 inference service on this port, same host and limits (default: 0 = off)")
    parser.add_argument("--device", default="auto", help="device: auto, cpu, cuda (torch also mps) (default: auto)")
    parser.add_argument("--backend", default=None, choices=("auto", "torch", "onnx"),
                        help="what runs the network: torch (the weights; every network), onnx (the package's network.onnx in ONNX Runtime; "
                             "segmentation U-Nets, no torch needed) or auto: torch when installed, else onnx "
                             "(default: $MEDSEG_INFERENCE_BACKEND, else auto)")
    parser.add_argument("--max-request-mb", type=float, default=None, help=f"largest request body in MiB; larger → 413 {env_help('max_request_mb')}")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help=f"largest volume in voxels per channel, as sent and after resampling to the model's spacing; larger → 400 {env_help('max_voxels')}")
    parser.add_argument("--max-concurrent", type=int, default=None, help=f"inferences running at once {env_help('max_concurrent')}")
    parser.add_argument("--max-queue", type=int, default=None, help=f"requests waiting beyond those; more → 503 + Retry-After {env_help('max_queue')}")
    parser.add_argument("--timeout", type=float, default=None, help=f"seconds per request from admission to answer; longer → 504 {env_help('timeout_s')}")
    parser.add_argument("--reload-interval", type=float, default=None,
                        help=f"seconds between checks of a models:/NAME@ALIAS alias for a new version, 0 = off {env_help('reload_interval_s')}")
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="MiB the admitted request bodies may take once parsed (body bytes × measured growth: JSON 13x, binary 2.5x); more → 503 + "
                             f"Retry-After; 0 = half the container's cgroup memory limit {env_help('memory_budget_mb')}")


def limits_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~medseg.serving.limits.ServeLimits` of ``medseg serve``'s options (else environment, else defaults)."""
    from medseg.serving.limits import ServeLimits

    return ServeLimits.resolve(max_request_mb=getattr(args, "max_request_mb", None), max_voxels=getattr(args, "max_voxels", None),
                               max_concurrent=getattr(args, "max_concurrent", None), max_queue=getattr(args, "max_queue", None),
                               timeout_s=getattr(args, "timeout", None), reload_interval_s=getattr(args, "reload_interval", None),
                               memory_budget_mb=getattr(args, "memory_budget_mb", None))


def run(args: argparse.Namespace) -> int:
    """Run ``medseg serve`` (blocks until the server stops); returns the exit code."""
    limits = limits_from_args(args)
    serve(args.model, args.name, host=args.host, port=args.port, device=getattr(args, "device", "auto"), limits=limits,
          grpc_port=getattr(args, "grpc_port", DEFAULT_GRPC_PORT) or 0, backend=getattr(args, "backend", None))
    return 0


# --------------------------------------------------------------------------- subprocess helpers
def start_server_process(model_uri: str | Path, name: str, port: int, env: dict[str, str] | None = None,
                         log_file: str | Path | None = None, host: str = DEFAULT_HOST, device: str = "auto",
                         extra_args: list[str] | None = None) -> subprocess.Popen:
    """Start ``python -m medseg.serving.server`` in its own session; output to ``log_file`` (else inherited).

    ``extra_args``: more ``medseg serve`` options, e.g. ``["--max-queue", "2", "--reload-interval", "1"]``.
    """
    cmd = [sys.executable, "-m", "medseg.serving.server", "--model", str(model_uri), "--name", name,
           "--host", host, "--port", str(port), "--device", device, *(extra_args or [])]
    full_env = {**os.environ, **(env or {})}
    out: IO[bytes] | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")  # noqa: SIM115 (the child keeps it; closed below in the parent)
    try:
        proc = subprocess.Popen(cmd, env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out is not None:
            out.close()
    return proc


def wait_until_ready(url: str, name: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/v2/health/ready`` and ``/v2/models/NAME/ready`` until both answer 200.

    Raises :class:`MedsegError` on timeout, or at once if ``proc`` (the server process) has exited.
    """
    import httpx

    base = url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise MedsegError(f"model server exited with code {proc.returncode} before it was ready", base)
            try:
                server = client.get(f"{base}/v2/health/ready")
                model = client.get(f"{base}/v2/models/{name}/ready")
                if server.status_code == 200 and model.status_code == 200:
                    return
                last = f"/v2/health/ready {server.status_code}, /v2/models/{name}/ready {model.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise MedsegError(f"model server not ready after {timeout_s:.0f} s ({last})", base)
            time.sleep(0.25)


def stop_server(proc: subprocess.Popen, timeout_s: float = 20.0) -> int | None:
    """SIGTERM the server process (graceful), SIGKILL it if it has not exited after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medseg.serving.server", description="Serve a model package with KServe (Open Inference Protocol v2).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
