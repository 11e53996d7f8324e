"""The viewer web app (Starlette, served by uvicorn on 127.0.0.1), for every task the model server serves.

What the upload form asks for comes from the model server's metadata (``GET /v2/models/NAME``,
:func:`medseg.serving.client.model_info`), asked again at most every :data:`INFO_TTL_S` seconds: one file per
channel, named like the model's channels; a classifier's age field when it takes the age; a 2D slice-set model's
picture field (one PNG or TIFF slice). How the answer is shown follows the task:

- 3D segmentation (and a slice stack sent as NIfTI): the axial slices with the labels over the chosen channel;
- a picture sent to a 2D model: the picture with its mask over it, the mask downloadable in the picture's format;
- a classifier: a bar per class with its probability, and the label.

Routes:

- ``GET /``: the page: the upload form, and the served version's model card (collapsed) when the model server gives one
  (its metadata parameter ``model_card``, :mod:`medseg.registry.model_card`).
- ``POST /segment`` (``multipart/form-data``: one file field per channel, named like the channels; or ``image``, one
  picture; and ``age``): the viewer sends the case to the model server (the V2 contract) and keeps the answer in
  memory under a random token. With ``Accept: application/json`` it answers the result summary as JSON (``task``,
  ``view_url``, and ``slice_url``/``download_url``/volumes or ``probabilities``/``label``, model version), else it
  redirects (303) to the result page. Errors: JSON ``{"error": ...}`` or the page with the message; the model
  server's 4xx message is passed on with its status (400/413/415), its 503/504 as is, an unreachable server as 502.
- ``GET /view/TOKEN[?slice=K&channel=C&alpha=A]``: the page with the result.
- ``GET /results/TOKEN.json``, ``GET /results/TOKEN/slice/K.png[?channel=C&alpha=A&size=PX]``,
  ``GET /results/TOKEN/segmentation.EXT`` (attachment: ``nii.gz``, or the picture's ``png``/``tif``).
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

from medseg.errors import MedsegError
from medseg.serving import client
from medseg.viewer import page
from medseg.viewer.render import DEFAULT_SIZE, CaseView, display_size, prepare_case, prepare_picture, slice_png

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
DEFAULT_ALPHA = 0.45
GZIP_MAGIC = b"\x1f\x8b"
PICTURE_FIELD = "image"
AGE_FIELD = "age"
#: Seconds the model's metadata is kept before it is asked again (a hot reload may bring another version).
INFO_TTL_S = 30.0
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
    """``channels``: the upload fields when the model server's metadata does not say (None: ask it)."""

    model_url: str
    model_name: str
    channels: tuple[str, ...] | None = None
    timeout_s: float = 300.0
    max_upload_bytes: int = 150 * 2**20
    max_results: int = 8
    max_concurrent: int = 2


@dataclass
class StoredResult:
    token: str
    view: CaseView | None
    segmentation_bytes: bytes
    region_volumes_ml: dict[str, float]
    model_name: str
    model_version: str
    case_name: str
    file_names: dict[str, str]
    seconds: float
    created: float = field(default_factory=time.time)
    task: str = "segmentation"
    probabilities: dict[str, float] = field(default_factory=dict)
    label: str = ""
    age: float | None = None
    format: str = "nii.gz"  # the segmentation's: nii.gz, or png/tiff for a picture
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        """How the page shows it: ``classes``, ``image`` (a picture and its mask) or ``volume``."""
        if self.task == "classification":
            return "classes"
        return "image" if self.view is not None and self.view.image_axes else "volume"

    @property
    def extension(self) -> str:
        return {"png": "png", "tiff": "tif"}.get(self.format, "nii.gz")

    @property
    def media_type(self) -> str:
        return {"png": "image/png", "tiff": "image/tiff"}.get(self.format, "application/gzip")

    def summary(self) -> dict[str, Any]:
        base = f"/results/{self.token}"
        out: dict[str, Any] = {"id": self.token, "task": self.task, "view": self.mode, "case": self.case_name, "model_name": self.model_name,
                               "model_version": self.model_version, "files": self.file_names, "seconds": round(self.seconds, 3),
                               "view_url": f"/view/{self.token}"}
        if self.task == "classification":
            out.update(probabilities=self.probabilities, label=self.label, age=self.age)
            return out
        v = self.view
        assert v is not None
        out.update({
            "volumes_ml": self.region_volumes_ml,
            "label_volumes_ml": {str(k): round(val, 4) for k, val in v.label_volumes_ml().items()},
            "shape": list(v.original_shape), "display_shape": list(v.shape), "spacing_mm": list(v.spacing),
            "orientation": v.orientation, "slices": v.n_slices, "default_slice": v.best_slice(), "default_channel": v.best_channel(),
            "channels": list(v.channels), "format": self.format,
            "slice_url": f"{base}/slice/{{k}}.png", "download_url": f"{base}/segmentation.{self.extension}",
        })
        return out


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


class ModelInfoCache:
    """The model's metadata from the model server, asked at most every ``ttl_s`` seconds; thread-safe."""

    def __init__(self, config: ViewerConfig, ttl_s: float = INFO_TTL_S):
        self.config = config
        self.ttl_s = ttl_s
        self._info: client.ModelInfo | None = None
        self._when = 0.0
        self._lock = threading.Lock()

    def get(self, fresh: bool = False) -> client.ModelInfo:
        """The metadata (asked again when older than ``ttl_s`` or ``fresh``); :class:`ViewerError` when it cannot be had."""
        with self._lock:
            if self._info is not None and not fresh and time.monotonic() - self._when < self.ttl_s:
                return self._info
        try:
            info = client.model_info(self.config.model_url, self.config.model_name, timeout=min(self.config.timeout_s, 10.0))
        except MedsegError as exc:
            raise error_from_client(exc) from None
        if self.config.channels:
            info = client.ModelInfo(**{**info.__dict__, "channels": list(self.config.channels)})
        with self._lock:
            self._info, self._when = info, time.monotonic()
        return info

    def cached(self) -> client.ModelInfo | None:
        with self._lock:
            return self._info


def form_spec(info: client.ModelInfo | None) -> page.FormSpec | None:
    """The upload form for a model (None: unknown yet)."""
    if info is None:
        return None
    age = None
    if "age" in info.covariates:
        age = "required" if info.covariates["age"] else "optional"
    return page.FormSpec(list(info.channels), view=info.view, age=age, picture=info.takes_image)


# --------------------------------------------------------------------------- the work (worker threads)
def case_name_from(file_name: str, channel: str) -> str:
    """A safe case name from an uploaded file name: ``Case-00001-000-flair.nii.gz`` → ``Case-00001-000``."""
    name = Path(file_name.replace("\\", "/")).name
    for suffix in (".nii.gz", ".nii", ".gz", ".tiff", ".tif", ".png"):
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


@dataclass
class Upload:
    """What the form brought: channel files (channel → (file name, bytes)), a picture, the age."""

    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    picture: tuple[str, bytes] | None = None
    age: float | None = None


def segment_case(config: ViewerConfig, uploads: dict[str, tuple[str, bytes]] | Upload, info: client.ModelInfo | None = None) -> StoredResult:
    """Send the upload to the model server; the result to keep. ``info``: the model's metadata (default: its channels
    are ``config.channels``, a segmentation model)."""
    upload = uploads if isinstance(uploads, Upload) else Upload(files=dict(uploads))
    if info is None:
        info = client.ModelInfo(name=config.model_name, version="", kind="segmentation", view="volume", channels=list(config.channels or upload.files),
                                covariates={}, takes_image=False)
    started = time.perf_counter()
    covariates = {"age": upload.age} if upload.age is not None else {}
    try:
        if upload.picture is not None:
            answer = client.infer_image(config.model_url, config.model_name, upload.picture[1], timeout=config.timeout_s, covariates=covariates)
        else:
            with tempfile.TemporaryDirectory(prefix="medseg-viewer-") as tmp:  # private (0700), removed at once
                paths = []
                for channel in info.channels:
                    data = upload.files[channel][1]
                    suffix = ".nii.gz" if data[:2] == GZIP_MAGIC else ".nii"
                    path = Path(tmp) / f"{channel}{suffix}"
                    path.write_bytes(data)
                    paths.append(path)
                answer = client.infer(config.model_url, config.model_name, paths, list(info.channels), timeout=config.timeout_s, covariates=covariates)
    except MedsegError as exc:
        raise error_from_client(exc) from None
    seconds = time.perf_counter() - started
    if upload.picture is not None:
        first, (file_name, _) = "image", upload.picture
        file_names = {"image": Path(file_name).name}
    else:
        first = info.channels[0]
        file_name = upload.files[first][0]
        file_names = {c: Path(upload.files[c][0]).name for c in info.channels}
    common: dict[str, Any] = dict(token=secrets.token_urlsafe(18), model_name=str(answer.get("model_name") or config.model_name),
                                  model_version=str(answer.get("model_version") or "unknown"), case_name=case_name_from(file_name, first),
                                  file_names=file_names, seconds=seconds, label_names=dict(info.labels))
    if answer.get("task") == "classification":
        return StoredResult(view=None, segmentation_bytes=b"", region_volumes_ml={}, task="classification",
                            probabilities={k: float(v) for k, v in answer["probabilities"].items()}, label=str(answer["label"]), age=upload.age, **common)
    foreground = sorted(v for v in info.labels if v > 0) or [1]
    try:
        if upload.picture is not None:
            view = prepare_picture(upload.picture[1], answer["segmentation_bytes"], list(info.channels), foreground)
        else:
            view = prepare_case({c: upload.files[c][1] for c in info.channels}, answer["segmentation_bytes"])
    except MedsegError as exc:
        status = 502 if getattr(exc, "path", None) == "segmentation" else 400
        raise ViewerError(status, f"The case was segmented but cannot be shown: {exc}") from None
    return StoredResult(view=view, segmentation_bytes=answer["segmentation_bytes"], region_volumes_ml={k: float(v) for k, v in answer["volumes_ml"].items()},
                        format=str(answer.get("format") or "nii.gz"), **common)


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
    infos = ModelInfoCache(config)
    state = {"active": 0}
    css = page.stylesheet(list(range(1, 16)))

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    async def model_info() -> tuple[client.ModelInfo | None, str | None]:
        """The model's metadata for the page, or why it cannot be had."""
        try:
            return await run_in_threadpool(infos.get), None
        except ViewerError as err:
            return infos.cached(), err.message

    def page_html(info: client.ModelInfo | None, result: StoredResult | None = None, error: str | None = None, notice: str | None = None,
                  query: Any = None) -> str:
        spec = form_spec(info)
        channels = list(spec.channels) if spec else list(config.channels or ())
        return page.render_page(config.model_url, config.model_name, channels, _page_result(result, query) if result else None,
                                error=error, notice=notice, max_upload_mb=config.max_upload_bytes / 2**20, kept=config.max_results, form=spec,
                                card=info.model_card if info else "", card_version=info.version if info else "")

    async def fail(request: Request, err: ViewerError) -> Response:
        if wants_json(request):
            return JSONResponse({"error": err.message}, status_code=err.status)
        info = infos.cached()
        return HTMLResponse(page_html(info, error=err.message), status_code=err.status, headers={"cache-control": "no-store"})

    async def index(request: Request) -> Response:
        info, problem = await model_info()
        return HTMLResponse(page_html(info, error=problem and f"{problem} (the upload form needs to know what the model takes: reload the page)"),
                            headers={"cache-control": "no-store"})

    async def view(request: Request) -> Response:
        result = store.get(request.path_params["token"])
        info, _ = await model_info()
        if result is None:
            return HTMLResponse(page_html(info, notice=f"This result is no longer kept (the viewer keeps the last {config.max_results} cases): upload the case again."),
                                status_code=404, headers={"cache-control": "no-store"})
        return HTMLResponse(page_html(info, result, query=request.query_params), headers={"cache-control": "no-store"})

    async def segment(request: Request) -> Response:
        try:
            check_upload_headers(request)
            info = await run_in_threadpool(infos.get, True)
            upload = await _read_uploads(request, info)
        except ViewerError as err:
            return await fail(request, err)
        if state["active"] >= config.max_concurrent:
            return await fail(request, ViewerError(503, f"The viewer is already sending {state['active']} case(s) to the model server: try again in a minute."))
        state["active"] += 1
        try:
            result = await run_in_threadpool(segment_case, config, upload, info)
        except ViewerError as err:
            log.info("segment: %d %s", err.status, err.message)
            return await fail(request, err)
        finally:
            state["active"] -= 1
        store.put(result)
        log.info("segment: %s → model %s version %s in %.1f s", result.case_name, result.model_name, result.model_version, result.seconds)
        if wants_json(request):
            return JSONResponse(result.summary(), headers={"cache-control": "no-store"})
        return RedirectResponse(f"/view/{result.token}", status_code=303)

    def check_upload_headers(request: Request) -> None:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            fields = ", ".join(config.channels) if config.channels else "one file per channel of the model"
            raise ViewerError(415, f"Send the files as multipart/form-data (a form with one file field per channel: {fields}).")
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise ViewerError(411, "The upload has no Content-Length.")
        if int(declared) > config.max_upload_bytes:
            raise ViewerError(413, f"The upload is {int(declared) / 2**20:.1f} MiB; the viewer takes at most {config.max_upload_bytes / 2**20:g} MiB.")

    async def _read_uploads(request: Request, info: client.ModelInfo) -> Upload:
        upload = Upload()
        problems: list[str] = []
        age_text = ""
        try:
            async with request.form(max_files=len(info.channels) + 3, max_fields=len(info.channels) + 10) as form:
                picture = form.get(PICTURE_FIELD) if info.takes_image else None
                if isinstance(picture, UploadFile) and (picture.filename or "").strip():
                    data = await picture.read()
                    if not data:
                        problems.append(f"{PICTURE_FIELD}: the file {picture.filename} is empty")
                    upload.picture = (picture.filename or PICTURE_FIELD, data)
                else:
                    for channel in info.channels:
                        item = form.get(channel)
                        if not isinstance(item, UploadFile) or not (item.filename or "").strip():
                            problems.append(f"{channel}: no file chosen")
                            continue
                        data = await item.read()
                        if not data:
                            problems.append(f"{channel}: the file {item.filename} is empty")
                            continue
                        upload.files[channel] = (item.filename or channel, data)
                age = form.get(AGE_FIELD)
                age_text = age.strip() if isinstance(age, str) else ""
        except HTTPException as exc:
            raise ViewerError(400, f"The upload could not be read: {exc.detail}") from None
        except Exception as exc:  # python-multipart parse errors
            raise ViewerError(400, f"The upload could not be read ({type(exc).__name__}: {exc}).") from None
        if "age" in info.covariates and age_text:
            try:
                upload.age = float(age_text)
            except ValueError:
                problems.append(f"age: {age_text[:40]!r} is not a number of years")
        elif info.covariates.get("age"):
            problems.append("age: the model takes the subject's age in years")
        if problems:
            raise ViewerError(400, "; ".join(problems) + ".")
        return upload

    def _result_or_404(request: Request) -> StoredResult:
        result = store.get(request.path_params["token"])
        if result is None:
            raise HTTPException(404, "no such result (it may have been dropped: upload the case again)")
        return result

    async def result_json(request: Request) -> Response:
        return JSONResponse(_result_or_404(request).summary(), headers={"cache-control": "no-store"})

    async def slice_image(request: Request) -> Response:
        result = _result_or_404(request)
        if result.view is None:
            raise HTTPException(404, "a classifier's answer has no slices")
        k = int(request.path_params["k"])
        if not 0 <= k < result.view.n_slices:
            raise HTTPException(404, f"slice {k} is outside 0..{result.view.n_slices - 1}")
        channel = request.query_params.get("channel", result.view.best_channel() or "")
        if channel not in result.view.channels:
            raise HTTPException(400, f"unknown channel {channel!r} (have: {', '.join(result.view.channels)})")
        alpha = _number(request.query_params.get("alpha"), DEFAULT_ALPHA, 0.0, 1.0)
        size = int(_number(request.query_params.get("size"), DEFAULT_SIZE, 64, 1024))
        png = await run_in_threadpool(slice_png, result.view, k, channel, alpha, size)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    async def download(request: Request) -> Response:
        result = _result_or_404(request)
        if result.view is None or request.path_params["ext"] != result.extension:
            raise HTTPException(404, f"this result has no segmentation.{request.path_params['ext']}"
                                     + (f" (its segmentation is segmentation.{result.extension})" if result.view is not None else ""))
        name = f"{result.case_name}_seg.{result.extension}" if result.extension == "nii.gz" else f"{result.case_name}_mask.{result.extension}"
        return Response(result.segmentation_bytes, media_type=result.media_type,
                        headers={"content-disposition": f'attachment; filename="{name}"', "cache-control": "no-store"})

    async def status(request: Request) -> Response:
        import httpx

        url = f"{config.model_url.rstrip('/')}/v2/models/{config.model_name}/ready"
        try:
            async with httpx.AsyncClient(timeout=3.0) as http:
                answer = await http.get(url)
            ready, detail = answer.status_code == 200, f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            ready, detail = False, f"cannot reach it: {type(exc).__name__}"
        info = infos.cached()
        return JSONResponse({"ready": ready, "detail": detail, "model": config.model_name, "url": config.model_url,
                             "task": info.kind if info else None, "view": info.view if info else None},
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
        Route("/results/{token}/segmentation.{ext}", download, methods=["GET"]),
        Route("/api/status", status, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/static/viewer.css", static_css, methods=["GET"]),
        Route("/static/viewer.js", static_js, methods=["GET"]),
    ]

    def _page_result(result: StoredResult, query: Any) -> page.PageResult:
        query = query or {}
        base = dict(token=result.token, model_name=result.model_name, model_version=result.model_version, case_name=result.case_name,
                    file_names=result.file_names, seconds=result.seconds, label_names=result.label_names, mode=result.mode)
        v = result.view
        if v is None:  # a classifier's answer
            return page.PageResult(**base, shape=(0, 0, 0), spacing=(0.0, 0.0, 0.0), orientation="", n_slices=0, slice_index=0, channel="",
                                   channels=[], alpha=DEFAULT_ALPHA, image_size=(0, 0), label_volumes_ml={}, region_volumes_ml={},
                                   probabilities=result.probabilities, label=result.label, age=result.age)
        k = int(_number(query.get("slice"), v.best_slice(), 0, v.n_slices - 1))
        channel = query.get("channel") if query.get("channel") in v.channels else (v.best_channel() or "")
        return page.PageResult(
            **base, shape=v.original_shape, spacing=tuple(round(s, 3) for s in v.spacing),  # type: ignore[arg-type]
            orientation=v.orientation, n_slices=v.n_slices, slice_index=k, channel=channel, channels=list(v.channels),
            alpha=_number(query.get("alpha"), DEFAULT_ALPHA, 0.0, 1.0), image_size=display_size(v),
            label_volumes_ml=v.label_volumes_ml(), region_volumes_ml=result.region_volumes_ml,
            download_url=f"/results/{result.token}/segmentation.{result.extension}",
            download_label=f"Download {'mask' if result.mode == 'image' else 'segmentation'} (.{result.extension})")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.store = store
    app.state.infos = infos
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
