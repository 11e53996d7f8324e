"""Component images: one Dockerfile per stage, non-root, pinned bases, the project's lock; `make images`
tags them with version and git sha; the compiled pipeline references them through one prefix and tag."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "preprocess", "train", "evaluate", "register", "promote", "serve", "predict", "deploy"]
DOCKERFILES = [ROOT / "components" / "Dockerfile.base"] + [ROOT / "components" / s / "Dockerfile" for s in STAGES]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name if p.name == "Dockerfile" else p.name)
def test_dockerfile_policy(dockerfile):
    text = dockerfile.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms, "no FROM"
    for image in froms:
        if image.startswith("${"):  # the base image, passed by make images with an exact tag
            default = re.search(r"ARG BASE_IMAGE=(\S+)", text)
            assert default and ":" in default.group(1) and not default.group(1).endswith(":latest")
        else:
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    if "FROM ${" not in text:  # the shared base: the lock and the install recipe, no dependencies
        assert "requirements/lock.txt" in text and "install_extras.py" in text
    else:  # each image: its extra by the recipe (the lock as constraints), then the project
        assert "install_extras.py" in text and "pip install --no-cache-dir --no-deps ." in text


def test_train_image_is_cuda_and_others_slim():
    assert "ARG TORCH_VARIANT=cuda" in (ROOT / "components" / "train" / "Dockerfile").read_text()
    assert "slim" in (ROOT / "components" / "Dockerfile.base").read_text()


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "work", "demo_output"):
        assert entry in ignored


def test_make_images_prints_tagged_commands_without_an_engine():
    out = subprocess.run(["make", "--no-print-directory", "images", "BUILDER=none", "IMAGE_REGISTRY=registry.local/ms"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    sha = subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    builds = [line for line in out.stdout.splitlines() if line.startswith("docker build")]
    assert len(builds) >= 1 + len(STAGES)  # and the tracking image (MLflow server)
    for stage in ["base", *STAGES]:
        assert any(f"-t registry.local/ms/medseg-{stage}:0.1.0-{sha} " in line + " " for line in builds), stage


def test_compiled_pipeline_uses_the_configured_images(tmp_path):
    env = {**os.environ, "MEDSEG_IMAGE_REGISTRY": "registry.local/ms", "MEDSEG_IMAGE_TAG": "9.9.9-abc"}
    code = "from medseg.pipeline.runner import compile_pipeline; import sys; print(compile_pipeline(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    spec = next(yaml.safe_load_all(Path(out.stdout.strip()).read_text()))
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images["exec-train"] == images["exec-tune"] == "registry.local/ms/medseg-train:9.9.9-abc"
    assert images["exec-serve"] == "registry.local/ms/medseg-predict:9.9.9-abc"  # the serve step needs kfp: not the predictor image
    assert images["exec-ingest"] == "registry.local/ms/medseg-ingest:9.9.9-abc"
