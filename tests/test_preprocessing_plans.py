"""Self-configuring preprocessing on crafted datasets: fingerprint → plan → preprocess → invert.

Every dataset here is written directly in the canonical (nnU-Net v2 raw) layout, small enough that the
whole module runs in well under a minute: isotropic MRI-like, anisotropic (1×1×3 mm), CT-like (channel
"CT", Hounsfield units), 2D-like (one slice), mixed spacings (so cases are resampled), and bad inputs.
The reference implementations of the nnU-Net rules in this file are deliberately naive (whole arrays,
no shortcuts) so the fast code is checked against the plain definition.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg import schemas
from medseg.errors import MedsegError
from medseg.io import load_nifti, save_nifti
from medseg.preprocessing.cropping import fill_holes, nonzero_mask
from medseg.preprocessing.fingerprint import compute_fingerprint
from medseg.preprocessing.inversion import original_affine, restore_labels_to_original, restore_to_original
from medseg.preprocessing.locations import sample_class_locations
from medseg.preprocessing.parallel import run_cases
from medseg.preprocessing.planner import CPU_MAX_PATCH_VOXELS, make_plans, plan_patch, target_spacing
from medseg.preprocessing.preprocess import preprocess_case, run_preprocessing
from medseg.preprocessing.resampling import _zoom_exact, cubic_spline_resize, resample, resample_segmentation, separate_z_axis
from medseg.networks.unet import count_activations, estimate_training_memory_gib

MRI = ("t1", "flair")
LABELS = {"background": 0, "edema": 1, "core": 2}


# --------------------------------------------------------------------------- crafted datasets
def phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int, ct: bool = False, radius_mm: float = 22.0):
    """(images C×I×J×K float32, seg uint8): a 'head' ball (background 0 outside, or air −1000 HU for CT)
    with a lesion (label 1) around a core (label 2), in mm so the shapes agree whatever the spacing."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    centre = np.array([n * s / 2 for n, s in zip(shape, spacing)])[:, None, None, None]
    r = np.sqrt(((grid - centre) ** 2).sum(0))
    lesion_centre = centre + np.array([5.0, 3.0, 0.0])[:, None, None, None]
    rl = np.sqrt(((grid - lesion_centre) ** 2).sum(0))
    head = r < radius_mm
    seg = np.zeros(shape, np.uint8)
    seg[(rl < 9) & head] = 1
    seg[(rl < 5) & head] = 2
    if ct:
        img = np.full(shape, -1000.0) + rng.normal(0, 5, shape)
        img[head] = 40 + rng.normal(0, 10, int(head.sum()))
        img[r > radius_mm - 2.5] = np.where(head[r > radius_mm - 2.5], 700.0, img[r > radius_mm - 2.5])  # skull
        img[seg > 0] += 40
        return img[None].astype(np.float32), seg
    t1 = head * (300 + rng.normal(0, 15, shape)) + (seg == 2) * 150
    flair = head * (500 + rng.normal(0, 20, shape)) + (seg > 0) * 250
    return np.stack([t1, flair]).astype(np.float32), seg


def write_dataset(root: Path, cases: list[tuple[np.ndarray, np.ndarray, tuple[float, ...]]], channels=MRI, labels=LABELS, name="Dataset900_Crafted") -> Path:
    """Cases ``(images, seg, spacing)`` → canonical dataset (imagesTr, labelsTr, dataset.json, splits.json
    with every case in the folds)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    ids = []
    for i, (images, seg, spacing) in enumerate(cases):
        case = f"case{i:03d}"
        ids.append(case)
        affine = np.diag([*spacing, 1.0])
        for c in range(images.shape[0]):
            save_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", images[c], affine)
        save_nifti(root / "labelsTr" / f"{case}.nii.gz", seg.astype(np.uint8), affine)
    schemas.DatasetJson(name=name, channel_names={str(i): c for i, c in enumerate(channels)}, labels=dict(labels), numTraining=len(ids)).save(root)
    half = max(1, len(ids) // 2)
    schemas.Splits(test=[], folds=[{"train": ids[half:], "val": ids[:half]}, {"train": ids[:half], "val": ids[half:]}], n_folds=2, test_fraction=0.0).save(root)
    return root


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    pa, pb = a == value, b == value
    return 1.0 if not (pa.any() or pb.any()) else float(2 * (pa & pb).sum() / (pa.sum() + pb.sum()))


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("iso")
    cases = [(*phantom((28, 30, 26), (2.0, 2.0, 2.0), seed=i), (2.0, 2.0, 2.0)) for i in range(4)]
    dataset = write_dataset(root / "dataset", cases)
    run_preprocessing(dataset, root / "pre", budget="cpu", configurations=("3d_fullres", "2d"), workers=1, progress=False)
    return {"dataset": dataset, "pre": root / "pre"}


@pytest.fixture(scope="module")
def mixed_aniso(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Anisotropic 1×1×3 mm cases, plus one at 1×1×3.6 mm (upsampled to the 3 mm target) and one at
    1×1×2 mm (downsampled)."""
    root = tmp_path_factory.mktemp("aniso")
    cases = [(*phantom((48, 50, 16), (1.0, 1.0, 3.0), seed=i), (1.0, 1.0, 3.0)) for i in range(3)]
    cases.append((*phantom((48, 50, 13), (1.0, 1.0, 3.6), seed=8), (1.0, 1.0, 3.6)))
    cases.append((*phantom((48, 50, 24), (1.0, 1.0, 2.0), seed=9), (1.0, 1.0, 2.0)))
    dataset = write_dataset(root / "dataset", cases)
    run_preprocessing(dataset, root / "pre", budget="cpu", workers=1, progress=False)
    return {"dataset": dataset, "pre": root / "pre"}


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_geometry_statistics_and_class_counts(iso: dict[str, Path]) -> None:
    dataset = iso["dataset"]
    ids = [f"case{i:03d}" for i in range(4)]
    fp = compute_fingerprint(dataset, ids, workers=1, progress=False, samples_per_case=5000)
    assert fp.case_ids == ids and fp.shapes == [[28, 30, 26]] * 4 and fp.spacings == [[2.0, 2.0, 2.0]] * 4
    all_images, all_segs = [], []
    for i, case in enumerate(ids):
        images = np.stack([load_nifti(dataset / "imagesTr" / f"{case}_{c:04d}.nii.gz")[0] for c in range(2)])
        seg = load_nifti(dataset / "labelsTr" / f"{case}.nii.gz", dtype=np.float32)[0].astype(np.uint8)
        mask = nonzero_mask(images)
        hits = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        box = [[int(h[0]), int(h[-1]) + 1] for h in hits]
        assert fp.crop_boxes[i] == box
        assert fp.shapes_after_crop[i] == [b - a for a, b in box]
        assert fp.crop_fractions[i] == pytest.approx(math.prod(fp.shapes_after_crop[i]) / math.prod(fp.shapes[i]))
        all_images.append(images)
        all_segs.append(seg)
    # class voxel counts are exact; frequencies sum to 1
    for value in LABELS.values():
        assert fp.class_voxel_counts[str(value)] == sum(int((s == value).sum()) for s in all_segs)
    assert sum(fp.class_frequencies.values()) == pytest.approx(1.0)
    # foreground statistics from 5000 samples per case agree with the exact foreground values
    for c, name in enumerate(MRI):
        exact = np.concatenate([img[c][seg > 0] for img, seg in zip(all_images, all_segs)])
        stats = fp.channels[name]
        assert stats["mean"] == pytest.approx(exact.mean(), rel=0.02)
        assert stats["std"] == pytest.approx(exact.std(), rel=0.1)
        assert stats["median"] == pytest.approx(np.median(exact), rel=0.02)
        assert exact.min() <= stats["min"] <= stats["p00_5"] < stats["p99_5"] <= stats["max"] <= exact.max()
    assert fp.samples_per_case == 5000
    # seeded: the same again, and the same with 2 worker processes
    again = compute_fingerprint(dataset, ids, workers=2, progress=False, samples_per_case=5000)
    assert again.to_dict() == fp.to_dict()


def test_fingerprint_json_is_written_beside_the_plan(iso: dict[str, Path]) -> None:
    pre = iso["pre"]
    fp = schemas.Fingerprint.load(pre)
    plans = schemas.Plans.load(pre)
    assert (pre / schemas.FINGERPRINT_JSON).parent == (pre / schemas.PLANS_JSON).parent
    assert fp.crop_boxes and fp.class_voxel_counts and fp.samples_per_case > 0
    assert make_plans(fp, schemas.DatasetJson.load(pre), "cpu", ("3d_fullres", "2d")).to_dict() == plans.to_dict()


# --------------------------------------------------------------------------- planning
def test_target_spacing_uses_nnunet_anisotropy_rule() -> None:
    spacings = [[0.8, 0.8, 5.0], [0.8, 0.8, 4.0], [0.8, 0.8, 6.0], [0.8, 0.8, 3.0], [0.8, 0.8, 5.0]]
    few_slices = [[200, 200, 30]] * 5
    many_slices = [[200, 200, 100]] * 5
    got = target_spacing(spacings, few_slices)
    assert got[:2] == [0.8, 0.8] and got[2] == pytest.approx(np.percentile([5, 4, 6, 3, 5], 10))
    # as many voxels along the coarse axis as 1/3 of the others: the median stays
    assert target_spacing(spacings, many_slices)[2] == 5.0
    # ratio not above 3 (1×1×3 mm): the median stays
    assert target_spacing([[1, 1, 3]] * 3, [[200, 200, 20]] * 3) == [1.0, 1.0, 3.0]
    # the 10th percentile is never finer than the other axes
    low = target_spacing([[1.0, 1.0, 0.5], [1.0, 1.0, 0.6], [1.0, 1.0, 5.0], [1.0, 1.0, 5.0], [1.0, 1.0, 5.0]], [[200, 200, 20]] * 5)
    assert low[2] == pytest.approx(1.0 + 1e-5)


def _fingerprint(spacing, shape_after_crop, n=10, crop_fraction=0.4, shape=None) -> schemas.Fingerprint:
    return schemas.Fingerprint(spacings=[list(spacing)] * n, shapes_after_crop=[list(shape_after_crop)] * n, shapes=[list(shape or shape_after_crop)] * n,
                               channels={}, class_frequencies={}, case_ids=[f"c{i}" for i in range(n)], crop_fractions=[crop_fraction] * n)


def _dataset_json(channels=MRI) -> schemas.DatasetJson:
    return schemas.DatasetJson(name="D", channel_names={str(i): c for i, c in enumerate(channels)}, labels=dict(LABELS), numTraining=10)


def test_configurations_planned_and_which_are_trained() -> None:
    small = make_plans(_fingerprint([1, 1, 1], [60, 64, 56]), _dataset_json(), "cpu")
    assert set(small.configurations) == {"2d", "3d_fullres"} and small.trained_configurations == ["3d_fullres"]
    # the median image is much larger than the patch: 3d_lowres, at a coarser spacing and a smaller image
    big = make_plans(_fingerprint([0.8, 0.8, 0.8], [200, 220, 180]), _dataset_json(), "cpu", ("3d_fullres", "3d_lowres", "2d"))
    assert list(big.configurations) == ["2d", "3d_fullres", "3d_lowres"] and big.trained_configurations == ["3d_fullres", "3d_lowres", "2d"]
    full, low = big.configuration("3d_fullres"), big.configuration("3d_lowres")
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing))
    assert math.prod(full.median_shape) / math.prod(low.median_shape) >= 2
    assert math.prod(low.patch_size) / math.prod(low.median_shape) >= 0.25 > math.prod(full.patch_size) / math.prod(full.median_shape)
    # 2d: slices along the coarsest axis, kernels and strides 1 along it, patch 1 thick
    aniso = make_plans(_fingerprint([0.9, 0.9, 4.0], [200, 200, 40]), _dataset_json(), "gpu:8", ("2d",))
    two_d = aniso.configuration("2d")
    assert two_d.slice_axis == 2 and two_d.patch_size[2] == 1 and aniso.trained_configurations == ["2d"]
    assert all(k[2] == 1 for k in two_d.network["kernel_sizes"]) and all(s[2] == 1 for s in two_d.network["strides"])
    assert two_d.batch_size > aniso.configuration("3d_fullres").batch_size
    with pytest.raises(MedsegError, match="unknown configuration"):
        make_plans(_fingerprint([1, 1, 1], [60, 64, 56]), _dataset_json(), "cpu", ("3d_cascade",))


@pytest.mark.parametrize("budget", ["gpu:2", "gpu:4", "gpu:8", "gpu:11.5"])
def test_every_planned_configuration_fits_the_gpu_budget(budget: str) -> None:
    plans = make_plans(_fingerprint([0.7, 0.7, 1.0], [240, 240, 150], n=30), _dataset_json(), budget)
    gib = float(budget.split(":")[1])
    for name, config in plans.configurations.items():
        c = schemas.Configuration(**config)
        # the recorded estimate is the estimate of the recorded patch and batch, and it is within the budget
        assert c.estimated_memory_gib == pytest.approx(estimate_training_memory_gib(c.network, c.patch_size, c.batch_size, 2), abs=1e-3)
        assert c.estimated_memory_gib <= gib, name
        assert c.batch_size >= 2
        # one batch covers at most 5 % of the dataset's voxels (unless that is below the minimum batch of 2)
        assert c.batch_size == 2 or c.batch_size * math.prod(c.patch_size) <= 0.05 * 30 * math.prod(c.median_shape) * 1.5


def test_cpu_budget_bounds_patch_voxels_and_activation_formula() -> None:
    plans = make_plans(_fingerprint([1, 1, 1], [180, 200, 170]), _dataset_json(), "cpu", ("3d_fullres", "2d"))
    full, two_d = plans.configuration("3d_fullres"), plans.configuration("2d")
    assert math.prod(full.patch_size) <= CPU_MAX_PATCH_VOXELS["3d"] and full.batch_size == 2
    assert math.prod(two_d.patch_size) <= CPU_MAX_PATCH_VOXELS["2d"] and two_d.batch_size == 12
    # on CPU the estimate counts fp32 activations of the planned network
    acts = count_activations(full.network, full.patch_size)
    assert full.estimated_memory_gib == pytest.approx(estimate_training_memory_gib(full.network, full.patch_size, 2, 4), abs=1e-3)
    assert acts * 2 * 4 / 2**30 < full.estimated_memory_gib


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA: the real peak memory of a planned training step")
def test_planned_gpu_configuration_fits_real_memory() -> None:
    """One fp16 training step of the planned network on the GPU: the measured peak stays under the budget
    and under the planner's estimate (which the planner relies on being an upper bound)."""
    import torch

    from medseg.networks.unet import build_network

    config = plan_patch([160, 192, 160], [1.0, 1.0, 1.0], 4, 4, "gpu:4")
    net = build_network(config["network"]).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    torch.cuda.reset_peak_memory_stats()
    x = torch.randn(config["batch_size"], 4, *config["patch_size"], device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = net(x)
        loss = out.float().mean()
    loss.backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert peak <= 4.0, f"peak {peak:.2f} GiB over the 4 GiB budget"
    assert peak <= config["estimated_memory_gib"], f"peak {peak:.2f} GiB over the estimate {config['estimated_memory_gib']} GiB"


def test_normalisation_schemes_from_channel_names_and_mask_rule() -> None:
    names = ("CT", "t2", "noNorm", "rescale_0_1")
    fp = _fingerprint([1, 1, 1], [60, 64, 56], crop_fraction=0.74)
    fp.channels = {"CT": {"mean": 40.0, "std": 200.0, "p00_5": -900.0, "p99_5": 1200.0, "min": -1000.0, "max": 3000.0, "median": 35.0}}
    plans = make_plans(fp, _dataset_json(names), "cpu")
    schemes = {n["channel"]: n for n in plans.normalization}
    assert {k: v["scheme"] for k, v in schemes.items()} == {"CT": "ct", "t2": "zscore_nonzero", "noNorm": "none", "rescale_0_1": "rescale"}
    assert (schemes["CT"]["mean"], schemes["CT"]["std"], schemes["CT"]["lower"], schemes["CT"]["upper"]) == (40.0, 200.0, -900.0, 1200.0)
    assert plans.use_nonzero_mask
    # cropping kept ≥ 75 % of the voxels: nnU-Net does not use the mask, z-score over the image
    fp.crop_fractions = [0.76] * 10
    unmasked = make_plans(fp, _dataset_json(names), "cpu")
    assert not unmasked.use_nonzero_mask and unmasked.normalization[1]["scheme"] == "zscore"


# --------------------------------------------------------------------------- preprocess
def test_isotropic_dataset_preprocessed_and_read_by_the_sampler(iso: dict[str, Path]) -> None:
    from medseg.training.sampler import PatchSampler, PreprocessedCase

    pre = iso["pre"]
    plans = schemas.Plans.load(pre)
    assert plans.trained_configurations == ["3d_fullres", "2d"] and plans.use_nonzero_mask
    assert plans.configuration("3d_fullres").spacing == [2.0, 2.0, 2.0]
    full, two_d = pre / "3d_fullres", pre / "2d"
    case = "case000"
    # no resampling needed: 2d and 3d_fullres share the same files (hard links, not copies)
    assert (full / f"{case}.npy").stat().st_ino == (two_d / f"{case}.npy").stat().st_ino
    data = np.load(full / f"{case}.npy", mmap_mode="r")
    seg = np.load(full / f"{case}_seg.npy", mmap_mode="r")
    props = schemas.CaseProperties.load(full / f"{case}.json")
    assert isinstance(data, np.memmap) and data.dtype == np.float32 and seg.dtype == np.int8
    assert data.shape[1:] == seg.shape and list(seg.shape) == props.shape_after_crop == props.shape_after_resample
    # z-scored inside the nonzero mask, exactly 0 outside it
    inside = np.asarray(data[0]) != 0
    assert abs(float(np.asarray(data[0])[inside].mean())) < 1e-3 and abs(float(np.asarray(data[0])[inside].std()) - 1) < 1e-3
    # class locations: bounded, on their class, and what the sampler centres foreground patches on
    for value, locations in props.class_locations.items():
        assert 0 < len(locations) <= 2000 and all(seg[tuple(v)] == int(value) for v in locations)
    cases = [PreprocessedCase(full, f"case{i:03d}") for i in range(4)]
    sampler = PatchSampler(cases, [16, 16, 16], batch_size=4, foreground_share=1.0, mirror=False, seed=0)
    images, labels = sampler.sample()
    assert images.shape == (4, 2, 16, 16, 16) and labels.shape == (4, 1, 16, 16, 16)
    assert all(labels[b, 0, 8, 8, 8] > 0 for b in range(4))  # every patch centred on a foreground voxel


def test_workers_do_not_change_the_result(iso: dict[str, Path], tmp_path: Path) -> None:
    run_preprocessing(iso["dataset"], tmp_path / "pre2", budget="cpu", configurations=("3d_fullres", "2d"), workers=2, progress=False)
    for name in ("case000.npy", "case001_seg.npy", "case002.json"):
        assert (tmp_path / "pre2" / "3d_fullres" / name).read_bytes() == (iso["pre"] / "3d_fullres" / name).read_bytes()


def test_edited_plan_changes_a_channel_normalisation(iso: dict[str, Path], tmp_path: Path) -> None:
    plan_file = iso["pre"] / schemas.PLANS_JSON
    edited = json.loads(plan_file.read_text())
    edited["normalization"][1]["scheme"] = "none"
    edited["normalization"][0]["scheme"] = "rescale"
    edited_file = tmp_path / "edited" / schemas.PLANS_JSON
    edited_file.parent.mkdir()
    edited_file.write_text(json.dumps(edited))
    timings: dict = {}
    run_preprocessing(iso["dataset"], tmp_path / "pre", configurations=("3d_fullres",), workers=1, progress=False, plans=edited_file, timings=timings)
    assert timings["fingerprint_s"] == 0.0 and timings["preprocess_s"] > 0
    data = np.load(tmp_path / "pre" / "3d_fullres" / "case000.npy")
    props = schemas.CaseProperties.load(tmp_path / "pre" / "3d_fullres" / "case000.json")
    raw = load_nifti(iso["dataset"] / "imagesTr" / "case000_0001.nii.gz")[0]
    box = tuple(slice(a, b) for a, b in props.crop_bbox)
    np.testing.assert_array_equal(data[1], raw[box])  # "none": the cropped raw values
    assert data[0].min() == 0.0 and data[0].max() == pytest.approx(1.0)  # "rescale": [0, 1]
    assert schemas.Plans.load(tmp_path / "pre").normalization[1]["scheme"] == "none"
    edited["normalization"][1]["scheme"] = "minmax"
    edited_file.write_text(json.dumps(edited))
    with pytest.raises(MedsegError, match="unknown normalisation scheme 'minmax'"):
        run_preprocessing(iso["dataset"], tmp_path / "pre3", workers=1, progress=False, plans=edited_file)


def _restored_both_ways(pre: Path, case: str, n_classes: int = 3):
    props = schemas.CaseProperties.load(pre / "3d_fullres" / f"{case}.json")
    seg_p = np.load(pre / "3d_fullres" / f"{case}_seg.npy")
    probabilities = np.eye(n_classes, dtype=np.float32)[np.clip(seg_p, 0, None).astype(int)].transpose(3, 0, 1, 2)
    return props, restore_labels_to_original(seg_p, props), restore_to_original(probabilities, props)


def test_anisotropic_dataset_resamples_with_separate_z_and_inverts(mixed_aniso: dict[str, Path]) -> None:
    dataset, pre = mixed_aniso["dataset"], mixed_aniso["pre"]
    config = schemas.Plans.load(pre).configuration("3d_fullres")
    assert config.spacing == [1.0, 1.0, 3.0] and config.seg_resampling == "linear"

    def reference(case: str) -> tuple[np.ndarray, np.ndarray]:
        ref, affine, _ = load_nifti(dataset / "labelsTr" / f"{case}.nii.gz", dtype=np.float32)
        return ref.astype(np.uint8), affine

    # 3.6 mm slices onto the 3 mm grid: separate z (ratio 3.6 > 3), and back with Dice ≥ 0.99 per label
    props, back, back_prob = _restored_both_ways(pre, "case003")
    assert separate_z_axis(props.original_spacing, props.target_spacing) == 2
    assert props.shape_after_resample[2] == round(props.shape_after_crop[2] * 3.6 / 3) and props.shape_after_resample[:2] == props.shape_after_crop[:2]
    ref, affine = reference("case003")
    np.testing.assert_allclose(original_affine(props), affine)  # the original grid, written with the original affine
    for restored in (back, back_prob):
        assert restored.shape == ref.shape and restored.dtype == np.uint8
        assert min(dice(restored, ref, 1), dice(restored, ref, 2)) >= 0.99
    # 2 mm slices onto the 3 mm grid lose what lies between kept slices: the lesion still comes back
    props, back, back_prob = _restored_both_ways(pre, "case004")
    ref, _ = reference("case004")
    assert props.shape_after_resample[2] < props.shape_after_crop[2]
    for restored in (back, back_prob):
        assert dice(restored > 0, ref > 0, True) >= 0.9
    # cases already at the target spacing come back identical
    _, back, back_prob = _restored_both_ways(pre, "case000")
    np.testing.assert_array_equal(back, reference("case000")[0])
    np.testing.assert_array_equal(back_prob, reference("case000")[0])


def test_strongly_anisotropic_case_inverts_with_dice_099() -> None:
    spacing = [0.8, 0.8, 4.0]
    images, seg = phantom((60, 60, 14), tuple(spacing), seed=3, radius_mm=22)
    config = plan_patch([60, 60, 20], [0.8, 0.8, 2.5], 2, 3, "cpu")
    plans = schemas.Plans(dataset_name="t", device_budget="cpu", channel_names=list(MRI), labels=dict(LABELS), regions={},
                          normalization=[{"channel": c, "scheme": "zscore_nonzero"} for c in MRI], configurations={"3d_fullres": config})
    data, seg_p, props = preprocess_case(images, seg, spacing, np.diag([*spacing, 1]), plans, case_id="a")
    assert separate_z_axis(spacing, props.target_spacing) == 2
    assert props.shape_after_resample[2] == round(props.shape_after_crop[2] * 4 / 2.5)
    back = restore_labels_to_original(seg_p, props)
    assert dice(back > 0, seg > 0, True) >= 0.99 and dice(back, seg, 1) >= 0.97


def test_ct_dataset_clips_and_uses_dataset_statistics(tmp_path: Path) -> None:
    cases = [(*phantom((26, 28, 24), (1.5, 1.5, 1.5), seed=i, ct=True), (1.5, 1.5, 1.5)) for i in range(3)]
    dataset = write_dataset(tmp_path / "ct", cases, channels=("CT",))
    plans = run_preprocessing(dataset, tmp_path / "pre", workers=1, progress=False)
    spec = plans.normalization[0]
    assert spec["scheme"] == "ct" and not plans.use_nonzero_mask  # air is nonzero: the crop keeps everything
    assert -1000 < spec["lower"] < 100 < spec["upper"] <= 800 and 40 < spec["mean"] < 500  # foreground HU
    data = np.load(tmp_path / "pre" / "3d_fullres" / "case000.npy")[0]
    raw = cases[0][0][0]
    expected = (np.clip(raw, spec["lower"], spec["upper"]) - spec["mean"]) / spec["std"]
    np.testing.assert_allclose(data, expected, atol=1e-5)


def test_two_d_like_dataset_plans_and_preprocesses_2d_only(tmp_path: Path) -> None:
    cases = []
    for i in range(3):
        images, seg = phantom((40, 44, 1), (1.0, 1.0, 5.0), seed=i)
        cases.append((images, seg, (1.0, 1.0, 5.0)))
    dataset = write_dataset(tmp_path / "slices", cases)
    plans = run_preprocessing(dataset, tmp_path / "pre", workers=1, progress=False)  # asks for 3d_fullres
    assert list(plans.configurations) == ["2d"] and plans.default_configuration == "2d" and plans.trained_configurations == ["2d"]
    config = plans.configuration("2d")
    assert config.slice_axis == 2 and config.patch_size[2] == 1
    data = np.load(tmp_path / "pre" / "2d" / "case000.npy")
    assert data.shape[0] == 2 and data.shape[3] == 1


def test_budget_is_respected_on_a_real_dataset(mixed_aniso: dict[str, Path], tmp_path: Path) -> None:
    plans = run_preprocessing(mixed_aniso["dataset"], tmp_path / "pre", budget="gpu:0.5", workers=1, progress=False)
    for name, config in plans.configurations.items():
        assert config["estimated_memory_gib"] <= 0.5, name


# --------------------------------------------------------------------------- bad inputs
def test_zero_spacing_is_rejected_naming_case_and_file(tmp_path: Path) -> None:
    cases = [(*phantom((20, 20, 20), (2.0, 2.0, 2.0), seed=i), (2.0, 2.0, 2.0)) for i in range(2)]
    dataset = write_dataset(tmp_path / "ds", cases)
    bad = dataset / "imagesTr" / "case001_0000.nii.gz"
    img = nib.Nifti1Image(cases[1][0][0], None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(np.diag([2.0, 0.0, 2.0, 1.0]), code=1)
    nib.save(img, bad)
    with pytest.raises(MedsegError, match=r"case case001: voxel spacing \(2.0, 0.0, 2.0\) mm is not usable") as err:
        run_preprocessing(dataset, tmp_path / "pre", workers=2, progress=False)
    assert err.value.path == str(bad)
    assert not (tmp_path / "pre").exists()
    with pytest.raises(MedsegError, match="case x: voxel spacing"):
        preprocess_case(cases[0][0], None, [2.0, 0.0, 2.0], np.eye(4), schemas.Plans.load(_planned(tmp_path, cases)), case_id="x")


def _planned(tmp_path: Path, cases) -> Path:
    dataset = write_dataset(tmp_path / "good", cases)
    run_preprocessing(dataset, tmp_path / "good-pre", workers=1, progress=False)
    return tmp_path / "good-pre"


def test_all_zero_channel_is_rejected_naming_case_and_file(tmp_path: Path) -> None:
    cases = [(*phantom((20, 20, 20), (2.0, 2.0, 2.0), seed=i), (2.0, 2.0, 2.0)) for i in range(2)]
    cases[1][0][1] = 0  # case001's flair is empty
    dataset = write_dataset(tmp_path / "ds", cases)
    with pytest.raises(MedsegError, match=r"case case001: channel 1 \(flair\) is all zero") as err:
        run_preprocessing(dataset, tmp_path / "pre", workers=1, progress=False)
    assert err.value.path == str(dataset / "imagesTr" / "case001_0001.nii.gz")
    assert not (tmp_path / "pre").exists()


def test_mismatched_label_shape_is_rejected(tmp_path: Path) -> None:
    cases = [(*phantom((20, 20, 20), (2.0, 2.0, 2.0), seed=i), (2.0, 2.0, 2.0)) for i in range(2)]
    dataset = write_dataset(tmp_path / "ds", cases)
    save_nifti(dataset / "labelsTr" / "case000.nii.gz", np.zeros((20, 20, 19), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(MedsegError, match=r"case case000: label shape \(20, 20, 19\) differs"):
        run_preprocessing(dataset, tmp_path / "pre", workers=1, progress=False)


# --------------------------------------------------------------------------- the building blocks against plain definitions
def _naive_labels_linear(seg: np.ndarray, new_shape: tuple[int, ...], outside: np.ndarray | None = None) -> np.ndarray:
    """nnU-Net 2.8's rule on whole arrays: argmax of each label's linearly resized indicator (the outside
    of the nonzero mask a label of its own), exact ties to the nearest-neighbour label when it is tied."""
    s = seg.astype(np.int16)
    if outside is not None:
        s[outside & (s == 0)] = -1
    nearest = _zoom_exact(s, new_shape, 0)
    labels = np.unique(s)
    zoom = [n / o for n, o in zip(new_shape, seg.shape)]
    scores = np.stack([ndimage.zoom((s == v).astype(float), zoom, order=1, mode="nearest", grid_mode=True) for v in labels])
    best, winner = scores.max(0), labels[scores.argmax(0)]
    nearest_score = np.take_along_axis(scores, np.searchsorted(labels, nearest)[None], 0)[0]
    return np.maximum(np.where((nearest_score == best) & (best > 0), nearest, winner), 0).astype(seg.dtype)


def test_linear_label_resampling_matches_the_plain_definition() -> None:
    rng = np.random.default_rng(0)
    for trial in range(25):
        shape = tuple(int(x) for x in rng.integers(8, 24, 3))
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
        seg = np.zeros(shape, np.uint8)
        for value in (1, 2, 3):
            centre = rng.integers(0, shape, 3)[:, None, None, None]
            seg[((grid - centre) ** 2).sum(0) < rng.integers(1, 6) ** 2] = value
        outside = (((grid - rng.integers(0, shape, 3)[:, None, None, None]) ** 2).sum(0) > rng.integers(3, 10) ** 2) & (seg == 0)
        # even factors (exact ties at every border) and arbitrary ones
        new_shape = tuple(n * 2 if a == 1 else n // 2 + 1 for a, n in enumerate(shape)) if trial % 3 == 0 else tuple(int(x) for x in rng.integers(5, 30, 3))
        for out in (None, outside):
            np.testing.assert_array_equal(resample_segmentation(seg, new_shape, "linear", outside=out), _naive_labels_linear(seg, new_shape, out))
    with pytest.raises(ValueError, match="unknown segmentation resampling"):
        resample_segmentation(seg, (4, 4, 4), "cubic")


def test_nearest_label_resampling_is_a_plan_option() -> None:
    images, seg = phantom((40, 40, 12), (1.0, 1.0, 3.0), seed=0)
    config = plan_patch([40, 40, 24], [0.8, 0.8, 2.0], 2, 3, "cpu")
    linear_plans = schemas.Plans(dataset_name="t", device_budget="cpu", channel_names=list(MRI), labels=dict(LABELS), regions={},
                                 normalization=[{"channel": c, "scheme": "zscore_nonzero"} for c in MRI], configurations={"3d_fullres": config})
    nearest_plans = schemas.Plans.from_dict(json.loads(json.dumps(linear_plans.to_dict())))
    nearest_plans.configurations["3d_fullres"]["seg_resampling"] = "nearest"
    _, seg_linear, props = preprocess_case(images, seg, [1, 1, 3], np.eye(4), linear_plans)
    _, seg_nearest, _ = preprocess_case(images, seg, [1, 1, 3], np.eye(4), nearest_plans)
    box = tuple(slice(a, b) for a, b in props.crop_bbox)
    np.testing.assert_array_equal(seg_nearest, resample(np.ascontiguousarray(seg[box]), props.shape_after_resample, order=0))
    assert not np.array_equal(seg_linear, seg_nearest)


def test_image_resampling_keeps_the_value_range_and_separate_z() -> None:
    vol = np.zeros((12, 12, 6), np.float32)
    vol[4:8, 4:8, :] = 100.0  # a sharp edge: a cubic spline overshoots it
    out = resample(vol, (29, 29, 6), order=3)
    assert out.min() >= 0.0 and out.max() <= 100.0
    out_z = resample(vol, (20, 20, 15), order=3, anisotropic_axis=2)
    assert np.array_equal(out_z[:, :, 0], out_z[:, :, 1])  # nearest neighbour between slices
    assert separate_z_axis([1, 1, 4], [1, 1, 2]) == 2 and separate_z_axis([1, 1, 1], [1, 1, 3.5]) == 2
    assert separate_z_axis([0.24, 1.25, 1.25], [1, 1, 1]) is None  # two coarsest axes: no single slice axis


def test_separable_cubic_spline_equals_scipy_zoom() -> None:
    """The fast spline is scipy's ``zoom(order=3, mode="nearest", grid_mode=True)`` clipped to the input range
    (nnU-Net's resize), and its separate-z form is the per-slice 2D spline clipped per slice."""
    rng = np.random.default_rng(0)
    for shape, new_shape in [((30, 28, 26), (41, 19, 26)), ((17, 23, 9), (9, 40, 13)), ((1, 20, 20), (3, 31, 20))]:
        vol = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.0).astype(np.float32)
        vol[:, 2:6, :] += 4.0
        ref = ndimage.zoom(vol, [n / o for n, o in zip(new_shape, shape)], order=3, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(cubic_spline_resize(vol, new_shape), np.clip(ref, vol.min(), vol.max()), atol=1e-6)
    vol = ndimage.gaussian_filter(rng.normal(0, 1, (30, 28, 9)), 1.0).astype(np.float32)
    got = resample(vol, (41, 19, 20), order=3, anisotropic_axis=2)
    slices = []
    for k in range(vol.shape[2]):
        plane = ndimage.zoom(vol[:, :, k], (41 / 30, 19 / 28), order=3, mode="nearest", grid_mode=True)
        slices.append(np.clip(plane, vol[:, :, k].min(), vol[:, :, k].max()))
    per_slice = np.stack(slices, axis=2).astype(np.float32)
    np.testing.assert_allclose(got, _zoom_exact(per_slice, (41, 19, 20), 0), atol=1e-6)


def test_nonzero_mask_fills_holes_and_class_locations_are_seeded() -> None:
    images = np.zeros((2, 12, 12, 12), np.float32)
    images[0, 2:10, 2:10, 2:10] = 1
    images[0, 5:7, 5:7, 5:7] = 0  # a hole enclosed by tissue: inside the mask (nnU-Net's create_nonzero_mask)
    images[1, 0, 0, 0] = 3  # a second channel's voxel counts too
    mask = nonzero_mask(images)
    assert mask[5:7, 5:7, 5:7].all() and mask[0, 0, 0] and not mask[11, 11, 11]
    np.testing.assert_array_equal(fill_holes(images[0] != 0), ndimage.binary_fill_holes(images[0] != 0))
    seg = np.zeros((30, 30, 30), np.uint8)
    seg[5:25, 5:25, 5:25] = 1
    seg[10:12, 10:12, 10:12] = 2
    a = sample_class_locations(seg, [0, 1, 2, 3], np.random.default_rng([0, 7]), max_per_label=100)
    b = sample_class_locations(seg, [0, 1, 2, 3], np.random.default_rng([0, 7]), max_per_label=100)
    assert a == b and set(a) == {"1", "2", "3"} and a["3"] == []
    assert len(a["1"]) == 100 and len(a["2"]) == 8 and all(seg[tuple(v)] == 1 for v in a["1"])


def _fail_on_two(x: int) -> int:
    if x == 2:
        raise MedsegError(f"case {x} is bad")
    return x * 10


def test_run_cases_keeps_job_order_and_raises_the_first_failure() -> None:
    assert run_cases(_fail_on_two, [0, 1, 3, 4], workers=2, desc="t", progress=False) == [0, 10, 30, 40]
    with pytest.raises(MedsegError, match="case 2 is bad"):
        run_cases(_fail_on_two, [0, 1, 2, 3], workers=2, desc="t", progress=False)


def test_the_pooled_intensity_sample_is_capped_so_memory_does_not_grow_with_the_cases() -> None:
    """nnU-Net draws 10⁸ / n_cases voxels per case; we draw 10⁴ per case up to 50 cases, then fewer, so the pooled
    sample held until the statistics are taken stays at MAX_SAMPLES per channel (benchmarks/scale.py measured the
    uncapped sample growing the preprocessing process by ~0.16 MB per case)."""
    from medseg.preprocessing.fingerprint import MAX_SAMPLES, SAMPLES_PER_CASE, capped_samples_per_case

    assert capped_samples_per_case(6) == SAMPLES_PER_CASE and capped_samples_per_case(50) == SAMPLES_PER_CASE
    for n in (51, 200, 1251, 10_000):
        assert MAX_SAMPLES - n < capped_samples_per_case(n) * n <= MAX_SAMPLES  # flat in n
    assert capped_samples_per_case(1251) == 399
    assert capped_samples_per_case(10**7) == 1  # every case still seen
    assert capped_samples_per_case(200, wanted=5000) == 2500
