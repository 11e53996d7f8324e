"""Region-based training (BraTS, as nnU-Net trains it): one sigmoid output per dataset.json region (WT, TC, ET),
validation Dice per region from sigmoid > 0.5, packages recording ``output: regions``, the predictor turning
region probabilities back into labels, and fold ensembles averaging sigmoid probabilities.

Runs on the tiny real dataset of tests/test_preprocessing.py (6 synthetic 32³ BraTS-like cases, 2 folds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.task import BRATS2023
from medseg.errors import MedsegError
from medseg.training.losses import labels_to_regions, regions_to_labels
from medseg.training.trainer import TrainConfig, train
from tests.test_preprocessing import build_tiny_dataset

REGION = dict(epochs=2, iterations_per_epoch=2, max_val_cases=1, device="cpu", seed=7, num_threads=1, loss="region_bce_dice")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_globals():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def region_run(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("region")
    return train(tiny["pre"], out, TrainConfig(**REGION), progress=False)


def test_labels_regions_labels_round_trip_on_a_real_label_map(tiny: dict[str, Path]) -> None:
    from medseg.preprocessing.fingerprint import load_case

    case = schemas.Splits.load(tiny["dataset"]).folds[0]["train"][0]
    _, seg, _, _ = load_case(tiny["dataset"], case, 4)
    assert set(np.unique(seg)) == {0, 1, 2, 3}  # every BraTS label occurs: the round trip is not trivial
    regions = BRATS2023.regions_dict()
    targets = labels_to_regions(seg[None, None].astype(np.int64), regions)  # (1, 3, I, J, K)
    assert targets.shape == (1, 3, *seg.shape)
    np.testing.assert_array_equal(targets[0, 0], seg > 0)  # WT = {1, 2, 3}
    np.testing.assert_array_equal(targets[0, 2], seg == 3)  # ET
    np.testing.assert_array_equal(regions_to_labels(targets, regions)[0], seg)  # numpy, batched
    np.testing.assert_array_equal(regions_to_labels(targets[0], regions), seg)  # one case (R, I, J, K)
    as_torch = labels_to_regions(torch.from_numpy(seg[None, None].astype(np.int64)), regions)
    assert torch.equal(regions_to_labels(as_torch, regions)[0], torch.from_numpy(seg.astype(np.int64)))


def test_validation_dice_reads_each_region_from_its_sigmoid(tiny: dict[str, Path]) -> None:
    """A network whose region logits are its input: perfect region maps give Dice 1, inverted ones Dice 0."""
    from medseg.training.sampler import PreprocessedCase
    from medseg.training.trainer import validation_dice, validation_pairs

    plans = schemas.Plans.load(tiny["pre"])
    case = PreprocessedCase(tiny["pre"] / "3d_fullres", schemas.Splits.load(tiny["pre"]).folds[0]["val"][0])
    seg = np.asarray(case.seg).astype(np.int64)
    logits = labels_to_regions(seg[None, None], plans.regions)[0] * 20.0 - 10.0  # sigmoid: ≈1 inside a region, ≈0 outside

    class Fake:
        def __init__(self, data: np.ndarray):
            self.data, self.seg, self.case_id = data, case.seg, case.case_id

    identity = torch.nn.Conv3d(3, 3, 1, bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1, 1))
    patch = plans.configuration().patch_size
    perfect = validation_dice(identity, [Fake(logits)], plans, patch, 0.0, torch.device("cpu"), regions=plans.regions)
    assert perfect == pytest.approx({"WT": 1.0, "TC": 1.0, "ET": 1.0})
    inverted = validation_dice(identity, [Fake(-logits)], plans, patch, 0.0, torch.device("cpu"), regions=plans.regions)
    assert inverted == pytest.approx({"WT": 0.0, "TC": 0.0, "ET": 0.0})
    [(pred, ref)] = validation_pairs(identity, [Fake(logits)], patch, 0.0, torch.device("cpu"), regions=plans.regions, labels=[0, 1, 2, 3])
    np.testing.assert_array_equal(pred, ref)  # the region outputs turned back into the label map


def test_region_training_writes_a_region_package_the_predictor_reads(tiny: dict[str, Path], region_run) -> None:
    from medseg.inference.predictor import Predictor
    from medseg.preprocessing.fingerprint import load_case

    result = region_run
    assert result.epochs_run == 2 and result.metric == "val_dice_mean"
    for row in result.history:
        assert np.isfinite(row["train_loss"])
        assert {"val_dice_WT", "val_dice_TC", "val_dice_ET"} <= row.keys()
        assert all(0.0 <= row[k] <= 1.0 for k in ("val_dice_WT", "val_dice_TC", "val_dice_ET", "val_dice_mean"))

    package = schemas.ModelPackage.load(result.model_dir)
    assert package.network["output"] == "regions" and package.network["out_channels"] == 3
    assert list(package.network["regions"]) == ["WT", "TC", "ET"]  # the channel order
    assert package.network["regions"] == BRATS2023.regions_dict()
    assert package.training["config"]["loss"] == "region_bce_dice"
    state = torch.load(result.model_dir / schemas.WEIGHTS_FILE, weights_only=True)
    assert [v.shape[0] for k, v in state.items() if k.startswith("output_block") and v.ndim == 5] == [3]  # 3 output channels

    predictor = Predictor.from_package(result.model_dir, device="cpu")
    assert predictor.output == "regions" and predictor.regions == BRATS2023.regions_dict()
    test_case = schemas.Splits.load(tiny["dataset"]).test[0]
    images, _, affine, spacing = load_case(tiny["dataset"], test_case, 4, with_label=False)
    prediction = predictor.predict(images, affine, spacing)
    assert prediction.segmentation.shape == images.shape[1:] and prediction.segmentation.dtype == np.uint8
    assert set(np.unique(prediction.segmentation)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(prediction.affine, affine)
    vol = prediction.volumes_ml
    assert set(vol) == {"WT", "TC", "ET"} and vol["WT"] >= vol["TC"] >= vol["ET"] >= 0.0  # labels, so nested regions
    with pytest.raises(MedsegError, match="use predict"):
        predictor.predict_class(images, affine, spacing)


def test_sigmoid_loss_without_regions_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    import dataclasses

    from medseg.task import Task
    from medseg.training.setup import resolve_loss, segmentation_target

    plans = schemas.Plans.load(tiny["pre"])
    dataset = schemas.DatasetJson.load(tiny["pre"])
    with pytest.raises(MedsegError, match="softmax"):
        cfg, _, _ = segmentation_target(TrainConfig(**REGION), Task(dataclasses.replace(dataset, regions={})), plans.configuration())
        resolve_loss(cfg)
    not_invertible = dataclasses.replace(dataset, regions={"A": [1, 2], "B": [1, 2]})  # labels 1 and 2 in the same regions
    with pytest.raises(MedsegError, match="cannot be turned back into labels"):
        segmentation_target(TrainConfig(**REGION), Task(not_invertible), plans.configuration())


def test_fold_ensemble_of_region_packages_averages_sigmoids(tiny: dict[str, Path], tmp_path: Path) -> None:
    from medseg.inference.predictor import Predictor, grid_probabilities
    from medseg.inference.sliding_window import predict_logits
    from medseg.preprocessing.fingerprint import load_case
    from medseg.training import ensemble, stage
    from medseg.training.sampler import _padded_crop

    cfg = TrainConfig(**{**REGION, "epochs": 1})
    result = stage.run_train_folds(tiny["pre"], tmp_path, cfg, [0, 1], progress=False)
    package = schemas.ModelPackage.load(result.model_dir)
    assert package.training["ensemble"]["combine"] == "mean_sigmoid" and package.network["output"] == "regions"
    assert set(result.cv_dice) == {"WT", "TC", "ET"}

    network = ensemble.load_network(result.model_dir, package)
    assert isinstance(network, ensemble.EnsembleNetwork) and network.activation == "sigmoid"
    data = np.load(tiny["pre"] / "3d_fullres" / f"{schemas.Splits.load(tiny['pre']).folds[0]['val'][0]}.npy")
    patch = schemas.Plans.load(tiny["pre"]).configuration().patch_size
    members = [ensemble.load_network(tmp_path / f"fold_{f}" / "model", schemas.ModelPackage.load(tmp_path / f"fold_{f}" / "model")) for f in (0, 1)]
    x = torch.from_numpy(_padded_crop(data, np.zeros(3, int), patch, 0.0)[None].copy())  # one window of the network's input size
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        torch.testing.assert_close(torch.sigmoid(network(x)), mean, atol=1e-5, rtol=1e-4)
    probs = grid_probabilities(network, data, patch, "regions", overlap=0.25)
    assert probs.shape == (3, *data.shape[1:]) and probs.min() >= 0.0 and probs.max() <= 1.0
    np.testing.assert_allclose(probs, torch.sigmoid(predict_logits(network, data, patch, overlap=0.25)).numpy())

    test_case = schemas.Splits.load(tiny["dataset"]).test[0]
    images, _, affine, spacing = load_case(tiny["dataset"], test_case, 4, with_label=False)
    seg = Predictor.from_package(result.model_dir, device="cpu").predict(images, affine, spacing).segmentation
    assert seg.shape == images.shape[1:] and set(np.unique(seg)) <= {0, 1, 2, 3}
