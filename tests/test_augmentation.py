"""On-the-fly augmentation: shapes, dtypes and label sets kept, seeded, each transform active at p = 1 and
inert at p = 0, geometry (labels stay aligned with the image), and the sampler's optional use of it."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.training import augmentation
from medseg.training.augmentation import (
    Compose,
    Contrast,
    Gamma,
    GaussianBlur,
    LazyBatch,
    GaussianNoise,
    Mirror,
    MultiplicativeBrightness,
    SimulateLowResolution,
    SpatialTransform,
    default_augmentation,
    gaussian_smooth,
)
from medseg.training.sampler import PatchSampler, _padded_crop, _Windows


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(size=(16, 16, 16), b: int = 2, c: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij"))
    smooth = np.sin(3 * grid[0]) + np.cos(2 * grid[1]) + (grid[2] if len(size) == 3 else 0)  # structure for blur / low-res to act on
    img = (smooth[None, None] + 0.3 * g.normal(size=(b, c, *size))).astype(np.float32)
    lab = np.zeros((b, 1, *size), np.int64)
    lab[(slice(None), 0, *[slice(s // 4, s // 2 + 1) for s in size])] = 1
    lab[(slice(None), 0, *[slice(s // 3, s // 2) for s in size])] = 3
    return torch.from_numpy(img), torch.from_numpy(lab)


FORCED = {
    "noise": lambda: GaussianNoise(p=1.0),
    "blur": lambda: GaussianBlur(p=1.0, p_per_channel=1.0),
    "brightness": lambda: MultiplicativeBrightness(p=1.0),
    "contrast": lambda: Contrast(p=1.0),
    "low_resolution": lambda: SimulateLowResolution(p=1.0, p_per_channel=1.0),
    "gamma": lambda: Gamma(p=1.0),
    "gamma_inverted": lambda: Gamma(invert=True, p=1.0),
    "mirror": lambda: Mirror(p=1.0),
    "rotation": lambda: SpatialTransform([16, 16, 16], p_rotation=1.0, p_scaling=0.0),
    "scaling": lambda: SpatialTransform([16, 16, 16], p_rotation=0.0, p_scaling=1.0),
    "elastic": lambda: SpatialTransform([16, 16, 16], p_rotation=0.0, p_scaling=0.0, p_elastic=1.0),
}
OFF = {
    "noise": lambda: GaussianNoise(p=0.0),
    "blur": lambda: GaussianBlur(p=0.0),
    "brightness": lambda: MultiplicativeBrightness(p=0.0),
    "contrast": lambda: Contrast(p=0.0),
    "low_resolution": lambda: SimulateLowResolution(p=0.0),
    "gamma": lambda: Gamma(p=0.0),
    "mirror": lambda: Mirror(p=0.0),
    "spatial": lambda: SpatialTransform([16, 16, 16], p_rotation=0.0, p_scaling=0.0, p_elastic=0.0),
}


@pytest.mark.parametrize("name", list(FORCED))
def test_each_transform_changes_the_image_when_forced(name: str) -> None:
    img, lab = _batch()
    out, out_lab = FORCED[name]()(img.clone(), lab.clone(), np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == img.dtype and out_lab.dtype == lab.dtype
    diff = (out - img).abs().mean(dim=(1, 2, 3, 4))
    assert (diff > 1e-3).all(), f"{name} left a sample unchanged: {diff.tolist()}"
    assert set(out_lab.unique().tolist()) <= {0, 1, 3}
    if name in ("noise", "blur", "brightness", "contrast", "low_resolution", "gamma", "gamma_inverted"):
        assert torch.equal(out_lab, lab)  # intensity transforms never touch labels


@pytest.mark.parametrize("name", list(OFF))
def test_each_transform_is_identity_when_off(name: str) -> None:
    img, lab = _batch()
    out, out_lab = OFF[name]()(img.clone(), lab.clone(), np.random.default_rng(1))
    assert torch.equal(out, img) and torch.equal(out_lab, lab)


def test_intensity_transforms_keep_what_they_promise() -> None:
    img, lab = _batch()
    rng = np.random.default_rng(2)
    out, _ = Contrast(p=1.0)(img.clone(), lab, rng)
    assert (out.amin(dim=(2, 3, 4)) >= img.amin(dim=(2, 3, 4)) - 1e-6).all() and (out.amax(dim=(2, 3, 4)) <= img.amax(dim=(2, 3, 4)) + 1e-6).all()
    out, _ = Gamma(p=1.0)(img.clone(), lab, rng)  # retain_stats: mean and std per channel kept
    torch.testing.assert_close(out.mean(dim=(2, 3, 4)), img.mean(dim=(2, 3, 4)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.std(dim=(2, 3, 4)), img.std(dim=(2, 3, 4)), atol=1e-4, rtol=1e-4)
    ratio = MultiplicativeBrightness(p=1.0)(img.clone(), lab, np.random.default_rng(3))[0] / img
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1], atol=1e-4)  # one factor per channel
    assert ((per_channel[..., 0] >= 0.75 - 1e-6) & (per_channel[..., 0] <= 1.25 + 1e-6)).all()


def test_gaussian_smooth_preserves_constants_and_mass() -> None:
    x = torch.full((1, 1, 9, 9, 9), 2.0)
    torch.testing.assert_close(gaussian_smooth(x, [1.0, 0.7, 0.5]), x)
    delta = torch.zeros(1, 1, 21, 21)
    delta[0, 0, 10, 10] = 1
    y = gaussian_smooth(delta, [2.0, 2.0], mode="constant")
    torch.testing.assert_close(y.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert y[0, 0, 10, 10] < 0.1 and y[0, 0, 10, 12] > 0


# --------------------------------------------------------------------------- the default pipeline
def test_default_pipeline_shapes_dtypes_labels_and_seed() -> None:
    aug = default_augmentation([16, 16, 16])
    assert all(i >= p for i, p in zip(aug.input_size, [16, 16, 16])) and max(aug.input_size) > 16
    img, lab = _batch(tuple(aug.input_size), b=4)
    img_np, lab_np = img.numpy(), lab.numpy().astype(np.int8)
    a = aug(img_np, lab_np, np.random.default_rng(7))
    b = aug(img_np, lab_np, np.random.default_rng(7))
    c = aug(img_np, lab_np, np.random.default_rng(8))
    assert isinstance(a[0], np.ndarray) and a[0].shape == (4, 2, 16, 16, 16) and a[0].dtype == np.float32
    assert a[1].shape == (4, 1, 16, 16, 16) and a[1].dtype == np.int8
    assert set(np.unique(a[1])) <= {0, 1, 3}
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    t_img, t_lab = aug(img, lab, np.random.default_rng(7))  # torch in, torch out
    assert isinstance(t_img, torch.Tensor) and t_lab.dtype == torch.int64
    np.testing.assert_array_equal(t_img.numpy(), a[0])


def test_default_pipeline_follows_nnunet_probabilities() -> None:
    aug = default_augmentation([16, 16, 16])
    probs = {type(t).__name__ + ("_inv" if getattr(t, "invert", False) else ""): t.p for t in aug.transforms}
    assert probs == {"SpatialTransform": 1.0, "GaussianNoise": 0.1, "GaussianBlur": 0.2, "MultiplicativeBrightness": 0.15, "Contrast": 0.15,
                     "SimulateLowResolution": 0.25, "Gamma_inv": 0.1, "Gamma": 0.3, "Mirror": 0.5}
    spatial = aug.transforms[0]
    assert spatial.p_rotation == 0.2 and spatial.p_scaling == 0.2 and spatial.p_elastic == 0.0
    assert spatial.rotation == pytest.approx((-math.pi / 6, math.pi / 6)) and spatial.scaling == (0.7, 1.4)


def test_2d_pipelines() -> None:
    aug = default_augmentation([16, 24])  # a 2D patch: in-plane ±180° (aspect 1.5: not above)
    assert aug.transforms[0].rotation == pytest.approx((-math.pi, math.pi))
    img, lab = _batch(tuple(aug.input_size), b=2)
    out, out_lab = aug(img, lab, np.random.default_rng(0))
    assert out.shape == (2, 2, 16, 24) and out_lab.shape == (2, 1, 16, 24)
    # one-slice 3D patches: 2D augmentation that never rotates, scales or resamples the slice axis
    slab = default_augmentation([16, 16, 1])
    assert slab.input_size[2] == 1 and slab.transforms[0].rotation_axes == [2]
    img, lab = _batch((*slab.input_size[:2], 1), b=3)
    rng = np.random.default_rng(1)
    for _ in range(3):
        out, out_lab = slab(img, lab, rng)
        assert out.shape == (3, 2, 16, 16, 1) and set(out_lab.unique().tolist()) <= {0, 1, 3}


# --------------------------------------------------------------------------- geometry
def test_quarter_turn_matches_rot90() -> None:
    img, lab = _batch((15, 15, 15), b=1)
    quarter = SpatialTransform([15, 15, 15], rotation=(math.pi / 2, math.pi / 2), rotation_axes=[2], p_rotation=1.0, p_scaling=0.0)
    out, out_lab = quarter(img, lab, np.random.default_rng(0))
    candidates = [torch.rot90(img, k, dims=(2, 3)) for k in (1, -1)]
    assert any(torch.allclose(out, c, atol=1e-4) for c in candidates)
    assert any(torch.equal(out_lab, torch.rot90(lab, k, dims=(2, 3))) for k in (1, -1))
    assert not torch.allclose(out, img, atol=1e-2)


def test_mirroring_and_rotation_keep_a_labelled_cube_aligned_with_the_image() -> None:
    size = (24, 24, 24)
    lab = torch.zeros(4, 1, *size, dtype=torch.int64)
    lab[:, :, 4:12, 6:13, 3:11] = 2  # off-centre, so mirroring moves it
    img = (lab == 2).float().repeat(1, 2, 1, 1, 1)
    img[:, 1] *= 3.0
    aug = Compose([SpatialTransform([16, 16, 16], rotation=(-math.pi / 6, math.pi / 6), p_rotation=1.0, scaling=(0.8, 1.2), p_scaling=1.0), Mirror(p=1.0)])
    out, out_lab = aug(img, lab, np.random.default_rng(3))
    assert out.shape == (4, 2, 16, 16, 16) and set(out_lab.unique().tolist()) <= {0, 2}
    centre = lab[:, :, 4:20, 4:20, 4:20]
    for b in range(4):
        inside = out_lab[b, 0] == 2
        assert inside.sum() > 50 and not torch.equal(out_lab[b], centre[b])  # transformed, not lost
        bright = out[b, 0] > 0.5
        dice = 2 * (bright & inside).sum() / (bright.sum() + inside.sum())
        assert dice > 0.9, f"sample {b}: image and labels drifted apart (Dice {float(dice):.3f})"
        assert out[b, 0][inside].mean() > 0.8 and out[b, 0][~inside].mean() < 0.05
        torch.testing.assert_close(out[b, 1], 3 * out[b, 0])  # channels move together


def test_spatial_transform_input_size() -> None:
    none = SpatialTransform([16, 16, 16], p_rotation=0.0, p_scaling=0.0)
    assert none.input_size == [16, 16, 16]
    rotated = SpatialTransform([16, 16, 16], p_rotation=0.2, p_scaling=0.0)
    assert all(s > 16 for s in rotated.input_size)
    with pytest.raises(ValueError, match="smaller than the patch"):
        rotated(torch.zeros(1, 1, 8, 8, 8), None, np.random.default_rng(0))


# --------------------------------------------------------------------------- the sampler
def _fake_cases(n: int = 3, shape=(20, 18, 22), seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        seg = np.zeros(shape, np.int8)
        seg[5:12, 4:10, 6:14] = 1
        seg[7:10, 6:8, 8:11] = 2
        cases.append(types.SimpleNamespace(data=rng.normal(size=(2, *shape)).astype(np.float32), seg=seg,
                                           locations={"1": np.argwhere(seg == 1)[:20], "2": np.argwhere(seg == 2)[:20]}))
    return cases


def test_sampler_with_augmentation() -> None:
    cases = _fake_cases()
    s1 = PatchSampler(cases, [16, 16, 16], 3, foreground_share=0.5, seed=4, augmentation=True)
    s2 = PatchSampler(cases, [16, 16, 16], 3, foreground_share=0.5, seed=4, augmentation=True)
    assert s1.crop_size == s1.augmentation.input_size and max(s1.crop_size) > 16
    for _ in range(3):
        (x1, y1), (x2, y2) = s1.sample(), s2.sample()
        assert x1.shape == (3, 2, 16, 16, 16) and x1.dtype == np.float32
        assert y1.shape == (3, 1, 16, 16, 16) and y1.dtype == np.int64
        assert set(np.unique(y1)) <= {0, 1, 2}
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_sampler_without_augmentation_keeps_its_behaviour() -> None:
    cases = _fake_cases()
    plain, off = PatchSampler(cases, [8, 8, 8], 2, seed=5), PatchSampler(cases, [8, 8, 8], 2, seed=5, augmentation=False)
    assert plain.augmentation is None and plain.crop_size == [8, 8, 8]
    for _ in range(3):
        a, b = plain.sample(), off.sample()
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # an augmentation pipeline that does nothing but crop gives the plain crops of the unmirrored sampler
    crop_only = Compose([SpatialTransform([8, 8, 8], p_rotation=0.0, p_scaling=0.0)])
    a = PatchSampler(cases, [8, 8, 8], 2, mirror=False, seed=6).sample()
    b = PatchSampler(cases, [8, 8, 8], 2, mirror=False, seed=6, augmentation=crop_only).sample()
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="produces patches of"):
        PatchSampler(cases, [8, 8, 8], 2, augmentation=default_augmentation([16, 16, 16]))


# --------------------------------------------------------------------------- resampling only the bounding box
def _full_input_reference(t: SpatialTransform, image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator):
    """The straightforward spatial transform: the same draws as ``t``, then one ``grid_sample`` of the WHOLE input
    (labels converted to float, nearest neighbour) on the grid normalised to the whole input."""
    b, dims = image.shape[0], image.ndim - 2
    in_size = np.array(image.shape[2:])
    mats, fields, changed = t.draw(b, rng)
    start = (in_size - t.patch_size) // 2
    crop = tuple(slice(int(s), int(s) + p) for s, p in zip(start, t.patch_size))
    out_img, out_lab = image[(slice(None), slice(None), *crop)].clone(), label[(slice(None), slice(None), *crop)].clone()
    offsets = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in t.patch_size], indexing="ij"), dim=-1)
    for i in np.flatnonzero(changed):
        coords = offsets @ torch.from_numpy(mats[i].astype(np.float32)).T
        if int(i) in fields:
            coords = coords + fields[int(i)].movedim(0, -1)
        coords = coords + torch.as_tensor((in_size - 1) / 2, dtype=torch.float32)
        grid = (2 * coords / torch.as_tensor(np.maximum(in_size - 1, 1), dtype=torch.float32) - 1).flip(-1)[None]
        out_img[i] = F.grid_sample(image[i : i + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        out_lab[i] = F.grid_sample(label[i : i + 1].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)[0].round().to(label.dtype)
    return out_img, out_lab, changed


BOX_CASES = {
    "rotation": (dict(p_rotation=1.0, p_scaling=0.0), [20, 18, 16], [31, 30, 29]),
    "scaling": (dict(p_rotation=0.0, p_scaling=1.0), [20, 18, 16], [24, 26, 23]),
    "elastic": (dict(p_rotation=0.0, p_scaling=0.0, p_elastic=1.0, elastic_alpha=(200.0, 900.0), elastic_sigma=(3.0, 4.0)), [20, 18, 16], [28, 28, 28]),
    "all_three": (dict(p_rotation=1.0, p_scaling=1.0, p_elastic=1.0, elastic_sigma=(3.0, 4.0)), [20, 18, 16], [31, 30, 29]),
    "2d": (dict(rotation=(-math.pi, math.pi), p_rotation=1.0, p_scaling=1.0, p_elastic=0.5, elastic_alpha=(0.0, 200.0), elastic_sigma=(3.0, 4.0)), [24, 20], [36, 33]),
    "past_the_border": (dict(p_rotation=1.0, p_scaling=1.0, scaling=(0.3, 3.0)), [20, 18, 16], [21, 19, 16]),  # boxes clipped, zeros outside
    "one_slice": (dict(p_rotation=1.0, p_scaling=1.0, rotation_axes=[2], scale_axes=[0, 1]), [20, 18, 1], [30, 29, 1]),
}


@pytest.mark.parametrize("name", sorted(BOX_CASES))
def test_spatial_transform_equals_resampling_the_whole_input(name: str) -> None:
    kwargs, patch, in_size = BOX_CASES[name]
    t = SpatialTransform(patch, **kwargs)
    for seed in range(3):
        g = np.random.default_rng(seed)
        ramp = torch.linspace(0, 4, in_size[0]).reshape(1, 1, -1, *([1] * (len(in_size) - 1)))
        img = torch.from_numpy(g.normal(size=(3, 2, *in_size)).astype(np.float32)) + ramp
        lab = torch.from_numpy(g.integers(0, 6, size=(3, 1, *in_size)).astype(np.int8))
        out, out_lab = t(img, lab, np.random.default_rng(100 + seed))
        ref, ref_lab, changed = _full_input_reference(t, img, lab, np.random.default_rng(100 + seed))
        assert changed.any()
        assert out.shape == ref.shape and out.dtype == ref.dtype and out_lab.dtype == lab.dtype
        # positions shifted into the box differ by float32 rounding (a few 1e-6 voxel), times this white noise's
        # voxel-to-voxel differences (up to ~8): ≲ 5e-5; a wrong box or normalisation would be off by O(1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=5e-5)
        assert torch.equal(out_lab, ref_lab)  # nearest neighbour: the very same voxels
        if name == "past_the_border":
            assert (ref[changed] == 0).any() and (ref_lab[changed] == 0).any()  # parts sampled beyond the input
    img_before, lab_before = img.clone(), lab.clone()
    t(img, lab, np.random.default_rng(0))
    assert torch.equal(img, img_before) and torch.equal(lab, lab_before)


def test_nearest_label_gather_breaks_ties_like_grid_sample() -> None:
    # positions exactly halfway between voxels (and beyond the map): grid_sample's nearbyint rounds them half to even
    label = torch.arange(7 * 6 * 5, dtype=torch.int64).reshape(1, 1, 7, 6, 5) % 11 + 1
    axes = [torch.arange(-1.5, n + 1.0, 0.5) for n in (7, 6, 5)]
    u = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    n = torch.tensor([6.0, 5.0, 4.0])
    grid = 2 * u / n - 1
    u_exact = (grid + 1) / 2 * n  # what grid_sample computes from the grid
    expected = F.grid_sample(label.float(), grid.flip(-1)[None], mode="nearest", padding_mode="zeros", align_corners=True)[0, 0].to(torch.int64)
    whole = tuple(slice(0, n) for n in (7, 6, 5))
    assert torch.equal(augmentation._nearest(label[0, 0], u_exact, whole), expected)
    assert (expected == 0).any() and (expected > 0).any()  # positions beyond the map and inside it
    ties = (u_exact.frac().abs() == 0.5).any(-1) & (expected > 0)
    assert ties.sum() > 100  # the comparison covers exact ties
    # only the positions' box of the map: the same values
    part = u_exact[2:9, 3:8, 4:7].contiguous()
    box = augmentation._box(part, (7, 6, 5))
    assert box != whole
    assert torch.equal(augmentation._nearest(label[0, 0][box], part, box), expected[2:9, 3:8, 4:7])
    # large label values are taken as they are (no float round trip)
    big = label * (1 << 40)
    assert torch.equal(augmentation._nearest(big[0, 0], u_exact, whole), expected * (1 << 40))


def test_sampler_batches_equal_resampling_the_whole_input() -> None:
    """The default pipeline's batches with the box resampling equal those of a pipeline whose spatial transform
    resamples the whole input (same draws, same later transforms)."""

    changed_samples, lazy = [], []

    def dense(x):  # the sampler's windows, read whole
        lazy.append(isinstance(x, LazyBatch))
        return torch.stack([x.read(b, tuple(slice(0, n) for n in x.shape[2:])) for b in range(x.shape[0])]) if isinstance(x, LazyBatch) else x

    class WholeInput(SpatialTransform):
        def __call__(self, image, label, rng, inplace=False):
            img, lab, changed = _full_input_reference(self, dense(image), dense(label), rng)
            changed_samples.append(int(changed.sum()))
            return img, lab

    cases = _fake_cases(shape=(30, 28, 26))
    box = PatchSampler(cases, [16, 16, 16], 3, foreground_share=0.5, seed=11, augmentation=True)
    whole_aug = default_augmentation([16, 16, 16])
    spatial = whole_aug.transforms[0]
    whole_aug.transforms[0] = WholeInput(spatial.patch_size, rotation=spatial.rotation, rotation_axes=spatial.rotation_axes, p_rotation=spatial.p_rotation,
                                         scaling=spatial.scaling, p_scaling=spatial.p_scaling, scale_axes=spatial.scale_axes, p_elastic=spatial.p_elastic)
    whole = PatchSampler(cases, [16, 16, 16], 3, foreground_share=0.5, seed=11, augmentation=Compose(whole_aug.transforms))
    for i in range(12):
        (x1, y1), (x2, y2) = box.sample_at(i), whole.sample_at(i)
        np.testing.assert_allclose(x1, x2, rtol=1e-4, atol=1e-4)  # intensity transforms may amplify the 1e-5 differences a little
        np.testing.assert_array_equal(y1, y2)
    assert sum(changed_samples) >= 3 and len(changed_samples) == 12  # rotated / scaled samples were compared
    assert all(lazy)  # the sampler hands the spatial transform windows to read


def test_sampler_windows_read_what_cropping_gives() -> None:
    data = np.random.default_rng(0).normal(size=(2, 9, 8, 7)).astype(np.float32)
    seg = np.random.default_rng(1).integers(0, 3, size=(9, 8, 7)).astype(np.int8)
    starts = [np.array([-3, 2, -1]), np.array([4, -2, 3])]  # windows hanging over both ends
    size = [12, 11, 10]
    images = _Windows([data, data], starts, size, 0.0, np.float32)
    labels = _Windows([seg, seg], starts, size, 0, np.dtype(np.int8))
    assert images.shape == (2, 2, 12, 11, 10) and labels.shape == (2, 1, 12, 11, 10) and labels.dtype == torch.int8
    for b, start in enumerate(starts):
        whole_img, whole_seg = _padded_crop(data, start, size, 0.0), _padded_crop(seg, start, size, 0)
        for box in [(slice(0, 12), slice(0, 11), slice(0, 10)), (slice(0, 5), slice(3, 11), slice(2, 4)), (slice(7, 12), slice(0, 2), slice(9, 10))]:
            assert torch.equal(images.read(b, box), torch.from_numpy(whole_img[(slice(None), *box)]))
            assert torch.equal(labels.read(b, box), torch.from_numpy(whole_seg[box][None]))


def test_pipelines_never_write_into_the_callers_arrays() -> None:
    """The transforms after the spatial transform work in place on its new tensors; the caller's arrays (numpy
    arrays share memory with the tensors made of them) stay as they were, with or without a spatial transform."""
    img, lab = _batch((20, 20, 20), b=3)
    forced = [FORCED[name]() for name in ("noise", "blur", "brightness", "contrast", "low_resolution", "gamma", "gamma_inverted", "mirror")]
    with_spatial = Compose([SpatialTransform([16, 16, 16], p_rotation=0.5, p_scaling=0.5), *forced])
    without = Compose(forced, patch_size=[20, 20, 20])
    for aug in (with_spatial, without):
        for as_numpy in (True, False):
            x, y = (img.numpy().copy(), lab.numpy().copy()) if as_numpy else (img.clone(), lab.clone())
            out, out_lab = aug(x, y, np.random.default_rng(1))
            assert np.array_equal(np.asarray(x), img.numpy()) and np.array_equal(np.asarray(y), lab.numpy())
            assert not np.array_equal(np.asarray(out)[:, :, :16, :16, :16], img.numpy()[:, :, :16, :16, :16])  # it did change the batch
    # in place or not, the values are the same: each transform on its own (copying) equals the pipeline
    x = img.clone()
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    out_a, lab_a = with_spatial(img, lab, rng_a)
    a, b = with_spatial.transforms[0](x, lab, rng_b)
    for t in forced:
        a, b = t(a, b, rng_b)
    assert torch.equal(out_a, a) and torch.equal(lab_a, b)
