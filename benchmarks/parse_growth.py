"""How much memory a request body takes in the model server once parsed, per byte of body, by encoding.

The admission gate (:mod:`medseg.serving.limits`, ``PARSE_GROWTH``) charges each admitted request its body bytes
times this growth against the memory budget. Measured on the real KServe model server (a subprocess on
127.0.0.1, the untrained test package at 2 mm): before each request the server's peak-RSS mark is reset
(``/proc/PID/clear_refs`` ← 5), after it the peak above the RSS just before (``VmHWM - VmRSS``) is divided by the
body size. Two kinds of request per encoding:

- ``parse``: the case with one NaN voxel at the end: the whole body is read and decoded into the float32 array
  (KServe's JSON parser and pydantic for JSON; the guard's zero-copy view for the binary extension), then
  refused (400) before prediction: the memory of parsing alone;
- ``full``: the valid case through prediction and encoding (resampling, normalisation and the network's
  activations come on top; they grow with the volume, not with its encoding).

Usage: ``python benchmarks/parse_growth.py [--size 64] [--repeats 3] [--json-out FILE]``. Prints one line per
(encoding, kind) with the median growth.
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

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg.serving import client, server  # noqa: E402
from tests.factories import make_model_package  # noqa: E402


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def peak_growth(url: str, pid: int, body: bytes, headers: dict[str, str], expect: int) -> float:
    """Peak RSS above the RSS before the request, per body byte."""
    time.sleep(1.5)  # let the heap trimmer run after the previous request
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status(pid)["VmRSS"]
    response = httpx.post(f"{url}/v2/models/bench/infer", content=body, headers=headers, timeout=600)
    assert response.status_code == expect, response.text[:300]
    peak = _status(pid)["VmHWM"]
    return (peak - before) / len(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="edge of the cubic 4-channel case (voxels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short-numbers", action="store_true",
                        help="voxel values 0..9 (JSON text '3.0, ': the most values per body byte, the worst case for JSON)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="parse-growth-"))
    package = make_model_package(work / "model")
    port = server.free_port()
    proc = server.start_server_process(package, "bench", port, log_file=work / "server.log", env={"OMP_NUM_THREADS": "1"},
                                       extra_args=["--reload-interval", "0", "--max-request-mb", "1000", "--max-voxels", str(2**24),
                                                   "--timeout", "600", "--memory-budget-mb", "100000"])
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict[str, float]] = {}
    try:
        server.wait_until_ready(url, "bench", timeout_s=120, proc=proc)
        rng = np.random.default_rng(0)
        n = args.size
        images = (rng.random((4, n, n, n), dtype=np.float32) * 100 + 50).astype(np.float32)
        if args.short_numbers:
            images = np.floor(images / 10).astype(np.float32)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        nan_images = images.copy()
        nan_images[-1, -1, -1, -1] = np.nan
        for encoding, binary in (("binary", True), ("json", False)):
            for kind, data, expect in (("parse", nan_images, 400), ("full", images, 200)):
                body, headers = client.volume_request(data, affine, binary=binary)
                growths = [peak_growth(url, proc.pid, body, headers, expect) for _ in range(args.repeats)]
                results[f"{encoding}/{kind}"] = {"body_mib": len(body) / 2**20, "growth_median": statistics.median(growths),
                                                 "growth_max": max(growths)}
                print(f"{encoding:6s} {kind:5s} body {len(body) / 2**20:7.1f} MiB  peak RSS growth per body byte: median "
                      f"{statistics.median(growths):.2f}, max {max(growths):.2f}", flush=True)
    finally:
        server.stop_server(proc)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"size": args.size, "short_numbers": args.short_numbers, "cpus": os.cpu_count(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
