"""Batch prediction speed: ``medseg predict`` against ``nnUNetv2_predict``, same network, same weights, same cases.

    .venv/bin/python benchmarks/batch_inference_vs_nnunet.py                                  # 6 cases of 96³, 3 repeats each
    .venv/bin/python benchmarks/batch_inference_vs_nnunet.py --cases 4 --shape 64 64 64 --repeats 2

What is compared, in one run:

- **Data**: ``medseg synth`` cases (BraTS 2023-like, 4 channels, seed 0), ingested into nnU-Net's raw layout
  (``imagesTr/CASE_0000.nii.gz`` …). Both tools read that one folder.
- **Network**: an untrained U-Net of our CPU plan (``plan_patch`` on the cases' median cropped shape and median
  spacing, seeded random weights; softmax over the 4 labels), packaged as ``medseg predict`` loads it. nnU-Net
  gets a trained-model folder (``dataset.json``, ``plans.json`` with a ``3d_fullres`` configuration whose
  architecture is its ``PlainConvUNet`` of the same topology, ``fold_0/checkpoint_final.pth``) holding the same
  weights under nnU-Net's names (:func:`nnunet_state_dict`), spatial axes reversed: we index arrays as NIfTI
  (I, J, K), nnU-Net as SimpleITK (K, J, I) (its plans here use ``transpose_forward = [0, 1, 2]``). Our U-Net
  (MONAI ``DynUNet``) has convolutions without bias and instance norm without affine parameters, so the nnU-Net
  architecture is set to ``conv_bias: false`` and ``norm_op_kwargs.affine: false`` (its default planner says
  true for both); everything else (two conv-norm-LeakyReLU(0.01) per stage, strided convolutions down,
  transposed convolutions up, concatenation upsampled-first, 1×1 output convolution with bias) is the same
  architecture. The mapping is checked by running both networks on one random tensor
  (``max_logit_diff_of_the_weight_mapping``).
- **Preprocessing**: nnU-Net's plans say what ours says: the same target spacing (the cases' median spacing,
  so neither tool resamples cases at that spacing), crop to the nonzero region, z-score inside the nonzero
  mask per channel (``ZScoreNormalization`` with ``use_mask_for_norm``).
- **Prediction**: sliding window with ``--overlap`` (nnU-Net: ``-step_size 1 - overlap``), Gaussian weighting,
  mirroring off unless ``--mirror`` (both), CPU, the same torch thread count (``OMP_NUM_THREADS``; nnU-Net's CLI
  sets ``torch.set_num_threads(cpu_count)`` on CPU itself). nnU-Net's CLI runs its default pipeline: ``-npp``
  preprocessing and ``-nps`` export worker processes beside the network (``--nnunet-npp``/``--nnunet-nps``,
  default its own 3 and 3); ours predicts case after case in one process.
- **Timing**: the wall time of each tool's whole command over the whole folder (interpreter start, imports,
  model loading, reading, predicting and writing every case), repeated ``--repeats`` times, alternating which
  tool goes first. Cases per minute from each tool's median wall time; ``ratio`` = ours / nnU-Net (higher is
  better for us); ``ratio_per_repeat`` pairs each repeat's two runs (run back to back, so they share the
  machine's load of the moment) and ``ratio_median_of_repeats`` is their median. The absolute speed of this machine varies between days, the ratio within one run is what counts.
- **Equality**: the segmentations of the last repeat, per label: Dice between ours and nnU-Net's (pooled over
  all cases; null when neither has the label) and the fraction of voxels with equal labels. The preprocessed
  arrays are equal and the two networks agree to float rounding (the mapping check); what is left differs in
  the sliding window, and ``differences`` measures each part on ``--explain-cases`` cases (diagnostics, never timed):

  1. nnU-Net accumulates the Gaussian-weighted logits and the weights in float16 (``torch.half``), with a
     Gaussian of peak 10 whose far corners are fp16 subnormals, so near window borders its logits keep only a
     few bits (up to ~0.5 off on an untrained network's logits of a few units) and near-ties flip. nnU-Net
     predicts the cases again with those accumulators in float32 (a process of its venv rebinding
     ``torch.half``; its code otherwise as ``nnUNetv2_predict`` runs it): ``ours_vs_nnunet_fp32_accumulators``.
  2. The Gaussians differ: ours is centred at (size − 1) / 2 and floored at 1e-3 of its peak; nnU-Net's is a
     delta at ``size // 2`` blurred with σ = size / 8, its zeros raised to the smallest nonzero value. Where
     windows overlap, an untrained network's logits differ a lot between windows, so the blend shows it. Ours
     predicts the cases again with a Gaussian made nnU-Net's way (:func:`delta_gaussian`, patched into this
     process): ``ours_with_a_delta_gaussian_vs_nnunet_fp32_accumulators``.

  A case fitting in one window is unaffected by 2. Window placement could differ too (ours: step
  ``int(patch × (1 − overlap))``, the last window moved back; nnU-Net: steps spread evenly); the two coincide
  whenever an axis needs at most two windows.

The last line printed is one JSON object::

    {"ours_cases_per_min": .., "nnunet_cases_per_min": .., "ratio": .., "dice_per_label": {"0": .., "1": .., ...},
     "voxels_equal_fraction": .., "max_logit_diff_of_the_weight_mapping": .., "differences": {...}, "cases": .., "shape": [..], ...}

The nnU-Net venv is the one ``benchmarks/preprocess_vs_nnunet.py`` makes (``--cache-dir``), made on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_vs_nnunet import DEFAULT_CACHE, NNUNET_VERSION, BenchmarkError, ensure_nnunet_venv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 612
DATASET_NAME = f"Dataset{DATASET_ID:03d}_medsegbatch"
PLANS_NAME = "nnUNetPlans_medseg"
TRAINER = "nnUNetTrainer"
CONFIGURATION = "3d_fullres"
MAPPING_TOLERANCE = 1e-3  # float32 logits of the same network in two module trees: expect ~1e-5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the weight mapping (pure)
def reverse_spatial(tensor: Any) -> Any:
    """A convolution weight (out, in, *kernel) or transposed-convolution weight (in, out, *kernel) with the kernel's
    spatial axes reversed: our (I, J, K) kernels become nnU-Net's (K, J, I). Vectors (biases) are returned as they are."""
    if tensor.ndim < 3:
        return tensor
    return tensor.permute(0, 1, *range(tensor.ndim - 1, 1, -1)).contiguous()


def nnunet_state_dict(ours: dict[str, Any], n_stages: int) -> dict[str, Any]:
    """Our U-Net's state dict (MONAI ``DynUNet`` names, as ``medseg.networks.unet.build_unet`` makes it) under the
    names of nnU-Net's ``PlainConvUNet`` (``conv_bias=False``, instance norm without affine parameters, two
    convolutions per stage), spatial kernel axes reversed (:func:`reverse_spatial`).

    Only the parameters nnU-Net's forward pass uses without deep supervision are named: its aliases
    (``all_modules.N``, ``decoder.encoder.*``) and its unused low-resolution ``seg_layers`` are filled in by the
    loader beside the network. Our aliases (``skip_layers.*``) and deep-supervision heads are dropped.

    Raises:
        ValueError: a parameter this mapping does not know (a residual block, an affine norm, another network).
    """
    if n_stages < 2:
        raise ValueError(f"a U-Net needs at least 2 stages, got {n_stages}")
    out: dict[str, Any] = {}

    def block(prefix: str, target: str, key: str) -> bool:
        # "<prefix>.conv1.conv.weight" -> "<target>.convs.0.conv.weight"
        for j in (1, 2):
            if key == f"{prefix}.conv{j}.conv.weight":
                out[f"{target}.convs.{j - 1}.conv.weight"] = reverse_spatial(ours[key])
                return True
        return False

    for key in ours:
        if key.startswith("skip_layers.") or key.startswith("deep_supervision_heads."):
            continue
        parts = key.split(".")
        if parts[0] == "input_block" and block("input_block", "encoder.stages.0.0", key):
            continue
        if parts[0] == "downsamples" and int(parts[1]) < n_stages - 2 and block(f"downsamples.{parts[1]}", f"encoder.stages.{int(parts[1]) + 1}.0", key):
            continue
        if parts[0] == "bottleneck" and block("bottleneck", f"encoder.stages.{n_stages - 1}.0", key):
            continue
        if parts[0] == "upsamples" and int(parts[1]) < n_stages - 1:
            i = int(parts[1])
            if key == f"upsamples.{i}.transp_conv.conv.weight":
                out[f"decoder.transpconvs.{i}.weight"] = reverse_spatial(ours[key])
                continue
            if block(f"upsamples.{i}.conv_block", f"decoder.stages.{i}", key):
                continue
        if key in ("output_block.conv.conv.weight", "output_block.conv.conv.bias"):
            out[f"decoder.seg_layers.{n_stages - 2}.{parts[-1]}"] = reverse_spatial(ours[key])
            continue
        raise ValueError(f"no nnU-Net PlainConvUNet counterpart for {key!r} (residual blocks, affine norms and other networks are not mapped)")
    expected = 2 * n_stages + 3 * (n_stages - 1) + 2
    if len(out) != expected:
        raise ValueError(f"mapped {len(out)} tensors, a {n_stages}-stage U-Net has {expected}: the state dict is incomplete")
    return out


def to_nnunet_axes(values: list[Any]) -> list[Any]:
    """Per-axis values (spacing, patch, one kernel or stride) from our (I, J, K) to nnU-Net's (K, J, I)."""
    return list(values)[::-1]


# --------------------------------------------------------------------------- data and our package
def make_cases(work: Path, n_cases: int, shape: tuple[int, int, int]) -> Path:
    """``n_cases`` synthetic cases in nnU-Net's raw layout; returns the ingested dataset folder."""
    from medseg.ingest.ingest import ingest
    from medseg.synth import generate_dataset

    raw, dataset = work / "raw", work / "dataset"
    generate_dataset(raw, n_cases, shape, seed=0, progress=False)
    ingest(raw, dataset, n_folds=2, test_fraction=0.0, seed=0, progress=False)
    shutil.rmtree(raw)
    return dataset


def case_geometry(images_dir: Path, n_channels: int) -> dict[str, Any]:
    """Median spacing and median cropped (nonzero bounding box) shape of the cases, and per-channel foreground
    intensity statistics (nnU-Net's plans carry them; its z-score normalisation does not use them)."""
    from medseg.io import load_nifti, nifti_spacing, stack_channels
    from medseg.preprocessing.cropping import bounding_box, nonzero_mask

    cases = sorted({p.name[: -len("_0000.nii.gz")] for p in images_dir.glob("*_0000.nii.gz")})
    spacings, cropped, fg = [], [], [[] for _ in range(n_channels)]
    for case in cases:
        paths = [images_dir / f"{case}_{c:04d}.nii.gz" for c in range(n_channels)]
        images, _, header = stack_channels([load_nifti(p) for p in paths], [str(p) for p in paths])
        spacings.append([float(s) for s in nifti_spacing(header)])
        mask = nonzero_mask(np.asarray(images))
        cropped.append([b - a for a, b in bounding_box(mask)])
        for c in range(n_channels):
            fg[c].append(np.asarray(images[c], dtype=np.float64)[mask])
    stats = {}
    for c in range(n_channels):
        v = np.concatenate(fg[c])
        stats[str(c)] = {"max": float(v.max()), "mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
                         "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)), "std": float(v.std())}
    return {"cases": cases, "spacing": [float(x) for x in np.median(spacings, axis=0)], "spacings_differ": len({tuple(s) for s in spacings}) > 1,
            "median_cropped_shape": [int(x) for x in np.median(cropped, axis=0)], "foreground_intensity_properties_per_channel": stats}


def build_our_package(dataset: Path, work: Path, geometry: dict[str, Any], patch: list[int] | None) -> Path:
    """An untrained (seeded) U-Net of our CPU plan for these cases, as a model package."""
    import torch

    from medseg import schemas
    from medseg.networks import build_network
    from medseg.preprocessing.planner import plan_patch
    from medseg.training.checkpointing import save_model_package

    ds = schemas.DatasetJson.load(dataset)
    channels = [ds.channel_names[str(i)] for i in range(len(ds.channel_names))]
    labels = dict(ds.labels)
    if sorted(labels.values()) != list(range(len(labels))):
        raise BenchmarkError(f"labels must be 0..K-1 for nnU-Net's softmax channels, got {labels}")
    config = plan_patch(list(patch or geometry["median_cropped_shape"]), geometry["spacing"], len(channels), len(labels), "cpu")
    pre = work / "ours_plan"
    pre.mkdir(parents=True, exist_ok=True)
    dataset_json = schemas.DatasetJson(name=ds.name, channel_names=dict(ds.channel_names), labels=labels, numTraining=ds.numTraining)
    plans = schemas.Plans(dataset_name=ds.name, device_budget="cpu", channel_names=channels, labels=labels, regions={},
                          normalization=[{"channel": c, "scheme": "zscore_nonzero", "mean": 0, "std": 1, "lower": 0, "upper": 1} for c in channels],
                          configurations={CONFIGURATION: config})
    dataset_json.save(pre)
    plans.save(pre)
    torch.manual_seed(0)
    net = build_network(config["network"])
    os.environ.setdefault("MEDSEG_ONNX_EXPORT", "0")  # the torch backend is timed; no network.onnx needed
    return save_model_package(work / "ours_package", net.state_dict(), pre, CONFIGURATION, {"note": "untrained, for the batch inference benchmark"})


# --------------------------------------------------------------------------- the nnU-Net model folder
def nnunet_plans(plan: Any, geometry: dict[str, Any], n_channels: int) -> dict[str, Any]:
    """A plans.json whose 3d_fullres configuration is our plan in nnU-Net's terms (axes reversed)."""
    net = plan.network
    n_stages = len(net["features"])
    spacing = to_nnunet_axes(plan.spacing)
    median_shape = to_nnunet_axes(geometry["median_cropped_shape"])
    resample = "resample_data_or_seg_to_shape"
    configuration = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor", "batch_size": int(plan.batch_size),
        "patch_size": to_nnunet_axes(plan.patch_size), "median_image_size_in_voxels": median_shape, "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"] * n_channels, "use_mask_for_norm": [True] * n_channels,
        "resampling_fn_data": resample, "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": resample, "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": resample, "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages, "features_per_stage": [int(f) for f in net["features"]], "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [to_nnunet_axes(k) for k in net["kernel_sizes"]], "strides": [to_nnunet_axes(s) for s in net["strides"]],
                "n_conv_per_stage": [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": False, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": False},
                "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": DATASET_NAME, "plans_name": PLANS_NAME, "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": median_shape, "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "written by medseg benchmarks/batch_inference_vs_nnunet.py", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": geometry["foreground_intensity_properties_per_channel"],
    }


NNUNET_MODEL_WRITER = textwrap.dedent('''
    """In nnU-Net's venv: build the network from plans.json as nnUNetv2_predict does, load the mapped weights (filling
    nnU-Net's aliases), compare its logits with ours on one random tensor, write fold_0/checkpoint_final.pth."""
    import json, sys
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    args = json.loads(sys.argv[1])
    plans_manager = PlansManager(load_json(args["plans"]))
    cm = plans_manager.get_configuration(args["configuration"])
    dataset_json = load_json(args["dataset_json"])
    n_in = determine_num_input_channels(plans_manager, cm, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(plans_manager, cm, n_in, n_out, enable_deep_supervision=False)
    mapped = torch.load(args["mapped"], map_location="cpu", weights_only=True)
    state, kept_init, used = {}, [], set()
    for key, value in network.state_dict().items():
        canonical = key[len("decoder."):] if key.startswith("decoder.encoder.") else key
        canonical = canonical.replace(".all_modules.0.", ".conv.").replace(".all_modules.1.", ".norm.")
        if canonical in mapped:
            if tuple(mapped[canonical].shape) != tuple(value.shape):
                raise SystemExit(f"shape of {key}: nnU-Net {tuple(value.shape)}, mapped {tuple(mapped[canonical].shape)}")
            state[key] = mapped[canonical]
            used.add(canonical)
        elif key.startswith("decoder.seg_layers."):  # low-resolution heads: deep supervision only, unused at inference
            state[key] = value
            kept_init.append(key)
        else:
            raise SystemExit(f"no mapped weight for nnU-Net's {key}")
    unused = sorted(set(mapped) - used)
    if unused:
        raise SystemExit(f"mapped weights nnU-Net has no place for: {unused}")
    network.load_state_dict(state)
    network.eval()
    x = torch.from_numpy(np.load(args["x"]))  # ours: (1, C, I, J, K)
    with torch.no_grad():
        theirs = network(x.permute(0, 1, 4, 3, 2).contiguous()).permute(0, 1, 4, 3, 2)
    ours = torch.from_numpy(np.load(args["ours_logits"]))
    diff = float((theirs - ours).abs().max())
    torch.save({"network_weights": state, "trainer_name": "nnUNetTrainer", "init_args": {"configuration": args["configuration"]},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0}, args["checkpoint"])
    print(json.dumps({"max_logit_diff": diff, "logit_scale": float(ours.abs().max()), "n_parameters": sum(p.numel() for p in network.parameters()),
                      "kept_initialised_unused": kept_init, "network": type(network).__name__}), flush=True)
''')


def write_nnunet_model(venv: Path, work: Path, package: Path, geometry: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's results tree with our package's network and weights; returns the mapping check."""
    import torch

    from medseg import schemas
    from medseg.inference.package import load_network

    pkg = schemas.ModelPackage.load(package)
    plans = schemas.Plans.load(package)
    plan = plans.configuration(pkg.configuration)
    ds = schemas.DatasetJson.load(package)
    n_channels = len(ds.channel_names)
    results = work / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"
    (results / "fold_0").mkdir(parents=True, exist_ok=True)
    (results / "dataset.json").write_text(json.dumps({"channel_names": dict(ds.channel_names), "labels": dict(ds.labels),
                                                      "numTraining": int(ds.numTraining), "file_ending": ".nii.gz"}, indent=2))
    (results / "plans.json").write_text(json.dumps(nnunet_plans(plan, geometry, n_channels), indent=2))
    network = load_network(package, pkg, "cpu")
    scratch = work / "mapping"
    scratch.mkdir(exist_ok=True)
    torch.save(nnunet_state_dict(network.state_dict(), len(plan.network["features"])), scratch / "mapped.pt")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, n_channels, *plan.patch_size), generator=gen)
    with torch.no_grad():
        logits = network(x)
    np.save(scratch / "x.npy", x.numpy())
    np.save(scratch / "ours_logits.npy", logits.numpy())
    (scratch / "writer.py").write_text(NNUNET_MODEL_WRITER)
    settings = {"plans": str(results / "plans.json"), "dataset_json": str(results / "dataset.json"), "configuration": CONFIGURATION,
                "mapped": str(scratch / "mapped.pt"), "x": str(scratch / "x.npy"), "ours_logits": str(scratch / "ours_logits.npy"),
                "checkpoint": str(results / "fold_0" / "checkpoint_final.pth")}
    proc = subprocess.run([str(venv / "bin" / "python"), str(scratch / "writer.py"), json.dumps(settings)], capture_output=True, text=True,
                          env=nnunet_env(work, 1))
    if proc.returncode != 0:
        raise BenchmarkError(f"writing the nnU-Net model failed: {(proc.stdout + proc.stderr)[-3000:]}")
    check = json.loads(proc.stdout.strip().splitlines()[-1])
    check["ours_n_parameters"] = int(sum(p.numel() for p in network.parameters()))
    return check


# --------------------------------------------------------------------------- running the tools
def nnunet_env(work: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"), nnUNet_results=str(work / "nnUNet_results"),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), nnUNet_compile="false")
    return env


def ours_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MEDSEG_INFERENCE_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def timed(cmd: list[str], env: dict[str, str], log_file: Path, step: str) -> float:
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise BenchmarkError(f"{step} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return seconds


def ours_command(package: Path, inputs: Path, out: Path, overlap: float, mirror: bool) -> list[str]:
    cmd = [sys.executable, "-m", "medseg", "predict", "--model", str(package), "--input", str(inputs), "--out", str(out),
           "--overlap", str(overlap), "--backend", "torch"]
    return cmd + (["--mirror"] if mirror else [])


def nnunet_command(venv: Path, inputs: Path, out: Path, overlap: float, mirror: bool, npp: int, nps: int) -> list[str]:
    cmd = [str(venv / "bin" / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-p", PLANS_NAME, "-tr", TRAINER,
           "-c", CONFIGURATION, "-f", "0", "-step_size", f"{1.0 - overlap:g}", "-device", "cpu", "-npp", str(npp), "-nps", str(nps),
           "--disable_progress_bar"]
    return cmd + ([] if mirror else ["--disable_tta"])


# --------------------------------------------------------------------------- comparing the segmentations
def compare_segmentations(ours_dir: Path, nnunet_dir: Path, cases: list[str], labels: list[int]) -> dict[str, Any]:
    """Dice per label between the two tools' segmentations (pooled over the cases) and the fraction of equal voxels."""
    import nibabel as nib

    inter = dict.fromkeys(labels, 0)
    total = dict.fromkeys(labels, 0)
    equal, voxels, per_case, affine_mismatch = 0, 0, {}, []
    for case in cases:
        a_img, b_img = nib.load(ours_dir / f"{case}.nii.gz"), nib.load(nnunet_dir / f"{case}.nii.gz")
        a, b = np.asarray(a_img.dataobj).astype(np.int16), np.asarray(b_img.dataobj).astype(np.int16)
        if a.shape != b.shape:
            raise BenchmarkError(f"{case}: segmentation shapes differ, ours {a.shape}, nnU-Net {b.shape}")
        if not np.allclose(a_img.affine, b_img.affine, atol=1e-3):
            affine_mismatch.append(case)
        for label in labels:
            in_a, in_b = a == label, b == label
            inter[label] += int((in_a & in_b).sum())
            total[label] += int(in_a.sum() + in_b.sum())
        same = int((a == b).sum())
        equal += same
        voxels += a.size
        per_case[case] = round(same / a.size, 6)
    dice = {str(label): (round(2 * inter[label] / total[label], 6) if total[label] else None) for label in labels}
    return {"dice_per_label": dice, "voxels_equal_fraction": round(equal / voxels, 6), "voxels_equal_per_case": per_case,
            "voxels_per_label": {str(label): total[label] for label in labels},
            "cases_with_different_affines": affine_mismatch}


NNUNET_FP32_RUNNER = textwrap.dedent('''
    """Diagnostic only (never timed): nnU-Net's own prediction of some cases with its sliding-window accumulators in
    float32. Its predictor allocates them as ``torch.half`` by name; this process alone rebinds that name to
    float32 before predicting, everything else is its code as nnUNetv2_predict runs it."""
    import json, sys
    import torch

    args = json.loads(sys.argv[1])
    torch.half = torch.float32
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(args["threads"])
    predictor = nnUNetPredictor(tile_step_size=args["step_size"], use_gaussian=True, use_mirroring=args["mirror"], perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args["model"], (0,), "checkpoint_final.pth")
    predictor.predict_from_files_sequential(args["inputs"], args["outputs"], save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None)
    print(json.dumps({"done": len(args["inputs"])}), flush=True)
''')


def explain_differences(venv: Path, work: Path, inputs: Path, cases: list[str], ours_dir: Path, labels: list[int], n_channels: int, overlap: float,
                        mirror: bool, threads: int) -> dict[str, Any]:
    """Where the two segmentations differ, is it nnU-Net's float16 accumulation? nnU-Net's sliding window sums
    Gaussian-weighted logits and the weights in ``torch.half``, with a Gaussian scaled to a peak of 10 whose far
    corners are fp16 subnormals; near window borders the logits keep only a few bits. ``cases`` are predicted
    again by nnU-Net with those accumulators in float32 (:data:`NNUNET_FP32_RUNNER`, not timed) and compared with ours."""
    out = work / "pred_nnunet_fp32"
    out.mkdir(exist_ok=True)
    script = work / "nnunet_fp32.py"
    script.write_text(NNUNET_FP32_RUNNER)
    settings = {"model": str(work / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"), "step_size": 1.0 - overlap,
                "mirror": mirror, "threads": threads, "inputs": [[str(inputs / f"{c}_{k:04d}.nii.gz") for k in range(n_channels)] for c in cases],
                "outputs": [str(out / c) for c in cases]}
    timed([str(venv / "bin" / "python"), str(script), json.dumps(settings)], nnunet_env(work, threads), work / "logs" / "nnunet_fp32.log",
          "nnU-Net float32 diagnostic")
    ours_delta = work / "pred_ours_delta_gaussian"
    predict_with_delta_gaussian(work / "ours_package", inputs, cases, n_channels, ours_delta, overlap, mirror)
    fp32 = compare_segmentations(ours_dir, out, cases, labels)
    both = compare_segmentations(ours_delta, out, cases, labels)
    return {"cases": cases,
            "ours_vs_nnunet_fp32_accumulators": {"dice_per_label": fp32["dice_per_label"], "voxels_equal_fraction": fp32["voxels_equal_fraction"]},
            "ours_with_a_delta_gaussian_vs_nnunet_fp32_accumulators": {"dice_per_label": both["dice_per_label"], "voxels_equal_fraction": both["voxels_equal_fraction"]},
            "what": "diagnostics, not timed: nnU-Net with its sliding-window accumulators in float32 instead of float16; then also ours with the "
                    "Gaussian made as nnU-Net makes it (a delta at size // 2 blurred with sigma = size / 8, zeros raised to the smallest "
                    "nonzero value) instead of ours (centred at (size - 1) / 2, floored at 1e-3)"}


def delta_gaussian(patch_size: list[int], sigma_scale: float = 0.125) -> Any:
    """A Gaussian importance map made the way nnU-Net's sliding window makes its own (diagnostic only): a unit delta
    at index ``size // 2`` of each axis blurred with σ = ``sigma_scale`` × size (scipy, zero outside), peak 1,
    zeros raised to the smallest nonzero weight. Ours is centred between voxels for even sizes and floored at 1e-3."""
    import torch
    from scipy.ndimage import gaussian_filter

    delta = np.zeros(patch_size, dtype=np.float64)
    delta[tuple(s // 2 for s in patch_size)] = 1.0
    g = gaussian_filter(delta, [s * sigma_scale for s in patch_size], 0, mode="constant", cval=0.0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return torch.from_numpy(g.astype(np.float32))


def predict_with_delta_gaussian(package: Path, inputs: Path, cases: list[str], n_channels: int, out: Path, overlap: float, mirror: bool) -> None:
    """Our predictor on ``cases`` with :func:`delta_gaussian` in place of our window weights (in this process only)."""
    from medseg.inference import sliding_window
    from medseg.inference.predictor import Predictor
    from medseg.io import save_nifti

    original = sliding_window.gaussian_importance
    sliding_window.gaussian_importance = lambda patch, sigma_scale=0.125, device=None: delta_gaussian(list(patch), sigma_scale).to(device or "cpu")
    try:
        predictor = Predictor.from_package(package, device="cpu", overlap=overlap, mirror=mirror, backend="torch")
        out.mkdir(parents=True, exist_ok=True)
        for case in cases:
            prediction = predictor.predict_files([inputs / f"{case}_{c:04d}.nii.gz" for c in range(n_channels)])
            save_nifti(out / f"{case}.nii.gz", prediction.segmentation, prediction.affine, prediction.header)
    finally:
        sliding_window.gaussian_importance = original


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="synthetic cases (default 6)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], metavar=("I", "J", "K"), help="case shape in voxels (default 96 96 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each tool, alternating (default 3)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, both tools (nnU-Net: -step_size 1 - overlap; default 0.5)")
    parser.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation, both tools (default off)")
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("I", "J", "K"),
                        help="plan for this shape instead of the cases' median cropped shape (a smaller patch means several windows per case)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both tools (default: the usable cores)")
    parser.add_argument("--nnunet-npp", type=int, default=3, help="nnUNetv2_predict -npp, its preprocessing workers (default 3, its own)")
    parser.add_argument("--nnunet-nps", type=int, default=3, help="nnUNetv2_predict -nps, its export workers (default 3, its own)")
    parser.add_argument("--explain-cases", type=int, default=2, help="cases nnU-Net predicts again with float32 accumulators, to explain the differences (default 2; 0: skip; not timed)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where the nnU-Net venv lives (default {DEFAULT_CACHE})")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data, models and predictions here (default: a temporary folder, removed)")
    args = parser.parse_args()
    if not 0.0 <= args.overlap < 1.0 or args.repeats < 1 or args.cases < 1:
        parser.error("--overlap must be in [0, 1), --repeats and --cases at least 1")

    report: dict[str, Any] = {"benchmark": "batch_inference_vs_nnunet", "cases": args.cases, "shape": list(args.shape), "repeats": args.repeats,
                              "overlap": args.overlap, "nnunet_step_size": round(1.0 - args.overlap, 6), "mirror": args.mirror, "threads": args.threads,
                              "device": "cpu", "nnunet_npp": args.nnunet_npp, "nnunet_nps": args.nnunet_nps,
                              "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    try:
        venv, info = ensure_nnunet_venv(args.cache_dir, NNUNET_VERSION)
    except BenchmarkError as exc:
        print(json.dumps({**report, "error": str(exc)}))
        return 2
    import torch

    import medseg

    report["versions"] = {"medseg": medseg.__version__, "torch_ours": torch.__version__, "nnunetv2": info.get("nnunetv2"), "torch_nnunet": info.get("torch")}
    temporary = args.work_dir is None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medseg-batch-bench-"))
    if work.exists() and not temporary:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"synthesising {args.cases} cases of {tuple(args.shape)} ...")
        dataset = make_cases(work, args.cases, tuple(args.shape))
        inputs = dataset / "imagesTr"
        from medseg import schemas

        ds = schemas.DatasetJson.load(dataset)
        geometry = case_geometry(inputs, len(ds.channel_names))
        log("building our package and the nnU-Net model folder ...")
        package = build_our_package(dataset, work, geometry, args.patch)
        check = write_nnunet_model(venv, work, package, geometry)
        plan = schemas.Plans.load(package).configuration(CONFIGURATION)
        report["network"] = {"ours": "medseg unet (MONAI DynUNet), untrained, seed 0", "nnunet": f"{check['network']} (dynamic_network_architectures)",
                             "features": plan.network["features"], "kernel_sizes": plan.network["kernel_sizes"], "strides": plan.network["strides"],
                             "patch_size": plan.patch_size, "patch_size_nnunet_axes": to_nnunet_axes(plan.patch_size),
                             "n_parameters_ours": check["ours_n_parameters"], "n_parameters_nnunet": check["n_parameters"],
                             "nnunet_unused_initialised": check["kept_initialised_unused"]}
        report["spacing"] = geometry["spacing"]
        report["case_spacings_differ"] = geometry["spacings_differ"]
        report["median_cropped_shape"] = geometry["median_cropped_shape"]
        report["max_logit_diff_of_the_weight_mapping"] = check["max_logit_diff"]
        report["logit_max_abs"] = check["logit_scale"]
        if not check["max_logit_diff"] <= MAPPING_TOLERANCE:
            raise BenchmarkError(f"the weight mapping is wrong: max |logit difference| {check['max_logit_diff']:.3g} > {MAPPING_TOLERANCE}")
        log(f"weight mapping checked: max |logit difference| {check['max_logit_diff']:.3g}")

        walls: dict[str, list[float]] = {"ours": [], "nnunet": []}
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        for r in range(args.repeats):
            order = ("ours", "nnunet") if r % 2 == 0 else ("nnunet", "ours")
            for tool in order:
                out = work / f"pred_{tool}_{r}"
                if tool == "ours":
                    cmd, env = ours_command(package, inputs, out, args.overlap, args.mirror), ours_env(args.threads)
                else:
                    cmd, env = nnunet_command(venv, inputs, out, args.overlap, args.mirror, args.nnunet_npp, args.nnunet_nps), nnunet_env(work, args.threads)
                seconds = timed(cmd, env, logs / f"{tool}_{r}.log", f"{tool} prediction, repeat {r + 1}")
                walls[tool].append(round(seconds, 3))
                log(f"repeat {r + 1}: {tool} {seconds:.1f} s")
                if r < args.repeats - 1:
                    shutil.rmtree(out)
        last = args.repeats - 1
        labels = sorted(int(v) for v in ds.labels.values())
        report.update(compare_segmentations(work / f"pred_ours_{last}", work / f"pred_nnunet_{last}", geometry["cases"], labels))
        log("explaining the differences ...")
        report["differences"] = explain_differences(venv, work, inputs, geometry["cases"][: args.explain_cases], work / f"pred_ours_{last}", labels,
                                                    len(ds.channel_names), args.overlap, args.mirror, args.threads) if args.explain_cases > 0 else None
        med = {tool: statistics.median(w) for tool, w in walls.items()}
        report["ours_cases_per_min"] = round(args.cases / med["ours"] * 60.0, 3)
        report["nnunet_cases_per_min"] = round(args.cases / med["nnunet"] * 60.0, 3)
        report["ratio"] = round(report["ours_cases_per_min"] / report["nnunet_cases_per_min"], 3)
        report["wall_s"] = walls
        report["ratio_per_repeat"] = [round(n / o, 3) for o, n in zip(walls["ours"], walls["nnunet"])]
        report["ratio_median_of_repeats"] = round(statistics.median(report["ratio_per_repeat"]), 3)  # paired: robust to load shifting between repeats
        report["commands"] = {"ours": "python -m medseg predict --model PACKAGE --input DIR --out DIR --overlap O --backend torch" + (" --mirror" if args.mirror else ""),
                              "nnunet": " ".join(nnunet_command(Path("VENV"), Path("DIR"), Path("OUT"), args.overlap, args.mirror, args.nnunet_npp, args.nnunet_nps)[1:])}
        report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    except BenchmarkError as exc:
        report["error"] = str(exc)
        print(json.dumps(report))
        return 1
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
