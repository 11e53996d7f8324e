"""The control plane's security semantics, checked on the rendered manifests (no cluster runs here):

- RBAC: the InferenceService Role is bound to medseg-deployer only, and its verbs are exactly those the deploy
  code sends (measured against a recording fake API server); the deploy step authenticates with the mounted
  deployer token, not the pod's own account;
- NetworkPolicies: every pod is under default-deny ingress and egress, and the egress flows the policies allow,
  evaluated per pod, are exactly the intended ones (DNS, predictor -> MLflow, MLflow -> PostgreSQL and the
  object store, ...);
- Secrets: which Secret each workload references (the MinIO root keys only in MinIO and its bucket Job, the
  predictor with no object-store key and only its own MLflow account); the bucket Job's MinIO policy;
- DVC analytics off in the project's config.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.test_k8s import NAMESPACE, TARGETS, by_kind, containers, docs, one, pod_specs

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
ROOT_KEYS = "medseg-minio-root"


# --------------------------------------------------------------------------- RBAC
@pytest.mark.parametrize("target", TARGETS)
def test_the_deployer_role_is_bound_to_its_own_account_only(target):
    objs = docs(target)
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "medseg-deployer", "namespace": NAMESPACE}]
    assert not any(s.get("namespace") == "kubeflow" for b in by_kind(objs, "RoleBinding") for s in b["subjects"])
    deployer = one(objs, "ServiceAccount", "medseg-deployer")
    assert deployer.get("automountServiceAccountToken") is False
    # no workload of the stack runs as it: only the pipeline's deploy step holds its token
    assert all(spec.get("serviceAccountName") != "medseg-deployer" for _, spec, _ in pod_specs(objs))
    (role,) = by_kind(objs, "Role")
    assert role["metadata"]["name"] == binding["roleRef"]["name"]
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "create", "patch"]}]


class RecordingKube:
    """A fake API server for ``/apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices/NAME``: records
    every request as the RBAC verb the API server would authorise (GET -> get; a server-side apply PATCH ->
    patch, plus create when the object does not exist yet) and the Authorization header; answers 404 for a
    missing object and Ready for a stored one."""

    def __init__(self):
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}
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

            def _record(self, verbs):
                fake.requests.append({"method": self.command, "path": urlparse(self.path).path, "verbs": verbs,
                                      "authorization": self.headers.get("Authorization"), "content_type": self.headers.get("Content-Type")})

            def do_GET(self):
                path = urlparse(self.path).path
                self._record({"get"})
                obj = fake.objects.get(path)
                if obj is None:
                    return self._reply({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
                generation = obj["metadata"]["generation"]
                return self._reply({**obj, "status": {"observedGeneration": generation, "url": "http://x.example.com",
                                                      "conditions": [{"type": "Ready", "status": "True"}]}})

            def do_PATCH(self):
                path = urlparse(self.path).path
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                old = fake.objects.get(path)
                self._record({"patch"} if old else {"patch", "create"})
                body["metadata"]["generation"] = old["metadata"]["generation"] + 1 if old else 1
                fake.objects[path] = body
                return self._reply(body)

            def do_POST(self):
                self._record({"create"})
                return self._reply({"kind": "Status", "code": 405}, 405)

            do_PUT = do_DELETE = do_POST

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def recording_kube():
    fake = RecordingKube()
    yield fake
    fake.server.shutdown()


def _deploy_config(**overrides):
    from medseg.deploy.config import DeployConfig

    return DeployConfig.from_dict({**DeployConfig.from_params(PARAMS).to_dict(), "target": "kserve", "image": "registry.local/medseg-serve:1", **overrides})


def test_the_role_grants_exactly_the_verbs_the_deploy_step_uses(recording_kube):
    """Create, re-apply and update an InferenceService with the real deploy code: the verbs it needs are the Role's."""
    from medseg.deploy.apply import load_api_client
    from medseg.deploy.rollout import deploy

    api = load_api_client(host=recording_kube.url)
    for version in ("1", "1", "2"):
        deploy("brats-segmentation", version, _deploy_config(), api_client=api, poll_s=0.01)
    used = set().union(*(r["verbs"] for r in recording_kube.requests))
    (role,) = by_kind(docs("base"), "Role")
    assert used == set(role["rules"][0]["verbs"]) == {"get", "create", "patch"}
    assert {r["path"] for r in recording_kube.requests} == {f"/apis/serving.kserve.io/v1beta1/namespaces/{NAMESPACE}/inferenceservices/brats-segmentation"}
    assert all(r["content_type"] == "application/apply-patch+yaml" for r in recording_kube.requests if r["method"] == "PATCH")


def test_the_deploy_step_authenticates_with_the_mounted_deployer_token(recording_kube, tmp_path, monkeypatch):
    from medseg.deploy import identity
    from medseg.deploy.rollout import deploy

    token_dir = tmp_path / "medseg-deployer"
    token_dir.mkdir()
    (token_dir / "token").write_text("tok-of-medseg-deployer\n")
    monkeypatch.setenv(identity.TOKEN_DIR_ENV, str(token_dir))
    monkeypatch.setenv(identity.API_SERVER_ENV, recording_kube.url)
    out = deploy("brats-segmentation", "3", _deploy_config(), poll_s=0.01)   # no api_client: the step's own choice
    assert out["decision"] == "created"
    assert recording_kube.requests and {r["authorization"] for r in recording_kube.requests} == {"Bearer tok-of-medseg-deployer"}
    # the compiled pipeline mounts that Secret where medseg.deploy looks by default
    assert identity.DEFAULT_TOKEN_DIR == "/var/run/secrets/medseg-deployer"
    assert PARAMS["cluster"]["deployer_token"]["name"] == "medseg-deployer-token"
    # no token mounted: no deployer client (the caller falls back to kubeconfig / in-cluster account)
    assert identity.deployer_api_client(tmp_path / "absent") is None
    (token_dir / "token").write_text("")
    from medseg.errors import MedsegError

    with pytest.raises(MedsegError, match="empty"):
        identity.deployer_api_client(token_dir)


# --------------------------------------------------------------------------- NetworkPolicies
def _expr_matches(expr: dict, labels: dict) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    return {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
            "Exists": key in labels, "DoesNotExist": key not in labels}[op]


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics ({} selects everything)."""
    return (all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            and all(_expr_matches(e, labels) for e in selector.get("matchExpressions", [])))


def _workloads(objs: list[dict]) -> dict[str, dict]:
    """app.kubernetes.io/name -> pod labels, for every pod the overlay renders."""
    out = {}
    for wid, _, labels in pod_specs(objs):
        name = labels.get("app.kubernetes.io/name")
        assert name, f"{wid}: pods need app.kubernetes.io/name for the NetworkPolicies"
        out[name] = labels
    return out


def _ports(rule: dict) -> list[str]:
    ports = rule.get("ports")
    assert ports, "a rule without ports allows every port"
    return [f"{p['port']}/{p.get('protocol', 'TCP')}" for p in ports]


def egress_flows(objs: list[dict], pod_labels: dict) -> set[str]:
    """What the rendered policies let a pod with ``pod_labels`` (namespace medseg) open, as ``peer:port/proto``;
    peers in medseg are named by the workloads they select."""
    workloads = _workloads(objs)
    flows: set[str] = set()
    for np in by_kind(objs, "NetworkPolicy"):
        if "Egress" not in np["spec"].get("policyTypes", []) or not selects(np["spec"]["podSelector"], pod_labels):
            continue
        for rule in np["spec"].get("egress", []):
            assert rule.get("to"), f"{np['metadata']['name']}: an egress rule without 'to' allows every destination"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    peers = [f"external({peer['ipBlock']['cidr']})"]
                elif "namespaceSelector" in peer:
                    ns = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    assert ns, f"{np['metadata']['name']}: egress to namespaces by a selector other than the name"
                    assert ns != NAMESPACE and "podSelector" in peer, f"{np['metadata']['name']}: whole namespace {ns}"
                    peers = [f"{ns}/{'/'.join(f'{k}={v}' for k, v in peer['podSelector']['matchLabels'].items())}"]
                else:
                    peers = [name for name, labels in workloads.items() if selects(peer["podSelector"], labels)]
                    assert peers, f"{np['metadata']['name']}: egress peer {peer} selects no pod"
                flows |= {f"{p}:{port}" for p in peers for port in _ports(rule)}
    return flows


DNS = {"kube-system/k8s-app=kube-dns:53/UDP", "kube-system/k8s-app=kube-dns:53/TCP"}
EXTERNAL = "external(0.0.0.0/0)"
EXPECTED_EGRESS = {
    "base": {
        "mlflow": {"postgres:5432/TCP"},
        "postgres": set(),
        "postgres-init": {"postgres:5432/TCP"},
        "mlflow-users": {"mlflow:5000/TCP"},
        "medseg-predictor": {"mlflow:5000/TCP"},
    },
    "overlays/local": {
        "mlflow": {"postgres:5432/TCP", "minio:9000/TCP"},
        "postgres": set(),
        "postgres-init": {"postgres:5432/TCP"},
        "mlflow-users": {"mlflow:5000/TCP"},
        "medseg-predictor": {"mlflow:5000/TCP"},
        "minio": set(),
        "minio-init": {"minio:9000/TCP"},
    },
    "overlays/production": {
        "mlflow": {f"{EXTERNAL}:443/TCP", f"{EXTERNAL}:5432/TCP"},
        "postgres-init": {f"{EXTERNAL}:5432/TCP"},
        "mlflow-users": {"mlflow:5000/TCP"},
        "medseg-predictor": {"mlflow:5000/TCP"},
    },
}


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_is_under_default_deny_ingress_and_egress(target):
    objs = docs(target)
    deny_egress = one(objs, "NetworkPolicy", "default-deny-egress")["spec"]
    assert deny_egress["podSelector"] == {} and deny_egress["policyTypes"] == ["Egress"] and not deny_egress.get("egress")
    deny_ingress = one(objs, "NetworkPolicy", "default-deny-ingress")["spec"]
    for name, labels in _workloads(objs).items():
        for direction in ("Ingress", "Egress"):
            assert any(direction in np["spec"]["policyTypes"] and selects(np["spec"]["podSelector"], labels)
                       for np in by_kind(objs, "NetworkPolicy")), f"{name}: no {direction} policy selects it"
        assert selects(deny_ingress["podSelector"], labels) and selects(deny_egress["podSelector"], labels)


@pytest.mark.parametrize("target", TARGETS)
def test_egress_allows_exactly_the_intended_flows(target):
    objs = docs(target)
    workloads = _workloads(objs)
    assert set(workloads) == set(EXPECTED_EGRESS[target]), "a pod without an expected egress list: add it here"
    for name, labels in workloads.items():
        assert egress_flows(objs, labels) == DNS | EXPECTED_EGRESS[target][name], name
    # no policy opens the internet except the production store/database clients, by port
    for np in by_kind(objs, "NetworkPolicy"):
        for rule in np["spec"].get("egress", []):
            if any("ipBlock" in p for p in rule["to"]):
                assert target == "overlays/production" and set(_ports(rule)) <= {"443/TCP", "5432/TCP"}, np["metadata"]["name"]


def test_the_flow_evaluator_sees_a_widened_policy():
    """Negative control: a rule opening MLflow to everything, or the predictor to MinIO, changes the flows."""
    objs = docs("overlays/local")
    predictor = _workloads(objs)["medseg-predictor"]
    widened = [d for d in objs if d["kind"] != "NetworkPolicy" or d["metadata"]["name"] != "mlflow-clients-egress"]
    extra = json.loads(json.dumps(one(objs, "NetworkPolicy", "mlflow-clients-egress")))
    extra["spec"]["egress"][0]["to"].append({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "minio"}}})
    assert "minio:5000/TCP" in egress_flows(widened + [extra], predictor)
    open_rule = json.loads(json.dumps(extra))
    open_rule["spec"]["egress"][0]["to"] = []
    with pytest.raises(AssertionError, match="every destination"):
        egress_flows(widened + [open_rule], predictor)


@pytest.mark.parametrize("target", TARGETS)
def test_ingress_reaches_mlflow_only_from_its_clients(target):
    objs = docs(target)
    mlflow = one(objs, "NetworkPolicy", "mlflow-ingress")
    peers = [p for r in mlflow["spec"]["ingress"] for p in r["from"]]
    local_peers = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in peers if "namespaceSelector" not in p}
    assert local_peers == {"medseg-predictor", "mlflow-users"}
    assert [p["namespaceSelector"] for p in peers if "namespaceSelector" in p] == [{"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}]


# --------------------------------------------------------------------------- Secrets
def secrets_of(spec: dict) -> set[str]:
    names = set()
    for c in containers(spec):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                names.add(src["secretRef"]["name"])
    for v in spec.get("volumes", []):
        if "secret" in v:
            names.add(v["secret"]["secretName"])
        for source in v.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


EXPECTED_SECRETS = {
    "Deployment/mlflow": {"medseg-mlflow-db", "medseg-s3", "medseg-mlflow-admin"},
    "InferenceService/brats-segmentation/predictor": {"medseg-mlflow", "medseg-mlflow-predictor"},
    "Job/mlflow-users": {"medseg-mlflow", "medseg-mlflow-admin", "medseg-mlflow-pipeline", "medseg-mlflow-predictor"},
    "Job/postgres-init-databases": {"medseg-postgres", "medseg-mlflow-db", "medseg-optuna"},
    "StatefulSet/postgres": {"medseg-postgres"},
    "Deployment/minio": {ROOT_KEYS},
    "Job/minio-create-buckets": {ROOT_KEYS, "medseg-s3"},
}


@pytest.mark.parametrize("target", TARGETS)
def test_each_workload_references_only_its_own_secrets(target):
    for wid, spec, _ in pod_specs(docs(target)):
        assert secrets_of(spec) == EXPECTED_SECRETS[wid], wid
        if wid.startswith("InferenceService"):   # no object-store key at all: MLflow proxies the artefacts
            env = {e["name"] for c in containers(spec) for e in c.get("env", [])}
            assert not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
        if ROOT_KEYS in secrets_of(spec):
            assert wid in ("Deployment/minio", "Job/minio-create-buckets"), f"{wid} holds the MinIO root keys"


def test_the_pipeline_mounts_no_root_admin_or_predictor_secret():
    mounted = {s["name"] for alias, s in PARAMS["cluster"]["secrets"].items() if alias != "predictor_mlflow_user"}
    assert mounted == {"medseg-mlflow", "medseg-mlflow-pipeline", "medseg-s3", "medseg-optuna"}
    assert ROOT_KEYS not in mounted and "medseg-mlflow-admin" not in mounted and "medseg-mlflow-predictor" not in mounted
    assert PARAMS["cluster"]["secrets"]["predictor_mlflow_user"]["name"] == "medseg-mlflow-predictor"
    source = (ROOT / "pipelines" / "training_pipeline.py").read_text() + (ROOT / "pipelines" / "batch_inference_pipeline.py").read_text()
    assert "predictor_mlflow_user" not in source   # never mounted into a step


def test_the_bucket_job_creates_a_bucket_scoped_non_root_user(tmp_path):
    """Run the Job's script with a stub ``mc`` that records its calls: the policy is valid JSON on the two buckets
    only, without admin or wildcard actions, and the user it attaches is the medseg-s3 key, not the root."""
    job = one(docs("overlays/local"), "Job", "minio-create-buckets")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("minio/minio:")
    script = container["args"][0]
    stub = tmp_path / "bin" / "mc"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
                    'if [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" "$MC_LOG.policy.json"; fi\n'
                    'if [ "$1 $2 $3" = "admin policy attach" ] && [ -n "${ATTACHED:-}" ]; then exit 1; fi\n'
                    'if [ "$1 $2 $3" = "admin user info" ]; then echo "PolicyName: medseg-readwrite"; fi\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "mc.log"
    env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", "MC_LOG": str(log), "HOME": str(tmp_path),
           "BUCKETS": "medseg-mlflow,medseg-data", "MINIO_ENDPOINT": "http://minio:9000",
           "MINIO_ROOT_USER": "root-user", "MINIO_ROOT_PASSWORD": "root-pass", "S3_ACCESS_KEY_ID": "medseg", "S3_SECRET_ACCESS_KEY": "s3-pass"}
    script = script.replace("/tmp/medseg-readwrite.json", str(tmp_path / "policy.json"))
    for attached in ("", "yes"):   # first run, and a re-run where the policy is already attached (idempotent)
        log.unlink(missing_ok=True)
        out = subprocess.run(["sh", "-c", script], env={**env, "ATTACHED": attached}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        calls = log.read_text().splitlines()
        assert calls[0] == "alias set local http://minio:9000 root-user root-pass"
        assert "mb --ignore-existing local/medseg-mlflow" in calls and "mb --ignore-existing local/medseg-data" in calls
        assert "admin user add local medseg s3-pass" in calls
        assert "admin policy attach local medseg-readwrite --user medseg" in calls
        assert not any("root-user" in c for c in calls[1:]), "the root key is only the admin alias"
    policy = json.loads((tmp_path / "mc.log.policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert resources == {"arn:aws:s3:::medseg-mlflow", "arn:aws:s3:::medseg-data", "arn:aws:s3:::medseg-mlflow/*", "arn:aws:s3:::medseg-data/*"}
    assert not any("*" in a or a.startswith("admin:") for a in actions)
    assert not actions & {"s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy"}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions


# --------------------------------------------------------------------------- DVC
def test_dvc_analytics_are_off_in_the_project_config(tmp_path, monkeypatch):
    import configparser

    from dvc import analytics

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"
    # what DVC itself decides, with only the project's config (empty global/system config, no opt-out variable)
    for var in ("DVC_TEST", "DVC_NO_ANALYTICS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "system"))
    monkeypatch.chdir(ROOT)
    assert analytics.is_enabled() is False
    # negative control: the same repository layout without that setting has analytics on
    other = tmp_path / "repo"
    (other / ".dvc").mkdir(parents=True)
    (other / ".dvc" / "config").write_text("")
    monkeypatch.chdir(other)
    assert analytics.is_enabled() is True
