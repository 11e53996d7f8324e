"""A lock around registration, promotion and rollback of one registered model.

MLflow has no compare-and-set on aliases: two pipeline runs that promote at once could both read "the
champion is v3", both decide against v3, and the last ``set_registered_model_alias`` would win while the
audit trail claimed both were compared with v3. Every change of ``champion`` / ``previous-champion`` (promote,
rollback) and of ``challenger`` (register: the new version and its alias, the task-signature check, the log
entry) therefore happens inside :func:`promotion_lock`, and the current aliases are re-read inside it.

Two mechanisms, chosen by the tracking URI:

``file`` (``sqlite:///PATH`` and local file stores)
    ``fcntl.flock(LOCK_EX)`` on ``PATH.promote.lock`` beside the database (``ROOT/.promote.lock`` for a
    file store). The kernel releases it when the holder dies, so there is nothing to expire. Exclusive
    between processes and threads (each acquisition opens its own file description) on one host.
    Limits: only as good as the file system's ``flock`` (local disks; on NFS Linux emulates it with
    POSIX byte-range locks, which works with NFSv4 but not on every network file system), and only
    between clients that use this function (the MLflow UI or a bare ``MlflowClient`` ignore it).

``lease`` (``http(s)://`` tracking servers, and any other store such as ``postgresql://``)
    A registered-model tag :data:`LEASE_TAG` = ``{"owner": token, "expires": unix_time, ...}``.
    Acquire: read the tag; if a live lease of another owner is there, wait and retry; else write our
    lease, wait ``settle_s``, read it back, and hold it only if it is still ours (otherwise another
    writer won: retry). Release deletes the tag if it is still ours. :meth:`Held.check` re-reads the
    tag and raises if the lease was lost or is about to expire; promote calls it right before it moves
    any alias.

    Observed with MLflow 3.17's SQL store behind the server: setting a tag is ``session.merge`` (SELECT,
    then INSERT or UPDATE under the primary key (name, key)), so when the lease tag is *absent* two
    concurrent first writes cannot both succeed: the loser gets an IntegrityError (HTTP 400), which
    :func:`_write_lease` treats as "lost the race, retry". Released leases are deleted, so the common
    case (free lock) is in effect an insert-if-absent. Updates (taking over an expired lease, or a
    stale write over a live one) are last-writer-wins. The remaining race windows, honestly:

    * A tag write is last-writer-wins with no version check. If client B read "free" *before* A's
      write and B's own write lands *after* A's read-back (a stall longer than ``settle_s`` between
      B's read and B's write), both believe they hold the lease. A's :meth:`~Held.check` just
      before the alias moves narrows this to: B's stale write landing between A's final check and
      A's last alias write, and B's champion re-read happening before A's alias writes land.
    * Expiry uses the clients' clocks (``time.time()``): clock skew between hosts larger than the
      remaining lease time lets a waiter take over a live lease. ``ttl_s`` (default 120 s) should
      be far above a promotion's duration (a few seconds) plus the skew.
    * A holder stalled past ``ttl_s`` loses the lease silently; :meth:`~Held.check` catches it only
      if the stall happened before the check.
    * Release reads then deletes: a holder that had overrun its lease could delete its successor's.
    A lease left behind because the tracking server went away before it could be released (its holder got an
    error and ended) is taken over without waiting for it to expire when its holder is known to be gone: a process
    of this host that no longer runs, or this very process (whose release failed: :data:`_ABANDONED`). Held by
    another host, it expires after ``ttl_s``.

    With a SQL database reachable by every client, a database row lock (``SELECT ... FOR UPDATE``)
    would close these windows; the tracking server exposes no such primitive over REST.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medseg.errors import MedsegError

LEASE_TAG = "medseg.promotion_lease"
LOCK_SUFFIX = ".promote.lock"
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_TTL_S = 120.0
DEFAULT_SETTLE_S = 0.5


def lock_file_for(tracking_uri: str) -> Path | None:
    """The lock file for a local store (SQLite file or file store), else ``None`` (use a lease)."""
    uri = str(tracking_uri)
    if uri.startswith("sqlite:"):
        rest = uri[len("sqlite:"):]
        if not rest.startswith("///"):
            return None
        db = rest[3:].split("?", 1)[0]
        if not db or db == ":memory:":
            return None
        return Path(db).resolve().with_name(Path(db).name + LOCK_SUFFIX)
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return Path(urlparse(uri).path).resolve() / LOCK_SUFFIX
    if scheme == "" and uri:  # a plain path: MLflow's file store
        return Path(uri).resolve() / LOCK_SUFFIX
    return None


def new_owner_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


#: Owner tokens of leases this process held but could not release (the server did not answer): they are its own.
_ABANDONED: set[str] = set()


def holder_gone(owner: str) -> bool:
    """Whether the holder of a lease token (``host:pid:uuid``) certainly no longer holds it: a lease this process
    abandoned, or one of a process of this host that has ended."""
    if owner in _ABANDONED:
        return True
    host, _, rest = str(owner).partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists (another user's)
        return False
    return False


@dataclass
class Held:
    """A held lock: ``kind`` ("file" or "lease"), ``owner`` token, ``waited_s`` to acquire it."""

    kind: str
    owner: str
    waited_s: float
    path: str | None = None
    name: str | None = None
    _client: Any = field(default=None, repr=False)
    _ttl_s: float = DEFAULT_TTL_S

    def check(self, min_remaining_s: float = 5.0) -> None:
        """Raise :class:`MedsegError` unless the lock is still ours (no-op for a file lock)."""
        if self.kind != "lease":
            return
        lease = read_lease(self._client, self.name)
        if not lease or lease.get("owner") != self.owner:
            raise MedsegError(f"lost the promotion lease on {self.name!r} (now held by {(lease or {}).get('owner', 'nobody')}); nothing was changed")
        if float(lease.get("expires", 0)) - time.time() < min_remaining_s:
            raise MedsegError(f"the promotion lease on {self.name!r} is about to expire; nothing was changed")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "owner": self.owner, "waited_s": round(self.waited_s, 3), "path": self.path}


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, tracking_uri: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, kind: str | None = None,
                   ttl_s: float = DEFAULT_TTL_S, settle_s: float = DEFAULT_SETTLE_S) -> Iterator[Held]:
    """Hold the promotion lock of registered model ``name`` for the block.

    ``kind``: ``"file"`` or ``"lease"`` to force one; default: ``file`` when :func:`lock_file_for` gives a
    path, else ``lease``. Raises :class:`MedsegError` after ``timeout_s`` without the lock.
    """
    path = lock_file_for(tracking_uri)
    kind = kind or ("file" if path is not None else "lease")
    if kind == "file":
        if path is None:
            raise MedsegError(f"no lock file for tracking URI {tracking_uri!r}")
        with _file_lock(path, timeout_s) as held:
            yield held
    elif kind == "lease":
        with _lease(client, name, timeout_s, ttl_s, settle_s) as held:
            yield held
    else:
        raise MedsegError(f"unknown lock kind {kind!r}")


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[Held]:
    t0 = time.monotonic()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise MedsegError(f"cannot open the promotion lock file: {exc}", path) from None
    try:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout_s:
                    raise MedsegError(f"timed out after {timeout_s:g} s waiting for the promotion lock", path) from None
                time.sleep(0.05)
        owner = new_owner_token()
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"owner": owner, "since": time.time()}) + "\n")  # for a person debugging a stuck lock
        fh.flush()
        try:
            yield Held("file", owner, time.monotonic() - t0, path=str(path))
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def read_lease(client: Any, name: str | None) -> dict[str, Any] | None:
    """The lease tag of registered model ``name`` as a dict (``None`` when absent or unreadable)."""
    rm = client.get_registered_model(name)
    raw = (rm.tags or {}).get(LEASE_TAG)
    if not raw:
        return None
    try:
        lease = json.loads(raw)
    except ValueError:
        return None
    return lease if isinstance(lease, dict) else None


#: Server answers meaning "another writer got there first" (or a transient write conflict): retry.
_CONFLICT_MARKERS = ("unique constraint", "integrityerror", "duplicate key", "duplicate entry", "database is locked", "already exists")


def _write_lease(client: Any, name: str, lease: dict[str, Any]) -> bool:
    """Write the lease tag; ``False`` when the store reports a concurrent write of the same tag."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_tag(name, LEASE_TAG, json.dumps(lease))
    except MlflowException as exc:
        if any(marker in str(exc).lower() for marker in _CONFLICT_MARKERS):
            return False
        raise
    return True


@contextlib.contextmanager
def _lease(client: Any, name: str, timeout_s: float, ttl_s: float, settle_s: float) -> Iterator[Held]:
    t0 = time.monotonic()
    owner = new_owner_token()
    while True:
        now = time.time()
        lease = read_lease(client, name)
        if lease is None or lease.get("owner") == owner or float(lease.get("expires", 0)) <= now or holder_gone(str(lease.get("owner", ""))):
            if _write_lease(client, name, {"owner": owner, "expires": now + ttl_s, "acquired": now}):
                time.sleep(settle_s)
                lease = read_lease(client, name)
                if lease is not None and lease.get("owner") == owner:
                    break
        if time.monotonic() - t0 > timeout_s:
            held_by = (lease or {}).get("owner", "unknown")
            raise MedsegError(f"timed out after {timeout_s:g} s waiting for the promotion lease on {name!r} (held by {held_by})")
        time.sleep(0.1 + 0.3 * random.random())  # jitter: two waiters do not retry in lockstep
    try:
        yield Held("lease", owner, time.monotonic() - t0, name=name, _client=client, _ttl_s=ttl_s)
    finally:
        try:  # best effort: an unreleased lease expires after ttl_s (or is taken over: holder_gone)
            lease = read_lease(client, name)
            if lease is not None and lease.get("owner") == owner:
                client.delete_registered_model_tag(name, LEASE_TAG)
        except Exception:  # noqa: BLE001 - the server did not answer: remember the lease as ours to take over
            _ABANDONED.add(owner)
