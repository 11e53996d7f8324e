"""The model package wrapped as an MLflow pyfunc model, so ``models:/NAME@champion`` loads it anywhere.

The MLflow model stores the package folder unchanged as the pyfunc artifact ``model_package``; the
wrapper rebuilds the network from ``model_package.json`` and loads ``weights.pt`` with
``weights_only=True`` (no pickled network, no torch.export "pt2" format). Layout of the logged model
(the folder ``mlflow.artifacts.download_artifacts("models:/NAME@champion")`` returns)::

    MLmodel, python_model.pkl, conda.yaml, python_env.yaml, requirements.txt
    artifacts/model_package/model_package.json   (+ weights.pt, plans.json, dataset.json)

Input: a pandas DataFrame, one row per case, one column per channel of the model (its ``dataset.json``
channel names, e.g. BraTS's four MR sequences) holding NIfTI file paths or the files themselves inline as
``data:`` URIs (base64 of a ``.nii.gz``/``.nii``), and an optional ``case_id`` column. The input example stored
with a logged model (:func:`synthetic_input_example`) is of the inline kind: one synthetic network window, a few
kB, valid wherever the model is loaded (a path would name a file of the run that logged it).
What else, and what comes out, follows the model's task (:class:`medseg.task.Task`):

- segmentation (3D volumes, and 2D slice sets as stacks): optional ``output`` (where to write the segmentation
  NIfTI); out come ``case_id`` / ``output`` when given and ``<GROUP>_ml`` (volume in millilitres) per reported group;
- classification: ``age`` (years, a float column: the signature says double, and MLflow refuses to convert an
  int64 column to it) when the classifier takes the subject's age; out come ``case_id`` when given, ``label``
  (the most probable class) and ``prob_<CLASS>`` per class.
"""

# No ``from __future__ import annotations``: MLflow reads predict's type hint at class creation.
import base64
import binascii
import math
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
AGE_COLUMN = "age"  # a classifier's covariate: the subject's age in years
LABEL_COLUMN = "label"  # a classifier's answer: the most probable class
#: The distribution (and its extra) a logged model needs to load; pinned to the installed version (:func:`model_requirements`).
DISTRIBUTION, SERVE_EXTRA, SERVE_TORCH_EXTRA = "medseg-ops", "serve", "serve-torch"
#: A channel given inline: ``data:[<media type>];base64,<the NIfTI file>``.
DATA_URI_PREFIX = "data:"
NIFTI_MEDIA_TYPE = "application/gzip"
_GZIP_MAGIC = b"\x1f\x8b"


def installed_version() -> str:
    """The installed ``medseg-ops`` version (the package's own version when running from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        import medseg

        return medseg.__version__


def model_requirements(model_dir: str | Path | None = None) -> list[str]:
    """``medseg-ops[serve]==<installed version>``: the code that wrote the model is the code that loads it (the
    pyfunc rebuilds the network from medseg's own classes); MLflow adds its own pin.

    ``[serve]`` runs a package's ``network.onnx`` without torch; a package without one (a network the export
    refuses, or the export switched off) needs torch, so it pins ``[serve-torch]``."""
    extra = SERVE_EXTRA
    if model_dir is not None:
        onnx = schemas.ModelPackage.load(model_dir).onnx or {}
        # a configuration ensemble runs torch-free when every member package carries its network.onnx
        if not (onnx.get("file") or onnx.get("members")):
            extra = SERVE_TORCH_EXTRA
    return [f"{DISTRIBUTION}[{extra}]=={installed_version()}"]


class SegmentationPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`medseg.inference.predictor.Predictor`, for every task (the name is kept: logged
    models refer to this class by it)."""

    def load_context(self, context: Any) -> None:
        from medseg.inference.predictor import Predictor

        self.predictor = Predictor.from_package(context.artifacts[MODEL_PACKAGE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        predictor = getattr(self, "predictor", None)
        if predictor is None:  # used directly, without mlflow.pyfunc.load_model
            self.load_context(context)
            predictor = self.predictor
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        channels = predictor.channels
        missing = [c for c in channels if c not in frame.columns]
        if missing:
            raise MedsegError(f"model input lacks column(s) {missing}: expected one NIfTI path (or data: URI) per channel ({', '.join(channels)})")
        classifier = predictor.output == "classes"
        if classifier and predictor.uses_age and AGE_COLUMN not in frame.columns:
            raise MedsegError(f"model input lacks the column {AGE_COLUMN!r}: this classifier takes each subject's age in years")
        rows = []
        with tempfile.TemporaryDirectory(prefix="medseg-pyfunc-in-") as inline_dir:
            for i, (_, rec) in enumerate(frame.iterrows()):
                given = [rec[c] for c in channels]
                for c, p in zip(channels, given):
                    if not isinstance(p, (str, Path)) or not str(p):
                        raise MedsegError(f"row {i}: column {c!r} must hold a NIfTI file path or a data: URI, got {p!r}")
                paths = [_inline_file(str(p), Path(inline_dir) / f"row{i}_{k}", i, c) if str(p).startswith(DATA_URI_PREFIX) else p
                         for k, (c, p) in enumerate(zip(channels, given))]
                rows.append(_predict_row(predictor, frame, rec, paths, classifier, i))
        return pd.DataFrame(rows)


def _predict_row(predictor: Any, frame: pd.DataFrame, rec: Any, paths: list[Any], classifier: bool, i: int) -> dict[str, Any]:
    """The output row of one input row whose channels are files (``paths``)."""
    from medseg.io import save_nifti

    row: dict[str, Any] = {}
    if CASE_ID_COLUMN in frame.columns and _given(rec[CASE_ID_COLUMN]):
        row[CASE_ID_COLUMN] = str(rec[CASE_ID_COLUMN])
    if classifier:
        row.update(_classify(predictor, [str(p) for p in paths], rec, i))
        return row
    pred = predictor.predict_files([str(p) for p in paths])
    if OUTPUT_COLUMN in frame.columns and _given(rec[OUTPUT_COLUMN]):
        out = Path(str(rec[OUTPUT_COLUMN]))
        save_nifti(out, pred.segmentation.astype("uint8"), pred.affine)
        row[OUTPUT_COLUMN] = str(out)
    row.update({f"{name}_ml": float(v) for name, v in pred.volumes_ml.items()})
    return row


def _inline_file(uri: str, stem: Path, row: int, column: str) -> Path:
    """Write a channel given as ``data:...;base64,<NIfTI>`` to ``stem`` + ``.nii.gz``/``.nii`` (by its magic bytes)."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.endswith(";base64"):
        raise MedsegError(f"row {row}: column {column!r}: a data: URI must be base64 (data:[<media type>];base64,<NIfTI bytes>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MedsegError(f"row {row}: column {column!r}: the data: URI is not valid base64") from None
    path = stem.with_name(stem.name + (".nii.gz" if data[:2] == _GZIP_MAGIC else ".nii"))
    path.write_bytes(data)
    return path


def _classify(predictor: Any, paths: list[str], rec: Any, i: int) -> dict[str, Any]:
    """``label`` and ``prob_<CLASS>`` of one row (with its ``age`` when the classifier takes it)."""
    from medseg.inference.batch import PROB_PREFIX

    age = None
    if predictor.uses_age:
        value = rec[AGE_COLUMN]
        try:
            age = float(value)
        except (TypeError, ValueError):
            age = float("nan")
        if not math.isfinite(age):
            raise MedsegError(f"row {i}: column {AGE_COLUMN!r} must hold the subject's age in years, got {value!r}")
    probs = predictor.predict_class_files(paths, age)
    return {LABEL_COLUMN: max(probs, key=probs.__getitem__), **{f"{PROB_PREFIX}{name}": float(p) for name, p in probs.items()}}


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value) and str(value) != ""


def region_names(model_dir: str | Path) -> list[str]:
    """The names volumes are reported for: the task's reported groups (none for a classifier)."""
    from medseg.task import Task

    return list(Task.from_folder(model_dir).reported_groups)


def _package_task(model_dir: str | Path) -> tuple[Any, list[str], list[str], bool]:
    """``(task, channels, classes, takes the age)`` of a model package, from its JSON files (no network is built)."""
    from medseg.task import Task

    task = Task.from_folder(model_dir)
    network = schemas.ModelPackage.load(model_dir).network
    classifier = str(network.get("output") or "labels") == "classes"
    classes = [str(c) for c in network.get("classes") or task.classes] if classifier else []
    uses_age = classifier and bool((network.get("options") or {}).get("use_age"))
    return task, list(schemas.Plans.load(model_dir).channel_names), classes, uses_age


def model_signature(model_dir: str | Path) -> Any:
    """Input: channel path columns (string, required), ``case_id`` (string, optional) and, by task, ``output``
    (string, optional; segmentation) or ``age`` (double, required; a classifier taking the age).
    Output: ``case_id`` (string, optional) and ``output`` (string, optional) + ``<GROUP>_ml`` (double) for
    segmentation; ``label`` (string) + ``prob_<CLASS>`` (double) for classification."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from medseg.inference.batch import PROB_PREFIX

    task, channels, classes, uses_age = _package_task(model_dir)
    inputs = [ColSpec("string", c) for c in channels]
    inputs.append(ColSpec("string", CASE_ID_COLUMN, required=False))
    outputs = [ColSpec("string", CASE_ID_COLUMN, required=False)]
    if classes:
        if uses_age:
            inputs.append(ColSpec("double", AGE_COLUMN))
        outputs += [ColSpec("string", LABEL_COLUMN)] + [ColSpec("double", f"{PROB_PREFIX}{c}") for c in classes]
    else:
        inputs.append(ColSpec("string", OUTPUT_COLUMN, required=False))
        outputs.append(ColSpec("string", OUTPUT_COLUMN, required=False))
        outputs += [ColSpec("double", f"{r}_ml") for r in task.reported_groups]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


#: The synthetic example's case id and, for a classifier taking it, age.
SYNTHETIC_CASE_ID, SYNTHETIC_AGE = "synthetic-window", 60.0


def _nifti_data_uri(array: Any, spacing: list[float]) -> str:
    """``array`` as a gzipped NIfTI (spacing on the affine's diagonal) in a ``data:`` URI; deterministic bytes."""
    import gzip

    import nibabel as nib
    import numpy as np

    image = nib.Nifti1Image(np.asarray(array), np.diag([*map(float, spacing), 1.0]))
    data = gzip.compress(image.to_bytes(), compresslevel=9, mtime=0)  # mtime 0: the same example every time
    return f"{DATA_URI_PREFIX}{NIFTI_MEDIA_TYPE};base64,{base64.b64encode(data).decode('ascii')}"


def synthetic_input_example(model_dir: str | Path) -> pd.DataFrame:
    """A one-row input example that needs no file: every channel inline (a ``data:`` URI) holding one network
    window at the plan's spacing (one slice for a 2D configuration), a bright ball on a dim background (uint8:
    a few kB gzipped), ``case_id`` and, for a classifier taking it, ``age``. Stored with the logged model, it is
    valid wherever the model is loaded, and MLflow predicts it once while logging (a smoke test of the model)."""
    import numpy as np

    from medseg.inference.package import network_patch_size

    model_dir = Path(model_dir)
    _, channels, _, uses_age = _package_task(model_dir)
    package, plans = schemas.ModelPackage.load(model_dir), schemas.Plans.load(model_dir)
    config = plans.configuration(package.configuration)
    shape, spacing = [int(p) for p in network_patch_size(package, plans)], [float(v) for v in config.spacing]
    if len(shape) == 2:  # a 2D network: one slice along the slice axis
        axis = next((int(a) for a in (package.network.get("slice_axis"), getattr(config, "slice_axis", None),
                                      schemas.DatasetJson.load(model_dir).slice_axis) if a is not None), 2)
        shape.insert(axis, 1)
        if len(spacing) == 2:
            spacing.insert(axis, 1.0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij"))
    # nonzero everywhere: preprocessing crops to the nonzero box and must keep the whole window
    volume = np.where((grid**2).sum(0) < 0.4, 200, 20).astype(np.uint8)
    uri = _nifti_data_uri(volume, spacing)
    row: dict[str, Any] = {**{c: uri for c in channels}, CASE_ID_COLUMN: SYNTHETIC_CASE_ID}
    if uses_age:
        row[AGE_COLUMN] = SYNTHETIC_AGE
    return pd.DataFrame([row])


def input_example_from_dataset(dataset_dir: str | Path, model_dir: str | Path) -> Any:
    """A one-row input example (DataFrame: one image path per channel, ``case_id``, and ``age`` for a classifier
    taking it, from the dataset's ``manifest.json`` ``cases[].covariates.age``) from a case of a canonical dataset:
    the first held-out test case, else the first validation case, that has every file (and its age when needed);
    None when it has none.

    Its paths name files of this machine: for a local check of a model on real data. The example stored with a
    logged model is :func:`synthetic_input_example` (valid wherever the model is loaded).
    """
    dataset_dir = Path(dataset_dir)
    _, channels, _, uses_age = _package_task(model_dir)
    candidates: list[str] = []
    if (dataset_dir / schemas.SPLITS_JSON).is_file():
        splits = schemas.Splits.load(dataset_dir)
        candidates += list(splits.test) + [c for f in splits.folds[:1] for c in f["val"]]
    ages: dict[str, float] = {}
    if uses_age and (dataset_dir / schemas.MANIFEST_JSON).is_file():
        for case in schemas.Manifest.load(dataset_dir).cases:
            age = (case.get("covariates") or {}).get(AGE_COLUMN)
            if isinstance(age, (int, float)) and not isinstance(age, bool) and math.isfinite(float(age)):
                ages[str(case["case_id"])] = float(age)
    for case_id in candidates:
        files = [dataset_dir / schemas.IMAGES_TR / f"{case_id}_{i:04d}.nii.gz" for i in range(len(channels))]
        if not all(f.is_file() for f in files) or (uses_age and case_id not in ages):
            continue
        row: dict[str, Any] = {**{c: str(f) for c, f in zip(channels, files)}, CASE_ID_COLUMN: case_id}
        if uses_age:
            row[AGE_COLUMN] = ages[case_id]
        return pd.DataFrame([row])
    return None


def log_model_package(model_dir: Path, artifact_path: str = "model", input_example: Any = None, pip_requirements: list[str] | None = None) -> Any:
    """Log the package folder as a pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    ``artifact_path`` is passed as MLflow 3's ``name=``. The folder is copied under the fixed name
    ``model_package`` first, so the layout inside the MLflow model does not depend on the source
    folder's name. No requirement inference (it would import and probe packages): ``pip_requirements``
    defaults to :func:`model_requirements` (``medseg-ops[serve]==<installed version>``). An ``input_example``
    (:func:`synthetic_input_example`) makes MLflow run a prediction while logging.
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
            pip_requirements=list(pip_requirements or model_requirements(model_dir)),
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
