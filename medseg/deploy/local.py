"""Deploy without a cluster: the real KServe model server of :mod:`medseg.serving.server` on 127.0.0.1.

The same server, process helpers and readiness check as ``medseg serve`` and the pipeline's serve step
(:func:`~medseg.serving.server.start_server_process`, :func:`~medseg.serving.server.wait_until_ready`);
on top of them, the deployment checks that the server really loaded the pinned version (its
``medseg_model_info`` metric). In the pipeline the server is stopped once that is established (a
pipeline step cannot leave a process behind); ``medseg deploy --target local`` keeps it running.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from medseg.deploy.inferenceservice import model_uri
from medseg.errors import MedsegError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclasses.dataclass
class LocalDeployment:
    """A model server started by :func:`deploy_local`; ``proc`` is ``None`` once stopped."""

    endpoint: str
    model_name: str
    model_uri: str
    version: str
    served_version: str | None
    seconds_to_ready: float
    log_file: str | None
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        from medseg.serving.server import stop_server

        if self.proc is not None:
            stop_server(self.proc)
            self.proc = None

    def to_dict(self) -> dict[str, Any]:
        return {"target": "local", "endpoint": self.endpoint, "model_name": self.model_name, "model_uri": self.model_uri, "version": self.version,
                "served_version": self.served_version, "ready": True, "seconds_to_ready": self.seconds_to_ready, "log_file": self.log_file,
                "running": self.proc is not None, "pid": self.proc.pid if self.proc is not None else None}


def served_version(metrics_text: str, model_name: str) -> str | None:
    """The ``version`` label of ``medseg_model_info{model="<model_name>"}`` in a ``/metrics`` page."""
    for line in metrics_text.splitlines():
        if line.startswith("medseg_model_info{") and f'model="{model_name}"' in line:
            match = re.search(r'version="([^"]*)"', line)
            if match:
                return match.group(1)
    return None


def _metrics_text(endpoint: str) -> str:
    import httpx

    try:
        return httpx.get(f"{endpoint}/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        raise MedsegError(f"cannot read the model server's /metrics ({exc})", endpoint) from None


def deploy_local(model_name: str, version: str, tracking_uri: str | None = None, port: int | None = None, host: str = "127.0.0.1",
                 timeout_s: float = 180.0, log_file: str | Path | None = None, keep_running: bool = False, source: str | None = None) -> LocalDeployment:
    """Start the model server for ``models:/model_name/version`` on ``host`` (loopback only), wait until
    it and the model are ready, check it serves that version; stop it unless ``keep_running``.

    Args:
        model_name: Registered model name (the endpoint's model name).
        version: Registered version number (pinned, like the cluster deployment).
        tracking_uri: MLflow tracking URI for the server process (default: its environment).
        port: TCP port (default: a free one).
        host: Loopback address to listen on.
        timeout_s: Readiness timeout (model download and load included).
        log_file: Server output (default: inherited).
        keep_running: Leave the server running; the caller stops it with :meth:`LocalDeployment.stop`.
        source: Serve this model package folder instead of the registry URI (tests, air-gapped runs);
            ``version`` is then only the expected label.

    Raises:
        MedsegError: a non-loopback host, the server exits or is not ready in time, or it serves another version.
    """
    from medseg.serving.server import free_port, start_server_process, stop_server, wait_until_ready

    if host not in LOOPBACK:
        raise MedsegError(f"the local deployment listens on the loopback interface only, not {host!r}")
    uri = source or model_uri(model_name, version)
    port = port or free_port(host)
    endpoint = f"http://{'[::1]' if host == '::1' else host}:{port}"
    env = dict(os.environ)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    t0 = time.perf_counter()
    proc = start_server_process(uri, model_name, port, env=env, log_file=log_file, host=host)
    try:
        wait_until_ready(endpoint, model_name, timeout_s, proc=proc)
        seconds = round(time.perf_counter() - t0, 2)
        served = served_version(_metrics_text(endpoint), model_name)
        if source is None and served != str(version):
            raise MedsegError(f"the local model server serves version {served!r} of {model_name!r}, expected {version}", endpoint)
    except BaseException:
        stop_server(proc)
        raise
    deployment = LocalDeployment(endpoint, model_name, uri, str(version), served, seconds, str(log_file) if log_file else None, proc)
    if not keep_running:
        deployment.stop()
    return deployment
