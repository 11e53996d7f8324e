"""medseg.task: one object answers every question a stage asks about the dataset's task."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import schemas
from medseg.errors import MedsegError
from medseg.task import BRATS2023, BRATS2024, Task, labels_to_regions, regions_to_labels


def dataset(**fields) -> schemas.DatasetJson:
    base = dict(name="D", channel_names={"0": "a"}, labels={"background": 0, "lesion": 1}, numTraining=4)
    return schemas.DatasetJson(**{**base, **fields})


def brats(**fields) -> schemas.DatasetJson:
    return dataset(channel_names={str(i): c for i, c in enumerate(BRATS2023.channels)}, labels=BRATS2023.labels_dict(), regions=BRATS2023.regions_dict(),
                   source_format="brats2023", **fields)


LGG = dict(channel_names={"0": "pre_contrast", "1": "flair", "2": "post_contrast"}, labels={"background": 0, "abnormality": 1},
           regions={"abnormality": [1]}, slice_axis=2, primary_metric="iou", source_format="lgg")
ADNI = dict(channel_names={"0": "image"}, labels={"CN": 0, "MCI": 1, "AD": 2}, task="classification", covariates=["age"], source_format="classification")
HIPPOCAMPUS = dict(channel_names={"0": "MRI"}, labels={"background": 0, "Anterior": 1, "Posterior": 2}, regions={"Anterior": [1], "Posterior": [2]},
                   source_format="msd")


def test_region_task_trains_sigmoid_regions_and_reports_them() -> None:
    task = Task(brats())
    assert task.is_segmentation and task.has_regions and not task.is_slice_set
    assert task.default_loss() == "region_bce_dice" and task.default_network("3d_fullres") == "unet"
    assert task.output_for_loss(sigmoid_loss=True) == "regions" and task.activation("regions") == "sigmoid"
    assert task.output_for_loss(sigmoid_loss=False) == "labels" and task.activation("labels") == "softmax"
    assert list(task.reported_groups) == ["WT", "TC", "ET"] and task.primary_group == "WT" and task.gate_groups == ["WT", "TC", "ET"]
    assert task.primary_metric == "dice" and task.primary_metric_spec.higher_is_better
    assert task.lesionwise == "brats2023" and task.postprocessing_metric == "lesionwise_dice_2023"
    assert task.enhancing_pair == (3, 1)
    assert task.default_thresholds() == {"WT/dice": 0.5}
    assert task.default_model_name() == "brats2023-segmentation"


def test_lesionwise_setting_follows_the_labels_or_what_ingest_wrote() -> None:
    assert Task(brats(lesionwise="brats2023_mets")).lesionwise == "brats2023_mets"  # metastases: the BraTS adapter writes it
    assert Task(brats(lesionwise="none")).lesionwise is None
    post = dataset(channel_names={str(i): c for i, c in enumerate(BRATS2024.channels)}, labels=BRATS2024.labels_dict(), regions=BRATS2024.regions_dict())
    assert Task(post).lesionwise == "brats2024" and Task(post).lesionwise_suffix == "2024"
    assert list(Task(post).reported_groups) == ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    assert Task(dataset(**HIPPOCAMPUS)).lesionwise is None
    with pytest.raises(MedsegError, match="lesionwise"):
        _ = Task(brats(lesionwise="brats1999")).lesionwise


def test_label_task_without_overlapping_regions_trains_softmax() -> None:
    task = Task(dataset(**HIPPOCAMPUS))
    assert not task.has_regions and task.default_loss() == "dice_ce"
    assert list(task.reported_groups) == ["Anterior", "Posterior"] and task.primary_group == "Anterior"
    assert task.enhancing_pair is None and task.n_label_values == 3 and task.foreground_labels == [1, 2]
    no_regions = Task(dataset(labels={"background": 0, "liver": 1, "tumour": 2}))
    assert no_regions.reported_groups == {"liver": [1], "tumour": [2]}


def test_slice_set_is_2d_and_judged_by_the_metric_it_names() -> None:
    task = Task(dataset(**LGG))
    assert task.is_slice_set and task.viewer_mode == "slices"
    assert task.choose_configuration("auto", ["2d", "3d_fullres"], [1.0, 1.0, 1.0])[0] == "2d"
    assert task.default_network("2d") == "unet2d" and task.default_loss() == "dice_ce"
    assert task.primary_metric == "iou" and task.default_thresholds() == {"abnormality/iou": 0.5}
    names = [t.name for t in task.endpoint_inputs()]
    assert names == ["pre_contrast", "flair", "post_contrast", "volume", "image"]


def test_classification_task() -> None:
    task = Task(dataset(**ADNI))
    assert task.is_classification and task.classes == ["CN", "MCI", "AD"] and task.reported_groups == {}
    assert task.default_loss() == "ce" and task.default_network("3d_fullres") == "classifier3d"
    assert task.default_network_options() == {"use_age": True} and task.uses_age_input
    assert task.primary_group == "all" and task.primary_metric == "log_loss" and not task.primary_metric_spec.higher_is_better
    assert task.default_thresholds() == {"all/log_loss": round(math.log(3), 4)}
    assert task.choose_configuration("auto", ["2d", "3d_fullres"], [1.0, 1.0, 6.0])[0] == "3d_fullres"  # whole volumes, never 2d
    assert [t.name for t in task.endpoint_outputs()] == ["probabilities", "label"]
    assert task.endpoint_outputs()[0].shape == (3,) and task.endpoint_outputs()[0].parameters["classes"] == "CN,MCI,AD"
    age = next(t for t in task.endpoint_inputs() if t.name == "age")
    assert age.datatype == "FP32" and not age.optional
    assert task.default_model_name() == "classification-classifier" and task.viewer_mode == "classes"
    assert task.lesionwise is None


def test_configuration_choice_as_nnunet() -> None:
    task = Task(brats())
    assert task.choose_configuration("auto", ["2d", "3d_fullres"], [1.0, 1.0, 1.0]) == ("3d_fullres", "3D volumes")
    chosen, reason = task.choose_configuration("auto", ["2d", "3d_fullres", "3d_lowres"], [0.8, 0.8, 5.0])
    assert chosen == "2d" and "anisotropic" in reason
    assert task.choose_configuration("auto", ["2d"], None)[0] == "2d"  # flat data: no 3d_fullres planned
    assert task.choose_configuration("3d_cascade_fullres", ["2d", "3d_fullres", "3d_lowres"])[0] == "3d_cascade_fullres"
    with pytest.raises(MedsegError, match="3d_lowres"):
        task.choose_configuration("3d_cascade_fullres", ["2d", "3d_fullres"])
    with pytest.raises(MedsegError, match="unknown configuration"):
        task.choose_configuration("4d", ["3d_fullres"])
    assert task.configurations_to_preprocess("auto") == ("2d", "3d_fullres")
    assert task.configurations_to_preprocess("3d_cascade_fullres") == ("3d_lowres", "3d_fullres")


def test_reported_metrics_are_flat_and_finite() -> None:
    task = Task(brats())
    mean = {"WT": {"dice": 0.9, "iou": 0.8, "hd95": 3.0, "lesionwise_dice_2023": 0.85}, "TC": {"dice": float("nan")}, "NETC": {"dice": 0.5}}
    out = task.reported_metrics(mean)
    assert out == {"WT_dice": 0.9, "WT_iou": 0.8, "WT_hd95": 3.0, "WT_lesionwise_dice_2023": 0.85, "NETC_dice": 0.5}
    cls = Task(dataset(**ADNI)).reported_metrics({"all": {"accuracy": 0.5, "balanced_accuracy": 0.4, "auc_macro": 0.6, "log_loss": 1.0}, "CN": {"auc": 0.7}})
    assert cls == {"all_accuracy": 0.5, "all_balanced_accuracy": 0.4, "all_auc_macro": 0.6, "all_log_loss": 1.0, "CN_auc": 0.7}
    assert "WT dice 0.9000" in task.headline(mean)


def test_threshold_keys() -> None:
    task = Task(dataset(**LGG))
    assert task.parse_threshold_key("abnormality") == ("abnormality", "iou")
    assert task.parse_threshold_key("abnormality/dice") == ("abnormality", "dice")
    with pytest.raises(MedsegError, match="unknown metric"):
        task.parse_threshold_key("abnormality/volume")


def test_signature_tells_tasks_apart() -> None:
    assert Task(brats()).signature == Task(brats(name="other")).signature
    assert Task(brats()).signature != Task(dataset(**HIPPOCAMPUS)).signature
    assert Task(dataset(**ADNI)).signature["classes"] == ["CN", "MCI", "AD"]


def test_bad_task_definitions_are_clear_errors() -> None:
    with pytest.raises(MedsegError, match="0..n-1"):
        Task(dataset(**{**ADNI, "labels": {"CN": 0, "AD": 2}}))
    with pytest.raises(MedsegError, match="background 0"):
        Task(dataset(labels={"lesion": 1}))
    with pytest.raises(MedsegError, match="label values that dataset.json labels do not define"):
        Task(dataset(regions={"whole": [1, 7]}))
    with pytest.raises(MedsegError, match="task"):
        Task(dataset(task="detection"))
    with pytest.raises(MedsegError, match="unknown metric"):
        Task(dataset(primary_metric="accuracy_at_k"))
    with pytest.raises(MedsegError, match="cannot be turned back"):
        Task(dataset(labels={"background": 0, "a": 1, "b": 2}, regions={"x": [1, 2], "y": [1, 2]})).check_regions_invertible()


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_labels_to_regions_and_back(kind: str) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(2, 1, 6, 6, 6))
    regions = BRATS2023.regions_dict()
    if kind == "torch":
        targets = labels_to_regions(torch.from_numpy(labels), regions)
        back = regions_to_labels(targets, regions)
        assert torch.equal(back, torch.from_numpy(labels[:, 0]))
    else:
        targets = labels_to_regions(labels, regions)
        assert targets.shape == (2, 3, 6, 6, 6) and targets.dtype == np.float32
        np.testing.assert_array_equal(regions_to_labels(targets, regions), labels[:, 0])


def test_dataset_json_without_a_name_takes_its_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "Dataset042_Hippo"
    folder.mkdir()
    (folder / schemas.DATASET_JSON).write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "hippocampus": 1},
                                                           "numTraining": 3, "file_ending": ".nii.gz"}))
    loaded = schemas.DatasetJson.load(folder)
    assert loaded.name == "Dataset042_Hippo"
    assert Task.from_folder(folder).reported_groups == {"hippocampus": [1]}
    assert dataclasses.asdict(loaded)["slice_axis"] is None
