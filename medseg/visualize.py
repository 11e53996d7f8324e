"""Pictures a person would rather look at than read: segmentation overlays.

:func:`overlay_png` draws one case from whole volumes; :func:`case_slices` keeps just the three
orthogonal slices of a case that :func:`slices_overlay_png` draws later (the evaluation report keeps
them for every case and draws the best, median and worst once all are scored).

Views assume the canonical RAS+ voxel order medseg writes (I → right, J → anterior, K → superior):
axial = a K slice, coronal = a J slice, sagittal = an I slice, each shown with anterior / superior up.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.io import write_bytes

# NETC red, SNFH green, ET yellow, RC blue (BraTS viewer colours)
LABEL_COLOURS = {1: (1.0, 0.1, 0.1), 2: (0.1, 0.9, 0.1), 3: (1.0, 0.9, 0.0), 4: (0.2, 0.4, 1.0)}


def overlay_png(image: np.ndarray, segmentation: np.ndarray, dest: str | Path, reference: np.ndarray | None = None, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the tumour's centre with the labels overlaid.

    ``image``, ``segmentation`` (and ``reference``, shown as a second row): I×J×K on one grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = np.argwhere(segmentation > 0) if (segmentation > 0).any() else np.argwhere(image != 0)
    centre = fg.mean(axis=0).astype(int) if len(fg) else np.array(image.shape) // 2
    rows = [("prediction", segmentation)] + ([("reference", reference)] if reference is not None else [])
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.2 * len(rows)), squeeze=False)
    lo, hi = np.percentile(image[image != 0], [1, 99]) if (image != 0).any() else (0, 1)
    for r, (name, seg) in enumerate(rows):
        for axis in range(3):
            sl = [slice(None)] * 3
            sl[axis] = int(centre[axis])
            img2d = np.rot90(image[tuple(sl)])
            seg2d = np.rot90(seg[tuple(sl)])
            rgba = np.zeros(seg2d.shape + (4,))
            for value, colour in LABEL_COLOURS.items():
                rgba[seg2d == value] = (*colour, 0.45)
            ax = axes[r][axis]
            ax.imshow(img2d, cmap="gray", vmin=lo, vmax=hi)
            ax.imshow(rgba)
            ax.set_axis_off()
            ax.set_title(f"{name} · {'IJK'[axis]}={centre[axis]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return write_bytes(dest, buf.getvalue())


#: View name → the axis the slice is taken across (RAS+ voxel order).
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _pack(a: np.ndarray) -> tuple[bytes, tuple[int, ...]]:
    return zlib.compress(np.ascontiguousarray(a, dtype=np.uint8).tobytes(), 1), a.shape


def _unpack(packed: tuple[bytes, tuple[int, ...]]) -> np.ndarray:
    data, shape = packed
    return np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(shape)


@dataclass(frozen=True)
class CaseSlices:
    """The axial, coronal and sagittal slices of one case, compressed (a few tens of kB per case).

    Attributes:
        centre: (i, j, k) voxel the three slices pass through.
        spacing: voxel size in mm, (I, J, K) order (for the aspect ratio).
        has_image: False when no image was given (the labels are drawn on black).
    """

    centre: tuple[int, int, int]
    spacing: tuple[float, float, float]
    has_image: bool
    _image: tuple[tuple[bytes, tuple[int, ...]], ...]
    _pred: tuple[tuple[bytes, tuple[int, ...]], ...]
    _ref: tuple[tuple[bytes, tuple[int, ...]], ...]

    def view(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 0-255, prediction labels, reference labels) of view ``index`` of :data:`VIEWS`,
        each already turned for display (rows = anterior/superior first)."""
        return _unpack(self._image[index]), _unpack(self._pred[index]), _unpack(self._ref[index])


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Per axis the index of the slice holding the most of ``mask`` (the middle when it is empty)."""
    if not mask.any():
        return tuple(int(n // 2) for n in mask.shape)  # type: ignore[return-value]
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        out.append(int(np.argmax(np.count_nonzero(mask, axis=other))))
    return tuple(out)  # type: ignore[return-value]


def _content_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box of ``mask`` grown by ``margin`` voxels (the whole array when it is empty)."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(np.any(mask, axis=other))
        if nz.size == 0:
            return (slice(None), slice(None), slice(None))
        out.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)  # type: ignore[return-value]


def case_slices(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], image: np.ndarray | None = None
) -> CaseSlices:
    """Keep the three slices of a case through the slices holding the most reference (else predicted)
    foreground, each cropped to the head (nonzero image) or, without an image, to the labels.

    Args:
        pred: predicted label map, shape (I, J, K).
        ref: reference label map, same shape.
        spacing: voxel size in mm, (I, J, K) order.
        image: the case's first image channel, same shape (windowed to its 1st-99th percentile of
            nonzero voxels), or None.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    centre = _centre(ref > 0) if (ref > 0).any() else _centre(pred > 0)
    if image is not None:
        image = np.asarray(image, dtype=np.float32)
        nonzero = image[image != 0]
        lo, hi = np.percentile(nonzero, [1, 99]) if nonzero.size else (0.0, 1.0)
        scaled = np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255
        content = (image != 0) | (pred > 0) | (ref > 0)
    else:
        content = (pred > 0) | (ref > 0)
    # crop every view to what there is to see (the head, or the labels), with a small margin
    box = _content_box(content, margin=3)
    imgs, preds, refs = [], [], []
    for _, axis in VIEWS:
        sl = list(box)
        sl[axis] = centre[axis]
        index = tuple(sl)
        preds.append(_pack(np.rot90(np.clip(pred[index], 0, 255))))
        refs.append(_pack(np.rot90(np.clip(ref[index], 0, 255))))
        img2d = np.rot90(scaled[index]) if image is not None else np.zeros(np.rot90(pred[index]).shape)
        imgs.append(_pack(np.rint(img2d)))
    sp = tuple(float(s) for s in spacing)
    return CaseSlices(centre, sp, image is not None, tuple(imgs), tuple(preds), tuple(refs))  # type: ignore[arg-type]


def _rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros(labels.shape + (4,))
    for value, colour in LABEL_COLOURS.items():
        rgba[labels == value] = (*colour, alpha)
    other = (labels > 0) & ~np.isin(labels, list(LABEL_COLOURS))
    rgba[other] = (1.0, 0.3, 1.0, alpha)  # labels without a colour of their own: magenta
    return rgba


def slices_overlay_png(slices: CaseSlices, title: str = "", label_names: dict[int, str] | None = None) -> bytes:
    """PNG bytes: two rows (reference, prediction) x three views (axial, coronal, sagittal).

    The labels are filled in their colours (:data:`LABEL_COLOURS`) over the image; the prediction row
    also outlines the reference foreground in white, so misses and extra voxels stand out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(9.6, 6.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    # aspect of a turned slice: rows run along the slice's second axis, columns along its first
    shown_axes = {2: (0, 1), 1: (0, 2), 0: (1, 2)}
    for col, (view, axis) in enumerate(VIEWS):
        img, pred, ref = slices.view(col)
        first, second = shown_axes[axis]
        aspect = slices.spacing[second] / slices.spacing[first]
        for row, (name, labels) in enumerate((("reference", ref), ("prediction", pred))):
            ax = axes[row][col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, aspect=aspect, interpolation="nearest")
            ax.imshow(_rgba(labels, 0.5), aspect=aspect, interpolation="nearest")
            if row == 1 and (ref > 0).any():
                ax.contour((ref > 0).astype(float), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            index = slices.centre[axis]
            ax.set_title(f"{name} · {view} ({'IJK'[axis]}={index})", fontsize=9)
    names = label_names or {}
    present = sorted({int(v) for c in range(3) for a in slices.view(c)[1:] for v in np.unique(a) if v > 0})
    handles = [Patch(color=LABEL_COLOURS.get(v, (1.0, 0.3, 1.0)), label=names.get(v, str(v))) for v in present]
    handles.append(Patch(facecolor="none", edgecolor="0.4", label="reference outline"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
