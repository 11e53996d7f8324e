"""The pure parts of benchmarks/batch_inference_vs_nnunet.py: our U-Net's weights under nnU-Net's PlainConvUNet names
(axes reversed), our plan as nnU-Net's plans, the comparison of two segmentation folders.

The benchmark itself runs both tools for minutes; it is run by hand, its JSON is benchmarks/results/batch_inference_vs_nnunet.json.
nnU-Net lives in its own venv, so the check of the mapping against nnU-Net's network runs only where
``dynamic_network_architectures`` imports (the benchmark itself checks it on every run: max_logit_diff_of_the_weight_mapping)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# a small anisotropic 3-stage U-Net: the first kernel is flat along I, the first downsampling keeps I
TOPOLOGY = {"name": "unet", "in_channels": 2, "out_channels": 3, "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "features": [2, 4, 8], "deep_supervision": False, "norm": "instance"}

EXPECTED_NAMES = {
    "encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.1.conv.weight",
    "encoder.stages.1.0.convs.0.conv.weight", "encoder.stages.1.0.convs.1.conv.weight",
    "encoder.stages.2.0.convs.0.conv.weight", "encoder.stages.2.0.convs.1.conv.weight",
    "decoder.transpconvs.0.weight", "decoder.transpconvs.1.weight",
    "decoder.stages.0.convs.0.conv.weight", "decoder.stages.0.convs.1.conv.weight",
    "decoder.stages.1.convs.0.conv.weight", "decoder.stages.1.convs.1.conv.weight",
    "decoder.seg_layers.1.weight", "decoder.seg_layers.1.bias",
}


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("batch_inference_vs_nnunet", ROOT / "benchmarks" / "batch_inference_vs_nnunet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ours():
    from medseg.networks import build_network

    torch.manual_seed(0)
    return build_network(TOPOLOGY).eval()


def test_every_parameter_gets_one_nnunet_name_with_its_kernel_axes_reversed(bench, ours) -> None:
    state = ours.state_dict()
    mapped = bench.nnunet_state_dict(state, n_stages=3)
    assert set(mapped) == EXPECTED_NAMES
    # stage 0's kernel (1, 3, 3) along our (I, J, K) is (3, 3, 1) along nnU-Net's (K, J, I)
    assert tuple(state["input_block.conv1.conv.weight"].shape) == (2, 2, 1, 3, 3)
    assert tuple(mapped["encoder.stages.0.0.convs.0.conv.weight"].shape) == (2, 2, 3, 3, 1)
    assert torch.equal(mapped["encoder.stages.0.0.convs.0.conv.weight"], state["input_block.conv1.conv.weight"].permute(0, 1, 4, 3, 2))
    assert torch.equal(mapped["encoder.stages.2.0.convs.1.conv.weight"], state["bottleneck.conv2.conv.weight"].permute(0, 1, 4, 3, 2))
    # the first upsampling (the deepest) undoes the last stride (2, 2, 2); the second undoes (1, 2, 2) -> (2, 2, 1)
    assert torch.equal(mapped["decoder.transpconvs.0.weight"], state["upsamples.0.transp_conv.conv.weight"].permute(0, 1, 4, 3, 2))
    assert tuple(mapped["decoder.transpconvs.1.weight"].shape) == (4, 2, 2, 2, 1)
    assert torch.equal(mapped["decoder.seg_layers.1.bias"], state["output_block.conv.conv.bias"])
    # every tensor of ours (aliases aside) is used exactly once
    own = {k: v for k, v in state.items() if not k.startswith("skip_layers.")}
    assert len(own) == len(mapped)
    assert sum(v.numel() for v in own.values()) == sum(v.numel() for v in mapped.values())


def test_reversed_kernels_on_reversed_axes_compute_the_same_convolution(bench) -> None:
    """The axis logic of the mapping: a convolution (and a transposed one) with the kernel's spatial axes reversed,
    applied to the input with its spatial axes reversed, gives the output with its spatial axes reversed."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((1, 2, 5, 6, 7), generator=gen)
    w = torch.randn((3, 2, 1, 3, 2), generator=gen)
    flip = (0, 1, 4, 3, 2)
    out = torch.nn.functional.conv3d(x, w, stride=(1, 2, 1))
    out_rev = torch.nn.functional.conv3d(x.permute(*flip), bench.reverse_spatial(w), stride=(1, 2, 1)[::-1])
    torch.testing.assert_close(out_rev.permute(*flip), out)
    wt = torch.randn((2, 3, 2, 2, 1), generator=gen)  # transposed convolution: (in, out, *kernel)
    up = torch.nn.functional.conv_transpose3d(x, wt, stride=(2, 2, 1))
    up_rev = torch.nn.functional.conv_transpose3d(x.permute(*flip), bench.reverse_spatial(wt), stride=(1, 2, 2))
    torch.testing.assert_close(up_rev.permute(*flip), up)
    bias = torch.randn(3, generator=gen)
    assert bench.reverse_spatial(bias) is bias


def test_networks_the_mapping_does_not_know_are_refused(bench) -> None:
    from medseg.networks import build_network

    residual = build_network({**TOPOLOGY, "name": "resunet", "residual": True})
    with pytest.raises(ValueError, match="no nnU-Net PlainConvUNet counterpart"):
        bench.nnunet_state_dict(residual.state_dict(), n_stages=3)
    state = build_network(TOPOLOGY).state_dict()
    incomplete = {k: v for k, v in state.items() if k != "upsamples.1.transp_conv.conv.weight"}
    with pytest.raises(ValueError, match="incomplete"):
        bench.nnunet_state_dict(incomplete, n_stages=3)


def test_plans_carry_our_topology_on_nnunet_axes_without_bias_or_affine_norm(bench) -> None:
    plan = SimpleNamespace(network=TOPOLOGY, spacing=[1.0, 2.0, 3.0], patch_size=[16, 32, 48], batch_size=2)
    geometry = {"median_cropped_shape": [10, 20, 30], "foreground_intensity_properties_per_channel": {"0": {}, "1": {}}}
    plans = bench.nnunet_plans(plan, geometry, n_channels=2)
    cfg = plans["configurations"]["3d_fullres"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    assert cfg["spacing"] == [3.0, 2.0, 1.0] and cfg["patch_size"] == [48, 32, 16]
    assert plans["transpose_forward"] == [0, 1, 2] and plans["image_reader_writer"] == "SimpleITKIO"
    assert kwargs["kernel_sizes"][0] == [3, 3, 1] and kwargs["strides"][1] == [2, 2, 1]
    assert kwargs["n_stages"] == 3 and kwargs["n_conv_per_stage"] == [2, 2, 2] and kwargs["n_conv_per_stage_decoder"] == [2, 2]
    assert kwargs["conv_bias"] is False and kwargs["norm_op_kwargs"]["affine"] is False
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] * 2 and cfg["use_mask_for_norm"] == [True, True]


def test_segmentation_comparison_counts_dice_per_label_and_equal_voxels(bench, tmp_path) -> None:
    from medseg.io import save_nifti

    a = np.zeros((4, 4, 4), dtype=np.uint8)
    b = np.zeros((4, 4, 4), dtype=np.uint8)
    a[:2] = 1  # 32 voxels of label 1
    b[:1] = 1  # 16 of them
    b[3, 3, 3] = 2  # label 2 only in b
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_nifti(tmp_path / "a" / "c1.nii.gz", a, np.eye(4))
    save_nifti(tmp_path / "b" / "c1.nii.gz", b, np.eye(4))
    out = bench.compare_segmentations(tmp_path / "a", tmp_path / "b", ["c1"], [0, 1, 2, 3])
    assert out["dice_per_label"]["1"] == pytest.approx(2 * 16 / 48)
    assert out["dice_per_label"]["2"] == 0.0 and out["dice_per_label"]["3"] is None
    assert out["voxels_equal_fraction"] == pytest.approx((64 - 17) / 64)
    assert out["dice_per_label"]["0"] == pytest.approx(2 * 31 / (32 + 47))


def test_mapped_weights_give_nnunet_plainconvunet_our_logits(bench, ours) -> None:
    pytest.importorskip("dynamic_network_architectures", reason="nnU-Net's networks live in the benchmark's own venv, not the project's")
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    rev = bench.to_nnunet_axes
    net = PlainConvUNet(2, 3, TOPOLOGY["features"], torch.nn.Conv3d, [rev(k) for k in TOPOLOGY["kernel_sizes"]], [rev(s) for s in TOPOLOGY["strides"]],
                        [2, 2, 2], 3, [2, 2], conv_bias=False, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": False},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()
    mapped = bench.nnunet_state_dict(ours.state_dict(), n_stages=3)
    state = {}
    for key, value in net.state_dict().items():
        canonical = (key[len("decoder."):] if key.startswith("decoder.encoder.") else key).replace(".all_modules.0.", ".conv.")
        state[key] = mapped.get(canonical, value)
    net.load_state_dict(state)
    x = torch.randn((1, 2, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2), ours(x), atol=1e-4, rtol=1e-4)


def test_the_diagnostic_gaussian_peaks_at_the_voxel_nnunet_uses_and_has_no_zeros(bench) -> None:
    from medseg.inference.sliding_window import gaussian_importance

    g = bench.delta_gaussian([8, 6, 5]).numpy()
    assert g.shape == (8, 6, 5)
    assert np.unravel_index(int(g.argmax()), g.shape) == (4, 3, 2) and g.max() == pytest.approx(1.0)
    assert g.min() > 0
    # ours is centred between the two middle voxels of an even axis: symmetric, where the delta one is not
    ours = gaussian_importance([8, 6, 5]).numpy()
    assert np.allclose(ours, ours[::-1, ::-1, ::-1]) and not np.allclose(g, g[::-1, ::-1, ::-1])
