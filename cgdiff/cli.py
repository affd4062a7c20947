"""The `cgdiff` command (also `python -m cgdiff`).

    cgdiff build-textures --out data/textures                      offline data, one command
    cgdiff train    --data data/textures/brick --out checkpoints/brick
    cgdiff evaluate --checkpoint checkpoints/brick --data data/textures/brick --json brick.json
    cgdiff detect   --checkpoint checkpoints/brick photo.png --out results/

Every sampler and scorer setting is an override flag of `evaluate` and `detect` (--t0 --steps
--w --guidance-scale --blur-sigma --eta --seed --pixel-weight --feature-weight --map-sigma),
so each ablation is one flag. The method lives in the package modules; this file only parses
arguments, calls them and writes files. Errors a user can cause print one line
`cgdiff: error: ...` and exit with status 2 (set CGDIFF_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional, Sequence

# Only the torch-free settings at import time: `cgdiff --help` answers without loading PyTorch.
from .settings import (CHOICES, IMAGE_EXTENSIONS, LAYOUTS, LR_SCHEDULES, OFFLINE_BACKBONE, PAPER_BACKBONE,
                       QUALITY_METHODS, TEXTURES, UNET_PRESETS, DatasetError, SamplerConfig, ScorerConfig,
                       TrainConfig, TrainingError, default_map_sigma)

PROG = "cgdiff"
TRAIN_ARGS_NAME = "train_args.json"  # beside the checkpoint: what `--resume` must keep

# The command line's removal floor for tuning (`cgdiff tune --min-removal`, `train
# --tune-min-removal`): choose among the settings whose reconstructions take out at least half of
# each synthetic validation defect, while any does (BENCHMARKS.md, "The second pass in cgdiff" and
# "A detector in 30 CPU minutes"). `cgdiff.tune.tune` itself defaults to 0, by AUPRO alone.
MIN_REMOVAL = 0.5

# (flag, dest, type, help) of the settings stored in a checkpoint.
SAMPLER_FLAGS = [
    ("--t0", "t0", int, "start step of the partial diffusion, >= 1 (>= 1000: pure-noise start)"),
    ("--steps", "steps", int, "K, denoising steps from t0 down to 0"),
    ("--w", "w", float, "conditioning weight (0 switches the conditioning off)"),
    ("--guidance-scale", "guidance_scale", float, "blur-guidance scale s (0 switches it off and halves the cost)"),
    ("--blur-sigma", "blur_sigma", float, "Gaussian blur sigma of the blur guidance"),
    ("--eta", "eta", float, "DDIM stochasticity in [0, 1] (0: deterministic)"),
    ("--samples", "samples", int, "N, reconstructions averaged (seeds seed .. seed + N - 1; N times the cost)"),
    ("--repaint-t0", "repaint_t0", int, "t2 of a second pass that paints the suspect pixels over from t2 "
     "(RePaint-style; 0: none, the paper's method)"),
    ("--repaint-steps", "repaint_steps", int, "K2, the second pass's DDIM steps"),
]
SEED_FLAG = ("--seed", "seed", int, "seed of the sampler's noise")
SCORER_FLAGS = [
    ("--pixel-weight", "pixel_weight", float, "weight v of the pixel distance (0: feature distance only)"),
    ("--feature-weight", "feature_weight", float, "weight of the feature distance (0: pixel distance only)"),
    ("--map-sigma", "map_sigma", float, "Gaussian smoothing sigma of the anomaly map (0: none)"),
]
CHECKPOINT_HELP = "checkpoint folder, registry name (checkpoints/registry.json) or Hub repo id"
SETTING_KEYS = [dest for _, dest, _, _ in SAMPLER_FLAGS + [SEED_FLAG] + SCORER_FLAGS]


class UsageError(Exception):
    """A command line argparse cannot accept; reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- argparse


class _Formatter(argparse.HelpFormatter):
    """Shows '(default: X)' for every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        no_default = (default is None or default is False or default == argparse.SUPPRESS
                      or (isinstance(default, (list, tuple)) and not default))
        if "%(default)" in text or no_default or not action.option_strings:
            return text
        if isinstance(default, (list, tuple)):
            return f"{text} (default: {' '.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _holdout_count(text: str):
    """--holdout: 'auto' or a whole number >= 0."""
    if text == "auto":
        return "auto"
    try:
        return _number(int, 0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'auto', got {text!r}") from None


def _number(kind: type, low: Optional[float] = None, name: str = "value", above: bool = False):
    """An argparse type: a whole number or finite float, >= low (> low when `above`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _number(int, 1, "positive whole number")
whole = _number(int, None, "whole number")
finite = _number(float, None, "number")
positive_float = _number(float, 0, "positive number", above=True)


def _share(text: str) -> float:
    """An argparse type: a share in [0, 1)."""
    value = _number(float, 0)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def _add_setting_flags(group, defaults: Optional[dict] = None, seed: bool = True) -> None:
    """Sampler / scorer flags. With `defaults`, help shows them; else 'the checkpoint's value'."""
    flags = SAMPLER_FLAGS + ([SEED_FLAG] if seed else []) + SCORER_FLAGS
    for flag, dest, kind, text in flags:
        parse = whole if kind is int else finite
        if defaults is None:
            help_text = f"{text} (default: the checkpoint's value)"
        else:
            help_text = f"{text} (default: {defaults[dest]})"
        metavar = "X" if kind is float else "N"
        group.add_argument(flag, dest=dest, type=parse, default=None, metavar=metavar, help=help_text)


def _add_common(p, device: bool = True, runtime: bool = False) -> None:
    if device:
        p.add_argument("--device", default="auto",
                       help="'auto' (a GPU when there is one), 'cpu', 'cuda', 'cuda:1', 'mps'")
    if runtime:
        p.add_argument("--runtime", default="auto", choices=CHOICES,
                       help="how the U-Net runs: 'auto' the CPU default (channels-last PyTorch; "
                       "on a GPU the reference), 'reference' plain fp32 eager PyTorch, 'channels_last', 'bf16' (bf16 "
                       "autocast with channels_last, for CPUs with AVX512-BF16 or AMX), or a CPU "
                       "runtime (onnxruntime, openvino, openvino-bf16: pip install 'cgdiff[fast]'; exported once "
                       "per checkpoint into ~/.cache/cgdiff); see BENCHMARKS.md (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Texture anomaly detection with a conditioned-guided denoising diffusion model.",
        epilog="Run 'cgdiff COMMAND --help' for the options of a command. Docs: README.md.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"cgdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # ---------------------------------------------------------------- train
    t = TrainConfig()
    p = sub.add_parser(
        "train", help="train a detector on the normal images of a dataset",
        description="Train the denoiser on the normal training images of ROOT/CLASS (MVTec AD, "
        "DTD-Synthetic or a plain folder of images), calibrate the scorer on them, and write a "
        "checkpoint folder. The sampler and scorer settings given here are stored in the "
        "checkpoint as its defaults. Training state is saved every --save-every steps and on "
        "Ctrl-C / SIGTERM; continue it with --resume.",
    )
    p.add_argument("--data", required=True, metavar="ROOT/CLASS", help="dataset folder of one category")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to write")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="dataset layout")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out unreadable images with a warning (default: stop and name the file)")
    p.add_argument("--image-size", type=positive_int, default=t.image_size, metavar="N",
                   help="square working size images are resized to")
    p.add_argument("--crop-size", type=positive_int, default=t.crop_size, metavar="N",
                   help="size of the random training crops")
    p.add_argument("--preset", default=t.unet_preset, choices=sorted(UNET_PRESETS), help="U-Net size")
    p.add_argument("--batch-size", type=positive_int, default=t.batch_size, metavar="N",
                   help="crops per step (per process)")
    p.add_argument("--lr", type=positive_float, default=t.learning_rate, metavar="X", help="learning rate (AdamW)")
    p.add_argument("--max-timestep", type=_number(int, 2), default=t.max_timestep, metavar="N",
                   help="train the noise levels t < N only (the sampler starts at t0 <= 500 except in the "
                   "pure-noise ablation)")
    p.add_argument("--snr-gamma", type=_number(float, 0), default=t.snr_gamma, metavar="X",
                   help="min-SNR-gamma loss weighting (Hang et al. 2023, e.g. 5); 0: plain MSE")
    p.add_argument("--noise-to-norm", type=_share, default=t.noise_to_norm, metavar="P",
                   help="noise-to-norm training (as in DiffusionAD): corrupt this share of the crops (a "
                   "Perlin-shaped patch of the texture from elsewhere, off colour) and train towards the clean "
                   "crop, so the denoiser learns to take defects out; their loss min-SNR-5 weighted; 0: normal "
                   "crops only, the DDPM objective of the conditioned-guided paper")
    p.add_argument("--lr-schedule", default=t.lr_schedule, choices=LR_SCHEDULES,
                   help="learning rate over the run: constant, or cosine (half a cosine from --lr down to 0 "
                   "at --max-steps; a run stopped earlier by --max-minutes ends above 0, and a --resume with "
                   "another --max-steps re-targets the cosine, which moves the rate)")
    p.add_argument("--warmup-steps", type=_number(int, 0), default=t.warmup_steps, metavar="N",
                   help="linear learning-rate warm-up from 0 over the first N steps (fewer than --max-steps)")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help=f"training steps in total (default: {t.max_steps}; on --resume: the run's own)")
    p.add_argument("--max-minutes", type=positive_float, default=None, metavar="M",
                   help="stop (with the state saved) after M minutes of this run (default: no limit)")
    p.add_argument("--resume", action="store_true", help="continue the training state saved in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint or training state in --out")
    p.add_argument("--seed", type=whole, default=t.seed, metavar="N", help="training seed (crops, noise, init)")
    p.add_argument("--rotations", action="store_true", help="also rotate crops by 90 degrees (isotropic textures only)")
    p.add_argument("--no-flips", action="store_true", help="do not flip crops")
    p.add_argument("--mixed-precision", default=t.mixed_precision, choices=("auto", "no", "fp16", "bf16"),
                   help="'auto': bf16 on a GPU that supports it, else fp32")
    p.add_argument("--save-every", type=positive_int, default=None, metavar="N",
                   help=f"save the training state every N steps (default: {t.save_every}; on --resume: the run's own)")
    p.add_argument("--backbone", default="auto", metavar="NAME",
                   help=f"feature backbone: '{OFFLINE_BACKBONE}' (offline), a timm name such as "
                   f"'{PAPER_BACKBONE}' (weights from the Hub), or 'auto' (the WideResNet when the Hub "
                   "is reachable, else the offline one)")
    g = p.add_argument_group("settings stored in the checkpoint (evaluate/detect can override them)")
    _add_setting_flags(g, {**asdict(SamplerConfig()), **ScorerConfig().to_dict(),
                           "map_sigma": "4 x --image-size / 256, DDAD's 4 at 256 px"}, seed=False)
    g = p.add_argument_group("label-free tuning (see 'cgdiff tune --help')")
    h = g.add_mutually_exclusive_group()
    h.add_argument("--holdout", type=_holdout_count, default="auto", metavar="N|auto",
                   help="keep N training images (chosen by --seed) out of training, for tuning and (8 or more) "
                   "the threshold; of a 'build-textures' set's overlapping tiles, the last N in the photo (not "
                   "by --seed), and every tile overlapping them out of training too, so that no held-out pixel "
                   "is trained on; 'auto': a tenth of them where there are 80 or more, else none (none with "
                   "--preset paper, whose recipe trains on every image)")
    h.add_argument("--holdout-stripe", type=positive_float, default=None, metavar="F",
                   help="keep the bottom fraction F of every training image out of training, for tuning")
    g.add_argument("--tune", action="store_true", help="run 'cgdiff tune' on the new checkpoint after training")
    g.add_argument("--tune-minutes", type=positive_float, default=10.0, metavar="M", help="time budget of --tune")
    g.add_argument("--tune-min-removal", type=_number(float, 0), default=MIN_REMOVAL, metavar="X",
                   help="--min-removal of --tune (see 'cgdiff tune --help'; 0: by AUPRO alone)")
    g.add_argument("--tune-max-model-calls", type=_number(int, 1), default=None, metavar="N",
                   help="--max-model-calls of --tune (see 'cgdiff tune --help')")
    _add_common(p, device=False)

    # ---------------------------------------------------------------- evaluate
    p = sub.add_parser(
        "evaluate", help="measure a detector on a labelled test set",
        description="Reconstruct and score every test image of ROOT/CLASS and report image AUROC, "
        "pixel AUROC, AUPRO (FPR <= 0.3) and F1-max, as fractions in [0, 1]. Maps are compared with "
        "the masks at --mask-size x --mask-size (the paper's tables use 256) and are never normalised "
        "with statistics of the test set. Every setting flag overrides the checkpoint's value for "
        "this run only, so each ablation is one flag.",
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, metavar="ROOT/CLASS", help="dataset folder of one category")
    p.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS, help="dataset layout")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out unreadable images with a warning (default: stop and name the file)")
    p.add_argument("--skip-empty-masks", action="store_true",
                   help="leave defect images whose mask is empty out of the pixel metrics, and say how many "
                   "(default: stop and name them)")
    p.add_argument("--require-pixel-metrics", action="store_true",
                   help="stop with an error when pixel metrics cannot be computed (defect types without masks) "
                   "instead of reporting them as n/a")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--save-maps", metavar="DIR", help="write a heat map and an overlay PNG per test image into DIR")
    p.add_argument("--mask-size", type=_number(int, 8), default=256, metavar="N",
                   help="resolution at which maps are compared with masks")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="images per batch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file / --save-maps folder")
    p.add_argument("--record", action="store_true",
                   help="store the metrics and this command in the checkpoint (cgdiff.json and model card); "
                   "only with the checkpoint's own settings")
    g = p.add_argument_group("overrides of the checkpoint's settings")
    _add_setting_flags(g)
    _add_common(p, runtime=True)

    # ---------------------------------------------------------------- detect
    p = sub.add_parser(
        "detect", help="inspect images",
        description="Inspect images (files, or folders of images) and print score, threshold and "
        "verdict per image. With --out, write NAME_heatmap.png, NAME_overlay.png, "
        "NAME_reconstruction.png and NAME_mask.png per image (at the detector's working size). "
        "Images are resized to the detector's square working size.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out unreadable images with a warning (default: stop and name every one)")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--out", metavar="DIR", help="folder for the PNGs")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--threshold", type=finite, default=None, metavar="X",
                   help="decision threshold on the score (default: the checkpoint's calibrated one)")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="images per batch")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g = p.add_argument_group("overrides of the checkpoint's settings")
    _add_setting_flags(g)
    _add_common(p, runtime=True)

    # ---------------------------------------------------------------- build-textures
    p = sub.add_parser(
        "build-textures", help="build an offline texture dataset with synthetic defects",
        description="Cut scikit-image's texture photos into an MVTec-layout dataset per texture: "
        "training tiles from the top of each photo, test tiles (normal, and with seeded synthetic "
        "defects and exact masks) from the held-out bottom. No network needed.",
    )
    p.add_argument("--out", required=True, metavar="ROOT", help="folder to create ROOT/TEXTURE in")
    p.add_argument("--textures", nargs="+", choices=TEXTURES, default=list(TEXTURES), metavar="NAME",
                   help=f"which photos ({', '.join(TEXTURES)})")
    p.add_argument("--tile-size", type=_number(int, 8), default=128, metavar="N", help="tile side in pixels")
    p.add_argument("--train-stride", type=positive_int, default=None, metavar="N",
                   help="step between training tiles (default: half the tile size)")
    p.add_argument("--test-good", type=_number(int, 0), default=8, metavar="N", help="normal test tiles per texture")
    p.add_argument("--test-defect", type=_number(int, 0), default=4, metavar="N",
                   help="test tiles per defect kind and texture")
    p.add_argument("--seed", type=whole, default=0, metavar="N", help="seed of tile positions and defects")
    p.add_argument("--overwrite", action="store_true", help="replace texture folders this command built before")

    # ---------------------------------------------------------------- tune
    p = sub.add_parser(
        "tune", help="choose the sampler and scorer settings without test labels",
        description="Choose t0, K, w, the blur-guidance scale and sigma, the reconstructions averaged N and the "
        "pixel/feature balance "
        "by AUPRO (by default among the settings that take out at least half of each defect, see "
        "--min-removal) on a validation set of normal training images with seeded synthetic defects (images "
        "or a stripe held out by 'train --holdout' / '--holdout-stripe' where there are some, else the "
        "training images themselves, which the output says). Test images and masks are never read. "
        "The chosen settings become the checkpoint's defaults; it is recalibrated (the threshold by "
        "--threshold), and the search table, the validation score and a speed/quality plot "
        "(tuning_front.png) are stored with it.",
    )
    _add_checkpoint_in_place(p, "tuned")
    p.add_argument("--minutes", type=positive_float, default=10.0, metavar="M", help="time budget of the search")
    p.add_argument("--seed", type=whole, default=0, metavar="N", help="seed of the synthetic defects")
    p.add_argument("--normal", type=_number(int, 2), default=4, metavar="N", help="normal validation images")
    p.add_argument("--anomalous", type=_number(int, 2), default=12, metavar="N",
                   help="validation images with a synthetic defect")
    p.add_argument("--tie-tolerance", type=_number(float, 0), default=0.005, metavar="X",
                   help="AUPRO within X of the best counts as a tie, won by fewer model calls")
    p.add_argument("--min-removal", type=_number(float, 0), default=MIN_REMOVAL, metavar="X",
                   help="choose only among settings whose validation removal (0..1: how much of each synthetic "
                   "defect the reconstruction takes out) reaches X, while any does; when none does, the best by "
                   "AUPRO is also tried with the second pass (t2 = 400, 600); 0: by AUPRO alone")
    p.add_argument("--max-model-calls", type=_number(int, 1), default=None, metavar="N",
                   help="leave out settings that cost more than N denoiser evaluations per image (K, 2K with "
                   "blur guidance, times the reconstructions averaged, whose runs share U-Net calls, plus K2 of a "
                   "second pass), e.g. to keep the app's latency (default: no cap)")
    p.add_argument("--max-evaluations", type=_number(int, 0), default=None, metavar="N",
                   help="try at most N sampler settings besides the stored one, --start-from's included "
                   "(default: as the budget allows)")
    p.add_argument("--start-from", nargs="+", default=(), metavar="CHECKPOINT",
                   help="also run the sampler settings stored in these local checkpoint folders or bundled "
                   "names (e.g. another detector of the same texture; without a second pass) and search from "
                   "the best of all the starts, by the rule of the choice (within --min-removal while any start "
                   "reaches it). Like the stored settings they run on every validation image, even past "
                   "--minutes (default: from the stored settings alone)")
    p.add_argument("--map-sigmas", type=_number(float, 0), nargs="+", default=(), metavar="X",
                   help="also search the anomaly map's smoothing sigma over these values (px at the working size; "
                   "e.g. 1 2 4 8). Default: the stored sigma stays. On synthetic-defect textures the search paid; "
                   "on real leather defects it picked too fine a map (BENCHMARKS.md)")
    _add_threshold_rule(p)
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="images per batch")
    p.add_argument("--json", metavar="FILE", help="write the tuning record (search table included) as JSON")
    p.add_argument("--dry-run", action="store_true", help="report the choice without changing any checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint or --json file")
    _add_common(p)

    # ---------------------------------------------------------------- calibrate
    p = sub.add_parser(
        "calibrate", help="set the pixel/feature scale c and the threshold again, at the stored settings",
        description="Recalibrate a checkpoint at its stored settings, without a search: c and the normal "
        "scores on the normal images 'cgdiff tune' would use (held-out training images where there are "
        "enough, else the training folder), and the decision threshold by --threshold. Test images and "
        "masks are never read.",
    )
    _add_checkpoint_in_place(p, "recalibrated")
    _add_threshold_rule(p)
    p.add_argument("--seed", type=whole, default=0, metavar="N",
                   help="seed of the synthetic defects (one per normal calibration image)")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="images per batch")
    p.add_argument("--repaint-t0", type=whole, default=None, metavar="N",
                   help="store a second pass from t2 = N first, and calibrate for it (0: no second pass; default: "
                   "the checkpoint's setting)")
    p.add_argument("--repaint-steps", type=positive_int, default=None, metavar="N",
                   help="K2 of that second pass (default: the checkpoint's setting)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    _add_common(p)

    # ---------------------------------------------------------------- push
    p = sub.add_parser(
        "push", help="upload a checkpoint folder to the Hugging Face Hub",
        description="Upload a checkpoint folder (weights as safetensors, configs, model card, example "
        "images; never training_state/) to a Hub model repo, creating it if needed. Log in first with "
        "`hf auth login` or set HF_TOKEN.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="local checkpoint folder or bundled registry name")
    p.add_argument("repo_id", metavar="OWNER/NAME", help="Hub model repo to upload to")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--message", default="Upload cgdiff detector", help="commit message (default: %(default)s)")

    # ---------------------------------------------------------------- bench
    p = sub.add_parser(
        "bench", help="benchmark quality (ablations, peers) and speed",
        description="--quality: the full method (the checkpoint's settings), each ablation and the peers "
        "(AnoDDPM-style reconstruction, PatchCore-style nearest neighbours on the same backbone, anomalib "
        "where installed) on the same test images: image/pixel AUROC, AUPRO, F1-max, fit time, seconds per "
        "image. --speed: per-image latency at the app's settings with the time outside the U-Net and "
        "backbone calls, throughput against batch and image size, paper scale, peak memory, and on a GPU "
        "the fast path (autocast, channels_last, torch.compile) against fp32 eager. Prints Markdown tables; "
        "--out also writes bench.json, bench.md and plots. See benchmarks/README.md.",
    )
    p.add_argument("--quality", action="store_true", help="run the quality benchmark")
    p.add_argument("--speed", action="store_true", help="run the speed benchmark")
    p.add_argument("--pair", nargs=2, action="append", metavar=("CKPT", "DATA"),
                   help="(quality) a checkpoint and the dataset category it was trained for; repeatable. DATA may "
                   "be a root of categories (MVTec AD, DTD-Synthetic) with CKPT a folder of checkpoints named "
                   "like the categories")
    p.add_argument("--textures", metavar="DIR", help="(quality) the scikit-image texture set in DIR (built there "
                   "if missing), each texture with the bundled checkpoint of its name; (speed) their test images "
                   "are also compared across the CPU fast-path variants")
    p.add_argument("--methods", nargs="+", choices=list(QUALITY_METHODS), default=list(QUALITY_METHODS),
                   metavar="NAME", help=f"(quality) rows to run: {' '.join(QUALITY_METHODS)}")
    p.add_argument("--coreset-ratio", type=positive_float, default=1.0, metavar="X",
                   help="(quality) PatchCore-style memory bank kept by coreset subsampling, in (0, 1]")
    p.add_argument("--skip-empty-masks", action="store_true",
                   help="(quality) leave defect images whose mask is empty out of the pixel metrics and name them "
                   "(default: stop before any work and name them)")
    p.add_argument("--mask-size", type=_number(int, 8), default=256, metavar="N",
                   help="(quality) resolution at which maps are compared with masks")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="(quality) images per batch")
    p.add_argument("--checkpoint", action="append", metavar="CKPT",
                   help="(speed) checkpoint to time; repeatable (default: the bundled checkpoints, the app's models)")
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, metavar="N",
                   help="(speed) batch sizes of the sweep (default: 1 2 4 8; on a GPU 1 8 32 64)")
    p.add_argument("--image-sizes", nargs="+", type=positive_int, metavar="N",
                   help="(speed) image sizes of the sweep (default: 64 128 256)")
    p.add_argument("--repeats", type=positive_int, default=2, metavar="N", help="(speed) timed runs per measurement")
    p.add_argument("--no-paper-scale", action="store_true", help="(speed) skip DDAD's U-Net at 256 px")
    p.add_argument("--no-sweeps", action="store_true", help="(speed) skip the batch and image size sweeps")
    p.add_argument("--no-fast-path", action="store_true",
                   help="(speed) skip the fast-path variants (CPU: bf16, channels_last, compile, the runtimes)")
    p.add_argument("--gpu-batch-size", type=positive_int, default=32, metavar="N",
                   help="(speed) batch of the GPU fast-path comparison at paper scale")
    p.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="(speed) torch.compile mode of the GPU fast path, e.g. max-autotune (default: torch's)")
    p.add_argument("--out", metavar="DIR", help="write bench.json, bench.md and PNG plots into DIR")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _add_common(p)
    return parser


# ----------------------------------------------------------------------------- helpers


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_data(args: argparse.Namespace, test: bool = True):
    """The dataset of --data (test=False: its training images only, the test split is never
    read); with --skip-unreadable, files left out are listed as warnings."""
    import warnings

    from .data import load_dataset

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        dataset = load_dataset(args.data, args.layout, skip_unreadable=args.skip_unreadable, test=test)
    for warning in caught:
        _info(f"warning: {warning.message}")
    return dataset


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SETTING_KEYS if getattr(args, k, None) is not None}


def _device(name: str) -> Optional[str]:
    if name == "auto":
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here.")
    return name


def _check_new_file(path: Optional[str], overwrite: bool, flag: str) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise FileExistsError(f"{flag} '{p}' is a folder; give a file name.")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{flag} '{p}' already exists; pass --overwrite to replace it.")
    return p


def _check_new_folder(path: Optional[str], overwrite: bool, flag: str) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"{flag} '{p}' exists and is a file; give a folder.")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise FileExistsError(f"{flag} '{p}' is not empty; pass --overwrite to write into it anyway.")
    return p


def _write_json(path: Path, data: Any) -> None:
    """Written beside the target and renamed into place: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _command_line(argv: Sequence[str]) -> str:
    return shlex.join([PROG, *argv])


def _check_overrides(overrides: dict[str, Any]) -> None:
    """Values that no checkpoint could make valid are reported before anything is loaded."""
    sampler_keys = {f.name for f in fields(SamplerConfig)}
    try:
        SamplerConfig().replace(**{k: v for k, v in overrides.items() if k in sampler_keys})
        ScorerConfig(**{k: v for k, v in overrides.items() if k not in sampler_keys})
    except ValueError as e:  # "steps must be ..." -> "argument --steps: steps must be ...", as argparse says it
        flag = next((f for f, dest, _, _ in SAMPLER_FLAGS + [SEED_FLAG] + SCORER_FLAGS
                     if dest in overrides and str(e).startswith(dest + " must")), None)
        raise ValueError(f"argument {flag}: {e}" if flag else str(e)) from None


def _local_checkpoint(name: str, needs: str) -> Path:
    """The folder of a local checkpoint (a path or a bundled registry name). Raises ValueError
    ("`needs` needs a local checkpoint folder ...") naming `name` when there is none."""
    from .registry import resolve

    folder = Path(name) if Path(name).exists() else Path(resolve(name))
    if not folder.is_dir():
        raise ValueError(f"{needs} needs a local checkpoint folder or the name of a bundled one; "
                         f"'{name}' is neither.")
    return folder


def _load_detector(args: argparse.Namespace):
    from .detector import Detector

    device = _device(args.device)
    _info(f"loading {args.checkpoint} ...")
    detector = Detector.from_pretrained(args.checkpoint, device=device)
    if detector.calibration is None:
        raise ValueError(f"checkpoint '{args.checkpoint}' is not calibrated (no threshold); retrain or calibrate it.")
    from .runtime import RUNTIMES, available, describe_path, is_exported, path_options

    options = path_options(getattr(args, "runtime", "reference"), detector.device)
    if options.get("runtime") in RUNTIMES and available(options["runtime"]) and not is_exported(detector.unet):
        _info("exporting the U-Net to ONNX (once per checkpoint, kept in the cache; about 15 s for a small one) ...")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        detector.use_fast_path(**options)
    for w in caught:
        _info(f"warning: {w.message}")
    _info(f"detector: {detector.describe()}; device {detector.device}; U-Net on {describe_path(detector.fast_path())}")
    return detector


def _settings_line(sampler: dict, scorer: dict, overrides: dict) -> str:
    keys = [f"{k}={v}" for k, v in {**sampler, **scorer}.items()]
    line = " ".join(keys)
    if overrides:
        line += f"  (overridden here: {', '.join(sorted(overrides))})"
    return line


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .train import STATE_DIR, check_output_folder, recover_output, train

    out = Path(args.out)
    recover_output(out)
    command = _command_line(argv)
    given = _overrides(args)
    _check_overrides(given)
    saved_args: dict[str, Any] = {}
    saved_config: dict[str, Any] = {}
    if args.resume:
        state = out / STATE_DIR / "progress.json"
        if not state.is_file():
            raise TrainingError(
                f"--resume: '{out}' holds no training state ({STATE_DIR}/progress.json) to resume from."
            )
        if (out / TRAIN_ARGS_NAME).is_file():
            try:
                saved_args = json.loads((out / TRAIN_ARGS_NAME).read_text())
            except ValueError as e:
                raise TrainingError(f"'{out / TRAIN_ARGS_NAME}' is not valid JSON ({e}); fix or delete it.") from None
        saved_config = json.loads(state.read_text()).get("config", {})
        _warn_fixed_on_resume(args, saved_config)

    # Settings not given on a resume keep the values the run was started with.
    sampler_values = {**asdict(SamplerConfig()), **saved_args.get("sampler", {})}
    scorer_values = {**ScorerConfig(map_sigma=default_map_sigma(args.image_size)).to_dict(),
                     **saved_args.get("scorer", {})}
    sampler_values.update({k: v for k, v in given.items() if k in sampler_values})
    scorer_values.update({k: v for k, v in given.items() if k in scorer_values})
    backbone = args.backbone
    if args.resume and backbone == "auto" and "backbone" in saved_args:
        backbone = saved_args["backbone"]
    scorer_values["backbone"] = backbone
    sampler = SamplerConfig(**sampler_values)
    scorer = ScorerConfig(**scorer_values)

    # The step budget and save interval not given on a resume are the run's own.
    defaults = TrainConfig()
    max_steps = args.max_steps or saved_config.get("max_steps", defaults.max_steps)
    save_every = args.save_every or saved_config.get("save_every", defaults.save_every)
    config = TrainConfig(
        image_size=args.image_size, crop_size=args.crop_size, unet_preset=args.preset, batch_size=args.batch_size,
        learning_rate=args.lr, max_steps=max_steps, max_minutes=args.max_minutes,
        mixed_precision=args.mixed_precision, save_every=save_every, seed=args.seed,
        flips=not args.no_flips, rotations=args.rotations, max_timestep=args.max_timestep, snr_gamma=args.snr_gamma,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, noise_to_norm=args.noise_to_norm,
    )
    # Checked before the data is read and anything is written: on --resume the run's shape with
    # the new budget (train() merges them the same way).
    checked = TrainConfig(**{**saved_config, "max_steps": max_steps, "max_minutes": args.max_minutes,
                             "save_every": save_every}) if args.resume else config
    if checked.warmup_steps >= checked.max_steps:
        w, m = checked.warmup_steps, checked.max_steps
        raise TrainingError(f"--max-steps {m} must be larger than the run's --warmup-steps {w}." if args.resume
                            else f"--warmup-steps {w} must be smaller than --max-steps {m}.")
    checked.validate()
    if (args.resume and checked.lr_schedule != "constant" and args.max_steps is not None
            and args.max_steps != saved_config.get("max_steps")):
        _info(f"note: the {checked.lr_schedule} learning-rate schedule is re-targeted from "
              f"{saved_config.get('max_steps')} to {max_steps} steps: the rate moves at the resume.")
    dataset = _load_data(args, test=False)
    _info(f"data: {dataset.summary()}")
    images, holdout, holdout_rows = _holdout(args, saved_args, list(dataset.train), config)
    all_images = list(dataset.train)
    if holdout:
        _info(f"holdout for tuning: {holdout.get('images') or ('rows %d-%d of every image' % tuple(holdout['stripe_rows']))}")
        if holdout.get("overlapping_left_out"):
            _info(f"left out of training too, as they overlap the held-out tiles (dataset.json): "
                  f"{holdout['overlapping_left_out']}")
    elif args.holdout == "auto" and not args.resume:
        from .tune import AUTO_HOLDOUT_MIN_IMAGES

        why = ("--preset paper trains on every image, as the paper does" if config.unet_preset == "paper" else
               f"{len(all_images)} training images, fewer than {AUTO_HOLDOUT_MIN_IMAGES}")
        _info(f"note: {why}: none held out, so the threshold is set on images the denoiser trained on "
              "(--holdout N or --holdout-stripe F to hold some out).")

    record = {
        "holdout": holdout,
        "command": saved_args.get("command", command),
        "data": saved_args.get("data", str(args.data)),
        "sampler": sampler.to_dict(),
        "scorer": {k: v for k, v in scorer.to_dict().items() if k != "backbone"},
        "backbone": backbone,
        "resumed_with": saved_args.get("resumed_with", []) + ([command] if args.resume else []),
    }
    info = {
        "data": f"{dataset.category} ({dataset.layout} layout, {len(images)} normal training images): {args.data}",
        "command": record["command"],
    }
    if record["resumed_with"]:
        info["resumed_with"] = record["resumed_with"]
    info["images"] = [p.name for p in images]
    if holdout:
        info["holdout"] = holdout
    # The threshold is set on normal images the denoiser did not train on where there are some
    # (a threshold from in-sample normals sits too low for unseen ones).
    from .tune import MIN_HELDOUT_CALIBRATION, unseen_holdout

    held = [p for p in all_images if p.name in set(holdout.get("images") or [])]
    unseen = unseen_holdout([p.name for p in held], [p.name for p in images], args.data)
    if len(held) >= MIN_HELDOUT_CALIBRATION and unseen:
        calibration_images = held
        info["calibration_normals"] = f"{len(held)} held-out training images (not used in training)"
    else:
        calibration_images = all_images
        why = (f"--holdout {MIN_HELDOUT_CALIBRATION} or more gives a threshold from unseen normals only" if unseen
               else "the held-out tiles overlap tiles it trained on")
        info["calibration_normals"] = (
            f"the {len(all_images)} training images (in-sample: the denoiser trained on "
            f"{len(images)} of them; {why})")
    for flag, start in (("--t0", sampler.t0), ("--repaint-t0", sampler.repaint_t0)):
        if start >= config.max_timestep:
            raise ValueError(f"{flag} {start} starts at a noise level that --max-timestep {config.max_timestep} never "
                             f"trains: give {flag} below {config.max_timestep} (or a larger --max-timestep).")

    # Checked here too, so the record never lands in a folder train() would refuse.
    check_output_folder(out, args.resume, args.overwrite)
    _write_json(out / TRAIN_ARGS_NAME, record)
    detector = train(images, out, config, resume=args.resume, overwrite=args.overwrite, info=info,
                     sampler=sampler, scorer_config=scorer, progress_bar=not args.no_progress,
                     calibration_images=calibration_images, holdout_rows=holdout_rows)
    if detector is not None and args.tune:
        _run_tuning(detector, args.data, out, args.tune_minutes * 60, f"{command}  (--tune)", seed=args.seed,
                    quiet=args.no_progress, min_removal=args.tune_min_removal,
                    max_model_calls=args.tune_max_model_calls)
    if detector is not None:

        _info(f"next: cgdiff evaluate --checkpoint {shlex.quote(str(out))} --data {shlex.quote(str(args.data))}")
    return 0


def _warn_fixed_on_resume(args: argparse.Namespace, saved: dict) -> None:
    """The shape of a resumed run comes from its saved state; say so when a flag asks otherwise."""
    pairs = {"--image-size": ("image_size", args.image_size), "--crop-size": ("crop_size", args.crop_size),
             "--preset": ("unet_preset", args.preset), "--batch-size": ("batch_size", args.batch_size),
             "--lr": ("learning_rate", args.lr), "--seed": ("seed", args.seed),
             "--max-timestep": ("max_timestep", args.max_timestep), "--snr-gamma": ("snr_gamma", args.snr_gamma),
             "--lr-schedule": ("lr_schedule", args.lr_schedule), "--warmup-steps": ("warmup_steps", args.warmup_steps),
             "--noise-to-norm": ("noise_to_norm", args.noise_to_norm)}
    defaults = TrainConfig()
    for flag, (key, value) in pairs.items():
        kept = saved.get(key, getattr(defaults, key))  # states saved before an option existed have its default
        if value != kept and value != getattr(defaults, key):
            _info(f"note: {flag} {value} is ignored: the resumed run keeps {key} = {kept}.")


def cmd_evaluate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .evaluation import evaluate

    overrides = _overrides(args)
    if args.record and overrides:
        raise ValueError(
            f"--record stores metrics of the checkpoint's own settings; drop the overrides "
            f"({', '.join('--' + k.replace('_', '-') for k in sorted(overrides))}) or drop --record."
        )
    needs = "--record (it writes into the checkpoint)"
    record_folder = _local_checkpoint(args.checkpoint, needs) if args.record else None
    _check_overrides(overrides)
    json_path = _check_new_file(args.json, args.overwrite, "--json")
    maps_dir = _check_new_folder(args.save_maps, args.overwrite, "--save-maps")
    dataset = _load_data(args)
    _info(f"data: {dataset.summary()}")
    if dataset.no_masks_reason and not args.require_pixel_metrics:
        _info(f"warning: {dataset.no_masks_reason}: image metrics only, pixel metrics n/a.")
    detector = _load_detector(args)
    detector.settings(**overrides)  # bad values are reported before the long part

    from .runtime import describe_path

    result = evaluate(detector, dataset, mask_size=args.mask_size, batch_size=args.batch_size,
                      progress=not args.no_progress, save_maps=maps_dir,
                      empty_masks="skip" if args.skip_empty_masks else "error",
                      require_pixel_metrics=args.require_pixel_metrics, **overrides)
    result["unet_path"] = describe_path(detector.fast_path())  # how the U-Net ran (timings depend on it)
    if result["pixel_excluded"]:
        _info(f"warning: {result['pixel_metrics_note']}.")
    result["command"] = _command_line(argv)
    print(_evaluation_table(result))
    if json_path is not None:
        _write_json(json_path, result)
        _info(f"wrote {json_path}")
    if maps_dir is not None:
        _info(f"wrote heat maps and overlays to {maps_dir}")
    if args.record:
        keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "removal", "fidelity",
                "n_images", "n_normal", "n_anomalous", "mask_size", "seconds_per_image", "unet_path", "pixel_metrics_note", "pixel_excluded",
                "threshold", "at_threshold", "command")
        detector.info["metrics"] = {
            **{k: result[k] for k in keys},
            "dataset": dataset.category,
            "split": "test",
            "device": result["device"],
            "description": f"Test split of {dataset.summary()}; maps compared with masks at "
            f"{args.mask_size} x {args.mask_size}.",
        }
        detector.info.pop("source", None)
        detector.save_pretrained(record_folder, overwrite=True)
        _info(f"recorded the metrics in {record_folder / 'cgdiff.json'} and its model card")
    return 0


def _evaluation_table(r: dict) -> str:
    d = r["dataset"]
    masks = (f"maps compared with masks at {r['mask_size']} x {r['mask_size']}" if r["mask_size"]
             else "no masks: image metrics only")
    if r["pixel_excluded"] and r["mask_size"]:
        masks += f", leaving out {len(r['pixel_excluded'])} defect image(s) with an empty mask"
    lines = [
        f"{d['category']} ({d['layout']}): {r['n_images']} test images ({r['n_normal']} normal, "
        f"{r['n_anomalous']} anomalous); detector at {r['image_size']} px; {masks}",
        "",
        f"  {'image AUROC':<24}{_fmt(r['image_auroc'])}",
        f"  {'pixel AUROC':<24}{_fmt(r['pixel_auroc'])}",
        f"  {'AUPRO (FPR <= ' + format(r['aupro_fpr_limit'], 'g') + ')':<24}{_fmt(r['aupro'])}",
        f"  {'image F1-max':<24}{_fmt(r['image_f1_max'])}",
        f"  {'pixel F1-max':<24}{_fmt(r['pixel_f1_max'])}",
        f"  {'seconds per image':<24}{r['seconds_per_image']:.3g}  (reconstruction "
        f"{r['reconstruction_seconds_per_image']:.3g}, on {r['device']})",
    ]
    if r.get("pixel_metrics_note"):
        lines.insert(7, f"  {'':<24}(pixel metrics: {r['pixel_metrics_note']})")
    if r.get("removal") is not None:
        lines.insert(-1, f"  {'defect removal':<24}{r['removal']:.3f}  (pooled over the defect pixels of "
                     f"{r['removal_n_images']} image(s) with a clean original; per-image mean {r['removal_mean']:.3f}; "
                     "1 = removed, 0 = kept)")
        if r.get("fidelity") is not None:
            lines.insert(-1, f"  {'fidelity outside':<24}{r['fidelity']:.4f}  (mean |reconstruction - input| over "
                         "normal pixels, fraction of the pixel range)")
    at = r.get("at_threshold")
    if at:
        lines.append(
            f"  {'at the threshold':<24}{r['threshold']:.4g}: {at['true_positive_rate']:.0%} of anomalous and "
            f"{at['false_positive_rate']:.0%} of normal images flagged"
        )
    lines += ["", "settings: " + _settings_line(r["sampler"], r["scorer"], r["overrides"])]
    return "\n".join(lines)


def _expand_images(items: Sequence[str]) -> list[Path]:
    from .data import iter_images

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = iter_images(p)
            entries = [q for q in p.iterdir() if not q.name.startswith(".")]
            subfolders = sorted(q.name for q in entries if q.is_dir())
            others = sum(1 for q in entries if q.is_file()) - len(found)
            left = ([f"{len(subfolders)} subfolder(s) ({', '.join(subfolders[:3])}{', ...' if len(subfolders) > 3 else ''})"]
                    if subfolders else []) + ([f"{others} file(s) of other types"] if others else [])
            if not found:
                raise DatasetError(f"folder '{p}' holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                                   + (f"; not searched: {' and '.join(left)}." if left else "."))
            if left:
                _info(f"note: in '{p}', {' and '.join(left)} not searched (only the images directly in a folder "
                      "are; pass subfolders as well).")
            paths.extend(found)
        else:
            paths.append(p)
    return paths


def _readable_images(paths: Sequence[Path], skip: bool) -> tuple[list[Path], list[str]]:
    """(`paths` that decode, messages of those left out): every bad one is named in one error,
    or with `skip` in one warning."""
    from .images import ImageError, load_image

    bad = []
    for p in paths:
        try:
            load_image(p)
        except ImageError as e:
            bad.append((p, str(e)))
    if not bad:
        return list(paths), []
    listed = "; ".join(message.rstrip(". ") for _, message in bad[:20])
    listed += f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
    if not skip:
        raise DatasetError(f"{len(bad)} of {len(paths)} image(s) unreadable: {listed} "
                           "(--skip-unreadable leaves them out)")
    _info(f"warning: skipped {len(bad)} unreadable image(s): {listed}")
    kept = [p for p in paths if p not in {q for q, _ in bad}]
    if not kept:
        raise DatasetError("no readable image left to inspect.")
    return kept, [message for _, message in bad]


def _output_names(paths: Sequence[Path]) -> list[str]:
    """One file-name stem per image: the file's stem, prefixed with its folder's name where
    stems repeat (test/good/000.png, test/hole/000.png -> good_000, hole_000), and with its
    position where even that repeats."""
    stems = [p.stem for p in paths]
    names = [s if stems.count(s) == 1 else f"{p.parent.name}_{s}" for p, s in zip(paths, stems)]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


DETECT_OUTPUTS = ("heatmap", "overlay", "reconstruction", "mask")


def cmd_detect(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import numpy as np
    from PIL import Image

    from .viz import heatmap, mask_image, overlay

    overrides = _overrides(args)
    _check_overrides(overrides)
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold > 0):
        raise ValueError(f"--threshold must be a number above 0, got {args.threshold}.")
    paths, skipped = _readable_images(_expand_images(args.images), args.skip_unreadable)  # before the long part
    json_path = _check_new_file(args.json, args.overwrite, "--json")
    out = Path(args.out) if args.out else None
    names = _output_names(paths)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out '{out}' exists and is a file; give a folder.")
        clashes = [out / f"{n}_{kind}.png" for n in names for kind in DETECT_OUTPUTS]
        clashes = [c for c in clashes if c.exists()]
        if clashes and not args.overwrite:
            raise FileExistsError(f"'{clashes[0]}' already exists ({len(clashes)} output file(s) would be replaced); "
                                  "pass --overwrite or choose another --out.")
    detector = _load_detector(args)
    sampler, scorer = detector.settings(**overrides)  # checked against the checkpoint before the long part
    if overrides and args.threshold is None:
        _info("note: the threshold was calibrated with the checkpoint's own settings; with overrides ("
              + ", ".join(f"{k}={v}" for k, v in overrides.items())
              + ", in place of the settings above) the verdict is only indicative (pass --threshold to set one).")

    from tqdm.auto import tqdm

    from .detector import _num_steps
    from .teaching import familiarity_at, known_texture, unfamiliar_text

    steps = _num_steps(sampler)
    n_chunks = math.ceil(len(paths) / args.batch_size)
    bar = tqdm(total=n_chunks * steps, desc=f"detecting {len(paths)} image(s)", unit="step",
               disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    rows = []
    try:
        for c, start in enumerate(range(0, len(paths), args.batch_size)):
            chunk = paths[start : start + args.batch_size]

            def step(done: int, _total: int, base: int = c * steps) -> None:
                bar.update(base + done - bar.n)

            results = detector.detect(chunk, batch_size=args.batch_size, threshold=args.threshold, progress=step,
                                      **overrides)
            for path, name, r in zip(chunk, names[start:], results):
                written = []
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    pictures = {
                        "heatmap": heatmap(r.anomaly_map, r.threshold),
                        "overlay": overlay(r.image, r.anomaly_map, r.threshold),
                        "reconstruction": r.reconstruction,
                        "mask": mask_image(r.mask),
                    }
                    for kind in DETECT_OUTPUTS:
                        target = out / f"{name}_{kind}.png"
                        Image.fromarray(np.ascontiguousarray(pictures[kind])).save(target)
                        written.append(str(target))
                familiar = familiarity_at(detector, r.anomaly_map, sampler, scorer)  # None: not judged
                rows.append({"image": str(path), "score": r.score, "threshold": r.threshold,
                             "relative_score": r.relative_score, "verdict": r.verdict,
                             "unfamiliar": None if familiar is None else familiar.unfamiliar,
                             "defect_fraction": float(r.mask.mean()), "seconds": r.seconds, "files": written})
    finally:
        bar.close()

    width = max(12, *(len(row["image"]) for row in rows))
    print(f"{'image':<{width}}  {'score':>9}  {'threshold':>9}  {'score/thr':>9}  verdict")
    for row, name in zip(rows, names):
        print(f"{row['image']:<{width}}  {row['score']:>9.4g}  {row['threshold']:>9.4g}  "
              f"{row['relative_score']:>9.3f}  {row['verdict']}" + (" (unfamiliar)" if row["unfamiliar"] else "")
              # where names repeat, the pictures carry another name than the image's: say which
              + (f"  (pictures {name}_*.png)" if out is not None and name != Path(row["image"]).stem
                 else ""))
    n_bad = sum(row["verdict"] == "anomalous" for row in rows)
    _info(f"{n_bad} of {len(rows)} image(s) anomalous" + (f"; pictures in {out}" if out is not None else ""))
    n_unfamiliar = sum(bool(row["unfamiliar"]) for row in rows)
    if n_unfamiliar:
        _info(f"note: {n_unfamiliar} image(s) marked (unfamiliar): {unfamiliar_text(known_texture(detector.info))} "
              "(most of the anomaly map lies above the level normal images reach only at their highest point).")
    if json_path is not None:
        _write_json(json_path, {
            "checkpoint": str(args.checkpoint), "image_size": detector.image_size,
            "sampler": sampler.to_dict(), "scorer": scorer.to_dict(), "overrides": overrides,
            "command": _command_line(argv), "results": rows, "skipped_unreadable": skipped,
        })
        _info(f"wrote {json_path}")
    return 0


def cmd_build_textures(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .data import build_texture_dataset

    root = Path(args.out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"--out '{root}' exists and is a file; give a folder.")
    for name in args.textures:
        target = root / name
        if target.exists() and any(target.iterdir()):
            if not args.overwrite:
                raise FileExistsError(f"'{target}' already exists; pass --overwrite to rebuild it.")
            if not (target / "dataset.json").is_file():
                raise FileExistsError(f"'{target}' exists and was not built by this command (no dataset.json); "
                                      "refusing to replace it. Choose another --out.")
            shutil.rmtree(target)
    built = build_texture_dataset(root, textures=args.textures, tile_size=args.tile_size,
                                  n_test_good=args.test_good, n_test_defect=args.test_defect, seed=args.seed,
                                  train_stride=args.train_stride)
    from .data import load_dataset

    for name, folder in built.items():
        print(load_dataset(folder, validate=False).summary())
    return 0


def _holdout(args: argparse.Namespace, saved_args: dict, images: list[Path], config: TrainConfig):
    """(images to train on, the holdout record, held-out rows) from --holdout / --holdout-stripe;
    a resumed run keeps the split it was started with."""
    from .data import training_tile_boxes
    from .tune import auto_holdout_count, holdout_stripe, split_holdout

    if args.resume:
        record = dict(saved_args.get("holdout") or {})
        if args.holdout not in ("auto", 0) or args.holdout_stripe is not None:
            _info("note: --holdout / --holdout-stripe are ignored: a resumed run keeps the split it started with.")
    elif args.holdout_stripe is not None:
        record = holdout_stripe(config.image_size, args.holdout_stripe, config.crop_size)[1]
    else:
        # The paper's recipe trains on every training image: 'auto' holds none out with --preset paper.
        auto = 0 if config.unet_preset == "paper" else auto_holdout_count(len(images))
        n = auto if args.holdout == "auto" else args.holdout
        record = {}
        if n:
            train_on, held_out = split_holdout(images, n, args.seed, boxes=training_tile_boxes(args.data))
            record = {"images": [p.name for p in held_out]}
            left_out = [p.name for p in images if p not in train_on and p not in held_out]
            if left_out:
                record["overlapping_left_out"] = left_out
    held = set(record.get("images", [])) | set(record.get("overlapping_left_out", []))
    kept = [p for p in images if p.name not in held]
    rows = record["stripe_rows"][1] - record["stripe_rows"][0] if record.get("stripe_rows") else 0
    return kept, record, rows


def _add_checkpoint_in_place(p: argparse.ArgumentParser, what: str) -> None:
    """--checkpoint, --data and --out of the commands that rewrite a checkpoint (tune, calibrate)."""
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="local checkpoint folder or bundled registry name (updated in place unless --out)")
    p.add_argument("--data", required=True, metavar="ROOT/CLASS",
                   help="dataset folder the checkpoint was trained on (only its normal training images are read)")
    p.add_argument("--out", metavar="CKPT", help=f"write the {what} checkpoint here instead of in place")


def _add_threshold_rule(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", choices=("validation-f1", "normal-tail"), default="validation-f1",
                   help="how the decision threshold is set: 'validation-f1', the F1-max cut between the normal "
                   "calibration images' scores and as many synthetic-defect images made from the normal training "
                   "images (anomalib's F1AdaptiveThreshold on a synthetic validation split); 'normal-tail', from "
                   "normal images only: max(largest normal score, mean + 3 sd)")


def _run_tuning(detector, data: str, folder: Optional[Path], budget_s: float, command: str, seed: int = 0,
                n_normal: int = 4, n_anomalous: int = 12, tie_tolerance: float = 0.005,
                max_evaluations: Optional[int] = None, batch_size: int = 4, quiet: bool = False,
                min_removal: float = 0.0, threshold: str = "validation-f1",
                map_sigmas: Sequence[float] = (), max_model_calls: Optional[int] = None,
                starts: Sequence = (), starts_from: Sequence[str] = (),
                copy_from: Optional[Path] = None) -> dict[str, Any]:
    """Tune `detector` on `data`, print the choice and the speed/quality front, and (unless
    `folder` is None) save it into `folder` with the front plot, first replacing `folder` by a
    copy of the checkpoint `copy_from` where given (only once the tuning has succeeded, so that
    a failed run leaves it as it was). `starts_from` names where `starts` come from, for the
    record. Returns the tuning record."""
    from .tune import FRONT_PLOT_NAME, front_table, plot_front, tune

    _info(f"tuning for up to {budget_s / 60:.1f} min (test images are never read) ...")
    result = tune(detector, data, budget_s=budget_s, seed=seed, n_normal=n_normal, n_anomalous=n_anomalous,
                  tie_tolerance=tie_tolerance, max_evaluations=max_evaluations, batch_size=batch_size,
                  min_removal=min_removal, max_model_calls=max_model_calls, threshold=threshold,
                  map_sigmas=map_sigmas, starts=starts, apply=folder is not None,
                  log=None if quiet else _info)
    record = detector.info["tuning"] if folder is not None else result.record
    record["command"] = command
    if starts_from:
        record["search"]["starts_from"] = list(starts_from)
    print(record["summary"])
    print("speed/quality front (fastest first; each point's flags select it for evaluate/detect):")
    print("\n".join(front_table(record)))
    if folder is not None:
        if copy_from is not None:
            _copy_checkpoint(copy_from, folder)
        record["front_plot"] = FRONT_PLOT_NAME
        detector.info.pop("source", None)
        detector.save_pretrained(folder, overwrite=True)
        plot_front(record, folder / FRONT_PLOT_NAME)
        _info(f"saved the tuned settings, the search table and {FRONT_PLOT_NAME} in {folder} "
              f"(threshold {detector.threshold:.4g})")
    return record


def _target_folder(args: argparse.Namespace, verb: str) -> tuple[Path, Optional[Path]]:
    """(source checkpoint folder, folder to write: None for --dry-run) for tune / calibrate,
    checked before any work so that nothing saved is replaced by accident."""
    source = _local_checkpoint(args.checkpoint, f"{verb} (it writes into it, or into a copy with --out)")
    folder = None if getattr(args, "dry_run", False) else (Path(args.out) if args.out else source)
    if folder is not None and folder.resolve() != source.resolve():
        a, b = folder.resolve(), source.resolve()
        if a in b.parents or b in a.parents:
            raise ValueError(f"--out '{folder}' and the checkpoint '{source}' lie inside one another; "
                             "give a folder beside it.")
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"--out '{folder}' exists and is a file; give a folder.")
        if folder.exists() and any(folder.iterdir()):
            if not args.overwrite:
                raise FileExistsError(f"--out '{folder}' already exists; pass --overwrite to replace it.")
            if not (folder / "cgdiff.json").is_file():
                raise FileExistsError(f"--out '{folder}' is a folder with files but no cgdiff checkpoint in it; "
                                      "--overwrite replaces only a checkpoint folder.")
    return source, folder


def _copy_checkpoint(source: Path, folder: Optional[Path]) -> None:
    if folder is not None and folder.resolve() != source.resolve():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("training_state", ".*"))


def cmd_tune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    source, folder = _target_folder(args, "tune")
    json_path = _check_new_file(args.json, args.overwrite, "--json")
    from .tune import check_starts

    starts = [_stored_sampler(name) for name in args.start_from]
    detector = _load_detector(args)
    starts = check_starts(detector, starts, [f"--start-from {name}" for name in args.start_from])
    if starts:
        _info(f"further start(s) of the search: the sampler settings of {', '.join(args.start_from)}")
    record = _run_tuning(detector, args.data, folder, args.minutes * 60, _command_line(argv), seed=args.seed,
                         n_normal=args.normal, n_anomalous=args.anomalous, tie_tolerance=args.tie_tolerance,
                         max_evaluations=args.max_evaluations, batch_size=args.batch_size, quiet=args.no_progress,
                         min_removal=args.min_removal, threshold=args.threshold, map_sigmas=args.map_sigmas,
                         max_model_calls=args.max_model_calls, starts=starts, starts_from=args.start_from,
                         copy_from=source)
    if json_path is not None:
        _write_json(json_path, record)
        _info(f"wrote {json_path}")
    return 0


def _stored_sampler(name: str):
    """The sampler settings stored in checkpoint `name` (a folder or a known name), for
    `tune --start-from`. Raises ValueError naming the checkpoint when it has none readable."""
    from .detector import CheckpointError, read_config

    folder = _local_checkpoint(name, "--start-from")
    if not (folder / "cgdiff.json").is_file():
        raise ValueError(f"--start-from: '{name}' is not a cgdiff checkpoint (no cgdiff.json in it); it takes a "
                         "checkpoint folder such as checkpoints/gravel, or a bundled name.")
    try:
        return SamplerConfig(**read_config(folder)["sampler"])
    except (CheckpointError, TypeError, ValueError) as e:
        raise ValueError(f"--start-from: the sampler settings of '{name}' cannot be read: {e}") from None


def cmd_calibrate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .tune import recalibrate, retire_stale_metrics

    source, folder = _target_folder(args, "calibrate")
    detector = _load_detector(args)  # refuses an uncalibrated checkpoint
    before, sampler_before = detector.calibration, detector.sampler
    detector.sampler = detector.sampler.replace(repaint_t0=args.repaint_t0, repaint_steps=args.repaint_steps)
    if args.repaint_steps is not None and not detector.sampler.repaint_t0:
        raise ValueError("--repaint-steps sets the second pass's steps, and this checkpoint has no second pass: "
                         "give --repaint-t0 N too.")
    used = recalibrate(detector, args.data, threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                       log=None if args.no_progress else _info)
    stale = retire_stale_metrics(detector, detector.sampler.to_dict() != sampler_before.to_dict(), before.pixel_scale)
    if stale:
        detector.info["metrics_before_recalibration"] = stale
    detector.info["calibration_before"] = {k: v for k, v in before.to_dict().items()
                                           if k not in ("normal_scores", "anomalous_scores")}
    detector.info["calibration_normals"] = used["calibration_normals"]
    detector.info["calibration_command"] = _command_line(argv)
    detector.info.pop("source", None)
    _copy_checkpoint(source, folder)
    detector.save_pretrained(folder, overwrite=True)
    cal = detector.calibration
    print(f"threshold {before.threshold:.4g} -> {cal.threshold:.4g} ({cal.threshold_rule}; c = {cal.pixel_scale:.4g}, "
          f"{used['calibration_normals']}); saved in {folder}")
    return 0


def cmd_push(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .detector import read_config
    from .card import render_model_card
    from .hub import check_checkpoint_files, looks_like_repo_id, push_folder

    folder = _local_checkpoint(args.checkpoint, "push")
    if not looks_like_repo_id(args.repo_id):
        raise ValueError(f"'{args.repo_id}' is not a Hub repo id (OWNER/NAME).")
    check_checkpoint_files(folder)
    config = read_config(folder)
    if config.get("hub_repo_id") != args.repo_id:
        # The card's usage snippet names the repo; refresh it for this upload.
        config["hub_repo_id"] = args.repo_id
        for name, text in (("cgdiff.json", json.dumps(config, indent=2) + "\n"),
                           ("README.md", render_model_card(config, config.get("name") or folder.name))):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, folder / name)
    url = push_folder(folder, args.repo_id, private=args.private, commit_message=args.message)
    print(f"pushed {folder} to {url}")
    return 0


def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import bench

    if not (args.quality or args.speed):
        raise UsageError("choose --quality, --speed or both (see 'cgdiff bench --help')")
    out = _check_new_folder(args.out, args.overwrite, "--out")
    device = _device(args.device)
    import torch

    # Where and when, with the load on the machine as the run starts.
    machine = bench.machine_info(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: dict[str, Any] = {"command": _command_line(argv)}
    pairs, notes = [], []
    if args.quality:
        for ckpt, data in args.pair or []:
            found, skipped = bench.expand_pairs(ckpt, data)
            pairs += found
            notes += skipped
        if args.textures:
            found, skipped = bench.texture_pairs(args.textures)
            pairs += found
            notes += skipped
        if not pairs:
            raise ValueError("--quality needs data: --pair CKPT DATA and/or --textures DIR"
                             + (f" ({'; '.join(notes)})" if notes else ""))
    checkpoints = list(args.checkpoint or [])
    if args.speed and not checkpoints:
        from .registry import known_checkpoints

        checkpoints = [str(e.path) for e in known_checkpoints() if e.bundled]
        if not checkpoints:
            raise ValueError("--speed: no bundled checkpoints to time; give --checkpoint CKPT.")
    sections = []
    if args.quality:
        quality = bench.run_quality(pairs, args.methods, args.mask_size, args.batch_size, args.coreset_ratio, device,
                                    progress=not args.no_progress, log=_info,
                                    empty_masks="skip" if args.skip_empty_masks else "error")
        excluded = sorted({p for row in quality["rows"] for p in row.get("pixel_excluded") or []})
        if excluded:
            notes.append(f"Left out of the pixel metrics (empty masks, --skip-empty-masks): {len(excluded)} image(s): "
                         + ", ".join(excluded) + ".")
        quality["notes"] = notes
        results["quality"] = quality
        sections.append("## Quality\n\n" + bench.render_quality(quality) + "".join(f"\n\n{n}" for n in notes))
    if args.speed:
        agreement = {}
        if args.textures:  # each bundled checkpoint's test split, for the CPU variants' verdicts
            for ckpt, data in bench.texture_pairs(args.textures)[0]:
                agreement[ckpt] = sorted(str(p) for p in (Path(data) / "test").rglob("*.png"))
        speed = bench.run_speed(checkpoints, device, args.batch_sizes, args.image_sizes, args.repeats,
                                paper_scale=not args.no_paper_scale, gpu_batch_size=args.gpu_batch_size,
                                compile_mode=args.compile_mode, agreement=agreement, sweeps=not args.no_sweeps,
                                fast_path=False if args.no_fast_path else None, log=_info)
        results["speed"] = speed
        sections.append("## Speed\n\n" + bench.render_speed(speed))
    results["machine"] = m = machine
    header = (f"`{results['command']}` on {m['date']}: {m['cpu']} ({m['cpu_cores']} cores, torch threads "
              f"{m['torch_threads']}, load average {m['load_average']}"
              + {True: ", native bf16", False: ", no native bf16"}.get(m.get("native_bf16"), "")
              + f"), {m['gpu'] or 'no GPU'}, torch {m['torch']}, "
              f"cgdiff {m['cgdiff']}")
    text = header + "\n\n" + "\n\n".join(sections)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "bench.json", results)
        (out / "bench.md").write_text(text + "\n")
        if args.quality:
            bench.plot_quality(results["quality"]["rows"], out / "quality.png")
        if args.speed and results["speed"]["sweeps"]:
            bench.plot_speed(results["speed"]["sweeps"], out / "speed.png")
        _info(f"wrote bench.json, bench.md and plots to {out}")
    return 0


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "calibrate": cmd_calibrate, "evaluate": cmd_evaluate, "detect": cmd_detect, "build-textures": cmd_build_textures,
            "push": cmd_push, "bench": cmd_bench}


# ----------------------------------------------------------------------------- entry point


def _user_errors() -> tuple[type[BaseException], ...]:
    from .scorer import BackboneUnavailable

    return (ValueError, FileExistsError, TrainingError, BackboneUnavailable, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CGDIFF_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return int(e.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command != "bench":  # bench measures the allocator before and after itself
            from .runtime import keep_freed_memory

            keep_freed_memory()
        return COMMANDS[args.command](args, argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            raise
        detail = str(e) if str(e) else "interrupted"
        hint = "; continue with --resume" if "state saved" in detail else ""
        print(f"{PROG}: {detail}{hint}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        if _is_out_of_memory(e):
            print(f"{PROG}: error: out of memory ({type(e).__name__}); lower --batch-size or --image-size.",
                  file=sys.stderr)
            return 2
        if isinstance(e, _user_errors()):
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return 2
        raise


def _is_out_of_memory(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, MemoryError)


if __name__ == "__main__":
    sys.exit(main())
