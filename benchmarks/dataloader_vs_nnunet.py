"""Our loader workers against nnU-Net v2's own dataloader and augmentation, in samples per second per CPU core.

    .venv/bin/python benchmarks/dataloader_vs_nnunet.py --cases 4 --shape 128 128 128 --seconds 20 --repeats 1   # proves it runs
    .venv/bin/python benchmarks/dataloader_vs_nnunet.py          # 20 BraTS-sized cases, 60 s windows, 3 repeats: a quiet machine

The GPU plan's training input (issue 16, point 5): 128³ patches, batch 2, full augmentation (nnU-Net v2's default
set: rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma, mirroring; ours
:func:`medseg.training.augmentation.default_augmentation`, one third of the patches centred on foreground).

Data. Synthetic cases (:func:`medseg.synth.generate_dataset`, default 20 of 240×240×155, BraTS-like, 4 channels)
are ingested once, then preprocessed by each tool as ``benchmarks/preprocess_vs_nnunet.py`` does (ours with the
``gpu:8`` budget; ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` in nnU-Net's own venv, same target spacing):
each loader reads the same cases in its own format (ours memory-mapped ``.npy``, nnU-Net blosc2). Both plans are
then forced to the same patch and batch (``--patch``, ``--batch``).

Each measurement runs in a fresh interpreter (imports and worker start-up are not timed):
- ours: :class:`medseg.training.loader.LoaderPool` with K workers on a
  :class:`~medseg.training.sampler.PatchSampler` (``augmentation=True``), batches taken in order;
- nnU-Net: what ``nnUNetTrainer.get_dataloaders`` builds for training (its ``get_training_transforms`` with deep
  supervision targets, ``nnUNetDataLoader`` with the initial (larger) patch, ``NonDetMultiThreadedAugmenter`` with
  K processes and ``num_cached = max(6, K // 2)``), on fold ``all``, ``pin_memory`` off (no GPU here).
After a warm-up (each worker's first batch), batches are taken for ``--seconds``; the CPU seconds of the whole
process tree (the consumer and its workers, from /proc) over that window give **samples per CPU-second**, i.e.
samples per second per fully used core: the per-core figure, robust to other load on the machine. Wall samples/s
per K give the scaling (meaningful on a quiet machine only: the load average is reported). Runs alternate
(ours K=1, nnU-Net K=1, ours K=2, …) and repeat ``--repeats`` times; per K the median is reported.

The last line printed is one JSON object: ``ours_samples_per_s_per_core``, ``nnunet_samples_per_s_per_core``
(both at the largest K), ``ratio`` (ours / nnU-Net; goal ≥ 1.5) and ``scaling`` (per K, both tools: samples/s,
per core, speed-up over K = 1). Exit code 2 when the nnU-Net venv cannot be made, 1 when a run fails.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_vs_nnunet import DEFAULT_CACHE, NNUNET_VERSION, BenchmarkError, ensure_nnunet_venv, make_dataset, nnunet_raw_dataset, run_nnunet, run_ours  # noqa: E402

TARGET_RATIO = 1.5

# Shared by both runners (each runs in its own interpreter and venv): CPU seconds of a process tree from /proc, and the
# timed loop. ``draw()`` returns one batch's sample count.
MEASURE = textwrap.dedent("""
    import json, os, time

    def tree_cpu_seconds(root):
        # user + system CPU of ``root`` and every live descendant (the loader workers live through the window)
        tick, children, own = os.sysconf("SC_CLK_TCK"), {}, {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            pid, ppid = int(name), int(fields[1])
            children.setdefault(ppid, []).append(pid)
            own[pid] = (int(fields[11]) + int(fields[12])) / tick
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            total += own.get(pid, 0.0)
            todo.extend(children.get(pid, []))
        return total

    def measure(draw, workers, seconds, extra):
        for _ in range(max(workers, 1)):  # warm-up: every worker's first batch (start-up, first reads)
            draw()
        me = os.getpid()
        t0, c0, samples, batches = time.perf_counter(), tree_cpu_seconds(me), 0, 0
        while time.perf_counter() - t0 < seconds:
            samples += draw()
            batches += 1
        wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(me) - c0
        print(json.dumps({"workers": workers, "batches": batches, "samples": samples, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                          "samples_per_s": samples / wall, "samples_per_cpu_s": samples / cpu if cpu > 0 else None, **extra}))
""")

OURS_RUNNER = MEASURE + textwrap.dedent("""
    import sys
    from pathlib import Path
    from medseg import schemas
    from medseg.training.loader import LoaderPool
    from medseg.training.sampler import PatchSampler, PreprocessedCase

    folder, workers, seconds, patch, batch = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ids = sorted(p.name[: -len(schemas.CASE_SEG_SUFFIX)] for p in folder.glob(f"*{schemas.CASE_SEG_SUFFIX}"))
    cases = [PreprocessedCase(folder, c) for c in ids]
    sampler = PatchSampler(cases, [patch] * 3, batch, foreground_share=1 / 3, seed=0, augmentation=True)
    with LoaderPool(workers, depth=2, pin_memory=False) as pool:
        batches = pool.epoch(sampler, 10**9)
        shape = []

        def draw():
            images, labels = batches.sample()[:2]
            shape[:] = list(images.shape)
            return int(images.shape[0])

        measure(draw, workers, seconds, {"tool": "ours", "cases": len(cases), "batch_shape": shape})
""")

NNUNET_RUNNER = MEASURE + textwrap.dedent("""
    import sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    dataset_folder, workers, seconds, patch, batch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    plans = load_json(join(dataset_folder, "nnUNetPlans.json"))
    plans["continue_training"] = False  # what nnUNetv2_train sets (run_training.get_trainer_from_args) for a fresh run
    plans["configurations"]["3d_fullres"].update(patch_size=[patch] * 3, batch_size=batch)  # the same input as ours
    trainer = nnUNetTrainer(plans, "3d_fullres", "all", load_json(join(dataset_folder, "dataset.json")), device=torch.device("cpu"))
    trainer._set_batch_size_and_oversample()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    # the training half of nnUNetTrainer.get_dataloaders (its validation loader would start workers of its own)
    rotation, dummy_2d, initial_patch, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lm, cm = trainer.label_manager, trainer.configuration_manager
    transforms = trainer.get_training_transforms(cm.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
                                                 use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=trainer.is_cascaded, foreground_labels=lm.foreground_labels,
                                                 regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    loader = nnUNetDataLoader(dataset_tr, trainer.batch_size, initial_patch, cm.patch_size, lm, oversample_foreground_percent=trainer.oversample_foreground_percent,
                              sampling_probabilities=None, pad_sides=None, transforms=transforms, probabilistic_oversampling=trainer.probabilistic_oversampling)
    gen = NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=workers, num_cached=max(6, workers // 2), seeds=None,
                                       pin_memory=False, wait_time=0.002)
    shape = []

    def draw():
        item = next(gen)
        shape[:] = list(item["data"].shape)
        return int(item["data"].shape[0])

    try:
        measure(draw, workers, seconds, {"tool": "nnunet", "cases": len(dataset_tr.identifiers), "batch_shape": shape, "patch_size": list(cm.patch_size),
                                         "batch_size": trainer.batch_size})
    finally:
        gen._finish()
""")


def _run(cmd: list[str], env: dict[str, str] | None, what: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise BenchmarkError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_ours_loader(folder: Path, workers: int, seconds: float, patch: int, batch: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return _run([sys.executable, "-c", OURS_RUNNER, str(folder), str(workers), str(seconds), str(patch), str(batch)], env, f"our loader (K={workers})", seconds * 20 + 600)


def run_nnunet_loader(venv: Path, work: Path, dataset_folder: Path, workers: int, seconds: float, patch: int, batch: int) -> dict[str, Any]:
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return _run([str(venv / "bin" / "python"), "-c", NNUNET_RUNNER, str(dataset_folder), str(workers), str(seconds), str(patch), str(batch)], env,
                f"nnU-Net's loader (K={workers})", seconds * 20 + 600)


def _prepare(work: Path, args: argparse.Namespace, venv: Path | None, report: dict[str, Any]) -> Path | None:
    """Generate, ingest and preprocess the cases with both tools into ``work``; returns nnU-Net's preprocessed dataset
    folder (None without nnU-Net). A ``--work-dir`` prepared before for the same cases and shape is reused (repeat runs
    then time the loaders only)."""
    marker, wanted = work / "prepared.json", {"cases": args.cases, "shape": list(args.shape), "nnunet": venv is not None}
    nn_folder = work / "nnUNet_preprocessed" / "Dataset950_loader"
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        print(f"reusing the cases prepared in {work}", file=sys.stderr)
        report["prepare_s"] = "reused"
        return nn_folder if venv is not None else None
    for stale in ("raw", "datasets", "ours", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        shutil.rmtree(work / stale, ignore_errors=True)
    print(f"preparing {args.cases} cases {tuple(args.shape)} ...", file=sys.stderr)
    dataset, gen_s = make_dataset(work, "loader", args.cases, tuple(args.shape))
    t0 = time.perf_counter()
    run_ours(dataset, work / "ours", 2, "gpu:8")
    report["prepare_s"] = {"generate": round(gen_s, 1), "ours_preprocess": round(time.perf_counter() - t0, 1)}
    if venv is not None:
        folder_name, _ = nnunet_raw_dataset(dataset, work / "nnUNet_raw", 950, "loader")
        t0 = time.perf_counter()
        run_nnunet(venv, work, 950, 2, work / "nnunet-preprocess.log")
        report["prepare_s"]["nnunet_preprocess"] = round(time.perf_counter() - t0, 1)
        nn_folder = work / "nnUNet_preprocessed" / folder_name
    marker.write_text(json.dumps(wanted))
    return nn_folder if venv is not None else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one tool at one K."""
    per_core = [r["samples_per_cpu_s"] for r in runs if r["samples_per_cpu_s"]]
    return {"samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 4),
            "samples_per_s_per_core": round(statistics.median(per_core), 4) if per_core else None, "repeats": len(runs),
            "batches": [r["batches"] for r in runs]}


def main() -> int:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155), help="synthetic case shape (default BraTS: 240 240 155)")
    parser.add_argument("--patch", type=int, default=128, help="cubic patch edge (default 128: the GPU plan)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=list(range(1, cores + 1)), help=f"K values (default 1..{cores}, this machine's cores)")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed window per run, after the warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data here and reuse it next time (default: a temporary folder, removed)")
    parser.add_argument("--skip-nnunet", action="store_true", help="time ours only")
    args = parser.parse_args()

    report: dict[str, Any] = {"benchmark": "dataloader_vs_nnunet", "cases": args.cases, "shape": list(args.shape), "patch": [args.patch] * 3, "batch": args.batch,
                              "augmentation": "nnU-Net v2 default set (both)", "seconds": args.seconds, "repeats": args.repeats,
                              "machine": {"cpus": cores, "python": platform.python_version(), "load_avg_1m_start": round(os.getloadavg()[0], 2)}}
    venv = None
    if not args.skip_nnunet:
        try:
            venv, info = ensure_nnunet_venv(args.cache_dir, NNUNET_VERSION)
        except BenchmarkError as exc:
            print(json.dumps({**report, "error": str(exc)}))
            return 2
        report["nnunet_env"] = info
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medseg-loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        nn_folder = _prepare(work, args, venv, report)
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {"ours": {}, "nnunet": {}}
        for rep in range(args.repeats):
            for k in args.workers:  # alternating: a drift in the machine's load hits both tools alike
                print(f"repeat {rep + 1}/{args.repeats}: ours K={k}", file=sys.stderr)
                runs["ours"].setdefault(k, []).append(run_ours_loader(work / "ours" / "3d_fullres", k, args.seconds, args.patch, args.batch))
                if nn_folder is not None:
                    print(f"repeat {rep + 1}/{args.repeats}: nnU-Net K={k}", file=sys.stderr)
                    runs["nnunet"].setdefault(k, []).append(run_nnunet_loader(venv, work, nn_folder, k, args.seconds, args.patch, args.batch))
        report["runs"] = runs
    except (BenchmarkError, subprocess.TimeoutExpired) as exc:
        print(json.dumps({**report, "error": str(exc)}))
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    scaling: dict[str, dict[str, Any]] = {}
    for tool, by_k in runs.items():
        if not by_k:
            continue
        rows = {k: _summary(v) for k, v in sorted(by_k.items())}
        base = rows[min(rows)]["samples_per_s"]
        for k, row in rows.items():
            row["speedup_vs_k1"] = round(row["samples_per_s"] / base, 3) if base and min(rows) == 1 else None
        scaling[tool] = {str(k): row for k, row in rows.items()}
    top = str(max(args.workers))
    ours = scaling["ours"][top]["samples_per_s_per_core"]
    theirs = scaling.get("nnunet", {}).get(top, {}).get("samples_per_s_per_core")
    report["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report["runs"]), file=sys.stderr)  # every run, for the record
    summary = {"benchmark": "dataloader_vs_nnunet", "ours_samples_per_s_per_core": ours, "nnunet_samples_per_s_per_core": theirs,
               "ratio": round(ours / theirs, 3) if ours and theirs else None, "target_ratio": TARGET_RATIO, "at_workers": int(top),
               "scaling": scaling, "cases": args.cases, "shape": list(args.shape), "patch": [args.patch] * 3, "batch": args.batch,
               "seconds": args.seconds, "repeats": args.repeats, "machine": report["machine"], "prepare_s": report.get("prepare_s"),
               "nnunet_env": report.get("nnunet_env")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
