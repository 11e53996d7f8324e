"""``train.augmentation`` as false / true / a mapping of knobs: ``true`` is exactly nnU-Net's default pipeline as
built before the knobs existed, every knob reaches the pipeline training uses (from a parameter file, through the
CLI's and the pipeline's paths), elastic deformation switches on, and bad knobs are refused by name."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.errors import MedsegError
from medseg.training.augmentation import (
    Compose,
    Contrast,
    Gamma,
    GaussianBlur,
    GaussianNoise,
    Mirror,
    MultiplicativeBrightness,
    SimulateLowResolution,
    SpatialTransform,
    build_augmentation,
    default_augmentation,
)
from medseg.training.config import AugmentationConfig, TrainConfig

ALL_OFF = {g: False for g in ("rotation", "scaling", "elastic", "noise", "blur", "brightness", "contrast", "low_resolution", "gamma_inverted", "gamma", "mirror")}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(size: list[int], b: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij"))
    img = (np.sin(3 * grid[0])[None, None] + 0.3 * g.normal(size=(b, 2, *size))).astype(np.float32)
    lab = np.zeros((b, 1, *size), np.int64)
    lab[(slice(None), 0, *[slice(s // 4, 3 * s // 4) for s in size])] = 1
    return img, lab


def _nnunet_literal(patch: list[int]) -> Compose:
    """nnU-Net v2's default set for a 3D patch written out by hand (the values of the module table)."""
    return Compose([
        SpatialTransform(patch, rotation=(-math.pi / 6, math.pi / 6), rotation_axes=[0, 1, 2], p_rotation=0.2, scaling=(0.7, 1.4), p_scaling=0.2,
                         scale_axes=None, p_elastic=0.0, elastic_alpha=(0.0, 900.0)),
        GaussianNoise((0.0, 0.1), p=0.1),
        GaussianBlur((0.5, 1.0), p=0.2, p_per_channel=0.5, axes=[0, 1, 2]),
        MultiplicativeBrightness((0.75, 1.25), p=0.15),
        Contrast((0.75, 1.25), preserve_range=True, p=0.15),
        SimulateLowResolution((0.5, 1.0), p=0.25, p_per_channel=0.5, ignore_axes=[]),
        Gamma((0.7, 1.5), invert=True, retain_stats=True, p=0.1),
        Gamma((0.7, 1.5), invert=False, retain_stats=True, p=0.3),
        Mirror(axes=[0, 1, 2], p=0.5),
    ], patch)


def test_true_is_exactly_nnunets_default_pipeline() -> None:
    patch = [12, 12, 12]
    literal = _nnunet_literal(patch)
    for value in (True, {}):
        built = build_augmentation(patch, TrainConfig(augmentation=value).augmentation_config())
        assert repr(built) == repr(literal) == repr(default_augmentation(patch))
        assert built.input_size == literal.input_size
        img, lab = _batch(built.input_size, b=6)
        rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
        for _ in range(3):  # the same random draws in the same order: a resumed run continues the same sequence
            (xa, ya), (xb, yb) = built(img, lab, rng_a), literal(img, lab, rng_b)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    assert TrainConfig(augmentation=False).augmentation_config() is None
    assert TrainConfig(augmentation="false").augmentation is False and TrainConfig(augmentation="true").augmentation is True


def test_every_knob_reaches_the_transforms() -> None:
    knobs = {
        "rotation": {"p": 0.5, "degrees": [-10, 20], "axes": [2]},
        "scaling": {"p": 0.4, "range": [0.8, 1.2], "axes": [0, 1]},
        "elastic": {"p": 0.3, "alpha": [0, 500], "sigma": [8, 10]},
        "noise": {"p": 0.05, "variance": [0, 0.2]},
        "blur": {"p": 0.1, "sigma": [0.3, 0.9], "p_per_channel": 0.7},
        "brightness": {"p": 0.11, "range": [0.9, 1.1]},
        "contrast": {"p": 0.12, "range": [0.6, 1.4], "preserve_range": False},
        "low_resolution": {"p": 0.13, "zoom": [0.4, 0.9], "p_per_channel": 0.2},
        "gamma_inverted": {"p": 0.14, "range": [0.8, 1.3], "retain_stats": False},
        "gamma": {"p": 0.15, "range": [0.6, 1.6], "retain_stats": False},
        "mirror": {"p": 0.25, "axes": [0, 2]},
    }
    aug = build_augmentation([12, 12, 12], AugmentationConfig.from_value(knobs))
    sp, noise, blur, bright, contrast, lowres, gamma_inv, gamma, mirror = aug.transforms
    assert (sp.p_rotation, sp.rotation_axes) == (0.5, [2]) and sp.rotation == pytest.approx((math.radians(-10), math.radians(20)))
    assert (sp.p_scaling, sp.scaling, sp.scale_axes) == (0.4, (0.8, 1.2), [0, 1])
    assert (sp.p_elastic, sp.elastic_alpha, sp.elastic_sigma) == (0.3, (0.0, 500.0), (8.0, 10.0))
    assert (noise.p, noise.variance) == (0.05, (0.0, 0.2))
    assert (blur.p, blur.sigma, blur.p_per_channel) == (0.1, (0.3, 0.9), 0.7)
    assert (bright.p, bright.multiplier) == (0.11, (0.9, 1.1))
    assert (contrast.p, contrast.contrast, contrast.preserve_range) == (0.12, (0.6, 1.4), False)
    assert (lowres.p, lowres.zoom, lowres.p_per_channel) == (0.13, (0.4, 0.9), 0.2)
    assert (gamma_inv.p, gamma_inv.gamma, gamma_inv.invert, gamma_inv.retain_stats) == (0.14, (0.8, 1.3), True, False)
    assert (gamma.p, gamma.gamma, gamma.invert, gamma.retain_stats) == (0.15, (0.6, 1.6), False, False)
    assert (mirror.p, mirror.axes) == (0.25, [0, 2])
    # patch-derived knobs: auto (the form a KFP dict parameter can carry) or null, both the default
    assert AugmentationConfig.from_value({"rotation": {"degrees": None, "axes": "auto"}, "elastic": {"alpha": "auto"}}) == AugmentationConfig()
    # the explicit form reads back to the same configuration (what MLflow and the checkpoint record)
    config = AugmentationConfig.from_value(knobs)
    assert AugmentationConfig.from_value(config.to_dict()) == config
    # 2D-style augmentation of a 3D patch from the file: the slice axis is neither rotated nor scaled
    flat = build_augmentation([12, 12, 4], AugmentationConfig.from_value({"dim": 2, "slice_axis": 2}))
    assert flat.transforms[0].rotation_axes == [2] and flat.transforms[0].scale_axes == [0, 1] and flat.transforms[5].ignore_axes == [2]


def test_elastic_on_deforms_the_sample_and_off_does_not() -> None:
    patch = [16, 16, 16]
    off = build_augmentation(patch, AugmentationConfig.from_value(ALL_OFF))
    on = build_augmentation(patch, AugmentationConfig.from_value({**ALL_OFF, "elastic": {"p": 1.0, "alpha": [400, 400], "sigma": [4, 4]}}))
    assert on.input_size == off.input_size
    img, lab = _batch(on.input_size, b=2)
    x_off, y_off = off(img, lab, np.random.default_rng(0))
    x_on, y_on = on(img, lab, np.random.default_rng(0))
    start = [(i - p) // 2 for i, p in zip(on.input_size, patch)]
    crop = (slice(None), slice(None), *[slice(s, s + p) for s, p in zip(start, patch)])
    np.testing.assert_array_equal(x_off, img[crop])  # off: the central crop, untouched
    assert x_on.shape == x_off.shape and np.abs(x_on - x_off).mean() > 0.05  # on: resampled along a displacement field
    assert not np.array_equal(y_on, y_off) and set(np.unique(y_on)) <= {0, 1}  # labels follow, still labels
    # `elastic: true` is nnU-Net v1's setting (p 0.2, alpha by dimensionality), `false` is v2's (off)
    v1 = build_augmentation(patch, AugmentationConfig.from_value({"elastic": True})).transforms[0]
    assert (v1.p_elastic, v1.elastic_alpha, v1.elastic_sigma) == (0.2, (0.0, 900.0), (9.0, 13.0))
    assert build_augmentation([16, 16], AugmentationConfig.from_value({"elastic": True})).transforms[0].elastic_alpha == (0.0, 200.0)


@pytest.mark.parametrize("value, named", [
    ({"elastik": True}, "'augmentation.elastik'"),
    ({"elastic": {"alfa": [0, 900]}}, "'augmentation.elastic.alfa'"),
    ({"noise": {"p": 1.5}}, "augmentation.noise.p"),
    ({"scaling": {"range": [1.4, 0.7]}}, "augmentation.scaling.range"),
    ({"scaling": {"range": [0, 1.4]}}, "augmentation.scaling.range"),
    ({"rotation": {"degrees": [-200, 30]}}, "augmentation.rotation.degrees"),
    ({"low_resolution": {"zoom": [0.5, 2]}}, "augmentation.low_resolution.zoom"),
    ({"mirror": {"axes": [0, 0]}}, "augmentation.mirror.axes"),
    ({"contrast": {"preserve_range": "yes"}}, "augmentation.contrast.preserve_range"),
    ({"gamma": 0.3}, "augmentation.gamma"),
    ({"dim": 4}, "augmentation.dim"),
    ({"noise": {"variance": None}}, "augmentation.noise.variance"),  # only patch-derived knobs have an automatic value
    ("sometimes", "augmentation"),
])
def test_bad_knobs_are_refused_by_name(value: object, named: str) -> None:
    with pytest.raises(MedsegError) as info:
        TrainConfig.from_dict({"augmentation": value})
    assert named in str(info.value)


def test_knobs_that_do_not_fit_the_patch_are_refused() -> None:
    with pytest.raises(MedsegError, match=r"augmentation\.mirror\.axes"):
        build_augmentation([16, 16], AugmentationConfig.from_value({"mirror": {"axes": [2]}}))
    with pytest.raises(MedsegError, match=r"augmentation\.dim"):
        build_augmentation([16, 16], AugmentationConfig.from_value({"dim": 3}))
    with pytest.raises(MedsegError, match=r"augmentation\.slice_axis"):
        build_augmentation([1, 16, 16], AugmentationConfig.from_value({"slice_axis": 2}))


def test_a_classifier_refuses_knobs_it_cannot_honour() -> None:
    from medseg.training.setup import make_volume_sampler

    with pytest.raises(MedsegError, match="segmentation patches only"):
        make_volume_sampler([], None, 1, TrainConfig(augmentation={"elastic": True}), 0)  # type: ignore[arg-type]


def _struct_roundtrip(value: dict) -> dict:
    """What a KFP dict parameter becomes in the component: a protobuf Struct (every number a float)."""
    from google.protobuf import json_format, struct_pb2

    s = struct_pb2.Struct()
    s.update(value)
    return json_format.MessageToDict(s)


def test_knobs_from_a_parameter_file_reach_the_sampler_training_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A params file with knobs → the CLI's and the pipeline's training config → the PatchSampler train() builds (tiny run)."""
    from medseg import cli
    from medseg.pipeline import runner
    from medseg.training import trainer
    from medseg.training.stage import merged_params
    from tests.test_training_loop import MINI, build_mini_preprocessed

    knobs = {"elastic": {"p": 1.0, "alpha": [0, 300], "sigma": [5, 7]}, "mirror": {"axes": [0, 1]}, "gamma": False, "rotation": {"degrees": [-5, 5]}}
    params_file = tmp_path / "params-knobs.yaml"
    params_file.write_text(yaml.safe_dump({"train": {**MINI, "epochs": 1, "iterations_per_epoch": 1, "augmentation": knobs}}))
    pre = build_mini_preprocessed(tmp_path / "pre", n_cases=4)
    # the CLI's path (`medseg train --params FILE`) and the pipeline's (train_params through a KFP Struct)
    args = cli.build_parser().parse_args(["train", "--preprocessed", str(pre), "--params", str(params_file), "--out", str(tmp_path / "out")])
    from_cli = merged_params(cli._train_params(args), None)
    train_params = runner.pipeline_arguments(runner.load_params(params_file), tmp_path, "none", "sqlite:///x.db")["train_params"]
    from_pipeline = TrainConfig.from_dict(_struct_roundtrip(train_params))
    assert from_cli.augmentation_config() == from_pipeline.augmentation_config() == AugmentationConfig.from_value(knobs)

    seen = []
    real = trainer.make_sampler

    def recording(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(trainer, "make_sampler", recording)
    trainer.train(pre, tmp_path / "run", from_pipeline, progress=False, write_package=False)
    aug = seen[0].augmentation
    sp, gamma, mirror = aug.transforms[0], aug.transforms[7], aug.transforms[8]
    assert (sp.p_elastic, sp.elastic_alpha, sp.elastic_sigma) == (1.0, (0.0, 300.0), (5.0, 7.0))
    assert sp.rotation == pytest.approx((math.radians(-5), math.radians(5))) and gamma.p == 0.0 and mirror.axes == [0, 1]
    assert seen[0].crop_size == aug.input_size


def test_the_cli_refuses_a_parameter_file_it_cannot_find(tmp_path: Path) -> None:
    from medseg import cli

    args = argparse.Namespace(params=tmp_path / "params-typo.yaml")
    with pytest.raises(MedsegError, match="not found"):
        cli._train_params(args)


def test_train_command_overrides_the_augmentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`medseg train --augmentation '{...}'` replaces the file's setting in the config handed to training."""
    from medseg import cli
    from medseg.training import stage
    from tests.test_training_loop import build_mini_preprocessed

    pre = build_mini_preprocessed(tmp_path / "pre", n_cases=4)
    params_file = tmp_path / "p.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"epochs": 1, "augmentation": False}}))
    seen = []
    monkeypatch.setattr(stage, "run_train", lambda pre_dir, out, cfg, tracking, **launch: seen.append(cfg) or type("R", (), {"model_dir": None})())
    base = ["train", "--preprocessed", str(pre), "--params", str(params_file), "--out", str(tmp_path / "o"), "--tracking-uri", "none"]
    assert cli.main([*base, "--augmentation", "{elastic: {p: 1.0}, gamma: false}"]) == 0
    assert cli.main([*base, "--augmentation", "true"]) == 0
    assert cli.main(base) == 0
    with_knobs, default_set, from_file = (c.augmentation_config() for c in seen)
    assert with_knobs.groups["elastic"]["p"] == 1.0 and with_knobs.groups["gamma"]["p"] == 0.0
    assert default_set == AugmentationConfig() and from_file is None
    assert cli.main([*base, "--augmentation", "{elastik: true}"]) == 2 and len(seen) == 3  # refused before training ...
    assert "'augmentation.elastik'" in capsys.readouterr().err  # ... with the knob named
    with pytest.raises(SystemExit):
        cli.main([*base, "--augmentation", "3"])
