"""The promotion gate: a paired bootstrap of per-case Dice differences, challenger against champion.

Both models were evaluated on held-out test cases; the gate uses only the cases both were evaluated
on (matched by ``case_id``) and, per region, the per-case differences ``d_i = dice_challenger_i -
dice_champion_i``. A percentile bootstrap of the mean of ``d`` (resampling cases with replacement,
``n_bootstrap`` times, seeded) gives a two-sided ``(1 - alpha)`` confidence interval ``[lower, upper]``.

The challenger is promoted iff

* **non-inferior in every region**: ``lower > -margin`` for every region compared (strictly above;
  with ``margin = 0`` this asks for a difference significantly above zero in every region), and
* **strictly better on the primary region**: ``mean(d) > 0`` on ``primary_region`` (a point estimate;
  a tie is not better: an equal model is never promoted), or
* there is **no champion** (``champion_cases is None``).

As a one-sided test, requiring the lower bound of the two-sided ``(1 - alpha)`` interval is a
non-inferiority test at level ``alpha / 2`` per region. Regions are not corrected for multiplicity:
requiring *every* region to pass is conservative (intersection-union test).

Pure functions (numpy only, no MLflow): :func:`paired_bootstrap` and :func:`decide`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: ``mean(d)`` on the primary region must exceed this to count as "strictly better" (float noise guard).
BETTER_EPS = 1e-9
#: Bootstrap replicates drawn per block (bounds memory at ``_BLOCK * n_cases`` indices).
_BLOCK = 500


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
    if int(n_bootstrap) < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n, b = d.size, int(n_bootstrap)
    rng = np.random.default_rng(int(seed))
    means = np.empty(b, dtype=np.float64)
    for start in range(0, b, _BLOCK):
        stop = min(start + _BLOCK, b)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    lower, upper = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(d.mean()), float(lower), float(upper)


@dataclass
class RegionResult:
    """The comparison on one region over the cases both models have a Dice for."""

    region: str
    n_cases: int
    challenger_mean: float
    champion_mean: float
    mean_diff: float
    ci_lower: float
    ci_upper: float
    non_inferior: bool


@dataclass
class GateDecision:
    """What :func:`decide` found. ``regions`` maps region → :class:`RegionResult` (empty when not compared)."""

    promote: bool
    reason: str
    n_common: int = 0
    primary_region: str = "WT"
    margin: float = 0.0
    alpha: float = 0.05
    n_bootstrap: int = 2000
    seed: int = 0
    regions: dict[str, RegionResult] = field(default_factory=dict)
    skipped_regions: list[str] = field(default_factory=list)
    primary_better: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def case_dice(entry: Mapping[str, Any], region: str) -> float | None:
    """Dice of ``region`` in one per-case entry: ``{"WT": {"dice": ..}}`` or flat ``{"WT_dice": ..}``.

    ``None`` when absent, not a number, or not finite.
    """
    value = entry.get(region)
    if isinstance(value, Mapping):
        value = value.get("dice")
    else:
        value = entry.get(f"{region}_dice")
    try:
        out = None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def regions_in(cases: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names that carry a Dice in some entry, in order of first appearance."""
    seen: dict[str, None] = {}
    for entry in cases:
        for key, value in entry.items():
            if key == "case_id":
                continue
            if isinstance(value, Mapping) and "dice" in value:
                seen.setdefault(str(key), None)
            elif isinstance(key, str) and key.endswith("_dice") and len(key) > len("_dice"):
                seen.setdefault(key[: -len("_dice")], None)
    return list(seen)


def _by_case(cases: Sequence[Mapping[str, Any]], who: str) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for entry in cases:
        if "case_id" not in entry:
            continue
        cid = str(entry["case_id"])
        if cid in out:
            raise ValueError(f"{who}: case {cid!r} appears twice in the per-case metrics")
        out[cid] = entry
    return out


def _refuse(base: dict[str, Any], reason: str, **extra: Any) -> GateDecision:
    return GateDecision(promote=False, reason=reason, **base, **extra)


def decide(
    challenger_cases: Sequence[Mapping[str, Any]],
    champion_cases: Sequence[Mapping[str, Any]] | None,
    regions: Sequence[str] | None = None,
    primary_region: str = "WT",
    margin: float = 0.0,
    alpha: float = 0.05,
    n_bootstrap: int = 2000,
    seed: int = 0,
    champion_label: str = "champion",
) -> GateDecision:
    """The gate (see the module docstring). Never raises on data problems: they refuse, with the reason.

    Args:
        challenger_cases, champion_cases: per-case entries ``{"case_id": .., REGION: {"dice": ..}, ..}``
            (``metrics.json``'s ``per_case``). ``champion_cases=None``: there is no champion → promote.
        regions: the regions to compare; those lacking a Dice on the common cases of either model are
            skipped (listed in ``skipped_regions``). ``None``: every name with a Dice in both.
        primary_region: must be compared (else refused); the challenger must be strictly better on it.
        margin: non-inferiority margin in Dice (``>= 0``).
        alpha, n_bootstrap, seed: of :func:`paired_bootstrap`; each region uses ``seed`` (the same
            case resampling when regions share the case set).
        champion_label: how the reason names the champion (e.g. ``"champion v3"``).
    """
    base = {"primary_region": primary_region, "margin": float(margin), "alpha": float(alpha), "n_bootstrap": int(n_bootstrap), "seed": int(seed)}
    if float(margin) < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if champion_cases is None:
        return GateDecision(promote=True, reason="no champion yet", **base)
    try:
        ours, theirs = _by_case(challenger_cases, "challenger"), _by_case(champion_cases, "champion")
    except ValueError as exc:
        return _refuse(base, str(exc))
    common = sorted(ours.keys() & theirs.keys())
    if not common:
        return _refuse(base, f"no common test cases with {champion_label}")
    wanted = list(regions) if regions is not None else [r for r in regions_in(ours[c] for c in common) if r in set(regions_in(theirs[c] for c in common))]
    if primary_region not in wanted:
        wanted.insert(0, primary_region)

    results: dict[str, RegionResult] = {}
    skipped: list[str] = []
    for region in wanted:
        pairs = [(a, b) for c in common if (a := case_dice(ours[c], region)) is not None and (b := case_dice(theirs[c], region)) is not None]
        if not pairs:
            skipped.append(region)
            continue
        arr = np.asarray(pairs, dtype=np.float64)
        mean, lower, upper = paired_bootstrap(arr[:, 0] - arr[:, 1], n_bootstrap, alpha, seed)
        results[region] = RegionResult(region=region, n_cases=len(pairs), challenger_mean=float(arr[:, 0].mean()), champion_mean=float(arr[:, 1].mean()),
                                       mean_diff=mean, ci_lower=lower, ci_upper=upper, non_inferior=bool(lower > -float(margin)))
    base.update(n_common=len(common), regions=results, skipped_regions=skipped)
    if primary_region not in results:
        return _refuse(base, f"no common test cases with {primary_region} Dice")

    level = f"{100 * (1 - float(alpha)):g}% CI"
    failing = [r for r in results.values() if not r.non_inferior]
    p = results[primary_region]
    better = p.mean_diff > BETTER_EPS
    parts = []
    if failing:
        parts.append("not non-inferior: " + "; ".join(f"{r.region} diff {r.mean_diff:+.4f} {level} [{r.ci_lower:+.4f}, {r.ci_upper:+.4f}], lower <= -margin {float(margin):g}" for r in failing))
    relation = ">" if better else ("=" if abs(p.mean_diff) <= BETTER_EPS else "<")
    primary_text = f"{primary_region} Dice {p.challenger_mean:.4f} {relation} {champion_label} {p.champion_mean:.4f}"
    if not better:
        parts.append(f"not strictly better on {primary_region}: {primary_text}")
    if failing or not better:
        return _refuse(base, "; ".join(parts) + f" ({len(common)} common case(s))", primary_better=better)
    summary = "; ".join(f"{r.region} {r.mean_diff:+.4f} [{r.ci_lower:+.4f}, {r.ci_upper:+.4f}]" for r in results.values())
    return GateDecision(promote=True, reason=f"{primary_text}; non-inferior (lower {level} bound > -margin {float(margin):g}) in every region: {summary} ({len(common)} common case(s))",
                        primary_better=True, **base)
