"""The viewer's one page (HTML rendered here, every value escaped), its stylesheet and its script.

No external assets: the stylesheet and the script are served by the viewer itself, and the
Content-Security-Policy the app sends allows nothing else. Without JavaScript the page still works:
the form posts, the server redirects to the result, the slice shown is the one in the URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from typing import Any

from medseg.viewer.render import label_rgb

#: Shown next to the file inputs.
CHANNEL_DESCRIPTIONS = {"t1n": "T1 native", "t1c": "T1 contrast-enhanced", "t2w": "T2-weighted", "t2f": "T2-FLAIR"}
#: Label value → (short name, description) for the BraTS 2023 glioma labels.
LABEL_NAMES = {1: ("NETC", "necrotic / non-enhancing core"), 2: ("SNFH", "oedema (FLAIR hyperintensity)"), 3: ("ET", "enhancing tumour")}
REGION_NAMES = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}


@dataclass
class PageResult:
    """What the result part of the page shows (built by the app from a stored result)."""

    token: str
    model_name: str
    model_version: str
    case_name: str
    file_names: dict[str, str]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    n_slices: int
    slice_index: int
    channel: str
    channels: list[str]
    alpha: float
    image_size: tuple[int, int]
    label_volumes_ml: dict[int, float]
    region_volumes_ml: dict[str, float]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def render_page(model_url: str, model_name: str, channels: list[str], result: PageResult | None = None,
                error: str | None = None, notice: str | None = None, max_upload_mb: float | None = None, kept: int | None = None) -> str:
    """The whole page: upload form, error box, and the result viewer when ``result`` is given."""
    files = "\n".join(
        f'<label class="file"><span class="ch">{_e(c)}</span><span class="desc">{_e(CHANNEL_DESCRIPTIONS.get(c, "channel"))}</span>'
        f'<input type="file" name="{_e(c)}" accept=".nii,.gz,application/gzip" required></label>'
        for c in channels)
    limit = f" Up to {max_upload_mb:g} MiB in all." if max_upload_mb else ""
    error_html = f'<div id="error" class="error" role="alert">{_e(error)}</div>' if error else '<div id="error" class="error" role="alert" hidden></div>'
    notice_html = f'<p class="notice">{_e(notice)}</p>' if notice else ""
    title = f"{result.case_name} · medseg viewer" if result else "medseg viewer"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<link rel="stylesheet" href="/static/viewer.css">
<script src="/static/viewer.js" defer></script>
</head>
<body>
<header>
  <h1>medseg viewer</h1>
  <p class="sub">model <b>{_e(model_name)}</b> at <code>{_e(model_url)}</code> · <span id="server-status" class="status-unknown">model server: checking…</span></p>
</header>
<main>
{_result_html(result) if result else ""}
<section class="card upload">
  <h2>{"Segment another case" if result else "Segment a case"}</h2>
  {notice_html}
  <form id="upload" method="post" action="/segment" enctype="multipart/form-data">
    <div class="files">
{files}
    </div>
    <p class="pick-all"><label>Or choose all {len(channels)} files at once <input type="file" id="pick-all" multiple accept=".nii,.gz,application/gzip"></label>
    <span class="hint">each goes to the channel named in its file name, e.g. <code>…-t1c.nii.gz</code></span></p>
    <p class="hint">NIfTI <code>.nii</code> or <code>.nii.gz</code>, one 3D volume per file, all on the same grid.{_e(limit)}</p>
    <div class="actions"><button type="submit" id="submit">Segment</button><span id="progress" role="status"></span></div>
  </form>
  {error_html}
</section>
</main>
<footer>Research use only, not a medical device. The files go to the model server above only; this viewer keeps
{_e(kept if kept is not None else "a few")} recent results in memory and nothing on disk.</footer>
</body>
</html>
"""


def _result_html(r: PageResult) -> str:
    options = "".join(f'<option value="{_e(c)}"{" selected" if c == r.channel else ""}>{_e(c)} · {_e(CHANNEL_DESCRIPTIONS.get(c, c))}</option>'
                      for c in r.channels)
    labels = sorted(set(LABEL_NAMES) | set(r.label_volumes_ml))
    label_rows = "".join(
        f'<tr><td><span class="swatch label-{int(v)}"></span></td><td><b>{_e(LABEL_NAMES.get(v, (f"label {v}", ""))[0])}</b> '
        f'<span class="muted">{_e(LABEL_NAMES.get(v, ("", ""))[1])}</span></td><td class="num">{r.label_volumes_ml.get(v, 0.0):.2f}&nbsp;ml</td></tr>'
        for v in labels)
    region_rows = "".join(
        f'<tr><td><b>{_e(name)}</b> <span class="muted">{_e(REGION_NAMES.get(name, ""))}</span></td><td class="num">{ml:.2f}&nbsp;ml</td></tr>'
        for name, ml in r.region_volumes_ml.items())
    width, height = r.image_size
    src = f"/results/{_e(r.token)}/slice/{r.slice_index}.png?channel={_e(r.channel)}&amp;alpha={r.alpha:g}"
    spacing = " × ".join(f"{s:g}" for s in r.spacing)
    shape = " × ".join(str(n) for n in r.shape)
    files = ", ".join(f"{_e(c)}: {_e(n)}" for c, n in r.file_names.items())
    return f"""<section class="card result" id="result" data-token="{_e(r.token)}" data-slices="{r.n_slices}">
  <div class="viewer">
    <div class="frame">
      <span class="ori top">A</span><span class="ori bottom">P</span><span class="ori left">L</span><span class="ori right">R</span>
      <img id="slice" src="{src}" width="{width}" height="{height}" alt="axial slice {r.slice_index + 1} of {r.n_slices} with the segmentation overlaid">
    </div>
    <div class="controls">
      <label class="wide">Axial slice <input type="range" id="k" min="0" max="{r.n_slices - 1}" value="{r.slice_index}" aria-describedby="k-out">
        <output id="k-out">{r.slice_index + 1} / {r.n_slices}</output></label>
      <label>Channel <select id="channel">{options}</select></label>
      <label>Overlay <input type="range" id="alpha" min="0" max="100" value="{round(r.alpha * 100)}"></label>
    </div>
    <p class="hint">Mouse wheel over the image or arrow keys on the slider move through the slices.</p>
  </div>
  <aside class="legend">
    <h2>{_e(r.case_name)}</h2>
    <p class="model">model <b>{_e(r.model_name)}</b>, version <b id="model-version">{_e(r.model_version)}</b></p>
    <h3>Labels <span class="muted">(this segmentation)</span></h3>
    <table class="labels">{label_rows}</table>
    <h3>Regions <span class="muted">(model server)</span></h3>
    <table class="regions">{region_rows}</table>
    <p><a class="button" id="download" href="/results/{_e(r.token)}/segmentation.nii.gz" download>Download segmentation (.nii.gz)</a></p>
    <p class="meta">grid {_e(shape)} voxels, {_e(spacing)} mm, stored {_e(r.orientation)} · answered in {r.seconds:.1f} s<br>{files}</p>
  </aside>
</section>"""


def stylesheet(label_values: list[int]) -> str:
    """The page's CSS, with one swatch class per label colour."""
    swatches = "\n".join(".label-%d { background: rgb(%d, %d, %d); }" % (v, *label_rgb(v)) for v in label_values)
    return CSS + "\n" + swatches + "\n"


CSS = """
:root { --bg: #f4f6f8; --card: #fff; --ink: #1d2630; --muted: #65717e; --line: #dde3e9; --accent: #1f6feb; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink); background: var(--bg); }
header { padding: 14px 24px; background: #14202c; color: #eef2f6; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header .sub { margin: 2px 0 0; color: #b8c4d0; font-size: 13px; }
header code { color: #dfe7ef; }
.status-ok { color: #7ee2a8; } .status-bad { color: #ff9b93; } .status-unknown { color: #b8c4d0; }
main { padding: 18px 24px; display: grid; gap: 18px; max-width: 1400px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; }
h2 { margin: 0 0 10px; font-size: 17px; } h3 { margin: 16px 0 6px; font-size: 14px; }
.muted { color: var(--muted); font-weight: normal; }
.files { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 10px; }
.file { display: flex; flex-direction: column; gap: 2px; border: 1px dashed #b9c3cd; border-radius: 6px; padding: 8px 10px; background: #fafbfc; }
.file .ch { font-weight: 600; } .file .desc { color: var(--muted); font-size: 13px; }
.hint { color: var(--muted); font-size: 13px; margin: 8px 0; }
.pick-all { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 14px; margin: 12px 0 0; font-size: 14px; }
.pick-all .hint { margin: 0; }
.actions { display: flex; align-items: center; gap: 12px; }
button, .button { display: inline-block; background: var(--accent); color: #fff; border: 0; border-radius: 6px; padding: 8px 16px;
  font: inherit; font-weight: 600; cursor: pointer; text-decoration: none; }
button:disabled { background: #8aa9d6; cursor: progress; }
.error { margin-top: 12px; padding: 10px 12px; border-radius: 6px; background: #fdecea; border: 1px solid #f5c2bd; color: var(--bad); white-space: pre-wrap; }
.notice { padding: 8px 12px; border-radius: 6px; background: #fff6da; border: 1px solid #f0dc9a; }
.result { display: grid; grid-template-columns: minmax(0, auto) minmax(280px, 1fr); gap: 24px; align-items: start; }
.viewer { display: flex; flex-direction: column; gap: 10px; }
.frame { position: relative; background: #000; padding: 22px; border-radius: 6px; width: max-content; max-width: 100%; }
.frame img { display: block; max-width: 100%; height: auto; image-rendering: auto; }
.ori { position: absolute; color: #ffd166; font-size: 13px; font-weight: 700; }
.ori.top { top: 3px; left: 50%; transform: translateX(-50%); } .ori.bottom { bottom: 3px; left: 50%; transform: translateX(-50%); }
.ori.left { left: 6px; top: 50%; transform: translateY(-50%); } .ori.right { right: 6px; top: 50%; transform: translateY(-50%); }
.controls { display: flex; flex-wrap: wrap; gap: 10px 22px; align-items: center; }
.controls label { display: flex; align-items: center; gap: 8px; font-size: 14px; }
.controls .wide { flex: 1 1 100%; } .controls .wide input { flex: 1; }
output { font-variant-numeric: tabular-nums; min-width: 70px; }
.legend table { border-collapse: collapse; width: 100%; }
.legend td { padding: 4px 6px; border-bottom: 1px solid var(--line); vertical-align: middle; }
.legend .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.swatch { display: inline-block; width: 16px; height: 16px; border-radius: 3px; border: 1px solid rgba(0,0,0,.25); vertical-align: middle; }
.model { margin: 0 0 6px; } .meta { color: var(--muted); font-size: 12.5px; }
footer { padding: 0 24px 20px; color: var(--muted); font-size: 12.5px; }
@media (max-width: 900px) { .result { grid-template-columns: 1fr; } }
"""

SCRIPT = r"""
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);

  // model server status in the header
  const statusEl = $('server-status');
  fetch('/api/status', {headers: {'Accept': 'application/json'}})
    .then((r) => r.json())
    .then((s) => { statusEl.textContent = 'model server: ' + (s.ready ? 'ready' : 'not ready (' + s.detail + ')'); statusEl.className = s.ready ? 'status-ok' : 'status-bad'; })
    .catch(() => { statusEl.textContent = 'model server: status unknown'; });

  // upload
  const form = $('upload'), errorBox = $('error'), progress = $('progress'), submit = $('submit');
  const showError = (text) => { errorBox.textContent = text; errorBox.hidden = false; errorBox.scrollIntoView({block: 'nearest'}); };
  const fileInputs = Array.from(form.querySelectorAll('input[type=file][name]'));
  $('pick-all').addEventListener('change', (ev) => {
    const unmatched = [];
    for (const file of ev.target.files) {
      const name = file.name.toLowerCase();
      const input = fileInputs.find((i) => name.includes(i.name.toLowerCase()));
      if (!input) { unmatched.push(file.name); continue; }
      const dt = new DataTransfer(); dt.items.add(file); input.files = dt.files;
    }
    if (unmatched.length) showError('No channel name (' + fileInputs.map((i) => i.name).join(', ') + ') in: ' + unmatched.join(', '));
    else errorBox.hidden = true;
  });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errorBox.hidden = true;
    const missing = fileInputs.filter((i) => !i.files.length).map((i) => i.name);
    if (missing.length) { showError('Choose a file for: ' + missing.join(', ')); return; }
    submit.disabled = true;
    const started = Date.now();
    const tick = () => { progress.textContent = 'Uploading and segmenting… ' + Math.round((Date.now() - started) / 1000) + ' s'; };
    tick();
    const timer = setInterval(tick, 1000);
    try {
      const response = await fetch(form.action, {method: 'POST', body: new FormData(form), headers: {'Accept': 'application/json'}});
      let body = null;
      try { body = await response.json(); } catch (e) { body = {error: 'the viewer answered ' + response.status + ' ' + response.statusText}; }
      if (!response.ok) throw new Error(body.error || ('HTTP ' + response.status));
      progress.textContent = 'Done in ' + Math.round((Date.now() - started) / 1000) + ' s, loading the result…';
      window.location.assign(body.view_url);
    } catch (e) {
      progress.textContent = '';
      showError(e.message === 'Failed to fetch' ? 'The viewer did not answer (is it still running?)' : e.message);
    } finally {
      clearInterval(timer);
      submit.disabled = false;
    }
  });

  // result viewer
  const result = $('result');
  if (!result) return;
  const img = $('slice'), k = $('k'), out = $('k-out'), channel = $('channel'), alpha = $('alpha');
  const n = Number(result.dataset.slices), token = result.dataset.token;
  const update = () => {
    out.textContent = (Number(k.value) + 1) + ' / ' + n;
    const a = (Number(alpha.value) / 100).toFixed(2);
    img.src = '/results/' + token + '/slice/' + k.value + '.png?channel=' + encodeURIComponent(channel.value) + '&alpha=' + a;
    img.alt = 'axial slice ' + (Number(k.value) + 1) + ' of ' + n + ' with the segmentation overlaid';
    history.replaceState(null, '', '?slice=' + k.value + '&channel=' + encodeURIComponent(channel.value) + '&alpha=' + a);
  };
  k.addEventListener('input', update);
  channel.addEventListener('change', update);
  alpha.addEventListener('input', update);
  img.addEventListener('wheel', (ev) => {
    ev.preventDefault();
    const next = Math.min(n - 1, Math.max(0, Number(k.value) + (ev.deltaY > 0 ? -1 : 1)));
    if (next !== Number(k.value)) { k.value = next; update(); }
  }, {passive: false});
  img.addEventListener('error', () => showError('Could not draw this slice (the result may have expired: upload the case again).'));
})();
"""
