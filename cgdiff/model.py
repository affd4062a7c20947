"""The denoiser (a diffusers UNet2DModel) and the noise schedule.

The schedule is the DDPM one the paper uses: betas linear from 1e-4 to 0.02 over T = 1000
steps, abar_t = prod_{s<=t} (1 - beta_s), epsilon prediction. diffusers' DDPMScheduler
holds it, so checkpoints carry a standard `scheduler/scheduler_config.json`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .settings import UNET_PRESETS

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def build_unet(preset: str = "tiny", sample_size: int = 64, **overrides: Any) -> UNet2DModel:
    """A fresh U-Net from a preset name, with any UNet2DModel argument overridden."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset '{preset}'; choose one of {sorted(UNET_PRESETS)}.")
    cfg = {**UNET_PRESETS[preset], **overrides}
    levels = len(cfg["block_out_channels"])
    attention = set(cfg.pop("attention_levels"))
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if (levels - 1 - i) in attention else "UpBlock2D" for i in range(levels))
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.pop("attention_head_dim", 8),
        **cfg,
    )


def downsampling_factor(unet: UNet2DModel) -> int:
    """Image sides must be multiples of this for the U-Net's skip connections to line up."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
