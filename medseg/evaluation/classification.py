"""Evaluation of image classification (dataset.json ``task: "classification"``, e.g. CN / MCI / AD).

``labels`` in dataset.json maps class name → index (0..n-1). Each case gives a score per class
(probabilities, or any scores where larger means "more likely") and its true class; the predicted
class is the one with the largest score (the lowest index on ties, as ``numpy.argmax``).

=====================  ============================================================================
metric                 definition
=====================  ============================================================================
accuracy               correct / cases
balanced accuracy      mean over the classes present in the truth of their recall (sensitivity);
                       equals accuracy on balanced data and 1/n_classes for a constant guess
                       (Brodersen et al. 2010; scikit-learn's ``balanced_accuracy_score``)
ROC-AUC (one-vs-rest)  per class k: the probability that a random case of class k scores higher on
                       k than a random case of another class, ties counting one half (the
                       Mann-Whitney U statistic / (n_pos x n_neg); Hanley & McNeil 1982). Equals the
                       trapezoidal area under the ROC curve of :func:`roc_curve`. Undefined (left
                       out, never NaN) for a class with no positive or no negative case.
macro ROC-AUC          mean of the defined per-class AUCs (scikit-learn's
                       ``roc_auc_score(multi_class="ovr", average="macro")`` when all are defined)
log-loss               per case ``-ln p_true`` (natural log; the true class's score, clipped to
                       [1e-12, 1]), and its mean over the cases (scikit-learn's ``log_loss`` for
                       probabilities that sum to 1); lower is better, ``ln K`` for a uniform guess
confusion matrix       counts, rows = true class, columns = predicted class
sensitivity, precision per class: recall TP / (TP + FN) and TP / (TP + FP) of the one-vs-rest
specificity            split; TN / (TN + FP). A zero denominator gives 0.0 (scikit-learn's
                       ``zero_division=0``).
=====================  ============================================================================

Outputs (:func:`evaluate_classification`), in the shape of the segmentation report where it fits:

* ``metrics.json``: :class:`~medseg.schemas.Metrics` with ``mean["all"]`` = ``accuracy``,
  ``balanced_accuracy``, ``auc_macro``, ``log_loss``; ``mean[<class>]`` = ``auc`` (when defined), ``sensitivity``,
  ``specificity``, ``precision``, ``support`` (true cases) and ``confusion_<predicted class>`` (its
  row of the confusion matrix); ``per_case`` = ``{"case_id", "all": {prob_<class>..., pred, true,
  log_loss}}``.
* ``cases.csv``: ``case,region,metric,value`` with region ``all`` and metrics ``prob_<class>``,
  ``pred``, ``true`` (class indices), ``log_loss``.
* ``confusion_matrix.csv``; ``roc_<class>.png`` per class; ``report.md``; ``report.html``; ``training_curves.png``
  (the classifier's loss and validation scores per epoch, when given).
"""

from __future__ import annotations

import csv
import html
import io as _stdio
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg import io
from medseg.errors import MedsegError
from medseg.schemas import CASES_CSV, CONFUSION_CSV, METRICS_JSON, REPORT_HTML, REPORT_MD, TRAINING_CURVES_PNG, DatasetJson, Metrics

__all__ = [
    "CONFUSION_CSV",
    "accuracy",
    "balanced_accuracy",
    "confusion_matrix",
    "roc_curve",
    "roc_auc",
    "classification_metrics",
    "log_losses",
    "evaluate_classification",
    "write_classification_report",
    "roc_png",
]

#: Probabilities are clipped to at least this before the log-loss.
LOG_LOSS_EPS = 1e-12
#: The ``region`` of every classification row in ``cases.csv`` and the name of the overall numbers.
ALL = "all"


# --------------------------------------------------------------------------- metrics
def confusion_matrix(true: Sequence[int], pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts, shape (n_classes, n_classes): row = true class index, column = predicted one."""
    t, p = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if t.shape != p.shape:
        raise MedsegError(f"{t.size} true classes but {p.size} predictions")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise MedsegError(f"class indices must lie in 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(true: Sequence[int], pred: Sequence[int]) -> float:
    """Fraction of cases whose predicted class is the true one (0.0 for no cases)."""
    t, p = np.asarray(true), np.asarray(pred)
    return float(np.mean(t == p)) if t.size else 0.0


def balanced_accuracy(true: Sequence[int], pred: Sequence[int]) -> float:
    """Mean recall over the classes that occur in ``true`` (0.0 for no cases)."""
    t, p = np.asarray(true), np.asarray(pred)
    classes = np.unique(t)
    if classes.size == 0:
        return 0.0
    return float(np.mean([np.mean(p[t == k] == k) for k in classes]))


def roc_curve(positive: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of one binary problem: ``(fpr, tpr, thresholds)``.

    One point per distinct score (cases with equal scores enter together, so ties give a diagonal
    segment), plus the start (0, 0) at threshold +inf. Point i counts the cases with
    ``score >= thresholds[i]`` as positive.

    Raises:
        MedsegError: no positive or no negative case (the curve is undefined), or lengths differ.
    """
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise MedsegError("roc_curve needs two 1D sequences of the same length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise MedsegError("ROC curve undefined: need at least one positive and one negative case")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last index of every distinct score
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[last_of_group]]
    return fpr, tpr, thresholds


def roc_auc(positive: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney) formula with ties counting one half;
    ``None`` when undefined (no positive or no negative case)."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks: a tie contributes one half
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else 0.0


def log_losses(true: Sequence[int], scores: np.ndarray) -> np.ndarray:
    """Per-case log-loss ``-ln p_true`` (natural log), the true class's score clipped to [1e-12, 1]."""
    t = np.asarray(true, dtype=np.int64)
    sc = np.asarray(scores, dtype=np.float64)
    if not t.size:
        return np.zeros(0, dtype=np.float64)
    p = np.clip(sc[np.arange(t.size), t], LOG_LOSS_EPS, 1.0)
    return -np.log(p)


def classification_metrics(true: Sequence[int], scores: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """The ``mean`` of :class:`~medseg.schemas.Metrics` for a classification (see the module docstring).

    Args:
        true: true class index per case, shape (N,).
        scores: score per case and class, shape (N, n_classes).
        classes: class names in index order.
    """
    t = np.asarray(true, dtype=np.int64)
    sc = np.asarray(scores, dtype=np.float64)
    n = len(classes)
    pred = np.argmax(sc, axis=1) if sc.size else np.zeros(0, np.int64)
    cm = confusion_matrix(t, pred, n)
    out: dict[str, dict[str, float]] = {ALL: {"accuracy": accuracy(t, pred), "balanced_accuracy": balanced_accuracy(t, pred)}}
    aucs = []
    for k, name in enumerate(classes):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = int(cm.sum()) - tp - fn - fp
        row: dict[str, float] = {}
        auc = roc_auc(t == k, sc[:, k]) if sc.size else None
        if auc is not None:
            row["auc"] = auc
            aucs.append(auc)
        row.update({
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "support": float(tp + fn),
        })
        row.update({f"confusion_{other}": float(cm[k, j]) for j, other in enumerate(classes)})
        out[name] = row
    if aucs:
        out[ALL]["auc_macro"] = float(np.mean(aucs))
    if t.size:
        out[ALL]["log_loss"] = float(np.mean(log_losses(t, sc)))
    return out


# --------------------------------------------------------------------------- evaluation + files
def _classes(dataset_json: DatasetJson) -> list[str]:
    if dataset_json.task != "classification":
        raise MedsegError(f"dataset task is {dataset_json.task!r}, not 'classification'")
    items = sorted(((int(v), str(k)) for k, v in dataset_json.labels.items()))
    if [i for i, _ in items] != list(range(len(items))) or len(items) < 2:
        raise MedsegError(f"classification labels must map at least two classes to 0..n-1, got {dataset_json.labels}")
    return [name for _, name in items]


def _true_index(value: Any, classes: Sequence[str]) -> int:
    if isinstance(value, str):
        if value not in classes:
            raise MedsegError(f"true class {value!r} is not one of {list(classes)}")
        return classes.index(value)
    index = int(value)
    if index != value or not 0 <= index < len(classes):
        raise MedsegError(f"true class index {value!r} is not in 0..{len(classes) - 1}")
    return index


def evaluate_classification(
    cases: Iterable[tuple[str, Sequence[float] | Mapping[str, float], str | int]],
    dataset_json: DatasetJson,
    out_dir: str | Path,
    training_curves: bytes | None = None,
) -> Metrics:
    """Score classification cases and write the report files (see the module docstring).

    Args:
        cases: ``(case_id, scores, true_class)`` per case; ``scores`` is a sequence in class-index
            order or a mapping class name → score; ``true_class`` a class name or index.
        dataset_json: ``task: "classification"`` and ``labels`` = class name → index.
        out_dir: report folder.
        training_curves: the classifier's training curves (PNG bytes), written and shown in ``report.html``.

    Returns:
        The :class:`~medseg.schemas.Metrics` written to ``metrics.json``.

    Raises:
        MedsegError: not a classification dataset, no cases, a duplicate case, an unknown class,
            or scores of the wrong length or not finite (the message names the case).
    """
    classes = _classes(dataset_json)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    true: list[int] = []
    for case_id, scores, label in cases:
        case_id = str(case_id)
        if case_id in ids:
            raise MedsegError(f"case {case_id} given twice")
        try:
            if isinstance(scores, Mapping):
                missing = [c for c in classes if c not in scores]
                if missing:
                    raise MedsegError(f"no score for class(es) {missing}")
                vector = np.array([float(scores[c]) for c in classes])
            else:
                vector = np.asarray(scores, dtype=np.float64).ravel()
            if vector.size != len(classes):
                raise MedsegError(f"{vector.size} scores for {len(classes)} classes")
            if not np.all(np.isfinite(vector)):
                raise MedsegError("scores must be finite")
            true.append(_true_index(label, classes))
        except (MedsegError, TypeError, ValueError) as exc:
            raise MedsegError(f"case {case_id}: {exc}") from None
        ids.append(case_id)
        rows.append(vector)
    if not ids:
        raise MedsegError("no cases to evaluate")
    scores_arr = np.stack(rows)
    pred = np.argmax(scores_arr, axis=1)
    losses = log_losses(true, scores_arr)
    per_case = [
        {"case_id": cid, ALL: {**{f"prob_{c}": float(v) for c, v in zip(classes, row)}, "pred": int(p), "true": int(t), "log_loss": float(loss)}}
        for cid, row, p, t, loss in zip(ids, scores_arr, pred, true, losses)
    ]
    metrics = Metrics(
        n_cases=len(ids),
        mean=classification_metrics(true, scores_arr, classes),
        per_case=per_case,
        hd95_convention="not applicable (classification)",
        empty_handling="ROC-AUC left out for a class without positive or negative cases; zero denominators give 0.0",
    )
    write_classification_report(metrics, classes, true, scores_arr, out_dir, title=dataset_json.name, training_curves=training_curves)
    return metrics


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


def roc_png(positive: Sequence[bool], scores: Sequence[float], name: str) -> bytes:
    """PNG bytes: the one-vs-rest ROC curve of class ``name`` with its AUC and the chance diagonal;
    a note instead of a curve when it is undefined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    auc = roc_auc(positive, scores)
    if auc is None:
        ax.text(0.5, 0.5, "undefined:\nno positive or no negative case", ha="center", va="center", fontsize=9)
    else:
        fpr, tpr, _ = roc_curve(positive, scores)
        ax.plot(fpr, tpr, color="#2f5bd3", linewidth=2, label=f"AUC {auc:.3f}")
        ax.fill_between(fpr, tpr, alpha=0.08, color="#2f5bd3")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)", fontsize=8.5)
    ax.set_ylabel("true positive rate (sensitivity)", fontsize=8.5)
    ax.set_title(f"ROC: {name} vs rest", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _cases_csv(metrics: Metrics) -> str:
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "region", "metric", "value"])
    for case in metrics.per_case:
        for metric, value in case[ALL].items():
            writer.writerow([case["case_id"], ALL, metric, repr(float(value))])
    return buf.getvalue()


def _confusion_csv(cm: np.ndarray, classes: Sequence[str]) -> str:
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, cm):
        writer.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def _markdown(metrics: Metrics, classes: Sequence[str], cm: np.ndarray, title: str, roc_files: Sequence[str], with_curves: bool = False) -> str:
    overall = metrics.mean[ALL]
    auc_macro = f"{overall['auc_macro']:.3f}" if "auc_macro" in overall else "undefined"
    log_loss = f", log-loss {overall['log_loss']:.3f} (lower is better)" if "log_loss" in overall else ""
    lines = [
        f"# Classification report{': ' + title if title else ''}", "",
        f"{metrics.n_cases} case(s). Accuracy {overall['accuracy']:.3f}, balanced accuracy "
        f"{overall['balanced_accuracy']:.3f}, macro ROC-AUC (one-vs-rest) {auc_macro}{log_loss}.", "",
        "## Per class", "",
        "| Class | ROC-AUC | Sensitivity | Specificity | Precision | Cases |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in classes:
        m = metrics.mean[c]
        auc = f"{m['auc']:.3f}" if "auc" in m else "–"
        lines.append(f"| {c} | {auc} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['precision']:.3f} | {int(m['support'])} |")
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    for c, row in zip(classes, cm):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
    lines.append("")
    lines += [f"![ROC {c}]({f})" for c, f in zip(classes, roc_files)]
    if with_curves:
        lines += ["", "## Training", "", f"![Loss and validation per epoch]({TRAINING_CURVES_PNG})"]
    return "\n".join(lines) + "\n"


def _html(metrics: Metrics, classes: Sequence[str], cm: np.ndarray, title: str, rocs: Sequence[bytes], training_curves: bytes | None = None) -> str:
    from medseg.evaluation.report_html import html_page, png_data_uri, training_curves_section

    overall = metrics.mean[ALL]
    summary = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{overall[key]:.3f}</td></tr>"
        for key, label in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("auc_macro", "Macro ROC-AUC (one-vs-rest)"),
                           ("log_loss", "Log-loss (lower is better)"))
        if key in overall
    )
    rows = []
    for c in classes:
        m = metrics.mean[c]
        auc = f"{m['auc']:.3f}" if "auc" in m else "–"
        rows.append(f"<tr><td>{html.escape(c)}</td><td>{auc}</td><td>{m['sensitivity']:.3f}</td><td>{m['specificity']:.3f}</td>"
                    f"<td>{m['precision']:.3f}</td><td>{int(m['support'])}</td></tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    cm_rows = "".join(f"<tr><td><b>{html.escape(c)}</b></td>" + "".join(f"<td>{int(v)}</td>" for v in row) + "</tr>" for c, row in zip(classes, cm))
    body = [
        "<h2>Summary</h2>", f"<table><tbody>{summary}</tbody></table>",
        "<h2>Per class (one-vs-rest)</h2>",
        "<table><thead><tr><th>Class</th><th>ROC-AUC</th><th>Sensitivity</th><th>Specificity</th><th>Precision</th>"
        f"<th>Cases</th></tr></thead><tbody>{''.join(rows)}</tbody></table>",
        "<h2>Confusion matrix</h2><p class=\"note\">Rows: true class; columns: predicted class (largest score).</p>",
        f"<table><thead><tr><th>true \\ predicted</th>{head}</tr></thead><tbody>{cm_rows}</tbody></table>",
        "<h2>ROC curves</h2>",
        "".join(f'<img alt="ROC {html.escape(c)}" src="{png_data_uri(png)}" style="margin:0 12px 12px 0">' for c, png in zip(classes, rocs)),
    ]
    if training_curves is not None:
        body.append(training_curves_section(training_curves))
    return html_page(f"Classification report{': ' + title if title else ''}", f"{metrics.n_cases} case(s) · classes: {', '.join(classes)}", body)


def write_classification_report(
    metrics: Metrics, classes: Sequence[str], true: Sequence[int], scores: np.ndarray, out_dir: str | Path, title: str = "",
    training_curves: bytes | None = None,
) -> Path:
    """Write ``roc_<class>.png``, ``confusion_matrix.csv``, ``cases.csv``, ``report.md``,
    ``report.html`` (and ``training_curves.png`` when ``training_curves`` are given) and (last) ``metrics.json``
    to ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    t = np.asarray(true)
    cm = confusion_matrix(t, np.argmax(scores, axis=1), len(classes))
    rocs, files = [], []
    for k, c in enumerate(classes):
        png = roc_png(t == k, scores[:, k], c)
        fname = f"roc_{_safe(c)}.png"
        io.write_bytes(out_dir / fname, png)
        rocs.append(png)
        files.append(fname)
    io.write_text(out_dir / CONFUSION_CSV, _confusion_csv(cm, classes))
    io.write_text(out_dir / CASES_CSV, _cases_csv(metrics))
    if training_curves is not None:
        io.write_bytes(out_dir / TRAINING_CURVES_PNG, training_curves)
    io.write_text(out_dir / REPORT_MD, _markdown(metrics, classes, cm, title, files, training_curves is not None))
    io.write_text(out_dir / REPORT_HTML, _html(metrics, classes, cm, title, rocs, training_curves))
    metrics.save(out_dir / METRICS_JSON)
    return out_dir
