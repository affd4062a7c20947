"""Detector: the denoiser, the sampler settings, the scorer and its calibration, in one object.

    detector = Detector.from_pretrained("checkpoints/brick")       # or a Hub repo id
    results = detector.detect(["a.png", "b.png"])                    # one Detection per image
    results[0].score, results[0].is_anomalous, results[0].anomaly_map

Images are resized to the detector's square working size (`image_size`) before inspection,
as anomalib does for MVTec AD; maps, masks and reconstructions come back at that size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from diffusers import UNet2DModel

from . import __version__
from .hub import (
    CONFIG_NAME,
    CheckpointError,
    atomic_replace_dir,
    check_checkpoint_files,
    looks_like_repo_id,
    push_folder,
    resolve_checkpoint,
    temp_dir_beside,
)
from .card import render_model_card
from .images import ImageLike, to_batch, to_uint8
from .model import NUM_TRAIN_TIMESTEPS, build_scheduler, count_parameters, downsampling_factor
from .sampler import SamplerConfig, reconstruct, repaint, suspect_mask, timesteps
from .scorer import NORMAL_TAIL, THRESHOLD_RULES, Calibration, Scorer, ScorerConfig, build_backbone, normal_tail

# The newest cgdiff.json format this version reads. A checkpoint is written as format 1 (which
# every version reads) unless it stores a second pass (repaint_t0, calibration.mask_threshold):
# format 2, so that an older cgdiff says to upgrade instead of naming unknown settings.
FORMAT_VERSION = 2
MAX_IMAGE_SIZE = 2048
MAX_UNET_CHANNELS = 2048
MAX_UNET_PARAMETERS = 500_000_000  # DDAD's recipe ('paper' preset) has 30 M; 500 M is 2 GB of fp32
MAX_PIXEL_SCALE = 1e12  # c = max(D_f) / max(D_p): real ones are ~1-100; far larger overflows float32 maps
SAMPLER_KEYS = {f.name for f in fields(SamplerConfig)}
SCORER_KEYS = {"pixel_weight", "feature_weight", "feature_smoothing", "map_sigma"}


@dataclass
class Detection:
    """The result for one image, everything at the detector's working size."""

    image: np.ndarray  # H x W x 3 uint8, the resized input
    reconstruction: np.ndarray  # H x W x 3 uint8
    anomaly_map: np.ndarray  # H x W float32
    score: float  # max of the anomaly map
    threshold: float
    seconds: float

    @property
    def is_anomalous(self) -> bool:
        return self.score > self.threshold

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    @property
    def mask(self) -> np.ndarray:
        """Predicted defect pixels: where the map exceeds the image threshold (non-empty
        exactly when the verdict is anomalous)."""
        return self.anomaly_map > self.threshold

    @property
    def relative_score(self) -> float:
        """score / threshold: above 1 means anomalous."""
        return self.score / self.threshold if self.threshold > 0 else math.inf


class Detector:
    def __init__(
        self,
        unet: UNet2DModel,
        scorer: Scorer,
        sampler: SamplerConfig,
        image_size: int,
        calibration: Optional[Calibration] = None,
        info: Optional[dict[str, Any]] = None,
    ):
        self.unet = unet.eval().requires_grad_(False)
        self.scorer = scorer.eval()
        self.sampler = sampler
        self.image_size = int(image_size)
        self.calibration = calibration
        self.info: dict[str, Any] = dict(info or {})  # training, metrics, tuning, ... (JSON-able)
        self.alphas_cumprod = build_scheduler().alphas_cumprod
        # The fast path (see use_fast_path); all off: the reference path, plain fp32 eager.
        self.autocast_dtype: Optional[torch.dtype] = None
        self.channels_last = False
        self._fast_unet: Optional[torch.nn.Module] = None
        self._compiled = False
        self._runtime = None  # a cgdiff.runtime.RuntimeUNet when the U-Net runs outside PyTorch
        factor = downsampling_factor(unet)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {factor} for this U-Net.")

    # ----------------------------------------------------------------------------- settings
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> "Detector":
        self.unet.to(device)
        self.scorer.to(device)
        if self._fast_unet is not None:
            self._fast_unet.to(device)
        if self._runtime is not None and torch.device(device).type != "cpu":
            import warnings

            warnings.warn(f"the '{self._runtime.runtime}' runtime runs on the CPU: on {device} the detector uses "
                          "the reference path.", RuntimeWarning, stacklevel=2)
            self._runtime = None
        return self

    def use_fast_path(
        self,
        autocast_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_options: Optional[dict[str, Any]] = None,
        runtime: Optional[str] = None,
    ) -> "Detector":
        """Speed-ups of the U-Net calls, each switchable; calling it with no arguments restores
        the reference path (fp32, eager, contiguous), which `self.unet` always stays.

        autocast_dtype: torch.bfloat16 or torch.float16 mixed precision (on the CPU bf16 only,
            which CPUs with AVX512-BF16 or AMX run natively). channels_last: NHWC layout for a
            copy of the U-Net and its inputs.
        compile: `torch.compile` the U-Net (or its channels-last copy); `compile_options` go to
            torch.compile, e.g. {"mode": "max-autotune"} or {"backend": "eager"}.
        runtime: run the U-Net on a CPU inference runtime instead ("onnxruntime", "openvino",
            "openvino-bf16"; see `cgdiff.runtime`). When the runtime is missing or its export
            fails, the detector stays on the reference path and a warning says why. Excludes the
            other options. (`cgdiff.runtime.path_options` turns the CLI's --runtime choice,
            including the measured CPU default, into these arguments.)
        `cgdiff bench --speed` measures each against the reference and reports the largest
        difference in score they cause."""
        import copy

        # Every check first: a refused call leaves the detector as it was.
        if runtime is not None and (autocast_dtype is not None or channels_last or compile):
            raise ValueError("runtime= runs the U-Net outside PyTorch: it excludes autocast, channels_last and compile.")
        if autocast_dtype == torch.float16 and self.device.type == "cpu":
            raise ValueError("fp16 autocast is not for the CPU; use torch.bfloat16 there.")
        if (autocast_dtype == torch.bfloat16 and self.device.type == "cpu") or runtime == "openvino-bf16":
            from .runtime import native_bf16

            if native_bf16() is False:
                import warnings

                warnings.warn("this CPU has neither AVX512-BF16 nor AMX, so bf16 is emulated and runs slower "
                              "than fp32 (2 to 3 times the time per image on such a Xeon); the CPU default "
                              "(--runtime auto) is faster here.", RuntimeWarning, stacklevel=2)
        if runtime is not None:
            loaded = _load_runtime(self.unet, runtime)  # None (with a warning) when it cannot be had
            self.autocast_dtype, self.channels_last = None, False
            self._fast_unet, self._compiled, self._runtime = None, False, loaded
            return self
        self.autocast_dtype = autocast_dtype
        self.channels_last = bool(channels_last)
        self._runtime = None
        fast: Optional[torch.nn.Module] = None
        if channels_last:
            fast = copy.deepcopy(self.unet).to(memory_format=torch.channels_last)
        if compile:
            fast = torch.compile(fast if fast is not None else self.unet, **(compile_options or {}))
        self._fast_unet = fast
        self._compiled = bool(compile)
        return self

    def fast_path(self) -> dict[str, Any]:
        """The speed-ups in use (all off / None on the reference path)."""
        return {"autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
                "channels_last": self.channels_last,
                "compile": self._compiled,
                "runtime": self._runtime.runtime if self._runtime is not None else None}

    @property
    def threshold(self) -> float:
        if self.calibration is None:
            raise RuntimeError("this detector is not calibrated yet: call detector.calibrate(normal_images).")
        return self.calibration.threshold

    def settings(self, **overrides: Any) -> tuple[SamplerConfig, ScorerConfig]:
        """Sampler and scorer settings with per-call overrides (None means 'keep')."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(overrides) - SAMPLER_KEYS - SCORER_KEYS
        if unknown:
            raise ValueError(
                f"unknown setting(s) {sorted(unknown)}; sampler: {sorted(SAMPLER_KEYS)}, scorer: {sorted(SCORER_KEYS)}."
            )
        sampler = self.sampler.replace(**{k: v for k, v in overrides.items() if k in SAMPLER_KEYS})
        scorer_values = {**self.scorer.config.to_dict(), **{k: v for k, v in overrides.items() if k in SCORER_KEYS}}
        return sampler, ScorerConfig(**scorer_values)

    def calibrated_for(self, sampler: SamplerConfig, scorer: ScorerConfig) -> bool:
        """Whether maps made with these settings are comparable with the calibration's normal
        scores: the stored settings, the seed aside (it changes the start noise, not the
        distribution of the scores)."""
        stored_sampler, stored_scorer = self.settings()
        return sampler.replace(seed=stored_sampler.seed) == stored_sampler and scorer == stored_scorer

    # ---------------------------------------------------------------------------- inference
    def _eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._runtime is not None:
            return self._runtime(x, t)
        unet = self._fast_unet if self._fast_unet is not None else self.unet
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return unet(x, t).sample.float()
        return unet(x, t).sample

    def prepare(self, images: Any) -> torch.Tensor:
        """Image-likes (or a B x 3 x H x W tensor in [-1, 1]) -> batch at the working size."""
        return to_batch(images, self.image_size).to(self.device)

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, sampler: Optional[SamplerConfig] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        trace: Optional[Callable[[dict], None]] = None,
    ) -> torch.Tensor:
        """Reconstructions of a batch x (B x 3 x S x S in [-1, 1], see `prepare`); `trace` sees
        every step's tensors of the first pass (see `cgdiff.sampler.reconstruct`).

        With the second pass on (sampler.repaint_t0 > 0) the first reconstruction is scored with
        the stored scorer settings, and the pixels whose map nears the first pass's threshold
        (`calibration.mask_threshold`; for a detector calibrated without the second pass, the
        normal-tail threshold of its normal scores, as `calibrate` would set it) are painted over (`cgdiff.sampler.repaint`); that needs a calibration
        (RuntimeError without one). `progress(done, total)` counts the steps of both passes."""
        sampler = sampler or self.sampler
        extra = {"trace": trace} if trace is not None else {}
        first = sampler.replace(repaint_t0=0) if sampler.repaint_t0 else sampler
        n_first = _num_steps(first)
        first_progress = None if progress is None else (lambda i, _n: progress(i, _num_steps(sampler)))
        x_rec = reconstruct(self._eps, x, self.alphas_cumprod, first, first_progress, **extra)
        if not sampler.repaint_t0:
            return x_rec
        if self.calibration is None:
            raise RuntimeError("the second pass (repaint_t0 > 0) needs a calibrated detector: call "
                               "detector.calibrate(normal_images) first.")
        return self._repaint(x, self.score_maps(x, x_rec), sampler, _mask_threshold(self.calibration),
                             None if progress is None else (lambda i, _n: progress(n_first + i, _num_steps(sampler))))

    def _repaint(self, x: torch.Tensor, first_maps: torch.Tensor, sampler: SamplerConfig, mask_threshold: float,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """The second pass on x, its mask drawn from the first reconstruction's maps (B x H x W,
        stored scorer settings) relative to `mask_threshold`."""
        mask = suspect_mask(first_maps / max(mask_threshold, 1e-12))
        return repaint(self._eps, x, mask, self.alphas_cumprod, sampler, progress)

    @torch.no_grad()
    def score_maps(
        self, x: torch.Tensor, x_rec: torch.Tensor, scorer: Optional[ScorerConfig] = None
    ) -> torch.Tensor:
        """Anomaly maps A (B x H x W) for images and their reconstructions."""
        if self.calibration is None:
            raise RuntimeError("this detector is not calibrated yet: call detector.calibrate(normal_images).")
        d_pixel, d_feat = self.scorer.distances(x, x_rec, scorer)
        return self.scorer.combine(d_pixel, d_feat, self.calibration.pixel_scale, scorer)

    @torch.no_grad()
    def detect(
        self,
        images: ImageLike | Sequence[ImageLike] | torch.Tensor,
        batch_size: int = 4,
        threshold: Optional[float] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        **overrides: Any,
    ) -> list[Detection]:
        """Inspect images. `overrides` change sampler/scorer settings for this call only
        (t0, steps, w, guidance_scale, blur_sigma, eta, seed, pixel_weight, ...)."""
        sampler, scorer = self.settings(**overrides)
        x_all = self.prepare(images)
        n = x_all.shape[0]
        results: list[Detection] = []
        total_steps = math.ceil(n / batch_size) * _num_steps(sampler)
        done_before = 0
        for start in range(0, n, batch_size):
            x = x_all[start : start + batch_size]
            step_cb = None
            if progress is not None:
                offset = done_before
                step_cb = lambda i, _k, o=offset: progress(o + i, total_steps)  # noqa: E731
            results += self.inspect_batch(x, sampler, scorer, threshold, step_cb)
            done_before += _num_steps(sampler)
        return results

    @torch.no_grad()
    def inspect_batch(self, x: torch.Tensor, sampler: SamplerConfig, scorer: ScorerConfig,
                      threshold: Optional[float] = None, progress: Optional[Callable[[int, int], None]] = None,
                      trace: Optional[Callable] = None) -> list[Detection]:
        """Reconstruct and score one prepared batch `x` (B x 3 x H x W in [-1, 1]) at the
        given settings: one Detection per image (its seconds: this call's time per image).
        `threshold`: None for the calibrated one. `progress` and `trace` go to `reconstruct`.
        Raises ValueError when a map is not finite."""
        started = time.perf_counter()
        threshold = self.threshold if threshold is None else float(threshold)
        x_rec = self.reconstruct(x, sampler, progress, trace=trace)
        maps = self.score_maps(x, x_rec, scorer)
        _check_finite(maps, sampler)
        per_image = (time.perf_counter() - started) / x.shape[0]
        return [Detection(xi, ri, mi, float(mi.max()), threshold, per_image)
                for xi, ri, mi in zip(to_uint8(x), to_uint8(x_rec), maps.float().cpu().numpy())]

    # -------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate(
        self, normal_images: Any, batch_size: int = 4, threshold_sigmas: float = 3.0,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Calibration:
        """Fit the pixel/feature balance c and the threshold on normal images, and store them.
        Uses the detector's current sampler and scorer settings. With the second pass
        (repaint_t0 > 0), c and the mask's threshold (`mask_threshold`, by the same rule) come
        from the first pass's maps, the threshold from the second's. `progress(done, total)`
        counts images (each twice with the second pass)."""
        x_all = self.prepare(normal_images)
        n = x_all.shape[0]
        two_pass = self.sampler.repaint_t0 > 0
        total = 2 * n if two_pass else n
        first = self.sampler.replace(repaint_t0=0)
        d_p, d_f = [], []
        for start in range(0, n, batch_size):
            x = x_all[start : start + batch_size]
            dp, df = self.scorer.distances(x, self.reconstruct(x, first))
            _check_finite(dp + df, self.sampler)
            d_p.append(dp.cpu())
            d_f.append(df.cpu())
            if progress is not None:
                progress(min(start + batch_size, n), total)
        self.calibration = self.scorer.calibrate(torch.cat(d_p), torch.cat(d_f), threshold_sigmas)
        if two_pass:
            # The first pass fixed c and the mask's threshold (its maps from the distances above);
            # the threshold is the second's.
            cal = self.calibration
            first_maps = [self.scorer.combine(dp, df, cal.pixel_scale) for dp, df in zip(d_p, d_f)]
            mask_threshold, d_p, d_f = cal.threshold, [], []
            for i, start in enumerate(range(0, n, batch_size)):
                x = x_all[start : start + batch_size]
                dp, df = self.scorer.distances(x, self._repaint(x, first_maps[i], self.sampler, mask_threshold))
                _check_finite(dp + df, self.sampler)
                d_p.append(dp.cpu())
                d_f.append(df.cpu())
                if progress is not None:
                    progress(n + min(start + batch_size, n), total)
            self.calibration = self.scorer.calibrate(torch.cat(d_p), torch.cat(d_f), threshold_sigmas,
                                                     pixel_scale=self.calibration.pixel_scale)
            self.calibration.mask_threshold = mask_threshold
        # Notes of an earlier calibration (`cgdiff calibrate`, `cgdiff tune`, `cgdiff train`) name
        # images this one did not necessarily use: the caller records its own afterwards.
        for key in ("calibration_normals", "calibration_command"):
            self.info.pop(key, None)
        for section in ("tuning", "training"):
            if isinstance(self.info.get(section), dict):
                self.info[section].pop("calibration_normals", None)
        return self.calibration

    def adapt_backbone(
        self, normal_images: Any, epochs: int = 8, batch_size: int = 4, progress: bool = False, **kwargs: Any
    ) -> list[float]:
        """DDAD's optional domain adaptation of the feature extractor on normal images, then
        recalibration (the feature distances change). Returns the loss per epoch."""
        from .scorer import adapt_backbone

        x = self.prepare(normal_images)
        x_rec = torch.cat([self.reconstruct(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        with torch.enable_grad():
            history = adapt_backbone(self.scorer.backbone, x, x_rec, epochs=epochs, batch_size=batch_size,
                                     progress=progress, **kwargs)
        self.info["backbone_adaptation"] = {"epochs": epochs, "n_images": int(x.shape[0]),
                                            "loss": [round(v, 5) for v in history]}
        self.calibrate(x, batch_size=batch_size)
        return history

    # ------------------------------------------------------------------------- persistence
    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": 2 if self.sampler.repaint_t0 or (self.calibration and self.calibration.mask_threshold) else 1,
            "cgdiff_version": __version__,
            "image_size": self.image_size,
            "sampler": self.sampler.to_dict(),
            "scorer": self.scorer.config.to_dict(),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "backbone_adapted": bool(getattr(self.scorer.backbone, "adapted", False)),
            **self.info,
        }

    def save_pretrained(self, path: str | Path, overwrite: bool = False, model_card: bool = True) -> Path:
        """Write the checkpoint folder. It is written beside `path` and renamed into place only
        when complete, so an interrupted save never leaves a half-written checkpoint."""
        target = Path(path)
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"'{target}' exists and is a file; choose a folder path for the checkpoint.")
        if target.exists() and (target / CONFIG_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"'{target}' already holds a checkpoint; pass overwrite=True (CLI: --overwrite) to replace it."
            )
        tmp = temp_dir_beside(target)
        try:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            build_scheduler().save_pretrained(tmp / "scheduler")
            config = self.config_dict()
            if config["backbone_adapted"]:
                from safetensors.torch import save_file

                state = {k: v.contiguous() for k, v in self.scorer.backbone.body.state_dict().items()}
                save_file(state, tmp / "backbone.safetensors")
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
            if model_card:
                (tmp / "README.md").write_text(render_model_card(config, config.get("name") or target.name))
            atomic_replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, device: Optional[str | torch.device] = None, revision: Optional[str] = None,
        **hub_options: Any,
    ) -> "Detector":
        """Load a checkpoint folder, a Hub repo id, or a registry name ("brick"). Weights load
        from safetensors only."""
        from .registry import known_checkpoints, resolve

        if not Path(name_or_path).exists():
            name_or_path = resolve(str(name_or_path))
        try:
            folder = resolve_checkpoint(name_or_path, revision=revision, **hub_options)
        except CheckpointError as e:
            if Path(name_or_path).exists():
                raise
            extra = []
            if looks_like_repo_id(str(name_or_path)):  # or a folder path mistyped, or relative to elsewhere
                extra.append(f"No folder '{name_or_path}' exists under {Path.cwd()} either.")
            names = [entry.name for entry in known_checkpoints()]
            if names:
                extra.append(f"Registry names: {', '.join(names)}.")
            raise CheckpointError(" ".join([str(e), *extra])) from None
        check_checkpoint_files(folder)
        config = read_config(folder)
        unet_config = _read_json(folder / "unet" / "config.json")
        _check_unet_config(unet_config, folder)
        try:
            unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        except Exception as e:  # diffusers raises several types for a broken folder
            raise CheckpointError(f"cannot load the U-Net from '{folder / 'unet'}': {type(e).__name__}: {e}") from None
        if not all(torch.isfinite(p).all() for p in unet.parameters()):
            raise CheckpointError(f"the U-Net weights in '{folder / 'unet'}' hold NaN or infinite values.")
        scorer_config = ScorerConfig(**config["scorer"])
        backbone = build_backbone(scorer_config.backbone)
        if config.get("backbone_adapted"):
            adapted = folder / "backbone.safetensors"
            if not adapted.is_file():
                raise CheckpointError(f"'{folder}' says its backbone was adapted but has no backbone.safetensors.")
            from safetensors.torch import load_file

            try:
                backbone.body.load_state_dict(load_file(adapted), strict=True)
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f"backbone.safetensors in '{folder}' does not fit '{scorer_config.backbone}': {e}") from None
            backbone.adapted = True
        calibration = Calibration(**config["calibration"]) if config.get("calibration") else None
        info = {k: v for k, v in config.items() if k not in _CORE_KEYS}
        info["source"] = str(name_or_path)
        detector = cls(
            unet, Scorer(scorer_config, backbone), SamplerConfig(**config["sampler"]),
            config["image_size"], calibration, info,
        )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return detector.to(device)

    def push_to_hub(self, repo_id: str, token: Optional[str] = None, private: bool = False,
                    commit_message: str = "Upload cgdiff detector", endpoint: Optional[str] = None) -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / repo_id.split("/")[-1]
            self.info["hub_repo_id"] = repo_id
            self.save_pretrained(folder)
            return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message,
                               endpoint=endpoint)

    def describe(self) -> str:
        s = self.sampler
        return (
            f"U-Net {count_parameters(self.unet) / 1e6:.1f} M params, {self.image_size} px, backbone "
            f"{self.scorer.config.backbone}; t0={s.t0}, K={s.steps}, w={s.w}, s={s.guidance_scale}, "
            f"blur sigma={s.blur_sigma}, eta={s.eta}"
            + (f", the mean of N={s.samples} reconstructions" if s.samples > 1 else "")
            + (f", suspect pixels re-painted from t2={s.repaint_t0} in K2={s.repaint_steps} steps"
               if s.repaint_t0 > 0 else "")
        )


def _mask_threshold(calibration: Calibration, threshold_sigmas: float = 3.0) -> float:
    """The first pass's threshold the second pass's mask is drawn against: the stored one, or
    for a calibration made without the second pass its normal-tail threshold (max(largest
    normal score, mean + 3 sd), as `Detector.calibrate` sets it), or its threshold when it
    keeps no normal scores."""
    if calibration.mask_threshold:
        return calibration.mask_threshold
    if calibration.normal_scores:
        return normal_tail(max(calibration.normal_scores), calibration.score_mean, calibration.score_std,
                           threshold_sigmas)
    return calibration.threshold


def _load_runtime(unet: torch.nn.Module, runtime: str):
    """A RuntimeUNet for `runtime`, or None with a warning when it cannot be had (the
    reference path then runs)."""
    import warnings

    from . import runtime as rt

    device = next(unet.parameters()).device
    if runtime not in rt.RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(rt.RUNTIMES)}.")
    if device.type != "cpu":
        warnings.warn(f"the '{runtime}' runtime runs on the CPU and this detector is on {device}: using the "
                      "reference path there.", RuntimeWarning, stacklevel=3)
        return None
    try:
        return rt.RuntimeUNet(unet, runtime)
    except rt.RuntimeUnavailable as e:
        warnings.warn(f"{e} Using the reference path (PyTorch, fp32).", RuntimeWarning, stacklevel=3)
        return None


_CORE_KEYS = {"format_version", "cgdiff_version", "image_size", "sampler", "scorer", "calibration", "backbone_adapted"}


def _num_steps(sampler: SamplerConfig) -> int:
    """Progress steps of one reconstruction: K steps per run, N runs, plus K2 of the second pass."""
    first = len(timesteps(sampler.t0, sampler.steps, NUM_TRAIN_TIMESTEPS)) * sampler.samples
    return first + sampler.repaint_model_calls()  # one call a step


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object.")
    return data


def _check_unet_config(cfg: dict, folder: Path) -> None:
    channels = cfg.get("block_out_channels")
    if not (isinstance(channels, list) and channels and all(isinstance(c, int) and 0 < c <= MAX_UNET_CHANNELS for c in channels)):
        raise CheckpointError(
            f"unet/config.json in '{folder}' has an invalid block_out_channels {channels!r} "
            f"(a list of whole numbers up to {MAX_UNET_CHANNELS})."
        )
    if len(channels) > 8 or not isinstance(cfg.get("layers_per_block", 2), int) or not 0 < cfg.get("layers_per_block", 2) <= 8:
        raise CheckpointError(f"unet/config.json in '{folder}' describes an absurd U-Net size; refusing to build it.")
    if cfg.get("in_channels", 3) != 3 or cfg.get("out_channels", 3) != 3:
        raise CheckpointError(f"unet/config.json in '{folder}' is not a 3-channel image denoiser.")
    # Every other field (embedding sizes, class embeddings, block types, ...) is checked by
    # building the U-Net on the meta device: no memory is allocated, the size is exact.
    try:
        with torch.device("meta"):
            shape = UNet2DModel.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a bad config
        raise CheckpointError(f"unet/config.json in '{folder}' does not describe a valid U-Net: "
                              f"{type(e).__name__}: {e}") from None
    n = sum(p.numel() for p in shape.parameters())
    if n > MAX_UNET_PARAMETERS:
        raise CheckpointError(
            f"unet/config.json in '{folder}' describes a U-Net of {n / 1e6:,.0f} M parameters, above the "
            f"{MAX_UNET_PARAMETERS / 1e6:.0f} M limit; refusing to build it."
        )


def _check_finite(values: torch.Tensor, sampler: SamplerConfig) -> None:
    """NaN or inf in the distances or maps would make every verdict 'normal' in silence."""
    if not torch.isfinite(values).all():
        raise ValueError(
            f"the anomaly map came out NaN or infinite with the settings t0={sampler.t0}, K={sampler.steps}, "
            f"w={sampler.w:g}, s={sampler.guidance_scale:g}: the reconstruction diverged (lower w or s), "
            "or the checkpoint is broken."
        )


def read_config(folder: Path) -> dict[str, Any]:
    """Read and validate cgdiff.json; every problem is reported by name."""
    config = _read_json(folder / CONFIG_NAME)
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{CONFIG_NAME} in '{folder}' has no integer format_version.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"'{folder}' was written by a newer cgdiff (format {version}; this is {__version__}, format "
            f"{FORMAT_VERSION}). Upgrade cgdiff: pip install -U cgdiff."
        )
    missing = [k for k in ("image_size", "sampler", "scorer") if k not in config]
    if missing:
        raise CheckpointError(f"{CONFIG_NAME} in '{folder}' is missing {', '.join(missing)}.")
    size = config["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= MAX_IMAGE_SIZE:
        raise CheckpointError(f"{CONFIG_NAME} in '{folder}': image_size must be a whole number in [16, {MAX_IMAGE_SIZE}], got {size!r}.")
    for section, allowed in (("sampler", SAMPLER_KEYS), ("scorer", SCORER_KEYS | {"backbone"})):
        values = config[section]
        if not isinstance(values, dict):
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': '{section}' must be an object.")
        unknown = set(values) - allowed
        if unknown:
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': unknown {section} setting(s) {sorted(unknown)}.")
        for key, value in values.items():
            if key == "backbone":
                if not isinstance(value, str):
                    raise CheckpointError(f"{CONFIG_NAME} in '{folder}': scorer.backbone must be a string.")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CheckpointError(f"{CONFIG_NAME} in '{folder}': {section}.{key} must be a number, got {value!r}.")
    for key in ("t0", "steps", "seed", "samples", "repaint_t0", "repaint_steps", "feature_smoothing"):
        for section in ("sampler", "scorer"):
            if key in config[section] and not isinstance(config[section][key], int):
                raise CheckpointError(f"{CONFIG_NAME} in '{folder}': {section}.{key} must be a whole number.")
    try:
        SamplerConfig(**config["sampler"])
        ScorerConfig(**config["scorer"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{CONFIG_NAME} in '{folder}': {e}") from None
    calibration = config.get("calibration")
    if calibration is not None:
        needed = {"pixel_scale", "threshold", "score_mean", "score_std", "n_images"}
        if not isinstance(calibration, dict) or not needed <= set(calibration):
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration must hold {sorted(needed)}.")
        for key in needed:
            value = calibration[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.{key} must be a finite number.")
        if not 0 < calibration["pixel_scale"] <= MAX_PIXEL_SCALE:
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.pixel_scale must be above 0 and at most "
                                  f"{MAX_PIXEL_SCALE:g}, got {calibration['pixel_scale']!r}.")
        mask_threshold = calibration.get("mask_threshold")
        if mask_threshold is not None and (isinstance(mask_threshold, bool) or not isinstance(mask_threshold, (int, float))
                                           or not math.isfinite(mask_threshold) or mask_threshold <= 0):
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.mask_threshold must be a number above 0.")
        for key in ("threshold", "score_std"):
            if calibration[key] < 0:
                raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.{key} must be >= 0, got {calibration[key]!r}.")
        if not isinstance(calibration["n_images"], int) or calibration["n_images"] < 1:
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.n_images must be a whole number >= 1.")
        optional = {f.name for f in dataclasses.fields(Calibration)} - needed
        unknown = set(calibration) - needed - optional
        if unknown:
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': unknown calibration field(s) {sorted(unknown)}.")
        if calibration.get("threshold_rule", NORMAL_TAIL) not in THRESHOLD_RULES:
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.threshold_rule must be one of "
                                  f"{', '.join(THRESHOLD_RULES)}, got {calibration['threshold_rule']!r}.")
        for key in ("normal_scores", "anomalous_scores"):
            values = calibration.get(key, [])
            if not isinstance(values, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.{key} must be a list of finite numbers.")
        f1 = calibration.get("validation_f1")
        if f1 is not None and (isinstance(f1, bool) or not isinstance(f1, (int, float)) or not 0 <= f1 <= 1):
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.validation_f1 must be a number in [0, 1].")
        if not isinstance(calibration.get("anomalous_source", ""), str):
            raise CheckpointError(f"{CONFIG_NAME} in '{folder}': calibration.anomalous_source must be text.")
    return config
