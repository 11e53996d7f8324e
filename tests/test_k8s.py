"""k8s/: renders offline with kubectl kustomize; the InferenceService serves the champion safely."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rendered():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: manifests not rendered")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "base")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_inference_service_serves_the_champion(rendered):
    isvc = next(d for d in rendered if d["kind"] == "InferenceService")
    container = isvc["spec"]["predictor"]["containers"][0]
    assert "models:/brats-segmentation@champion" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"] and container["resources"]["requests"]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert isvc["metadata"]["namespace"] == "medseg"


def test_no_secret_literals(rendered):
    for doc in rendered:
        assert doc["kind"] != "Secret"
        for c in doc.get("spec", {}).get("predictor", {}).get("containers", []):
            for env in c.get("env", []):
                assert "value" not in env, f"literal env value {env['name']}: use a secretKeyRef"
