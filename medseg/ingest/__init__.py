"""Ingest stage: a source dataset folder → canonical nnU-Net v2 raw dataset + manifest + splits.

Source layouts are adapters (:mod:`medseg.ingest.adapters`); validation collects every problem as
(case, file, problem) rows (:mod:`medseg.ingest.validate`); splits are by patient
(:mod:`medseg.ingest.splits`); :func:`ingest` ties them together and writes atomically.
"""

from medseg.ingest.adapters import ADAPTERS, Adapter, BraTS2023Adapter, SourceCase, detect_format, get_adapter
from medseg.ingest.ingest import add_arguments, ingest, run
from medseg.ingest.splits import check_split_parameters, make_splits
from medseg.ingest.validate import (
    AFFINE_ATOL_MM,
    CaseCheck,
    Problem,
    check_case,
    find_duplicate_case_ids,
    format_problems,
    validate_dataset,
)

__all__ = [
    "ADAPTERS",
    "AFFINE_ATOL_MM",
    "Adapter",
    "BraTS2023Adapter",
    "CaseCheck",
    "Problem",
    "SourceCase",
    "add_arguments",
    "check_case",
    "check_split_parameters",
    "detect_format",
    "find_duplicate_case_ids",
    "format_problems",
    "get_adapter",
    "ingest",
    "make_splits",
    "run",
    "validate_dataset",
]
