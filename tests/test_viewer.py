"""Web viewer: a real model server (tiny untrained package) and the viewer, both subprocesses on 127.0.0.1.

The files are posted to the viewer the way a browser form does (multipart/form-data); the page, the slice
PNG and the download are checked, then the result page is rendered by headless Chromium and the screenshot
checked for content and for the segmentation colours. In-process tests (Starlette's TestClient, no model
server) cover the errors the viewer finds itself and the rendering helpers.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import re
import shutil
import subprocess

import httpx
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.errors import MedsegError
from medseg.io import load_nifti, load_nifti_bytes, save_nifti
from medseg.task import BRATS2023
BRATS_CHANNELS = BRATS2023.channels
from medseg.serving import client, server
from medseg.viewer import page, render
from medseg.viewer.app import (ResultStore, StoredResult, ViewerConfig, case_name_from, create_app, error_from_client,
                               start_viewer_process, wait_viewer_ready)
from tests.factories import make_model_package, write_case

NAME = "brats"
CASE = "BraTS-GLI-00042-000"  # the file names the browser sends: CASE-t1n.nii.gz, ...


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def case(tmp_path_factory):
    paths, _ = write_case(tmp_path_factory.mktemp("viewer-case"), shape=(40, 44, 36))
    return paths


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``(model server url, viewer url)``: both running on 127.0.0.1 for the module."""
    folder = tmp_path_factory.mktemp("viewer")
    package = make_model_package(folder / "model")
    mport, vport = server.free_port(), server.free_port()
    model_url, viewer_url = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{vport}"
    ms = server.start_server_process(package, NAME, mport, log_file=folder / "server.log", env={"OMP_NUM_THREADS": "1"},
                                     extra_args=["--reload-interval", "0"])
    vw = start_viewer_process(model_url, NAME, vport, log_file=folder / "viewer.log", extra_args=["--max-results", "4"])
    try:
        server.wait_until_ready(model_url, NAME, timeout_s=90, proc=ms)
        wait_viewer_ready(viewer_url, timeout_s=30, proc=vw)
    except MedsegError as exc:
        server.stop_server(vw)
        server.stop_server(ms)
        logs = "\n".join(p.read_text()[-2000:] for p in (folder / "server.log", folder / "viewer.log") if p.exists())
        pytest.fail(f"{exc}\n{logs}")
    yield model_url, viewer_url
    server.stop_server(vw)
    server.stop_server(ms)


def _form(paths, **replace):
    """The multipart fields a browser sends for the upload form: one file per channel."""
    files = {c: (f"{CASE}-{c}.nii.gz", p.read_bytes(), "application/gzip") for c, p in zip(BRATS_CHANNELS, paths)}
    for channel, value in replace.items():
        if value is None:
            files.pop(channel)
        else:
            files[channel] = value
    return files


@pytest.fixture(scope="module")
def uploaded(stack, case):
    """The JSON summary of one upload (as the page's script asks for it)."""
    _, viewer_url = stack
    response = httpx.post(f"{viewer_url}/segment", files=_form(case), headers={"accept": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


# --------------------------------------------------------------------------- over HTTP
def test_upload_answers_summary_matching_the_model_server(stack, case, uploaded):
    model_url, _ = stack
    direct = client.infer(model_url, NAME, case, list(BRATS_CHANNELS), timeout=60)
    assert uploaded["model_name"] == NAME and uploaded["model_version"] == "local"
    assert set(uploaded["volumes_ml"]) == {"WT", "TC", "ET"}
    assert uploaded["volumes_ml"] == pytest.approx(direct["volumes_ml"], abs=1e-4)
    assert uploaded["case"] == "BraTS-GLI-00042-000"
    assert uploaded["shape"] == [40, 44, 36] and uploaded["slices"] == 36
    assert uploaded["channels"] == list(BRATS_CHANNELS)
    assert 0 <= uploaded["default_slice"] < 36
    assert re.fullmatch(r"/view/[A-Za-z0-9_-]{16,}", uploaded["view_url"])
    # label volumes computed by the viewer agree with the server's region volumes (WT = all labels)
    assert sum(uploaded["label_volumes_ml"].values()) == pytest.approx(uploaded["volumes_ml"]["WT"], rel=1e-4)


def test_browser_form_post_redirects_to_the_result_page(stack, case):
    _, viewer_url = stack
    response = httpx.post(f"{viewer_url}/segment", files=_form(case), timeout=120)  # no Accept: JSON, like a plain form
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("/view/")
    html = httpx.get(viewer_url + location).text
    assert "BraTS-GLI-00042-000" in html
    assert 'id="model-version">local<' in html
    assert "Download segmentation" in html and "/segmentation.nii.gz" in html
    for region in ("WT", "TC", "ET"):
        assert f"<b>{region}</b>" in html
    assert re.search(r'<img id="slice" src="/results/[^"]+/slice/\d+\.png\?channel=t1c', html)
    assert 'type="range" id="k" min="0" max="35"' in html


def test_page_assets_are_local_and_headers_strict(stack):
    _, viewer_url = stack
    index = httpx.get(viewer_url + "/")
    assert index.status_code == 200
    assert "default-src 'none'" in index.headers["content-security-policy"]
    assert index.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r'(src|href)="(https?:)?//', index.text), "no external assets"
    for name in BRATS_CHANNELS:
        assert f'name="{name}"' in index.text
    assert 'enctype="multipart/form-data"' in index.text
    assert httpx.get(viewer_url + "/static/viewer.js").headers["content-type"].startswith("text/javascript")
    css = httpx.get(viewer_url + "/static/viewer.css").text
    assert ".label-2 { background: rgb(%d, %d, %d); }" % render.label_rgb(2) in css
    assert httpx.get(viewer_url + "/api/status").json()["ready"] is True


def test_slice_png_shows_the_segmentation(stack, uploaded):
    _, viewer_url = stack
    k = uploaded["default_slice"]
    response = httpx.get(viewer_url + uploaded["slice_url"].format(k=k), params={"alpha": 1, "channel": "t2f"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert max(image.shape[:2]) == render.DEFAULT_SIZE
    labels = {int(v) for v in uploaded["label_volumes_ml"]}
    coloured = sum(int(np.all(image == render.label_rgb(v), axis=-1).sum()) for v in labels)
    assert coloured > 100
    # every slice index draws, outside the range does not
    assert httpx.get(viewer_url + uploaded["slice_url"].format(k=0)).status_code == 200
    assert httpx.get(viewer_url + uploaded["slice_url"].format(k=uploaded["slices"])).status_code == 404
    assert httpx.get(viewer_url + uploaded["slice_url"].format(k=0), params={"channel": "ct"}).status_code == 400


def test_download_is_the_segmentation_in_the_input_geometry(stack, case, uploaded):
    model_url, viewer_url = stack
    response = httpx.get(viewer_url + uploaded["download_url"])
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="BraTS-GLI-00042-000_seg.nii.gz"'
    assert response.content[:2] == b"\x1f\x8b"
    seg, affine, _ = load_nifti_bytes(response.content, dtype=np.uint8)
    image, image_affine, _ = load_nifti(case[0])
    assert seg.shape == image.shape
    np.testing.assert_allclose(affine, image_affine, atol=1e-5)
    direct = client.infer(model_url, NAME, case, list(BRATS_CHANNELS), timeout=60)
    np.testing.assert_array_equal(seg, load_nifti_bytes(direct["segmentation_bytes"], dtype=np.uint8)[0])


def test_bad_upload_shows_the_model_servers_message(stack, case):
    _, viewer_url = stack
    form = _form(case, t2f=("notes<b>.txt", b"not an image at all", "text/plain"))
    as_json = httpx.post(f"{viewer_url}/segment", files=form, headers={"accept": "application/json"}, timeout=60)
    assert as_json.status_code == 400
    message = as_json.json()["error"]
    assert message.startswith("The model server refused the case (400):") and "t2f" in message and "NIfTI" in message
    as_page = httpx.post(f"{viewer_url}/segment", files=form, timeout=60)
    assert as_page.status_code == 400
    box = re.search(r'<div id="error" class="error" role="alert">(.*?)</div>', as_page.text, flags=re.DOTALL)
    assert box and "t2f" in box.group(1) and "refused the case" in box.group(1)


def test_mismatched_channels_are_refused_by_the_model_server(stack, case, tmp_path):
    _, viewer_url = stack
    shifted = nib.load(str(case[1]))
    path = tmp_path / "shifted-t1c.nii.gz"
    affine = shifted.affine.copy()
    affine[0, 3] += 10
    save_nifti(path, np.asarray(shifted.dataobj, dtype=np.float32), affine)
    response = httpx.post(f"{viewer_url}/segment", files=_form(case, t1c=(path.name, path.read_bytes(), "application/gzip")),
                          headers={"accept": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert "refused the case" in response.json()["error"] and "affine" in response.json()["error"]


def test_missing_and_empty_files_are_named(stack, case):
    _, viewer_url = stack
    response = httpx.post(f"{viewer_url}/segment", files=_form(case, t1c=None, t2w=("t2w.nii.gz", b"", "application/gzip")),
                          headers={"accept": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"] == "t1c: no file chosen; t2w: the file t2w.nii.gz is empty."


def test_unknown_result_is_404(stack):
    _, viewer_url = stack
    page_404 = httpx.get(f"{viewer_url}/view/{'x' * 24}")
    assert page_404.status_code == 404 and "no longer kept" in page_404.text
    assert httpx.get(f"{viewer_url}/results/{'x' * 24}/segmentation.nii.gz").status_code == 404
    assert httpx.get(f"{viewer_url}/results/{'x' * 24}.json").json()["error"].startswith("no such result")


# --------------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_result_page_renders_in_headless_chromium(stack, uploaded, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH (apt-get install -y chromium); the page was checked over HTTP only")
    _, viewer_url = stack
    shot = tmp_path / "viewer.png"
    url = f"{viewer_url}{uploaded['view_url']}?slice={uploaded['default_slice']}&channel=t2f&alpha=1"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=4000", f"--screenshot={shot}", "--window-size=1200,900", url]
    done = subprocess.run(cmd, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
    if os.environ.get("MEDSEG_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["MEDSEG_KEEP_SCREENSHOT"])
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (900, 1200, 3)
    assert pixels.std() > 30, "blank page"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "too few colours for a page with an MRI slice"
    slice_area = pixels[90:720, :800]  # the viewer's image (the legend's swatches are right of x=800)
    labels = {int(v) for v in uploaded["label_volumes_ml"]}
    coloured = sum(int(np.all(slice_area == render.label_rgb(v), axis=-1).sum()) for v in labels)
    assert coloured > 1000, "no segmentation colour in the rendered slice"
    assert (slice_area.sum(axis=-1) < 30).mean() > 0.05, "the dark frame of the image is missing"


# --------------------------------------------------------------------------- in process (no model server)
def _offline(**config):
    """Requests to the viewer app in this process (httpx's ASGI transport); the model server URL has no listener."""
    defaults = {"model_url": f"http://127.0.0.1:{server.free_port()}", "model_name": NAME}
    app = create_app(ViewerConfig(**{**defaults, **config}))

    def call(method: str, url: str, **kwargs):
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://viewer") as http:
                return await http.request(method, url, **kwargs)

        return asyncio.run(go())

    return call


def test_viewer_refuses_large_and_non_multipart_uploads(case):
    call = _offline(max_upload_bytes=1000)
    big = call("POST", "/segment", files=_form(case), headers={"accept": "application/json"})
    assert big.status_code == 413 and "at most" in big.json()["error"]
    plain = call("POST", "/segment", content=b'{"t1n": 1}', headers={"content-type": "application/json", "accept": "application/json"})
    assert plain.status_code == 415 and "multipart/form-data" in plain.json()["error"]
    page_error = call("POST", "/segment", files=_form(case))
    assert page_error.status_code == 413 and 'role="alert">The upload is' in page_error.text


def test_unreachable_model_server_is_a_clear_502(case):
    call = _offline()
    response = call("POST", "/segment", files=_form(case), headers={"accept": "application/json"})
    assert response.status_code == 502
    assert response.json()["error"].startswith("The model server cannot be reached")
    status = call("GET", "/api/status").json()
    assert status["ready"] is False and "cannot reach" in status["detail"]


def test_error_mapping_keeps_the_server_text():
    err = error_from_client(MedsegError("model server answered 413: request body is 300 MiB, over 200 MiB", "http://x/v2/models/m/infer"))
    assert err.status == 413 and "300 MiB" in err.message
    assert error_from_client(MedsegError("model server answered 503: overloaded", "u")).status == 503
    assert error_from_client(MedsegError("model server answered 404: model m not found", "u")).status == 502
    assert error_from_client(MedsegError("model server answered 500: boom", "u")).status == 502
    assert error_from_client(MedsegError("no answer within 300 s", "u")).status == 504


def test_case_names_are_safe():
    assert case_name_from("BraTS-GLI-00001-000-t1n.nii.gz", "t1n") == "BraTS-GLI-00001-000"
    assert case_name_from("C:\\scans\\pat_7_T1N.nii", "t1n") == "pat_7"
    assert case_name_from('../../"evil"; rm -rf.nii.gz', "t1n") == "evil_rm_-rf"
    assert case_name_from(".nii.gz", "t1n") == "case"


def test_page_escapes_what_people_send():
    view = render.CaseView(channels={"t1n": np.zeros((4, 4, 3), np.uint8)}, segmentation=np.zeros((4, 4, 3), np.uint8),
                           spacing=(1.0, 1.0, 1.0), original_shape=(4, 4, 3), orientation="RAS")
    result = page.PageResult(token="t" * 20, model_name="m<script>", model_version="1", case_name="<img src=x onerror=alert(1)>",
                             file_names={"t1n": '"><script>x</script>'}, shape=(4, 4, 3), spacing=(1, 1, 1), orientation="RAS", n_slices=3,
                             slice_index=1, channel="t1n", channels=["t1n"], alpha=0.4, image_size=render.display_size(view),
                             label_volumes_ml={}, region_volumes_ml={"WT": 0.0}, seconds=1.0)
    html = page.render_page("http://127.0.0.1:1", "m<script>", ["t1n"], result, error="<b>bad</b>")
    assert "<script>" not in html.replace('<script src="/static/viewer.js" defer></script>', "")
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;b&gt;bad&lt;/b&gt;" in html


def test_non_ras_input_is_shown_in_ras_order(tmp_path):
    """An LPS-stored case is drawn like the same case stored RAS (anterior up, patient's right on the right)."""
    rng = np.random.default_rng(1)
    ras = rng.random((6, 7, 5)).astype(np.float32) + 1
    seg = np.zeros((6, 7, 5), np.uint8)
    seg[1, 5, 2] = 2  # patient left, anterior
    ras_affine = np.diag([2.0, 3.0, 4.0, 1.0])
    lps = ras[::-1, ::-1, :]
    lps_affine = ras_affine @ np.array([[-1, 0, 0, 5], [0, -1, 0, 6], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    from medseg.io import nifti_to_bytes

    a = render.prepare_case({"t1n": nifti_to_bytes(ras, ras_affine)}, nifti_to_bytes(seg, ras_affine))
    b = render.prepare_case({"t1n": nifti_to_bytes(lps, lps_affine)}, nifti_to_bytes(seg[::-1, ::-1, :].copy(), lps_affine))
    assert (a.orientation, b.orientation) == ("RAS", "LPS")
    assert a.spacing == b.spacing == (2.0, 3.0, 4.0)
    np.testing.assert_array_equal(a.channels["t1n"], b.channels["t1n"])
    np.testing.assert_array_equal(a.segmentation, b.segmentation)
    gray, labels = render.axial_slice(a, 2, "t1n")
    assert labels.shape == (7, 6) and labels[1, 1] == 2  # row 1 of 7 = anterior (top), column 1 of 6 = patient's left
    assert a.best_slice() == 2
    rgb = render.slice_rgb(a, 2, "t1n", alpha=1.0, size=140)
    assert rgb.shape == (140, 80, 3)  # 7×3 mm tall, 6×2 mm wide
    assert np.all(rgb[30, 20] == render.label_rgb(2))


def test_result_store_keeps_the_most_recent():
    store = ResultStore(2)
    view = render.CaseView(channels={}, segmentation=np.zeros((1, 1, 1), np.uint8), spacing=(1, 1, 1), original_shape=(1, 1, 1), orientation="RAS")
    tokens = [f"token-{i:020d}" for i in range(3)]
    for t in tokens[:2]:
        store.put(StoredResult(t, view, b"", {}, "m", "1", "c", {}, 0.0))
    assert store.get(tokens[0]) is not None  # now the most recent
    store.put(StoredResult(tokens[2], view, b"", {}, "m", "1", "c", {}, 0.0))
    assert store.get(tokens[1]) is None and store.get(tokens[0]) is not None and len(store) == 2
    assert store.get("../etc/passwd") is None


def test_uncompressed_upload_is_accepted(stack, case):
    _, viewer_url = stack
    form = {c: (f"{CASE}-{c}.nii", gzip.decompress(p.read_bytes()), "application/octet-stream") for c, p in zip(BRATS_CHANNELS, case)}
    response = httpx.post(f"{viewer_url}/segment", files=form, headers={"accept": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["case"] == "BraTS-GLI-00042-000"
