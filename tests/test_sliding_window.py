"""Sliding-window inference: same probabilities as MONAI's, as a full-volume forward, on any shape."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import DynUNet

from medseg.inference.sliding_window import gaussian_importance, predict_logits, predict_probabilities, window_starts


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    net = DynUNet(3, 3, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)
    return net.eval()


def monai_probabilities(net: torch.nn.Module, data: np.ndarray, patch, overlap: float, mirror: bool) -> np.ndarray:
    flips = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)] if mirror else [()]

    def forward(window: torch.Tensor) -> torch.Tensor:
        outs = []
        for axes in flips:
            out = net(torch.flip(window, axes) if axes else window)
            out = out[:, 0] if out.ndim == window.ndim + 1 else out
            outs.append(torch.flip(out, axes) if axes else out)
        return torch.stack(outs).mean(0)

    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(data)[None], roi_size=list(patch), sw_batch_size=2, predictor=forward,
                                          overlap=overlap, mode="gaussian", sigma_scale=0.125)
    return torch.softmax(logits, dim=1)[0].numpy()


def test_window_starts_cover_the_axis() -> None:
    assert window_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert window_starts(21, 8, 0.5) == [0, 4, 8, 12, 13]  # last window moved back inside
    assert window_starts(8, 8, 0.5) == [0]
    assert window_starts(9, 8, 0.0) == [0, 1]
    for size, patch, overlap in [(37, 8, 0.5), (100, 24, 0.25), (33, 16, 0.7)]:
        starts = window_starts(size, patch, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + patch] = True
        assert covered.all() and starts[-1] == size - patch


def test_gaussian_peak_and_floor() -> None:
    w = gaussian_importance((8, 10, 12))
    assert w.shape == (8, 10, 12) and float(w.max()) <= 1.0 and float(w.min()) >= 1e-3
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(2))  # symmetric about the centre


@pytest.mark.parametrize("shape,mirror", [((3, 21, 18, 13), False), ((3, 21, 18, 13), True), ((3, 10, 30, 8), False)])
def test_same_probabilities_as_monai(network, shape, mirror) -> None:
    data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    ours = predict_probabilities(network, data, [12, 12, 12], overlap=0.5, mirror=mirror)
    ref = monai_probabilities(network, data, (12, 12, 12), 0.5, mirror)
    assert ours.shape == ref.shape == (3, *shape[1:])
    assert float(np.abs(ours - ref).max()) < 1e-4


def test_one_window_equals_full_volume_forward(network) -> None:
    data = np.random.default_rng(2).normal(size=(3, 16, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        out = network(torch.from_numpy(data)[None])
        full = torch.softmax(out[:, 0] if out.ndim == 6 else out, dim=1)[0].numpy()
    ours = predict_probabilities(network, data, [16, 16, 16], overlap=0.5)
    assert float(np.abs(ours - full).max()) < 1e-5


def test_float16_accumulation_stays_close(network) -> None:
    data = np.random.default_rng(3).normal(size=(3, 20, 20, 20)).astype(np.float32)
    exact = predict_logits(network, data, [12, 12, 12], accumulate_dtype=torch.float32)
    half = predict_logits(network, data, [12, 12, 12], max_accumulator_bytes=1)  # forces float16
    assert exact.dtype == half.dtype == torch.float32
    assert float((exact - half).abs().max()) < 1e-2 * max(1.0, float(exact.abs().max()))


def test_2d_volumes(network) -> None:
    torch.manual_seed(0)
    net2d = DynUNet(2, 2, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16]).eval()
    data = np.random.default_rng(4).normal(size=(2, 30, 7)).astype(np.float32)  # smaller than the patch on one axis
    probs = predict_probabilities(net2d, data, [16, 16], overlap=0.5, mirror=True)
    assert probs.shape == (2, 30, 7) and np.allclose(probs.sum(0), 1.0, atol=1e-5)
