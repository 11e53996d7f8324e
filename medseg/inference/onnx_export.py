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
- Instance normalisation rewritten as plain ONNX ops (:func:`precise_instance_norm`): ONNX Runtime's
  ``InstanceNormalization`` loses float32 precision over a whole window (measured: its error grows with the window; a
  single-pass reduction is the likely cause), which on the default plan's
  64³ windows put its logits 6e-4 away from float64 (torch: 4e-5); means taken one axis at a time, and the
  variance as the mean of squared deviations, bring it to 2e-5 for ~10 % more time.
- Checked where it is written: when ONNX Runtime is installed, the file is run on a random window batch and
  compared with torch; a larger difference than :data:`MAX_ABS_DIFF` removes the file.
- Written under a temporary name and renamed, so re-exporting a package in place (``medseg export-onnx``) never
  leaves a half-written ``network.onnx`` beside a served package.
- ``MEDSEG_ONNX_EXPORT=0`` skips the export at packaging (it costs 5-10 s per package on a CPU; the test suite sets
  it, except where the ONNX backend is under test); such packages are served by the torch backend until
  ``medseg export-onnx`` adds the file.

Networks checked here: the plan's U-Net family in 3D (``unet``, ``resunet``) and ensembles of them. Others
(transformers, the 2D slice-wise U-Net, classifiers) are refused with the reason recorded in
``model_package.json`` (``onnx.reason``); those packages are served by the torch backend.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
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
EXPORT_ENV = "MEDSEG_ONNX_EXPORT"  # "0": packaging skips the export (see the module docstring)


def export_enabled() -> bool:
    """Whether packaging exports ``network.onnx`` (``$MEDSEG_ONNX_EXPORT`` is not ``0``/``false``/``no``/``off``)."""
    import os

    return os.environ.get(EXPORT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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


def precise_instance_norm(model: Any, n_spatial: int) -> int:
    """Replace every ``InstanceNormalization`` node of ``model`` (an ``onnx.ModelProto``, changed in place) by the same
    function in plain ops: mean and variance as nested one-axis ``ReduceMean`` (each sums one axis' few dozen values,
    so float32 rounding stays small), two passes (mean of squared deviations, not E[x²] − E[x]²), then scale and bias.
    Returns how many nodes were replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    spatial_axes = list(range(2, 2 + n_spatial))
    prefix = "medseg_instnorm"
    for axis in spatial_axes:
        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), f"{prefix}_axis{axis}"))
    graph.initializer.append(numpy_helper.from_array(np.array(list(range(1, 1 + n_spatial)), np.int64), f"{prefix}_param_axes"))

    def nested_mean(source: str, target: str, tag: str) -> list[Any]:
        nodes, current = [], source
        for axis in reversed(spatial_axes):  # innermost axis first: contiguous memory
            out = target if axis == spatial_axes[0] else f"{tag}_mean{axis}"
            nodes.append(helper.make_node("ReduceMean", [current, f"{prefix}_axis{axis}"], [out], keepdims=1))
            current = out
        return nodes

    replaced, nodes = 0, []
    for index, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization":
            nodes.append(node)
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        x, scale, bias = node.input
        tag = f"{prefix}{index}"
        graph.initializer.append(numpy_helper.from_array(np.array(epsilon, np.float32), f"{tag}_eps"))
        nodes += [
            *nested_mean(x, f"{tag}_mean", f"{tag}_a"),
            helper.make_node("Sub", [x, f"{tag}_mean"], [f"{tag}_dev"]),
            helper.make_node("Mul", [f"{tag}_dev", f"{tag}_dev"], [f"{tag}_sq"]),
            *nested_mean(f"{tag}_sq", f"{tag}_var", f"{tag}_b"),
            helper.make_node("Add", [f"{tag}_var", f"{tag}_eps"], [f"{tag}_vareps"]),
            helper.make_node("Sqrt", [f"{tag}_vareps"], [f"{tag}_std"]),
            helper.make_node("Div", [f"{tag}_dev", f"{tag}_std"], [f"{tag}_norm"]),
            # scale and bias are per channel (C,): unsqueezed to (C, 1, …) they broadcast over N×C×spatial
            helper.make_node("Unsqueeze", [scale, f"{prefix}_param_axes"], [f"{tag}_scale"]),
            helper.make_node("Unsqueeze", [bias, f"{prefix}_param_axes"], [f"{tag}_bias"]),
            helper.make_node("Mul", [f"{tag}_norm", f"{tag}_scale"], [f"{tag}_scaled"]),
            helper.make_node("Add", [f"{tag}_scaled", f"{tag}_bias"], [node.output[0]]),
        ]
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced


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
    tmp = model_dir / f".tmp-{os.getpid()}-{ONNX_FILE}"  # renamed onto `path` only once written and checked
    try:
        info = _export_to(tmp, network, example, patch, opset, verify, model_dir)
        if info.get("file") is not None:
            os.replace(tmp, path)
        return info
    finally:
        tmp.unlink(missing_ok=True)


def _export_to(tmp: Path, network: Any, example: Any, patch: list[int], opset: int, verify: bool, model_dir: Path) -> dict[str, Any]:
    """Export ``network`` to ``tmp``, rewrite its instance norms and check it; the ``onnx`` record (file None: refused)."""
    import onnx
    import torch

    captured = io.StringIO()
    try:
        # the exporter prints its progress on stdout; keep it out of the trainer's output (logged on failure)
        with contextlib.redirect_stdout(captured), torch.no_grad():
            torch.onnx.export(network, (example,), str(tmp), dynamo=True, external_data=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
    except Exception as exc:  # the exporter raises many types; the package must still be written
        log.warning("ONNX export of %s failed: %s\n%s", model_dir, exc, captured.getvalue()[-2000:])
        return {"file": None, "reason": f"ONNX export failed: {str(exc).splitlines()[0][:300]}"}
    model = onnx.load(str(tmp))
    rewritten = precise_instance_norm(model, len(patch))
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    info: dict[str, Any] = {"file": ONNX_FILE, "opset": opset, "patch_size": patch, "torch": torch.__version__.split("+")[0],
                            "input": INPUT_NAME, "output": OUTPUT_NAME, "instance_norms_rewritten": rewritten, "max_abs_diff": None}
    if verify:
        diff = _check_against_torch(tmp, network, example)
        if diff is not None and not diff <= MAX_ABS_DIFF:  # `not <=`: a NaN difference fails too
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


def members_onnx(members: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``onnx`` entry of a configuration ensemble from its members' (configuration → their ``onnx``): no file of its
    own; ``members`` true when every member has one (the ensemble then runs torch-free), else the reasons."""
    missing = [c for c, info in members.items() if not info.get("file")]
    if missing:
        return {"file": None, "members": False, "reason": f"member(s) without {ONNX_FILE}: " + "; ".join(f"{c}: {members[c].get('reason')}" for c in missing)}
    return {"file": None, "members": True, "reason": f"a configuration ensemble: each member package carries its own {ONNX_FILE}"}


def write_onnx(model_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """:func:`export_onnx` into a package folder and record the result as ``onnx`` in its ``model_package.json``.

    Packaging calls it with ``force=False``: ``MEDSEG_ONNX_EXPORT=0`` then records why there is no file instead.
    ``medseg export-onnx`` forces it."""
    package = schemas.ModelPackage.load(model_dir)
    if package.configuration_ensemble:  # each member package gets (or keeps) its own file; the ensemble runs them all
        from medseg.inference.configuration_ensemble import member_folders

        info: dict[str, Any] = members_onnx({m["configuration"]: write_onnx(folder, force)
                                             for m, folder in zip(package.configuration_ensemble, member_folders(model_dir, package))})
    elif not force and not export_enabled():
        info = {"file": None, "reason": f"export switched off at packaging ({EXPORT_ENV}=0): add it with medseg export-onnx"}
    else:
        info = export_onnx(model_dir)
    package = schemas.ModelPackage.load(model_dir)
    package.onnx = info
    package.save(model_dir)
    if info.get("file") is None:
        log.info("model package %s: no %s (%s)", model_dir, ONNX_FILE, info.get("reason"))
    return info


__all__ = ["EXPORT_ENV", "MAX_ABS_DIFF", "OPSET", "SUPPORTED_NETWORKS", "export_enabled", "export_onnx", "members_onnx", "refusal", "write_onnx"]
