"""Pictures of a detection: heat map, overlay, mask outline. Shared by the app, CLI and notebooks.

Heat maps use a fixed scale relative to the calibrated threshold (0 -> dark, threshold ->
middle of the colour map, 2 x threshold and above -> brightest), never the range of the
current image or test set, so colours mean the same thing across images.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from scipy import ndimage

COLORMAP = "inferno"


def heatmap(anomaly_map: np.ndarray, threshold: float, colormap: str = COLORMAP) -> np.ndarray:
    """H x W float map -> H x W x 3 uint8 colour image on the threshold-relative scale."""
    scale = 2.0 * threshold if threshold > 0 else float(np.max(anomaly_map)) or 1.0
    rgba = colormaps[colormap](np.clip(anomaly_map / scale, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a bool mask."""
    if not mask.any():
        return mask.copy()
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~eroded


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.5,
            outline_color=(0, 255, 0)) -> np.ndarray:
    """Heat map blended over the image, with the predicted defect region outlined."""
    heat = heatmap(anomaly_map, threshold).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    out = out.round().clip(0, 255).astype(np.uint8)
    edge = mask_outline(anomaly_map > threshold, width=max(1, image.shape[0] // 128))
    out[edge] = outline_color
    return out


FRAME_COLOR = (120, 120, 120)  # mid grey: visible on white and on black


def mask_image(mask: np.ndarray, frame: int = 0) -> np.ndarray:
    """Bool mask -> white-on-black uint8 H x W x 3 picture; `frame` > 0 draws a grey border that
    many pixels wide, so a mask that covers the whole image still shows on a white page."""
    out = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
    if frame > 0:
        out[:frame], out[-frame:], out[:, :frame], out[:, -frame:] = FRAME_COLOR, FRAME_COLOR, FRAME_COLOR, FRAME_COLOR
    return out


HIT, MISSED, FALSE_ALARM = (0, 200, 0), (230, 0, 0), (255, 200, 0)


def compare_masks(predicted: np.ndarray, truth: np.ndarray, frame: int = 0) -> np.ndarray:
    """Predicted vs ground-truth masks as a picture: green where both agree on a defect, red
    where a defect was missed, yellow where a normal pixel was flagged, black elsewhere."""
    if predicted.shape != truth.shape:
        raise ValueError(f"the masks differ in size: {predicted.shape} and {truth.shape}.")
    out = mask_image(np.zeros_like(predicted, dtype=bool), frame)
    out[predicted & truth], out[truth & ~predicted], out[predicted & ~truth] = HIT, MISSED, FALSE_ALARM
    return out


def image_grid(rows, titles=None, row_labels=None, size: float = 2.2, suptitle: str | None = None,
               grey_range: tuple[float, float] | None = None):
    """A matplotlib Figure showing images in rows (for notebooks and reports).

    rows: a list of rows, each a list of images: uint8 H x W x 3, or H x W arrays (masks, or
    other arrays shown in grey on their own range; turn anomaly maps into pictures with
    `heatmap` first, so that their colours keep the threshold-relative scale). titles: the
    same shape as rows (or one list, for the first row); row_labels: one per row.
    grey_range: (low, high) for every H x W array, so they share one scale."""
    import matplotlib.pyplot as plt

    rows = [list(r) for r in rows]
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image.")
    if titles is not None and titles and not isinstance(titles[0], (list, tuple)):
        titles = [list(titles)]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            image = np.asarray(row[j])
            grey = image.ndim == 2
            low, high = grey_range if grey and grey_range is not None else (None, None)
            ax.imshow(image, cmap="gray" if grey else None, vmin=low, vmax=high, interpolation="nearest")
            if titles is not None and i < len(titles) and j < len(titles[i]):
                ax.set_title(str(titles[i][j]), fontsize=9)
            if row_labels is not None and j == 0 and i < len(row_labels):
                ax.set_ylabel(str(row_labels[i]), fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
