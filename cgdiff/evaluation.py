"""Evaluation of a Detector on a labelled test set, in two stages that can be reused.

    recs = reconstruct_dataset(detector, dataset)                  # the expensive part
    result = score_reconstructions(detector, recs)                 # cheap: maps, scores, metrics
    result = score_reconstructions(detector, recs, {"pixel_weight": 0.5})   # another scorer setting
    metrics = evaluate(detector, dataset, w=1.0)                   # both stages, one dict

Only the sampler settings (t0, steps, w, guidance scale, blur, eta, seed) change the
reconstructions; the scorer settings (pixel_weight, feature_weight, feature_smoothing,
map_sigma) only change how image and reconstruction are compared, so a sweep over them
reuses one `Reconstructions`.

Conventions, as in cgdiff.metrics (anomalib's definitions):

- the image score is the maximum of the anomaly map at the detector's working size, exactly
  what `Detector.detect` reports;
- maps are compared with the ground-truth masks at `mask_size` x `mask_size` (the paper's
  tables and anomalib use 256): masks are resized with nearest neighbour, maps bilinearly;
- maps are never normalised with statistics of the test set: they are the raw maps, scaled
  only by the pixel/feature balance calibrated on normal training images;
- every metric is a fraction in [0, 1]; pixel metrics are None when the set has no masks
  (defect types without masks), and `pixel_metrics_note` says why;
- a defect image whose mask is empty (no non-zero pixel, or none left at `mask_size`) is
  never counted as all-normal pixels: it stops the evaluation with the files named, or, with
  ``empty_masks="skip"``, is left out of the pixel metrics (it still counts for the image
  metrics) and listed in `pixel_excluded`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .data import AnomalyDataset, DatasetError
from .detector import SAMPLER_KEYS, _num_steps
from .metrics import evaluate as compute_metrics
from .sampler import SamplerConfig
from .scorer import ScorerConfig

__all__ = ["Reconstructions", "ScoredSet", "reconstruct_dataset", "score_reconstructions", "evaluate",
           "resize_maps", "save_map_images", "DEFAULT_MASK_SIZE", "AUPRO_FPR_LIMIT"]

DEFAULT_MASK_SIZE = 256  # the resolution of the paper's tables (and anomalib's MVTec AD default)
AUPRO_FPR_LIMIT = 0.3

Progress = Union[bool, Callable[[int, int], None]]


@dataclass
class Reconstructions:
    """The test images of a dataset at the detector's working size and their reconstructions."""

    inputs: torch.Tensor  # N x 3 x S x S in [-1, 1], on the CPU
    reconstructions: torch.Tensor  # N x 3 x S x S in [-1, 1], on the CPU
    labels: np.ndarray  # N, 0 normal / 1 anomalous
    masks: Optional[np.ndarray]  # N x M x M bool at mask_size; None when the set has no masks
    paths: list[Path]
    defect_types: list[str]
    mask_size: int
    sampler: SamplerConfig  # the settings that made the reconstructions
    seconds_per_image: float  # reconstruction time (model calls only, no file decoding)
    pixel_excluded: list[int] = field(default_factory=list)  # defect images with empty masks, left out
    pixel_metrics_note: Optional[str] = None  # why there are no pixel metrics / what was left out
    # cgdiff.metrics.removal on the defect images with a clean original (None without any); it
    # depends on the reconstructions only, so every scorer setting shares it.
    removal: Optional[dict[str, Any]] = None
    _distances: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.inputs.shape[-1])

    def distances(self, detector, config: ScorerConfig, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Raw (D_p, D_f), N x S x S each, and the seconds per image they took; cached per
        feature setting, so scorer sweeps that only change the weights or the map smoothing
        cost no backbone pass after the first. (An in-place change of the backbone's
        weights is not noticed: make a new Reconstructions, or clear `_distances`.)"""
        key = (id(detector.scorer.backbone), config.feature_smoothing, config.feature_weight == 0)
        if key not in self._distances:
            d_p, d_f = [], []
            device = detector.device
            t_start = time.perf_counter()
            for start in range(0, len(self), batch_size):
                x = self.inputs[start : start + batch_size].to(device)
                r = self.reconstructions[start : start + batch_size].to(device)
                dp, df = detector.scorer.distances(x, r, config)
                d_p.append(dp.float().cpu())
                d_f.append(df.float().cpu())
            seconds = (time.perf_counter() - t_start) / len(self)
            self._distances = {key: (torch.cat(d_p), torch.cat(d_f), seconds)}  # keep one: bounded memory
        return self._distances[key]


@dataclass
class ScoredSet:
    """Anomaly maps, image scores and metrics for one scorer setting."""

    metrics: dict[str, Any]  # image_auroc, pixel_auroc, aupro, image_f1_max, pixel_f1_max, ...
    maps: np.ndarray  # N x S x S float32, at the detector's working size (as Detection.anomaly_map)
    scores: np.ndarray  # N float64, max of each map
    scorer: ScorerConfig


def _progress_callback(progress: Progress, total: int, desc: str):
    """A (done, total) callback and a closer, from True (a tqdm bar), False or a callable."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


EMPTY_MASKS = ("error", "skip")


def load_masks(dataset: AnomalyDataset, samples: list, mask_size: int, empty_masks: str = "error"
               ) -> tuple[Optional[np.ndarray], list[int], Optional[str]]:
    """(masks N x M x M bool or None, indices left out of the pixel metrics, note).

    Masks are None when some defect image has no mask (the note says which types). A defect
    image whose mask is empty at `mask_size` raises a DatasetError naming the files, or with
    ``empty_masks="skip"`` is listed in the indices (masks are None when that is all of them)."""
    if empty_masks not in EMPTY_MASKS:
        raise ValueError(f"empty_masks must be one of {EMPTY_MASKS}, got {empty_masks!r}.")
    if not dataset.has_masks:
        return None, [], dataset.no_masks_reason
    masks = np.stack([dataset.load_mask(s, mask_size) for s in samples])
    empty = [i for i, s in enumerate(samples) if s.label and not masks[i].any()]
    if not empty:
        return masks, [], None
    files = [f"'{samples[i].mask_path}'" + ("" if not dataset.load_mask(samples[i]).any() else
                                           f" (its defect vanishes at {mask_size} x {mask_size})") for i in empty]
    what = f"{len(empty)} defect image(s) have an empty mask (no non-zero pixel): {', '.join(files)}"
    if empty_masks == "error":
        raise DatasetError(
            f"{what}. Pixel metrics would count them as all-normal pixels: fix the masks, or leave these "
            "images out of the pixel metrics (--skip-empty-masks of cgdiff evaluate and cgdiff bench, "
            "empty_masks='skip' in Python)."
        )
    n_anomalous = sum(1 for s in samples if s.label)
    if len(empty) == n_anomalous:
        return None, empty, f"{what}: no defect image left for the pixel metrics"
    return masks, empty, f"{what}: left out of the pixel metrics (still in the image metrics)"


def ranking_metrics(labels: np.ndarray, scores: np.ndarray, masks: Optional[np.ndarray], maps: np.ndarray,
                    excluded: list[int], mask_size: int) -> dict[str, Optional[float]]:
    """Image AUROC and F1-max on every image (labels N, 1 = anomalous; scores N); pixel AUROC,
    AUPRO (FPR <= AUPRO_FPR_LIMIT) and pixel F1-max on the N x S x S `maps` against the
    N x M x M boolean `masks` at `mask_size`, leaving out the images at the `excluded`
    indices (defect images with empty masks, see `load_masks`); no pixel metrics (None) when
    `masks` is None."""
    values = compute_metrics(labels, scores, fpr_limit=AUPRO_FPR_LIMIT)
    if masks is not None:
        keep = np.ones(len(labels), dtype=bool)
        keep[excluded] = False
        pixel = compute_metrics(labels[keep], scores[keep], masks[keep], resize_maps(maps[keep], mask_size),
                                AUPRO_FPR_LIMIT)
        values.update({k: pixel[k] for k in ("pixel_auroc", "aupro", "pixel_f1_max")})
    return values


@torch.no_grad()
def reconstruct_dataset(
    detector,
    dataset: AnomalyDataset,
    sampler: Optional[SamplerConfig] = None,
    batch_size: int = 4,
    progress: Progress = False,
    mask_size: int = DEFAULT_MASK_SIZE,
    empty_masks: str = "error",
) -> Reconstructions:
    """Reconstruct every test image of `dataset` with `sampler` (default: the detector's own).

    progress: True for a tqdm bar, or a callable (done, total) counting model steps.
    empty_masks: "error" (a DatasetError naming the defect images whose mask is empty, before
    any reconstruction) or "skip" (leave them out of the pixel metrics); see `load_masks`."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    if not isinstance(mask_size, int) or mask_size < 8:
        raise ValueError(f"mask_size must be a whole number >= 8, got {mask_size!r}.")
    samples = list(dataset.test)
    if not samples:
        raise DatasetError(f"'{dataset.root}' has no test images to evaluate on.")
    sampler = (sampler or detector.sampler).validate()
    masks, excluded, note = load_masks(dataset, samples, mask_size, empty_masks)

    steps = _num_steps(sampler)
    n_batches = math.ceil(len(samples) / batch_size)
    callback, close = _progress_callback(progress, n_batches * steps, "reconstructing")
    inputs, recs = [], []
    seconds = 0.0
    try:
        for b, start in enumerate(range(0, len(samples), batch_size)):
            x = detector.prepare([s.path for s in samples[start : start + batch_size]])
            step_cb = None
            if callback is not None:
                step_cb = lambda i, _k, o=b * steps: callback(o + i, n_batches * steps)  # noqa: E731
            t_start = time.perf_counter()
            r = detector.reconstruct(x, sampler, step_cb)
            r = r.float().cpu()  # waits for the device: the time is honest on a GPU too
            seconds += time.perf_counter() - t_start
            inputs.append(x.float().cpu())
            recs.append(r)
    finally:
        close()
    inputs, recs = torch.cat(inputs), torch.cat(recs)
    return Reconstructions(
        inputs=inputs,
        reconstructions=recs,
        labels=np.array([s.label for s in samples], dtype=np.int64),
        masks=masks,
        paths=[s.path for s in samples],
        defect_types=[s.defect_type for s in samples],
        mask_size=mask_size,
        sampler=sampler,
        seconds_per_image=seconds / len(samples),
        pixel_excluded=excluded,
        pixel_metrics_note=note,
        removal=_removal(detector, dataset, samples, inputs, recs),
    )


def _removal(detector, dataset: AnomalyDataset, samples: list, inputs: torch.Tensor, recs: torch.Tensor
             ) -> Optional[dict[str, Any]]:
    """The removal measure on the defect images that have a clean original and a mask, at the
    working size, on the [0, 1] pixel scale (fidelity is a fraction of the full range); None
    when no defect pixel differs from its clean original. Inside the masks the reconstruction's
    ordinary error on normal texture counts as defect left, so a faint defect scores low."""
    from .metrics import removal

    chosen = [i for i, s in enumerate(samples) if s.label and s.clean_path is not None and s.mask_path is not None]
    if not chosen:
        return None
    size = inputs.shape[-1]
    cleans = torch.cat([detector.prepare([samples[i].clean_path]).float().cpu() for i in chosen])
    masks = np.stack([dataset.load_mask(samples[i], size) for i in chosen])
    try:
        out = removal((inputs[chosen].numpy() + 1) / 2, (recs[chosen].numpy() + 1) / 2, (cleans.numpy() + 1) / 2, masks)
    except ValueError:  # no defect pixel differs from its clean original: nothing to measure
        return None
    # JSON has no NaN: an image without a measurable defect gets None.
    out = {k: ([None if v != v else v for v in val] if isinstance(val, list) else val) for k, val in out.items()}
    out["paths"] = [str(samples[i].path) for i in chosen]
    out["n_images"] = len(chosen)
    return out


def resize_maps(maps: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """N x H x W maps -> N x size x size, bilinear (maps are continuous; masks use nearest)."""
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return t.numpy()


def _scorer_config(detector, scorer_config: Union[ScorerConfig, dict, None]) -> ScorerConfig:
    if scorer_config is None:
        return detector.scorer.config
    if isinstance(scorer_config, ScorerConfig):
        if scorer_config.backbone != detector.scorer.config.backbone:
            raise ValueError(
                f"scorer_config names backbone '{scorer_config.backbone}' but the detector uses "
                f"'{detector.scorer.config.backbone}'; the backbone is fixed by the checkpoint."
            )
        return scorer_config
    changes = dict(scorer_config)
    sampler_keys = sorted(set(changes) & SAMPLER_KEYS)
    if sampler_keys:
        raise ValueError(
            f"{sampler_keys} change the reconstructions, not the scoring: run reconstruct_dataset "
            "again with those sampler settings."
        )
    _, config = detector.settings(**changes)
    return config


@torch.no_grad()
def score_reconstructions(
    detector,
    recs: Reconstructions,
    scorer_config: Union[ScorerConfig, dict, None] = None,
    batch_size: int = 8,
) -> ScoredSet:
    """Maps, image scores and metrics of `recs` for one scorer setting.

    scorer_config: a ScorerConfig, a dict of scorer overrides (pixel_weight, feature_weight,
    feature_smoothing, map_sigma), or None for the detector's stored settings. Maps are
    compared with the masks at `recs.mask_size`. A set without both normal and anomalous
    images (normal images only, say) gets maps and scores, and None for every metric."""
    if detector.calibration is None:
        raise ValueError(
            "the detector is not calibrated (no pixel/feature balance): calibrate it on normal images first."
        )
    config = _scorer_config(detector, scorer_config)
    d_p, d_f, distance_seconds = recs.distances(detector, config, batch_size)
    t_start = time.perf_counter()
    maps = detector.scorer.combine(d_p, d_f, detector.calibration.pixel_scale, config).float()
    score_seconds = distance_seconds + (time.perf_counter() - t_start) / len(recs)
    maps_np = maps.numpy()
    scores = maps.flatten(1).amax(1).double().numpy()

    labels = recs.labels
    n_anomalous = int(labels.sum())
    if 0 < n_anomalous < len(labels):
        values = ranking_metrics(labels, scores, recs.masks, maps_np, recs.pixel_excluded, recs.mask_size)
    else:  # e.g. normal images only (label-free tuning): maps and scores, no ranking metrics
        values = dict.fromkeys(("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"))

    metrics: dict[str, Any] = {key: (None if v is None else float(v)) for key, v in values.items()}
    metrics.update(
        n_images=len(recs),
        n_normal=len(recs) - n_anomalous,
        n_anomalous=n_anomalous,
        mask_size=recs.mask_size if recs.masks is not None else None,
        pixel_metrics_note=recs.pixel_metrics_note,
        pixel_excluded=[str(recs.paths[i]) for i in recs.pixel_excluded],
        image_size=recs.image_size,
        aupro_fpr_limit=AUPRO_FPR_LIMIT,
        seconds_per_image=recs.seconds_per_image + score_seconds,
        reconstruction_seconds_per_image=recs.seconds_per_image,
        sampler=recs.sampler.to_dict(),
        scorer=config.to_dict(),
        removal=recs.removal["removal"] if recs.removal else None,
        removal_mean=recs.removal["removal_mean"] if recs.removal else None,
        fidelity=recs.removal["fidelity"] if recs.removal else None,
        removal_n_images=recs.removal["n_images"] if recs.removal else 0,
    )
    stored = (recs.sampler.to_dict() == detector.sampler.to_dict()
              and config.to_dict() == detector.scorer.config.to_dict())
    # The calibrated threshold belongs to the stored settings: judge it only with those.
    metrics["threshold"] = float(detector.calibration.threshold)
    metrics["at_threshold"] = _at_threshold(labels, scores, detector.calibration.threshold) if stored else None
    return ScoredSet(metrics=metrics, maps=maps_np, scores=scores, scorer=config)


def _check_labels(labels: np.ndarray, where: str = "the test set") -> None:
    n_anomalous = int(np.sum(labels))
    if n_anomalous == 0 or n_anomalous == len(labels):
        present = "anomalous" if n_anomalous else "normal"
        raise DatasetError(
            f"{where} needs both normal and anomalous images for the metrics; all {len(labels)} are {present}."
        )


def _at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Optional[float]]:
    """Image-level rates of the calibrated verdict (None where the set has no such images)."""
    flagged = scores > threshold
    anomalous = labels.astype(bool)

    def rate(selection: np.ndarray) -> Optional[float]:
        return float(selection.mean()) if selection.size else None

    return {
        "true_positive_rate": rate(flagged[anomalous]),
        "false_positive_rate": rate(flagged[~anomalous]),
        "accuracy": rate(flagged == anomalous),
    }


def evaluate(
    detector,
    dataset: AnomalyDataset,
    mask_size: int = DEFAULT_MASK_SIZE,
    batch_size: int = 4,
    progress: Progress = False,
    per_image: bool = True,
    save_maps: str | Path | None = None,
    empty_masks: str = "error",
    require_pixel_metrics: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate `detector` on the test split of `dataset`; `overrides` change sampler and
    scorer settings for this evaluation only (t0, steps, w, guidance_scale, blur_sigma, eta,
    seed, pixel_weight, feature_weight, feature_smoothing, map_sigma).

    Returns image_auroc, pixel_auroc, aupro, image_f1_max, pixel_f1_max (fractions in [0, 1];
    pixel ones None without masks), removal / removal_mean / fidelity (`cgdiff.metrics.removal`
    on the defect images that have a clean original, e.g. `build_texture_dataset`'s; None
    without), pixel_metrics_note (why they are None, or which images
    they leave out; None when complete), pixel_excluded (paths), n_images, seconds_per_image,
    mask_size, the settings used, and per image its path, label and score. save_maps: a
    folder to write each test image's heat map and overlay to (see `save_map_images`).
    empty_masks: "error" or "skip" for defect images with an empty mask (see `load_masks`).
    require_pixel_metrics: raise a DatasetError (before any reconstruction) instead of
    reporting None when the pixel metrics cannot be computed."""
    sampler, scorer = detector.settings(**overrides)
    if not dataset.test:
        raise DatasetError(f"'{dataset.root}' has no test images to evaluate on.")
    _check_labels(dataset.test_labels(), f"the test set of '{dataset.root}'")
    if require_pixel_metrics:
        masks, _, note = load_masks(dataset, list(dataset.test), mask_size, empty_masks)
        if masks is None:
            raise DatasetError(f"pixel metrics were asked for, but {note}.")
    recs = reconstruct_dataset(detector, dataset, sampler, batch_size=batch_size, progress=progress,
                               mask_size=mask_size, empty_masks=empty_masks)
    scored = score_reconstructions(detector, recs, scorer, batch_size=batch_size)
    result = dict(scored.metrics)
    result["overrides"] = {k: v for k, v in overrides.items() if v is not None}
    result["dataset"] = {
        "root": str(dataset.root),
        "category": dataset.category,
        "layout": dataset.layout,
        "n_train": len(dataset.train),
        "defect_types": dataset.defect_types,
    }
    result["checkpoint"] = detector.info.get("source")
    result["device"] = str(detector.device)
    result["cgdiff_version"] = __version__
    if save_maps is not None:
        save_map_images(recs, scored, save_maps, detector.calibration.threshold)
        result["maps_folder"] = str(save_maps)
    if per_image:
        removal = {}
        if recs.removal:
            removal = {p: (r, f) for p, r, f in zip(recs.removal["paths"], recs.removal["removal_per_image"],
                                                     recs.removal["fidelity_per_image"])}
        result["per_image"] = [
            {"path": str(p), "defect_type": d, "label": int(y), "score": float(s),
             **({"removal": removal[str(p)][0], "fidelity": removal[str(p)][1]} if str(p) in removal else {})}
            for p, d, y, s in zip(recs.paths, recs.defect_types, recs.labels, scored.scores)
        ]
    return result


def save_map_images(recs: Reconstructions, scored: ScoredSet, folder: str | Path, threshold: float) -> list[Path]:
    """Write, per test image, FOLDER/<defect type>/<name>_heatmap.png and _overlay.png.

    Heat maps use the threshold-relative colour scale of cgdiff.viz; the overlay outlines the
    predicted region (map above `threshold`) in green and the ground truth, if any, in cyan."""
    from PIL import Image

    from .images import to_uint8
    from .viz import heatmap, mask_outline, overlay

    folder = Path(folder)
    written: list[Path] = []
    images = to_uint8(recs.inputs)
    size = recs.image_size
    for i, (path, defect) in enumerate(zip(recs.paths, recs.defect_types)):
        out = folder / defect
        out.mkdir(parents=True, exist_ok=True)
        amap = scored.maps[i]
        over = overlay(images[i], amap, threshold)
        if recs.masks is not None and recs.masks[i].any():
            gt = recs.masks[i]
            if gt.shape != (size, size):
                gt = Image.fromarray(gt.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
                gt = np.asarray(gt) > 127
            over[mask_outline(gt, width=max(1, size // 128))] = (0, 255, 255)
        for suffix, picture in (("heatmap", heatmap(amap, threshold)), ("overlay", over)):
            target = out / f"{Path(path).stem}_{suffix}.png"
            Image.fromarray(picture).save(target)
            written.append(target)
    return written
