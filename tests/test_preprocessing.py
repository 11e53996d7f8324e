"""Preprocessing: cropping, resampling, normalisation, planning (and the network size formulas it uses),
the preprocess/restore round trip, and the stage on a tiny real dataset (synth → ingest → preprocess).

``build_tiny_dataset`` is shared with tests/test_training.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from medseg import schemas
from medseg.task import BRATS2023
from medseg.errors import MedsegError
from medseg.preprocessing.cropping import bounding_box, crop, nonzero_mask, uncrop
from medseg.preprocessing.normalization import normalize, scheme_for_channel
from medseg.preprocessing.planner import make_plans, parse_budget, plan_patch, target_spacing, topology_for_patch
from medseg.preprocessing.preprocess import preprocess_case, restore_labels_to_original, restore_to_original, run_preprocessing
from medseg.preprocessing.resampling import anisotropic_axis, needs_resampling, resample, resample_segmentation, shape_for_spacing
from medseg.networks.unet import count_activations, count_parameters, estimate_training_memory_gib

# --------------------------------------------------------------------------- the tiny real dataset
TINY_CASES, TINY_SHAPE = 6, (32, 32, 32)
_TINY: dict[str, Path] = {}


def build_tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6 synthetic 32³ cases → canonical dataset (2 folds, 20 % test) → preprocessed (cpu budget).

    Built once per test process (shared by the test modules); returns ``raw``, ``dataset``, ``pre``.
    """
    if not _TINY:
        from medseg.ingest.ingest import ingest
        from medseg.synth import generate_dataset

        root = tmp_path_factory.mktemp("tiny")
        generate_dataset(root / "raw", TINY_CASES, TINY_SHAPE, seed=0, progress=False, anatomy="procedural")
        ingest(root / "raw", root / "dataset", n_folds=2, test_fraction=0.2, seed=0, progress=False)
        run_preprocessing(root / "dataset", root / "pre", budget="cpu", workers=1, progress=False)
        _TINY.update(raw=root / "raw", dataset=root / "dataset", pre=root / "pre")
    return dict(_TINY)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_dataset(tmp_path_factory)


def _dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    pa, pb = a == value, b == value
    denom = pa.sum() + pb.sum()
    return 1.0 if denom == 0 else float(2 * (pa & pb).sum() / denom)


def _plans(spacing: list[float], channels=("t1n", "t2f"), scheme: str = "zscore_nonzero") -> schemas.Plans:
    config = plan_patch([32, 32, 32], spacing, len(channels), 4, "cpu")
    return schemas.Plans(
        dataset_name="t", device_budget="cpu", channel_names=list(channels), labels=dict(BRATS2023.labels_dict()),
        regions=dict(BRATS2023.regions_dict()),
        normalization=[{"channel": c, "scheme": scheme, "mean": 0.0, "std": 1.0, "lower": 0.0, "upper": 1.0} for c in channels],
        configurations={"3d_fullres": config},
    )


def _phantom(shape=(30, 28, 14), spacing=(1.0, 1.0, 3.0), seed: int = 0):
    """A 'brain' ball with nested tumour labels 2 ⊃ 3 ⊃ 1 (in mm, so round whatever the spacing)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) * sp for s, sp in zip(shape, spacing)], indexing="ij"))
    centre = np.array([s * sp / 2 for s, sp in zip(shape, spacing)])[:, None, None, None]
    r = np.sqrt(((grid - centre) ** 2).sum(0))
    brain = r < 13
    seg = np.zeros(shape, np.uint8)
    seg[r < 9] = 2
    seg[r < 6] = 3
    seg[r < 3] = 1
    rng = np.random.default_rng(seed)
    images = np.stack([brain * (100 + rng.normal(0, 5, shape)), brain * (200 + 50 * (seg > 0))]).astype(np.float32)
    return images, seg


# --------------------------------------------------------------------------- cropping
def test_crop_uncrop_round_trip() -> None:
    rng = np.random.default_rng(0)
    vol = np.zeros((3, 20, 22, 24), np.float32)
    vol[:, 4:15, 6:9, 10:23] = rng.random((3, 11, 3, 13)) + 1
    box = bounding_box(nonzero_mask(vol))
    assert box == [[4, 15], [6, 9], [10, 23]]
    cropped = crop(vol, box)
    assert cropped.shape == (3, 11, 3, 13)
    np.testing.assert_array_equal(uncrop(cropped, box, vol.shape[1:]), vol)
    # a margin widens the box but never leaves the volume
    assert bounding_box(nonzero_mask(vol), margin=5) == [[0, 20], [1, 14], [5, 24]]


def test_bounding_box_of_empty_mask_is_whole_volume() -> None:
    mask = np.zeros((5, 6, 7), bool)
    assert bounding_box(mask) == [[0, 5], [0, 6], [0, 7]]
    assert crop(mask, bounding_box(mask)).shape == mask.shape


# --------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("new_shape", [(17, 9, 31), (8, 8, 8), (23, 24, 25)])
def test_resample_shape_is_exact(order: int, new_shape: tuple[int, int, int]) -> None:
    vol = np.random.default_rng(0).random((2, 12, 13, 14)).astype(np.float32)
    out = resample(vol, new_shape, order=order)
    assert out.shape == (2, *new_shape)
    assert out.dtype == np.float32


def test_resample_separate_z_shape_and_values() -> None:
    vol = np.random.default_rng(0).random((12, 13, 5)).astype(np.float32)
    out = resample(vol, (20, 22, 15), order=3, anisotropic_axis=2)
    assert out.shape == (20, 22, 15)
    # along the anisotropic axis only nearest neighbour: each new slice is one of 3 resampled copies
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 1], out[:, :, 2])


def test_resample_segmentation_nearest_keeps_label_values() -> None:
    rng = np.random.default_rng(0)
    seg = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(10, 11, 12))
    for shape in [(23, 7, 31), (5, 5, 5), (10, 11, 12)]:
        out = resample_segmentation(seg, shape)
        assert out.shape == shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1, 2, 4}
    up = resample_segmentation(seg, (20, 22, 24))  # an exact 2× upsampling repeats every voxel
    np.testing.assert_array_equal(up[::2, ::2, ::2], seg)


def test_shape_for_spacing_and_needs_resampling() -> None:
    assert shape_for_spacing([100, 100, 30], [1, 1, 3], [1, 1, 1.5]) == [100, 100, 60]
    assert shape_for_spacing([3, 3, 3], [1, 1, 1], [10, 10, 10]) == [1, 1, 1]
    assert not needs_resampling([1, 1, 1.0000001], [1, 1, 1])
    assert needs_resampling([1, 1, 1.1], [1, 1, 1])


def test_anisotropic_axis_detection() -> None:
    assert anisotropic_axis([1.0, 1.0, 1.0]) is None
    assert anisotropic_axis([1.0, 1.0, 3.0]) is None  # exactly 3×: not anisotropic (threshold is > 3)
    assert anisotropic_axis([1.0, 1.0, 3.5]) == 2
    assert anisotropic_axis([5.0, 0.8, 0.8]) == 0
    assert anisotropic_axis([0.5, 2.0, 1.0]) == 1


# --------------------------------------------------------------------------- normalisation
def test_zscore_nonzero_inside_mask_and_zero_outside() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((20, 20, 20), np.float32)
    mask = np.zeros(img.shape, bool)
    mask[4:16, 3:17, 5:15] = True
    img[mask] = rng.normal(500, 80, mask.sum())
    img[0, 0, 0] = 7  # nonzero outside the mask: still set to 0
    out = normalize(img, mask, {"scheme": "zscore_nonzero"})
    assert out.dtype == np.float32
    assert abs(float(out[mask].mean())) < 1e-4 and abs(float(out[mask].std()) - 1) < 1e-4
    assert np.all(out[~mask] == 0)


def test_zscore_over_whole_image() -> None:
    img = np.random.default_rng(1).normal(10, 3, (8, 8, 8)).astype(np.float32)
    out = normalize(img, np.ones(img.shape, bool), {"scheme": "zscore"})
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-4


def test_ct_clips_then_uses_dataset_statistics() -> None:
    img = np.array([-2000, -100, 0, 50, 100, 3000], np.float32).reshape(1, 2, 3)
    spec = {"scheme": "ct", "mean": 40.0, "std": 20.0, "lower": -100.0, "upper": 100.0}
    out = normalize(img, np.ones(img.shape, bool), spec)
    np.testing.assert_allclose(out.ravel(), (np.array([-100, -100, 0, 50, 100, 100]) - 40) / 20)


def test_rescale_and_none() -> None:
    img = np.array([2.0, 4.0, 6.0, 10.0], np.float32).reshape(1, 1, 4)
    np.testing.assert_allclose(normalize(img, img > 0, {"scheme": "rescale"}).ravel(), [0, 0.25, 0.5, 1])
    np.testing.assert_array_equal(normalize(img, img > 0, {"scheme": "none"}), img)
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        normalize(img, img > 0, {"scheme": "minmax"})


def test_scheme_for_channel_names() -> None:
    assert scheme_for_channel("CT") == "ct"
    assert scheme_for_channel("t1c") == "zscore_nonzero"
    assert scheme_for_channel("noNorm") == "none"
    assert scheme_for_channel("rescale_to_0_1") == "rescale"


# --------------------------------------------------------------------------- planning
def test_parse_budget() -> None:
    assert parse_budget("cpu") == ("cpu", 0.0)
    assert parse_budget("gpu:8") == ("gpu", 8.0)
    assert parse_budget("gpu:11.5") == ("gpu", 11.5)
    for bad in ("gpu", "gpu:", "gpu:0", "gpu:-4", "gpu:lots", "tpu:8", "CPU", ""):
        with pytest.raises(MedsegError, match="device budget"):
            parse_budget(bad)


def test_target_spacing_median_and_anisotropy_rule() -> None:
    # isotropic-ish: the per-axis median
    assert target_spacing([[1, 1, 1], [1.2, 1, 1], [0.8, 1, 1.4]]) == [1.0, 1.0, 1.0]
    # the coarse axis is > 3× the finest: it takes the 10th percentile of its spacings (keeps slices)
    spacings = [[1, 1, 5], [1, 1, 4], [1, 1, 6], [1, 1, 3], [1, 1, 5.5]]
    got = target_spacing(spacings)
    assert got[:2] == [1.0, 1.0]
    assert got[2] == pytest.approx(float(np.percentile([5, 4, 6, 3, 5.5], 10)))
    assert got[2] < float(np.median([5, 4, 6, 3, 5.5]))
    # ratio exactly 3: no special rule
    assert target_spacing([[1, 1, 3], [1, 1, 3], [1, 1, 2.5]]) == [1.0, 1.0, 3.0]


@pytest.mark.parametrize(("median_shape", "spacing"), [([128, 128, 128], [1, 1, 1]), ([140, 170, 138], [1, 1, 1]), ([160, 160, 40], [1, 1, 3.5]), ([24, 25, 26], [6, 7, 6])])
def test_plan_patch_cpu_and_gpu_budgets(median_shape: list[int], spacing: list[float]) -> None:
    cpu = plan_patch(median_shape, spacing, 4, 4, "cpu")
    gpu = plan_patch(median_shape, spacing, 4, 4, "gpu:8")
    for config in (cpu, gpu):
        patch, strides = config["patch_size"], config["network"]["strides"]
        divisor = [math.prod(s[a] for s in strides) for a in range(3)]
        assert all(p % d == 0 for p, d in zip(patch, divisor)), (patch, divisor)
        assert config["n_parameters"] == count_parameters(config["network"])
        schemas.Configuration(**config)  # a valid Configuration
    assert math.prod(cpu["patch_size"]) <= 64**3
    assert gpu["estimated_memory_gib"] <= 8
    assert gpu["estimated_memory_gib"] == pytest.approx(estimate_training_memory_gib(gpu["network"], gpu["patch_size"], gpu["batch_size"], 2), abs=1e-3)
    assert gpu["network"]["deep_supervision"] and not cpu["network"]["deep_supervision"]
    if math.prod(median_shape) > 64**3:
        assert math.prod(gpu["patch_size"]) > math.prod(cpu["patch_size"])
    else:
        assert math.prod(gpu["patch_size"]) >= math.prod(cpu["patch_size"])


def test_plan_patch_smaller_gpu_budget_gives_smaller_patch() -> None:
    big = plan_patch([160, 192, 160], [1, 1, 1], 4, 4, "gpu:8")
    small = plan_patch([160, 192, 160], [1, 1, 1], 4, 4, "gpu:4")
    assert small["estimated_memory_gib"] <= 4 < big["estimated_memory_gib"] <= 8
    assert math.prod(small["patch_size"]) < math.prod(big["patch_size"])


def test_topology_pools_anisotropic_axis_later() -> None:
    topo = topology_for_patch([64, 64, 16], [0.8, 0.8, 3.5], 1, 2, 16, 128, False)
    assert topo["kernel_sizes"][0] == [3, 3, 1]  # no 3-wide kernel across 3.5 mm slices at full resolution
    assert topo["strides"][1] == [2, 2, 1]  # in-plane first
    bottleneck = [n // math.prod(s[a] for s in topo["strides"]) for a, n in enumerate([64, 64, 16])]
    assert min(bottleneck) >= 4 and len(topo["strides"]) == len(topo["kernel_sizes"]) == len(topo["features"])


# --------------------------------------------------------------------------- network size formulas
TOPOLOGIES = {
    "3-stage": dict(name="unet", in_channels=4, out_channels=4, kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], features=[8, 16, 32], deep_supervision=False),
    "4-stage-ds": dict(name="unet", in_channels=4, out_channels=4, kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], features=[8, 16, 32, 64], deep_supervision=True),
    "aniso": dict(name="unet", in_channels=1, out_channels=3, kernel_sizes=[[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]], features=[8, 16, 32, 64], deep_supervision=False),
    "aniso-ds-capped": dict(name="unet", in_channels=2, out_channels=5, kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], features=[8, 16, 32, 64, 64], deep_supervision=True),
    "planned-cpu": topology_for_patch([48, 48, 16], [1, 1, 3.5], 4, 4, 16, 128, False),
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_count_parameters_matches_dynunet(name: str) -> None:
    from medseg.networks.unet import build_network

    topo = TOPOLOGIES[name]
    network = build_network(topo)
    assert count_parameters(topo) == sum(p.numel() for p in network.parameters())


def _hooked_activation_elements(topo: dict, patch: list[int]) -> tuple[int, int, int]:
    """(outputs of every leaf module, outputs of torch.cat, network output) for one forward pass."""
    import torch

    from medseg.networks.unet import build_network

    network = build_network(topo).train()
    leaf, cat = [0], [0]
    hooks = [m.register_forward_hook(lambda m, i, o: leaf.__setitem__(0, leaf[0] + o.numel()))
             for m in network.modules() if not list(m.children())]
    real_cat = torch.cat

    def counting_cat(*args, **kwargs):
        out = real_cat(*args, **kwargs)
        cat[0] += out.numel()
        return out

    torch.cat = counting_cat
    try:
        out = network(torch.zeros(1, topo["in_channels"], *patch))
    finally:
        torch.cat = real_cat
        for h in hooks:
            h.remove()
    final = out[:, 0] if out.ndim == 6 else out  # deep supervision stacks the heads: count the full-resolution one
    return leaf[0], cat[0], int(final.numel())


@pytest.mark.parametrize(("name", "patch"), [("3-stage", [16, 16, 16]), ("aniso", [32, 32, 8]), ("4-stage-ds", [32, 32, 16])])
def test_count_activations_against_hooked_forward(name: str, patch: list[int]) -> None:
    """The formula counts conv, norm and activation outputs (leaf modules), the input, the decoder's
    concatenations and the softmax of the logits. Without deep supervision that is exact; with it, the
    extra 1×1×1 heads are left out, which is ≤ 1 % here. Against leaf-module outputs alone it is an
    over-estimate by < 25 % (the input, concatenations and softmax are not module outputs)."""
    topo = TOPOLOGIES[name]
    leaf, cat, logits = _hooked_activation_elements(topo, patch)
    formula = count_activations(topo, patch)
    accounted = leaf + topo["in_channels"] * math.prod(patch) + cat + logits
    if topo["deep_supervision"]:
        assert 0.99 * accounted <= formula <= accounted
    else:
        assert formula == accounted
    assert leaf < formula < 1.25 * leaf


# --------------------------------------------------------------------------- preprocess and restore
def test_preprocess_restore_with_resampling() -> None:
    spacing = [1.0, 1.0, 3.0]
    images, seg = _phantom(spacing=spacing)
    plans = _plans([1.0, 1.0, 1.5])
    data, seg_p, props = preprocess_case(images, seg, spacing, np.diag([*spacing, 1.0]), plans, case_id="c")
    assert data.dtype == np.float32 and seg_p.dtype == np.int8
    assert data.shape[1:] == seg_p.shape
    assert props.shape_after_resample[2] == 2 * props.shape_after_crop[2]  # 3 mm → 1.5 mm
    assert props.shape_after_resample[:2] == props.shape_after_crop[:2]
    assert set(np.unique(seg_p)) == {0, 1, 2, 3}
    # class locations point at voxels of their class
    for value, locations in props.class_locations.items():
        assert locations and all(seg_p[tuple(v)] == int(value) for v in locations)
    # z-scored inside the (resampled) nonzero mask
    assert abs(float(data[0][data[0] != 0].mean())) < 0.05

    back = restore_labels_to_original(seg_p, props)
    assert back.shape == seg.shape
    for value in (1, 2, 3):
        assert _dice(back, seg, value) >= 0.99, value


def test_preprocess_restore_non_integer_upsampling_is_exact() -> None:
    spacing = [1.0, 1.0, 3.0]
    images, seg = _phantom(spacing=spacing)
    data, seg_p, props = preprocess_case(images, seg, spacing, np.eye(4), _plans([0.7, 0.7, 2.2]), case_id="c")
    assert props.shape_after_resample != props.shape_after_crop
    # every original voxel is sampled at least once on the finer grid, so nearest neighbour comes back exactly
    np.testing.assert_array_equal(restore_labels_to_original(seg_p, props), seg)


def test_preprocess_restore_identical_without_resampling() -> None:
    spacing = [1.0, 1.0, 3.0]
    images, seg = _phantom(spacing=spacing)
    data, seg_p, props = preprocess_case(images, seg, spacing, np.eye(4), _plans(spacing), case_id="c")
    assert props.shape_after_resample == props.shape_after_crop
    np.testing.assert_array_equal(restore_labels_to_original(seg_p, props), seg)
    # the crop removed the empty border: the restored map is pasted back in the same place
    assert props.shape_after_crop != list(seg.shape)


@pytest.mark.parametrize("target", [[1.0, 1.0, 3.0], [1.0, 1.0, 1.5]], ids=["same-grid", "resampled"])
def test_restore_to_original_of_one_hot_probabilities(target: list[float]) -> None:
    spacing = [1.0, 1.0, 3.0]
    images, seg = _phantom(spacing=spacing)
    _, seg_p, props = preprocess_case(images, seg, spacing, np.eye(4), _plans(target), case_id="c")
    probabilities = np.eye(4, dtype=np.float32)[seg_p.astype(int)].transpose(3, 0, 1, 2)
    restored = restore_to_original(probabilities, props)
    assert restored.dtype == np.uint8 and restored.shape == seg.shape
    np.testing.assert_array_equal(restored, seg)


def test_preprocess_inference_mode_and_channel_check() -> None:
    images, _ = _phantom()
    plans = _plans([1.0, 1.0, 3.0])
    data, seg_p, props = preprocess_case(images, None, [1.0, 1.0, 3.0], np.eye(4), plans)
    assert seg_p is None and props.class_locations == {}
    assert data.shape[0] == 2
    with pytest.raises(MedsegError, match="expected 2 channels"):
        preprocess_case(images[:1], None, [1.0, 1.0, 3.0], np.eye(4), plans, case_id="one")


# --------------------------------------------------------------------------- the stage on real files
def test_run_preprocessing_writes_plans_and_fold_cases_only(tiny: dict[str, Path]) -> None:
    pre, dataset = tiny["pre"], tiny["dataset"]
    for name in (schemas.PLANS_JSON, schemas.FINGERPRINT_JSON, schemas.DATASET_JSON, schemas.SPLITS_JSON):
        assert (pre / name).is_file(), name
    plans = schemas.Plans.load(pre)
    splits = schemas.Splits.load(pre)
    assert splits == schemas.Splits.load(dataset)
    fold_cases = {c for f in splits.folds for part in ("train", "val") for c in f[part]}
    assert splits.test and not (set(splits.test) & fold_cases)
    assert len(splits.folds) == 2 and len(fold_cases) + len(splits.test) == TINY_CASES

    folder = pre / "3d_fullres"
    expected = {f"{c}{suffix}" for c in fold_cases for suffix in (".npy", "_seg.npy", ".json")}
    assert set(os.listdir(folder)) == expected  # exactly the fold cases, never a test case

    fingerprint = schemas.Fingerprint.load(pre)
    assert sorted(fingerprint.case_ids) == sorted(fold_cases)
    config = plans.configuration()
    assert plans.channel_names == list(BRATS2023.channels) and plans.labels == BRATS2023.labels_dict()
    assert math.prod(config.patch_size) <= 64**3
    for case_id in fold_cases:
        data = np.load(folder / f"{case_id}.npy", mmap_mode="r")
        seg = np.load(folder / f"{case_id}_seg.npy", mmap_mode="r")
        props = schemas.CaseProperties.load(folder / f"{case_id}.json")
        assert data.dtype == np.float32 and seg.dtype == np.int8
        assert data.shape == (4, *seg.shape) and list(seg.shape) == props.shape_after_resample
        assert props.target_spacing == config.spacing and props.case_id == case_id
        assert np.isfinite(data).all()


def test_make_plans_reproduces_written_plans(tiny: dict[str, Path]) -> None:
    pre = tiny["pre"]
    replanned = make_plans(schemas.Fingerprint.load(pre), schemas.DatasetJson.load(pre), "cpu")
    assert replanned.to_dict() == schemas.Plans.load(pre).to_dict()


def test_run_preprocessing_missing_dataset(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(MedsegError, match="dataset folder not found") as err:
        run_preprocessing(missing, tmp_path / "pre", workers=1, progress=False)
    assert err.value.path == str(missing)
    assert not (tmp_path / "pre").exists()


def test_run_preprocessing_bad_budget_leaves_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="device budget"):
        run_preprocessing(tiny["dataset"], tmp_path / "pre", budget="gpu:zero", workers=1, progress=False)
    assert not (tmp_path / "pre").exists()
