"""Small real artefacts for tests: a tiny BraTS-like case and an untrained model package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medseg import schemas
from medseg.task import BRATS2023
from medseg.io import save_nifti
from medseg.preprocessing.planner import plan_patch
from medseg.networks.unet import build_network
from medseg.training.trainer import save_model_package


def write_case(folder: Path, shape=(24, 24, 24), seed: int = 0) -> tuple[list[Path], Path]:
    """Four channel NIfTI files (t1n, t1c, t2w, t2f) and a label file of a blob 'brain' with a 'tumour'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    brain = r < 0.8
    tumour = np.sqrt(((grid - 0.25) ** 2).sum(0)) < 0.25
    seg = np.zeros(shape, np.uint8)
    seg[tumour] = 2
    seg[np.sqrt(((grid - 0.25) ** 2).sum(0)) < 0.15] = 3
    seg[np.sqrt(((grid - 0.25) ** 2).sum(0)) < 0.08] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    paths = []
    for i, name in enumerate(BRATS2023.channels):
        img = (brain * (100 + 10 * i) + tumour * 50 + rng.normal(0, 5, shape) * brain).astype(np.float32)
        p = folder / f"case-{name}.nii.gz"
        save_nifti(p, img, affine)
        paths.append(p)
    label = folder / "case-seg.nii.gz"
    save_nifti(label, seg, affine)
    return paths, label


def make_model_package(out: Path, patch=(16, 16, 16)) -> Path:
    """An untrained (random-weight) but complete model package for BraTS-like inputs at 2 mm."""
    work = out.parent / f".{out.name}-pre"
    work.mkdir(parents=True, exist_ok=True)
    dataset = schemas.DatasetJson(name="Dataset001_Tiny", channel_names={str(i): c for i, c in enumerate(BRATS2023.channels)},
                                  labels=dict(BRATS2023.labels_dict()), numTraining=1, regions=dict(BRATS2023.regions_dict()))
    config = plan_patch(list(patch), [2.0, 2.0, 2.0], 4, 4, "cpu")
    plans = schemas.Plans(dataset_name=dataset.name, device_budget="cpu", channel_names=list(BRATS2023.channels),
                          labels=dict(BRATS2023.labels_dict()), regions=dict(BRATS2023.regions_dict()),
                          normalization=[{"channel": c, "scheme": "zscore_nonzero", "mean": 0, "std": 1, "lower": 0, "upper": 1} for c in BRATS2023.channels],
                          configurations={"3d_fullres": config})
    dataset.save(work)
    plans.save(work)
    torch.manual_seed(0)
    net = build_network(config["network"])
    return save_model_package(out, net.state_dict(), work, "3d_fullres", {"note": "untrained, for tests"})


# --------------------------------------------------------------------------- other tasks: a classifier, a 2D slice set
CLASSIFIER_SHAPE = (16, 16, 16)
CLASSIFIER_SPACING = (1.5, 1.5, 1.5)
SLICE_CHANNELS = ("pre_contrast", "flair", "post_contrast")  # the R, G, B colour channels of a Kaggle LGG slice


def _untrained_package(out: Path, dataset: schemas.DatasetJson, plans: schemas.Plans, configuration: str, topology: dict) -> Path:
    """Write ``dataset`` and ``plans`` beside each other, build ``topology`` with seeded random weights and package it."""
    from medseg.networks import build_network as build_any
    from medseg.training.checkpointing import save_model_package as save_package

    work = out.parent / f".{out.name}-pre"
    work.mkdir(parents=True, exist_ok=True)
    dataset.save(work)
    plans.save(work)
    torch.manual_seed(0)
    net = build_any(topology)
    return save_package(out, net.state_dict(), work, configuration, {"note": "untrained, for tests"}, network=topology)


def make_classifier_package(out: Path, classes=("CN", "MCI", "AD"), use_age: bool = True) -> Path:
    """An untrained ``classifier3d`` package (one channel ``image``, 16³ voxels at 1.5 mm, classes ``classes``, the
    covariate ``age`` in dataset.json; the network takes it when ``use_age``), as the classification adapter ingests."""
    from medseg.networks.registry import network_topology

    labels = {name: i for i, name in enumerate(classes)}
    dataset = schemas.DatasetJson(name="Dataset002_TinyCls", channel_names={"0": "image"}, labels=dict(labels), numTraining=1,
                                  task="classification", source_format="classification", covariates=["age"])
    config = plan_patch(list(CLASSIFIER_SHAPE), list(CLASSIFIER_SPACING), 1, len(classes), "cpu")
    plans = schemas.Plans(dataset_name=dataset.name, device_budget="cpu", channel_names=["image"], labels=dict(labels), regions={},
                          normalization=[{"channel": "image", "scheme": "zscore_nonzero", "mean": 0, "std": 1, "lower": 0, "upper": 1}],
                          configurations={"3d_fullres": config})
    topology = network_topology("classifier3d", None, in_channels=1, out_channels=len(classes), patch_size=list(CLASSIFIER_SHAPE),
                                widening=1, channels=[4, 8], feature_dim=16, hidden=16, dropout=0.0, use_age=bool(use_age),
                                input_size=list(CLASSIFIER_SHAPE), input_scale=1.0)
    topology.update(output="classes", classes=list(classes))
    return _untrained_package(out, dataset, plans, "3d_fullres", topology)


def write_classifier_case(folder: Path, k: int = 1, seed: int = 0) -> Path:
    """One subject's 16³ NIfTI 'head' at 1.5 mm: a bright ball with a dark central blob growing with the class index ``k``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in CLASSIFIER_SHAPE], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    image = (r < 0.85) * (100.0 + rng.normal(0, 3, CLASSIFIER_SHAPE))
    image[r < 0.2 + 0.2 * k] = 20.0
    path = folder / f"subject{k}-image.nii.gz"
    save_nifti(path, image.astype(np.float32), np.diag([*CLASSIFIER_SPACING, 1.0]))
    return path


def make_slice_package(out: Path, median_shape=(48, 40, 6)) -> Path:
    """An untrained 2D slice-set package as the Kaggle LGG adapter's dataset gives: channels pre_contrast, flair,
    post_contrast (the RGB of a slice), labels background/abnormality, dataset.json ``slice_axis`` 2, the planner's
    ``2d`` configuration (1 mm) with a ``unet2d`` network."""
    from medseg.networks.registry import network_topology

    labels = {"background": 0, "abnormality": 1}
    dataset = schemas.DatasetJson(name="Dataset003_TinySlices", channel_names={str(i): c for i, c in enumerate(SLICE_CHANNELS)}, labels=dict(labels),
                                  numTraining=1, regions={"abnormality": [1]}, source_format="lgg", slice_axis=2, primary_metric="iou")
    config = plan_patch(list(median_shape), [1.0, 1.0, 1.0], len(SLICE_CHANNELS), len(labels), "cpu", slice_axis=2)
    plans = schemas.Plans(dataset_name=dataset.name, device_budget="cpu", channel_names=list(SLICE_CHANNELS), labels=dict(labels),
                          regions={"abnormality": [1]},
                          normalization=[{"channel": c, "scheme": "zscore_nonzero", "mean": 0, "std": 1, "lower": 0, "upper": 1} for c in SLICE_CHANNELS],
                          configurations={"2d": config}, default_configuration="2d")
    topology = network_topology("unet2d", config["network"], patch_size=config["patch_size"], slice_axis=2)
    topology["output"] = "labels"
    return _untrained_package(out, dataset, plans, "2d", topology)


def slice_rgb(width: int = 48, height: int = 40, seed: int = 0) -> np.ndarray:
    """One asymmetric RGB 'slice' (rows × columns × 3, uint8): a bright off-centre blob on a head-like disc, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    y, x = (rows - height / 2) / (height / 2), (cols - width / 2) / (width / 2)
    head = (x**2 + y**2) < 0.8
    blob = ((x - 0.3) ** 2 + (y + 0.25) ** 2) < 0.06
    out = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        out[..., c] = head * (60 + 30 * c) + blob * (120 - 30 * c) + head * rng.normal(0, 6, (height, width))
    return np.clip(out, 0, 255).astype(np.uint8)


def write_slice_stack(folder: Path, pixels: np.ndarray, n_slices: int = 4) -> list[Path]:
    """The channel NIfTI files of a stack of ``n_slices`` copies of the RGB slice ``pixels`` (rows × columns × 3), laid
    out as the Kaggle LGG adapter does: ``volume[i, j, k] = slice_k[row j, column i]``, 1 mm, identity affine."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = np.stack([pixels] * n_slices, axis=0)  # (K, rows, columns, RGB)
    paths = []
    for index, channel in enumerate(SLICE_CHANNELS):
        path = folder / f"stack-{channel}.nii.gz"
        save_nifti(path, np.ascontiguousarray(stack[..., index].transpose(2, 1, 0)), np.eye(4))
        paths.append(path)
    return paths
