"""Evaluation: segmentation and classification metrics, and the evaluation report.

* :mod:`medseg.evaluation.metrics`: Dice, IoU, HD95, ASSD, sensitivity, specificity and volumes per
  label and region (numpy/scipy only);
* :mod:`medseg.evaluation.lesionwise`: the BraTS 2023 / 2024 lesion-wise Dice and HD95;
* :mod:`medseg.evaluation.panoptic`: instance matching and panoptica's SQ / RQ / PQ;
* :mod:`medseg.evaluation.report`: evaluates a folder (or in-memory arrays) and writes ``metrics.json``,
  ``per_case.csv``, ``cases.csv``, ``report.md``, ``report.html`` and ``dice_boxplot.png``
  (:mod:`medseg.evaluation.report_html` builds the HTML page);
* :mod:`medseg.evaluation.classification`: accuracy, balanced accuracy, one-vs-rest ROC-AUC and the
  classification report;
* :mod:`medseg.evaluation.stage`: the pipeline's evaluate stage (predict, then score).
"""

from medseg.evaluation.classification import evaluate_classification
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
from medseg.evaluation.panoptic import PANOPTIC_NAMES, panoptic_scores
from medseg.evaluation.report import evaluate_arrays, evaluate_folder, markdown_table, write_report

__all__ = [
    "HD95_PENALTY_MM",
    "METRIC_NAMES",
    "PANOPTIC_NAMES",
    "aggregate",
    "average_surface_distance",
    "dice",
    "evaluate_arrays",
    "evaluate_case",
    "evaluate_classification",
    "evaluate_folder",
    "evaluation_keys",
    "hd95",
    "iou",
    "markdown_table",
    "panoptic_scores",
    "sensitivity",
    "specificity",
    "surface_distances",
    "volume_ml",
    "write_report",
]
