"""The ONNX Runtime backend against the torch backend on one case, as JSON (speed ratio and agreement).

    .venv/bin/python benchmarks/onnx_vs_torch.py [--shape 96] [--repeats 3] [--mirror] [--threads 2]

An untrained package of the planner's ``cpu`` plan for BraTS-like cases (4 channels, 4 labels, 2 mm; the U-Net
the default plan builds, exported at packaging as training does) predicts one ``--shape``³ case through
:meth:`Predictor.predict` with each backend, alternately ``--repeats`` times on the same number of threads
(torch.set_num_threads and ONNX Runtime's intra-op threads). Reported: the median seconds of each, their ratio
(onnx / torch), the max abs difference of the probabilities on the preprocessed grid and the Dice of each label
between the two segmentations. Timing on a shared 2-core machine varies run to run: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, default=96, help="edge of the cubic case, voxels (2 mm)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mirror", action="store_true", help="8-flip mirroring in both backends")
    p.add_argument("--threads", type=int, default=2, help="threads for each backend")
    a = p.parse_args(argv)
    os.environ["MEDSEG_ONNX_THREADS"] = str(a.threads)  # read when the ONNX session is made

    import numpy as np
    import torch

    from medseg.inference.predictor import Predictor, grid_probabilities
    from medseg.io import load_nifti
    from tests.factories import make_model_package, write_case

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="medseg-onnx-bench-") as tmp:
        work = Path(tmp)
        package = make_model_package(work / "model", patch=(a.shape,) * 3)  # plan for the case's size, as the planner would
        paths, _ = write_case(work / "case", shape=(a.shape,) * 3)
        predictors = {b: Predictor.from_package(package, device="cpu", mirror=a.mirror, backend=b) for b in ("torch", "onnx")}
        images = np.stack([load_nifti(p)[0] for p in paths]).astype(np.float32)
        affine = load_nifti(paths[0])[1]
        data, _ = predictors["torch"].network_input(images, affine, [2.0, 2.0, 2.0])
        probs = {b: grid_probabilities(pr.network, data, pr.patch_size, pr.output, mirror=a.mirror, device=pr.device) for b, pr in predictors.items()}
        seconds: dict[str, list[float]] = {"torch": [], "onnx": []}
        segs = {}
        for _ in range(a.repeats):  # alternate: load on the shared machine hits both alike
            for backend, predictor in predictors.items():
                start = time.perf_counter()
                segs[backend] = predictor.predict_files(paths).segmentation
                seconds[backend].append(time.perf_counter() - start)
        dice = {}
        for label in np.union1d(np.unique(segs["torch"]), np.unique(segs["onnx"])):
            t, o = segs["torch"] == label, segs["onnx"] == label
            dice[int(label)] = round(2 * float((t & o).sum()) / max(float(t.sum() + o.sum()), 1.0), 6)
        med = {b: statistics.median(s) for b, s in seconds.items()}
        print(json.dumps({
            "benchmark": "onnx_vs_torch", "shape": [a.shape] * 3, "grid": list(data.shape[1:]), "patch": predictors["torch"].patch_size,
            "mirror": a.mirror, "threads": a.threads, "repeats": a.repeats, "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "seconds": {b: [round(x, 3) for x in s] for b, s in seconds.items()},
            "median_s": {b: round(v, 3) for b, v in med.items()}, "ratio_onnx_to_torch": round(med["onnx"] / med["torch"], 3),
            "max_abs_diff_probabilities": float(np.abs(probs["onnx"] - probs["torch"]).max()),
            "dice_per_label": dice, "identical_voxels": float((segs["torch"] == segs["onnx"]).mean()),
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
