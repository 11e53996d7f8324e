"""Install medseg-ops with some of its extras, the one tested way: the images, the install test and the size
benchmark all run this, so what they measure is what ships.

1. torch first, pinned, from the chosen wheel variant: later steps are constrained to it, so pip never swaps
   in another build (a CPU image stays free of the CUDA libraries);
2. the requirements of the core and the extras (pyproject.toml), constrained to requirements/lock.txt, the
   tested set (its extras markers stripped: pip refuses them in constraints);
3. unless ``--deps-only``: the project itself, ``--no-deps``; then ``pip check``.

``python components/install_extras.py serve[,train...] [--project DIR] [--torch-variant cpu|cuda|local]``
installs into the environment of the interpreter running it. Variants: ``cpu`` PyTorch's CPU wheel index;
``cuda`` PyPI's Linux wheel (it pulls the NVIDIA CUDA runtime wheels); ``local`` whatever the configured
index offers (here: the CPU wheel on disk, as ``make install``). ``--torch-index-url`` overrides the index
(e.g. PyTorch's index of one CUDA version).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PROJECT = "medseg-ops"
ROOT = Path(__file__).resolve().parents[1]
TORCH_VERSION = "2.13.0"  # the tested torch (Makefile TORCH)
TORCH_INDEXES = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://pypi.org/simple", "local": None}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 name: ``Flask_Cors`` and ``flask-cors`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    m = _NAME.match(requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalize(m.group(1))


def requirements(extras: list[str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The core requirements plus those of ``extras``, self-references (``medseg-ops[a,b]``) expanded."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}: one of {', '.join(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            if requirement_name(req) == normalize(PROJECT):
                todo += [e.strip() for e in req.split("[", 1)[1].rstrip("]").split(",")]
            elif req not in out:
                out.append(req)
    return out


def lock_constraints(lock: Path, torch_version: str = TORCH_VERSION) -> str:
    """The lock as a constraints file: ``name[extra]==v`` → ``name==v`` (pip rejects extras there), plus torch."""
    lines = []
    for line in Path(lock).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(re.sub(r"^([A-Za-z0-9._-]+)\[[^\]]*\]", r"\1", line))
    return "\n".join([*lines, f"torch=={torch_version}"]) + "\n"


def torch_options(variant: str, index_url: str | None) -> list[str]:
    if variant not in TORCH_INDEXES:
        raise SystemExit(f"unknown torch variant {variant!r}: one of {', '.join(TORCH_INDEXES)}")
    url = index_url or TORCH_INDEXES[variant]
    return ["--index-url", url] if url else []


def pip(args: list[str], no_cache: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *(["--no-cache-dir"] if no_cache else []), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def install(extras: list[str], project: Path | None = ROOT, torch_variant: str = "local", torch_index_url: str | None = None,
            lock: Path = ROOT / "requirements" / "lock.txt", pyproject: Path | None = None, deps_only: bool = False,
            no_cache: bool = False, torch_version: str = TORCH_VERSION) -> list[str]:
    """Install core + ``extras`` (and the project unless ``deps_only``); returns the requirements installed."""
    reqs = requirements(extras, pyproject or (Path(project) / "pyproject.toml" if project else ROOT / "pyproject.toml"))
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(lock_constraints(lock, torch_version))
        if any(requirement_name(r) == "torch" for r in reqs):
            pip([f"torch=={torch_version}", *torch_options(torch_variant, torch_index_url)], no_cache)
        pip([*reqs, "-c", str(constraints)], no_cache)
        if not deps_only:
            pip(["--no-deps", str(project)], no_cache)
    subprocess.run([sys.executable, "-m", "pip", "check"], check=True)
    return reqs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("extras", help="comma-separated extras, e.g. serve or train,pipelines")
    p.add_argument("--project", type=Path, default=ROOT, help="project folder to install (default: this checkout)")
    p.add_argument("--deps-only", action="store_true", help="only the requirements (an image installs the sources in a later layer)")
    p.add_argument("--torch-variant", default="local", help="cpu | cuda | local (default: local)")
    p.add_argument("--torch-index-url", default="", help="index for the torch wheel (overrides the variant's)")
    p.add_argument("--lock", type=Path, default=ROOT / "requirements" / "lock.txt")
    p.add_argument("--no-cache", action="store_true", help="pip --no-cache-dir (images)")
    a = p.parse_args(argv)
    install([e for e in a.extras.split(",") if e], a.project, a.torch_variant, a.torch_index_url or None, a.lock,
            deps_only=a.deps_only, no_cache=a.no_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
