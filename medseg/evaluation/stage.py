"""The evaluate stage: predict the held-out test cases with a model package and score them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg import schemas
from medseg.errors import MedsegError
from medseg.evaluation.report import evaluate_arrays
from medseg.inference.predictor import Predictor
from medseg.io import load_nifti, nifti_spacing, save_nifti
from medseg.preprocessing.fingerprint import case_files, label_file
from medseg.visualize import overlay_png


def run_evaluate(model_dir: Path, dataset_dir: Path, out_dir: Path, predictions_dir: Path | None = None, case_ids: list[str] | None = None, overlap: float = 0.5, mirror: bool = False, progress: bool = True) -> schemas.Metrics:
    """Predict ``case_ids`` (default: the held-out test split), write NIfTI predictions in the original
    geometry to ``predictions_dir`` and the metrics/report to ``out_dir``."""
    model_dir, dataset_dir, out_dir = Path(model_dir), Path(dataset_dir), Path(out_dir)
    predictor = Predictor.from_package(model_dir, overlap=overlap, mirror=mirror)
    dataset = schemas.DatasetJson.load(dataset_dir)
    case_ids = case_ids if case_ids is not None else schemas.Splits.load(dataset_dir).test
    if not case_ids:
        raise MedsegError("no test cases to evaluate (splits.json has an empty test list)", dataset_dir / schemas.SPLITS_JSON)
    predictions_dir = Path(predictions_dir) if predictions_dir else out_dir / "predictions"
    n_channels = len(dataset.channel_names)

    def pairs():
        for i, case_id in enumerate(tqdm(case_ids, desc="evaluate", disable=not progress)):
            images = case_files(dataset_dir, case_id, n_channels)
            prediction = predictor.predict_files(images)
            ref, _, hdr = load_nifti(label_file(dataset_dir, case_id), dtype=np.float32)
            save_nifti(predictions_dir / f"{case_id}.nii.gz", prediction.segmentation, prediction.affine, prediction.header)
            if i == 0:  # one picture for the report
                flair, _, _ = load_nifti(images[-1])
                overlay_png(flair, prediction.segmentation, out_dir / "example_overlay.png", reference=np.rint(ref).astype(np.uint8), title=case_id)
            yield case_id, prediction.segmentation, np.rint(ref).astype(np.uint8), nifti_spacing(hdr)

    out_dir.mkdir(parents=True, exist_ok=True)
    return evaluate_arrays(pairs(), dataset, out_dir, total=len(case_ids), lesionwise=lesionwise_setting(dataset))


def lesionwise_setting(dataset: schemas.DatasetJson) -> str | None:
    """The BraTS lesion-wise setting matching the dataset's labels, or None for other datasets."""
    labels = {k: int(v) for k, v in dataset.labels.items()}
    if labels == schemas.BRATS_LABELS and {k: sorted(v) for k, v in dataset.regions.items()} == schemas.BRATS_REGIONS:
        return "brats2023"
    return None
