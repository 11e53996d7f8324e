"""Model cards: built from the package and the test metrics (intervals from the gate's bootstrap), logged on every
registered version, completed with the promotion decision, served in the model metadata and shown by the viewer.

One SQLite MLflow store for the module (its migrations take seconds); each test registers under its own name.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from medseg import schemas
from medseg.registry import gate
from medseg.registry import model_card as mc
from medseg.registry import registry as reg
from medseg.task import ALL, BRATS2023
from tests.factories import make_classifier_package, make_model_package

GROUPS = tuple(BRATS2023.regions)  # the reported groups of the tiny package's task
SYNTHETIC = {"generator": "medseg synth", "layout": "brats2023", "cases": 24, "seed": 0}


def seg_metrics(base: float, n: int = 8, seed: int = 0) -> schemas.Metrics:
    """Per-case Dice and HD95 for every group around ``base`` (case keys set: the gate pairs by content)."""
    rng = np.random.default_rng(seed)
    per_case = []
    for i in range(n):
        entry = {"case_id": f"c{i}", "case_key": f"k{i}"}
        for g, group in enumerate(GROUPS):
            dice = float(np.clip(base - 0.05 * g + rng.normal(0, 0.04), 0, 1))
            entry[group] = {"dice": dice, "hd95": float(3 + 20 * (1 - dice))}
        per_case.append(entry)
    mean = {group: {m: float(np.mean([c[group][m] for c in per_case])) for m in ("dice", "hd95")} for group in GROUPS}
    return schemas.Metrics(n_cases=n, mean=mean, per_case=per_case)


def add_training_data(package: Path) -> schemas.Fingerprint:
    """Give the test package what preprocessing would have left in it: a fingerprint and a synthetic origin."""
    fingerprint = schemas.Fingerprint(
        spacings=[[1.0, 1.0, 1.0], [1.0, 1.0, 1.5], [1.2, 1.2, 2.0]], shapes=[[96, 96, 96]] * 3, shapes_after_crop=[[80, 90, 70]] * 3,
        channels={c: {"mean": 400.0 + 10 * i, "std": 80.5, "median": 390.0, "p00_5": 120.25, "p99_5": 900.75, "min": 0.0, "max": 1000.0}
                  for i, c in enumerate(BRATS2023.channels)},
        class_frequencies={"0": 0.97, "1": 0.01, "2": 0.015, "3": 0.005}, case_ids=["a", "b", "c"])
    fingerprint.save(package)
    dataset = schemas.DatasetJson.load(package)
    dataset.synthetic = dict(SYNTHETIC)
    dataset.save(package)
    return fingerprint


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import mlflow

    tmp = tmp_path_factory.mktemp("cards")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("medseg", artifact_location=(tmp / "artifacts").as_uri())
    package = make_model_package(tmp / "model")
    add_training_data(package)
    return {"uri": uri, "package": package, "tmp": tmp}


def _row(group: str, metric: str, values: list[float], digits: int, suffix: str = "") -> str:
    mean, lower, upper = gate.paired_bootstrap(np.asarray(values), 2000, 0.05, 0)
    return f"| {group} | {metric}{suffix} | {mean:.{digits}f} | [{lower:.{digits}f}, {upper:.{digits}f}] | {len(values)} |"


# --------------------------------------------------------------------------- the card's content (pure)
def test_segmentation_card_content(store):
    metrics = seg_metrics(0.85)
    card = mc.build_card(store["package"], metrics, "tiny-seg", {"WT/dice": 0.5}, True, "thresholds met: WT dice 0.85 >= 0.5", {"git_commit": "abc123"})
    text = mc.render_markdown(card)

    # metrics per region with the bootstrap 95% CI the gate's resampler gives (2000 resamples, seed 0)
    for group in GROUPS:
        assert _row(group, "dice", [c[group]["dice"] for c in metrics.per_case], 3) in text
        assert _row(group, "hd95", [c[group]["hd95"] for c in metrics.per_case], 2, " (lower is better)") in text
    # intended use and task: the task's groups, channels and endpoint tensors
    assert "## Intended use and task" in text and "Segments WT, TC, ET (overlapping regions)" in text
    for name in (*BRATS2023.channels, "volume", "segmentation", "volumes_ml"):
        assert f"`{name}`" in text
    # training data from the fingerprint: cases, spacing, intensity statistics
    assert "3 of them (the training and validation folds) were fingerprinted" in text
    assert "median 1.000 × 1.000 × 1.500, range 1.000 × 1.000 × 1.000 to 1.200 × 1.200 × 2.000" in text
    assert "| t1c | 410.00 | 80.50 | 120.25 | 390.00 | 900.75 |" in text
    # the gate: thresholds now, promotion later; known limits: synthetic data, a small test set
    assert "Registration thresholds: **met** (thresholds met: WT dice 0.85 >= 0.5)" in text and "Promotion: not decided yet" in text
    assert "**Trained and tested on synthetic data** made by `medseg synth` (layout brats2023, cases 24, seed 0)" in text
    assert "Evaluated on only 8 held-out case(s)" in text and "| git_commit | `abc123` |" in text
    # pure and JSON round-trippable: what promotion re-renders from gives the same page
    assert mc.render_markdown(schemas.ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))) == text


def test_gate_decision_goes_into_the_card(store):
    challenger, champion = seg_metrics(0.80, seed=1), seg_metrics(0.85, seed=2)
    card = mc.build_card(store["package"], challenger, "tiny-seg", {}, True, "no thresholds set")
    decision = gate.decide(challenger.per_case, champion.per_case, list(GROUPS), primary_group="WT", champion_label="champion v1")
    assert not decision.promote
    record = {"decision": "refused", "reason": decision.reason, "time": "2026-12-05T10:00:00+0000", "compared_with": "1", "champion_after": "1",
              "gate": decision.to_dict()}
    text = mc.render_markdown(mc.with_gate(card, record))
    assert "Promotion: **refused** against champion v1 (2026-12-05T10:00:00+0000)" in text
    wt = decision.groups["WT"]
    assert f"| WT | {wt.challenger_mean:.4f} | {wt.champion_mean:.4f} | {wt.mean_diff:+.4f} | [{wt.ci_lower:+.4f}, {wt.ci_upper:+.4f}] | no |" in text
    assert "- Promotion was refused:" in text
    assert "promotion refused" in mc.short_description(mc.with_gate(card, record))


def test_classifier_card_has_class_metrics_with_intervals(tmp_path):
    package = make_classifier_package(tmp_path / "cls")
    rng = np.random.default_rng(3)
    classes = ("CN", "MCI", "AD")
    per_case, true, probs = [], [], []
    for i in range(12):
        t = i % 3
        p = rng.dirichlet(np.ones(3)) * 0.5
        p[t] += 0.5 if i % 4 else 0.0  # most subjects right, every fourth left to chance
        p /= p.sum()
        true.append(t)
        probs.append(p)
        per_case.append({"case_id": f"s{i}", ALL: {**{f"prob_{c}": float(v) for c, v in zip(classes, p)}, "pred": int(np.argmax(p)), "true": t,
                                                   "log_loss": float(-np.log(p[t]))}})
    metrics = schemas.Metrics(n_cases=12, mean={ALL: {"accuracy": 0.0}}, per_case=per_case)
    card = mc.build_card(package, metrics, "tiny-cls", {"all/log_loss": 1.0986}, True, "thresholds met")
    text = mc.render_markdown(card)

    right = [1.0 if int(np.argmax(p)) == t else 0.0 for p, t in zip(probs, true)]
    assert _row(ALL, "accuracy", right, 3) in text
    assert _row(ALL, "log_loss", [c[ALL]["log_loss"] for c in per_case], 3, " (lower is better)") in text
    auc = next(m for m in card.metrics if m["metric"] == "auc_macro")
    assert auc["mean"] == pytest.approx(gate.macro_auc(true, np.asarray(probs))) and auc["lower"] <= auc["mean"] <= auc["upper"]
    for k, name in enumerate(classes):
        assert _row(name, "sensitivity", [1.0 if int(np.argmax(p)) == k else 0.0 for p, t in zip(probs, true) if t == k], 3) in text
    assert "Classifies a case into CN, MCI, AD from its image channel(s) image and the subject's age." in text
    for name in ("image", "age", "probabilities", "label"):
        assert f"`{name}`" in text
    assert "No fingerprint in the package" in text and "synthetic" not in text.lower().split("## known limits")[1]


# --------------------------------------------------------------------------- registry, serving, viewer
def test_card_logged_at_registration_updated_at_promotion_served_and_shown(store, tmp_path, monkeypatch):
    uri, name = store["uri"], "tiny-seg-card"
    client = reg._client(uri)

    def card_text(version: str) -> str:
        run_id = client.get_model_version(name, version).run_id
        assert {schemas.MODEL_CARD_MD, schemas.MODEL_CARD_JSON} <= {a.path for a in client.list_artifacts(run_id)}
        return Path(client.download_artifacts(run_id, schemas.MODEL_CARD_MD, str(tmp_path / f"v{version}"))).read_text()

    metrics = seg_metrics(0.85)
    r1 = reg.register_model(store["package"], metrics, name, uri, thresholds={"WT": 0.5})
    assert r1["model_card"] == f"runs:/{r1['run_id']}/{schemas.MODEL_CARD_MD}"
    first = card_text("1")
    assert first.startswith(f"# Model card: {name} version 1\n") and "Promotion: not decided yet" in first
    assert _row("WT", "dice", [c["WT"]["dice"] for c in metrics.per_case], 3) in first
    description = client.get_model_version(name, "1").description
    assert description.startswith("segmentation model (WT, TC, ET)") and "(synthetic training data)" in description and "thresholds met" in description

    assert reg.promote(name, "1", uri)["promoted"]
    promoted = card_text("1")
    assert "Promotion: **promoted**" in promoted and "no champion yet" in promoted
    assert "promotion promoted" in client.get_model_version(name, "1").description

    reg.register_model(store["package"], seg_metrics(0.70, seed=5), name, uri, thresholds={"WT": 0.5})
    assert not reg.promote(name, "2", uri)["promoted"]
    refused = card_text("2")
    assert "Promotion: **refused** against champion v1" in refused and "- Promotion was refused:" in refused

    # the model server hands the champion's card to its clients in the model metadata ...
    from medseg.serving import client as serving_client
    from medseg.serving.reload import load_served_version, retire

    with reg._tracking(uri):  # the server's MLflow client follows the tracking URI, as MLFLOW_TRACKING_URI sets it in a server process
        served = load_served_version(f"models:/{name}@champion", "cpu", tmp_path / "serve")
    try:
        meta = served.metadata(name)
    finally:
        retire(served)
    assert meta["parameters"][serving_client.MODEL_CARD_PARAMETER] == promoted
    info = serving_client.ModelInfo.from_metadata(meta)
    assert info.model_card == promoted and info.version == "1"

    # ... and the viewer shows it, collapsed, as escaped text
    from medseg.viewer import app as viewer_app

    monkeypatch.setattr(viewer_app.client, "model_info", lambda url, model_name, timeout=30: info)
    page = _viewer_get(viewer_app.create_app(viewer_app.ViewerConfig(model_url="http://127.0.0.1:9", model_name=name)), "/")
    assert page.status_code == 200 and 'id="model-card"' in page.text and "Model card of version 1" in page.text
    assert "# Model card: tiny-seg-card version 1" in page.text and "Promotion: **promoted**" in page.text


def test_viewer_card_is_escaped():
    from medseg.viewer import page

    html = page.render_page("http://127.0.0.1:1", "m", ["t1n"], card="# Card\n<script>alert(1)</script> & <b>", card_version="3")
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in html
    assert "<details>" in html and "Model card of version 3" in html
    assert 'id="model-card"' not in page.render_page("http://127.0.0.1:1", "m", ["t1n"])  # no card, no section


def test_package_folder_card_is_served(tmp_path):
    """A model package folder served directly carries its card only if one was put beside it."""
    from medseg.serving.reload import version_card

    package = make_model_package(tmp_path / "model")
    assert version_card(str(package), "local", package) == ""
    (package / schemas.MODEL_CARD_MD).write_text("# Model card: local\n")
    assert version_card(str(package), "local", package) == "# Model card: local\n"


def _viewer_get(app, url: str) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://viewer") as http:
            return await http.get(url)

    return asyncio.run(go())
