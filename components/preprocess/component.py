from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("preprocess"), **COMPONENT_OPTIONS)
def preprocess(dataset: Input[Dataset], device_budget: str, configuration: str, preprocessed: Output[Dataset], candidates: str = "") -> NamedTuple("Preprocessed", [("configuration", str)]):
    """Fingerprint the dataset, plan under the device budget, choose the configuration to train (``auto``: as nnU-Net
    does, from the dataset's task and the plan) and preprocess the training cases for it, and for the ``candidates``
    cross-validation will choose among (``all``, or a list such as ``2d,3d_fullres``; empty: none)."""
    from collections import namedtuple
    from pathlib import Path

    from medseg.preprocessing.preprocess import run_preprocessing
    from medseg.task import configuration_stages

    plans = run_preprocessing(Path(dataset.path), Path(preprocessed.path), budget=device_budget, progress=False, configuration=configuration,
                               candidates=candidates)
    chosen = plans.chosen_configuration
    config = plans.configuration(configuration_stages(chosen)[-1])
    preprocessed.metadata.update({"plan_hash": plans.content_hash(), "configuration": chosen, "requested_configuration": configuration, "preprocessed_configurations": list(plans.trained_configurations),
                                  "configuration_reason": plans.configuration_reason, "patch_size": config.patch_size, "spacing": config.spacing,
                                  "n_parameters": config.n_parameters})
    return namedtuple("Preprocessed", ["configuration"])(chosen)
