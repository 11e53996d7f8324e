"""Validation during training and the postprocessing chosen on it.

Segmentation: sliding-window inference (the predictor's own, :mod:`medseg.inference.predictor`) on the fold's
validation cases on the preprocessed grid, Dice per reported group (empty vs empty: 1). Classification: whole-volume
class probabilities, the confusion matrix and cross-entropy, summed so DDP ranks can add theirs. Postprocessing
(minimum component volumes, the small-enhancing-tumour rule where the task has it) is chosen on validation
predictions, scored as the task says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medseg import schemas
from medseg.inference.predictor import class_probabilities, grid_labels, grid_probabilities
from medseg.preprocessing.classifier_input import fit_volume
from medseg.task import Task
from medseg.training.sampler import PreprocessedCase, VolumeCase
from medseg.training.setup import TrainingTarget


def _plan_task(plans: schemas.Plans) -> Task:
    """The task of a segmentation plan (its labels and regions), for callers that have no dataset.json at hand."""
    return Task(schemas.DatasetJson(name=plans.dataset_name, channel_names={str(i): c for i, c in enumerate(plans.channel_names)},
                                    labels=dict(plans.labels), numTraining=0, regions=dict(plans.regions)))


def _reported_groups(plans: schemas.Plans) -> dict[str, list[int]]:
    return _plan_task(plans).reported_groups


def validation_sums(network: torch.nn.Module, cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], overlap: float, device: torch.device,
                    regions: dict[str, list[int]] | None = None, groups: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Per region (or label) the sum of the cases' Dice on the preprocessed grid (empty vs empty: 1).

    ``regions`` (name → labels, in output-channel order): the network has one sigmoid output per region and
    region r is predicted where its probability is > 0.5 (nnU-Net's region-based validation); otherwise the
    outputs are a softmax over the labels and each reported group (``groups``, default the plan's regions or each
    foreground label: :attr:`medseg.task.Task.reported_groups`) is read from the arg-max.
    """
    groups = dict(regions) if regions else (groups or _reported_groups(plans))
    sums = {name: 0.0 for name in groups}
    for case in cases:
        probs = grid_probabilities(network, np.asarray(case.data), patch_size, "regions" if regions else "labels", overlap=overlap, device=device)
        ref = np.asarray(case.seg)
        pred = None if regions else np.argmax(probs, axis=0)
        for i, (name, values) in enumerate(groups.items()):
            p = probs[i] > 0.5 if regions else np.isin(pred, values)
            r = np.isin(ref, values)
            denom = p.sum() + r.sum()
            sums[name] += 1.0 if denom == 0 else 2.0 * np.logical_and(p, r).sum() / denom
    return sums


def validation_dice(network: torch.nn.Module, cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], overlap: float, device: torch.device,
                    regions: dict[str, list[int]] | None = None, groups: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Mean Dice per region (or per label when the dataset has no regions) on the preprocessed grid."""
    sums = validation_sums(network, cases, plans, patch_size, overlap, device, regions, groups)
    return {name: s / max(len(cases), 1) for name, s in sums.items()}


def validation_pairs(network: torch.nn.Module, cases: list[PreprocessedCase], patch_size: list[int], overlap: float, device: torch.device,
                     regions: dict[str, list[int]] | None = None, labels: list[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) uint8 label maps of ``cases`` on the preprocessed grid; with ``regions`` the
    network's region outputs are turned into labels (:func:`~medseg.task.regions_to_labels`)."""
    output = "regions" if regions else "labels"
    return [(grid_labels(grid_probabilities(network, np.asarray(c.data), patch_size, output, overlap=overlap, device=device), regions, labels),
             np.asarray(c.seg).astype(np.uint8)) for c in cases]


def classification_sums(network: torch.nn.Module, cases: list[VolumeCase], task: TrainingTarget, device: torch.device) -> dict[str, float]:
    """Sums over ``cases`` (so ranks can add theirs): the confusion matrix (``cm_<true>_<pred>``, class
    indices) and the cross-entropy (``loss``, natural log) of the classifier's whole-volume predictions."""
    n = len(task.classes)
    sums = {f"cm_{i}_{j}": 0.0 for i in range(n) for j in range(n)}
    sums["loss"] = 0.0
    for case in cases:
        x = fit_volume(case.data, task.input_size, task.input_scale)[None]
        probs = class_probabilities(network, x, np.array([case.age], np.float32) if task.use_age else None, device)[0]
        sums[f"cm_{case.target}_{int(np.argmax(probs))}"] += 1.0
        sums["loss"] -= float(np.log(max(float(probs[case.target]), 1e-12)))
    return sums


def classification_scores(sums: dict[str, float], n_classes: int, n_cases: float) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and mean cross-entropy from
    :func:`classification_sums` (added over ranks)."""
    cm = np.array([[sums[f"cm_{i}_{j}"] for j in range(n_classes)] for i in range(n_classes)])
    support = cm.sum(axis=1)
    present = support > 0
    return {"val_accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan"),
            "val_balanced_accuracy": float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan"),
            "val_loss": float(sums["loss"] / n_cases) if n_cases else float("nan")}


def postprocessing_from_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], plans: schemas.Plans, spacing: list[float], task: Task | None = None) -> dict[str, Any]:
    """Minimum component volume per label (mm³, so it carries over to any grid) chosen on validation
    predictions. Scored by the task's postprocessing metric (:attr:`medseg.task.Task.postprocessing_metric`: the
    official lesion-wise Dice where the task has a lesion-wise setting, else Dice over the reported groups)."""
    from medseg.evaluation.lesionwise import lesionwise_case
    from medseg.evaluation.metrics import dice
    from medseg.inference.postprocess import choose_enhancing_threshold, choose_min_volumes, remove_small_components

    if not pairs:
        return {}
    task = task or _plan_task(plans)
    groups = task.reported_groups
    setting = task.lesionwise
    if setting is not None:
        metric = task.postprocessing_metric

        def score(pred: np.ndarray, ref: np.ndarray) -> float:
            per_region = lesionwise_case(pred, ref, spacing, setting)
            return float(np.mean([v[metric] for v in per_region.values()]))
    else:
        metric = "dice"

        def score(pred: np.ndarray, ref: np.ndarray) -> float:
            return float(np.mean([dice(np.isin(pred, vals), np.isin(ref, vals)) for vals in groups.values()]))

    labels = sorted(v for v in plans.labels.values() if v != 0)
    chosen, before, after = choose_min_volumes(pairs, spacing, labels, score)
    post: dict[str, Any] = {"min_volume_mm3": chosen, "metric": metric, "validation_cases": len(pairs), "score_before": before, "score_after": after}
    pair = task.enhancing_pair
    if pair is not None:  # the "small enhancing tumour is necrosis" rule, its threshold chosen here too
        cleaned = [(remove_small_components(p, chosen, spacing) if chosen else p, r) for p, r in pairs]
        voxels, et_before, et_after = choose_enhancing_threshold(cleaned, *pair)
        # stored in mm³ so the Predictor applies it on any input grid
        post["et_to_netc_below_mm3"] = float(voxels * np.prod(spacing))
        post["et_rule"] = {"voxels_at_training_spacing": int(voxels), "et_dice_before": et_before, "et_dice_after": et_after}
    return post


def choose_postprocessing(network: torch.nn.Module, state: dict[str, torch.Tensor], cases: list[PreprocessedCase], plans: schemas.Plans, patch_size: list[int], spacing: list[float], overlap: float, device: torch.device,
                          regions: dict[str, list[int]] | None = None, task: Task | None = None) -> dict[str, Any]:
    """:func:`postprocessing_from_pairs` on the validation cases predicted with ``state`` (loaded into ``network``)."""
    if not cases:
        return {}
    network.load_state_dict(state)
    labels = sorted(int(v) for v in plans.labels.values())
    return postprocessing_from_pairs(validation_pairs(network, cases, patch_size, overlap, device, regions, labels), plans, spacing, task)


__all__ = ["choose_postprocessing", "classification_scores", "classification_sums", "postprocessing_from_pairs", "validation_dice", "validation_pairs",
           "validation_sums"]
