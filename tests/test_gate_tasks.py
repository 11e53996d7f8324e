"""The gate per task (numpy only): a task naming IoU, a lower-is-better metric, a classifier's per-subject
log-loss and macro AUC; pairing by case key; refusal when the two test sets differ in content."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg import schemas
from medseg.evaluation.classification import classification_metrics
from medseg.registry.gate import case_value, decide, macro_auc, pair_cases, paired_bootstrap_auc
from medseg.task import Task, metric_spec

CLASSES = ["CN", "MCI", "AD"]


def lgg_task() -> Task:
    """A Kaggle-LGG-like slice task: one foreground label, judged by IoU."""
    return Task.from_dataset(schemas.DatasetJson(name="Dataset002_LGG", channel_names={"0": "pre", "1": "flair", "2": "post"},
                                                 labels={"background": 0, "abnormality": 1}, numTraining=4, slice_axis=2, primary_metric="iou"))


def classifier_task() -> Task:
    return Task.from_dataset(schemas.DatasetJson(name="Dataset100_ADNI", channel_names={"0": "t1"}, labels={c: i for i, c in enumerate(CLASSES)},
                                                 numTraining=4, task="classification", covariates=["age"]))


def gate_args(task: Task, metric: str | None = None) -> dict:
    """decide()'s task arguments as the registry derives them."""
    metric = metric or task.primary_metric
    return {"groups": task.gate_groups, "metric": metric, "higher_is_better": metric_spec(metric).higher_is_better, "primary_group": task.primary_group}


def seg_cases(iou, dice=None, group="abnormality", ids=None, keys=None):
    dice = np.asarray(iou) if dice is None else np.asarray(dice)
    ids = ids or [f"case_{i:04d}" for i in range(len(iou))]
    out = [{"case_id": c, group: {"dice": float(d), "iou": float(v), "hd95": 10 * (1 - float(v))}} for c, v, d in zip(ids, iou, dice)]
    if keys is not None:
        for entry, key in zip(out, keys):
            entry["case_key"] = key
    return out


def cls_cases(probs: np.ndarray, true, ids=None, keys=None, with_log_loss=True):
    ids = ids or [f"sub-{i:03d}" for i in range(len(true))]
    out = []
    for i, (row, t) in enumerate(zip(probs, true)):
        values = {**{f"prob_{c}": float(p) for c, p in zip(CLASSES, row)}, "pred": int(np.argmax(row)), "true": int(t)}
        if with_log_loss:
            values["log_loss"] = float(-math.log(max(row[t], 1e-12)))
        out.append({"case_id": ids[i], **({"case_key": keys[i]} if keys else {}), "all": values})
    return out


def subject_probs(true, confidence, seed):
    """Probabilities putting ``confidence`` (per subject, on average) on the true class."""
    rng = np.random.default_rng(seed)
    n = len(true)
    p = rng.dirichlet([1, 1, 1], n) * (1 - confidence)[:, None]
    p[np.arange(n), true] += confidence
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- segmentation: the task's metric
def test_task_naming_iou_is_gated_on_iou():
    task = lgg_task()
    assert (task.gate_groups, task.primary_group, task.primary_metric) == (["abnormality"], "abnormality", "iou")
    rng = np.random.default_rng(0)
    champ = np.clip(rng.normal(0.64, 0.05, 30), 0, 1)
    worse = champ - 0.03 + rng.normal(0, 0.005, 30)
    # better Dice but worse IoU: the IoU decides
    g = decide(seg_cases(worse, dice=champ + 0.1), seg_cases(champ), **gate_args(task), seed=1)
    assert not g.promote and g.metric == "iou" and g.groups["abnormality"].mean_diff < 0
    assert f"abnormality iou {worse.mean():.4f} < champion {champ.mean():.4f}" in g.reason
    better = decide(seg_cases(champ + 0.03), seg_cases(champ), **gate_args(task), seed=1)
    assert better.promote and "abnormality iou" in better.reason and better.groups["abnormality"].ci_lower > 0
    # the same data gated on Dice (higher is better too) by naming it
    on_dice = decide(seg_cases(worse, dice=champ + 0.1), seg_cases(champ), **gate_args(task, "dice"), seed=1)
    assert on_dice.promote and on_dice.metric == "dice"


def test_lower_is_better_metric_is_oriented():
    """HD95: a smaller distance is better; differences are champion - challenger, so positive = better."""
    task = lgg_task()
    champ = np.linspace(0.5, 0.8, 20)
    chall = champ + 0.02  # higher IoU → lower HD95 (10 × (1 - IoU))
    g = decide(seg_cases(chall), seg_cases(champ), **gate_args(task, "hd95"))
    r = g.groups["abnormality"]
    assert g.promote and not g.higher_is_better and r.challenger_mean < r.champion_mean
    assert r.mean_diff == pytest.approx(0.2) and r.ci_lower == pytest.approx(0.2) and r.non_inferior
    assert "(lower is better)" in g.reason and "abnormality hd95" in g.reason and " < champion" in g.reason
    worse = decide(seg_cases(champ - 0.02), seg_cases(champ), **gate_args(task, "hd95"), margin=0.1)
    assert not worse.promote and worse.groups["abnormality"].mean_diff == pytest.approx(-0.2)
    assert "abnormality hd95" in worse.reason and " > champion" in worse.reason and "not non-inferior" in worse.reason
    # a margin in the metric's units (mm): 0.3 mm covers a 0.2 mm loss, but the challenger is still not better
    within = decide(seg_cases(champ - 0.02), seg_cases(champ), **gate_args(task, "hd95"), margin=0.3)
    assert within.groups["abnormality"].non_inferior and not within.promote and "not strictly better" in within.reason


# --------------------------------------------------------------------------- classification: per-subject log-loss
def test_classifier_gated_on_per_subject_log_loss():
    task = classifier_task()
    assert (task.gate_groups, task.primary_group, task.primary_metric) == (["all"], "all", "log_loss")
    true = np.arange(45) % 3
    champ = subject_probs(true, np.full(45, 0.55), seed=0)
    sharper = subject_probs(true, np.full(45, 0.75), seed=0)  # more probability on the truth: lower log-loss
    g = decide(cls_cases(sharper, true), cls_cases(champ, true), **gate_args(task), seed=2)
    r = g.groups["all"]
    assert g.promote and not g.higher_is_better and r.challenger_mean < r.champion_mean and r.ci_lower > 0
    assert g.reason.startswith(f"log_loss {r.challenger_mean:.4f} < champion {r.champion_mean:.4f} (lower is better)")
    refused = decide(cls_cases(champ, true), cls_cases(sharper, true), **gate_args(task), seed=2)
    rr = refused.groups["all"]
    assert not refused.promote and f"log_loss {rr.challenger_mean:.4f} > champion {rr.champion_mean:.4f} (lower is better)" in refused.reason
    # records written before per-subject log-loss existed: computed from prob_<true class>
    old = decide(cls_cases(sharper, true, with_log_loss=False), cls_cases(champ, true, with_log_loss=False), **gate_args(task), seed=2)
    assert old.promote and old.groups["all"].mean_diff == pytest.approx(r.mean_diff)
    assert case_value({"all": {"prob_CN": 0.25, "prob_AD": 0.75, "true": 1}}, "all", "log_loss") == pytest.approx(-math.log(0.75))
    assert case_value({"all": {"prob_CN": 0.0, "prob_AD": 1.0, "true": 0}}, "all", "log_loss") == pytest.approx(-math.log(1e-12))


# --------------------------------------------------------------------------- classification: macro AUC
def test_macro_auc_gate_paired_over_subjects():
    task = classifier_task()
    rng = np.random.default_rng(3)
    true = np.arange(60) % 3
    champ = subject_probs(true, rng.uniform(0.0, 0.5, 60), seed=4)
    better = subject_probs(true, rng.uniform(0.3, 0.8, 60), seed=5)
    args = gate_args(task, "auc_macro")
    g = decide(cls_cases(better, true), cls_cases(champ, true), **args, n_bootstrap=1000, seed=0)
    r = g.groups["all"]
    assert g.promote and g.method == "paired_bootstrap_auc_macro" and g.higher_is_better and r.ci_lower > 0
    # the point AUCs are the evaluation's macro one-vs-rest AUCs
    assert r.challenger_mean == pytest.approx(classification_metrics(true, better, CLASSES)["all"]["auc_macro"])
    assert r.champion_mean == pytest.approx(classification_metrics(true, champ, CLASSES)["all"]["auc_macro"])
    assert g.reason.startswith(f"auc_macro {r.challenger_mean:.4f} > champion {r.champion_mean:.4f}")
    refused = decide(cls_cases(champ, true), cls_cases(better, true), **args, n_bootstrap=1000, seed=0)
    assert not refused.promote and "not non-inferior" in refused.reason and "auc_macro" in refused.reason
    tie = decide(cls_cases(champ, true), cls_cases(champ, true), **args, n_bootstrap=200, margin=0.05)
    assert not tie.promote and tie.groups["all"].mean_diff == 0 and " = champion" in tie.reason
    again = decide(cls_cases(better, true), cls_cases(champ, true), **args, n_bootstrap=1000, seed=0)
    assert again.to_dict() == g.to_dict()  # seeded


def test_auc_bootstrap_skips_resamples_lacking_a_class():
    true = np.array([0] * 10 + [1] * 10 + [2])  # one AD subject: many resamples lack it
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet([1, 1, 1], 21), rng.dirichlet([1, 1, 1], 21)
    diff, lower, upper, auc_a, auc_b, skipped = paired_bootstrap_auc(true, a, b, 400, 0.05, 1)
    assert 0 < skipped < 400 and lower <= upper  # ≈ (20/21)^21 ≈ 36 % of the draws lack AD
    assert diff == pytest.approx(auc_a - auc_b) and auc_a == pytest.approx(macro_auc(true, a))
    g = decide(cls_cases(a, true), cls_cases(b, true), metric="auc_macro", n_bootstrap=400, seed=1)
    assert g.groups["all"].n_skipped_resamples == skipped
    one_class = decide(cls_cases(a[:10], true[:10]), cls_cases(b[:10], true[:10]), metric="auc_macro")
    assert not one_class.promote and "at least two classes" in one_class.reason
    with pytest.raises(ValueError):
        paired_bootstrap_auc(true, a, b[:5])


# --------------------------------------------------------------------------- pairing by case key
def test_pairing_by_case_key_survives_renumbered_pseudonyms():
    """The challenger was evaluated after a re-ingest that renumbered the pseudonyms: the same cases under other
    ids. Paired by key, every case is compared with itself (by id, the cases would be mixed up)."""
    task = lgg_task()
    keys = [f"k{i:02d}" for i in range(12)]
    champ_values = np.linspace(0.4, 0.9, 12)
    champion = seg_cases(champ_values, keys=keys)
    order = np.random.default_rng(0).permutation(12)
    renumbered_ids = [f"case_{i:04d}" for i in range(12)]
    challenger = seg_cases(champ_values[order] + 0.01, ids=renumbered_ids, keys=[keys[i] for i in order])
    g = decide(challenger, champion, **gate_args(task))
    r = g.groups["abnormality"]
    assert g.promote and g.pairing == "case_key" and g.n_common == 12
    assert r.mean_diff == pytest.approx(0.01) and r.ci_lower == pytest.approx(0.01)  # every pair differs by exactly 0.01
    assert "12 common case(s) by case key" in g.reason
    for a, b in pair_cases(challenger, champion).pairs:
        assert a["case_key"] == b["case_key"]
    # one side without keys (a champion evaluated before keys existed): paired by case id
    legacy = [{k: v for k, v in e.items() if k != "case_key"} for e in champion]
    assert decide(challenger, legacy, **gate_args(task)).pairing == "case_id"


def test_refused_when_the_test_sets_differ_in_content():
    task = lgg_task()
    keys = [f"k{i:02d}" for i in range(10)]
    champion = seg_cases(np.full(10, 0.6), keys=keys)
    # one more case on the challenger's side
    extra = seg_cases(np.full(11, 0.9), keys=keys + ["k99"])
    g = decide(extra, champion, **gate_args(task))
    assert not g.promote and (g.n_only_challenger, g.n_only_champion, g.n_differ) == (1, 0, 0)
    assert "test sets differ in content" in g.reason and "1 case(s) only in the challenger's test set, 0 only in champion's" in g.reason
    # the same case ids, but two of them hold other cases (another ingest of other data)
    other = seg_cases(np.full(10, 0.9), keys=keys[:8] + ["x8", "x9"])
    g = decide(other, champion, **gate_args(task), champion_label="champion v3")
    assert not g.promote and (g.n_only_challenger, g.n_only_champion, g.n_differ) == (2, 2, 2)
    assert "2 only in champion v3's" in g.reason and "2 case id(s) naming different cases" in g.reason and g.groups == {}
    # a key twice on one side
    dup = seg_cases(np.full(3, 0.9), keys=["k00", "k00", "k01"], ids=["a", "b", "c"])
    assert "appears twice" in decide(dup, champion, **gate_args(task)).reason
    # classifier records without keys: the same id with another true class is another subject
    true = np.arange(9) % 3
    p = subject_probs(true, np.full(9, 0.6), seed=0)
    moved = decide(cls_cases(p, (true + 1) % 3), cls_cases(p, true), **gate_args(classifier_task()))
    assert not moved.promote and "another true class" in moved.reason and moved.n_differ == 9


def test_no_champion_and_bad_margin():
    task = classifier_task()
    g = decide(cls_cases(np.eye(3), [0, 1, 2]), None, **gate_args(task))
    assert g.promote and g.reason == "no champion yet" and g.metric == "log_loss" and not g.higher_is_better
    with pytest.raises(ValueError):
        decide([], [], **gate_args(task), margin=-1)
