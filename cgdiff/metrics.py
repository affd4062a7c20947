"""Evaluation metrics, with anomalib's definitions so that numbers compare.

- image AUROC: ROC AUC of one score per image (the detector uses the maximum of its map);
- pixel AUROC: ROC AUC over all pixels of all test images pooled together;
- AUPRO: area under the per-region-overlap curve for global FPR in [0, 0.3], divided by 0.3;
- F1-max: the best F1 score over all thresholds (image level and pixel level).

Masks and maps must have the same resolution: resize the maps (or the masks, with nearest
neighbour) before calling these functions. The reference tables (MVTec AD, DTD-Synthetic)
are computed at 256 x 256.

AUPRO, precisely. The ground-truth mask of every image is split into connected components
(8-connectivity, as anomalib's OpenCV labelling and the MVTec AD evaluation script do);
each component of each image is one region, and regions never merge across images. For a
threshold t:

    FPR(t) = (# normal pixels of the whole set with score >= t) / (# normal pixels of the set)
    PRO(t) = mean over all regions R of (# pixels of R with score >= t) / |R|

The curve (FPR(t), PRO(t)) over every distinct score t, starting at (0, 0), is integrated
with the trapezoidal rule from FPR 0 up to `fpr_limit` (linearly interpolated at the limit)
and divided by `fpr_limit`. This is the exact curve of the MVTec AD evaluation script;
anomalib's `AUPRO` computes the same curve, resampled per region. Every image contributes
with its own pixels only, so the value is the same whatever order or batches the maps came in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "aupro", "pro_curve", "f1_max", "f1_max_threshold", "evaluate"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- validation


def _as_labels(labels: Any, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.ravel()
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be 0/1 or boolean; got dtype {arr.dtype}.")
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain NaN or infinite values.")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise ValueError(
            f"{what} must be 0 (normal) or 1 (anomalous); found {np.unique(arr[bad])[:5].tolist()}."
        )
    return arr.astype(bool).ravel()


def _as_scores(scores: Any, what: str) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} must be numbers; got dtype {arr.dtype}.")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(arr.size - finite.sum()) - n_nan
        raise ValueError(
            f"{what} contain {n_nan} NaN and {n_inf} infinite values out of {arr.size}; "
            "a metric cannot rank them."
        )
    return arr


def _stack(arrays: Any) -> np.ndarray:
    """N x H x W from an array, one H x W map, or a list of H x W / B x H x W arrays."""
    if isinstance(arrays, (list, tuple)):
        if not arrays:
            return np.zeros((0, 0, 0))
        parts = [np.asarray(a) for a in arrays]
        parts = [p[None] if p.ndim == 2 else p for p in parts]
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1 or any(p.ndim != 3 for p in parts):
            raise ValueError(
                "all masks / maps must be H x W (or B x H x W) with one common size; got shapes "
                f"{sorted({p.shape for p in parts})}."
            )
        return np.concatenate(parts, axis=0)
    arr = np.asarray(arrays)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]  # N x 1 x H x W
    return arr


def _masks_and_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _stack(masks)
    a = _stack(maps)
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(
            f"masks and maps must be N x H x W; got shapes {m.shape} and {a.shape}."
        )
    if m.shape != a.shape:
        raise ValueError(
            f"masks {m.shape} and maps {a.shape} differ in shape: resize the maps to the mask "
            "resolution (or the masks, nearest neighbour) first."
        )
    if m.size == 0:
        raise ValueError("no pixels: masks and maps are empty.")
    mask = _as_labels(m, "masks").reshape(m.shape)
    amap = _as_scores(a, "anomaly maps")
    return mask, amap


def _need_both(y: np.ndarray, what: str, unit: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        present = "anomalous" if n_pos else "normal"
        raise ValueError(
            f"{what} needs both normal and anomalous {unit}; all {y.size} {unit} are {present}."
        )


# --------------------------------------------------------------------------- metrics


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC AUC of image scores against image labels (1 = anomalous)."""
    y = _as_labels(labels, "image labels")
    s = _as_scores(scores, "image scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} image labels but {s.size} image scores.")
    _need_both(y, "image AUROC", "images")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC AUC over all pixels of all images pooled (anomalib's pixel AUROC)."""
    mask, amap = _masks_and_maps(masks, maps)
    y = mask.ravel()
    _need_both(y, "pixel AUROC", "pixels")
    return float(roc_auc_score(y, amap.ravel()))


def f1_max(labels: Any, scores: Any) -> float:
    """Best F1 over all thresholds (anomalib's F1Max); labels and scores of any equal shape."""
    return float(_f1_curve(labels, scores)[0].max())


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """(F1-max, its threshold): the best F1 over all thresholds, as anomalib's F1Max and
    F1AdaptiveThreshold compute it, and a threshold that gives it under the rule
    "anomalous when score > threshold": halfway between the lowest score flagged at the
    best cut and the highest score below it (0.1 % under the lowest score when none is below).
    Where several cuts tie, the highest (fewest images flagged).

    labels: 0 normal / 1 anomalous; scores: any real values, same number as labels.
    Raises ValueError when the shapes differ or only one class is present."""
    f1, cuts, s = _f1_curve(labels, scores)
    f1 = f1[:-1]  # the last point (recall 0) has no threshold
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    cut = float(cuts[best])  # flagged: score >= cut
    below = s[s < cut]
    threshold = (cut + float(below.max())) / 2 if below.size else cut - 1e-3 * max(abs(cut), 1e-9)
    return float(f1[best]), threshold


def _f1_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F1 per cut with a last point for recall 0, the cuts ascending, the scores flat)."""
    y = _as_labels(labels, "labels")
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores.")
    _need_both(y, "F1-max", "samples")
    precision, recall, cuts = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return f1, cuts, s


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve: (global FPR, mean per-region overlap) at every distinct score.

    Returns two arrays starting at (0, 0) and ending at (1, 1), FPR non-decreasing.
    """
    mask, amap = _masks_and_maps(masks, maps)
    n = mask.shape[0]
    n_normal = int(n * mask[0].size - mask.sum())
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels (for the FPR); every pixel is anomalous.")

    # Per-pixel contributions: a normal pixel adds 1 to the false-positive count once its
    # score is reached, a pixel of region R adds 1 / (|R| * number of regions) to the PRO.
    pro_weight = np.zeros(mask.shape, dtype=np.float64)
    n_regions = 0
    for i in range(n):
        if not mask[i].any():
            continue
        comp, k = ndimage.label(mask[i], structure=_EIGHT_CONNECTED)
        sizes = np.bincount(comp.ravel(), minlength=k + 1).astype(np.float64)
        inv = np.zeros(k + 1)
        inv[1:] = 1.0 / sizes[1:]
        pro_weight[i] = inv[comp]
        n_regions += k
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous pixel; every mask is empty.")

    scores = amap.ravel()
    order = np.argsort(scores, kind="stable")[::-1]  # descending
    s_sorted = scores[order]
    fp = np.cumsum(~mask.ravel()[order], dtype=np.int64)
    pro = np.cumsum(pro_weight.ravel()[order]) / n_regions
    # One curve point per distinct score: the last position of each run of equal scores.
    last = np.empty(s_sorted.size, dtype=bool)
    last[:-1] = s_sorted[1:] != s_sorted[:-1]
    last[-1] = True
    fpr = np.concatenate([[0.0], fp[last] / n_normal])
    pro = np.concatenate([[0.0], np.minimum(pro[last], 1.0)])
    pro[-1] = 1.0  # every region is fully covered at the lowest score (guards float round-off)
    return fpr, pro


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (anomalib's AUPRO).

    masks: bool N x H x W (one H x W mask is accepted too, and lists of either); maps: float,
    same shape. See the module docstring for the exact definition.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}.")
    fpr, pro = pro_curve(masks, maps)
    # Points with FPR <= limit, plus the curve linearly interpolated at the limit.
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / fpr_limit


def evaluate(
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """All metrics of the benchmark tables, as fractions in [0, 1].

    labels / scores: one per image. masks / maps: N x H x W, in the same image order. The
    pixel metrics (pixel_auroc, aupro, pixel_f1_max) are None when no masks are given.
    Raises ValueError when an image labelled anomalous has an empty mask (its pixels would
    silently count as normal: leave such images out of masks / maps, or give no masks) or an
    image labelled normal has defect pixels.
    """
    y = _as_labels(labels, "image labels")
    s = _as_scores(scores, "image scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} image labels but {s.size} image scores.")
    out: dict[str, float | None] = {
        "image_auroc": image_auroc(y, s),
        "pixel_auroc": None,
        "aupro": None,
        "image_f1_max": f1_max(y, s),
        "pixel_f1_max": None,
    }
    if masks is None and maps is None:
        return out
    if masks is None or maps is None:
        raise ValueError("give both masks and maps for the pixel metrics, or neither.")
    mask, amap = _masks_and_maps(masks, maps)
    if mask.shape[0] != y.size:
        raise ValueError(f"{y.size} image labels but {mask.shape[0]} masks / maps.")
    has_defect = mask.reshape(mask.shape[0], -1).any(axis=1)
    wrong = np.flatnonzero(has_defect & ~y)
    if wrong.size:
        raise ValueError(
            f"images {wrong[:10].tolist()} are labelled normal but their masks have defect "
            "pixels: labels and masks are out of order or mismatched."
        )
    empty = np.flatnonzero(~has_defect & y)
    if empty.size:
        raise ValueError(
            f"images {empty[:10].tolist()}{' ...' if empty.size > 10 else ''} are labelled anomalous but "
            "their masks are empty: their pixels would count as normal. Fix the masks, leave these images "
            "out of masks and maps, or give no masks for image metrics only."
        )
    out["pixel_auroc"] = pixel_auroc(mask, amap)
    out["aupro"] = aupro(mask, amap, fpr_limit)
    out["pixel_f1_max"] = f1_max(mask, amap)
    return out


NOTHING_REMOVED = "no defect pixel where image and clean original differ: nothing to measure removal on."


def _removal_arrays(images: Any, reconstructions: Any, cleans: Any, masks: Any) -> tuple[np.ndarray, ...]:
    """N x C x H x W float64 images, reconstructions and cleans, N x H x W bool masks; checked."""
    x, r, c = (np.asarray(a, dtype=np.float64) for a in (images, reconstructions, cleans))
    m = np.asarray(masks) != 0
    if not (x.shape == r.shape == c.shape):
        raise ValueError(f"images {x.shape}, reconstructions {r.shape} and cleans {c.shape} must have one shape.")
    if x.ndim == 3:
        x, r, c = x[:, None], r[:, None], c[:, None]
    if x.ndim != 4 or m.shape != (x.shape[0],) + x.shape[2:]:
        raise ValueError(f"masks {m.shape} must be N x H x W for images {x.shape}.")
    return x, r, c, m


def removal(images: Any, reconstructions: Any, cleans: Any, masks: Any) -> dict[str, Any]:
    """How much of each defect the reconstruction removes, and how faithful it stays elsewhere.

    images, reconstructions, cleans: N x C x H x W (or N x H x W) arrays on one scale (any: the
    measure is a ratio, fidelity is in that scale); cleans are the images before their defects
    (for a normal image, the image itself). masks: N x H x W, non-zero = defect pixel.

    Per image with defect pixels (`removal_per_image`, NaN for an image without any):
        removal  = 1 - mean_D |rec - clean| / mean_D |input - clean|      (D: its defect pixels)
    1 means the defect is gone (the reconstruction equals the clean image there), 0 that the
    reconstruction kept it as it was, below 0 that it moved further from the clean image.
    `removal` pools the defect pixels of all images (the sums over D of every image, so large
    defects weigh more); `removal_mean` averages the per-image values.
    fidelity = mean over every non-defect pixel of |rec - input| (0: the normal texture is
    reproduced exactly), pooled, and per image in `fidelity_per_image`.
    Raises ValueError when shapes differ or no image has a defect pixel where input and clean
    differ (nothing to remove)."""
    x, r, c, m = _removal_arrays(images, reconstructions, cleans, masks)
    kept = np.abs(r - c).mean(1)  # N x H x W: what is left of the defect (and of normal texture)
    made = np.abs(x - c).mean(1)  # the defect itself
    moved = np.abs(r - x).mean(1)
    per_removal, per_fidelity = [], []
    for i in range(x.shape[0]):
        d = m[i]
        per_removal.append(1 - kept[i][d].mean() / made[i][d].mean() if d.any() and made[i][d].mean() > 0 else np.nan)
        per_fidelity.append(moved[i][~d].mean() if (~d).any() else np.nan)
    total_made = made[m].sum()
    if not m.any() or total_made <= 0:
        raise ValueError(NOTHING_REMOVED)
    return {
        "removal": float(1 - kept[m].sum() / total_made),
        "removal_mean": float(np.nanmean(per_removal)),
        "fidelity": float(moved[~m].mean()) if (~m).any() else None,
        "removal_per_image": [float(v) for v in per_removal],
        "fidelity_per_image": [float(v) for v in per_fidelity],
    }


REMOVAL_BOUND_QUANTILE = 0.1  # the lower end of a one-sided 90 % interval


def removal_lower_bound(images: Any, reconstructions: Any, cleans: Any, masks: Any,
                        quantile: float = REMOVAL_BOUND_QUANTILE, resamples: int = 1000, seed: int = 0) -> float:
    """A lower confidence bound of the pooled `removal` (same arguments): its `quantile` over
    `resamples` bootstrap resamples of the images with defect pixels (Efron's percentile
    bootstrap, seeded). With few defect images a pooled removal just above a floor may be
    there by chance; the bound says how much of it the images support. Raises ValueError
    as `removal` does."""
    x, r, c, m = _removal_arrays(images, reconstructions, cleans, masks)
    kept = (np.abs(r - c).mean(1) * m).reshape(len(m), -1).sum(1)
    made = (np.abs(x - c).mean(1) * m).reshape(len(m), -1).sum(1)
    if made.sum() <= 0:
        raise ValueError(NOTHING_REMOVED)
    kept, made = kept[made > 0], made[made > 0]
    pick = np.random.default_rng(seed).integers(0, len(made), size=(resamples, len(made)))
    pooled = 1 - kept[pick].sum(1) / made[pick].sum(1)
    return float(np.quantile(pooled, quantile))
