"""Training checkpoints kept in the run's artefact store, so a restarted train pod resumes instead of starting over.

A train pod writes ``checkpoint_latest.pt`` into its own (ephemeral) work folder after every epoch
(:mod:`medseg.training.trainer`). :class:`CheckpointMirror` copies each checkpoint file of that folder to a store that
outlives the pod, under a key of the pipeline run, the configuration and the fold (:func:`checkpoint_key`):

- ``s3://bucket/prefix``: S3 or an S3-compatible server, credentials and endpoint from the environment
  (:mod:`medseg.data.s3`, the ``medseg-s3`` Secret on a cluster);
- a local folder: a PersistentVolumeClaim mounted in the pod, or the work folder of a ``kfp.local`` run.

On entry the stored checkpoints of the key are copied back (the pod restarted by Kubernetes, or a retried task, finds
them and resumes after the last complete epoch, ending with the same weights: :func:`~medseg.training.trainer.train`
with ``resume=True``). A thread then copies a checkpoint whenever the trainer replaces it (it is replaced atomically,
so a copy is never of a half-written file), and once more on exit. A store copy is itself atomic (a temporary name
renamed on a volume; a single PUT on S3), so a pod killed mid-copy leaves the previous checkpoint. After the model
package is written, :meth:`CheckpointMirror.clear` deletes the key: the model is the run's artefact by then.

Losing the pod loses at most the epochs since the last copy (the copy runs every ``interval_s``, default 5 s).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path, PurePosixPath
from typing import Any

from medseg import schemas
from medseg.data.s3 import is_s3_uri, make_client, parse_s3_uri, s3_errors
from medseg.errors import MedsegError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = schemas.CHECKPOINT_FILE  # what is mirrored, at any depth (the cascade's first stage trains in lowres/)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def checkpoint_key(run_key: str, configuration: str, fold: int) -> str:
    """``<run>/<configuration>/fold_<fold>``: where one training's checkpoints live in the store.

    ``run_key`` is the pipeline run's id (a retried task or a restarted pod of the same run finds its checkpoints), or
    the id of an earlier, interrupted run to resume from. Characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``-``.

    Raises:
        MedsegError: an empty run key (nothing to tell runs apart).
    """
    run = _UNSAFE.sub("-", str(run_key)).strip("-.")
    if not run:
        raise MedsegError(f"a checkpoint key needs a pipeline run id, got {run_key!r}")
    return f"{run}/{_UNSAFE.sub('-', configuration)}/fold_{int(fold)}"


class CheckpointStore:
    """A place for checkpoints that outlives the pod: ``s3://bucket/prefix`` or a local folder (a mounted volume)."""

    def __init__(self, uri: str | Path, client: Any = None) -> None:
        self.uri = str(uri)
        self.is_s3 = is_s3_uri(self.uri)
        self._client = client
        if self.is_s3:
            self.bucket, prefix = parse_s3_uri(self.uri)
            self.prefix = prefix.strip("/")
        else:
            self.root = Path(self.uri).expanduser()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    def _object(self, key: str, relative: str) -> str:
        return str(PurePosixPath(self.prefix, key, relative)) if self.prefix else str(PurePosixPath(key, relative))

    def list(self, key: str) -> list[str]:
        """Relative paths (POSIX) of the checkpoint files stored under ``key``."""
        if not self.is_s3:
            folder = self.root / key
            return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(CHECKPOINT_NAME)) if folder.is_dir() else []
        base = self._object(key, "") + "/"  # the key's folder: fold_1 must not list fold_10's
        found: list[str] = []
        with s3_errors(f"s3://{self.bucket}/{base}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                found += [o["Key"][len(base):] for o in page.get("Contents", []) if PurePosixPath(o["Key"]).name == CHECKPOINT_NAME]
        return sorted(found)

    def get(self, key: str, relative: str, dest: Path) -> None:
        """Copy a stored checkpoint to ``dest`` (a temporary name, then renamed)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        if self.is_s3:
            name = self._object(key, relative)
            with s3_errors(f"s3://{self.bucket}/{name}"):
                self.client.download_file(self.bucket, name, str(tmp))
        else:
            shutil.copyfile(self.root / key / relative, tmp)
        os.replace(tmp, dest)

    def put(self, source: Path, key: str, relative: str) -> None:
        """Store ``source`` under ``key``/``relative``; a reader sees the previous copy or this one, never part of it."""
        if self.is_s3:
            name = self._object(key, relative)
            with s3_errors(f"s3://{self.bucket}/{name}"):
                self.client.upload_file(str(source), self.bucket, name)
            return
        target = self.root / key / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)

    def delete(self, key: str) -> None:
        """Remove every checkpoint stored under ``key``."""
        if not self.is_s3:
            folder = self.root / key
            shutil.rmtree(folder, ignore_errors=True)
            for parent in folder.parents:  # the run's and configuration's folders, once empty (a volume has no prefixes)
                if parent == self.root or self.root not in parent.parents:
                    break
                try:
                    parent.rmdir()
                except OSError:  # another fold's or configuration's checkpoints are still there
                    break
            return
        for relative in self.list(key):
            name = self._object(key, relative)
            with s3_errors(f"s3://{self.bucket}/{name}"):
                self.client.delete_object(Bucket=self.bucket, Key=name)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object(key, '')}/" if self.is_s3 else str(self.root / key)


class CheckpointMirror:
    """Mirror the checkpoints of a training folder to a :class:`CheckpointStore` while training runs.

    ``with CheckpointMirror(store, key, work) as mirror:`` restores the stored checkpoints into ``work`` (``mirror.restored``
    lists them), copies changed checkpoints every ``interval_s`` seconds and once more when the block ends (also on an
    error: the next attempt resumes from it). ``store`` empty: does nothing (``mirror.enabled`` is False).
    """

    def __init__(self, store: str | Path | CheckpointStore | None, key: str, work_dir: str | Path, interval_s: float = 5.0) -> None:
        self.store = store if isinstance(store, CheckpointStore) or not store else CheckpointStore(store)
        self.key, self.work_dir, self.interval_s = key, Path(work_dir), float(interval_s)
        self.restored: list[str] = []
        self.copied = 0
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.store)

    def __enter__(self) -> CheckpointMirror:
        if not self.enabled:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for relative in self.store.list(self.key):
            self.store.get(self.key, relative, self.work_dir / relative)
            self._seen[relative] = self._signature(self.work_dir / relative)
            self.restored.append(relative)
        if self.restored:
            log.info("checkpoint store: restored %s from %s: training resumes after its last complete epoch",
                     ", ".join(self.restored), self.store.describe(self.key))
        else:
            log.info("checkpoint store: nothing stored at %s yet: training starts at epoch 1 and is mirrored there", self.store.describe(self.key))
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sync()  # the last epoch's checkpoint, whatever the loop last saw
        except (MedsegError, OSError) as error:
            if exc is None:
                raise
            # training failed already: its error is the one to see; the store's is logged beside it
            log.warning("checkpoint store: the last copy to %s failed too (%s)", self.store.describe(self.key), error)

    @staticmethod
    def _signature(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def sync(self) -> int:
        """Copy every checkpoint of the work folder that changed since it was last copied; returns how many."""
        copied = 0
        for path in sorted(self.work_dir.rglob(CHECKPOINT_NAME)):
            relative = path.relative_to(self.work_dir).as_posix()
            try:
                signature = self._signature(path)
            except FileNotFoundError:  # replaced between the listing and the stat: the next pass sees the new one
                continue
            if self._seen.get(relative) == signature:
                continue
            self.store.put(path, self.key, relative)
            self._seen[relative] = signature
            copied += 1
        self.copied += copied
        return copied

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except (MedsegError, OSError) as exc:  # a store that is briefly away: training goes on, the next pass retries
                log.warning("checkpoint store: copy to %s failed (%s); retrying in %.0f s", self.store.describe(self.key), exc, self.interval_s)

    def clear(self) -> None:
        """Delete the key's stored checkpoints (the model package is written: nothing is left to resume)."""
        if self.enabled:
            self.store.delete(self.key)


__all__ = ["CHECKPOINT_NAME", "CheckpointMirror", "CheckpointStore", "checkpoint_key"]
