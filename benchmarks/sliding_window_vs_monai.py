"""Sliding-window inference: ours vs ``monai.inferers.sliding_window_inference``, as JSON.

    .venv/bin/python benchmarks/sliding_window_vs_monai.py                 # 240×240×155, no mirroring
    .venv/bin/python benchmarks/sliding_window_vs_monai.py --mirror        # with 8-flip mirroring
    .venv/bin/python benchmarks/sliding_window_vs_monai.py --evaluate-cases 20   # + medseg evaluate per case

Same network (the planner's ``cpu`` plan for BraTS-sized data: 4 channels, 4 classes), same ROI, overlap
and Gaussian weighting (σ = 1/8). MONAI gets the same per-window mirroring (its predictor averages the
flipped windows' logits), so both compute the same thing and the outputs must agree (max abs difference
of probabilities < 1e-4). The two run alternately ``--repeats`` times; the median of each is reported.
Target: ours ≤ 1.0× MONAI's time. Timing on this shared 2-core machine varies run to run: compare
numbers of one run only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def monai_probabilities(network: torch.nn.Module, volume: np.ndarray, patch: list[int], overlap: float, mirror: bool) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    flips = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)] if mirror else [()]

    def forward(window: torch.Tensor) -> torch.Tensor:
        total = None
        for axes in flips:
            out = network(torch.flip(window, axes) if axes else window)
            out = out[:, 0] if out.ndim == window.ndim + 1 else out
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
        return total / len(flips)

    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(volume)[None], roi_size=patch, sw_batch_size=2, predictor=forward,
                                          overlap=overlap, mode="gaussian", sigma_scale=0.125)
    return torch.softmax(logits, dim=1)[0].numpy()


def time_evaluate(n_cases: int, shape: tuple[int, int, int]) -> dict:
    """Seconds per case of ``medseg evaluate`` (metrics only: predictions and labels already on disk)."""
    from medseg.evaluation.report import evaluate_folder
    from medseg.io import save_nifti
    from medseg.schemas import DatasetJson
    from medseg.task import BRATS2023
    BRATS_CHANNELS, BRATS_LABELS, BRATS_REGIONS = BRATS2023.channels, BRATS2023.labels_dict(), BRATS2023.regions_dict()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir, label_dir = Path(tmp) / "pred", Path(tmp) / "labels"
        pred_dir.mkdir()
        label_dir.mkdir()
        affine = np.eye(4)
        grid = np.indices(shape).astype(np.float32)
        for i in range(n_cases):
            centre = np.array(shape) / 2 + rng.normal(0, 5, 3)
            r = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
            ref = np.select([r < 8, r < 14, r < 25], [3, 1, 2], 0).astype(np.uint8)
            shift = rng.integers(-2, 3, 3)
            pred = np.roll(ref, tuple(int(s) for s in shift), axis=(0, 1, 2))
            save_nifti(label_dir / f"case{i:03d}.nii.gz", ref, affine)
            save_nifti(pred_dir / f"case{i:03d}.nii.gz", pred, affine)
        dataset = DatasetJson(name="bench", channel_names={str(i): c for i, c in enumerate(BRATS_CHANNELS)},
                              labels=dict(BRATS_LABELS), numTraining=n_cases, regions={k: list(v) for k, v in BRATS_REGIONS.items()},
                              source_format="brats2023")
        start = time.perf_counter()
        evaluate_folder(pred_dir, label_dir, dataset, Path(tmp) / "eval", progress=False)
        seconds = time.perf_counter() - start
    return {"cases": n_cases, "shape": list(shape), "seconds_total": round(seconds, 2), "seconds_per_case": round(seconds / n_cases, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="volume size (default: 240 240 155)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--mirror", action="store_true", help="8-flip mirroring for both")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each (default: 2)")
    parser.add_argument("--budget", default="cpu", help="planner device budget of the network (default: cpu)")
    parser.add_argument("--evaluate-cases", type=int, default=0, help="also time medseg evaluate on N cases (metrics only)")
    args = parser.parse_args()

    from medseg.inference.sliding_window import predict_probabilities
    from medseg.preprocessing.planner import plan_patch
    from medseg.networks.unet import build_network

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = plan_patch([int(s * 0.6) for s in args.shape], [1.0, 1.0, 1.0], 4, 4, args.budget)
    patch = [int(p) for p in config["patch_size"]]
    torch.manual_seed(0)
    network = build_network(config["network"]).eval()
    volume = np.random.default_rng(0).normal(size=(4, *args.shape)).astype(np.float32)

    ours_s, monai_s = [], []
    ours = ref = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = predict_probabilities(network, volume, patch, overlap=args.overlap, mirror=args.mirror)
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = monai_probabilities(network, volume, patch, args.overlap, args.mirror)
        monai_s.append(time.perf_counter() - start)
    assert ours is not None and ref is not None
    result = {
        "shape": args.shape,
        "channels": 4,
        "patch": patch,
        "overlap": args.overlap,
        "mirror": args.mirror,
        "repeats": args.repeats,
        "ours_s": round(statistics.median(ours_s), 2),
        "monai_s": round(statistics.median(monai_s), 2),
        "ratio": round(statistics.median(ours_s) / statistics.median(monai_s), 3),
        "target_ratio": 1.0,
        "max_abs_prob_diff": float(np.abs(ours - ref).max()),
        "agree_1e-4": bool(np.abs(ours - ref).max() < 1e-4),
        "all_runs_s": {"ours": [round(s, 2) for s in ours_s], "monai": [round(s, 2) for s in monai_s]},
    }
    if args.evaluate_cases:
        result["evaluate"] = time_evaluate(args.evaluate_cases, (128, 128, 128))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
