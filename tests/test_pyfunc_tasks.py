"""The MLflow pyfunc model for every task: a classifier (with and without the age) answers ``label`` and
``prob_<CLASS>``, its signature and input example carry the ``age`` column when it takes it; a 2D slice-set
model answers volumes per reported group like any segmentation model. Saved and loaded back through MLflow."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medseg import schemas
from medseg.errors import MedsegError
from medseg.registry.pyfunc_model import (MODEL_PACKAGE_ARTIFACT, SegmentationPyfunc, input_example_from_dataset, model_signature)
from tests.factories import make_classifier_package, make_slice_package, slice_rgb, write_classifier_case, write_slice_stack

CLASSES = ["CN", "MCI", "AD"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pyfunc")
    return {"age": make_classifier_package(root / "cls-age", use_age=True), "plain": make_classifier_package(root / "cls", classes=("CN", "AD"), use_age=False),
            "slices": make_slice_package(root / "slices")}


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("subjects")
    return [write_classifier_case(root / f"s{k}", k=k, seed=k) for k in range(2)]


def _model(package: Path) -> SegmentationPyfunc:
    model = SegmentationPyfunc()
    model.load_context(SimpleNamespace(artifacts={MODEL_PACKAGE_ARTIFACT: str(package)}))
    return model


def _columns(schema) -> list[tuple[str, str, bool]]:
    return [(c.name, c.type.name, c.required) for c in schema.inputs]


def test_classifier_signature_has_the_age_when_the_network_takes_it(packages):
    with_age = model_signature(packages["age"])
    assert _columns(with_age) == [("image", "string", True), ("case_id", "string", False), ("age", "double", True)]
    assert [c.name for c in with_age.outputs.inputs] == ["case_id", "label", "prob_CN", "prob_MCI", "prob_AD"]
    without = model_signature(packages["plain"])
    assert [c[0] for c in _columns(without)] == ["image", "case_id"]
    assert [c.name for c in without.outputs.inputs] == ["case_id", "label", "prob_CN", "prob_AD"]
    slices = model_signature(packages["slices"])
    assert [c[0] for c in _columns(slices)] == ["pre_contrast", "flair", "post_contrast", "case_id", "output"]
    assert [c.name for c in slices.outputs.inputs] == ["case_id", "output", "abnormality_ml"]


def test_classifier_predicts_labels_and_probabilities(packages, subjects):
    model = _model(packages["age"])
    frame = pd.DataFrame([{"image": str(p), "age": a, "case_id": f"S{i}"} for i, (p, a) in enumerate(zip(subjects, (63.0, 79.5)))])
    out = model.predict(None, frame)
    assert list(out.columns) == ["case_id", "label", "prob_CN", "prob_MCI", "prob_AD"] and list(out["case_id"]) == ["S0", "S1"]
    probs = out[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert list(out["label"]) == [CLASSES[i] for i in probs.argmax(axis=1)]
    direct = model.predictor.predict_class_files([subjects[1]], 79.5)
    assert out.loc[1, "prob_AD"] == pytest.approx(direct["AD"], abs=1e-6)
    with pytest.raises(MedsegError, match="column 'age'"):
        model.predict(None, frame.drop(columns=["age"]))
    with pytest.raises(MedsegError, match="row 1: column 'age'"):
        model.predict(None, frame.assign(age=[60.0, math.nan]))
    plain = _model(packages["plain"]).predict(None, pd.DataFrame([{"image": str(subjects[0]), "age": 50.0}]))  # an age it does not take: ignored
    assert list(plain.columns) == ["label", "prob_CN", "prob_AD"]


def test_slice_model_predicts_volumes_and_writes_the_segmentation(packages, tmp_path):
    paths = write_slice_stack(tmp_path / "stack", slice_rgb(48, 40), n_slices=3)
    out = _model(packages["slices"]).predict(None, pd.DataFrame([{**{c: str(p) for c, p in zip(("pre_contrast", "flair", "post_contrast"), paths)},
                                                                   "output": str(tmp_path / "seg.nii.gz")}]))
    assert list(out.columns) == ["output", "abnormality_ml"] and out.loc[0, "abnormality_ml"] >= 0
    assert (tmp_path / "seg.nii.gz").is_file()


def _dataset(root: Path, subjects: list[Path], ages: dict[str, float]) -> Path:
    (root / schemas.IMAGES_TR).mkdir(parents=True)
    for case, path in zip(("S00", "S01"), subjects):
        shutil.copy(path, root / schemas.IMAGES_TR / f"{case}_0000.nii.gz")
    schemas.Splits(test=["S00", "S01"], folds=[{"train": [], "val": []}]).save(root)
    schemas.Manifest(dataset_name="d", source="s", source_format="classification",
                     cases=[{"case_id": c, "patient_id": c, "files": [], "class_label": "CN", "covariates": {"age": a}} for c, a in ages.items()]).save(root)
    return root


def test_input_example_carries_the_age_from_the_manifest(packages, subjects, tmp_path):
    dataset = _dataset(tmp_path / "dataset", subjects, {"S01": 74.0})  # S00 has no age: the example is S01's
    example = input_example_from_dataset(dataset, packages["age"])
    assert list(example.columns) == ["image", "case_id", "age"] and example.loc[0, "case_id"] == "S01" and example.loc[0, "age"] == 74.0
    plain = input_example_from_dataset(dataset, packages["plain"])
    assert list(plain.columns) == ["image", "case_id"] and plain.loc[0, "case_id"] == "S00"


def test_saved_and_loaded_through_mlflow(packages, subjects, tmp_path):
    """The classifier as MLflow saves it (signature enforced on load, the input example predicted while saving)."""
    import mlflow.pyfunc

    dataset = _dataset(tmp_path / "dataset", subjects, {"S00": 68.0, "S01": 74.0})
    example = input_example_from_dataset(dataset, packages["age"])
    mlflow.pyfunc.save_model(str(tmp_path / "mlmodel"), python_model=SegmentationPyfunc(), artifacts={MODEL_PACKAGE_ARTIFACT: str(packages["age"])},
                             signature=model_signature(packages["age"]), input_example=example, pip_requirements=["medseg-ops"])
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "mlmodel"))
    out = loaded.predict(pd.DataFrame([{"image": str(subjects[0]), "case_id": "S00", "age": 68.0}]))
    assert list(out.columns) == ["case_id", "label", "prob_CN", "prob_MCI", "prob_AD"] and out.loc[0, "label"] in CLASSES
    with pytest.raises(Exception, match="age"):  # MLflow's schema enforcement: the age is a required column
        loaded.predict(pd.DataFrame([{"image": str(subjects[0])}]))
