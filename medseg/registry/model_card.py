"""The model card of a registered version: one Markdown page saying what the model is for and how far to trust it.

Sections (:func:`render_markdown`, a pure function of a :class:`~medseg.schemas.ModelCard`):

* **intended use and task**: the task's kind, channels, groups or classes and the endpoint's inputs and outputs,
  all asked of :class:`medseg.task.Task`; the network and configuration of the package;
* **training data**: cases, voxel spacing and per-channel intensity statistics from the package's
  ``fingerprint.json`` and ``plans.json`` (what preprocessing measured on the training cases), and the training run;
* **test metrics** per group (region, label or class) with the percentile bootstrap 95% CI of the mean over the
  held-out cases: :func:`medseg.registry.gate.paired_bootstrap` (the gate's own resampler) on the per-case values of
  ``metrics.json``; a classifier's macro AUC with :func:`~medseg.registry.gate.paired_bootstrap_auc`;
* **gate decision**: the registration thresholds and, once promotion has decided, its outcome and numbers;
* **known limits** (:func:`known_limits`): synthetic training data (``dataset.json`` ``synthetic``, which ingest
  copies from ``medseg synth``'s marker), a small test set, thresholds not met, a refused promotion, ...;
* **lineage**: the version's lineage tags.

When: :func:`medseg.registry.registry.register_model` builds the card (:func:`build_card`) before anything is logged,
so a package it cannot describe fails early; once the version exists it logs ``model_card.md`` and
``model_card.json`` in the version's run and sets the version's description (:func:`publish_card`). Promotion decides
later: every decision (promoted or refused) re-renders the card from ``model_card.json`` with the decision and logs
both again at the same paths (:func:`record_gate_decision`): the run holds the current card, the promotion records
(``promotion/*.json``) the history. The model server reads the card of the version it serves
(:func:`registered_card_text`) and hands it to the viewer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.registry import gate
from medseg.task import ALL, Task, metric_spec

log = logging.getLogger(__name__)

#: The card's intervals: two-sided (1 - ALPHA) percentile bootstrap of the mean over cases, seeded.
ALPHA, N_BOOTSTRAP, SEED = 0.05, 2000, 0
#: Below this many test cases the card warns that its intervals are wide.
FEW_TEST_CASES = 20
#: Per-case metrics shown for each segmentation group besides the task's primary metric (when metrics.json has them).
SEGMENTATION_CARD_METRICS = ("dice", "hd95")
#: Intensity statistics of the fingerprint shown per channel.
INTENSITY_KEYS = ("mean", "std", "p00_5", "median", "p99_5")


# --------------------------------------------------------------------------- metrics with intervals
def _interval(group: str, metric: str, values: Sequence[float], n_bootstrap: int, alpha: float, seed: int) -> dict[str, Any]:
    """One card metric: the mean of ``values`` over cases and its bootstrap CI (the gate's resampler on one sample)."""
    mean, lower, upper = gate.paired_bootstrap(np.asarray(values, dtype=np.float64), n_bootstrap, alpha, seed)
    return {"group": group, "metric": metric, "mean": mean, "lower": lower, "upper": upper, "n_cases": len(values),
            "higher_is_better": metric_spec(metric).higher_is_better}


def segmentation_card_metrics(task: Task) -> list[str]:
    """The per-case metrics a segmentation card shows: the task's primary metric, Dice and HD95, and the task's
    official lesion-wise Dice when it has one."""
    suffix = task.lesionwise_suffix
    wanted = [task.primary_metric, *SEGMENTATION_CARD_METRICS, *([f"lesionwise_dice_{suffix}"] if suffix else [])]
    return list(dict.fromkeys(wanted))


def metric_intervals(per_case: Sequence[Mapping[str, Any]], task: Task, n_bootstrap: int = N_BOOTSTRAP, alpha: float = ALPHA,
                     seed: int = SEED) -> list[dict[str, Any]]:
    """Per group and metric the mean over the test cases and its ``1 - alpha`` bootstrap CI.

    Segmentation: every reported group (:attr:`~medseg.task.Task.reported_groups`) × :func:`segmentation_card_metrics`,
    from ``metrics.json``'s per-case values (cases without a finite value left out). Classification: ``all`` with
    accuracy (per subject: right or wrong), log-loss (per subject) and the macro one-vs-rest AUC, then per class its
    sensitivity (recall over that class's subjects).

    Returns:
        ``[{"group", "metric", "mean", "lower", "upper", "n_cases", "higher_is_better"}, ...]`` in display order.
    """
    if task.is_classification:
        return _classification_intervals(per_case, task, n_bootstrap, alpha, seed)
    out = []
    for group in task.reported_groups:
        for metric in segmentation_card_metrics(task):
            values = [v for e in per_case if (v := gate.case_value(e, group, metric)) is not None]
            if values:
                out.append(_interval(group, metric, values, n_bootstrap, alpha, seed))
    return out


def _index(value: Any) -> int | None:
    """A class index from a per-case entry (``pred``, ``true``), or None when it is not one."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)) else None


def _classification_intervals(per_case: Sequence[Mapping[str, Any]], task: Task, n_bootstrap: int, alpha: float, seed: int) -> list[dict[str, Any]]:
    entries = [e[ALL] for e in per_case if isinstance(e.get(ALL), Mapping) and _index(e[ALL].get("true")) is not None]
    true = [int(v["true"]) for v in entries]
    out = []
    answered = [(p, t) for v, t in zip(entries, true) if (p := _index(v.get("pred"))) is not None]
    if answered:
        out.append(_interval(ALL, "accuracy", [1.0 if p == t else 0.0 for p, t in answered], n_bootstrap, alpha, seed))
    losses = [v for e in per_case if (v := gate.case_value(e, ALL, "log_loss")) is not None]
    if losses:
        out.append(_interval(ALL, "log_loss", losses, n_bootstrap, alpha, seed))
    probs = np.array([[float(v.get(f"prob_{c}", np.nan)) for c in task.classes] for v in entries], dtype=np.float64)
    if probs.size and np.all(np.isfinite(probs)):
        try:
            # against a constant score, which ties every pair: its AUC is 1/2 on every resample, so the paired interval of
            # the difference is the model's own AUC interval shifted by 1/2
            _, lower, upper, auc, _, _ = gate.paired_bootstrap_auc(true, probs, np.full_like(probs, 1.0 / probs.shape[1]), n_bootstrap, alpha, seed)
            out.append({"group": ALL, "metric": "auc_macro", "mean": auc, "lower": lower + 0.5, "upper": upper + 0.5, "n_cases": len(true),
                        "higher_is_better": True})
        except ValueError as exc:  # fewer than two classes among the test subjects
            log.info("model card: no macro AUC interval (%s)", exc)
    for k, name in enumerate(task.classes):
        recalled = [1.0 if p == k else 0.0 for p, t in answered if t == k]
        if recalled:
            out.append(_interval(name, "sensitivity", recalled, n_bootstrap, alpha, seed))
    return out


# --------------------------------------------------------------------------- what the package says
def task_summary(task: Task, package: schemas.ModelPackage, plans: schemas.Plans | None) -> dict[str, Any]:
    """The card's "intended use and task": everything from the task and the package's network (JSON-friendly)."""
    output = str(package.network.get("output") or "labels")
    config = plans.configurations.get(package.configuration, {}) if plans is not None else {}
    return {
        "kind": task.kind, "dataset": task.name, "source_format": task.source_format, "channels": list(task.channels),
        "slice_axis": task.slice_axis if task.is_slice_set else None, "groups": task.reported_groups, "labels": dict(task.labels),
        "overlapping_regions": task.has_regions, "classes": list(task.classes), "covariates": list(task.covariates),
        "primary_metric": task.primary_metric, "primary_group": task.primary_group, "lesionwise": task.lesionwise,
        "inputs": [s.metadata() for s in task.endpoint_inputs()], "outputs": [s.metadata() for s in task.endpoint_outputs()],
        "configuration": package.configuration, "network": str(package.network.get("name") or ""), "output": output,
        "activation": Task.activation(output), "patch_size": list(package.network.get("patch_size") or config.get("patch_size") or []),
        "spacing": list(config.get("spacing") or []),
    }


def training_summary(package: schemas.ModelPackage) -> dict[str, Any]:
    """The card's training facts from ``model_package.json`` ``training`` (an ensemble: its folds)."""
    training = package.training or {}
    config = training.get("config") or {}
    metric = str(training.get("val_metric") or "")
    best = next((training[k] for k in ("best_val_dice", "best_val_balanced_accuracy") if isinstance(training.get(k), (int, float))), None)
    history = training.get("history") or []
    seconds = sum(float(e.get("epoch_seconds") or 0.0) for e in history)
    ensemble = training.get("ensemble") or {}
    return {
        "network": config.get("network"), "loss": config.get("loss"), "optimizer": config.get("optimizer"), "epochs": config.get("epochs"),
        "epochs_run": training.get("epochs_run"), "best_epoch": training.get("best_epoch"), "val_metric": metric, "best_val": best,
        "fold": config.get("fold"), "folds": training.get("folds") or [], "combine": ensemble.get("combine"), "device": training.get("device"),
        "precision": training.get("precision"), "train_minutes": round(seconds / 60.0, 2) if seconds else None,
        "postprocessing": (package.postprocessing or {}).get("min_volume_mm3") or {}, "medseg_version": package.medseg_version,
    }


def data_summary(dataset: schemas.DatasetJson, fingerprint: schemas.Fingerprint | None) -> dict[str, Any]:
    """The card's "training data": case counts, spacing and intensity statistics from the fingerprint (which
    preprocessing computes on the training cases only), and whether the data were synthetic."""
    out: dict[str, Any] = {"dataset": dataset.name, "source_format": dataset.source_format, "n_labelled_cases": dataset.numTraining,
                           "synthetic": dict(dataset.synthetic or {})}
    if fingerprint is None:
        return out
    spacings = np.asarray(fingerprint.spacings, dtype=np.float64).reshape(-1, 3) if fingerprint.spacings else np.zeros((0, 3))
    shapes = np.asarray(fingerprint.shapes, dtype=np.float64).reshape(-1, 3) if fingerprint.shapes else np.zeros((0, 3))
    out["n_training_cases"] = len(fingerprint.case_ids)
    if len(spacings):
        out.update(spacing_median=[round(float(s), 4) for s in np.median(spacings, axis=0)], spacing_min=[round(float(s), 4) for s in spacings.min(axis=0)],
                   spacing_max=[round(float(s), 4) for s in spacings.max(axis=0)])
    if len(shapes):
        out["shape_median"] = [int(s) for s in np.median(shapes, axis=0)]
    out["intensity"] = {name: {k: float(stats[k]) for k in INTENSITY_KEYS if k in stats} for name, stats in fingerprint.channels.items()}
    if any(v > 0 for k, v in fingerprint.class_frequencies.items() if k != "0"):  # a classifier's fingerprint counts no label voxels
        out["class_frequencies"] = {str(k): float(v) for k, v in fingerprint.class_frequencies.items()}
    return out


def build_card(model_dir: str | Path, metrics: schemas.Metrics, model_name: str, thresholds: Mapping[str, float], passed: bool, reason: str,
               lineage: Mapping[str, str] | None = None, version: str = "", test_set_hash: str = "", n_bootstrap: int = N_BOOTSTRAP,
               alpha: float = ALPHA, seed: int = SEED) -> schemas.ModelCard:
    """The card of the package in ``model_dir`` with its test ``metrics`` and the registration's threshold check.

    Reads ``dataset.json``, ``model_package.json``, ``plans.json`` and (when there) ``fingerprint.json`` of the package.

    Raises:
        MedsegError: the package's files are missing or malformed.
    """
    model_dir = Path(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    dataset = schemas.DatasetJson.load(model_dir)
    task = Task.from_dataset(dataset)
    plans = schemas.Plans.load(model_dir) if (model_dir / schemas.PLANS_JSON).is_file() else None
    fingerprint = schemas.Fingerprint.load(model_dir) if (model_dir / schemas.FINGERPRINT_JSON).is_file() else None
    return schemas.ModelCard(
        model_name=model_name, version=str(version), task=task_summary(task, package, plans), training=training_summary(package),
        data=data_summary(dataset, fingerprint), metrics=metric_intervals(metrics.per_case, task, n_bootstrap, alpha, seed),
        evaluation={"n_cases": metrics.n_cases, "test_set_hash": test_set_hash, "confidence": 1.0 - alpha, "n_bootstrap": n_bootstrap, "seed": seed},
        thresholds={str(k): float(v) for k, v in thresholds.items()}, threshold_passed=bool(passed), threshold_reason=reason,
        lineage={str(k): str(v) for k, v in (lineage or {}).items()},
    )


def with_gate(card: schemas.ModelCard, record: Mapping[str, Any]) -> schemas.ModelCard:
    """The card with a promotion decision (the record :func:`medseg.registry.registry.promote` writes: ``decision``,
    ``reason``, ``time``, ``compared_with``, ``champion_after`` and ``gate``, the :class:`~medseg.registry.gate.GateDecision`)."""
    decision = dict(record.get("gate") or {})
    keep = ("metric", "higher_is_better", "method", "pairing", "margin", "alpha", "n_bootstrap", "seed", "n_common", "primary_group")
    summary = {"decision": record.get("decision"), "reason": record.get("reason") or decision.get("reason", ""), "time": record.get("time"),
               "compared_with": record.get("compared_with"), "champion_after": record.get("champion_after"),
               **{k: decision[k] for k in keep if k in decision}, "groups": dict(decision.get("groups") or {})}
    return dataclasses.replace(card, gate=summary)


# --------------------------------------------------------------------------- Markdown
def _digits(metric: str) -> int:
    return 2 if ("hd95" in metric or "assd" in metric) else 3


def _num(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(float(value)) else "–"


def _signed(value: Any, digits: int = 4) -> str:
    return f"{float(value):+.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(float(value)) else "–"


def _list(values: Sequence[Any], digits: int = 3) -> str:
    return " × ".join(_num(v, digits) for v in values) if values else "–"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], right: int = 1) -> list[str]:
    """A Markdown table; columns from ``right`` on are right-aligned (numbers). Pipes in cells are escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    align = ["---"] * min(right, len(head)) + ["---:"] * max(len(head) - right, 0)
    return ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _what(task: Mapping[str, Any]) -> str:
    """One sentence: what the model does, from the task summary."""
    channels = ", ".join(task.get("channels") or [])
    if task.get("kind") == "classification":
        extra = f" and the subject's {', '.join(task['covariates'])}" if task.get("covariates") else ""
        return f"Classifies a case into {', '.join(task.get('classes') or [])} from its image channel(s) {channels}{extra}."
    groups = ", ".join(task.get("groups") or {})
    where = f"2D slices (slice axis {task['slice_axis']})" if task.get("slice_axis") is not None else "3D volumes"
    kind = "overlapping regions" if task.get("overlapping_regions") else "labels"
    return f"Segments {groups} ({kind}) in {where} from the channels {channels}, and reports their volumes."


def _tensor_rows(specs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for s in specs:
        params = s.get("parameters") or {}
        note = "; ".join(f"{k}: {v}" for k, v in params.items())
        rows.append([f"`{s.get('name')}`", s.get("datatype", ""), str(list(s.get("shape") or [])), "yes" if s.get("optional") else "no", note])
    return rows


def known_limits(card: schemas.ModelCard) -> list[str]:
    """What the card warns about, from its own content (pure)."""
    task, data, out = card.task, card.data, []
    synthetic = data.get("synthetic") or {}
    if synthetic:
        made = ", ".join(f"{k} {synthetic[k]}" for k in ("layout", "cases", "seed") if k in synthetic)
        out.append(f"**Trained and tested on synthetic data** made by `{synthetic.get('generator', 'medseg synth')}` ({made}): the numbers above say "
                   "nothing about real scans. Validate on real, representative data before relying on it.")
    n = int(card.evaluation.get("n_cases") or 0)
    if n < FEW_TEST_CASES:
        out.append(f"Evaluated on only {n} held-out case(s): the 95% intervals are wide, and rare failure modes may not show.")
    out.append("The test cases are a held-out split (by patient) of the same dataset as the training cases, not an external cohort: "
               "other scanners, protocols, sites or populations were not evaluated.")
    spacing = data.get("spacing_median")
    inputs = f"the channels {', '.join(task.get('channels') or [])} on one grid"
    if spacing:
        inputs += f", near the training spacing (median {_list(spacing, 2)} mm)"
    out.append(f"Expects {inputs}, with intensities like those of the training data (statistics above); inputs far from them are "
               "flagged by the model server's drift metrics but still answered.")
    if task.get("slice_axis") is not None:
        out.append(f"Works slice by slice (axis {task['slice_axis']}): no 3D context.")
    if not card.threshold_passed:
        out.append(f"Did not meet the registration thresholds ({card.threshold_reason}): not a candidate for promotion.")
    if card.gate.get("decision") == "refused":
        out.append(f"Promotion was refused: {card.gate.get('reason', '')}")
    out.append("Research use only: not a medical device, not validated for clinical decisions.")
    return out


def render_markdown(card: schemas.ModelCard) -> str:
    """The model card as Markdown (pure: the same card gives the same text)."""
    task, training, data, ev = card.task, card.training, card.data, card.evaluation
    level = f"{100 * float(ev.get('confidence', 1.0 - ALPHA)):g}%"
    version = f" version {card.version}" if card.version else ""
    lines = [f"# Model card: {card.model_name}{version}", "",
             "_Written by medseg at registration; the gate decision is added when promotion decides._", "",
             "## Intended use and task", "", _what(task), "",
             f"- Intended use: research on data like {task.get('dataset', '')}'s"
             + (f" ({task['source_format']} layout)" if task.get("source_format") else "") + "; not for clinical decisions (see Known limits).",
             f"- Task: {task.get('kind')}; judged by {task.get('primary_metric')} on {task.get('primary_group')}"
             + (f"; official lesion-wise setting {task['lesionwise']}" if task.get("lesionwise") else "") + ".",
             f"- Model: {task.get('network') or 'network'} ({task.get('configuration')}), outputs {task.get('output')} with {task.get('activation')}, "
             f"patch {_list(task.get('patch_size') or [], 0)} voxels at {_list(task.get('spacing') or [], 3)} mm."]
    if task.get("kind") == "classification":
        lines += [f"- Classes: {', '.join(task.get('classes') or [])}", ""]
    else:
        groups = task.get("groups") or {}
        names = {v: k for k, v in (task.get("labels") or {}).items()}
        lines += ["- Groups reported: " + "; ".join(f"{g} = labels {', '.join(f'{names.get(v, v)} ({v})' for v in vs)}" for g, vs in groups.items()), ""]
    lines += ["Endpoint inputs (V2; one of the channel sets, or `volume`):", "",
              *_table(["input", "datatype", "shape", "optional", "notes"], _tensor_rows(task.get("inputs") or []), right=5), "",
              "Endpoint outputs:", "", *_table(["output", "datatype", "shape", "optional", "notes"], _tensor_rows(task.get("outputs") or []), right=5), ""]

    lines += ["## Training data", ""]
    n_train = data.get("n_training_cases")
    lines.append(f"- Dataset {data.get('dataset')}" + (f" ({data['source_format']} layout)" if data.get("source_format") else "")
                 + f": {data.get('n_labelled_cases')} labelled case(s)"
                 + (f"; {n_train} of them (the training and validation folds) were fingerprinted and trained on, the others held out for testing."
                    if n_train is not None else "."))
    if data.get("synthetic"):
        lines.append("- Origin: **synthetic** (" + ", ".join(f"{k} {v}" for k, v in data["synthetic"].items()) + ").")
    if "spacing_median" in data:
        lines.append(f"- Voxel spacing (mm): median {_list(data['spacing_median'], 3)}, range {_list(data['spacing_min'], 3)} to {_list(data['spacing_max'], 3)}"
                     + (f"; median shape {' × '.join(map(str, data['shape_median']))} voxels." if data.get("shape_median") else "."))
    if data.get("intensity"):
        lines += ["", "Intensity statistics per channel (raw values of the voxels the fingerprint samples: the foreground of the training cases):", "",
                  *_table(["channel", "mean", "std", "p0.5", "median", "p99.5"],
                          [[name, *(_num(stats.get(k), 2) for k in INTENSITY_KEYS)] for name, stats in data["intensity"].items()]), ""]
    else:
        lines += ["- No fingerprint in the package: spacing and intensity statistics unknown.", ""]
    if data.get("class_frequencies"):
        names = {str(v): k for k, v in (task.get("labels") or {}).items()}
        lines += ["- Voxel share per label: " + ", ".join(f"{names.get(k, k)} {100 * float(v):.2f}%" for k, v in data["class_frequencies"].items()), ""]
    run = [f"{training['epochs_run']} epoch(s)" if training.get("epochs_run") is not None else None,
           f"best epoch {int(training['best_epoch']) + 1} ({training.get('val_metric')} {_num(training.get('best_val'))})"
           if isinstance(training.get("best_epoch"), int) and training["best_epoch"] >= 0 else None,
           f"folds {', '.join(map(str, training['folds']))} ({training.get('combine')})" if training.get("folds") else
           (f"fold {training['fold']}" if training.get("fold") is not None else None),
           f"loss {training['loss']}" if training.get("loss") else None, f"optimizer {training['optimizer']}" if training.get("optimizer") else None,
           f"{training['train_minutes']} min on {training.get('device')}" if training.get("train_minutes") else None,
           f"medseg {training['medseg_version']}" if training.get("medseg_version") else None]
    lines += ["- Training: " + ", ".join(r for r in run if r) + ".", ""]

    lines += ["## Test metrics", "",
              f"{ev.get('n_cases')} held-out case(s). Mean over cases with its {level} percentile bootstrap interval "
              f"({ev.get('n_bootstrap')} resamples of the cases, seed {ev.get('seed')}).", ""]
    rows = [[m["group"], m["metric"] + ("" if m.get("higher_is_better", True) else " (lower is better)"), _num(m["mean"], _digits(m["metric"])),
             f"[{_num(m['lower'], _digits(m['metric']))}, {_num(m['upper'], _digits(m['metric']))}]", m["n_cases"]] for m in card.metrics]
    lines += [*_table(["group", "metric", "mean", f"{level} CI", "cases"], rows, right=2), ""] if rows else ["No per-case metrics.", ""]

    lines += ["## Gate decision", "", "Registration thresholds: " + ("**met**" if card.threshold_passed else "**not met**") + f" ({card.threshold_reason}).", ""]
    if card.thresholds:
        lines += ["- Thresholds: " + ", ".join(f"{k} {_num(v, 4)}" for k, v in card.thresholds.items()), ""]
    gate_info = card.gate
    if not gate_info:
        lines += ["Promotion: not decided yet (the paired bootstrap gate against the champion decides `medseg registry promote`).", ""]
    else:
        against = f" against champion v{gate_info['compared_with']}" if gate_info.get("compared_with") else ""
        lines += [f"Promotion: **{gate_info.get('decision')}**{against} ({gate_info.get('time')}): {gate_info.get('reason')}", ""]
        groups = gate_info.get("groups") or {}
        if groups:
            alpha = float(gate_info.get("alpha", ALPHA))
            lines += [f"Paired bootstrap of {gate_info.get('metric')} (positive: this version better; margin {gate_info.get('margin')}, "
                      f"{100 * (1 - alpha):g}% CI, {gate_info.get('n_common')} common case(s)):", "",
                      *_table(["group", "this version", "champion", "difference", "CI", "non-inferior"],
                              [[g, _num(r.get("challenger_mean"), 4), _num(r.get("champion_mean"), 4), _signed(r.get("mean_diff")),
                                f"[{_signed(r.get('ci_lower'))}, {_signed(r.get('ci_upper'))}]", "yes" if r.get("non_inferior") else "no"]
                               for g, r in groups.items()]), ""]
    lines += ["## Known limits", "", *(f"- {text}" for text in known_limits(card)), ""]
    if card.lineage:
        lines += ["## Lineage", "", *_table(["key", "value"], [[k, f"`{v}`"] for k, v in card.lineage.items()], right=2), ""]
    return "\n".join(lines).rstrip() + "\n"


def short_description(card: schemas.ModelCard) -> str:
    """One line for the registered version's description: what it is, its headline test number, the decisions."""
    task = card.task
    what = ", ".join(task.get("classes") or []) if task.get("kind") == "classification" else ", ".join(task.get("groups") or {})
    head = next((m for m in card.metrics if m["metric"] == task.get("primary_metric") and m["group"] == task.get("primary_group")), None)
    number = (f"; test {head['metric']} {head['group']} {_num(head['mean'], _digits(head['metric']))} "
              f"[{_num(head['lower'], _digits(head['metric']))}, {_num(head['upper'], _digits(head['metric']))}] on {head['n_cases']} case(s)") if head else ""
    synthetic = " (synthetic training data)" if card.data.get("synthetic") else ""
    decision = f"; promotion {card.gate['decision']}" if card.gate.get("decision") else ""
    return (f"{task.get('kind')} model ({what}) of {task.get('dataset')}{synthetic}{number}; thresholds "
            f"{'met' if card.threshold_passed else 'not met'}{decision}. Model card: {schemas.MODEL_CARD_MD} in this version's run.")


# --------------------------------------------------------------------------- MLflow
def log_card(client: Any, run_id: str, card: schemas.ModelCard) -> None:
    """Log ``model_card.md`` (the card) and ``model_card.json`` (what it is rendered from) at the root of ``run_id``."""
    client.log_text(run_id, render_markdown(card), schemas.MODEL_CARD_MD)
    client.log_dict(run_id, card.to_dict(), schemas.MODEL_CARD_JSON)


def publish_card(client: Any, name: str, version: str, run_id: str, card: schemas.ModelCard) -> schemas.ModelCard:
    """Log the card of ``name`` ``version`` in its run and set the version's description (:func:`short_description`)."""
    card = dataclasses.replace(card, version=str(version))
    log_card(client, run_id, card)
    client.update_model_version(name, str(version), description=short_description(card))
    return card


def read_card(client: Any, run_id: str) -> schemas.ModelCard | None:
    """The ``model_card.json`` of ``run_id``, or None when the run has none (versions registered before cards)."""
    if schemas.MODEL_CARD_JSON not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="medseg-card-") as tmp:
        return schemas.ModelCard.load(Path(client.download_artifacts(run_id, schemas.MODEL_CARD_JSON, tmp)))


def record_gate_decision(client: Any, name: str, mv: Any, record: Mapping[str, Any]) -> schemas.ModelCard | None:
    """Re-render the card of version ``mv`` with a promotion decision (:func:`with_gate`) and log it again; None when the
    version has no card. A card is documentation: a failure here is logged and never undoes the decision."""
    run_id = getattr(mv, "run_id", None)
    if not run_id:
        return None
    try:
        card = read_card(client, run_id)
        if card is None:
            return None
        return publish_card(client, name, str(mv.version), run_id, with_gate(card, record))
    except Exception as exc:  # noqa: BLE001 - the decision is recorded elsewhere; the card must not break promotion
        log.warning("model card of %s v%s not updated with the promotion decision: %s", name, getattr(mv, "version", "?"), exc)
        return None


def registered_card_text(name: str, version: str) -> str | None:
    """``model_card.md`` of a registered version's run (the tracking URI from the environment, as the model server
    resolves models), or None when it has none or the registry cannot be asked."""
    import mlflow

    try:
        client = mlflow.MlflowClient()
        run_id = client.get_model_version(name, str(version)).run_id
        if not run_id or schemas.MODEL_CARD_MD not in {a.path for a in client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory(prefix="medseg-card-") as tmp:
            return Path(client.download_artifacts(run_id, schemas.MODEL_CARD_MD, tmp)).read_text(encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - serving goes on without a card
        log.warning("no model card for %s v%s: %s", name, version, exc)
        return None


__all__ = ["ALPHA", "N_BOOTSTRAP", "SEED", "build_card", "data_summary", "known_limits", "log_card", "metric_intervals", "publish_card", "read_card",
           "record_gate_decision", "registered_card_text", "render_markdown", "segmentation_card_metrics", "short_description", "task_summary",
           "training_summary", "with_gate"]
