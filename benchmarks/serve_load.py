"""Load test of the KServe model server on 127.0.0.1: latency, throughput, errors, memory, time outside the predictor.

    .venv/bin/python benchmarks/serve_load.py                                     # untrained planned network, 1 and 4 clients, 60 s each
    .venv/bin/python benchmarks/serve_load.py --model work/kfp/<run>/train/model --clients 1 4 --seconds 60 --soak 300
    .venv/bin/python benchmarks/serve_load.py --clients 1 2 --seconds 20 --soak 30   # a quick check

What it does: writes one 128³ 4-channel BraTS-like case (a phantom at 1 mm, int16, .nii.gz), starts the model
server (`medseg serve`, a subprocess on 127.0.0.1) with ``--model`` or, without it, an untrained package with
the network the planner picks for this case on CPU (same topology and cost as a trained one; ``--tiny``: a 16³
patch network, for smoke tests), sends a few warm-up requests, then for each ``--clients`` count N runs N
threads that each send the case (one BYTES input per channel, base64 in JSON, the body built once with
:func:`medseg.serving.client.build_request`) back to back for ``--seconds`` (at most ``--max-requests`` each).
``--soak S`` then keeps ``--soak-clients`` clients busy for S seconds and samples the server's RSS.

Reported per client count: p50/p95/p99/mean/max latency (s), throughput (requests/s), errors (non-200 or no
answer, with samples), the server's RSS before and after (MiB, psutil, the process and its children), and from
the Prometheus ``/metrics`` histograms the server exports (deltas over the phase): mean seconds per stage
(``medseg_stage_seconds``: preprocess = decode + checks, queue = waiting for a slot, predict = the predictor,
postprocess = encoding) and KServe's ``request_predict_seconds``, and

- ``outside_predictor_share`` = 1 − Σ predict seconds / Σ client latency: everything that is not the predictor
  (HTTP, JSON, base64, NIfTI decode/encode, queueing) as a share of what the client waits;
- ``outside_predictor_share_excl_queue``: the same with the queue wait left out of the latency;
- ``outside_forward_share_est``: the predictor itself also crops, resamples and restores the geometry; with
  ``--profile`` (default) the benchmark times one prediction of the same case in its own process and splits it
  into the sliding-window network forward and the rest; this share = 1 − Σ predict × forward fraction / Σ latency.

Targets (``targets`` in the JSON): outside-forward share ≤ 0.15 at 1 client (outside-predictor with ``--no-profile``), p99/p50 ≤ 1.5 at 4 clients,
zero errors, RSS growth < 5 % over the soak. The JSON is printed on stdout (last line) and with ``--out``
written to a file. Only 127.0.0.1 is contacted; every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medseg.task import BRATS2023
from medseg import schemas  # noqa: E402
from medseg.io import save_nifti  # noqa: E402
from medseg.serving import client, server  # noqa: E402

NAME = "brats-bench"
STAGES = ("preprocess", "queue", "predict", "postprocess")


# --------------------------------------------------------------------------- inputs
def write_case(folder: Path, shape: tuple[int, int, int] = (128, 128, 128), spacing: float = 1.0, seed: int = 0) -> list[Path]:
    """Four channel files (``case-{t1n,t1c,t2w,t2f}.nii.gz``, int16) of an ellipsoid 'brain' with a 'tumour' and noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    brain = (x / 0.75) ** 2 + (y / 0.88) ** 2 + (z / 0.7) ** 2 < 1
    d = np.sqrt((x - 0.25) ** 2 + (y - 0.1) ** 2 + (z - 0.1) ** 2)
    oedema, core, enhancing = d < 0.28, d < 0.16, (d < 0.16) & (d > 0.1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * spacing / 2 for n in shape]
    contrast = {"t1n": (400, -80, -120, 0), "t1c": (420, -60, -150, 500), "t2w": (300, 250, 350, 200), "t2f": (350, 300, 100, 150)}
    paths = []
    for channel in BRATS2023.channels:
        base, oed, cor, enh = contrast[channel]
        image = brain * (base + 30 * np.sin(6 * x) * np.cos(5 * y)) + oedema * oed + core * cor + enhancing * enh
        image = (image + rng.normal(0, 12, shape) * brain).clip(0, 32000).astype(np.int16)
        path = folder / f"case-{channel}.nii.gz"
        save_nifti(path, image, affine)
        paths.append(path)
    return paths


def build_package(out: Path, case_shape: tuple[int, int, int] = (128, 128, 128), case_spacing: float = 1.0, tiny: bool = False,
                  plan_spacing: float | None = None) -> Path:
    """An untrained model package: the network the planner picks on CPU for the case planned at ``plan_spacing`` mm
    (default: the case's own spacing, as nnU-Net's 3d_fullres keeps BraTS at its 1 mm; ``tiny``: a 16³ patch one)."""
    import torch

    from medseg.preprocessing.planner import plan_patch
    from medseg.networks.unet import build_network
    from medseg.training.trainer import save_model_package

    target = float(plan_spacing or case_spacing)
    spacing = [target] * 3
    median = [16, 16, 16] if tiny else [max(int(round(n * case_spacing / target)), 16) for n in case_shape]
    work = out.parent / f".{out.name}-pre"
    work.mkdir(parents=True, exist_ok=True)
    dataset = schemas.DatasetJson(name="Dataset900_Bench", channel_names={str(i): c for i, c in enumerate(BRATS2023.channels)},
                                  labels=dict(BRATS2023.labels_dict()), numTraining=1, regions=dict(BRATS2023.regions_dict()))
    config = plan_patch(median, spacing, len(BRATS2023.channels), len(BRATS2023.labels_dict()), "cpu")
    plans = schemas.Plans(dataset_name=dataset.name, device_budget="cpu", channel_names=list(BRATS2023.channels),
                          labels=dict(BRATS2023.labels_dict()), regions=dict(BRATS2023.regions_dict()),
                          normalization=[{"channel": c, "scheme": "zscore_nonzero", "mean": 0, "std": 1, "lower": 0, "upper": 1}
                                         for c in BRATS2023.channels],
                          configurations={"3d_fullres": config})
    dataset.save(work)
    plans.save(work)
    torch.manual_seed(0)
    net = build_network(config["network"])
    return save_model_package(out, net.state_dict(), work, "3d_fullres", {"note": "untrained, for the serving benchmark"})


def request_body(paths: list[Path]) -> bytes:
    """The V2 JSON body (one BYTES input per channel), built once and sent by every request."""
    return json.dumps(client.build_request(paths, list(BRATS2023.channels), request_id="bench")).encode()


# --------------------------------------------------------------------------- measuring
def server_rss_mib(pid: int) -> float:
    """Resident memory of the server process and its children, MiB (0 if it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0.0
    return total / 2**20


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def histogram_deltas(before: dict, after: dict, model: str) -> dict[str, dict[str, float]]:
    """Per histogram of interest: {"sum": Δseconds, "count": Δobservations}."""
    out = {}
    for stage in STAGES:
        out[f"stage_{stage}"] = {"sum": _delta(before, after, "medseg_stage_seconds_sum", model=model, stage=stage),
                                 "count": _delta(before, after, "medseg_stage_seconds_count", model=model, stage=stage)}
    out["inference"] = {"sum": _delta(before, after, "medseg_inference_seconds_sum", model=model),
                        "count": _delta(before, after, "medseg_inference_seconds_count", model=model)}
    for kind in ("preprocess", "predict", "postprocess"):
        out[f"kserve_{kind}"] = {"sum": _delta(before, after, f"request_{kind}_seconds_sum", model_name=model),
                                 "count": _delta(before, after, f"request_{kind}_seconds_count", model_name=model)}
    return out


def run_clients(url: str, name: str, body: bytes, clients: int, seconds: float, max_requests: int = 10_000,
                timeout_s: float = 300.0) -> dict[str, Any]:
    """``clients`` threads sending ``body`` back to back until ``seconds`` have passed (or ``max_requests`` each).

    Returns ``{"latencies": [s of answered requests], "errors": n, "error_samples": [...], "wall_s": s}``.
    """
    import httpx

    endpoint = f"{url}/v2/models/{name}/infer"
    headers = {"content-type": "application/json"}
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=timeout_s) as http:
            for _ in range(max_requests):
                if time.monotonic() >= deadline:
                    return
                start = time.perf_counter()
                try:
                    response = http.post(endpoint, content=body, headers=headers)
                    elapsed = time.perf_counter() - start
                    problem = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
                    if problem is None:
                        client.parse_response(response.json())  # a complete, well-formed answer
                except Exception as exc:  # noqa: BLE001 (every failure is counted and sampled)
                    elapsed, problem = time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300]
                with lock:
                    if problem is None:
                        latencies.append(elapsed)
                    else:
                        errors.append(problem)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + timeout_s + 30)
    return {"latencies": latencies, "errors": len(errors), "error_samples": errors[:5], "wall_s": time.perf_counter() - started}


def latency_stats(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(latencies)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p95": round(float(np.percentile(a, 95)), 4),
            "p99": round(float(np.percentile(a, 99)), 4), "mean": round(float(a.mean()), 4), "max": round(float(a.max()), 4)}


def summarize_phase(clients: int, run: dict[str, Any], deltas: dict[str, dict[str, float]], rss_before: float, rss_after: float,
                    forward_fraction: float | None) -> dict[str, Any]:
    """One phase's JSON: latency, throughput, errors, stage means, shares outside the predictor/forward, RSS."""
    lat = run["latencies"]
    stats = latency_stats(lat)
    total_latency = float(sum(lat))
    predict = deltas["stage_predict"]["sum"]
    queue = deltas["stage_queue"]["sum"]
    stage_means = {s: (round(deltas[f"stage_{s}"]["sum"] / deltas[f"stage_{s}"]["count"], 4) if deltas[f"stage_{s}"]["count"] else None)
                   for s in STAGES}
    kserve_predict = deltas["kserve_predict"]
    share = (lambda used, of: round(1.0 - used / of, 4) if of > 0 else None)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": run["errors"],
        "error_samples": run["error_samples"],
        "wall_s": round(run["wall_s"], 2),
        "throughput_rps": round(len(lat) / run["wall_s"], 4) if run["wall_s"] > 0 else None,
        "latency_s": stats,
        "p99_over_p50": round(stats["p99"] / stats["p50"], 3) if stats["p50"] else None,
        "server_stage_mean_s": stage_means,
        "server_requests_observed": int(deltas["stage_predict"]["count"]),
        "kserve_request_predict_mean_s": round(kserve_predict["sum"] / kserve_predict["count"], 4) if kserve_predict["count"] else None,
        "outside_predictor_share": share(predict, total_latency),
        "outside_predictor_share_excl_queue": share(predict, total_latency - queue),
        "outside_forward_share_est": share(predict * forward_fraction, total_latency) if forward_fraction is not None else None,
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_after": round(rss_after, 1),
    }


def profile_predictor(package: Path, paths: list[Path], repeats: int = 1) -> dict[str, float]:
    """Time one prediction of the case in this process and the share spent in the sliding-window forward."""
    import torch

    import medseg.inference.predictor as predictor_module

    spent = {"forward": 0.0}
    original = predictor_module.grid_probabilities

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent["forward"] += time.perf_counter() - start

    predictor = predictor_module.Predictor.from_package(package, device="cpu")
    predictor_module.grid_probabilities = timed
    try:
        totals = []
        for _ in range(repeats):
            spent["forward"] = 0.0
            with torch.inference_mode():
                start = time.perf_counter()
                predictor.predict_files(paths)
                totals.append(time.perf_counter() - start)
    finally:
        predictor_module.grid_probabilities = original
    total = totals[-1]
    return {"predict_s": round(total, 3), "forward_s": round(spent["forward"], 3), "forward_fraction": round(spent["forward"] / total, 4) if total else 0.0}


def soak(url: str, name: str, body: bytes, pid: int, clients: int, seconds: float, sample_every_s: float = 5.0,
         timeout_s: float = 300.0, settle_s: float = 3.0) -> dict[str, Any]:
    """Keep ``clients`` busy for ``seconds`` while sampling the server's RSS; growth from the first sample (before the
    clients start) to the last (after they have finished), both with no request in the server."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    start = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((round(time.monotonic() - start, 1), round(server_rss_mib(pid), 1)))
            stop.wait(sample_every_s)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    run = run_clients(url, name, body, clients, seconds, timeout_s=timeout_s)
    stop.set()
    thread.join(timeout=10)
    time.sleep(settle_s)  # the server gives freed heap back after a request has left (medseg.serving.memory), not at once
    samples.append((round(time.monotonic() - start, 1), round(server_rss_mib(pid), 1)))
    first, last = samples[0][1], samples[-1][1]
    t = np.asarray([s[0] for s in samples])
    r = np.asarray([s[1] for s in samples])
    slope = float(np.polyfit(t, r, 1)[0]) * 60 if len(samples) >= 3 and np.ptp(t) > 0 else None
    return {
        "clients": clients, "seconds": seconds, "requests": len(run["latencies"]), "errors": run["errors"], "error_samples": run["error_samples"],
        "latency_s": latency_stats(run["latencies"]),
        "rss_mib_first": first, "rss_mib_last": last, "rss_mib_max": float(r.max()),
        "rss_growth_pct": round(100.0 * (last - first) / first, 2) if first else None,
        # under load RSS swings with the requests in flight; the means of the first and last quarter of the samples show the trend
        "rss_mib_mean_first_quarter": round(float(r[: max(len(r) // 4, 1)].mean()), 1),
        "rss_mib_mean_last_quarter": round(float(r[-max(len(r) // 4, 1):].mean()), 1),
        "rss_slope_mib_per_min": round(slope, 2) if slope is not None else None,
        "rss_samples": samples if len(samples) <= 80 else samples[:: max(len(samples) // 80, 1)],
    }


# --------------------------------------------------------------------------- the benchmark
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    shape = tuple(args.case_shape)
    with tempfile.TemporaryDirectory(prefix="medseg-serve-load-") as tmp_text:
        tmp = Path(tmp_text)
        paths = write_case(tmp / "case", shape)  # type: ignore[arg-type]
        if args.model:
            package, package_kind = args.model, "given"
        else:
            package, package_kind = build_package(tmp / "model", shape, tiny=args.tiny, plan_spacing=args.plan_spacing), ("untrained-tiny" if args.tiny else "untrained-planned")  # type: ignore[arg-type]
        body = request_body(paths)
        profile = None
        if args.profile and not str(package).startswith("models:/"):
            profile = profile_predictor(Path(package), paths)
        port = server.free_port()
        url = f"http://127.0.0.1:{port}"
        log_file = tmp / "server.log"
        server_args = ["--reload-interval", "0", "--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.max_queue),
                       "--timeout", str(args.request_timeout)]
        proc = server.start_server_process(package, args.name, port, log_file=log_file, extra_args=server_args)
        result: dict[str, Any] = {}
        try:
            try:
                server.wait_until_ready(url, args.name, timeout_s=180, proc=proc)
            except Exception as exc:
                raise SystemExit(f"model server did not start: {exc}\n{log_file.read_text()[-3000:] if log_file.exists() else ''}") from None
            rss_loaded = server_rss_mib(proc.pid)
            warm = run_clients(url, args.name, body, 1, seconds=args.request_timeout * args.warmup, max_requests=args.warmup, timeout_s=args.request_timeout) if args.warmup else None
            phases = []
            for clients in args.clients:
                rss_before, before = server_rss_mib(proc.pid), scrape(url)
                run = run_clients(url, args.name, body, clients, args.seconds, args.max_requests, args.request_timeout)
                after, rss_after = scrape(url), server_rss_mib(proc.pid)
                phases.append(summarize_phase(clients, run, histogram_deltas(before, after, args.name), rss_before, rss_after,
                                              profile["forward_fraction"] if profile else None))
            soak_result = None
            if args.soak > 0:
                soak_result = soak(url, args.name, body, proc.pid, args.soak_clients, args.soak, timeout_s=args.request_timeout)
            result = {
                "benchmark": "serve_load",
                "model": {"package": str(package) if package_kind == "given" else package_kind, "name": args.name,
                          "plan_spacing_mm": None if package_kind == "given" else (args.plan_spacing or 1.0)},
                "case": {"shape": list(shape), "spacing_mm": 1.0, "channels": len(paths), "request_mib": round(len(body) / 2**20, 2),
                         "files_mib": round(sum(p.stat().st_size for p in paths) / 2**20, 2)},
                "server": {"max_concurrent": args.max_concurrent, "max_queue": args.max_queue, "rss_mib_loaded": round(rss_loaded, 1),
                           "warmup_requests": len(warm["latencies"]) if warm else 0, "warmup_errors": warm["errors"] if warm else 0},
                "predictor_profile": profile,
                "phases": phases,
                "soak": soak_result,
            }
        finally:
            server.stop_server(proc)
    result["targets"] = targets(result)
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "python": platform.python_version()}
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The brief's targets: ``True``/``False``, ``None`` when the run did not measure it."""
    by_clients = {p["clients"]: p for p in result.get("phases", [])}
    one, four = by_clients.get(1), by_clients.get(4)
    soak_result = result.get("soak")
    errors = sum(p["errors"] for p in result.get("phases", [])) + (soak_result["errors"] if soak_result else 0)
    # the brief's overhead is the share outside the network forward; without --profile only the share outside the predictor is known
    forward_share = one.get("outside_forward_share_est") if one else None
    overhead = forward_share if forward_share is not None else (one["outside_predictor_share"] if one else None)
    ratio = four["p99_over_p50"] if four else None
    growth = soak_result["rss_growth_pct"] if soak_result else None
    return {
        ("outside_forward_share_1_client_le_0.15" if forward_share is not None else "outside_predictor_share_1_client_le_0.15"):
            (overhead <= 0.15) if overhead is not None else None,
        "p99_over_p50_4_clients_le_1.5": (ratio <= 1.5) if ratio is not None else None,
        "zero_errors": errors == 0,
        "soak_rss_growth_lt_5pct": (growth < 5.0) if growth is not None else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Load test of the model server on 127.0.0.1 (JSON on stdout).")
    p.add_argument("--model", default=None, help="model package folder or models:/NAME@ALIAS (default: build an untrained one)")
    p.add_argument("--tiny", action="store_true", help="without --model: a 16³-patch network instead of the planned one (smoke tests)")
    p.add_argument("--name", default=NAME, help=f"model name on the server (default: {NAME})")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrent client counts, one phase each (default: 1 4)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per phase (default: 60)")
    p.add_argument("--max-requests", type=int, default=10_000, help="at most this many requests per client and phase")
    p.add_argument("--warmup", type=int, default=2, help="requests before the first phase, not counted (default: 2)")
    p.add_argument("--soak", type=float, default=0.0, help="then a soak of this many seconds, sampling the server's RSS (default: none)")
    p.add_argument("--soak-clients", type=int, default=2, help="clients during the soak (default: 2)")
    p.add_argument("--case-shape", type=int, nargs=3, default=[128, 128, 128], help="voxels of the case at 1 mm (default: 128 128 128)")
    p.add_argument("--plan-spacing", type=float, default=None,
                   help="without --model: plan the untrained network at this spacing in mm (default: the case's 1 mm; 2 = a low-resolution CPU plan where resampling the case dominates)")
    p.add_argument("--max-concurrent", type=int, default=1, help="server --max-concurrent (default: 1)")
    p.add_argument("--max-queue", type=int, default=4, help="server --max-queue (default: 4; clients beyond concurrent+queue get 503)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request, client and server (default: 300)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip timing the network forward in this process")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if any(c < 1 for c in args.clients) or args.seconds <= 0 or args.max_requests < 1 or args.soak < 0 or args.soak_clients < 1:
        p.error("--clients, --seconds, --max-requests and --soak-clients must be positive, --soak not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_benchmark(args)
    text = json.dumps(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0 if result["targets"]["zero_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
