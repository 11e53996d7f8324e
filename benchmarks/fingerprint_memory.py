"""Peak Python-level memory of the dataset fingerprint for N cases, with and without the pooled-sample cap, as JSON.

    .venv/bin/python benchmarks/fingerprint_memory.py                 # 50 and 200 cases of 32³: about two minutes
    .venv/bin/python benchmarks/fingerprint_memory.py --cases 50 400

``benchmarks/scale.py`` found our preprocessing's largest process growing by ~0.16 MB per case (481 → 506 MB from
50 to 200 full-size cases): the fingerprint pooled 10⁴ foreground intensities per case and channel until the statistics
were taken. :func:`medseg.preprocessing.fingerprint.capped_samples_per_case` now caps the pool at
:data:`~medseg.preprocessing.fingerprint.MAX_SAMPLES` per channel. The pool does not depend on the image size (a fixed
number of voxels per case), so small synthetic cases show the same growth as full-size ones, quickly.

Measured with ``tracemalloc`` (numpy reports its buffers to it) around
:func:`~medseg.preprocessing.fingerprint.compute_fingerprint` with one worker (in process), for each N: ``capped``
(the code as it is) and ``uncapped`` (the cap lifted, as before). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import medseg.preprocessing.fingerprint as fingerprint
from medseg import schemas


def measure(dataset: Path, case_ids: list[str], cap: int) -> dict[str, Any]:
    """Peak traced MB of one fingerprint of ``case_ids`` with the pooled sample capped at ``cap`` per channel."""
    saved = fingerprint.capped_samples_per_case.__defaults__
    fingerprint.capped_samples_per_case.__defaults__ = (fingerprint.SAMPLES_PER_CASE, cap)
    try:
        tracemalloc.start()
        result = fingerprint.compute_fingerprint(dataset, case_ids, workers=1, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        fingerprint.capped_samples_per_case.__defaults__ = saved
    return {"cases": len(case_ids), "peak_mb": round(peak / 2**20, 2), "samples_per_case": result.samples_per_case}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[50, 200], help="case counts to fingerprint (default: 50 200)")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32], help="synthetic case shape (default: 32 32 32)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the synthetic dataset is written (default: a temporary folder)")
    a = parser.parse_args()
    from medseg.ingest.ingest import ingest
    from medseg.synth import generate_dataset

    root = a.work_dir or Path(tempfile.mkdtemp(prefix="fingerprint-memory-"))
    n_max = max(a.cases)
    generate_dataset(root / "raw", n_max, tuple(a.shape), seed=0, progress=True, anatomy="procedural")
    ingest(root / "raw", root / "dataset", n_folds=2, test_fraction=0.0, seed=0, progress=False)
    ids = sorted(c for fold in schemas.Splits.load(root / "dataset").folds for c in fold["val"])
    runs: dict[str, list[dict[str, Any]]] = {"capped": [], "uncapped": []}
    for n in sorted(a.cases):
        runs["capped"].append(measure(root / "dataset", ids[:n], fingerprint.MAX_SAMPLES))
        runs["uncapped"].append(measure(root / "dataset", ids[:n], 10**15))
    growth = {k: round(v[-1]["peak_mb"] / v[0]["peak_mb"], 3) for k, v in runs.items()}
    print(json.dumps({"benchmark": "fingerprint_memory", "shape": a.shape, "max_samples_per_channel": fingerprint.MAX_SAMPLES, "runs": runs,
                      "peak_growth_first_to_last_n": growth}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
