"""The DVC remote on S3: configure it, push and pull the data, and name the dataset version.

The remote is written into DVC's own configuration through DVC's API (the same edit ``dvc remote add
-d`` and ``dvc remote modify … endpointurl`` make): its name, its ``s3://bucket/path`` URL and, for
MinIO or another S3-compatible server, its endpoint URL. Credentials are never written: DVC (through
s3fs/boto) reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``) from the
environment at push/pull time, so ``.dvc/config`` can be committed as it is.

Before a push or pull the bucket is asked once with a HEAD request (:func:`check_remote`), so that a
missing bucket, rejected credentials or an unreachable endpoint fail at once with one clear line
instead of after DVC's retries with a long traceback.

DVC is imported on first use (it takes about a second), never at module import.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medseg.data import s3
from medseg.errors import MedsegError
from medseg.schemas import MANIFEST_JSON, Manifest

if TYPE_CHECKING:  # pragma: no cover
    from dvc.repo import Repo

logger = logging.getLogger(__name__)

DEFAULT_REMOTE = "storage"
LEVELS = ("repo", "local")  # .dvc/config (committed) or .dvc/config.local (git-ignored)
# Attempts per S3 request inside DVC's push/pull (botocore "standard" retries: exponential backoff with jitter).
# DVC has no option for it; botocore's legacy default (5 attempts) spent ~7 s per file on a stopped endpoint.
TRANSFER_MAX_ATTEMPTS = 3
# Remote options that hold secrets: they must never be in the committed .dvc/config.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "sse_customer_key", "password", "token", "bearer_token_command", "custom_auth_header")


# --------------------------------------------------------------------------- opening the repository
@contextlib.contextmanager
def open_repo(repo: str | Path | Repo = ".") -> Iterator[Repo]:
    """A :class:`dvc.repo.Repo` for ``repo`` (the folder or any folder below it), closed afterwards.

    A ``Repo`` instance passes through (and stays open).

    Raises:
        MedsegError: not inside a DVC repository.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    if isinstance(repo, Repo):
        yield repo
        return
    try:
        handle = Repo(str(repo))
    except NotDvcRepoError:
        raise MedsegError("not inside a DVC repository (run `git init && dvc init` first)", repo) from None
    try:
        yield handle
    finally:
        handle.close()


# --------------------------------------------------------------------------- configuration
def configure_remote(
    url: str,
    name: str = DEFAULT_REMOTE,
    endpoint_url: str | None = None,
    repo: str | Path = ".",
    default: bool = True,
    level: str = "repo",
) -> dict[str, Any]:
    """Add or update the S3 remote ``name`` of the DVC repository ``repo``.

    Equivalent to ``dvc remote add [-d] -f NAME URL`` followed by ``dvc remote modify NAME endpointurl
    ENDPOINT``; other options already set on the remote (``region``, ``profile``…) are kept.

    Args:
        url: ``s3://bucket/path``.
        name: remote name (DVC lower-cases it).
        endpoint_url: S3-compatible endpoint, e.g. ``http://minio:9000``; default from
            ``MEDSEG_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``. With neither, any endpoint set earlier is
            removed (the remote is AWS S3).
        repo: the repository (or a folder inside it).
        default: make it the default remote (``core.remote``), so that ``dvc push``/``dvc pull`` use it.
        level: ``"repo"`` writes ``.dvc/config`` (committed, shared with every clone); ``"local"``
            writes ``.dvc/config.local`` (git-ignored, this checkout only).

    Returns:
        ``{"name", "url", "endpointurl", "default", "config"}`` (``config``: the file written).

    Raises:
        MedsegError: bad URL or level, not a DVC repository, or a config DVC rejects.
    """
    from dvc.config import ConfigError

    s3.parse_s3_uri(url)  # a clear error before DVC sees it
    if level not in LEVELS:
        raise MedsegError(f"level must be one of {LEVELS}, got {level!r}")
    name = name.strip().lower()
    if not name:
        raise MedsegError("the remote needs a name")
    endpoint = endpoint_url or s3.endpoint_url_from_env()
    with open_repo(repo) as r:
        try:
            with r.config.edit(level) as conf:
                section = dict(conf["remote"].get(name, {}))
                section["url"] = url
                if endpoint:
                    section["endpointurl"] = endpoint
                else:
                    section.pop("endpointurl", None)
                conf["remote"][name] = section
                if default:
                    conf["core"]["remote"] = name
        except ConfigError as exc:
            raise MedsegError(f"DVC rejected the remote configuration: {exc}", r.config.files[level]) from None
        config_file = r.config.files[level]
        leaked = secrets_in_config(r)
    if leaked:
        logger.warning("%s holds credentials (%s): it is committed with the repository; move them to the environment "
                       "or to .dvc/config.local (`dvc remote modify --local`)", config_file, ", ".join(leaked))
    logger.info("DVC remote %r → %s%s%s", name, url, f" (endpoint {endpoint})" if endpoint else "", ", default" if default else "")
    return {"name": name, "url": url, "endpointurl": endpoint, "default": default, "config": str(config_file)}


def secrets_in_config(repo: str | Path | Repo = ".") -> list[str]:
    """Names (never values) of secret remote options found in the committed ``.dvc/config``.

    Returns ``["remote.NAME.OPTION", ...]``; empty when the file is clean.
    """
    with open_repo(repo) as r:
        conf = r.config.load_one("repo")
    return [f"remote.{name}.{opt}" for name, section in conf.get("remote", {}).items() for opt in section if opt in SECRET_OPTIONS]


def remote_settings(repo: str | Path | Repo = ".", remote: str | None = None) -> dict[str, Any]:
    """The effective settings of ``remote`` (default: the default remote), merged over every config level.

    Raises:
        MedsegError: no remote given and no default set, or no remote of that name.
    """
    with open_repo(repo) as r:
        name = (remote or r.config["core"].get("remote") or "").lower()
        if not name:
            raise MedsegError("no DVC remote configured: run `medseg data remote --url s3://BUCKET/PATH` first", r.root_dir)
        remotes = r.config.get("remote", {})
        if name not in remotes:
            raise MedsegError(f"no DVC remote named {name!r} (configured: {sorted(remotes) or 'none'})", r.root_dir)
        return {"name": name, **remotes[name]}


def check_remote(repo: str | Path | Repo = ".", remote: str | None = None, max_attempts: int = 2) -> dict[str, Any]:
    """Ask the remote's bucket once (HEAD) with the credentials DVC will use; return the remote settings.

    Only S3 remotes are checked (others are returned as they are). The client is built like DVC's:
    the remote's ``endpointurl``, ``region``, ``profile`` (and keys from ``.dvc/config.local``, if
    any), else the environment.

    Raises:
        MedsegError: bucket not found, missing or rejected credentials, access denied, unreachable endpoint.
    """
    settings = remote_settings(repo, remote)
    url = settings.get("url", "")
    if not s3.is_s3_uri(url):
        return settings
    bucket, _ = s3.parse_s3_uri(url)
    endpoint = settings.get("endpointurl") or s3.endpoint_url_from_env()
    client = s3.make_client(
        endpoint_url=endpoint,
        region=settings.get("region"),
        profile=settings.get("profile"),
        access_key_id=settings.get("access_key_id"),
        secret_access_key=settings.get("secret_access_key"),
        session_token=settings.get("session_token"),
        max_attempts=max_attempts,
    )
    with s3.s3_errors(f"DVC remote {settings['name']!r} ({url})", endpoint or "AWS S3"):
        client.head_bucket(Bucket=bucket)
    return settings


# --------------------------------------------------------------------------- push / pull
@contextlib.contextmanager
def _bounded_retries(max_attempts: int) -> Iterator[None]:
    """Bound the retries of the S3 client DVC builds (through s3fs), unless the user set them already.

    botocore reads ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` from the environment when its config leaves
    them unset, which s3fs does; they are restored afterwards.
    """
    wanted = {"AWS_MAX_ATTEMPTS": str(max(1, int(max_attempts))), "AWS_RETRY_MODE": "standard"}
    saved = {key: os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _is_transfer_failure(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and str(record.msg).startswith("failed to transfer")


class _TransferFailures(logging.Handler):
    """Collects DVC's per-file "failed to transfer" records (one line each, thousands on a large dataset)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if _is_transfer_failure(record):
            exc = record.exc_info[1] if record.exc_info else None
            self.messages.append(record.getMessage() + (f" - {exc}" if exc else ""))


@contextlib.contextmanager
def _summarised_transfer_failures() -> Iterator[list[str]]:
    """Keep DVC's per-file transfer errors off the console and yield them as a list, for one summary line."""
    collector = _TransferFailures()
    sources = [logging.getLogger(name) for name in ("dvc_objects", "dvc_data")]
    handlers = {h for name in ("dvc", "dvc_objects", "dvc_data", "") for h in logging.getLogger(name).handlers}

    def keep(record: logging.LogRecord) -> bool:
        return not _is_transfer_failure(record)

    for source in sources:
        source.addHandler(collector)
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield collector.messages
    finally:
        for source in sources:
            source.removeHandler(collector)
        for handler in handlers:
            handler.removeFilter(keep)


def _transfer_exceptions() -> tuple[type[BaseException], ...]:
    """What a push or pull raises when the remote fails: DVC's own errors, and botocore's or the OS's, which DVC
    lets through from some steps (a ``.dir`` listing fetched before the files, seen with the endpoint stopped)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from dvc.exceptions import DvcException

    return (DvcException, BotoCoreError, ClientError, OSError)


def _transfer_error(verb: str, settings: dict[str, Any], exc: Exception, failures: list[str], repo: Any) -> MedsegError:
    """One line for a failed push/pull: DVC's count, the first file's error, and whether the endpoint answers now."""
    text = f"dvc {verb} {'to' if verb == 'push' else 'from'} {settings['url']} failed: {exc}"
    if failures:
        text += f" (first: {failures[0]})"
    try:
        check_remote(repo, settings["name"], max_attempts=1)
    except MedsegError as probe:
        text += f"; now {str(probe).split(': ', 1)[-1]}"
    text += f"; files already transferred are kept: run `medseg data {verb}` again once the endpoint answers"
    return MedsegError(text, repo.root_dir)


def _targets(targets: str | Path | Sequence[str | Path] | None) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, (str, Path)):
        targets = [targets]
    # absolute: a target is a path as the user typed it (relative to the current folder), whatever --repo is
    return [str(Path(t).absolute()) for t in targets] or None


def push(repo: str | Path = ".", targets: str | Path | Sequence[str | Path] | None = None, remote: str | None = None, jobs: int | None = None,
         max_attempts: int = TRANSFER_MAX_ATTEMPTS) -> int:
    """Upload the DVC-tracked data of ``repo`` (or only ``targets``: ``.dvc`` files, stage outputs) to the remote.

    Same as ``dvc push [-r REMOTE] [TARGETS]`` after :func:`check_remote`. Returns the number of files
    uploaded (0 when the remote has everything already). Each S3 request is tried at most ``max_attempts``
    times with backoff (unless ``AWS_MAX_ATTEMPTS`` is set); files that failed are summarised in one line.
    DVC writes each object under its content hash, so a push cut short is completed by pushing again.

    Raises:
        MedsegError: no remote, remote unreachable or refusing, or some files failed to upload.
    """
    with open_repo(repo) as r:
        settings = check_remote(r, remote)
        with _bounded_retries(max_attempts), _summarised_transfer_failures() as failures:
            try:
                count = r.push(targets=_targets(targets), remote=settings["name"], jobs=jobs)
            except _transfer_exceptions() as exc:
                raise _transfer_error("push", settings, exc, failures, r) from None
    logger.info("pushed %d file(s) to %s", count, settings["url"])
    return int(count)


def pull(repo: str | Path = ".", targets: str | Path | Sequence[str | Path] | None = None, remote: str | None = None, jobs: int | None = None,
         max_attempts: int = TRANSFER_MAX_ATTEMPTS) -> dict[str, Any]:
    """Download the DVC-tracked data of ``repo`` (or only ``targets``) from the remote into the workspace.

    Same as ``dvc pull [-r REMOTE] [TARGETS]`` after :func:`check_remote`. Returns DVC's statistics:
    ``{"fetched": n, "added": [...], "modified": [...], "deleted": [...]}`` (lists of workspace paths).

    Raises:
        MedsegError: no remote, remote unreachable or refusing, or data missing from the remote.
    """
    from dvc.exceptions import CheckoutError

    with open_repo(repo) as r:
        settings = check_remote(r, remote)
        with _bounded_retries(max_attempts), _summarised_transfer_failures() as failures:
            try:
                result = r.pull(targets=_targets(targets), remote=settings["name"], jobs=jobs)
            except CheckoutError as exc:
                missing = ", ".join(sorted(map(str, getattr(exc, "target_infos", []) or [])))[:500]
                raise MedsegError(f"dvc pull from {settings['url']}: data missing on the remote (pushed from the other clone?) {missing}".rstrip(), r.root_dir) from None
            except _transfer_exceptions() as exc:
                raise _transfer_error("pull", settings, exc, failures, r) from None
    return dict(result.get("stats", {}))


# --------------------------------------------------------------------------- dataset version
def dataset_version(dataset_dir: str | Path) -> dict[str, Any]:
    """The version of a canonical dataset folder (output of ``medseg ingest``).

    ``content_hash`` is the manifest's sha256 over its files' hashes (what MLflow lineage records). When
    DVC tracks the folder, ``dvc_md5`` is the directory hash recorded for it in ``<dataset>.dvc`` or
    in the ``dvc.lock`` of the repository (e.g. the ``ingest`` stage's ``work/dataset`` output), and
    ``dvc_file`` says which (``"work/dataset.dvc"`` or ``"dvc.lock:ingest"``); both are ``None``
    otherwise. These are the recorded versions: ``dvc status`` tells whether the workspace still matches.

    Returns:
        ``{"dataset", "content_hash", "cases", "dvc_md5", "dvc_file"}``.

    Raises:
        MedsegError: no manifest, or a manifest whose hash does not match its own file list.
    """
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise MedsegError("dataset folder not found", folder)
    if not (folder / MANIFEST_JSON).is_file():
        raise MedsegError(f"no {MANIFEST_JSON}: not a dataset written by `medseg ingest`", folder)
    manifest = Manifest.load(folder)
    if not manifest.content_hash:
        raise MedsegError("manifest has no content_hash", folder / MANIFEST_JSON)
    if manifest.compute_hash() != manifest.content_hash:
        raise MedsegError("manifest content_hash does not match its list of files (edited by hand?)", folder / MANIFEST_JSON)
    md5, source = dvc_entry(folder)
    return {"dataset": str(folder), "content_hash": manifest.content_hash, "cases": len(manifest.cases), "dvc_md5": md5, "dvc_file": source}


def dvc_entry(path: str | Path) -> tuple[str | None, str | None]:
    """``(md5, where)`` that DVC recorded for ``path``, from ``path.dvc`` or the repository's ``dvc.lock``.

    ``(None, None)`` when DVC does not track ``path`` itself (no repository, or not an output).
    """
    path = Path(path).absolute()
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        for out in (_read_yaml(dvc_file).get("outs") or []):
            if Path(str(out.get("path", ""))).name == path.name and out.get("md5"):
                return str(out["md5"]), dvc_file.name
    root = next((p for p in (path, *path.parents) if (p / ".dvc").is_dir()), None)
    if root is None or not (root / "dvc.lock").is_file():
        return None, None
    rel = path.relative_to(root).as_posix()
    for stage_name, stage in (_read_yaml(root / "dvc.lock").get("stages") or {}).items():
        for out in (stage or {}).get("outs") or []:
            if str(out.get("path", "")).rstrip("/") == rel and out.get("md5"):
                return str(out["md5"]), f"dvc.lock:{stage_name}"
    return None, None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MedsegError(f"cannot read DVC file: {exc}", path) from None
    return data if isinstance(data, dict) else {}
