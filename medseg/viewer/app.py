"""The viewer web app (Starlette, served by uvicorn on 127.0.0.1).

Routes:

- ``GET /``: the page: the upload form (one file per channel).
- ``POST /segment`` (``multipart/form-data``, one file field per channel, named like the channels): the viewer
  sends the files to the model server (:func:`medseg.serving.client.infer`, the V2 contract) and keeps the
  answer in memory under a random token. With ``Accept: application/json`` it answers the result summary
  as JSON (``view_url``, ``slice_url``, ``download_url``, volumes, model version), else it redirects (303) to
  the result page. Errors: JSON ``{"error": ...}`` or the page with the message; the model server's 4xx
  message is passed on with its status (400/413/415), its 503/504 as is, an unreachable server as 502.
- ``GET /view/TOKEN[?slice=K&channel=C&alpha=A]``: the page with the result: the axial slice, a slider, the
  channel, the overlay opacity, the legend (label and region volumes in ml, the model version), the download.
- ``GET /results/TOKEN.json``, ``GET /results/TOKEN/slice/K.png[?channel=C&alpha=A&size=PX]``,
  ``GET /results/TOKEN/segmentation.nii.gz`` (attachment).
- ``GET /api/status`` (is the model ready on the model server), ``GET /healthz``, ``/static/viewer.{css,js}``.

Results live in memory only (the last ``max_results``, oldest dropped first); uploads pass through a private
temporary folder that is removed once the model server has answered.
"""

from __future__ import annotations

import logging
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from medseg import schemas
from medseg.task import BRATS2023
from medseg.errors import MedsegError
from medseg.serving import client
from medseg.viewer import page
from medseg.viewer.render import DEFAULT_SIZE, CaseView, display_size, prepare_case, slice_png

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
DEFAULT_ALPHA = 0.45
GZIP_MAGIC = b"\x1f\x8b"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
                                 b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class ViewerError(Exception):
    """A problem to show the person: HTTP ``status`` and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ViewerConfig:
    model_url: str
    model_name: str
    channels: tuple[str, ...] = tuple(BRATS2023.channels)
    timeout_s: float = 300.0
    max_upload_bytes: int = 150 * 2**20
    max_results: int = 8
    max_concurrent: int = 2

    @property
    def default_channel(self) -> str:
        return "t1c" if "t1c" in self.channels else self.channels[0]


@dataclass
class StoredResult:
    token: str
    view: CaseView
    segmentation_bytes: bytes
    region_volumes_ml: dict[str, float]
    model_name: str
    model_version: str
    case_name: str
    file_names: dict[str, str]
    seconds: float
    created: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        base = f"/results/{self.token}"
        return {
            "id": self.token, "case": self.case_name, "model_name": self.model_name, "model_version": self.model_version,
            "volumes_ml": self.region_volumes_ml,
            "label_volumes_ml": {str(k): round(v, 4) for k, v in self.view.label_volumes_ml().items()},
            "shape": list(self.view.original_shape), "display_shape": list(self.view.shape), "spacing_mm": list(self.view.spacing),
            "orientation": self.view.orientation, "slices": self.view.n_slices, "default_slice": self.view.best_slice(),
            "channels": list(self.view.channels), "files": self.file_names, "seconds": round(self.seconds, 3),
            "view_url": f"/view/{self.token}", "slice_url": f"{base}/slice/{{k}}.png", "download_url": f"{base}/segmentation.nii.gz",
        }


class ResultStore:
    """The last ``capacity`` results by token (least recently used dropped first); thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self._items: OrderedDict[str, StoredResult] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, result: StoredResult) -> None:
        with self._lock:
            self._items[result.token] = result
            self._items.move_to_end(result.token)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, token: str) -> StoredResult | None:
        if not TOKEN_RE.match(token or ""):
            return None
        with self._lock:
            result = self._items.get(token)
            if result is not None:
                self._items.move_to_end(token)
            return result

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --------------------------------------------------------------------------- the work (worker threads)
def case_name_from(file_name: str, channel: str) -> str:
    """A safe case name from an uploaded file name: ``BraTS-GLI-00001-000-t1n.nii.gz`` → ``BraTS-GLI-00001-000``."""
    name = Path(file_name.replace("\\", "/")).name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(rf"[-_.]?{re.escape(channel)}$", "", name, flags=re.IGNORECASE)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80]
    return name or "case"


def error_from_client(exc: MedsegError) -> ViewerError:
    """The model client's error as a status and message for the person (the model server's text kept)."""
    text = str(exc)
    answered = re.search(r"model server answered (\d{3}): (.*)$", text, flags=re.DOTALL)
    if answered:
        code, detail = int(answered.group(1)), answered.group(2).strip()
        if code == 404:
            return ViewerError(502, f"The model server does not serve this model (404): {detail}")
        if code in (400, 413, 415, 422):
            return ViewerError(400 if code == 422 else code, f"The model server refused the case ({code}): {detail}")
        if code in (503, 504):
            hint = "it is busy, try again in a minute" if code == 503 else "it took too long"
            return ViewerError(code, f"The model server could not answer ({code}, {hint}): {detail}")
        return ViewerError(502, f"The model server failed ({code}): {detail}")
    if "no answer within" in text:
        return ViewerError(504, f"The model server did not answer in time: {text}")
    return ViewerError(502, f"The model server cannot be reached: {text}")


def segment_case(config: ViewerConfig, uploads: dict[str, tuple[str, bytes]]) -> StoredResult:
    """Send the uploaded files (channel → (file name, bytes)) to the model server; the result to keep."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medseg-viewer-") as tmp:  # private (0700), removed at once
        paths = []
        for channel in config.channels:
            data = uploads[channel][1]
            suffix = ".nii.gz" if data[:2] == GZIP_MAGIC else ".nii"
            path = Path(tmp) / f"{channel}{suffix}"
            path.write_bytes(data)
            paths.append(path)
        try:
            answer = client.infer(config.model_url, config.model_name, paths, list(config.channels), timeout=config.timeout_s)
        except MedsegError as exc:
            raise error_from_client(exc) from None
    seconds = time.perf_counter() - started
    try:
        view = prepare_case({c: uploads[c][1] for c in config.channels}, answer["segmentation_bytes"])
    except MedsegError as exc:
        status = 502 if getattr(exc, "path", None) == "segmentation" else 400
        raise ViewerError(status, f"The case was segmented but cannot be shown: {exc}") from None
    first = config.channels[0]
    return StoredResult(
        token=secrets.token_urlsafe(18), view=view, segmentation_bytes=answer["segmentation_bytes"],
        region_volumes_ml={k: float(v) for k, v in answer["volumes_ml"].items()},
        model_name=str(answer.get("model_name") or config.model_name), model_version=str(answer.get("model_version") or "unknown"),
        case_name=case_name_from(uploads[first][0], first), file_names={c: Path(uploads[c][0]).name for c in config.channels},
        seconds=seconds)


# --------------------------------------------------------------------------- the ASGI app
def create_app(config: ViewerConfig) -> Any:
    """The Starlette app of the viewer for ``config``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    store = ResultStore(config.max_results)
    state = {"active": 0}
    css = page.stylesheet(sorted(set(range(1, 5))))

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    def page_html(result: StoredResult | None = None, error: str | None = None, notice: str | None = None, query: Any = None) -> str:
        return page.render_page(config.model_url, config.model_name, list(config.channels), _page_result(result, query) if result else None,
                                error=error, notice=notice, max_upload_mb=config.max_upload_bytes / 2**20, kept=config.max_results)

    def fail(request: Request, err: ViewerError) -> Response:
        if wants_json(request):
            return JSONResponse({"error": err.message}, status_code=err.status)
        return HTMLResponse(page_html(error=err.message), status_code=err.status, headers={"cache-control": "no-store"})

    async def index(request: Request) -> Response:
        return HTMLResponse(page_html(), headers={"cache-control": "no-store"})

    async def view(request: Request) -> Response:
        result = store.get(request.path_params["token"])
        if result is None:
            return HTMLResponse(page_html(notice=f"This result is no longer kept (the viewer keeps the last {config.max_results} cases): upload the case again."),
                                status_code=404, headers={"cache-control": "no-store"})
        return HTMLResponse(page_html(result, query=request.query_params), headers={"cache-control": "no-store"})

    async def segment(request: Request) -> Response:
        try:
            uploads = await _read_uploads(request)
        except ViewerError as err:
            return fail(request, err)
        if state["active"] >= config.max_concurrent:
            return fail(request, ViewerError(503, f"The viewer is already sending {state['active']} case(s) to the model server: try again in a minute."))
        state["active"] += 1
        try:
            result = await run_in_threadpool(segment_case, config, uploads)
        except ViewerError as err:
            log.info("segment: %d %s", err.status, err.message)
            return fail(request, err)
        finally:
            state["active"] -= 1
        store.put(result)
        log.info("segment: %s → model %s version %s in %.1f s", result.case_name, result.model_name, result.model_version, result.seconds)
        if wants_json(request):
            return JSONResponse(result.summary(), headers={"cache-control": "no-store"})
        return RedirectResponse(f"/view/{result.token}", status_code=303)

    async def _read_uploads(request: Request) -> dict[str, tuple[str, bytes]]:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ViewerError(415, "Send the files as multipart/form-data (a form with one file field per channel: " + ", ".join(config.channels) + ").")
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise ViewerError(411, "The upload has no Content-Length.")
        if int(declared) > config.max_upload_bytes:
            raise ViewerError(413, f"The upload is {int(declared) / 2**20:.1f} MiB; the viewer takes at most {config.max_upload_bytes / 2**20:g} MiB.")
        uploads: dict[str, tuple[str, bytes]] = {}
        problems = []
        try:
            async with request.form(max_files=len(config.channels) + 2, max_fields=len(config.channels) + 8) as form:
                for channel in config.channels:
                    item = form.get(channel)
                    if not isinstance(item, UploadFile) or not (item.filename or "").strip():
                        problems.append(f"{channel}: no file chosen")
                        continue
                    data = await item.read()
                    if not data:
                        problems.append(f"{channel}: the file {item.filename} is empty")
                        continue
                    uploads[channel] = (item.filename or channel, data)
        except HTTPException as exc:
            raise ViewerError(400, f"The upload could not be read: {exc.detail}") from None
        except Exception as exc:  # python-multipart parse errors
            raise ViewerError(400, f"The upload could not be read ({type(exc).__name__}: {exc}).") from None
        if problems:
            raise ViewerError(400, "; ".join(problems) + ".")
        return uploads

    def _result_or_404(request: Request) -> StoredResult:
        result = store.get(request.path_params["token"])
        if result is None:
            raise HTTPException(404, "no such result (it may have been dropped: upload the case again)")
        return result

    async def result_json(request: Request) -> Response:
        return JSONResponse(_result_or_404(request).summary(), headers={"cache-control": "no-store"})

    async def slice_image(request: Request) -> Response:
        result = _result_or_404(request)
        k = int(request.path_params["k"])
        if not 0 <= k < result.view.n_slices:
            raise HTTPException(404, f"slice {k} is outside 0..{result.view.n_slices - 1}")
        channel = request.query_params.get("channel", config.default_channel)
        if channel not in result.view.channels:
            raise HTTPException(400, f"unknown channel {channel!r} (have: {', '.join(result.view.channels)})")
        alpha = _number(request.query_params.get("alpha"), DEFAULT_ALPHA, 0.0, 1.0)
        size = int(_number(request.query_params.get("size"), DEFAULT_SIZE, 64, 1024))
        png = await run_in_threadpool(slice_png, result.view, k, channel, alpha, size)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    async def download(request: Request) -> Response:
        result = _result_or_404(request)
        return Response(result.segmentation_bytes, media_type="application/gzip",
                        headers={"content-disposition": f'attachment; filename="{result.case_name}_seg.nii.gz"', "cache-control": "no-store"})

    async def status(request: Request) -> Response:
        import httpx

        url = f"{config.model_url.rstrip('/')}/v2/models/{config.model_name}/ready"
        try:
            async with httpx.AsyncClient(timeout=3.0) as http:
                answer = await http.get(url)
            ready, detail = answer.status_code == 200, f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            ready, detail = False, f"cannot reach it: {type(exc).__name__}"
        return JSONResponse({"ready": ready, "detail": detail, "model": config.model_name, "url": config.model_url},
                            headers={"cache-control": "no-store"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "results": len(store), "active": state["active"]})

    async def static_css(request: Request) -> Response:
        return Response(css, media_type="text/css; charset=utf-8", headers={"cache-control": "no-cache"})

    async def static_js(request: Request) -> Response:
        return Response(page.SCRIPT, media_type="text/javascript; charset=utf-8", headers={"cache-control": "no-cache"})

    async def http_error(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "error")
        if wants_json(request) or request.url.path.startswith("/results/"):
            return JSONResponse({"error": str(detail)}, status_code=code)
        return PlainTextResponse(str(detail), status_code=code)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/segment", segment, methods=["POST"]),
        Route("/view/{token}", view, methods=["GET"]),
        Route("/results/{token}.json", result_json, methods=["GET"]),
        Route("/results/{token}/slice/{k:int}.png", slice_image, methods=["GET"]),
        Route("/results/{token}/segmentation.nii.gz", download, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/static/viewer.css", static_css, methods=["GET"]),
        Route("/static/viewer.js", static_js, methods=["GET"]),
    ]

    def _page_result(result: StoredResult, query: Any) -> page.PageResult:
        query = query or {}
        v = result.view
        k = int(_number(query.get("slice"), v.best_slice(), 0, v.n_slices - 1))
        channel = query.get("channel") if query.get("channel") in v.channels else config.default_channel
        return page.PageResult(
            token=result.token, model_name=result.model_name, model_version=result.model_version, case_name=result.case_name,
            file_names=result.file_names, shape=v.original_shape, spacing=tuple(round(s, 3) for s in v.spacing),  # type: ignore[arg-type]
            orientation=v.orientation, n_slices=v.n_slices, slice_index=k, channel=channel, channels=list(v.channels),
            alpha=_number(query.get("alpha"), DEFAULT_ALPHA, 0.0, 1.0), image_size=display_size(v),
            label_volumes_ml=v.label_volumes_ml(), region_volumes_ml=result.region_volumes_ml, seconds=result.seconds)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.store = store
    return SecurityHeaders(app)


def _number(text: Any, default: float, lo: float, hi: float) -> float:
    """``text`` as a number clamped to ``[lo, hi]``; ``default`` when missing or not a finite number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return default
    if value != value or value in (float("inf"), float("-inf")):
        return default
    return min(max(value, lo), hi)


class SecurityHeaders:
    """ASGI wrapper adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: Any):
        self.app = app

    @property
    def store(self) -> ResultStore:
        return self.app.state.store

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- running it
def serve(config: ViewerConfig, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Serve the viewer until SIGINT/SIGTERM."""
    import uvicorn

    app = create_app(config)
    print(f"medseg viewer on http://{host}:{port}/ (model {config.model_name} at {config.model_url})", flush=True)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", server_header=False, timeout_graceful_shutdown=5)).run()


def start_viewer_process(model_url: str, model_name: str, port: int, log_file: str | Path | None = None,
                         extra_args: list[str] | None = None) -> subprocess.Popen:
    """Start ``python -m medseg.viewer`` on 127.0.0.1:``port`` in its own session (for tests and scripts)."""
    cmd = [sys.executable, "-m", "medseg.viewer", "--url", model_url, "--model", model_name, "--port", str(port), *(extra_args or [])]
    out: IO[bytes] | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "ab")  # noqa: SIM115 (the child keeps it)
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
    finally:
        if out is not None:
            out.close()


def wait_viewer_ready(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``/healthz`` until it answers 200; :class:`MedsegError` on timeout or if ``proc`` exited."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise MedsegError(f"viewer exited with code {proc.returncode} before it was ready", url)
        try:
            if httpx.get(f"{url.rstrip('/')}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise MedsegError(f"viewer not ready after {timeout_s:.0f} s", url)
        time.sleep(0.2)


__all__ = ["ResultStore", "StoredResult", "ViewerConfig", "ViewerError", "create_app", "error_from_client", "segment_case",
           "serve", "start_viewer_process", "wait_viewer_ready"]
