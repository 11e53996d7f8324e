"""One 2D image (PNG or TIFF bytes) as the input of a 2D slice-set model, and its mask in the same format.

A slice-set model (``dataset.json`` ``slice_axis``, e.g. the Kaggle LGG slices) is trained on stacks of 2D slices;
its endpoint also takes ONE slice as a picture, the BYTES input ``image``:

- **Colour channels = the model's channels**, in order: an RGB picture feeds a 3-channel model (Kaggle LGG:
  red = pre-contrast, green = FLAIR, blue = post-contrast), a grey picture (8 or 16 bit) a 1-channel model. A
  palette picture counts as RGB; an alpha channel is dropped when fully opaque, refused otherwise.
- **Orientation** as the Kaggle LGG ingest adapter stacks its TIFF slices (:mod:`medseg.ingest.adapters.lgg`):
  ``volume[i, j, k] = slice_k[row j, column i]``. In general the picture's columns run along the lower of the two
  voxel axes other than ``slice_axis`` and its rows along the higher one; the slice axis has thickness 1. So a
  slice sent as a picture gets the mask of that slice of the stack (the network is applied slice by slice; only
  the per-case intensity normalisation sees one slice instead of the stack).
- **Geometry**: a picture carries no voxel size and the task's dataset none for it either; the slice is put on a
  1 mm grid with the identity affine (what the LGG adapter assumes for its TIFFs), so ``volumes_ml`` of a picture
  are areas in mm² × 1 mm.
- **The answer** is a one-channel mask of the same width and height in the same format (PNG in → PNG out, TIFF in
  → TIFF out): 0/255 when the task has one foreground label, else the label values (8 bit, 16 bit above 255).

Refused with a message naming the input (the model answers 400): bytes that are neither PNG nor TIFF, an image
that cannot be decoded (truncated, corrupt), a multi-page TIFF (a 3D stack: send the stack as NIfTI), a colour
mode that is not grey/RGB, a channel count other than the model's, and more pixels than ``--max-voxels``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from medseg.errors import MedsegError

IMAGE_INPUT = "image"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, little and big endian
#: Voxel size (mm) and affine given to a picture: it has no geometry of its own (as the LGG adapter assumes).
IMAGE_SPACING_MM = (1.0, 1.0, 1.0)
#: format → (Pillow's name, media type, file name extension)
FORMATS = {"png": ("PNG", "image/png", "png"), "tiff": ("TIFF", "image/tiff", "tif")}
_GREY_MODES = {"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class Image2D:
    """What the answer needs to know about the picture a case came from."""

    format: str  # "png" | "tiff"
    width: int
    height: int
    slice_axis: int

    @property
    def media_type(self) -> str:
        return FORMATS[self.format][1]

    @property
    def extension(self) -> str:
        """The file name extension of a mask in this format, without the dot (``png``, ``tif``)."""
        return FORMATS[self.format][2]


def image_format(raw: bytes) -> str | None:
    """``png``, ``tiff`` or None, from the first bytes."""
    if raw[:8] == PNG_MAGIC:
        return "png"
    if raw[:4] in TIFF_MAGICS:
        return "tiff"
    return None


def volume_from_pixels(pixels: np.ndarray, slice_axis: int) -> np.ndarray:
    """Pixels rows × columns × C → C×I×J×K with the slice axis of thickness 1 (see the module docstring)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    planes = np.asarray(pixels).transpose(2, 1, 0)  # C × columns × rows
    return np.ascontiguousarray(np.expand_dims(planes, axis=1 + int(slice_axis)))


def pixels_from_volume(volume: np.ndarray, slice_axis: int) -> np.ndarray:
    """The inverse of :func:`volume_from_pixels` for one I×J×K map whose slice axis has thickness 1: rows × columns."""
    if volume.ndim != 3 or volume.shape[slice_axis] != 1:
        raise ValueError(f"expected a volume of thickness 1 along axis {slice_axis}, got shape {volume.shape}")
    return np.ascontiguousarray(np.squeeze(volume, axis=slice_axis).T)


def decode_image(raw: bytes, channels: list[str], slice_axis: int, max_pixels: int | None, where: str) -> tuple[np.ndarray, np.ndarray, list[float], Image2D]:
    """``(images C×I×J×K float32, affine, spacing, Image2D)`` of one PNG/TIFF picture for a model of ``channels``.

    Raises:
        MedsegError: naming ``where`` (the input) for every problem listed in the module docstring.
    """
    from PIL import Image, UnidentifiedImageError

    fmt = image_format(raw)
    if fmt is None:
        raise MedsegError("not a PNG or TIFF image (send one 2D slice as PNG or TIFF bytes, or the stack as NIfTI, one input per channel)", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit is checked below
            image = Image.open(io.BytesIO(raw), formats=[FORMATS[fmt][0]])
    except Image.DecompressionBombError as exc:
        raise MedsegError(f"the {fmt.upper()} image is far too large ({exc})", where) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MedsegError(f"cannot read the {fmt.upper()} image ({type(exc).__name__}: {str(exc)[:120]})", where) from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise MedsegError(f"the {fmt.upper()} image has size {width}×{height}", where)
        pixels_count = width * height
        if max_pixels is not None and pixels_count > max_pixels:
            raise MedsegError(f"{width}×{height} = {pixels_count} pixels, more than the limit of {max_pixels} voxels per volume (--max-voxels)", where)
        frames = int(getattr(image, "n_frames", 1) or 1)
        if frames > 1:
            raise MedsegError(f"a {fmt.upper()} of {frames} pages (a 3D stack): send one 2D slice per request, or the stack as NIfTI "
                              f"(one input per channel: {', '.join(channels)})", where)
        try:
            pixels = _pixels(image, where)
        except MedsegError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt image data
            raise MedsegError(f"cannot decode the {fmt.upper()} image ({type(exc).__name__}: {str(exc)[:120]})", where) from None
    count = 1 if pixels.ndim == 2 else pixels.shape[2]
    if count != len(channels):
        kind = "grey" if count == 1 else ("RGB" if count == 3 else f"{count} colour channels")
        raise MedsegError(f"a {kind} image has {count} colour channel(s); the model takes {len(channels)} ({', '.join(channels)}), "
                          "one per colour channel in this order", where)
    images = volume_from_pixels(pixels.astype(np.float32, copy=False), slice_axis)
    if not np.isfinite(images).all():
        raise MedsegError("the image holds NaN/Inf values", where)
    return images, np.eye(4), list(IMAGE_SPACING_MM), Image2D(fmt, int(width), int(height), int(slice_axis))


def _pixels(image, where: str) -> np.ndarray:
    """Rows × columns (grey) or rows × columns × C (colour) of an opened Pillow image; opaque alpha dropped."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("La", "RGBa"):
        image = image.convert(mode.upper())
    mode = image.mode
    if mode not in _GREY_MODES | {"LA", "RGB", "RGBA"}:
        raise MedsegError(f"colour mode {mode} is not supported: send a grey or RGB image", where)
    array = np.asarray(image)
    if mode in ("LA", "RGBA"):
        alpha = array[..., -1]
        if alpha.min() < alpha.max() or int(alpha.min()) != np.iinfo(array.dtype).max:
            raise MedsegError(f"the image has transparency ({mode}): send it without an alpha channel", where)
        array = array[..., :-1]
        if array.shape[-1] == 1:
            array = array[..., 0]
    return np.asarray(array)


def encode_mask(segmentation: np.ndarray, info: Image2D, foreground: list[int]) -> bytes:
    """The mask of a picture in its own format: 0/255 when there is one foreground label, else the label values."""
    from PIL import Image

    labels = pixels_from_volume(np.asarray(segmentation), info.slice_axis)
    if labels.shape != (info.height, info.width):
        raise ValueError(f"mask {labels.shape} for an image of {info.height} rows × {info.width} columns")
    if len(foreground) == 1:
        mask = np.where(labels > 0, 255, 0).astype(np.uint8)
    elif labels.max(initial=0) <= 255:
        mask = labels.astype(np.uint8)
    else:
        mask = labels.astype(np.uint16)
    buf = io.BytesIO()
    picture = Image.fromarray(mask)
    if info.format == "png":
        picture.save(buf, format="PNG", compress_level=6)
    else:
        picture.save(buf, format="TIFF")
    return buf.getvalue()


def decode_mask(raw: bytes) -> np.ndarray:
    """A mask picture (PNG/TIFF bytes) as rows × columns integers (for clients and tests)."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        return np.asarray(image).astype(np.int64)


__all__ = ["FORMATS", "IMAGE_INPUT", "IMAGE_SPACING_MM", "Image2D", "decode_image", "decode_mask", "encode_mask", "image_format",
           "pixels_from_volume", "volume_from_pixels"]
