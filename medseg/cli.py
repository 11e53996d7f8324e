"""``medseg <stage> ...``: one entry point; each stage's function is the one KFP and DVC call too.

Heavy libraries (torch, monai, mlflow, kserve) are imported only by the subcommand that needs them, so
``medseg --help`` answers at once, and an install with one extra (``medseg-ops[serve]``) runs its stages:
a stage whose extra is missing answers with the ``pip install 'medseg-ops[EXTRA]'`` that brings it
(:data:`COMMAND_EXTRAS`, :mod:`medseg.optional`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from medseg.errors import MedsegError
from medseg.optional import MissingExtraError, is_third_party, needs_extra
from medseg.schemas import OPTUNA_DB, PARAMS_YAML, VOLUMES_CSV


def _stage(module: str):
    return importlib.import_module(module)


# ----------------------------------------------------------------------------- stage commands
def _add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, type=Path, help="canonical dataset folder (output of ingest)")
    p.add_argument("--out", required=True, type=Path, help="preprocessed folder to write")
    p.add_argument("--device-budget", default="cpu", help="cpu | gpu:<GiB> (default: cpu)")
    p.add_argument("--configuration", default=None, choices=["auto", "2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"],
                   help="the configuration to train; auto picks as nnU-Net (2d for slice sets and strongly anisotropic data, else 3d_fullres) and the "
                        "plan records the choice (replaces --configurations)")
    p.add_argument("--candidates", default="", help="with --configuration: the configurations cross-validation will choose among, preprocessed too: "
                        "all (2d, 3d_fullres and the cascade when planned) or a list such as 2d,3d_fullres (default: none)")
    p.add_argument("--configurations", nargs="+", default=["3d_fullres"], help="which planned configurations to preprocess (and train): 2d, 3d_fullres, 3d_lowres (default: 3d_fullres)")
    p.add_argument("--plans", type=Path, default=None, help="use this (hand-edited) plans.json instead of planning (no new fingerprint: the one beside it is copied)")
    p.add_argument("--workers", type=int, default=None, help="parallel cases (default: cores)")


def _run_preprocess(a: argparse.Namespace) -> int:
    plans = _stage("medseg.preprocessing.preprocess").run_preprocessing(a.dataset, a.out, a.device_budget, tuple(a.configurations), a.workers, plans=a.plans,
                                                                        configuration=a.configuration, candidates=a.candidates)
    if plans.chosen_configuration:
        print(f"configuration: {plans.chosen_configuration} ({plans.configuration_reason})")
    c = plans.configuration(plans.trained_configurations[-1] if plans.trained_configurations else None)
    print(f"plans: spacing {[round(s, 3) for s in c.spacing]} mm, patch {c.patch_size}, batch {c.batch_size}, "
          f"features {c.network['features']}, {c.n_parameters:,} parameters → {a.out}")
    return 0


def _add_train_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preprocessed", required=True, type=Path, help="preprocessed folder (output of preprocess)")
    p.add_argument("--params", type=Path, default=None, metavar="FILE",
                   help="parameter file, e.g. params-production.yaml (its 'train' and 'tune' sections; default: params.yaml, if present)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; 'none' disables)")


def _params(a: argparse.Namespace) -> dict:
    """The parameter file ``--params`` names (an error if it is missing), else ``params.yaml`` if present, else none."""
    from medseg.pipeline.runner import load_params

    if a.params is None:
        return load_params(PARAMS_YAML) if Path(PARAMS_YAML).is_file() else {}
    return load_params(a.params)  # named explicitly: a typo must not fall back to the defaults


def _train_params(a: argparse.Namespace) -> dict:
    """``train:`` of the parameter file as TrainConfig fields (``folds``, which folds to train, is the caller's)."""
    from medseg.training.config import split_train_section

    return split_train_section(_params(a).get("train"))[0]


def _tracking(a: argparse.Namespace) -> str | None:
    from medseg.tracking import default_tracking_uri

    if a.tracking_uri == "none":
        return None
    return a.tracking_uri or default_tracking_uri()


def _add_tune(p: argparse.ArgumentParser) -> None:
    _add_train_common(p)
    p.add_argument("--out", required=True, type=Path, help="best_params.json to write")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default: params tune.n_trials)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///work/optuna.db)")
    p.add_argument("--study", default=None, help="study name, resumed if it exists (default: medseg-<plan hash>, one study per plan)")


def _run_tune(a: argparse.Namespace) -> int:
    from medseg.task import configuration_stages
    from medseg.training.stage import run_tune
    from medseg.training.tuning import sqlite_url

    params = _params(a)
    tune_cfg = params.get("tune", {})
    storage = a.storage or sqlite_url(Path(params.get("work_dir", "work")) / OPTUNA_DB)
    Path(params.get("work_dir", "work")).mkdir(parents=True, exist_ok=True)
    from medseg import schemas

    if a.study is None:
        a.study = f"medseg-{schemas.Plans.load(a.preprocessed).content_hash()[:12]}"
    trial = {**_train_params(a), **tune_cfg.get("trial_params", {})}
    chosen = schemas.Plans.load(a.preprocessed).chosen_configuration
    if chosen and "configuration" not in trial:  # the configuration preprocessing chose (a cascade is tuned on its first stage)
        trial["configuration"] = configuration_stages(chosen)[0]
    best = run_tune(a.preprocessed, a.out, trial, a.trials or int(tune_cfg.get("n_trials", 3)), storage, a.study, _tracking(a))
    print(f"best: {best.params} (val dice {best.best_value:.4f}, {best.n_trials} trials, {best.n_pruned} pruned) → {a.out}")
    return 0


def _add_train(p: argparse.ArgumentParser) -> None:
    _add_train_common(p)
    p.add_argument("--out", required=True, type=Path, help="training folder (checkpoint; the model package in OUT/model; several folds: OUT/fold_N and their ensemble in OUT/model)")
    p.add_argument("--best-params", type=Path, default=None, help="best_params.json from tune (overrides params)")
    p.add_argument("--config", dest="configuration", default=None, help="configuration (default 3d_fullres; 3d_cascade_fullres: 3d_fullres with --cascade-from)")
    p.add_argument("--fold", default=None, help="fold N (default: the parameter file's train.folds, else train.fold), a list N,M,... or 'all': each fold into OUT/fold_N, one after the other, then their ensemble in OUT/model")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None, help="default: params (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--deterministic", action="store_true", default=None, help="bitwise repeatable run (deterministic kernels)")
    p.add_argument("--augmentation", type=_augmentation_arg, default=None, metavar="SETTING",
                   help="overrides train.augmentation: false, true (nnU-Net's default set) or a YAML/JSON mapping of knobs, "
                        "e.g. '{elastic: true, mirror: {axes: [0, 1]}}' (medseg.training.config.AugmentationConfig)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_latest.pt (several folds: finished folds are skipped)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="DDP training processes on this machine, started with torchrun (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="machines of a multi-node DDP job (rendezvous from MASTER_ADDR, MASTER_PORT, RANK: a PyTorchJob sets them)")
    p.add_argument("--cascade-from", type=Path, default=None, metavar="LOWRES_MODEL",
                   help="train the 3d_fullres stage of a 3d_lowres→3d_fullres cascade on top of this 3d_lowres model package (or its training folder; "
                        "a --fold all ensemble gives out-of-fold previous-stage maps); the package carries the low-res stage along")


def _augmentation_arg(text: str) -> bool | dict:
    """``--augmentation``: YAML (so JSON too) giving true, false or a mapping; the knobs are checked by TrainConfig."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML/JSON ({exc})") from None
    if not isinstance(value, (bool, dict)):
        raise argparse.ArgumentTypeError(f"expected true, false or a mapping of knobs, got {text!r}")
    return value


def _run_train(a: argparse.Namespace) -> int:
    import dataclasses

    from medseg import schemas
    from medseg.task import configuration_stages
    from medseg.training.stage import merged_params, parse_folds, run_train, run_train_folds

    cfg = merged_params(_train_params(a), a.best_params)
    overrides = {k: getattr(a, k) for k in ("configuration", "epochs", "seed", "precision", "deterministic", "augmentation") if getattr(a, k) is not None}
    chosen = schemas.Plans.load(a.preprocessed).chosen_configuration
    if "configuration" not in overrides and chosen:  # what `medseg preprocess --configuration` chose (auto: from the task)
        if len(configuration_stages(chosen)) > 1 and a.cascade_from is None:
            from medseg.training.stage import run_train_configuration

            r = run_train_configuration(a.preprocessed, a.out, dataclasses.replace(cfg, **overrides), chosen, _tracking(a), resume=a.resume,
                                        nproc_per_node=a.nproc_per_node, nnodes=a.nnodes)
            if r.model_dir is not None:
                print(f"cascade: best {r.metric.replace('_', ' ')} {r.best_val_dice:.4f} → {r.model_dir}")
            return 0
        overrides["configuration"] = configuration_stages(chosen)[-1]
    if overrides.get("configuration") == "3d_cascade_fullres":  # nnU-Net's name for it: 3d_fullres with the previous stage
        if a.cascade_from is None:
            raise MedsegError("--config 3d_cascade_fullres needs --cascade-from LOWRES_MODEL (a trained 3d_lowres model package)")
        overrides["configuration"] = "3d_fullres"
    if a.cascade_from is not None:
        overrides["cascade_from"] = str(a.cascade_from.resolve())
    cfg = dataclasses.replace(cfg, **overrides)
    from medseg.training.config import split_train_section

    fold_choice = a.fold if a.fold is not None else split_train_section(_params(a).get("train"))[1]  # --fold, else the file's train.folds
    folds = parse_folds(fold_choice, len(schemas.Splits.load(a.preprocessed).folds))
    launch = {"resume": a.resume, "nproc_per_node": a.nproc_per_node, "nnodes": a.nnodes}
    if folds is None or len(folds) == 1:
        cfg = dataclasses.replace(cfg, fold=folds[0]) if folds else cfg
        r = run_train(a.preprocessed, a.out, cfg, _tracking(a), **launch)
        if r.model_dir is not None:  # None on ranks/nodes other than 0 of a distributed job
            print(f"best {r.metric.replace('_', ' ')} {r.best_val_dice:.4f} at epoch {r.best_epoch + 1}/{r.epochs_run}, {r.seconds_per_step:.2f} s/step → {r.model_dir}")
        return 0
    r = run_train_folds(a.preprocessed, a.out, cfg, folds, _tracking(a), **launch)
    if r.model_dir is not None:
        print(f"best {next(iter(r.results.values())).metric.replace('_', ' ')} per fold: " + ", ".join(f"{f} {x.best_val_dice:.4f}" for f, x in r.results.items())
              + " | out-of-fold dice: " + ", ".join(f"{k} {v:.4f}" for k, v in r.cv_dice.items()) + f" → ensemble {r.model_dir}")
    return 0


def _add_eval_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="model package folder")
    p.add_argument("--dataset", required=True, type=Path, help="canonical dataset folder (its test split is predicted)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation (8× slower)")


def _run_eval_model(a: argparse.Namespace) -> int:
    from medseg.task import Task

    m = _stage("medseg.evaluation.stage").run_evaluate(a.model, a.dataset, a.out, overlap=a.overlap, mirror=a.mirror)
    print(f"held-out ({m.n_cases} cases): {Task.from_folder(a.dataset).headline(m.mean)} → {a.out}")
    return 0


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pipeline_cmd", required=True)
    r = sub.add_parser("run", help="run the training pipeline locally with kfp.local", description="Run the training pipeline locally with kfp.local.")
    r.add_argument("--source", type=Path, default=None, help="raw dataset folder (default: WORK/raw, the synthetic data)")
    r.add_argument("--params", type=Path, default=Path(PARAMS_YAML))
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///WORK/mlflow.db)")
    r.add_argument("--resume-run", default="", metavar="RUN",
                   help="resume the train step from the checkpoints an interrupted run left in WORK/checkpoints/RUN (RUN: that "
                        "folder's name, the interrupted run's id)")
    c = sub.add_parser("compile", help="compile to versioned YAML for a Kubeflow cluster", description="Compile the pipeline to pipelines/compiled/<name>-<version>.yaml.")
    c.add_argument("--out-dir", type=Path, default=None)
    c.add_argument("--params", type=Path, default=None, metavar="FILE",
                   help="parameter file whose values become the compiled defaults and cluster settings, e.g. params-production.yaml "
                        "(default: $MEDSEG_PARAMS, else params.yaml); give each profile its own --out-dir")
    u = sub.add_parser("upload", help="upload to a Kubeflow Pipelines server as a new pipeline or version", description="Upload the compiled pipeline (a new pipeline, or a new version) and optionally start a run.")
    u.add_argument("--host", required=True, help="Kubeflow Pipelines API URL, e.g. http://ml-pipeline-ui.kubeflow:80")
    u.add_argument("--pipeline", choices=["training", "batch-inference"], default="training")
    u.add_argument("--package", type=Path, default=None, help="compiled YAML (default: compile now)")
    u.add_argument("--run", action="store_true", help="start a run after uploading")
    u.add_argument("--experiment", default="medseg")
    u.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="run argument (repeatable), e.g. --arg source=/data/brats")


def _run_pipeline(a: argparse.Namespace) -> int:
    from medseg.pipeline import runner

    if a.pipeline_cmd == "upload":
        import json

        from medseg.pipeline.upload import upload

        bad = [x for x in a.arg if "=" not in x]
        if bad:
            raise MedsegError(f"--arg takes KEY=VALUE, got {bad[0]!r}")
        arguments = dict(x.split("=", 1) for x in a.arg)
        print(json.dumps(upload(a.host, a.pipeline, a.package, a.run, a.experiment, arguments)))
        return 0
    if a.pipeline_cmd == "compile":
        if a.params is not None:
            import os

            runner.load_params(a.params)  # a missing or broken file is refused here, not as an import error of the pipeline module
            os.environ["MEDSEG_PARAMS"] = str(a.params.resolve())  # what pipelines/training_pipeline.py reads its defaults from
        for which in runner.PIPELINES:
            print(runner.compile_pipeline(a.out_dir, which))
        return 0
    params = runner.load_params(a.params)
    paths = runner.work_paths(params)
    with needs_extra("all", "medseg pipeline run"):  # kfp.local runs every stage in this environment
        from medseg.training.tuning import sqlite_url

        source = a.source or paths["raw"]
        tracking = a.tracking_uri or f"sqlite:///{paths['mlflow_db']}"
        args = runner.pipeline_arguments(params, source, tracking, sqlite_url(paths["optuna_db"]))
        if a.resume_run:
            stored = Path(args["checkpoint_store"]) / a.resume_run
            if not stored.is_dir():
                raise MedsegError(f"no checkpoints of run {a.resume_run!r} (runs with stored checkpoints: "
                                  f"{', '.join(sorted(p.name for p in stored.parent.glob('*') if p.is_dir())) or 'none'})", stored)
            args["resume_run"] = a.resume_run
        result = runner.run_local(args, paths["kfp"])
    print(runner.summarize(result))
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    from medseg.serving.client import add_case_arguments  # light: no kserve/torch import at CLI start-up

    p.add_argument("--model", required=True, help="with --url: the model's name on the server; else a model package folder or models:/NAME@ALIAS")
    p.add_argument("--url", default=None, help="model server base URL (V2 protocol), e.g. http://127.0.0.1:8080; without it, predict here")
    p.add_argument("--input", default=None,
                   help="without --url: a folder of cases (CASE_0000.nii.gz … or CASE/CASE-<channel>.nii.gz …) or s3://bucket/prefix of them")
    add_case_arguments(p, out_help="; without --url: the output folder, or s3://bucket/prefix")  # --images/--image/--channels/--age/--out
    p.add_argument("--covariates", type=Path, default=None,
                   help="without --url, a classifier taking the age: a CSV with case_id and age columns (default: the manifest.json "
                        "of an ingested dataset in --input)")
    p.add_argument("--timeout", type=float, default=300, help="with --url: seconds to wait for the answer")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (local prediction)")
    p.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation (local prediction, 8× slower)")
    p.add_argument("--backend", default=None, choices=("auto", "torch", "onnx"),
                   help="local prediction: torch, onnx (the package's network.onnx in ONNX Runtime) or auto: torch when installed "
                        "(default: $MEDSEG_INFERENCE_BACKEND, else auto)")


def _run_predict(a: argparse.Namespace) -> int:
    """``medseg predict``: with ``--url`` one case sent to a model server (what to send is asked from the server's
    ``GET /v2/models/NAME``); else every case of a folder predicted here (segmentations, or a classifier's CSV)."""
    if a.url:
        if not a.images and a.image is None:
            raise MedsegError("--url needs --images (one NIfTI file per channel) or --image (one PNG/TIFF slice of a 2D model)")
        from medseg.serving import client

        return client.run(a)
    if a.input is None:
        raise MedsegError("give --url (ask a model server) or --input DIR (predict a folder here)")
    if a.out is None:
        raise MedsegError("give --out, the output folder or s3://bucket/prefix")
    from medseg.data.s3 import is_s3_uri, parse_s3_uri
    from medseg.schemas import PREDICTIONS_CSV

    # --out is a Path (shared with --url), which turns s3://b/p into s3:/b/p: say it back as the URI given
    out = "s3://{}/{}".format(*parse_s3_uri(a.out)).rstrip("/") if is_s3_uri(a.out) else str(a.out)
    rows = _stage("medseg.inference.batch").predict_batch(a.model, a.input, out, overlap=a.overlap, mirror=a.mirror, covariates=a.covariates,
                                                             backend=a.backend)
    classified = bool(rows) and "label" in rows[0]
    what, table = ("labels and probabilities", PREDICTIONS_CSV) if classified else ("volumes", VOLUMES_CSV)
    print(f"{len(rows)} case(s) predicted → {out} ({what} in {out}/{table})")
    return 0


def _add_select_configuration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preprocessed", required=True, type=Path, help="preprocessed folder every candidate was trained on (medseg preprocess --candidates)")
    p.add_argument("--dataset", required=True, type=Path, help="the ingested dataset: its raw cases are scored in their own geometry")
    p.add_argument("--models", required=True, nargs="+", type=Path, metavar="PACKAGE",
                   help="single-fold model packages of every candidate configuration, trained on the same folds")
    p.add_argument("--out", required=True, type=Path, help="the chosen model package to write (written to a temporary name, then renamed)")
    p.add_argument("--params", type=Path, default=None, metavar="FILE",
                   help="parameter file for train.max_val_cases (cases per fold), val_overlap and device (default: params.yaml, if present)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; 'none' disables)")


def _run_select_configuration(a: argparse.Namespace) -> int:
    """``medseg select-configuration``: nnU-Net's find_best_configuration on trained fold packages."""
    from medseg.training.config import split_train_section
    from medseg.training.stage import build_selected_model
    from medseg.training.trainer import TrainConfig

    train_fields, _ = split_train_section(_params(a).get("train"))
    model, report = build_selected_model(a.preprocessed, a.dataset, list(a.models), a.out, TrainConfig.from_dict(train_fields), _tracking(a), {"stage": "select"})
    selection = report.get("selection")
    if selection:
        for name, score in sorted(selection["scores"].items(), key=lambda kv: -kv[1]):
            print(f"{name:32s} out-of-fold Dice {score:.4f}{'  ← chosen' if name == selection['chosen'] else ''}")
    print(f"model: {model}")
    return 0


def _add_export_onnx(p: argparse.ArgumentParser) -> None:
    p.add_argument("packages", nargs="+", type=Path, metavar="PACKAGE", help="model package folder(s) (with model_package.json)")


def _run_export_onnx(a: argparse.Namespace) -> int:
    """``medseg export-onnx PACKAGE...``: write (or rewrite) ``network.onnx`` into packages written before the export
    existed or with it switched off; the result is recorded in each ``model_package.json``. Exit 1 if any was refused."""
    from medseg import schemas

    export = _stage("medseg.inference.onnx_export")
    refused = 0
    for package in a.packages:
        schemas.ModelPackage.load(package)  # not a package: a clear error before the exporter loads anything
        info = export.write_onnx(package, force=True)
        if info.get("members"):
            print(f"{package}: every member of the configuration ensemble has its {export.ONNX_FILE}")
        elif info.get("file"):
            print(f"{package}: {info['file']} written (opset {info['opset']}, windows {info['patch_size']}, "
                  f"max |logit difference| to torch {info['max_abs_diff']})")
        else:
            refused += 1
            print(f"{package}: not exported: {info.get('reason')}")
    return 1 if refused else 0


def _add_data(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", required=True, metavar="<command>")
    r = sub.add_parser("remote", help="set the DVC remote to an S3 bucket (credentials stay in the environment)",
                       description="Add or update the DVC remote on S3 and make it the default. Credentials are never written: "
                                   "DVC reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) from the environment.")
    r.add_argument("--url", required=True, help="s3://BUCKET/PATH where DVC stores the data")
    r.add_argument("--name", default="storage", help="remote name (default: storage)")
    r.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint such as http://minio:9000 (default: $MEDSEG_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL; none: AWS S3)")
    r.add_argument("--local", action="store_true", help="write .dvc/config.local (this checkout only) instead of the committed .dvc/config")
    r.add_argument("--no-default", action="store_true", help="do not make it the default remote")
    r.add_argument("--repo", type=Path, default=Path("."), help="DVC repository (default: the current folder)")
    for cmd, verb, text in (("push", "upload", "Upload DVC-tracked data (dvc add'ed folders, dvc.yaml outputs) to the remote."),
                            ("pull", "download", "Download DVC-tracked data from the remote into the workspace (e.g. in a fresh clone).")):
        c = sub.add_parser(cmd, help=f"{verb} DVC-tracked data {'to' if cmd == 'push' else 'from'} the remote", description=text)
        c.add_argument("targets", nargs="*", help="only these .dvc files or outputs (default: everything)")
        c.add_argument("--remote", default=None, help="remote name (default: the default remote)")
        c.add_argument("--jobs", type=int, default=None, help="parallel transfers (default: DVC's)")
        c.add_argument("--repo", type=Path, default=Path("."), help="DVC repository (default: the current folder)")
    v = sub.add_parser("version", help="print the dataset version (manifest hash, DVC md5) as JSON",
                       description="Print the version of a canonical dataset folder as JSON: the manifest content hash and, when DVC tracks the folder, its recorded md5.")
    v.add_argument("--dataset", type=Path, default=Path("work/dataset"), help="canonical dataset folder (default: work/dataset)")


def _run_data(a: argparse.Namespace) -> int:
    import json

    from medseg.data import dvc_remote

    logging.getLogger("botocore").setLevel(logging.WARNING)  # not "Found credentials in environment variables"
    if a.data_cmd == "remote":
        info = dvc_remote.configure_remote(a.url, a.name, a.endpoint_url, a.repo, default=not a.no_default, level="local" if a.local else "repo")
        print(f"remote {info['name']!r} → {info['url']}" + (f" at {info['endpointurl']}" if info["endpointurl"] else "")
              + (" (default)" if info["default"] else "") + f", written to {info['config']}; credentials come from the environment")
    elif a.data_cmd == "push":
        n = dvc_remote.push(a.repo, a.targets, a.remote, a.jobs)
        print(f"pushed {n} file(s)" if n else "the remote is up to date")
    elif a.data_cmd == "pull":
        stats = dvc_remote.pull(a.repo, a.targets, a.remote, a.jobs)
        print(f"fetched {stats.get('fetched', 0)} file(s); " + ", ".join(f"{k} {len(v)}" for k, v in stats.items() if isinstance(v, list)))
    else:
        print(json.dumps(dvc_remote.dataset_version(a.dataset)))
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, default=Path(PARAMS_YAML))
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="where the served segmentation and overlay are copied")


def _run_demo(a: argparse.Namespace) -> int:
    return _stage("medseg.demo").run_demo(a.params, a.out)


# module with add_arguments/run, or (adder, runner) pairs
COMMANDS: dict[str, tuple[str, object]] = {
    "synth": ("write synthetic BraTS 2023-style cases (real MNI anatomy + tumour)", "medseg.synth"),
    "ingest": ("validate a raw dataset and write the canonical dataset + manifest + splits", "medseg.ingest.ingest"),
    "preprocess": ("fingerprint → plan (under a device budget) → preprocess", (_add_preprocess, _run_preprocess)),
    "tune": ("Optuna study of short pruned trainings → best_params.json", (_add_tune, _run_tune)),
    "train": ("train a network and write its model package", (_add_train, _run_train)),
    "evaluate-model": ("predict the held-out test split with a model package and score it", (_add_eval_model, _run_eval_model)),
    "evaluate": ("score prediction NIfTI files against labels (Dice, IoU, HD95, ...)", "medseg.evaluation.report"),
    "registry": ("MLflow registry: list, show, promote, rollback", "medseg.registry.registry"),
    "serve": ("start the KServe model server on 127.0.0.1", "medseg.serving.server"),
    "predict": ("predict a folder of cases with a model here, or send one case to a model server (--url)", (_add_predict, _run_predict)),
    "select-configuration": ("choose the best configuration or pair by cross-validation from trained fold packages (nnU-Net's find_best_configuration)",
                             (_add_select_configuration, _run_select_configuration)),
    "export-onnx": ("write network.onnx into model packages for the torch-free model server (packages from before the export)",
                    (_add_export_onnx, _run_export_onnx)),
    "pipeline": ("run the Kubeflow pipeline locally (kfp.local) or compile it", (_add_pipeline, _run_pipeline)),
    "deploy": ("deploy a registered version: a KServe InferenceService (server-side apply, optional canary) or the model server on 127.0.0.1", "medseg.deploy"),
    "viewer": ("a small web viewer on 127.0.0.1: upload the four modalities, see the overlay slice by slice, download the segmentation", "medseg.viewer.cli"),
    "data": ("data versioning with DVC on S3: remote, push, pull, version", (_add_data, _run_data)),
    "demo": ("synthetic data → pipeline → registry → served prediction, end to end", (_add_demo, _run_demo)),
}


# the extra of medseg-ops each command needs beyond the core install (pyproject.toml)
COMMAND_EXTRAS: dict[str, str] = {
    "synth": "data", "ingest": "data", "data": "data",
    "preprocess": "train", "tune": "train", "train": "train", "evaluate-model": "train", "evaluate": "train", "registry": "train", "export-onnx": "train", "select-configuration": "train",
    "serve": "serve", "predict": "serve", "viewer": "serve",
    "pipeline": "pipelines", "deploy": "pipelines", "demo": "all",
}


def _missing_extra_runner(error: MissingExtraError):
    def run(_: argparse.Namespace) -> int:
        raise error

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="medseg-ops: 3D medical image segmentation, from raw data to a served model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name, (help_text, target) in COMMANDS.items():
        extra = COMMAND_EXTRAS[name]
        if isinstance(target, str):
            try:
                with needs_extra(extra, f"medseg {name}"):
                    module = _stage(target)
            except MissingExtraError as exc:
                # still listed, so `medseg --help` shows every stage; running it says which extra to install
                p = sub.add_parser(name, help=f"{help_text} [needs medseg-ops[{extra}]]", description=str(exc))
                p.set_defaults(_run=_missing_extra_runner(exc), _missing_extra=True)  # its options are unknown: see main()
                continue
            p = sub.add_parser(name, help=help_text, description=help_text)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
            adder, runner = target
            adder(p)
            p.set_defaults(_run=runner)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "_missing_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "urllib3", "httpx", "matplotlib", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code = args._run(args)
    except ModuleNotFoundError as exc:
        if not is_third_party(exc):
            raise
        extra = COMMAND_EXTRAS[args.command]
        print(f"error: {MissingExtraError(f'medseg {args.command}', extra, exc.name)}", file=sys.stderr)
        return 2
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

