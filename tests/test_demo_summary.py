"""The demo's summary line reports the alias the registry holds for the served version (issue 16, point 8), read
from a real SQLite MLflow registry: null when the gate refused the only model, ``champion`` when an earlier
champion answered after the gate refused the new version."""

from __future__ import annotations

import pytest

from medseg.demo import build_summary, served_alias
from medseg.registry import registry as reg
from medseg.task import Task
from tests.test_registry import LINEAGE, make_metrics, store  # noqa: F401  (store: the module's SQLite registry fixture)


def _smoke(version: str) -> dict:
    return {"model_version": version, "endpoint_ok": True, "case_id": "c1", "request_seconds": 0.1}


def test_gate_refused_the_only_model_no_alias(store) -> None:  # noqa: F811
    uri, name = store["uri"], "demo-refused"
    weak = make_metrics({"c1": 0.2, "c2": 0.3})
    r = reg.register_model(store["package"], weak, name, uri, LINEAGE, {"auto": True}, run_name=f"{name}-run")
    assert not r["challenger"]
    assert not reg.promote(name, r["version"], uri, None)["promoted"]
    task = Task.from_folder(store["package"])
    # nothing served (the serve step found no champion): no version, no alias
    summary = build_summary(task, weak, name, None, uri, 1.0)
    assert summary["alias"] is None and summary["model_version"] is None and summary["endpoint_ok"] is False
    # a version that is registered but holds no alias is not reported as the champion either
    assert served_alias(uri, name, r["version"]) is None
    assert build_summary(task, weak, name, _smoke(r["version"]), uri, 1.0)["alias"] is None


def test_earlier_champion_served_after_a_refusal(store) -> None:  # noqa: F811
    uri, name = store["uri"], "demo-champion"
    good = make_metrics({"c1": 0.9, "c2": 0.9, "c3": 0.9})
    first = reg.register_model(store["package"], good, name, uri, LINEAGE, {"auto": True}, run_name=f"{name}-run1")
    assert reg.promote(name, first["version"], uri, None)["promoted"]
    weak = make_metrics({"c1": 0.2, "c2": 0.3, "c3": 0.2})
    second = reg.register_model(store["package"], weak, name, uri, LINEAGE, {"auto": True}, run_name=f"{name}-run2")
    assert not reg.promote(name, second["version"], uri, None)["promoted"]
    summary = build_summary(Task.from_folder(store["package"]), weak, name, _smoke(first["version"]), uri, 2.0)
    assert (summary["model_version"], summary["alias"], summary["endpoint_ok"]) == (first["version"], reg.CHAMPION, True)
    # the scores are the new version's, one per reported group of the task
    groups = list(Task.from_folder(store["package"]).reported_groups)
    assert [k for k in summary if k.endswith("_dice")] == [f"{g.lower()}_dice" for g in groups]
    assert summary[f"{groups[0].lower()}_dice"] == pytest.approx(weak.mean[groups[0]]["dice"], abs=1e-4)
