"""Deployment: the rendered InferenceService, server-side apply against a fake Kubernetes API, the canary
decision against a fake Prometheus (with a real MLflow registry for the rollback), and the local target.

No cluster runs here: the fakes check only the HTTP shape (which requests, with which content type,
query and body) and answer just enough (a stored object with a Ready condition; query vectors).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from medseg.deploy.config import DeployConfig, resource_name
from medseg.deploy.inferenceservice import MODEL_URI_ENV, deployed_version, is_ready, render_inferenceservice
from medseg.errors import MedsegError

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "registry.local/ms/medseg-serve:9.9.9-abc"
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def config(**overrides) -> DeployConfig:
    return DeployConfig.from_params(PARAMS, image=IMAGE, **overrides)


def container(isvc: dict) -> dict:
    return isvc["spec"]["predictor"]["containers"][0]


def env_of(isvc: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(isvc)["env"]}


# --------------------------------------------------------------------------- rendering
def test_render_pins_the_version_and_follows_the_base_manifest():
    isvc = render_inferenceservice("brats-segmentation", "7", config())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "brats-segmentation" and isvc["metadata"]["namespace"] == "medseg"
    assert isvc["metadata"]["labels"]["medseg.io/model-version"] == "7"
    assert isvc["metadata"]["annotations"]["medseg.io/model-uri"] == "models:/brats-segmentation/7"
    c = container(isvc)
    assert c["image"] == IMAGE
    assert env_of(isvc)[MODEL_URI_ENV] == {"name": MODEL_URI_ENV, "value": "models:/brats-segmentation/7"}
    assert c["args"][:3] == ["serve", "--model", f"$({MODEL_URI_ENV})"]  # expanded by Kubernetes from the pinned env
    assert env_of(isvc)["MEDSEG_DEVICE"]["value"] == "cpu"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 3)
    assert predictor["canaryTrafficPercent"] == 100  # all traffic, stated explicitly
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "1Gi"},
                              "limits": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "4Gi"}}
    assert deployed_version(isvc) == "7"

    # the same shape as k8s/base/inferenceservice.yaml, the manifest the cluster set-up applies
    base = yaml.safe_load((ROOT / "k8s" / "base" / "inferenceservice.yaml").read_text())
    bp, bc = base["spec"]["predictor"], base["spec"]["predictor"]["containers"][0]
    assert (isvc["apiVersion"], isvc["kind"], isvc["metadata"]["name"]) == (base["apiVersion"], base["kind"], base["metadata"]["name"])
    for key, value in base["metadata"]["annotations"].items():
        assert isvc["metadata"]["annotations"][key] == value, key
    for key in ("serviceAccountName", "labels", "scaleMetric", "scaleTarget", "volumes"):
        assert predictor[key] == bp[key], key
    for key in ("name", "ports", "readinessProbe", "livenessProbe", "securityContext", "volumeMounts"):
        assert c[key] == bc[key], key
    assert c["args"] == [str(a) for a in bc["args"]]  # same arguments and env var names ($(MODEL_URI), $(MEDSEG_DEVICE))
    base_env = {e["name"]: e for e in bc["env"]}
    assert list(env_of(isvc)) == list(base_env)  # same variables, same order (overlays patch env/1 = MEDSEG_DEVICE)
    assert env_of(isvc)["MLFLOW_TRACKING_URI"] == base_env["MLFLOW_TRACKING_URI"]
    assert c["resources"] == {k: {r: str(v) for r, v in rs.items()} for k, rs in bc["resources"].items()}
    assert bc["image"].rsplit(":", 1)[0].rsplit("/", 1)[1] == IMAGE.rsplit(":", 1)[0].rsplit("/", 1)[1] == "medseg-serve"


def test_render_refuses_an_alias_and_a_missing_image():
    with pytest.raises(MedsegError, match="pinned to a version number"):
        render_inferenceservice("brats-segmentation", "champion", config())
    with pytest.raises(MedsegError, match="no predictor image"):
        render_inferenceservice("brats-segmentation", "1", DeployConfig.from_params(PARAMS))


def test_secrets_are_referenced_by_name_only(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://admin:hunter2@db:5432/mlflow")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-not-a-real-key")
    isvc = render_inferenceservice("brats-segmentation", "1", config())
    text = json.dumps(isvc)
    assert "hunter2" not in text and "wJalrXUtnFEMI" not in text
    env = env_of(isvc)
    secret_env = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    # the registry URL and the predictor's own (READ) MLflow account: MLflow proxies the artefacts, the
    # predictor holds no object-store credentials
    assert secret_env == {"MLFLOW_TRACKING_URI": {"name": "medseg-mlflow", "key": "tracking_uri"},
                          "MLFLOW_TRACKING_USERNAME": {"name": "medseg-mlflow-predictor", "key": "username"},
                          "MLFLOW_TRACKING_PASSWORD": {"name": "medseg-mlflow-predictor", "key": "password"}}
    assert {name for name, e in env.items() if "value" in e} == {MODEL_URI_ENV, "MEDSEG_DEVICE", "HOME"}  # no literal for anything else
    more = config(secret_env={"MLFLOW_TRACKING_URI": ["medseg-mlflow", "tracking_uri"], "MLFLOW_TRACKING_TOKEN": ["medseg-mlflow-auth", "token"]})
    assert env_of(render_inferenceservice("brats-segmentation", "1", more))["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "medseg-mlflow-auth", "key": "token"}}


def test_gpu_and_canary_variants():
    cpu = render_inferenceservice("brats-segmentation", "2", config())
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"] and "tolerations" not in cpu["spec"]["predictor"]
    assert env_of(cpu)["MEDSEG_DEVICE"]["value"] == "cpu"
    gpu = render_inferenceservice("brats-segmentation", "2", config(gpu=2, node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"}),
                                  canary_traffic_percent=25)
    predictor = gpu["spec"]["predictor"]
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == container(gpu)["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert env_of(gpu)["MEDSEG_DEVICE"]["value"] == "cuda"
    assert predictor["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]  # cluster.tolerations
    assert predictor["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert predictor["canaryTrafficPercent"] == 25
    with pytest.raises(MedsegError, match="between 1 and 100"):
        render_inferenceservice("brats-segmentation", "2", config(), canary_traffic_percent=0)
    assert "canaryTrafficPercent" not in render_inferenceservice("m", "2", config(), canary_traffic_percent=None)["spec"]["predictor"]


def test_config_validation_and_names():
    with pytest.raises(MedsegError, match="unknown deploy setting"):
        DeployConfig.from_dict({"replicas": 2})
    with pytest.raises(MedsegError, match="deploy target"):
        DeployConfig(target="docker")
    with pytest.raises(MedsegError, match="replicas"):
        DeployConfig(min_replicas=3, max_replicas=2)
    cfg = config(canary=True)
    assert DeployConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # survives the pipeline's JSON parameter
    assert resource_name("BraTS_Segmentation v2") == "brats-segmentation-v2"
    assert resource_name("3d-model") == "m-3d-model"


def test_ready_condition_needs_the_current_generation():
    assert is_ready(None) == (False, "not found")
    stale = {"metadata": {"generation": 3}, "status": {"observedGeneration": 2, "conditions": [{"type": "Ready", "status": "True"}]}}
    assert is_ready(stale)[0] is False
    failing = {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed"}]}}
    assert is_ready(failing) == (False, "Ready=False: RevisionFailed")
    ok = {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "conditions": [{"type": "Ready", "status": "True"}]}}
    assert is_ready(ok) == (True, "Ready")


# --------------------------------------------------------------------------- fake Kubernetes API
class FakeKube:
    """``/apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices/NAME``: PATCH (recorded; the body is
    stored with a bumped generation) and GET (the stored object, Ready after ``ready_after_gets`` reads of
    that generation, or never when ``ready`` is False; 404 when absent). ``fail_status`` answers every PATCH
    with that HTTP status."""

    def __init__(self, ready: bool = True, ready_after_gets: int = 1, fail_status: int | None = None):
        self.patches: list[dict] = []
        self.gets: list[str] = []
        self.objects: dict[str, dict] = {}
        self.reads: dict[str, int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, obj, status=200):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PATCH(self):
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.patches.append({"path": url.path, "query": parse_qs(url.query), "content_type": self.headers.get("Content-Type"), "body": json.loads(raw)})
                if fail_status:
                    return self._reply({"kind": "Status", "status": "Failure", "message": "forbidden", "code": fail_status}, fail_status)
                old = fake.objects.get(url.path)
                obj = json.loads(raw)
                obj["metadata"]["generation"] = (old["metadata"]["generation"] + 1) if old else 1
                fake.objects[url.path] = obj
                fake.reads[url.path] = 0
                return self._reply(obj)

            def do_GET(self):
                url = urlparse(self.path)
                fake.gets.append(url.path)
                obj = fake.objects.get(url.path)
                if obj is None:
                    return self._reply({"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}, 404)
                fake.reads[url.path] += 1
                generation = obj["metadata"]["generation"]
                if ready and fake.reads[url.path] >= ready_after_gets:
                    status = {"observedGeneration": generation, "url": f"http://{obj['metadata']['name']}.example.com",
                              "conditions": [{"type": "Ready", "status": "True"}]}
                else:
                    status = {"observedGeneration": generation, "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]}
                return self._reply({**obj, "status": status})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seed(self, isvc: dict) -> None:
        """Store an object as if it had been applied before the test."""
        path = f"/apis/serving.kserve.io/v1beta1/namespaces/{isvc['metadata']['namespace']}/inferenceservices/{isvc['metadata']['name']}"
        self.objects[path] = {**isvc, "metadata": {**isvc["metadata"], "generation": 1}}
        self.reads[path] = 0


@pytest.fixture()
def kube():
    fakes: list[FakeKube] = []

    def make(**kwargs) -> FakeKube:
        fakes.append(FakeKube(**kwargs))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.server.shutdown()


def test_server_side_apply_then_wait_for_ready(kube):
    from medseg.deploy.apply import apply_and_wait, load_api_client

    fake = kube(ready_after_gets=2)
    body = render_inferenceservice("brats-segmentation", "4", config())
    ready = apply_and_wait(load_api_client(host=fake.url), body, field_manager="medseg-deploy", timeout_s=10, poll_s=0.02)
    assert len(fake.patches) == 1
    patch = fake.patches[0]
    assert patch["path"] == "/apis/serving.kserve.io/v1beta1/namespaces/medseg/inferenceservices/brats-segmentation"
    assert patch["content_type"] == "application/apply-patch+yaml"
    assert patch["query"] == {"fieldManager": ["medseg-deploy"], "force": ["true"]}
    assert patch["body"] == body
    assert len(fake.gets) == 2 and ready["status"]["conditions"][0]["status"] == "True"


def test_not_ready_in_time_and_forbidden_are_clear_errors(kube):
    from medseg.deploy.apply import apply_and_wait, load_api_client

    body = render_inferenceservice("brats-segmentation", "4", config())
    never = kube(ready=False)
    with pytest.raises(MedsegError, match=r"not Ready after 0 s \(Ready=False: RevisionMissing\)"):
        apply_and_wait(load_api_client(host=never.url), body, timeout_s=0.2, poll_s=0.05)
    forbidden = kube(fail_status=403)
    with pytest.raises(MedsegError, match="HTTP 403.*RBAC"):
        apply_and_wait(load_api_client(host=forbidden.url), body, timeout_s=1, poll_s=0.05)


def test_deploy_creates_updates_and_reapplies(kube):
    from medseg.deploy.apply import load_api_client
    from medseg.deploy.rollout import deploy

    fake = kube()
    api = load_api_client(host=fake.url)
    first = deploy("brats-segmentation", "1", config(), api_client=api, poll_s=0.02)
    assert (first["decision"], first["served_version"], first["previous_version"]) == ("created", "1", None)
    assert first["url"] == "http://brats-segmentation.example.com"
    again = deploy("brats-segmentation", "1", config(), api_client=api, poll_s=0.02)
    assert again["decision"] == "unchanged"
    newer = deploy("brats-segmentation", "2", config(), api_client=api, poll_s=0.02)
    assert (newer["decision"], newer["previous_version"]) == ("updated", "1")
    assert [deployed_version(p["body"]) for p in fake.patches] == ["1", "1", "2"]


# --------------------------------------------------------------------------- canary
class FakePrometheus:
    """``/api/v1/query``: answers the canary's three queries with one-sample vectors (``None``: empty)."""

    def __init__(self, requests: float | None, errors: float | None, p99_s: float | None):
        self.queries: list[str] = []
        values = {"requests": requests, "errors": errors, "p99_s": p99_s}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                query = parse_qs(url.query)["query"][0]
                fake.queries.append(query)
                key = "p99_s" if query.startswith("histogram_quantile") else "errors" if 'status="5xx"' in query else "requests"
                value = values[key]
                result = [] if value is None else [{"metric": {}, "value": [1700000000.0, str(value)]}]
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
                self.send_response(200 if url.path == "/api/v1/query" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory):
    """A real MLflow SQLite registry (created once: MLflow's migrations take a few seconds)."""
    tmp = tmp_path_factory.mktemp("deploy-registry")
    return f"sqlite:///{tmp}/mlflow.db", tmp


def champion_after_promotion(uri: str, name: str) -> None:
    """``name`` with versions 1 and 2, champion v2 and previous-champion v1, as after a promotion."""
    import mlflow

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source="file:///nonexistent/model")
    client.set_registered_model_alias(name, "champion", "2")
    client.set_registered_model_alias(name, "previous-champion", "1")


def canary_config(prometheus_url: str) -> DeployConfig:
    return config(canary=True, canary_traffic_percent=10, canary_window_s=0.3, canary_interval_s=0.1, max_error_rate=0.01, max_p99_latency_s=30,
                  prometheus_url=prometheus_url)


def test_canary_within_bounds_is_promoted_fully(kube, registry_uri):
    from medseg.deploy.apply import load_api_client
    from medseg.deploy.rollout import deploy
    from medseg.registry.registry import show_model

    uri, _ = registry_uri
    name = "canary-good"
    champion_after_promotion(uri, name)
    fake = kube()
    cfg = canary_config("")
    fake.seed(render_inferenceservice(name, "1", cfg))  # v1 is live
    prom = FakePrometheus(requests=200, errors=1, p99_s=4.2)
    cfg.prometheus_url = prom.url
    try:
        out = deploy(name, "champion", cfg, tracking_uri=uri, api_client=load_api_client(host=fake.url), poll_s=0.02)
    finally:
        prom.server.shutdown()
    assert out["decision"] == "promoted" and out["served_version"] == "2" and out["previous_version"] == "1"
    canary, full = (p["body"] for p in fake.patches)
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10 and deployed_version(canary) == "2"
    assert full["spec"]["predictor"]["canaryTrafficPercent"] == 100 and deployed_version(full) == "2"
    assert all(p["content_type"] == "application/apply-patch+yaml" for p in fake.patches)
    assert len(out["readings"]) >= 2 and out["readings"][-1]["error_rate"] == pytest.approx(0.005)
    # the canary's own series: joined with the info metric of the new version
    assert all(f'model="{name}"' in q and f'medseg_model_info{{model="{name}",version="2"}}' in q for q in prom.queries)
    assert show_model(name, uri)["aliases"] == {"champion": "2", "previous-champion": "1"}


@pytest.mark.parametrize(("requests", "errors", "p99_s", "why"), [
    (100, 5, 2.0, "error rate 0.0500 > 0.0100"),
    (100, 0, 45.0, "p99 latency 45.00 s > 30.00 s"),
    (None, None, None, "no request reached it"),
])
def test_canary_out_of_bounds_rolls_back(kube, registry_uri, requests, errors, p99_s, why):
    from medseg.deploy.apply import load_api_client
    from medseg.deploy.rollout import deploy
    from medseg.registry.registry import show_model

    uri, _ = registry_uri
    name = f"canary-bad-{len(why)}"
    champion_after_promotion(uri, name)
    fake = kube()
    prom = FakePrometheus(requests=requests, errors=errors, p99_s=p99_s)
    cfg = canary_config(prom.url)
    fake.seed(render_inferenceservice(name, "1", cfg))
    try:
        out = deploy(name, "2", cfg, tracking_uri=uri, api_client=load_api_client(host=fake.url), poll_s=0.02)
    finally:
        prom.server.shutdown()
    assert out["decision"] == "rolled back" and why in out["reason"]
    assert out["served_version"] == "1" and out["registry_rollback"]["done"] is True
    canary, restored = (p["body"] for p in fake.patches)
    assert deployed_version(canary) == "2" and canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert deployed_version(restored) == "1" and restored["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert show_model(name, uri)["aliases"] == {"champion": "1", "previous-champion": "2"}


def test_first_deployment_takes_all_traffic_even_with_canary(kube):
    from medseg.deploy.apply import load_api_client
    from medseg.deploy.rollout import deploy

    fake = kube()
    out = deploy("brats-segmentation", "1", canary_config("http://127.0.0.1:9"), api_client=load_api_client(host=fake.url), poll_s=0.02)
    assert out["decision"] == "created" and "no canary" in out["reason"]
    assert fake.patches[0]["body"]["spec"]["predictor"]["canaryTrafficPercent"] == 100


def test_unreachable_prometheus_rolls_back(kube, registry_uri):
    from medseg.deploy.apply import load_api_client
    from medseg.deploy.rollout import deploy

    uri, _ = registry_uri
    name = "canary-no-prometheus"
    champion_after_promotion(uri, name)
    fake = kube()
    cfg = canary_config("http://127.0.0.1:9")
    fake.seed(render_inferenceservice(name, "1", cfg))
    out = deploy(name, "2", cfg, tracking_uri=uri, api_client=load_api_client(host=fake.url), poll_s=0.02)
    assert out["decision"] == "rolled back" and "no Prometheus reading succeeded" in out["reason"]


# --------------------------------------------------------------------------- local target and CLI
def test_local_target_serves_the_pinned_champion(tmp_path, registry_uri):
    """The real model server on 127.0.0.1 for ``models:/NAME/<champion version>``, checked and stopped."""
    import socket

    from medseg import schemas
    from medseg.deploy.rollout import deploy
    from medseg.registry.registry import register_model
    from tests.factories import make_model_package

    uri, _ = registry_uri
    package = make_model_package(tmp_path / "model")
    metrics = schemas.Metrics(n_cases=1, mean={"WT": {"dice": 0.9}}, per_case=[{"case_id": "c1", "WT": {"dice": 0.9}}])
    registered = register_model(package, metrics, "local-deploy", uri, {"pipeline_run_id": "test"}, {})
    import mlflow

    mlflow.MlflowClient(uri, registry_uri=uri).set_registered_model_alias("local-deploy", "champion", registered["version"])
    out = deploy("local-deploy", "champion", DeployConfig(target="local", ready_timeout_s=120), tracking_uri=uri, log_file=tmp_path / "server.log")
    assert out["decision"] == "served locally" and out["served_version"] == out["version"] == registered["version"]
    assert out["model_uri"] == f"models:/local-deploy/{registered['version']}" and out["endpoint"].startswith("http://127.0.0.1:")
    assert out["running"] is False
    port = int(out["endpoint"].rsplit(":", 1)[1])
    with socket.socket() as s:  # stopped: nothing listens any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_local_target_refuses_other_interfaces():
    from medseg.deploy.local import deploy_local

    with pytest.raises(MedsegError, match="loopback"):
        deploy_local("m", "1", host="0.0.0.0")


def test_cli_dry_run_prints_the_inferenceservice(capsys):
    import argparse

    import medseg.deploy as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--dry-run", "--params", str(ROOT / "params.yaml"), "--version", "5", "--image", IMAGE, "--namespace", "ml-serving"])
    assert cli.run(args) == 0
    isvc = json.loads(capsys.readouterr().out)
    assert isvc["metadata"]["namespace"] == "ml-serving" and deployed_version(isvc) == "5" and container(isvc)["image"] == IMAGE
