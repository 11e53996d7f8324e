from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("evaluate"), **COMPONENT_OPTIONS)
def evaluate(model: Input[Model], dataset: Input[Dataset], overlap: float, evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown]):
    """Sliding-window inference on the held-out test split; metrics.json, per-case CSV, report."""
    import shutil
    from pathlib import Path

    from medseg.evaluation.stage import run_evaluate

    result = run_evaluate(Path(model.path), Path(dataset.path), Path(evaluation.path), overlap=overlap, progress=False)
    for name, values in result.mean.items():
        for key in ("dice", "hd95", "lesionwise_dice_2023", "lesionwise_hd95_2023"):
            if key in values:
                metrics.log_metric(f"{name}_{key}", round(float(values[key]), 4))
    shutil.copy(Path(evaluation.path) / "report.md", report.path)
