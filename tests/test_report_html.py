"""report.html: self-contained (every picture a PNG data URI, no external file, no script), the right
sections, and a real rendering with headless Chromium that is not blank."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from medseg.evaluation.report import REPORT_HTML, evaluate_arrays, write_report
from medseg.evaluation.report_html import metric_stats, rank_cases
from medseg.schemas import DatasetJson, Metrics
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()

PNG = b"\x89PNG\r\n\x1a\n"
SHAPE = (40, 44, 36)


def _dataset() -> DatasetJson:
    return DatasetJson(name="Dataset001_BraTS", channel_names={"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
                       labels=dict(BRATS_LABELS), numTraining=4, regions={k: list(v) for k, v in BRATS_REGIONS.items()})


def _case(i: int):
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    brain = ((ii - 20) / 17) ** 2 + ((jj - 22) / 19) ** 2 + ((kk - 18) / 15) ** 2 < 1
    rng = np.random.default_rng(i)
    image = brain * (500 + 60 * rng.standard_normal(SHAPE)).astype(np.float32)
    d = np.sqrt((ii - 18) ** 2 + (jj - 20) ** 2 + (kk - 17) ** 2)
    ref = np.zeros(SHAPE, np.uint8)
    ref[d < 9] = 2
    ref[d < 5] = 3
    ref[d < 2.5] = 1
    pred = np.roll(ref, i, axis=0)  # case i shifted by i voxels: case 0 best, case 3 worst
    return f"case-{i}", pred, ref, (1.0, 1.0, 1.5), image


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    metrics = evaluate_arrays((_case(i) for i in range(4)), _dataset(), out, lesionwise="brats2023")
    return out, metrics


def _img_uris(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_self_contained_with_decodable_pngs(report):
    out, _ = report
    page = (out / REPORT_HTML).read_text()
    assert page.startswith("<!DOCTYPE html>")
    uris = _img_uris(page)
    assert len(uris) == 4 == page.count("<img")  # box plots + best, median, worst overlays
    for uri in uris:
        assert uri.startswith("data:image/png;base64,")
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert len(data) > 1000 and data[:8] == PNG
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing loaded from elsewhere
    assert "@import" not in page and "url(" not in page


def test_sections_tables_and_ranking(report):
    out, metrics = report
    page = (out / REPORT_HTML).read_text()
    for heading in ("Summary", "Distributions", "Best, median and worst case", "Metrics per region", "Dice per case"):
        assert f"<h2>{heading}</h2>" in page
    assert [r[:2] for r in rank_cases(metrics, ["WT", "TC", "ET"])] == [("best", "case-0"), ("median", "case-1"), ("worst", "case-3")]
    for role in ("best", "median", "worst"):
        assert f'class="tag {role}"' in page
    dice = [c["WT"]["dice"] for c in metrics.per_case]
    st = metric_stats(dice)
    assert f"{st['mean']:.3f} ± {st['std']:.3f}" in page and f"{st['median']:.3f} [{st['q25']:.3f} – {st['q75']:.3f}]" in page
    assert st["std"] == pytest.approx(np.std(dice, ddof=1)) and st["q25"] == pytest.approx(np.percentile(dice, 25))
    assert "Lesion-wise Dice (2023 rules)" in page and "Instance PQ Dice" in page
    assert 'title="volume_ref_ml"' in page  # the metric names of cases.csv, on hover


def test_without_slices_and_with_few_cases(tmp_path):
    # write_report from metrics alone (no arrays): the page says there are no overlays
    _, pred, ref, sp, _ = _case(1)
    evaluate_arrays([("only", pred, ref, sp)], _dataset(), tmp_path / "one", keep_slices=False)
    page = (tmp_path / "one" / REPORT_HTML).read_text()
    assert "No slices were kept" in page and len(_img_uris(page)) == 1
    metrics = Metrics.load(tmp_path / "one")
    write_report(metrics, tmp_path / "again", regions=["WT"])
    assert (tmp_path / "again" / REPORT_HTML).is_file()
    assert rank_cases(metrics, ["WT"]) == [("best", "only", pytest.approx(metrics.per_case[0]["WT"]["dice"]))]
    # a case without an image: labels on black, said so
    evaluate_arrays([("noimg", pred, ref, sp, None)], _dataset(), tmp_path / "noimg")
    assert "No image was given" in (tmp_path / "noimg" / REPORT_HTML).read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt-get install -y chromium)")
def test_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    out, _ = report
    shot = tmp_path / "report.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
           (out / REPORT_HTML).as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.std() > 20  # not a blank page
    colours = np.unique(rgb.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 500  # text, tables, plots and overlays, not a few flat areas
    top = rgb[:60].reshape(-1, 3).mean(axis=0)
    assert top.max() < 80  # the dark header band rendered, so the inline style sheet applied
