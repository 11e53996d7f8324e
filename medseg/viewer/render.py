"""What the viewer shows: the case reoriented for display, windowed to 8 bits, and axial slices as PNG.

:func:`prepare_case` turns the uploaded channel files and the returned segmentation into a
:class:`CaseView` (uint8 per channel, a label map, both in RAS+ voxel order so every case is drawn the
same way whatever its stored orientation); :func:`slice_png` draws one axial slice of one channel with
the labels blended over it, at the voxel aspect ratio. Display convention (as :mod:`medseg.visualize`):
anterior up, the patient's right on the right of the picture (neurological).

A 2D picture sent to a slice-set model (PNG/TIFF, :func:`prepare_picture`) is drawn as the picture itself: rows
top to bottom, columns left to right (``CaseView.image_axes``), its mask over it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from medseg.errors import MedsegError
from medseg.io import load_nifti_bytes
from medseg.visualize import LABEL_COLOURS

#: Colour of a label value with no entry in LABEL_COLOURS (models with more labels than BraTS 2023).
OTHER_COLOUR = (0.85, 0.3, 0.95)
#: Longest side of a rendered slice, in pixels (before the ``size`` option).
DEFAULT_SIZE = 512


def label_rgb(value: int) -> tuple[int, int, int]:
    """The 0-255 RGB colour label ``value`` is drawn in."""
    colour = LABEL_COLOURS.get(int(value), OTHER_COLOUR)
    return tuple(int(round(c * 255)) for c in colour)  # type: ignore[return-value]


@dataclass
class CaseView:
    """One case ready to draw. Arrays are I×J×K in RAS+ voxel order."""

    channels: dict[str, np.ndarray]  # channel name → uint8 windowed intensities
    segmentation: np.ndarray  # uint8 labels
    spacing: tuple[float, float, float]  # mm along the RAS+ voxel axes
    original_shape: tuple[int, int, int]  # as stored (the download keeps this geometry)
    orientation: str  # axis codes of the stored files, e.g. "RAS" or "LPS"; "image" for a 2D picture
    image_axes: bool = False  # a picture: I = columns, J = rows, drawn as the picture (no anatomical turn)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.segmentation.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.channels.values()) + self.segmentation.nbytes)

    def label_volumes_ml(self) -> dict[int, float]:
        """Label value → volume in ml (voxel count × voxel volume), labels > 0 present in the segmentation."""
        values, counts = np.unique(self.segmentation, return_counts=True)
        voxel_ml = float(np.prod(self.spacing)) / 1000.0
        return {int(v): float(c) * voxel_ml for v, c in zip(values, counts) if v > 0}

    def best_slice(self) -> int:
        """The axial slice with the most segmented voxels (the middle one when nothing is segmented)."""
        per_slice = np.count_nonzero(self.segmentation, axis=(0, 1))
        return int(np.argmax(per_slice)) if per_slice.any() else self.n_slices // 2

    def best_channel(self) -> str | None:
        """The channel whose intensities inside the segmentation differ most from those outside it (in units of the
        outside spread): the one that shows what was segmented best; the first channel when nothing is segmented."""
        names = list(self.channels)
        inside = self.segmentation > 0
        if not names or not inside.any() or inside.all():
            return names[0] if names else None

        def contrast(array: np.ndarray) -> float:
            outside = array[~inside & (array > 0)]
            outside = outside if outside.size else array[~inside]
            return abs(float(array[inside].mean()) - float(outside.mean())) / (float(outside.std()) + 1.0)

        return max(names, key=lambda n: contrast(self.channels[n]))


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """``array`` reoriented to RAS+ voxel order, its spacing in that order, and the stored axis codes."""
    import nibabel.orientations as orient

    ornt = orient.io_orientation(affine)
    codes = "".join(orient.ornt2axcodes(ornt))
    to_ras = orient.ornt_transform(ornt, orient.axcodes2ornt(("R", "A", "S")))
    out = np.ascontiguousarray(orient.apply_orientation(array, to_ras))
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))  # mm along the stored axes
    # to_ras[i, 0] is the RAS axis stored axis i becomes: RAS axis j has the spacing of the stored axis sent to j
    spacing = tuple(float(zooms[i]) for i in np.argsort(to_ras[:, 0]))
    return out, spacing, codes  # type: ignore[return-value]


def window_uint8(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Intensities mapped to 0-255 between two percentiles of the nonzero voxels (all voxels if none is nonzero)."""
    values = image[image != 0]
    if values.size == 0:
        values = image.ravel()
    lo, hi = (np.percentile(values, [low_pct, high_pct]) if values.size else (0.0, 1.0))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    scaled = (image.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def prepare_case(channel_bytes: dict[str, bytes], segmentation_bytes: bytes) -> CaseView:
    """Decode the channel files (``.nii``/``.nii.gz`` bytes, by channel name) and the segmentation.

    Raises :class:`MedsegError` naming the channel when a file cannot be read or does not match the
    segmentation's grid.
    """
    seg, seg_affine, _ = load_nifti_bytes(segmentation_bytes, name="segmentation", dtype=np.uint8)
    if seg.ndim != 3:
        raise MedsegError(f"the model server returned a segmentation of shape {seg.shape}, expected 3D")
    seg_ras, spacing, codes = _to_ras(seg, seg_affine)
    channels: dict[str, np.ndarray] = {}
    for name, raw in channel_bytes.items():
        image, affine, _ = load_nifti_bytes(raw, name=name, dtype=np.float32)
        image = np.squeeze(image)
        if image.shape != seg.shape:
            raise MedsegError(f"shape {image.shape} differs from the segmentation's {seg.shape}", name)
        if not np.allclose(affine, seg_affine, atol=1e-3):
            raise MedsegError("its affine differs from the segmentation's", name)
        channels[name] = window_uint8(_to_ras(image, affine)[0])
    return CaseView(channels=channels, segmentation=seg_ras, spacing=spacing, original_shape=tuple(int(n) for n in seg.shape),  # type: ignore[arg-type]
                    orientation=codes)


def prepare_picture(picture: bytes, mask: bytes, channels: list[str], foreground: list[int]) -> CaseView:
    """A 2D picture (PNG/TIFF bytes, colour channels = ``channels``) and the mask the model server returned for it.
    A 0/255 mask of a one-foreground-label task is drawn in that label's colour.

    Raises :class:`MedsegError` when either cannot be read or their sizes differ."""
    from medseg.serving.image2d import IMAGE_SPACING_MM, decode_image, decode_mask, volume_from_pixels

    images, _, _, info = decode_image(picture, channels, 2, None, "the picture")
    try:
        labels = decode_mask(mask)
    except Exception as exc:  # Pillow's errors for bytes that are not a picture
        raise MedsegError(f"the model server's mask cannot be read ({type(exc).__name__}: {exc})", "segmentation") from None
    if labels.shape != (info.height, info.width):
        raise MedsegError(f"the mask is {labels.shape[1]}×{labels.shape[0]} pixels, the picture {info.width}×{info.height}", "segmentation")
    if len(foreground) == 1:
        labels = np.where(labels > 0, foreground[0], 0)
    seg = volume_from_pixels(np.clip(labels, 0, 255).astype(np.uint8), 2)[0]
    views = {name: window_uint8(images[c]) for c, name in enumerate(channels)}
    return CaseView(channels=views, segmentation=seg, spacing=tuple(IMAGE_SPACING_MM), original_shape=tuple(int(n) for n in seg.shape),  # type: ignore[arg-type]
                    orientation="image", image_axes=True)


def display_size(view: CaseView, size: int = DEFAULT_SIZE) -> tuple[int, int]:
    """(width, height) in pixels of an axial slice drawn at the voxel aspect ratio, longest side ``size``."""
    width_mm = view.shape[0] * view.spacing[0]
    height_mm = view.shape[1] * view.spacing[1]
    scale = size / max(width_mm, height_mm, 1e-6)
    return max(int(round(width_mm * scale)), 1), max(int(round(height_mm * scale)), 1)


def axial_slice(view: CaseView, k: int, channel: str) -> tuple[np.ndarray, np.ndarray]:
    """(intensities, labels) of axial slice ``k`` turned for display: rows anterior → posterior, columns left → right."""
    if not 0 <= k < view.n_slices:
        raise MedsegError(f"slice {k} is outside 0..{view.n_slices - 1}")
    if channel not in view.channels:
        raise MedsegError(f"unknown channel {channel!r} (have: {', '.join(view.channels)})")
    if view.image_axes:  # a picture: rows = J, columns = I, as it was sent
        return view.channels[channel][:, :, k].T, view.segmentation[:, :, k].T
    return np.rot90(view.channels[channel][:, :, k]), np.rot90(view.segmentation[:, :, k])


def slice_rgb(view: CaseView, k: int, channel: str, alpha: float = 0.45, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Axial slice ``k`` of ``channel`` with the labels blended in (``alpha`` 0-1), H×W×3 uint8 at display size."""
    from PIL import Image

    gray, labels = axial_slice(view, k, channel)
    width, height = display_size(view, size)
    gray_big = np.asarray(Image.fromarray(np.ascontiguousarray(gray)).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    labels_big = np.asarray(Image.fromarray(np.ascontiguousarray(labels)).resize((width, height), Image.Resampling.NEAREST))
    rgb = np.repeat(gray_big[:, :, None], 3, axis=2)
    alpha = float(np.clip(alpha, 0.0, 1.0))
    for value in np.unique(labels_big):
        if value == 0:
            continue
        mask = labels_big == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(label_rgb(int(value)), dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def slice_png(view: CaseView, k: int, channel: str, alpha: float = 0.45, size: int = DEFAULT_SIZE) -> bytes:
    """:func:`slice_rgb` encoded as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(slice_rgb(view, k, channel, alpha, size)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
