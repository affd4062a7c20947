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


def mask_image(mask: np.ndarray) -> np.ndarray:
    """Bool mask -> white-on-black uint8 H x W x 3 picture."""
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
