"""TransUNet (medseg.networks.transunet): output shapes for plan-like topologies (3D anisotropic, 3D
isotropic, 2D), input-size and option errors, the parameter count against a closed form, determinism, a
few optimiser steps on one batch, and that attention carries information across the whole bottleneck.
Single-threaded, tiny inputs (≤ 64×64×12, batch ≤ 2)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from medseg.networks.transunet import (
    TRANSUNET_OPTIONS,
    TransUNet,
    check_transunet_input,
    sinusoidal_position_encoding,
    transunet_divisor,
    transunet_from_topology,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


# the CPU plan of an anisotropic 64×64×12 patch (divisor 8×8×2, bottleneck 8×8×6 = 384 tokens)
CPU_ANISO = dict(name="transunet", in_channels=4, out_channels=4, kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                 strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]], features=[16, 32, 64, 128], norm="instance")
# an isotropic 32³ patch (divisor 8, bottleneck 4³ = 64 tokens)
ISO_32 = dict(name="transunet", in_channels=1, out_channels=2, kernel_sizes=[[3, 3, 3]] * 4,
              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], features=[16, 32, 64, 128])
TWO_D = dict(in_channels=3, out_channels=2, kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], features=[8, 16, 32],
             options=dict(hidden_size=32, num_heads=4, num_layers=2))
TINY = dict(in_channels=1, out_channels=2, kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], features=[4, 8, 16],
            options=dict(hidden_size=32, num_heads=4, num_layers=1, mlp_ratio=2.0))


def _expected_parameters(t: dict, o: dict) -> int:
    """Closed form: convolutions without bias, instance norm without affine parameters, Linear with bias."""
    k = [math.prod(ks) for ks in t["kernel_sizes"]]
    f, cin, cout = t["features"], t["in_channels"], t["out_channels"]
    d, m = o["hidden_size"], int(round(o["hidden_size"] * o["mlp_ratio"]))
    enc = sum(k[s] * ((cin if s == 0 else f[s - 1]) * f[s] + f[s] * f[s]) for s in range(len(f)))
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    vit = (f[-1] * d + d) + o["num_layers"] * block + 2 * d + (d * f[-1] + f[-1]) + k[-1] * f[-1] ** 2
    dec = sum(math.prod(t["strides"][s + 1]) * f[s + 1] * f[s] + k[s] * (2 * f[s] * f[s] + f[s] * f[s]) for s in range(len(f) - 1))
    return enc + vit + dec + f[0] * cout + cout


# --------------------------------------------------------------------------- shapes and parameters
@pytest.mark.parametrize(("topo", "patch", "grid"), [(CPU_ANISO, [64, 64, 12], [8, 8, 6]), (ISO_32, [32, 32, 32], [4, 4, 4]),
                                                     (TWO_D, [32, 24], [8, 6]), (TINY, [16, 8, 24], [4, 2, 6])],
                         ids=["cpu-aniso-64x64x12", "iso-32", "2d", "tiny"])
def test_forward_shape_and_parameter_count(topo: dict, patch: list[int], grid: list[int], record_property) -> None:
    net = transunet_from_topology(topo)
    assert check_transunet_input(patch, topo["strides"]) == grid
    x = torch.randn(1, topo["in_channels"], *patch)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, topo["out_channels"], *patch)
    assert torch.isfinite(y).all()
    n = sum(p.numel() for p in net.parameters())
    assert n == _expected_parameters(topo, {**TRANSUNET_OPTIONS, **topo.get("options", {})})
    record_property("n_parameters", n)
    print(f"transunet {patch}: {n} parameters ({sum(p.numel() for p in net.blocks.parameters())} in the transformer)")


def test_default_topologies_parameter_counts() -> None:
    """The defaults (hidden 192, 4 layers, 6 heads): ~3.6 M parameters, ~1.78 M of them in the transformer."""
    assert sum(p.numel() for p in transunet_from_topology(CPU_ANISO).parameters()) == 3_618_372
    assert sum(p.numel() for p in transunet_from_topology(ISO_32).parameters()) == 3_671_442


def test_options_defaults_match_constructor() -> None:
    sig = inspect.signature(TransUNet)
    for name, value in TRANSUNET_OPTIONS.items():
        if name != "norm":  # None in the options: the topology's norm
            assert sig.parameters[name].default == value
    assert sig.parameters["norm"].default == "instance"
    net = transunet_from_topology({**TINY, "options": {**TINY["options"], "dropout": 0.1, "attention_dropout": 0.2}})
    assert net.blocks[0].attn.attention_dropout == 0.2 and net.embed_drop.p == 0.1
    assert isinstance(transunet_from_topology({**TINY, "norm": "batch"}).conv_more.norm, torch.nn.BatchNorm3d)
    assert isinstance(transunet_from_topology({**TINY, "norm": "batch", "options": {"norm": "instance"}}).conv_more.norm, torch.nn.InstanceNorm3d)


# --------------------------------------------------------------------------- size and option errors
def test_divisor_and_input_errors() -> None:
    assert transunet_divisor(CPU_ANISO["strides"]) == [8, 8, 2]
    assert transunet_divisor(TWO_D["strides"]) == [4, 4]
    with pytest.raises(ValueError, match=r"patch size \[64, 64, 13\] does not fit.*divisor \[8, 8, 2\].*failing axes \[2\]"):
        check_transunet_input([64, 64, 13], CPU_ANISO["strides"])
    with pytest.raises(ValueError, match=r"patch size \[4, 8, 2\] does not fit.*divisor \[8, 8, 2\]"):
        check_transunet_input([4, 8, 2], CPU_ANISO["strides"])
    with pytest.raises(ValueError, match=r"patch size \[8, 8, 2\] with divisor \[8, 8, 2\] leaves a bottleneck of \[1, 1, 1\] = 1 token.*at least 2"):
        check_transunet_input([8, 8, 2], CPU_ANISO["strides"])
    with pytest.raises(ValueError, match="has 2 axes, the strides 3"):
        check_transunet_input([64, 64], CPU_ANISO["strides"])
    net = transunet_from_topology(TINY)
    with pytest.raises(ValueError, match=r"patch size \[16, 16, 14\] does not fit.*divisor \[4, 4, 4\]"):
        net(torch.zeros(1, 1, 16, 16, 14))
    with pytest.raises(ValueError, match=r"expected \(B, 1, X, Y, Z\)"):
        net(torch.zeros(1, 2, 16, 16, 16))


@pytest.mark.parametrize(("change", "message"), [
    ({"options": {"hidden_size": 190, "num_heads": 6}}, r"hidden_size 190 is not divisible by num_heads 6"),
    ({"options": {"num_heads": 0}}, r"not divisible by num_heads 0"),
    ({"options": {"depth": 3}}, r"unknown option\(s\) \['depth'\]"),
    ({"options": {"dropout": 1.0}}, r"dropout must be in \[0, 1\)"),
    ({"options": {"hidden_size": 4, "num_heads": 2}}, r"hidden_size 4 is too small for a 3D positional encoding"),
    ({"norm": "group"}, r"norm must be one of \('instance', 'batch'\)"),
    ({"strides": [[2, 2, 2], [2, 2, 2], [2, 2, 2]]}, r"first stage .* stride must be all 1"),
    ({"kernel_sizes": [[3, 3, 3], [3, 3], [3, 3, 3]]}, r"must all have 2 or 3 entries"),
    ({"kernel_sizes": [[3, 3, 3], [2, 2, 2], [3, 3, 3]]}, r"kernel sizes odd"),
    ({"features": [4, 8]}, r"one entry per stage"),
    ({"features": None}, r"lacks \['features'\]"),
])
def test_option_errors(change: dict, message: str) -> None:
    topo = {**TINY, **change}
    if change.get("features", 0) is None:
        del topo["features"]
    with pytest.raises(ValueError, match=message):
        transunet_from_topology(topo)


def test_constructor_head_count_error() -> None:
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_heads 8"):
        TransUNet(1, 2, [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [4, 8], hidden_size=100, num_heads=8)


# --------------------------------------------------------------------------- positional encoding
def test_sinusoidal_position_encoding() -> None:
    pe = sinusoidal_position_encoding([3, 4, 5], 32)
    assert pe.shape == (60, 32)
    # 32 // 6 = 5 frequencies per axis → 30 channels, 2 zero-padded
    assert torch.equal(pe[:, 30:], torch.zeros(60, 2))
    # token 0 is the origin: sin 0 = 0, cos 0 = 1
    assert torch.allclose(pe[0, :30], torch.tensor(([0.0] * 5 + [1.0] * 5) * 3))
    # every grid position gets a different code
    assert torch.cdist(pe, pe).add(torch.eye(60)).min() > 1e-3
    # row-major order, as flatten orders the tokens: token 1 is (0, 0, 1), i.e. only the last axis moved
    assert torch.allclose(pe[1, :20], pe[0, :20]) and not torch.allclose(pe[1, 20:30], pe[0, 20:30])
    # a larger grid extends the encoding rather than stretching it
    assert torch.allclose(sinusoidal_position_encoding([6, 4, 5], 32)[:60], pe)


# --------------------------------------------------------------------------- behaviour
def test_deterministic_under_fixed_seed() -> None:
    topo = {**TINY, "options": {**TINY["options"], "dropout": 0.1, "attention_dropout": 0.1}}
    x = torch.randn(2, 1, 16, 16, 16)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        net = transunet_from_topology(topo)
        torch.manual_seed(7)
        outs.append(net.train()(x))  # dropout active: same seed, same masks
        with torch.no_grad():
            outs.append(net.eval()(x))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    assert not torch.equal(outs[0], outs[1])  # dropout does something in training
    with torch.no_grad():
        assert torch.equal(net(x), outs[3])  # eval is repeatable


def test_a_few_adam_steps_fit_one_batch() -> None:
    torch.manual_seed(0)
    net = transunet_from_topology(TINY)
    x = torch.randn(2, 1, 16, 16, 16)
    target = (x[:, 0] > 0.5).long()  # a thresholded channel
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    prior = target.float().mean().item()  # the best constant prediction's cross-entropy: the class entropy
    assert losses[-1] < -(prior * math.log(prior) + (1 - prior) * math.log(1 - prior)), losses  # uses the image, not just the prior
    assert all(p.grad.abs().sum() > 0 for p in net.blocks.parameters())  # the transformer is trained too


def test_attention_carries_information_across_the_bottleneck() -> None:
    """With 1×1×1 kernels and batch norm in eval mode the convolutional path is voxel-local (strided
    subsampling, kernel = stride transposed convolutions), so a voxel can only influence a distant one
    through attention: with transformer blocks the far corner's logits move, without them (num_layers=0,
    the same network otherwise) they are bit-identical."""
    topo = dict(in_channels=1, out_channels=2, kernel_sizes=[[1, 1, 1]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], features=[4, 8, 16],
                norm="batch", options=dict(hidden_size=32, num_heads=4, num_layers=1))
    x = torch.randn(1, 1, 16, 16, 16)
    x2 = x.clone()
    x2[0, 0, 0, 0, 0] += 5.0  # bottleneck token (0, 0, 0)
    far = (slice(None), slice(None), slice(8, 16), slice(8, 16), slice(8, 16))  # other bottleneck tokens only
    changes = {}
    for layers in (1, 0):
        torch.manual_seed(0)
        net = transunet_from_topology({**topo, "options": {**topo["options"], "num_layers": layers}}).eval()
        for p in net.blocks.parameters():  # stronger than the ViT's 0.02 init, so attention is content-dependent
            if p.ndim == 2:
                torch.nn.init.normal_(p, std=0.3)
        with torch.no_grad():
            y, y2 = net(x), net(x2)
        changes[layers] = ((y - y2)[far].abs().max() / y[far].abs().max()).item()
        assert (y - y2)[:, :, 0, 0, 0].abs().max() > 0  # the perturbed voxel itself
    assert changes[0] == 0.0, changes
    assert changes[1] > 1e-3, changes
