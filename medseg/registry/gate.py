"""The promotion gate: challenger against champion on the same test cases, on the task's metric.

The task (:class:`medseg.task.Task`) names the metric, its direction, the groups compared and the primary
group; this module only does the statistics (numpy only, no MLflow).

**Pairing.** The two models' per-case entries (``metrics.json``'s ``per_case``) are paired by ``case_key``
(the case's identity by content, :func:`medseg.ingest.ingest.case_key`, which survives a re-ingest that
renumbers pseudonyms) when every entry of both sides has one, else by ``case_id`` (records written before
case keys existed). With keys, the gate **refuses when the two test sets differ in content**: cases only on
one side, or the same ``case_id`` holding another case; the reason counts both. Without keys the content
cannot be compared: the cases with a common ``case_id`` are compared (a different true class of a classifier's
subject still refuses), and the decision records ``pairing: "case_id"``.

**Per-case metrics** (segmentation: Dice, IoU, HD95, ... per reported group; classification: per-subject
log-loss in group ``all``). Differences are oriented so that positive means the challenger is better:
``d_i = challenger_i - champion_i`` when higher is better, ``champion_i - challenger_i`` when lower is better
(HD95, log-loss). A percentile bootstrap of the mean of ``d`` (resampling cases with replacement,
``n_bootstrap`` times, seeded) gives a two-sided ``(1 - alpha)`` interval ``[lower, upper]``.

**Macro AUC** (classification, ``metric="auc_macro"``): a paired bootstrap over subjects of the difference
of the macro one-vs-rest ROC-AUC: each resample draws subjects with replacement and computes both models'
AUCs on it (resamples lacking one of the classes present in the test set are skipped, and counted).

The challenger is promoted iff

* **non-inferior in every group compared**: ``lower > -margin`` (strictly; ``margin`` in the metric's units,
  e.g. Dice points, millimetres of HD95, nats of log-loss), and
* **strictly better on the primary group**: the oriented mean difference ``> 0`` (a point estimate; a tie is
  not better: an equal model is never promoted), or
* there is **no champion** (``champion_cases is None``).

As a one-sided test, requiring the lower bound of the two-sided ``(1 - alpha)`` interval is a
non-inferiority test at level ``alpha / 2`` per group. Groups are not corrected for multiplicity:
requiring *every* group to pass is conservative (intersection-union test).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medseg.task import ALL

#: The oriented mean difference on the primary group must exceed this to count as "strictly better".
BETTER_EPS = 1e-9
#: Bootstrap replicates drawn per block (bounds memory at ``_BLOCK * n_cases`` indices).
_BLOCK = 500
#: Probabilities are clipped to at least this before the log-loss.
LOG_LOSS_EPS = 1e-12
#: Methods recorded in :class:`GateDecision`.
METHOD_MEAN, METHOD_AUC = "paired_bootstrap_mean", "paired_bootstrap_auc_macro"
AUC_METRIC = "auc_macro"


def paired_bootstrap(diffs: np.ndarray, n_bootstrap: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences and its percentile bootstrap ``(1 - alpha)`` CI.

    Args:
        diffs: 1-D per-case differences (challenger - champion); finite values only.
        n_bootstrap: number of bootstrap resamples (each resamples ``len(diffs)`` cases with replacement).
        alpha: the CI is ``[q(alpha/2), q(1 - alpha/2)]`` of the bootstrap means (linear interpolation).
        seed: seed of ``numpy.random.default_rng``; the same inputs and seed give the same numbers.

    Returns:
        ``(mean, lower, upper)`` as floats. With one case the interval is ``[d, d]``.

    Raises:
        ValueError: empty or non-finite ``diffs``, not 1-D, ``n_bootstrap < 1``, ``alpha`` not in (0, 1).
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"diffs must be a non-empty 1-D array, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("diffs must be finite")
    _check_bootstrap(n_bootstrap, alpha)
    means = np.empty(int(n_bootstrap), dtype=np.float64)
    for start, stop, idx in _resamples(d.size, int(n_bootstrap), seed):
        means[start:stop] = d[idx].mean(axis=1)
    lower, upper = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(d.mean()), float(lower), float(upper)


def _resamples(n: int, total: int, seed: int):
    """``total`` draws of ``n`` indices with replacement (seeded), ``_BLOCK`` draws at a time: ``(start, stop, idx)``
    with ``idx`` of shape (stop - start, n), so memory stays bounded whatever ``total``."""
    rng = np.random.default_rng(int(seed))
    for start in range(0, total, _BLOCK):
        stop = min(start + _BLOCK, total)
        yield start, stop, rng.integers(0, n, size=(stop - start, n))


def _check_bootstrap(n_bootstrap: int, alpha: float) -> None:
    if int(n_bootstrap) < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# --------------------------------------------------------------------------- macro one-vs-rest AUC
def _comparison(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """(P, N): 1 where a positive outscores a negative, 1/2 on a tie (the Mann-Whitney kernel)."""
    s_pos, s_neg = scores[positive][:, None], scores[~positive][None, :]
    return (s_pos > s_neg).astype(np.float64) + 0.5 * (s_pos == s_neg)


def _weighted_macro_auc(kernels: Sequence[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> np.ndarray:
    """Macro AUC per row of ``weights`` (B, n): each subject counted as often as it was drawn.

    ``kernels``: per class (positive mask (n,), comparison matrix (P, N)). Rows lacking a class give NaN.
    """
    aucs = []
    for positive, kernel in kernels:
        w_pos, w_neg = weights[:, positive], weights[:, ~positive]
        pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append(np.einsum("bp,pn,bn->b", w_pos, kernel, w_neg) / pairs)
        aucs[-1][pairs == 0] = np.nan
    out = np.mean(aucs, axis=0)
    lacking = np.zeros(weights.shape[0], dtype=bool)
    for positive, _ in kernels:
        lacking |= weights[:, positive].sum(axis=1) == 0
    out[lacking] = np.nan
    return out


def macro_auc(true: Sequence[int], probs: np.ndarray) -> float | None:
    """Macro one-vs-rest ROC-AUC over the classes present in ``true`` (ties count one half); ``None`` when
    fewer than two classes are present. ``probs``: (n, K) scores in class-index order."""
    t = np.asarray(true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    present = np.unique(t)
    if present.size < 2:
        return None
    kernels = [(t == k, _comparison(p[:, k], t == k)) for k in present]
    return float(_weighted_macro_auc(kernels, np.ones((1, t.size)))[0])


def paired_bootstrap_auc(true: Sequence[int], challenger_probs: np.ndarray, champion_probs: np.ndarray, n_bootstrap: int = 2000,
                         alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float, float, float, int]:
    """The macro AUC difference (challenger - champion) on the same subjects and its paired bootstrap CI.

    Each resample draws the subjects with replacement (seeded) and computes both AUCs on that draw; draws
    lacking a class present in ``true`` are skipped.

    Returns:
        ``(diff, lower, upper, challenger_auc, champion_auc, n_skipped)``.

    Raises:
        ValueError: fewer than two classes in ``true``, shapes that do not match, non-finite scores, or no
            resample holding every class.
    """
    _check_bootstrap(n_bootstrap, alpha)
    t = np.asarray(true, dtype=np.int64)
    a, b = np.asarray(challenger_probs, dtype=np.float64), np.asarray(champion_probs, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] != t.size:
        raise ValueError(f"scores {a.shape} and {b.shape} do not match {t.size} subject(s)")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("scores must be finite")
    present = np.unique(t)
    if present.size < 2:
        raise ValueError("the macro AUC needs subjects of at least two classes")
    ka = [(t == k, _comparison(a[:, k], t == k)) for k in present]
    kb = [(t == k, _comparison(b[:, k], t == k)) for k in present]
    ones = np.ones((1, t.size))
    auc_a, auc_b = float(_weighted_macro_auc(ka, ones)[0]), float(_weighted_macro_auc(kb, ones)[0])
    n, total = t.size, int(n_bootstrap)
    diffs = np.empty(total, dtype=np.float64)
    for start, stop, idx in _resamples(n, total, seed):
        rows = np.arange(stop - start)[:, None] * n
        weights = np.bincount((idx + rows).ravel(), minlength=(stop - start) * n).reshape(stop - start, n).astype(np.float64)
        diffs[start:stop] = _weighted_macro_auc(ka, weights) - _weighted_macro_auc(kb, weights)
    valid = diffs[np.isfinite(diffs)]
    if valid.size == 0:
        raise ValueError("no bootstrap resample holds every class")
    lower, upper = np.quantile(valid, [alpha / 2.0, 1.0 - alpha / 2.0])
    return auc_a - auc_b, float(lower), float(upper), auc_a, auc_b, int(total - valid.size)


# --------------------------------------------------------------------------- per-case values
def _number(value: Any) -> float | None:
    try:
        out = None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def case_log_loss(values: Mapping[str, Any]) -> float | None:
    """Per-subject log-loss from a classifier's ``all`` entry: its ``log_loss``, else ``-ln p_true`` from
    ``prob_<class>`` (in entry order = class-index order) and ``true``."""
    given = _number(values.get("log_loss"))
    if given is not None:
        return given
    probs = [v for k, v in values.items() if isinstance(k, str) and k.startswith("prob_")]
    true = values.get("true")
    if not probs or isinstance(true, bool) or not isinstance(true, (int, float)) or not 0 <= int(true) < len(probs):
        return None
    p = _number(probs[int(true)])
    return None if p is None else float(-math.log(min(max(p, LOG_LOSS_EPS), 1.0)))


def case_value(entry: Mapping[str, Any], group: str, metric: str) -> float | None:
    """``metric`` of ``group`` in one per-case entry: ``{GROUP: {METRIC: ..}}`` or flat ``{"GROUP_METRIC": ..}``.

    ``None`` when absent, not a number, or not finite. A classifier's ``log_loss`` is computed from its
    probabilities when the entry predates the field.
    """
    value = entry.get(group)
    if isinstance(value, Mapping):
        if metric == "log_loss":
            return case_log_loss(value)
        return _number(value.get(metric))
    return _number(entry.get(f"{group}_{metric}"))


def case_dice(entry: Mapping[str, Any], region: str) -> float | None:
    """Dice of ``region`` in one per-case entry (:func:`case_value` with ``dice``)."""
    return case_value(entry, region, "dice")


def groups_in(cases: Iterable[Mapping[str, Any]], metric: str = "dice") -> list[str]:
    """Names that carry ``metric`` in some entry, in order of first appearance."""
    seen: dict[str, None] = {}
    suffix = f"_{metric}"
    for entry in cases:
        for key, value in entry.items():
            if key in ("case_id", "case_key"):
                continue
            if isinstance(value, Mapping) and (metric in value or (metric == "log_loss" and case_log_loss(value) is not None)):
                seen.setdefault(str(key), None)
            elif isinstance(key, str) and key.endswith(suffix) and len(key) > len(suffix):
                seen.setdefault(key[: -len(suffix)], None)
    return list(seen)


def regions_in(cases: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names that carry a Dice in some entry (:func:`groups_in` with ``dice``)."""
    return groups_in(cases, "dice")


def _class_scores(entry: Mapping[str, Any]) -> tuple[list[str], list[float], int] | None:
    """``(class names, probabilities, true index)`` of a classifier's per-case entry, or ``None``."""
    values = entry.get(ALL)
    if not isinstance(values, Mapping):
        return None
    names = [k[len("prob_"):] for k in values if isinstance(k, str) and k.startswith("prob_")]
    probs = [_number(values[f"prob_{n}"]) for n in names]
    true = values.get("true")
    if not names or any(p is None for p in probs) or isinstance(true, bool) or not isinstance(true, (int, float)):
        return None
    return names, [float(p) for p in probs], int(true)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pairing
@dataclass
class Pairing:
    """The challenger's and champion's entries for the same cases, and how they were matched."""

    by: str  # "case_key" or "case_id"
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]
    only_challenger: int = 0
    only_champion: int = 0
    differ: int = 0  # the same case id holding different content on the two sides
    problem: str = ""  # non-empty: the gate must refuse with this reason


def _key(entry: Mapping[str, Any]) -> str:
    return str(entry.get("case_key") or "")


def _index(cases: Sequence[Mapping[str, Any]], field_name: str, who: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for entry in cases:
        value = str(entry.get(field_name) or "")
        if not value:
            continue
        if value in out:
            what = "case" if field_name == "case_id" else "case key"
            raise ValueError(f"{who}: {what} {value!r} appears twice in the per-case metrics")
        out[value] = entry
    return out


def _true_class(entry: Mapping[str, Any]) -> int | None:
    values = entry.get(ALL)
    true = values.get("true") if isinstance(values, Mapping) else None
    return int(true) if isinstance(true, (int, float)) and not isinstance(true, bool) else None


def pair_cases(challenger_cases: Sequence[Mapping[str, Any]], champion_cases: Sequence[Mapping[str, Any]], champion_label: str = "champion") -> Pairing:
    """Match the two sides' per-case entries (see the module docstring). Never raises on data problems:
    they come back as :attr:`Pairing.problem`."""
    try:
        ids_a, ids_b = _index(challenger_cases, "case_id", "challenger"), _index(champion_cases, "case_id", champion_label)
        keyed = bool(challenger_cases) and bool(champion_cases) and all(_key(e) for e in challenger_cases) and all(_key(e) for e in champion_cases)
        if keyed:
            keys_a, keys_b = _index(challenger_cases, "case_key", "challenger"), _index(champion_cases, "case_key", champion_label)
    except ValueError as exc:
        return Pairing("case_id", [], problem=str(exc))
    if keyed:
        only_a, only_b = keys_a.keys() - keys_b.keys(), keys_b.keys() - keys_a.keys()
        differ = sum(1 for cid in ids_a.keys() & ids_b.keys() if _key(ids_a[cid]) != _key(ids_b[cid]))
        pairing = Pairing("case_key", [(keys_a[k], keys_b[k]) for k in sorted(keys_a.keys() & keys_b.keys())], len(only_a), len(only_b), differ)
        if only_a or only_b:
            parts = [f"{len(only_a)} case(s) only in the challenger's test set", f"{len(only_b)} only in {champion_label}'s"]
            if differ:
                parts.append(f"{differ} case id(s) naming different cases on the two sides")
            pairing.problem = (f"the test sets differ in content ({', '.join(parts)}; {len(pairing.pairs)} case(s) in common by case key): "
                               f"evaluate both models on the same test set")
        return pairing
    common = sorted(ids_a.keys() & ids_b.keys())
    pairing = Pairing("case_id", [(ids_a[c], ids_b[c]) for c in common], len(ids_a.keys() - ids_b.keys()), len(ids_b.keys() - ids_a.keys()))
    pairing.differ = sum(1 for a, b in pairing.pairs if _true_class(a) is not None and _true_class(b) is not None and _true_class(a) != _true_class(b))
    if pairing.differ:
        pairing.problem = (f"the test sets differ in content: {pairing.differ} case id(s) with another true class on the two sides "
                           f"(paired by case id: the records have no case keys)")
    elif not common:
        pairing.problem = f"no common test cases with {champion_label}"
    return pairing


# --------------------------------------------------------------------------- the decision
@dataclass
class GroupResult:
    """The comparison on one group: raw means of both models, the oriented difference (positive = challenger
    better) and its bootstrap interval."""

    group: str
    n_cases: int
    challenger_mean: float
    champion_mean: float
    mean_diff: float
    ci_lower: float
    ci_upper: float
    non_inferior: bool
    n_skipped_resamples: int = 0


@dataclass
class GateDecision:
    """What :func:`decide` found. ``groups`` maps group → :class:`GroupResult` (empty when not compared)."""

    promote: bool
    reason: str
    n_common: int = 0
    primary_group: str = ""
    metric: str = "dice"
    higher_is_better: bool = True
    method: str = METHOD_MEAN
    pairing: str = ""
    margin: float = 0.0
    alpha: float = 0.05
    n_bootstrap: int = 2000
    seed: int = 0
    groups: dict[str, GroupResult] = field(default_factory=dict)
    skipped_groups: list[str] = field(default_factory=list)
    primary_better: bool | None = None
    n_only_challenger: int = 0
    n_only_champion: int = 0
    n_differ: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label(group: str, metric: str) -> str:
    return metric if group == ALL else f"{group} {metric}"


def _auc_result(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], margin: float, alpha: float, n_bootstrap: int, seed: int) -> GroupResult | str:
    """The AUC comparison of the paired subjects, or the reason it cannot be made."""
    true, a_rows, b_rows, names = [], [], [], None
    for a, b in pairs:
        sa, sb = _class_scores(a), _class_scores(b)
        if sa is None or sb is None:
            continue
        if sa[0] != sb[0] or (names is not None and sa[0] != names):
            return f"the two models' per-case probabilities name different classes ({sa[0]} vs {sb[0]})"
        if sa[2] != sb[2]:
            return "the test sets differ in content: a subject with another true class on the two sides"
        names = sa[0]
        true.append(sa[2])
        a_rows.append(sa[1])
        b_rows.append(sb[1])
    if not true:
        return "no common test subjects with class probabilities"
    try:
        diff, lower, upper, auc_a, auc_b, skipped = paired_bootstrap_auc(true, np.asarray(a_rows), np.asarray(b_rows), n_bootstrap, alpha, seed)
    except ValueError as exc:
        return f"macro AUC not comparable: {exc}"
    return GroupResult(ALL, len(true), auc_a, auc_b, diff, lower, upper, bool(lower > -float(margin)), skipped)


def decide(
    challenger_cases: Sequence[Mapping[str, Any]],
    champion_cases: Sequence[Mapping[str, Any]] | None,
    groups: Sequence[str] | None = None,
    metric: str = "dice",
    higher_is_better: bool = True,
    primary_group: str = "",
    margin: float = 0.0,
    alpha: float = 0.05,
    n_bootstrap: int = 2000,
    seed: int = 0,
    champion_label: str = "champion",
) -> GateDecision:
    """The gate (see the module docstring). Never raises on data problems: they refuse, with the reason.

    Args:
        challenger_cases, champion_cases: per-case entries ``{"case_id", "case_key", GROUP: {METRIC: ..}, ..}``
            (``metrics.json``'s ``per_case``). ``champion_cases=None``: there is no champion → promote.
        groups: the groups to compare; those lacking ``metric`` on the paired cases of either model are
            skipped (listed in ``skipped_groups``). ``None``: every name with ``metric`` in both. Ignored for
            ``auc_macro`` (one group, ``all``).
        metric: the per-case metric (``dice``, ``iou``, ``hd95``, ``log_loss``, ...) or ``auc_macro`` (the
            macro one-vs-rest AUC of a classifier, bootstrapped over subjects).
        higher_is_better: the metric's direction (the task's :class:`~medseg.task.MetricSpec`).
        primary_group: must be compared (else refused); the challenger must be strictly better on it. Empty:
            the first of ``groups`` (``all`` for ``auc_macro``).
        margin: non-inferiority margin in the metric's units (``>= 0``).
        alpha, n_bootstrap, seed: of the bootstrap; every group uses ``seed`` (the same case resampling when
            groups share the case set).
        champion_label: how the reason names the champion (e.g. ``"champion v3"``).
    """
    if float(margin) < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    method = METHOD_AUC if metric == AUC_METRIC else METHOD_MEAN
    if method == METHOD_AUC:
        higher_is_better, wanted = True, [ALL]
        primary_group = primary_group or ALL
    else:
        wanted = list(groups) if groups is not None else []
        primary_group = primary_group or (wanted[0] if wanted else "")
    base: dict[str, Any] = {"primary_group": primary_group, "metric": metric, "higher_is_better": bool(higher_is_better), "method": method,
                            "margin": float(margin), "alpha": float(alpha), "n_bootstrap": int(n_bootstrap), "seed": int(seed)}
    if champion_cases is None:
        return GateDecision(promote=True, reason="no champion yet", **base)
    pairing = pair_cases(challenger_cases, champion_cases, champion_label)
    base.update(pairing=pairing.by, n_only_challenger=pairing.only_challenger, n_only_champion=pairing.only_champion, n_differ=pairing.differ,
                n_common=len(pairing.pairs))
    if pairing.problem:
        return GateDecision(promote=False, reason=pairing.problem, **base)
    if not primary_group:
        return GateDecision(promote=False, reason="no primary group to decide on", **base)

    results: dict[str, GroupResult] = {}
    skipped: list[str] = []
    if method == METHOD_AUC:
        found = _auc_result(pairing.pairs, float(margin), float(alpha), int(n_bootstrap), int(seed))
        if isinstance(found, str):
            return GateDecision(promote=False, reason=found, **base)
        results[ALL] = found
    else:
        if groups is None:
            theirs = set(groups_in((b for _, b in pairing.pairs), metric))
            wanted = [g for g in groups_in((a for a, _ in pairing.pairs), metric) if g in theirs]
        if primary_group not in wanted:
            wanted.insert(0, primary_group)
        sign = 1.0 if higher_is_better else -1.0
        for group in wanted:
            values = [(x, y) for a, b in pairing.pairs if (x := case_value(a, group, metric)) is not None and (y := case_value(b, group, metric)) is not None]
            if not values:
                skipped.append(group)
                continue
            arr = np.asarray(values, dtype=np.float64)
            mean, lower, upper = paired_bootstrap(sign * (arr[:, 0] - arr[:, 1]), n_bootstrap, alpha, seed)
            results[group] = GroupResult(group=group, n_cases=len(values), challenger_mean=float(arr[:, 0].mean()), champion_mean=float(arr[:, 1].mean()),
                                         mean_diff=mean, ci_lower=lower, ci_upper=upper, non_inferior=bool(lower > -float(margin)))
    base.update(groups=results, skipped_groups=skipped)
    if primary_group not in results:
        return GateDecision(promote=False, reason=f"no common test cases with {_label(primary_group, metric)}", **base)

    n = len(pairing.pairs)
    level = f"{100 * (1 - float(alpha)):g}% CI"
    direction = "" if higher_is_better else " (lower is better)"
    oriented = "challenger better when > 0"
    failing = [r for r in results.values() if not r.non_inferior]
    p = results[primary_group]
    better = p.mean_diff > BETTER_EPS
    raw = p.challenger_mean - p.champion_mean
    relation = "=" if abs(raw) <= BETTER_EPS else (">" if raw > 0 else "<")
    primary_text = f"{_label(primary_group, metric)} {p.challenger_mean:.4f} {relation} {champion_label} {p.champion_mean:.4f}{direction}"
    parts = []
    if failing:
        parts.append("not non-inferior: " + "; ".join(
            f"{_label(r.group, metric)} diff {r.mean_diff:+.4f} {level} [{r.ci_lower:+.4f}, {r.ci_upper:+.4f}] ({oriented}), lower <= -margin {float(margin):g}"
            for r in failing))
    if not better:
        parts.append(f"not strictly better on {_label(primary_group, metric)}: {primary_text}")
    pairing_text = f"{n} common case(s) by {pairing.by.replace('_', ' ')}"
    if failing or not better:
        return GateDecision(promote=False, reason="; ".join(parts) + f" ({pairing_text})", primary_better=better, **base)
    summary = "; ".join(f"{_label(r.group, metric)} {r.mean_diff:+.4f} [{r.ci_lower:+.4f}, {r.ci_upper:+.4f}]" for r in results.values())
    return GateDecision(promote=True, primary_better=True, **base,
                        reason=f"{primary_text}; non-inferior (lower {level} bound of the difference, {oriented}, > -margin {float(margin):g}) "
                               f"in every group: {summary} ({pairing_text})")


#: Older name of :class:`GroupResult`.
RegionResult = GroupResult

__all__ = [
    "ALL", "AUC_METRIC", "BETTER_EPS", "GateDecision", "GroupResult", "METHOD_AUC", "METHOD_MEAN", "Pairing", "RegionResult", "case_dice",
    "case_log_loss", "case_value", "decide", "groups_in", "macro_auc", "pair_cases", "paired_bootstrap", "paired_bootstrap_auc", "regions_in",
]
