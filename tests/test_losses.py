"""Losses by name, checked against known values: perfect → ~0, all wrong → high, gradients, the Jaccard/Dice
identity, focal(γ=0) = CE, the Hausdorff loss's preference for near errors, and the region helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.training.losses import (
    LOSSES,
    HausdorffDTLoss,
    boundary_distance,
    build_loss,
    labels_to_regions,
    region_signatures,
    regions_to_labels,
)

BRATS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
SOFTMAX_LOSSES = [n for n, s in LOSSES.items() if s.activation == "softmax"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _labels(shape=(2, 1, 12, 12, 12), k: int = 4, seed: int = 0) -> torch.Tensor:
    """Blobs of every class so no class is empty in a batch."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(shape, dtype=torch.long)
    y[:, :, 2:10, 2:10, 2:10] = 1
    y[:, :, 4:8, 4:8, 3:9] = 2 if k > 2 else 1
    if k > 3:
        y[:, :, 5:7, 5:7, 5:7] = 3
    noise = torch.randint(0, k, shape, generator=g)
    keep = torch.rand(shape, generator=g) < 0.9
    return torch.where(keep, y, noise)


def _perfect_logits(y: torch.Tensor, k: int, margin: float = 30.0) -> torch.Tensor:
    return margin * (2 * F.one_hot(y[:, 0], k).movedim(-1, 1).float() - 1)


def _build(name: str, **kw):
    return build_loss(name, **({"regions": BRATS} if name == "region_bce_dice" else {}), **kw)


# --------------------------------------------------------------------------- registry
def test_registry_default_and_errors() -> None:
    assert {"ce", "dice", "dice_ce", "jaccard", "focal", "hausdorff_dt", "dice_ce_hausdorff", "region_bce_dice"} <= set(LOSSES)
    with pytest.raises(ValueError, match=r"unknown loss 'tversky' \(known: dice_ce, dice, ce, jaccard, focal"):
        build_loss("tversky")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gama'\] for loss 'focal' \(known: \['class_weights', 'gamma'\]\)"):
        build_loss("focal", gama=1.0)
    with pytest.raises(ValueError, match="needs regions"):
        build_loss("region_bce_dice")
    assert LOSSES["region_bce_dice"].activation == "sigmoid" and LOSSES["dice_ce"].activation == "softmax"


def test_dice_ce_default_is_the_previous_monai_loss() -> None:
    from monai.losses import DiceCELoss

    y = _labels()
    logits = torch.randn(2, 4, 12, 12, 12)
    old = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    torch.testing.assert_close(build_loss()(logits, y), old(logits, y))


# --------------------------------------------------------------------------- known values
@pytest.mark.parametrize("name", list(LOSSES))
def test_perfect_prediction_is_near_zero_and_wrong_is_high(name: str) -> None:
    y = _labels()
    k = 3 if name == "region_bce_dice" else 4
    loss = _build(name)
    if name == "region_bce_dice":
        target = labels_to_regions(y, BRATS)
        perfect, wrong = 30 * (2 * target - 1), -30 * (2 * target - 1)
    else:
        perfect = _perfect_logits(y, k)
        wrong = _perfect_logits((y + 1) % k, k)  # every voxel confidently another class
    low, high = float(loss(perfect, y)), float(loss(wrong, y))
    assert low < 1e-3, f"{name}: perfect prediction gives {low}"
    assert high > 0.9, f"{name}: all-wrong prediction gives {high}"


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_flows(name: str) -> None:
    y = _labels(shape=(2, 1, 8, 8, 8))
    k = 3 if name == "region_bce_dice" else 4
    logits = torch.randn(2, k, 8, 8, 8, requires_grad=True)
    loss = _build(name)(logits, y)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_losses_accept_half_precision_logits() -> None:
    y = _labels(shape=(1, 1, 8, 8, 8))
    logits = torch.randn(1, 4, 8, 8, 8).to(torch.bfloat16)
    for name in SOFTMAX_LOSSES:
        assert build_loss(name)(logits, y).dtype == torch.float32


def test_jaccard_is_dice_over_two_minus_dice() -> None:
    """Per class, with the same sums: J = D / (2 − D) (squared and plain denominators)."""
    from monai.losses import DiceLoss

    y = _labels(k=2)
    logits = torch.randn(2, 2, 12, 12, 12)
    for squared in (True, False):
        d = 1 - DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True, squared_pred=squared)(logits, y)
        j = 1 - build_loss("jaccard", squared=squared)(logits, y)
        torch.testing.assert_close(j, d / (2 - d), atol=1e-5, rtol=1e-5)
    d = 1 - build_loss("dice")(logits, y)
    torch.testing.assert_close(1 - build_loss("jaccard", squared=False)(logits, y), d / (2 - d), atol=1e-5, rtol=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    y = _labels()
    logits = torch.randn(2, 4, 12, 12, 12)
    torch.testing.assert_close(build_loss("focal", gamma=0.0)(logits, y), build_loss("ce")(logits, y))
    w = [0.2, 1.0, 2.0, 3.0]
    torch.testing.assert_close(build_loss("focal", gamma=0.0, class_weights=w)(logits, y), build_loss("ce", class_weights=w)(logits, y))
    torch.testing.assert_close(build_loss("ce", class_weights=w)(logits, y), F.cross_entropy(logits, y[:, 0], weight=torch.tensor(w)))
    # γ > 0 down-weights the confident (easy) voxels: never above CE
    assert build_loss("focal", gamma=2.0)(logits, y) < build_loss("ce")(logits, y)


def test_focal_matches_the_formula() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1])
    p_t = torch.softmax(logits, 1)[torch.arange(2), y]
    expected = (-(1 - p_t) ** 2 * p_t.log()).mean()
    torch.testing.assert_close(build_loss("focal", gamma=2.0)(logits, y), expected)


def test_classification_ce_on_logits_per_sample() -> None:
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(build_loss("ce")(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(build_loss("ce")(logits, y[:, None]), F.cross_entropy(logits, y))


def test_class_weights_are_checked_and_used() -> None:
    y = _labels()
    logits = torch.randn(2, 4, 12, 12, 12)
    with pytest.raises(ValueError, match=r"one entry per output channels \(4\)"):
        build_loss("jaccard", class_weights=[1.0, 1.0])(logits, y)
    # a zero weight removes a class from the mean: only class 3 left
    only3 = build_loss("jaccard", class_weights=[0, 0, 0, 1])(logits, y)
    full = build_loss("jaccard", include_background=True, batch=True)
    probs = torch.softmax(logits, 1)[:, 3]
    t = (y[:, 0] == 3).float()
    inter = (probs * t).sum()
    expected = 1 - (inter + 1e-5) / ((probs**2).sum() + t.sum() - inter + 1e-5)
    torch.testing.assert_close(only3, expected)
    assert full(logits, y) != only3
    assert build_loss("dice_ce", class_weights=[0.5, 1, 1, 2])(logits, y) > 0


def test_labels_out_of_range_and_bad_shapes_raise() -> None:
    logits = torch.randn(1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):
        build_loss("jaccard")(logits, torch.full((1, 1, 8, 8, 8), 3))
    with pytest.raises(ValueError, match="expected integer labels"):
        build_loss("ce")(logits, torch.zeros(1, 2, 8, 8, 8, dtype=torch.long))


# --------------------------------------------------------------------------- Hausdorff distance loss
def test_boundary_distance_known_values() -> None:
    mask = np.zeros((1, 9), bool)
    mask[0, 3:6] = True
    np.testing.assert_allclose(boundary_distance(mask)[0], [3, 2, 1, 1, 2, 1, 1, 2, 3])
    np.testing.assert_allclose(boundary_distance(mask, spacing=[1.0, 2.0])[0], [6, 4, 2, 2, 4, 2, 2, 4, 6])
    assert not boundary_distance(np.zeros((4, 4), bool)).any() and not boundary_distance(np.ones((4, 4), bool)).any()


def test_hausdorff_loss_penalises_a_far_false_positive_more_than_a_near_one() -> None:
    """Same Dice (same reference, same false-positive volume), different distance of the error."""
    shape = (1, 1, 32, 32, 32)
    y = torch.zeros(shape, dtype=torch.long)
    y[..., 4:10, 4:10, 4:10] = 1
    near, far = y.clone(), y.clone()
    near[..., 12:15, 4:7, 4:7] = 1  # 27 false-positive voxels 2 voxels from the object
    far[..., 27:30, 27:30, 27:30] = 1  # 27 false-positive voxels in the far corner
    loss = HausdorffDTLoss()
    dice = build_loss("dice")
    ln, lf = loss(_perfect_logits(near, 2), y), loss(_perfect_logits(far, 2), y)
    torch.testing.assert_close(dice(_perfect_logits(near, 2), y), dice(_perfect_logits(far, 2), y))
    assert lf > 5 * ln > 0
    assert float(loss(_perfect_logits(y, 2), y)) < 1e-6
    # α = 1 penalises the distance less steeply
    assert HausdorffDTLoss(alpha=1.0)(_perfect_logits(far, 2), y) < lf


def test_hausdorff_loss_averages_one_binary_loss_per_label() -> None:
    y = _labels(shape=(1, 1, 12, 12, 12))
    logits = torch.randn(1, 4, 12, 12, 12)
    per_label = []
    for c in (1, 2, 3):
        two = torch.stack([logits[:, [k for k in range(4) if k != c]].logsumexp(1), logits[:, c]], 1)  # the same softmax probability of c
        per_label.append(HausdorffDTLoss()(two, (y == c).long()))
    torch.testing.assert_close(HausdorffDTLoss()(logits, y), torch.stack(per_label).mean())


def test_dice_ce_hausdorff_is_the_weighted_sum() -> None:
    y = _labels(shape=(1, 1, 12, 12, 12))
    logits = torch.randn(1, 4, 12, 12, 12)
    expected = build_loss("dice_ce")(logits, y) + 0.3 * build_loss("hausdorff_dt")(logits, y)
    torch.testing.assert_close(build_loss("dice_ce_hausdorff", hausdorff_weight=0.3)(logits, y), expected)
    with pytest.raises(ValueError, match="hausdorff_weight"):
        build_loss("dice_ce_hausdorff", hausdorff_weight=-1)


# --------------------------------------------------------------------------- regions
def test_labels_to_regions_brats() -> None:
    y = torch.tensor([0, 1, 2, 3]).reshape(1, 1, 4, 1, 1)
    r = labels_to_regions(y, BRATS)
    assert r.shape == (1, 3, 4, 1, 1) and r.dtype == torch.float32
    # columns: background, NETC (1), SNFH (2), ET (3); rows WT, TC, ET
    assert r[0, :, :, 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    as_np = labels_to_regions(y.numpy().astype(np.uint8), BRATS)
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32
    np.testing.assert_array_equal(as_np, r.numpy())
    with pytest.raises(ValueError, match="no regions"):
        labels_to_regions(y, {})


def test_regions_to_labels_inverts_and_resolves_inconsistency() -> None:
    y = _labels()
    r = labels_to_regions(y, BRATS)
    torch.testing.assert_close(regions_to_labels(r, BRATS), y[:, 0])  # (B, R, ...) → (B, ...)
    np.testing.assert_array_equal(regions_to_labels(r[0].numpy(), BRATS), y[0, 0].numpy())  # one case (R, ...) numpy
    # thresholded-consistent probabilities give nnU-Net's painting WT→2, TC→1, ET→3
    p = torch.tensor([[0.9, 0.2, 0.1], [0.9, 0.8, 0.1], [0.9, 0.8, 0.7], [0.1, 0.1, 0.1]]).T.reshape(3, 4, 1, 1)
    assert regions_to_labels(p, BRATS).flatten().tolist() == [2, 1, 3, 0]
    # inconsistent: enhancing tumour without tumour core → the likelier consistent label
    q = torch.tensor([0.9, 0.45, 0.9]).reshape(3, 1, 1, 1)
    assert int(regions_to_labels(q, BRATS).flatten()) == 3
    q = torch.tensor([0.9, 0.05, 0.6]).reshape(3, 1, 1, 1)
    assert int(regions_to_labels(q, BRATS).flatten()) == 2


def test_region_signatures_reject_ambiguous_regions() -> None:
    values, sig = region_signatures(BRATS)
    assert values == [0, 1, 2, 3] and sig.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="labels 1 and 2 belong to the same regions"):
        region_signatures({"WT": [1, 2], "ET": [3]})
    with pytest.raises(ValueError, match=r"labels 0 and 4 belong to the same regions \['\(none\)'\]|labels 0 and 4"):
        region_signatures(BRATS, labels=[0, 1, 2, 3, 4])  # label 4 in no region: indistinguishable from background


def test_region_bce_dice_matches_its_definition() -> None:
    y = _labels()
    logits = torch.randn(2, 3, 12, 12, 12)
    t = labels_to_regions(y, BRATS)
    p = torch.sigmoid(logits)
    dims = [0, 2, 3, 4]
    dice = (2 * (p * t).sum(dims) + 1e-5) / (p.sum(dims) + t.sum(dims) + 1e-5)
    expected = F.binary_cross_entropy_with_logits(logits, t) + (1 - dice).mean()
    loss = build_loss("region_bce_dice", regions=BRATS)
    torch.testing.assert_close(loss(logits, y), expected)
    torch.testing.assert_close(loss(logits, t), expected)  # float region targets are taken as they are
    with pytest.raises(ValueError, match=r"one output channel per region \(3: WT, TC, ET\)"):
        loss(torch.randn(2, 4, 12, 12, 12), y)


def test_hausdorff_on_regions() -> None:
    y = _labels(shape=(1, 1, 12, 12, 12))
    t = labels_to_regions(y, BRATS)
    loss = build_loss("hausdorff_dt", sigmoid=True, regions=BRATS)
    assert float(loss(30 * (2 * t - 1), y)) < 1e-6
    assert float(loss(-30 * (2 * t - 1), y)) > 0.9


def test_hausdorff_weight_ramps_up_over_training() -> None:
    """dice_ce_hausdorff: the Hausdorff term starts at weight 0 and reaches hausdorff_weight after `ramp` of the epochs
    (the trainer calls set_epoch at the start of every epoch); ramp 0 gives the full weight at once."""
    from medseg.training.losses import build_loss

    loss = build_loss("dice_ce_hausdorff", hausdorff_weight=0.2, ramp=0.5)
    assert loss.weights == [1.0, 0.2]  # outside a trainer: the full weights
    seen = []
    for epoch in range(10):
        loss.set_epoch(epoch, 10)
        seen.append(loss.weights[1])
    assert seen[0] == 0.0 and seen[5:] == [0.2] * 5 and all(a < b for a, b in zip(seen[:5], seen[1:6]))
    assert seen[1] == pytest.approx(0.2 * 1 / 5)
    logits = torch.randn(1, 3, 8, 8, 8)
    target = torch.randint(0, 3, (1, 1, 8, 8, 8))
    loss.set_epoch(0, 10)
    at_start = float(loss(logits, target))
    loss.set_epoch(9, 10)
    assert float(loss(logits, target)) > at_start  # the Hausdorff term (> 0) has been added
    flat = build_loss("dice_ce_hausdorff", hausdorff_weight=0.2, ramp=0.0)
    flat.set_epoch(0, 10)
    assert flat.weights == [1.0, 0.2]
    with pytest.raises(ValueError, match="ramps"):
        build_loss("dice_ce_hausdorff", ramp=1.5)
