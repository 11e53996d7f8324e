"""Installed size of ``medseg-ops[serve]`` against ``medseg-ops[all]`` (issue 15: the goal is at most a third).

Builds one fresh venv per extra with the recipe the images and tests use (components/install_extras.py:
torch 2.13.0 first, then the extra constrained to requirements/lock.txt) and prints one JSON line: the size
in MB (10^6 bytes, file sizes summed) of each venv's site-packages, their ratio, and the largest packages of
[serve] so the reader sees what dominates.

    python benchmarks/install_size.py [--work DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_install_extras import make_venv  # noqa: E402  (the test's venv recipe: one way to install)

MB = 1e6


def tree_bytes(folder: Path) -> int:
    """Sum of the sizes of the regular files under ``folder`` (symlinks not followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def largest(folder: Path, n: int = 8) -> dict[str, float]:
    sizes = {p.name: tree_bytes(p) if p.is_dir() else p.stat().st_size for p in folder.iterdir()}
    return {k: round(v / MB, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:n]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="where the venvs go (default: a temporary folder, removed)")
    p.add_argument("--reuse", action="store_true", help="keep venvs already in --work instead of rebuilding them")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="medseg-install-size-"))
    result: dict[str, object] = {"benchmark": "install_size", "python": sys.version.split()[0]}
    try:
        sizes = {}
        for extra in ("serve", "all"):
            folder = work / extra
            python = folder / "bin" / "python"
            started = time.monotonic()
            if not (a.reuse and python.exists()):
                if folder.exists():
                    shutil.rmtree(folder)
                python = make_venv(folder, extra)
            sp = site_packages(python)
            sizes[extra] = tree_bytes(sp)
            result[f"{extra}_mb"] = round(sizes[extra] / MB, 1)
            result[f"{extra}_install_s"] = round(time.monotonic() - started, 1)
            if extra == "serve":
                result["serve_largest_mb"] = largest(sp)
                torch_stack = sum(tree_bytes(sp / name) for name in ("torch", "sympy", "networkx", "triton") if (sp / name).is_dir())
                result["serve_torch_stack_mb"] = round(torch_stack / MB, 1)
        result["ratio_serve_to_all"] = round(sizes["serve"] / sizes["all"], 3)
        result["goal_ratio"] = round(1 / 3, 3)
        result["goal_met"] = sizes["serve"] <= sizes["all"] / 3
        # a guard: [serve] runs ONNX Runtime, so any torch stack found there (0 expected) is what would break the goal
        result["serve_minus_torch_stack_to_all"] = round((sizes["serve"] - torch_stack) / sizes["all"], 3)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
