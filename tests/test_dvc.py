"""dvc.yaml: DVC itself renders every stage, and every rendered command parses with the medseg CLI."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_STAGES = ["synth", "ingest", "preprocess", "tune", "train", "evaluate"]


@pytest.fixture(scope="module")
def dvc_stages(tmp_path_factory):
    from dvc.repo import Repo

    repo_dir = tmp_path_factory.mktemp("dvc")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo_dir / name)
    shutil.copytree(ROOT / "medseg", repo_dir / "medseg", ignore=shutil.ignore_patterns("__pycache__"))
    Repo.init(str(repo_dir), no_scm=True)
    repo = Repo(str(repo_dir))
    try:
        return {stage.name: stage for stage in repo.index.stages}
    finally:
        repo.close()


def test_stages_mirror_the_pipeline(dvc_stages):
    assert list(dvc_stages) == PIPELINE_STAGES


def test_every_command_parses_with_the_cli(dvc_stages):
    from medseg.cli import build_parser

    parser = build_parser()
    for name, stage in dvc_stages.items():
        argv = shlex.split(stage.cmd)
        assert argv[0] == "medseg", stage.cmd
        args = parser.parse_args(argv[1:])
        assert callable(args._run)
    synth = parser.parse_args(shlex.split(dvc_stages["synth"].cmd)[1:])
    assert list(synth.shape) == [96, 96, 96]  # params.yaml's list rendered as three numbers


def test_stage_outputs_chain(dvc_stages):
    outs = {str(o.def_path) for s in dvc_stages.values() for o in s.outs}
    for name in PIPELINE_STAGES[1:]:
        for dep in dvc_stages[name].deps:
            path = str(dep.def_path)
            if path.startswith("work/"):
                assert any(path == o or path.startswith(o + "/") or o.startswith(path + "/") for o in outs), (name, path)
