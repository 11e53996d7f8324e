"""The evaluation report as one self-contained HTML page (``report.html``).

Everything is inline: the style sheet sits in the page and every picture is a PNG ``data:`` URI, so
the file can be mailed, attached to a KFP run (``Output[HTML]``) or opened offline; there is no
script. The page holds:

* a summary table (one row per region: Dice, HD95 and, when computed, the BraTS lesion-wise and the
  instance-wise numbers, as mean ± standard deviation over cases);
* box plots of Dice and HD95 per region, every case drawn as a dot;
* every metric of every label / region (a row per metric, a column per name) with mean ± std, median
  and quartiles (Q1, Q3), from the per-case values (std with ``ddof=1`` and linear-interpolated
  percentiles, as :func:`~medseg.evaluation.metrics.aggregate`);
* axial, coronal and sagittal overlays (reference and prediction filled over the first image channel)
  of the best, median and worst case by mean Dice over the shown regions, when their slices were
  kept (:func:`medseg.visualize.case_slices`);
* the Dice of every case;
* the model's training curves (loss and validation scores per epoch), when the evaluated model package has them.
"""

from __future__ import annotations

import base64
import html
import io as _stdio
from collections.abc import Mapping, Sequence

import numpy as np

from medseg.schemas import Metrics
from medseg.visualize import CaseSlices, slices_overlay_png

__all__ = ["METRIC_LABELS", "report_html", "html_page", "metric_stats", "rank_cases", "boxplots_png", "png_data_uri", "training_curves_section"]

#: Display name and number of decimals of each metric; others are shown by their own name.
METRIC_LABELS: dict[str, tuple[str, int]] = {
    "dice": ("Dice", 3),
    "iou": ("IoU", 3),
    "hd95": ("HD95 (mm)", 2),
    "assd": ("ASSD (mm)", 2),
    "sensitivity": ("Sensitivity", 3),
    "specificity": ("Specificity", 4),
    "volume_pred_ml": ("Volume, prediction (ml)", 2),
    "volume_ref_ml": ("Volume, reference (ml)", 2),
    "sq_dsc": ("Instance SQ Dice (matched pairs)", 3),
    "sq_hd95": ("Instance SQ HD95 (mm, pooled)", 2),
    "pq_dsc": ("Instance PQ Dice (SQ × RQ)", 3),
    "tp": ("Instances matched (TP)", 2),
    "fp": ("Instances predicted only (FP)", 2),
    "fn": ("Instances missed (FN)", 2),
}
for _year in ("2023", "2024"):
    METRIC_LABELS.update({
        f"lesionwise_dice_{_year}": (f"Lesion-wise Dice ({_year} rules)", 3),
        f"lesionwise_hd95_{_year}": (f"Lesion-wise HD95 (mm, {_year} rules)", 2),
        f"lesion_tp_{_year}": (f"Lesions detected (TP, {_year})", 2),
        f"lesion_fp_{_year}": (f"Lesion false positives (FP, {_year})", 2),
        f"lesion_fn_{_year}": (f"Lesions missed (FN, {_year})", 2),
    })

_CSS = """
:root { --ink:#1d2433; --muted:#5b6577; --line:#d9dee7; --band:#f3f5f9; --accent:#2f5bd3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: var(--ink); background: #fff; }
header { background: #1d2433; color: #fff; padding: 20px 32px 16px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #c9d1e0; }
main { padding: 8px 28px 28px; max-width: 1400px; }
h2 { font-size: 17px; margin: 26px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.note { color: var(--muted); margin: 4px 0 10px; font-size: 13px; }
table { border-collapse: collapse; margin: 4px 0 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--band); font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) td { background: #fafbfd; }
.scroll { overflow-x: auto; }
table.matrix { font-size: 13px; }
table.matrix td, table.matrix th { vertical-align: top; padding: 3px 7px; }
table.matrix td:first-child { white-space: normal; min-width: 150px; max-width: 190px; }
table.matrix .sub { color: var(--muted); font-size: 11px; }
figure { margin: 8px 0 16px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 2px; }
.tag { display: inline-block; padding: 1px 8px; border-radius: 9px; color: #fff; font-size: 12px; margin-right: 6px; }
.best { background: #2e8b57; } .median { background: #2f5bd3; } .worst { background: #c0392b; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 24px; }
"""


def html_page(heading: str, subtitle: str, body: Sequence[str]) -> str:
    """A whole self-contained page in the report's style: ``heading`` and ``subtitle`` (plain text,
    escaped here) in the header band, ``body`` (HTML fragments) in the main column."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(heading)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{html.escape(heading)}</h1><p>{html.escape(subtitle)}</p></header>",
        "<main>",
        *body,
        "</main><footer>medseg-ops · self-contained report: no external files, no scripts.</footer></body></html>",
    ]) + "\n"


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for ``png`` bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def training_curves_section(png: bytes) -> str:
    """The report's "Training" section: the model package's training curves picture (``training_curves.png``) inline."""
    return ('<h2 id="training">Training</h2><p class="note">Loss and validation scores per epoch of the run that trained this model (from its '
            "model package, also an artefact of its MLflow training run). Validation cases come from the training split, not the test cases above; "
            "the dotted line (an ensemble: a dot per fold) marks the epoch whose weights were kept.</p>"
            f'<figure><img alt="training curves: loss and validation scores per epoch" src="{png_data_uri(png)}">'
            "<figcaption>x: epoch; left: training (and validation) loss; right: validation scores.</figcaption></figure>")


def _values(metrics: Metrics, name: str, metric: str) -> np.ndarray:
    return np.asarray([float(c[name][metric]) for c in metrics.per_case if metric in c.get(name, {})], dtype=np.float64)


def metric_stats(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "median", "q25", "q75"}`` of a list of per-case values (std ``ddof=1``,
    0 for one value; percentiles with linear interpolation). Empty → NaN everywhere."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return dict.fromkeys(("mean", "std", "median", "q25", "q75"), float("nan"))
    q25, median, q75 = (float(x) for x in np.percentile(v, [25, 50, 75]))
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "median": median, "q25": q25, "q75": q75}


def rank_cases(metrics: Metrics, names: Sequence[str]) -> list[tuple[str, str, float]]:
    """``[(role, case_id, mean Dice), ...]`` for the best, median and worst case by the mean Dice over
    ``names`` (median: the lower middle of the sorted cases; ties keep the case order). Fewer than
    three cases give fewer rows, each case once."""
    scored = []
    for i, case in enumerate(metrics.per_case):
        dices = [float(case[n]["dice"]) for n in names if n in case and "dice" in case[n]]
        if dices:
            scored.append((float(np.mean(dices)), i, str(case.get("case_id", f"#{i}"))))
    if not scored:
        return []
    ordered = sorted(scored, key=lambda t: (-t[0], t[1]))  # best first
    picks = [("best", ordered[0]), ("median", ordered[(len(ordered) - 1) // 2]), ("worst", ordered[-1])]
    out, seen = [], set()
    for role, (score, _, case_id) in picks:
        if case_id not in seen:
            seen.add(case_id)
            out.append((role, case_id, score))
    return out


def boxplots_png(metrics: Metrics, names: Sequence[str]) -> bytes:
    """PNG bytes: box plots of Dice and of HD95 per name across cases, every case drawn as a dot.
    HD95 gets a symmetric-log axis when some value exceeds 50 mm (penalties would flatten the rest)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(7.0, 1.5 * len(names) + 3.0), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    positions = list(range(1, len(names) + 1))
    colours = ["#2f5bd3", "#c0392b", "#2e8b57", "#d4a017", "#7d3c98", "#16a085", "#7f8c8d"]
    for ax, metric, ylabel in ((axes[0], "dice", "Dice"), (axes[1], "hd95", "HD95 (mm)")):
        data = [_values(metrics, n, metric) for n in names]
        ax.boxplot(data, positions=positions, widths=0.55, showfliers=False, medianprops={"color": "black"})
        rng = np.random.default_rng(0)  # fixed jitter: the same input gives the same picture
        for k, (pos, values) in enumerate(zip(positions, data)):
            ax.scatter(pos + rng.uniform(-0.13, 0.13, len(values)), values, s=14, alpha=0.7, zorder=3,
                       color=colours[k % len(colours)], edgecolors="none")
        ax.set_xticks(positions)
        ax.set_xticklabels(list(names))
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            ax.set_ylim(-0.03, 1.03)
        else:
            top = max((float(v.max()) for v in data if v.size), default=1.0)
            if top > 50:  # penalties (373 mm) would squash every real distance: symmetric-log axis
                from matplotlib.ticker import FixedLocator, ScalarFormatter

                ax.set_yscale("symlog", linthresh=1.0)
                ticks = [t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 400) if t <= top * 1.3]
                ax.yaxis.set_major_locator(FixedLocator(ticks))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.set_ylim(0, top * 1.3)
                ylabel += " (symlog)"
                ax.set_ylabel(ylabel)
            else:
                ax.set_ylim(0, max(top * 1.1, 1.0))
        ax.set_title(f"{ylabel.split(' (')[0]} per region ({metrics.n_cases} case{'s' if metrics.n_cases != 1 else ''})", fontsize=11)
    fig.tight_layout()
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(value: float, digits: int) -> str:
    return "–" if not np.isfinite(value) else f"{value:.{digits}f}"


def _metric_order(metrics: Metrics, name: str) -> list[str]:
    first = next((c[name] for c in metrics.per_case if isinstance(c.get(name), Mapping)), {})
    known = [m for m in METRIC_LABELS if m in first]
    return known + [m for m in first if m not in METRIC_LABELS]


def _summary_table(metrics: Metrics, names: Sequence[str]) -> str:
    first = {n: _metric_order(metrics, n) for n in names}
    columns = [("dice", "Dice"), ("hd95", "HD95 mm")]
    for year in ("2023", "2024"):
        if any(f"lesionwise_dice_{year}" in first[n] for n in names):
            columns += [(f"lesionwise_dice_{year}", f"Lesion-wise Dice {year}"), (f"lesionwise_hd95_{year}", f"Lesion-wise HD95 {year}")]
    if any("pq_dsc" in first[n] for n in names):
        columns += [("sq_dsc", "SQ Dice"), ("pq_dsc", "PQ Dice")]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    rows = []
    for n in names:
        cells = []
        for metric, _ in columns:
            if metric not in first[n]:
                cells.append("<td>–</td>")
                continue
            digits = METRIC_LABELS.get(metric, ("", 3))[1]
            s = metric_stats(_values(metrics, n, metric))
            cells.append(f"<td>{_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)}</td>")
        rows.append(f"<tr><td><b>{html.escape(n)}</b></td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>Region</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _metrics_matrix(metrics: Metrics, names: Sequence[str]) -> str:
    """One table: a row per metric, a column per name; each cell holds mean ± std and, below it,
    median [Q1 – Q3]."""
    order: list[str] = []
    for n in names:
        order += [m for m in _metric_order(metrics, n) if m not in order]
    known = [m for m in METRIC_LABELS if m in order]
    order = known + [m for m in order if m not in METRIC_LABELS]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for metric in order:
        label, digits = METRIC_LABELS.get(metric, (metric, 3))
        cells = []
        for n in names:
            values = _values(metrics, n, metric)
            if values.size == 0:
                cells.append("<td>–</td>")
                continue
            st = metric_stats(values)
            cells.append(
                f"<td>{_fmt(st['mean'], digits)} ± {_fmt(st['std'], digits)}"
                f'<div class="sub">{_fmt(st["median"], digits)} [{_fmt(st["q25"], digits)} – {_fmt(st["q75"], digits)}]</div></td>'
            )
        rows.append(f'<tr><td title="{html.escape(metric)}">{html.escape(label)}</td>{"".join(cells)}</tr>')
    return f'<table class="matrix"><thead><tr><th>Metric</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _per_case_table(metrics: Metrics, names: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for case in metrics.per_case:
        cells = "".join(f"<td>{_fmt(float(case[n]['dice']), 3)}</td>" if n in case else "<td>–</td>" for n in names)
        rows.append(f"<tr><td>{html.escape(str(case.get('case_id', '')))}</td>{cells}</tr>")
    return f"<table><thead><tr><th>Case</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def report_html(
    metrics: Metrics,
    names: Sequence[str],
    title: str = "",
    snapshots: Mapping[str, CaseSlices] | None = None,
    label_names: Mapping[int, str] | None = None,
    notes: Sequence[str] = (),
    training_curves: bytes | None = None,
) -> str:
    """The whole ``report.html`` (see the module docstring).

    Args:
        metrics: the evaluation (per-case values are what the tables and plots show).
        names: regions / labels shown in the summary, box plots, overlays' ranking and per-case table.
        title: e.g. the dataset name.
        snapshots: case id → kept slices; the best, median and worst cases are drawn when present.
        label_names: label value → name, for the overlay legend.
        notes: extra sentences for the conventions paragraph (e.g. the lesion-wise setting).
        training_curves: the model's training curves (PNG bytes), shown in a "Training" section; None: not known.
    """
    names = [n for n in names if n in metrics.mean] or list(metrics.mean)
    heading = f"Evaluation report{': ' + title if title else ''}"
    conventions = [
        f"HD95: {metrics.hd95_convention}.",
        f"Empty masks: {metrics.empty_handling} (penalty {metrics.hd95_penalty_mm:g} mm; ASSD likewise).",
        "Instance-wise numbers (SQ, PQ, TP/FP/FN): connected components matched one-to-one as panoptica "
        "does; SQ HD95 pools both directions' surface distances (panoptica's convention).",
        *notes,
    ]
    parts = [
        "<h2>Summary</h2><p class=\"note\">Mean ± standard deviation over cases.</p>",
        f'<div class="scroll">{_summary_table(metrics, names)}</div>',
        "<h2>Distributions</h2>",
        f'<figure><img alt="Dice and HD95 box plots per region" src="{png_data_uri(boxplots_png(metrics, names))}">'
        "<figcaption>Boxes: quartiles and median; whiskers: 1.5 × IQR; dots: cases. HD95 on a symmetric-log axis when a case exceeds 50 mm.</figcaption></figure>",
    ]
    ranked = rank_cases(metrics, names)
    parts.append("<h2>Best, median and worst case</h2>")
    if snapshots and any(case_id in snapshots for _, case_id, _ in ranked):
        parts.append('<p class="note">Ranked by the mean Dice over the regions above. Top row: reference; bottom row: '
                     "prediction with the reference outlined in white. Slices through the largest reference extent.</p>")
        for role, case_id, score in ranked:
            if case_id not in snapshots:
                continue
            png = slices_overlay_png(snapshots[case_id], title=f"{case_id} ({role}, mean Dice {score:.3f})", label_names=dict(label_names or {}))
            no_image = "" if snapshots[case_id].has_image else " No image was given: labels on black."
            parts.append(
                f'<figure><img alt="{html.escape(role)} case {html.escape(case_id)}" src="{png_data_uri(png)}">'
                f'<figcaption><span class="tag {role}">{role}</span>{html.escape(case_id)} · mean Dice {score:.3f}.{no_image}</figcaption></figure>'
            )
    else:
        parts.append('<p class="note">No slices were kept for this evaluation (metrics only), so no overlays.</p>')
    parts.append('<h2>Metrics per region</h2><p class="note">Each cell: mean ± standard deviation over cases; '
                 "below it the median [first – third quartile]. Hover a metric for its name in metrics.json and cases.csv.</p>")
    parts.append(f'<div class="scroll">{_metrics_matrix(metrics, list(metrics.mean))}</div>')
    parts += ["<h2>Dice per case</h2>", f'<div class="scroll">{_per_case_table(metrics, names)}</div>']
    if training_curves is not None:
        parts.append(training_curves_section(training_curves))
    parts.append("<h2>Conventions</h2>" + "".join(f'<p class="note">{html.escape(c)}</p>' for c in conventions))
    return html_page(heading, f"{metrics.n_cases} case(s) · regions: {', '.join(names)}", parts)
