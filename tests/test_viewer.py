"""Web viewer: a real model server (tiny untrained package) and the viewer, both subprocesses on 127.0.0.1, for
each task: the BraTS-like 3D segmentation package, a CN/MCI/AD classifier taking the age, a 2D slice-set model.

The upload form comes from the model server's metadata (no channel names given to the viewer). The files are
posted to the viewer the way a browser form does (multipart/form-data); the page, the slice PNG and the download
are checked, then the result pages are rendered by headless Chromium and the screenshots checked for content and
for the segmentation colours / the class bars. In-process tests (httpx's ASGI transport, no model server) cover
the errors the viewer finds itself and the rendering helpers.
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
from tests.factories import (SLICE_CHANNELS, make_classifier_package, make_model_package, make_slice_package, slice_rgb, write_case,
                             write_classifier_case, write_slice_stack)

NAME = "brats"
CASE = "BraTS-GLI-00042-000"  # the file names the browser sends: CASE-t1n.nii.gz, ...


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def case(tmp_path_factory):
    paths, _ = write_case(tmp_path_factory.mktemp("viewer-case"), shape=(40, 44, 36))
    return paths


def _start_stack(folder, package, name):
    """``(model server url, viewer url, processes)``: both running on 127.0.0.1; the viewer asks the model what it takes."""
    mport, vport = server.free_port(), server.free_port()
    model_url, viewer_url = f"http://127.0.0.1:{mport}", f"http://127.0.0.1:{vport}"
    ms = server.start_server_process(package, name, mport, log_file=folder / "server.log", env={"OMP_NUM_THREADS": "1"},
                                     extra_args=["--reload-interval", "0"])
    vw = start_viewer_process(model_url, name, vport, log_file=folder / "viewer.log", extra_args=["--max-results", "4"])
    try:
        server.wait_until_ready(model_url, name, timeout_s=90, proc=ms)
        wait_viewer_ready(viewer_url, timeout_s=30, proc=vw)
    except MedsegError as exc:
        server.stop_server(vw)
        server.stop_server(ms)
        logs = "\n".join(p.read_text()[-2000:] for p in (folder / "server.log", folder / "viewer.log") if p.exists())
        pytest.fail(f"{exc}\n{logs}")
    return model_url, viewer_url, (vw, ms)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``(model server url, viewer url)``: both running on 127.0.0.1 for the module."""
    folder = tmp_path_factory.mktemp("viewer")
    model_url, viewer_url, procs = _start_stack(folder, make_model_package(folder / "model"), NAME)
    yield model_url, viewer_url
    for proc in procs:
        server.stop_server(proc)


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


def test_browser_form_post_redirects_to_the_result_page(stack, case, uploaded):
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
    # the channel shown first: the one where the segmented region stands out most (the same case: the same choice)
    assert uploaded["default_channel"] in BRATS_CHANNELS
    assert re.search(rf'<img id="slice" src="/results/[^"]+/slice/\d+\.png\?channel={uploaded["default_channel"]}', html)
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
    assert 'enctype="multipart/form-data"' in index.text and 'id="pick-all"' in index.text
    assert 'name="age"' not in index.text and 'id="picture"' not in index.text  # a 3D segmentation model takes neither
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


# --------------------------------------------------------------------------- other tasks: a classifier, a 2D slice set
CLASSES = ["CN", "MCI", "AD"]


@pytest.fixture(scope="module")
def cls_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewer-cls")
    model_url, viewer_url, procs = _start_stack(folder, make_classifier_package(folder / "model", use_age=True), "adni")
    yield model_url, viewer_url, write_classifier_case(folder / "subject", k=2)
    for proc in procs:
        server.stop_server(proc)


@pytest.fixture(scope="module")
def slice_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewer-slices")
    model_url, viewer_url, procs = _start_stack(folder, make_slice_package(folder / "model"), "lgg")
    pixels = slice_rgb(48, 40)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    yield model_url, viewer_url, {"png": png.getvalue(), "stack": write_slice_stack(folder / "stack", pixels, n_slices=4)}
    for proc in procs:
        server.stop_server(proc)


@pytest.fixture(scope="module")
def classified(cls_stack):
    _, viewer_url, subject = cls_stack
    files = {"image": ("S07-image.nii.gz", subject.read_bytes(), "application/gzip")}
    response = httpx.post(f"{viewer_url}/segment", files=files, data={"age": "71"}, headers={"accept": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def pictured(slice_stack):
    _, viewer_url, data = slice_stack
    response = httpx.post(f"{viewer_url}/segment", files={"image": ("TCGA_CS_4941_19960909_12.png", data["png"], "image/png")},
                          headers={"accept": "application/json"}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_classifier_form_asks_for_the_channels_and_the_age(cls_stack):
    _, viewer_url, subject = cls_stack
    index = httpx.get(viewer_url + "/").text
    assert 'name="image"' in index and 'data-channel="image"' in index  # the classifier's one channel, from the metadata
    assert re.search(r'<input type="number" name="age" id="age"[^>]* required>', index)
    assert ">Classify</button>" in index and 'id="pick-all"' not in index and 'id="picture"' not in index
    files = {"image": ("S07-image.nii.gz", subject.read_bytes(), "application/gzip")}
    no_age = httpx.post(f"{viewer_url}/segment", files=files, headers={"accept": "application/json"}, timeout=60)
    assert no_age.status_code == 400 and no_age.json()["error"] == "age: the model takes the subject's age in years."
    bad_age = httpx.post(f"{viewer_url}/segment", files=files, data={"age": "-3"}, headers={"accept": "application/json"}, timeout=60)
    assert bad_age.status_code == 400 and "refused the case" in bad_age.json()["error"] and "age" in bad_age.json()["error"]


def test_classifier_result_shows_a_bar_per_class_and_the_label(cls_stack, classified):
    model_url, viewer_url, subject = cls_stack
    direct = client.infer(model_url, "adni", [subject], age=71.0, timeout=60)
    assert classified["task"] == "classification" and classified["view"] == "classes" and classified["age"] == 71.0
    assert list(classified["probabilities"]) == CLASSES and classified["label"] == direct["label"]
    assert classified["probabilities"] == pytest.approx(direct["probabilities"], abs=1e-6)
    assert classified["case"] == "S07" and classified["model_version"] == "local"
    html = httpx.get(viewer_url + classified["view_url"]).text
    assert f'id="label" class="label">{classified["label"]}<' in html and "age 71 years" in html
    assert html.count('<svg class="bar"') == 3 and html.count('class="fill chosen"') == 1
    for name, p in classified["probabilities"].items():
        assert f"<b>{name}</b>" in html and f"{p:.1%}" in html
    assert 'id="slice"' not in html and httpx.get(f"{viewer_url}/results/{classified['id']}/slice/0.png").status_code == 404
    assert httpx.get(f"{viewer_url}/results/{classified['id']}/segmentation.nii.gz").status_code == 404
    assert httpx.get(f"{viewer_url}/results/{classified['id']}.json").json()["label"] == classified["label"]


def test_slice_form_offers_one_picture_or_the_stack(slice_stack):
    _, viewer_url, _ = slice_stack
    index = httpx.get(viewer_url + "/").text
    assert re.search(r'<input type="file" name="image" id="picture" accept="[^"]*image/png', index)
    for channel in SLICE_CHANNELS:
        assert f'data-channel="{channel}"' in index
    assert " required>" not in index  # either the picture or the three channel files
    assert ">Segment</button>" in index and 'name="age"' not in index


def test_slice_picture_result_is_the_picture_with_its_mask(slice_stack, pictured):
    model_url, viewer_url, data = slice_stack
    direct = client.infer_image(model_url, "lgg", data["png"], timeout=60)
    assert pictured["task"] == "segmentation" and pictured["view"] == "image" and pictured["format"] == "png"
    assert pictured["shape"] == [48, 40, 1] and pictured["slices"] == 1 and pictured["orientation"] == "image"
    assert pictured["case"] == "TCGA_CS_4941_19960909_12" and list(pictured["volumes_ml"]) == ["abnormality"]
    assert pictured["download_url"].endswith("/segmentation.png")
    download = httpx.get(viewer_url + pictured["download_url"])
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert download.headers["content-disposition"] == 'attachment; filename="TCGA_CS_4941_19960909_12_mask.png"'
    assert download.content == direct["segmentation_bytes"]
    mask = np.asarray(Image.open(io.BytesIO(download.content)))
    assert mask.shape == (40, 48)
    # the slice is drawn as the picture (rows down, columns across): its label colour where the mask is
    drawn = np.asarray(Image.open(io.BytesIO(httpx.get(viewer_url + pictured["slice_url"].format(k=0), params={"alpha": 1, "size": 96}).content)).convert("RGB"))
    assert drawn.shape == (80, 96, 3)
    coloured = np.all(drawn == render.label_rgb(1), axis=-1)
    big = np.kron(mask > 0, np.ones((2, 2), bool))
    assert coloured.sum() > 20 and (coloured == big).mean() > 0.97
    html = httpx.get(viewer_url + pictured["view_url"]).text
    assert "Download mask (.png)" in html and 'id="k"' not in html and "no geometry: 1 mm assumed" in html
    assert "<b>abnormality</b>" in html  # the label's name from the model's metadata
    stack = httpx.post(f"{viewer_url}/segment", headers={"accept": "application/json"}, timeout=120,
                       files={c: (f"case-{c}.nii.gz", p.read_bytes(), "application/gzip") for c, p in zip(SLICE_CHANNELS, data["stack"])})
    assert stack.status_code == 200, stack.text
    assert stack.json()["view"] == "volume" and stack.json()["slices"] == 4 and stack.json()["download_url"].endswith("/segmentation.nii.gz")
    bad = httpx.post(f"{viewer_url}/segment", files={"image": ("notes.png", b"not a picture", "image/png")}, headers={"accept": "application/json"}, timeout=60)
    assert bad.status_code == 400 and "not a PNG or TIFF" in bad.json()["error"]


def _screenshot(url: str, tmp_path, name: str) -> np.ndarray:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH (make test-tools installs it); the page was checked over HTTP only")
    shot = tmp_path / f"{name}.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=4000", f"--screenshot={shot}", "--window-size=1200,900", url]
    done = subprocess.run(cmd, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
    if os.environ.get("MEDSEG_KEEP_SCREENSHOT"):
        shutil.copy(shot, f"{os.environ['MEDSEG_KEEP_SCREENSHOT']}.{name}.png")
    return np.asarray(Image.open(shot).convert("RGB"))


def test_classifier_and_slice_pages_render_in_headless_chromium(cls_stack, classified, slice_stack, pictured, tmp_path):
    bars = _screenshot(f"{cls_stack[1]}{classified['view_url']}", tmp_path, "classes")
    assert bars.std() > 20, "blank page"
    chosen = np.all(np.abs(bars.astype(int) - (31, 111, 235)) <= 2, axis=-1)  # the label's bar (#1f6feb)
    others = np.all(np.abs(bars.astype(int) - (138, 169, 214)) <= 2, axis=-1)  # the other classes' bars (#8aa9d6)
    assert chosen.sum() > 200 and others.sum() > 200, (chosen.sum(), others.sum())
    picture = _screenshot(f"{slice_stack[1]}{pictured['view_url']}?alpha=1", tmp_path, "slice")
    assert picture.std() > 20, "blank page"
    assert np.all(picture[90:720, :800] == render.label_rgb(1), axis=-1).sum() > 500, "no mask colour in the drawn slice"
