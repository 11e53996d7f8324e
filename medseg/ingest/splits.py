"""Patient-level splits: a held-out test set, then k cross-validation folds over the rest.

Splitting by patient (not by case) keeps every timepoint of a patient on one side, so a model is never
validated or tested on a scan of someone it was trained on. Each patient's place comes from a hash of
its id and the seed, so the same inputs give the same splits on any machine, and adding patients to a
dataset does not reshuffle the others.
"""

from __future__ import annotations

import logging
import hashlib
from collections import defaultdict
from collections.abc import Mapping

from medseg.errors import MedsegError
from medseg.schemas import Splits

logger = logging.getLogger(__name__)


def check_split_parameters(n_folds: int, test_fraction: float) -> None:
    """MedsegError for a fold count below 1 or a test fraction outside [0, 1)."""
    if n_folds < 1:
        raise MedsegError(f"number of folds must be at least 1, got {n_folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise MedsegError(f"test fraction must be in [0, 1), got {test_fraction}")


def patient_hash(seed: int, purpose: str, patient_id: str) -> float:
    """A number in [0, 1) fixed by (seed, purpose, patient id) alone: sha256, so the same on any machine."""
    digest = hashlib.sha256(f"{seed}\0{purpose}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def make_splits(
    case_to_patient: Mapping[str, str],
    n_folds: int = 5,
    test_fraction: float = 0.2,
    seed: int = 0,
    case_to_stratum: Mapping[str, str] | None = None,
) -> Splits:
    """Split cases by patient into ``test`` and ``folds`` ({train, val} case ids, sorted).

    Each patient draws two numbers from a hash of (seed, patient id), fixed whatever the other
    patients are. The ``round(test_fraction × patients)`` patients with the lowest first number form the
    held-out test set; the rest, ordered by the second number, are cut into ``k`` contiguous blocks of
    equal size (± 1), one validation fold each. Sizes are therefore exact, and adding a patient never
    reshuffles the others: the newcomer takes its place in the two orders, which moves at most one
    patient across the test boundary and at most one across each fold boundary (a random permutation
    per dataset, as k-fold shuffling does, would move almost everyone).

    ``case_to_stratum`` (e.g. the class of a classification case) stratifies: the above is done within
    each stratum, so every class is in the test set and the folds in proportion.

    Small datasets, each logged as a warning: no test set below 3 patients, at least 2 patients left
    for cross-validation, ``k = min(n_folds, patients left)`` folds (at least 2 with 2 patients; with
    1 patient one fold validating on its own training data).
    """
    check_split_parameters(n_folds, test_fraction)
    cases_of: dict[str, list[str]] = defaultdict(list)
    for case_id, patient_id in case_to_patient.items():
        cases_of[patient_id].append(case_id)
    patients = sorted(cases_of)
    stratum_of = _patient_strata(cases_of, case_to_stratum)
    u_test = {p: patient_hash(seed, "test", p) for p in patients}
    u_fold = {p: patient_hash(seed, "fold", p) for p in patients}
    groups = _group(patients, stratum_of)

    def result(test: set[str], folds: list[dict[str, list[str]]]) -> Splits:
        test_cases = sorted(c for p in test for c in cases_of[p])
        return Splits(
            test=test_cases, folds=folds, seed=seed, n_folds=len(folds), test_fraction=test_fraction,
            method="patient-hash-rank", stratified=case_to_stratum is not None,
        )

    if not patients:
        logger.warning("no labelled case: empty splits")
        return result(set(), [])

    test: set[str] = set()
    if test_fraction > 0:
        if len(patients) < 3:
            logger.warning("only %d patient(s): no held-out test set", len(patients))
        else:
            for members in groups.values():
                by_hash = sorted(members, key=u_test.__getitem__)
                test.update(by_hash[: round(test_fraction * len(members))])
            if not test:  # every stratum too small for its share: hold out the lowest-hash patient
                test.add(min(patients, key=u_test.__getitem__))
            while len(patients) - len(test) < 2:
                test.remove(max(test, key=u_test.__getitem__))
    remaining = [p for p in patients if p not in test]

    if len(remaining) == 1:
        logger.warning("only 1 patient for cross-validation: one fold that validates on its training data")
        only = sorted(cases_of[remaining[0]])
        return result(test, [{"train": only, "val": list(only)}])

    k = max(2, min(n_folds, len(remaining)))
    if k != n_folds:
        logger.warning("%d fold(s) asked, %d used (%d patients for cross-validation)", n_folds, k, len(remaining))
    fold_of: dict[str, int] = {}
    offset = 0  # strata start where the previous one ended, so small strata do not all fill fold 0
    for stratum in sorted(groups):
        members = sorted((p for p in groups[stratum] if p not in test), key=u_fold.__getitem__)
        for i, p in enumerate(members):
            fold_of[p] = (offset + i * k // len(members)) % k
        offset += len(members)

    all_cv = sorted(c for p in remaining for c in cases_of[p])
    folds = []
    for fold in range(k):
        val = sorted(c for p in remaining if fold_of[p] == fold for c in cases_of[p])
        val_set = set(val)
        folds.append({"train": [c for c in all_cv if c not in val_set], "val": val})
    if any(not f["val"] for f in folds):
        logger.warning("a fold has no validation patient (%d patients in %d strata)", len(remaining), len(groups))
    return result(test, folds)


def _patient_strata(cases_of: Mapping[str, list[str]], case_to_stratum: Mapping[str, str] | None) -> dict[str, str]:
    """Stratum of each patient: that of its first case (sorted); one stratum when none is given."""
    if case_to_stratum is None:
        return {p: "" for p in cases_of}
    return {p: str(case_to_stratum.get(sorted(cases)[0], "")) for p, cases in cases_of.items()}


def _group(patients: list[str], stratum_of: Mapping[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for p in patients:
        groups[stratum_of[p]].append(p)
    return dict(groups)
