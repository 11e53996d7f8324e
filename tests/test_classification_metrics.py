"""Classification evaluation: known answers (perfect, hand-computed, ties), scikit-learn agreement,
and the report files (metrics.json, cases.csv, confusion matrix, ROC PNGs, report.md / report.html)."""

from __future__ import annotations

import base64
import csv
import io as _stdio
import re

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.evaluation.classification import (
    CONFUSION_CSV,
    accuracy,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    evaluate_classification,
    log_losses,
    roc_auc,
    roc_curve,
)
from medseg.schemas import DatasetJson, Metrics

CLASSES = ["CN", "MCI", "AD"]
PNG = b"\x89PNG\r\n\x1a\n"


def _dataset(classes=CLASSES) -> DatasetJson:
    return DatasetJson(name="Dataset100_ADNI", channel_names={"0": "image"}, labels={c: i for i, c in enumerate(classes)},
                       numTraining=10, task="classification", source_format="classification")


def test_perfect_classifier():
    true = [0, 1, 2, 0, 1, 2]
    scores = np.eye(3)[true] * 0.8 + 0.1
    m = classification_metrics(true, scores, CLASSES)
    assert m["all"] == {"accuracy": 1.0, "balanced_accuracy": 1.0, "auc_macro": 1.0, "log_loss": pytest.approx(-np.log(0.9))}
    for k, c in enumerate(CLASSES):
        assert m[c]["auc"] == 1.0 and m[c]["sensitivity"] == m[c]["specificity"] == m[c]["precision"] == 1.0
        assert m[c]["support"] == 2.0 and m[c][f"confusion_{c}"] == 2.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0  # perfectly wrong


def test_hand_computed_auc_with_a_tie():
    positive = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.4, 0.6, 0.5, 0.3, 0.6]
    # positive 0.9 beats all 3 negatives; 0.4 beats 0.3; 0.6 beats 0.5 and 0.3 and ties 0.6: 3 + 1 + 2.5
    assert roc_auc(positive, scores) == pytest.approx(6.5 / 9)
    fpr, tpr, thr = roc_curve(positive, scores)
    assert thr[0] == np.inf and list(thr[1:]) == [0.9, 0.6, 0.5, 0.4, 0.3]  # one point per distinct score
    assert list(fpr) == pytest.approx([0, 0, 1 / 3, 2 / 3, 2 / 3, 1])
    assert list(tpr) == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(6.5 / 9)  # the tie is a diagonal step: half a pair
    assert roc_auc([1, 0, 1, 0], [0.5] * 4) == 0.5  # all tied: chance
    assert roc_auc([1, 1], [0.2, 0.3]) is None  # no negative case
    with pytest.raises(MedsegError, match="undefined"):
        roc_curve([0, 0], [0.1, 0.2])


def test_accuracy_balanced_accuracy_and_confusion():
    true = [0, 0, 0, 0, 1, 1, 2, 2]
    pred = [0, 0, 0, 1, 1, 2, 2, 0]
    assert accuracy(true, pred) == 5 / 8
    assert balanced_accuracy(true, pred) == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    cm = confusion_matrix(true, pred, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.5  # a constant guess: 1 / n_classes
    with pytest.raises(MedsegError, match="0..2"):
        confusion_matrix([0, 3], [0, 1], 3)


def test_ties_in_argmax_and_a_class_without_cases():
    scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6], [0.4, 0.6, 0.0]])
    m = classification_metrics([0, 2, 0], scores, CLASSES)  # no MCI case: its AUC is undefined
    assert m["MCI"].keys() >= {"sensitivity", "specificity", "precision", "support"} and "auc" not in m["MCI"]
    assert m["MCI"]["sensitivity"] == 0.0 and m["MCI"]["support"] == 0.0  # zero division → 0.0
    assert m["CN"]["confusion_CN"] == 1.0  # [0.5, 0.5, 0] → the lower index
    assert m["all"]["auc_macro"] == pytest.approx(np.mean([m["CN"]["auc"], m["AD"]["auc"]]))


def test_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    true = rng.integers(0, 3, 60)
    true[:3] = [0, 1, 2]
    scores = rng.random((60, 3)) + 0.6 * np.eye(3)[true]
    scores = np.round(scores, 1)  # many ties
    probs = scores / scores.sum(axis=1, keepdims=True)
    m = classification_metrics(true, probs, CLASSES)
    pred = probs.argmax(axis=1)
    assert m["all"]["accuracy"] == pytest.approx(metrics.accuracy_score(true, pred))
    assert m["all"]["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(true, pred))
    assert m["all"]["auc_macro"] == pytest.approx(metrics.roc_auc_score(true, probs, multi_class="ovr", average="macro"))
    assert m["all"]["log_loss"] == pytest.approx(metrics.log_loss(true, probs, labels=[0, 1, 2]))
    for k, c in enumerate(CLASSES):
        assert m[c]["auc"] == pytest.approx(metrics.roc_auc_score(true == k, probs[:, k]))
        fpr, tpr, _ = metrics.roc_curve(true == k, probs[:, k], drop_intermediate=False)
        ours_fpr, ours_tpr, _ = roc_curve(true == k, probs[:, k])
        assert ours_fpr == pytest.approx(fpr) and ours_tpr == pytest.approx(tpr)
    assert confusion_matrix(true, pred, 3).tolist() == metrics.confusion_matrix(true, pred).tolist()


def test_evaluate_classification_writes_the_report(tmp_path):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(12):
        label = CLASSES[i % 3]
        p = rng.dirichlet([1, 1, 1]) * 0.5
        p[i % 3] += 0.5
        cases.append((f"sub-{i:03d}", {c: float(v) for c, v in zip(CLASSES, p)} if i % 2 else list(p), label if i % 4 else i % 3))
    m = evaluate_classification(cases, _dataset(), tmp_path)
    assert m.n_cases == 12 and m.mean["all"]["accuracy"] == 1.0
    loaded = Metrics.load(tmp_path)
    assert loaded.per_case[1]["all"]["true"] == 1 and set(loaded.mean) == {"all", *CLASSES}
    # per-case log-loss: -ln p(true class); its mean is mean["all"]["log_loss"]
    first = loaded.per_case[0]["all"]
    assert first["log_loss"] == pytest.approx(-np.log(first["prob_CN"]))
    assert loaded.mean["all"]["log_loss"] == pytest.approx(np.mean([c["all"]["log_loss"] for c in loaded.per_case]))

    rows = list(csv.reader(_stdio.StringIO((tmp_path / "cases.csv").read_text())))
    assert rows[0] == ["case", "region", "metric", "value"]
    assert [r[2] for r in rows[1:7]] == ["prob_CN", "prob_MCI", "prob_AD", "pred", "true", "log_loss"]
    assert {r[1] for r in rows[1:]} == {"all"} and len(rows) == 1 + 12 * 6
    assert (tmp_path / CONFUSION_CSV).read_text().splitlines()[1] == "CN,4,0,0"
    for c in CLASSES:
        assert (tmp_path / f"roc_{c}.png").read_bytes()[:8] == PNG
    md = (tmp_path / "report.md").read_text()
    assert "| CN | 1.000 |" in md and "![ROC AD](roc_AD.png)" in md and "log-loss" in md
    page = (tmp_path / "report.html").read_text()
    uris = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 3 and all(base64.b64decode(u)[:8] == PNG for u in uris)
    assert "<script" not in page and "http" not in page


def test_log_loss_clips_and_uses_the_natural_log():
    scores = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    assert log_losses([1, 2, 0], scores) == pytest.approx([-np.log(1e-12), np.log(2), -np.log(0.2)])
    assert log_losses([0], np.array([[1.0, 0.0, 0.0]])) == pytest.approx([0.0])
    assert classification_metrics([0, 1, 2], np.full((3, 3), 1 / 3), CLASSES)["all"]["log_loss"] == pytest.approx(np.log(3))  # a uniform guess: ln K


def test_bad_input_is_named():
    with pytest.raises(MedsegError, match="not 'classification'"):
        evaluate_classification([], DatasetJson(name="s", channel_names={"0": "t1"}, labels={"bg": 0, "x": 1}, numTraining=1), "/nonexistent")
    with pytest.raises(MedsegError, match="case b: true class 'XX'"):
        evaluate_classification([("a", [1, 0, 0], "CN"), ("b", [1, 0, 0], "XX")], _dataset(), "/nonexistent")
    with pytest.raises(MedsegError, match="case a: 2 scores for 3 classes"):
        evaluate_classification([("a", [1, 0], 0)], _dataset(), "/nonexistent")
    with pytest.raises(MedsegError, match="no score for class"):
        evaluate_classification([("a", {"CN": 1.0}, 0)], _dataset(), "/nonexistent")
    with pytest.raises(MedsegError, match="finite"):
        evaluate_classification([("a", [np.nan, 0, 0], 0)], _dataset(), "/nonexistent")
    with pytest.raises(MedsegError, match="given twice"):
        evaluate_classification([("a", [1, 0, 0], 0), ("a", [1, 0, 0], 0)], _dataset(), "/nonexistent")
    with pytest.raises(MedsegError, match="no cases"):
        evaluate_classification([], _dataset(), "/nonexistent")
