"""Batch inference from and to S3 (a real ``moto_server`` on 127.0.0.1) and folders (the data PVC's case):
:func:`medseg.inference.batch.predict_batch`, ``medseg predict --input s3://… --out s3://…``, and the batch-inference
pipeline run by kfp.local's SubprocessRunner with an untrained model package and tiny cases."""

from __future__ import annotations

import builtins
import csv
import io
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.data import s3
from medseg.errors import MedsegError
from medseg.inference.batch import predict_batch
from medseg.io import load_nifti, load_nifti_bytes
from tests.factories import make_model_package
from tests.test_batch import CHANNELS, _brats_folder
from tests.test_data_s3 import moto_endpoint, s3_env  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
N_CASES = 2


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("pkg") / "model")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``CASE-000/CASE-000-t1n.nii.gz`` … for :data:`N_CASES` cases of 20×22×18 voxels."""
    return _brats_folder(tmp_path_factory.mktemp("cases") / "in", n=N_CASES)


@pytest.fixture
def buckets(s3_env: str) -> tuple[str, str]:  # noqa: F811 (the fixture imported above)
    """A bucket holding the cases under ``cases/`` and an empty one for the outputs."""
    client = s3.make_client()
    source, dest = f"medseg-in-{uuid.uuid4().hex[:10]}", f"medseg-out-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=source)
    client.create_bucket(Bucket=dest)
    return source, dest


def _put_cases(bucket: str, folder: Path, prefix: str = "cases") -> None:
    """The cases' files as objects, with boto3 directly (not the code under test)."""
    client = s3.make_client()
    for path in sorted(folder.rglob("*.nii.gz")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def _input_shape(folder: Path, case: str) -> tuple[tuple[int, ...], np.ndarray]:
    image, affine, _ = load_nifti(folder / case / f"{case}-{CHANNELS[0]}.nii.gz")
    return image.shape, affine


def _check_outputs(files: dict[str, bytes], cases_dir: Path) -> None:
    """``files`` (name → bytes of the output place) holds one readable segmentation per case, in its input's shape and
    geometry, and a volumes table with one row per case."""
    expected = sorted(p.name for p in cases_dir.iterdir() if p.is_dir())
    assert sorted(n for n in files if n.endswith(".nii.gz")) == [f"{c}.nii.gz" for c in expected]
    for case in expected:
        seg, affine, _ = load_nifti_bytes(files[f"{case}.nii.gz"], name=case)
        shape, input_affine = _input_shape(cases_dir, case)
        assert seg.shape == shape and np.allclose(affine, input_affine)
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
    rows = list(csv.DictReader(io.StringIO(files["volumes.csv"].decode())))
    assert [r["case_id"] for r in rows] == expected
    assert all(float(r["WT_ml"]) >= 0 for r in rows)


def _objects(bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3.make_client()
    keys = [o["Key"] for o in s3.list_objects(client, bucket, prefix)]
    return {key[len(prefix):]: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def _folder(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the core function and the CLI
def test_predict_batch_from_s3_to_s3(buckets: tuple[str, str], cases: Path, package: Path, tmp_path: Path) -> None:
    source, dest = buckets
    _put_cases(source, cases)
    work = tmp_path / "work"
    work.mkdir()
    rows = predict_batch(package, f"s3://{source}/cases", f"s3://{dest}/run-1/", overlap=0.0, progress=False, work_dir=work)
    assert len(rows) == N_CASES
    _check_outputs(_objects(dest, "run-1/"), cases)
    assert not list(work.iterdir())  # the staged input and output are gone


def test_cli_predict_from_s3_to_s3(buckets: tuple[str, str], cases: Path, package: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, dest = buckets
    _put_cases(source, cases, prefix="batch/in")
    code = main(["predict", "--model", str(package), "--input", f"s3://{source}/batch/in", "--out", f"s3://{dest}/batch/out", "--overlap", "0"])
    assert code == 0
    assert f"s3://{dest}/batch/out/volumes.csv" in capsys.readouterr().out
    _check_outputs(_objects(dest, "batch/out/"), cases)


def test_predict_batch_folder_to_folder(cases: Path, package: Path, tmp_path: Path) -> None:
    out = tmp_path / "pvc" / "predictions"
    predict_batch(package, cases, out, overlap=0.0, progress=False)
    _check_outputs(_folder(out), cases)


def test_missing_or_empty_input_names_the_uri(buckets: tuple[str, str], package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, dest = buckets
    missing = f"s3://{source}/no-such-prefix"
    with pytest.raises(MedsegError, match="no objects under this prefix") as err:
        predict_batch(package, missing, f"s3://{dest}/out", progress=False)
    assert str(err.value).startswith(missing)
    s3.make_client().put_object(Bucket=source, Key="empty/", Body=b"")  # a "folder" with nothing in it
    with pytest.raises(MedsegError, match=r"only folder markers") as err:
        predict_batch(package, f"s3://{source}/empty", f"s3://{dest}/out", progress=False)
    assert f"s3://{source}/empty" in str(err.value)
    s3.make_client().put_object(Bucket=source, Key="notes/readme.txt", Body=b"no images here")
    with pytest.raises(MedsegError, match="no cases found") as err:
        predict_batch(package, f"s3://{source}/notes", f"s3://{dest}/out", progress=False)
    assert str(err.value).startswith(f"s3://{source}/notes")  # the URI, not the temporary folder it was staged in
    with pytest.raises(MedsegError, match="bucket not found") as err:
        predict_batch(package, "s3://medseg-no-such-bucket/cases", f"s3://{dest}/out", progress=False)
    assert "s3://medseg-no-such-bucket/cases" in str(err.value)
    with pytest.raises(MedsegError, match="input folder not found") as err:
        predict_batch(package, tmp_path / "nope", tmp_path / "out", progress=False)
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(MedsegError, match="the output is the input itself"):
        predict_batch(package, f"s3://{source}/cases/", f"s3://{source}/cases", progress=False)
    with pytest.raises(MedsegError, match="the output is the input itself"):  # the pipeline's output_uri: refused before predicting
        predict_batch(package, f"s3://{source}/cases", tmp_path / "artefact", publish_to=f"s3://{source}/cases/", progress=False)
    assert not (tmp_path / "artefact").exists()
    assert _objects(dest, "") == {}  # nothing was written anywhere
    # the CLI: one line naming the URI, exit 2, no traceback
    assert main(["predict", "--model", str(package), "--input", missing, "--out", f"s3://{dest}/out"]) == 2
    captured = capsys.readouterr()
    assert missing in captured.err and "Traceback" not in captured.err


# --------------------------------------------------------------------------- the pipeline under kfp.local
def _run_batch_pipeline(pipeline_root: Path, **arguments: object) -> Path:
    """Run the batch-inference pipeline with kfp.local's SubprocessRunner in this environment; its run folder."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kfp import local

    from medseg.pipeline.runner import _import_pipeline

    name, pipeline = _import_pipeline("batch-inference")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    original_print = builtins.print  # kfp.local swaps print per task: put the test's back
    try:
        pipeline(**arguments)
    finally:
        builtins.print = original_print
    return next(pipeline_root.glob(f"{name}-*"))


@pytest.mark.slow
def test_batch_pipeline_from_s3_to_s3_under_kfp_local(buckets: tuple[str, str], cases: Path, package: Path, tmp_path: Path) -> None:
    source, dest = buckets
    _put_cases(source, cases)
    # the moto endpoint and dummy credentials reach the task's process through the environment, as the medseg-s3 Secret's would
    run = _run_batch_pipeline(tmp_path / "kfp", input_uri=f"s3://{source}/cases", output_uri=f"s3://{dest}/batch/run-1",
                              model_uri=str(package), overlap=0.0)
    _check_outputs(_objects(dest, "batch/run-1/"), cases)
    _check_outputs(_folder(run / "predict" / "predictions"), cases)  # the run's artefact too


@pytest.mark.slow
def test_batch_pipeline_folder_to_folder_under_kfp_local(cases: Path, package: Path, tmp_path: Path) -> None:
    """The PVC's case: input and output are folders under one mount path."""
    data = tmp_path / "data"  # stands for cluster.data_pvc's mount path
    out = data / "predictions" / "run-1"
    _run_batch_pipeline(tmp_path / "kfp", input_uri=str(cases), output_uri=str(out), model_uri=str(package), overlap=0.0)
    _check_outputs(_folder(out), cases)
