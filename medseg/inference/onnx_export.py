"""Export a model package's network to ``network.onnx`` at packaging time (the training side, which has torch).

The model server's torch-free backend (:mod:`medseg.inference.onnx_backend`) runs that file with ONNX Runtime.
What is exported is exactly what the torch predictor runs: :func:`~medseg.inference.package.load_network` of
the package (one network, or a fold ensemble's :class:`~medseg.inference.package.EnsembleNetwork`) in eval
mode, so deep-supervision heads are off and instance norm uses each window's own statistics, as at inference.

- Input ``input`` N×C×(patch), output ``logits`` N×K×(patch): the spatial sizes are fixed to the package's
  sliding-window patch (the only size the predictor ever feeds, so ONNX Runtime can plan its memory once);
  the batch axis is dynamic (the window batch, any size).
- torch's ``torch.export``-based exporter (``dynamo=True``; it needs the ``onnx`` and ``onnxscript`` packages of
  the ``train`` extra), opset :data:`OPSET`, weights inside the one file (no external data file to lose).
- Checked where it is written: when ONNX Runtime is installed, the file is run on a random window batch and
  compared with torch; a larger difference than :data:`MAX_ABS_DIFF` removes the file.

Networks checked here: the plan's U-Net family in 3D (``unet``, ``resunet``) and ensembles of them. Others
(transformers, the 2D slice-wise U-Net, classifiers) are refused with the reason recorded in
``model_package.json`` (``onnx.reason``); those packages are served by the torch backend.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg import schemas
from medseg.inference.onnx_backend import INPUT_NAME, ONNX_FILE, OUTPUT_NAME
from medseg.inference.package_info import network_output, network_patch_size

log = logging.getLogger(__name__)

OPSET = 18  # supported by ONNX Runtime ≥ 1.14 and by torch's exporter; InstanceNormalization and ConvTranspose are unchanged since 6/11
SUPPORTED_NETWORKS = ("unet", "resunet")
MAX_ABS_DIFF = 1e-3  # logits; the U-Net in float32 differs by ~1e-5 (tests/test_onnx_backend.py)


def refusal(package: schemas.ModelPackage) -> str | None:
    """Why this package's network is not exported (None: it is)."""
    network = package.network
    name = str(network.get("name") or ("resunet" if network.get("residual") else "unet"))
    output = network_output(network)
    if output == "classes":
        return "classifiers are served by the torch backend (ONNX export is checked for segmentation U-Nets only)"
    if name not in SUPPORTED_NETWORKS:
        return f"ONNX export is checked for {', '.join(SUPPORTED_NETWORKS)} only, not {name!r}: served by the torch backend"
    if any(len(k) != 3 for k in network.get("kernel_sizes") or []):
        return "ONNX export is checked for 3D U-Nets only: served by the torch backend"
    return None


def export_onnx(model_dir: str | Path, opset: int = OPSET, verify: bool = True) -> dict[str, Any]:
    """Write ``model_dir/network.onnx`` for the package in ``model_dir``; returns what to record as ``onnx`` in
    ``model_package.json``: ``{"file", "opset", "patch_size", "torch", "max_abs_diff"}`` when written, else
    ``{"file": None, "reason": ...}``. Never raises for an unsupported network or a failed export: the package
    stays servable by the torch backend, and the reason says why it has no ONNX file."""
    import torch

    from medseg.inference.package import load_network

    model_dir = Path(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    plans = schemas.Plans.load(model_dir)
    reason = refusal(package)
    if reason:
        return {"file": None, "reason": reason}
    try:
        import onnx  # noqa: F401  (torch's exporter needs both; they come with the train extra)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return {"file": None, "reason": f"the ONNX exporter's packages are not installed ({exc.name}): pip install 'medseg-ops[train]'"}
    patch = network_patch_size(package, plans)
    network = load_network(model_dir, package, "cpu")
    in_channels = int(package.network["in_channels"])
    # a fixed seed: the check's input (and so the recorded difference) is the same on every export of one package
    example = torch.randn(2, in_channels, *patch, generator=torch.Generator().manual_seed(0))
    path = model_dir / ONNX_FILE
    captured = io.StringIO()
    try:
        # the exporter prints its progress on stdout; keep it out of the trainer's output (logged on failure)
        with contextlib.redirect_stdout(captured), torch.no_grad():
            torch.onnx.export(network, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
    except Exception as exc:  # the exporter raises many types; the package must still be written
        path.unlink(missing_ok=True)
        log.warning("ONNX export of %s failed: %s\n%s", model_dir, exc, captured.getvalue()[-2000:])
        return {"file": None, "reason": f"ONNX export failed: {str(exc).splitlines()[0][:300]}"}
    info: dict[str, Any] = {"file": ONNX_FILE, "opset": opset, "patch_size": patch, "torch": torch.__version__.split("+")[0],
                            "input": INPUT_NAME, "output": OUTPUT_NAME, "max_abs_diff": None}
    if verify:
        diff = _check_against_torch(path, network, example)
        if diff is not None and not diff <= MAX_ABS_DIFF:  # `not <=`: a NaN difference fails too
            path.unlink(missing_ok=True)
            return {"file": None, "reason": f"the exported network differs from torch by {diff:.3g} (> {MAX_ABS_DIFF}) in its logits"}
        info["max_abs_diff"] = diff
    return info


def _check_against_torch(path: Path, network: Any, example: Any) -> float | None:
    """Max abs difference of the logits of ONNX Runtime and torch on ``example``; None when ONNX Runtime is not installed."""
    import torch

    try:
        from medseg.inference.onnx_backend import OnnxNetwork
        onnx_network = OnnxNetwork(path, "cpu")
    except ImportError:
        return None
    with torch.no_grad():
        out = network(example)
        reference = (out[0] if isinstance(out, (list, tuple)) else out).float().numpy()
    return float(np.abs(onnx_network(example.numpy()) - reference).max())


def write_onnx(model_dir: str | Path) -> dict[str, Any]:
    """:func:`export_onnx` into a package folder and record the result as ``onnx`` in its ``model_package.json``."""
    info = export_onnx(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    package.onnx = info
    package.save(model_dir)
    if info.get("file") is None:
        log.info("model package %s: no %s (%s)", model_dir, ONNX_FILE, info.get("reason"))
    return info


__all__ = ["MAX_ABS_DIFF", "OPSET", "SUPPORTED_NETWORKS", "export_onnx", "refusal", "write_onnx"]
