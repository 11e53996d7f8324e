"""Choosing the configuration by cross-validation (medseg/training/model_selection.py) and the configuration-ensemble
package and predictor (medseg/inference/configuration_ensemble.py).

Real tiny data: 6 synthetic 32³ BraTS-like cases (2 folds), preprocessed for 3d_fullres and 2d, each trained for a
few steps on both folds; out-of-fold predictions are made from the ingested NIfTI files.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.inference.configuration_ensemble import ConfigurationEnsemblePredictor
from medseg.inference.predictor import Predictor, grid_labels
from medseg.io import load_nifti
from medseg.preprocessing.fingerprint import case_files, label_file, load_case
from medseg.preprocessing.preprocess import run_preprocessing
from medseg.task import Task
from medseg.training import model_selection as sel
from medseg.training.stage import build_selected_model, training_units
from medseg.training.trainer import TrainConfig, train
from tests.test_preprocessing import build_tiny_dataset

CONFIG = dict(epochs=1, iterations_per_epoch=2, max_val_cases=1, device="cpu", seed=3, num_threads=1)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both configurations trained on both folds: {"dataset", "pre", "folds": {configuration: [fold packages]}}."""
    tiny = build_tiny_dataset(tmp_path_factory)
    root = tmp_path_factory.mktemp("selection")
    pre = root / "pre"
    run_preprocessing(tiny["dataset"], pre, budget="cpu", workers=1, progress=False, configuration="3d_fullres", candidates="2d,3d_fullres")
    folds: dict[str, list[Path]] = {}
    for configuration in ("3d_fullres", "2d"):
        for fold in (0, 1):
            result = train(pre, root / configuration / f"fold_{fold}", TrainConfig(**{**CONFIG, "configuration": configuration, "fold": fold}), progress=False)
            folds.setdefault(configuration, []).append(result.model_dir)
    return {"dataset": tiny["dataset"], "pre": pre, "folds": folds, "tiny_pre": tiny["pre"]}


def _case(dataset: Path, case_id: str):
    images, _, affine, spacing = load_case(dataset, case_id, len(schemas.DatasetJson.load(dataset).channel_names))
    return images, affine, spacing


def test_candidates_follow_the_task_and_the_plan(trained: dict) -> None:
    task = Task.from_folder(trained["dataset"])
    assert task.candidate_configurations("", ["2d", "3d_fullres", "3d_lowres"], "3d_fullres") == []
    assert task.candidate_configurations("all", ["2d", "3d_fullres", "3d_lowres"], "3d_fullres") == ["3d_fullres", "2d", "3d_cascade_fullres"]
    assert task.candidate_configurations("all", ["2d", "3d_fullres"], "2d") == ["2d", "3d_fullres"]  # the chosen first; no cascade without 3d_lowres
    assert task.candidate_configurations("3d_fullres", ["2d", "3d_fullres"], "3d_fullres") == []  # one candidate: nothing to choose
    with pytest.raises(MedsegError, match="3d_lowres"):
        task.candidate_configurations("2d,3d_cascade_fullres", ["2d", "3d_fullres"], "3d_fullres")
    with pytest.raises(MedsegError, match="unknown candidate configuration 'bogus'"):
        task.candidate_configurations("2d,bogus", ["2d", "3d_fullres"], "3d_fullres")


def test_preprocessing_prepares_every_candidate_and_units_cover_them(trained: dict) -> None:
    plans = schemas.Plans.load(trained["pre"])
    assert plans.chosen_configuration == "3d_fullres"
    assert set(plans.trained_configurations) == {"3d_fullres", "2d"}
    assert (trained["pre"] / "2d").is_dir() and (trained["pre"] / "3d_fullres").is_dir()
    assert training_units(trained["pre"], "all", "2d,3d_fullres") == [
        {"configuration": "3d_fullres", "fold": 0}, {"configuration": "3d_fullres", "fold": 1}, {"configuration": "2d", "fold": 0}, {"configuration": "2d", "fold": 1}]
    assert training_units(trained["pre"], "1", "") == [{"configuration": "3d_fullres", "fold": 1}]
    tiny_pre = trained["tiny_pre"]  # preprocessed for 3d_fullres alone: 2d is planned but has no cases
    assert "2d" in schemas.Plans.load(tiny_pre).configurations
    with pytest.raises(MedsegError, match="candidate 2d needs 2d preprocessed"):
        training_units(tiny_pre, "0", "2d,3d_fullres")


def test_scores_are_the_out_of_fold_dice_of_each_candidate(trained: dict, tmp_path: Path) -> None:
    """Every single configuration and the pair are scored; the pair's score is recomputed here from the members'
    probabilities on the input grid, and the winner is the best score."""
    selection, winner_pairs = sel.select_configuration(trained["dataset"], trained["folds"], tmp_path, cases_per_fold=1, overlap=0.5, device="cpu", progress=False)
    assert set(selection.scores) == {"3d_fullres", "2d", "3d_fullres+2d"}
    assert selection.folds == [0, 1] and selection.n_cases == 2
    best = max(selection.scores.values())
    assert selection.scores[selection.name] == pytest.approx(best)
    # the pair by hand: each fold's members predict that fold's first validation case, probabilities averaged
    splits = schemas.Splits.load(trained["dataset"])
    task = Task.from_folder(trained["dataset"])
    dice_by_hand = []
    for fold in (0, 1):
        case_id = splits.folds[fold]["val"][0]
        images, affine, spacing = _case(trained["dataset"], case_id)
        members = [Predictor.from_package(trained["folds"][c][fold], device="cpu") for c in ("3d_fullres", "2d")]
        mean = np.mean([m.original_probabilities(images, affine, spacing) for m in members], axis=0)
        pred = grid_labels(mean, members[0].regions, members[0].dataset.label_values)
        ref = np.rint(load_nifti(label_file(trained["dataset"], case_id), dtype=np.float32)[0]).astype(np.uint8)
        assert pred.shape == ref.shape  # the input grid
        from medseg.evaluation.metrics import dice

        dice_by_hand.append(np.mean([dice(np.isin(pred, v), np.isin(ref, v)) for v in task.reported_groups.values()]))
    # float16 storage of the probabilities may move a voxel on a 0.5 boundary: within a voxel's worth of Dice
    assert selection.scores["3d_fullres+2d"] == pytest.approx(float(np.mean(dice_by_hand)), abs=2e-3)
    assert len(winner_pairs) == 2 and all(p.shape == r.shape for p, r in winner_pairs)
    print("out-of-fold scores", selection.scores, "→", selection.name)


def test_configurations_on_other_folds_are_refused(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="different folds"):
        sel.select_configuration(trained["dataset"], {"3d_fullres": trained["folds"]["3d_fullres"], "2d": trained["folds"]["2d"][:1]}, tmp_path, progress=False)
    with pytest.raises(MedsegError, match="at least two"):
        sel.select_configuration(trained["dataset"], {"2d": trained["folds"]["2d"]}, tmp_path, progress=False)


def test_pair_package_predicts_the_mean_of_its_members(trained: dict, tmp_path: Path) -> None:
    """The configuration-ensemble package loads as one predictor whose segmentation is the label decision on the mean of
    its members' probabilities; the pyfunc pins torch when a member has no ONNX file."""
    selection = sel.Selection(scores={"3d_fullres": 0.5, "2d": 0.4, "3d_fullres+2d": 0.6}, group_scores={}, chosen=["3d_fullres", "2d"], n_cases=2, folds=[0])
    members = {"3d_fullres": trained["folds"]["3d_fullres"][0], "2d": trained["folds"]["2d"][0]}
    post = {"min_volume_mm3": {}}
    model = sel.save_configuration_ensemble(tmp_path / "model", members, selection, post)
    package = schemas.ModelPackage.load(model)
    assert package.configuration == "3d_fullres+2d"
    assert [m["configuration"] for m in package.configuration_ensemble] == ["3d_fullres", "2d"]
    assert (model / "members" / "2d" / schemas.MODEL_PACKAGE_JSON).is_file() and (model / schemas.PLANS_JSON).is_file()
    predictor = Predictor.from_package(model, device="cpu")
    assert isinstance(predictor, ConfigurationEnsemblePredictor)
    assert predictor.channels == Predictor.from_package(members["2d"], device="cpu").channels
    case_id = schemas.Splits.load(trained["dataset"]).test[0]
    images, affine, spacing = _case(trained["dataset"], case_id)
    singles = [Predictor.from_package(members[c], device="cpu") for c in ("3d_fullres", "2d")]
    mean = np.mean([s.original_probabilities(images, affine, spacing) for s in singles], axis=0)
    np.testing.assert_allclose(predictor.original_probabilities(images, affine, spacing), mean, atol=1e-6)
    expected = grid_labels(mean, singles[0].regions, singles[0].dataset.label_values)
    np.testing.assert_array_equal(predictor.segment(images, affine, spacing), expected)
    prediction = predictor.predict(images, affine, spacing)
    assert prediction.segmentation.shape == images.shape[1:] and set(prediction.volumes_ml) == set(singles[0].region_names)
    from medseg.registry.pyfunc_model import model_requirements

    assert "[serve-torch]" in model_requirements(model)[0]  # MEDSEG_ONNX_EXPORT=0 in the suite: no member has network.onnx
    with pytest.raises(MedsegError, match="at least two"):
        sel.save_configuration_ensemble(tmp_path / "one", {"2d": members["2d"]}, selection)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shutil.rmtree(broken / "members" / "2d")
    with pytest.raises(MedsegError, match="member '2d' is missing"):
        Predictor.from_package(broken, device="cpu")


def test_build_selected_model_keeps_the_winner_and_records_the_choice(trained: dict, tmp_path: Path) -> None:
    """The pipeline's step: fold ensembles per configuration, then the cross-validation choice; the package written
    is the winner's kind (one configuration's fold ensemble, or the pair's ensemble package) and says why."""
    cfg = TrainConfig(**CONFIG)
    packages = trained["folds"]["3d_fullres"] + trained["folds"]["2d"]
    model, report = build_selected_model(trained["pre"], trained["dataset"], packages, tmp_path / "model", cfg, tracking_uri=None, progress=False)
    package = schemas.ModelPackage.load(model)
    chosen = report["selection"]["chosen"]
    assert chosen == max(report["selection"]["scores"], key=lambda k: (round(report["selection"]["scores"][k], 6), -k.count("+")))
    if "+" in chosen:
        assert package.configuration == chosen and len(package.configuration_ensemble) == 2
        assert package.training["configuration_selection"]["chosen"] == chosen
    else:
        assert package.configuration == chosen and package.training["configuration_selection"]["chosen"] == chosen
        assert package.training["folds"] == [0, 1]  # the winner's fold ensemble
    assert {f"cv_{c}_WT" for c in ("3d_fullres", "2d")} <= set(report)  # each configuration's fold ensemble, out-of-fold
    assert not (tmp_path / ".model.work").exists()  # the out-of-fold probabilities are cleaned up
    Predictor.from_package(model, device="cpu").predict(*_case(trained["dataset"], schemas.Splits.load(trained["dataset"]).test[0]))
    # one configuration: its folds' ensemble, no selection
    single, report = build_selected_model(trained["pre"], trained["dataset"], trained["folds"]["2d"], tmp_path / "single", dataclasses.replace(cfg), progress=False)
    assert "selection" not in report and schemas.ModelPackage.load(single).configuration == "2d"


def test_pair_package_is_served_and_answers_a_standard_client(trained: dict, tmp_path: Path) -> None:
    """The real KServe model server loads the configuration ensemble and answers tritonclient.http with the same
    segmentation and volumes the predictor gives in process."""
    httpclient = pytest.importorskip("tritonclient.http")
    from medseg.io import load_nifti_bytes
    from medseg.serving import server

    selection = sel.Selection(scores={"3d_fullres+2d": 0.6}, group_scores={}, chosen=["3d_fullres", "2d"], n_cases=2, folds=[0])
    model = sel.save_configuration_ensemble(tmp_path / "model", {"3d_fullres": trained["folds"]["3d_fullres"][0], "2d": trained["folds"]["2d"][0]}, selection)
    case_id = schemas.Splits.load(trained["dataset"]).test[0]
    paths = case_files(trained["dataset"], case_id, 4)
    in_process = Predictor.from_package(model, device="cpu")
    expected = in_process.predict_files(paths)
    port = server.free_port()
    proc = server.start_server_process(model, "pair", port, log_file=tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"})
    try:
        server.wait_until_ready(f"http://127.0.0.1:{port}", "pair", timeout_s=90, proc=proc)
        triton = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
        inputs = []
        for channel, path in zip(in_process.channels, paths):
            tensor = httpclient.InferInput(channel, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([path.read_bytes()], dtype=object))
            inputs.append(tensor)
        result = triton.infer("pair", inputs)
    finally:
        server.stop_server(proc)
    raw = result.as_numpy("segmentation")[0]
    import base64

    seg, _, _ = load_nifti_bytes(base64.b64decode(raw if isinstance(raw, bytes) else str(raw)), dtype=np.uint8)
    np.testing.assert_array_equal(seg, expected.segmentation)
    np.testing.assert_allclose(result.as_numpy("volumes_ml"), [expected.volumes_ml[g] for g in expected.volumes_ml], rtol=1e-5)


def test_export_onnx_of_a_pair_exports_each_member(trained: dict, tmp_path: Path, onnx_export: None) -> None:
    """``medseg export-onnx`` on a configuration ensemble writes each exportable member's network.onnx and records
    which member keeps the package on torch (the 2D U-Net is not exported)."""
    import subprocess
    import sys

    selection = sel.Selection(scores={"3d_fullres+2d": 0.6}, group_scores={}, chosen=["3d_fullres", "2d"], n_cases=2, folds=[0])
    model = sel.save_configuration_ensemble(tmp_path / "model", {"3d_fullres": trained["folds"]["3d_fullres"][0], "2d": trained["folds"]["2d"][0]}, selection)
    proc = subprocess.run([sys.executable, "-m", "medseg", "export-onnx", str(model)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one member refused
    assert (model / "members" / "3d_fullres" / "network.onnx").is_file()
    assert not (model / "members" / "2d" / "network.onnx").exists()
    onnx = schemas.ModelPackage.load(model).onnx
    assert onnx["members"] is False and "2d" in onnx["reason"]
    assert schemas.ModelPackage.load(model / "members" / "3d_fullres").onnx["file"] == "network.onnx"


def test_select_configuration_command(trained: dict, tmp_path: Path) -> None:
    """``medseg select-configuration`` prints every candidate's out-of-fold Dice, marks the winner and writes its package;
    a bad package path is one clear line."""
    import subprocess
    import sys

    models = [str(p) for c in ("3d_fullres", "2d") for p in trained["folds"][c]]
    args = [sys.executable, "-m", "medseg", "select-configuration", "--preprocessed", str(trained["pre"]), "--dataset", str(trained["dataset"]),
            "--tracking-uri", "none", "--out", str(tmp_path / "chosen")]
    proc = subprocess.run(args + ["--models", *models], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "out-of-fold Dice" in line]
    assert len(lines) == 3 and sum("← chosen" in line for line in lines) == 1
    chosen = next(line.split()[0] for line in lines if "← chosen" in line)
    assert schemas.ModelPackage.load(tmp_path / "chosen").configuration == chosen
    bad = subprocess.run(args + ["--models", models[0], str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nowhere" in bad.stderr
