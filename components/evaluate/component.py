from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import COMPONENT_OPTIONS, image


@dsl.component(base_image=image("evaluate"), **COMPONENT_OPTIONS)
def evaluate(model: Input[Model], dataset: Input[Dataset], overlap: float, evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown], report_html: Output[HTML],
             gpus: int = 0, mirror: bool = False):
    """The held-out test split scored as the dataset's task says: segmentation (sliding-window inference, Dice/IoU/HD95
    per reported group, the official lesion-wise numbers where they apply) or classification (accuracy, balanced
    accuracy, ROC-AUC, log-loss). Writes the evaluation folder (metrics.json, per-case CSVs, report.md, report.html);
    every number the task reports goes to the KFP Metrics artefact (the same keys MLflow gets at registration).
    ``gpus`` (the run's ``evaluate_gpus``, the pod's GPU limit) > 0: inference on CUDA (device ``cuda``); 0: the CPU.
    ``mirror``: mirroring test-time augmentation (nnU-Net's default at inference; 8× the compute in 3D)."""
    import shutil
    from pathlib import Path

    from medseg import schemas
    from medseg.evaluation.stage import run_evaluate
    from medseg.pipeline.gpu import step_device
    from medseg.task import Task

    device = step_device(int(gpus))
    result = run_evaluate(Path(model.path), Path(dataset.path), Path(evaluation.path), overlap=overlap, mirror=bool(mirror), progress=False, device=device)
    task = Task.from_folder(Path(dataset.path))
    for key, value in task.reported_metrics(result.mean).items():
        metrics.log_metric(key, round(float(value), 4))
    metrics.log_metric("n_cases", float(result.n_cases))
    shutil.copy(Path(evaluation.path) / schemas.REPORT_MD, report.path)
    shutil.copy(Path(evaluation.path) / schemas.REPORT_HTML, report_html.path)
    evaluation.metadata.update({"mirror": bool(mirror), "device": device, "task": task.kind, "primary_metric": task.primary_metric, "headline": task.headline(result.mean)})
