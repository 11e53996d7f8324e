"""Scale without growing memory: ingest + preprocess N full-size cases, N = 50 and 200, beside nnU-Net v2 (issue 16, point 6).

    .venv/bin/python benchmarks/scale.py --quick                                  # N = 2 and 4 at 64³: a couple of minutes
    .venv/bin/python benchmarks/scale.py --raw-dir /tmp/scale-raw --work-dir /tmp/scale-work \\
        --out benchmarks/results/scale_n50_n200.json                               # N = 50 and 200 at 240×240×155: about an hour

Data. ``max(N)`` synthetic BraTS-like cases (:func:`medseg.synth.generate_dataset`, 240×240×155, 4 channels and a
label map, seed 0) are generated once into ``--raw-dir`` (reused when its ``medseg_synth.json`` says it holds at least
that many cases of that shape and seed). Case ``i`` depends only on (seed, i), so the set for a smaller N is the first
N case folders, linked (symlinks) into a folder of their own, not generated again. Generation is not timed.

Measured, per N, one run after the other (ours, then nnU-Net, then the next N):

- ours, two steps, each in a fresh interpreter:
  ``ingest``: :func:`medseg.ingest.ingest.ingest` (validate, reorient to RAS+, re-save and hash every volume, write
  the manifest and splits; one process), then ``preprocess``: :func:`medseg.preprocessing.preprocess.run_preprocessing`
  (fingerprint + plan + preprocess, ``3d_fullres``, budget ``gpu:8``, ``--workers`` processes), as
  ``benchmarks/preprocess_vs_nnunet.py`` runs it;
- nnU-Net: ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np W -npfp W`` from its own venv (fingerprint +
  plan + preprocess) on our ingested dataset, linked into its raw layout. nnU-Net has no ingest step; its
  equivalent, a per-dataset conversion script into ``nnUNet_raw`` (for BraTS, copying and relabelling the files),
  is not run and not timed. So the like-for-like comparison is our ``preprocess`` against nnU-Net; our
  ``ingest + preprocess`` total is reported as well.

For every run (one subprocess and all its descendants):

- wall seconds (interpreter start-up and imports included) and CPU seconds (user + system of the process and its
  reaped descendants, from ``os.wait4``): both per case. CPU per case is the figure to trust on a shared machine;
  the 1-minute load average is recorded before and after each run;
- memory, from a sampler thread that walks the process tree with psutil every ``--interval`` seconds: the peak RSS
  of the largest single process, the peak of the tree's summed RSS (pages shared between processes, e.g. after
  fork, are counted once per process, so this overstates), the peak of the summed PSS (shared pages divided among
  their sharers: the tree's real footprint) and USS, the peak RSS per role (the main process, its workers), and the
  tree's RSS peak in each tenth of the run (growth within a run shows there). The kernel's own high-water mark of
  the largest process (``ru_maxrss`` of ``os.wait4``, including reaped descendants) is reported as a cross-check of
  the sampled largest process (the sampler can miss a peak shorter than its interval); Linux carries a process's
  high-water mark over ``exec``, so that figure is never below this launcher's own (``launcher_maxrss_mb``) and
  only checks anything above it;
- phases: ours from ``run_preprocessing``'s own timings, nnU-Net from its console markers.

Summary: per tool and N, seconds per case and peak memory; ``growth_200_vs_50`` (the larger N over the smaller, per
case for time and absolute for memory: 1.0 = flat, the goal; per-case times also share out a fixed start-up, so the
marginal seconds per extra case are given too) and ``ours_vs_nnunet`` ratios at each N. Outputs are
deleted after each run (their size is recorded); only the JSON is kept. With ``--out`` the JSON is rewritten after
every run (``"complete": false`` until the end), so an interrupted run keeps what finished. The last line printed
is one JSON object. Exit code 2 when the nnU-Net venv cannot be made, 1 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_vs_nnunet import (  # noqa: E402
    DEFAULT_CACHE, NNUNET_MARKERS, NNUNET_VERSION, OURS_RUNNER, BenchmarkError, ensure_nnunet_venv,
    nnunet_env, nnunet_phases, nnunet_plan_and_preprocess_command, nnunet_raw_dataset,
)

FULL_SIZES = (50, 200)
FULL_SHAPE = (240, 240, 155)
QUICK_SIZES = (2, 4)
QUICK_SHAPE = (64, 64, 64)
SEED = 0
MB = 1024 * 1024

INGEST_RUNNER = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from medseg.ingest.ingest import ingest
    timings = {"import_s": round(time.perf_counter() - t0, 3)}
    t1 = time.perf_counter()
    manifest = ingest(sys.argv[1], sys.argv[2], n_folds=min(5, int(sys.argv[3])), test_fraction=0.0, seed=0, progress=False)
    timings.update(ingest_s=round(time.perf_counter() - t1, 3), cases=len(manifest.cases))
    print(json.dumps(timings))
""")


# --------------------------------------------------------------------------- process-tree memory
def process_role(pid: int, root_pid: int, cmdline: list[str]) -> str:
    """``main`` for the launched process, ``resource_tracker`` for multiprocessing's helper, else ``worker``."""
    if pid == root_pid:
        return "main"
    if any("resource_tracker" in part for part in cmdline):
        return "resource_tracker"
    return "worker"


@dataclass
class TreeSample:
    """One walk of the tree: seconds since start, summed RSS/PSS/USS, the largest single RSS, RSS by pid."""

    t: float
    rss_tree: int
    pss_tree: int
    uss_tree: int
    rss_max_process: int
    processes: int


@dataclass
class ProcessTreeSampler:
    """Samples the memory of a process and all its descendants on a thread until :meth:`stop`.

    ``full`` adds PSS and USS (``memory_full_info``: reads ``/proc/PID/smaps_rollup``, a little dearer than RSS).
    """

    root_pid: int
    interval: float = 0.2
    full: bool = True
    samples: list[TreeSample] = field(default_factory=list)
    role_peak_rss: dict[str, int] = field(default_factory=dict)
    pids_seen: set[int] = field(default_factory=set)
    cpu_s_by_pid: dict[int, float] = field(default_factory=dict)  # last seen user + system seconds of each process
    _roles: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def start(self) -> "ProcessTreeSampler":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def sample_once(self) -> TreeSample | None:
        """Walk the tree once and record it; None when the root is gone."""
        try:
            root = psutil.Process(self.root_pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return None
        rss_tree = pss_tree = uss_tree = rss_max = counted = 0
        for proc in procs:
            try:
                if self.full:
                    mem = proc.memory_full_info()
                    pss_tree += mem.pss
                    uss_tree += mem.uss
                else:
                    mem = proc.memory_info()
                rss = mem.rss
                cpu = proc.cpu_times()
                self.cpu_s_by_pid[proc.pid] = cpu.user + cpu.system
                if proc.pid not in self._roles:
                    self._roles[proc.pid] = process_role(proc.pid, self.root_pid, proc.cmdline())
            except psutil.Error:  # ended (or became a zombie) between listing and reading
                continue
            counted += 1
            rss_tree += rss
            rss_max = max(rss_max, rss)
            role = self._roles[proc.pid]
            self.role_peak_rss[role] = max(self.role_peak_rss.get(role, 0), rss)
            self.pids_seen.add(proc.pid)
        if counted == 0:
            return None
        sample = TreeSample(round(time.perf_counter() - self._t0, 3), rss_tree, pss_tree, uss_tree, rss_max, counted)
        self.samples.append(sample)
        return sample

    def summary(self, deciles: int = 10) -> dict[str, Any]:
        """Peaks in MB over all samples, and the tree-RSS peak in each of ``deciles`` equal slices of the sampled time."""
        if not self.samples:
            return {"samples": 0}
        end = max(s.t for s in self.samples) or 1.0
        by_slice = [0] * deciles
        for s in self.samples:
            k = min(int(s.t / end * deciles), deciles - 1)
            by_slice[k] = max(by_slice[k], s.rss_tree)
        out: dict[str, Any] = {
            "samples": len(self.samples),
            "processes_seen": len(self.pids_seen),
            "max_live_processes": max(s.processes for s in self.samples),
            "peak_rss_max_process_mb": to_mb(max(s.rss_max_process for s in self.samples)),
            "peak_rss_tree_mb": to_mb(max(s.rss_tree for s in self.samples)),
            "peak_rss_by_role_mb": {role: to_mb(v) for role, v in sorted(self.role_peak_rss.items())},
            # a check of the CPU seconds from wait4: misses each process's last interval, and processes shorter than one
            "cpu_s_sampled": round(sum(self.cpu_s_by_pid.values()), 2),
            "rss_tree_mb_peak_per_tenth": [to_mb(v) if v else None for v in by_slice],
        }
        if self.full:
            out["peak_pss_tree_mb"] = to_mb(max(s.pss_tree for s in self.samples))
            out["peak_uss_tree_mb"] = to_mb(max(s.uss_tree for s in self.samples))
        return out


def to_mb(n_bytes: float) -> float:
    return round(n_bytes / MB, 1)


# --------------------------------------------------------------------------- one monitored run
def run_monitored(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                  interval: float = 0.2, full_memory: bool = True,
                  on_line: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to its end, sampling its process tree; output goes to ``log`` (``on_line`` sees each line and its time).

    Returns wall and CPU seconds, the kernel's max RSS (``os.wait4``), the sampler's summary, the last output line
    and the exit code. CPU counts the process and the descendants it reaped (multiprocessing pools reap theirs).
    """
    load_before = os.getloadavg()[0]
    launcher_maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines: list[str] = []
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        sampler = ProcessTreeSampler(proc.pid, interval=interval, full=full_memory).start()

        def pump() -> None:  # a thread, so the main thread can block in wait4 for the rusage
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                lines.append(line.rstrip("\n"))
                if on_line is not None:
                    on_line(line.rstrip("\n"), time.perf_counter() - t0)

        reader = threading.Thread(target=pump, name="output-pump", daemon=True)
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        sampler.stop()
        reader.join()
    return {
        "exit_code": proc.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "kernel_maxrss_mb": round(usage.ru_maxrss / 1024, 1),  # kB on Linux
        # Linux carries the forked copy's high-water mark over exec, so kernel_maxrss is never below this
        "launcher_maxrss_mb": round(launcher_maxrss_kb / 1024, 1),
        "memory": sampler.summary(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "last_line": lines[-1] if lines else "",
    }


def per_case(run: dict[str, Any], cases: int) -> dict[str, Any]:
    """The flat row of one run: totals, per-case seconds and the memory peaks."""
    mem = run["memory"]
    return {
        "cases": cases,
        "wall_s": run["wall_s"],
        "wall_s_per_case": round(run["wall_s"] / cases, 3),
        "cpu_s": run["cpu_s"],
        "cpu_s_per_case": round(run["cpu_s"] / cases, 3),
        "peak_rss_max_process_mb": mem.get("peak_rss_max_process_mb"),
        "peak_rss_tree_mb": mem.get("peak_rss_tree_mb"),
        "peak_pss_tree_mb": mem.get("peak_pss_tree_mb"),
        "kernel_maxrss_mb": run["kernel_maxrss_mb"],
        "phases_s": {k: v for k, v in run.get("phases", {}).items() if k.endswith("_s")},
    }


def combine_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sequential steps as one: times add up, memory peaks take the maximum (the steps do not overlap)."""
    cases = rows[0]["cases"]
    wall, cpu = sum(r["wall_s"] for r in rows), sum(r["cpu_s"] for r in rows)
    peak = lambda key: max((r[key] for r in rows if r.get(key) is not None), default=None)  # noqa: E731
    return {"cases": cases, "wall_s": round(wall, 2), "wall_s_per_case": round(wall / cases, 3), "cpu_s": round(cpu, 2),
            "cpu_s_per_case": round(cpu / cases, 3), "peak_rss_max_process_mb": peak("peak_rss_max_process_mb"),
            "peak_rss_tree_mb": peak("peak_rss_tree_mb"), "peak_pss_tree_mb": peak("peak_pss_tree_mb"),
            "kernel_maxrss_mb": peak("kernel_maxrss_mb")}


# --------------------------------------------------------------------------- summary
RATIO_KEYS = ("wall_s_per_case", "cpu_s_per_case", "peak_rss_max_process_mb", "peak_rss_tree_mb", "peak_pss_tree_mb")


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """``table[tool][str(N)]`` rows → growth from the smallest to the largest N per tool, and ours/nnU-Net per N.

    Growth is the larger N's value over the smaller's: per case for time, absolute for memory (1.0 = flat).
    """
    out: dict[str, Any] = {"growth": {}, "ours_vs_nnunet": {}}
    for tool, by_n in table.items():
        sizes = sorted(by_n, key=int)
        if len(sizes) >= 2:
            lo, hi = by_n[sizes[0]], by_n[sizes[-1]]
            extra = hi["cases"] - lo["cases"]
            out["growth"][tool] = {"from_n": int(sizes[0]), "to_n": int(sizes[-1]), **{k: ratio(hi.get(k), lo.get(k)) for k in RATIO_KEYS},
                                   # the cost of each extra case, free of the fixed start-up that per-case figures share out
                                   "marginal_wall_s_per_case": round((hi["wall_s"] - lo["wall_s"]) / extra, 3),
                                   "marginal_cpu_s_per_case": round((hi["cpu_s"] - lo["cpu_s"]) / extra, 3)}
    if "nnunet" in table:
        for ours_tool in ("ours_preprocess", "ours_ingest_plus_preprocess"):
            for n, nn_row in table["nnunet"].items():
                row = table.get(ours_tool, {}).get(n)
                if row is not None:
                    out["ours_vs_nnunet"].setdefault(ours_tool, {})[n] = {k: ratio(row.get(k), nn_row.get(k)) for k in RATIO_KEYS}
    return out


def format_table(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A plain-text table (tool, N, s/case wall and CPU, peak RSS largest process, tree RSS, tree PSS)."""
    head = f"{'tool':<28}{'N':>5}{'wall s/case':>13}{'CPU s/case':>12}{'RSS max proc MB':>17}{'RSS tree MB':>13}{'PSS tree MB':>13}"
    lines = [head, "-" * len(head)]
    for tool, by_n in table.items():
        for n in sorted(by_n, key=int):
            r = by_n[n]
            lines.append(f"{tool:<28}{n:>5}{r['wall_s_per_case']:>13.3f}{r['cpu_s_per_case']:>12.3f}"
                         f"{r['peak_rss_max_process_mb'] or 0:>17.1f}{r['peak_rss_tree_mb'] or 0:>13.1f}{r['peak_pss_tree_mb'] or 0:>13.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data
def ensure_raw_cases(raw_dir: Path, n_cases: int, shape: tuple[int, int, int], seed: int = SEED) -> tuple[list[str], float | None]:
    """``raw_dir`` holding at least ``n_cases`` synthetic cases of ``shape``: reused per its marker, else generated.

    Returns the sorted case folder names and the generation seconds (None when reused).
    """
    from medseg.schemas import SYNTH_MARKER_JSON
    from medseg.synth import generate_dataset

    marker = raw_dir / SYNTH_MARKER_JSON
    generate_s = None
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if not (info.get("cases", 0) >= n_cases and list(info.get("shape", [])) == list(shape) and info.get("seed") == seed):
        t0 = time.perf_counter()
        generate_dataset(raw_dir, n_cases, shape, seed=seed, progress=False)
        generate_s = round(time.perf_counter() - t0, 1)
    cases = sorted(p.name for p in raw_dir.iterdir() if p.is_dir())
    if len(cases) < n_cases:
        raise BenchmarkError(f"{raw_dir} holds {len(cases)} case folders, {n_cases} needed")
    return cases, generate_s


def link_first_cases(raw_dir: Path, cases: list[str], n_cases: int, out: Path, shape: tuple[int, int, int], seed: int = SEED) -> Path:
    """A source folder with symlinks to the first ``n_cases`` case folders of ``raw_dir`` and its own synth marker."""
    from medseg.synth import resolve_anatomy, write_marker

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for case in cases[:n_cases]:
        os.symlink(raw_dir / case, out / case, target_is_directory=True)
    anatomy = json.loads((raw_dir / "medseg_synth.json").read_text()).get("anatomy") if (raw_dir / "medseg_synth.json").is_file() else resolve_anatomy("auto")
    write_marker(out, "brats2023", n_cases, seed, shape=list(shape), anatomy=anatomy)
    return out


def folder_gb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return round(total / 1024**3, 2)


# --------------------------------------------------------------------------- one N
def python_env() -> dict[str, str]:
    """Our runners import this checkout's ``medseg`` (not whatever the venv has installed)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def last_json(run: dict[str, Any], what: str, log: Path) -> dict[str, Any]:
    if run["exit_code"] != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BenchmarkError(f"{what} failed (exit {run['exit_code']}); log {log}:\n{tail}")
    return json.loads(run["last_line"])


def run_ours_ingest(source: Path, dataset: Path, n_cases: int, logs: Path, interval: float) -> dict[str, Any]:
    log = logs / f"ours-ingest-{n_cases}.log"
    run = run_monitored([sys.executable, "-c", INGEST_RUNNER, str(source), str(dataset), str(n_cases)], log,
                        env=python_env(), cwd=ROOT, interval=interval)
    run["phases"] = last_json(run, "our ingest", log)
    return run


def run_ours_preprocess(dataset: Path, out: Path, n_cases: int, workers: int, budget: str, logs: Path, interval: float) -> dict[str, Any]:
    log = logs / f"ours-preprocess-{n_cases}.log"
    run = run_monitored([sys.executable, "-c", OURS_RUNNER, str(dataset), str(out), budget, str(workers)], log,
                        env=python_env(), cwd=ROOT, interval=interval)
    run["phases"] = last_json(run, "our preprocessing", log)
    return run


def run_nnunet_monitored(venv: Path, work: Path, dataset_id: int, n_cases: int, workers: int, logs: Path, interval: float) -> dict[str, Any]:
    log = logs / f"nnunet-{n_cases}.log"
    marks: list[tuple[str, float]] = []

    def mark(line: str, t: float) -> None:
        key = NNUNET_MARKERS.get(line.strip())
        if key:
            marks.append((key, t))

    cmd = nnunet_plan_and_preprocess_command(venv, dataset_id, workers)
    run = run_monitored(cmd, log, env=nnunet_env(work), interval=interval, on_line=mark)
    if run["exit_code"] != 0:
        last_json(run, "nnUNetv2_plan_and_preprocess", log)  # raises with the log's tail
    run["phases"] = nnunet_phases(marks, run["wall_s"])
    run["command"] = " ".join(["nnUNetv2_plan_and_preprocess"] + cmd[1:])
    return run


def run_one_size(n_cases: int, index: int, raw_dir: Path, cases: list[str], shape: tuple[int, int, int], work: Path,
                 venv: Path | None, workers: int, budget: str, interval: float, record: Callable[[str, int, dict[str, Any]], None]) -> None:
    """Ours (ingest, preprocess), then nnU-Net, on the first ``n_cases``; each finished run goes to ``record`` at once."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    source = link_first_cases(raw_dir, cases, n_cases, work / "sources" / f"n{n_cases}", shape)
    dataset = work / "datasets" / f"n{n_cases}"
    print(f"[N={n_cases}] ours: ingest ...", file=sys.stderr)
    record("ours_ingest", n_cases, run_ours_ingest(source, dataset, n_cases, logs, interval))
    ours_out = work / "ours" / f"n{n_cases}"
    print(f"[N={n_cases}] ours: preprocess ...", file=sys.stderr)
    run = run_ours_preprocess(dataset, ours_out, n_cases, workers, budget, logs, interval)
    run["output_gb"] = folder_gb(ours_out)
    shutil.rmtree(ours_out)  # full-size outputs are large; only the numbers are kept
    record("ours_preprocess", n_cases, run)
    if venv is not None:
        folder_name, _ = nnunet_raw_dataset(dataset, work / "nnUNet_raw", 950 + index, f"scale{n_cases}")
        print(f"[N={n_cases}] nnU-Net: plan_and_preprocess ...", file=sys.stderr)
        run = run_nnunet_monitored(venv, work, 950 + index, n_cases, workers, logs, interval)
        nn_out = work / "nnUNet_preprocessed" / folder_name
        run["output_gb"] = folder_gb(nn_out)
        shutil.rmtree(nn_out)
        record("nnunet", n_cases, run)
    shutil.rmtree(dataset)


# --------------------------------------------------------------------------- main
def build_report(meta: dict[str, Any], runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The whole JSON: the table (per tool and N, plus ours ingest + preprocess), the summary, and every run in full."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for tool, by_n in runs.items():
        for n, run in by_n.items():
            table.setdefault(tool, {})[n] = per_case(run, int(n))
    for n in runs.get("ours_preprocess", {}):
        if n in runs.get("ours_ingest", {}):
            table.setdefault("ours_ingest_plus_preprocess", {})[n] = combine_rows([table["ours_ingest"][n], table["ours_preprocess"][n]])
    return {**meta, "table": table, "summary": summarise(table), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZES} at {QUICK_SHAPE} to check it works end to end")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"case counts (default {FULL_SIZES}; --quick {QUICK_SIZES})")
    parser.add_argument("--workers", type=int, default=2, help="processes for both tools (default 2)")
    parser.add_argument("--budget", default="gpu:8", help="our device budget (default gpu:8, nnU-Net's default 8 GB target)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between process-tree samples (default 0.2)")
    parser.add_argument("--raw-dir", type=Path, default=None, help="where the generated raw cases live (reused when they fit; default: inside the work dir)")
    parser.add_argument("--work-dir", type=Path, default=None, help="datasets, outputs and logs (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here, after every run")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where the nnU-Net venv lives (default {DEFAULT_CACHE})")
    parser.add_argument("--nnunet-version", default=NNUNET_VERSION)
    parser.add_argument("--skip-nnunet", action="store_true", help="ours only (no venv needed)")
    args = parser.parse_args()

    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES))
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    meta: dict[str, Any] = {"benchmark": "scale", "quick": args.quick, "sizes": sizes, "shape": list(shape), "channels": 4,
                            "workers": args.workers, "budget": args.budget, "interval_s": args.interval, "complete": False,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "machine": {"cpus": len(os.sched_getaffinity(0)), "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
                                        "python": platform.python_version(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}}
    venv = None
    if not args.skip_nnunet:
        try:
            venv, info = ensure_nnunet_venv(args.cache_dir, args.nnunet_version)
        except BenchmarkError as exc:
            print(json.dumps({**meta, "error": str(exc)}))
            return 2
        meta["nnunet_env"] = {**info, "venv": str(venv)}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medseg-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    raw_dir = args.raw_dir or work / "raw"
    runs: dict[str, dict[str, dict[str, Any]]] = {}

    def write_out() -> dict[str, Any]:
        report = build_report(meta, runs)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    def record(tool: str, n_cases: int, run: dict[str, Any]) -> None:
        runs.setdefault(tool, {})[str(n_cases)] = run
        print(f"  {tool} N={n_cases}: {run['wall_s']} s wall, {run['cpu_s']} s CPU, "
              f"peak RSS {run['memory'].get('peak_rss_max_process_mb')} MB (largest), {run['memory'].get('peak_rss_tree_mb')} MB (tree)", file=sys.stderr)
        write_out()

    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        cases, generate_s = ensure_raw_cases(raw_dir, max(sizes), shape)
        meta["data"] = {"raw_dir": str(raw_dir), "cases_available": len(cases), "generate_s": generate_s, "seed": SEED}
        for index, n_cases in enumerate(sizes, start=1):
            run_one_size(n_cases, index, raw_dir, cases, shape, work, venv, args.workers, args.budget, args.interval, record)
    except BenchmarkError as exc:
        meta["error"] = str(exc)
        print(json.dumps(write_out()))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    meta.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                load_avg_end=[round(x, 2) for x in os.getloadavg()])
    report = write_out()
    print(format_table(report["table"]), file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
