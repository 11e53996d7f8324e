"""File input/output with clear errors and atomic writes.

Every writer here writes to a temporary name in the destination folder and renames it into place, so a
reader never sees a half-written file and a crash leaves what was stored before untouched.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.errors import MedsegError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Largest difference (mm) between two affines' entries that still counts as the same geometry: NIfTI stores
# affines as float32, so files written by different tools differ in the last bits.
AFFINE_ATOL_MM = 1e-3


# --------------------------------------------------------------------------- atomic writes
# A full disk or an exhausted quota: what the user must fix by freeing space, not a bug to trace.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS saying the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_error(exc: OSError, path: str | Path) -> MedsegError:
    """The one-line error for a full disk while writing ``path``."""
    code = errno.errorcode.get(exc.errno or 0, "ENOSPC")
    what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return MedsegError(f"{what} ({code}) while writing this file; nothing of the write was kept: free space and run again", path)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it to ``dest``, on error delete it.

    A full disk becomes a :class:`MedsegError` naming ``dest`` (the temporary file is removed first).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, dest) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual permissions
        os.replace(tmp_path, dest)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(exc, dest) from None  # type: ignore[arg-type]
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` as a whole.

    The old content of ``dest`` (if any) is removed only after the new one is complete. On any error the
    temporary folder is removed; a full disk, or a :class:`MedsegError` naming a file inside the temporary
    folder, is raised naming the file's place in ``dest`` instead (the temporary name is gone by then).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and not overwrite:
            raise MedsegError("exists already (pass --overwrite to replace it)", dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(exc, dest) from None
        raise
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            old.rmdir()
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            where = Path(str(getattr(exc, "filename", None) or dest).replace(str(tmp), str(dest)))
            raise disk_full_error(exc, where) from None  # type: ignore[arg-type]
        if type(exc) is MedsegError and str(tmp) in str(exc):
            # e.g. from a worker process, where the error's path attribute does not survive pickling
            raise MedsegError(str(exc).replace(str(tmp), str(dest))) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(dest: str | Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_text(dest: str | Path, text: str) -> Path:
    return write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | Path, obj: Any) -> Path:
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MedsegError("file not found", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedsegError(f"not valid JSON ({exc})", path) from None


def save_npy(dest: str | Path, array: np.ndarray) -> Path:
    """Save an array as ``.npy`` atomically (readable later with ``mmap_mode='r'``)."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.save(_WriteOnly(fh), np.ascontiguousarray(array))
    return Path(dest)


class _WriteOnly:
    """A file seen by numpy through ``write`` only. On a real file numpy uses ``tofile``, whose error on a full
    disk carries no errno ("N requested and M written"); through ``write`` the OS's ``ENOSPC`` comes back as it is."""

    def __init__(self, fh: io.BufferedIOBase) -> None:
        self.write = fh.write


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys): stable across runs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


# --------------------------------------------------------------------------- NIfTI
def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_nifti(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI file fully: ``(array I×J×K in voxel order, affine 4×4, header)``.

    Raises :class:`MedsegError` naming the file for a missing, truncated or corrupt file, a non-3D
    image, or non-finite voxels, instead of a traceback from deep inside nibabel or zlib.
    """
    path = Path(path)
    if not path.exists():
        raise MedsegError("file not found", path)
    if not path.is_file():
        raise MedsegError("is not a file", path)
    # read and decompress the whole file: gzip.decompress checks the CRC and length, which nibabel's
    # partial reads would not (a cut or bit-flipped .nii.gz could load silently with wrong voxels)
    return load_nifti_bytes(path.read_bytes(), name=str(path), dtype=dtype)


def load_nifti_bytes(data: bytes, name: str = "<bytes>", dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI volume from bytes (``.nii`` or gzipped ``.nii.gz``)."""
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        img = nib.Nifti1Image.from_bytes(data)
        array = np.asarray(img.dataobj, dtype=dtype)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, TypeError, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError) as exc:
        raise MedsegError(f"cannot read NIfTI ({_describe(exc)})", name) from None
    return _check_volume(array, name), np.asarray(img.affine, dtype=np.float64), img.header


# What nibabel, gzip and zlib raise for a truncated or corrupt file (turned into a MedsegError naming it).
_NIFTI_READ_ERRORS = (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, TypeError, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError)


def load_nifti_4d(path: str | Path, dtype: type | None = np.float32) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a NIfTI file that may hold several volumes: ``(array I×J×K×N, affine 4×4, header)``.

    For multi-modality files such as the Medical Segmentation Decathlon's, where the 4th axis is the
    modality. A 3D file gives N = 1; a 5D file with a length-1 4th axis (vector images written as
    I×J×K×1×N) is read as I×J×K×N. ``dtype=None`` keeps the stored dtype (scaled data comes as float).
    The header is returned as stored (4D); callers splitting the volumes fix its shape themselves.

    Raises:
        MedsegError: naming the file, for a missing, truncated or corrupt file, fewer than 3 or more
            than 4 axes, or non-finite voxels.
    """
    path = Path(path)
    if not path.exists():
        raise MedsegError("file not found", path)
    if not path.is_file():
        raise MedsegError("is not a file", path)
    data = path.read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)  # whole file: checks CRC and length (see load_nifti)
        img = nib.Nifti1Image.from_bytes(data)
        array = np.asarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except _NIFTI_READ_ERRORS as exc:
        raise MedsegError(f"cannot read NIfTI ({_describe(exc)})", path) from None
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0, :]
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4:
        raise MedsegError(f"expected a 3D or 4D image, got shape {tuple(array.shape)}", path)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise MedsegError(f"contains {int((~np.isfinite(array)).sum())} NaN/Inf voxels", path)
    return array, np.asarray(img.affine, dtype=np.float64), img.header


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = type(exc).__name__
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"truncated or corrupt compressed data: {text or kind}"
    return f"{kind}: {text}" if text else kind


def _check_volume(array: np.ndarray, path: str | Path) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise MedsegError(f"expected a 3D volume, got shape {tuple(array.shape)}", path)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise MedsegError(f"contains {int((~np.isfinite(array)).sum())} NaN/Inf voxels", path)
    return array


def stack_channels(volumes: list[tuple[np.ndarray, np.ndarray, nib.Nifti1Header]], names: list[str]) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """One multi-channel image C×I×J×K from per-channel ``(array, affine, header)``; all must share shape
    and affine. Returns the stack and the first channel's affine and header. ``names`` (a file name or an
    input name per channel) go into the error message."""
    first_array, affine, header = volumes[0]
    for (array, aff, _), name in zip(volumes[1:], names[1:]):
        if array.shape != first_array.shape:
            raise MedsegError(f"shape {tuple(array.shape)} differs from {names[0]}'s {tuple(first_array.shape)}", name)
        if not np.allclose(aff, affine, rtol=0.0, atol=AFFINE_ATOL_MM):
            raise MedsegError(f"affine differs from {names[0]}'s (more than {AFFINE_ATOL_MM} mm)", name)
    return np.stack([v[0] for v in volumes]), affine, header


def nifti_spacing(header: nib.Nifti1Header) -> tuple[float, float, float]:
    """Voxel size in mm along I, J, K, from the affine the data is placed with (pixdim can disagree)."""
    return tuple(float(z) for z in nib.affines.voxel_sizes(header.get_best_affine())[:3])  # type: ignore[return-value]


def make_nifti(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """A NIfTI image in the given geometry; header text fields cleared (no identifying free text)."""
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    # the geometry is always ``affine``; from a source header only its codes carry over (an unset qform stays unset)
    qcode, scode = (int(header["qform_code"]), int(header["sform_code"])) if header is not None else (1, 1)
    if qcode == 0 and scode == 0:
        qcode = scode = 1
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    img.header.set_data_dtype(array.dtype)
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        img.header[field] = b""
    return img


def save_nifti(dest: str | Path, array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> Path:
    """Write a NIfTI file atomically (``.nii.gz`` compresses)."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        # nibabel decides compression from the suffix, so the temp name keeps it.
        tmp_named = tmp.with_name(tmp.name + (".nii.gz" if str(dest).endswith(".gz") else ".nii"))
        try:
            nib.save(make_nifti(array, affine, header), str(tmp_named))
            os.replace(tmp_named, tmp)
        finally:
            tmp_named.unlink(missing_ok=True)
    return dest


def nifti_to_bytes(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None, compress: bool = True) -> bytes:
    raw = make_nifti(array, affine, header).to_bytes()
    return gzip.compress(raw, compresslevel=1) if compress else raw


def read_bytes_limited(fh: io.BufferedIOBase, limit: int) -> bytes:
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise MedsegError(f"larger than the limit of {limit} bytes")
    return data
