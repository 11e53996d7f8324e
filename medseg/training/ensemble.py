"""Cross-validation ensembles: the folds' networks in one model package, their probabilities averaged at inference.

An ensemble package is an ordinary model package folder whose ``model_package.json`` lists its members::

    model/
      model_package.json   weights_file: weights_fold0.pt (the first member: a loader that knows
                           nothing of ensembles still gets a working single model)
                           training.ensemble: {combine: mean_softmax | mean_sigmoid, weights_files: [...], members: [...]}
      weights_fold0.pt … weights_foldK.pt   one state_dict per fold, same network
      plans.json, dataset.json

:func:`load_network` turns any package into one ``nn.Module``: the network itself for a single model, an
:class:`EnsembleNetwork` for several members. The ensemble returns the log of the members' mean softmax, so
whatever applies a softmax to a network's output (the sliding window, mirroring) gets the mean softmax back
within each window, with no change of its own. Region packages (``network.output == "regions"``: one sigmoid
output per region, BraTS region-based training) average the members' sigmoid probabilities instead and return
their logit, so a sigmoid of the output is the mean probability.

What a package's outputs mean is recorded in its ``network`` entry (:func:`network_output`): ``output``
``"labels"`` (softmax over the label values; the default of older packages), ``"regions"`` (one sigmoid per
region of ``network.regions``, name → labels, in channel order) or ``"classes"`` (one softmax over
``network.classes`` per case, a classifier).

Postprocessing of an ensemble is chosen as nnU-Net chooses it: on the pooled out-of-fold predictions, every
validation case predicted by the fold that did not train on it (:func:`cross_validation_postprocessing`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.package import (COMBINE, OUTPUTS, EnsembleNetwork, combine_rule, is_ensemble, load_member_states, load_network, member_weights,  # noqa: F401  (re-exported)
                                     network_output, network_patch_size)



def _fold_of(package: schemas.ModelPackage, default: int) -> int:
    return int(package.training.get("config", {}).get("fold", default))


def save_ensemble_package(model_dir: str | Path, members: list[str | Path], training: dict[str, Any] | None = None,
                          postprocessing: dict[str, Any] | None = None, lineage: dict[str, str] | None = None) -> Path:
    """Combine single-fold model packages (``members``: their folders) into one ensemble package.

    The members must share configuration, network and plans (one preprocessing); their folds must differ.
    ``training`` is merged into the package's ``training`` beside the ``ensemble`` description.

    Raises:
        MedsegError: fewer than one member, members that do not fit together, a repeated fold.
    """
    from medseg.io import atomic_dir, read_json

    if not members:
        raise MedsegError("an ensemble needs at least one member package")
    members = [Path(m) for m in members]
    packages = [schemas.ModelPackage.load(m) for m in members]
    first, first_dir = packages[0], members[0]
    plans = read_json(first_dir / schemas.PLANS_JSON)
    for folder, package in zip(members[1:], packages[1:]):
        if package.configuration != first.configuration or package.network != first.network:
            raise MedsegError(f"member {folder} has another configuration or network than {first_dir}")
        if read_json(folder / schemas.PLANS_JSON) != plans:
            raise MedsegError(f"member {folder} was trained on other plans than {first_dir}")
        if is_ensemble(package):
            raise MedsegError(f"member {folder} is an ensemble already")
    folds = [_fold_of(p, i) for i, p in enumerate(packages)]
    if len(set(folds)) != len(folds):
        raise MedsegError(f"ensemble members must come from different folds, got folds {folds}")

    names = [schemas.FOLD_WEIGHTS_PATTERN.format(fold=f) for f in folds]
    score = "best_val_balanced_accuracy" if network_output(first.network) == "classes" else "best_val_dice"
    described = [{"fold": f, "weights_file": n, "source": str(m), score: p.training.get(score), "best_epoch": p.training.get("best_epoch"),
                  "mlflow_run_id": p.training.get("mlflow_run_id")} for f, n, m, p in zip(folds, names, members, packages)]
    val = [d[score] for d in described if isinstance(d[score], (int, float))]
    info = {"ensemble": {"combine": combine_rule(first.network), "weights_files": names, "members": described}, "folds": folds,
            "config": dict(first.training.get("config", {})), f"mean_fold_{score[len('best_'):]}": float(np.mean(val)) if val else None, **(training or {})}
    with atomic_dir(Path(model_dir)) as tmp:
        for folder, package, name in zip(members, packages, names):
            shutil.copy2(folder / package.weights_file, tmp / name)
        shutil.copy2(first_dir / schemas.PLANS_JSON, tmp / schemas.PLANS_JSON)
        shutil.copy2(first_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        if (first_dir / schemas.FINGERPRINT_JSON).is_file():  # the model server's input-drift reference
            shutil.copy2(first_dir / schemas.FINGERPRINT_JSON, tmp / schemas.FINGERPRINT_JSON)
        schemas.ModelPackage(configuration=first.configuration, network=first.network, medseg_version=medseg.__version__, training=info,
                             lineage=dict(lineage or first.lineage), postprocessing=dict(postprocessing or {}), weights_file=names[0]).save(tmp)
        histories = {f"fold {f}": list(p.training.get("history") or []) for f, p in zip(folds, packages)}
        if any(histories.values()):  # every fold's curves in one picture
            from medseg.training.checkpointing import write_training_curves

            best = {f"fold {f}": int(p.training["best_epoch"]) for f, p in zip(folds, packages) if isinstance(p.training.get("best_epoch"), int)}
            write_training_curves(tmp, {**info, "val_metric": first.training.get("val_metric")}, histories, best)
        # the ensemble as one ONNX graph (its members' mean, as EnsembleNetwork computes it) for the torch-free server
        from medseg.inference.onnx_export import write_onnx

        write_onnx(tmp)
    return Path(model_dir)


def cross_validation_postprocessing(preprocessed_dir: str | Path, members: list[str | Path], max_val_cases: int = 8, overlap: float = 0.25,
                                    device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, float]]:
    """Postprocessing chosen on the out-of-fold predictions of ``members`` (single-fold packages), and the
    cross-validation Dice per region (or label) of those predictions (before postprocessing).

    Each member predicts the first ``max_val_cases`` validation cases of its own fold (preprocessed grid).
    """
    from medseg.evaluation.metrics import dice
    from medseg.training.sampler import PreprocessedCase
    from medseg.task import Task
    from medseg.training.validation import postprocessing_from_pairs, validation_pairs

    preprocessed_dir, device = Path(preprocessed_dir), torch.device(device)
    plans, splits = schemas.Plans.load(preprocessed_dir), schemas.Splits.load(preprocessed_dir)
    task = Task.from_folder(preprocessed_dir)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    configuration = None
    for i, folder in enumerate(members):
        package = schemas.ModelPackage.load(folder)
        configuration = package.configuration
        fold = _fold_of(package, i)
        if not 0 <= fold < len(splits.folds):
            raise MedsegError(f"member {folder} was trained on fold {fold}, which {preprocessed_dir / schemas.SPLITS_JSON} does not have")
        cases = [PreprocessedCase(preprocessed_dir / package.configuration, c) for c in splits.folds[fold]["val"][:max_val_cases]]
        network = load_network(folder, package, device)
        regions = package.network.get("regions") if network_output(package.network) == "regions" else None
        pairs += validation_pairs(network, cases, network_patch_size(package, plans), overlap, device, regions,
                                  sorted(int(v) for v in plans.labels.values()))
    if not pairs or configuration is None:
        return {}, {}
    groups = task.reported_groups
    cv_dice = {name: float(np.mean([dice(np.isin(p, v), np.isin(r, v)) for p, r in pairs])) for name, v in groups.items()}
    post = postprocessing_from_pairs(pairs, plans, list(plans.configuration(configuration).spacing), task)
    if post:
        post["chosen_on"] = "out-of-fold predictions of the cross-validation"
    return post, cv_dice


def cross_validation_classification(preprocessed_dir: str | Path, members: list[str | Path], device: torch.device | str = "cpu",
                                    dataset_dir: str | Path | None = None) -> dict[str, float]:
    """Out-of-fold accuracy, balanced accuracy and cross-entropy of classifier packages ``members`` (single
    folds): every validation case predicted by the fold that did not train on it."""
    from medseg.training.setup import TrainingTarget, classification_targets, volume_cases
    from medseg.training.validation import classification_scores, classification_sums

    preprocessed_dir, device = Path(preprocessed_dir), torch.device(device)
    splits = schemas.Splits.load(preprocessed_dir)
    targets = classification_targets(preprocessed_dir, Path(dataset_dir) if dataset_dir else None)
    totals: dict[str, float] = {}
    n_cases, n_classes = 0, 0
    for i, folder in enumerate(members):
        package = schemas.ModelPackage.load(folder)
        opts = package.network.get("options") or {}
        task = TrainingTarget("classes", classes=list(package.network.get("classes") or []), input_size=list(opts["input_size"]),
                     input_scale=float(opts.get("input_scale") or 1.0), use_age=bool(opts.get("use_age")))
        n_classes = len(task.classes)
        cases = volume_cases(preprocessed_dir / package.configuration, splits.folds[_fold_of(package, i)]["val"], task, targets)
        for k, v in classification_sums(load_network(folder, package, device), cases, task, device).items():
            totals[k] = totals.get(k, 0.0) + v
        n_cases += len(cases)
    return {k[len("val_"):]: v for k, v in classification_scores(totals, n_classes, n_cases).items()} if n_cases else {}


__all__ = ["EnsembleNetwork", "combine_rule", "cross_validation_classification", "cross_validation_postprocessing", "is_ensemble", "load_member_states", "load_network", "member_weights", "network_output", "save_ensemble_package"]
