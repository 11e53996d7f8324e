from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("preprocess"), **COMPONENT_OPTIONS)
def preprocess(dataset: Input[Dataset], device_budget: str, preprocessed: Output[Dataset]):
    """Fingerprint the dataset, plan under the device budget, preprocess the training cases."""
    from pathlib import Path

    from medseg.preprocessing.preprocess import run_preprocessing

    plans = run_preprocessing(Path(dataset.path), Path(preprocessed.path), budget=device_budget, progress=False)
    config = plans.configuration()
    preprocessed.metadata.update({"plan_hash": plans.content_hash(), "patch_size": config.patch_size, "spacing": config.spacing, "n_parameters": config.n_parameters})
