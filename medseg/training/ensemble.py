"""Cross-validation ensembles: the folds' networks in one model package, their softmax averaged at inference.

An ensemble package is an ordinary model package folder whose ``model_package.json`` lists its members::

    model/
      model_package.json   weights_file: weights_fold0.pt (the first member: a loader that knows
                           nothing of ensembles still gets a working single model)
                           training.ensemble: {combine: mean_softmax, weights_files: [...], members: [...]}
      weights_fold0.pt … weights_foldK.pt   one state_dict per fold, same network
      plans.json, dataset.json

:func:`load_network` turns any package into one ``nn.Module``: the network itself for a single model, an
:class:`EnsembleNetwork` for several members. The ensemble returns the log of the members' mean softmax, so
whatever applies a softmax to a network's output (the sliding window, mirroring) gets the mean softmax back
within each window, with no change of its own.

Postprocessing of an ensemble is chosen as nnU-Net chooses it: on the pooled out-of-fold predictions, every
validation case predicted by the fold that did not train on it (:func:`cross_validation_postprocessing`).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medseg
from medseg import schemas
from medseg.errors import MedsegError
from medseg.training.network import build_network

COMBINE = "mean_softmax"


def member_weights(package: schemas.ModelPackage) -> list[str]:
    """The weights files of a package's members (one for a single model), relative to its folder."""
    ensemble = package.training.get("ensemble") or {}
    return list(ensemble.get("weights_files") or []) or [package.weights_file]


def is_ensemble(package: schemas.ModelPackage) -> bool:
    return len(member_weights(package)) > 1


class EnsembleNetwork(nn.Module):
    """Several networks of one topology as one: ``forward`` returns log(mean of the members' softmax).

    A softmax over the class axis of the output gives the members' mean probabilities back
    (softmax(log p) = p / Σp = p). Deep-supervision outputs (N×S×K×… or a list) are reduced to the full
    resolution head first, as at inference.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for member in self.members:
            out = member(x)
            if isinstance(out, (list, tuple)):
                out = out[0]
            elif out.ndim == x.ndim + 1:
                out = out[:, 0]
            probs = torch.softmax(out.float(), dim=1)
            total = probs if total is None else total + probs
        assert total is not None
        return torch.log((total / len(self.members)).clamp_min(torch.finfo(torch.float32).tiny))


def _load_state(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a state_dict of tensors, never arbitrary pickled code
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise MedsegError("weights file not found", path) from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:  # corrupt file, or not a state_dict
        raise MedsegError(f"cannot load the weights ({str(exc).splitlines()[0][:200]})", path) from None


def load_network(model_dir: str | Path, package: schemas.ModelPackage, device: torch.device | str = "cpu") -> nn.Module:
    """The package's network with its weights, in eval mode on ``device``: a single network, or an
    :class:`EnsembleNetwork` of every member.

    Raises:
        MedsegError: a weights file is missing, corrupt or belongs to another network.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    networks = []
    for name in member_weights(package):
        path = model_dir / name
        network = build_network(package.network)
        state = _load_state(path, device)
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:  # weights of another network
            raise MedsegError(f"cannot load the weights ({str(exc).splitlines()[0][:200]})", path) from None
        networks.append(network)
    network = networks[0] if len(networks) == 1 else EnsembleNetwork(networks)
    return network.to(device).eval()


def load_member_states(model_dir: str | Path, package: schemas.ModelPackage, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """The members' state_dicts, in the package's order (one for a single model)."""
    return [_load_state(Path(model_dir) / name, torch.device(device)) for name in member_weights(package)]


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

    names = [f"weights_fold{f}.pt" for f in folds]
    described = [{"fold": f, "weights_file": n, "source": str(m), "best_val_dice": p.training.get("best_val_dice"), "best_epoch": p.training.get("best_epoch"),
                  "mlflow_run_id": p.training.get("mlflow_run_id")} for f, n, m, p in zip(folds, names, members, packages)]
    val = [d["best_val_dice"] for d in described if isinstance(d["best_val_dice"], (int, float))]
    info = {"ensemble": {"combine": COMBINE, "weights_files": names, "members": described}, "folds": folds,
            "config": dict(first.training.get("config", {})), "mean_fold_val_dice": float(np.mean(val)) if val else None, **(training or {})}
    with atomic_dir(Path(model_dir)) as tmp:
        for folder, package, name in zip(members, packages, names):
            shutil.copy2(folder / package.weights_file, tmp / name)
        shutil.copy2(first_dir / schemas.PLANS_JSON, tmp / schemas.PLANS_JSON)
        shutil.copy2(first_dir / schemas.DATASET_JSON, tmp / schemas.DATASET_JSON)
        schemas.ModelPackage(configuration=first.configuration, network=first.network, medseg_version=medseg.__version__, training=info,
                             lineage=dict(lineage or first.lineage), postprocessing=dict(postprocessing or {}), weights_file=names[0]).save(tmp)
    return Path(model_dir)


def cross_validation_postprocessing(preprocessed_dir: str | Path, members: list[str | Path], max_val_cases: int = 8, overlap: float = 0.25,
                                    device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, float]]:
    """Postprocessing chosen on the out-of-fold predictions of ``members`` (single-fold packages), and the
    cross-validation Dice per region (or label) of those predictions (before postprocessing).

    Each member predicts the first ``max_val_cases`` validation cases of its own fold (preprocessed grid).
    """
    from medseg.evaluation.metrics import dice
    from medseg.training.sampler import PreprocessedCase
    from medseg.training.trainer import postprocessing_from_pairs, validation_pairs

    preprocessed_dir, device = Path(preprocessed_dir), torch.device(device)
    plans, splits = schemas.Plans.load(preprocessed_dir), schemas.Splits.load(preprocessed_dir)
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
        pairs += validation_pairs(network, cases, plans.configuration(package.configuration).patch_size, overlap, device)
    if not pairs or configuration is None:
        return {}, {}
    groups = plans.reported_groups
    cv_dice = {name: float(np.mean([dice(np.isin(p, v), np.isin(r, v)) for p, r in pairs])) for name, v in groups.items()}
    post = postprocessing_from_pairs(pairs, plans, list(plans.configuration(configuration).spacing))
    if post:
        post["chosen_on"] = "out-of-fold predictions of the cross-validation"
    return post, cv_dice


__all__ = ["EnsembleNetwork", "cross_validation_postprocessing", "is_ensemble", "load_member_states", "load_network", "member_weights", "save_ensemble_package"]
