"""The compiled training pipeline (what a Kubeflow cluster runs) and the parallel-tuning fan-out.

The pipeline is compiled in a child process with its own image registry/tag and parameter file
(``components/image.py`` and the pipeline module read them at import), then read back as YAML. The
fan-out (``tune_shards`` → ``dsl.ParallelFor`` of workers → ``tune`` on ``dsl.Collected``) also runs
under kfp.local with stub workers that fill a SQLite Optuna study, so the real collector is exercised
without training anything.

No ``from __future__ import annotations`` here: kfp reads the stub component's annotations as types.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REGISTRY, TAG = "registry.local/ms", "9.9.9-abc"
NODE_SELECTOR = {"cloud.google.com/gke-accelerator": "nvidia-l4"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(pipeline spec, kubernetes platform spec, YAML text, params) of a compile with a cluster-specific parameter file."""
    tmp = tmp_path_factory.mktemp("compile")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cluster"]["node_selector"] = dict(NODE_SELECTOR)
    params_file = tmp / "params-cluster.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = {**os.environ, "MEDSEG_IMAGE_REGISTRY": REGISTRY, "MEDSEG_IMAGE_TAG": TAG, "MEDSEG_PARAMS": str(params_file),
           # must not leak into the YAML: compile never reads credentials
           "MLFLOW_TRACKING_URI": "postgresql://mlflow:s3cr3t-pw@db:5432/mlflow", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-not-a-real-key"}
    code = "from medseg.pipeline.runner import compile_pipeline; import sys; print(compile_pipeline(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text, params


def test_tune_workers_fan_out_with_parallel_for(compiled):
    spec, _, _, params = compiled
    tasks = spec["root"]["dag"]["tasks"]
    loops = {name: t for name, t in tasks.items() if "parameterIterator" in t}
    assert len(loops) == 2  # the tune workers and the folds
    loop_name, loop = _loop_of(spec, "tune-worker")
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--tune-shards-Output"}
    assert loop["inputs"]["parameters"]["pipelinechannel--tune-shards-Output"]["taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "tune-shards"}
    body = spec["components"][loop["componentRef"]["name"]]
    assert list(body["dag"]["tasks"]) == ["tune-worker"]
    worker_inputs = body["dag"]["tasks"]["tune-worker"]["inputs"]["parameters"]
    assert worker_inputs["worker_index"] == {"componentInputParameter": loop["parameterIterator"]["itemInput"]}
    assert body["inputDefinitions"]["parameters"][loop["parameterIterator"]["itemInput"]]["parameterType"] == "NUMBER_INTEGER"
    assert worker_inputs["n_workers"] == {"componentInputParameter": "pipelinechannel--tune_workers"}
    # the shards come from the tune_workers parameter, default cluster.tune_workers
    assert tasks["tune-shards"]["inputs"]["parameters"]["n_workers"] == {"componentInputParameter": "tune_workers"}
    assert spec["root"]["inputDefinitions"]["parameters"]["tune_workers"]["defaultValue"] == params["cluster"]["tune_workers"]
    # the best parameters are read after every worker, from their collected outputs, and train uses them
    tune = tasks["tune"]
    assert loop_name in tune["dependentTasks"]
    assert tune["inputs"]["parameters"]["workers"]["taskOutputParameter"] == {"outputParameterKey": "pipelinechannel--tune-worker-Output", "producerTask": loop_name}
    folds_name, folds_loop = _loop_of(spec, "train")
    assert folds_loop["inputs"]["artifacts"]["pipelinechannel--tune-best_params"]["taskOutputArtifact"] == {"outputArtifactKey": "best_params", "producerTask": "tune"}


def _loop_of(spec: dict, task: str) -> tuple[str, dict]:
    """The root's ParallelFor task whose body runs ``task``: (its name, its spec)."""
    for name, t in spec["root"]["dag"]["tasks"].items():
        if "parameterIterator" in t and task in spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]:
            return name, t
    raise AssertionError(f"no ParallelFor runs {task}")


def _in_loop(spec: dict, task: str) -> dict:
    """The spec of ``task`` inside its ParallelFor body."""
    _, loop = _loop_of(spec, task)
    return spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"][task]


def test_folds_train_in_parallel_pods_and_one_step_ensembles_them(compiled):
    """The folds (the run parameter ``folds``: N, N,M,... or all) fan out as one train pod each; their models are
    collected by the fold-ensemble step, whose model is what evaluate and register take."""
    spec, _, _, params = compiled
    tasks = spec["root"]["dag"]["tasks"]
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["folds"] == str(params["train"].get("folds", params["train"].get("fold", 0)))
    assert "folds" not in defaults["train_params"]
    name, loop = _loop_of(spec, "train")
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--training-folds-Output"}
    assert tasks["training-folds"]["inputs"]["parameters"]["folds"] == {"componentInputParameter": "folds"}
    assert tasks["training-folds"]["inputs"]["parameters"]["candidates"] == {"componentInputParameter": "candidate_configurations"}
    assert tasks["preprocess"]["inputs"]["parameters"]["candidates"] == {"componentInputParameter": "candidate_configurations"}
    assert defaults["candidate_configurations"] == str(params["preprocess"].get("candidates") or "")
    train = _in_loop(spec, "train")
    # each loop item is {"configuration", "fold"}: one pod per candidate configuration and fold
    item = loop["parameterIterator"]["itemInput"]
    assert train["inputs"]["parameters"]["fold"] == {"componentInputParameter": item, "parameterExpressionSelector": 'parseJson(string_value)["fold"]'}
    assert train["inputs"]["parameters"]["configuration"] == {"componentInputParameter": item,
                                                               "parameterExpressionSelector": 'parseJson(string_value)["configuration"]'}
    assert tasks["fold-ensemble"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"] == {"outputArtifactKey": "dataset", "producerTask": "ingest"}
    collected = tasks["fold-ensemble"]["inputs"]["artifacts"]["fold_models"]["taskOutputArtifact"]
    assert collected == {"outputArtifactKey": "pipelinechannel--train-model", "producerTask": name}
    for consumer in ("evaluate", "register"):
        assert tasks[consumer]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {"outputArtifactKey": "model", "producerTask": "fold-ensemble"}


def _param(name: str) -> str:
    """How KFP 2.17 writes a run parameter into a task's resources: a placeholder of the task's own input."""
    return "{{$.inputs.parameters['pipelinechannel--%s']}}" % name


def test_gpus_accelerator_and_node_selector_are_run_parameters(compiled):
    """GPU counts, accelerator type and the train pods' node selector are chosen per run (the Kubeflow UI's run form):
    the IR's resources and node selector name pipeline parameters, whose defaults come from ``cluster``."""
    spec, k8s, _, params = compiled
    executors = spec["deploymentSpec"]["executors"]
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    acc = params["cluster"]["accelerator"]
    assert defaults["accelerator_type"] == acc["type"] and defaults["train_gpus"] == acc["limit"]
    assert defaults["tune_gpus"] == acc.get("tune_limit", 1) and defaults["evaluate_gpus"] == acc.get("evaluate_limit", 0)
    assert defaults["gpu_memory_gib"] == acc.get("memory_gib", 0) and defaults["train_node_selector"] == NODE_SELECTOR
    assert defaults["device_budget"] == params["cluster"]["device_budget"]
    res = params["cluster"]["train_resources"]
    for name, count in (("exec-tune-worker", "tune_gpus"), ("exec-train", "train_gpus"), ("exec-evaluate", "evaluate_gpus")):
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"] == {"resourceType": _param("accelerator_type"), "resourceCount": _param(count)}, name
        assert k8s[name]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], name  # compile-time
    for name in ("exec-tune-worker", "exec-train"):
        resources = executors[name]["container"]["resources"]
        assert resources["resourceCpuRequest"] == res["cpu_request"] and resources["resourceMemoryLimit"] == res["memory_limit"], name
        assert "nodeSelectorJson" in k8s[name]["nodeSelector"] and "labels" not in k8s[name]["nodeSelector"], name
    tasks = spec["root"]["dag"]["tasks"]
    assert k8s["exec-train"]["nodeSelector"]["nodeSelectorJson"] == {"componentInputParameter": "pipelinechannel--train_node_selector"}  # inside the folds loop
    assert "nodeSelector" not in k8s["exec-evaluate"]  # inference takes any GPU node; a CPU evaluation goes anywhere
    # the components get the same counts: the train step launches one process per GPU, evaluate runs on cuda
    assert _in_loop(spec, "train")["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "pipelinechannel--train_gpus"}
    assert tasks["evaluate"]["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "evaluate_gpus"}
    worker = _in_loop(spec, "tune-worker")
    assert worker["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "pipelinechannel--tune_gpus"}
    # the plan follows the requested GPU: preprocess takes its budget from the step that resolves device_budget
    assert tasks["preprocess"]["inputs"]["parameters"]["device_budget"]["taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "plan-budget"}
    budget_inputs = tasks["plan-budget"]["inputs"]["parameters"]
    assert budget_inputs["gpus"] == {"componentInputParameter": "train_gpus"} and budget_inputs["device_budget"] == {"componentInputParameter": "device_budget"}
    assert budget_inputs["node_selector"] == {"componentInputParameter": "train_node_selector"}
    for name in ("exec-tune-shards", "exec-tune", "exec-deploy", "exec-promote", "exec-plan-budget", "exec-preprocess"):  # small steps: no GPU, no GPU node
        assert "accelerator" not in executors[name]["container"].get("resources", {}), name
        assert "nodeSelector" not in k8s.get(name, {}) and "tolerations" not in k8s.get(name, {}), name


def _placeholders(value) -> set:
    return set(re.findall(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", json.dumps(value)))


def _check_resolvable(spec: dict) -> int:
    """Every parameter a task's resources or inputs refer to reaches it: each resource placeholder is an input of the
    task, and each input taken from the enclosing DAG is declared by that DAG (a ParallelFor body included).
    Returns the number of resource placeholders checked."""
    executors = spec["deploymentSpec"]["executors"]
    dags = [(spec["root"], "root")] + [(c, n) for n, c in spec["components"].items() if "dag" in c]
    checked = 0
    for dag, dag_name in dags:
        declared = set(dag.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in dag["dag"]["tasks"].items():
            inputs = task.get("inputs", {}).get("parameters", {})
            for key, value in inputs.items():
                if "componentInputParameter" in value:
                    assert value["componentInputParameter"] in declared, (dag_name, task_name, key)
            executor = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if executor:
                for name in _placeholders(executors[executor]["container"].get("resources", {})):
                    assert name in inputs, (task_name, name)
                    checked += 1
    return checked


def test_every_run_parameter_reaches_its_task(compiled):
    """Regression: KFP 2.17 builds a ParallelFor body's inputs from its tasks' arguments only, so a parameter used only by
    ``set_accelerator_type`` inside the loop was missing there (the run failed at the tune workers)."""
    spec, _, _, _ = compiled
    assert _check_resolvable(spec) == 6  # type and count of tune-worker, train, evaluate


def test_batch_inference_asks_for_gpus_per_run(tmp_path):
    from medseg.pipeline.runner import compile_pipeline

    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path, "batch-inference").read_text()))
    spec, k8s = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["gpus"]["defaultValue"] == 0 and params["accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    resources = spec["deploymentSpec"]["executors"]["exec-predict"]["container"]["resources"]
    assert resources["accelerator"] == {"resourceType": "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}",
                                        "resourceCount": "{{$.inputs.parameters['pipelinechannel--gpus']}}"}
    assert spec["root"]["dag"]["tasks"]["predict"]["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "gpus"}
    assert k8s["exec-predict"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert _check_resolvable(spec) == 2


def test_images_are_the_configured_registry_and_tag(compiled):
    spec, _, _, _ = compiled
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert all(image.startswith(f"{REGISTRY}/medseg-") and image.endswith(f":{TAG}") for image in images.values()), images
    assert images["exec-tune-worker"] == images["exec-tune"] == images["exec-tune-shards"] == f"{REGISTRY}/medseg-train:{TAG}"
    assert images["exec-deploy"] == f"{REGISTRY}/medseg-deploy:{TAG}"
    # the InferenceService's predictor image: the serve image of the same build
    serve_image = spec["root"]["dag"]["tasks"]["deploy"]["inputs"]["parameters"]["serve_image"]["runtimeValue"]["constant"]
    assert serve_image == f"{REGISTRY}/medseg-serve:{TAG}"


def test_caching_off_for_side_effects_on_for_deterministic_steps(compiled):
    spec, _, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("ingest", "tune-shards", "register", "promote", "serve", "deploy"):
        assert tasks[name]["cachingOptions"] == {}, name  # {} = enableCache false
    for name in ("preprocess", "evaluate"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
    assert all(t["taskInfo"]["name"][0].isupper() or t["taskInfo"]["name"] in ("tune-workers", "train-folds") for t in tasks.values())  # display names set


def test_deploy_follows_promote_with_the_champion_version(compiled):
    spec, _, _, params = compiled
    deploy = spec["root"]["dag"]["tasks"]["deploy"]
    assert sorted(deploy["dependentTasks"]) == ["promote", "register"]  # the registered name (auto: the task's) and the champion version
    inputs = deploy["inputs"]["parameters"]
    assert inputs["champion_version"]["taskOutputParameter"] == {"outputParameterKey": "champion_version", "producerTask": "promote"}
    assert inputs["target"] == {"componentInputParameter": "deploy_target"}
    assert inputs["config"] == {"componentInputParameter": "deploy_config"}
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["deploy_target"]["defaultValue"] == "kserve"
    config = defaults["deploy_config"]["defaultValue"]
    assert config["namespace"] == params["deploy"]["namespace"] and config["canary"] is params["deploy"]["canary"]
    from medseg.deploy.config import DeployConfig

    DeployConfig.from_dict({**config, "target": "kserve"})  # the default is a valid deploy config


def test_secrets_by_name_and_no_literal_credentials(compiled):
    spec, k8s, text, params = compiled
    secrets = params["cluster"]["secrets"]

    def mounted(executor):
        return {s["secretName"]: {k["envVar"]: k["secretKey"] for k in s["keyToEnv"]} for s in k8s[executor].get("secretAsEnv", [])}

    expected = {s["name"]: {env: key for key, env in s["keys"].items()} for s in secrets.values()}
    assert mounted("exec-tune-worker") == {n: expected[n] for n in ("medseg-mlflow", "medseg-mlflow-pipeline", "medseg-s3", "medseg-optuna")}
    assert mounted("exec-tune") == mounted("exec-tune-shards") == {"medseg-optuna": expected["medseg-optuna"]}
    for executor in ("exec-train", "exec-register", "exec-promote", "exec-serve", "exec-deploy"):
        assert mounted(executor) == {n: expected[n] for n in ("medseg-mlflow", "medseg-mlflow-pipeline", "medseg-s3")}, executor
    # the predictor's MLflow account is never mounted into a step; the deployer token on the deploy step only
    assert not any("medseg-mlflow-predictor" in mounted(e) for e in k8s)
    volumes = {e: [v["secretName"] for v in k8s[e].get("secretAsVolume", [])] for e in k8s}
    assert {e: v for e, v in volumes.items() if v} == {"exec-deploy": [params["cluster"]["deployer_token"]["name"]]}
    # the InferenceService gets the registry URL and the predictor's own (READ) account, by name and key
    config = spec["root"]["inputDefinitions"]["parameters"]["deploy_config"]["defaultValue"]
    assert config["secret_env"]["MLFLOW_TRACKING_URI"] == ["medseg-mlflow", "tracking_uri"]
    assert config["secret_env"]["MLFLOW_TRACKING_USERNAME"] == ["medseg-mlflow-predictor", "username"]
    assert config["secret_env"]["MLFLOW_TRACKING_PASSWORD"] == ["medseg-mlflow-predictor", "password"]
    assert "s3cr3t-pw" not in text and "wJalrXUtnFEMI" not in text and "AKIA" not in text
    assert not re.search(r"[a-z+]+://[^/\s:@'\"]+:[^/\s@'\"]+@", text), "a URL with user:password@"
    for name in ("mlflow_tracking_uri", "optuna_storage"):
        assert spec["root"]["inputDefinitions"]["parameters"][name]["defaultValue"] == ""  # the Secret fills it


# --------------------------------------------------------------------------- the fan-out under kfp.local
def test_worker_shares_and_seeds():
    from medseg.training.tuning import worker_seed, worker_trials

    assert [worker_trials(10, 4, i) for i in range(4)] == [3, 3, 2, 2]
    assert sum(worker_trials(7, 3, i) for i in range(3)) == 7
    assert len({worker_seed(0, i) for i in range(4)}) == 4 and worker_seed(5, 0) == 5
    with pytest.raises(ValueError):
        worker_trials(3, 2, 2)


def test_study_best_of_a_missing_study_is_a_clear_error(tmp_path):
    from medseg.errors import MedsegError
    from medseg.training.trainer import TrainConfig
    from medseg.training.tuning import sqlite_url, study_best

    with pytest.raises(MedsegError, match="no Optuna study 'medseg-nope'"):
        study_best(sqlite_url(tmp_path / "optuna.db"), "medseg-nope", TrainConfig())


def test_parallel_for_fan_out_runs_under_kfp_local(tmp_path):
    """kfp.local runs the ParallelFor (2 at a time) and dsl.Collected; the real ``tune_shards`` and ``tune``
    components around stub workers that each add their share of trials to one SQLite study."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kfp import dsl, local

    from components.image import COMPONENT_OPTIONS
    from components.tune.component import tune, tune_shards
    from medseg.training.tuning import sqlite_url

    @dsl.component(base_image="python:3.11-slim", **COMPONENT_OPTIONS)
    def stub_worker(worker_index: int, n_workers: int, n_trials: int, optuna_storage: str, pipeline_run_id: str) -> dict:
        import optuna

        from medseg.training.tuning import _storage, pipeline_study_name, worker_seed, worker_trials

        index = int(worker_index)
        share = worker_trials(int(n_trials), int(n_workers), index)
        study = optuna.create_study(study_name=pipeline_study_name(pipeline_run_id), storage=_storage(optuna_storage), direction="maximize",
                                    sampler=optuna.samplers.RandomSampler(seed=worker_seed(0, index)), load_if_exists=True)
        study.optimize(lambda t: 1.0 - abs(t.suggest_float("learning_rate", 3e-4, 1e-2, log=True) - 0.003) - 0 * t.suggest_float("foreground_share", 0.2, 0.7)
                       - 0 * t.suggest_float("weight_decay", 1e-6, 1e-3, log=True), n_trials=share)
        return {"worker": index, "n_trials": share}

    @dsl.pipeline(name="tune-fan-out")
    def fan_out(n_workers: int, n_trials: int, optuna_storage: str):
        shards = tune_shards(n_workers=n_workers, n_trials=n_trials, optuna_storage=optuna_storage, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        with dsl.ParallelFor(shards.output) as index:
            worker = stub_worker(worker_index=index, n_workers=n_workers, n_trials=n_trials, optuna_storage=optuna_storage,
                                 pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        tune(workers=dsl.Collected(worker.output), train_params={"epochs": 3}, tune_params={"epochs": 1}, optuna_storage=optuna_storage,
             pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    import builtins

    original_print = builtins.print  # kfp.local's per-task print swaps interleave across loop threads
    try:
        fan_out(n_workers=3, n_trials=7, optuna_storage=sqlite_url(tmp_path / "optuna.db"))
    finally:
        builtins.print = original_print
    run_dir = next((tmp_path / "root").glob("tune-fan-out-*"))
    from medseg.pipeline.runner import task_outputs

    tasks = task_outputs(run_dir)
    assert {"tune-shards", "tune", "stub-worker-0", "stub-worker-1", "stub-worker-2"} <= set(tasks)
    best = json.loads((Path(tasks["tune"]["best_params"]) / "best_params.json").read_text())
    assert best["n_trials"] == 7 and set(best["params"]) == {"learning_rate", "foreground_share", "weight_decay"}
    assert abs(best["params"]["learning_rate"] - 0.003) < 0.003
    executor = json.loads((run_dir / "tune" / "executor_output.json").read_text())
    assert "n_workers" in json.dumps(executor)


def test_raw_data_pvc_is_mounted_on_ingest_only(tmp_path):
    import yaml

    from medseg.pipeline.runner import compile_pipeline

    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path).read_text()))
    platform = next(d for d in docs if "platforms" in d)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name: [m["mountPath"] for m in spec.get("pvcMount", [])] for name, spec in platform.items()}
    assert mounted["exec-ingest"] == ["/data"]
    assert not any(paths for name, paths in mounted.items() if name != "exec-ingest")


def test_the_train_step_is_retried_and_resumes_from_the_checkpoint_store(compiled):
    """A failed or preempted train pod is started again within the run (KFP's retry policy) and finds the run's
    checkpoints in ``checkpoint_store`` (``cluster.checkpoint_store``, a run parameter, as is ``resume_run``)."""
    from pipelines.training_pipeline import LOCAL_TRAIN_RETRY, TRAIN_RETRY

    spec, _, _, params = compiled
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["checkpoint_store"] == params["cluster"]["checkpoint_store"] and defaults["resume_run"] == ""
    train = _in_loop(spec, "train")
    assert train["inputs"]["parameters"]["checkpoint_store"] == {"componentInputParameter": "pipelinechannel--checkpoint_store"}
    assert train["inputs"]["parameters"]["resume_run"] == {"componentInputParameter": "pipelinechannel--resume_run"}
    assert train["retryPolicy"]["maxRetryCount"] == TRAIN_RETRY["num_retries"] >= 1  # the compiled (cluster) policy
    assert train["retryPolicy"]["backoffDuration"] == TRAIN_RETRY["backoff_duration"] and LOCAL_TRAIN_RETRY["num_retries"] >= 1
    assert "retryPolicy" not in spec["root"]["dag"]["tasks"]["register"]  # side effects are not blindly replayed


def test_batch_inference_mounts_the_data_pvc_and_takes_an_output_uri(tmp_path):
    """Input and output of the batch predict step: ``s3://`` (the S3 Secret) or a folder on the data PVC
    (``cluster.data_pvc``, mounted on that step); ``output_uri`` "" keeps the results in the run's artefact only."""
    from medseg.pipeline.runner import compile_pipeline
    from pipelines.training_pipeline import CLUSTER

    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path, "batch-inference").read_text()))
    spec, k8s = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in params["input_uri"] and params["output_uri"]["defaultValue"] == ""
    assert "input_dir" not in params
    inputs = spec["root"]["dag"]["tasks"]["predict"]["inputs"]["parameters"]
    assert inputs["input_uri"] == {"componentInputParameter": "input_uri"} and inputs["output_uri"] == {"componentInputParameter": "output_uri"}
    pvc = CLUSTER["data_pvc"]
    mounts = k8s["exec-predict"]["pvcMount"]
    assert [(m["mountPath"], m["pvcNameParameter"]["runtimeValue"]["constant"]) for m in mounts] == [(pvc["mount_path"], pvc["name"])]
    assert "medseg-s3" in {s["secretName"] for s in k8s["exec-predict"]["secretAsEnv"]}
