"""The train step's checkpoint store (medseg/training/checkpoint_store.py): a local folder (a volume) and S3 on a
real moto server; restore on entry, copies while training, the last copy on an error, delete after success.
The kill-and-resume of a whole pipeline run is in tests/test_pipeline_resume.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from medseg.errors import MedsegError
from medseg.training.checkpoint_store import CHECKPOINT_NAME, CheckpointMirror, CheckpointStore, checkpoint_key
from tests.test_data_s3 import moto_endpoint, s3_env  # noqa: F401  (fixtures: a real moto_server, its environment)


def test_checkpoint_key_is_run_configuration_fold_and_needs_a_run() -> None:
    assert checkpoint_key("medseg-training-2026-12-05-10-00-00-123", "3d_fullres", 0) == "medseg-training-2026-12-05-10-00-00-123/3d_fullres/fold_0"
    assert checkpoint_key("run/../x y", "3d_cascade_fullres", 3) == "run-..-x-y/3d_cascade_fullres/fold_3"
    with pytest.raises(MedsegError, match="pipeline run id"):
        checkpoint_key(" / ", "3d_fullres", 0)


def _write(path: Path, text: str) -> None:
    """As the trainer does: a whole new file renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the mirror did not copy in time")
        time.sleep(0.05)


def _or_none(read, *args):
    try:
        return read(*args)
    except Exception:  # not stored yet (FileNotFoundError, S3's NoSuchKey)
        return None


def _round_trip(store: CheckpointStore, tmp_path: Path, read_stored) -> None:
    key = checkpoint_key("run-1", "3d_cascade_fullres", 0)
    first = tmp_path / "pod-1"
    with pytest.raises(RuntimeError, match="preempted"):
        with CheckpointMirror(store, key, first, interval_s=0.05) as mirror:
            assert mirror.enabled and mirror.restored == []
            _write(first / CHECKPOINT_NAME, "epoch 1")
            _write(first / "lowres" / CHECKPOINT_NAME, "lowres epoch 2")  # the cascade's first stage, one level down
            _wait_for(lambda: _or_none(read_stored, key, CHECKPOINT_NAME) == "epoch 1")
            _write(first / CHECKPOINT_NAME, "epoch 2")
            (first / "model").mkdir()
            (first / "model" / "weights.pt").write_text("not a checkpoint: not copied")
            raise RuntimeError("preempted")  # the block ends on an error: the last epoch is copied, nothing deleted
    assert store.list(key) == sorted([CHECKPOINT_NAME, f"lowres/{CHECKPOINT_NAME}"])
    assert read_stored(key, CHECKPOINT_NAME) == "epoch 2" and read_stored(key, f"lowres/{CHECKPOINT_NAME}") == "lowres epoch 2"

    # the restarted pod: an empty work folder gets both back, and nothing else
    second = tmp_path / "pod-2"
    with CheckpointMirror(store, key, second, interval_s=0.05) as mirror:
        assert sorted(mirror.restored) == sorted([CHECKPOINT_NAME, f"lowres/{CHECKPOINT_NAME}"])
        assert (second / CHECKPOINT_NAME).read_text() == "epoch 2" and not (second / "model").exists()
        assert sorted(p.name for p in second.rglob("*") if p.is_file()) == [CHECKPOINT_NAME, CHECKPOINT_NAME]  # no temporary file
        _write(second / CHECKPOINT_NAME, "epoch 3")
    assert read_stored(key, CHECKPOINT_NAME) == "epoch 3"
    other = checkpoint_key("run-1", "3d_cascade_fullres", 1)
    with CheckpointMirror(store, other, tmp_path / "fold-1") as mirror:  # another fold: its own key
        assert mirror.restored == []
        _write(tmp_path / "fold-1" / CHECKPOINT_NAME, "fold 1")
    mirror = CheckpointMirror(store, key, second)
    mirror.clear()  # the model is written: the key is gone, the other fold's stays
    assert store.list(key) == [] and store.list(other) == [CHECKPOINT_NAME]
    mirror = CheckpointMirror(store, other, tmp_path / "fold-1")
    mirror.clear()
    assert store.list(other) == []


def test_a_local_folder_store_restores_copies_and_clears(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    store = CheckpointStore(root)
    _round_trip(store, tmp_path, lambda key, rel: (root / key / rel).read_text())
    assert root.is_dir() and not list(root.iterdir())  # cleared to the root: no empty run folders, no temporary copies


def test_an_s3_store_on_moto_restores_copies_and_clears(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    from medseg.data.s3 import make_client

    client = make_client()
    client.create_bucket(Bucket="medseg-checkpoints")
    store = CheckpointStore("s3://medseg-checkpoints/train")

    def read(key: str, rel: str) -> str:
        return client.get_object(Bucket="medseg-checkpoints", Key=f"train/{key}/{rel}")["Body"].read().decode()

    _round_trip(store, tmp_path, read)


def test_no_store_does_nothing(tmp_path: Path) -> None:
    with CheckpointMirror("", "run/3d_fullres/fold_0", tmp_path / "work") as mirror:
        assert not mirror.enabled and mirror.restored == []
        _write(tmp_path / "work" / CHECKPOINT_NAME, "epoch 1")
    mirror.clear()
    assert (tmp_path / "work" / CHECKPOINT_NAME).exists()


def test_a_store_that_is_away_is_retried_while_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A copy that fails while training runs is logged and retried on the next pass (training is not stopped); the
    last copy, when the block ends, raises: the step must not report a checkpoint it could not store."""
    root = tmp_path / "volume"
    root.write_text("a file where the volume's folder should be")  # every copy fails with an OSError
    work = tmp_path / "work"
    with caplog.at_level("WARNING"), pytest.raises(OSError):
        with CheckpointMirror(CheckpointStore(root / "sub"), "run/3d_fullres/fold_0", work, interval_s=0.05) as mirror:
            _write(work / CHECKPOINT_NAME, "epoch 1")
            _wait_for(lambda: caplog.text.count("retrying") >= 2)
    assert mirror.copied == 0


def test_a_training_error_is_not_hidden_by_a_store_that_is_away(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Training fails and the last copy fails too: the training error is raised, the store's is logged."""
    root = tmp_path / "volume"
    root.write_text("a file where the volume's folder should be")
    work = tmp_path / "work"
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="loss is NaN"):
        with CheckpointMirror(CheckpointStore(root / "sub"), "run/3d_fullres/fold_0", work, interval_s=60):
            _write(work / CHECKPOINT_NAME, "epoch 1")
            raise RuntimeError("loss is NaN")
    assert "the last copy" in caplog.text and "failed too" in caplog.text
