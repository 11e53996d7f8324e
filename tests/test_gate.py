"""The promotion gate's statistics on a BraTS-like segmentation task (per-case Dice per region): paired bootstrap
CI and the promote/refuse decision (numpy only). Other tasks: tests/test_gate_tasks.py."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.registry.gate import GateDecision, case_dice, decide as gate_decide, paired_bootstrap, regions_in


def decide(challenger, champion, groups=None, primary_group="WT", **kwargs):
    """The gate on per-case Dice (higher is better)."""
    return gate_decide(challenger, champion, groups, "dice", True, primary_group, **kwargs)


def cases(wt, tc=None, et=None, ids=None):
    """Per-case entries as metrics.json's per_case holds them (TC/ET default to WT - 0.05 / - 0.1)."""
    wt = np.asarray(wt, float)
    tc = wt - 0.05 if tc is None else np.asarray(tc, float)
    et = wt - 0.1 if et is None else np.asarray(et, float)
    ids = ids or [f"c{i}" for i in range(len(wt))]
    return [{"case_id": cid, "WT": {"dice": float(a), "hd95": 3.0}, "TC": {"dice": float(b)}, "ET": {"dice": float(c)}, "NETC": {"dice": 0.1}}
            for cid, a, b, c in zip(ids, wt, tc, et)]


def noisy(n, mean, sd, seed):
    return np.clip(np.random.default_rng(seed).normal(mean, sd, n), 0, 1)


# --------------------------------------------------------------------------- paired_bootstrap
def test_bootstrap_matches_normal_approximation():
    d = np.random.default_rng(1).normal(0.02, 0.05, 200)
    mean, lower, upper = paired_bootstrap(d, 4000, 0.05, seed=7)
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert lower < mean < upper
    assert lower == pytest.approx(mean - 1.96 * se, abs=0.2 * 1.96 * se)
    assert upper == pytest.approx(mean + 1.96 * se, abs=0.2 * 1.96 * se)
    _, lo90, up90 = paired_bootstrap(d, 4000, 0.10, seed=7)
    assert lower < lo90 < up90 < upper  # a smaller confidence level gives a narrower interval


def test_bootstrap_deterministic_for_seed_and_edge_cases():
    d = np.random.default_rng(2).normal(0, 0.1, 37)
    assert paired_bootstrap(d, 999, 0.05, seed=3) == paired_bootstrap(d, 999, 0.05, seed=3)
    assert paired_bootstrap(d, 999, 0.05, seed=3) != paired_bootstrap(d, 999, 0.05, seed=4)
    assert paired_bootstrap(np.array([0.25]), 100, 0.05, 0) == (0.25, 0.25, 0.25)  # one case: a point
    assert paired_bootstrap(np.full(5, -0.1), 100, 0.05, 0) == pytest.approx((-0.1, -0.1, -0.1))
    for bad in (np.array([]), np.array([0.1, np.nan]), np.zeros((2, 2))):
        with pytest.raises(ValueError):
            paired_bootstrap(bad, 100, 0.05, 0)
    with pytest.raises(ValueError):
        paired_bootstrap(d, 0, 0.05, 0)
    with pytest.raises(ValueError):
        paired_bootstrap(d, 10, 1.0, 0)


# --------------------------------------------------------------------------- decide
def test_clearly_better_challenger_is_promoted():
    champ = noisy(40, 0.80, 0.05, 0)
    chall = np.clip(champ + 0.05 + np.random.default_rng(1).normal(0, 0.01, 40), 0, 1)
    g = decide(cases(chall), cases(champ), ["WT", "TC", "ET"], "WT", margin=0.0, seed=0)
    assert isinstance(g, GateDecision) and g.promote, g.reason
    assert g.n_common == 40 and set(g.groups) == {"WT", "TC", "ET"} and g.primary_better
    assert (g.metric, g.higher_is_better, g.method, g.pairing, g.primary_group) == ("dice", True, "paired_bootstrap_mean", "case_id", "WT")
    wt = g.groups["WT"]
    assert wt.mean_diff == pytest.approx(wt.challenger_mean - wt.champion_mean) and wt.ci_lower > 0 and wt.non_inferior
    assert "non-inferior" in g.reason and "WT dice" in g.reason


def test_clearly_worse_challenger_is_refused():
    champ = noisy(40, 0.80, 0.05, 0)
    g = decide(cases(champ - 0.05), cases(champ), ["WT", "TC", "ET"], "WT", margin=0.01)
    assert not g.promote and not g.primary_better
    assert all(not r.non_inferior for r in g.groups.values())
    assert "not non-inferior" in g.reason and "not strictly better on WT dice" in g.reason


def test_noisy_equal_challenger_is_refused():
    """Same expected Dice, per-case noise: the CI straddles 0, and with a margin wide enough for
    non-inferiority the point estimate decides (not strictly better → refused); exactly equal is a tie."""
    champ = noisy(30, 0.80, 0.05, 0)
    chall = np.clip(champ + np.random.default_rng(5).normal(0, 0.03, 30), 0, 1)
    g0 = decide(cases(chall), cases(champ), None, "WT", margin=0.0)
    assert not g0.promote and g0.groups["WT"].ci_lower < 0 < g0.groups["WT"].ci_upper
    same = decide(cases(champ), cases(champ), None, "WT", margin=0.5)
    assert not same.promote and all(r.non_inferior for r in same.groups.values())
    assert "not strictly better on WT dice" in same.reason and " = champion" in same.reason
    # a noisy-equal model slightly below the champion on WT is refused even with a generous margin
    slightly_worse = np.clip(champ - 0.002 + np.random.default_rng(6).normal(0, 0.01, 30), 0, 1)
    g = decide(cases(slightly_worse), cases(champ), None, "WT", margin=0.05)
    assert g.groups["WT"].mean_diff < 0 and not g.promote and all(r.non_inferior for r in g.groups.values())


def test_margin_and_every_region_must_be_non_inferior():
    champ = noisy(50, 0.80, 0.05, 0)
    rng = np.random.default_rng(3)
    wt = np.clip(champ + 0.03 + rng.normal(0, 0.01, 50), 0, 1)
    tc_champ = champ - 0.05
    tc = tc_champ - 0.01 + rng.normal(0, 0.01, 50)  # TC a little worse
    args = dict(groups=["WT", "TC"], primary_group="WT")
    refused = decide(cases(wt, tc=tc), cases(champ, tc=tc_champ), margin=0.0, **args)
    assert not refused.promote and refused.primary_better and not refused.groups["TC"].non_inferior
    assert "TC dice diff" in refused.reason
    accepted = decide(cases(wt, tc=tc), cases(champ, tc=tc_champ), margin=0.03, **args)
    assert accepted.promote and accepted.groups["TC"].ci_lower > -0.03


def test_pairing_regions_and_data_problems():
    champ = cases([0.8, 0.8, 0.8], ids=["a", "b", "c"])
    chall = cases([0.9, 0.9, 0.99], ids=["a", "b", "z"])  # z is not in the champion's test set
    g = decide(chall, champ, None, "WT")  # records without case keys: paired by case id, over the common ids
    assert g.pairing == "case_id" and (g.n_only_challenger, g.n_only_champion) == (1, 1)
    assert g.n_common == 2 and g.groups["WT"].n_cases == 2 and g.groups["WT"].challenger_mean == pytest.approx(0.9)
    assert set(g.groups) == {"WT", "TC", "ET", "NETC"}  # None: every name with a Dice in both
    g = decide(chall, champ, ["WT", "XX"], "WT")
    assert g.skipped_groups == ["XX"] and set(g.groups) == {"WT"}
    assert decide(chall, None, None, "WT").promote and decide(chall, None, None, "WT").reason == "no champion yet"
    assert not decide(cases([0.9], ids=["q"]), champ, None, "WT").promote
    assert "no common test cases" in decide(cases([0.9], ids=["q"]), champ, None, "WT").reason
    assert "no common test cases with XX dice" in decide(chall, champ, None, "XX").reason
    dup = decide(chall + chall[:1], champ, None, "WT")
    assert not dup.promote and "twice" in dup.reason
    flat = [{"case_id": "a", "WT_dice": 0.9}, {"case_id": "b", "WT_dice": "0.9"}]
    assert regions_in(flat) == ["WT"] and decide(flat, champ, None, "WT").groups["WT"].n_cases == 2
    assert case_dice({"WT": {"dice": float("nan")}}, "WT") is None and case_dice({"WT": {}}, "WT") is None
    with pytest.raises(ValueError):
        decide(chall, champ, None, "WT", margin=-0.1)
    a, b = decide(chall, champ, None, "WT", seed=1).to_dict(), decide(chall, champ, None, "WT", seed=1).to_dict()
    assert a == b and a["groups"]["WT"]["ci_lower"] == pytest.approx(0.1)
