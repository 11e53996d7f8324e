"""Pictures a person would rather look at than read: segmentation overlays."""

from __future__ import annotations

import io
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
