"""Conditioned-guided reconstruction: the paper's three strategies, in one place.

Notation as in the paper (and DESIGN.md): input y in [-1, 1], abar_t the cumulative product
of (1 - beta). At every step t -> n of a K-step DDIM schedule from t0 down to 0:

    e    = eps(x_t, t)
    y_t  = sqrt(abar_t) y + sqrt(1 - abar_t) e                      conditioning (DDAD)
    ê    = e - w sqrt(1 - abar_t) (y_t - x_t)
    x0   = clip((x_t - sqrt(1 - abar_t) ê) / sqrt(abar_t), -1, 1)   blur guidance (SAG,
    x_tb = sqrt(abar_t) blur(x0) + sqrt(1 - abar_t) ê                 global-blur form)
    ê    = ê + s (ê - eps(x_tb, t))
    x0   = (x_t - sqrt(1 - abar_t) ê) / sqrt(abar_t)                 DDIM update
    c1   = eta sqrt((1 - abar_t / abar_n) (1 - abar_n) / (1 - abar_t)),  c2 = sqrt(1 - abar_n - c1^2)
    x_n  = sqrt(abar_n) x0 + c1 z + c2 ê

starting from the partial diffusion x = sqrt(abar_t0) y + sqrt(1 - abar_t0) z. The result is
x at n = -1, where abar_-1 = 1. Each strategy switches off on its own: t0 >= T starts from
pure noise, w = 0 removes the conditioning, s = 0 the blur guidance (and its model call).

With N = `samples` > 1 the reconstruction is the mean of N such runs, seeded seed .. seed + N - 1
(a different start noise z each): a Monte Carlo estimate of the reconstruction's expectation,
which leaves out the sampler's own variance (N = 1, the paper's method, is the default). The runs
share U-Net calls (batched up to MAX_BATCH_PIXELS pixels a call), which on a CPU costs less than one run
after another; each run's numbers are those it gets alone, up to float rounding.

With t2 = `repaint_t0` > 0 a second pass follows (off by default; not in the paper): the first
reconstruction's anomaly map marks the suspect pixels (`suspect_mask`), and a K2-step DDIM run
(`repaint_steps`, eta 0, unconditioned, no blur guidance) from the input noised to t2 fills them
with the denoiser alone, while every step's state outside the mask is replaced by the input
noised to that step (RePaint, Lugmayr et al., CVPR 2022, without its resampling loops): the tile
around a defect stays as it is and the defect is painted over with normal texture. `repaint`
runs it; `cgdiff.detector.Detector.reconstruct` makes the mask (the map needs the scorer).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .settings import MAX_SAMPLES, MAX_SIGMA, SamplerConfig  # noqa: F401 (re-exported)


# The N runs of an averaged reconstruction share U-Net calls, batched up to this many pixels
# per call (rows x H x W, rows = images x runs: 8 rows at 128 px, 2 at 256 px); a batch of B
# images of H x W runs max(1, MAX_BATCH_PIXELS // (B H W)) at a time, one run per call once
# the images alone fill it. Measured in BENCHMARKS.md ("Speed": benchmarks/batched_runs.py).
MAX_BATCH_PIXELS = 8 * 128 * 128


def timesteps(t0: int, steps: int, num_train_timesteps: int) -> list[int]:
    """K integer steps evenly spaced from t0 (clamped to T - 1) down to 0, no repeats."""
    start = min(t0, num_train_timesteps - 1)
    steps = min(steps, start + 1)
    if steps == 1:
        return [start]
    return [round(start - i * start / (steps - 1)) for i in range(steps)]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; kernel size 2 * ceil(3 sigma) + 1."""
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    pad_h = min(radius, x.shape[-2] - 1)
    pad_w = min(radius, x.shape[-1] - 1)
    if pad_h < radius or pad_w < radius:  # tiny images: reflect cannot pad past the edge
        x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    else:
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(x, kx, groups=c)
    return F.conv2d(x, ky, groups=c)


NoiseModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_image_noise(shape, generators, device, dtype) -> torch.Tensor:
    # One generator per image, all seeded alike: an image gets the same noise alone or in
    # any batch, so its reconstruction (and score) does not depend on its neighbours.
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(
        device=device, dtype=dtype
    )


@torch.no_grad()
def reconstruct(
    eps_model: NoiseModel,
    y: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: SamplerConfig,
    progress: Optional[Callable[[int, int], None]] = None,
    trace: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Reconstruct a batch y (B x 3 x H x W in [-1, 1]) without its anomalies; B x 3 x H x W
    in [-1, 1]. With config.samples = N > 1, the mean of N runs seeded seed .. seed + N - 1.

    `eps_model(x, t)` predicts the noise for a batch x at integer steps t (a B-long tensor).
    `progress(done, total)` is called after every model step, counting the steps of every run
    (total: K times N; runs batched into the same U-Net calls advance it together).
    `trace(step)` is called after every model step with a dict of the step's tensors, for
    inspection and teaching: "t", "next_t" (-1 at the end), "x_t" (the state the step started
    from; at the first step, the partial-diffusion start), "x0" (the clean-image estimate of
    the final noise estimate ê), "x0_blurred" (the blurred estimate the guidance compared
    with, or None when it is off), "x_next" (the state after the step) and "sample" (which of
    the N runs, from 0; steps of runs batched together come run by run after each step).
    Raises ValueError for invalid settings.
    """
    config.validate()
    per_run = len(timesteps(config.t0, config.steps, alphas_cumprod.shape[0]))
    total = per_run * config.samples
    b = y.shape[0]
    chunk = max(1, MAX_BATCH_PIXELS // max(1, y[0, 0].numel() * b))  # runs per U-Net call
    runs, done = [], 0
    for first in range(0, config.samples, chunk):
        ks = list(range(first, min(first + chunk, config.samples)))
        step_cb = None
        if progress is not None:
            step_cb = lambda i, _n, o=done, m=len(ks): progress(o + i * m, total)  # noqa: E731
        step_trace = None
        if trace is not None:
            step_trace = lambda step, ks=ks: _trace_runs(trace, step, ks, b)  # noqa: E731
        seeds = [_seed(config.seed + k) for k in ks]
        out = _reconstruct_runs(eps_model, y, alphas_cumprod, config, seeds, step_cb, step_trace)
        runs.extend(out.split(b))
        done += per_run * len(ks)
    return runs[0] if len(runs) == 1 else torch.stack(runs).mean(0)


def _seed(value: int) -> int:
    return value if value < 2**64 else value - 2**64  # wraps like a uint64


def _trace_runs(trace, step: dict, ks: list[int], b: int) -> None:
    """Report a step of runs batched together as one step per run, tagged with its run (each
    run's tensors copied out, so keeping one run's steps does not keep the others')."""
    if len(ks) == 1:
        trace({**step, "sample": ks[0]})
        return
    for j, k in enumerate(ks):
        trace({**{key: (v[j * b:(j + 1) * b].clone() if isinstance(v, torch.Tensor) else v) for key, v in step.items()},
               "sample": k})


def _reconstruct_runs(eps_model: NoiseModel, y: torch.Tensor, alphas_cumprod: torch.Tensor, config: SamplerConfig,
                      seeds: list[int], progress, trace) -> torch.Tensor:
    """Runs of the sampler (see `reconstruct`), one per seed, batched into the same U-Net calls:
    y repeated once per seed (run-major), each run with the start noise of its seed."""
    T = alphas_cumprod.shape[0]
    abar = alphas_cumprod.to(device=y.device, dtype=torch.float64)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds for _ in range(y.shape[0])]
    if len(seeds) > 1:
        y = y.repeat(len(seeds), 1, 1, 1)
    noise = _per_image_noise(y.shape, generators, y.device, y.dtype)

    # 1. Partial diffusion: start from y noised to t0 (pure noise when t0 >= T).
    if config.t0 >= T:
        x = noise
    else:
        a0 = abar[config.t0].item()
        x = math.sqrt(a0) * y + math.sqrt(1 - a0) * noise

    schedule = timesteps(config.t0, config.steps, T)
    for i, t in enumerate(schedule):
        a_t = abar[t].item()
        a_n = abar[schedule[i + 1]].item() if i + 1 < len(schedule) else 1.0
        sa, s1a = math.sqrt(a_t), math.sqrt(1 - a_t)
        t_batch = torch.full((y.shape[0],), t, device=y.device, dtype=torch.long)

        e = eps_model(x, t_batch)
        # 2. Conditioning: pull the noise estimate toward the input's own noisy version.
        if config.w > 0:
            y_t = sa * y + s1a * e
            e = e - config.w * s1a * (y_t - x)
        # 3. Blur guidance: push away from what the model predicts for a blurred x0.
        x0_blurred = None
        if config.guidance_scale > 0:
            x0 = ((x - s1a * e) / sa).clamp(-1, 1)
            x0_blurred = gaussian_blur(x0, config.blur_sigma)
            x_tb = sa * x0_blurred + s1a * e
            e = e + config.guidance_scale * (e - eps_model(x_tb, t_batch))

        # DDIM update with the guided noise estimate.
        x0 = (x - s1a * e) / sa
        c1 = config.eta * math.sqrt(max(0.0, (1 - a_t / a_n) * (1 - a_n) / (1 - a_t))) if a_n < 1 else 0.0
        c2 = math.sqrt(max(0.0, 1 - a_n - c1**2))
        x_t = x
        x = math.sqrt(a_n) * x0 + c2 * e
        if c1 > 0:
            x = x + c1 * _per_image_noise(y.shape, generators, y.device, y.dtype)
        if trace is not None:
            trace({"t": t, "next_t": schedule[i + 1] if i + 1 < len(schedule) else -1, "x_t": x_t,
                   "x0": x0, "x0_blurred": x0_blurred, "x_next": x})
        if progress is not None:
            progress(i + 1, len(schedule))
    return x.clamp(-1, 1)


# The suspect pixels of the second pass: the mask ramps from 0 to 1 as the first map goes from
# SUSPECT_LOW to SUSPECT_HIGH times the threshold, then grows by SUSPECT_GROW px and is blurred
# by SUSPECT_SIGMA px, so the painted region covers a defect's rim and blends into the tile.
SUSPECT_LOW, SUSPECT_HIGH = 0.6, 0.9
SUSPECT_GROW, SUSPECT_SIGMA = 2, 2.0


def suspect_mask(relative_map: torch.Tensor, low: float = SUSPECT_LOW, high: float = SUSPECT_HIGH,
                 grow: int = SUSPECT_GROW, sigma: float = SUSPECT_SIGMA) -> torch.Tensor:
    """The second pass's mask: B x H x W anomaly maps divided by the (first pass's) threshold
    -> B x 1 x H x W in [0, 1] (1: painted over by the denoiser, 0: the input kept): a ramp from
    `low` to `high`, grown by `grow` px and blurred by `sigma` px (0: neither). A normal image
    whose map stays under `low` times the threshold gets an empty mask. Raises ValueError unless
    low < high, grow >= 0 and sigma >= 0."""
    if not (low < high and grow >= 0 and sigma >= 0):
        raise ValueError(f"the suspect mask needs low < high, grow >= 0 and sigma >= 0; got low={low}, high={high}, "
                         f"grow={grow}, sigma={sigma}.")
    m = ((relative_map.float()[:, None] - low) / (high - low)).clamp(0, 1)
    if grow > 0:
        m = F.max_pool2d(m, 2 * grow + 1, 1, grow)
    return gaussian_blur(m, sigma).clamp(0, 1) if sigma > 0 else m


@torch.no_grad()
def repaint(
    eps_model: NoiseModel,
    y: torch.Tensor,
    mask: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    config: SamplerConfig,
    progress: Optional[Callable[[int, int], None]] = None,
    start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The second pass (see the module docstring): y (B x 3 x H x W in [-1, 1]) with the pixels
    of `mask` (B x 1 x H x W in [0, 1], see `suspect_mask`) painted over by a K2-step DDIM run
    (eta 0, no conditioning or blur guidance) from t2 = config.repaint_t0, the input noised to
    each step kept outside; B x 3 x H x W in [-1, 1], equal to y where the mask is 0. Seeded by
    config.seed (the same start noise as the first pass's first run). `start` (like y; default y)
    is the image noised to t2 to begin the run, e.g. y with the masked pixels filled in first.
    `progress(done, K2)` after every step. Raises ValueError when the second pass
    is off (repaint_t0 = 0) or `start` is not shaped as y."""
    config.validate()
    if config.repaint_t0 <= 0:
        raise ValueError("the second pass is off (repaint_t0 = 0).")
    abar = alphas_cumprod.to(device=y.device, dtype=torch.float64)
    mask = mask.to(device=y.device, dtype=y.dtype)
    generators = [torch.Generator().manual_seed(_seed(config.seed)) for _ in range(y.shape[0])]
    z = _per_image_noise(y.shape, generators, y.device, y.dtype)
    schedule = timesteps(config.repaint_t0, config.repaint_steps, abar.shape[0])
    a2 = abar[schedule[0]].item()
    if start is not None and start.shape != y.shape:
        raise ValueError(f"the second pass's start must be shaped as the input {tuple(y.shape)}, got {tuple(start.shape)}.")
    x = math.sqrt(a2) * (y if start is None else start.to(y)) + math.sqrt(1 - a2) * z
    for i, t in enumerate(schedule):
        a_t = abar[t].item()
        a_n = abar[schedule[i + 1]].item() if i + 1 < len(schedule) else 1.0
        e = eps_model(x, torch.full((y.shape[0],), t, device=y.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        x = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n) * e
        x = mask * x + (1 - mask) * (math.sqrt(a_n) * y + math.sqrt(1 - a_n) * z)
        if progress is not None:
            progress(i + 1, len(schedule))
    return x.clamp(-1, 1)
