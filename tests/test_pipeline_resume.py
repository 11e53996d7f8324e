"""A train step killed mid-epoch resumes from the run's checkpoint store and ends with the same weights.

Under the real kfp.local runner: ``medseg pipeline run`` is SIGKILLed (its whole process group, as a node that
dies takes the pod) once the train step's first checkpoint is in the store (``WORK/checkpoints/<run>/...``); the
pipeline is then run again with ``--resume-run <run>``, and its train step must restore that checkpoint, resume after
its epoch and end with weights bitwise equal to those of an uninterrupted run of the same pipeline (deterministic
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


def test_a_train_step_killed_mid_epoch_resumes_from_the_store_with_the_same_weights(tmp_path: Path) -> None:
    from medseg.synth_layouts import generate_layout

    source = tmp_path / "raw"
    generate_layout("brats2023", source, 8, seed=0, shape=(32, 32, 32), progress=False, anatomy="procedural")
    work = tmp_path / "work"
    store = work / "checkpoints"

    # 1. the run that dies: killed as soon as its train step's first checkpoint is in the store
    argv, env = _command(work, source)
    log_path = work / "killed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 900
        stored: list[Path] = []
        while not stored:
            assert proc.poll() is None, f"the run ended before its first checkpoint was stored:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint reached the store"
            time.sleep(0.1)
            stored = list(store.glob(f"*/3d_fullres/fold_0/{CHECKPOINT_NAME}"))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_key = stored[0].relative_to(store).parts[0]
    stored_epoch = torch.load(stored[0], map_location="cpu", weights_only=True)["epoch"]
    assert stored_epoch < PARAMS["train"]["epochs"] - 1, "the kill came after the last epoch"

    # 2. the same pipeline again, resuming the killed run's train step
    resumed, out = _run(work, source, "--resume-run", run_key)
    assert f"restored {CHECKPOINT_NAME}" in out, out[-3000:]
    assert "resumed from" in out and "changed settings" not in out, out[-3000:]
    assert not (store / run_key).exists(), "the stored checkpoints must be deleted once the model is written"
    history = schemas.ModelPackage.load(Path(resumed["tasks"]["train-0"]["model"])).training["history"]
    assert [h["epoch"] for h in history] == list(range(PARAMS["train"]["epochs"]))  # the killed run's epochs, then the rest

    # 3. an uninterrupted run: the same weights, bit for bit
    fresh, _ = _run(work, source)
    a, b = _weights(resumed), _weights(fresh)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensor(s) differ after the resume, e.g. {different[:3]}"

    # an unknown run to resume is refused before anything runs
    argv, env = _command(work, source, "--resume-run", "no-such-run")
    refused = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "no checkpoints of run 'no-such-run'" in refused.stderr, refused.stderr[-2000:]
