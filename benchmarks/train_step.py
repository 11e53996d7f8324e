"""Training step time and memory of the planned networks on this machine, as JSON.

    .venv/bin/python benchmarks/train_step.py                      # the cpu plan for 96³ synthetic data
    .venv/bin/python benchmarks/train_step.py --budgets cpu gpu:8  # and nnU-Net's reference-sized plan

Plans come from the real planner on the median shape of the demo's synthetic data (about 71×76×78 voxels
at 2.05×2.43×1.97 mm after cropping); random inputs, Dice+CE loss, AdamW, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from medseg.preprocessing.planner import plan_patch
from medseg.training.losses import build_loss
from medseg.networks.unet import build_network


def measure(budget: str, steps: int, median_shape: list[int], spacing: list[float]) -> dict:
    config = plan_patch(median_shape, spacing, 4, 4, budget)
    torch.manual_seed(0)
    net = build_network(config["network"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = build_loss("dice_ce")
    x = torch.randn(config["batch_size"], 4, *config["patch_size"])
    y = torch.randint(0, 4, (config["batch_size"], 1, *config["patch_size"]))
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels: not counted
        t0 = time.perf_counter()
        opt.zero_grad()
        out = net(x)
        loss = loss_fn(out if out.ndim == y.ndim else out[:, 0], y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return {
        "budget": budget, "patch_size": config["patch_size"], "batch_size": config["batch_size"],
        "features": config["network"]["features"], "n_parameters": config["n_parameters"],
        "estimated_memory_gib": config["estimated_memory_gib"],
        "step_seconds_median": round(times[len(times) // 2], 3), "step_seconds_min": round(times[0], 3), "steps": steps,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["cpu"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--median-shape", type=int, nargs=3, default=[71, 76, 78])
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.05, 2.43, 1.97])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = [measure(b, args.steps, args.median_shape, args.spacing) for b in args.budgets]
    print(json.dumps({"benchmark": "train_step", "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
