"""Pictures a person would rather look at than read: segmentation overlays and training curves.

:func:`overlay_png` draws one case from whole volumes; :func:`case_slices` keeps just the three
orthogonal slices of a case that :func:`slices_overlay_png` draws later (the evaluation report keeps
them for every case and draws the best, median and worst once all are scored). :func:`training_curves_png`
draws a training run's per-epoch history (the model package's ``training_curves.png``).

Views assume the canonical RAS+ voxel order medseg writes (I → right, J → anterior, K → superior):
axial = a K slice, coronal = a J slice, sagittal = an I slice, each shown with anterior / superior up.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
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


# --------------------------------------------------------------------------- training curves
#: History keys that are not validation scores (time, and the validation loss, which goes with the training loss).
_NOT_A_SCORE = ("val_seconds", "val_loss")
#: Loss keys of a history, drawn in the left panel.
LOSS_KEYS = ("train_loss", "val_loss")


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs counted from 1, values) of ``key`` over a history; absent or non-finite values left out."""
    pairs = [(int(e.get("epoch", i)) + 1, float(e[key])) for i, e in enumerate(history)
             if isinstance(e.get(key), (int, float)) and np.isfinite(float(e[key]))]
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.float64)


def validation_keys(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The validation scores a history holds (``val_*`` but its loss and time), in order of first appearance."""
    seen: dict[str, None] = {}
    for entry in history:
        for key in entry:
            if key.startswith("val_") and key not in _NOT_A_SCORE:
                seen.setdefault(key, None)
    return list(seen)


def training_curves_png(histories: Mapping[str, Sequence[Mapping[str, float]]], metric: str = "", best_epochs: Mapping[str, int] | None = None,
                        title: str = "") -> bytes:
    """PNG bytes: loss (left) and validation scores (right) per epoch, for one training run or several (folds).

    Args:
        histories: run label (``""`` for a single run, e.g. ``"fold 0"`` for folds) → its per-epoch history, each
            entry ``{"epoch": 0-based, "train_loss", "val_<score>"..., "epoch_seconds"?}`` as training records it.
            The x axis is the epoch counted from 1.
        metric: the validation score that picks the best epoch (drawn bold); several runs show only it.
        best_epochs: run label → its best epoch (0-based), marked with a dashed line (single run) or a dot.
        title: the figure's title; the total wall-clock time is added when the history records ``epoch_seconds``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure

    runs = {label: list(h) for label, h in histories.items() if h}
    single = len(runs) == 1
    fig = Figure(figsize=(10.0, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    colours = ["#2f5bd3", "#c0392b", "#2e8b57", "#d4a017", "#7d3c98", "#16a085", "#7f8c8d", "#e67e22"]
    has_val = False
    for r, (label, history) in enumerate(runs.items()):
        prefix = f"{label} " if label else ""
        for k, key in enumerate(LOSS_KEYS):
            x, y = _series(history, key)
            if x.size:
                ax_loss.plot(x, y, color=colours[r % len(colours)] if not single else colours[k], linestyle="-" if key == "train_loss" else "--",
                             marker="." if x.size < 30 else None, label=f"{prefix}{key.replace('_', ' ')}")
        keys = validation_keys(history)
        ordered = ([metric] if metric in keys else []) + [k for k in keys if k != metric]
        for k, key in enumerate(ordered if single else ordered[:1]):  # folds: one line each, or the plot is unreadable
            x, y = _series(history, key)
            if not x.size:
                continue
            has_val = True
            bold = key == metric
            ax_val.plot(x, y, color=colours[(r if not single else k) % len(colours)], linewidth=2.2 if bold else 1.1, marker="." if x.size < 30 else None,
                        label=f"{prefix}{key[len('val_'):].replace('_', ' ')}")
            best = (best_epochs or {}).get(label)
            if bold and best is not None and best >= 0:
                if single:
                    ax_val.axvline(best + 1, color="0.5", linestyle=":", linewidth=1.0, label=f"best epoch {best + 1}")
                else:
                    hit = y[x == best + 1]
                    if hit.size:
                        ax_val.plot([best + 1], [hit[0]], "o", color=colours[r % len(colours)], markersize=6)
    ax_loss.set_title("Loss per epoch", fontsize=11)
    ax_val.set_title("Validation per epoch" + (f" ({metric[len('val_'):].replace('_', ' ')} bold)" if metric and has_val and single else ""), fontsize=11)
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    if not has_val:
        ax_val.text(0.5, 0.5, "no validation scores recorded", ha="center", va="center", transform=ax_val.transAxes, color="0.4")
    seconds = [float(e["epoch_seconds"]) for h in runs.values() for e in h if isinstance(e.get("epoch_seconds"), (int, float))]
    heading = title + (f" · {sum(seconds) / 60:.1f} min of training" if seconds else "")
    if heading:
        fig.suptitle(heading.strip(" ·"), fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
