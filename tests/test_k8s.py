"""k8s/: the base and both overlays render offline with `kubectl kustomize`; every object validates (core
kinds against the Kubernetes OpenAPI schemas bundled with kubernetes-validate, KServe/prometheus-operator
kinds against our own JSON Schemas in tests/data/k8s-schemas/); security, RBAC, secrets and monitoring
policies hold; PromQL is checked (and the alerts exercised) with promtool when it is installed."""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "data" / "k8s-schemas"
TARGETS = ["base", "overlays/local", "overlays/production"]
NAMESPACE = "medseg"
# Kubernetes versions the manifests must be valid for: an older supported release and the newest bundled one.
K8S_VERSIONS = ["1.30", "1.37"]
CORE_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1", "policy/v1"}
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving.kserve.io-v1beta1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
}
CHAMPION = "models:/brats-segmentation@champion"


# --------------------------------------------------------------------------- rendering
@lru_cache(maxsize=None)
def _render(target: str) -> tuple:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: manifests not rendered")
    out = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def docs(target: str) -> list[dict]:
    return copy.deepcopy(list(_render(target)))


@pytest.fixture(scope="module")
def rendered():
    return docs("base")


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [d for d in objs if d["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in objs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(workload id, pod-level spec, pod labels) of every workload, the InferenceService predictor included."""
    out = []
    for d in objs:
        wid = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            tpl = d["spec"]["template"]
            out.append((wid, tpl["spec"], tpl.get("metadata", {}).get("labels", {})))
        elif d["kind"] == "CronJob":
            tpl = d["spec"]["jobTemplate"]["spec"]["template"]
            out.append((wid, tpl["spec"], tpl.get("metadata", {}).get("labels", {})))
        elif d["kind"] == "Pod":
            out.append((wid, d["spec"], d["metadata"].get("labels", {})))
        elif d["kind"] == "InferenceService":
            for component in ("predictor", "transformer", "explainer"):
                if component in d["spec"]:
                    spec = d["spec"][component]
                    out.append((f"{wid}/{component}", spec, spec.get("labels", {})))
    return out


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def isvc_container(objs: list[dict]) -> dict:
    return one(objs, "InferenceService", "brats-segmentation")["spec"]["predictor"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_renders_into_the_medseg_namespace(target):
    objs = docs(target)
    assert objs
    for d in objs:
        if d["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            continue
        assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']} outside {NAMESPACE}"
    keys = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in objs]
    assert len(keys) == len(set(keys)), "duplicate objects"


# --------------------------------------------------------------------------- schema validation
@lru_cache(maxsize=None)
def _kubernetes_definitions(version: str):
    """The core definitions kubernetes-validate bundles for ``version`` (strict: unknown fields rejected)."""
    import kubernetes_validate.utils as kvu

    return kvu.schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)


@lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str, version: str = K8S_VERSIONS[-1]):
    from referencing import Registry, Resource

    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    definitions = Resource.from_contents(_kubernetes_definitions(version))
    registry = Registry().with_resources([(definitions.id(), definitions), (schema["$id"], Resource.from_contents(schema))])
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry, format_checker=jsonschema.FormatChecker())


def validate_core(obj: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


def validate_crd(obj: dict) -> None:
    errors = sorted(crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise jsonschema.ValidationError("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_validate_against_the_kubernetes_schemas(target, version):
    import kubernetes_validate

    checked = 0
    for d in docs(target):
        if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS:
            continue
        assert d["apiVersion"] in CORE_API_VERSIONS, f"no schema for {d['apiVersion']} {d['kind']}: add one"
        try:
            validate_core(d, version)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} (k8s {version}): {'.'.join(map(str, e.path))}: {e.message}")
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_validate_against_our_crd_schemas(target):
    seen = set()
    for d in docs(target):
        key = (d["apiVersion"], d["kind"])
        if key in CRD_SCHEMAS:
            validate_crd(d)
            seen.add(key)
    assert seen == set(CRD_SCHEMAS), f"kinds not rendered: {set(CRD_SCHEMAS) - seen}"


def _broken_variants(objs: list[dict]):
    deployment = copy.deepcopy(one(objs, "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy_typo"] = "Always"
    yield "core", "unknown container field", deployment
    deployment = copy.deepcopy(one(objs, "Deployment", "mlflow"))
    deployment["spec"]["replicas"] = "two"
    yield "core", "replicas not an integer", deployment
    job = copy.deepcopy(one(objs, "Job", "postgres-init-databases"))
    del job["spec"]["template"]["spec"]["containers"][0]["name"]
    yield "core", "container without name", job

    isvc = one(objs, "InferenceService")
    for path, value, why in [
        (("spec", "predictor", "minReplica"), 1, "misspelt field"),
        (("spec", "predictor", "canaryTrafficPercent"), 150, "canary above 100"),
        (("spec", "predictor", "scaleMetric"), "gpu", "unknown scale metric"),
        (("spec", "predictor", "model"), {"modelFormat": {"name": "pytorch"}}, "model and containers both set"),
        (("spec", "predictor", "containers", 0, "resources", "limits", "cpu"), [4], "quantity of the wrong type"),
        (("spec", "predictor", "containers", 0, "securityContext", "runAsNonRoot"), "yes", "bool as string"),
        (("spec", "predictor", "tolerations"), [{"key": "a", "operatorr": "Exists"}], "bad toleration"),
    ]:
        broken = copy.deepcopy(isvc)
        node = broken
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        yield "crd", why, broken
    broken = copy.deepcopy(isvc)
    del broken["spec"]["predictor"]["containers"]
    yield "crd", "predictor without implementation", broken

    podmonitor = one(objs, "PodMonitor")
    broken = copy.deepcopy(podmonitor)
    broken["spec"]["podMetricsEndpoints"][0]["port"] = 8080
    yield "crd", "port number where a port name is expected", broken
    broken = copy.deepcopy(podmonitor)
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    yield "crd", "bad duration", broken
    broken = copy.deepcopy(podmonitor)
    del broken["spec"]["selector"]
    yield "crd", "no selector", broken

    rule = one(objs, "PrometheusRule")
    broken = copy.deepcopy(rule)
    del broken["spec"]["groups"][0]["rules"][0]["expr"]
    yield "crd", "rule without expr", broken
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["record"] = "medseg:x"
    yield "crd", "alert and record together", broken
    broken = copy.deepcopy(rule)
    broken["spec"]["groups"][0]["rules"][0]["severity"] = "critical"
    yield "crd", "unknown rule field", broken


def test_the_validators_reject_broken_manifests(rendered):
    """Negative controls: each schema really rejects what the API server would."""
    import kubernetes_validate

    for kind, why, obj in _broken_variants(rendered):
        if kind == "core":
            with pytest.raises(kubernetes_validate.ValidationError):
                validate_core(obj, K8S_VERSIONS[-1])
        else:
            with pytest.raises(jsonschema.ValidationError):
                validate_crd(obj)
                pytest.fail(f"accepted: {why}")


# --------------------------------------------------------------------------- secrets
SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|BACKEND_STORE_URI|STORAGE|TRACKING_URI|CREDENTIAL", re.I)


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_literals(target):
    for d in docs(target):
        assert d["kind"] != "Secret", f"Secret object {d['metadata']['name']} rendered: create Secrets with kubectl (k8s/README.md)"
    for wid, spec, _ in pod_specs(docs(target)):
        for c in containers(spec):
            for e in c.get("env", []):
                if "value" in e:
                    assert not SECRET_ENV.search(e["name"]), f"{wid}/{c['name']}: {e['name']} is a literal: use a secretKeyRef"
                    assert not re.search(r"://[^/\s]*:[^/\s]*@", e["value"]), f"{wid}: credentials in a URL literal ({e['name']})"
                else:
                    ref = e["valueFrom"]
                    if SECRET_ENV.search(e["name"]):
                        assert "secretKeyRef" in ref, f"{wid}/{c['name']}: {e['name']} must come from a Secret"


def test_no_secret_sources_in_the_repository():
    for path in K8S.rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            for d in yaml.safe_load_all(path.read_text()):
                if not isinstance(d, dict):
                    continue
                assert d.get("kind") != "Secret", f"{path}: Secret object"
                assert "secretGenerator" not in d, f"{path}: secretGenerator (document kubectl create secret instead)"
        assert path.suffix != ".env", f"{path}: env files with secrets do not belong in the repository"


# --------------------------------------------------------------------------- pod security and resources
def _image_ok(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_hardened_and_bounded(target):
    workloads = pod_specs(docs(target))
    assert len(workloads) >= 3
    for wid, spec, _ in workloads:
        pod_sc = spec.get("securityContext", {})
        mounts_tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        assert containers(spec), wid
        for c in containers(spec):
            where = f"{wid}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: runs as uid 0"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities drop ALL"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            assert not sc.get("privileged"), f"{where}: privileged"
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp RuntimeDefault"
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts_tmp_volumes, f"{where}: read-only root needs an emptyDir on /tmp"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind} for cpu and memory"
            assert _image_ok(c["image"]), f"{where}: image {c['image']} must have a pinned tag (not latest) or digest"
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), wid


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(target):
    """ServiceAccounts, ConfigMaps, PVCs and selectors point at objects/pods that the overlay renders."""
    objs = docs(target)
    accounts = {d["metadata"]["name"] for d in by_kind(objs, "ServiceAccount")}
    configmaps = {d["metadata"]["name"] for d in by_kind(objs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in by_kind(objs, "PersistentVolumeClaim")}
    workloads = pod_specs(objs)
    for wid, spec, _ in workloads:
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts, f"{wid}: ServiceAccount {spec['serviceAccountName']} missing"
        else:
            assert spec.get("automountServiceAccountToken") is False, f"{wid}: default account with a token"
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["name"] in configmaps, f"{wid}: ConfigMap {ref['name']} missing"
                    cm = one(objs, "ConfigMap", ref["name"])
                    assert ref["key"] in cm["data"], f"{wid}: key {ref['key']} missing in {ref['name']}"
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{wid}: PVC missing"
    labels = [lbl for _, _, lbl in workloads]

    def matches(selector: dict) -> bool:
        ml = selector.get("matchLabels", {})
        return any(all(lbl.get(k) == v for k, v in ml.items()) for lbl in labels)

    for svc in by_kind(objs, "Service"):
        assert matches({"matchLabels": svc["spec"]["selector"]}), f"Service {svc['metadata']['name']} selects no pod"
    for np in by_kind(objs, "NetworkPolicy"):
        assert matches(np["spec"]["podSelector"]), f"NetworkPolicy {np['metadata']['name']} selects no pod"
        for rule in np["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer and peer["podSelector"].get("matchLabels"):
                    assert matches(peer["podSelector"]), f"NetworkPolicy {np['metadata']['name']}: peer {peer} selects no pod"
    for pm in by_kind(objs, "PodMonitor"):
        assert matches(pm["spec"]["selector"]), "PodMonitor selects no pod"
    for sts in by_kind(objs, "StatefulSet"):
        assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind(objs, "Service")}


# --------------------------------------------------------------------------- RBAC
@pytest.mark.parametrize("target", TARGETS)
def test_the_deployer_role_grants_only_what_the_deploy_step_needs(target):
    objs = docs(target)
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    roles = by_kind(objs, "Role")
    assert len(roles) == 1
    (rule,) = roles[0]["rules"]
    assert rule["apiGroups"] == ["serving.kserve.io"]
    assert rule["resources"] == ["inferenceservices"]
    assert sorted(rule["verbs"]) == ["create", "get", "patch"]
    assert "resourceNames" not in rule or rule["resourceNames"] == ["brats-segmentation"]
    (binding,) = by_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"]}
    assert binding["subjects"] and all(s["kind"] == "ServiceAccount" for s in binding["subjects"])
    # its own account only: not the pipeline's pipeline-runner, which every step of a run uses
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "medseg-deployer", "namespace": NAMESPACE}]
    assert one(objs, "ServiceAccount", "medseg-deployer")
    # workloads never get an API token they do not need
    for wid, spec, _ in pod_specs(objs):
        if not wid.startswith("InferenceService"):
            assert spec.get("automountServiceAccountToken") is False, wid


# --------------------------------------------------------------------------- the InferenceService
def test_inference_service_serves_the_champion(rendered):
    isvc = one(rendered, "InferenceService", "brats-segmentation")
    predictor = isvc["spec"]["predictor"]
    container = isvc_container(rendered)
    assert container["name"] == "kserve-container"
    env = env_of(container)
    assert env["MODEL_URI"]["value"] == CHAMPION
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--model") + 1] == "$(MODEL_URI)"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    assert [p["containerPort"] for p in container["ports"]] == [port] == [8080]
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {"name": "medseg-mlflow", "key": "tracking_uri"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert container["image"].startswith("ghcr.io/medseg-ops/medseg-serve:")
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] >= predictor["minReplicas"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    assert isvc["metadata"]["namespace"] == NAMESPACE
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"


@pytest.mark.parametrize("target", ["base", "overlays/local"])
def test_base_and_local_predictors_run_on_cpu(target):
    objs = docs(target)
    container = isvc_container(objs)
    predictor = one(objs, "InferenceService")["spec"]["predictor"]
    assert env_of(container)["MEDSEG_DEVICE"]["value"] == "cpu"
    for kind in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"][kind]
    assert "nodeSelector" not in predictor and "tolerations" not in predictor


def test_production_predictor_runs_on_a_gpu_with_canary_rollouts():
    objs = docs("overlays/production")
    predictor = one(objs, "InferenceService")["spec"]["predictor"]
    container = isvc_container(objs)
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert env_of(container)["MEDSEG_DEVICE"]["value"] == "cuda"
    assert env_of(container)["MODEL_URI"]["value"] == CHAMPION
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in predictor["tolerations"])
    assert predictor["nodeSelector"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] > predictor["minReplicas"]


# --------------------------------------------------------------------------- MLflow, PostgreSQL, MinIO
@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_server_uses_postgres_and_proxied_s3_artefacts(target):
    objs = docs(target)
    deployment = one(objs, "Deployment", "mlflow")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    assert container["command"] == ["mlflow", "server"] and "--serve-artifacts" in container["args"]
    env = env_of(container)
    assert container["args"][container["args"].index("--app-name") + 1] == "basic-auth"   # authentication on
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "medseg-mlflow-admin"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "medseg-mlflow-admin"
    pod = deployment["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "write-auth-config")
    assert env_of(init)["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "medseg-mlflow-db", "key": "auth_database_uri"}
    config_dir = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rsplit("/", 1)[0]
    auth_volume = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == config_dir)
    assert next(v for v in pod["volumes"] if v["name"] == auth_volume)["emptyDir"]["medium"] == "Memory"
    template = next(v for v in pod["volumes"] if "configMap" in v)["configMap"]["name"]
    assert "default_permission = NO_PERMISSIONS" in one(objs, "ConfigMap", template)["data"]["basic_auth.ini"]
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "medseg-mlflow-db", "key": "backend_store_uri"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "medseg-s3"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "medseg-s3"
    cm = one(objs, "ConfigMap", env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]["name"])
    assert cm["data"]["artifacts_destination"].startswith("s3://")
    allowed = cm["data"]["allowed_hosts"].split(",")
    assert "mlflow.medseg.svc.cluster.local:*" in allowed and "*" not in allowed
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    svc = one(objs, "Service", "mlflow")
    assert svc["spec"]["ports"][0]["port"] == 5000


def test_postgres_in_cluster_holds_mlflow_and_optuna_databases():
    objs = docs("overlays/local")
    sts = one(objs, "StatefulSet", "postgres")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    one(objs, "Service", "postgres")
    job = one(objs, "Job", "postgres-init-databases")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "mlflow" in script and "optuna" in script and "CREATE DATABASE" in script
    env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert env["OPTUNA_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "medseg-optuna"


def test_production_uses_external_postgres_and_s3():
    objs = docs("overlays/production")
    names = {(d["kind"], d["metadata"]["name"]) for d in objs}
    assert ("StatefulSet", "postgres") not in names and ("Service", "postgres") not in names
    assert ("NetworkPolicy", "postgres-ingress") not in names
    assert not [n for n in names if "minio" in n[1]]
    assert ("Job", "postgres-init-databases") in names   # creates the databases on the managed server


def test_local_overlay_runs_minio_with_a_volume():
    objs = docs("overlays/local")
    deployment = one(objs, "Deployment", "minio")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    one(objs, "PersistentVolumeClaim", "minio-data")
    one(objs, "Service", "minio")
    job = one(objs, "Job", "minio-create-buckets")
    assert "medseg-mlflow" in env_of(job["spec"]["template"]["spec"]["containers"][0])["BUCKETS"]["value"]
    assert "minio" not in {d["metadata"]["name"] for d in docs("base")}


# --------------------------------------------------------------------------- network policies
def _peers(np: dict) -> list[dict]:
    return [peer for rule in np["spec"].get("ingress", []) for peer in rule.get("from", [])]


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_deny_by_default_and_allow_only_what_is_needed(target):
    objs = docs(target)
    deny = one(objs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    for np in by_kind(objs, "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            assert rule.get("from"), f"{np['metadata']['name']}: a rule without 'from' admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer
                assert peer.get("namespaceSelector", {"x": 1}) != {}, f"{np['metadata']['name']}: all namespaces"
    predictor = one(objs, "NetworkPolicy", "predictor-ingress")
    namespaces = {v for p in _peers(predictor) for e in p["namespaceSelector"].get("matchExpressions", []) for v in e["values"]}
    namespaces |= {p["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name") for p in _peers(predictor)}
    assert {"istio-system", "knative-serving", "monitoring"} <= namespaces
    mlflow = one(objs, "NetworkPolicy", "mlflow-ingress")
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}} in _peers(mlflow)
    if target != "overlays/production":
        postgres = one(objs, "NetworkPolicy", "postgres-ingress")
        sources = {p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") for p in _peers(postgres)}
        assert sources == {"mlflow", "postgres-init", None}
        pipeline = next(p for p in _peers(postgres) if "namespaceSelector" in p)
        assert pipeline["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kubeflow"}
        assert pipeline["podSelector"], "pipeline peer must be limited to workflow pods"
        assert postgres["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5432}]


# --------------------------------------------------------------------------- monitoring
def exported_metric_names() -> set[str]:
    """Series names medseg/serving/metrics.py exports, with the suffixes prometheus_client adds."""
    tree = ast.parse((ROOT / "medseg" / "serving" / "metrics.py").read_text())
    suffixes = {"Counter": ["_total", "_created"], "Histogram": ["_bucket", "_sum", "_count", "_created"],
                "Gauge": [""], "Info": ["_info"], "Summary": ["_sum", "_count", "_created"]}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffixes:
            base = node.args[0].value
            names |= {base + s for s in suffixes[node.func.id]}
    assert names, "no metrics found in medseg/serving/metrics.py"
    return names


def _rule_exprs(objs: list[dict]) -> list[str]:
    rule = one(objs, "PrometheusRule", "medseg-predictor")
    return [str(r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]


def _dashboard(objs: list[dict]) -> dict:
    cm = one(objs, "ConfigMap", "medseg-grafana-dashboard")
    (content,) = cm["data"].values()
    return json.loads(content)


def _dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.mark.parametrize("target", TARGETS)
def test_monitoring_uses_the_metric_names_the_server_exports(target):
    objs = docs(target)
    exported = exported_metric_names()
    used = set()
    for expr in _rule_exprs(objs) + _dashboard_exprs(_dashboard(objs)):
        used |= set(re.findall(r"\bmedseg_[a-z0-9_]+\b", expr))
    assert used and used <= exported, f"not exported by medseg/serving/metrics.py: {sorted(used - exported)}"
    exprs = "\n".join(_rule_exprs(objs))
    assert 'medseg_requests_total{status="5xx"}' in exprs
    assert "histogram_quantile(0.99" in exprs and "medseg_inference_seconds_bucket" in exprs
    assert "medseg_input_drift_zscore_bucket" in exprs and "medseg_input_voxels_bucket" in exprs   # input drift


def test_podmonitor_scrapes_the_predictor_metrics(rendered):
    pm = one(rendered, "PodMonitor")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "user-port"   # Knative's name for the user port
    predictor = one(rendered, "InferenceService")["spec"]["predictor"]
    assert all(predictor["labels"].get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())


def test_grafana_dashboard_has_the_panels_and_sidecar_label(rendered):
    cm = one(rendered, "ConfigMap", "medseg-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["name"] == "medseg-grafana-dashboard"   # no hash suffix: the sidecar keeps one copy
    dashboard = _dashboard(rendered)
    assert dashboard["uid"] and dashboard["title"]
    titles = [p["title"].lower() for p in dashboard["panels"]]
    for wanted in ("request rate by status", "p50 / p95 / p99", "in-flight", "drift"):
        assert any(wanted in t for t in titles), f"no panel about {wanted!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    latency = next(p for p in dashboard["panels"] if "p99" in p["title"])
    assert {"0.5", "0.95", "0.99"} <= {re.search(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1) for t in latency["targets"]}
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables


# --------------------------------------------------------------------------- promtool (PromQL, alert behaviour)
def _promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus): PromQL not checked")
    return promtool


@pytest.mark.parametrize("target", ["base", "overlays/production"])
def test_promtool_accepts_the_rules_and_dashboard_queries(target, tmp_path):
    promtool = _promtool()
    objs = docs(target)
    groups = one(objs, "PrometheusRule")["spec"]["groups"]
    queries = [{"record": f"medseg:dashboard_query_{i}", "expr": e} for i, e in enumerate(_dashboard_exprs(_dashboard(objs)))]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups + [{"name": "dashboard-queries", "rules": queries}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_alerts_fire_on_synthetic_series(tmp_path):
    """Feed the base rules synthetic series and check the 5xx, overload, latency, drift and down alerts fire
    (and stay quiet on healthy traffic)."""
    promtool = _promtool()
    groups = one(docs("base"), "PrometheusRule")["spec"]["groups"]
    for group in groups:   # annotation templates are checked by `promtool check rules`; compare labels here
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    lbl = 'namespace="medseg", model="brats-segmentation"'
    job = 'job="medseg/brats-segmentation-predictor", namespace="medseg", pod="p1"'
    # 10% 5xx (2 of 20 requests per minute); p99 latency in the (120, 300] bucket
    errors = {"interval": "1m", "input_series": [
        {"series": f'medseg_requests_total{{{lbl}, status="2xx"}}', "values": "0+18x40"},
        {"series": f'medseg_requests_total{{{lbl}, status="5xx"}}', "values": "0+2x40"},
        {"series": f'medseg_inference_seconds_bucket{{{lbl}, le="60"}}', "values": "0+10x40"},
        {"series": f'medseg_inference_seconds_bucket{{{lbl}, le="120"}}', "values": "0+10x40"},
        {"series": f'medseg_inference_seconds_bucket{{{lbl}, le="300"}}', "values": "0+20x40"},
        {"series": f'medseg_inference_seconds_bucket{{{lbl}, le="+Inf"}}', "values": "0+20x40"},
        {"series": f"up{{{job}}}", "values": "1x40"},
        {"series": f'medseg_rejected_requests_total{{{lbl}, reason="overloaded"}}', "values": "0+1x40"}],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "MedsegPredictorOverloaded", "exp_alerts": [{"exp_labels": {
                "severity": "warning", "namespace": "medseg", "model": "brats-segmentation"}}]},
            {"eval_time": "30m", "alertname": "MedsegPredictorHigh5xxRate", "exp_alerts": [{"exp_labels": {
                "severity": "critical", "namespace": "medseg", "model": "brats-segmentation"}}]},
            {"eval_time": "30m", "alertname": "MedsegPredictorP99LatencyHigh", "exp_alerts": [{"exp_labels": {
                "severity": "warning", "namespace": "medseg", "model": "brats-segmentation"}}]},
            {"eval_time": "30m", "alertname": "MedsegPredictorDown", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "MedsegInputRejectionsHigh", "exp_alerts": []}]}
    healthy = {"interval": "1m", "input_series": [
        {"series": f'medseg_requests_total{{{lbl}, status="2xx"}}', "values": "0+20x40"},
        {"series": f'medseg_requests_total{{{lbl}, status="5xx"}}', "values": "0x40"},
        {"series": f'medseg_inference_seconds_bucket{{{lbl}, le="60"}}', "values": "0+20x40"},
        {"series": f'medseg_inference_seconds_bucket{{{lbl}, le="+Inf"}}', "values": "0+20x40"},
        {"series": f"up{{{job}}}", "values": "1x10 0x30"}],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "MedsegPredictorHigh5xxRate", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "MedsegPredictorP99LatencyHigh", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "MedsegPredictorOverloaded", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "MedsegPredictorDown", "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]}
    # a week of normal inputs, then 7 h of shifted ones (5-minute samples, so instant lookups always find one):
    # sizes ~1 M voxels (all <= 1e6) then ~8 M (in (4e6, 8e6]); drift z-scores <= 1 then in (3, 5]
    week, after = 7 * 24 * 12, 7 * 12
    flat = f"0+2x{week} {2 * week}+0x{after}"
    grow = f"0+2x{week} {2 * week}+2x{after}"
    sizes = {"1e+06": flat, "4e+06": flat, "8e+06": grow, "+Inf": grow}
    zscores = {"0.5": "0x" + str(week + after), "1": flat, "3": flat, "5": grow, "+Inf": grow}
    chan = f'{lbl}, channel="t1"'
    drift = {"interval": "5m", "input_series": [
        *[{"series": f'medseg_input_voxels_bucket{{{lbl}, le="{le}"}}', "values": v} for le, v in sizes.items()],
        {"series": f"medseg_input_voxels_count{{{lbl}}}", "values": grow},
        *[{"series": f'medseg_input_drift_zscore_bucket{{{chan}, le="{le}"}}', "values": v} for le, v in zscores.items()],
        {"series": f"medseg_input_drift_zscore_count{{{chan}}}", "values": grow},
        {"series": f'medseg_model_info{{{lbl}, pod="p1", version="3", drift_reference="case_mean_nonzero"}}', "values": f"1x{week + after}"}],
        "alert_rule_test": [
            *[{"eval_time": "167h", "alertname": a, "exp_alerts": []}
              for a in ("MedsegInputSizeDrift", "MedsegInputDriftRising", "MedsegInputDriftHigh")],
            {"eval_time": "175h", "alertname": "MedsegInputSizeDrift", "exp_alerts": [{"exp_labels": {
                "severity": "warning", "namespace": "medseg", "model": "brats-segmentation"}}]},
            *[{"eval_time": "175h", "alertname": a, "exp_alerts": [{"exp_labels": {
                "severity": "warning", "namespace": "medseg", "model": "brats-segmentation", "channel": "t1"}}]}
              for a in ("MedsegInputDriftRising", "MedsegInputDriftHigh")]]}
    # a week of samples: evaluate the drift scenario every 5 minutes (the `for` durations are 30 min and more)
    for name, interval, tests in (("traffic", "1m", [errors, healthy]), ("drift", "5m", [drift])):
        spec = {"rule_files": ["rules.yaml"], "evaluation_interval": interval, "tests": tests}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        out = subprocess.run([promtool, "test", "rules", f"{name}.yaml"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
