"""A train step killed mid-epoch resumes from the run's checkpoint store and ends with the same weights.

Under the real kfp.local runner, once the train step's first checkpoint is in the store (``WORK/checkpoints/<run>/...``):
1. only the train task's process is SIGKILLed (a preempted pod): the run's retry policy starts the task again, which
   restores the checkpoint, resumes after its epoch and the run completes;
2. the whole ``medseg pipeline run`` is SIGKILLed (its process group: a run that is gone); the pipeline is run again
   with ``--resume-run <run>`` and its train step resumes from that run's checkpoint.
Both must end with weights bitwise equal to those of an uninterrupted run of the same pipeline (deterministic
training, the same tuned parameters: the study is seeded).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from medseg import schemas
from medseg.training.checkpoint_store import CHECKPOINT_NAME

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "ingest": {"source_format": "auto", "n_folds": 2, "test_fraction": 0.25, "seed": 0},
    "preprocess": {"device_budget": "cpu", "configuration": "3d_fullres"},
    # epochs of a few seconds, so the kill lands inside one; deterministic kernels: the resumed run can be bitwise equal
    "train": {"epochs": 5, "iterations_per_epoch": 40, "max_val_cases": 1, "loader_prefetch": 0, "deterministic": True},
    "tune": {"n_trials": 1, "trial_params": {"epochs": 1, "iterations_per_epoch": 1, "max_val_cases": 1}},
    "evaluate": {"overlap": 0.25},
    "registry": {"model_name": "auto", "thresholds": "none", "promotion_margin": 1.0, "gate_metric": "auto"},
}


def _command(work: Path, source: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    params = {**PARAMS, "work_dir": str(work)}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return [sys.executable, "-m", "medseg.cli", "pipeline", "run", "--source", str(source), "--params", str(work / "params.yaml"), *extra], env


def _run(work: Path, source: Path, *extra: str) -> tuple[dict, str]:
    argv, env = _command(work, source, *extra)
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(out.splitlines()[-40:])
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{") and '"run_dir"' in line][-1])
    return summary, out


def _weights(summary: dict) -> dict[str, torch.Tensor]:
    model = Path(summary["tasks"]["train-0"]["model"])
    package = schemas.ModelPackage.load(model)
    return torch.load(model / package.weights_file, map_location="cpu", weights_only=True)


def _start_and_wait_for_a_checkpoint(argv: list[str], env: dict[str, str], work: Path, store: Path, log_path: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``medseg pipeline run`` in its own session; return it once its train step's first checkpoint is stored."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own descriptor
    deadline = time.monotonic() + 900
    stored: list[Path] = []
    while not stored:
        assert proc.poll() is None, f"the run ended before its first checkpoint was stored:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint reached the store"
        time.sleep(0.1)
        stored = list(store.glob(f"*/3d_fullres/fold_0/{CHECKPOINT_NAME}"))
    return proc, stored[0]


def _train_task_processes(session: int) -> list:
    """The process running the train component inside the run's session (kfp.local's executor_main, function train)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if os.getsid(p.pid) == session and "kfp.dsl.executor_main" in cmd and "train" in cmd:
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def test_a_train_step_killed_mid_epoch_resumes_from_the_store_with_the_same_weights(tmp_path: Path) -> None:
    from medseg.synth_layouts import generate_layout

    source = tmp_path / "raw"
    generate_layout("brats2023", source, 8, seed=0, shape=(32, 32, 32), progress=False, anatomy="procedural")
    work = tmp_path / "work"
    store = work / "checkpoints"

    # 1. a preempted train pod: only the train task's process is killed; the run's retry resumes it
    argv, env = _command(work, source)
    proc, _ = _start_and_wait_for_a_checkpoint(argv, env, work, store, work / "retried.log")
    victims = _train_task_processes(proc.pid)
    assert len(victims) == 1, victims
    victims[0].kill()
    assert proc.wait(timeout=1200) == 0, (work / "retried.log").read_text()[-3000:]
    retried_log = (work / "retried.log").read_text()
    assert "Retrying in" in retried_log and f"restored {CHECKPOINT_NAME}" in retried_log and "resumed from" in retried_log, retried_log[-3000:]
    retried = json.loads([line for line in retried_log.splitlines() if line.startswith("{") and '"run_dir"' in line][-1])

    # 2. the run that dies as a whole: killed as soon as its train step's first checkpoint is in the store
    proc, stored = _start_and_wait_for_a_checkpoint(argv, env, work, store, work / "killed.log")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_key = stored.relative_to(store).parts[0]
    stored = [stored]
    stored_epoch = torch.load(stored[0], map_location="cpu", weights_only=True)["epoch"]
    assert stored_epoch < PARAMS["train"]["epochs"] - 1, "the kill came after the last epoch"

    # 2. the same pipeline again, resuming the killed run's train step
    resumed, out = _run(work, source, "--resume-run", run_key)
    assert f"restored {CHECKPOINT_NAME}" in out, out[-3000:]
    assert "resumed from" in out and "changed settings" not in out, out[-3000:]
    assert not (store / run_key).exists(), "the stored checkpoints must be deleted once the model is written"
    history = schemas.ModelPackage.load(Path(resumed["tasks"]["train-0"]["model"])).training["history"]
    assert [h["epoch"] for h in history] == list(range(PARAMS["train"]["epochs"]))  # the killed run's epochs, then the rest

    # 3. an uninterrupted run: the same weights, bit for bit, as both resumed ones
    fresh, _ = _run(work, source)
    reference = _weights(fresh)
    for name, summary in (("retried in its run", retried), ("resumed in a new run", resumed)):
        weights = _weights(summary)
        assert weights.keys() == reference.keys()
        different = [k for k in weights if not torch.equal(weights[k], reference[k])]
        assert not different, f"{name}: {len(different)} tensor(s) differ from the uninterrupted run, e.g. {different[:3]}"

    # an unknown run to resume is refused before anything runs
    argv, env = _command(work, source, "--resume-run", "no-such-run")
    refused = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no checkpoints of run 'no-such-run'" in refused.stderr, refused.stderr[-2000:]
