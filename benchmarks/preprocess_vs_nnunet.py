"""Our fingerprint + plan + preprocess against nnU-Net v2's ``nnUNetv2_plan_and_preprocess``, as JSON.

    .venv/bin/python benchmarks/preprocess_vs_nnunet.py --quick   # 4 cases at 64³ and 4 anisotropic: a few minutes
    .venv/bin/python benchmarks/preprocess_vs_nnunet.py           # the full sets below: run on a quiet machine

Datasets come from our generator (:func:`medseg.synth.generate_dataset`, MNI anatomy, BraTS labels, FOV
197×233×189 mm kept, so the spacing is FOV / shape) into a temporary folder, ingested with no test split
(every case is fingerprinted and preprocessed by both tools):

    full:   iso128   20 cases 128×128×128   (1.54×1.82×1.48 mm)
            brats240 10 cases 240×240×155   (0.82×0.97×1.22 mm)
            aniso    10 cases 197×233×63    (1×1×3 mm)
    --quick: iso64    4 cases 64×64×64, aniso-q 4 cases 99×117×21 (1.99×1.99×9 mm)

For each set, in the same run and one after the other:

- ours: :func:`medseg.preprocessing.preprocess.run_preprocessing` (``3d_fullres``, budget ``gpu:8`` like
  nnU-Net's default 8 GB target, ``--workers`` processes) in a fresh interpreter; wall seconds include
  interpreter start-up and imports, phases come from the function itself;
- nnU-Net: ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np W -npfp W`` (``-npfp`` too, so its
  fingerprinting uses the same number of processes instead of its default 8 on this 2-core machine)
  from its own venv, the raw dataset linked in nnU-Net's layout; phases are timed from its console
  markers ("Fingerprint extraction...", "Experiment planning...", "Preprocessing...").

Reported: wall seconds of both, their ratio (target ≤ 0.5), per-phase times, and agreement: the same
3d_fullres target spacing, and the same normalised voxel values (max |difference| ≤ 1e-4) and labels on
the first case, after mapping our (I, J, K) axes onto nnU-Net's (SimpleITK reverses the axes, then the
plan's ``transpose_forward`` applies) and aligning the two crop boxes. nnU-Net 2.8 stores cases as
blosc2 ``.b2nd`` (older versions ``.npz``); they are read with nnU-Net's own venv.

The nnU-Net venv (``--cache-dir``, default ``~/.cache/medseg-bench/nnunet-venv``) is made once: CPU
``torch==2.13.0`` first, then ``nnunetv2`` constrained to that torch and ``torchvision<=0.29.1`` (its
dependency chain would otherwise pull a CUDA torch), then torchvision is uninstalled (the available wheels
are CUDA-linked and do not import beside CPU torch; planning and preprocessing do not need it). If it
cannot be made, the script stops with the failing step and the install log's path (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medseg-bench"
TORCH_VERSION = "2.13.0"
NNUNET_VERSION = "2.8.1"
READY_MARKER = ".medseg-ready.json"
TOLERANCE = 1e-4
TARGET_RATIO = 0.5

FULL_SETS = [("iso128", 20, (128, 128, 128)), ("brats240", 10, (240, 240, 155)), ("aniso", 10, (197, 233, 63))]
QUICK_SETS = [("iso64", 4, (64, 64, 64)), ("aniso-q", 4, (99, 117, 21))]


class BenchmarkError(RuntimeError):
    """A step of the benchmark failed; the message names the step (and a log file when there is one)."""


# --------------------------------------------------------------------------- the nnU-Net venv
def _run_logged(cmd: list[str], log: Path, step: str) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        raise BenchmarkError(f"nnU-Net venv: {step} failed (exit {proc.returncode}); full log: {log}\n{tail}")


def ensure_nnunet_venv(cache_dir: Path, nnunet_version: str = NNUNET_VERSION, torch_version: str = TORCH_VERSION) -> tuple[Path, dict[str, Any]]:
    """``cache_dir/nnunet-venv`` with ``nnunetv2==nnunet_version`` (made once, then reused) and its versions."""
    venv = Path(cache_dir).expanduser() / "nnunet-venv"
    marker = venv / READY_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("nnunetv2") == nnunet_version and (venv / "bin" / "nnUNetv2_plan_and_preprocess").exists():
            return venv, info
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "nnunet-venv-install.log"
    log.write_text(f"install started {time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
    print(f"making the nnU-Net venv in {venv} (a few minutes, once; log: {log})", file=sys.stderr)
    _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log, "creating the venv")
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--no-input", "--progress-bar", "off"]
    _run_logged(pip + [f"torch=={torch_version}"], log, f"installing torch=={torch_version}")
    constraints = venv.parent / "nnunet-constraints.txt"
    constraints.write_text(f"torch=={torch_version}\ntorchvision<=0.29.1\n", encoding="utf-8")
    _run_logged(pip + [f"nnunetv2=={nnunet_version}", "-c", str(constraints)], log, f"installing nnunetv2=={nnunet_version}")
    _run_logged([py, "-m", "pip", "uninstall", "-y", "torchvision"], log, "removing torchvision")
    probe = "import json, torch, nnunetv2, importlib.metadata as m; print(json.dumps({'torch': torch.__version__, 'nnunetv2': m.version('nnunetv2'), 'cuda': torch.version.cuda}))"
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchmarkError(f"nnU-Net venv: import check failed: {out.stderr.strip()[-2000:]} (log: {log})")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info["nnunetv2"] != nnunet_version:
        raise BenchmarkError(f"nnU-Net venv: got nnunetv2 {info['nnunetv2']}, wanted {nnunet_version} (log: {log})")
    marker.write_text(json.dumps(info) + "\n", encoding="utf-8")
    return venv, info


# --------------------------------------------------------------------------- datasets
def make_dataset(work: Path, name: str, n_cases: int, shape: tuple[int, int, int]) -> tuple[Path, float]:
    """Synthetic cases → our canonical dataset (all cases in the folds); returns (folder, seconds)."""
    from medseg.ingest.ingest import ingest
    from medseg.synth import generate_dataset

    t0 = time.perf_counter()
    raw, dataset = work / "raw" / name, work / "datasets" / name
    generate_dataset(raw, n_cases, shape, seed=0, progress=False)
    ingest(raw, dataset, n_folds=min(5, n_cases), test_fraction=0.0, seed=0, progress=False)
    shutil.rmtree(raw)
    return dataset, time.perf_counter() - t0


def nnunet_raw_dataset(dataset: Path, nnunet_raw: Path, dataset_id: int, name: str) -> tuple[str, list[str]]:
    """Link our canonical dataset's fold cases into ``nnUNet_raw/DatasetXXX_name`` with a plain dataset.json."""
    from medseg import schemas
    from medseg.preprocessing.preprocess import training_case_ids

    ds = schemas.DatasetJson.load(dataset)
    cases = training_case_ids(schemas.Splits.load(dataset))
    folder_name = f"Dataset{dataset_id:03d}_{name.replace('-', '')}"
    folder = nnunet_raw / folder_name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in cases:
        for c in range(len(ds.channel_names)):
            os.symlink(dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz", folder / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        os.symlink(dataset / "labelsTr" / f"{case}.nii.gz", folder / "labelsTr" / f"{case}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": ds.channel_names, "labels": ds.labels, "numTraining": len(cases), "file_ending": ".nii.gz",
    }, indent=2))
    return folder_name, cases


# --------------------------------------------------------------------------- running both
OURS_RUNNER = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from medseg.preprocessing.preprocess import run_preprocessing
    timings = {"import_s": round(time.perf_counter() - t0, 3)}
    run_preprocessing(sys.argv[1], sys.argv[2], budget=sys.argv[3], configurations=("3d_fullres",), workers=int(sys.argv[4]), progress=False, timings=timings)
    print(json.dumps(timings))
""")


def run_ours(dataset: Path, out: Path, workers: int, budget: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", OURS_RUNNER, str(dataset), str(out), budget, str(workers)], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchmarkError(f"our preprocessing failed:\n{proc.stderr[-3000:]}")
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "phases": phases}


NNUNET_MARKERS = {"Fingerprint extraction...": "fingerprint_s", "Experiment planning...": "plan_s", "Preprocessing...": "preprocess_s"}


def nnunet_env(work: Path) -> dict[str, str]:
    """The environment nnU-Net reads its folders from (all under ``work``), output unbuffered for the phase markers."""
    return dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
                nnUNet_results=str(work / "nnUNet_results"), PYTHONUNBUFFERED="1")


def nnunet_plan_and_preprocess_command(venv: Path, dataset_id: int, workers: int) -> list[str]:
    return [str(venv / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
            "-np", str(workers), "-npfp", str(workers), "--no_pbar"]


def nnunet_phases(marks: list[tuple[str, float]], wall: float) -> dict[str, float | None]:
    """Phase seconds from (phase key, seconds since start) marks: each phase lasts until the next one (the last until ``wall``)."""
    phases: dict[str, float | None] = {"startup_s": round(marks[0][1], 2) if marks else None}
    for (key, start), nxt in zip(marks, marks[1:] + [("end", wall)]):
        phases[key] = round(nxt[1] - start, 2)
    return phases


def run_nnunet(venv: Path, work: Path, dataset_id: int, workers: int, log: Path) -> dict[str, Any]:
    env = nnunet_env(work)
    cmd = nnunet_plan_and_preprocess_command(venv, dataset_id, workers)
    marks: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            key = NNUNET_MARKERS.get(line.strip())
            if key:
                marks.append((key, time.perf_counter() - t0))
        proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BenchmarkError(f"nnUNetv2_plan_and_preprocess failed (exit {proc.returncode}); log {log}:\n{tail}")
    return {"wall_s": round(wall, 2), "phases": nnunet_phases(marks, wall), "command": " ".join(["nnUNetv2_plan_and_preprocess"] + cmd[1:])}


# --------------------------------------------------------------------------- agreement
NNUNET_CASE_READER = textwrap.dedent("""
    import json, os, pickle, sys
    import numpy as np
    folder, case, out = sys.argv[1:4]
    base = os.path.join(folder, case)
    if os.path.isfile(base + ".b2nd"):
        import blosc2
        data, seg, fmt = blosc2.open(base + ".b2nd", mode="r")[:], blosc2.open(base + "_seg.b2nd", mode="r")[:], "b2nd"
    elif os.path.isfile(base + ".npz"):
        z = np.load(base + ".npz"); data, seg, fmt = z["data"], z["seg"], "npz"
    else:
        data, seg, fmt = np.load(base + ".npy"), np.load(base + "_seg.npy"), "npy"
    np.save(os.path.join(out, "data.npy"), np.asarray(data))
    np.save(os.path.join(out, "seg.npy"), np.asarray(seg))
    with open(base + ".pkl", "rb") as fh:
        props = pickle.load(fh)
    keep = ("spacing", "shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling")
    conv = lambda v: v.tolist() if hasattr(v, "tolist") else [conv(x) for x in v] if isinstance(v, (list, tuple)) else v
    json.dump({"format": fmt, **{k: conv(props[k]) for k in keep if k in props}}, open(os.path.join(out, "props.json"), "w"))
""")


def compare(ours_dir: Path, nnunet_dir: Path, venv: Path, case: str, scratch: Path) -> dict[str, Any]:
    """Target spacing and one case's voxels, ours (I, J, K) mapped onto nnU-Net's axes."""
    from medseg import schemas

    nn_plans = json.loads((nnunet_dir / "nnUNetPlans.json").read_text())
    tf = [int(t) for t in nn_plans["transpose_forward"]]
    axes = [2 - t for t in tf]  # nnU-Net axis m holds our axis 2 - tf[m] (SimpleITK reverses, then the transpose)
    nn_cfg = nn_plans["configurations"]["3d_fullres"]
    ours_plans = schemas.Plans.load(ours_dir)
    ours_cfg = ours_plans.configuration("3d_fullres")
    nn_spacing_ours_axes = [0.0] * 3
    for m, a in enumerate(axes):
        nn_spacing_ours_axes[a] = float(nn_cfg["spacing"][m])
    spacing_equal = bool(np.allclose(ours_cfg.spacing, nn_spacing_ours_axes, rtol=1e-4, atol=1e-4))
    result: dict[str, Any] = {
        "target_spacing": {"ours": [round(s, 5) for s in ours_cfg.spacing], "nnunet": [round(s, 5) for s in nn_spacing_ours_axes],
                           "axes": "I, J, K (nibabel voxel order)", "equal": spacing_equal},
        "plans": {"ours_patch": ours_cfg.patch_size, "ours_batch": ours_cfg.batch_size,
                  "nnunet_patch": [nn_cfg["patch_size"][axes.index(a)] for a in range(3)], "nnunet_batch": nn_cfg["batch_size"],
                  "ours_use_nonzero_mask": ours_plans.use_nonzero_mask, "nnunet_use_mask_for_norm": nn_cfg.get("use_mask_for_norm")},
    }
    scratch.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", NNUNET_CASE_READER, str(nnunet_dir / nn_cfg["data_identifier"]), case, str(scratch)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchmarkError(f"reading nnU-Net's preprocessed case {case} failed:\n{proc.stderr[-2000:]}")
    nn_data, nn_seg = np.load(scratch / "data.npy"), np.load(scratch / "seg.npy")
    nn_props = json.loads((scratch / "props.json").read_text())
    folder = ours_dir / "3d_fullres"
    data = np.load(folder / f"{case}.npy")
    seg = np.load(folder / f"{case}_seg.npy")
    props = schemas.CaseProperties.load(folder / f"{case}.json")
    perm = [1 + a for a in axes]
    data_t, seg_t = data.transpose(0, *perm), seg.transpose(*[a for a in axes])
    resampled = props.shape_after_resample != props.shape_after_crop
    voxels: dict[str, Any] = {"case": case, "nnunet_format": nn_props.get("format"), "resampled": resampled,
                              "shape_ours": list(data_t.shape[1:]), "shape_nnunet": list(nn_data.shape[1:])}
    if not resampled:
        # align the crops in original voxel coordinates (nnU-Net's box is in its own axis order)
        nn_box = nn_props["bbox_used_for_cropping"]
        ours_box = [props.crop_bbox[a] for a in axes]
        lo = [max(o[0], n[0]) for o, n in zip(ours_box, nn_box)]
        hi = [min(o[1], n[1]) for o, n in zip(ours_box, nn_box)]
        ours_sl = tuple(slice(lo[m] - ours_box[m][0], hi[m] - ours_box[m][0]) for m in range(3))
        nn_sl = tuple(slice(lo[m] - nn_box[m][0], hi[m] - nn_box[m][0]) for m in range(3))
        a, b = data_t[(slice(None),) + ours_sl], nn_data[(slice(None),) + nn_sl].astype(np.float32)
        sa, sb = seg_t[ours_sl].astype(np.int16), nn_seg[(0,) + nn_sl].astype(np.int16)
        voxels["crop_box_equal"] = ours_box == [list(x) for x in nn_box]
    else:  # shapes agree when both resampled to the same shape; compare directly
        a, b, sa, sb = data_t, nn_data.astype(np.float32), seg_t.astype(np.int16), nn_seg[0].astype(np.int16)
    if a.shape != b.shape:
        voxels.update(comparable=False, within_tolerance=False)
        result["voxels"] = voxels
        return result
    diff = np.abs(a - b).reshape(a.shape[0], -1).max(axis=1)
    sb_fg = np.where(sb < 0, 0, sb)  # nnU-Net marks the outside of the nonzero mask -1; ours keeps 0
    voxels.update(comparable=True, max_abs_diff_per_channel=[float(f"{d:.3g}") for d in diff],
                  within_tolerance=bool(diff.max() <= TOLERANCE), tolerance=TOLERANCE,
                  labels_equal=bool(np.array_equal(sa, sb_fg)), label_voxels_differing=int((sa != sb_fg).sum()))
    result["voxels"] = voxels
    return result


# --------------------------------------------------------------------------- main
def run_set(name: str, n_cases: int, shape: tuple[int, int, int], index: int, work: Path, venv: Path | None, workers: int, budget: str) -> dict[str, Any]:
    dataset, gen_s = make_dataset(work, name, n_cases, shape)
    row: dict[str, Any] = {"name": name, "cases": n_cases, "shape": list(shape),
                           "spacing_mm": [round(f / s, 3) for f, s in zip((197.0, 233.0, 189.0), shape)], "generate_s": round(gen_s, 1)}
    row["ours"] = run_ours(dataset, work / "ours" / name, workers, budget)
    if venv is None:
        return row
    dataset_id = 900 + index
    folder_name, cases = nnunet_raw_dataset(dataset, work / "nnUNet_raw", dataset_id, name)
    row["nnunet"] = run_nnunet(venv, work, dataset_id, workers, work / f"nnunet-{name}.log")
    row["ratio"] = round(row["ours"]["wall_s"] / row["nnunet"]["wall_s"], 3)
    row["target_met"] = row["ratio"] <= TARGET_RATIO
    row["agreement"] = compare(work / "ours" / name, work / "nnUNet_preprocessed" / folder_name, venv, cases[0], work / "scratch" / name)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sets (4 cases at 64³ and 4 anisotropic) to check it works end to end")
    parser.add_argument("--workers", type=int, default=2, help="processes for both tools (default 2)")
    parser.add_argument("--budget", default="gpu:8", help="our device budget (default gpu:8, nnU-Net's default 8 GB target)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where the nnU-Net venv lives (default {DEFAULT_CACHE})")
    parser.add_argument("--nnunet-version", default=NNUNET_VERSION)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep datasets and outputs here (default: a temporary folder, removed)")
    parser.add_argument("--skip-nnunet", action="store_true", help="time ours only (no venv needed)")
    args = parser.parse_args()

    report: dict[str, Any] = {"benchmark": "preprocess_vs_nnunet", "quick": args.quick, "workers": args.workers, "budget": args.budget,
                              "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    venv = None
    if not args.skip_nnunet:
        t0 = time.perf_counter()
        try:
            venv, info = ensure_nnunet_venv(args.cache_dir, args.nnunet_version)
        except BenchmarkError as exc:
            print(json.dumps({**report, "error": str(exc)}, indent=2))
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report["nnunet_env"] = {**info, "venv": str(venv), "setup_s": round(time.perf_counter() - t0, 1)}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sets = QUICK_SETS if args.quick else FULL_SETS
        report["sets"] = []
        for i, (name, n, shape) in enumerate(sets, start=1):
            print(f"[{name}] {n} cases {shape} ...", file=sys.stderr)
            report["sets"].append(run_set(name, n, shape, i, work, venv, args.workers, args.budget))
        ours_total = sum(r["ours"]["wall_s"] for r in report["sets"])
        report["total"] = {"ours_s": round(ours_total, 2)}
        if venv is not None:
            nn_total = sum(r["nnunet"]["wall_s"] for r in report["sets"])
            agree = [r["agreement"] for r in report["sets"]]
            report["total"].update(nnunet_s=round(nn_total, 2), ratio=round(ours_total / nn_total, 3), target_ratio=TARGET_RATIO,
                                   target_met=ours_total / nn_total <= TARGET_RATIO,
                                   spacing_agrees=all(a["target_spacing"]["equal"] for a in agree),
                                   voxels_agree=all(a["voxels"].get("within_tolerance") and a["voxels"].get("labels_equal") for a in agree))
    except BenchmarkError as exc:
        report["error"] = str(exc)
        print(json.dumps(report, indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
