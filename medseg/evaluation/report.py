"""Evaluate a folder of predictions against reference labels and write the report.

Output folder (every file written atomically; ``metrics.json`` last, so its presence means the
report is complete)::

    dice_boxplot.png   Dice per region across cases (box plot with the cases as points)
    per_case.csv       one row per case: case_id, then <name>_<metric> for every label/region and metric
    cases.csv          the same numbers in long form: case,region,metric,value (one row per number)
    report.md          mean table (regions, then labels) and a per-case Dice table for the regions
    report.html        the same and more in one self-contained page (see medseg.evaluation.report_html)
    training_curves.png  the evaluated model's loss and validation scores per epoch (when its package has them)
    metrics.json       schemas.Metrics: n_cases, mean (with Dice/HD95 medians), per_case

Metric names per label/region (``cases.csv``'s ``metric`` column, the keys in ``metrics.json``):
``dice``, ``iou``, ``hd95``, ``assd``, ``sensitivity``, ``specificity``, ``volume_pred_ml``,
``volume_ref_ml`` (:mod:`~medseg.evaluation.metrics`); with a lesion-wise setting
``lesionwise_dice_<year>``, ``lesionwise_hd95_<year>``, ``lesion_tp_<year>``, ``lesion_fp_<year>``,
``lesion_fn_<year>`` (:mod:`~medseg.evaluation.lesionwise`, year 2023 or 2024); and the instance-wise
``sq_dsc``, ``sq_hd95``, ``pq_dsc``, ``tp``, ``fp``, ``fn`` (:mod:`~medseg.evaluation.panoptic`).

Files pair by nnU-Net naming: ``<pred_dir>/<CASE><file_ending>`` with ``<label_dir>/<CASE><file_ending>``.
The CLI (``medseg evaluate``) calls :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import csv
import io as _stdio
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg import io
from medseg.errors import MedsegError
from medseg.evaluation.metrics import (
    HD95_PENALTY_MM,
    METRIC_NAMES,
    aggregate,
    as_label_map,
    evaluate_case,
    evaluation_keys,
)
from medseg.evaluation.lesionwise import SETTINGS as LESIONWISE_SETTINGS
from medseg.evaluation.report_html import report_html
from medseg.schemas import METRICS_JSON, PER_CASE_CSV, DatasetJson, Metrics
from medseg.visualize import CaseSlices, case_slices

if TYPE_CHECKING:
    from medseg.evaluation.panoptic import PanopticSetting

__all__ = [
    "REPORT_MD",
    "REPORT_HTML",
    "CASES_CSV",
    "DICE_BOXPLOT_PNG",
    "evaluate_arrays",
    "evaluate_folder",
    "markdown_table",
    "write_report",
    "per_case_csv",
    "cases_long_csv",
    "add_arguments",
    "run",
]

from medseg.schemas import CASES_CSV, DICE_BOXPLOT_PNG, REPORT_HTML, REPORT_MD, TRAINING_CURVES_PNG  # noqa: E402  (file names live in schemas)
#: Largest difference (mm) tolerated between the prediction's and the label's affine entries: NIfTI
#: stores the affine as float32, so a prediction written by another tool may differ in the last bits.
AFFINE_ATOL_MM = 1e-3

#: ``(case_id, pred, ref, spacing_mm)`` or ``(case_id, pred, ref, spacing_mm, image)``; ``image`` is the
#: case's first image channel on the same grid (for the report's overlays) or None.
CasePair = tuple[Any, ...]


# --------------------------------------------------------------------------- evaluation
def evaluate_arrays(
    pairs: Iterable[CasePair],
    dataset_json: DatasetJson,
    out_dir: str | Path,
    *,
    penalty_mm: float = HD95_PENALTY_MM,
    progress: bool = False,
    total: int | None = None,
    lesionwise: str | None = None,
    panoptic: PanopticSetting | str | None = "default",
    keep_slices: bool = True,
    training_curves: bytes | None = None,
) -> Metrics:
    """Evaluate in-memory cases and write the report files to ``out_dir``.

    Args:
        pairs: ``(case_id, pred, ref, spacing_mm[, image])`` per case; ``pred``/``ref`` are label maps
            of shape (I, J, K), ``spacing_mm`` the voxel size in mm in the same order and ``image``
            (optional) the first image channel, drawn under the report's overlays. May be a
            generator: cases are consumed one at a time, so only one case is held in memory (plus
            three compressed slices per case with ``keep_slices``).
        dataset_json: gives ``labels`` (name → value) and ``regions`` (name → values).
        out_dir: folder for ``metrics.json``, ``per_case.csv``, ``cases.csv``, ``report.md``,
            ``dice_boxplot.png``.
        penalty_mm: HD95 / ASSD when exactly one of the two masks is empty.
        progress: show a progress bar on stderr.
        total: number of cases, for the progress bar when ``pairs`` has no ``len``.
        lesionwise: add the BraTS lesion-wise metrics of this setting (``brats2023``, ``brats2023_mets``,
            ``brats2024``; see :mod:`medseg.evaluation.lesionwise`), or None.
        panoptic: the instance matcher of :mod:`medseg.evaluation.panoptic` (``"panoptica"``,
            ``"brats2025"``), or None for no instance-wise numbers.
        keep_slices: keep three slices of every case for the HTML report's best / median / worst
            overlays (:func:`medseg.visualize.case_slices`).
        training_curves: the evaluated model's training curves (PNG bytes): written as
            ``training_curves.png`` and shown in ``report.html``; None: no such section.

    Returns:
        The :class:`~medseg.schemas.Metrics` written to ``metrics.json``.

    Raises:
        MedsegError: no cases, a duplicate case id, or a case that cannot be evaluated (the message
            names the case).
    """
    keys = evaluation_keys(dataset_json.labels, dataset_json.regions)
    if "case_id" in keys:
        raise MedsegError("a label or region may not be called 'case_id'")
    per_case: list[dict] = []
    snapshots: dict[str, CaseSlices] = {}
    seen: set[str] = set()
    for item in _progress(pairs, progress, total):
        if len(item) not in (4, 5):
            raise MedsegError(f"expected (case_id, pred, ref, spacing[, image]), got {len(item)} items")
        case_id, pred, ref, spacing = item[:4]
        image = item[4] if len(item) == 5 else None
        case_id = str(case_id)
        if case_id in seen:
            raise MedsegError(f"case {case_id} given twice")
        seen.add(case_id)
        try:
            result = evaluate_case(
                pred, ref, spacing, dataset_json.labels, dataset_json.regions, penalty_mm,
                lesionwise=lesionwise, panoptic=panoptic,
            )
            if keep_slices:
                snapshots[case_id] = case_slices(as_label_map(pred), as_label_map(ref), spacing, image)
        except MedsegError as exc:
            raise MedsegError(f"case {case_id}: {exc}", exc.path) from None
        per_case.append({"case_id": case_id, **result})
    if not per_case:
        raise MedsegError("no cases to evaluate")
    metrics = Metrics(
        n_cases=len(per_case), mean=aggregate(per_case), per_case=per_case, hd95_penalty_mm=float(penalty_mm)
    )
    notes = []
    if lesionwise:
        notes.append(f"Lesion-wise numbers: the official challenge scorer's rules, setting {lesionwise!r} (medseg.evaluation.lesionwise).")
    if panoptic is not None:
        notes.append(f"Instance matching: {getattr(panoptic, 'name', panoptic)!s} (medseg.evaluation.panoptic).")
    write_report(
        metrics, out_dir, regions=list(dataset_json.regions), title=dataset_json.name, snapshots=snapshots,
        label_names={int(v): k for k, v in dataset_json.labels.items() if int(v) != 0}, notes=notes, training_curves=training_curves,
    )
    return metrics


def evaluate_folder(
    pred_dir: str | Path,
    label_dir: str | Path,
    dataset_json: DatasetJson,
    out_dir: str | Path,
    case_ids: Sequence[str] | None = None,
    progress: bool = True,
    *,
    penalty_mm: float = HD95_PENALTY_MM,
    lesionwise: str | None = "auto",
) -> Metrics:
    """Evaluate ``pred_dir/<CASE>.nii.gz`` against ``label_dir/<CASE>.nii.gz`` and write the report.

    Files are matched by case id: ``<CASE><ending>`` and BraTS-style ``<CASE>-seg<ending>`` both name
    case ``<CASE>``, in either folder.

    Args:
        pred_dir: folder of predicted label maps, nnU-Net naming (``<CASE><file_ending>``, no channel suffix).
        label_dir: folder of reference label maps (e.g. ``labelsTr`` / ``labelsTs``), same naming.
        dataset_json: labels, regions and ``file_ending``.
        out_dir: report folder (see the module docstring).
        case_ids: the cases to evaluate. ``None``: every label file in ``label_dir``; each then needs
            a prediction (prediction files without a label are ignored with a note on stderr).
        progress: show a progress bar on stderr.
        penalty_mm: HD95 / ASSD when exactly one of the two masks is empty.
        lesionwise: BraTS lesion-wise setting (``brats2023``, ``brats2023_mets``, ``brats2024``), None for
            none, or ``"auto"``: the setting that fits ``dataset_json`` (BraTS labels → 2023, source
            format ``brats2024`` → 2024, otherwise none).

    Spacing comes from the label's header. All prediction and label files are checked to exist
    before any is read, so a missing file fails at once.

    Raises:
        MedsegError: naming the file, when a folder or file is missing, unreadable, not an integer
            label map, or when a prediction's shape or affine differs from its label's.
    """
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    ending = dataset_json.file_ending or ".nii.gz"
    for folder, what in ((pred_dir, "prediction"), (label_dir, "label")):
        if not folder.is_dir():
            raise MedsegError(f"{what} folder not found", folder)
    labels_of, preds_of = _case_files(label_dir, ending), _case_files(pred_dir, ending)
    if case_ids is None:
        case_ids = sorted(labels_of)
        if not case_ids:
            raise MedsegError(f"no label files *{ending} (or *-seg{ending})", label_dir)
        extra = sorted(set(preds_of) - set(case_ids))
        if extra:
            shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
            print(f"note: {len(extra)} prediction(s) without a label not evaluated: {shown}", file=sys.stderr)
    case_ids = [str(c) for c in case_ids]
    if not case_ids:
        raise MedsegError("no cases to evaluate")
    for folder, found, what in ((label_dir, labels_of, "label"), (pred_dir, preds_of, "prediction")):
        missing = [folder / f"{c}{ending}" for c in case_ids if c not in found]
        if missing:
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise MedsegError(f"{what} file not found (nor a -seg{ending} one){more}", missing[0])
    if lesionwise == "auto":
        from medseg.task import Task

        lesionwise = Task.from_dataset(dataset_json).lesionwise

    def pairs() -> Iterator[CasePair]:
        for case_id in case_ids:
            label_path, pred_path = labels_of[case_id], preds_of[case_id]
            ref, ref_affine, header = io.load_nifti(label_path)
            pred, pred_affine, _ = io.load_nifti(pred_path)
            if pred.shape != ref.shape:
                raise MedsegError(f"shape {tuple(pred.shape)} differs from the label's {tuple(ref.shape)} ({label_path})", pred_path)
            if not np.allclose(pred_affine, ref_affine, rtol=0.0, atol=AFFINE_ATOL_MM):
                diff = float(np.max(np.abs(pred_affine - ref_affine)))
                raise MedsegError(f"affine differs from the label's by up to {diff:.4g} ({label_path})", pred_path)
            yield case_id, _label_map(pred, pred_path), _label_map(ref, label_path), io.nifti_spacing(header)

    return evaluate_arrays(
        pairs(), dataset_json, out_dir, penalty_mm=penalty_mm, progress=progress, total=len(case_ids), lesionwise=lesionwise
    )


def _cases_in(folder: Path, ending: str) -> list[str]:
    return sorted(_case_files(folder, ending))


def _case_files(folder: Path, ending: str) -> dict[str, Path]:
    """``{case id: file}`` of the label maps in ``folder``: ``<CASE><ending>`` or ``<CASE>-seg<ending>``.

    A case given both ways is ambiguous: MedsegError naming both files.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        stem = path.name[: -len(ending)]
        case_id = stem[: -len("-seg")] if stem.endswith("-seg") else stem
        if case_id in found:
            raise MedsegError(f"case {case_id} has two files here: {found[case_id].name} and {path.name}", folder)
        found[case_id] = path
    return found


def _label_map(array: np.ndarray, path: Path) -> np.ndarray:
    try:
        return as_label_map(array, "label map")
    except MedsegError as exc:
        raise MedsegError(str(exc), path) from None


def _progress(items: Iterable[CasePair], enabled: bool, total: int | None) -> Iterable[CasePair]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="evaluate", unit="case", file=sys.stderr)


# --------------------------------------------------------------------------- report files
def write_report(
    metrics: Metrics,
    out_dir: str | Path,
    regions: Sequence[str] | None = None,
    title: str = "",
    snapshots: Mapping[str, CaseSlices] | None = None,
    label_names: Mapping[int, str] | None = None,
    notes: Sequence[str] = (),
    training_curves: bytes | None = None,
) -> Path:
    """Write ``dice_boxplot.png``, ``per_case.csv``, ``cases.csv``, ``report.md``, ``report.html``
    (and ``training_curves.png`` when ``training_curves`` are given) and (last) ``metrics.json``.

    ``regions`` are the names shown in the box plots and the per-case Dice tables; when none of them
    is in ``metrics.mean`` (e.g. a dataset without regions) every label/region name is shown.
    ``title`` (e.g. the dataset name) goes into the report heading. ``snapshots`` (case id → kept
    slices) give the HTML report its best / median / worst overlays, ``label_names`` (value → name)
    their legend, ``notes`` extra convention sentences. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    names = list(metrics.mean)
    shown = [r for r in (regions or []) if r in metrics.mean] or names
    io.write_bytes(out_dir / DICE_BOXPLOT_PNG, dice_boxplot_png(metrics, shown))
    io.write_text(out_dir / PER_CASE_CSV, per_case_csv(metrics))
    io.write_text(out_dir / CASES_CSV, cases_long_csv(metrics))
    if training_curves is not None:
        io.write_bytes(out_dir / TRAINING_CURVES_PNG, training_curves)
    io.write_text(out_dir / REPORT_MD, report_markdown(metrics, shown, title, training_curves is not None))
    io.write_text(out_dir / REPORT_HTML, report_html(metrics, shown, title, snapshots, label_names, notes, training_curves))
    metrics.save(out_dir / METRICS_JSON)
    return out_dir


def _metric_order(metrics: Metrics, name: str) -> list[str]:
    """Metric names of one label/region in the per-case entries: METRIC_NAMES first, others after."""
    first = next(c[name] for c in metrics.per_case)
    return [m for m in METRIC_NAMES if m in first] + [m for m in first if m not in METRIC_NAMES]


def per_case_csv(metrics: Metrics) -> str:
    """CSV text: header ``case_id,<name>_<metric>,...``, then one row per case (full float precision)."""
    names = list(metrics.mean)
    columns = [(n, m) for n in names for m in _metric_order(metrics, n)]
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id"] + [f"{n}_{m}" for n, m in columns])
    for case in metrics.per_case:
        writer.writerow([case.get("case_id", "")] + [repr(float(case[n][m])) for n, m in columns])
    return buf.getvalue()


def cases_long_csv(metrics: Metrics) -> str:
    """CSV text in long form: header ``case,region,metric,value``, then one row per number of every
    case (cases in order; names and metrics in the per-case order; full float precision). ``region``
    is the label or region name."""
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "region", "metric", "value"])
    for case in metrics.per_case:
        case_id = case.get("case_id", "")
        for name, values in case.items():
            if not isinstance(values, dict):
                continue
            for metric, value in values.items():
                writer.writerow([case_id, name, metric, repr(float(value))])
    return buf.getvalue()


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def markdown_table(metrics: Metrics) -> str:
    """The mean-over-cases table in Markdown: one row per name of ``metrics.mean`` in its order
    (regions, then labels, as :func:`~medseg.evaluation.metrics.evaluate_case` orders them)."""
    lines = [
        "| Structure | Dice (mean / median) | IoU | HD95 mm (mean / median) | ASSD mm | Sensitivity | Volume ml (pred / ref) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in metrics.mean.items():
        dice_cell = _fmt(m["dice"]) + (f" / {_fmt(m['dice_median'])}" if "dice_median" in m else "")
        hd_cell = _fmt(m["hd95"], 2) + (f" / {_fmt(m['hd95_median'], 2)}" if "hd95_median" in m else "")
        vol_cell = f"{_fmt(m['volume_pred_ml'], 2)} / {_fmt(m['volume_ref_ml'], 2)}"
        cells = [name, dice_cell, _fmt(m["iou"]), hd_cell, _fmt(m["assd"], 2), _fmt(m["sensitivity"]), vol_cell]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detection_table(metrics: Metrics) -> str:
    """Markdown table of the lesion-wise (per BraTS year) and instance-wise means of every name that
    has them; empty string when none has."""
    years = sorted({k.rsplit("_", 1)[1] for m in metrics.mean.values() for k in m if k.startswith("lesionwise_dice_") and not k.endswith(("_std", "_q25", "_q75", "_median"))})
    has_panoptic = any("pq_dsc" in m for m in metrics.mean.values())
    if not years and not has_panoptic:
        return ""
    head = ["Structure"]
    for y in years:
        head += [f"Lesion-wise Dice {y}", f"Lesion-wise HD95 {y} mm", f"Lesions TP / FP / FN {y} (per case)"]
    if has_panoptic:
        head += ["SQ Dice", "SQ HD95 mm", "PQ Dice", "Instances TP / FP / FN (per case)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, m in metrics.mean.items():
        cells = [name]
        for y in years:
            if f"lesionwise_dice_{y}" in m:
                counts = " / ".join(_fmt(m[f"lesion_{c}_{y}"], 2) for c in ("tp", "fp", "fn"))
                cells += [_fmt(m[f"lesionwise_dice_{y}"]), _fmt(m[f"lesionwise_hd95_{y}"], 2), counts]
            else:
                cells += ["–"] * 3
        if has_panoptic:
            if "pq_dsc" in m:
                counts = " / ".join(_fmt(m[c], 2) for c in ("tp", "fp", "fn"))
                cells += [_fmt(m["sq_dsc"]), _fmt(m["sq_hd95"], 2), _fmt(m["pq_dsc"]), counts]
            else:
                cells += ["–"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(metrics: Metrics, regions: Sequence[str], title: str = "", with_curves: bool = False) -> str:
    """The whole ``report.md``: conventions, :func:`markdown_table`, box plot, per-case Dice table (and, ``with_curves``,
    the training curves picture beside it)."""
    header = f"# Evaluation report{f': {title}' if title else ''}\n"
    intro = (
        f"\n{metrics.n_cases} case(s). Means over cases; medians after the slash.\n"
        f"HD95: {metrics.hd95_convention}. ASSD: mean symmetric surface distance in mm.\n"
        f"Empty masks: {metrics.empty_handling} (penalty {metrics.hd95_penalty_mm:g} mm; ASSD likewise).\n"
        f"Every metric with its spread, box plots and the best / median / worst case: [{REPORT_HTML}]({REPORT_HTML}).\n"
    )
    per_case = ["| Case | " + " | ".join(regions) + " |", "|---|" + "---:|" * len(regions)]
    for case in metrics.per_case:
        cells = [str(case.get("case_id", ""))] + [_fmt(case[r]["dice"]) for r in regions]
        per_case.append("| " + " | ".join(cells) + " |")
    return (
        header
        + intro
        + "\n## Mean over cases\n\n"
        + markdown_table(metrics)
        + (f"\n## Lesion-wise and instance-wise (means over cases)\n\n{detection_table(metrics)}" if detection_table(metrics) else "")
        + f"\n![Dice per region]({DICE_BOXPLOT_PNG})\n"
        + "\n## Dice per case\n\n"
        + "\n".join(per_case)
        + "\n"
        + (f"\n## Training\n\n![Loss and validation per epoch]({TRAINING_CURVES_PNG})\n" if with_curves else "")
    )


def dice_boxplot_png(metrics: Metrics, names: Sequence[str]) -> bytes:
    """PNG bytes: a box plot of the Dice of each name across cases, with every case drawn as a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    data = [[float(c[n]["dice"]) for c in metrics.per_case] for n in names]
    fig = Figure(figsize=(max(3.0, 1.2 * len(names) + 1.5), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(1, len(names) + 1))
    ax.boxplot(data, positions=positions, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same input gives the same picture
    for pos, values in zip(positions, data):
        ax.scatter(pos + rng.uniform(-0.12, 0.12, len(values)), values, s=12, alpha=0.6, zorder=3)
    ax.set_xticks(positions)
    ax.set_xticklabels(list(names))
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice per region ({metrics.n_cases} case{'s' if metrics.n_cases != 1 else ''})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``medseg evaluate``."""
    parser.add_argument("--pred", type=Path, required=True, metavar="DIR", help="folder of predicted label maps <CASE>.nii.gz or <CASE>-seg.nii.gz")
    parser.add_argument("--labels", type=Path, required=True, metavar="DIR", help="folder of reference label maps <CASE>.nii.gz or <CASE>-seg.nii.gz, matched by case id")
    parser.add_argument("--dataset-json", type=Path, required=True, metavar="FILE", help="dataset.json (labels, regions)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder (metrics.json, per_case.csv, cases.csv, report.md, report.html, dice_boxplot.png)")
    parser.add_argument(
        "--cases", default=None, metavar="ID[,ID...]",
        help="evaluate only these cases (default: every file in --labels, each needing a prediction)",
    )
    parser.add_argument(
        "--hd95-penalty-mm", type=float, default=HD95_PENALTY_MM, metavar="MM",
        help=f"HD95/ASSD when exactly one of prediction and label is empty (default {HD95_PENALTY_MM})",
    )
    parser.add_argument(
        "--lesionwise", default="auto", choices=["auto", "none", *sorted(LESIONWISE_SETTINGS)],
        help="official lesion-wise metrics: auto (the dataset's task decides: medseg.task.Task.lesionwise), none, or a setting",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """``medseg evaluate``: evaluate, write the report, print the mean Dice per region. Returns 0."""
    dataset_json = DatasetJson.load(args.dataset_json)
    case_ids = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    metrics = evaluate_folder(
        args.pred, args.labels, dataset_json, args.out, case_ids=case_ids,
        progress=not args.no_progress, penalty_mm=args.hd95_penalty_mm,
        lesionwise=None if args.lesionwise == "none" else args.lesionwise,
    )
    names = [r for r in dataset_json.regions if r in metrics.mean] or list(metrics.mean)
    print(f"{metrics.n_cases} case(s); mean Dice per {'region' if dataset_json.regions else 'label'}:")
    for name in names:
        m = metrics.mean[name]
        print(f"  {name:<6} {m['dice']:.4f}  (HD95 {m['hd95']:.2f} mm)")
    print(f"report: {Path(args.out) / REPORT_MD} (and {REPORT_HTML}, self-contained)")
    return 0
