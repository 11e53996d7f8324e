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


@dataclass(frozen=True)
class FormSpec:
    """The upload form, from the model's metadata: one file per channel; a classifier's age field (``age``:
    ``required`` or ``optional``, None: no field); a 2D slice-set model's picture field (one PNG/TIFF slice)."""

    channels: list[str]
    view: str = "volume"  # volume | slices | classes
    age: str | None = None
    picture: bool = False

    @property
    def verb(self) -> str:
        return "Classify" if self.view == "classes" else "Segment"


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
    mode: str = "volume"  # volume | image (a 2D picture) | classes
    probabilities: dict[str, float] = field(default_factory=dict)
    label: str = ""
    age: float | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    download_url: str = ""
    download_label: str = "Download segmentation (.nii.gz)"


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def render_page(model_url: str, model_name: str, channels: list[str], result: PageResult | None = None,
                error: str | None = None, notice: str | None = None, max_upload_mb: float | None = None, kept: int | None = None,
                form: FormSpec | None = None, card: str = "", card_version: str = "") -> str:
    """The whole page: upload form (from ``form``, else one file per channel of ``channels``; none when there are no
    channels, e.g. the model server cannot be asked), error box, the result when ``result`` is given, and the served
    version's model card (Markdown ``card``, shown as escaped text) in a collapsed section when there is one."""
    spec = form or FormSpec(list(channels))
    error_html = f'<div id="error" class="error" role="alert">{_e(error)}</div>' if error else '<div id="error" class="error" role="alert" hidden></div>'
    notice_html = f'<p class="notice">{_e(notice)}</p>' if notice else ""
    title = f"{result.case_name} · medseg viewer" if result else "medseg viewer"
    if result is None:
        shown = ""
    elif result.mode == "classes":
        shown = _classes_html(result)
    else:
        shown = _result_html(result)
    upload = _form_html(spec, max_upload_mb) if spec.channels else '<p class="notice">The upload form appears once the model server says what the model takes.</p>'
    heading = f"{spec.verb} another case" if result else f"{spec.verb} a case"
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
{shown}
<section class="card upload">
  <h2>{_e(heading)}</h2>
  {notice_html}
  {upload}
  {error_html}
</section>
{_card_html(card, card_version)}
</main>
<footer>Research use only, not a medical device. The files go to the model server above only; this viewer keeps
{_e(kept if kept is not None else "a few")} recent results in memory and nothing on disk.</footer>
</body>
</html>
"""


def _card_html(card: str, version: str) -> str:
    """The model card section: collapsed, the Markdown as preformatted text (escaped: it is never interpreted as HTML)."""
    if not card:
        return ""
    which = f" of version {_e(version)}" if version else ""
    return f"""<section class="card model-card" id="model-card">
  <details>
    <summary>Model card{which}: intended use, training data, test metrics with 95% intervals, gate decision, known limits</summary>
    <pre id="model-card-text">{_e(card)}</pre>
  </details>
</section>"""


def _form_html(spec: FormSpec, max_upload_mb: float | None) -> str:
    required = "" if spec.picture else " required"
    files = "\n".join(
        f'<label class="file"><span class="ch">{_e(c)}</span><span class="desc">channel {i + 1} of {len(spec.channels)}</span>'
        f'<input type="file" name="{_e(c)}" data-channel="{_e(c)}" accept=".nii,.gz,application/gzip"{required}></label>'
        for i, c in enumerate(spec.channels))
    limit = f" Up to {max_upload_mb:g} MiB in all." if max_upload_mb else ""
    parts = []
    if spec.picture:
        colours = "RGB" if len(spec.channels) == 3 else ("grey" if len(spec.channels) == 1 else f"{len(spec.channels)} colour channels")
        parts.append(f'<div class="picture"><label class="file"><span class="ch">one slice</span><span class="desc">PNG or TIFF, {_e(colours)}: '
                     f'{_e(", ".join(spec.channels))}</span><input type="file" name="image" id="picture" accept=".png,.tif,.tiff,image/png,image/tiff">'
                     f'</label><p class="hint">or the whole stack, one NIfTI file per channel:</p></div>')
    parts.append(f'<div class="files">\n{files}\n    </div>')
    if len(spec.channels) > 1:
        parts.append(f'<p class="pick-all"><label>Or choose all {len(spec.channels)} files at once <input type="file" id="pick-all" multiple '
                     f'accept=".nii,.gz,application/gzip"></label><span class="hint">each goes to the channel named in its file name</span></p>')
    if spec.age is not None:
        needed = spec.age == "required"
        parts.append(f'<p class="covariate"><label>Age (years) <input type="number" name="age" id="age" min="0" max="150" step="any"'
                     f'{" required" if needed else ""}></label><span class="hint">{"the model takes the subject&#39;s age" if needed else "optional"}</span></p>')
    parts.append(f'<p class="hint">NIfTI <code>.nii</code> or <code>.nii.gz</code>, one 3D volume per file, all on the same grid.{_e(limit)}</p>')
    body = "\n    ".join(parts)
    return f"""<form id="upload" method="post" action="/segment" enctype="multipart/form-data" data-view="{_e(spec.view)}">
    {body}
    <div class="actions"><button type="submit" id="submit">{_e(spec.verb)}</button><span id="progress" role="status"></span></div>
  </form>"""


def _label_name(r: PageResult, value: int) -> str:
    return r.label_names.get(int(value), f"label {int(value)}")


def _result_html(r: PageResult) -> str:
    options = "".join(f'<option value="{_e(c)}"{" selected" if c == r.channel else ""}>{_e(c)}</option>' for c in r.channels)
    labels = sorted({v for v in r.label_names if v > 0} | set(r.label_volumes_ml))
    label_rows = "".join(
        f'<tr><td><span class="swatch label-{int(v)}"></span></td><td><b>{_e(_label_name(r, v))}</b> <span class="muted">value {int(v)}</span></td>'
        f'<td class="num">{r.label_volumes_ml.get(v, 0.0):.2f}&nbsp;ml</td></tr>'
        for v in labels)
    region_rows = "".join(f'<tr><td><b>{_e(name)}</b></td><td class="num">{ml:.2f}&nbsp;ml</td></tr>' for name, ml in r.region_volumes_ml.items())
    width, height = r.image_size
    picture = r.mode == "image"
    src = f"/results/{_e(r.token)}/slice/{r.slice_index}.png?channel={_e(r.channel)}&amp;alpha={r.alpha:g}"
    spacing = " × ".join(f"{s:g}" for s in r.spacing)
    shape = " × ".join(str(n) for n in r.shape)
    files = ", ".join(f"{_e(c)}: {_e(n)}" for c, n in r.file_names.items())
    what = "the slice" if picture else f"axial slice {r.slice_index + 1} of {r.n_slices}"
    orient = "" if picture else '<span class="ori top">A</span><span class="ori bottom">P</span><span class="ori left">L</span><span class="ori right">R</span>'
    slider = "" if r.n_slices <= 1 else (
        f'<label class="wide">Axial slice <input type="range" id="k" min="0" max="{r.n_slices - 1}" value="{r.slice_index}" aria-describedby="k-out">'
        f'<output id="k-out">{r.slice_index + 1} / {r.n_slices}</output></label>')
    hint = "" if r.n_slices <= 1 else '<p class="hint">Mouse wheel over the image or arrow keys on the slider move through the slices.</p>'
    geometry = (f"picture {r.shape[0]} × {r.shape[1]} pixels (no geometry: 1 mm assumed)" if picture
                else f"grid {_e(shape)} voxels, {_e(spacing)} mm, stored {_e(r.orientation)}")
    download = r.download_url or f"/results/{_e(r.token)}/segmentation.nii.gz"
    return f"""<section class="card result" id="result" data-token="{_e(r.token)}" data-slices="{r.n_slices}" data-index="{r.slice_index}">
  <div class="viewer">
    <div class="frame">
      {orient}
      <img id="slice" src="{src}" width="{width}" height="{height}" alt="{_e(what)} with the segmentation overlaid">
    </div>
    <div class="controls">
      {slider}
      <label>Channel <select id="channel">{options}</select></label>
      <label>Overlay <input type="range" id="alpha" min="0" max="100" value="{round(r.alpha * 100)}"></label>
    </div>
    {hint}
  </div>
  <aside class="legend">
    <h2>{_e(r.case_name)}</h2>
    <p class="model">model <b>{_e(r.model_name)}</b>, version <b id="model-version">{_e(r.model_version)}</b></p>
    <h3>Labels <span class="muted">(this segmentation)</span></h3>
    <table class="labels">{label_rows}</table>
    <h3>Regions <span class="muted">(model server)</span></h3>
    <table class="regions">{region_rows}</table>
    <p><a class="button" id="download" href="{_e(download)}" download>{_e(r.download_label)}</a></p>
    <p class="meta">{geometry} · answered in {r.seconds:.1f} s<br>{files}</p>
  </aside>
</section>"""


def _classes_html(r: PageResult) -> str:
    """A classifier's answer: a bar per class (inline SVG: the page's CSP allows no inline styles), the label."""
    rows = []
    for name, p in r.probabilities.items():
        width = max(0.0, min(1.0, float(p))) * 100
        chosen = " chosen" if name == r.label else ""
        rows.append(f'<tr class="class{chosen}"><td><b>{_e(name)}</b></td><td class="bar-cell"><svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" '
                    f'role="img" aria-label="{_e(name)} {p:.1%}"><rect class="track" width="100" height="10"></rect>'
                    f'<rect class="fill{chosen}" width="{width:.2f}" height="10"></rect></svg></td><td class="num">{p:.1%}</td></tr>')
    files = ", ".join(f"{_e(c)}: {_e(n)}" for c, n in r.file_names.items())
    age = f" · age {r.age:g} years" if r.age is not None else ""
    return f"""<section class="card result-classes" id="result-classes" data-token="{_e(r.token)}">
  <div class="classes">
    <h2>{_e(r.case_name)}: <span id="label" class="label">{_e(r.label)}</span></h2>
    <p class="model">model <b>{_e(r.model_name)}</b>, version <b id="model-version">{_e(r.model_version)}</b>{_e(age)}</p>
    <table class="probabilities">{"".join(rows)}</table>
    <p class="meta">the class probabilities the model server answered, in {r.seconds:.1f} s<br>{files}</p>
  </div>
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
.picture { margin-bottom: 6px; } .picture .file { max-width: 460px; }
.covariate { display: flex; align-items: center; gap: 12px; margin: 12px 0 0; font-size: 14px; }
.covariate input { width: 7em; font: inherit; padding: 3px 6px; }
.classes h2 { font-size: 19px; } .classes .label { color: var(--accent); }
.probabilities { border-collapse: collapse; width: 100%; max-width: 760px; }
.probabilities td { padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; }
.probabilities .bar-cell { width: 70%; } .probabilities .num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { display: block; width: 100%; height: 22px; }
.bar .track { fill: #e8edf2; } .bar .fill { fill: #8aa9d6; } .bar .fill.chosen { fill: #1f6feb; }
.model-card summary { cursor: pointer; font-weight: 600; }
.model-card pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; line-height: 1.4; background: #fafbfc; border: 1px solid var(--line);
  border-radius: 6px; padding: 12px 14px; margin: 10px 0 0; max-height: 70vh; overflow: auto; }
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
  if (form) {
    const fileInputs = Array.from(form.querySelectorAll('input[type=file][data-channel]'));
    const picture = $('picture'), age = $('age'), pickAll = $('pick-all');
    if (pickAll) pickAll.addEventListener('change', (ev) => {
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
      const usePicture = picture && picture.files.length > 0;
      const missing = usePicture ? [] : fileInputs.filter((i) => !i.files.length).map((i) => i.name);
      if (missing.length) { showError('Choose a file for: ' + missing.join(', ') + (picture ? ' (or one PNG/TIFF slice)' : '')); return; }
      if (age && age.required && age.value === '') { showError('Enter the age in years: the model takes it.'); return; }
      submit.disabled = true;
      const started = Date.now();
      const tick = () => { progress.textContent = 'Sending to the model server… ' + Math.round((Date.now() - started) / 1000) + ' s'; };
      tick();
      const timer = setInterval(tick, 1000);
      try {
        const body = new FormData(form);
        if (usePicture) fileInputs.forEach((i) => body.delete(i.name));
        const response = await fetch(form.action, {method: 'POST', body: body, headers: {'Accept': 'application/json'}});
        let answer = null;
        try { answer = await response.json(); } catch (e) { answer = {error: 'the viewer answered ' + response.status + ' ' + response.statusText}; }
        if (!response.ok) throw new Error(answer.error || ('HTTP ' + response.status));
        progress.textContent = 'Done in ' + Math.round((Date.now() - started) / 1000) + ' s, loading the result…';
        window.location.assign(answer.view_url);
      } catch (e) {
        progress.textContent = '';
        showError(e.message === 'Failed to fetch' ? 'The viewer did not answer (is it still running?)' : e.message);
      } finally {
        clearInterval(timer);
        submit.disabled = false;
      }
    });
  }

  // result viewer (volumes and pictures; a classifier's answer has nothing to step through)
  const result = $('result');
  if (!result) return;
  const img = $('slice'), k = $('k'), out = $('k-out'), channel = $('channel'), alpha = $('alpha');
  const n = Number(result.dataset.slices), token = result.dataset.token;
  const index = () => (k ? Number(k.value) : Number(result.dataset.index || 0));
  const update = () => {
    if (out) out.textContent = (index() + 1) + ' / ' + n;
    const a = (Number(alpha.value) / 100).toFixed(2);
    img.src = '/results/' + token + '/slice/' + index() + '.png?channel=' + encodeURIComponent(channel.value) + '&alpha=' + a;
    if (n > 1) img.alt = 'axial slice ' + (index() + 1) + ' of ' + n + ' with the segmentation overlaid';
    history.replaceState(null, '', '?slice=' + index() + '&channel=' + encodeURIComponent(channel.value) + '&alpha=' + a);
  };
  if (k) k.addEventListener('input', update);
  channel.addEventListener('change', update);
  alpha.addEventListener('input', update);
  if (k) img.addEventListener('wheel', (ev) => {
    ev.preventDefault();
    const next = Math.min(n - 1, Math.max(0, Number(k.value) + (ev.deltaY > 0 ? -1 : 1)));
    if (next !== Number(k.value)) { k.value = next; update(); }
  }, {passive: false});
  img.addEventListener('error', () => showError('Could not draw this slice (the result may have expired: upload the case again).'));
})();
"""
