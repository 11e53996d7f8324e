"""Input drift: how far a request's intensities are from the training data's, per channel.

Per request and channel: ``m`` = mean intensity of the nonzero voxels (the head/brain; background is 0 in
skull-stripped MR), and ``z = |m - mean_train| / std_train``. The training statistic comes from the model
package, first found of:

1. ``drift_reference.json`` (:func:`write_drift_reference`): mean and std over the training **cases** of each
   case's nonzero-voxel mean — the same statistic as ``m``, so ``z`` is a proper z-score of a case mean
   (``statistic = "case_mean_nonzero"``).
2. ``fingerprint.json``'s ``case_nonzero_means`` (written by preprocessing; the same statistic as 1.).
3. ``fingerprint.json``'s channel statistics, else ``plans.json``'s normalisation entries (the planner copies the fingerprint's
   per-channel ``mean``/``std`` there): mean and std of the training **voxels** under the label (label > 0;
   nnU-Net's "foreground"), pooled over cases (``statistic = "voxel_foreground"``). This compares a
   whole-brain case mean with the spread of tumour voxels: in-distribution cases do not score 0 and the
   scale is that of single voxels, so alert on a change of ``z`` rather than on a textbook threshold.
   Entries the planner filled with its placeholders (mean 0, std 1) count as absent.

No usable statistic: drift is disabled (a log line says so) and the metrics are not observed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import read_json, write_json
from medseg.serving.metrics import DRIFT_LAST_ZSCORE, DRIFT_ZSCORE

log = logging.getLogger(__name__)

DRIFT_REFERENCE_JSON = schemas.DRIFT_REFERENCE_JSON
CASE_MEAN_NONZERO = "case_mean_nonzero"
VOXEL_FOREGROUND = "voxel_foreground"


@dataclass(frozen=True)
class DriftReference:
    """Per channel ``(mean, std)`` of the training statistic named by ``statistic``; ``source`` is the file read."""

    statistic: str
    source: str
    channels: dict[str, tuple[float, float]]


def load_drift_reference(package_dir: Path, channels: list[str]) -> DriftReference | None:
    """The training statistic of a model package (see the module doc), or None (logged) when it has none."""
    package_dir = Path(package_dir)
    candidates: list[tuple[str, str, dict[str, Any]]] = []
    ref_file = package_dir / DRIFT_REFERENCE_JSON
    if ref_file.is_file():
        try:
            data = read_json(ref_file)
            candidates.append((str(data.get("statistic", CASE_MEAN_NONZERO)), DRIFT_REFERENCE_JSON, dict(data.get("channels") or {})))
        except (MedsegError, AttributeError, TypeError, ValueError) as exc:
            log.warning("drift: cannot read %s (%s); trying the fingerprint", ref_file, exc)
    fp_file = package_dir / schemas.FINGERPRINT_JSON
    if fp_file.is_file():
        try:
            fingerprint = schemas.Fingerprint.load(package_dir)
            case_means = {c: {"mean": float(np.mean(v)), "std": float(np.std(v))} for c, v in fingerprint.case_nonzero_means.items() if len(v) >= 2}
            if case_means:  # the fingerprint kept each training case's nonzero mean: the same statistic as a request's
                candidates.append((CASE_MEAN_NONZERO, f"{schemas.FINGERPRINT_JSON} (case means)", case_means))
            candidates.append((VOXEL_FOREGROUND, schemas.FINGERPRINT_JSON, dict(fingerprint.channels)))
        except MedsegError as exc:
            log.warning("drift: cannot read %s (%s)", fp_file, exc)
    try:
        plans = schemas.Plans.load(package_dir)
        candidates.append((VOXEL_FOREGROUND, f"{schemas.PLANS_JSON} (fingerprint statistics)",
                           {str(n.get("channel")): n for n in plans.normalization if not (n.get("mean") == 0 and n.get("std") == 1)}))
    except MedsegError:
        pass
    for statistic, source, table in candidates:
        stats = {c: _mean_std(table.get(c)) for c in channels}
        usable = {c: s for c, s in stats.items() if s is not None}
        if usable:
            if len(usable) < len(channels):
                log.warning("drift: %s has no usable mean/std for channel(s) %s", source, ", ".join(c for c in channels if c not in usable))
            return DriftReference(statistic, source, usable)
    log.info("drift: model package %s has no training intensity statistics (%s, %s or plans.json normalisation): input drift disabled",
             package_dir, DRIFT_REFERENCE_JSON, schemas.FINGERPRINT_JSON)
    return None


def _mean_std(entry: Any) -> tuple[float, float] | None:
    if not isinstance(entry, dict):
        return None
    try:
        mean, std = float(entry["mean"]), float(entry["std"])
    except (KeyError, TypeError, ValueError):
        return None
    return (mean, std) if math.isfinite(mean) and math.isfinite(std) and std > 0 else None


def nonzero_means(images: np.ndarray) -> list[float | None]:
    """Per channel of ``C×I×J×K`` images: the mean of its nonzero voxels (None when it has none)."""
    out: list[float | None] = []
    for channel in images:
        count = int(np.count_nonzero(channel))
        out.append(float(np.sum(channel, dtype=np.float64)) / count if count else None)  # zeros add nothing to the sum
    return out


def drift_zscores(images: np.ndarray, channels: list[str], reference: DriftReference) -> dict[str, float]:
    """``{channel: |nonzero mean - training mean| / training std}`` for the channels the reference covers."""
    out = {}
    for name, mean in zip(channels, nonzero_means(images)):
        if mean is not None and name in reference.channels:
            ref_mean, ref_std = reference.channels[name]
            out[name] = abs(mean - ref_mean) / ref_std
    return out


def observe_drift(model_name: str, zscores: dict[str, float]) -> None:
    """Export one request's z-scores (histogram and last-value gauge)."""
    for channel, z in zscores.items():
        DRIFT_ZSCORE.labels(model=model_name, channel=channel).observe(z)
        DRIFT_LAST_ZSCORE.labels(model=model_name, channel=channel).set(z)


def drift_reference_from_cases(cases: Iterable[np.ndarray], channels: list[str]) -> dict[str, Any]:
    """The ``drift_reference.json`` content from training cases (each ``C×I×J×K`` raw intensities): per channel
    the mean and std (ddof 0) over cases of each case's nonzero-voxel mean."""
    per_channel: dict[str, list[float]] = {c: [] for c in channels}
    for images in cases:
        for name, mean in zip(channels, nonzero_means(np.asarray(images))):
            if mean is not None:
                per_channel[name].append(mean)
    table = {c: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n_cases": len(v)} for c, v in per_channel.items() if v}
    return {"statistic": CASE_MEAN_NONZERO, "channels": table}


def write_drift_reference(package_dir: Path, cases: Iterable[np.ndarray], channels: list[str]) -> Path:
    """Write ``drift_reference.json`` into a model package (call it when the package is written, on the training cases)."""
    return write_json(Path(package_dir) / DRIFT_REFERENCE_JSON, drift_reference_from_cases(cases, channels))
