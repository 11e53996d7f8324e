"""Two parameter profiles (issue 16, point 4): params.yaml (the demo, CPU-sized) and params-production.yaml (nnU-Net's
schedule on a GPU budget), loaded by the one loader the pipeline, the CLI and the demo use, and switched by ``--params``.
Every setting a profile gives is one its consumer reads: a key the pipeline would ignore is a test failure, not a pretence."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from medseg import cli
from medseg.errors import MedsegError
from medseg.pipeline import runner
from medseg.training.config import AugmentationConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO, PRODUCTION = ROOT / "params.yaml", ROOT / "params-production.yaml"


def _struct_roundtrip(value: dict) -> dict:
    """What a KFP dict parameter becomes in the component: a protobuf Struct (every number a float)."""
    from google.protobuf import json_format, struct_pb2

    s = struct_pb2.Struct()
    s.update(value)
    return json_format.MessageToDict(s)


def _local_arguments(params_file: Path) -> dict[str, Any]:
    return runner.pipeline_arguments(runner.load_params(params_file), "/data/raw", "sqlite:///m.db", "sqlite:///o.db")


def test_production_profile_is_nnunets_schedule_on_a_gpu_budget() -> None:
    args = _local_arguments(PRODUCTION)
    cfg = TrainConfig.from_dict(_struct_roundtrip(args["train_params"]))  # as the train component receives it
    assert (cfg.epochs, cfg.iterations_per_epoch) == (1000, 250)
    assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.lr_schedule, cfg.weight_decay) == ("sgd", 0.01, 0.99, "poly", 3e-5)
    assert args["n_folds"] == 5 and args["device_budget"] == "gpu:8" and args["overlap"] == 0.5
    # full augmentation: nnU-Net's default set plus elastic deformation (nnU-Net v1's probability)
    assert cfg.augmentation_config() == AugmentationConfig.from_value({"elastic": True})
    assert cfg.augmentation_config().groups["elastic"]["p"] == 0.2
    trial = TrainConfig.from_dict({**args["train_params"], **args["tune_params"]})  # a tuning trial's config
    assert trial.epochs < cfg.epochs and trial.augmentation_config() == cfg.augmentation_config()


def test_demo_profile_stays_cpu_sized() -> None:
    demo, prod = _local_arguments(DEMO), _local_arguments(PRODUCTION)
    assert demo["device_budget"] == "cpu"
    d, p = TrainConfig.from_dict(demo["train_params"]), TrainConfig.from_dict(prod["train_params"])
    assert d.epochs * d.iterations_per_epoch * 100 <= p.epochs * p.iterations_per_epoch
    assert d.augmentation_config() is None or d.augmentation_config() != p.augmentation_config()


def test_the_commands_switch_profile_with_params(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`medseg pipeline run --params FILE` hands the pipeline FILE's values; without --params, params.yaml's."""
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(runner, "run_local", lambda arguments, root: seen.append(arguments) or {"run_dir": str(tmp_path), "tasks": {}, "seconds": 0.0})
    monkeypatch.setattr(runner, "summarize", lambda result: "{}")
    monkeypatch.chdir(ROOT)  # the default params.yaml is looked up in the working folder
    assert cli.main(["pipeline", "run", "--params", str(PRODUCTION), "--source", str(tmp_path)]) == 0
    assert cli.main(["pipeline", "run", "--source", str(tmp_path)]) == 0
    production, demo = seen
    assert production["train_params"]["epochs"] == 1000 and production["device_budget"] == "gpu:8"
    demo_train = runner.load_params(DEMO)["train"]
    assert demo["train_params"] == {k: v for k, v in demo_train.items() if k != "folds"} and demo["device_budget"] == "cpu"
    assert demo["folds"] == str(demo_train["folds"]) and production["folds"] == "all"  # the folds fan out, not a TrainConfig field
    # `medseg train --params FILE`: the same values reach the training config
    from medseg.training.stage import merged_params

    for params_file, epochs in ((PRODUCTION, 1000), (DEMO, runner.load_params(DEMO)["train"]["epochs"])):
        a = cli.build_parser().parse_args(["train", "--preprocessed", str(tmp_path), "--out", str(tmp_path), "--params", str(params_file)])
        assert merged_params(cli._train_params(a), None).epochs == epochs
    a = cli.build_parser().parse_args(["train", "--preprocessed", str(tmp_path), "--out", str(tmp_path), "--params", str(tmp_path / "params-prod.yaml")])
    with pytest.raises(MedsegError, match="not found"):
        cli._train_params(a)


def _perturbed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, dict):
        return {**value, "__probe__": 1}
    return f"{value}-probe"


@pytest.mark.parametrize("profile", [DEMO, PRODUCTION], ids=["demo", "production"])
def test_every_pipeline_setting_of_a_profile_is_read(profile: Path) -> None:
    """Changing any ingest/preprocess/tune/evaluate/registry key changes what the pipeline gets (or is refused):
    a key the pipeline ignores (say evaluate.mirror before the evaluate step has one) fails here."""
    params = runner.load_params(profile)
    for target in ("local", "cluster"):
        base = runner.pipeline_arguments(params, "/data/raw", "uri", "storage", target=target)
        for section in ("ingest", "preprocess", "tune", "evaluate", "registry"):
            for key, value in (params.get(section) or {}).items():
                changed = copy.deepcopy(params)
                changed[section][key] = _perturbed(value)
                try:
                    after = runner.pipeline_arguments(changed, "/data/raw", "uri", "storage", target=target)
                except MedsegError:
                    continue  # read, and refused when wrong
                if section == "preprocess" and key == "device_budget" and target == "cluster" and (params.get("cluster") or {}).get("device_budget"):
                    continue  # the compiled pipeline plans with cluster.device_budget
                assert after != base, f"{profile.name}: {section}.{key} does not reach the pipeline ({target})"
        # every train key is a training parameter (unknown ones are refused by name)
        TrainConfig.from_dict(_struct_roundtrip(base["train_params"]))


def _keys(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return set()
    out = set()
    for k, v in tree.items():
        out |= {f"{prefix}{k}"} | _keys(v, f"{prefix}{k}.")
    return out


def test_production_keeps_every_cluster_and_deploy_setting_of_the_demo() -> None:
    demo, prod = runner.load_params(DEMO), runner.load_params(PRODUCTION)
    for section in ("cluster", "deploy", "registry", "ingest", "evaluate"):
        missing = _keys(demo.get(section)) - _keys(prod.get(section))
        assert not missing, f"params-production.yaml lacks {section} settings of params.yaml: {sorted(missing)}"
    assert prod["cluster"]["secrets"] == demo["cluster"]["secrets"]  # the Secrets the k8s manifests create
    assert prod["cluster"]["deployer_token"] == demo["cluster"]["deployer_token"]
    from medseg.deploy.config import DeployConfig

    deploy = DeployConfig.from_params(prod)
    assert deploy.gpu == 1 and deploy.canary is True


def test_compile_with_the_production_profile(tmp_path: Path) -> None:
    """`medseg pipeline compile --params params-production.yaml`: the compiled defaults are the production values, and the
    augmentation mapping survives KFP (which refuses nulls in a dict parameter: hence `auto`, not null, in the profile)."""
    import subprocess
    import sys

    import yaml

    done = subprocess.run([sys.executable, "-m", "medseg.cli", "pipeline", "compile", "--params", str(PRODUCTION), "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = next(tmp_path.glob("medseg-training-*.yaml"))
    spec = next(yaml.safe_load_all(compiled.read_text()))
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    cfg = TrainConfig.from_dict(defaults["train_params"])
    assert (cfg.epochs, cfg.iterations_per_epoch, cfg.optimizer, cfg.learning_rate) == (1000, 250, "sgd", 0.01)
    assert cfg.augmentation_config() == AugmentationConfig.from_value({"elastic": True}) and defaults["n_folds"] == 5
    missing = subprocess.run([sys.executable, "-m", "medseg.cli", "pipeline", "compile", "--params", str(tmp_path / "nope.yaml"), "--out-dir", str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and "parameter file not found" in missing.stderr
