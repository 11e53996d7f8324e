"""The case identity the gate pairs by, from ingest through evaluation: every per-case entry of metrics.json
carries the case's ``case_key`` from manifest.json (segmentation and classification alike)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg import schemas
from medseg.evaluation.stage import add_case_keys, case_keys


def test_segmentation_evaluation_writes_the_case_keys(tmp_path: Path) -> None:
    from medseg.evaluation.stage import run_evaluate
    from medseg.ingest import ingest
    from tests.factories import make_model_package
    from tests.test_ingest import write_case

    src = tmp_path / "src"
    for p in range(5):
        write_case(src, f"BraTS-GLI-{p:05d}-000", seed=p)
    manifest = ingest(src, tmp_path / "dataset", progress=False, pseudonymize=True, test_fraction=0.4)
    metrics = run_evaluate(make_model_package(tmp_path / "model"), tmp_path / "dataset", tmp_path / "eval", progress=False)
    keys = {c["case_id"]: c["case_key"] for c in manifest.cases}
    written = json.loads((tmp_path / "eval" / schemas.METRICS_JSON).read_text())
    assert written["per_case"] == metrics.per_case and len(metrics.per_case) == len(schemas.Splits.load(tmp_path / "dataset").test) >= 1
    for entry in written["per_case"]:
        assert list(entry)[:2] == ["case_id", "case_key"] and entry["case_key"] == keys[entry["case_id"]] and len(entry["case_key"]) == 64
        assert isinstance(entry["WT"]["dice"], float)  # the metrics themselves are untouched
    assert (tmp_path / "eval" / schemas.PREDICTIONS_DIR).is_dir() and (tmp_path / "eval" / schemas.EXAMPLE_OVERLAY_PNG).is_file()


def test_add_case_keys_for_a_classifier_and_for_old_manifests(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    cases = [{"case_id": "sub-1", "patient_id": "sub-1", "files": [], "case_key": "k1", "class_label": "AD"},
             {"case_id": "sub-2", "patient_id": "sub-2", "files": [], "class_label": "CN"}]  # ingested before keys existed
    schemas.Manifest(dataset_name="d", source="s", source_format="classification", cases=cases).save(dataset)
    assert case_keys(dataset) == {"sub-1": "k1", "sub-2": ""}
    per_case = [{"case_id": "sub-1", "all": {"prob_CN": 0.2, "prob_AD": 0.8, "pred": 1, "true": 1, "log_loss": float(-np.log(0.8))}},
                {"case_id": "sub-2", "all": {"prob_CN": 0.6, "prob_AD": 0.4, "pred": 0, "true": 0, "log_loss": float(-np.log(0.6))}},
                {"case_id": "sub-3", "all": {"prob_CN": 0.5, "prob_AD": 0.5, "pred": 0, "true": 0, "log_loss": float(np.log(2))}}]
    metrics = schemas.Metrics(n_cases=3, mean={"all": {"accuracy": 1.0}}, per_case=per_case)
    out = add_case_keys(metrics, dataset, tmp_path / "eval")
    assert [e["case_key"] for e in out.per_case] == ["k1", "", ""]  # absent from the manifest: ""
    assert out.per_case[0]["all"]["log_loss"] == float(-np.log(0.8))
    assert schemas.Metrics.load(tmp_path / "eval").per_case == out.per_case
    assert case_keys(tmp_path / "no-dataset") == {}
