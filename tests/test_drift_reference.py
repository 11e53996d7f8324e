"""The serving drift reference comes from preprocessing's fingerprint: per training case, the mean of its nonzero voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg import schemas
from medseg.preprocessing.fingerprint import case_fingerprint
from medseg.serving.drift import CASE_MEAN_NONZERO, drift_zscores, load_drift_reference
from tests.factories import make_model_package


def test_fingerprint_keeps_each_case_nonzero_mean() -> None:
    images = np.zeros((2, 8, 8, 8), np.float32)
    images[0, 2:6, 2:6, 2:6] = 10.0
    images[1, 2:6, 2:6, 2:6] = 4.0
    images[1, 3, 3, 3] = 0.0  # a zero inside the head does not count
    row = case_fingerprint(images, np.zeros((8, 8, 8), np.uint8), [1.0, 1.0, 1.0], "c", n_labels=2, samples_per_case=10)
    assert row["nonzero_means"] == [10.0, 4.0]


def test_package_with_case_means_gives_a_case_level_reference(tmp_path: Path) -> None:
    package = make_model_package(tmp_path / "model")
    channels = schemas.Plans.load(package).channel_names
    means = {c: [100.0 + i, 110.0 - i, 105.0] for i, c in enumerate(channels)}
    fingerprint = schemas.Fingerprint(spacings=[], shapes_after_crop=[], shapes=[], channels={}, class_frequencies={}, case_ids=[], case_nonzero_means=means)
    fingerprint.save(package)
    reference = load_drift_reference(package, list(channels))
    assert reference is not None and reference.statistic == CASE_MEAN_NONZERO
    first = channels[0]
    mean, std = reference.channels[first]
    assert mean == np.mean(means[first]) and std == np.std(means[first])
    # a request whose first channel averages one training std above the training mean scores z = 1
    images = np.zeros((len(channels), 4, 4, 4), np.float32)
    for c, name in enumerate(channels):
        images[c, 1:3, 1:3, 1:3] = reference.channels[name][0]
    images[0, 1:3, 1:3, 1:3] += std
    z = drift_zscores(images, list(channels), reference)
    assert abs(z[first] - 1.0) < 1e-6 and all(abs(v) < 1e-6 for k, v in z.items() if k != first)
