"""cgdiff demo: find defects in texture images with a conditioned-guided diffusion model.

    python app.py                                    # http://127.0.0.1:7860, bundled models
    python app.py --host 0.0.0.0 --port 7860 --concurrency 2 --queue-size 32 --max-upload 20mb

Every option can also be set in the environment (the command line wins):

    CGDIFF_APP_HOST, CGDIFF_APP_PORT             where to listen (else GRADIO_SERVER_NAME /
                                                 GRADIO_SERVER_PORT, else 127.0.0.1:7860)
    CGDIFF_APP_CONCURRENCY   (1)                 inference requests run at once; others wait
    CGDIFF_APP_QUEUE_SIZE    (32)                requests that may wait; beyond, "queue full"
    CGDIFF_APP_MAX_UPLOAD    (20mb)              largest accepted upload
    CGDIFF_APP_MAX_BATCH     (16)                images per batch request
    CGDIFF_APP_MAX_MODELS    (4)                 detectors kept in memory (least recently used go)
    CGDIFF_APP_CACHE_MINUTES (60)                uploads and result pictures are deleted after this
    CGDIFF_APP_RUNTIME       (auto)              how the U-Net runs: auto (the CPU default,
                                                 channels-last PyTorch), reference (fp32 eager),
                                                 channels_last, bf16, onnxruntime, openvino, openvino-bf16
    CGDIFF_APP_LOCAL_FOLDERS (auto)              whether the model box loads checkpoint folders from this
                                                 machine's disk: auto (only when serving 127.0.0.1 without
                                                 --share, outside a Hugging Face Space), yes, no; listed
                                                 models and Hub repo ids load either way
    CGDIFF_CHECKPOINTS                           folder with registry.json (default: checkpoints/)

`import app` builds the interface as `app.demo` without serving it; `app.launch()` serves it
with the settings above. The app holds no method code: detection, maps and pictures all come
from the `cgdiff` package.
"""

from __future__ import annotations

import argparse
import contextvars
import csv
import functools
import html
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

from cgdiff.settings import CHOICES as RUNTIME_CHOICES

# ------------------------------------------------------------------------------ settings


class BadSetting(SystemExit):
    """A serving setting that cannot work: the process exits with status 2, as argparse does for
    a bad flag, after `_refuse` has printed the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _refuse(message: str) -> NoReturn:
    print(f"app.py: error: {message}", file=sys.stderr)
    raise BadSetting(message)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        _refuse(f"{name} must be a whole number, got {value!r}")


@dataclass
class AppConfig:
    host: Optional[str] = None
    port: Optional[int] = None
    concurrency: int = 1
    queue_size: int = 32
    max_upload: str = "20mb"
    max_batch: int = 16
    max_models: int = 4
    cache_minutes: int = 60
    runtime: str = "auto"
    local_folders: str = "auto"  # auto | yes | no: see `serves_local_folders`

    @classmethod
    def from_env(cls) -> "AppConfig":
        return cls(
            host=os.environ.get("CGDIFF_APP_HOST") or None,
            port=_env_int("CGDIFF_APP_PORT", 0) or None,
            concurrency=_env_int("CGDIFF_APP_CONCURRENCY", cls.concurrency),
            queue_size=_env_int("CGDIFF_APP_QUEUE_SIZE", cls.queue_size),
            max_upload=os.environ.get("CGDIFF_APP_MAX_UPLOAD", cls.max_upload).strip() or cls.max_upload,
            max_batch=_env_int("CGDIFF_APP_MAX_BATCH", cls.max_batch),
            max_models=_env_int("CGDIFF_APP_MAX_MODELS", cls.max_models),
            cache_minutes=_env_int("CGDIFF_APP_CACHE_MINUTES", cls.cache_minutes),
            runtime=os.environ.get("CGDIFF_APP_RUNTIME", cls.runtime).strip() or cls.runtime,
            local_folders=os.environ.get("CGDIFF_APP_LOCAL_FOLDERS", cls.local_folders).strip().lower() or "auto",
        ).validate()

    def validate(self) -> "AppConfig":
        """Refuse settings that would break serving (a zero concurrency serves nobody, a
        negative queue refuses everyone), naming the setting."""
        limits = {"concurrency": 1, "queue_size": 0, "max_batch": 1, "max_models": 1, "cache_minutes": 1}
        flags = {"concurrency", "queue_size", "max_batch"}
        for name, low in limits.items():
            if getattr(self, name) < low:
                where = (f"--{name.replace('_', '-')} or " if name in flags else "") + f"CGDIFF_APP_{name.upper()}"
                _refuse(f"{name} must be at least {low}, got {getattr(self, name)} (set by {where}).")
        if self.port is not None and not 0 < self.port < 65536:
            _refuse(f"port must be in 1..65535, got {self.port}.")
        if self.local_folders not in ("auto", "yes", "no"):
            _refuse(f"local_folders must be auto, yes or no, got {self.local_folders!r} (set by CGDIFF_APP_LOCAL_FOLDERS).")
        if self.runtime not in RUNTIME_CHOICES:
            _refuse(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {self.runtime!r} "
                    "(set by --runtime or CGDIFF_APP_RUNTIME).")
        return self


def serves_local_folders(config: AppConfig, share: bool = False) -> bool:
    """Whether the model box may load checkpoint folders from this machine's disk. "auto": only
    for a server on this machine alone (127.0.0.1 or localhost, no public link, not a Hugging
    Face Space), so that visitors of a public demo can neither load nor probe its folders."""
    if config.local_folders != "auto":
        return config.local_folders == "yes"
    host = config.host or os.environ.get("GRADIO_SERVER_NAME")  # Gradio's own setting, when the app has none
    local_host = host in (None, "", "127.0.0.1", "localhost", "::1")
    return local_host and not share and not os.environ.get("SPACE_ID")


def build_parser(env: AppConfig) -> argparse.ArgumentParser:
    """The command line of `python app.py`, with the environment's settings as defaults."""
    parser = argparse.ArgumentParser(description="Serve the cgdiff demo.")
    parser.add_argument("--host", default=env.host, help="address to listen on (0.0.0.0 for all; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=env.port, help="port (default 7860, or the next free one)")
    parser.add_argument("--concurrency", type=int, default=env.concurrency,
                        help="inference requests run at once (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=env.queue_size,
                        help="requests that may wait (0: no limit; default: %(default)s)")
    parser.add_argument("--max-upload", default=env.max_upload, help="largest upload, e.g. 20mb (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=env.max_batch,
                        help="images per batch request (default: %(default)s)")
    parser.add_argument("--runtime", default=env.runtime, choices=RUNTIME_CHOICES,
                        help="how the U-Net runs: auto (the CPU default, channels-last PyTorch), "
                        "reference (fp32 eager PyTorch), channels_last, bf16 (bf16 autocast, channels-last), "
                        "or a CPU runtime (pip install 'cgdiff[fast]'); "
                        "also CGDIFF_APP_RUNTIME (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser


def read_command_line(argv: Optional[list[str]] = None) -> tuple[AppConfig, bool]:
    """The serving settings of `python app.py ARGV` (flags over CGDIFF_APP_*), checked, and
    whether --share was given. Exits with status 2 on a bad flag or setting, as argparse does."""
    env = AppConfig.from_env()
    args = build_parser(env).parse_args(argv)
    config = AppConfig(host=args.host, port=args.port, concurrency=args.concurrency, queue_size=args.queue_size,
                       max_upload=args.max_upload, max_batch=args.max_batch, max_models=env.max_models,
                       cache_minutes=env.cache_minutes, runtime=args.runtime,
                       local_folders=env.local_folders).validate()
    return config, args.share


if __name__ == "__main__":
    # `python app.py --help`, a bad flag or a bad CGDIFF_APP_* setting answers here, before
    # gradio and torch load (about 10 s).
    read_command_line()

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cgdiff import __version__, teaching  # noqa: E402
from cgdiff.card import calibration_normals, removal_text  # noqa: E402
from cgdiff.detector import Detection, Detector, _num_steps  # noqa: E402
from cgdiff.hub import CheckpointError, looks_like_repo_id, resolve_checkpoint  # noqa: E402
from cgdiff.images import ImageError, load_image  # noqa: E402
from cgdiff.registry import checkpoints_dir, default_checkpoint, known_checkpoints, registry_problems  # noqa: E402
from cgdiff.runtime import keep_freed_memory, path_options  # noqa: E402
from cgdiff.model import NUM_TRAIN_TIMESTEPS  # noqa: E402
from cgdiff.sampler import SamplerConfig, timesteps  # noqa: E402
from cgdiff.scorer import VALIDATION_F1, BackboneUnavailable  # noqa: E402
from cgdiff.viz import compare_masks, heatmap, mask_image, overlay  # noqa: E402

CONFIG = AppConfig.from_env()
OUTPUT_DIR = Path(tempfile.gettempdir()) / "cgdiff-app"  # batch downloads; pruned after an hour
OUTPUT_MAX_AGE_S = 3600

# Sampler and scorer settings the user can change, with the control's label.
SAMPLER_KEYS = ("t0", "steps", "w", "guidance_scale", "blur_sigma", "eta")
CALIBRATED_KEYS = SAMPLER_KEYS + ("pixel_weight",)
SHORT_NAMES = {"t0": "t0", "steps": "K", "w": "w", "guidance_scale": "s", "blur_sigma": "blur sigma",
               "eta": "eta", "pixel_weight": "v"}


def esc(text: Any) -> str:
    """Text shown inside HTML or Markdown: markup characters escaped, quotes kept readable."""
    return html.escape(str(text), quote=False)


# ------------------------------------------------------------------------------- models


# Every torch call of the app runs on this one thread (`--concurrency` N > 1: N threads). Each
# thread that runs torch gets its own OpenMP team, and on a small CPU the teams of earlier
# threads slow the next call: over HTTP grass took 3.6 to 3.8 s per image on one thread, 6.8 to
# 7.1 s on Gradio's changing worker threads (BENCHMARKS.md, "One inference thread").
INFERENCE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgdiff-inference")


def on_inference_thread(fn):
    """`fn` run on the app's one inference thread (directly when called there), with the
    caller's context variables (Gradio's progress and warnings); the caller waits for it."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if threading.current_thread().name.startswith("cgdiff-inference"):
            return fn(*args, **kwargs)
        return INFERENCE.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()
    return run


class ModelCache:
    """Detectors by name, each loaded once and kept (the least recently used go beyond
    `max_models`). One load runs at a time, so a burst of model switches cannot fill the
    memory; requests for a loaded model never wait for a load."""

    def __init__(self, max_models: int, runtime: str = "auto"):
        self.max_models = max(1, max_models)
        self.runtime = runtime  # cgdiff.runtime: how each loaded detector runs its U-Net
        self._models: OrderedDict[str, Detector] = OrderedDict()
        self._lock = threading.Lock()  # guards _models
        self._load_lock = threading.Lock()  # one load at a time
        self.loads = 0  # how many times a checkpoint was read (tests check models load once)
        self.local_folders = True  # checkpoint folders from this machine's disk (`serves_local_folders`)

    def _cached(self, key: str) -> Optional[Detector]:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        return None

    def get(self, name: str) -> Detector:
        key = (name or "").strip()
        if not key:
            raise CheckpointError("no model chosen: pick one from the list or type a Hub repo id or folder.")
        detector = self._cached(key)
        if detector is not None:
            return detector
        return self._load(key)

    @on_inference_thread
    def _load(self, key: str) -> Detector:
        with self._load_lock:
            detector = self._cached(key)  # loaded while this request waited
            if detector is not None:
                return detector
            detector = Detector.from_pretrained(self._source(key))
            if detector.calibration is None:
                raise CheckpointError(f"'{key}' holds an uncalibrated detector (no threshold); calibrate it first.")
            detector.use_fast_path(**path_options(self.runtime, detector.device))  # a missing runtime warns
            with self._lock:
                self.loads += 1
                self._models[key] = detector
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
        return detector

    def _source(self, key: str) -> str:
        """What to load for a model name: the name itself, or with local folders off, a listed
        model's name or a Hub repo id downloaded from the Hub (never a folder on this disk; the
        message is the same whether such a folder exists or not)."""
        if self.local_folders or key in {entry.name for entry in known_checkpoints()}:
            return key
        path = Path(key).expanduser()
        if path.is_absolute() or key.startswith((".", "~")) or not looks_like_repo_id(key) or path.exists():
            raise CheckpointError(f"'{key}' is not a model this server offers: choose one from the list or type a "
                                  "Hugging Face Hub repo id (owner/name). It does not load folders from its disk.")
        return str(resolve_checkpoint(key))

    @on_inference_thread
    def set_runtime(self, runtime: str) -> None:
        """Run the U-Net of every detector, loaded and to come, on `runtime` (see cgdiff.runtime)."""
        with self._load_lock:
            if runtime == self.runtime:
                return
            self.runtime = runtime
            with self._lock:
                loaded = list(self._models.values())
            for detector in loaded:
                detector.use_fast_path(**path_options(runtime, detector.device))

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)


MODELS = ModelCache(CONFIG.max_models, CONFIG.runtime)
LOAD_ERRORS = (CheckpointError, BackboneUnavailable, OSError, ValueError)


def model_defaults(name: str, detector: Detector) -> dict[str, Any]:
    s, sc = detector.sampler, detector.scorer.config
    return {"model": name, "t0": s.t0, "steps": s.steps, "w": s.w, "guidance_scale": s.guidance_scale,
            "blur_sigma": s.blur_sigma, "eta": s.eta, "pixel_weight": sc.pixel_weight, "seed": s.seed,
            "threshold_scale": 1.0, "threshold": detector.threshold}


def model_info(name: str, detector: Detector) -> str:
    entry = next((e for e in known_checkpoints() if e.name == name), None)
    training = detector.info.get("training", {})
    metrics = detector.info.get("metrics", {})
    description = entry.description if entry else ""
    if description.lower().startswith(f"{name.lower()}:"):  # registry lines often start with the name
        description = description[len(name) + 1:].strip()
    lines = [f"**{esc(name)}**" + (f": {esc(description)}" if description else "")]
    texture = teaching.known_texture(detector.info)
    if texture:
        lines.append(f"Knows **{esc(texture)}** texture: it judges {esc(texture)} images only (it learned normal "
                     f"{esc(texture)} images and nothing else).")
    lines.append(f"{esc(detector.describe())}.")
    cal = detector.calibration
    normals = calibration_normals(detector.info) or f"{cal.n_images} normal images"
    if cal.threshold_rule == VALIDATION_F1:
        lines.append(f"Threshold {cal.threshold:.4g}: the best F1 between {esc(normals)} and "
                     f"{len(cal.anomalous_scores)} with synthetic defects.")
    else:
        lines.append(f"Threshold {cal.threshold:.4g}, calibrated on {esc(normals)}.")
    if training.get("data"):
        lines.append(f"Trained on {esc(str(training['data']))}"
                     + (f" for {training['steps']} steps." if training.get("steps") else "."))
    shown = [f"{k.replace('_', ' ')} {metrics[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")
             if isinstance(metrics.get(k), (int, float))]
    if shown:
        lines.append("Measured: " + ", ".join(shown) + ".")
    removal = removal_text(metrics)
    if removal:
        lines.append(esc(removal))
    return "  \n".join(lines)


def entry_texture(entry) -> Optional[str]:
    """The texture a registry entry's model knows (bundled ones: from their cgdiff.json)."""
    if entry is None or entry.path is None:
        return None
    try:
        return teaching.known_texture(json.loads((entry.path / "cgdiff.json").read_text()))
    except (OSError, ValueError):
        return None


def model_choices() -> list[tuple[str, str]]:
    choices = []
    for e in known_checkpoints():
        texture = entry_texture(e)
        where = "bundled" if e.bundled else "Hub: " + str(e.repo_id)
        choices.append((f"{e.name}: knows {texture} texture ({where})" if texture else f"{e.name} ({where})", e.name))
    return choices


def example_groups() -> list[tuple[Any, list[tuple[str, str]]]]:
    """(registry entry, [(image path, caption)]) for every bundled model with examples."""
    groups = []
    for entry in known_checkpoints():
        paths = entry.examples()
        kinds = [p.stem.rsplit("_", 1)[0] for p in paths]  # normal_000 -> normal, defect_scratch_000 -> defect_scratch
        seen: dict[str, int] = {}
        items = []
        for path, kind in zip(paths, kinds):
            seen[kind] = seen.get(kind, 0) + 1
            number = f" {seen[kind]}" if kinds.count(kind) > 1 else ""
            items.append((str(path), f"{kind.replace('_', ' ')}{number}"))
        if items:
            groups.append((entry, items))
    return groups


def all_examples() -> list[Path]:
    return [p for e in known_checkpoints() for p in e.examples()]


# ------------------------------------------------------------------------------- inputs


def upload_image(**kwargs: Any) -> gr.Image:
    """A gr.Image that hands the uploaded file over untouched (as a path).

    gr.Image decodes uploads with PIL before the app sees them: a file that is not an image,
    a corrupt one or a huge one then fails inside Gradio with a message about its temporary
    file. Passing the file on lets `cgdiff.images.load_image` check it and say what is wrong,
    and keeps 16-bit and transparent images intact for its conversions. (An instance-level
    override: a gr.Image subclass would make Gradio write a type stub beside this file.)"""
    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    decode = component.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None) and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        try:
            return decode(payload)  # a data URL (some pastes): Gradio decodes it
        except Exception as e:  # noqa: BLE001 - a data URL that does not decode
            raise refused(f"The pasted image could not be read ({type(e).__name__}).") from None

    component.preprocess = preprocess
    return component


def refused(message: str) -> gr.Error:
    """The error for a request the app refuses (bad input, an unknown model): the caller sees the
    message, and the server log gets one line instead of Gradio's traceback."""
    print(f"app.py: refused a request: {message}", file=sys.stderr)
    return gr.Error(message, print_exception=False)


def named_range_errors(slider: gr.Slider) -> gr.Slider:
    """`slider`, whose out-of-range value sent through the API is refused with the control's
    name and one log line (Gradio's own check names no control and logs a traceback). Its
    `preprocess` is wrapped on the instance: a Slider subclass would make Gradio write a .pyi
    stub beside this file."""
    check = slider.preprocess

    def preprocess(payload: float) -> float:
        try:
            return check(payload)
        except gr.Error as e:
            raise refused(f"{slider.label}: {e.message}") from None

    slider.preprocess = preprocess
    return slider


def read_upload(path: Any, what: str = "the image") -> Image.Image:
    """Decode an uploaded file; ImageError messages name the file by its original name."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise ImageError("no image yet: upload one, paste one, use the webcam, or click an example "
                         "(an API call passes an image file).")
    try:
        return load_image(path)
    except ImageError as e:
        message = str(e)
        if isinstance(path, (str, os.PathLike)):
            message = message.replace(f"'{path}'", f"'{Path(path).name}'")
        raise ImageError(message) from None


def overrides_from(t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed) -> dict[str, Any]:
    """Control values -> detect() overrides; empty numbers mean 'the checkpoint's value'."""
    values = {"t0": t0, "steps": steps, "w": w, "guidance_scale": guidance_scale, "blur_sigma": blur_sigma,
              "eta": eta, "pixel_weight": pixel_weight, "seed": seed}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if key in ("t0", "steps", "seed") and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value  # as given: a float would round a seed above 2**53
            continue
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{SHORT_NAMES.get(key, key)} must be a finite number, got {value}.")
        if key in ("t0", "steps", "seed"):
            if not value.is_integer():  # the sliders send whole numbers; an API call may not
                raise ValueError(f"{SHORT_NAMES.get(key, key)} must be a whole number, got {value!r}.")
            value = int(value)
        out[key] = value
    return out


CONTROL_KEYS = ("t0", "steps", "w", "guidance_scale", "blur_sigma", "eta", "pixel_weight", "seed")


def own_settings(model: str, page_defaults: Optional[dict[str, Any]], *values: Any) -> tuple[Any, ...]:
    """The controls' values (t0, K, w, s, blur sigma, eta, v, seed) as meant for `model`. When
    they are all exactly the stored settings of another model, the one the controls were last
    loaded for (`page_defaults["model"]`), they were not set for this one: all become None ("the
    checkpoint's value"). That is what an API call that leaves the controls out sends (the
    page's start values, the first model's settings), so it runs the chosen model at its own.
    Otherwise the values pass unchanged, a control moved by hand included."""
    if not page_defaults or (page_defaults.get("model") or "") == (model or "").strip():
        return values
    try:
        untouched = all(value is not None and math.isclose(float(value), float(page_defaults[key]), rel_tol=1e-6)
                        for key, value in zip(CONTROL_KEYS, values))
    except (KeyError, TypeError, ValueError):
        untouched = False
    return (None,) * len(values) if untouched else values


def changed_settings(defaults: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """The short names (K, w, ...) of the sampler and balance settings in `overrides` that differ
    from those the threshold was calibrated at (`defaults`)."""
    return [SHORT_NAMES[k] for k in CALIBRATED_KEYS if k in overrides and k in defaults
            and not math.isclose(float(overrides[k]), float(defaults[k]), rel_tol=1e-6, abs_tol=1e-9)]


def calibration_note(defaults: dict[str, Any], overrides: dict[str, Any]) -> str:
    """A short note when sampler or balance settings differ from those the threshold was
    calibrated at; empty otherwise."""
    changed = changed_settings(defaults, overrides)
    if not changed:
        return ""
    at = ", ".join(f"{SHORT_NAMES[k]}={defaults[k]:g}" for k in CALIBRATED_KEYS if k in defaults)
    moved = ", ".join(changed)
    return (f"Note: you changed {moved}. The threshold and the pixel/feature balance were calibrated at "
            f"this model's defaults ({at}); scores may shift, so read the verdict as indicative, or press "
            "*Reset to model defaults*.")


# ------------------------------------------------------------------------------ outputs

VERDICT_STYLE = {
    "anomalous": ("#b42318", "#fef3f2", "ANOMALOUS: defect found"),
    "normal": ("#067647", "#ecfdf3", "NORMAL: no defect found"),
    "error": ("#93370d", "#fffaeb", "Cannot inspect this input"),
    "unfamiliar": ("#6941c6", "#f9f5ff", "UNLIKE THE IMAGES THIS MODEL KNOWS"),
    "idle": ("#344054", "#f9fafb", "No result yet"),
    "running": ("#d0d5dd", "#ffffff", ""),
}


def verdict_html(kind: str, detail: str = "", model: str = "") -> str:
    """The verdict box. `model` names the model that made the result (shown in the title)."""
    fg, bg, title = VERDICT_STYLE[kind]
    by = f'<span class="cgdiff-by" style="font-size:0.6em;font-weight:600;color:#475467;"> model {esc(model)}</span>' \
        if model else ""
    return (
        f'<div class="cgdiff-verdict" data-verdict="{kind}" data-model="{html.escape(model)}" '
        f'style="border:2px solid {fg};background:{bg};color:{fg};border-radius:10px;padding:12px 16px;min-height:96px;">'
        f'<div class="cgdiff-title" style="font-size:1.45em;font-weight:700;">{esc(title)}{by}</div>'
        f'<div style="margin-top:4px;color:#101828;">{detail}</div></div>'
    )


def describe_result(result: Detection, threshold_scale: float, seconds_total: float,
                    sampler: SamplerConfig) -> str:
    """The verdict's lines: score against threshold, the predicted area, and the time with the
    denoising steps the settings `sampler` take (K per run, N runs, K2 of a second pass)."""
    relation = ">" if result.is_anomalous else "&le;"
    fraction = float(result.mask.mean())
    parts = [
        f"Score <b>{result.score:.4g}</b> {relation} threshold <b>{result.threshold:.4g}</b> "
        f"({result.relative_score:.2f}&times; the threshold"
        + (f"; threshold set to {threshold_scale:g}&times; the calibrated one" if threshold_scale != 1 else "")
        + ").",
    ]
    if result.is_anomalous:
        pixels = int(result.mask.sum())  # at least one: the score is the map's largest value
        area = (f"{100 * fraction:.1f}% of the image" if fraction >= 0.001 else
                f"{pixels} pixel{'s' if pixels != 1 else ''}, {100 * fraction:.2f}% of the image")
        parts.append(f"Predicted defect area: {area}.")
    k = len(timesteps(sampler.t0, sampler.steps, NUM_TRAIN_TIMESTEPS))
    split = [f"K = {k}" + (f" in each of N = {sampler.samples} averaged runs" if sampler.samples > 1 else "")]
    if sampler.repaint_t0:
        split.append(f"then K2 = {sampler.repaint_model_calls()} in the second pass from t2 = {sampler.repaint_t0}")
    parts.append(f"Time: {result.seconds:.2f} s for {_num_steps(sampler)} denoising steps ({', '.join(split)}; "
                 f"{sampler.model_calls()} U-Net evaluations) and scoring ({seconds_total:.2f} s in all).")
    return "<br>".join(parts)


def pictures(result: Detection, frame: int = 0) -> list[np.ndarray]:
    """Input, reconstruction, heat map, overlay, mask; `frame` > 0 borders the mask (for the page)."""
    return [
        result.image,
        result.reconstruction,
        heatmap(result.anomaly_map, result.threshold),
        overlay(result.image, result.anomaly_map, result.threshold),
        mask_image(result.mask, frame=frame),
    ]


def colorbar_html(threshold: float) -> str:
    """The heat map's colour scale (fixed: 0 .. 2 x threshold) with the threshold marked."""
    values = np.linspace(0, 2 * threshold, 17)[None]
    colours = heatmap(values, threshold)[0]
    stops = ", ".join(f"rgb({r},{g},{b}) {100 * i / 16:.1f}%" for i, (r, g, b) in enumerate(colours))
    return (
        '<div class="cgdiff-colorbar" style="font-size:0.85em;color:#344054;margin:2px 4px 0;">'
        f'<div style="position:relative;height:14px;border:1px solid #98a2b3;border-radius:3px;'
        f'background:linear-gradient(to right, {stops});">'
        '<div class="cgdiff-threshold-mark" style="position:absolute;left:50%;top:-4px;bottom:-4px;width:2px;'
        'margin-left:-1px;background:#12b76a;"></div></div>'
        '<div style="position:relative;height:1.4em;">'
        '<span style="position:absolute;left:0;">0</span>'
        f'<span style="position:absolute;left:50%;transform:translateX(-50%);font-weight:600;color:#067647;">'
        f'threshold {threshold:.3g}</span>'
        f'<span style="position:absolute;right:0;">&ge; {2 * threshold:.3g}</span></div>'
        '<div>Heat-map colours: the same scale in every image; above the green mark is above the threshold. The overlay outlines the predicted defect; the predicted mask is framed.</div></div>'
    )


def used_settings(sampler, scorer) -> dict[str, Any]:
    """The sampler and scorer settings a result was made with (stored or overridden), as the API
    reports them: all of them, except N when it is 1 and the second pass's when it did not run."""
    return {**sampler.to_dict(), **scorer.to_dict()}


def result_details(name: str, result: Detection, settings: dict[str, Any], threshold_scale: float,
                   seconds_total: float, note: str, familiar: Optional[teaching.Familiarity],
                   texture: Optional[str] = None) -> dict[str, Any]:
    """The result as the API returns it; `settings`: `used_settings`; `unfamiliar`: the image is
    unlike the model's normal images (`cgdiff.teaching.familiarity`), so its verdict says little
    about defects, and the note says so; None (not judged) where `familiar` is None, at settings
    other than the calibrated ones (`cgdiff.teaching.familiarity_at`)."""
    if familiar is not None and familiar.unfamiliar:
        note = " ".join(filter(None, [note, familiar.describe(texture)]))
    return {
        "model": name,
        "verdict": result.verdict,
        "score": round(result.score, 6),
        "threshold": round(result.threshold, 6),
        "relative_score": round(result.relative_score, 4),
        "threshold_scale": threshold_scale,
        "defect_fraction": round(float(result.mask.mean()), 5),
        "seconds": round(result.seconds, 3),
        "seconds_total": round(seconds_total, 3),
        "settings": settings,
        "note": note,
        "unfamiliar": None if familiar is None else familiar.unfamiliar,
        "map_fraction_above_normal_level": None if familiar is None else round(familiar.fraction, 4),
    }


def prune_outputs() -> None:
    if not OUTPUT_DIR.is_dir():
        return
    cutoff = time.time() - OUTPUT_MAX_AGE_S
    for path in OUTPUT_DIR.iterdir():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- handlers


def _threshold_scale(value: Any) -> float:
    scale = 1.0 if value is None or value == "" else float(value)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the threshold scale must be a number above 0, got {value!r}.")
    return scale


def _progress_callback(progress: gr.Progress, label: str):
    def report(done: int, total: int) -> None:
        progress((done, total), desc=label, unit="steps")

    return report


def select_model(name: str, current: str, defaults: dict):
    """Model picker changed: load the model (once) and load its defaults into the controls.
    A model that cannot be loaded leaves the previous one in place and says why."""
    name = (name or "").strip()
    keep = [gr.update()] * 10  # the nine controls and the calibration note
    if not name or name == current:
        return [gr.update(), *keep, gr.update(), gr.update(), current, defaults]
    try:
        detector = MODELS.get(name)
    except LOAD_ERRORS as e:
        message = f"Cannot use model '{name}': {e}"
        gr.Warning(message, duration=15)
        status = f"**{esc(message)}**  \nStill using **{esc(current or 'no model')}**."
        return [gr.update(value=current), *keep, gr.update(), status, current, defaults]
    d = model_defaults(name, detector)
    return [gr.update(), *control_values(d), model_info(name, detector), "", name, d]


def control_values(d: dict[str, Any]) -> list[Any]:
    """Values for the ten controls (t0 ... seed, then the threshold slider's label)."""
    return [
        d["t0"], d["steps"], d["w"], d["guidance_scale"], d["blur_sigma"], d["eta"], d["pixel_weight"],
        gr.update(value=1.0, info=f"1 = the calibrated threshold {d['threshold']:.4g}"),
        d["seed"], "",
    ]


def reset_controls(defaults: dict):
    if not defaults:
        return [gr.update()] * 10
    return control_values(defaults)


def note_for(defaults: dict, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight):
    try:
        overrides = overrides_from(t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, None)
    except (TypeError, ValueError):
        return ""
    return calibration_note(defaults or {}, overrides)


SECONDS_PER_EVALUATION: dict[str, float] = {}  # model -> measured seconds per denoiser evaluation (for cost estimates)
NO_TRUTH = [gr.update(visible=False), None, None, None, ""]


def truth_outputs(image: Any, result: Detection) -> list[Any]:
    """Ground truth of a bundled example beside the prediction: the clean tile, the true mask and
    a hit / miss picture (hidden for other images)."""
    truth = teaching.example_truth(image, all_examples())
    if truth is None or truth.mask is None:
        return list(NO_TRUTH)
    size = result.mask.shape[0]
    true_mask = teaching.resize_mask(truth.mask, size)
    clean = None
    if truth.clean is not None:
        clean = np.asarray(Image.fromarray(truth.clean).resize((size, size), Image.Resampling.BICUBIC))
    hit = int((result.mask & true_mask).sum())
    missed, false_alarm = int((true_mask & ~result.mask).sum()), int((result.mask & ~true_mask).sum())
    caption = (f"Bundled example **{esc(truth.example.parent.parent.name)}/{esc(truth.example.name)}**: "
               + (f"{100 * hit / max(1, true_mask.sum()):.0f}% of the true defect found (green), "
                  f"{missed} pixels missed (red), {false_alarm} normal pixels flagged (yellow)."
                  if true_mask.any() else
                  f"a normal tile (no defect); {false_alarm} pixels flagged (yellow)."))
    return [gr.update(visible=True), clean, mask_image(true_mask, frame=2),
            compare_masks(result.mask, true_mask, frame=2), caption]


@on_inference_thread
def inspect(image, model, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, threshold_scale, seed,
            page_defaults=None, progress=gr.Progress()):
    """Inspect one image; returns the verdict, five pictures, the details, the colour bar and the
    ground truth of a bundled example (its row, clean tile, true mask, hit/miss picture, caption).
    Controls left at another model's stored settings (an API call that leaves them out) mean
    this model's own (`own_settings`)."""
    started = time.perf_counter()
    model = (model or "").strip()
    blank = [None] * 5
    t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed = own_settings(
        model, page_defaults, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed)
    try:
        picture = read_upload(image)
        detector = MODELS.get(model)
        overrides = overrides_from(t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed)
        scale = _threshold_scale(threshold_scale)
        sampler, scorer = detector.settings(**overrides)
        result = detector.detect(picture, threshold=scale * detector.threshold,
                                 progress=_progress_callback(progress, "Denoising"), **overrides)[0]
    except LOAD_ERRORS as e:  # ImageError, CheckpointError and bad settings are all ValueErrors
        message = str(e)
        gr.Warning(message, duration=12)
        return [verdict_html("error", esc(message), model), *blank, {"verdict": "error", "error": message, "model": model},
                "", *NO_TRUTH]
    seconds_total = time.perf_counter() - started
    SECONDS_PER_EVALUATION[model] = result.seconds / max(1, sampler.model_calls())
    defaults = model_defaults(model, detector)
    note = calibration_note(defaults, overrides)
    detail = describe_result(result, scale, seconds_total, sampler)
    changed = changed_settings(defaults, overrides)
    familiar = teaching.familiarity_at(detector, result.anomaly_map, sampler, scorer)
    texture = teaching.known_texture(detector.info)
    details = result_details(model, result, used_settings(sampler, scorer), scale, seconds_total, note, familiar,
                             texture)
    kind = result.verdict
    if changed:  # the settings panel, where the note is, may be closed: the verdict says it too
        detail = (f"<i>Indicative only: {esc(', '.join(changed))} {'differ' if len(changed) > 1 else 'differs'} "
                  "from the settings the threshold was calibrated at (see Method settings).</i><br>" + detail)
    if familiar is not None and familiar.unfamiliar:
        kind = "unfamiliar"
        knows = f"{texture} texture" if texture else "the texture it was trained on"
        detail = (f"The model '{esc(model)}' knows <b>{esc(knows)}</b> only. {esc(familiar.describe(texture))} "
                  "Try one of its examples, or the model of this image's texture.<br>" + detail)
    return [verdict_html(kind, detail, model), *pictures(result, frame=2), details, colorbar_html(result.threshold),
            *truth_outputs(image, result)]


def clear_result(model: str, message: str = "Inspecting with model {model}...", kind: str = "running"):
    return [verdict_html(kind, esc(message.format(model=(model or "").strip())) if kind != "running" else ""),
            *[None] * 5, None, "", *NO_TRUTH]


def model_changed(model: str):
    """A new model: results of the old one are cleared (and its pending runs cancelled)."""
    return clear_result(model, "Model changed to {model}: press Inspect to inspect the image with it.", "idle")


def teaching_placeholders(guidance_scale: Any) -> list[Any]:
    """The step-by-step view before a run (or after a model change or a failed run): empty
    strips, and each variant row named (the last row's name follows s) with nothing shown."""
    try:
        s = max(0.0, float(guidance_scale))
    except (TypeError, ValueError):
        s = 0.0
    titles = [title for _, title, _ in teaching.variant_settings(SamplerConfig(guidance_scale=s))]
    rows: list[Any] = []
    for title in titles:
        rows += [f"**{esc(title)}**: press *Run step by step* to see it.", None, None]
    return rows


def teaching_cleared(guidance_scale: Any) -> list[Any]:
    """A new model: the old model's trajectory and variants are cleared."""
    return ["", [], [], gr.update(value=[], visible=False), *teaching_placeholders(guidance_scale)]


def teaching_cost(model: str, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed) -> str:
    """What the step-by-step view will run, said before it runs. Takes the controls' raw values
    (as typed, before Gradio checks them); the seed does not change the cost."""
    try:
        detector = MODELS.get(model if isinstance(model, str) else "")
        overrides = overrides_from(t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, None)
        cost = teaching.ablation_cost(detector, **overrides)
        sampler, _ = detector.settings(**overrides)
    except (*LOAD_ERRORS, TypeError) as e:
        return f"Cannot estimate the cost: {esc(str(e))}"
    each = f" (each the mean of N = {sampler.samples} runs)" if sampler.samples > 1 else ""
    if sampler.repaint_t0 > 0:
        each += f", each with a second pass of K2 = {sampler.repaint_model_calls()} steps"
    line = (f"**Cost:** {cost['reconstructions']} reconstructions of the image{each}, {cost['model_calls']} denoiser "
            f"evaluations (one inspection at these settings makes {cost['full_model_calls']}: K steps, two "
            "evaluations a step with blur guidance, times N" + (", plus K2 of the second pass" if sampler.repaint_t0 > 0 else "")
            + ")")
    per_evaluation = SECONDS_PER_EVALUATION.get((model or "").strip())
    if per_evaluation:
        line += (f", about {max(1, round(cost['model_calls'] * per_evaluation * 1.3))} s here "
                 "(from this server's last inspection with this model).")
    else:
        line += f", about {cost['model_calls'] / max(1, cost['full_model_calls']):.0f} times one inspection."
    return line


@on_inference_thread
def teach(image, model, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, threshold_scale, seed,
          page_defaults=None, progress=gr.Progress()):
    """The step-by-step view: the trajectory (three strips) and the four variants (title,
    reconstruction, heat map and one line each), with a status line."""
    model = (model or "").strip()
    t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed = own_settings(
        model, page_defaults, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed)
    try:
        picture = read_upload(image)
        detector = MODELS.get(model)
        overrides = overrides_from(t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed)
        threshold = _threshold_scale(threshold_scale) * detector.threshold
        cost = teaching.ablation_cost(detector, **overrides)
        total = cost["model_calls"]

        def report(i: int, n: int, offset: int = 0) -> None:
            progress((min(total, offset + i), total), desc="Reconstructing", unit="model calls")

        sampler, _ = detector.settings(**overrides)
        per_step = sampler.model_calls() / max(1, _num_steps(sampler))
        traj = teaching.trajectory(detector, picture, threshold=threshold,
                                   progress=lambda i, n: report(round(i * per_step), n), **overrides)
        variants = teaching.ablations(detector, picture, threshold=threshold, full=traj.detection,
                                      progress=lambda i, n: report(i, n, cost["full_model_calls"]), **overrides)
    except LOAD_ERRORS as e:
        message = str(e)
        gr.Warning(message, duration=12)
        return [f"**Cannot run:** {esc(message)}", [], [], gr.update(value=[], visible=False),
                *teaching_placeholders(guidance_scale)]
    last = len(traj.steps) - 1
    noisy = [(s.x_t, f"x_t at t = {s.t}" + (" (start)" if i == 0 else "")) for i, s in enumerate(traj.steps)]
    runs, t2 = traj.sampler.samples, traj.sampler.repaint_t0
    # A short caption (a gallery cuts long ones); the status line below says what the runs and the pass are.
    parts = ([f"mean of {runs} runs" if not t2 else f"{runs} runs"] if runs > 1 else []) + (["2nd pass"] if t2 else [])
    noisy.append((traj.detection.reconstruction,
                  f"result ({', '.join(parts)})" if parts else "result, after the last step"))
    estimates = [(s.x0, f"estimate at t = {s.t}") for s in traj.steps]
    blurred = [(s.x0_blurred, f"blurred, t = {s.t}") for s in traj.steps if s.x0_blurred is not None]
    start = ("pure noise (t0 >= 1000)" if traj.sampler.t0 >= 1000 else f"the input noised to t0 = {traj.sampler.t0}")
    whose = "first pass's " if t2 > 0 else ""
    status = (f"Model **{esc(model)}**: {len(traj.steps)} steps from {start} down to 0 "
              f"(w = {traj.sampler.w:g}, s = {traj.sampler.guidance_scale:g}); the last estimate "
              f"(t = {traj.steps[last].t}) is the {whose}reconstruction."
              + (f" These are the first of {traj.sampler.samples} runs from different start noise; the "
                 f"reconstruction scored is their mean." if traj.sampler.samples > 1 else "")
              + (f" Then a second pass: the pixels whose first map came near the model's calibrated first-pass "
                 f"threshold were painted over by the "
                 f"denoiser from t2 = {t2} in {traj.sampler.repaint_model_calls()} steps (no conditioning), the "
                 "rest kept as it was; the result shows it and is what is scored." if t2 > 0 else "")
              + ("" if blurred else " Blur guidance is off at these settings (s = 0), so there is no blurred "
                 "estimate; set s above 0 in the method settings to see it."))
    out: list[Any] = [status, noisy, estimates, gr.update(value=blurred, visible=bool(blurred))]
    for v in variants:
        out += [f"**{esc(v.title)}**, {v.model_calls} denoiser evaluations: {esc(v.line)}",
                v.detection.reconstruction, heatmap(v.detection.anomaly_map, v.detection.threshold)]
    return out


@on_inference_thread
def inspect_batch(files, model, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, threshold_scale, seed,
                  page_defaults=None, progress=gr.Progress()):
    """Inspect several images: a table of scores and verdicts, the overlays, and a zip of all maps."""
    model = (model or "").strip()
    t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed = own_settings(
        model, page_defaults, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed)
    headers = BATCH_HEADERS
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
    if not paths:
        return [[], [], None, "Add some images first (drop several files at once)."]
    if len(paths) > CONFIG.max_batch:
        message = f"{len(paths)} files: a batch takes at most {CONFIG.max_batch}. Split them into smaller batches."
        gr.Warning(message)
        return [[], [], None, message]
    try:
        detector = MODELS.get(model)
        overrides = overrides_from(t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed)
        scale = _threshold_scale(threshold_scale)
        sampler, scorer = detector.settings(**overrides)  # checks them before any work
    except LOAD_ERRORS as e:
        gr.Warning(str(e))
        return [[], [], None, esc(str(e))]

    rows: list[list[Any]] = []
    good: list[tuple[int, str, torch.Tensor]] = []
    for i, path in enumerate(paths):
        name = Path(path).name
        try:
            # Each file is decoded once and kept only at the working size, so a batch of big
            # photos does not hold them all in memory.
            good.append((i, name, detector.prepare(read_upload(path))))
            rows.append([name, "", None, None, None, None, None, ""])
        except ImageError as e:
            rows.append([name, "error", None, None, None, None, None, str(e)])
    gallery, results, n_unfamiliar = [], [], 0
    if good:
        results = detector.detect(torch.cat([g[2] for g in good]), threshold=scale * detector.threshold,
                                  progress=_progress_callback(progress, f"Denoising {len(good)} images"), **overrides)
    prune_outputs()
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    archive = OUTPUT_DIR / f"cgdiff-maps-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.zip"
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(headers)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for (i, name, _), result in zip(good, results):
            fraction = 100 * float(result.mask.mean())
            familiar = teaching.familiarity_at(detector, result.anomaly_map, sampler, scorer)
            unfamiliar = familiar is not None and familiar.unfamiliar
            n_unfamiliar += unfamiliar
            rows[i] = [name, result.verdict, round(result.score, 5), round(result.threshold, 5),
                       round(result.relative_score, 3), round(fraction, 2), round(result.seconds, 2),
                       teaching.unfamiliar_text(teaching.known_texture(detector.info)) if unfamiliar else ""]
            stem = f"{i:03d}_{Path(name).stem}"
            images = pictures(result)
            for kind, array in zip(("input", "reconstruction", "heatmap", "overlay", "mask"), images):
                zf.writestr(f"{stem}/{kind}.png", png_bytes(array))
            buffer = io.BytesIO()
            np.save(buffer, result.anomaly_map.astype(np.float32))
            zf.writestr(f"{stem}/anomaly_map.npy", buffer.getvalue())
            gallery.append((images[3], f"{name}: {result.verdict} ({result.relative_score:.2f}x)"))
        for row in rows:
            writer.writerow(row)
        zf.writestr("scores.csv", table.getvalue())
        used, stored = used_settings(sampler, scorer), used_settings(*detector.settings())
        changed = sorted(k for k in used if used[k] != stored.get(k))
        zf.writestr("README.txt", (
            f"cgdiff {__version__}, model '{model}', settings "
            + (f"changed here: {', '.join(changed)}" if changed else "as stored in the checkpoint")
            + f"; sampler {sampler.to_dict()}, scorer {scorer.to_dict()}; "
            f"threshold {scale:g} x calibrated.\nPer image: input, reconstruction, heat map (fixed scale, "
            "mid-scale = threshold), overlay, predicted mask (PNG) and the raw anomaly map (float32 .npy).\n"))
    n_bad = sum(1 for r in rows if r[1] == "error")
    n_anomalous = sum(1 for r in results if r.is_anomalous)
    status = (f"{len(results)} image{'' if len(results) == 1 else 's'} inspected: {n_anomalous} anomalous, "
              f"{len(results) - n_anomalous} normal.")
    if n_unfamiliar:
        status += (f" {n_unfamiliar} of them {'is' if n_unfamiliar == 1 else 'are'} unlike the images this model "
                   "knows, so their verdicts say little about defects (see the message column).")
    if n_bad:
        status += f" {n_bad} file(s) could not be read: " + " ".join(
            f"**{esc(r[0])}**: {esc(r[7].rstrip('.'))}." for r in rows if r[1] == "error")
    return [rows, gallery, str(archive), status]


@on_inference_thread
def detect_api(image, model):
    """API: inspect one image with the model's stored settings and calibrated threshold.
    `model`: a bundled name, Hub repo id or folder (empty: the default model)."""
    name = (model or "").strip() or (DEFAULT.name if DEFAULT else "")
    try:
        detector = MODELS.get(name)
        result = detector.detect(read_upload(image))[0]
    except LOAD_ERRORS as e:
        raise refused(str(e)) from None
    settings = detector.settings()
    return result_details(name, result, used_settings(*settings), 1.0, result.seconds, "",
                          teaching.familiarity_at(detector, result.anomaly_map, *settings),
                          teaching.known_texture(detector.info))


# ------------------------------------------------------------------------------- layout

DEFAULT = default_checkpoint()

INTRO = """\
# cgdiff: texture anomaly detection with a diffusion model

A diffusion model trained on **normal** texture images only rebuilds each image without its
defects: the input is partly noised (start step t0), then denoised in K steps while being
pulled toward the input (conditioning weight w) and steered away from a blurred copy of its own
estimate (blur guidance s). Where the input
and its reconstruction differ, in pixels and in pretrained CNN features, there is a defect.
Pick a model and an example (or upload your own image) and press **Inspect**.
"""

CSS = """
/* Results are small (the model's working size): fill the frame instead of showing a thumbnail,
   below the picture's label (which floats over the frame's top left). */
.cgdiff-pic img { width: 100%; height: 100%; object-fit: contain; box-sizing: border-box; padding-top: 34px; }
/* Picture labels wrap instead of being cut off. */
.cgdiff-pic label, .cgdiff-pic [data-testid="block-label"] { white-space: normal; max-width: calc(100% - 80px);
  overflow: visible; height: auto; line-height: 1.2; }
.cgdiff-pic [data-testid="block-label"] span, .cgdiff-pic label span { white-space: normal; overflow: visible;
  text-overflow: clip; }
/* Step-by-step strips: as tall as their rows of pictures, not Gradio's 450-px gallery minimum. */
#teach-noisy .fixed-height, #teach-x0 .fixed-height, #teach-blurred .fixed-height { min-height: 0; }
#teach-noisy .grid-wrap, #teach-x0 .grid-wrap, #teach-blurred .grid-wrap { padding-top: 30px; }
/* The verdict in fonts that have every letter in bold. */
.cgdiff-title { font-family: "DejaVu Sans", "Liberation Sans", Arial, Helvetica, sans-serif; }
/* Batch table: words stay whole. */
#batch-table td, #batch-table th, #batch-table td *, #batch-table th * { word-break: normal !important;
  overflow-wrap: normal !important; hyphens: none; }
"""


BATCH_HEADERS = ["file", "verdict", "score", "threshold", "x thr", "area %", "seconds", "message"]
PIC = dict(format="png", interactive=False, height=230, elem_classes=["cgdiff-pic"])


def build_demo() -> gr.Blocks:
    defaults: dict[str, Any] = {}
    info = "No model is available yet."
    status = ""
    start_name = DEFAULT.name if DEFAULT else ""
    if DEFAULT is not None:
        try:
            detector = MODELS.get(DEFAULT.name)
            defaults = model_defaults(DEFAULT.name, detector)
            info = model_info(DEFAULT.name, detector)
        except LOAD_ERRORS as e:
            status = f"**The default model '{esc(DEFAULT.name)}' cannot be loaded:** {esc(str(e))}"
            start_name = ""
    else:
        problems = "; ".join(registry_problems())
        status = (f"No bundled models found in {esc(str(checkpoints_dir()))}"
                  + (f" ({esc(problems)})" if problems else "")
                  + ". Type a Hub repo id or a checkpoint folder in the model box.")
    d = defaults or {"t0": 250, "steps": 10, "w": 3.0, "guidance_scale": 0.5, "blur_sigma": 1.0, "eta": 0.0,
                     "pixel_weight": 1.0, "seed": 0, "threshold": float("nan")}
    groups = example_groups()

    # Uploads and result pictures in Gradio's cache are deleted once older than cache_minutes,
    # so a public app's disk does not fill up.
    age = 60 * CONFIG.cache_minutes
    with gr.Blocks(title="cgdiff: texture anomaly detection", delete_cache=(min(age, 600), age)) as demo:
        current = gr.State(start_name)
        defaults_state = gr.State(defaults)
        gr.Markdown(INTRO)
        with gr.Row():
            model = gr.Dropdown(
                model_choices(), value=start_name or None, allow_custom_value=True, label="Model",
                info="A bundled model, or type a Hub repo id (owner/name), or a checkpoint folder when the app "
                     "runs on your own machine, and press Enter.",
                scale=2, elem_id="model",
            )
            with gr.Column(scale=3):
                info_md = gr.Markdown(info, label="Model information", show_label=False, elem_id="model-info")
                status_md = gr.Markdown(status, label="Model status", show_label=False, elem_id="model-status")

        with gr.Accordion("Method settings (defaults come from the chosen model)", open=False, elem_id="settings"):
            with gr.Row():
                t0 = gr.Slider(1, 999, value=d["t0"], step=1, label="Noise level: start step t0", elem_id="t0",
                               info="How far the input is noised before denoising (of 1000).")
                steps = gr.Slider(1, 50, value=d["steps"], step=1, label="Denoising steps K",
                                  info="Model steps from t0 down to 0; time grows with K.")
                w = gr.Slider(0, 20, value=d["w"], step=0.1, label="Conditioning weight w",
                              info="Pull toward the input; too high copies defects back.")
            with gr.Row():
                guidance_scale = gr.Slider(0, 3, value=d["guidance_scale"], step=0.05,
                                           label="Blur-guidance scale s",
                                           info="0 switches it off (and halves the model calls).")
                blur_sigma = gr.Slider(0.1, 10, value=d["blur_sigma"], step=0.1, label="Blur sigma",
                                       info="Gaussian blur of the predicted clean image.")
                eta = gr.Slider(0, 1, value=d["eta"], step=0.05, label="eta",
                                info="0: deterministic DDIM; 1: stochastic steps.")
            with gr.Row():
                pixel_weight = gr.Slider(0, 5, value=d["pixel_weight"], step=0.05,
                                         label="Pixel / feature balance v",
                                         info="Weight of the pixel difference against the feature difference.")
                threshold_scale = gr.Slider(
                    0.25, 4, value=1.0, step=0.01, label="Threshold (x the calibrated one)",
                    info=(f"1 = the calibrated threshold {d['threshold']:.4g}" if defaults else "1 = the calibrated threshold"),
                )
                seed = gr.Number(value=d["seed"], precision=0, label="Seed", info="Noise of the partial diffusion.")
            with gr.Row():
                reset = gr.Button("Reset to model defaults", variant="secondary", elem_id="reset")
                note_md = gr.Markdown("", label="Calibration note", show_label=False, elem_id="calibration-note")
        for slider in (t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, threshold_scale):
            named_range_errors(slider)
        controls = [t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, threshold_scale, seed]
        calibrated_controls = [t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight]

        with gr.Tabs():
            with gr.Tab("Inspect an image", id="inspect"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=280):
                        image = upload_image(sources=["upload", "clipboard", "webcam"],
                                            label="Image to inspect", height=320, elem_id="input-image")
                        run = gr.Button("Inspect", variant="primary", elem_id="run")
                        example_galleries = []
                        if groups:
                            gr.Markdown("**Examples** (generated defects and normal tiles; clicking one also picks "
                                        "its model)", elem_id="examples-title")
                        for entry, items in groups:
                            texture = entry_texture(entry)
                            example_galleries.append((entry.name, items, gr.Gallery(
                                value=[(path, caption) for path, caption in items],
                                label=f"{entry.name} model" + (f": {texture} texture" if texture else ""),
                                columns=3, height=360, allow_preview=False, object_fit="cover", format="png",
                                fit_columns=False,
                                elem_id=f"examples-{entry.name}", elem_classes=["cgdiff-examples"],
                                buttons=[], interactive=False)))
                    with gr.Column(scale=3, min_width=360):
                        verdict = gr.HTML(verdict_html("idle", "Upload an image or click an example, then press Inspect."),
                                          label="Verdict", elem_id="verdict")
                        with gr.Row():
                            seen = gr.Image(label="Input (resized)", elem_id="pic-input", **PIC)
                            recon = gr.Image(label="Reconstruction", elem_id="pic-recon", **PIC)
                            heat = gr.Image(label="Heat map", elem_id="pic-heat", **PIC)
                        colorbar = gr.HTML("", label="Colour bar", elem_id="colorbar")
                        with gr.Row():
                            over = gr.Image(label="Overlay", elem_id="pic-overlay", **PIC)
                            mask = gr.Image(label="Predicted mask", elem_id="pic-mask", **PIC)
                        with gr.Column(visible=False, elem_id="truth") as truth_row:
                            truth_md = gr.Markdown("", label="Ground truth", show_label=False, elem_id="truth-caption")
                            with gr.Row():
                                clean = gr.Image(label="Clean original", elem_id="pic-clean", **PIC)
                                truth = gr.Image(label="Ground-truth mask", elem_id="pic-truth", **PIC)
                                hitmiss = gr.Image(label="Hit / miss / false alarm", elem_id="pic-hitmiss", **PIC)
                        with gr.Accordion("Details", open=False):
                            details = gr.JSON(label="Result", elem_id="details")

            with gr.Tab("Step by step", id="teach", elem_id="teach-tab"):
                gr.Markdown(
                    "How the method rebuilds **the image in the Inspect tab** with **the model and settings above**. "
                    "First the trajectory: the input noised to the start step t0 (partial diffusion), then at "
                    "each step the noisy state x_t and the model's clean-image estimate (and, with blur guidance on, "
                    "the blurred estimate it steers away from). Then the same image with each strategy switched off "
                    "in turn, beside the full method: reconstruction and heat map (same colour scale) each.")
                teach_cost = gr.Markdown(label="Cost", show_label=False, elem_id="teach-cost")
                run_teach = gr.Button("Run step by step", variant="primary", elem_id="run-teach")
                teach_status = gr.Markdown("", label="Status", show_label=False, elem_id="teach-status")
                strip = dict(columns=6, allow_preview=True, object_fit="contain", format="png", fit_columns=False,
                             interactive=False, buttons=[])
                noisy = gr.Gallery(label="Noisy state x_t, step by step (first: the partial-diffusion start)",
                                   elem_id="teach-noisy", **strip)
                estimates = gr.Gallery(label="Clean-image estimate at each step", elem_id="teach-x0", **strip)
                blurred = gr.Gallery(label="Blurred estimate (what blur guidance steers away from)",
                                     elem_id="teach-blurred", visible=False, **strip)
                variant_outputs = []
                placeholders = teaching_placeholders(d["guidance_scale"])  # each row named before the first run
                for i, row in enumerate(teaching.VARIANT_ROWS):
                    with gr.Row(elem_classes=["cgdiff-variant"]):
                        line = gr.Markdown(placeholders[3 * i], label=row, show_label=False,
                                           elem_id=f"variant-{i}-line")
                        v_rec = gr.Image(label=f"{row}: reconstruction", elem_id=f"variant-{i}-rec",
                                         **{**PIC, "height": 170})
                        v_heat = gr.Image(label=f"{row}: heat map", elem_id=f"variant-{i}-heat",
                                          **{**PIC, "height": 170})
                    variant_outputs += [line, v_rec, v_heat]

            with gr.Tab("Batch", id="batch"):
                gr.Markdown("Inspect several images at once with the model and settings above, and download "
                            "every map (heat map, overlay, mask, raw anomaly map) with a table of scores as a zip.")
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        files = gr.File(file_count="multiple", label="Images", elem_id="batch-files")
                        run_batch = gr.Button("Inspect all", variant="primary", elem_id="run-batch")
                        batch_status = gr.Markdown("", label="Batch status", show_label=False, elem_id="batch-status")
                        archive = gr.File(label="Maps and scores (zip)", interactive=False)
                    with gr.Column(scale=2, min_width=360):
                        table = gr.Dataframe(
                            headers=BATCH_HEADERS,
                            datatype=["str", "str", "number", "number", "number", "number", "number", "str"],
                            label="Scores (x thr: score / threshold; area: predicted defect pixels)",
                            interactive=False, wrap=False, max_height=900, elem_id="batch-table",
                            column_widths=["17%", "12%", "8%", "9%", "7%", "7%", "8%", "32%"],
                        )
                        gallery = gr.Gallery(label="Overlays", columns=4, height=320, format="png",
                                             object_fit="contain")

        gr.Markdown(f"cgdiff {__version__}. The verdict compares the image score (maximum of the anomaly map) "
                    "with a threshold set on images of the model's texture (normal ones, and for a tuned model "
                    "synthetic defects too: the model's line above says which); colours in the heat "
                    "map use a fixed scale, so they mean the same in every image. An image unlike the model's "
                    "normal images (more than half of its map above the level normal images reach only at their "
                    "highest point, at the settings those were calibrated at) is said to be so instead of being "
                    "called a defect.")

        # Events. Inference runs through one queue with the configured concurrency: extra
        # requests wait their turn instead of running at once. Choosing a model does not wait
        # behind inference (the cache loads one model at a time). One progress bar per run, on
        # the verdict box, which is emptied first so no old text shows under it.
        result_outputs = [verdict, seen, recon, heat, over, mask, details, colorbar, truth_row, clean, truth, hitmiss,
                          truth_md]
        inspect_event = run.click(clear_result, model, result_outputs, queue=False, show_progress="hidden",
                                  api_visibility="private").then(
            inspect, [image, model, *controls, defaults_state], result_outputs, api_name="inspect",
            concurrency_id="inference", show_progress_on=[verdict])
        teach_outputs = [teach_status, noisy, estimates, blurred, *variant_outputs]
        teach_event = run_teach.click(
            teach, [image, model, *controls, defaults_state], teach_outputs, api_name="teach",
            concurrency_id="inference", show_progress_on=[teach_status])
        model_event = model.change(select_model, [model, current, defaults_state],
                                   [model, *controls, note_md, info_md, status_md, current, defaults_state],
                                   api_name="select_model", concurrency_limit=None, concurrency_id="models")
        # A result always belongs to the model named above it: a model change clears it and
        # cancels a run still going for the old model.
        model.change(model_changed, model, result_outputs, show_progress="hidden", concurrency_limit=None,
                     concurrency_id="models", cancels=[inspect_event, teach_event], api_visibility="private")
        model_event.then(teaching_cleared, guidance_scale, teach_outputs, queue=False,
                         show_progress="hidden", api_visibility="private")
        reset.click(reset_controls, defaults_state, [*controls, note_md], api_name="reset", queue=False)
        # The note and the cost follow the controls as they are typed: a value typed out of a
        # slider's range reaches them before the page clamps it, so they take the raw values
        # (preprocess=False; both check them) instead of Gradio refusing it with a logged traceback.
        for control in calibrated_controls:
            control.change(note_for, [defaults_state, *calibrated_controls], note_md, queue=False,
                           show_progress="hidden", api_visibility="private", preprocess=False)
        cost_inputs = [model, t0, steps, w, guidance_scale, blur_sigma, eta, pixel_weight, seed]
        for trigger in [model_event.then, *(c.change for c in calibrated_controls), demo.load]:
            trigger(teaching_cost, cost_inputs, teach_cost, queue=False, show_progress="hidden",
                    api_visibility="private", preprocess=False)
        for name, items, example_gallery in example_galleries:
            def pick(evt: gr.SelectData, name=name, items=items):
                return items[evt.index][0], name
            example_gallery.select(pick, None, [image, model], queue=False, show_progress="hidden",
                                   api_visibility="private")
        run_batch.click(inspect_batch, [files, model, *controls, defaults_state],
                        [table, gallery, archive, batch_status],
                        api_name="batch", concurrency_id="inference", show_progress_on=[batch_status])
        # API only: one image with the model's stored settings (no control values needed).
        api_button = gr.Button(visible=False)
        api_button.click(detect_api, [image, model], details, api_name="detect", concurrency_id="inference")
    return demo


demo = build_demo()


# ------------------------------------------------------------------------------- serving


def launch(config: Optional[AppConfig] = None, **kwargs: Any):
    """Serve `demo` with the queue, concurrency and upload limits of `config` (default: the
    environment). Extra keyword arguments go to `demo.launch`."""
    global INFERENCE
    config = config or CONFIG
    keep_freed_memory()
    if config.concurrency > 1:  # that many inference threads, each with its own OpenMP team
        INFERENCE = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="cgdiff-inference")
    MODELS.set_runtime(config.runtime)
    MODELS.local_folders = serves_local_folders(config, bool(kwargs.get("share")))
    demo.queue(default_concurrency_limit=max(1, config.concurrency), max_size=config.queue_size or None)
    options: dict[str, Any] = dict(
        server_name=config.host, server_port=config.port, max_file_size=config.max_upload,
        allowed_paths=[str(checkpoints_dir())], css=CSS, show_error=True,
    )
    options.update(kwargs)
    return demo.launch(**options)


def main(argv: Optional[list[str]] = None) -> None:
    config, share = read_command_line(argv)
    CONFIG.max_batch = config.max_batch
    # Gradio's own start-up lines would tell the user to "set share=True in launch()"; this app's
    # switch for that is --share.
    _, local_url, share_url = launch(config, share=share or None, quiet=True, prevent_thread_lock=True)
    print(f"cgdiff app running on {local_url}"
          + (f" and on the public link {share_url}" if share_url else " (app.py --share adds a public link)"),
          flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
