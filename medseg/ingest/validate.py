"""Case validation: read every file of a case and collect *all* its problems as (case, file, problem).

A case is checked completely rather than stopping at the first problem, so one run shows everything
to fix. :func:`check_case` keeps the arrays it read so ingest can write them without reading twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ValidationError
from medseg.ingest.adapters.base import Adapter, SourceCase, Volume
from medseg.io import AFFINE_ATOL_MM, nifti_spacing

logger = logging.getLogger(__name__)

Problem = tuple[str, str, str]  # (case id, file name, problem)


@dataclass
class CaseCheck:
    """The result of checking one case: its problems, and the volumes read (label already remapped)."""

    case: SourceCase
    problems: list[Problem] = field(default_factory=list)
    images: dict[str, Volume] = field(default_factory=dict)  # channel name → volume
    label: Volume | None = None  # uint8, canonical label values

    @property
    def ok(self) -> bool:
        return not self.problems


def check_case(case: SourceCase, adapter: Adapter, affine_atol: float = AFFINE_ATOL_MM) -> CaseCheck:
    """Read and check every file of ``case``; never raises for bad input, returns the problems."""
    check = CaseCheck(case=case)

    def report(file: Path | str, problem: str) -> None:
        check.problems.append((case.case_id, Path(file).name, problem))

    for file, problem in case.problems:  # found by the adapter while discovering the case
        report(file, problem)
    images = adapter.read_images(case, report)
    for channel in adapter.channel_names:
        volume = images.get(channel)
        if volume is None:
            continue
        _check_geometry(volume, report)
        _check_image_content(volume, report)
        check.images[channel] = volume

    raw_label: Volume | None = None
    if adapter.task == "segmentation":
        raw_label = adapter.read_label(case, report)
        if raw_label is not None:
            _check_geometry(raw_label, report)
            remapped = _check_and_remap_label(raw_label, adapter, report)
            if remapped is not None:
                check.label = Volume(remapped, raw_label.affine, raw_label.header, raw_label.source)
    elif case.class_label is not None and case.class_label not in adapter.labels:
        report(case.folder or case.case_id, f"class {case.class_label!r} outside the declared classes {sorted(adapter.labels)}")

    # Consistency between the files of the case, against the first readable channel.
    if check.images:
        ref_channel, ref = next(iter(check.images.items()))
        others = [v for ch, v in check.images.items() if ch != ref_channel]
        if raw_label is not None:
            others.append(raw_label)
        for volume in others:
            if volume.array.shape != ref.array.shape:
                report(volume.source, f"shape {_shape(volume)} differs from {ref_channel} {_shape(ref)}")
            diff = float(np.max(np.abs(volume.affine - ref.affine)))
            if not diff <= affine_atol:
                report(
                    volume.source,
                    f"affine differs from {ref_channel} by up to {diff:.4g} mm (tolerance {affine_atol:g} mm)",
                )
    return check


def find_duplicate_case_ids(cases: Iterable[SourceCase], src: Path | None = None) -> list[Problem]:
    """One row per copy of a case id found more than once (all copies are quarantined: ambiguous)."""
    cases = list(cases)
    counts = Counter(c.case_id for c in cases)
    rows: list[Problem] = []
    for case in cases:
        if counts[case.case_id] > 1:
            where = _relative(case.folder, src) if case.folder is not None else case.case_id
            rows.append((case.case_id, where, f"duplicate case id ({counts[case.case_id]} copies)"))
    return rows


def validate_dataset(cases: Iterable[SourceCase], adapter: Adapter, src: Path | None = None) -> list[Problem]:
    """All problems of a dataset (duplicates and every case), without keeping any array."""
    cases = list(cases)
    problems = find_duplicate_case_ids(cases, src)
    for case in cases:
        problems.extend(check_case(case, adapter).problems)
    return problems


def settle_problems(problems: list[Problem], n_valid_cases: int, strict: bool, src: Path | str) -> None:
    """Apply the policy: strict → raise with all rows; none valid → raise; otherwise warn with the table."""
    n_bad = len({case for case, _, _ in problems})
    if problems and strict:
        raise ValidationError(f"{src}: {len(problems)} problem(s) in {n_bad} case(s) (strict mode)", problems)
    if n_valid_cases == 0:
        raise ValidationError(f"{src}: no valid case left ({n_bad} case(s) with problems)", problems)
    if problems:
        logger.warning(
            "%d case(s) quarantined, %d problem(s):\n%s", n_bad, len(problems), format_problems(problems)
        )


def format_problems(problems: Iterable[Problem]) -> str:
    """The problems as an aligned text table (case | file | problem)."""
    rows = [("case", "file", "problem"), *problems]
    w_case = max(len(r[0]) for r in rows)
    w_file = max(len(r[1]) for r in rows)
    return "\n".join(f"  {c:<{w_case}} | {f:<{w_file}} | {p}" for c, f, p in rows)


# --------------------------------------------------------------------------- checks
def _check_geometry(volume: Volume, report: Reporter) -> None:
    spacing = np.asarray(nifti_spacing(volume.header), dtype=np.float64)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        report(volume.source, f"spacing {_fmt(spacing)} has zero, negative or non-finite values")
    # nibabel replaces a zero pixdim by 1 on load, so a zero spacing mostly shows in the affine.
    affine = volume.affine
    if not np.isfinite(affine).all():
        report(volume.source, "affine has non-finite values")
    else:
        axis_spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if (axis_spacing == 0).any() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
            report(volume.source, f"affine is singular (voxel spacing from affine {_fmt(axis_spacing)})")


def _check_image_content(volume: Volume, report: Reporter) -> None:
    lo, hi = volume.array.min(), volume.array.max()
    if lo == hi:
        if lo == 0:
            report(volume.source, "image is empty (all voxels are 0)")
        else:
            report(volume.source, f"image is constant (all voxels are {lo.item():g})")


def _check_and_remap_label(volume: Volume, adapter: Adapter, report: Reporter) -> np.ndarray | None:
    array = volume.array
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        examples = np.unique(array[array != np.round(array)])[:5]
        report(volume.source, f"label has non-integer values (e.g. {', '.join(f'{v:g}' for v in examples)})")
        return None
    values = {int(v) for v in np.unique(array)}
    declared = set(adapter.labels.values())
    # a layout may declare its source values outright (BraTS 2021: 0, 1, 2, 4 — a 3 there is an error)
    allowed = set(getattr(adapter, "source_label_values", None) or (declared | set(adapter.label_remap)))
    unknown = sorted(values - allowed)
    if unknown:
        report(
            volume.source,
            f"label values {unknown} outside the declared set {sorted(allowed)}",
        )
        return None
    labels = array.astype(np.int64)
    if adapter.label_remap:
        lookup = np.arange(max(allowed) + 1, dtype=np.int64)
        for source_value, canonical_value in adapter.label_remap.items():
            lookup[source_value] = canonical_value
        labels = lookup[labels]
    return labels.astype(np.uint8)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _shape(volume: Volume) -> str:
    return "×".join(str(n) for n in volume.array.shape)


def _relative(path: Path, src: Path | None) -> str:
    if src is not None:
        try:
            return str(path.relative_to(src))
        except ValueError:
            pass
    return str(path)
