"""Registry: register with lineage, challenger/champion gate, rollback, and models:/NAME@champion loading.

One SQLite store per module (creating it runs MLflow's migrations, several seconds); each test uses its
own registered model name in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medseg import schemas
from medseg.errors import MedsegError
from medseg.registry import registry as reg
from tests.factories import make_model_package, write_case

LINEAGE = {"manifest_hash": "m" * 64, "git_commit": "abc123", "pipeline_run_id": "pipe-1", "training_run_id": "train-1"}


def make_metrics(wt_by_case: dict[str, float]) -> schemas.Metrics:
    """Metrics with per-case Dice for WT given, TC/ET derived; means computed over the cases."""
    per_case = []
    for case_id, wt in wt_by_case.items():
        per_case.append({"case_id": case_id, **{r: {"dice": wt - d, "hd95": 5.0 + 10 * d} for r, d in (("WT", 0.0), ("TC", 0.05), ("ET", 0.1))}})
    mean = {r: {m: sum(c[r][m] for c in per_case) / len(per_case) for m in ("dice", "hd95")} for r in ("WT", "TC", "ET")}
    return schemas.Metrics(n_cases=len(per_case), mean=mean, per_case=per_case)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("medseg", artifact_location=(tmp / "artifacts").as_uri())
    package = make_model_package(tmp / "model")
    pkg = schemas.ModelPackage.load(package)
    pkg.training["config"] = {"epochs": 3, "learning_rate": 0.003}
    pkg.save(package)
    return {"uri": uri, "package": package, "tmp": tmp}


def register(store, name, metrics, thresholds=None):
    return reg.register_model(store["package"], metrics, name, store["uri"], LINEAGE, thresholds or {"WT": 0.5}, run_name=f"{name}-run")


def test_register_promote_refuse_rollback(store):
    uri, name = store["uri"], "brats-lifecycle"
    client = reg._client(uri)

    r1 = register(store, name, make_metrics({"c1": 0.80, "c2": 0.80, "c3": 0.80}))
    assert r1["version"] == "1" and r1["challenger"] and r1["reason"].startswith("thresholds met")
    mv = client.get_model_version(name, "1")
    for key in reg.LINEAGE_KEYS:
        assert key in mv.tags
    assert mv.tags["git_commit"] == "abc123" and mv.tags["pipeline_run_id"] == "pipe-1"
    assert mv.tags["medseg_version"] and mv.tags["plan_hash"] == schemas.Plans.load(store["package"]).content_hash()
    assert mv.tags["threshold_passed"] == "true"
    run = client.get_run(r1["run_id"])
    assert run.data.metrics["test_WT_dice"] == pytest.approx(0.80) and "test_ET_hd95" in run.data.metrics
    assert run.data.params["configuration"] == "3d_fullres" and run.data.params["learning_rate"] == "0.003"
    assert {a.path for a in client.list_artifacts(r1["run_id"], "evaluation")} >= {"evaluation/metrics.json", "evaluation/per_case.json"}
    assert show(store, name)["aliases"] == {"challenger": "1"}

    p1 = reg.promote(name, 1, uri, None)
    assert p1["promoted"] and p1["reason"] == "no champion yet" and p1["champion_version"] == "1"
    assert show(store, name)["aliases"] == {"champion": "1"}  # challenger moved on to champion

    # v2 worse on the common cases (c4 only in v2 and ignored): refused, champion stays 1
    r2 = register(store, name, make_metrics({"c1": 0.70, "c2": 0.75, "c4": 0.99}))
    assert r2["version"] == "2" and r2["challenger"]
    p2 = reg.promote(name, "2", uri, None)
    assert not p2["promoted"] and p2["champion_version"] == "1" and p2["n_common_cases"] == 2
    assert p2["challenger_dice"] == pytest.approx(0.725) and p2["champion_dice"] == pytest.approx(0.80)
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion_decision"] == "refused" and "< champion v1" in tags["promotion_reason"]
    assert tags["promotion_n_common_cases"] == "2"
    aliases = show(store, name)["aliases"]
    assert aliases["champion"] == "1" and aliases["challenger"] == "2"

    # the margin tolerates a small drop
    assert reg.promote(name, "2", uri, None, margin=0.1)["promoted"]
    assert reg.rollback(name, uri)["champion_version"] == "1"

    # v3 better: promoted, the old champion becomes previous-champion
    r3 = register(store, name, make_metrics({"c1": 0.85, "c2": 0.90, "c3": 0.85}))
    p3 = reg.promote(name, r3["version"], uri, None)
    assert p3["promoted"] and p3["champion_version"] == "3" and p3["previous_champion_version"] == "1"
    assert client.get_model_version(name, "3").tags["promotion_decision"] == "promoted"
    aliases = show(store, name)["aliases"]
    assert aliases["champion"] == "3" and aliases["previous-champion"] == "1"
    assert all(isinstance(v, str) for v in aliases.values())

    # rollback restores the previous champion; a second rollback undoes it
    assert reg.rollback(name, uri) == {"name": name, "champion_version": "1", "previous_champion_version": "3"}
    assert show(store, name)["aliases"]["champion"] == "1"
    reg.rollback(name, uri)
    assert show(store, name)["aliases"]["champion"] == "3"

    # no common cases: refused with that reason
    p4 = reg.promote(name, "2", uri, make_metrics({"x9": 0.99}).per_case)
    assert not p4["promoted"] and "no common test cases" in p4["reason"]

    listed = {m["name"]: m for m in reg.list_models(uri)}
    assert listed[name]["aliases"]["champion"] == "3" and listed[name]["latest_version"] == "3"
    shown = show(store, name)
    assert [v["version"] for v in shown["versions"]] == ["1", "2", "3"]
    assert "champion" in shown["versions"][2]["aliases"]


def show(store, name):
    return reg.show_model(name, store["uri"])


def test_thresholds_failing_blocks_challenger_and_promotion(store):
    uri, name = store["uri"], "brats-thresholds"
    r = register(store, name, make_metrics({"c1": 0.6, "c2": 0.7}), thresholds={"WT": 0.8, "ET": 0.1})
    assert not r["challenger"] and "WT Dice 0.6500 < 0.8000" in r["reason"]
    assert show(store, name)["aliases"] == {}
    tags = reg._client(uri).get_model_version(name, r["version"]).tags
    assert tags["threshold_passed"] == "false" and "below threshold" in tags["threshold_reason"]
    p = reg.promote(name, r["version"], uri, None)  # even with no champion yet
    assert not p["promoted"] and "thresholds" in p["reason"] and p["champion_version"] is None
    assert reg._client(uri).get_model_version(name, r["version"]).tags["promotion_decision"] == "refused"
    with pytest.raises(MedsegError, match="previous-champion"):
        reg.rollback(name, uri)
    with pytest.raises(MedsegError, match="no registered model"):
        reg.show_model("does-not-exist", uri)


def test_cli_list_show_promote(store, capsys):
    import argparse

    name = "brats-cli"
    register(store, name, make_metrics({"c1": 0.9}))
    parser = argparse.ArgumentParser()
    reg.add_arguments(parser)
    assert reg.run(parser.parse_args(["promote", name, "1", "--tracking-uri", store["uri"]])) == 0
    assert "promoted: version 1: no champion yet" in capsys.readouterr().out
    assert reg.run(parser.parse_args(["show", name, "--tracking-uri", store["uri"], "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == {"champion": "1"}
    assert reg.run(parser.parse_args(["list", "--tracking-uri", store["uri"]])) == 0
    assert f"{name}  latest v1  (champion=v1)" in capsys.readouterr().out


def test_champion_loads_and_predicts_in_fresh_process(store, tmp_path):
    name = "brats-serve"
    register(store, name, make_metrics({"c1": 0.9}))
    assert reg.promote(name, "1", store["uri"], None)["promoted"]
    paths, _ = write_case(tmp_path / "case")
    out = tmp_path / "pred" / "case-pred.nii.gz"
    script = textwrap.dedent(f"""
        import json, mlflow, mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model("models:/{name}@champion")
        frame = pd.DataFrame([{{**dict(zip(["t1n", "t1c", "t2w", "t2f"], {[str(p) for p in paths]!r})), "output": {str(out)!r}}}])
        result = model.predict(frame)
        print("RESULT" + json.dumps(result.to_dict(orient="records")))
        local = mlflow.artifacts.download_artifacts("models:/{name}@champion", dst_path={str(tmp_path / "dl")!r})
        print("LOCAL" + local)
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    rows = json.loads(line[len("RESULT"):])
    assert len(rows) == 1 and rows[0]["output"] == str(out)
    assert {"WT_ml", "TC_ml", "ET_ml"} <= rows[0].keys() and all(rows[0][k] >= 0 for k in ("WT_ml", "TC_ml", "ET_ml"))

    import nibabel as nib
    import numpy as np

    img = nib.load(str(out))
    ref = nib.load(str(paths[0]))
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 3}
    local = Path(next(l for l in proc.stdout.splitlines() if l.startswith("LOCAL"))[len("LOCAL"):])
    from medseg.registry.pyfunc_model import PACKAGE_SUBDIR, package_dir_of

    assert (local / PACKAGE_SUBDIR / schemas.MODEL_PACKAGE_JSON).is_file() and (local / "MLmodel").is_file()
    assert package_dir_of(local) == local / PACKAGE_SUBDIR
