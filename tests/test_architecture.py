"""The code follows the data: import directions, who names the task, where file names live.

- Training uses inference (validation predicts with the predictor's own sliding window); inference,
  preprocessing and serving never import training, so a served model never carries the training code.
- One module knows the task (``medseg/task.py``): no stage module names a challenge's regions, labels or
  the challenge itself. The ingest adapters (which read the challenges' own layouts), the synthetic-data
  generators and the official lesion-wise / panoptic scorers are the exceptions, and are listed here.
- Every artefact file name is spelled in ``medseg/schemas.py`` only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medseg"

#: Packages that must not import medseg.training (directly or in a function body).
NO_TRAINING = ("inference", "preprocessing", "serving")
#: Modules allowed to name a challenge's regions and labels: the task module, the layouts of the sources,
#: the generators of synthetic data in those layouts, and the official scorers of the challenges.
TASK_NAMING_ALLOWED = ("task.py", "synth.py", "synth_layouts.py", "ingest/adapters/", "ingest/__init__.py", "evaluation/lesionwise.py", "evaluation/panoptic.py")
#: Entry points whose help texts may name the challenge (``medseg synth`` writes BraTS-like cases); their code may not.
HELP_TEXT_ALLOWED = ("cli.py", "demo.py")
TASK_WORDS = re.compile(r"(?<![A-Za-z0-9])(WT|TC|ET|RC|NETC|SNFH|NCR)(?![A-Za-z0-9])|[Bb][Rr][Aa][Tt][Ss]")
#: Source-layout file names (the adapters read them, they are not artefacts) and generators' outputs.
FILE_NAME_ALLOWED = {"schemas.py", "synth.py", "synth_layouts.py", "ingest/adapters/classification.py"}
FILE_NAME = re.compile(r"^[\w.\-]+\.(json|csv|md|html|pt|onnx|png|npy|log|db|yaml)$")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


@pytest.mark.parametrize("package", NO_TRAINING)
def test_inference_preprocessing_and_serving_never_import_training(package: str) -> None:
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for line, module in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module == "medseg.training" or module.startswith("medseg.training."):
                offenders.append(f"{_relative(path)}:{line} imports {module}")
    assert not offenders, "training must not be imported by inference, preprocessing or serving:\n" + "\n".join(offenders)


def test_the_shared_core_never_imports_a_stage() -> None:
    """networks, task, schemas, io, errors: the bottom layers import no stage package."""
    stages = ("medseg.training", "medseg.evaluation", "medseg.registry", "medseg.serving", "medseg.deploy", "medseg.viewer", "medseg.pipeline", "medseg.ingest")
    offenders = []
    for path in [*sorted((PACKAGE / "networks").rglob("*.py")), PACKAGE / "task.py", PACKAGE / "schemas.py", PACKAGE / "io.py", PACKAGE / "errors.py"]:
        for line, module in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if any(module == s or module.startswith(s + ".") for s in stages):
                offenders.append(f"{_relative(path)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_only_the_task_module_names_the_task() -> None:
    """No stage module spells a challenge's regions, labels or name in code (identifiers and string constants;
    docstrings and comments may explain)."""
    offenders = []
    for path in _modules():
        rel = _relative(path)
        if rel.startswith(TASK_NAMING_ALLOWED):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and rel not in HELP_TEXT_ALLOWED:
                text = node.value
            elif isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, ast.Attribute):
                text = node.attr
            elif isinstance(node, ast.alias):
                text = node.name
            if text and TASK_WORDS.search(text.replace("_", " ")):
                offenders.append(f"{rel}:{getattr(node, 'lineno', 0)}: {text[:80]!r}")
    assert not offenders, "ask medseg.task.Task instead of naming the task:\n" + "\n".join(offenders)


def test_artefact_file_names_live_in_schemas() -> None:
    offenders = []
    for path in _modules():
        rel = _relative(path)
        if rel in FILE_NAME_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs and FILE_NAME.match(node.value):
                offenders.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not offenders, "spell artefact file names in medseg/schemas.py and import them:\n" + "\n".join(offenders)


def test_the_check_catches_what_it_is_for() -> None:
    """The scanners themselves: a stage naming a region or a file would be caught."""
    tree = ast.parse("def f(mean):\n    '''WT in a docstring is fine.'''\n    return mean['WT']['dice'], 'metrics.json'\n")
    docs = _docstrings(tree)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]
    assert any(TASK_WORDS.search(s) for s in strings) and any(FILE_NAME.match(s) for s in strings)
    assert not TASK_WORDS.search("WTF cell METRIC get_item _MD5_ETAG_RE TCGA".replace("_", " "))
    assert TASK_WORDS.search("BRATS2023") and TASK_WORDS.search("brats2024")
