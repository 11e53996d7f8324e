"""The evaluate stage: predict the held-out test cases with a model package and score them.

Segmentation datasets get the segmentation report (:func:`~medseg.evaluation.report.evaluate_arrays`);
classification datasets (dataset.json ``task: "classification"``) the classification report
(:func:`~medseg.evaluation.classification.evaluate_classification`: accuracy, balanced accuracy, one-vs-rest
ROC-AUC per class, log-loss, ROC curves), each test case's true class and age read from the dataset's manifest.json.

Every per-case entry of ``metrics.json`` also gets the case's ``case_key`` from manifest.json (its identity by
content, :func:`medseg.ingest.ingest.case_key`; ``""`` when the manifest has none): the registry's gate pairs a
challenger's test cases with the champion's by it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg import schemas
from medseg.errors import MedsegError
from medseg.evaluation.report import evaluate_arrays
from medseg.io import load_nifti, nifti_spacing, save_nifti
from medseg.preprocessing.fingerprint import case_files, label_file
from medseg.task import Task
from medseg.visualize import overlay_png


def run_evaluate(model_dir: Path, dataset_dir: Path, out_dir: Path, predictions_dir: Path | None = None, case_ids: list[str] | None = None, overlap: float = 0.5, mirror: bool = False, progress: bool = True,
                 device: str = "auto") -> schemas.Metrics:
    """Predict ``case_ids`` (default: the held-out test split), write NIfTI predictions in the original
    geometry to ``predictions_dir`` and the metrics/report to ``out_dir`` (``report.html`` shows the
    best, median and worst case over the first image channel, and the model's training curves when its package
    has them: :func:`training_curves`). ``device``: ``auto`` (CUDA when present) | ``cpu`` | ``cuda`` | ``cuda:N``."""
    from medseg.inference.predictor import Predictor  # torch and MONAI: only when predicting

    model_dir, dataset_dir, out_dir = Path(model_dir), Path(dataset_dir), Path(out_dir)
    predictor = Predictor.from_package(model_dir, device=device, overlap=overlap, mirror=mirror)
    dataset = schemas.DatasetJson.load(dataset_dir)
    task = Task.from_dataset(dataset)
    if task.is_classification != (predictor.output == "classes"):
        what = "a classifier" if predictor.output == "classes" else "a segmentation model"
        raise MedsegError(f"the model is {what}, the dataset's task is {task.kind!r}", dataset_dir / schemas.DATASET_JSON)
    if task.signature != predictor.task.signature:
        raise MedsegError(f"the model was trained for another task ({predictor.task!r}) than this dataset's ({task!r})", dataset_dir / schemas.DATASET_JSON)
    case_ids = case_ids if case_ids is not None else schemas.Splits.load(dataset_dir).test
    if not case_ids:
        raise MedsegError("no test cases to evaluate (splits.json has an empty test list)", dataset_dir / schemas.SPLITS_JSON)
    curves = training_curves(model_dir, predictor.package)
    if task.is_classification:
        return add_case_keys(_evaluate_classification(predictor, dataset, dataset_dir, out_dir, case_ids, progress, curves), dataset_dir, out_dir)
    predictions_dir = Path(predictions_dir) if predictions_dir else out_dir / schemas.PREDICTIONS_DIR
    n_channels = len(dataset.channel_names)

    def pairs():
        for i, case_id in enumerate(tqdm(case_ids, desc="evaluate", disable=not progress)):
            images = case_files(dataset_dir, case_id, n_channels)
            prediction = predictor.predict_files(images)
            ref, _, hdr = load_nifti(label_file(dataset_dir, case_id), dtype=np.float32)
            ref = np.rint(ref).astype(np.uint8)
            save_nifti(predictions_dir / f"{case_id}{dataset.file_ending}", prediction.segmentation, prediction.affine, prediction.header)
            first_channel, _, _ = load_nifti(images[0])
            if i == 0:  # one picture for the report
                flair, _, _ = load_nifti(images[-1])
                overlay_png(flair, prediction.segmentation, out_dir / schemas.EXAMPLE_OVERLAY_PNG, reference=ref, title=case_id)
            yield case_id, prediction.segmentation, ref, nifti_spacing(hdr), first_channel

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_arrays(pairs(), dataset, out_dir, total=len(case_ids), lesionwise=task.lesionwise, training_curves=curves)
    return add_case_keys(metrics, dataset_dir, out_dir)


def training_curves(model_dir: Path, package: schemas.ModelPackage) -> bytes | None:
    """The model's training curves as PNG bytes: the package's ``training_curves.png``, else drawn from the history in
    its ``model_package.json`` (packages written before the picture was); None when the package records neither."""
    path = Path(model_dir) / schemas.TRAINING_CURVES_PNG
    if path.is_file():
        return path.read_bytes()
    history = (package.training or {}).get("history")
    if not history:
        return None
    from medseg.visualize import training_curves_png

    best = package.training.get("best_epoch")
    return training_curves_png({"": list(history)}, str(package.training.get("val_metric") or ""), {"": int(best)} if isinstance(best, int) else None)


def case_keys(dataset_dir: Path) -> dict[str, str]:
    """case id → ``case_key`` of the dataset's manifest.json (``{}`` without a manifest; ``""`` for cases
    ingested before keys existed)."""
    path = Path(dataset_dir) / schemas.MANIFEST_JSON
    if not path.is_file():
        return {}
    return {str(c["case_id"]): str(c.get("case_key") or "") for c in schemas.Manifest.load(path).cases}


def add_case_keys(metrics: schemas.Metrics, dataset_dir: Path, out_dir: Path | None = None) -> schemas.Metrics:
    """Give every per-case entry its ``case_key`` (right after ``case_id``; ``""`` when unknown) and, with
    ``out_dir``, rewrite its ``metrics.json``."""
    keys = case_keys(dataset_dir)
    metrics.per_case = [{"case_id": e.get("case_id"), "case_key": keys.get(str(e.get("case_id")), ""), **{k: v for k, v in e.items() if k not in ("case_id", "case_key")}}
                        for e in metrics.per_case]
    if out_dir is not None:
        metrics.save(Path(out_dir) / schemas.METRICS_JSON)
    return metrics


def _evaluate_classification(predictor, dataset: schemas.DatasetJson, dataset_dir: Path, out_dir: Path, case_ids: list[str], progress: bool,
                             curves: bytes | None = None) -> schemas.Metrics:
    """Each case's class probabilities (with its age when the classifier takes it) against its true class
    from manifest.json → the classification report in ``out_dir`` (with the training ``curves``, a PNG, when given)."""
    from medseg.evaluation.classification import evaluate_classification

    if list(predictor.classes) != [name for name, _ in sorted(dataset.labels.items(), key=lambda kv: int(kv[1]))]:
        raise MedsegError(f"the classifier's classes {predictor.classes} are not the dataset's {dataset.labels}", dataset_dir / schemas.DATASET_JSON)
    records = {str(c["case_id"]): c for c in schemas.Manifest.load(dataset_dir).cases}
    missing = [c for c in case_ids if c not in records or records[c].get("class_label") is None]
    if missing:
        raise MedsegError(f"no class label in manifest.json for test case(s) {missing[:10]}", dataset_dir / schemas.MANIFEST_JSON)
    n_channels = len(dataset.channel_names)

    def cases():
        for case_id in tqdm(case_ids, desc="evaluate", disable=not progress):
            age = (records[case_id].get("covariates") or {}).get("age")
            if predictor.uses_age and age is None:
                raise MedsegError(f"case {case_id}: the classifier takes the age, which manifest.json does not give (covariates.age)", dataset_dir / schemas.MANIFEST_JSON)
            scores = predictor.predict_class_files(case_files(dataset_dir, case_id, n_channels), age=age)
            yield case_id, scores, records[case_id]["class_label"]

    out_dir.mkdir(parents=True, exist_ok=True)
    return evaluate_classification(cases(), dataset, out_dir, training_curves=curves)


def lesionwise_setting(dataset: schemas.DatasetJson) -> str | None:
    """The official lesion-wise setting of the dataset's task (:attr:`medseg.task.Task.lesionwise`), or None."""
    return Task.from_dataset(dataset).lesionwise
