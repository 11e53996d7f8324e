"""``make demo``: synthetic data → the real kfp.local pipeline → MLflow registry → served prediction.

Prints the held-out Dice per region, the stage wall times, how to open the MLflow UI, and as its last
line one JSON object with the results.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import read_json, write_json
from medseg.pipeline import runner
from medseg.task import Task

TASK_ORDER = ("ingest", "preprocess", "tune", "train", "evaluate", "register", "promote", "serve")


# tasks reported as one stage: the tuning fan-out (study creation, workers, best-params collector) and the folds' list
_STAGE_OF_TASK = {"tune-shards": "tune", "training-folds": "train"}


def _stage_seconds(run_dir: Path, started: float) -> dict[str, float]:
    """Wall time per task from the outputs' modification times (kfp.local runs tasks one at a time);
    ``started`` is the pipeline's start (epoch seconds)."""
    times = {}
    for task in Path(run_dir).iterdir():
        stamps = [p.stat().st_mtime for p in task.rglob("*") if p.is_file()]
        if stamps:
            times[task.name] = max(stamps)
    ordered = sorted(times.items(), key=lambda kv: kv[1])
    out: dict[str, float] = {}
    prev = started
    for name, stamp in ordered:
        stage = _STAGE_OF_TASK.get(name, name)
        if name.startswith("for-loop-"):  # a ParallelFor iteration: the tune workers', or the folds' training
            stage = "train" if (Path(run_dir) / name / "train").is_dir() else "tune"
        out[stage] = round(out.get(stage, 0.0) + stamp - prev, 1)
        prev = stamp
    return out


# lines of the pipeline log worth showing on the console (the full log goes to a file)
_CONSOLE = re.compile(r"(Executing task|finished with status|epoch \d+/\d+: loss|trial \d+: |error|Error|Traceback)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _run_pipeline_logged(params_file: Path, paths: dict[str, Path], log_file: Path) -> dict:
    """``medseg pipeline run`` in a child process: everything to ``log_file``, the milestones to the console."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "medseg.cli", "pipeline", "run", "--params", str(params_file), "--source", str(paths["raw"])]
    last = ""
    with open(log_file, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            clean = _ANSI.sub("", line.rstrip())
            if clean.startswith("{") and '"run_dir"' in clean:
                last = clean
            elif _CONSOLE.search(clean) and "UserWarning" not in clean:
                print("      " + clean.strip().removeprefix("INFO - ").strip(), flush=True)
        code = proc.wait()
    if code != 0 or not last:
        tail = log_file.read_text().splitlines()[-30:]
        raise MedsegError(f"the pipeline failed (exit {code}); last lines of {log_file}:\n" + "\n".join(tail))
    return json.loads(last)


def served_alias(tracking_uri: str, model_name: str, version: str | None) -> str | None:
    """The registry alias that points at the served ``version`` now (``champion`` first if several do), ``None``
    when nothing was served or no alias points at it: the summary reports what the registry says, not what was asked."""
    if not version:
        return None
    from medseg.registry.registry import CHAMPION, show_model

    found = sorted(a for a, v in show_model(model_name, tracking_uri)["aliases"].items() if v == str(version))
    return CHAMPION if CHAMPION in found else (found[0] if found else None)


def build_summary(task: Task, metrics: schemas.Metrics, model_name: str, smoke: dict | None, tracking_uri: str, wall_s: float) -> dict:
    """The demo's last line: the new version's held-out scores, and the version that answered (``smoke``, ``None``
    when no model has passed the gate) with the alias the registry holds for it."""
    groups = list(task.reported_groups) or list(task.gate_groups)
    scores = ({f"{r.lower()}_dice": round(metrics.mean.get(r, {}).get("dice", float("nan")), 4) for r in groups} if task.is_segmentation else
              {k: round(float(v), 4) for k, v in task.reported_metrics({"all": metrics.mean.get("all", {})}).items()})
    version = smoke["model_version"] if smoke else None
    return {**scores, "model_name": model_name, "model_version": version, "alias": served_alias(tracking_uri, model_name, version),
            "endpoint_ok": bool(smoke and smoke["endpoint_ok"]), "wall_s": wall_s}


def run_demo(params_file: Path, out_dir: Path) -> int:
    t_start = time.perf_counter()
    params = runner.load_params(params_file)
    paths = runner.work_paths(params)
    synth_cfg = params.get("synth", {})

    from medseg.synth import generate_dataset

    print(f"[1/4] synthetic BraTS-like data: {synth_cfg.get('cases', 24)} cases of {synth_cfg.get('shape', [96, 96, 96])} → {paths['raw']}", flush=True)
    t0 = time.perf_counter()
    if paths["raw"].exists():
        shutil.rmtree(paths["raw"])
    generate_dataset(paths["raw"], int(synth_cfg.get("cases", 24)), tuple(synth_cfg.get("shape", [96, 96, 96])), int(synth_cfg.get("seed", 0)))
    synth_s = time.perf_counter() - t0

    from medseg.training.tuning import sqlite_url

    tracking = f"sqlite:///{paths['mlflow_db']}"
    args = runner.pipeline_arguments(params, paths["raw"], tracking, sqlite_url(paths["optuna_db"]))
    log_file = paths["work"] / "logs" / schemas.PIPELINE_LOG_PATTERN.format(stamp=time.strftime('%Y%m%d-%H%M%S'))
    print(f"[2/4] training pipeline with kfp.local (pipeline root {paths['kfp']}; full log {log_file})", flush=True)
    started = time.time()
    result = _run_pipeline_logged(params_file, paths, log_file)
    run_dir = Path(result["run_dir"])
    tasks = result["tasks"]

    metrics = schemas.Metrics.load(Path(tasks["evaluate"]["evaluation"]))
    task = Task.from_folder(Path(tasks["ingest"]["dataset"]))
    model_name = str(runner.task_parameters(run_dir, "register").get("model_name") or args["model_name"])
    smoke = read_json(Path(tasks["serve"]["result"]) / schemas.SMOKE_JSON)
    if not smoke.get("model_version"):  # no champion at all: a first model under the thresholds
        smoke = None
    decision = read_json(tasks["promote"]["decision"])

    print("[3/4] served one held-out case through the KServe V2 endpoint", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key in ("segmentation", "overlay"):
        if smoke and smoke.get(key):
            shutil.copy2(smoke[key], out_dir / Path(smoke[key]).name)
    for name in (schemas.REPORT_MD, schemas.REPORT_HTML, schemas.DICE_BOXPLOT_PNG, schemas.METRICS_JSON, schemas.PER_CASE_CSV, schemas.CASES_CSV,
                 schemas.EXAMPLE_OVERLAY_PNG):
        src = Path(tasks["evaluate"]["evaluation"]) / name
        if src.exists():
            shutil.copy2(src, out_dir / name)

    stage_s = {"synth": round(synth_s, 1), **_stage_seconds(run_dir, started)}
    groups = list(task.reported_groups) or list(task.gate_groups)
    dice = {r: metrics.mean.get(r, {}).get("dice", float("nan")) for r in groups}
    hd95 = {r: metrics.mean.get(r, {}).get("hd95", float("nan")) for r in groups}
    lesionwise_key = f"lesionwise_dice_{task.lesionwise_suffix}" if task.lesionwise_suffix else None
    print(f"[4/4] held-out test cases: {metrics.n_cases} ({task!r})")
    if task.is_classification:
        print(f"      {task.headline(metrics.mean)}")
    for r in groups if task.is_segmentation else ():
        lesionwise = metrics.mean.get(r, {}).get(lesionwise_key) if lesionwise_key else None
        extra = f"   lesion-wise Dice ({task.lesionwise}) {lesionwise:.4f}" if lesionwise is not None else ""
        print(f"      {r}: Dice {dice[r]:.4f}   HD95 {hd95[r]:.2f} mm{extra}")
    print(f"      promotion: {'promoted' if decision.get('promoted') else 'refused'} ({decision.get('reason')})")
    if smoke:
        answer = (f"volumes (ml) {json.dumps({k: round(v, 1) for k, v in smoke['volumes_ml'].items()})}" if smoke.get("volumes_ml") is not None
                  else f"label {smoke.get('label')} {json.dumps({k: round(v, 3) for k, v in (smoke.get('probabilities') or {}).items()})}")
        alias = served_alias(tracking, model_name, smoke["model_version"])
        print(f"      served case {smoke['case_id']} ({alias or 'no alias'} v{smoke['model_version']}): {answer}, request {smoke['request_seconds']} s")
    else:
        print("      nothing served: no model has passed the promotion gate yet (see the registry tags for why)")
    print(f"      answer and report: {out_dir.resolve()}/")
    print("      wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in stage_s.items()))
    print(f"\nOpen the MLflow UI on these results:\n  .venv/bin/mlflow ui --backend-store-uri {tracking} --host 127.0.0.1 --port 5000\n  then browse http://127.0.0.1:5000 (experiment 'medseg', model '{model_name}')")
    print(f"Serve the champion yourself:\n  .venv/bin/medseg serve --model models:/{model_name}@champion --name {model_name} --port 8080   (with MLFLOW_TRACKING_URI={tracking})\n")
    summary = build_summary(task, metrics, model_name, smoke, tracking, round(time.perf_counter() - t_start, 1))
    # the Dice values are the newly trained version's; model_version is the champion that answered
    write_json(out_dir / schemas.DEMO_SUMMARY_JSON, {**summary, "registered_version": decision.get("version"), "promoted": bool(decision.get("promoted")),
                                          "promotion_reason": decision.get("reason"), "stage_seconds": stage_s, "run_dir": str(run_dir)})
    print(json.dumps(summary))
    return 0
