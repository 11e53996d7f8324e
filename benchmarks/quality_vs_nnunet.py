"""medseg against nnU-Net v2 on the same data, the same network topology and the same wall-clock training budget.

    .venv/bin/python benchmarks/quality_vs_nnunet.py                       # 48 cases of 128³, 30 min of training each
    .venv/bin/python benchmarks/quality_vs_nnunet.py --budget-minutes 60
    .venv/bin/python benchmarks/quality_vs_nnunet.py --quick               # 12 cases of 64³, 2 min each: checks the wiring

What is compared, in one run, one tool after the other:

- **Data**: ``medseg synth`` (BraTS 2023-like, MNI anatomy, seed 0), ingested once with a fixed held-out test
  split (``--test-fraction``, default 0.2 → 10 of 48 cases) and 5 folds. Both tools train fold 0 of *our*
  splits (nnU-Net gets them as ``splits_final.json``) and predict the same test cases from the same NIfTI files.
- **Plan**: ours, planned for ``--device-budget`` (default ``cpu``). nnU-Net plans and preprocesses with its own
  ``nnUNetv2_plan_and_preprocess`` (target spacing, normalisation, cropping: its own), then trains a plans file
  ``nnUNetPlans_medseg`` whose 3d_fullres patch size, batch size and U-Net topology (stages, features, kernels,
  strides) are ours, axes mapped onto its (z, y, x) order: its default plan (112³ patches, 16.5 M parameters) takes
  ~66 s a step on 2 cores and would not finish one epoch. Everything else is nnU-Net's recipe: SGD 0.01 with
  Nesterov, deep supervision, its full augmentation, region-based training (the dataset.json regions, as nnU-Net
  trains BraTS), foreground oversampling, its checkpoint_final for prediction.
- **Budget**: both train for ``--budget-minutes`` of wall clock on all cores. Each stops after the last epoch that
  fits (an epoch of the mean length so far), and each runs its poly learning-rate decay over the budget instead of
  an epoch count (ours: ``train.time_budget_minutes``; nnU-Net: a trainer subclass defined here whose scheduler
  reads the clock). Epoch length: ours ``iterations_per_epoch`` from params.yaml; nnU-Net the same number of
  iterations with validation iterations at its own 5:1 ratio. Clocks start at the first epoch (data loading and
  network building excluded for both); total wall seconds are reported too.
- **Prediction**: sliding window with overlap 0.5 for both, mirroring off unless ``--mirror`` (the same for both).
- **Metrics**: our evaluator (it matches the official BraTS 2023 scorer) on both tools' NIfTI predictions: Dice
  per region with a percentile bootstrap 95% CI of the mean over test cases, and the BraTS 2023 lesion-wise Dice.
- **Curves**: validation Dice against training wall-clock minutes, both tools, written as a PNG. Each tool's own
  validation number: ours is the sliding-window Dice on up to ``max_val_cases`` whole validation volumes; nnU-Net's
  is its "pseudo Dice" on random validation patches (and its EMA), so the levels are not comparable, the shapes are.

The last line printed is one JSON object::

    {"budget_minutes": 30, "medseg": {"WT": {"dice": .., "ci95": [..], "lesionwise_dice_2023": ..}, "TC": .., "ET": ..},
     "nnunet": {...}, "goal_met": .., "curves_png": "...", ...}

The nnU-Net venv is the one ``benchmarks/preprocess_vs_nnunet.py`` makes (``--cache-dir``), made on first use.
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
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_vs_nnunet import DEFAULT_CACHE, NNUNET_VERSION, BenchmarkError, ensure_nnunet_venv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 611
GOAL_MARGIN = 0.02  # medseg >= nnU-Net - 0.02 Dice on every region, and better on at least one


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log_file: Path, step: str, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` with its output in ``log_file``; seconds taken; :class:`BenchmarkError` naming the step on failure."""
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise BenchmarkError(f"{step} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- data
def make_dataset(work: Path, n_cases: int, shape: int, test_fraction: float) -> Path:
    from medseg.ingest.ingest import ingest
    from medseg.synth import generate_dataset

    raw, dataset = work / "raw", work / "dataset"
    if (dataset / "splits.json").is_file():
        log(f"reusing the dataset in {dataset}")
        return dataset
    log(f"synthesising {n_cases} cases of {shape}³ ...")
    generate_dataset(raw, n_cases, (shape, shape, shape), seed=0, progress=False)
    ingest(raw, dataset, n_folds=5, test_fraction=test_fraction, seed=0, progress=False)
    shutil.rmtree(raw)
    return dataset


def region_label_order(regions: dict[str, list[int]]) -> tuple[list[str], list[int]]:
    """nnU-Net's ``regions_class_order``: regions from largest to smallest, each written as the one label value it
    adds over the next (nested regions, as the BraTS ones are); the region names in that order."""
    ordered = sorted(regions, key=lambda name: -len(regions[name]))
    order = []
    for i, name in enumerate(ordered):
        inner = set(regions[ordered[i + 1]]) if i + 1 < len(ordered) else set()
        own = sorted(set(regions[name]) - inner)
        if not own:
            raise BenchmarkError(f"region {name} adds no label over the next one: not nested regions")
        order.append(own[0])
    return ordered, order


def nnunet_raw_dataset(dataset: Path, work: Path) -> tuple[str, list[str], list[str]]:
    """Link the training cases (not the test split) into ``nnUNet_raw`` with a region-based dataset.json; returns
    the folder name, the training cases and the test cases."""
    from medseg import schemas
    from medseg.task import Task

    ds = schemas.DatasetJson.load(dataset)
    splits = schemas.Splits.load(dataset)
    task = Task.from_dataset(ds)
    train_cases = sorted({c for fold in splits.folds for part in ("train", "val") for c in fold[part]})
    folder_name = f"Dataset{DATASET_ID:03d}_medsegquality"
    folder = work / "nnUNet_raw" / folder_name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in train_cases:
        for c in range(len(ds.channel_names)):
            os.symlink(dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz", folder / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        os.symlink(dataset / "labelsTr" / f"{case}.nii.gz", folder / "labelsTr" / f"{case}.nii.gz")
    names, order = region_label_order({k: list(v) for k, v in task.regions.items()})
    labels: dict[str, Any] = {"background": 0, **{name: list(task.regions[name]) for name in names}}
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": ds.channel_names, "labels": labels, "regions_class_order": order,
        "numTraining": len(train_cases), "file_ending": ".nii.gz",
    }, indent=2))
    return folder_name, train_cases, list(splits.test)


# --------------------------------------------------------------------------- ours
def run_ours(dataset: Path, work: Path, budget_minutes: float, device_budget: str, mirror: bool, params_path: Path) -> dict[str, Any]:
    medseg = str(Path(sys.executable).parent / "medseg")
    pre, train_dir, preds = work / "ours" / "preprocessed", work / "ours" / "train", work / "ours" / "predictions"
    (work / "ours").mkdir(parents=True, exist_ok=True)
    logs = work / "ours"
    t_pre = _run([medseg, "preprocess", "--dataset", str(dataset), "--out", str(pre), "--configuration", "3d_fullres",
                  "--device-budget", device_budget], logs / "preprocess.log", "medseg preprocess")
    params = yaml.safe_load(params_path.read_text())
    train = dict(params["train"])
    train.update(epochs=100000, time_budget_minutes=float(budget_minutes), fold=0, configuration="3d_fullres")
    bench_params = work / "ours" / "params.yaml"
    bench_params.write_text(yaml.safe_dump({"train": train}))
    log(f"medseg: training for {budget_minutes} min (log {logs / 'train.log'}) ...")
    t_train = _run([medseg, "train", "--preprocessed", str(pre), "--params", str(bench_params), "--tracking-uri", "none",
                    "--out", str(train_dir), "--fold", "0"], logs / "train.log", "medseg train")
    history = _our_history(train_dir)
    log("medseg: predicting the test cases ...")
    from medseg import schemas
    from medseg.inference.batch import predict_folder

    splits = schemas.Splits.load(dataset)
    inputs = work / "ours" / "test_inputs"
    _link_test_inputs(dataset, splits.test, inputs)
    t0 = time.perf_counter()
    predict_folder(train_dir / "model", inputs, preds, overlap=0.5, mirror=mirror, device="cpu", progress=False)
    t_pred = time.perf_counter() - t0
    plan = schemas.Plans.load(pre).configuration("3d_fullres")
    return {"preprocess_s": round(t_pre, 1), "train_wall_s": round(t_train, 1), "predict_s": round(t_pred, 1), "epochs": len(history),
            "iterations_per_epoch": train["iterations_per_epoch"], "history": history, "predictions": str(preds), "plan": plan,
            "recipe": {k: train[k] for k in ("optimizer", "learning_rate", "lr_schedule", "loss", "network", "augmentation", "foreground_share", "max_val_cases")}}


def _our_history(train_dir: Path) -> list[dict[str, float]]:
    """Per-epoch validation Dice against cumulative training minutes, from the last checkpoint."""
    import torch

    ckpt = torch.load(train_dir / "checkpoint_latest.pt", map_location="cpu", weights_only=True)  # plain data since checkpoint format 3
    minutes, out = 0.0, []
    for row in ckpt["history"]:
        minutes += float(row["epoch_seconds"]) / 60
        out.append({"epoch": int(row["epoch"]) + 1, "minutes": round(minutes, 3), "val_dice": round(float(row["val_dice_mean"]), 4),
                    "train_loss": round(float(row["train_loss"]), 4)})
    return out


def _link_test_inputs(dataset: Path, cases: list[str], folder: Path) -> None:
    from medseg import schemas

    n_channels = len(schemas.DatasetJson.load(dataset).channel_names)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for case in cases:
        for c in range(n_channels):
            os.symlink(dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz", folder / f"{case}_{c:04d}.nii.gz")


# --------------------------------------------------------------------------- nnU-Net
NNUNET_RUNNER = textwrap.dedent('''
    """Train nnU-Net (its trainer, our budget) and predict the test cases; argv[1] is a JSON of settings."""
    import json, sys, time
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])


    class BudgetPoly:
        """nnU-Net's poly decay, (1 - t)^0.9, with t the share of the wall-clock budget spent (clock from the first epoch)."""

        def __init__(self, optimizer, initial_lr, budget_s):
            self.optimizer, self.initial_lr, self.budget_s, self.t0 = optimizer, initial_lr, budget_s, None

        def step(self, current_step=None):
            self.t0 = self.t0 or time.monotonic()
            t = min((time.monotonic() - self.t0) / self.budget_s, 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = self.initial_lr * (1.0 - t) ** 0.9


    class nnUNetTrainerBudget(nnUNetTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = args["iterations_per_epoch"]
            self.num_val_iterations_per_epoch = max(1, args["iterations_per_epoch"] // 5)  # nnU-Net's 250:50
            self.num_epochs = 100000
            self.curve = []

        def configure_optimizers(self):
            optimizer, _ = super().configure_optimizers()
            return optimizer, BudgetPoly(optimizer, self.initial_lr, args["budget_s"])

        def run_training(self):
            self.on_train_start()
            t0 = time.monotonic()
            while True:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()
                elapsed = time.monotonic() - t0
                get = self.logger.get_value
                self.curve.append({"epoch": self.current_epoch, "minutes": round(elapsed / 60, 3), "pseudo_dice": round(float(get("mean_fg_dice", -1)), 4),
                                   "ema_pseudo_dice": round(float(get("ema_fg_dice", -1)), 4), "train_loss": round(float(get("train_losses", -1)), 4)})
                print(json.dumps({"curve": self.curve[-1]}), flush=True)
                if elapsed + elapsed / self.current_epoch > args["budget_s"]:
                    break
            self.on_train_end()


    plans = load_json(args["plans"])
    plans["continue_training"] = False  # nnUNetv2_train's run_training puts it there; the trainer pops it
    dataset_json = load_json(args["dataset_json"])
    trainer = nnUNetTrainerBudget(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.run_training()
    train_s = time.perf_counter() - t0

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args["mirror"], perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [{k: v.detach().clone() for k, v in trainer.network.state_dict().items()}],
                                    trainer.dataset_json, trainer.__class__.__name__, trainer.inference_allowed_mirroring_axes)
    t0 = time.perf_counter()
    predictor.predict_from_files_sequential(args["inputs"], args["outputs"], save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None)
    print(json.dumps({"result": {"train_s": train_s, "predict_s": time.perf_counter() - t0, "curve": trainer.curve,
                                 "n_parameters": sum(p.numel() for p in trainer.network.parameters())}}), flush=True)
''')


def nnunet_plans_like_ours(plans_file: Path, out_file: Path, plan: Any) -> dict[str, Any]:
    """nnU-Net's plans with its 3d_fullres patch, batch and U-Net topology replaced by ours (axes mapped: ours are
    the NIfTI (I, J, K), nnU-Net's are SimpleITK's reversed order, then ``transpose_forward``)."""
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    forward = plans["transpose_forward"]

    def to_nnunet(axes: list[Any]) -> list[Any]:
        reversed_axes = list(axes)[::-1]
        return [reversed_axes[i] for i in forward]

    net = plan.network
    kwargs = cfg["architecture"]["arch_kwargs"]
    n_stages = len(net["features"])
    kwargs.update(n_stages=n_stages, features_per_stage=list(net["features"]),
                  kernel_sizes=[to_nnunet(k) for k in net["kernel_sizes"]], strides=[to_nnunet(s) for s in net["strides"]],
                  n_conv_per_stage=[2] * n_stages, n_conv_per_stage_decoder=[2] * (n_stages - 1))
    cfg.update(patch_size=to_nnunet(plan.patch_size), batch_size=int(plan.batch_size))
    plans["plans_name"] = out_file.stem
    out_file.write_text(json.dumps(plans, indent=2))
    return {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"], "features_per_stage": kwargs["features_per_stage"],
            "strides": kwargs["strides"], "default_plan_patch_size": json.loads(plans_file.read_text())["configurations"]["3d_fullres"]["patch_size"]}


def run_nnunet(venv: Path, dataset: Path, work: Path, budget_minutes: float, mirror: bool, plan: Any, iterations_per_epoch: int) -> dict[str, Any]:
    from medseg import schemas

    folder_name, train_cases, test_cases = nnunet_raw_dataset(dataset, work)
    env = dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_n_proc_DA=str(len(os.sched_getaffinity(0))), nnUNet_compile="false",
               PYTHONUNBUFFERED="1")
    logs = work / "nnunet"
    logs.mkdir(parents=True, exist_ok=True)
    cores = str(len(os.sched_getaffinity(0)))
    log("nnU-Net: plan and preprocess ...")
    t_pre = _run([str(venv / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", cores, "-npfp", cores, "--no_pbar"],
                 logs / "plan_and_preprocess.log", "nnUNetv2_plan_and_preprocess", env)
    pre = work / "nnUNet_preprocessed" / folder_name
    topology = nnunet_plans_like_ours(pre / "nnUNetPlans.json", pre / "nnUNetPlans_medseg.json", plan)
    splits = schemas.Splits.load(dataset)
    (pre / "splits_final.json").write_text(json.dumps([{"train": f["train"], "val": f["val"]} for f in splits.folds], indent=1))
    n_channels = len(schemas.DatasetJson.load(dataset).channel_names)
    preds = logs / "predictions"
    preds.mkdir(exist_ok=True)
    settings = {
        "plans": str(pre / "nnUNetPlans_medseg.json"), "dataset_json": str(pre / "dataset.json"), "budget_s": budget_minutes * 60.0,
        "iterations_per_epoch": iterations_per_epoch, "mirror": mirror, "threads": len(os.sched_getaffinity(0)),
        "inputs": [[str(dataset / "imagesTr" / f"{c}_{k:04d}.nii.gz") for k in range(n_channels)] for c in test_cases],
        "outputs": [str(preds / c) for c in test_cases],
    }
    runner = logs / "runner.py"
    runner.write_text(NNUNET_RUNNER)
    log(f"nnU-Net: training for {budget_minutes} min (log {logs / 'train.log'}) ...")
    t0 = time.perf_counter()
    _run([str(venv / "bin" / "python"), str(runner), json.dumps(settings)], logs / "train.log", "nnU-Net training", env)
    wall = time.perf_counter() - t0
    result = None
    for line in (logs / "train.log").read_text(errors="replace").splitlines():
        if line.startswith('{"result"'):
            result = json.loads(line)["result"]
    if result is None:
        raise BenchmarkError(f"nnU-Net runner printed no result; log {logs / 'train.log'}")
    return {"preprocess_s": round(t_pre, 1), "train_and_predict_wall_s": round(wall, 1), "predict_s": round(result["predict_s"], 1),
            "epochs": len(result["curve"]), "iterations_per_epoch": iterations_per_epoch, "history": result["curve"], "predictions": str(preds),
            "n_parameters": result["n_parameters"], "plans": topology, "n_train_cases": len(train_cases)}


# --------------------------------------------------------------------------- scoring
def score(pred_dir: Path, dataset: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Dice per region (mean, bootstrap 95% CI of the mean over the test cases) and BraTS 2023 lesion-wise Dice."""
    from medseg import schemas
    from medseg.evaluation.report import evaluate_folder
    from medseg.registry.gate import case_value, paired_bootstrap
    from medseg.task import Task

    ds = schemas.DatasetJson.load(dataset)
    task = Task.from_dataset(ds)
    test = schemas.Splits.load(dataset).test
    metrics = evaluate_folder(pred_dir, dataset / "labelsTr", ds, out_dir, case_ids=test, progress=False, lesionwise=task.lesionwise or "auto")
    out: dict[str, dict[str, Any]] = {}
    for group in task.reported_groups:
        dice = np.array([v for v in (case_value(c, group, "dice") for c in metrics.per_case) if v is not None], dtype=np.float64)
        mean, low, high = paired_bootstrap(dice, n_bootstrap=2000, seed=0)
        entry: dict[str, Any] = {"dice": round(float(mean), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}
        lw = [v for v in (case_value(c, group, "lesionwise_dice_2023") for c in metrics.per_case) if v is not None]
        if lw:
            entry["lesionwise_dice_2023"] = round(float(np.mean(lw)), 4)
        out[group] = entry
    return out


def curves_png(ours: list[dict[str, float]], nnunet: list[dict[str, float]], path: Path, budget_minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["minutes"] for r in ours], [r["val_dice"] for r in ours], "o-", ms=3, label="medseg: val Dice (sliding window, whole val volumes)")
    ax.plot([r["minutes"] for r in nnunet], [r["pseudo_dice"] for r in nnunet], ".", alpha=0.5, label="nnU-Net: pseudo Dice (val patches)")
    ax.plot([r["minutes"] for r in nnunet], [r["ema_pseudo_dice"] for r in nnunet], "-", label="nnU-Net: EMA pseudo Dice")
    ax.axvline(budget_minutes, color="grey", ls=":", lw=1)
    ax.set_xlabel("training wall clock (min)")
    ax.set_ylabel("validation Dice (mean over regions)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"fold 0 validation during a {budget_minutes:g}-minute budget")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def goal(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    diffs = {g: round(ours[g]["dice"] - theirs[g]["dice"], 4) for g in ours}
    return {"dice_difference": diffs, "within_margin_everywhere": all(d >= -GOAL_MARGIN for d in diffs.values()),
            "better_somewhere": any(d > 0 for d in diffs.values()),
            "goal_met": all(d >= -GOAL_MARGIN for d in diffs.values()) and any(d > 0 for d in diffs.values())}


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="training wall clock per tool (default 30)")
    parser.add_argument("--cases", type=int, default=48, help="synthetic cases (default 48)")
    parser.add_argument("--shape", type=int, default=128, help="cube edge in voxels (default 128)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share (default 0.2)")
    parser.add_argument("--device-budget", default="cpu", help="our plan's device budget (default cpu); nnU-Net trains the same topology")
    parser.add_argument("--mirror", action="store_true", help="mirroring at prediction, for both (default off)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="our training recipe: the file's train section (default params.yaml)")
    parser.add_argument("--quick", action="store_true", help="12 cases of 64³, 2 minutes each: checks the wiring, says nothing of quality")
    parser.add_argument("--only", choices=("both", "medseg", "nnunet"), default="both", help="run one tool (reuses the work dir's dataset)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where the nnU-Net venv lives (default {DEFAULT_CACHE})")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data, models and predictions here (default: a temporary folder, removed)")
    parser.add_argument("--curves", type=Path, default=None, help="curve PNG path (default: WORK/quality_curves.png, copied next to --work-dir's parent when temporary)")
    args = parser.parse_args()
    if args.quick:
        args.budget_minutes, args.cases, args.shape = min(args.budget_minutes, 2.0), 12, 64

    report: dict[str, Any] = {"benchmark": "quality_vs_nnunet", "budget_minutes": args.budget_minutes, "cases": args.cases, "shape": args.shape,
                              "mirror": args.mirror, "device_budget": args.device_budget,
                              "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    venv = None
    if args.only != "medseg":
        try:
            venv, info = ensure_nnunet_venv(args.cache_dir, NNUNET_VERSION)
        except BenchmarkError as exc:
            print(json.dumps({**report, "error": str(exc)}))
            return 2
        report["nnunet_env"] = info
    temporary = args.work_dir is None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="medseg-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    curves = args.curves or (Path.cwd() / "quality_curves.png" if temporary else work / "quality_curves.png")
    try:
        dataset = make_dataset(work, args.cases, args.shape, args.test_fraction)
        from medseg import schemas

        splits = schemas.Splits.load(dataset)
        report["n_test_cases"], report["n_fold0_train"], report["n_fold0_val"] = len(splits.test), len(splits.folds[0]["train"]), len(splits.folds[0]["val"])
        ours = run_ours(dataset, work, args.budget_minutes, args.device_budget, args.mirror, args.params) if args.only != "nnunet" else None
        if ours is None and not (work / "ours" / "preprocessed" / "plans.json").is_file():  # nnU-Net alone still needs our plan's topology
            medseg = str(Path(sys.executable).parent / "medseg")
            _run([medseg, "preprocess", "--dataset", str(dataset), "--out", str(work / "ours" / "preprocessed"), "--configuration", "3d_fullres",
                  "--device-budget", args.device_budget], work / "preprocess_for_plan.log", "medseg preprocess")
        plan = schemas.Plans.load(work / "ours" / "preprocessed").configuration("3d_fullres")
        iterations = int(yaml.safe_load(args.params.read_text())["train"]["iterations_per_epoch"])
        theirs = run_nnunet(venv, dataset, work, args.budget_minutes, args.mirror, plan, iterations) if venv is not None else None
        results: dict[str, Any] = {}
        for name, run in (("medseg", ours), ("nnunet", theirs)):
            if run is None:
                continue
            log(f"scoring {name} ...")
            results[name] = score(Path(run["predictions"]), dataset, work / name / "evaluation")
            report[name] = results[name]
            report[f"{name}_run"] = {k: v for k, v in run.items() if k not in ("predictions", "plan")}
        report["plan"] = {"patch_size": plan.patch_size, "batch_size": plan.batch_size, "spacing": plan.spacing, "features": plan.network["features"],
                          "n_parameters_ours": plan.n_parameters}
        if ours and theirs:
            report.update(goal(results["medseg"], results["nnunet"]))
            curves_png(ours["history"], theirs["history"], curves, args.budget_minutes)
            report["curves_png"] = str(curves)
    except BenchmarkError as exc:
        report["error"] = str(exc)
        print(json.dumps(report))
        return 1
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
