"""The torch-free inference backend: a model package's ``network.onnx`` run by ONNX Runtime, slid in numpy.

The model server needs only the network's forward pass; torch (with sympy and networkx) is most of what a
torch-based ``[serve]`` install weighs. Packaging exports the network once (:mod:`medseg.inference.onnx_export`,
training side); this module runs it with ``onnxruntime`` and repeats, in numpy, exactly what
:func:`medseg.inference.sliding_window.predict_logits` does around the network:

- the same zero padding to at least one patch (half before, half after), the same window starts and the same
  Gaussian importance weights (:mod:`medseg.inference.windows`, shared with the torch backend);
- windows batched by ``sw_batch_size``; mirroring test-time augmentation per window batch, the logits of the
  2ⁿ flips summed in the same order and divided by their count;
- the weighted logits accumulated in float32 (float16 past the same memory threshold), divided by the summed
  weights, cropped back;
- then the task's activation (:class:`medseg.task.Task`): softmax over labels or a sigmoid per region.

So the probabilities differ from the torch backend's only by the two runtimes' float rounding (measured in
tests/test_onnx_backend.py). This module imports neither torch nor MONAI.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.windows import flip_sets, gaussian_importance_np, pad_widths, window_starts

ONNX_FILE = schemas.ONNX_NETWORK_FILE  # beside weights.pt in a model package
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_MAX_ACCUMULATOR_BYTES = 2 * 1024**3  # as the torch backend: past it the logit sums are kept in float16


def _threads() -> int:
    """Intra-op threads for ONNX Runtime: ``MEDSEG_ONNX_THREADS``, else ``OMP_NUM_THREADS`` (what the torch backend
    obeys, so one setting caps both), else 0 (ONNX Runtime's default: one per physical core)."""
    for name in ("MEDSEG_ONNX_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for a ``--device`` value: ``cpu``; ``cuda`` (needs onnxruntime-gpu);
    ``auto`` the CUDA provider where the installed runtime has one, else the CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise MedsegError("device cuda asked for, but this onnxruntime has no CUDA provider (install onnxruntime-gpu, or use --device cpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    raise MedsegError(f"unknown device {device!r} for the ONNX backend (cpu, cuda or auto)")


class OnnxNetwork:
    """A package's exported network in an ONNX Runtime session: ``net(batch)`` maps float32 N×C×(patch) to N×K×(patch) logits.

    Args:
        path: the ``network.onnx`` file.
        device: ``cpu``, ``cuda`` or ``auto`` (see :func:`_providers`).
        threads: intra-op threads (None: :func:`_threads`).
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        from medseg.optional import needs_extra

        with needs_extra("serve", "the ONNX inference backend"):
            import onnxruntime as ort
        self.path = Path(path)
        if not self.path.is_file():
            raise MedsegError(f"this model package has no {ONNX_FILE} (packages written before ONNX export, or a network the export refuses): "
                              "serve it with the torch backend (--backend torch, medseg-ops[serve-torch])", self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads() if threads is None else int(threads)
        options.inter_op_num_threads = 1  # one graph at a time: the parallelism is inside the convolutions
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types for a corrupt or unsupported file
            raise MedsegError(f"cannot load the ONNX network ({str(exc).splitlines()[0][:200]})", self.path) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = list(inputs[0].shape)
        self.in_channels = shape[1] if isinstance(shape[1], int) else None
        # the spatial sizes the export fixed (None where dynamic): the sliding window's patch must match them
        self.spatial = [s if isinstance(s, int) else None for s in shape[2:]]

    def check_patch(self, patch_size: Sequence[int]) -> None:
        """Raise when the exported network cannot take windows of ``patch_size`` (the package's patch)."""
        if len(self.spatial) != len(patch_size) or any(s is not None and s != int(p) for s, p in zip(self.spatial, patch_size)):
            raise MedsegError(f"{ONNX_FILE} takes windows of {self.spatial}, but the package slides windows of {list(patch_size)}: export it again", self.path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        # a deep-supervised export stacks heads on axis 1 (N×S×K×…): the full-resolution head is the first
        return out[:, 0] if out.ndim == batch.ndim + 1 else out


def onnx_logits(network: OnnxNetwork, data: np.ndarray, patch_size: Sequence[int], overlap: float = 0.5, mirror: bool = False,
                sw_batch_size: int = 2, max_accumulator_bytes: int = DEFAULT_MAX_ACCUMULATOR_BYTES, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian-weighted logits K×(spatial) float32 of ``network`` over ``data`` C×(spatial): the numpy twin of
    :func:`medseg.inference.sliding_window.predict_logits` (same windows, weights, flips and accumulation order)."""
    x = np.asarray(data, dtype=np.float32)
    spatial = tuple(int(s) for s in x.shape[1:])
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(spatial):
        raise ValueError(f"patch size {patch} does not match the {len(spatial)}D volume of shape {tuple(x.shape)}")
    network.check_patch(patch)
    pads = pad_widths(spatial, patch)
    if any(before or after for before, after in pads):
        x = np.pad(x, [(0, 0), *pads])
    padded = tuple(int(s) for s in x.shape[1:])
    windows = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(padded, patch))))

    weights = gaussian_importance_np(patch, sigma_scale)
    weight_sum = np.zeros(padded, dtype=np.float32)
    for start in windows:
        weight_sum[tuple(slice(s, s + p) for s, p in zip(start, patch))] += weights

    flips = flip_sets(len(patch)) if mirror else [()]
    logits_sum: np.ndarray | None = None
    for first in range(0, len(windows), sw_batch_size):
        regions = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in windows[first:first + sw_batch_size]]
        batch = np.stack([x[(slice(None), *region)] for region in regions])
        out: np.ndarray | None = None
        for axes in flips:
            pred = network(np.flip(batch, axes) if axes else batch).astype(np.float32, copy=False)
            pred = np.flip(pred, axes) if axes else pred
            out = np.array(pred, copy=True) if out is None else np.add(out, pred, out=out)
        assert out is not None
        if len(flips) > 1:
            out /= np.float32(len(flips))
        out = out * weights
        if logits_sum is None:
            n_classes = int(out.shape[1])
            dtype = np.float16 if n_classes * math.prod(padded) * 4 > max_accumulator_bytes else np.float32
            logits_sum = np.zeros((n_classes, *padded), dtype=dtype)
        for i, region in enumerate(regions):
            logits_sum[(slice(None), *region)] += out[i].astype(logits_sum.dtype, copy=False)
    assert logits_sum is not None
    logits = logits_sum.astype(np.float32, copy=False)
    logits /= weight_sum
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
    return logits[(slice(None), *crop)]


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax float32 along ``axis`` (the maximum subtracted first, so large logits do not overflow)."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted.astype(np.float32, copy=False)


def onnx_probabilities(network: OnnxNetwork, data: np.ndarray, patch_size: Sequence[int], output: str = "labels", overlap: float = 0.5,
                       mirror: bool = False, sw_batch_size: int = 2) -> np.ndarray:
    """Sliding-window probabilities K×(spatial) float32: softmax over the labels, or for ``output="regions"`` a
    sigmoid per region channel (the activation :class:`medseg.task.Task` gives each output kind)."""
    from medseg.task import Task

    logits = onnx_logits(network, data, patch_size, overlap=overlap, mirror=mirror, sw_batch_size=sw_batch_size)
    if Task.activation(output) == "sigmoid":
        return expit(logits).astype(np.float32, copy=False)
    return softmax(logits, axis=0)


__all__ = ["INPUT_NAME", "ONNX_FILE", "OUTPUT_NAME", "OnnxNetwork", "onnx_logits", "onnx_probabilities", "softmax"]
