"""The model package wrapped as an MLflow pyfunc model, so ``models:/NAME@champion`` loads it anywhere.

The MLflow model stores the package folder unchanged as the pyfunc artifact ``model_package``; the
wrapper rebuilds the network from ``model_package.json`` and loads ``weights.pt`` with
``weights_only=True`` (no pickled network, no torch.export "pt2" format). Layout of the logged model
(the folder ``mlflow.artifacts.download_artifacts("models:/NAME@champion")`` returns)::

    MLmodel, python_model.pkl, conda.yaml, python_env.yaml, requirements.txt
    artifacts/model_package/model_package.json   (+ weights.pt, plans.json, dataset.json)

Input: a pandas DataFrame, one row per case, one column per channel (``t1n``, ``t1c``, ``t2w``,
``t2f``) holding NIfTI file paths; optional ``output`` (where to write the segmentation NIfTI) and
``case_id`` columns. Output: a DataFrame with ``case_id`` / ``output`` when given and ``<REGION>_ml``
(volume in millilitres) per region.
"""

# No ``from __future__ import annotations``: MLflow reads predict's type hint at class creation.
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from medseg import schemas
from medseg.errors import MedsegError

MODEL_PACKAGE_ARTIFACT = "model_package"
#: Where model_package.json lies inside a downloaded MLflow model folder.
PACKAGE_SUBDIR = f"artifacts/{MODEL_PACKAGE_ARTIFACT}"
OUTPUT_COLUMN = "output"
CASE_ID_COLUMN = "case_id"
DEFAULT_PIP_REQUIREMENTS = ("medseg-ops",)


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`medseg.inference.predictor.Predictor`."""

    def load_context(self, context: Any) -> None:
        from medseg.inference.predictor import Predictor

        self.predictor = Predictor.from_package(context.artifacts[MODEL_PACKAGE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from medseg.io import save_nifti

        predictor = getattr(self, "predictor", None)
        if predictor is None:  # used directly, without mlflow.pyfunc.load_model
            self.load_context(context)
            predictor = self.predictor
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        channels = predictor.channels
        missing = [c for c in channels if c not in frame.columns]
        if missing:
            raise MedsegError(f"model input lacks column(s) {missing}: expected one NIfTI path per channel ({', '.join(channels)})")
        rows = []
        for i, (_, rec) in enumerate(frame.iterrows()):
            paths = [rec[c] for c in channels]
            for c, p in zip(channels, paths):
                if not isinstance(p, (str, Path)) or not str(p):
                    raise MedsegError(f"row {i}: column {c!r} must hold a NIfTI file path, got {p!r}")
            pred = predictor.predict_files([str(p) for p in paths])
            row: dict[str, Any] = {}
            if CASE_ID_COLUMN in frame.columns and _given(rec[CASE_ID_COLUMN]):
                row[CASE_ID_COLUMN] = str(rec[CASE_ID_COLUMN])
            if OUTPUT_COLUMN in frame.columns and _given(rec[OUTPUT_COLUMN]):
                out = Path(str(rec[OUTPUT_COLUMN]))
                save_nifti(out, pred.segmentation.astype("uint8"), pred.affine)
                row[OUTPUT_COLUMN] = str(out)
            row.update({f"{name}_ml": float(v) for name, v in pred.volumes_ml.items()})
            rows.append(row)
        return pd.DataFrame(rows)


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value) and str(value) != ""


def region_names(model_dir: str | Path) -> list[str]:
    """The names volumes are reported for: the plan's regions, else its non-background labels."""
    plans = schemas.Plans.load(model_dir)
    from medseg.task import Task

    return list(Task.from_folder(model_dir).reported_groups)


def model_signature(model_dir: str | Path) -> Any:
    """Input: channel path columns (string, required), ``case_id``/``output`` (string, optional).
    Output: ``case_id``/``output`` (string, optional) and ``<REGION>_ml`` (double)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    plans = schemas.Plans.load(model_dir)
    inputs = [ColSpec("string", c) for c in plans.channel_names]
    inputs += [ColSpec("string", CASE_ID_COLUMN, required=False), ColSpec("string", OUTPUT_COLUMN, required=False)]
    outputs = [ColSpec("string", CASE_ID_COLUMN, required=False), ColSpec("string", OUTPUT_COLUMN, required=False)]
    outputs += [ColSpec("double", f"{r}_ml") for r in region_names(model_dir)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example_from_dataset(dataset_dir: str | Path, model_dir: str | Path) -> Any:
    """A one-row input example (DataFrame: one image path per channel, and ``case_id``) from a case of a
    canonical dataset: the first held-out test case, else the first training case; None when it has none.

    MLflow stores it beside the model and runs one prediction on it while logging (a smoke test of the
    logged model); the paths document the input format, they need not exist where the model is used.
    """
    dataset_dir = Path(dataset_dir)
    channels = list(schemas.Plans.load(model_dir).channel_names)
    candidates: list[str] = []
    if (dataset_dir / schemas.SPLITS_JSON).is_file():
        splits = schemas.Splits.load(dataset_dir)
        candidates += list(splits.test) + [c for f in splits.folds[:1] for c in f["val"]]
    for case_id in candidates:
        files = [dataset_dir / schemas.IMAGES_TR / f"{case_id}_{i:04d}.nii.gz" for i in range(len(channels))]
        if all(f.is_file() for f in files):
            return pd.DataFrame([{**{c: str(f) for c, f in zip(channels, files)}, CASE_ID_COLUMN: case_id}])
    return None


def log_model_package(model_dir: Path, artifact_path: str = "model", input_example: Any = None, pip_requirements: list[str] | None = None) -> Any:
    """Log the package folder as a pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    ``artifact_path`` is passed as MLflow 3's ``name=``. The folder is copied under the fixed name
    ``model_package`` first, so the layout inside the MLflow model does not depend on the source
    folder's name. No requirement inference (it would import and probe packages): ``pip_requirements``
    defaults to ``["medseg-ops"]``. An ``input_example`` (DataFrame of existing files) makes MLflow
    run a prediction while logging; leave it ``None`` in pipelines.
    """
    model_dir = Path(model_dir)
    if not (model_dir / schemas.MODEL_PACKAGE_JSON).is_file():
        raise MedsegError(f"not a model package (no {schemas.MODEL_PACKAGE_JSON})", model_dir)
    with tempfile.TemporaryDirectory(prefix="medseg-pyfunc-") as tmp:
        staged = Path(tmp) / MODEL_PACKAGE_ARTIFACT
        shutil.copytree(model_dir, staged)
        return mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=SegmentationPyfunc(),
            artifacts={MODEL_PACKAGE_ARTIFACT: str(staged)},
            signature=model_signature(model_dir),
            input_example=input_example,
            pip_requirements=list(pip_requirements or DEFAULT_PIP_REQUIREMENTS),
        )


def package_dir_of(mlflow_model_dir: str | Path) -> Path:
    """The model package folder inside a downloaded MLflow model folder.

    Reads ``MLmodel`` (``flavors.python_function.artifacts.model_package.path``) so it also finds
    packages logged by other code under another folder name; falls back to :data:`PACKAGE_SUBDIR`.
    """
    import yaml

    root = Path(mlflow_model_dir)
    candidates = []
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        artifacts = ((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
        rel = (artifacts.get(MODEL_PACKAGE_ARTIFACT) or {}).get("path")
        if rel:
            candidates.append(root / rel)
    candidates += [root / PACKAGE_SUBDIR, root]
    for path in candidates:
        if (path / schemas.MODEL_PACKAGE_JSON).is_file():
            return path
    raise MedsegError(f"no {schemas.MODEL_PACKAGE_JSON} in this MLflow model (looked in {', '.join(str(c) for c in candidates)})", root)
