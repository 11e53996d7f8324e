"""Evaluation report: folder pairing, the four output files, clear errors, the CLI entry."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from medseg import io
from medseg.errors import MedsegError
from medseg.evaluation.metrics import evaluate_case
from medseg.evaluation.report import (
    CASES_CSV,
    DICE_BOXPLOT_PNG,
    REPORT_HTML,
    REPORT_MD,
    add_arguments,
    evaluate_arrays,
    evaluate_folder,
    markdown_table,
    run,
)
from medseg.schemas import METRICS_JSON, PER_CASE_CSV, DatasetJson, Metrics
from medseg.task import BRATS2023
BRATS_LABELS, BRATS_REGIONS = BRATS2023.labels_dict(), BRATS2023.regions_dict()

SPACING = (1.0, 1.0, 2.0)
AFFINE = np.diag([*SPACING, 1.0])
CASES = ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000"]
OUTPUTS = (METRICS_JSON, PER_CASE_CSV, CASES_CSV, REPORT_MD, REPORT_HTML, DICE_BOXPLOT_PNG)
VOXEL_METRICS = ["dice", "iou", "hd95", "assd", "sensitivity", "specificity", "volume_pred_ml", "volume_ref_ml"]
INSTANCE_METRICS = ["sq_dsc", "sq_hd95", "pq_dsc", "tp", "fp", "fn"]


def _dataset_json() -> DatasetJson:
    return DatasetJson(
        name="Dataset001_BraTS",
        channel_names={"0": "t1n", "1": "t1c", "2": "t2w", "3": "t2f"},
        labels=dict(BRATS_LABELS),
        numTraining=len(CASES),
        regions={k: list(v) for k, v in BRATS_REGIONS.items()},
    )


def _label(shift: int) -> np.ndarray:
    lab = np.zeros((20, 20, 12), np.uint8)
    lab[4 + shift : 15 + shift, 4:15, 2:10] = 2
    lab[7 + shift : 12 + shift, 7:12, 4:8] = 3
    lab[8 + shift : 10 + shift, 8:10, 5:7] = 1
    return lab


@pytest.fixture()
def folders(tmp_path):
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labelsTs"
    for i, case in enumerate(CASES):
        io.save_nifti(label_dir / f"{case}.nii.gz", _label(0), AFFINE)
        io.save_nifti(pred_dir / f"{case}.nii.gz", _label(i), AFFINE)  # case i shifted by i voxels
    return pred_dir, label_dir


def test_evaluate_folder_writes_all_files(folders, tmp_path):
    pred_dir, label_dir = folders
    out = tmp_path / "report"
    metrics = evaluate_folder(pred_dir, label_dir, _dataset_json(), out, progress=False)

    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    loaded = Metrics.load(out)
    assert loaded.n_cases == 3 == metrics.n_cases
    assert [c["case_id"] for c in loaded.per_case] == CASES
    assert list(loaded.mean) == ["WT", "TC", "ET", "NETC", "SNFH"]
    assert loaded.per_case[0]["WT"]["dice"] == 1.0  # case 0 is not shifted
    assert loaded.per_case[1]["WT"]["hd95"] == pytest.approx(1.0)  # shifted 1 voxel along the 1 mm axis
    assert loaded.mean["WT"]["dice_median"] == loaded.per_case[1]["WT"]["dice"]
    # what was written equals evaluate_case on the arrays, with the spacing from the label header
    direct = evaluate_case(_label(2), _label(0), SPACING, BRATS_LABELS, BRATS_REGIONS)
    # the folder evaluation adds the lesion-wise numbers (BraTS labels); the voxel ones equal evaluate_case's
    assert {k: loaded.per_case[2]["TC"][k] for k in direct["TC"]} == pytest.approx(direct["TC"])
    assert "lesionwise_dice_2023" in loaded.per_case[2]["TC"]
    assert direct["TC"]["volume_ref_ml"] == pytest.approx(5 * 5 * 4 * 2 / 1000)

    with open(out / PER_CASE_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and [r["case_id"] for r in rows] == CASES
    header = list(rows[0])
    assert header[0] == "case_id" and header[1] == "WT_dice" and "SNFH_volume_ref_ml" in header
    assert float(rows[1]["WT_dice"]) == loaded.per_case[1]["WT"]["dice"]  # full precision

    report = (out / REPORT_MD).read_text()
    assert markdown_table(loaded) in report
    assert "| Structure | Dice" in report and "| WT |" in report and "| NETC |" in report
    assert f"| {CASES[0]} | 1.000 | 1.000 | 1.000 |" in report  # per-case Dice, regions only
    assert f"]({DICE_BOXPLOT_PNG})" in report
    assert (out / DICE_BOXPLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_rows_regions_then_labels(folders, tmp_path):
    metrics = evaluate_folder(*folders, _dataset_json(), tmp_path / "r", progress=False)
    lines = markdown_table(metrics).splitlines()
    assert lines[0].startswith("| Structure | Dice (mean / median) | IoU | HD95 mm")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["WT", "TC", "ET", "NETC", "SNFH"]


def test_missing_prediction_names_the_file(folders, tmp_path):
    pred_dir, label_dir = folders
    (pred_dir / f"{CASES[1]}.nii.gz").unlink()
    with pytest.raises(MedsegError, match=f"{CASES[1]}.nii.gz") as exc:
        evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "r", progress=False)
    assert "prediction file not found" in str(exc.value)
    assert not (tmp_path / "r").exists()
    # a case list naming a case without a label file
    with pytest.raises(MedsegError, match="BraTS-GLI-99999-000.nii.gz"):
        evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "r", case_ids=["BraTS-GLI-99999-000"])


def test_geometry_mismatch_names_the_prediction(folders, tmp_path):
    pred_dir, label_dir = folders
    bad = pred_dir / f"{CASES[0]}.nii.gz"
    io.save_nifti(bad, np.zeros((20, 20, 11), np.uint8), AFFINE)
    with pytest.raises(MedsegError, match="shape") as exc:
        evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "r", progress=False)
    assert exc.value.path == str(bad)
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    io.save_nifti(bad, _label(0), shifted)
    with pytest.raises(MedsegError, match="affine") as exc:
        evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "r", progress=False)
    assert exc.value.path == str(bad)


def test_case_subset_and_extra_predictions(folders, tmp_path, capsys):
    pred_dir, label_dir = folders
    metrics = evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "a", case_ids=CASES[1:], progress=False)
    assert metrics.n_cases == 2
    (label_dir / f"{CASES[2]}.nii.gz").unlink()  # a prediction without a label: ignored, with a note
    metrics = evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "b", progress=False)
    assert metrics.n_cases == 2
    assert CASES[2] in capsys.readouterr().err


def test_evaluate_arrays_in_memory(tmp_path):
    pairs = ((f"c{i}", _label(i % 2), _label(0), SPACING) for i in range(4))  # a generator is fine
    metrics = evaluate_arrays(pairs, _dataset_json(), tmp_path)
    assert metrics.n_cases == 4
    assert metrics.mean["WT"]["dice"] == pytest.approx((1.0 + metrics.per_case[1]["WT"]["dice"]) / 2)
    assert json.loads((tmp_path / METRICS_JSON).read_text())["n_cases"] == 4
    with pytest.raises(MedsegError, match="case c1: .*shape"):
        evaluate_arrays([("c0", _label(0), _label(0), SPACING), ("c1", _label(0)[:-1], _label(0), SPACING)],
                        _dataset_json(), tmp_path / "x")
    with pytest.raises(MedsegError, match="no cases"):
        evaluate_arrays([], _dataset_json(), tmp_path / "y")


def test_cli_run_prints_mean_dice(folders, tmp_path, capsys):
    pred_dir, label_dir = folders
    ds = tmp_path / "dataset.json"
    _dataset_json().save(ds)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["--pred", str(pred_dir), "--labels", str(label_dir), "--dataset-json", str(ds), "--out", str(out), "--no-progress"]
    )
    assert run(args) == 0
    printed = capsys.readouterr().out
    wt = Metrics.load(out).mean["WT"]["dice"]
    assert f"WT     {wt:.4f}" in printed and "TC" in printed and "ET" in printed
    assert all((out / name).is_file() for name in OUTPUTS)


def test_cases_csv_metric_names_are_the_published_ones(tmp_path):
    pairs = [(c, _label(i), _label(0), SPACING) for i, c in enumerate(CASES)]
    metrics = evaluate_arrays(pairs, _dataset_json(), tmp_path, lesionwise="brats2023")
    with open(tmp_path / CASES_CSV, newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["case", "region", "metric", "value"]
        rows = list(reader)
    lesion = [f"{m}_2023" for m in ("lesionwise_dice", "lesionwise_hd95", "lesion_tp", "lesion_fp", "lesion_fn")]
    by_region: dict[str, list[str]] = {}
    for case, region, metric, value in rows:
        if case == CASES[0]:
            by_region.setdefault(region, []).append(metric)
        assert float(value) == float(value)  # no NaN
    assert list(by_region) == ["WT", "TC", "ET", "NETC", "SNFH"]
    for region in ("WT", "TC", "ET"):
        assert by_region[region] == VOXEL_METRICS + lesion + INSTANCE_METRICS
    for region in ("NETC", "SNFH"):
        assert by_region[region] == VOXEL_METRICS + INSTANCE_METRICS
    assert len(rows) == sum(len(v) for v in by_region.values()) * len(CASES)
    # metrics.json carries the same names, with the spread of each
    wt = Metrics.load(tmp_path).mean["WT"]
    assert {"volume_pred_ml", "volume_ref_ml", "pq_dsc", "pq_dsc_std", "lesionwise_dice_2023_q75"} <= set(wt)
    assert "pred_volume_ml" not in wt and "ref_volume_ml" not in wt
    report = (tmp_path / REPORT_MD).read_text()
    assert "## Lesion-wise and instance-wise" in report and "| WT |" in report.split("## Lesion-wise")[1]
    assert metrics.mean["WT"]["tp"] == 1.0


def test_brats_style_file_names_matched_by_case_id_with_lesionwise_numbers(tmp_path):
    # predictions as <CASE>.nii.gz, labels as the BraTS release names them: <CASE>-seg.nii.gz
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    for i, case in enumerate(CASES):
        io.save_nifti(label_dir / f"{case}-seg.nii.gz", _label(0), AFFINE)
        io.save_nifti(pred_dir / f"{case}.nii.gz", _label(i), AFFINE)
    plain = tmp_path / "plain"
    for case in CASES:  # the same labels under nnU-Net names give the same numbers
        io.save_nifti(plain / f"{case}.nii.gz", _label(0), AFFINE)
    brats = evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "brats", progress=False)
    nnunet = evaluate_folder(pred_dir, plain, _dataset_json(), tmp_path / "nnunet", progress=False, lesionwise=None)
    assert brats.n_cases == nnunet.n_cases == 3
    assert brats.mean["WT"]["dice"] == nnunet.mean["WT"]["dice"]
    assert "lesionwise_dice_2023" in brats.mean["ET"] and "lesionwise_dice_2023" not in nnunet.mean["ET"]  # auto: BraTS labels
    io.save_nifti(label_dir / f"{CASES[0]}.nii.gz", _label(0), AFFINE)  # the same case named both ways
    with pytest.raises(MedsegError, match="two files"):
        evaluate_folder(pred_dir, label_dir, _dataset_json(), tmp_path / "both", progress=False)
