"""Evaluation: segmentation metrics per label and region, and the evaluation report.

:mod:`medseg.evaluation.metrics` computes Dice, IoU, HD95, ASSD, sensitivity, specificity and volumes
(numpy/scipy only); :mod:`medseg.evaluation.report` evaluates a folder (or in-memory arrays) and
writes ``metrics.json``, ``per_case.csv``, ``report.md`` and ``dice_boxplot.png``.
"""

from medseg.evaluation.metrics import (
    HD95_PENALTY_MM,
    METRIC_NAMES,
    aggregate,
    average_surface_distance,
    dice,
    evaluate_case,
    evaluation_keys,
    hd95,
    iou,
    sensitivity,
    specificity,
    surface_distances,
    volume_ml,
)
from medseg.evaluation.report import evaluate_arrays, evaluate_folder, markdown_table

__all__ = [
    "HD95_PENALTY_MM",
    "METRIC_NAMES",
    "aggregate",
    "average_surface_distance",
    "dice",
    "evaluate_arrays",
    "evaluate_case",
    "evaluate_folder",
    "evaluation_keys",
    "hd95",
    "iou",
    "markdown_table",
    "sensitivity",
    "specificity",
    "surface_distances",
    "volume_ml",
]
