"""Networks by name: shapes of the outputs (deep supervision included), parameter counts, option and
input-size checks. Tiny inputs (≤ 32³, one 64×32×32 for Swin UNETR), single-threaded."""

from __future__ import annotations

import json

import pytest
import torch

from medseg.preprocessing.planner import topology_for_patch
from medseg.networks.unet import build_network as legacy_build_network
from medseg.networks.unet import build_unet, count_parameters
from medseg.networks.registry import (
    NETWORKS,
    Classifier3D,
    SliceWise2D,
    age_encoding,
    build_network,
    build_network_by_name,
    n_parameters,
    network_topology,
    to_2d_topology,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _topo(deep_supervision: bool = False, **kw) -> dict:
    t = dict(name="unet", in_channels=2, out_channels=3, kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
             features=[4, 8, 16], deep_supervision=deep_supervision)
    t.update(kw)
    return t


TOPOLOGIES = {
    "3-stage": _topo(),
    "4-stage-ds": dict(name="unet", in_channels=4, out_channels=4, kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], features=[4, 8, 16, 32], deep_supervision=True),
    "aniso": dict(name="unet", in_channels=1, out_channels=3, kernel_sizes=[[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]], features=[4, 8, 16, 32]),
    "aniso-ds-capped": dict(name="unet", in_channels=2, out_channels=5, kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], features=[4, 8, 16, 32, 32], deep_supervision=True),
    "planned-cpu": topology_for_patch([48, 48, 16], [1, 1, 3.5], 4, 4, 8, 32, False),
    "2d": dict(name="unet", in_channels=3, out_channels=2, kernel_sizes=[[3, 3]] * 4, strides=[[1, 1], [2, 2], [2, 2], [2, 2]], features=[4, 8, 16, 32], deep_supervision=True),
}


# --------------------------------------------------------------------------- registry
def test_registry_names_and_errors() -> None:
    assert {"unet", "resunet", "unet2d", "unetr", "swinunetr", "classifier3d"} <= set(NETWORKS)
    with pytest.raises(ValueError, match=r"unknown network 'vnet' \(known: unet, resunet, unet2d, unetr, swinunetr, transunet, classifier3d\)"):
        build_network_by_name("vnet", _topo())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for network 'unet' \(known: \['deep_supervision', 'norm'\]\)"):
        build_network_by_name("unet", _topo(), depth=3)
    with pytest.raises(ValueError, match="lacks"):
        build_network_by_name("resunet", {"in_channels": 1, "out_channels": 2})
    with pytest.raises(ValueError, match="needs in_channels and out_channels"):
        network_topology("unetr", None, patch_size=[32, 32, 32])


# --------------------------------------------------------------------------- U-Net family
@pytest.mark.parametrize("name", list(TOPOLOGIES))
@pytest.mark.parametrize("network", ["unet", "resunet", "unet2d"])
def test_count_parameters_matches_built_network(name: str, network: str) -> None:
    topo = network_topology(network, TOPOLOGIES[name])
    assert count_parameters(topo) == n_parameters(build_network(topo))


def test_unet_is_the_planned_dynunet_and_count_unchanged() -> None:
    """The plan's topology (no options) still builds the DynUNet the planner counted, with the same weights layout."""
    from monai.networks.nets import DynUNet

    plan = TOPOLOGIES["planned-cpu"]
    net = legacy_build_network(plan)
    assert isinstance(net, DynUNet) and not any(n.endswith("conv3") for n, _ in net.named_modules())
    assert count_parameters(plan) == n_parameters(net)
    net.load_state_dict(build_unet(plan).state_dict())  # same keys and shapes as before the registry
    assert network_topology("unet", plan)["residual"] is False


def test_unet_forward_shapes_with_deep_supervision() -> None:
    net = build_network_by_name("unet", TOPOLOGIES["4-stage-ds"], patch_size=[16, 16, 16])
    x = torch.randn(2, 4, 16, 16, 16)
    out = net.train()(x)
    assert out.shape == (2, 3, 4, 16, 16, 16)  # full resolution + 2 supervised heads, each interpolated up
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 4, 16, 16, 16)
    # the option switches deep supervision off
    plain = build_network_by_name("unet", TOPOLOGIES["4-stage-ds"], deep_supervision=False)
    assert plain.train()(x).shape == (2, 4, 16, 16, 16)
    assert n_parameters(plain) < n_parameters(net)


def test_unet_is_2d_for_2d_kernels() -> None:
    net = build_network(TOPOLOGIES["2d"])
    out = net.train()(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3, 2, 16, 16)
    assert all(p.dim() != 5 for p in net.parameters())


def test_unet_patch_size_must_fit_the_strides() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        network_topology("unet", _topo(), patch_size=[16, 16, 10])  # 10 is not divisible by 2·2
    with pytest.raises(ValueError, match="has 2 axes"):
        network_topology("unet", _topo(), patch_size=[16, 16])


def test_resunet_has_residual_projections_and_more_parameters() -> None:
    topo = TOPOLOGIES["4-stage-ds"]
    res, plain = build_network_by_name("resunet", topo), build_network_by_name("unet", topo)
    assert any(n.endswith("conv3") for n, _ in res.named_modules())
    # one 1×1×1 projection c_in·c_out per encoder block whose channels or resolution change: here not
    # the first (4 → 4 channels at stride 1), every later one (strided)
    feats = topo["features"]
    assert topo["in_channels"] == feats[0]
    extra = sum(feats[s - 1] * feats[s] for s in range(1, len(feats)))
    assert n_parameters(res) - n_parameters(plain) == extra
    assert res.train()(torch.randn(1, 4, 16, 16, 16)).shape == (1, 3, 4, 16, 16, 16)


def test_unet2d_runs_slice_by_slice() -> None:
    topo = network_topology("unet2d", TOPOLOGIES["3-stage"])
    assert to_2d_topology(topo)["kernel_sizes"] == [[3, 3]] * 3 and to_2d_topology(topo)["strides"][1] == [2, 2]
    net = build_network(topo).eval()
    assert isinstance(net, SliceWise2D)
    x = torch.randn(2, 2, 16, 8, 3)
    with torch.no_grad():
        out = net(x)
        assert out.shape == (2, 3, 16, 8, 3)
        torch.testing.assert_close(out[..., 1], net.net2d(x[..., 1]))  # each slice on its own
        assert net(x[..., :1]).shape == (2, 3, 16, 8, 1)  # one-slice patches (2D training on 3D data)
        assert net(x[..., 0]).shape == (2, 3, 16, 8)  # plain 2D input
    # deep supervision in training: (B, heads, K, X, Y, Z)
    ds = build_network_by_name("unet2d", TOPOLOGIES["4-stage-ds"], patch_size=[16, 16, 1])
    assert ds.train()(torch.randn(1, 4, 16, 16, 2)).shape == (1, 3, 4, 16, 16, 2)
    # another slice axis
    axial = build_network_by_name("unet2d", TOPOLOGIES["3-stage"], slice_axis=0).eval()
    with torch.no_grad():
        assert axial(torch.randn(1, 2, 3, 16, 8)).shape == (1, 3, 3, 16, 8)


# --------------------------------------------------------------------------- transformers
def test_unetr_forward_and_size_constraints() -> None:
    pytest.importorskip("einops")
    small = dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4)
    topo = network_topology("unetr", {"in_channels": 2, "out_channels": 3}, patch_size=[32, 32, 32], **small)
    assert topo["options"]["img_size"] == [32, 32, 32]
    json.dumps(topo)  # storable in model_package.json
    net = build_network(topo)
    out = net(torch.randn(1, 2, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)
    out.mean().backward()
    assert count_parameters(topo) == n_parameters(net)
    with pytest.raises(ValueError, match="divisible by 16"):
        network_topology("unetr", None, in_channels=1, out_channels=2, patch_size=[32, 32, 24], **small)
    with pytest.raises(ValueError, match="needs the patch size"):
        network_topology("unetr", None, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        network_topology("unetr", None, in_channels=1, out_channels=2, patch_size=[32, 32, 32], hidden_size=50, num_heads=4)


def test_swinunetr_forward_and_size_constraints() -> None:
    pytest.importorskip("einops")
    small = dict(feature_size=12, depths=[1, 1, 1, 1], num_heads=[3, 3, 3, 3])
    net = build_network_by_name("swinunetr", None, in_channels=2, out_channels=3, patch_size=[64, 32, 32], **small).train()
    out = net(torch.randn(1, 2, 64, 32, 32))
    assert out.shape == (1, 3, 64, 32, 32)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="divisible by 32"):
        network_topology("swinunetr", None, in_channels=1, out_channels=2, patch_size=[48, 32, 32], **small)
    with pytest.raises(ValueError, match="one axis ≥ 64"):
        network_topology("swinunetr", None, in_channels=1, out_channels=2, patch_size=[32, 32, 32], **small)
    with pytest.raises(ValueError, match="divisible by 12"):
        network_topology("swinunetr", None, in_channels=1, out_channels=2, feature_size=16)


# --------------------------------------------------------------------------- classification
def _classifier_parameters(cin: int, widening: int, channels: list[int], feature_dim: int, hidden: int, age_dim: int, n_classes: int) -> int:
    total, prev = 0, cin
    for c in channels:
        w = c * widening
        total += 27 * prev * w + 2 * w  # conv without bias + instance-norm scale and shift
        prev = w
    total += prev * feature_dim + feature_dim
    total += (feature_dim + age_dim) * hidden + hidden + hidden * n_classes + n_classes
    return total


def test_classifier3d_shapes_parameters_and_age() -> None:
    opts = dict(widening=2, channels=[2, 4, 8], feature_dim=16, hidden=8)
    net = build_network_by_name("classifier3d", **opts).eval()
    assert isinstance(net, Classifier3D)
    assert n_parameters(net) == _classifier_parameters(1, 2, [2, 4, 8], 16, 8, 0, 3)
    with torch.no_grad():
        assert net(torch.randn(2, 1, 16, 16, 16)).shape == (2, 3)  # CN, MCI, AD logits
    # full resolution first: the first layer is a stride-1 3×3×3 convolution (no early downsampling)
    first = net.features[0]
    assert first.stride == (1, 1, 1) and first.kernel_size == (3, 3, 3)
    assert isinstance(net.features[1], torch.nn.InstanceNorm3d)

    aged = build_network_by_name("classifier3d", in_channels=2, out_channels=2, use_age=True, age_dim=8, **opts).eval()
    assert n_parameters(aged) == _classifier_parameters(2, 2, [2, 4, 8], 16, 8, 8, 2)
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        a, b = aged(x, torch.tensor([60.0, 60.0])), aged(x, torch.tensor([60.0, 85.0]))
    assert a.shape == (2, 2)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])  # the age reaches the head
    with pytest.raises(ValueError, match="pass age"):
        aged(x)
    with pytest.raises(ValueError, match="too small"):
        network_topology("classifier3d", patch_size=[4, 16, 16], **opts)  # 3 pooling blocks need ≥ 8 voxels per axis


def test_age_encoding_is_bounded_and_distinguishes_ages() -> None:
    enc = age_encoding(torch.tensor([55.0, 70.0, 71.0]), 16)
    assert enc.shape == (3, 16) and enc.abs().max() <= 1
    assert (enc[0] - enc[1]).norm() > (enc[1] - enc[2]).norm() > 0


# --------------------------------------------------------------------------- the package round trip
@pytest.mark.parametrize("name,kwargs,x", [
    ("resunet", {"topology": TOPOLOGIES["3-stage"]}, (1, 2, 8, 8, 8)),
    ("unet2d", {"topology": TOPOLOGIES["3-stage"]}, (1, 2, 8, 8, 1)),
    ("classifier3d", {"widening": 1, "channels": [2, 2], "feature_dim": 4, "hidden": 4, "use_age": False}, (1, 1, 8, 8, 8)),
])
def test_resolved_topology_rebuilds_the_same_network(name: str, kwargs: dict, x: tuple) -> None:
    """What the trainer stores in model_package.json is enough for the predictor's ``build_network(topology)``."""
    topo = network_topology(name, kwargs.pop("topology", None), **kwargs)
    stored = json.loads(json.dumps(topo))
    a, b = build_network(topo).eval(), legacy_build_network(stored).eval()
    b.load_state_dict(a.state_dict())
    inp = torch.randn(*x)
    with torch.no_grad():
        torch.testing.assert_close(a(inp), b(inp))
