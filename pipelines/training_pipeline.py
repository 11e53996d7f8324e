"""The training pipeline: ingest → preprocess → tune (parallel Optuna workers) → train → evaluate → register
→ promote → serve (smoke test) and deploy.

One definition: ``medseg pipeline run`` executes it with ``kfp.local`` (subprocesses, no cluster; one tune
worker on a SQLite study, deploy_target=local); ``medseg pipeline compile`` writes the YAML a Kubeflow
cluster runs (``cluster.tune_workers`` workers on the PostgreSQL study of the medseg-optuna Secret,
deploy_target=kserve).

The compiled defaults, resources, node selector, tolerations and Secret names come from ``params.yaml``
at the project root, or from the file named by ``MEDSEG_PARAMS`` (one parameter file per cluster).

GPUs are chosen per run (parameters in the Kubeflow UI's run form, defaults from ``cluster.accelerator``): ``train_gpus``
(one DDP process per GPU), ``tune_gpus``, ``evaluate_gpus``, ``accelerator_type`` (the GPU's resource name, "" = none),
``gpu_memory_gib`` and ``train_node_selector`` (e.g. the GPU model); ``device_budget: auto`` plans for the CPU or the GPU
the run asks for. Tolerations and CPU/memory stay compile-time (``cluster``).
"""

import os
from pathlib import Path

from kfp import dsl, kubernetes

from components.deploy.component import deploy
from components.evaluate.component import evaluate
from components.image import image
from components.ingest.component import ingest
from components.preprocess.component import preprocess
from components.promote.component import promote
from components.register.component import register
from components.serve.component import serve
from components.train.component import fold_ensemble, plan_budget, train, training_folds
from components.tune.component import tune, tune_shards, tune_worker

from medseg.pipeline.runner import load_params, pipeline_arguments

PIPELINE_NAME = "medseg-training"
# params.yaml is the single place for defaults: the compiled pipeline's defaults are read from it
PARAMS = load_params(os.environ.get("MEDSEG_PARAMS") or Path(__file__).resolve().parents[1] / "params.yaml")
DEFAULTS = pipeline_arguments(PARAMS, source="", tracking_uri="", optuna_storage="", target="cluster")
#: restarts of a failed train pod within one run, each resuming from the stored checkpoint (60 s, 120 s, 240 s apart)
TRAIN_RETRY = {"num_retries": 3, "backoff_duration": "60s", "backoff_factor": 2.0}
#: under kfp.local (``medseg pipeline run``, which sets LOCAL_RUN_ENV): one restart after 5 s, so a killed training
#: process resumes while a broken configuration still fails within seconds
LOCAL_TRAIN_RETRY = {"num_retries": 1, "backoff_duration": "5s", "backoff_factor": 2.0}
LOCAL_RUN_ENV = "MEDSEG_KFP_LOCAL"


def train_retry_policy() -> dict:
    """The train task's retry policy: :data:`LOCAL_TRAIN_RETRY` in a kfp.local run, else :data:`TRAIN_RETRY`."""
    return LOCAL_TRAIN_RETRY if os.environ.get(LOCAL_RUN_ENV) == "1" else TRAIN_RETRY
CLUSTER = PARAMS.get("cluster", {})
#: The predictor image of the InferenceService: the serve image of this build (same registry and tag).
SERVE_IMAGE = image("serve")


def _mount_secrets(task: dsl.PipelineTask, *which: str) -> None:
    """Secrets by name as environment variables; the components fall back to them when the pipeline's
    ``mlflow_tracking_uri`` / ``optuna_storage`` parameters are left empty (the cluster default)."""
    for name in which:
        secret = CLUSTER.get("secrets", {}).get(name)
        if secret:
            kubernetes.use_secret_as_env(task, secret_name=secret["name"], secret_key_to_env=dict(secret["keys"]))


def _mount_deployer_token(task: dsl.PipelineTask) -> None:
    """The deploy step's own Kubernetes identity: Secret ``cluster.deployer_token`` (a token of the ServiceAccount
    medseg/medseg-deployer, the only subject of the Role that may get/create/patch InferenceServices) as files
    where ``medseg.deploy.identity`` reads them. kfp-kubernetes 2.17 has no per-task service account, so this
    token, mounted on this task only, is what separates the deploy step from the other steps of the run."""
    from medseg.deploy.identity import DEFAULT_TOKEN_DIR

    secret = (CLUSTER.get("deployer_token") or {}).get("name")
    if secret:
        kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=DEFAULT_TOKEN_DIR)


def _mount_source_data(task: dsl.PipelineTask) -> None:
    """A path source lives on the PVC named in ``params.yaml`` → cluster.data_pvc, mounted at its
    ``mount_path`` when one is set (an ``s3://`` source needs only the S3 Secret, mounted below)."""
    pvc = CLUSTER.get("data_pvc") or {}
    if pvc.get("name"):
        kubernetes.mount_pvc(task, pvc_name=pvc["name"], mount_path=pvc.get("mount_path", "/data"))


def _gpu_tolerations(task: dsl.PipelineTask) -> None:
    """``cluster.tolerations`` (the GPU nodes' taints), fixed at compile time: a toleration only allows a pod onto a tainted
    node and never requires it, so a run that asks 0 GPUs is not affected. (kfp-kubernetes 2.17 could take them from a
    parameter, ``add_toleration_json``, but KFP's init-container driver mode skips parameter tolerations: static ones
    work in every backend mode.)"""
    for tol in CLUSTER.get("tolerations") or []:
        kubernetes.add_toleration(task, **tol)


def _gpus(task: dsl.PipelineTask, accelerator_type, gpus) -> None:
    """The step's GPU limit from run parameters: KFP 2.17 compiles a parameter into the IR's ``resourceType`` /
    ``resourceCount`` placeholders and the backend's driver resolves them when the run starts (no limit when the type
    is ""; a count of 0 asks no GPU)."""
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(gpus)


def _training_resources(task: dsl.PipelineTask, accelerator_type, gpus, node_selector) -> None:
    """CPU/memory (``params.yaml`` → cluster, compile-time), GPUs and node selector (run parameters) and tolerations
    for the tune and train steps."""
    res = CLUSTER.get("train_resources", {})
    if res.get("cpu_request"):
        task.set_cpu_request(str(res["cpu_request"]))
    if res.get("cpu_limit"):
        task.set_cpu_limit(str(res["cpu_limit"]))
    if res.get("memory_request"):
        task.set_memory_request(str(res["memory_request"]))
    if res.get("memory_limit"):
        task.set_memory_limit(str(res["memory_limit"]))
    _gpus(task, accelerator_type, gpus)
    # a run parameter (the GPU model goes with the run's GPU choice); an empty dict selects any node
    kubernetes.add_node_selector_json(task, node_selector)
    _gpu_tolerations(task)


@dsl.pipeline(name=PIPELINE_NAME, description="Self-configuring segmentation and classification: ingest, plan, tune in parallel, train, evaluate, register, promote, smoke-serve and deploy a model for the dataset's task.")
def training_pipeline(
    source: str,
    mlflow_tracking_uri: str = "",
    optuna_storage: str = "",
    model_name: str = DEFAULTS["model_name"],
    source_format: str = DEFAULTS["source_format"],
    n_folds: int = DEFAULTS["n_folds"],
    test_fraction: float = DEFAULTS["test_fraction"],
    seed: int = DEFAULTS["seed"],
    device_budget: str = DEFAULTS["device_budget"],
    configuration: str = DEFAULTS["configuration"],
    train_params: dict = DEFAULTS["train_params"],
    tune_params: dict = DEFAULTS["tune_params"],
    n_trials: int = DEFAULTS["n_trials"],
    tune_workers: int = DEFAULTS["tune_workers"],
    overlap: float = DEFAULTS["overlap"],
    evaluate_mirror: bool = DEFAULTS["evaluate_mirror"],
    thresholds: dict = DEFAULTS["thresholds"],
    promotion_margin: float = DEFAULTS["promotion_margin"],
    gate_metric: str = DEFAULTS["gate_metric"],
    deploy_target: str = DEFAULTS["deploy_target"],
    deploy_config: dict = DEFAULTS["deploy_config"],
    folds: str = DEFAULTS["folds"],
    candidate_configurations: str = DEFAULTS["candidate_configurations"],
    checkpoint_store: str = DEFAULTS["checkpoint_store"],
    resume_run: str = "",
    train_gpus: int = DEFAULTS["train_gpus"],
    tune_gpus: int = DEFAULTS["tune_gpus"],
    evaluate_gpus: int = DEFAULTS["evaluate_gpus"],
    accelerator_type: str = DEFAULTS["accelerator_type"],
    gpu_memory_gib: float = DEFAULTS["gpu_memory_gib"],
    train_node_selector: dict = DEFAULTS["train_node_selector"],
):
    """Train, evaluate, register and promote a model for the dataset's task, smoke-test it behind KServe, deploy the champion.

    Args:
        source: Folder (or mounted volume path) holding the raw dataset in any supported layout (BraTS, MSD, nnU-Net raw, Kaggle LGG slices, DICOM series, classification CSV).
        mlflow_tracking_uri: MLflow tracking server URL; empty = the MLFLOW_TRACKING_URI from the medseg-mlflow Secret.
        optuna_storage: SQLAlchemy URL of the Optuna study database; empty = OPTUNA_STORAGE from the medseg-optuna Secret.
        model_name: Registered model name in MLflow (aliases challenger / champion / previous-champion); auto: <source format>-<task kind>.
        source_format: Layout of the raw data: auto, or an adapter name such as brats2023.
        n_folds: Cross-validation folds, split by patient.
        test_fraction: Share of patients held out for the test set that gates promotion.
        seed: Seed of the patient-level splits.
        device_budget: Planning budget: auto (cpu when train_gpus is 0, else gpu:<GiB> of the run's GPU), cpu, or gpu:<GiB> to size the patch for a GPU's memory.
        configuration: What to train: auto (2d for slice sets and strongly anisotropic data, else 3d_fullres, as nnU-Net), 2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres.
        train_params: Training parameters (epochs, iterations_per_epoch, learning_rate, optimizer, network and loss: auto follows the task, ...).
        tune_params: Overrides of train_params for each short Optuna trial.
        n_trials: Number of Optuna trials, shared by the tune workers.
        tune_workers: Optuna workers running in parallel pods on the shared study (at most n_trials are used).
        overlap: Sliding-window overlap at evaluation (0 to <1).
        evaluate_mirror: Mirroring test-time augmentation at evaluation (nnU-Net's default; 8x the inference compute in 3D).
        thresholds: Absolute thresholds for the challenger alias: {"auto": true} the task's own, {} none, or {"GROUP[/METRIC]": value} e.g. {"WT": 0.8} or {"all/log_loss": 0.9}.
        promotion_margin: How much worse than the champion a challenger may be and still count as non-inferior (in the gate metric's units).
        gate_metric: Per-case metric the gate compares: auto (the task's primary metric: Dice, IoU for slice sets that name it, log-loss for classifiers) or auc_macro (classifiers).
        deploy_target: Where the champion is deployed: kserve (InferenceService in deploy_config's namespace) or local (127.0.0.1, kfp.local runs).
        deploy_config: medseg.deploy.DeployConfig fields (namespace, replicas, resources, gpu, canary, Prometheus URL, Secrets by name).
        folds: Folds to train, each in its own pod at the same time: a fold number, a list N,M,... or all; several folds are combined into one ensemble package with postprocessing chosen on their out-of-fold predictions.
        candidate_configurations: Configurations to train beside the chosen one and choose among by cross-validation, the best one or the best pair ensemble (nnU-Net's find_best_configuration): all (2d, 3d_fullres and the cascade when planned), a list such as 2d,3d_fullres, or empty for none.
        checkpoint_store: Where the train step keeps its checkpoints while it runs (s3://bucket/prefix, or a mounted folder), under <run>/<configuration>/fold_<k>: a restarted or retried train pod resumes from the last epoch; empty = none.
        resume_run: The id of an earlier run whose stored checkpoints this run's train step resumes from (empty: this run's own id).
        train_gpus: GPUs per train pod; one DDP process per GPU (torchrun, NCCL); 0 trains on the CPU.
        tune_gpus: GPUs per tune worker pod (its trials run one at a time: 1 is enough); 0 tunes on the CPU.
        evaluate_gpus: GPUs of the evaluation pod (inference on cuda when > 0); 0 evaluates on the CPU.
        accelerator_type: Kubernetes resource name of the GPUs (nvidia.com/gpu, amd.com/gpu); empty = no GPU for any step.
        gpu_memory_gib: Memory of one GPU for device_budget auto; 0 = the GPU model named by train_node_selector (T4, L4, A100, H100, ...).
        train_node_selector: Node labels the tune and train pods must match, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}; {} = any node.
    """
    ingested = ingest(source=source, source_format=source_format, n_folds=n_folds, test_fraction=test_fraction, seed=seed)
    ingested.set_display_name("Ingest and validate")
    ingested.set_caching_options(False)  # the same source path may hold new data: always re-read it
    _mount_source_data(ingested)
    budget = plan_budget(device_budget=device_budget, gpus=train_gpus, gpu_memory_gib=gpu_memory_gib, node_selector=train_node_selector)
    budget.set_display_name("Device budget for the requested GPU")
    budget.set_caching_options(False)  # a few milliseconds; the preprocess step after it is the one worth caching
    pre = preprocess(dataset=ingested.outputs["dataset"], device_budget=budget.output, configuration=configuration, candidates=candidate_configurations)
    pre.set_display_name("Fingerprint, plan, preprocess")
    pre.set_caching_options(True)  # deterministic given the dataset and the budget
    shards = tune_shards(n_workers=tune_workers, n_trials=n_trials, optuna_storage=optuna_storage, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    shards.set_display_name("Tune: create the study")
    shards.set_caching_options(False)  # creates the run's study in the database
    with dsl.ParallelFor(shards.output, name="tune-workers") as worker_index:
        worker = tune_worker(preprocessed=pre.outputs["preprocessed"], worker_index=worker_index, n_workers=tune_workers, train_params=train_params,
                             tune_params=tune_params, n_trials=n_trials, optuna_storage=optuna_storage, mlflow_tracking_uri=mlflow_tracking_uri,
                             pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, gpus=tune_gpus, accelerator_type=accelerator_type)
        worker.set_display_name("Tune worker (Optuna)")
        _training_resources(worker, accelerator_type, tune_gpus, train_node_selector)
        _mount_secrets(worker, "mlflow", "mlflow_user", "s3", "optuna")
    tuned = tune(workers=dsl.Collected(worker.outputs["Output"]), train_params=train_params, tune_params=tune_params, optuna_storage=optuna_storage,
                 pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    tuned.set_display_name("Tune: best parameters of the study")
    fold_list = training_folds(preprocessed=pre.outputs["preprocessed"], folds=folds, candidates=candidate_configurations)
    fold_list.set_display_name("Configurations and folds to train")
    fold_list.set_caching_options(False)  # milliseconds
    with dsl.ParallelFor(fold_list.output, name="train-folds") as unit:
        # the configuration comes with the loop item (kfp.local would hand an upstream output parameter over as the item)
        trained = train(preprocessed=pre.outputs["preprocessed"], best_params=tuned.outputs["best_params"], train_params=train_params,
                        mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                        gpus=train_gpus, checkpoint_store=checkpoint_store, resume_run=resume_run, fold=unit.fold, accelerator_type=accelerator_type,
                        configuration=unit.configuration)
        trained.set_display_name("Train a fold")
        # a preempted or failed train pod is started again within the same run: it finds the run's checkpoints in
        # checkpoint_store and resumes after the last complete epoch (kfp.local honours the retries too)
        trained.set_retry(**train_retry_policy())
        _training_resources(trained, accelerator_type, train_gpus, train_node_selector)
        _mount_secrets(trained, "mlflow", "mlflow_user", "s3")
    combined = fold_ensemble(preprocessed=pre.outputs["preprocessed"], dataset=ingested.outputs["dataset"], fold_models=dsl.Collected(trained.outputs["model"]), train_params=train_params,
                             mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    combined.set_display_name("Fold ensemble; configuration chosen by cross-validation")
    _mount_secrets(combined, "mlflow", "mlflow_user")
    evaluated = evaluate(model=combined.outputs["model"], dataset=ingested.outputs["dataset"], overlap=overlap, gpus=evaluate_gpus, mirror=evaluate_mirror)
    evaluated.set_display_name("Evaluate on held-out cases")
    _gpus(evaluated, accelerator_type, evaluate_gpus)
    _gpu_tolerations(evaluated)  # no node selector: any GPU node will do for inference, and a CPU evaluation goes anywhere
    evaluated.set_caching_options(True)  # deterministic given the model and the dataset
    registered = register(model=combined.outputs["model"], evaluation=evaluated.outputs["evaluation"], dataset=ingested.outputs["dataset"],
                          model_name=model_name, thresholds=thresholds,
                          mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    registered.set_display_name("Register (MLflow)")
    registered.set_caching_options(False)
    registered_name = registered.outputs["model_name"]  # model_name, or the task's own name for auto
    promoted = promote(model_name=registered_name, version=registered.outputs["version"], evaluation=evaluated.outputs["evaluation"],
                       margin=promotion_margin, gate_metric=gate_metric, mlflow_tracking_uri=mlflow_tracking_uri)
    promoted.set_display_name("Promote (gate)")
    promoted.set_caching_options(False)
    # serve whatever is champion after the gate (the new version, or the old one when it was refused); with no
    # champion at all (a first model under the thresholds) the step records that and serves nothing. (A dsl.If on
    # the promote step's output would say this too, but kfp.local cannot resolve named task outputs in conditions.)
    served = serve(model_name=registered_name, alias="champion", dataset=ingested.outputs["dataset"], mlflow_tracking_uri=mlflow_tracking_uri)
    served.after(promoted)
    served.set_display_name("Serve (KServe smoke test)")
    served.set_caching_options(False)
    # deploy the champion pinned to its version (promote's champion_version: the new version if it passed the
    # gate, else the one already serving; empty when there is none and the step records that)
    deployed = deploy(model_name=registered_name, champion_version=promoted.outputs["champion_version"], target=deploy_target, config=deploy_config,
                      serve_image=SERVE_IMAGE, mlflow_tracking_uri=mlflow_tracking_uri)
    deployed.set_display_name("Deploy (KServe InferenceService)")
    deployed.set_caching_options(False)  # acts on the cluster and the registry: never replay an old answer
    _mount_secrets(ingested, "s3")
    _mount_secrets(shards, "optuna")
    _mount_secrets(tuned, "optuna")
    for task in (registered, promoted, served, deployed):
        _mount_secrets(task, "mlflow", "mlflow_user", "s3")
    _mount_deployer_token(deployed)
