"""The method step by step, for the app's teaching view and the notebooks.

    traj = trajectory(detector, "a.png")          # the sampler's states, step by step
    traj.start, traj.steps[i].x_t, .x0, .x0_blurred
    variants = ablations(detector, "a.png")       # the full method, then each strategy off in turn
    familiarity(result.anomaly_map, detector.calibration).unfamiliar

`familiarity` is the rule that tells an image unlike the detector's normal images (a portrait,
noise, another texture) from a defect: a normal image's anomaly map reaches the level of the
normal scores (their mean + 1 standard deviation, both stored by calibration) only at its
highest point, since the score is the map's maximum, and a defect raises a part of the map; an
image the model never learned to rebuild raises the whole map. So an image is *unfamiliar*
when more than half of its map lies above that level. On the bundled models this flags the
other textures, noise and photos of other things (not every one: a busy photo can look enough
like grass), and none of the bundled normal or defect examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .detector import Detection, Detector, _num_steps
from .images import load_image, load_mask, to_uint8
from .sampler import SamplerConfig

FAMILIAR_SIGMAS = 1.0  # the level: mean + this many sd of the normal scores
UNFAMILIAR_FRACTION = 0.5  # more of the map than this above the level: unlike the normal images


# --------------------------------------------------------------------------- familiarity


@dataclass(frozen=True)
class Familiarity:
    level: float  # map level that normal images reach only at their maximum
    fraction: float  # fraction of the map above it

    @property
    def unfamiliar(self) -> bool:
        return self.fraction > UNFAMILIAR_FRACTION

    def describe(self, texture: Optional[str] = None) -> str:
        what = f"the {texture} images" if texture else "the normal images"
        if self.unfamiliar:
            return (f"{100 * self.fraction:.0f}% of the anomaly map lies above {self.level:.3g}, a level normal images "
                    f"reach only at their highest point: this image is unlike {what} the model learned, so the "
                    "score says little about defects.")
        return f"{100 * self.fraction:.0f}% of the anomaly map lies above {self.level:.3g}."


def unfamiliar_text(texture: Optional[str] = None) -> str:
    """The short words for an unfamiliar image, as the batch table and `cgdiff detect` give them."""
    return (f"unlike the {texture + ' ' if texture else ''}images this model knows, so the verdict says little "
            "about defects")


def familiarity(anomaly_map: np.ndarray, calibration: Any) -> Familiarity:
    """Is an image like the normal images the detector was calibrated on? `calibration` is
    `detector.calibration` (its score_mean and score_std)."""
    if calibration is None:
        raise ValueError("familiarity needs a calibrated detector (calibration holds the normal scores).")
    amap = np.asarray(anomaly_map, dtype=np.float64)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"anomaly_map must be a non-empty H x W array, got shape {amap.shape}.")
    level = float(calibration.score_mean) + FAMILIAR_SIGMAS * float(calibration.score_std)
    return Familiarity(level=level, fraction=float((amap > level).mean()))


def familiarity_at(detector: Detector, anomaly_map: np.ndarray, sampler: SamplerConfig,
                   scorer: Any) -> Optional[Familiarity]:
    """`familiarity` of a map made with these settings; None (not judged) where they differ from
    the calibrated ones (`Detector.calibrated_for`), since the normal scores it compares with
    were made at those (a pure-noise start makes every map high, brick on the brick model
    included)."""
    if not detector.calibrated_for(sampler, scorer):
        return None
    return familiarity(anomaly_map, detector.calibration)


def known_texture(info: dict) -> Optional[str]:
    """The texture a detector learned, from its record (`detector.info` or cgdiff.json): the name
    of the training data folder (data/textures/brick -> brick), else None."""
    data = (info.get("training") or {}).get("data")
    if not data:
        return None
    return Path(str(data).rstrip("/")).name or None


# ---------------------------------------------------------------------------- trajectory


@dataclass
class Step:
    t: int  # the step's time
    next_t: int  # the next one (-1: the end)
    x_t: np.ndarray  # H x W x 3 uint8: the state the step starts from (first step: the partial-diffusion start)
    x0: np.ndarray  # the clean-image estimate of this step
    x0_blurred: Optional[np.ndarray]  # the blurred estimate blur guidance steers away from (None: off)


@dataclass
class Trajectory:
    sampler: SamplerConfig
    steps: list[Step]
    detection: Detection  # the result of this very reconstruction

    @property
    def start(self) -> np.ndarray:
        """The partial-diffusion start x_t0 (pure noise when t0 >= 1000)."""
        return self.steps[0].x_t


def trajectory(detector: Detector, image: Any, threshold: Optional[float] = None,
               progress: Optional[Callable[[int, int], None]] = None, **overrides: Any) -> Trajectory:
    """Reconstruct one image, keeping every step's state (through the sampler's `trace` hook),
    and score it as `detect` does. With N = samples > 1 the steps are those of the first run
    (seed `seed`); the detection is of the mean of all N, as in `detect`."""
    sampler, scorer = detector.settings(**overrides)
    x = detector.prepare(image)
    if x.shape[0] != 1:
        raise ValueError(f"trajectory takes one image, got {x.shape[0]}.")
    steps: list[Step] = []

    def keep(step: dict) -> None:
        if step.get("sample", 0):
            return
        blurred = step["x0_blurred"]
        steps.append(Step(int(step["t"]), int(step["next_t"]), to_uint8(step["x_t"])[0],
                          to_uint8(step["x0"].clamp(-1, 1))[0],
                          None if blurred is None else to_uint8(blurred)[0]))

    detection = detector.inspect_batch(x, sampler, scorer, threshold, progress, trace=keep)[0]
    return Trajectory(sampler, steps, detection)


# ----------------------------------------------------------------------------- ablations


@dataclass
class Variant:
    key: str  # "full", "pure_noise", "no_conditioning", "no_guidance" or "with_guidance"
    title: str
    changes: dict  # the settings changed against the full method
    detection: Detection
    line: str = ""  # one line on what changed against the full method
    model_calls: int = 0


GUIDANCE_DEMO_SCALE = 0.5  # s shown when the model's own settings leave blur guidance off


# The rows of `variant_settings` by a name that does not change with the settings (the last row
# switches blur guidance off, or on where the settings leave it off).
VARIANT_ROWS = ("Full method", "Pure-noise start", "No conditioning", "Blur guidance switched")


def variant_settings(sampler: SamplerConfig) -> list[tuple[str, str, dict]]:
    """(key, title, changes) of the full method and each strategy switched off in turn. When the
    settings already leave blur guidance off (s = 0), its row switches it on instead."""
    rows = [("full", "Full method", {}),
            ("pure_noise", "Pure-noise start (t0 = 1000)", {"t0": 1000}),
            ("no_conditioning", "No conditioning (w = 0)", {"w": 0.0})]
    if sampler.guidance_scale > 0:
        rows.append(("no_guidance", "No blur guidance (s = 0)", {"guidance_scale": 0.0}))
    else:
        rows.append(("with_guidance", f"Blur guidance on (s = {GUIDANCE_DEMO_SCALE:g})",
                     {"guidance_scale": GUIDANCE_DEMO_SCALE}))
    return rows


def ablation_cost(detector: Detector, **overrides: Any) -> dict[str, int]:
    """What `ablations` will run: reconstructions and denoiser calls (without the full method's
    when it is passed in)."""
    sampler, _ = detector.settings(**overrides)
    calls = [sampler.replace(**changes).model_calls() for _, _, changes in variant_settings(sampler)]
    return {"reconstructions": len(calls), "model_calls": sum(calls), "full_model_calls": calls[0]}


_WHY = {
    "pure_noise": "starts from pure noise instead of the noised input, so only the conditioning ties the "
                  "reconstruction to this image (a small denoiser usually fails to rebuild the texture from there)",
    "no_conditioning": "drops the pull toward the input at every step, which lets the reconstruction drift from "
                       "the input",
    "no_guidance": "drops the push away from the blurred estimate",
    "with_guidance": "adds the push away from the blurred estimate (this model's settings leave it off)",
}


def _difference(d: Detection) -> float:
    return float(np.abs(d.reconstruction.astype(np.float32) - d.image.astype(np.float32)).mean() / 255)


def describe_change(key: str, variant: Detection, full: Detection, second_pass: int = 0) -> str:
    """One line: what the variant does and what it changed (measured) against the full method.
    `second_pass`: t2 of the settings' second pass (0: none), which every variant keeps."""
    if key == "full":
        then = (f", then the second pass from t2 = {second_pass} (which every variant below keeps)"
                if second_pass else "")
        return (f"The detector's settings{then}: the reconstruction differs from the input by {_difference(full):.3f} on "
                f"average; score {full.relative_score:.2f}x the threshold, {100 * full.mask.mean():.0f}% of the map "
                "above it.")
    ours, theirs = _difference(variant), _difference(full)
    compared = ("about the same as" if abs(ours - theirs) <= 0.1 * max(theirs, 1e-12) else
                "more than" if ours > theirs else "less than")
    return (f"{_WHY[key][0].upper()}{_WHY[key][1:]}: the reconstruction differs from the input by "
            f"{ours:.3f} on average, {compared} the full method's {theirs:.3f}; score "
            f"{variant.relative_score:.2f}x the threshold (full {full.relative_score:.2f}x), "
            f"{100 * variant.mask.mean():.0f}% of the map above it (full {100 * full.mask.mean():.0f}%).")


def ablations(detector: Detector, image: Any, threshold: Optional[float] = None,
              progress: Optional[Callable[[int, int], None]] = None, full: Optional[Detection] = None,
              **overrides: Any) -> list[Variant]:
    """The image with the full method and with each strategy switched off in turn (pure-noise
    start, w = 0, s = 0), each a Detection with one line on what changed. `full`: the full
    method's result when already computed (e.g. `trajectory(...).detection`), saving one
    reconstruction. `progress(done, total)` counts denoiser calls over all of them."""
    sampler, _ = detector.settings(**overrides)
    rows = variant_settings(sampler)
    calls = [sampler.replace(**changes).model_calls() for _, _, changes in rows]
    todo = [i for i in range(len(rows)) if not (i == 0 and full is not None)]
    total, done = sum(calls[i] for i in todo), 0
    results: dict[int, Detection] = {0: full} if full is not None else {}
    for i in todo:
        key, _, changes = rows[i]
        per_step = calls[i] / max(1, _num_steps(sampler.replace(**changes)))  # progress counts K x N steps
        step_cb = None
        if progress is not None:
            step_cb = lambda k, _n, o=done, m=per_step: progress(min(total, o + round(k * m)), total)  # noqa: E731
        results[i] = detector.detect(image, threshold=threshold, progress=step_cb, **{**overrides, **changes})[0]
        done += calls[i]
    return [Variant(key, title, changes, results[i], describe_change(key, results[i], results[0], sampler.repaint_t0),
                    calls[i])
            for i, (key, title, changes) in enumerate(rows)]


# ------------------------------------------------------------------------ bundled examples


@dataclass
class ExampleTruth:
    example: Path
    mask: Optional[np.ndarray]  # H x W bool ground truth (all False for a normal example)
    clean: Optional[np.ndarray]  # H x W x 3 uint8: the tile before its synthetic defect


_HASHES: dict[tuple[str, float], str] = {}


def _digest(path: Path) -> str:
    key = (str(path), path.stat().st_mtime)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _HASHES[key]


def example_truth(image_path: Any, examples: list[Path]) -> Optional[ExampleTruth]:
    """The ground truth of a bundled example, found by the file's content (an upload of the same
    file counts): its mask from examples/ground_truth/ and clean tile from examples/clean/,
    each None when not shipped. None when the file is no example."""
    if not isinstance(image_path, (str, Path)) or not Path(image_path).is_file():
        return None
    path = Path(image_path)
    if path.stat().st_size > 50 * 2**20:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for example in examples:
        if example.is_file() and example.stat().st_size == path.stat().st_size and _digest(example) == digest:
            # The package's own decoding: a mask pixel is a defect when non-zero, in any encoding.
            mask_path, clean_path = example.parent / "ground_truth" / example.name, example.parent / "clean" / example.name
            mask = load_mask(mask_path) if mask_path.is_file() else None
            clean = np.asarray(load_image(clean_path)) if clean_path.is_file() else None
            return ExampleTruth(example, mask, clean)
    return None


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127
