"""Patient-level splits: a held-out test set, then k cross-validation folds over the rest.

Splitting by patient (not by case) keeps every timepoint of a patient on one side, so a model is never
validated or tested on a scan of someone it was trained on. The same inputs and seed give the same
splits on any machine (``random.Random`` over sorted ids, no dependence on numpy's generator).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

from medseg.errors import MedsegError
from medseg.schemas import Splits

logger = logging.getLogger(__name__)


def check_split_parameters(n_folds: int, test_fraction: float) -> None:
    """MedsegError for a fold count below 1 or a test fraction outside [0, 1)."""
    if n_folds < 1:
        raise MedsegError(f"number of folds must be at least 1, got {n_folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise MedsegError(f"test fraction must be in [0, 1), got {test_fraction}")


def make_splits(case_to_patient: dict[str, str], n_folds: int = 5, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Split cases by patient into ``test`` and ``folds`` ({train, val} case ids, sorted).

    The test set takes about ``test_fraction`` of the cases (whole patients; at least one when there
    are 3 or more patients and the fraction is above 0) and always leaves 2 patients for the folds.
    The folds use ``n_folds`` or the number of remaining patients if fewer (at least 2 when there are
    2 patients); patients go to the fold with fewest cases so folds stay balanced in cases.
    Too few patients: no test set below 3 patients; with 1 patient, one fold validating on its own
    training data. Each fallback is logged as a warning. ``Splits.n_folds`` is the number used.
    """
    check_split_parameters(n_folds, test_fraction)
    cases_of: dict[str, list[str]] = defaultdict(list)
    for case_id, patient_id in case_to_patient.items():
        cases_of[patient_id].append(case_id)
    patients = sorted(cases_of)
    random.Random(seed).shuffle(patients)
    n_cases = len(case_to_patient)

    def result(test: list[str], folds: list[dict[str, list[str]]]) -> Splits:
        return Splits(test=sorted(test), folds=folds, seed=seed, n_folds=len(folds), test_fraction=test_fraction)

    if not patients:
        logger.warning("no labelled case: empty splits")
        return result([], [])

    # Held-out test set: whole patients, in shuffled order, until the wanted number of cases.
    test_patients: list[str] = []
    if test_fraction > 0:
        if len(patients) < 3:
            logger.warning("only %d patient(s): no held-out test set", len(patients))
        else:
            wanted_cases = max(1, round(test_fraction * n_cases))
            taken_cases = 0
            for patient in patients:
                if taken_cases >= wanted_cases or len(patients) - len(test_patients) <= 2:
                    break
                test_patients.append(patient)
                taken_cases += len(cases_of[patient])
    test = [case for patient in test_patients for case in cases_of[patient]]
    remaining = patients[len(test_patients):]

    if len(remaining) == 1:
        logger.warning("only 1 patient for cross-validation: one fold that validates on its training data")
        only = sorted(cases_of[remaining[0]])
        return result(test, [{"train": only, "val": list(only)}])

    k = max(2, min(n_folds, len(remaining)))
    if k != n_folds:
        logger.warning("%d fold(s) asked, %d used (%d patients for cross-validation)", n_folds, k, len(remaining))

    # Largest patients first (stable: ties keep the shuffled order), each to the fold with fewest cases.
    fold_cases: list[list[str]] = [[] for _ in range(k)]
    for patient in sorted(remaining, key=lambda p: -len(cases_of[p])):
        smallest = min(range(k), key=lambda i: (len(fold_cases[i]), i))
        fold_cases[smallest].extend(cases_of[patient])
    all_cv = sorted(case for cases in fold_cases for case in cases)
    folds = []
    for val in fold_cases:
        val_set = set(val)
        folds.append({"train": [c for c in all_cv if c not in val_set], "val": sorted(val)})
    return result(test, folds)
