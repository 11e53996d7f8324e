from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("train"), **COMPONENT_OPTIONS)
def tune(preprocessed: Input[Dataset], train_params: dict, tune_params: dict, n_trials: int, optuna_storage: str, mlflow_tracking_uri: str, pipeline_run_id: str, best_params: Output[Artifact]):
    """Optuna study of short pruned trainings on fold 0; the best parameters as an artefact."""
    from pathlib import Path

    from medseg.tracking import resolve_optuna_storage, resolve_tracking_uri
    from medseg.training.stage import run_tune

    params = {**train_params, **tune_params}
    study = f"medseg-{pipeline_run_id}"
    best = run_tune(Path(preprocessed.path), Path(best_params.path), params, n_trials, resolve_optuna_storage(optuna_storage), study,
                    tracking_uri=resolve_tracking_uri(mlflow_tracking_uri), tags={"pipeline_run_id": pipeline_run_id, "stage": "tune"}, progress=True)
    best_params.metadata.update({"best_value": best.best_value, **{k: float(v) for k, v in best.params.items()}})
