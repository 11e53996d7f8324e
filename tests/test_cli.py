"""The ``medseg`` command line: help for every stage, a light start, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medseg.cli import COMMANDS, main

HEAVY = ("torch", "mlflow", "kserve", "monai", "optuna", "kfp")


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse exits for --help and usage errors
        return int(exc.code or 0)


def test_top_level_help_lists_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: medseg")
    for name in COMMANDS:
        assert name in out, name


@pytest.mark.parametrize("command", [[name] for name in COMMANDS] + [["pipeline", "run"], ["pipeline", "compile"]], ids=lambda c: " ".join(c))
def test_stage_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: medseg {' '.join(command)}")


def test_no_stage_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code([]) == 2
    assert "usage: medseg" in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = (
        "import json, sys\n"
        "from medseg.cli import build_parser\n"
        "build_parser()\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], "build_parser() imported heavy modules"

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medseg.cli", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "usage: medseg" in done.stdout
    assert elapsed < 5, f"medseg --help took {elapsed:.1f} s"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_ingest_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "X"
    assert main(["ingest", "--source", "/nonexistent", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "/nonexistent" in line and "not found" in line
    assert captured.out == ""
    assert not out.exists()


def test_ingest_missing_source_as_a_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "medseg.cli", "ingest", "--source", "/nonexistent", "--out", str(tmp_path / "X")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "/nonexistent" in _one_error_line(done.stderr)


def test_preprocess_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pre"
    assert main(["preprocess", "--dataset", "/nonexistent", "--out", str(out), "--workers", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "/nonexistent" in line and "dataset folder not found" in line
    assert not out.exists()


def test_preprocess_folder_without_dataset_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = tmp_path / "ds"
    dataset.mkdir()
    assert main(["preprocess", "--dataset", str(dataset), "--out", str(tmp_path / "pre"), "--workers", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(dataset / "dataset.json") in line and "file not found" in line
