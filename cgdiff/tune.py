"""Label-free tuning: choose the sampler and scorer settings on synthetic defects.

The result of the method hangs on a few settings (above all the conditioning weight w), and
choosing them by looking at test results flatters the numbers. `tune` chooses them from
normal images only:

1. Validation set. Normal images that training did not see, each once as it is and a few
   times with seeded synthetic defects (`cgdiff.data.SyntheticDefects`: Perlin-shaped
   foreign texture, colour shifts, scratches, holes) with exact masks. The normal images are,
   in order of preference:
     - images `cgdiff train --holdout N` kept out of training (of a `build-textures` set, whose
       training tiles overlap, the last N tiles of the photo with every tile overlapping them left
       out of training too; held-out tiles that do overlap training tiles count as in-sample);
     - the stripe `cgdiff train --holdout-stripe F` kept out of every image: defects are
       placed in the stripe and only its pixels are scored (in-sample where the images are
       overlapping tiles: a tile's stripe lies in the trained part of another);
     - training-folder images that the checkpoint's training record does not list and that
       overlap no tile it lists;
     - otherwise the training images themselves. Training used all of them, so the
       validation then measures in-sample normals (optimistic); the result says so.
   Test images and test masks are never read: only ROOT/CLASS/train/good (or the top level
   of a plain image folder) is listed.
2. Search, within a time budget (`budget_s`), picking by validation AUPRO:
     - the stored settings first (the reference), then any further `starts`, each in full
       (never raced, not held to the budget);
     - coarse: one setting at a time, in order of influence (w, blur-guidance scale s, t0,
       K, blur sigma, the number N of reconstructions averaged), each over a coarse grid
       around the best point so far;
     - refinement: the neighbours of the best value on a finer grid, repeated while the
       best point moves and time is left;
     - with `min_removal` > 0, when no setting reaches it: the best setting by AUPRO again with
       the second pass (`cgdiff.sampler.repaint`) from each t2 in `repaint_t0s`, its mask drawn
       relative to the threshold `Detector.calibrate` gives that setting on the calibration
       normals (run after the budget, like the recalibration).
   Every searched sampler setting is first run on half of the validation images; it is finished on
   the other half only if its AUPRO there is within `race_margin` of the best point's
   (clearly bad settings cost half). For every reconstruction the pixel/feature balance (and,
   when asked for, the anomaly map's smoothing sigma) is searched on the same reconstructions
   (cached backbone distances), with the balance c calibrated on the validation's normal
   images as `Detector.calibrate` does.
   The choice: the highest AUPRO, and among the points within `tie_tolerance` of it the one
   with the fewest model calls (then the higher AUPRO).
3. The chosen settings become the detector's own, it is recalibrated on normal images (c and
   the threshold belong to the settings; the threshold by default the F1-max cut against the
   same normals each painted with a synthetic defect, `validation_threshold`), and
   `detector.info["tuning"]` records the choice, the validation scores, which images / regions
   were used, and the whole search table. `recalibrate` (`cgdiff calibrate`) does the last
   step alone, at the stored settings.

    from cgdiff import Detector
    from cgdiff.tune import tune, plot_front

    detector = Detector.from_pretrained("checkpoints/brick")
    result = tune(detector, "data/textures/brick", budget_s=600)
    plot_front(result, "checkpoints/brick/tuning_front.png")
    detector.save_pretrained("checkpoints/brick", overwrite=True)

The command line: `cgdiff tune --checkpoint CKPT --data ROOT/CLASS`, or `cgdiff train ... --tune`.
"""

from __future__ import annotations

import copy
import itertools
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .data import (DEFECT_KINDS, AnomalyDataset, DatasetError, Sample, SyntheticDefects, iter_images,
                   overlapping_tiles, tiles_overlap, training_tile_boxes)
from .evaluation import Reconstructions, reconstruct_dataset
from .images import to_uint8
from .metrics import REMOVAL_BOUND_QUANTILE, aupro, f1_max_threshold, image_auroc, pixel_auroc, removal, removal_lower_bound
from .sampler import SamplerConfig
from .scorer import NORMAL_TAIL, THRESHOLD_RULES, VALIDATION_F1, Scorer, ScorerConfig

__all__ = ["ValidationSet", "TuneResult", "DEFAULT_GRIDS", "BALANCES", "training_folder_images",
           "validation_set", "tune", "select", "pareto_front", "plot_front", "split_holdout", "unseen_holdout", "auto_holdout_count",
           "holdout_stripe", "FRONT_PLOT_NAME", "validation_threshold", "recalibrate",
           "retire_stale_metrics"]

FRONT_PLOT_NAME = "tuning_front.png"
# Fewest held-out normals a threshold is set on alone (mean + 3 sigma and the largest normal score
# of fewer images are too noisy); with fewer, the training images are used as well.
MIN_HELDOUT_CALIBRATION = 8
# `cgdiff train --holdout auto` (the default): a tenth of the training images kept out of
# training for the threshold and tuning where the folder has AUTO_HOLDOUT_MIN_IMAGES or more, so
# that the threshold always gets its MIN_HELDOUT_CALIBRATION unseen normals; smaller folders
# train on all.
AUTO_HOLDOUT_MIN_IMAGES = 10 * MIN_HELDOUT_CALIBRATION
AUPRO_FPR_LIMIT = 0.3

# Searched sampler settings in order of influence (a short budget gets the important ones),
# each with a coarse grid (first pass, in the order tried) and a finer one (refinement around
# the best value).
DEFAULT_GRIDS: dict[str, dict[str, tuple]] = {
    "w": {"coarse": (1.0, 0.0, 3.0, 11.0), "fine": (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 11.0)},
    "guidance_scale": {"coarse": (0.0, 0.5, 1.0), "fine": (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)},
    "t0": {"coarse": (125, 250, 500), "fine": (60, 90, 125, 175, 250, 350, 500, 700)},
    "steps": {"coarse": (5, 10, 20), "fine": (3, 5, 7, 10, 15, 20)},
    "blur_sigma": {"coarse": (1.0, 3.0), "fine": (0.5, 1.0, 2.0, 3.0, 5.0)},
    # N reconstructions averaged: N times the cost, so a tie goes to fewer (see `select`).
    "samples": {"coarse": (1, 2, 4), "fine": (1, 2, 3, 4)},
}
# Pixel/feature balance (pixel_weight v, feature_weight), searched on every reconstruction:
# the method's map A = D_f + v c D_p with v from 1/4 to 4. The one-term extremes (pixel or
# feature distance alone) are ablations, not offered by default: the synthetic defects are
# strong local colour changes, which favour the pixel term more than real defects do (on the
# leather subset, validation picked the pixel term alone, the worst balance on the test set).
BALANCES: tuple[tuple[float, float], ...] = ((0.25, 1.0), (0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (4.0, 1.0))
# t2 of the second pass tried when no setting reaches `min_removal` (BENCHMARKS.md, "Averaged
# reconstructions and a masked second pass": 400 and 600 on the bundled textures).
REPAINT_T0S: tuple[int, ...] = (400, 600)
SAMPLER_SEARCHED = tuple(DEFAULT_GRIDS)
SCORER_SEARCHED = ("pixel_weight", "feature_weight", "map_sigma")

Clock = Callable[[], float]


class OutOfTime(Exception):
    """Raised inside a reconstruction when the search budget is spent (the pass is dropped)."""


# ----------------------------------------------------------------------------- holdout


def training_folder_images(root: str | Path) -> list[Path]:
    """The normal training images of a dataset folder, found without looking at its test
    split: ROOT/CLASS/train/good (MVTec AD, DTD-Synthetic) or the images at the top level of
    a plain folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder '{root}' does not exist or is not a folder.")
    folder = root / "train" / "good"
    images = iter_images(folder) if folder.is_dir() else iter_images(root)
    if not images:
        raise DatasetError(
            f"'{root}' has no normal training images (expected ROOT/CLASS/train/good/*.png or images "
            "at the top level of a plain folder)."
        )
    return images


def auto_holdout_count(n_images: int) -> int:
    """How many of `n_images` training images `cgdiff train --holdout auto` keeps out of
    training: n // 10 from 80 images on (so 8 or more), else 0 (the threshold is then in-sample)."""
    return n_images // 10 if n_images >= AUTO_HOLDOUT_MIN_IMAGES else 0


def split_holdout(images: Sequence[Path], n: int, seed: int = 0,
                  boxes: Optional[dict[str, tuple[int, int, int]]] = None) -> tuple[list[Path], list[Path]]:
    """(training images, held-out images), the order kept.

    Plain images: `n` images chosen by `seed`. Overlapping tiles of one photo (`boxes`, from
    `data.training_tile_boxes`, covering every image): the last `n` tiles in (y, x) order, a band
    at one edge of the photo (`seed` unused), and every other tile that shares a pixel with one of
    them is left out of training too (neither list has it), so that the held-out tiles are normals
    the denoiser never saw any part of. Where `boxes` misses some image, the plain rule applies
    (`unseen_holdout` then tells whether the held-out images overlap training). Raises ValueError
    when nothing would be left to train on."""
    images = list(images)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of held-out images must be a whole number >= 0, got {n!r}.")
    tiles = bool(boxes) and all(p.name in boxes for p in images)
    if n >= len(images):
        raise ValueError(
            f"cannot hold out {n} of {len(images)} training images: at least one must be left to train on "
            + ("(hold out fewer with --holdout N; a stripe of these overlapping tiles lies in the tile below it, "
               "so it is no unseen holdout)." if tiles else "(use --holdout-stripe to keep a stripe of every image instead).")
        )
    if tiles and n:
        order = sorted(range(len(images)), key=lambda i: boxes[images[i].name][:2])
        chosen = set(order[-n:])
        held_names = [images[i].name for i in chosen]
        touching = overlapping_tiles([p.name for p in images], held_names, boxes)
        kept = [p for i, p in enumerate(images) if i not in chosen and p.name not in touching]
        if not kept:
            raise ValueError(f"holding out {n} of {len(images)} overlapping tiles leaves none that does not "
                             "overlap them to train on; hold out fewer with --holdout N.")
        return kept, [p for i, p in enumerate(images) if i in chosen]
    chosen = set(np.random.default_rng(seed).choice(len(images), size=n, replace=False).tolist()) if n else set()
    return ([p for i, p in enumerate(images) if i not in chosen], [p for i, p in enumerate(images) if i in chosen])


def unseen_holdout(held: Sequence[str], trained: Sequence[str], root: str | Path) -> bool:
    """Whether the held-out training images `held` (file names) share no pixel with the images
    `trained` (of the same folder `root`; only a `build-textures` set's tiles can share)."""
    return not overlapping_tiles(held, trained, training_tile_boxes(root))


def holdout_stripe_rows(image_size: int, fraction: float, crop_size: int) -> int:
    """Rows (at the working size) of the bottom stripe kept out of training."""
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout-stripe must be a fraction in (0, 1), got {fraction}.")
    rows = int(round(image_size * fraction))
    if rows < 8:
        raise ValueError(f"a holdout stripe of {fraction:g} is only {rows} rows at {image_size} px; use a larger one.")
    if image_size - rows < crop_size:
        raise ValueError(
            f"a holdout stripe of {fraction:g} leaves {image_size - rows} rows for training, fewer than the "
            f"crop size {crop_size}; use a smaller stripe or --crop-size."
        )
    return rows


def holdout_stripe(image_size: int, fraction: float, crop_size: int) -> tuple[int, dict[str, Any]]:
    """(rows, record) of a bottom stripe of every image kept out of training, as `cgdiff train
    --holdout-stripe F` keeps it: `train(..., holdout_rows=rows, info={"holdout": record})`,
    and `tune` then validates on the stripe."""
    rows = holdout_stripe_rows(image_size, fraction, crop_size)
    return rows, {"stripe_fraction": fraction, "stripe_rows": [image_size - rows, image_size], "image_size": image_size}


# ----------------------------------------------------------------------------- validation set


@dataclass
class ValidationSet:
    """Synthetic-defect validation images at the detector's working size."""

    images: np.ndarray  # N x S x S x 3 uint8
    masks: np.ndarray  # N x S x S bool
    labels: np.ndarray  # N, 0 normal / 1 with a synthetic defect
    rows: tuple[int, int]  # scored rows [r0, r1) (the whole image, or the held-out stripe)
    source: str  # holdout images | holdout tiles overlapping training | holdout stripe | unseen training-folder images | training images
    in_sample: bool  # True when the normal images were used in training
    normal_paths: list[Path]  # the normal images the set was made from
    kinds: list[str]  # per image: "normal" or the defect kind
    origins: list[int]  # per image: index into normal_paths
    seed: int
    calibration_paths: list[Path] = field(default_factory=list)  # normal images for recalibration
    cleans: Optional[np.ndarray] = None  # N x S x S x 3 uint8: each image before its defect
    calibration_unseen: bool = False  # calibration_paths are normals the denoiser did not train on

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Two index sets with normal and defect images in both (every other one of each)."""
        first = np.zeros(len(self), dtype=bool)
        for label in (0, 1):
            idx = np.flatnonzero(self.labels == label)
            first[idx[::2]] = True
        return np.flatnonzero(first), np.flatnonzero(~first)

    def describe(self) -> dict[str, Any]:
        r0, r1 = self.rows
        return {
            "source": self.source,
            "in_sample": self.in_sample,
            "images": [p.name for p in self.normal_paths],
            "rows": [r0, r1],
            "image_size": self.image_size,
            "n_normal": int((self.labels == 0).sum()),
            "n_anomalous": int(self.labels.sum()),
            "defect_kinds": sorted({k for k in self.kinds if k != "normal"}),
            "seed": self.seed,
            "defect_fraction": round(float(self.masks[self.labels == 1, r0:r1].mean()), 4) if self.labels.any() else 0.0,
        }

    def made_from(self) -> str:
        """What the images were made from, in words ("13 training images", ...)."""
        n = len(self.normal_paths)
        r0, r1 = self.rows
        return {
            "holdout images": f"{n} training images held out of training",
            "holdout stripe": f"the stripe of rows {r0}-{r1} held out of training in {n} "
                              "training images (only its pixels are scored)",
            "unseen training-folder images": f"{n} training-folder images that training did not use",
            "holdout tiles overlapping training": f"{n} training tiles held out of training, some of them "
                                                  "overlapping tiles that training used",
            "training images": f"{n} training images",
        }.get(self.source, f"{n} {self.source}")

    def note(self) -> str:
        d = self.describe()
        text = (f"validation: {d['n_normal']} normal + {d['n_anomalous']} synthetic-defect images made from "
                f"{self.made_from()}")
        if self.in_sample:
            everything = self.source == "training images"
            text += (f" -- training used {'all' if everything else 'parts'} of them, so the validation measures "
                     "in-sample normals and its scores are optimistic (train with --holdout N"
                     f"{' or --holdout-stripe F' if everything else ''} for an out-of-sample validation)")
        return text


def _holdout_record(detector) -> dict[str, Any]:
    return dict((detector.info.get("training") or {}).get("holdout") or {})


@dataclass
class _Sources:
    """The normal images a validation set is made from (see the module docstring)."""

    paths: list[Path]
    source: str
    in_sample: bool
    rows: tuple[int, int]
    folder_images: list[Path]

    @property
    def calibration_unseen(self) -> bool:
        return not self.in_sample and self.source != "holdout stripe" and len(self.paths) >= MIN_HELDOUT_CALIBRATION

    @property
    def calibration_paths(self) -> list[Path]:
        """Recalibration uses the normals the denoiser did not train on where there are enough."""
        return list(self.paths) if self.calibration_unseen else list(self.folder_images)


def _validation_sources(detector, root: str | Path) -> _Sources:
    folder_images = training_folder_images(root)
    by_name = {p.name: p for p in folder_images}
    size = detector.image_size
    holdout = _holdout_record(detector)
    training = detector.info.get("training") or {}
    if holdout.get("images"):
        missing = [n for n in holdout["images"] if n not in by_name]
        if missing:
            raise DatasetError(
                f"the checkpoint held out {', '.join(missing[:5])} for tuning, but '{root}' has no such "
                "training image: pass the dataset the checkpoint was trained on."
            )
        held = [by_name[n] for n in holdout["images"]]
        # Tiles held out before overlapping neighbours were left out too share pixels with training
        # (a record without the training list: every folder image not held or left out).
        left_out = set(holdout["images"]) | set(holdout.get("overlapping_left_out") or [])
        trained = training.get("images") or [p.name for p in folder_images if p.name not in left_out]
        if not unseen_holdout(holdout["images"], trained, root):
            return _Sources(held, "holdout tiles overlapping training", True, (0, size), folder_images)
        return _Sources(held, "holdout images", False, (0, size), folder_images)
    if holdout.get("stripe_rows"):
        r0, r1 = holdout["stripe_rows"]
        if holdout.get("image_size", size) != size or not 0 < r0 < r1 <= size:
            raise DatasetError(f"the checkpoint's holdout stripe {holdout['stripe_rows']} does not fit its "
                               f"working size {size}.")
        # A tile's stripe is in the trained part of a tile below it where tiles overlap.
        return _Sources(folder_images, "holdout stripe", tiles_overlap(training_tile_boxes(root)), (int(r0), int(r1)),
                        folder_images)
    seen = set(training.get("images") or [])
    touching = overlapping_tiles([p.name for p in folder_images], seen, training_tile_boxes(root)) if seen else set()
    unseen = [p for p in folder_images if seen and p.name not in seen and p.name not in touching]
    if unseen:
        return _Sources(unseen, "unseen training-folder images", False, (0, size), folder_images)
    return _Sources(folder_images, "training images", True, (0, size), folder_images)


def validation_set(
    detector,
    root: str | Path,
    seed: int = 0,
    n_normal: int = 4,
    n_anomalous: int = 12,
    kinds: Sequence[str] = DEFECT_KINDS,
) -> ValidationSet:
    """Build the validation set for `detector` from the normal training images of `root`
    (never its test split); which normal images, see the module docstring."""
    if n_normal < 1 or n_anomalous < 1:
        raise ValueError("the validation set needs at least one normal and one anomalous image.")
    for k in kinds:
        if k not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind '{k}'; use one of {', '.join(DEFECT_KINDS)}.")
    src = _validation_sources(detector, root)
    _check_readable(src.paths)
    order = np.random.default_rng(seed).permutation(len(src.paths))
    picks = [int(order[j % len(src.paths)]) for j in range(n_normal + n_anomalous)]
    return _paint(detector, src, picks[:n_normal], picks[n_normal:], seed, kinds)


def _paint(detector, src: _Sources, normal: Sequence[int], painted: Sequence[int], seed: int,
           kinds: Sequence[str] = DEFECT_KINDS) -> ValidationSet:
    """The validation set of src.paths[i] for i in `normal` as they are and i in `painted`
    with a synthetic defect each (see `_painted`)."""
    images, cleans, masks, kinds_out = _painted(detector, src.paths, src.rows, normal, painted, seed, kinds)
    origins = list(normal) + list(painted)
    used = sorted(set(origins))
    remap = {i: n for n, i in enumerate(used)}
    return ValidationSet(
        images=images, masks=masks, labels=np.array([0] * len(normal) + [1] * len(painted), dtype=np.int64),
        rows=src.rows, source=src.source, in_sample=src.in_sample, normal_paths=[src.paths[i] for i in used],
        kinds=kinds_out, origins=[remap[i] for i in origins], seed=seed,
        calibration_paths=src.calibration_paths, calibration_unseen=src.calibration_unseen, cleans=cleans,
    )


def _painted(detector, paths: Sequence[Path | np.ndarray], rows: tuple[int, int], normal: Sequence[int],
             painted: Sequence[int], seed: int, kinds: Sequence[str] = DEFECT_KINDS
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images, clean originals, masks, kinds): paths[i] (an image file, or an S x S x 3 uint8
    image already at the working size) at the detector's working size, for i in `normal` as
    they are, then for i in `painted` each with a synthetic defect (`kinds` in turn) inside rows
    [r0, r1), the defects seeded by `seed`. Images N x S x S x 3 uint8, masks N x S x S bool."""
    size = detector.image_size
    rng = np.random.default_rng(seed)
    rng.permutation(len(paths))  # the defects of a seed stay those of validation_set's first draws
    defects = SyntheticDefects(seed=int(rng.integers(2**31)))
    loaded: dict[int, np.ndarray] = {}

    def image(i: int) -> np.ndarray:
        if i not in loaded:
            loaded[i] = to_uint8(detector.prepare(paths[i]).cpu())[0]
        return loaded[i]

    images, cleans, masks, kinds_out = [], [], [], []
    r0, r1 = rows
    for i in normal:
        images.append(image(i))
        cleans.append(image(i))
        masks.append(np.zeros((size, size), dtype=bool))
        kinds_out.append("normal")
    for j, i in enumerate(painted):
        kind = kinds[j % len(kinds)]
        base = image(i).copy()
        region, region_mask = defects.apply(np.ascontiguousarray(base[r0:r1]), kind)
        base[r0:r1] = region
        mask = np.zeros((size, size), dtype=bool)
        mask[r0:r1] = region_mask
        images.append(base)
        cleans.append(image(i))
        masks.append(mask)
        kinds_out.append(kind)
    return np.stack(images), np.stack(cleans), np.stack(masks), kinds_out


def _write_validation(vset: ValidationSet, folder: Path) -> list[Sample]:
    """PNG files (lossless) for `reconstruct_dataset`, in the order of the set."""
    from PIL import Image

    samples = []
    for i, (img, mask, label, kind) in enumerate(zip(vset.images, vset.masks, vset.labels, vset.kinds)):
        path = folder / "images" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        mask_path = None
        if label:
            mask_path = folder / "masks" / f"{i:03d}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        samples.append(Sample(path, int(label), kind, mask_path))
    return samples


# ----------------------------------------------------------------------------- search


@dataclass
class TuneResult:
    chosen: dict[str, Any]  # the chosen sampler + scorer settings (full SamplerConfig, scorer weights)
    start: dict[str, Any]  # the settings the detector had before
    chosen_row: dict[str, Any]
    start_row: dict[str, Any]
    table: list[dict[str, Any]]  # one row per (sampler setting, balance); incomplete rows were raced out
    front: list[int]  # indices into table: the speed/quality Pareto front
    validation: ValidationSet
    seconds: float  # search time
    budget_s: float
    stopped: str  # why the search ended
    record: dict[str, Any] = field(default_factory=dict)  # what goes into detector.info["tuning"]

    @property
    def summary(self) -> str:
        return self.record.get("summary", "")


def _key(sampler: SamplerConfig) -> tuple:
    d = sampler.to_dict()
    if d["guidance_scale"] == 0:
        d["blur_sigma"] = None  # irrelevant without blur guidance: one reconstruction serves all
    return tuple(sorted(d.items()))


def select(rows: Sequence[dict[str, Any]], tie_tolerance: float = 0.005, min_removal: float = 0.0,
           max_model_calls: Optional[int] = None) -> int:
    """Index of the chosen row: the highest AUPRO; among rows within `tie_tolerance` of it,
    the fewest model calls, then the higher AUPRO, then the earliest. Incomplete rows (raced
    out on half the images) are never chosen. With `max_model_calls` only rows that cost at
    most that many denoiser evaluations per image are candidates, while there are any. With
    `min_removal` > 0 only rows whose validation removal (`cgdiff.metrics.removal`, in
    [0, 1]) reaches it are candidates, while there are any; otherwise every complete row is.
    Where a row has "removal_low" (`cgdiff.metrics.removal_lower_bound`), that bound must reach
    it: a removal above the floor by chance of the few validation defects does not count."""
    complete = [i for i, r in enumerate(rows) if r.get("complete") and r.get("aupro") is not None]
    if not complete:
        raise ValueError("no complete row to choose from.")
    if max_model_calls is not None:
        complete = [i for i in complete if rows[i]["model_calls"] <= max_model_calls] or complete
    if min_removal > 0:
        complete = [i for i in complete if _removal_for_floor(rows[i]) >= min_removal] or complete
    best = max(rows[i]["aupro"] for i in complete)
    tied = [i for i in complete if rows[i]["aupro"] >= best - tie_tolerance]
    return min(tied, key=lambda i: (rows[i]["model_calls"], -rows[i]["aupro"], i))


def _removal_for_floor(row: dict[str, Any]) -> float:
    """What a removal floor is held against: the row's lower bound where it has one."""
    value = row.get("removal_low", row.get("removal"))
    return value if value is not None else 0.0


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the complete rows that no other row beats on both speed and AUPRO, fastest first."""
    complete = [i for i, r in enumerate(rows) if r.get("complete") and r.get("aupro") is not None]
    order = sorted(complete, key=lambda i: (rows[i]["seconds_per_image"], -rows[i]["aupro"], i))
    front, best = [], -math.inf
    for i in order:
        if rows[i]["aupro"] > best:
            front.append(i)
            best = rows[i]["aupro"]
    return front


class _Search:
    def __init__(self, detector, vset: ValidationSet, budget_s: float, clock: Clock, race_margin: float,
                 tie_tolerance: float, balances, batch_size: int, log: Callable[[str], None], workdir: Path,
                 metric_size: int = 128, min_removal: float = 0.0, map_sigmas: Sequence[float] = (),
                 max_model_calls: Optional[int] = None):
        self.detector = detector
        self.vset = vset
        self.budget_s = float(budget_s)
        self.clock = clock
        self.t_start = clock()
        self.race_margin = race_margin
        self.tie_tolerance = tie_tolerance
        self.min_removal = min_removal
        self.max_model_calls = max_model_calls
        self.over_cap = 0  # settings not run: more model calls than max_model_calls
        self.balances = balances
        self.map_sigmas = tuple(map_sigmas) or (detector.scorer.config.map_sigma,)
        self.batch_size = batch_size
        self.log = log
        self.samples = _write_validation(vset, workdir)
        self.factor = max(1, vset.image_size // metric_size)  # pixel metrics at up to metric_size px
        self.half_a, self.half_b = vset.halves()
        self.rows: list[dict[str, Any]] = []
        self.half_scores: dict[tuple, float] = {}  # sampler key -> best AUPRO over balances on half A
        self.done: set[tuple] = set()
        self.recon_seconds = 0.0  # reconstruction time, for cost estimates
        self.recon_units = 0.0  # model calls x images
        self.score_seconds: list[float] = []
        self.n_sampler_settings = 0
        self.skipped = 0  # settings left out or stopped for lack of time
        base = detector.scorer.config
        self._c_scorer = Scorer(ScorerConfig(backbone=base.backbone, feature_smoothing=base.feature_smoothing,
                                             map_sigma=base.map_sigma), detector.scorer.backbone)
        self.pixel_scale: Optional[float] = None  # c, when fixed (the second pass keeps the first's)
        self.starts: list[SamplerConfig] = []  # further starts run (tune's `starts`)

    @contextmanager
    def scoring_as(self, balance: tuple[float, float], map_sigma: float, pixel_scale: float):
        """Score with this one balance and map sigma and this c only, within the block: a second
        pass's mask was drawn with them, so no other scoring of its reconstructions is its own."""
        saved = (self.balances, self.map_sigmas, self.pixel_scale)
        self.balances, self.map_sigmas, self.pixel_scale = (balance,), (map_sigma,), pixel_scale
        try:
            yield
        finally:
            self.balances, self.map_sigmas, self.pixel_scale = saved

    # -- time
    def elapsed(self) -> float:
        return self.clock() - self.t_start

    def estimate(self, sampler: SamplerConfig, n_images: int) -> float:
        if self.recon_units == 0:
            return 0.0
        per_unit = self.recon_seconds / self.recon_units
        scoring = float(np.mean(self.score_seconds)) if self.score_seconds else 0.0
        return per_unit * sampler.model_calls() * n_images + scoring

    # -- reconstruction and scoring
    def _reconstruct(self, sampler: SamplerConfig, idx: np.ndarray, deadline: bool):
        dataset = AnomalyDataset(root=self.samples[0].path.parent, layout="validation", category="validation",
                                 train=[], test=[self.samples[i] for i in idx])

        last = {"t": self.clock(), "step": 0.0}

        def check(_done: int, _total: int) -> None:
            # After every model step: stop if the next step (as long as this one) would overrun.
            now = self.clock()
            last["step"], last["t"] = now - last["t"], now
            if deadline and self.elapsed() + last["step"] > self.budget_s:
                raise OutOfTime()

        t = self.clock()
        recs = reconstruct_dataset(self.detector, dataset, sampler, batch_size=self.batch_size, progress=check,
                                   mask_size=self.vset.image_size)
        self.recon_seconds += self.clock() - t
        self.recon_units += sampler.model_calls() * len(idx)
        return recs

    def _score(self, recs, idx: np.ndarray) -> list[dict[str, Any]]:
        """Validation metrics of every balance and map sigma on reconstructions of the images `idx`."""
        t = self.clock()
        det = self.detector
        base = det.scorer.config
        labels = self.vset.labels[idx]
        r0, r1 = self.vset.rows
        masks = _shrink(self.vset.masks[idx, r0:r1], self.factor, is_mask=True)
        normals = labels == 0
        with_features = ScorerConfig(**{**base.to_dict(), "pixel_weight": 1.0, "feature_weight": 1.0})
        d_p, d_f, feature_seconds = recs.distances(det, with_features, self.batch_size)
        c = self.pixel_scale or self._c_scorer.calibrate(d_p[normals], d_f[normals]).pixel_scale  # as Detector.calibrate fits it
        removed, removed_low = self._removal(recs, idx)
        out = []
        for (pixel_weight, feature_weight), map_sigma in itertools.product(self.balances, self.map_sigmas):
            config = ScorerConfig(**{**base.to_dict(), "pixel_weight": pixel_weight, "feature_weight": feature_weight,
                                     "map_sigma": map_sigma})
            dp, df = (d_p, d_f) if feature_weight > 0 else (d_p, torch.zeros_like(d_p))
            scale = c if pixel_weight > 0 and feature_weight > 0 else 1.0
            maps = det.scorer.combine(dp, df, scale, config).float().numpy()[:, r0:r1]
            scores = maps.reshape(len(maps), -1).max(axis=1)
            maps = _shrink(maps, self.factor)
            out.append({
                "pixel_weight": pixel_weight, "feature_weight": feature_weight, "map_sigma": map_sigma,
                "aupro": aupro(masks, maps, AUPRO_FPR_LIMIT),
                "pixel_auroc": pixel_auroc(masks, maps),
                "image_auroc": image_auroc(labels, scores),
                "scoring_seconds_per_image": feature_seconds if feature_weight > 0 else 0.0,
                "pixel_scale": scale,
                "removal": removed,
                "removal_low": removed_low,
            })
        self.score_seconds.append(self.clock() - t)
        return out

    def _removal(self, recs, idx: np.ndarray) -> tuple[Optional[float], Optional[float]]:
        """`cgdiff.metrics.removal` (pooled) on the scored rows of the defect images `idx`, and
        its lower bound (`removal_lower_bound`): the validation defects are painted on known
        normals, so their clean originals are known. (None, None) without any."""
        anomalous = self.vset.labels[idx] == 1
        if self.vset.cleans is None or not anomalous.any():
            return None, None
        r0, r1 = self.vset.rows
        to_unit = lambda t: ((t[anomalous].numpy() + 1) / 2)[..., r0:r1, :]  # noqa: E731
        clean = self.vset.cleans[idx][anomalous].transpose(0, 3, 1, 2)[..., r0:r1, :] / 255.0
        args = (to_unit(recs.inputs), to_unit(recs.reconstructions), clean, self.vset.masks[idx][anomalous][:, r0:r1])
        try:
            return removal(*args)["removal"], removal_lower_bound(*args, seed=self.vset.seed)
        except ValueError:  # no defect pixel differs from its clean original
            return None, None

    def incumbent(self) -> Optional[int]:
        try:
            return select(self.rows, self.tie_tolerance, self.min_removal, self.max_model_calls)
        except ValueError:
            return None

    def center(self) -> SamplerConfig:
        """The best setting so far, without a second pass (its mask belongs to the settings
        it was calibrated at, so the search moves the first pass only)."""
        i = self.incumbent()
        return SamplerConfig(**{k: v for k, v in self.rows[i]["sampler"].items()}).replace(repaint_t0=0)

    def evaluate(self, sampler: SamplerConfig, stage: str, reference: bool = False) -> str:
        """Run one sampler setting (half, then the rest unless raced out). Returns 'done',
        'cached', 'raced', 'skipped' (would not fit the budget), 'over the cap' (more model calls
        than max_model_calls) or 'out of time'."""
        key = _key(sampler)
        if key in self.done:
            return "cached"
        a, b = self.half_a, self.half_b
        if not reference and self.max_model_calls is not None and sampler.model_calls() > self.max_model_calls:
            self.over_cap += 1
            return "over the cap"
        if not reference:
            if self.elapsed() + self.estimate(sampler, len(a)) > self.budget_s:
                self.skipped += 1
                return "skipped"
        self.done.add(key)
        self.n_sampler_settings += not reference
        try:
            recs_a = self._reconstruct(sampler, a, deadline=not reference)
            scored_a = self._score(recs_a, a)
            half = max(r["aupro"] for r in scored_a)
            self.half_scores[key] = half
            inc = self.incumbent()
            if inc is not None:
                inc_half = self.half_scores[_key(SamplerConfig(**self.rows[inc]["sampler"]))]
                if half < inc_half - self.race_margin:
                    best = max(scored_a, key=lambda r: r["aupro"])
                    self._add_rows(sampler, [best], stage, complete=False, seconds=recs_a.seconds_per_image)
                    self.log(f"  {_describe(sampler)}: AUPRO {half:.3f} on half the images, "
                             f"{inc_half - half:.3f} below the best there: dropped")
                    return "raced"
                if self.elapsed() + self.estimate(sampler, len(b)) > self.budget_s and not reference:
                    self.log(f"  {_describe(sampler)}: no time left to finish it")
                    self.skipped += 1
                    return "skipped"
            recs_b = self._reconstruct(sampler, b, deadline=not reference)
        except OutOfTime:
            self.log(f"  {_describe(sampler)}: stopped, the time budget is spent")
            self.skipped += 1
            return "out of time"
        recs = _concat(recs_a, recs_b)
        order = np.concatenate([a, b])
        scored = self._score(recs, order)
        seconds = recs.seconds_per_image
        self._add_rows(sampler, scored, stage, complete=True, seconds=seconds)
        best = max(scored, key=lambda r: r["aupro"])
        self.log(f"  {_describe(sampler)}: AUPRO {best['aupro']:.4f} (v={best['pixel_weight']:g}, "
                 f"features x{best['feature_weight']:g}, map sigma {best['map_sigma']:g}), {seconds:.2f} s/img  "
                 f"[{self.elapsed():.0f} s]")
        return "done"

    def _add_rows(self, sampler: SamplerConfig, scored: list[dict], stage: str, complete: bool, seconds: float):
        for r in scored:
            self.rows.append({
                "sampler": sampler.to_dict(),
                **{k: getattr(sampler, k) for k in SAMPLER_SEARCHED}, "repaint_t0": sampler.repaint_t0,
                "repaint_steps": sampler.repaint_steps,
                "pixel_weight": r["pixel_weight"], "feature_weight": r["feature_weight"], "map_sigma": r["map_sigma"],
                "model_calls": sampler.model_calls(),
                "seconds_per_image": round(seconds + r["scoring_seconds_per_image"], 4),
                "aupro": round(r["aupro"], 5) if complete else None,
                "aupro_half": round(self.half_scores.get(_key(sampler), r["aupro"]), 5),
                "pixel_auroc": round(r["pixel_auroc"], 5) if complete else None,
                "image_auroc": round(r["image_auroc"], 5) if complete else None,
                "removal": round(r["removal"], 4) if complete and r["removal"] is not None else None,
                "removal_low": round(r["removal_low"], 4) if complete and r["removal_low"] is not None else None,
                "stage": stage,
                "complete": complete,
            })


def _shrink(arrays: np.ndarray, factor: int, is_mask: bool = False) -> np.ndarray:
    """N x H x W maps (block means) or masks (block centres) reduced by an integer factor, for
    fast pixel metrics; rows and columns beyond a whole block are dropped."""
    if factor == 1:
        return arrays
    n, h, w = arrays.shape
    h, w = h // factor * factor, w // factor * factor
    if is_mask:
        return arrays[:, factor // 2 : h : factor, factor // 2 : w : factor]
    return arrays[:, :h, :w].reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _concat(a, b):
    n_a, n_b = len(a), len(b)
    return Reconstructions(
        inputs=torch.cat([a.inputs, b.inputs]), reconstructions=torch.cat([a.reconstructions, b.reconstructions]),
        labels=np.concatenate([a.labels, b.labels]),
        masks=None if a.masks is None else np.concatenate([a.masks, b.masks]),
        paths=a.paths + b.paths, defect_types=a.defect_types + b.defect_types, mask_size=a.mask_size,
        sampler=a.sampler, seconds_per_image=(a.seconds_per_image * n_a + b.seconds_per_image * n_b) / (n_a + n_b),
    )


def _describe(sampler: SamplerConfig) -> str:
    s = sampler
    blur = f" sigma={s.blur_sigma:g}" if s.guidance_scale > 0 else ""
    averaged = f" N={s.samples}" if s.samples > 1 else ""
    second = f" t2={s.repaint_t0} K2={s.repaint_steps}" if s.repaint_t0 > 0 else ""
    return f"t0={s.t0} K={s.steps} w={s.w:g} s={s.guidance_scale:g}{blur}{averaged}{second}"


def _neighbours(value: Any, grid: Sequence) -> list:
    values = sorted(set(grid) | {value})
    i = values.index(value)
    return [values[j] for j in (i - 1, i + 1) if 0 <= j < len(values)]


def _setting(name: str, value: Any) -> Any:
    return int(value) if name in ("t0", "steps", "samples") else float(value)


def tune(
    detector,
    root: str | Path | None = None,
    budget_s: float = 600.0,
    seed: int = 0,
    n_normal: int = 4,
    n_anomalous: int = 12,
    tie_tolerance: float = 0.005,
    race_margin: float = 0.03,
    min_removal: float = 0.0,
    max_model_calls: Optional[int] = None,
    repaint_t0s: Sequence[int] = REPAINT_T0S,
    grids: Optional[dict[str, dict[str, Sequence]]] = None,
    balances: Sequence[tuple[float, float]] = BALANCES,
    map_sigmas: Sequence[float] = (),
    max_evaluations: Optional[int] = None,
    refine_rounds: int = 3,
    starts: Sequence[SamplerConfig] = (),
    validation: Optional[ValidationSet] = None,
    metric_size: int = 128,
    apply: bool = True,
    threshold: str = VALIDATION_F1,
    batch_size: int = 4,
    log: Optional[Callable[[str], None]] = None,
    clock: Clock = time.perf_counter,
) -> TuneResult:
    """Choose `detector`'s sampler and scorer settings on a synthetic-defect validation set
    made from the normal training images of `root` (see the module docstring).

    budget_s: seconds for the search (the stored settings and `starts` are evaluated in full first, whatever
        the budget;
        a setting that would not fit is skipped, one that overruns is stopped). Recalibration
        afterwards is not counted.
    grids: {setting: {"coarse": values, "fine": values}} for some of t0, steps, w,
        guidance_scale, blur_sigma, samples (default DEFAULT_GRIDS; a setting left out stays
        fixed).
    balances: (pixel_weight, feature_weight) pairs tried on every reconstruction.
    map_sigmas: Gaussian smoothing sigmas of the anomaly map (px at the working size, >= 0)
        tried besides the stored one with every balance on every reconstruction, e.g.
        (1, 2, 4, 8). Default none: the stored sigma stays. On the synthetic-defect textures the
        validation's pick also won on their (synthetic) test splits; on the leather subset's
        real defects it picked a finer map than the stored one and lost (BENCHMARKS.md, "Map
        smoothing").
    max_evaluations: at most this many sampler settings besides the stored one (the
        second-pass stage's and `starts` included).
    starts: more sampler settings to search from, e.g. those of another detector of the same
        texture. Each is evaluated in full after the stored one, never raced and past the budget
        if need be (without its second pass: the search moves the first pass; brought under
        `max_model_calls` as the stored one is), while `max_evaluations` allows, and
        the one-setting-at-a-time search moves from the best of them all. Without them it moves
        from the stored settings alone and can miss a better region: a setting dropped on half
        the images near the start is never met again with the other settings it would need.
    validation: a ready ValidationSet instead of one made from `root`.
    metric_size: pixel metrics are computed on maps and masks reduced to about this size
        (block means of the maps), which keeps scoring cheap next to reconstruction.
    apply: make the chosen settings the detector's own, recalibrate it on the normal images
        training did not use where there are some (held-out images), else on the
        training-folder images, and record the tuning in `detector.info["tuning"]`.
    threshold: how `apply` sets the decision threshold: "validation-f1" (the F1-max cut between
        the calibration normals' scores and the same normals each with a synthetic defect,
        seeded by the validation's seed; see `validation_threshold`) or "normal-tail" (normal
        images only: max(largest normal score, mean + 3 sd)).
    min_removal: choose only among settings whose validation removal reaches it (in [0, 1];
        the lower end of its bootstrap interval over the validation's defect images, see
        `select`; 0: by AUPRO alone), so that the reconstruction visibly takes the defect out; when no
        setting of the search reaches it, the best one by AUPRO is also tried with the second pass
        from each t2 in `repaint_t0s` (after the budget); when still none reaches it, the choice
        is by AUPRO alone and the record says so. (The command line's default is 0.5,
        `cgdiff.cli.MIN_REMOVAL`.)
    repaint_t0s: t2 values of that second-pass stage (empty: no stage).
    max_model_calls: leave out settings that cost more denoiser evaluations per image (K, 2K
        with blur guidance, times N, plus K2 with a second pass), e.g. to keep an app's latency; the stored settings are
        still measured as the reference, and chosen only when no cheaper setting completed;
        when they are over the cap, they are also run brought under it (fewer averaged runs
        first, then fewer steps), for the search to move from; a start over the cap is run only
        so brought under it.
    clock: the time source for the budget (tests pass a fake one)."""
    log = log or (lambda message: None)
    if budget_s is None or not budget_s > 0:
        raise ValueError(f"the tuning budget must be > 0 seconds, got {budget_s!r}.")
    if max_model_calls is not None and (not isinstance(max_model_calls, int) or max_model_calls < 1):
        raise ValueError(f"max_model_calls must be a whole number >= 1, got {max_model_calls!r}.")
    if not 0 <= min_removal <= 1:
        raise ValueError(f"min_removal must lie in [0, 1], got {min_removal!r}.")
    _check_rule(threshold)
    if detector.calibration is None:
        raise ValueError("the detector is not calibrated: tune a trained checkpoint.")
    grids = DEFAULT_GRIDS if grids is None else grids
    unknown = set(grids) - set(SAMPLER_SEARCHED)
    if unknown:
        raise ValueError(f"unknown grid setting(s) {sorted(unknown)}; searchable: {', '.join(SAMPLER_SEARCHED)}.")
    # A denoiser trained on t < max_timestep only (`cgdiff train --max-timestep`) is not searched
    # at starts it never learned.
    trained = trained_max_timestep(detector)
    if "t0" in grids and trained < 1000:
        grids = {**grids, "t0": {stage: tuple(v for v in values if v < trained) or (trained - 1,)
                                 for stage, values in grids["t0"].items()}}
    repaint_t0s = tuple(t2 for t2 in repaint_t0s if t2 < trained)  # never a start it did not learn
    starts = check_starts(detector, starts)
    for pw, fw in balances:
        ScorerConfig(pixel_weight=pw, feature_weight=fw)
    for sigma in map_sigmas:
        ScorerConfig(map_sigma=sigma)
    stored_balance = (detector.scorer.config.pixel_weight, detector.scorer.config.feature_weight)
    balances = tuple(balances) + ((stored_balance,) if stored_balance not in tuple(balances) else ())
    stored_sigma = detector.scorer.config.map_sigma
    map_sigmas = tuple(map_sigmas) + ((stored_sigma,) if stored_sigma not in tuple(map_sigmas) else ())
    t_begin = clock()
    if validation is None:
        if root is None:
            raise ValueError("give the dataset folder (root) or a validation set.")
        validation = validation_set(detector, root, seed=seed, n_normal=n_normal, n_anomalous=n_anomalous)
    if (validation.labels == 0).sum() < 2 or validation.labels.sum() < 2:
        raise ValueError("the validation set needs at least 2 normal and 2 anomalous images (one of each per half).")
    log(validation.note())
    start_sampler = detector.sampler
    start_scorer = detector.scorer.config
    with tempfile.TemporaryDirectory(prefix="cgdiff-tune-") as tmp:
        search = _Search(detector, validation, budget_s, clock, race_margin, tie_tolerance, balances,
                         batch_size, log, Path(tmp), metric_size, min_removal, map_sigmas, max_model_calls)
        search.t_start = t_begin
        log(f"stored settings: {_describe(start_sampler)}")
        if start_sampler.repaint_t0:
            with search.scoring_as(stored_balance, stored_sigma, detector.calibration.pixel_scale):
                search.evaluate(start_sampler, "start", reference=True)
        else:
            search.evaluate(start_sampler, "start", reference=True)
        if max_model_calls is not None and start_sampler.model_calls() > max_model_calls:
            # The search moves one setting at a time from the best row under the cap: give it one.
            search.evaluate(_under_cap(start_sampler, max_model_calls), "start, under the cap")
        search.starts = _evaluate_starts(search, starts, max_evaluations)
        stopped = _run_search(search, grids, max_evaluations, refine_rounds, log)
        if min_removal > 0 and repaint_t0s:
            _repaint_stage(search, repaint_t0s, batch_size, log, max_evaluations)
    rows = search.rows
    start_index = next(i for i, r in enumerate(rows)
                       if r["stage"] == "start" and (r["pixel_weight"], r["feature_weight"]) == stored_balance
                       and r["map_sigma"] == stored_sigma)
    chosen_index = select(rows, tie_tolerance, min_removal, max_model_calls)
    chosen_row = rows[chosen_index]
    chosen = {**chosen_row["sampler"], **{k: chosen_row[k] for k in SCORER_SEARCHED}}
    result = TuneResult(
        chosen=chosen, start={**start_sampler.to_dict(), **{k: getattr(start_scorer, k) for k in SCORER_SEARCHED}},
        chosen_row=chosen_row, start_row=rows[start_index], table=rows, front=pareto_front(rows),
        validation=validation, seconds=clock() - t_begin, budget_s=float(budget_s), stopped=stopped,
    )
    result.record = _record(result, search, tie_tolerance, race_margin)
    if apply:
        apply_result(detector, result, threshold=threshold, batch_size=batch_size, log=log)
    return result


def _repaint_stage(search: _Search, repaint_t0s: Sequence[int], batch_size: int, log: Callable[[str], None],
                   max_evaluations: Optional[int] = None) -> None:
    """When no setting reaches the removal floor: the best one-pass setting by AUPRO (its balance
    and map sigma) with the second pass from each t2, its mask relative to the threshold that
    `Detector.calibrate` gives the setting on the calibration normals (as `apply_result` will),
    c kept at that calibration's. The detector is left as it was."""
    if any(_removal_for_floor(r) >= search.min_removal for r in search.rows if r.get("complete")):
        return
    if max_evaluations is not None and search.n_sampler_settings >= max_evaluations:
        return  # its settings count among max_evaluations
    one_pass = [r for r in search.rows if not r["repaint_t0"] and r.get("complete") and r.get("aupro") is not None]
    if not one_pass:  # e.g. a stored second pass and no other setting finished
        return
    best = one_pass[select(one_pass, search.tie_tolerance, 0.0, search.max_model_calls)]
    det, vset = search.detector, search.vset
    sampler = SamplerConfig(**best["sampler"])
    saved = (det.sampler, det.scorer.config, det.calibration, search.race_margin)
    info = copy.deepcopy(det.info)  # calibrate() drops the notes of earlier calibrations, nested ones too
    log(f"second pass (no setting reached validation removal {search.min_removal:g}; the best by AUPRO removes "
        f"{best.get('removal') or 0.0:.3f}, lower bound {_removal_for_floor(best):.3f}): {_describe(sampler)} with the suspect pixels re-painted from t2 "
        f"in {', '.join(map(str, repaint_t0s))}:")
    try:
        det.sampler = sampler
        det.scorer.config = ScorerConfig(**{**det.scorer.config.to_dict(),
                                            **{k: best[k] for k in SCORER_SEARCHED}})
        det.calibrate(det.prepare(vset.calibration_paths or vset.normal_paths), batch_size=batch_size)
        search.race_margin = math.inf  # finished in full: it is there for removal, not to beat AUPRO
        with search.scoring_as((best["pixel_weight"], best["feature_weight"]), best["map_sigma"],
                               det.calibration.pixel_scale):
            for t2 in repaint_t0s:
                if max_evaluations is not None and search.n_sampler_settings >= max_evaluations:
                    break
                candidate = sampler.replace(repaint_t0=int(t2))
                if search.max_model_calls is not None and candidate.model_calls() > search.max_model_calls:
                    search.over_cap += 1
                    continue
                search.done.discard(_key(candidate))  # measured under this calibration, even if the stored one is alike
                search.n_sampler_settings += 1
                search.evaluate(candidate, "second pass", reference=True)
    finally:
        det.sampler, det.scorer.config, det.calibration, search.race_margin = saved
        det.info.clear()
        det.info.update(info)


def _evaluate_starts(search: _Search, starts: Sequence[SamplerConfig],
                     max_evaluations: Optional[int]) -> list[SamplerConfig]:
    """Each further start in full, as the stored settings: never raced, and not held to the
    budget. Returns the settings run (brought under the cap; one already run is left out)."""
    run = []
    if starts:
        search.log("further starts:")
    race_margin = search.race_margin
    search.race_margin = math.inf
    try:
        for sampler in starts:
            if max_evaluations is not None and search.n_sampler_settings >= max_evaluations:
                search.log(f"  {_describe(sampler)}: not run, max_evaluations reached")
                continue
            if search.max_model_calls is not None and sampler.model_calls() > search.max_model_calls:
                sampler = _under_cap(sampler, search.max_model_calls)
            if _key(sampler) in search.done:
                search.log(f"  {_describe(sampler)}: run already")
                continue
            search.n_sampler_settings += 1
            search.evaluate(sampler, "another start", reference=True)
            run.append(sampler)
    finally:
        search.race_margin = race_margin
    return run


def trained_max_timestep(detector) -> int:
    """The denoiser trained on t < this (1000 unless `cgdiff train --max-timestep` set it)."""
    return int(((detector.info.get("training") or {}).get("config") or {}).get("max_timestep", 1000))


def check_starts(detector, starts: Sequence[SamplerConfig], names: Optional[Sequence[str]] = None) -> list[SamplerConfig]:
    """`tune`'s further starts as it runs them: their first pass (the search moves that only).
    Raises ValueError for one that is not a SamplerConfig or starts at a t0 the denoiser did not
    train on, naming it by `names` (e.g. the checkpoints they come from) where given."""
    if starts is None or isinstance(starts, (SamplerConfig, dict, str)):
        raise ValueError(f"starts must be a sequence of SamplerConfig, got {type(starts).__name__}.")
    trained = trained_max_timestep(detector)
    out = []
    for i, sampler in enumerate(starts):
        name = f"'{names[i]}'" if names and i < len(names) else f"number {i + 1}"
        if not isinstance(sampler, SamplerConfig):
            raise ValueError(f"start {name} of the search must be a SamplerConfig, got {type(sampler).__name__}.")
        if sampler.t0 >= trained:
            raise ValueError(f"start {name} of the search has t0 = {sampler.t0}, but this denoiser trained on "
                             f"t < {trained} only.")
        out.append(sampler.replace(repaint_t0=0))
    return out


def _under_cap(sampler: SamplerConfig, max_model_calls: int) -> SamplerConfig:
    """`sampler` brought under `max_model_calls` denoiser evaluations per image: without a second
    pass, then fewer averaged runs, then fewer steps."""
    sampler = sampler.replace(repaint_t0=0)  # the search moves the first pass only
    per_run = sampler.model_calls() // sampler.samples
    if per_run <= max_model_calls:
        return sampler.replace(samples=min(sampler.samples, max_model_calls // per_run))
    per_step = 2 if sampler.guidance_scale > 0 else 1
    return sampler.replace(samples=1, steps=max(1, max_model_calls // per_step))


def _run_search(search: _Search, grids, max_evaluations, refine_rounds, log) -> str:
    def budget_left() -> bool:
        return search.elapsed() < search.budget_s

    def allowed() -> bool:
        return max_evaluations is None or search.n_sampler_settings < max_evaluations

    def sweep(name: str, values: Sequence, stage: str) -> bool:
        """Try `values` of one setting around the current best; False when the search must stop."""
        for value in values:
            if not budget_left():
                return False
            if not allowed():
                return False
            center = search.center()
            if name == "blur_sigma" and center.guidance_scale == 0:
                return True  # no blur guidance: sigma plays no part
            candidate = center.replace(**{name: _setting(name, value)})
            search.evaluate(candidate, stage)
        return True

    log("coarse search, one setting at a time:")
    for name, grid in grids.items():
        if not sweep(name, grid["coarse"], "coarse"):
            return _why(search, max_evaluations)
    converged = False
    for round_ in range(refine_rounds):
        before = search.incumbent()
        log(f"refinement {round_ + 1}:")
        for name, grid in grids.items():
            center = search.center()
            values = _neighbours(_setting(name, getattr(center, name)), [_setting(name, v) for v in grid["fine"]])
            if not sweep(name, values, "refine"):
                return _why(search, max_evaluations)
        if search.incumbent() == before:
            converged = True
            break
    if search.skipped:
        return "time budget spent"
    return "converged" if converged else "refinement rounds done"


def _why(search: _Search, max_evaluations) -> str:
    if search.elapsed() >= search.budget_s:
        return "time budget spent"
    return f"max_evaluations ({max_evaluations}) reached"


def _settings_text(d: dict[str, Any]) -> str:
    averaged = f" N={d['samples']}" if d.get("samples", 1) > 1 else ""
    if d.get("repaint_t0", 0) > 0:
        averaged += f" t2={d['repaint_t0']} K2={d.get('repaint_steps', SamplerConfig.repaint_steps)}"
    return (f"t0={d['t0']} K={d['steps']} w={d['w']:g} s={d['guidance_scale']:g} sigma={d['blur_sigma']:g}{averaged} "
            f"v={d['pixel_weight']:g} features x{d['feature_weight']:g} map sigma {d['map_sigma']:g}")


def _record(result: TuneResult, search: _Search, tie_tolerance: float, race_margin: float) -> dict[str, Any]:
    vset = result.validation
    c, s = result.chosen_row, result.start_row
    n_complete = len({_key(SamplerConfig(**r["sampler"])) for r in result.table if r["complete"]})
    rules = ""  # the limits the choice was made under, if any
    if search.max_model_calls is not None:
        rules = f"settings above {search.max_model_calls} model calls per image left out; "
    if search.min_removal > 0:
        met = _removal_for_floor(c) >= search.min_removal
        bound = f"(the lower end of its {100 * (1 - 2 * REMOVAL_BOUND_QUANTILE):.0f} % bootstrap interval)"
        rules += (f"chosen among the settings with validation removal {bound} >= {search.min_removal:g}; " if met else
                  f"no setting reached {search.min_removal:g} in validation removal {bound}, so chosen by AUPRO alone; ")
    starts = search.starts
    summary = rules + (
        f"validation AUPRO {c['aupro']:.4f} with {_settings_text(result.chosen)} ({c['model_calls']} model calls), "
        f"against {s['aupro']:.4f} with the previous settings ({s['model_calls']} model calls); "
        + (f"besides the previous settings, {len(starts)} further start(s) run in full; " if starts else "")
        + f"{search.n_sampler_settings + 1} sampler settings tried ({n_complete} in full) in "
        f"{result.seconds:.0f} s; {vset.note()}."
    )
    from . import __version__

    return {
        "summary": summary,
        "chosen": result.chosen,
        "previous": result.start,
        "validation": {"aupro": c["aupro"], "pixel_auroc": c["pixel_auroc"], "image_auroc": c["image_auroc"],
                       "previous_aupro": s["aupro"], "previous_pixel_auroc": s["pixel_auroc"],
                       "previous_image_auroc": s["image_auroc"], "removal": c.get("removal"),
                       "removal_low": c.get("removal_low"),
                       "previous_removal": s.get("removal"), "mask_size": vset.image_size // search.factor,
                       "aupro_fpr_limit": AUPRO_FPR_LIMIT},
        "validation_set": vset.describe(),
        "search": {
            "strategy": "stored settings (and any further starts), then from the best a coarse "
                        "one-setting-at-a-time sweep (w, s, t0, K, sigma, N) and "
                        "refinement on finer grids (then, when no setting reaches min_removal, the best by "
                        "AUPRO with the second pass); searched settings raced on half the images; pixel/feature balance "
                        f"(and map sigmas {', '.join(f'{x:g}' for x in search.map_sigmas)}) searched on every "
                        "reconstruction",
            "budget_seconds": result.budget_s, "seconds": round(result.seconds, 1), "stopped": result.stopped,
            "sampler_settings": search.n_sampler_settings + 1, "completed": n_complete,
            "tie_tolerance": tie_tolerance, "race_margin": race_margin, "min_removal": search.min_removal,
            **({"max_model_calls": search.max_model_calls, "over_the_cap": search.over_cap}
               if search.max_model_calls is not None else {}),
            "device": str(search.detector.device),
            **({"starts": [sampler.to_dict() for sampler in starts]} if starts else {}),
        },
        "table": [{k: v for k, v in r.items() if k != "sampler"} | {"eta": r["sampler"]["eta"],
                                                                      "seed": r["sampler"]["seed"]}
                  for r in result.table],
        "chosen_row": result.table.index(c),
        "previous_row": result.table.index(s),
        "front": result.front,
        "cgdiff_version": __version__,
    }


def apply_result(detector, result: TuneResult, threshold: str = VALIDATION_F1, batch_size: int = 4,
                 log: Optional[Callable[[str], None]] = None) -> None:
    """Make the chosen settings the detector's own, recalibrate it on the validation's
    calibration normals (c and the threshold belong to the settings; the threshold by the rule
    `threshold`, see `tune`) and record the tuning in detector.info."""
    log = log or (lambda message: None)
    chosen = result.chosen
    sampler_keys = {f.name for f in fields(SamplerConfig)}
    detector.sampler = SamplerConfig(**{k: v for k, v in chosen.items() if k in sampler_keys})
    detector.scorer.config = ScorerConfig(**{**detector.scorer.config.to_dict(),
                                            **{k: chosen[k] for k in SCORER_SEARCHED if k in chosen}})
    record = dict(result.record)
    vset = result.validation
    scale_before = detector.calibration.pixel_scale
    record.update(_recalibrate(detector, vset.calibration_paths or vset.normal_paths, vset.rows, vset.source,
                               vset.calibration_unseen, threshold, vset.seed, batch_size, log))
    stale = retire_stale_metrics(detector, result.chosen != result.start, scale_before)
    if stale:
        record["metrics_before_tuning"] = stale
    detector.info["tuning"] = record


def retire_stale_metrics(detector, settings_changed: bool, pixel_scale_before: float) -> Optional[dict[str, Any]]:
    """After a recalibration: test metrics recorded earlier (`evaluate --record`) belong to the
    previous maps when the settings or c changed (they are removed and returned), and their
    verdict rates to the previous threshold when only that moved (those two entries go)."""
    metrics = detector.info.get("metrics")
    if not metrics:
        return None
    if settings_changed or not math.isclose(detector.calibration.pixel_scale, pixel_scale_before, rel_tol=1e-6):
        return detector.info.pop("metrics")
    if metrics.get("threshold") != detector.calibration.threshold:
        metrics.pop("at_threshold", None)
        metrics.pop("threshold", None)
    return None


def _recalibrate(detector, paths: Sequence[Path], rows: tuple[int, int], source: str, unseen: bool, threshold: str,
                 seed: int, batch_size: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate c and the normal scores on `paths` (normal images), then set the threshold by
    the rule `threshold`; for VALIDATION_F1 against one synthetic defect (seeded by `seed`,
    inside `rows`) painted on each of those normals, so that F1 does not lean on an arbitrary
    share of defects. `source` and `unseen` describe the normals for the record."""
    log(f"recalibrating on {len(paths)} normal images at the detector's settings ...")
    x = detector.prepare(paths)  # decoded once, for the calibration and the painted copies
    detector.calibrate(x, batch_size=batch_size)
    if threshold == VALIDATION_F1:
        tail = detector.calibration.threshold
        defects = _painted(detector, list(to_uint8(x.cpu())), rows, [], range(len(paths)), seed)[0]
        validation_threshold(detector, defects, source=f"seed {seed}, one painted on each of those normals",
                             batch_size=batch_size)
        cal = detector.calibration
        if cal.threshold_rule == VALIDATION_F1:
            log(f"threshold {cal.threshold:.4g} (F1-max {cal.validation_f1:.3f} on {cal.n_images} normal and "
                f"{len(cal.anomalous_scores)} synthetic-defect images; the normal-tail rule gives {tail:.4g})")
        else:
            log(f"threshold {cal.threshold:.4g} (normal-tail): the F1-max cut would flag every normal image")
    return {"calibrated_on": len(paths),
            "calibration_normals": (f"{len(paths)} {source} (not used in training)" if unseen
                                    else f"{len(paths)} training-folder images (in-sample)")}


def _check_rule(threshold: str) -> None:
    if threshold not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {threshold!r}; use one of {', '.join(THRESHOLD_RULES)}.")


def validation_threshold(detector, defects: Sequence[np.ndarray] | np.ndarray, source: str = "",
                         batch_size: int = 4) -> float:
    """Set `detector`'s threshold to the F1-max cut between its calibration normals' scores
    (`detector.calibration.normal_scores`, from `Detector.calibrate` at the current settings)
    and the scores of `defects` (images with synthetic defects, N x S x S x 3 uint8) at the
    current settings: anomalib's F1AdaptiveThreshold on a synthetic validation split
    (`cgdiff.metrics.f1_max_threshold`; ties go to the higher cut). A threshold from normal
    images alone (mean + 3 sd) ignores how far defects score above them.

    When that cut would flag every normal image (the defects score no higher than the normals),
    the normal-tail threshold stays. Stores the rule, the defect scores, the F1 and `source` (what
    the defects were made from) in `detector.calibration`; returns the threshold (units of
    the image score max(A), >= 0). Raises ValueError when the detector is not calibrated or
    there are no defect images."""
    cal = detector.calibration
    if cal is None or not cal.normal_scores:
        raise ValueError("calibrate the detector on normal images first (its normal scores are needed).")
    if len(defects) == 0:
        raise ValueError("no synthetic-defect images to set the threshold with.")
    scores = [d.score for d in detector.detect(list(defects), batch_size=batch_size)]
    f1, threshold = f1_max_threshold([0] * len(cal.normal_scores) + [1] * len(scores), list(cal.normal_scores) + scores)
    cal.anomalous_scores = [round(float(s), 6) for s in scores]
    cal.validation_f1 = round(float(f1), 4)
    cal.anomalous_source = source
    if threshold < min(cal.normal_scores):
        cal.threshold_rule = NORMAL_TAIL
    else:
        cal.threshold = max(0.0, float(threshold))
        cal.threshold_rule = VALIDATION_F1
    return cal.threshold


def recalibrate(detector, root: str | Path, threshold: str = VALIDATION_F1, seed: int = 0, batch_size: int = 4,
                log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Recalibrate `detector` at its stored settings without a search: c and the normal scores
    on the normal images the tuner would use (held-out ones where there are enough, else the
    training-folder images), the threshold by the rule `threshold` (see `tune`), for
    VALIDATION_F1 with one synthetic defect (seeded by `seed`) painted on each of those normals.
    Test images are never read. Returns what was used; raises DatasetError for a folder
    without training images."""
    _check_rule(threshold)
    if detector.calibration is None:
        raise ValueError("the detector is not calibrated: recalibrate a trained checkpoint.")
    src = _validation_sources(detector, root)
    _check_readable(src.calibration_paths)
    return _recalibrate(detector, src.calibration_paths, src.rows, src.source, src.calibration_unseen, threshold, seed,
                        batch_size, log or (lambda message: None))


# ----------------------------------------------------------------------------- reporting


def plot_front(result: TuneResult | dict[str, Any], path: str | Path) -> Path:
    """The speed/quality picture: seconds per image against validation AUPRO for every
    complete setting, the Pareto front joined, the previous and the chosen setting and any
    further starts marked (the legend outside the axes, so that it hides no point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = result.record if isinstance(result, TuneResult) else result
    table = record["table"]
    complete = [r for r in table if r.get("complete")]
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    ax.scatter([r["seconds_per_image"] for r in complete], [r["aupro"] for r in complete], s=12, c="0.7",
               label="settings tried")
    starts = [r for r in complete if r.get("stage") == "another start"]
    if starts:
        ax.scatter([r["seconds_per_image"] for r in starts], [r["aupro"] for r in starts], marker="D", s=30,
                   facecolors="none", edgecolors="tab:orange", label="further starts (--start-from)", zorder=3)
    front = [table[i] for i in record["front"]]
    ax.plot([r["seconds_per_image"] for r in front], [r["aupro"] for r in front], "-o", c="tab:blue", ms=5,
            label="speed/quality front")
    # Front points numbered (alternately below and above), their settings listed beside the axes:
    # close points would overlap as labels.
    for i, r in enumerate(front):
        ax.annotate(str(i + 1), (r["seconds_per_image"], r["aupro"]), textcoords="offset points",
                    xytext=(3, -10 if i % 2 == 0 else 4), fontsize=7, color="tab:blue")
    listed = "\n".join(f"{i + 1}: K={r['steps']} s={r['guidance_scale']:g} w={r['w']:g} N={r.get('samples', 1)}"
                        + (f" t2={r['repaint_t0']}" if r.get("repaint_t0") else "") for i, r in enumerate(front))
    ax.text(1.02, 0.5, "front:\n" + listed, transform=ax.transAxes, fontsize=7, color="tab:blue", va="top")
    prev, chosen = table[record["previous_row"]], table[record["chosen_row"]]
    if prev.get("aupro") is not None:
        ax.scatter([prev["seconds_per_image"]], [prev["aupro"]], marker="s", s=60, facecolors="none",
                   edgecolors="tab:red", label="previous settings", zorder=3)
    floor = (record.get("search") or {}).get("min_removal") or 0
    met = floor > 0 and _removal_for_floor(chosen) >= floor
    ax.scatter([chosen["seconds_per_image"]], [chosen["aupro"]], marker="*", s=160, c="tab:green", zorder=4,
               label=f"chosen (among removal >= {floor:g})" if met else "chosen")
    vs = record["validation_set"]
    kind = "in-sample normals" if vs["in_sample"] else vs["source"]
    ax.set_xlabel(f"seconds per image ({record['search']['device']})")
    ax.set_ylabel("validation AUPRO (FPR <= 0.3)")
    ax.set_title(f"Label-free tuning: {vs['n_normal']} normal + {vs['n_anomalous']} synthetic-defect images "
                 f"({kind})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def front_table(record: dict[str, Any]) -> list[str]:
    """Lines: the speed/quality front, fastest first, each with the flags that select it."""
    lines = []
    for i in record["front"]:
        r = record["table"][i]
        flags = (f"--t0 {r['t0']} --steps {r['steps']} --w {r['w']:g} --guidance-scale {r['guidance_scale']:g} "
                 f"--blur-sigma {r['blur_sigma']:g} --pixel-weight {r['pixel_weight']:g} "
                 f"--feature-weight {r['feature_weight']:g}"
                 + f" --samples {r.get('samples', 1)} --repaint-t0 {r.get('repaint_t0', 0)}"
                 + (f" --repaint-steps {r['repaint_steps']}" if r.get("repaint_t0") else "")
                 + (f" --map-sigma {r['map_sigma']:g}" if "map_sigma" in r else ""))
        mark = "  <- chosen" if i == record["chosen_row"] else ""
        removed = f"removal {r['removal']:.3f}" if r.get("removal") is not None else "removal  n/a"
        lines.append(f"  {r['seconds_per_image']:7.2f} s/img  AUPRO {r['aupro']:.4f}  {removed}  {flags}{mark}")
    return lines


def _check_readable(paths: Sequence[Path]) -> None:
    """Decode every validation source once: a DatasetError names all unreadable files together
    (tuning would otherwise stop at the first one it happens to draw)."""
    from .images import ImageError, load_image

    bad = []
    for path in paths:
        try:
            load_image(path)
        except ImageError as e:
            bad.append(str(e))
    if bad:
        raise DatasetError(f"{len(bad)} of the {len(paths)} training-folder image(s) the tuner validates on cannot be "
                           "read; remove or replace them:\n  " + "\n  ".join(bad))
