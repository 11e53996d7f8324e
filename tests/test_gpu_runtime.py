"""GPUs chosen per run: the device budget that follows the requested GPU (and the plan made with it), the train
component's launch (one process per GPU on CUDA; a real 2-process gloo job on the CPU through the component itself),
and evaluation / batch inference on the device their GPU count says. No GPU here: the CUDA paths are checked up to
the point where they fail loudly for want of a visible GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.pipeline import gpu
from medseg.pipeline.runner import gpu_arguments, load_params, pipeline_arguments

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


# --------------------------------------------------------------------------- device budget
@pytest.mark.parametrize("gpus, memory, selector, expected", [
    (0, 0, {}, "cpu"),
    (0, 80, {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}, "cpu"),  # no GPU asked: the CPU whatever the node
    (1, 24, {}, "gpu:24"),
    (2, 0, {"cloud.google.com/gke-accelerator": "nvidia-l4"}, "gpu:24"),
    (1, 0, {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}, "gpu:16"),
    (1, 0, {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}, "gpu:80"),
    (1, 0, {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, "gpu:40"),
    (1, 0, {"nvidia.com/gpu.product": "NVIDIA-L40S"}, "gpu:48"),  # l40s, not l4
    (1, 12.5, {"cloud.google.com/gke-accelerator": "nvidia-l4"}, "gpu:12.5"),  # the explicit memory wins
    (4, 0, {"pool": "gpu"}, f"gpu:{gpu.DEFAULT_GPU_MEMORY_GIB:g}"),  # unknown card: nnU-Net's reference budget
])
def test_auto_budget_follows_the_requested_gpu(gpus, memory, selector, expected) -> None:
    assert gpu.resolve_device_budget("auto", gpus, memory, selector) == expected


def test_explicit_budgets_are_kept_and_bad_values_refused() -> None:
    assert gpu.resolve_device_budget("cpu", 2, 80) == "cpu"
    assert gpu.resolve_device_budget("gpu:12", 0) == "gpu:12"
    with pytest.raises(MedsegError, match="gpus must be >= 0"):
        gpu.resolve_device_budget("auto", -1)
    with pytest.raises(MedsegError, match="gpu_memory_gib must be >= 0"):
        gpu.resolve_device_budget("auto", 1, -8)


def test_the_plan_is_made_for_the_requested_device() -> None:
    """The planner sizes the patch for the resolved budget: the CPU plan, a 16 GiB and an 80 GiB card differ and grow."""
    from components.train.component import plan_budget
    from medseg.preprocessing.planner import plan_patch

    median, spacing = [138, 169, 138], [1.0, 1.0, 1.0]
    budgets = [plan_budget.python_func(device_budget="auto", gpus=g, gpu_memory_gib=0.0, node_selector=sel) for g, sel in
               [(0, {}), (1, {"k": "nvidia-tesla-t4"}), (1, {"k": "nvidia-h100-80gb"})]]
    assert budgets == ["cpu", "gpu:16", "gpu:80"]
    plans = [plan_patch(median, spacing, 4, 3, b) for b in budgets]
    voxels = [p["patch_size"][0] * p["patch_size"][1] * p["patch_size"][2] * p["batch_size"] for p in plans]
    assert voxels[0] <= voxels[1] < voxels[2], plans


def test_run_defaults_local_on_cpu_cluster_from_params() -> None:
    params = load_params(ROOT / "params.yaml")
    local = pipeline_arguments(params, "src", "", "", target="local")
    assert (local["train_gpus"], local["tune_gpus"], local["evaluate_gpus"]) == (0, 0, 0)
    assert local["device_budget"] == params["preprocess"]["device_budget"]  # what `medseg pipeline run` planned with before
    cluster = gpu_arguments({**params, "cluster": {"accelerator": {"type": "nvidia.com/gpu", "limit": 4, "memory_gib": 24}, "device_budget": "auto",
                                                   "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}}, "cluster")
    assert cluster == {"accelerator_type": "nvidia.com/gpu", "gpu_memory_gib": 24.0, "train_gpus": 4, "tune_gpus": 1, "evaluate_gpus": 0,
                       "train_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}, "device_budget": "auto"}
    cpu_cluster = gpu_arguments({"cluster": {"accelerator": {"type": "", "limit": 2}}, "preprocess": {"device_budget": "cpu"}}, "cluster")
    assert (cpu_cluster["train_gpus"], cpu_cluster["tune_gpus"], cpu_cluster["device_budget"]) == (0, 0, "cpu")
    with pytest.raises(MedsegError, match="GPU counts must be >= 0"):
        gpu_arguments({"cluster": {"accelerator": {"type": "nvidia.com/gpu", "limit": 1, "evaluate_limit": -1}}}, "cluster")


# --------------------------------------------------------------------------- launch and devices
def test_train_launch_one_process_per_gpu() -> None:
    assert gpu.train_launch(0) == gpu.TrainLaunch(1, "cpu")
    assert gpu.train_launch(0, nproc_per_node=2) == gpu.TrainLaunch(2, "cpu")  # DDP on gloo sharing the cores
    assert gpu.train_launch(1, check=False) == gpu.TrainLaunch(1, "cuda")  # one GPU: no DDP
    assert gpu.train_launch(4, nproc_per_node=2, check=False) == gpu.TrainLaunch(4, "cuda")  # GPUs decide the process count
    with pytest.raises(MedsegError, match="nproc_per_node must be >= 1"):
        gpu.train_launch(0, nproc_per_node=0)
    assert gpu.step_device(0) == "cpu" and gpu.step_device(1, check=False) == "cuda"


@pytest.mark.skipif(not NO_GPU, reason="checks the machine without a GPU")
def test_asking_for_gpus_without_one_fails_loudly() -> None:
    with pytest.raises(MedsegError, match=r"asks for 2 GPU\(s\) but 0 are visible"):
        gpu.train_launch(2)
    with pytest.raises(MedsegError, match=r"asks for 1 GPU\(s\) but 0 are visible"):
        gpu.step_device(1)


def test_ddp_uses_nccl_on_cuda_and_gloo_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend each launch device gets (the process group itself is the 2-process test below)."""
    from medseg.training import ddp

    assert ddp._wants_cuda(gpu.train_launch(2, check=False).device) and not ddp._wants_cuda(gpu.train_launch(0).device)
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    if NO_GPU:  # cuda asked with no GPU: refused before any rendezvous
        with pytest.raises(MedsegError, match="has no GPU"):
            ddp.init_distributed("cuda")


# --------------------------------------------------------------------------- the components themselves
def _artifact(kind, path: Path):
    return kind(uri=str(path))


@pytest.fixture(scope="module")
def component_train(tmp_path_factory: pytest.TempPathFactory):
    """The train component's own function with 2 CPU processes (DDP over gloo via torchrun) on the mini dataset."""
    from kfp.dsl import Artifact, Dataset, Model

    from components.train.component import train
    from tests.test_ddp import DDP
    from tests.test_training_loop import build_mini_preprocessed

    tmp = tmp_path_factory.mktemp("component_train")
    pre = build_mini_preprocessed(tmp / "pre")
    best = tmp / "best"
    schemas.BestParams(params={}, best_value=0.0, study_name="s", storage="", n_trials=0).save(best)
    model = _artifact(Model, tmp / "model")
    train.python_func(preprocessed=_artifact(Dataset, pre), best_params=_artifact(Artifact, best), train_params=dict(DDP), configuration="3d_fullres",
                      mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", pipeline_run_id="run-1", model=model, gpus=0, nproc_per_node=2)
    return model


def test_train_component_runs_two_gloo_processes(component_train) -> None:
    model = component_train
    package = schemas.ModelPackage.load(Path(model.path))
    assert package.training["world_size"] == 2 and (Path(model.path) / package.weights_file).is_file()
    assert model.metadata["world_size"] == 2 and model.metadata["device"] == "cpu" and model.metadata["gpus"] == 0
    assert not Path(model.path + ".work").exists()


@pytest.mark.skipif(not NO_GPU, reason="checks the machine without a GPU")
def test_train_component_with_gpus_but_none_visible_fails_before_training(tmp_path: Path) -> None:
    from kfp.dsl import Artifact, Dataset, Model

    from components.train.component import train

    with pytest.raises(MedsegError, match="visible in this container"):
        train.python_func(preprocessed=_artifact(Dataset, tmp_path / "pre"), best_params=_artifact(Artifact, tmp_path / "best"), train_params={},
                          configuration="3d_fullres", mlflow_tracking_uri="", pipeline_run_id="r", model=_artifact(Model, tmp_path / "model"), gpus=2)
    assert not (tmp_path / "model.work").exists()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an ingested dataset with a test split, an untrained package of its task)."""
    from medseg.ingest import ingest
    from tests.factories import make_model_package
    from tests.test_ingest import write_case

    tmp = tmp_path_factory.mktemp("eval_gpu")
    for p in range(4):
        write_case(tmp / "src", f"BraTS-GLI-{p:05d}-000", seed=p)
    ingest(tmp / "src", tmp / "dataset", progress=False, test_fraction=0.25)
    return tmp / "dataset", make_model_package(tmp / "model")


def test_evaluate_component_on_the_cpu_path(tmp_path: Path, ingested) -> None:
    from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

    from components.evaluate.component import evaluate

    dataset, model = ingested
    evaluation, metrics = _artifact(Artifact, tmp_path / "evaluation"), _artifact(Metrics, tmp_path / "metrics")
    evaluate.python_func(model=_artifact(Model, model), dataset=_artifact(Dataset, dataset), overlap=0.0, evaluation=evaluation, metrics=metrics,
                         report=_artifact(Markdown, tmp_path / "report.md"), report_html=_artifact(HTML, tmp_path / "report.html"), gpus=0)
    assert evaluation.metadata["device"] == "cpu" and metrics.metadata["n_cases"] >= 1
    assert json.loads((tmp_path / "evaluation" / schemas.METRICS_JSON).read_text())["per_case"]
    if NO_GPU:
        with pytest.raises(MedsegError, match="visible in this container"):
            evaluate.python_func(model=_artifact(Model, model), dataset=_artifact(Dataset, dataset), overlap=0.0, evaluation=_artifact(Artifact, tmp_path / "e2"),
                                 metrics=_artifact(Metrics, tmp_path / "m2"), report=_artifact(Markdown, tmp_path / "r2.md"),
                                 report_html=_artifact(HTML, tmp_path / "r2.html"), gpus=1)
        assert not (tmp_path / "e2").exists()


def test_predict_component_on_the_cpu_path(tmp_path: Path, ingested) -> None:
    from kfp.dsl import Dataset

    from components.predict.component import predict
    from tests.test_batch import _brats_folder

    _, model = ingested
    cases = _brats_folder(tmp_path / "in", n=1)
    predictions = _artifact(Dataset, tmp_path / "out")
    predict.python_func(model_uri=str(model), input_uri=str(cases), overlap=0.0, mirror=False, mlflow_tracking_uri="", predictions=predictions, gpus=0)
    assert predictions.metadata["device"] == "cpu" and predictions.metadata["n_cases"] == 1
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1
    if NO_GPU:
        with pytest.raises(MedsegError, match="visible in this container"):
            predict.python_func(model_uri=str(model), input_uri=str(cases), overlap=0.0, mirror=False, mlflow_tracking_uri="",
                                predictions=_artifact(Dataset, tmp_path / "out2"), gpus=1)
