"""S3 access: a client built from the environment, a verified, atomic download of a prefix, and a verified upload of a folder.

Credentials and the endpoint come from the environment only, never from a file of this project:

* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), or ``AWS_PROFILE``,
  or any other source boto3 knows (instance role, ``~/.aws/credentials``);
* ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``);
* ``MEDSEG_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL`` (what the
  cluster's S3 Secret sets), for an S3-compatible server (MinIO, moto); unset means AWS itself.

:func:`download_prefix` streams every object under ``s3://bucket/prefix/`` into a local folder, hashing
while it writes (sha256 for the records, MD5 to check the ETag of single-part uploads) and checking each
object's size; the folder appears only once every object is in it and verified. A request to an endpoint
that stops is retried by botocore (3 attempts, exponential backoff with jitter, connect/read timeouts), a body
cut mid-way is downloaded again from its start as many times; then one clear error names the endpoint and
the object. :func:`stage_source`
turns a ``--source`` argument (local folder or ``s3://`` URI) into a local folder. :func:`upload_folder` is the way
back: every file of a folder under a prefix, one verified PUT each (an object is stored whole or not at all).

boto3 is imported on first use, so importing this module (e.g. from ``medseg ingest`` on a local
folder) costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from medseg.errors import MedsegError
from medseg.io import atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    from botocore.client import BaseClient

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# MLFLOW_S3_ENDPOINT_URL last: in a cluster the medseg-s3 Secret (params.yaml cluster.secrets.s3) provides only that one
ENDPOINT_ENV_VARS = ("MEDSEG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_DEFAULT_REGION", "AWS_REGION")
CHUNK_BYTES = 1 << 20
# S3 bucket names: 3–63 characters of lower-case letters, digits, dots and hyphens (underscores are accepted
# by some S3-compatible servers, so they pass here and the server decides).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
# A single-part upload's ETag is the hex MD5 of the object; multipart ETags end in "-<parts>".
_MD5_ETAG_RE = re.compile(r"^[0-9a-f]{32}$")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}


# --------------------------------------------------------------------------- settings from the environment
def endpoint_url_from_env(environ: dict[str, str] | None = None) -> str | None:
    """The S3 endpoint URL: the first set of :data:`ENDPOINT_ENV_VARS` (``None``: AWS itself)."""
    env = os.environ if environ is None else environ
    for name in ENDPOINT_ENV_VARS:
        if env.get(name):
            return env[name]
    return None


def region_from_env(environ: dict[str, str] | None = None) -> str | None:
    """The region from ``AWS_DEFAULT_REGION`` or ``AWS_REGION``, or ``None``."""
    env = os.environ if environ is None else environ
    for name in REGION_ENV_VARS:
        if env.get(name):
            return env[name]
    return None


def _env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name`` (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise MedsegError(f"{name} must be a positive number, got {text!r}")
    return value


def make_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
    max_attempts: int | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> BaseClient:
    """A boto3 S3 client; every argument left ``None`` is read from the environment.

    Args:
        endpoint_url: S3-compatible server, e.g. ``http://minio:9000`` (default: :func:`endpoint_url_from_env`).
            A custom endpoint is addressed path-style (``endpoint/bucket/key``), as MinIO expects.
        region: region name (default: :func:`region_from_env`).
        profile: a profile of the AWS config files (default: ``AWS_PROFILE`` as boto3 reads it).
        access_key_id, secret_access_key, session_token: explicit credentials; normally left ``None`` so
            that boto3 takes them from the environment.
        max_attempts: attempts per request including the first (connection errors, timeouts and 5xx are
            retried, with botocore's exponential backoff and jitter), so a stopped endpoint fails after a few
            seconds (default: ``MEDSEG_S3_MAX_ATTEMPTS`` or 3).
        connect_timeout, read_timeout: seconds (default: ``MEDSEG_S3_CONNECT_TIMEOUT`` or 10,
            ``MEDSEG_S3_READ_TIMEOUT`` or 60): an endpoint that accepts but never answers (frozen) fails too.
    """
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or endpoint_url_from_env()
    attempts = int(max_attempts if max_attempts is not None else _env_number("MEDSEG_S3_MAX_ATTEMPTS", 3))
    config = Config(
        connect_timeout=connect_timeout if connect_timeout is not None else _env_number("MEDSEG_S3_CONNECT_TIMEOUT", 10.0),
        read_timeout=read_timeout if read_timeout is not None else _env_number("MEDSEG_S3_READ_TIMEOUT", 60.0),
        # total_max_attempts counts the first request; botocore's "max_attempts" would count retries only (one more)
        retries={"total_max_attempts": max(1, attempts), "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    try:
        session = boto3.session.Session(profile_name=profile, region_name=region or region_from_env())
    except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
        raise MedsegError(f"cannot set up the S3 session: {exc}") from None
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        aws_session_token=session_token,
        config=config,
    )


def _client_endpoint(client: BaseClient) -> str:
    return str(getattr(getattr(client, "meta", None), "endpoint_url", "") or "AWS S3")


def _client_attempts(client: BaseClient) -> int | None:
    """Attempts per request of the client's retry config (for error messages), when it says."""
    retries = getattr(getattr(getattr(client, "meta", None), "config", None), "retries", None)
    attempts = retries.get("total_max_attempts") if isinstance(retries, dict) else None
    return attempts if isinstance(attempts, int) else None


# --------------------------------------------------------------------------- URIs and keys
def is_s3_uri(source: str | Path) -> bool:
    """Whether ``source`` names S3 (``s3://…``; also ``s3:/…``, which is what ``Path("s3://…")`` becomes)."""
    return str(source).startswith("s3:/")


def _uri_text(source: str | Path) -> str:
    # Path("s3://b/p") collapses the double slash to "s3:/b/p": restore it.
    text = str(source)
    if text.startswith("s3:/") and not text.startswith(S3_SCHEME):
        text = S3_SCHEME + text[len("s3:/"):]
    return text


def parse_s3_uri(uri: str | Path) -> tuple[str, str]:
    """Split ``s3://bucket/key/or/prefix`` into ``(bucket, key)``; ``key`` is ``""`` for the whole bucket.

    Raises:
        MedsegError: not an ``s3://`` URI, or no valid bucket name.
    """
    text = _uri_text(uri)
    if not text.startswith(S3_SCHEME):
        raise MedsegError("not an S3 URI (expected s3://bucket/prefix)", text)
    bucket, _, key = text[len(S3_SCHEME):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise MedsegError(f"invalid bucket name {bucket!r} (3–63 lower-case letters, digits, dots, hyphens)", text)
    return bucket, key.lstrip("/")


def _folder_prefix(key: str) -> str:
    """``"a/b"`` and ``"a/b/"`` both mean the folder ``a/b/`` (so ``a/bc/…`` is not included)."""
    return "" if not key else key if key.endswith("/") else key + "/"


def relative_key(key: str, prefix: str, name: str | None = None) -> PurePosixPath:
    """The path of ``key`` below ``prefix``, refusing anything that could land outside the destination.

    ``name`` (default: ``key``) is what the error message names, e.g. the object's full URI.

    Raises:
        MedsegError: the key is not under ``prefix``, or has an absolute, empty, ``.`` or ``..`` part,
            a NUL byte or a backslash.
    """
    name = name or key
    if not key.startswith(prefix):
        raise MedsegError(f"key is not under the prefix {prefix!r}", name)
    rest = key[len(prefix):]
    parts = rest.split("/")
    if not rest or rest.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rest or "\\" in rest:
        raise MedsegError("refusing an unsafe object key (absolute, empty, '.' or '..' part, NUL or backslash): it could write outside the destination", name)
    return PurePosixPath(*parts)


# --------------------------------------------------------------------------- errors
@contextlib.contextmanager
def s3_errors(target: str, endpoint: str = "AWS S3", attempts: int | None = None) -> Iterator[None]:
    """Turn botocore exceptions into one-line :class:`MedsegError` naming ``target`` (a URI).

    Covers a missing bucket or key, rejected or missing credentials, access denied, and an endpoint
    that cannot be reached (``attempts``, when given, is said in that message); the botocore traceback
    is dropped (``from None``).
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError as BotoConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise MedsegError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment", target) from None
    except ReadTimeoutError:
        tried = f" ({attempts} attempts with backoff)" if attempts else ""
        raise MedsegError(f"the S3 endpoint {endpoint} accepted the connection but sent no answer within the read timeout (ReadTimeoutError): "
                          f"is the server stuck or overloaded?{tried}", target) from None
    except (BotoConnectionError, HTTPClientError) as exc:  # EndpointConnectionError, connect timeouts, closed connections
        tried = f" ({attempts} attempts with backoff)" if attempts else ""
        raise MedsegError(f"cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}): is the server up and the endpoint URL right?{tried}", target) from None
    except ClientError as exc:
        raise MedsegError(describe_client_error(exc), target) from None
    except BotoCoreError as exc:
        raise MedsegError(f"S3 request failed: {exc}", target) from None


def describe_client_error(exc: Exception) -> str:
    """A sentence for an S3 ``ClientError`` (bucket missing, credentials rejected, access denied, ...)."""
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {})
    code = str(error.get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = error.get("Message", "") or str(exc)
    bucket_operation = getattr(exc, "operation_name", "") in ("HeadBucket", "ListObjectsV2", "ListObjects")
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and (error.get("BucketName") or bucket_operation)):
        return "bucket not found"
    if code in ("NoSuchKey", "404", "NotFound"):
        return "not found"
    if code in _CREDENTIAL_CODES:
        return f"the S3 endpoint rejected the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    if code in ("AccessDenied", "403", "Forbidden") or status == 403:
        return f"access denied ({code or status}): the credentials lack permission, or are wrong"
    if code in ("PreconditionFailed", "412"):
        return "the object changed while it was being downloaded; run again"
    return f"S3 error {code or status}: {message}"


# --------------------------------------------------------------------------- verification
def is_md5_etag(etag: str | None) -> bool:
    """Whether an ETag is the plain MD5 of the object (single-part upload), not a multipart ``…-N`` one."""
    return bool(etag) and bool(_MD5_ETAG_RE.match(etag.strip('"').lower()))  # type: ignore[union-attr]


def verify_object(name: str, size: int, md5_hex: str, expected_size: int, etag: str | None, etag_is_md5: bool = True) -> None:
    """Check a received object against what S3 announced.

    Args:
        name: the object's URI, for the error message.
        size, md5_hex: what was received (bytes and MD5 computed while streaming).
        expected_size: the size S3 listed (``Size`` / ``Content-Length``).
        etag: the object's ETag; compared with ``md5_hex`` only when it is a plain MD5.
        etag_is_md5: ``False`` when the server-side encryption makes the ETag something else
            (SSE-KMS, SSE-C): then only the size is checked.

    Raises:
        MedsegError: size or MD5 mismatch (a truncated or corrupted transfer).
    """
    if size != expected_size:
        raise MedsegError(f"size mismatch: received {size} bytes, S3 announced {expected_size} (truncated or changed transfer)", name)
    if etag_is_md5 and is_md5_etag(etag) and etag.strip('"').lower() != md5_hex.lower():  # type: ignore[union-attr]
        raise MedsegError(f"checksum mismatch: MD5 {md5_hex} of the received bytes differs from the ETag {etag} (corrupted transfer)", name)


def _etag_is_md5(response: dict[str, Any]) -> bool:
    # With SSE-KMS or SSE-C the ETag of a single-part object is not its MD5.
    return response.get("ServerSideEncryption") not in ("aws:kms", "aws:kms:dsse") and not response.get("SSECustomerAlgorithm")


# --------------------------------------------------------------------------- download
def list_objects(client: BaseClient, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under ``prefix`` as S3 lists them (``Key``, ``Size``, ``ETag``), folder markers included."""
    objects: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects.extend(page.get("Contents", []))
    return objects


def download_prefix(uri: str | Path, dest: str | Path, progress: bool = True, client: BaseClient | None = None) -> list[dict[str, Any]]:
    """Download every object under ``s3://bucket/prefix/`` into ``dest``, verified, atomically.

    Keys keep their path below the prefix (``s3://b/p/c1/x.nii.gz`` → ``dest/c1/x.nii.gz``); "folder"
    markers (keys ending in ``/``) are skipped. Each object is streamed to disk while its sha256 and MD5
    are computed; its size is checked against the listing and, for single-part uploads (an MD5 ETag),
    its MD5 against the ETag. Each GET is conditional on the listed ETag, so an object replaced during
    the download is an error rather than a silent mix of versions. Everything is written into a
    temporary folder beside ``dest`` that replaces ``dest`` only when complete (see
    :func:`medseg.io.atomic_dir`): ``dest`` never holds a partial download.

    Args:
        uri: ``s3://bucket/prefix`` (a trailing ``/`` is optional; ``s3://bucket`` takes the whole bucket).
        dest: local folder to create (replaced if it exists).
        progress: show a progress bar in bytes.
        client: an S3 client (default: :func:`make_client` from the environment).

    Returns:
        One record per file, in key order: ``{"key", "path", "size", "sha256"}`` (``path`` is the final
        local path).

    Raises:
        MedsegError: bad URI, a key with ``..`` or an absolute part, no object under the prefix,
            bucket not found, missing or rejected credentials, unreachable endpoint, or a size or
            checksum mismatch. The message names the URI.
    """
    uri = _uri_text(uri)
    bucket, key = parse_s3_uri(uri)
    prefix = _folder_prefix(key)
    dest = Path(dest)
    client = client or make_client()
    endpoint = _client_endpoint(client)
    attempts = _client_attempts(client)

    with s3_errors(uri, endpoint, attempts):
        listed = list_objects(client, bucket, prefix)
    objects = sorted((o for o in listed if not o["Key"].endswith("/")), key=lambda o: o["Key"])
    if not objects:
        raise MedsegError(f"no objects under this prefix{' (only folder markers)' if listed else ''}", uri)
    # refuse unsafe keys before writing anything
    relative = [relative_key(o["Key"], prefix, f"{S3_SCHEME}{bucket}/{o['Key']}") for o in objects]
    _check_no_clashes(relative, uri)

    total = sum(int(o["Size"]) for o in objects)
    records: list[dict[str, Any]] = []
    logger.info("downloading %d object(s), %d bytes, from %s to %s", len(objects), total, uri, dest)
    with atomic_dir(dest) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=f"download {uri}", disable=not progress) as bar:
        for obj, rel in zip(objects, relative):
            name = f"{S3_SCHEME}{bucket}/{obj['Key']}"
            target = tmp.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            size, sha256 = _download_object(client, bucket, obj, target, name, endpoint, bar, attempts)
            records.append({"key": obj["Key"], "path": str(dest.joinpath(*rel.parts)), "size": size, "sha256": sha256})
    return records


def _check_no_clashes(relative: list[PurePosixPath], uri: str) -> None:
    """Two keys that map to the same file, or a file where another key needs a folder, cannot both land."""
    files = set(relative)
    if len(files) != len(relative):
        raise MedsegError("two object keys map to the same local file", uri)
    for rel in relative:
        for parent in rel.parents:
            if parent in files:
                raise MedsegError(f"object {parent} is also a folder of {rel}: cannot write both", uri)


class _Interrupted(Exception):
    """The body of a GET stopped mid-way (``size`` bytes received): the request itself is retried by botocore,
    the body is not."""

    def __init__(self, size: int, reason: str) -> None:
        super().__init__(reason)
        self.size, self.reason = size, reason


def _download_object(client: BaseClient, bucket: str, obj: dict[str, Any], target: Path, name: str, endpoint: str, bar: tqdm,
                     attempts: int | None = None) -> tuple[int, str]:
    """GET one object into ``target``; a body cut mid-way is downloaded again from the start, up to ``attempts``
    times in all with exponential backoff (then a clear error), as botocore does for the request itself."""
    tries = max(1, attempts or 1)
    for attempt in range(1, tries + 1):
        try:
            return _download_once(client, bucket, obj, target, name, endpoint, bar, attempts)
        except _Interrupted as cut:
            bar.update(-cut.size)
            if attempt == tries:
                raise MedsegError(f"transfer interrupted after {cut.size} bytes ({cut.reason}), {tries} attempt(s)", name) from None
            pause = min(20.0, 0.5 * 2 ** (attempt - 1))
            logger.warning("%s: transfer interrupted after %d bytes (%s); downloading it again in %.1f s (attempt %d of %d)",
                           name, cut.size, cut.reason, pause, attempt + 1, tries)
            time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _download_once(client: BaseClient, bucket: str, obj: dict[str, Any], target: Path, name: str, endpoint: str, bar: tqdm,
                   attempts: int | None) -> tuple[int, str]:
    from botocore.exceptions import BotoCoreError

    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    request: dict[str, Any] = {"Bucket": bucket, "Key": obj["Key"]}
    if obj.get("ETag"):
        request["IfMatch"] = obj["ETag"]
    with s3_errors(name, endpoint, attempts):
        response = client.get_object(**request)
        try:
            with open(target, "wb") as fh:  # "wb": a new attempt starts the file again
                for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                    fh.write(chunk)
                    sha256.update(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        except BotoCoreError as exc:  # IncompleteReadError, ResponseStreamingError, ReadTimeoutError mid-body
            raise _Interrupted(size, type(exc).__name__) from None
        except OSError as exc:
            raise MedsegError(f"cannot write {target.name}: {exc.strerror or exc}", name) from None
        finally:
            response["Body"].close()
    verify_object(name, size, md5.hexdigest(), int(obj["Size"]), response.get("ETag") or obj.get("ETag"), _etag_is_md5(response))
    return size, sha256.hexdigest()


def stage_source(source: str | Path, workdir: str | Path, progress: bool = True, client: BaseClient | None = None) -> Path:
    """A local folder for a ``--source`` argument: a local path as it is, an ``s3://`` URI downloaded.

    ``medseg ingest`` calls this first, so ``medseg ingest --source s3://bucket/prefix --out DIR``
    ingests straight from a bucket (MinIO or moto with ``MEDSEG_S3_ENDPOINT_URL``): the objects under
    the prefix are downloaded and verified by :func:`download_prefix` into
    ``workdir/<bucket>/<prefix>`` and that folder is returned. A local path is returned unchanged
    (its existence is for the caller to check). ``Path("s3://b/p")`` (which reads ``s3:/b/p``) is
    accepted as the URI it came from.

    Args:
        source: a local folder, or ``s3://bucket/prefix``.
        workdir: where S3 data is staged (created; an earlier download of the same prefix is replaced).
        progress: show a download progress bar.
        client: an S3 client (default: from the environment).

    Raises:
        MedsegError: from :func:`download_prefix`, or a prefix with a ``.``/``..`` part.
    """
    if not is_s3_uri(source):
        return Path(source)
    uri = _uri_text(source)
    bucket, key = parse_s3_uri(uri)
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise MedsegError("refusing a prefix with a '.' or '..' part", uri)
    dest = Path(workdir).joinpath(bucket, *parts)
    download_prefix(uri, dest, progress=progress, client=client)
    return dest


# --------------------------------------------------------------------------- upload
#: Largest object a single PUT may carry (S3's limit); larger files would need a multipart upload.
MAX_PUT_BYTES = 5 * 1024**3


def upload_folder(local_dir: str | Path, uri: str | Path, last: tuple[str, ...] = (), progress: bool = True,
                  client: BaseClient | None = None) -> list[dict[str, Any]]:
    """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<its relative path>``, each verified.

    Each file is one PUT carrying its MD5 (``Content-MD5``): S3 stores the object whole or rejects it, so a reader
    sees the previous object under that key or the new one, never part of it; the returned ETag is checked against
    the MD5 too (unless server-side encryption makes it something else). Objects of other names under the prefix are
    left as they are. The files named in ``last`` (paths relative to ``local_dir``, e.g. ``volumes.csv``) are
    uploaded after all the others, so a reader who finds them finds everything they list.

    Args:
        local_dir: folder to upload (its files, recursively; hidden temporary names ``.*`` are skipped).
        uri: ``s3://bucket/prefix`` (a trailing ``/`` is optional).
        last: relative paths to upload last, in this order.
        progress: show a progress bar in bytes.
        client: an S3 client (default: :func:`make_client` from the environment).

    Returns:
        One record per object, in upload order: ``{"key", "uri", "size", "md5"}``.

    Raises:
        MedsegError: bad URI, ``local_dir`` missing or without files, a file over :data:`MAX_PUT_BYTES`, bucket not
            found, missing or rejected credentials, unreachable endpoint, or an upload S3 did not store as sent.
            The message names the folder or the object's URI.
    """
    uri = _uri_text(uri)
    bucket, key = parse_s3_uri(uri)
    prefix = _folder_prefix(key)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise MedsegError("folder to upload not found", local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local_dir).parts))
    if not files:
        raise MedsegError("no files to upload", local_dir)
    relative = [p.relative_to(local_dir).as_posix() for p in files]
    order = [r for r in relative if r not in last] + [r for r in last if r in relative]
    too_big = [r for r in order if (local_dir / r).stat().st_size > MAX_PUT_BYTES]
    if too_big:
        raise MedsegError(f"larger than a single S3 PUT takes ({MAX_PUT_BYTES} bytes): {', '.join(too_big)}", local_dir)
    client = client or make_client()
    endpoint = _client_endpoint(client)
    attempts = _client_attempts(client)
    total = sum((local_dir / r).stat().st_size for r in order)
    logger.info("uploading %d file(s), %d bytes, from %s to %s", len(order), total, local_dir, uri)
    records: list[dict[str, Any]] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {uri}", disable=not progress) as bar:
        for rel in order:
            object_key = prefix + rel
            name = f"{S3_SCHEME}{bucket}/{object_key}"
            size, md5_hex = _upload_object(client, local_dir / rel, bucket, object_key, name, endpoint, attempts)
            bar.update(size)
            records.append({"key": object_key, "uri": name, "size": size, "md5": md5_hex})
    return records


def _upload_object(client: BaseClient, path: Path, bucket: str, key: str, name: str, endpoint: str, attempts: int | None) -> tuple[int, str]:
    """PUT one file with its Content-MD5 (S3 refuses a body that does not match: BadDigest); ``(size, md5 hex)``."""
    import base64

    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
                md5.update(chunk)
                size += len(chunk)
        with open(path, "rb") as fh, s3_errors(name, endpoint, attempts):
            # a file-like body: botocore streams it, and rewinds it when it retries the request
            response = client.put_object(Bucket=bucket, Key=key, Body=fh, ContentLength=size, ContentMD5=base64.b64encode(md5.digest()).decode("ascii"))
    except OSError as exc:
        raise MedsegError(f"cannot read the file to upload: {exc.strerror or exc}", path) from None
    etag = response.get("ETag")
    if _etag_is_md5(response) and is_md5_etag(etag) and etag.strip('"').lower() != md5.hexdigest():
        raise MedsegError(f"checksum mismatch: S3 stored ETag {etag} for a file of MD5 {md5.hexdigest()} (corrupted transfer)", name)
    return size, md5.hexdigest()
