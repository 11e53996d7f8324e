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
