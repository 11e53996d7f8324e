from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("evaluate"), **COMPONENT_OPTIONS)
def evaluate(model: Input[Model], dataset: Input[Dataset], overlap: float, evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML]):
    """Sliding-window inference on the held-out test split: the evaluation folder (metrics.json, per-case
    and long-form CSVs, report.md, report.html), headline numbers as KFP Metrics, and the report as
    Markdown and as a self-contained HTML page (both shown in the KFP UI). A classification dataset with a
    classifier package gets the classification report (accuracy, balanced accuracy, ROC-AUC per class)."""
    import shutil
    from pathlib import Path

    from medseg.evaluation.stage import run_evaluate

    result = run_evaluate(Path(model.path), Path(dataset.path), Path(evaluation.path), overlap=overlap, progress=False)
    headline = ("dice", "hd95", "pq_dsc", "lesionwise_dice_2023", "lesionwise_hd95_2023", "lesionwise_dice_2024", "lesionwise_hd95_2024",
                "accuracy", "balanced_accuracy", "auc_macro", "auc")  # the last four: classification datasets (all_accuracy, CN_auc, ...)
    for name, values in result.mean.items():
        for key in headline:
            if key in values:
                metrics.log_metric(f"{name}_{key}", round(float(values[key]), 4))
    shutil.copy(Path(evaluation.path) / "report.md", report.path)
    shutil.copy(Path(evaluation.path) / "report.html", report_html.path)
