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
    assert not p2["promoted"] and p2["champion_version"] == "1" and p2["n_common_cases"] == 2 and p2["pairing"] == "case_id"
    assert p2["challenger_value"] == pytest.approx(0.725) and p2["champion_value"] == pytest.approx(0.80)
    assert (p2["metric"], p2["primary_group"], p2["task_kind"], p2["higher_is_better"]) == ("dice", "WT", "segmentation", True)
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion_decision"] == "refused" and "WT dice 0.7250 < champion v1 0.8000" in tags["promotion_reason"]
    assert tags["promotion_metric"] == "dice" and tags["promotion_direction"] == "higher is better"
    assert tags["promotion_n_common_cases"] == "2"
    aliases = show(store, name)["aliases"]
    assert aliases["champion"] == "1" and aliases["challenger"] == "2"

    # the bootstrap gate: a margin makes a small drop non-inferior, but the challenger must still be
    # strictly better on the primary region (before the gate, margin=0.1 promoted v2 here)
    p2m = reg.promote(name, "2", uri, None, margin=0.1)
    assert not p2m["promoted"] and "not strictly better on WT dice" in p2m["reason"]
    assert p2m["gate"]["groups"]["WT"]["ci_lower"] == pytest.approx(-0.1) and p2m["gate"]["groups"]["WT"]["ci_upper"] == pytest.approx(-0.05)
    assert show(store, name)["aliases"]["champion"] == "1"

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
    assert not r["challenger"] and "WT dice 0.6500 < 0.8000" in r["reason"]
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


# --------------------------------------------------------------------------- the bootstrap gate, its records, its lock
def make_metrics_regions(rows: dict[str, tuple[float, float, float]]) -> schemas.Metrics:
    """Metrics with per-case (WT, TC, ET) Dice given per case."""
    per_case = [{"case_id": c, **{r: {"dice": d, "hd95": 5.0} for r, d in zip(("WT", "TC", "ET"), v)}} for c, v in rows.items()]
    mean = {r: {m: sum(c[r][m] for c in per_case) / len(per_case) for m in ("dice", "hd95")} for r in ("WT", "TC", "ET")}
    return schemas.Metrics(n_cases=len(per_case), mean=mean, per_case=per_case)


def check_serialised(log):
    """Every decision saw the champion the previous one left (the lock's invariant)."""
    for before, after in zip(log, log[1:]):
        assert after["champion_before"] == before["champion_after"], (before, after)


def test_gate_margin_per_region_and_audit_trail(store, capsys):
    import argparse

    uri, name = store["uri"], "brats-gate"
    client = reg._client(uri)
    register(store, name, make_metrics_regions({f"c{i}": (0.80, 0.70, 0.60) for i in range(6)}))
    assert reg.promote(name, "1", uri)["promoted"]
    # v2: WT clearly better, TC 0.01 worse on every case, ET equal-ish
    r2 = register(store, name, make_metrics_regions({f"c{i}": (0.86 + 0.01 * (i % 2), 0.69, 0.60 + 0.01 * (i % 3)) for i in range(6)}))
    p = reg.promote(name, r2["version"], uri, margin=0.0, alpha=0.1, n_bootstrap=500, seed=3)
    assert not p["promoted"] and "TC dice diff -0.0100" in p["reason"] and p["compared_with"] == "1"
    assert p["gate"]["groups"]["TC"]["non_inferior"] is False and p["gate"]["groups"]["WT"]["non_inferior"] is True
    assert (p["alpha"], p["n_bootstrap"], p["seed"]) == (0.1, 500, 3)
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion_decision"] == "refused" and tags["promotion_alpha"] == "0.1" and tags["promotion_n_bootstrap"] == "500"
    groups = json.loads(tags["promotion_groups"])
    assert set(groups) == {"WT", "TC", "ET"} and groups["TC"]["diff"] == pytest.approx(-0.01) and groups["TC"]["n"] == 6
    # the record artifact in v2's run (log: 1 register v1, 2 promote v1, 3 register v2, 4 promote v2)
    assert p["record"] == tags["promotion_record"] == f"runs:/{r2['run_id']}/promotion/000004-v2-refused.json"
    record_file = client.download_artifacts(r2["run_id"], "promotion/000004-v2-refused.json", str(store["tmp"]))
    record = json.loads(Path(record_file).read_text())
    assert record["decision"] == "refused" and record["gate"]["groups"]["TC"]["non_inferior"] is False and record["lock"]["kind"] == "file"

    # with a 0.03 margin TC is non-inferior: promoted; the CLI takes --alpha/--n-bootstrap/--seed
    parser = argparse.ArgumentParser()
    reg.add_arguments(parser)
    assert reg.run(parser.parse_args(["promote", name, "2", "--tracking-uri", uri, "--margin", "0.03", "--alpha", "0.1", "--n-bootstrap", "300", "--seed", "1"])) == 0
    out = capsys.readouterr().out
    assert out.startswith("promoted: version 2: WT dice") and "TC dice: 0.6900 vs 0.7000  diff -0.0100  90% CI" in out and "champion: v2" in out
    assert client.get_model_version(name, "2").tags["promotion_n_bootstrap"] == "300"

    shown = reg.show_model(name, uri)
    log = shown["promotion_log"]
    assert [(e["seq"], e["action"], e["version"], e["decision"]) for e in log] == [
        (1, "register", "1", "challenger"), (2, "promote", "1", "promoted"), (3, "register", "2", "challenger"),
        (4, "promote", "2", "refused"), (5, "promote", "2", "promoted")]
    assert shown["last_decision"] == log[-1] and log[-1]["champion_after"] == "2" and log[-1]["previous_champion_after"] == "1"
    check_serialised(log)
    reg.rollback(name, uri)
    log = reg.show_model(name, uri)["promotion_log"]
    assert log[-1]["action"] == "rollback" and log[-1]["champion_after"] == "1"
    check_serialised(log)
    assert reg.run(parser.parse_args(["show", name, "--tracking-uri", uri])) == 0
    out = capsys.readouterr().out
    assert "last decision (#6 of 6" in out and "rollback v1: rolled back" in out
    assert "task segmentation  dice: " in out and '"WT": 0.86' in out  # per version: the task and its primary metric


def test_file_lock_and_lease(store):
    from medseg.registry import lock as lk

    uri, name = store["uri"], "brats-lock"
    client = reg._client(uri)
    client.create_registered_model(name)
    assert lk.lock_file_for(uri) == Path(store["tmp"]) / "mlflow.db.promote.lock"
    assert lk.lock_file_for("http://127.0.0.1:5000") is None and lk.lock_file_for("sqlite:///:memory:") is None
    with lk.promotion_lock(client, name, uri) as held:
        assert held.kind == "file" and Path(held.path).is_file()
        with pytest.raises(MedsegError, match="timed out"):  # a second holder (own file description) waits
            with lk.promotion_lock(client, name, uri, timeout_s=0.2):
                pass
    with lk.promotion_lock(client, name, uri, timeout_s=0.2):  # released
        pass

    kw = {"kind": "lease", "settle_s": 0.05}
    with lk.promotion_lock(client, name, uri, **kw) as held:
        assert held.kind == "lease" and lk.read_lease(client, name)["owner"] == held.owner
        held.check()
        with pytest.raises(MedsegError, match="timed out.*held by"):
            with lk.promotion_lock(client, name, uri, timeout_s=0.3, **kw):
                pass
        client.set_registered_model_tag(name, lk.LEASE_TAG, json.dumps({"owner": "someone-else", "expires": 9e9}))
        with pytest.raises(MedsegError, match="lost the promotion lease"):
            held.check()
    assert lk.read_lease(client, name)["owner"] == "someone-else"  # not ours: left alone on release
    client.set_registered_model_tag(name, lk.LEASE_TAG, json.dumps({"owner": "crashed", "expires": 1.0}))  # expired
    with lk.promotion_lock(client, name, uri, timeout_s=2, **kw) as held:
        assert lk.read_lease(client, name)["owner"] == held.owner
    assert lk.read_lease(client, name) is None


def race(name: str, uri: str, versions: list[str], **kwargs) -> dict[str, dict]:
    """Promote ``versions`` of ``name`` from one spawned process each, released together by a barrier."""
    import multiprocessing as mp

    from tests.registry_workers import promote_after_barrier

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(versions)), ctx.Queue()
    procs = [ctx.Process(target=promote_after_barrier, args=(barrier, queue, name, v, uri, kwargs)) for v in versions]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for v, r in results.items():
        assert isinstance(r, dict), f"v{v}: {r}"
    return results


def test_concurrent_promotions_are_serialised(store):
    uri, name = store["uri"], "brats-race"
    register(store, name, make_metrics({"c1": 0.80, "c2": 0.81, "c3": 0.79, "c4": 0.80}))
    register(store, name, make_metrics({"c1": 0.90, "c2": 0.91, "c3": 0.89, "c4": 0.90}))  # v2 clearly better
    results = race(name, uri, ["1", "2"])
    first, second = sorted(results.values(), key=lambda r: r["log_seq"])
    assert first["promoted"] and first["reason"] == "no champion yet" and first["compared_with"] is None
    assert second["compared_with"] == first["version"]  # decided against the champion the first one made
    assert second["reason"] != "no champion yet" and second["n_common_cases"] == 4
    shown = reg.show_model(name, uri)
    assert shown["aliases"]["champion"] == "2"  # whichever order: v2 wins (promoted over v1, or v1 refused against v2)
    assert second["promoted"] == (first["version"] == "1")
    log = [e for e in shown["promotion_log"] if e["action"] == "promote"]
    assert [e["seq"] for e in log] == [3, 4] and [e["version"] for e in log] == [first["version"], second["version"]]
    assert log[1]["compared_with"] == log[0]["version"] == log[0]["champion_after"]
    check_serialised(shown["promotion_log"])
    for r in results.values():  # both decisions recorded on their versions
        assert reg._client(uri).get_model_version(name, r["version"]).tags["promotion_decision"] == ("promoted" if r["promoted"] else "refused")


# --------------------------------------------------------------------------- a real `mlflow server` on 127.0.0.1
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, store):
    import signal
    import time
    import urllib.request

    from medseg.serving.server import free_port

    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port("127.0.0.1")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed at the end
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/srv.db",
                             "--artifacts-destination", str(tmp / "art"), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError(f"mlflow server not healthy after {time.monotonic() - t0:.0f} s:\n" + (tmp / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {"uri": url, "startup_s": time.monotonic() - t0, "package": store["package"], "tmp": tmp}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this fixture started
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_register_promote_rollback_over_rest(mlflow_server):
    from medseg.registry import lock as lk

    uri, name = mlflow_server["uri"], "brats-rest"
    srv = {"uri": uri, "package": mlflow_server["package"]}
    assert lk.lock_file_for(uri) is None  # http: the tag lease
    r1 = register(srv, name, make_metrics({"c1": 0.80, "c2": 0.80, "c3": 0.81}))
    r2 = register(srv, name, make_metrics({"c1": 0.85, "c2": 0.86, "c3": 0.87}))
    assert (r1["version"], r2["version"]) == ("1", "2")
    p1 = reg.promote(name, 1, uri)
    assert p1["promoted"] and p1["lock"]["kind"] == "lease" and p1["champion_version"] == "1"
    p2 = reg.promote(name, "2", uri, n_bootstrap=500)
    assert p2["promoted"] and p2["compared_with"] == "1" and p2["n_common_cases"] == 3
    shown = reg.show_model(name, uri)
    assert shown["aliases"] == {"champion": "2", "previous-champion": "1"}  # str over REST too
    assert lk.LEASE_TAG not in shown["tags"]  # released
    client = reg._client(uri)
    assert client.get_model_version(name, "2").tags["promotion_decision"] == "promoted"
    rec = client.download_artifacts(r2["run_id"], "promotion/000004-v2-promoted.json", str(mlflow_server["tmp"]))
    assert json.loads(Path(rec).read_text())["compared_with"] == "1"
    assert reg.rollback(name, uri) == {"name": name, "champion_version": "1", "previous_champion_version": "2"}
    assert reg.show_model(name, uri)["aliases"]["champion"] == "1"
    p3 = reg.promote(name, "1", uri)
    assert not p3["promoted"] and "already the champion" in p3["reason"]
    log = reg.show_model(name, uri)["promotion_log"]
    assert [e["action"] for e in log] == ["register", "register", "promote", "promote", "rollback"]
    check_serialised(log)


@pytest.mark.slow
def test_concurrent_promotions_over_rest_lease(mlflow_server):
    uri, name = mlflow_server["uri"], "brats-rest-race"
    srv = {"uri": uri, "package": mlflow_server["package"]}
    register(srv, name, make_metrics({"c1": 0.80, "c2": 0.81, "c3": 0.79}))
    register(srv, name, make_metrics({"c1": 0.90, "c2": 0.91, "c3": 0.89}))
    results = race(name, uri, ["1", "2"])
    first, second = sorted(results.values(), key=lambda r: r["log_seq"])
    assert first["reason"] == "no champion yet" and second["compared_with"] == first["version"]
    shown = reg.show_model(name, uri)
    assert shown["aliases"]["champion"] == "2"
    check_serialised(shown["promotion_log"])


def test_input_example_is_stored_with_the_logged_model(store, tmp_path):
    from medseg.registry.pyfunc_model import input_example_from_dataset
    from tests.factories import write_case

    dataset = tmp_path / "dataset"
    files, _ = write_case(dataset / "cases", shape=(20, 20, 20), seed=5)
    (dataset / schemas.IMAGES_TR).mkdir(parents=True)
    for i, f in enumerate(files):
        (dataset / schemas.IMAGES_TR / f"case1_{i:04d}.nii.gz").write_bytes(f.read_bytes())
    schemas.Splits(test=["case1"], folds=[]).save(dataset)
    example = input_example_from_dataset(dataset, store["package"])
    assert list(example.columns) == [*schemas.Plans.load(store["package"]).channel_names, "case_id"]
    result = reg.register_model(store["package"], make_metrics({"c1": 0.9, "c2": 0.9, "c3": 0.9}), "brats-example", store["uri"], LINEAGE,
                                {"WT": 0.5}, input_example=example)
    import mlflow

    with reg._tracking(store["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(tmp_path / "dl")))
    assert (local / "input_example.json").is_file() and "case1" in (local / "input_example.json").read_text()
    assert input_example_from_dataset(tmp_path / "nothing-here", store["package"]) is None


def test_cli_gate_settings_follow_params(tmp_path):
    """`medseg registry promote` gates as the pipeline does: params.yaml's registry section, options over it."""
    params = tmp_path / "params.yaml"
    params.write_text("registry:\n  promotion_margin: 0.02\n  gate_metric: iou\n")
    assert reg.gate_settings(params) == (0.02, "iou")
    assert reg.gate_settings(params, margin=0.05, gate_metric="auto") == (0.05, "auto")
    assert reg.gate_settings(tmp_path / "absent.yaml") == (0.0, "auto")
    (tmp_path / "bad.yaml").write_text("registry: [unclosed\n")
    with pytest.raises(MedsegError, match="bad.yaml"):
        reg.gate_settings(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------- a gate per task
CLASSES = ["CN", "MCI", "AD"]


def task_package(store, folder: str, dataset: schemas.DatasetJson) -> Path:
    """The test package with another task's dataset.json (untrained weights: the gate only reads metrics)."""
    import shutil

    out = store["tmp"] / folder
    if not out.exists():
        shutil.copytree(store["package"], out)
        dataset.save(out)
    return out


def classifier_package(store) -> Path:
    return task_package(store, "classifier", schemas.DatasetJson(name="Dataset100_ADNI", channel_names={"0": "t1"}, labels={c: i for i, c in enumerate(CLASSES)},
                                                                 numTraining=30, task="classification", source_format="classification", covariates=["age"]))


def lgg_package(store) -> Path:
    return task_package(store, "lgg", schemas.DatasetJson(name="Dataset002_LGG", channel_names={"0": "pre", "1": "flair", "2": "post"},
                                                          labels={"background": 0, "abnormality": 1}, numTraining=30, slice_axis=2,
                                                          source_format="lgg", primary_metric="iou"))


def classifier_metrics(confidence: float, n: int = 30, keys: list[str] | None = None, seed: int = 0) -> schemas.Metrics:
    """A classifier's metrics.json: per subject its class probabilities (``confidence`` on the true class on
    average), log-loss and case key; ``mean`` as the evaluation computes it."""
    import numpy as np

    from medseg.evaluation.classification import classification_metrics, log_losses

    true = np.arange(n) % 3
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1, 1, 1], n) * (1 - confidence)
    probs[np.arange(n), true] += confidence
    keys = keys or [f"key-{i:03d}" for i in range(n)]
    losses = log_losses(true, probs)
    per_case = [{"case_id": f"case_{i:04d}", "case_key": keys[i],
                 "all": {**{f"prob_{c}": float(p) for c, p in zip(CLASSES, probs[i])}, "pred": int(probs[i].argmax()), "true": int(true[i]),
                         "log_loss": float(losses[i])}} for i in range(n)]
    return schemas.Metrics(n_cases=n, mean=classification_metrics(true, probs, CLASSES), per_case=per_case)


def test_classifier_registered_promoted_then_gated_on_log_loss(store):
    from medseg.io import sha256_json

    uri, name = store["uri"], "adni-classifier"
    package = classifier_package(store)
    client = reg._client(uri)
    m1 = classifier_metrics(0.5)
    r1 = reg.register_model(package, m1, name, uri, LINEAGE, {"auto": True})
    assert r1["challenger"] and r1["reason"].startswith("thresholds met: all log_loss") and "<= 1.0986 (lower is better)" in r1["reason"]
    tags = client.get_model_version(name, "1").tags
    assert (tags["task_kind"], tags["primary_metric"], tags["primary_group"], json.loads(tags["gate_groups"])) == ("classification", "log_loss", "all", ["all"])
    assert tags["test_set_hash"] == r1["test_set_hash"] == sha256_json(sorted(c["case_key"] for c in m1.per_case))
    assert json.loads(tags["thresholds"]) == {"all/log_loss": pytest.approx(1.0986)}
    assert json.loads(client.get_registered_model(name).tags["task_signature"])["classes"] == CLASSES
    metrics = client.get_run(r1["run_id"]).data.metrics
    for key in ("test_all_accuracy", "test_all_balanced_accuracy", "test_all_auc_macro", "test_all_log_loss", "test_CN_auc", "test_AD_auc", "test_n_cases"):
        assert key in metrics, key
    assert metrics["test_all_log_loss"] == pytest.approx(m1.mean["all"]["log_loss"])

    p1 = reg.promote(name, "1", uri)
    assert p1["promoted"] and p1["reason"] == "no champion yet" and p1["metric"] == "log_loss" and p1["primary_group"] == "all"
    # v2: more probability on the truth for every subject → lower log-loss → promoted
    r2 = reg.register_model(package, classifier_metrics(0.7), name, uri, LINEAGE, {"auto": True})
    p2 = reg.promote(name, r2["version"], uri, n_bootstrap=500)
    assert p2["promoted"] and p2["pairing"] == "case_key" and p2["n_common_cases"] == 30 and not p2["higher_is_better"]
    assert p2["challenger_value"] < p2["champion_value"] and p2["reason"].startswith("log_loss ")
    # v3: worse than v2 → refused, in the task's words
    r3 = reg.register_model(package, classifier_metrics(0.6), name, uri, LINEAGE, {"auto": True})
    p3 = reg.promote(name, r3["version"], uri, n_bootstrap=500)
    assert not p3["promoted"] and p3["champion_version"] == "2"
    assert f"log_loss {p3['challenger_value']:.4f} > champion v2 {p3['champion_value']:.4f} (lower is better)" in p3["reason"]
    v3 = client.get_model_version(name, "3").tags
    assert v3["promotion_metric"] == "log_loss" and v3["promotion_direction"] == "lower is better" and v3["promotion_pairing"] == "case_key"
    # the macro AUC gate on request; a segmentation metric is not one of a classifier's
    pa = reg.promote(name, "3", uri, gate_metric="auc_macro", n_bootstrap=300)
    assert pa["metric"] == "auc_macro" and pa["gate"]["method"] == "paired_bootstrap_auc_macro" and pa["higher_is_better"]
    assert pa["reason"].startswith("not non-inferior") or "auc_macro" in pa["reason"]
    with pytest.raises(MedsegError, match="log_loss or auc_macro"):
        reg.promote(name, "3", uri, gate_metric="dice")
    # a challenger evaluated on other subjects: refused, saying so
    r4 = reg.register_model(package, classifier_metrics(0.9, keys=[f"key-{i:03d}" for i in range(29)] + ["another"]), name, uri, LINEAGE, {"auto": True})
    p4 = reg.promote(name, r4["version"], uri, n_bootstrap=200)
    assert not p4["promoted"] and "test sets differ in content" in p4["reason"] and "1 case(s) only in the challenger's test set" in p4["reason"]
    assert p4["gate"]["n_differ"] == 1  # case_0029 is another subject on the two sides
    # the task's default threshold: no worse than a uniform guess
    r5 = reg.register_model(package, classifier_metrics(0.0), name, uri, LINEAGE, {"auto": True})  # log-loss 1.26: worse than guessing
    assert not r5["challenger"] and r5["reason"] == "below threshold: all log_loss 1.2632 > 1.0986 (lower is better)"
    assert reg.show_model(name, uri)["aliases"]["champion"] == "2"


def test_segmentation_task_judged_by_iou(store, capsys):
    import argparse

    uri = store["uri"]
    package = lgg_package(store)
    client = reg._client(uri)

    def metrics(iou: float, dice: float) -> schemas.Metrics:
        per_case = [{"case_id": f"case_{i:04d}", "case_key": f"slice-key-{i}", "abnormality": {"dice": dice + 0.01 * (i % 3), "iou": iou + 0.01 * (i % 3), "hd95": 4.0}}
                    for i in range(9)]
        mean = {"abnormality": {k: sum(c["abnormality"][k] for c in per_case) / 9 for k in ("dice", "iou", "hd95")}}
        return schemas.Metrics(n_cases=9, mean=mean, per_case=per_case)

    r1 = reg.register_model(package, metrics(0.63, 0.75), "auto", uri, LINEAGE, {"auto": True})
    name = r1["name"]
    assert name == "lgg-segmentation" and r1["challenger"] and r1["reason"] == "thresholds met: abnormality iou 0.6400 >= 0.5000"
    tags = client.get_model_version(name, "1").tags
    assert (tags["primary_metric"], tags["primary_group"], json.loads(tags["test_primary"])) == ("iou", "abnormality", {"abnormality": pytest.approx(0.64)})
    run_metrics = client.get_run(r1["run_id"]).data.metrics
    assert run_metrics["test_abnormality_iou"] == pytest.approx(0.64) and run_metrics["test_abnormality_dice"] == pytest.approx(0.76)
    assert reg.promote(name, "1", uri)["promoted"]
    # v2: better Dice, worse IoU: the task's metric decides
    r2 = reg.register_model(package, metrics(0.60, 0.85), name, uri, LINEAGE, {"auto": True, "abnormality/dice": 0.7})
    assert r2["challenger"] and "abnormality dice 0.8600 >= 0.7000" in r2["reason"] and "abnormality iou" in r2["reason"]
    # a version registered before the task tags existed: promote reads the task from its package instead
    for key in reg.TASK_TAGS:
        client.delete_model_version_tag(name, "2", key)
    p2 = reg.promote(name, "2", uri, n_bootstrap=300)
    assert not p2["promoted"] and p2["metric"] == "iou" and "abnormality iou 0.6100 < champion v1 0.6400" in p2["reason"]
    on_dice = reg.promote(name, "2", uri, gate_metric="dice", n_bootstrap=300)
    assert on_dice["promoted"] and on_dice["metric"] == "dice"
    parser = argparse.ArgumentParser()
    reg.add_arguments(parser)
    assert reg.run(parser.parse_args(["show", name, "--tracking-uri", uri])) == 0
    out = capsys.readouterr().out
    assert 'v1 [previous-champion]' in out and 'task segmentation  iou: {"abnormality": 0.64}' in out and "test_set_hash: " in out
    with pytest.raises(SystemExit):  # the task decides the primary group: no --primary-region any more
        parser.parse_args(["promote", name, "2", "--primary-region", "WT"])


def test_thresholds_auto_per_task(store):
    from medseg.task import Task

    brats, lgg, cls = Task.from_folder(store["package"]), Task.from_folder(lgg_package(store)), Task.from_folder(classifier_package(store))
    assert reg.resolve_thresholds(brats, {"auto": True}) == {"WT/dice": 0.5}
    assert reg.resolve_thresholds(brats, {"auto": True, "WT": 0.9, "ET/hd95": 20}) == {"WT/dice": 0.9, "ET/hd95": 20.0}
    assert reg.resolve_thresholds(brats, {"auto": False, "TC": 0.3}) == {"TC/dice": 0.3}
    assert reg.resolve_thresholds(lgg, {"auto": True}) == {"abnormality/iou": 0.5}
    assert reg.resolve_thresholds(cls, {"auto": True}) == {"all/log_loss": pytest.approx(1.0986)}
    assert reg.resolve_thresholds(cls, {}) == {}
    passed, reason = reg.check_thresholds(make_metrics({"c1": 0.9}), {"ET/hd95": 4.0, "WT": 0.8}, brats)
    assert not passed and "ET hd95 6.0000 > 4.0000 (lower is better)" in reason and "WT dice" not in reason.split("below threshold: ")[1]
    assert reg.check_thresholds(make_metrics({"c1": 0.9}), {"abnormality": 0.5}, lgg) == (False, "below threshold: abnormality: no mean iou in the metrics")
    with pytest.raises(MedsegError, match="unknown metric"):
        reg.check_thresholds(make_metrics({"c1": 0.9}), {"WT/dise": 0.5}, brats)


def test_another_task_under_the_same_name_is_refused(store):
    uri, name = store["uri"], "brats-one-task"
    register(store, name, make_metrics({"c1": 0.9}))
    client = reg._client(uri)
    assert json.loads(client.get_registered_model(name).tags["task_signature"])["regions"] == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    with pytest.raises(MedsegError, match="holds models of task .*\"kind\": \"segmentation\".*this package's task is .*\"kind\": \"classification\""):
        reg.register_model(classifier_package(store), classifier_metrics(0.8), name, uri, LINEAGE, {})
    assert [v["version"] for v in reg.show_model(name, uri)["versions"]] == ["1"]
    # a model registered before signatures were tagged adopts the first signature registered under the lock
    client.delete_registered_model_tag(name, "task_signature")
    register(store, name, make_metrics({"c1": 0.9}))
    assert json.loads(client.get_registered_model(name).tags["task_signature"])["kind"] == "segmentation"


def test_concurrent_registrations_and_promotions_leave_one_champion(store):
    """Two pipelines register and promote at once: the challenger alias and the champion move under one lock,
    every decision is taken against the state the previous one left."""
    import multiprocessing as mp

    from tests.registry_workers import register_and_promote_after_barrier

    uri, name = store["uri"], "brats-register-race"
    good = make_metrics({f"c{i}": 0.90 for i in range(4)}).to_dict()
    weak = make_metrics({f"c{i}": 0.80 for i in range(4)}).to_dict()
    for m in (good, weak):
        for i, entry in enumerate(m["per_case"]):
            entry["case_key"] = f"brats-key-{i}"
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=register_and_promote_after_barrier, args=(barrier, queue, tag, str(store["package"]), m, name, uri, {"n_bootstrap": 300}))
             for tag, m in (("good", good), ("weak", weak))]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for tag, r in results.items():
        assert isinstance(r, dict), f"{tag}: {r}"
    good_version = results["good"]["register"]["version"]
    assert {r["register"]["version"] for r in results.values()} == {"1", "2"}
    shown = reg.show_model(name, uri)
    assert shown["aliases"]["champion"] == good_version  # either order: the better model ends as champion
    log = shown["promotion_log"]
    assert sorted(e["action"] for e in log) == ["promote", "promote", "register", "register"] and [e["seq"] for e in log] == [1, 2, 3, 4]
    check_serialised(log)
    promotions = [e for e in log if e["action"] == "promote"]
    assert promotions[0]["reason"] == "no champion yet" and promotions[1]["compared_with"] == promotions[0]["version"]
    assert promotions[1]["pairing"] == "case_key"
    assert sum(1 for r in results.values() if r["promote"]["promoted"]) in (1, 2)
    assert "challenger" not in shown["aliases"] or shown["aliases"]["challenger"] != shown["aliases"]["champion"]
