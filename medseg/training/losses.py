"""Segmentation losses, chosen by name.

``dice_ce`` (default): soft Dice + cross-entropy, as nnU-Net trains (Isensee et al. 2021).
"""

from __future__ import annotations

from torch import nn

LOSSES = ("dice_ce", "dice", "ce")


def build_loss(name: str = "dice_ce") -> nn.Module:
    """A loss taking logits N×K×… and integer labels N×1×…."""
    from monai.losses import DiceCELoss, DiceLoss

    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    if name == "ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0)
    raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
