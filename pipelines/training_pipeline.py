"""The training pipeline: ingest → preprocess → tune → train → evaluate → register → promote → serve.

One definition: ``medseg pipeline run`` executes it with ``kfp.local`` (subprocesses, no cluster);
``medseg pipeline compile`` writes the YAML a Kubeflow cluster runs.
"""

from pathlib import Path

from kfp import dsl

from components.evaluate.component import evaluate
from components.ingest.component import ingest
from components.preprocess.component import preprocess
from components.promote.component import promote
from components.register.component import register
from components.serve.component import serve
from components.train.component import train
from components.tune.component import tune

from medseg.pipeline.runner import load_params, pipeline_arguments

PIPELINE_NAME = "medseg-training"
# params.yaml is the single place for defaults: the compiled pipeline's defaults are read from it
DEFAULTS = pipeline_arguments(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), source="", tracking_uri="", optuna_storage="")


@dsl.pipeline(name=PIPELINE_NAME, description="Self-configuring 3D segmentation: ingest, plan, tune, train, evaluate, register, promote and smoke-serve a model.")
def training_pipeline(
    source: str,
    mlflow_tracking_uri: str,
    optuna_storage: str,
    model_name: str = DEFAULTS["model_name"],
    source_format: str = DEFAULTS["source_format"],
    n_folds: int = DEFAULTS["n_folds"],
    test_fraction: float = DEFAULTS["test_fraction"],
    seed: int = DEFAULTS["seed"],
    device_budget: str = DEFAULTS["device_budget"],
    train_params: dict = DEFAULTS["train_params"],
    tune_params: dict = DEFAULTS["tune_params"],
    n_trials: int = DEFAULTS["n_trials"],
    overlap: float = DEFAULTS["overlap"],
    thresholds: dict = DEFAULTS["thresholds"],
    promotion_margin: float = DEFAULTS["promotion_margin"],
    primary_region: str = DEFAULTS["primary_region"],
):
    ingested = ingest(source=source, source_format=source_format, n_folds=n_folds, test_fraction=test_fraction, seed=seed)
    ingested.set_display_name("Ingest and validate")
    ingested.set_caching_options(False)  # the same source path may hold new data: always re-read it
    pre = preprocess(dataset=ingested.outputs["dataset"], device_budget=device_budget)
    pre.set_display_name("Fingerprint, plan, preprocess")
    tuned = tune(preprocessed=pre.outputs["preprocessed"], train_params=train_params, tune_params=tune_params, n_trials=n_trials,
                 optuna_storage=optuna_storage, mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    tuned.set_display_name("Tune (Optuna)")
    trained = train(preprocessed=pre.outputs["preprocessed"], best_params=tuned.outputs["best_params"], train_params=train_params,
                    mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    trained.set_display_name("Train")
    evaluated = evaluate(model=trained.outputs["model"], dataset=ingested.outputs["dataset"], overlap=overlap)
    evaluated.set_display_name("Evaluate on held-out cases")
    registered = register(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"], dataset=ingested.outputs["dataset"],
                          model_name=model_name, thresholds=thresholds,
                          mlflow_tracking_uri=mlflow_tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    registered.set_display_name("Register (MLflow)")
    registered.set_caching_options(False)
    promoted = promote(model_name=model_name, version=registered.outputs["version"], evaluation=evaluated.outputs["evaluation"],
                       margin=promotion_margin, primary_region=primary_region, mlflow_tracking_uri=mlflow_tracking_uri)
    promoted.set_display_name("Promote (gate)")
    promoted.set_caching_options(False)
    # serve whatever is champion after the gate (the new version, or the old one when it was refused); with no
    # champion at all (a first model under the thresholds) the step records that and serves nothing. (A dsl.If on
    # the promote step's output would say this too, but kfp.local cannot resolve named task outputs in conditions.)
    served = serve(model_name=model_name, alias="champion", dataset=ingested.outputs["dataset"], mlflow_tracking_uri=mlflow_tracking_uri)
    served.after(promoted)
    served.set_display_name("Serve (KServe smoke test)")
    served.set_caching_options(False)
    for task in (tuned, trained):
        task.set_cpu_request("2").set_memory_request("8G")
