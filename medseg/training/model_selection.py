"""Choosing the configuration by cross-validation, as nnU-Net's ``find_best_configuration`` does.

Every candidate configuration (``2d``, ``3d_fullres``, ``3d_cascade_fullres``...) is trained on the same folds. Each
fold's model predicts the validation cases of its own fold (out-of-fold predictions), in the input's own geometry
(:meth:`~medseg.inference.predictor.Predictor.original_probabilities`), so configurations on different grids are
scored, and averaged, on the same voxels. Candidates are scored by the mean Dice over the task's reported groups
(nnU-Net ranks by its foreground Dice), every single configuration and every pair (the mean of the two members'
probabilities); the best wins, a single configuration on a tie. The winner is:

- a single configuration: its model (a fold ensemble or one fold), as trained, with its own postprocessing;
- a pair: a configuration-ensemble package (:mod:`medseg.inference.configuration_ensemble`) of the two, with
  postprocessing chosen on the pair's out-of-fold predictions.

Probabilities are kept on disk (float16 ``.npy``, one file per configuration and case) while pairs are scored, so
memory does not grow with the number of cases.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.configuration_ensemble import MEMBERS_DIR
from medseg.inference.onnx_export import members_onnx
from medseg.inference.predictor import Predictor, grid_labels
from medseg.io import atomic_dir
from medseg.preprocessing.fingerprint import load_case
from medseg.task import CASCADE, Task

#: How the name of a pair reads (the ensemble package's ``configuration``).
PAIR_JOIN = "+"


def trained_configuration(package: schemas.ModelPackage) -> str:
    """What a package's configuration was trained as: a cascade's full-resolution stage counts as the cascade."""
    return CASCADE if package.previous_stage else package.configuration


def _fold(package: schemas.ModelPackage) -> int:
    fold = (package.training.get("config") or {}).get("fold")
    if fold is None:
        raise MedsegError("the model package records no fold (training.config.fold): cannot find its out-of-fold cases")
    return int(fold)


@dataclass
class Selection:
    """The outcome: ``scores`` maps each single configuration and pair (``a+b``) to its out-of-fold mean Dice,
    ``group_scores`` the same per reported group, ``chosen`` the winner's members (best first)."""

    scores: dict[str, float]
    group_scores: dict[str, dict[str, float]]
    chosen: list[str]
    n_cases: int
    folds: list[int]
    spacing: list[float] = field(default_factory=list)  # median input spacing of the scored cases (mm)

    @property
    def name(self) -> str:
        return PAIR_JOIN.join(self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.name, "members": list(self.chosen), "scores": dict(self.scores), "group_scores": dict(self.group_scores),
                "n_cases": self.n_cases, "folds": list(self.folds), "metric": "mean Dice over the reported groups, out-of-fold, input geometry",
                "rule": "nnU-Net find_best_configuration: every configuration and every pair; ties go to the single configuration"}


@dataclass
class _OutOfFold:
    """Where the out-of-fold predictions were kept: per case its reference (uint8 ``.npy``), its input spacing, and per
    configuration its probabilities (float16 ``.npy``)."""

    references: dict[str, Path]
    spacings: dict[str, list[float]]
    probabilities: dict[str, dict[str, Path]]  # configuration → case → file

    def probs(self, configuration: str, case_id: str) -> np.ndarray:
        return np.load(self.probabilities[configuration][case_id]).astype(np.float32)


def _out_of_fold(dataset_dir: Path, fold_packages: dict[str, list[Path]], store: Path, cases_per_fold: int | None, overlap: float, device: str,
                 progress: bool) -> _OutOfFold:
    """Fold by fold, every configuration's model of that fold predicts the fold's validation cases, each case read
    once for all of them; probabilities saved as float16 ``.npy``, the references as uint8."""
    dataset = schemas.DatasetJson.load(dataset_dir)
    splits = schemas.Splits.load(dataset_dir)
    by_fold: dict[int, dict[str, Path]] = {}
    for configuration, packages in fold_packages.items():
        for package_dir in packages:
            by_fold.setdefault(_fold(schemas.ModelPackage.load(package_dir)), {})[configuration] = package_dir
    found = _OutOfFold({}, {}, {c: {} for c in fold_packages})
    for folder in [store / "references", *(store / c for c in fold_packages)]:
        folder.mkdir(parents=True, exist_ok=True)
    for fold, packages in sorted(by_fold.items()):
        if not 0 <= fold < len(splits.folds):
            raise MedsegError(f"the model was trained on fold {fold}, which the splits do not have", next(iter(packages.values())))
        predictors = {c: Predictor.from_package(p, device=device, overlap=overlap) for c, p in packages.items()}
        for case_id in tqdm(list(splits.folds[fold]["val"])[:cases_per_fold], desc=f"out-of-fold fold {fold}", disable=not progress):
            images, ref, affine, spacing = load_case(dataset_dir, case_id, len(dataset.channel_names))
            found.references[case_id] = store / "references" / f"{case_id}.npy"
            np.save(found.references[case_id], ref)
            found.spacings[case_id] = [float(s) for s in spacing]
            for configuration, predictor in predictors.items():
                path = store / configuration / f"{case_id}.npy"
                np.save(path, predictor.original_probabilities(images, affine, spacing).astype(np.float16))
                found.probabilities[configuration][case_id] = path
    return found


def _case_dice(probs: np.ndarray, ref: np.ndarray, regions: dict[str, list[int]], labels: list[int], groups: dict[str, list[int]]) -> dict[str, float]:
    from medseg.evaluation.metrics import dice

    pred = grid_labels(probs, regions, labels)
    return {name: float(dice(np.isin(pred, values), np.isin(ref, values))) for name, values in groups.items()}


def select_configuration(dataset_dir: str | Path, fold_packages: dict[str, list[Path]], work_dir: str | Path, cases_per_fold: int | None = None,
                         overlap: float = 0.5, device: str = "auto", pairs: bool = True, progress: bool = True) -> tuple[Selection, list[tuple[np.ndarray, np.ndarray]]]:
    """Score every configuration of ``fold_packages`` (configuration → its single-fold packages, the same folds for
    each) and every pair on their out-of-fold predictions; returns the selection and the winner's out-of-fold
    ``(prediction, reference)`` label maps (input geometry, for its postprocessing).

    Args:
        dataset_dir: the ingested dataset (``dataset.json``, ``splits.json``, ``imagesTr``, ``labelsTr``).
        work_dir: where the probabilities are kept while scoring (removed by the caller).
        cases_per_fold: at most this many validation cases per fold (None: all).

    Raises:
        MedsegError: fewer than two configurations, configurations trained on different folds, a classifier.
    """
    dataset_dir, work_dir = Path(dataset_dir), Path(work_dir)
    if len(fold_packages) < 2:
        raise MedsegError(f"choosing a configuration needs at least two, got {', '.join(fold_packages) or 'none'}")
    fold_sets = {c: sorted(_fold(schemas.ModelPackage.load(p)) for p in paths) for c, paths in fold_packages.items()}
    if len({tuple(v) for v in fold_sets.values()}) != 1:
        raise MedsegError(f"the candidate configurations were trained on different folds ({fold_sets}): compare them on the same folds")
    task = Task.from_folder(dataset_dir)
    if task.is_classification:
        raise MedsegError("classifiers have one configuration: nothing to choose")
    dataset = schemas.DatasetJson.load(dataset_dir)
    first = schemas.ModelPackage.load(next(iter(fold_packages.values()))[0])
    regions = {str(k): [int(v) for v in vs] for k, vs in (first.network.get("regions") or {}).items()} if first.network.get("output") == "regions" else {}
    labels, groups = dataset.label_values, task.reported_groups
    saved = _out_of_fold(dataset_dir, fold_packages, work_dir / "out_of_fold", cases_per_fold, overlap, device, progress)
    case_ids = sorted(saved.references)
    if not case_ids:
        raise MedsegError("no out-of-fold cases to score the configurations on (the folds have no validation cases)", dataset_dir / schemas.SPLITS_JSON)
    candidates = [[c] for c in fold_packages] + ([list(p) for p in itertools.combinations(fold_packages, 2)] if pairs else [])
    per_case: dict[str, list[dict[str, float]]] = {PAIR_JOIN.join(c): [] for c in candidates}
    for case_id in tqdm(case_ids, desc="score configurations", disable=not progress):
        ref = np.load(saved.references[case_id])
        probs = {c: saved.probs(c, case_id) for c in fold_packages}
        for members in candidates:
            mean = probs[members[0]] if len(members) == 1 else np.mean([probs[m] for m in members], axis=0)
            per_case[PAIR_JOIN.join(members)].append(_case_dice(mean, ref, regions, labels, groups))
    group_scores = {name: {g: float(np.mean([case[g] for case in cases])) for g in groups} for name, cases in per_case.items()}
    scores = {name: float(np.mean(list(g.values()))) for name, g in group_scores.items()}
    # the best score; among equals the single configuration listed first (fewer networks to run)
    best = max(candidates, key=lambda c: (round(scores[PAIR_JOIN.join(c)], 6), -len(c), -candidates.index(c)))
    chosen = sorted(best, key=lambda c: -scores[c])  # the better member first: its plan and grid describe the package
    selection = Selection(scores=scores, group_scores=group_scores, chosen=chosen, n_cases=len(case_ids), folds=next(iter(fold_sets.values())),
                          spacing=[float(s) for s in np.median(np.array([saved.spacings[c] for c in case_ids]), axis=0)])
    winner_pairs = [(grid_labels(np.mean([saved.probs(c, case_id) for c in chosen], axis=0), regions, labels), np.load(saved.references[case_id]))
                    for case_id in case_ids]
    return selection, winner_pairs


def save_configuration_ensemble(model_dir: str | Path, members: dict[str, Path], selection: Selection, postprocessing: dict[str, Any] | None = None) -> Path:
    """The configuration-ensemble package of ``members`` (configuration → its model package, best first) at
    ``model_dir`` (written to a temporary folder, then renamed).

    Raises:
        MedsegError: fewer than two members, members of other tasks or outputs.
    """
    if len(members) < 2:
        raise MedsegError("a configuration ensemble needs at least two member packages")
    packages = {c: schemas.ModelPackage.load(p) for c, p in members.items()}
    names = list(members)
    first_dir, first = members[names[0]], packages[names[0]]
    for name in names[1:]:
        other = packages[name]
        if other.network.get("output", "labels") != first.network.get("output", "labels") or other.network.get("regions") != first.network.get("regions"):
            raise MedsegError(f"member {name} predicts other outputs than {names[0]}", members[name])
        if schemas.DatasetJson.load(members[name]).to_dict() != schemas.DatasetJson.load(first_dir).to_dict():
            raise MedsegError(f"member {name} was trained on another dataset.json than {names[0]}", members[name])
    described = [{"configuration": c, "package": f"{MEMBERS_DIR}/{c}", "cv_score": selection.scores.get(c), "folds": packages[c].training.get("folds"),
                  "mlflow_run_id": packages[c].training.get("mlflow_run_id")} for c in names]
    training = {"config": dict(first.training.get("config") or {}), "val_metric": first.training.get("val_metric"), "folds": selection.folds,
                "configuration_selection": selection.to_dict()}
    onnx = members_onnx({c: dict(packages[c].onnx or {"reason": "written before the export existed"}) for c in names})
    with atomic_dir(Path(model_dir)) as tmp:
        for c in names:
            shutil.copytree(members[c], tmp / MEMBERS_DIR / c)
        for name in (schemas.PLANS_JSON, schemas.DATASET_JSON, schemas.FINGERPRINT_JSON):
            if (first_dir / name).is_file():
                shutil.copy2(first_dir / name, tmp / name)
        schemas.ModelPackage(configuration=selection.name, network=dict(first.network), medseg_version=medseg.__version__, training=training,
                             lineage=dict(first.lineage), postprocessing=dict(postprocessing or {}), weights_file="", onnx=onnx,
                             configuration_ensemble=described).save(tmp)
    return Path(model_dir)


__all__ = ["PAIR_JOIN", "Selection", "save_configuration_ensemble", "select_configuration", "trained_configuration"]
