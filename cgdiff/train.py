"""Training the denoiser on normal images, with Hugging Face Accelerate.

    eps-prediction:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  t ~ U{0..T-1},
                     loss = MSE(eps_theta(x_t, t), eps)

Optionally (`noise_to_norm` > 0, off by default) a share of the crops is corrupted before noising
and the target is the noise that leads back to the clean crop ("noise-to-norm", as in DiffusionAD,
Zhang et al. 2023): the denoiser is taught to take out what is not normal, not only to denoise.

AdamW, gradient clipping, an EMA of the weights (sampling uses the EMA), random crops and
flips of the normal images (90-degree rotations only on request: grid and wood are not
isotropic), bf16 autocast on a GPU. The same code runs on a CPU, one GPU, or several
processes (`accelerate launch -m cgdiff train ...`).

The output folder is the detector checkpoint; `training_state/` inside it holds what resuming
needs (model, EMA, optimiser, RNG states, step). It is rewritten every `save_every` steps and
when the process receives SIGTERM/SIGINT, always via a temporary folder and a rename, so a
kill at any moment leaves the last good state in place.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .hub import CONFIG_NAME, atomic_replace_dir, recover_replaced_dir, remove_unfinished, temp_dir_beside
from .images import ImageLike, to_batch
from .model import build_scheduler, build_unet, count_parameters
from .settings import LR_SCHEDULES, UNET_PRESETS, TrainConfig, TrainingError  # noqa: F401 (some re-exported)

STATE_DIR = "training_state"
LOG_NAME = "training_log.csv"
MIN_FREE_BYTES = 200 * 1024 * 1024
# Disk per U-Net parameter: the state holds model, EMA and two Adam moments (4 x 4 bytes), a
# save writes the new state before the old one goes (x 2), and the checkpoint (4 bytes).
BYTES_PER_PARAMETER = 36


@dataclass
class TrainStatus:
    """What `train(callback=...)` is given every `callback_every` steps (main process only):
    progress, timing, and the current EMA weights for a look at reconstructions mid-training."""

    step: int
    max_steps: int
    loss: float  # the smoothed training loss
    seconds: float  # training time so far, resumed runs included (time in callbacks excluded)
    interval_steps: int  # steps since the previous call
    interval_seconds: float  # and the time they took
    config: TrainConfig
    _ema: Any = field(repr=False, default=None)
    _device: Any = field(repr=False, default=None)

    def ema_unet(self):
        """A copy of the EMA denoiser (what the detector will sample from), in eval mode."""
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not move training's RNG
            unet = build_unet(self.config.unet_preset, sample_size=self.config.crop_size,
                              **self.config.unet_overrides)
        self._ema.copy_to(unet.parameters())
        return unet.to(self._device).eval().requires_grad_(False)

    @torch.no_grad()
    def reconstruct(self, images: Any, sampler=None) -> torch.Tensor:
        """Reconstructions (B x 3 x S x S in [-1, 1], on the CPU) of image-likes at the working
        size, by the EMA denoiser with `sampler` (default: SamplerConfig())."""
        from .sampler import SamplerConfig, reconstruct

        unet = self.ema_unet()
        y = to_batch(images, self.config.image_size).to(self._device)
        alphas = build_scheduler().alphas_cumprod
        return reconstruct(lambda x, t: unet(x, t).sample, y, alphas, sampler or SamplerConfig()).cpu()


def corrupt_crop(crop: torch.Tensor, images: torch.Tensor, rng: np.random.Generator,
                 rows: Optional[int] = None) -> torch.Tensor:
    """A noise-to-norm training input: `crop` (3 x H x H float in [-1, 1], square) with a
    Perlin-shaped region (3-25 % of it) replaced by another crop of `images` (N x 3 x S x S uint8,
    taken inside their first `rows` rows, H <= rows <= S; None: all S), turned, flipped and
    re-coloured (gain 0.5-1.5 per channel, then a shift of 0.15-0.5 up or down plus up to 0.15
    per channel, in the [-1, 1] pixel units), at opacity 0.6-1, clipped to [-1, 1]. Pixels
    outside the region are unchanged. Returns the corrupted crop, same shape; draws from `rng`
    only. `RandomCrops` checks `rows` (TrainingError); here a `rows` < H fails in numpy.

    The fill is the normal texture from elsewhere, out of place and off colour: a generator of
    its own, not `cgdiff.data.SyntheticDefects`, which makes the offline textures' test defects
    (the same family, DRAEM-style, so results on those are optimistic; real defects, as in the
    MVTec AD leather subset, are the fair test)."""
    from .data import perlin_noise

    _, h, w = crop.shape
    rows = images.shape[-2] if rows is None else int(rows)
    scale = int(2 ** rng.integers(1, 4))  # 2..8 lattice cells across the crop
    noise = perlin_noise((h, w), (scale, scale), rng)
    mask = torch.from_numpy(noise > np.quantile(noise, 1 - rng.uniform(0.03, 0.25)))
    src = images[rng.integers(len(images))]
    top, left = rng.integers(0, [rows - h + 1, src.shape[-1] - w + 1])
    fill = src[:, top : top + h, left : left + w].float() / 127.5 - 1.0
    fill = torch.rot90(fill, int(rng.integers(4)), dims=(-2, -1))
    if rng.random() < 0.5:
        fill = fill.flip(-1)
    gain = torch.from_numpy(rng.uniform(0.5, 1.5, size=(3, 1, 1))).float()
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.5) + rng.uniform(-0.15, 0.15, size=(3, 1, 1))
    fill = (fill * gain + torch.from_numpy(shift).float()).clamp(-1, 1)
    alpha = float(rng.uniform(0.6, 1.0))
    return torch.where(mask, (1 - alpha) * crop + alpha * fill, crop)


class RandomCrops(Dataset):
    """Random crops (and flips / rotations) of a small set of images held in memory.

    Item i of epoch e is drawn from an RNG seeded by (seed, e, i): the data order is fixed by
    the seed, whatever the number of processes, and resuming mid-epoch replays it exactly.
    `rows`: crops stay inside the first `rows` rows of every image (a held-out stripe below
    them is never seen); None: the whole image. `noise_to_norm` > 0: every item is a pair
    (2 x 3 x H x W: the clean crop, then the training input), the input corrupted by
    `corrupt_crop` with that probability and the clean crop otherwise; 0: the crop alone."""

    def __init__(self, images: torch.Tensor, crop_size: int, length: int, seed: int, flips: bool, rotations: bool,
                 rows: Optional[int] = None, noise_to_norm: float = 0.0):
        self.images = images  # N x 3 x S x S uint8
        self.rows = images.shape[-2] if rows is None else int(rows)
        if not crop_size <= self.rows <= images.shape[-2]:
            raise TrainingError(f"the training region ({self.rows} rows) must hold a {crop_size} px crop.")
        self.crop_size = crop_size
        self.length = length
        self.seed = seed
        self.flips = flips
        self.rotations = rotations
        self.noise_to_norm = float(noise_to_norm)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        img = self.images[rng.integers(len(self.images))]
        size = img.shape[-1]
        top, left = rng.integers(0, [self.rows - self.crop_size + 1, size - self.crop_size + 1])
        crop = img[:, top : top + self.crop_size, left : left + self.crop_size]
        if self.flips:
            if rng.random() < 0.5:
                crop = crop.flip(-1)
            if rng.random() < 0.5:
                crop = crop.flip(-2)
        if self.rotations:
            crop = torch.rot90(crop, int(rng.integers(4)), dims=(-2, -1))
        crop = crop.float() / 127.5 - 1.0
        if not self.noise_to_norm:
            return crop
        corrupted = rng.random() < self.noise_to_norm
        return torch.stack([crop, corrupt_crop(crop, self.images, rng, self.rows) if corrupted else crop])


def noise_to_norm_target(noise: torch.Tensor, inputs: torch.Tensor, clean: torch.Tensor, abar: torch.Tensor,
                         snr_gamma: float = 0.0, corrupted_gamma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise target and per-sample loss weight for x_t = sqrt(abar) inputs + sqrt(1 - abar) noise.

    noise, inputs, clean: B x 3 x H x W (inputs == clean for a normal crop); abar: B x 1 x 1 x 1,
    alphas_cumprod at each sample's t, in (0, 1) (1 would divide by zero). Target: the noise whose
    DDPM x0-estimate is the clean crop, eps* = noise + sqrt(SNR) (inputs - clean) with
    SNR = abar / (1 - abar), i.e. `noise` itself for a normal crop. Weight (B): min(SNR, gamma) / SNR
    (min-SNR weighting, Hang et al., ICCV 2023) with gamma = `snr_gamma` for a normal crop (0: weight
    1), and the smaller of `snr_gamma` (if set) and `corrupted_gamma` for a corrupted one, whose
    target grows as sqrt(SNR) at small t: its loss is then min(SNR, gamma) |x0-estimate - clean|^2,
    bounded."""
    snr = (abar / (1 - abar)).flatten()
    target = noise + snr.sqrt().view(-1, 1, 1, 1) * (inputs - clean)
    weight = snr.clamp(max=snr_gamma) / snr if snr_gamma > 0 else torch.ones_like(snr)
    gamma = min(snr_gamma, corrupted_gamma) if snr_gamma > 0 else corrupted_gamma
    corrupted = (inputs != clean).flatten(1).any(dim=1)
    return target, torch.where(corrupted, snr.clamp(max=gamma) / snr, weight)


def recover_output(out: Path) -> None:
    """A save killed between its two renames (systems without an atomic exchange, see
    `hub.atomic_replace_dir`) left the last good checkpoint or training state renamed aside:
    put it back."""
    for folder in (out, out / STATE_DIR):
        try:
            recover_replaced_dir(folder)
        except OSError:  # another process of the same launch got there first
            pass


def check_output_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Fail before any training if the output cannot be written or would clobber something."""
    state = out / STATE_DIR
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output '{out}' exists and is a file.")
    recover_output(out)
    if resume and not (state / "progress.json").is_file():
        raise TrainingError(f"--resume: '{out}' holds no training state ({STATE_DIR}/progress.json) to resume from.")
    if not resume and out.exists() and ((out / CONFIG_NAME).exists() or state.exists()) and not overwrite:
        raise TrainingError(
            f"'{out}' already holds a checkpoint or training state. Use --resume to continue it, "
            "--overwrite to replace it, or choose another folder."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to output folder '{out}': {e.strerror or e}.") from None
    check_free_space(out)


def check_free_space(out: Path, parameters: int = 0) -> None:
    """Fail before training when the disk of `out` cannot hold the training state of a U-Net
    with `parameters` parameters (at least MIN_FREE_BYTES)."""
    free = shutil.disk_usage(out).free
    needed = max(MIN_FREE_BYTES, BYTES_PER_PARAMETER * parameters + 50 * 2**20)
    if free < needed:
        raise TrainingError(
            f"only {free / 2**20:.0f} MB free on the disk of '{out}'; training checkpoints need at least "
            f"{needed / 2**20:.0f} MB. Free some space or choose another folder."
        )


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves its state at the end of the current step."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.raised = True


def _save_state(accelerator, out: Path, step: int, config: TrainConfig, seconds: float) -> None:
    """Atomically replace out/training_state with the current state (main process writes).

    The state is written to a temporary folder that replaces the old one only when complete:
    a save that fails (a full disk) or is killed leaves the previous state in place."""
    target = out / STATE_DIR
    tmp = None
    try:
        if accelerator.is_main_process:
            tmp = temp_dir_beside(target)
        tmp_name = [str(tmp) if tmp else ""]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(tmp_name)
        accelerator.save_state(tmp_name[0])  # every process writes its own RNG state
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress = {"step": step, "seconds": seconds, "config": asdict(config)}
            (Path(tmp_name[0]) / "progress.json").write_text(json.dumps(progress, indent=2))
            atomic_replace_dir(Path(tmp_name[0]), target, keep_extra=False)
            tmp = None
        accelerator.wait_for_everyone()
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            kept = json.loads((target / "progress.json").read_text())["step"]
            kept = f"the state of step {kept} is kept"
        except (OSError, ValueError, KeyError, TypeError):
            kept = "no earlier state was saved"
        free = shutil.disk_usage(out).free / 2**20 if out.is_dir() else float("nan")
        raise TrainingError(
            f"could not save the training state of step {step} in '{target}' ({type(e).__name__}: {e}); "
            f"{free:.0f} MB free on that disk. {kept.capitalize()}: fix the cause and continue with --resume."
        ) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _trim_log(log_path: Path, step: int) -> None:
    """Keep the log rows up to `step` (a kill may have logged past the saved state, or cut a
    row in half), rewritten atomically."""
    header = ["step", "loss", "learning_rate", "seconds"]
    kept = [header]
    try:
        rows = list(csv.reader(log_path.open(newline="")))
    except OSError:
        rows = []
    for row in rows[1:]:
        try:
            if len(row) == 4 and int(row[0]) <= step and all(math.isfinite(float(v)) for v in row[1:]):
                kept.append(row)
        except ValueError:
            continue
    tmp = log_path.with_name(f".{log_path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(kept)
    os.replace(tmp, log_path)


def train(
    images: Sequence[ImageLike],
    out: str | Path,
    config: Optional[TrainConfig] = None,
    resume: bool = False,
    overwrite: bool = False,
    info: Optional[dict[str, Any]] = None,
    calibration_images: Optional[Sequence[ImageLike]] = None,
    sampler=None,
    scorer_config=None,
    progress_bar: bool = True,
    callback: Optional[Callable[[TrainStatus], None]] = None,
    callback_every: int = 100,
    holdout_rows: int = 0,  # bottom rows (at the working size) never cropped: a stripe kept for tuning
):
    """Train a denoiser on normal `images` and write a calibrated detector checkpoint to `out`.

    callback(status): called on the main process every `callback_every` steps and at
    `max_steps` with a `TrainStatus` (loss, timing, the EMA weights); its time is not counted
    as training time, and it leaves the training's random streams alone.
    Returns the Detector (on the main process; None on the others)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    out = Path(out)
    config = (config or TrainConfig()).validate()
    if not isinstance(callback_every, int) or callback_every < 1:
        raise TrainingError(f"callback_every must be a whole number >= 1, got {callback_every!r}.")
    if resume:
        saved = json.loads((out / STATE_DIR / "progress.json").read_text()) if (out / STATE_DIR / "progress.json").is_file() else None
        if saved:
            # The run's shape comes from the saved state; only the budget may change on resume.
            keep = {k: getattr(config, k) for k in ("max_steps", "max_minutes", "save_every", "log_every")}
            config = TrainConfig(**{**saved["config"], **keep}).validate()
    check_output_folder(out, resume, overwrite)
    if overwrite and not resume and (out / STATE_DIR).exists():
        shutil.rmtree(out / STATE_DIR)

    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Without a GPU, cpu=True lets torchrun-launched processes form a gloo (MULTI_CPU) group.
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    accelerator = Accelerator(mixed_precision=mixed, cpu=not has_accelerator)
    set_seed(config.seed, device_specific=True)

    pixels = to_batch(list(images), config.image_size)
    pixels = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    steps_per_epoch = 1000
    dataset = RandomCrops(pixels, config.crop_size, steps_per_epoch * config.batch_size * accelerator.num_processes,
                          config.seed, config.flips, config.rotations, rows=config.image_size - int(holdout_rows),
                          noise_to_norm=config.noise_to_norm)
    # Its own generator: creating the loader's iterator (again, on resume) must not draw from
    # the global RNG that the noise and timesteps come from.
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, drop_last=True,
                        generator=torch.Generator().manual_seed(config.seed))

    unet = build_unet(config.unet_preset, sample_size=config.crop_size, **config.unet_overrides)
    check_free_space(out, count_parameters(unet))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    # Stepped once per training step by hand (accelerate's prepared scheduler steps once per
    # process); a constant rate without warm-up needs no state, which keeps older runs resumable.
    lr_scheduler = None
    if config.lr_schedule != "constant" or config.warmup_steps:
        name = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
        lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                                     num_training_steps=config.max_steps)
        accelerator.register_for_checkpointing(lr_scheduler)
    scheduler = build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(accelerator.device)

    step, seconds_before = 0, 0.0
    if resume:
        if accelerator.is_main_process:
            removed = remove_unfinished(out / STATE_DIR) + remove_unfinished(out)
            if removed:
                accelerator.print(f"removed {len(removed)} unfinished folder(s) left by an interrupted save: "
                                  + ", ".join(p.name for p in removed))
        accelerator.wait_for_everyone()
        accelerator.load_state(str(out / STATE_DIR))
        progress = json.loads((out / STATE_DIR / "progress.json").read_text())
        step, seconds_before = progress["step"], progress["seconds"]
        accelerator.print(f"resuming from step {step}")

    log_path = out / LOG_NAME
    if accelerator.is_main_process and not (resume and log_path.exists()):
        log_path.write_text("step,loss,learning_rate,seconds\n")
    # Keep only the log rows the resumed state has seen (a kill may have logged past it).
    if accelerator.is_main_process and resume:
        _trim_log(log_path, step)

    stop = _StopFlag()
    stop.install()
    start_time = time.time()
    callback_seconds = 0.0  # time spent in callbacks, not training
    last_call = (step, 0.0)
    bar = tqdm(total=config.max_steps, initial=step, desc="training", unit="step",
               disable=not (progress_bar and accelerator.is_local_main_process), dynamic_ncols=True)
    smoothed = None
    stopping = False
    reason = "max_steps reached"
    finished_before = step >= config.max_steps  # a resumed run that had already finished
    try:
        while step < config.max_steps and not stopping:
            dataset.epoch = step // steps_per_epoch
            done_in_epoch = step % steps_per_epoch
            batches = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
            for x0 in batches:
                inputs = x0
                if x0.ndim == 5:  # noise-to-norm pairs: (clean, input)
                    x0, inputs = x0[:, 0], x0[:, 1]
                noise = torch.randn_like(x0)
                t = torch.randint(0, min(config.max_timestep, scheduler.config.num_train_timesteps), (x0.shape[0],),
                                  device=x0.device)
                abar = alphas_cumprod[t].view(-1, 1, 1, 1)
                x_t = abar.sqrt() * inputs + (1 - abar).sqrt() * noise
                with accelerator.autocast():
                    pred = unet(x_t, t).sample
                if inputs is x0 and config.snr_gamma == 0:  # the plain DDPM objective
                    loss = F.mse_loss(pred.float(), noise)
                else:
                    target, weight = noise_to_norm_target(noise, inputs, x0, abar, config.snr_gamma)
                    loss = (weight * F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))).mean()
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step}; lower --learning-rate or use fp32 "
                        "(--mixed-precision no). The last saved state is kept."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                learning_rate = optimizer.param_groups[0]["lr"]
                if lr_scheduler is not None and not accelerator.optimizer_step_was_skipped:  # fp16 scaler skips
                    lr_scheduler.step()
                ema.step(accelerator.unwrap_model(unet).parameters())
                step += 1

                value = accelerator.gather(loss.detach()[None]).mean().item()
                smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.4f}")
                elapsed = time.time() - start_time - callback_seconds
                if callback is not None and accelerator.is_main_process and (
                    step % callback_every == 0 or step >= config.max_steps
                ):
                    t_call = time.time()
                    callback(TrainStatus(step, config.max_steps, smoothed, seconds_before + elapsed,
                                         step - last_call[0], elapsed - last_call[1], config, ema,
                                         accelerator.device))
                    callback_seconds += time.time() - t_call
                    last_call = (step, elapsed)
                if accelerator.is_main_process and (step % config.log_every == 0 or step == config.max_steps):
                    with log_path.open("a") as f:
                        f.write(f"{step},{value:.6f},{learning_rate:.6g},{seconds_before + elapsed:.1f}\n")

                # Every process must agree to stop on the same step (a signal reaches one).
                over_time = config.max_minutes is not None and elapsed > 60 * config.max_minutes
                flag = torch.tensor([float(stop.raised or over_time)], device=accelerator.device)
                if accelerator.num_processes > 1:
                    flag = accelerator.reduce(flag, reduction="sum")
                stopping = bool(flag.item() > 0)
                if stopping or step % config.save_every == 0 or step >= config.max_steps:
                    _save_state(accelerator, out, step, config, seconds_before + elapsed)
                if stopping:
                    reason = "stopped by signal" if stop.raised else f"time budget of {config.max_minutes} min reached"
                if stopping or step >= config.max_steps:
                    break
    finally:
        bar.close()
        stop.uninstall()

    seconds = seconds_before + time.time() - start_time - callback_seconds
    if finished_before:
        accelerator.print(f"nothing left to train: max_steps = {config.max_steps} had already been reached (raise it "
                          f"to go on); the run stays at step {step} ({seconds / 60:.1f} min of training)")
    else:
        accelerator.print(f"{reason} at step {step} ({seconds / 60:.1f} min of training)")
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        # Data-parallel processes must hold one and the same model: check it, don't assume it.
        checksum = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(unet).parameters()]).sum()
        sums = accelerator.gather(checksum[None].to(accelerator.device)).cpu()
        if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9, atol=0):
            raise TrainingError(f"the {accelerator.num_processes} processes ended with different weights: {sums.tolist()}")
        accelerator.print(f"all {accelerator.num_processes} processes hold the same weights (checksum {sums[0]:.6f})")
    if stop.raised:
        accelerator.print(f"state saved in {out / STATE_DIR}; continue with --resume")
        raise KeyboardInterrupt("training interrupted; state saved")
    if not accelerator.is_main_process:
        return None

    # The detector samples from the EMA weights.
    from .detector import Detector
    from .sampler import SamplerConfig
    from .scorer import Scorer, ScorerConfig, default_map_sigma, resolve_backbone

    final = build_unet(config.unet_preset, sample_size=config.crop_size, **config.unet_overrides)
    ema.copy_to(final.parameters())
    final = final.to(accelerator.device)
    scorer_config = scorer_config or ScorerConfig(map_sigma=default_map_sigma(config.image_size))
    scorer_config.backbone = resolve_backbone(scorer_config.backbone)
    losses = [float(r[1]) for r in list(csv.reader(log_path.open()))[1:] if r]
    training = {
        "data": (info or {}).get("data", f"{len(images)} images"),
        "n_images": len(images),
        "image_size": config.image_size,
        "crop_size": config.crop_size,
        "unet_preset": config.unet_preset,
        "parameters": count_parameters(final),
        "steps": step,
        "batch_size": config.batch_size * accelerator.num_processes,
        "learning_rate": config.learning_rate,
        "seconds": round(seconds, 1),
        "device": f"{accelerator.device.type} x {accelerator.num_processes}",
        "final_loss": round(float(np.mean(losses[-10:])), 5) if losses else None,
        "config": asdict(config),
    }
    training.update({k: v for k, v in (info or {}).items() if k not in training})
    detector = Detector(final, Scorer(scorer_config).to(accelerator.device), sampler or SamplerConfig(),
                        config.image_size, info={"training": training})
    calib = calibration_images if calibration_images is not None else images
    accelerator.print(f"calibrating on {len(calib)} normal images ...")
    detector.calibrate(calib)
    if (info or {}).get("calibration_normals"):  # which images `calib` holds, as the caller described them
        detector.info["training"]["calibration_normals"] = info["calibration_normals"]
    detector.save_pretrained(out, overwrite=True)
    accelerator.print(f"saved detector to {out} (threshold {detector.threshold:.4g})")
    return detector

