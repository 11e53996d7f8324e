"""Loading a model package's network for inference: one network, or a fold ensemble as one module.

A model package (``model_package.json`` beside ``weights*.pt``, ``plans.json``, ``dataset.json``) records in its
``network`` entry what its outputs are (:func:`network_output`): ``labels`` (softmax over the label values; the
default of older packages), ``regions`` (one sigmoid per region of ``network.regions``, name → labels, in
channel order) or ``classes`` (one softmax over ``network.classes`` per case, a classifier).

:func:`load_network` turns any package into one ``nn.Module``: the network itself for a single model, an
:class:`EnsembleNetwork` for several members (cross-validation folds). The ensemble returns the log of the
members' mean softmax, so whatever applies a softmax to a network's output (the sliding window, mirroring)
gets the mean softmax back within each window with no change of its own; region packages average the
members' sigmoid probabilities and return their logit. Weights are loaded with ``weights_only=True``: a
state_dict of tensors, never pickled code. Training writes packages (:mod:`medseg.training.ensemble`);
inference only reads them, so this module imports nothing of training.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.package_info import (COMBINE, OUTPUTS, combine_rule, is_ensemble, member_weights,  # noqa: F401  (re-exported: torch-free)
                                          network_output, network_patch_size)
from medseg.networks import build_network
from medseg.task import Task


class EnsembleNetwork(nn.Module):
    """Several networks of one topology as one.

    ``activation="softmax"``: ``forward`` returns log(mean of the members' softmax); a softmax over the class
    axis of the output gives the members' mean probabilities back (softmax(log p) = p / Σp = p).
    ``activation="sigmoid"`` (region outputs): it returns logit(mean of the members' sigmoid), so a sigmoid
    of each channel gives the mean probability back. Deep-supervision outputs (N×S×K×… or a list) are
    reduced to the full resolution head first, as at inference. Extra arguments (a classifier's age) are
    passed to every member.
    """

    def __init__(self, members: list[nn.Module], activation: str = "softmax"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be softmax or sigmoid, got {activation!r}")
        self.members = nn.ModuleList(members)
        self.activation = activation

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        total: torch.Tensor | None = None
        for member in self.members:
            out = member(x, *args)
            if isinstance(out, (list, tuple)):
                out = out[0]
            elif out.ndim == x.ndim + 1:
                out = out[:, 0]
            probs = torch.sigmoid(out.float()) if self.activation == "sigmoid" else torch.softmax(out.float(), dim=1)
            total = probs if total is None else total + probs
        assert total is not None
        mean = total / len(self.members)
        if self.activation == "sigmoid":
            eps = 1e-7  # sigmoid(±16.1): probabilities of exactly 0 or 1 stay finite
            mean = mean.clamp(eps, 1 - eps)
            return torch.log(mean) - torch.log1p(-mean)
        return torch.log(mean.clamp_min(torch.finfo(torch.float32).tiny))


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
    activation = Task.activation(network_output(package.network))
    network = networks[0] if len(networks) == 1 else EnsembleNetwork(networks, activation)
    return network.to(device).eval()


def load_member_states(model_dir: str | Path, package: schemas.ModelPackage, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """The members' state_dicts, in the package's order (one for a single model)."""
    return [_load_state(Path(model_dir) / name, torch.device(device)) for name in member_weights(package)]


__all__ = ["COMBINE", "OUTPUTS", "EnsembleNetwork", "combine_rule", "is_ensemble", "load_member_states", "load_network", "member_weights", "network_output", "network_patch_size"]
