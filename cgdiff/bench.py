"""Benchmarks measured in one run on the same data: quality against ablations and peers, and speed.

Quality (`quality_benchmark`), per dataset and checkpoint, every row on the same test images,
maps compared with the masks at the same resolution, metrics from `cgdiff.metrics`:

    full       the checkpoint's stored settings (the method as shipped)
    t0         ablation: full-noise start (t0 = 1000)
    w0         ablation: no conditioning (w = 0)
    s0         ablation: no blur guidance (s = 0)
    pixel      ablation: pixel distance only (feature_weight = 0)
    feature    ablation: feature distance only (pixel_weight = 0)
    anoddpm    AnoDDPM-style plain partial-noise reconstruction, same denoiser (cgdiff.baselines)
    patchcore  PatchCore-style nearest neighbours on the same pretrained backbone (cgdiff.baselines)
    anomalib   anomalib's PatchCore and PaDiM, where anomalib is installed (optional)

Each diffusion row is exactly `cgdiff evaluate` with one override flag (the command is kept in
the results), so it uses the checkpoint's calibration as `evaluate` does. Reconstructions are
shared between rows that only change the scorer.

Speed (`app_speed`, `sweep`, `fast_path_benchmark`): per-image latency at the app's settings
(one image per call, as the app inspects), with the U-Net calls and the feature backbone
counted and timed by wrappers, so the share of time spent outside the models is measured, not
estimated; throughput against batch size and image size; the same at paper scale (DDAD's
U-Net at 256 px, 10 steps with blur guidance); peak memory. On a GPU, the fast path (bf16 /
fp16 autocast, channels_last, torch.compile) against plain fp32 eager, with the largest
difference in score each speed-up causes on the same images and seed.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .data import AnomalyDataset, DatasetError, detect_layout, load_dataset
from .runtime import native_bf16
from .sampler import SamplerConfig
from .settings import QUALITY_METHODS

__all__ = [
    "QUALITY_METHODS", "ABLATIONS", "quality_benchmark", "evaluate_map_fn", "expand_pairs", "texture_pairs",
    "app_speed", "sweep", "paper_scale_detector", "fast_path_benchmark", "gpu_variants", "PAPER_SAMPLER",
    "cpu_variants", "cpu_fast_path_benchmark", "choose_cpu_default", "unet_call_time",
    "maps_metrics", "run_quality", "run_speed", "render_quality", "render_speed",
    "markdown_table", "machine_info", "plot_quality", "plot_speed", "timed_model_calls",
]

ABLATIONS = ("full", "t0", "w0", "s0", "pixel", "feature")
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")

# Paper scale: DDAD's U-Net at 256 px, 10 steps with blur guidance (2 model calls per step).
PAPER_IMAGE_SIZE = 256
PAPER_SAMPLER = SamplerConfig(t0=250, steps=10, w=3.0, guidance_scale=0.5, blur_sigma=1.0)


# ----------------------------------------------------------------------------- reporting


def _log_nothing(message: str) -> None:
    pass


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": native_bf16() if device.type == "cpu" else None,  # AVX512-BF16 or AMX
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # Other work on the machine slows every timing: the 1-minute load average when measured.
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    from . import __version__

    info["cgdiff"] = __version__
    return info


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return format(value, fmt)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """rows -> a Markdown table; columns are (key, header, format spec)."""
    def cell(text: str) -> str:  # a bare '|' would split the cell
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(_cell(row.get(k), f)) for k, _, f in columns) + " |")
    return "\n".join(lines)


QUALITY_COLUMNS = [
    ("method", "method", "s"), ("image_auroc", "image AUROC", ".3f"), ("pixel_auroc", "pixel AUROC", ".3f"),
    ("aupro", "AUPRO", ".3f"), ("image_f1_max", "image F1-max", ".3f"), ("pixel_f1_max", "pixel F1-max", ".3f"),
    ("removal", "removal", ".3f"), ("fidelity", "fidelity", ".4f"), ("fit_seconds", "fit s", ".4g"), ("seconds_per_image", "s / image", ".3g"),
    ("cpu_seconds_per_image", "CPU s / image", ".3g"), ("note", "note", "s"),
]


# ----------------------------------------------------------------------------- datasets


def expand_pairs(checkpoint: str | Path, data: str | Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(checkpoint, dataset category) pairs from one CKPT DATA argument, and notes on what was
    skipped. DATA may be one category, or a root of categories (a full MVTec AD or
    DTD-Synthetic download), in which case CKPT is a folder holding one checkpoint per
    category, named like the category."""
    data = Path(data)
    try:
        detect_layout(data)
        return [(str(checkpoint), data)], []
    except DatasetError as e:
        if "several categories" not in str(e):
            raise
    pairs, notes = [], []
    classes = sorted(p for p in data.iterdir() if p.is_dir() and (p / "train" / "good").is_dir())
    for cls in classes:
        ckpt = Path(checkpoint) / cls.name
        if (ckpt / "cgdiff.json").is_file():
            pairs.append((str(ckpt), cls))
        else:
            notes.append(f"{cls.name}: skipped, no checkpoint at {ckpt}")
    if not pairs:
        raise DatasetError(f"'{data}' holds categories ({', '.join(c.name for c in classes)}) but '{checkpoint}' "
                           "has no checkpoint folder named after any of them.")
    return pairs, notes


def texture_pairs(folder: str | Path, textures: Iterable[str] | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """The scikit-image texture set in `folder` (built there with `cgdiff build-textures`'s
    defaults where missing), each texture paired with the bundled checkpoint of its name."""
    from .data import TEXTURES, build_texture_dataset
    from .registry import known_checkpoints

    folder = Path(folder)
    textures = tuple(textures or TEXTURES)
    missing = [t for t in textures if not (folder / t / "dataset.json").is_file()]
    if missing:
        build_texture_dataset(folder, textures=missing)
    bundled = {e.name: e.path for e in known_checkpoints() if e.bundled}
    pairs, notes = [], []
    for t in textures:
        if t in bundled:
            pairs.append((str(bundled[t]), folder / t))
        else:
            notes.append(f"{t}: skipped, no bundled checkpoint named '{t}'")
    return pairs, notes


# ----------------------------------------------------------------------------- quality


@torch.no_grad()
def evaluate_map_fn(
    map_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: AnomalyDataset,
    image_size: int,
    mask_size: int = 256,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    empty_masks: str = "error",
) -> dict[str, Any]:
    """Metrics of any map function (B x 3 x S x S in [-1, 1] -> B x S x S) on the test set of
    `dataset`, with the conventions of `cgdiff.evaluation`: score = max of the map at the
    working size, maps compared with the masks at `mask_size`, no test-set normalisation."""
    from .images import to_batch

    samples = list(dataset.test)
    maps, seconds, cpu = [], 0.0, 0.0
    for start in range(0, len(samples), batch_size):
        x = to_batch([s.path for s in samples[start : start + batch_size]], image_size).to(device)
        t_start, c_start = time.perf_counter(), time.process_time()
        m = map_fn(x).float().cpu()  # waits for the device
        seconds += time.perf_counter() - t_start
        cpu += time.process_time() - c_start
        maps.append(m)
    return {**maps_metrics(torch.cat(maps).numpy(), dataset, mask_size, empty_masks), "seconds_per_image": seconds / len(samples),
            "cpu_seconds_per_image": cpu / len(samples)}


def maps_metrics(maps: np.ndarray, dataset: AnomalyDataset, mask_size: int = 256, empty_masks: str = "error"
                 ) -> dict[str, Any]:
    """Metrics of N x S x S maps of the test images of `dataset`, in its order. Defect images
    with an empty mask raise a DatasetError naming the files, or with empty_masks="skip" are
    left out of the pixel metrics and listed in `pixel_excluded` (see
    `cgdiff.evaluation.load_masks`)."""
    from .evaluation import load_masks, ranking_metrics

    samples = list(dataset.test)
    if len(maps) != len(samples):
        raise ValueError(f"{len(maps)} maps for {len(samples)} test images.")
    labels = dataset.test_labels()
    scores = maps.reshape(len(maps), -1).max(axis=1)
    masks, excluded, _ = load_masks(dataset, samples, mask_size, empty_masks)
    values = ranking_metrics(labels, scores, masks, maps, excluded, mask_size)
    return {**{k: (None if v is None else float(v)) for k, v in values.items()}, "n_images": len(samples),
            "pixel_excluded": [str(samples[i].path) for i in excluded]}


def ablation_overrides(detector) -> dict[str, dict[str, Any]]:
    """The override of each ablation relative to the checkpoint's stored settings."""
    scorer = detector.scorer.config
    return {
        "full": {},
        "t0": {"t0": 1000},
        "w0": {"w": 0.0},
        "s0": {"guidance_scale": 0.0},
        # One term alone; if the stored weight of that term is 0, it is switched on at 1.
        "pixel": {"feature_weight": 0.0, **({} if scorer.pixel_weight > 0 else {"pixel_weight": 1.0})},
        "feature": {"pixel_weight": 0.0, **({} if scorer.feature_weight > 0 else {"feature_weight": 1.0})},
    }


def _flags(overrides: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in overrides.items())


def quality_benchmark(
    detector,
    dataset: AnomalyDataset,
    methods: Sequence[str] = tuple(QUALITY_METHODS),
    mask_size: int = 256,
    batch_size: int = 4,
    coreset_ratio: float = 1.0,
    checkpoint: Optional[str] = None,
    progress: bool = False,
    log: Callable[[str], None] = _log_nothing,
    empty_masks: str = "error",
) -> list[dict[str, Any]]:
    """One row per method (see the module docstring) on the test set of `dataset`. Defect
    images with an empty mask stop it before any work (a DatasetError naming the files), or
    with empty_masks="skip" are left out of every row's pixel metrics."""
    from .baselines import AnoDDPM, PatchCore
    from .evaluation import DEFAULT_MASK_SIZE, load_masks, reconstruct_dataset, score_reconstructions

    load_masks(dataset, list(dataset.test), mask_size, empty_masks)  # stops here, before any reconstruction
    unknown = set(methods) - set(QUALITY_METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(QUALITY_METHODS)}.")
    training = detector.info.get("training") or {}
    train_seconds = training.get("seconds")
    train_note = "fit = denoiser training" if train_seconds is not None else "training time not recorded"
    stored = {**detector.sampler.to_dict(), **detector.scorer.config.to_dict()}
    rows: list[dict[str, Any]] = []
    recs_cache: dict[tuple, Any] = {}
    base_cmd = f"cgdiff evaluate --checkpoint {checkpoint or '<checkpoint>'} --data {dataset.root}"
    if mask_size != DEFAULT_MASK_SIZE:
        base_cmd += f" --mask-size {mask_size}"
    all_overrides = ablation_overrides(detector)

    for key in [m for m in methods if m in ABLATIONS]:
        overrides = all_overrides[key]
        changed = {k: v for k, v in overrides.items() if stored.get(k) != v}
        sampler, scorer = detector.settings(**overrides)
        cache_key = tuple(sorted(sampler.to_dict().items()))
        if cache_key not in recs_cache:
            log(f"  {dataset.category}: reconstructing for '{QUALITY_METHODS[key]}' ({sampler.model_calls()} "
                f"model calls per image)")
            timer = CallTimer(detector.device)
            detector.reconstruct = timer.wrap(type(detector).reconstruct.__get__(detector))
            try:
                recs = reconstruct_dataset(detector, dataset, sampler, batch_size=batch_size, progress=progress,
                                           mask_size=mask_size, empty_masks=empty_masks)
            finally:
                del detector.reconstruct
            recs_cache[cache_key] = (recs, timer.cpu_seconds / len(recs))
        recs, recon_cpu = recs_cache[cache_key]
        recs._distances.clear()  # every row pays for its own backbone pass, in wall and CPU time
        c_start = time.process_time()
        m = score_reconstructions(detector, recs, scorer).metrics
        score_cpu = (time.process_time() - c_start) / len(recs)
        note = train_note
        if key != "full" and not changed:
            note = "same settings as the full method"
        rows.append({"key": key, "method": QUALITY_METHODS[key], **{k: m[k] for k in METRIC_KEYS},
                     "fit_seconds": train_seconds, "seconds_per_image": m["seconds_per_image"],
                     "cpu_seconds_per_image": recon_cpu + score_cpu,
                     "model_calls_per_image": sampler.model_calls(), "note": note,
                     "removal": m["removal"], "fidelity": m["fidelity"], "pixel_excluded": m["pixel_excluded"],
                     "sampler": m["sampler"], "scorer": m["scorer"],
                     "command": (base_cmd + (" " + _flags(changed) if changed else "")).strip()})

    if "anoddpm" in methods:
        log(f"  {dataset.category}: AnoDDPM-style reconstruction")
        base = AnoDDPM.from_detector(detector, map_sigma=detector.scorer.config.map_sigma)
        m = evaluate_map_fn(base.maps, dataset, detector.image_size, mask_size, batch_size, detector.device,
                            empty_masks)
        rows.append({"key": "anoddpm", "method": QUALITY_METHODS["anoddpm"], **m, "fit_seconds": train_seconds,
                     "model_calls_per_image": base.sampler.model_calls(),
                     "note": f"same denoiser, t0={base.sampler.t0} K={base.sampler.steps}, w=0 s=0, pixel map",
                     "sampler": base.sampler.to_dict()})

    if "patchcore" in methods:
        log(f"  {dataset.category}: PatchCore-style memory bank of {len(dataset.train)} training images")
        pc = PatchCore(detector.scorer.backbone, detector.image_size, detector.scorer.config.feature_smoothing,
                       detector.scorer.config.map_sigma, coreset_ratio).fit(dataset.train, batch_size=batch_size)
        m = evaluate_map_fn(pc.maps, dataset, detector.image_size, mask_size, batch_size, detector.device,
                            empty_masks)
        rows.append({"key": "patchcore", "method": QUALITY_METHODS["patchcore"], **m, "fit_seconds": pc.fit_seconds,
                     "note": f"{detector.scorer.config.backbone}, bank {pc.memory.shape[0]} x {pc.memory.shape[1]}"
                     + (f", coreset {coreset_ratio:g}" if coreset_ratio < 1 else "")})

    if "anomalib" in methods:
        rows.extend(anomalib_benchmark(dataset, detector.image_size, mask_size, device=detector.device, log=log,
                                       empty_masks=empty_masks))
    for row in rows:
        row["dataset"] = dataset.category
    return rows


ANOMALIB_MODELS = ("Patchcore", "Padim")


def anomalib_benchmark(
    dataset: AnomalyDataset,
    image_size: int,
    mask_size: int = 256,
    models: Sequence[str] = ANOMALIB_MODELS,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = _log_nothing,
    empty_masks: str = "error",
) -> list[dict[str, Any]]:
    """anomalib's models (its defaults: WideResNet-50 features from the Hub) on the same test
    images, scored with cgdiff's metrics at the same mask size. anomalib is optional: without
    it (or without its backbone weights) the rows say why they are missing."""
    try:
        import anomalib  # noqa: F401
    except ImportError:
        return [{"key": "anomalib", "method": "anomalib", "note": "not installed (pip install anomalib): skipped"}]
    rows = []
    for name in models:
        try:
            rows.append(_run_anomalib_model(name, dataset, image_size, mask_size, device, log, empty_masks))
        except Exception as e:  # anomalib's failures are many (weights download, API drift)
            rows.append({"key": f"anomalib-{name.lower()}", "method": f"anomalib {name}",
                         "note": f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"})
    return rows


def _run_anomalib_model(name, dataset, image_size, mask_size, device, log, empty_masks="error") -> dict[str, Any]:
    """Fit one anomalib model on the training images and map the test images (written against
    anomalib 2.7: Engine, ImageItem / ImageBatch; anomalib resizes and normalises itself)."""
    import anomalib.models
    from anomalib.engine import Engine
    from torch.utils.data import DataLoader, Dataset

    from .images import to_batch

    log(f"  {dataset.category}: anomalib {name}")
    cls = getattr(anomalib.models, name)
    model = cls()
    size = (image_size, image_size)
    samples = list(dataset.test)

    class _Images(Dataset):
        def __init__(self, paths):
            self.paths = list(paths)

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            from anomalib.data import ImageItem

            x = (to_batch([self.paths[i]], image_size)[0] + 1) / 2  # anomalib takes [0, 1]
            return ImageItem(image=x, gt_label=torch.tensor(0), image_path=str(self.paths[i]))

    from anomalib.data import ImageBatch

    collate = ImageBatch.collate
    train = DataLoader(_Images(dataset.train), batch_size=8, collate_fn=collate)
    test = DataLoader(_Images([s.path for s in samples]), batch_size=8, collate_fn=collate)
    import tempfile

    accelerator = "gpu" if torch.device(device).type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as scratch:  # anomalib writes checkpoints and results
        engine = Engine(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        max_epochs=1, default_root_dir=scratch)
        t_start = time.perf_counter()
        engine.fit(model=model, train_dataloaders=train)
        fit_seconds = time.perf_counter() - t_start
        t_start = time.perf_counter()
        batches = engine.predict(model=model, dataloaders=test)
        seconds = (time.perf_counter() - t_start) / len(samples)
    maps = torch.cat([b.anomaly_map.float().reshape(-1, *b.anomaly_map.shape[-2:]) for b in batches]).cpu()
    if maps.shape[-2:] != size:
        maps = torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    m = {**maps_metrics(maps.numpy(), dataset, mask_size, empty_masks), "seconds_per_image": seconds}
    return {"key": f"anomalib-{name.lower()}", "method": f"anomalib {name}", **m, "fit_seconds": fit_seconds,
            "note": f"anomalib {anomalib.__version__} defaults"}


# ----------------------------------------------------------------------------- speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Counts calls of a function and the wall time spent in them (device-synchronised), and the
    process CPU time (all threads), which other work on a shared machine does not inflate."""

    def __init__(self, device: torch.device):
        self.device = device
        self.calls = 0
        self.rows = 0  # batch rows over all calls (the first argument's length when it is a tensor)
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync(self.device)
            start, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu
            self.calls += 1
            self.rows += args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 1
            return out

        return timed


@dataclass
class ModelTimers:
    unet: CallTimer
    backbone: CallTimer
    reconstruct: CallTimer


@contextlib.contextmanager
def timed_model_calls(detector):
    """Count and time, while inside, every U-Net call (through `Detector._eps`), every pass of
    the feature backbone and every `Detector.reconstruct`. Restores the detector on exit."""
    device = detector.device
    timers = ModelTimers(CallTimer(device), CallTimer(device), CallTimer(device))
    backbone = detector.scorer.backbone
    detector._eps = timers.unet.wrap(type(detector)._eps.__get__(detector))
    detector.reconstruct = timers.reconstruct.wrap(type(detector).reconstruct.__get__(detector))
    backbone.forward = timers.backbone.wrap(type(backbone).forward.__get__(backbone))
    try:
        yield timers
    finally:
        del detector._eps, detector.reconstruct
        del backbone.forward


class PeakMemory:
    """Peak memory while inside: on CUDA the peak of allocated tensor memory, elsewhere the peak
    resident size of the process (polled every 2 ms). In MiB."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mib: Optional[float] = None
        self.kind = "CUDA allocated" if self.device.type == "cuda" else "process RSS"

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, AttributeError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = self._rss()
            self._stop = threading.Event()

            def poll():
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, self._rss())

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._peak, self._rss())


def app_speed(detector, images: Sequence[Any], repeats: int = 2, **overrides: Any) -> dict[str, Any]:
    """Per-image latency of `Detector.detect` on one image at a time (as the app inspects) at
    the detector's settings (or `overrides`), split into U-Net calls, feature backbone and
    everything else (sampler arithmetic, blur, resizing, map smoothing, copies)."""
    if not images:
        raise ValueError("app_speed needs at least one image.")
    sampler, _ = detector.settings(**overrides)
    detector.detect(images[0], **overrides)  # warm-up: first-call allocations
    device = detector.device
    with PeakMemory(device) as mem, timed_model_calls(detector) as timers:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            for image in images:
                detector.detect(image, **overrides)
        _sync(device)
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu
    n = repeats * len(images)
    per = total / n
    unet, backbone, rec = (timers.unet.seconds / n, timers.backbone.seconds / n, timers.reconstruct.seconds / n)
    other = max(0.0, per - unet - backbone)
    return {
        "image_size": detector.image_size, "n_images": n, "sampler": sampler.to_dict(),
        "seconds_per_image": per, "images_per_second": 1 / per, "cpu_seconds_per_image": cpu / n,
        "unet_calls_per_image": timers.unet.calls / n, "unet_rows_per_image": timers.unet.rows / n, "unet_seconds": unet,
        "backbone_seconds": backbone, "other_seconds": other, "outside_models_share": other / per,
        "reconstruction_seconds": rec,
        "sampler_overhead_share": max(0.0, rec - unet) / rec if rec > 0 else None,
        "peak_memory_mib": mem.peak_mib, "memory_kind": mem.kind,
    }


def _inputs(batch: int, size: int, images: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    """A batch at `size`: the given images (cycled, resized), else smooth seeded noise."""
    if images is not None:
        idx = torch.arange(batch) % images.shape[0]
        x = images[idx].float()
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.clamp(-1, 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, max(1, size // 4), max(1, size // 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def _time_pipeline(detector, x: torch.Tensor, sampler: SamplerConfig, repeats: int) -> dict[str, Any]:
    device = detector.device
    x = x.to(device)
    detector.score_maps(x, detector.reconstruct(x, sampler))  # warm-up
    with PeakMemory(device) as mem, timed_model_calls(detector) as timers:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            detector.score_maps(x, detector.reconstruct(x, sampler))
        _sync(device)
        total = (time.perf_counter() - start) / repeats
        cpu = (time.process_time() - cpu) / repeats
    b = x.shape[0]
    unet = timers.unet.seconds / repeats
    rec = timers.reconstruct.seconds / repeats
    return {"batch_size": b, "image_size": int(x.shape[-1]), "seconds_per_batch": total,
            "seconds_per_image": total / b, "images_per_second": b / total, "cpu_seconds_per_image": cpu / b,
            "outside_unet_share": max(0.0, total - unet) / total,
            "sampler_overhead_share": max(0.0, rec - unet) / rec if rec > 0 else None,
            "peak_memory_mib": mem.peak_mib}


def sweep(
    detector,
    batch_sizes: Sequence[int],
    image_sizes: Sequence[int],
    sampler: Optional[SamplerConfig] = None,
    repeats: int = 2,
    images: Optional[torch.Tensor] = None,
    log: Callable[[str], None] = _log_nothing,
) -> list[dict[str, Any]]:
    """Latency and throughput of reconstruction + scoring for every image size x batch size
    (the U-Net is fully convolutional: any multiple of its downsampling factor works)."""
    from .model import downsampling_factor

    sampler = sampler or detector.sampler
    factor = downsampling_factor(detector.unet)
    rows = []
    for size in image_sizes:
        if size % factor:
            raise ValueError(f"image size {size} is not a multiple of {factor}, as this U-Net needs.")
        for b in batch_sizes:
            log(f"  {size} px, batch {b}")
            rows.append({**_time_pipeline(detector, _inputs(b, size, images), sampler, repeats),
                         "model_calls_per_image": sampler.model_calls()})
    return rows


def paper_scale_detector(base, image_size: int = PAPER_IMAGE_SIZE, seed: int = 0):
    """DDAD's U-Net (the 'paper' preset, random weights: speed does not depend on them) with
    `base`'s scorer and calibration, at PAPER_SAMPLER's settings."""
    from .detector import Detector
    from .model import build_unet

    torch.manual_seed(seed)
    unet = build_unet("paper", sample_size=image_size).to(base.device)
    det = Detector(unet, base.scorer, PAPER_SAMPLER, image_size, base.calibration, {"name": "paper scale"})
    return det


def gpu_variants() -> list[tuple[str, dict[str, Any]]]:
    """The fast-path variants measured on a GPU, the reference first."""
    return [
        ("fp32 eager (reference)", {}),
        ("channels_last", {"channels_last": True}),
        ("bf16 autocast", {"autocast_dtype": torch.bfloat16}),
        ("fp16 autocast", {"autocast_dtype": torch.float16}),
        ("torch.compile", {"compile": True}),
        ("bf16 + channels_last", {"autocast_dtype": torch.bfloat16, "channels_last": True}),
        ("bf16 + channels_last + compile", {"autocast_dtype": torch.bfloat16, "channels_last": True, "compile": True}),
    ]


@torch.no_grad()
def fast_path_benchmark(
    detector,
    x: torch.Tensor,
    variants: Sequence[tuple[str, dict[str, Any]]],
    sampler: Optional[SamplerConfig] = None,
    repeats: int = 3,
    compile_options: Optional[dict[str, Any]] = None,
    log: Callable[[str], None] = _log_nothing,
) -> list[dict[str, Any]]:
    """Each variant of `Detector.use_fast_path` against the first (the reference, plain fp32
    eager) on the same batch `x` and seed: throughput, speed-up, and the largest difference in
    image score and in map value. The detector is back on the reference path afterwards."""
    sampler = sampler or detector.sampler
    device = detector.device
    x = x.to(device)
    rows, ref_maps, ref_seconds = [], None, None
    try:
        for name, options in variants:
            log(f"  {name}")
            if options.get("compile") and compile_options:
                options = {**options, "compile_options": compile_options}
            detector.use_fast_path(**options)
            _sync(device)
            start = time.perf_counter()
            maps = detector.score_maps(x, detector.reconstruct(x, sampler)).float()  # warm-up (compiles)
            _sync(device)
            warmup = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(repeats):
                maps = detector.score_maps(x, detector.reconstruct(x, sampler)).float()
            _sync(device)
            seconds = (time.perf_counter() - start) / repeats
            maps = maps.cpu()
            if ref_maps is None:
                ref_maps, ref_seconds = maps, seconds
            score_diff = (maps.flatten(1).amax(1) - ref_maps.flatten(1).amax(1)).abs().max().item()
            rows.append({
                "variant": name, "batch_size": int(x.shape[0]), "image_size": int(x.shape[-1]),
                "seconds_per_batch": seconds, "images_per_second": x.shape[0] / seconds,
                "speedup": ref_seconds / seconds, "warmup_seconds": warmup,
                "max_score_difference": score_diff,
                "max_score_difference_rel_threshold": (score_diff / detector.calibration.threshold
                                                       if detector.calibration else None),
                "max_map_difference": (maps - ref_maps).abs().max().item(),
                **{k: v for k, v in detector.fast_path().items()},
            })
    finally:
        detector.use_fast_path()
    return rows


def cpu_variants() -> list[tuple[str, dict[str, Any]]]:
    """The CPU variants of `Detector.use_fast_path` measured against fp32 eager, the reference
    first; the runtimes (`cgdiff.runtime`) only where their packages are installed."""
    from .runtime import RUNTIMES, available

    rows = [
        ("fp32 eager (reference)", {}),
        ("channels_last", {"channels_last": True}),
        ("bf16 autocast", {"autocast_dtype": torch.bfloat16}),
        ("bf16 + channels_last", {"autocast_dtype": torch.bfloat16, "channels_last": True}),  # --runtime bf16
        ("torch.compile", {"compile": True}),
    ]
    return rows + [(name, {"runtime": name}) for name in RUNTIMES if available(name)]


def _rusage() -> tuple[float, float, float, int]:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


@torch.no_grad()
def unet_call_time(detector, image_size: int, calls: int = 10, seed: int = 0) -> dict[str, Any]:
    """One U-Net call (batch 1, `image_size` px) on the detector's current path, after two
    warm-up calls: milliseconds per call (wall and process CPU), kernel (system) CPU time and
    minor page faults per call, the allocator churn that `cgdiff.runtime.keep_freed_memory`
    removes."""
    x = _inputs(1, image_size, seed=seed).to(detector.device)
    t = torch.full((1,), 200, dtype=torch.long, device=detector.device)
    for _ in range(2):
        detector._eps(x, t)
    _sync(detector.device)
    start = _rusage()
    for _ in range(calls):
        detector._eps(x, t)
    _sync(detector.device)
    end = _rusage()
    wall, cpu, sys_, faults = (b - a for a, b in zip(start, end))
    return {"image_size": image_size, "ms_per_call": 1e3 * wall / calls, "cpu_ms_per_call": 1e3 * cpu / calls,
            "system_ms_per_call": 1e3 * sys_ / calls, "page_faults_per_call": faults / calls}


def _compare(reference: Sequence[Any], results: Sequence[Any], threshold: float) -> dict[str, Any]:
    score = max(abs(a.score - b.score) for a, b in zip(reference, results))
    return {"n_compared": len(results), "verdicts_matching": sum(a.verdict == b.verdict for a, b in zip(reference, results)),
            "max_score_difference": score, "max_score_difference_rel_threshold": score / threshold,
            "max_map_difference": max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(reference, results))}


@torch.no_grad()
def cpu_fast_path_benchmark(
    cases: Sequence[tuple[str, Any, Sequence[Any], Sequence[Any]]],
    variants: Sequence[tuple[str, dict[str, Any]]],
    unet_sizes: Sequence[int] = (128, 256),
    paper=None,
    paper_image: Optional[torch.Tensor] = None,
    repeats: int = 1,
    log: Callable[[str], None] = _log_nothing,
) -> dict[str, Any]:
    """Every CPU variant against the first (the reference) on the same images, seed and threads.

    cases: (name, detector, timed images, extra images) per checkpoint: the timed images are
        inspected one per call as the app does (after one warm-up image, whose time with the
        variant's export or compilation is the first-call cost); the extra images (a test split)
        are only compared with the reference, in batches.
    Per variant: U-Net milliseconds per call at each of `unet_sizes` (the first case's U-Net),
    per case seconds per image end to end at its stored settings, first-call cost, peak
    memory, verdicts matching the reference and the largest score and map differences; at
    paper scale (`paper`, a detector; one image) seconds per image and score difference.
    `chosen` is the fastest variant (mean seconds per image over the cases) whose verdicts all
    match and whose scores stay within 1 % of each threshold; `failed` lists the variants that
    could not run (a runtime missing or failing, no compiler), with the error. Detectors end on
    the reference path."""
    if any(options.get("compile") for _, options in variants):
        import torch._dynamo

        # One compilation per checkpoint, image size and the paper-scale U-Net: above dynamo's
        # default limit, later ones would silently run eager.
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    reference: dict[str, list] = {}
    rows, unet_rows, paper_rows, failed = [], [], [], []
    paper_ref = None
    try:
        for variant, options in variants:
            log(f"  {variant}")
            try:
                rows += _variant_rows(variant, options, cases, reference, repeats, variant == variants[0][0])
                for size in unet_sizes:  # after the warm-ups above: the export or compilation is done
                    _use_variant(variant, options, cases[0][1])
                    unet_rows.append({"variant": variant, **unet_call_time(cases[0][1], size)})
                if paper is not None:
                    row = _paper_row(variant, options, paper, paper_image)
                    paper_ref = row["score"] if paper_ref is None else paper_ref
                    paper_rows.append({**row, "max_score_difference": abs(row["score"] - paper_ref)})
            except Exception as e:  # noqa: BLE001 - one variant's failure (no compiler, a runtime error) is a row
                log(f"    failed: {type(e).__name__}: {e}")
                failed.append({"variant": variant, "error": f"{type(e).__name__}: {e}"})
                rows = [r for r in rows if r["variant"] != variant]
                unet_rows = [r for r in unet_rows if r["variant"] != variant]
                paper_rows = [r for r in paper_rows if r["variant"] != variant]
            finally:
                for _, detector, _, _ in cases:
                    detector.use_fast_path()
                if paper is not None:
                    paper.use_fast_path()
    finally:
        for _, detector, _, _ in cases:
            detector.use_fast_path()
    return {"rows": rows, "unet": unet_rows, "paper": paper_rows, "failed": failed, "chosen": choose_cpu_default(rows)}


def _check_active(variant: str, options: dict[str, Any], detector) -> None:
    """A runtime that could not be had leaves the detector on the reference path (with a
    warning): such a row would time the reference under the runtime's name."""
    wanted = options.get("runtime")
    if wanted and detector.fast_path()["runtime"] != wanted:
        raise RuntimeError(f"{wanted} is not active (missing, or its export failed): not measured")


def _use_variant(variant: str, options: dict[str, Any], detector) -> None:
    """Put the detector on a variant (its warnings silenced: `_check_active` refuses a runtime
    that could not be had)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        detector.use_fast_path(**options)
    _check_active(variant, options, detector)


def _variant_rows(variant, options, cases, reference, repeats, is_reference) -> list[dict[str, Any]]:
    rows = []
    for name, detector, images, extra in cases:
        start = time.perf_counter()
        _use_variant(variant, options, detector)
        detector.detect(images[0])
        warmup = time.perf_counter() - start
        with PeakMemory(detector.device) as mem, timed_model_calls(detector) as timers:
            t0, cpu0 = time.perf_counter(), time.process_time()
            timed = [d for _ in range(repeats) for image in images for d in detector.detect(image)]
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        results = timed[: len(images)] + (detector.detect(list(extra)) if extra else [])
        if is_reference:
            reference[name] = results
        n = len(timed)
        rows.append({"variant": variant, "checkpoint": name, "seconds_per_image": wall / n,
                     "cpu_seconds_per_image": cpu / n, "unet_seconds": timers.unet.seconds / n,
                     "unet_calls_per_image": timers.unet.calls / n, "warmup_seconds": warmup,
                     "peak_memory_mib": mem.peak_mib, **_compare(reference[name], results, detector.threshold),
                     **detector.fast_path()})
        detector.use_fast_path()
    return rows


def _paper_row(variant, options, paper, paper_image) -> dict[str, Any]:
    x = paper_image.to(paper.device)
    start = time.perf_counter()
    _use_variant(variant, options, paper)
    paper._eps(x, torch.full((1,), 200, dtype=torch.long, device=paper.device))
    warmup = time.perf_counter() - start
    t0, cpu0 = time.perf_counter(), time.process_time()
    score = paper.score_maps(x, paper.reconstruct(x)).flatten(1).amax(1).item()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"variant": variant, "seconds_per_image": wall, "cpu_seconds_per_image": cpu, "warmup_seconds": warmup,
            "unet_calls_per_image": paper.sampler.model_calls(), "score": score}


def choose_cpu_default(rows: Sequence[dict]) -> Optional[str]:
    """The fastest variant (mean seconds per image over its rows) whose verdicts all match the
    reference and whose largest score difference stays within 1 % of the threshold."""
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    eligible = {v: float(np.mean([r["seconds_per_image"] for r in rs])) for v, rs in by_variant.items()
                if all(r["verdicts_matching"] == r["n_compared"] and r["max_score_difference_rel_threshold"] <= 0.01
                       for r in rs)}
    return min(eligible, key=eligible.get) if eligible else None


# ----------------------------------------------------------------------------- plots


def plot_quality(rows: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars of image AUROC, pixel AUROC and AUPRO per method, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 1, figsize=(10, 3.2 * len(datasets)), squeeze=False)
    keys = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))
    for ax, name in zip(axes[:, 0], datasets):
        sub = [r for r in rows if r["dataset"] == name and r.get("image_auroc") is not None]
        pos = np.arange(len(sub))
        for i, (k, label) in enumerate(keys):
            ax.bar(pos + (i - 1) * 0.27, [r.get(k) or 0 for r in sub], 0.27, label=label)
        ax.set_xticks(pos, [r["method"] for r in sub], rotation=20, ha="right", fontsize=8)
        low = min([r.get(k) or 0 for r in sub for k, _ in keys] + [0.5])
        ax.set_ylim(math.floor(low * 10) / 10, 1.0)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(sweeps: dict[str, list[dict]], path: str | Path) -> Path:
    """Throughput against batch size (left) and latency per image against image size (right),
    one line per configuration in `sweeps` (name -> sweep rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in sweeps.items():
        for size in sorted({r["image_size"] for r in rows}):
            sub = sorted((r for r in rows if r["image_size"] == size), key=lambda r: r["batch_size"])
            if sub:
                left.plot([r["batch_size"] for r in sub], [r["images_per_second"] for r in sub], "o-",
                          label=f"{name}, {size} px")
        by_size: dict[int, float] = {}
        for r in rows:
            if r["batch_size"] == min(q["batch_size"] for q in rows):
                by_size[r["image_size"]] = r["seconds_per_image"]
        if by_size:
            sizes = sorted(by_size)
            right.plot(sizes, [by_size[s] for s in sizes], "o-", label=name)
    left.set(xlabel="batch size", ylabel="images per second", xscale="log", yscale="log", title="throughput")
    right.set(xlabel="image size (px)", ylabel="seconds per image", xscale="log", yscale="log",
              title="latency (smallest batch)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax, key in ((left, "batch_size"), (right, "image_size")):
        ticks = sorted({r[key] for rows in sweeps.values() for r in rows})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- runs


def run_quality(
    pairs: Sequence[tuple[str, Path]],
    methods: Sequence[str] = tuple(QUALITY_METHODS),
    mask_size: int = 256,
    batch_size: int = 4,
    coreset_ratio: float = 1.0,
    device: Optional[str] = None,
    progress: bool = False,
    log: Callable[[str], None] = _log_nothing,
    empty_masks: str = "error",
) -> dict[str, Any]:
    """`quality_benchmark` for every (checkpoint, dataset category) pair."""
    from .detector import Detector

    from .evaluation import load_masks

    rows, datasets = [], []
    seen: set[str] = set()
    loaded = [load_dataset(data) for _, data in pairs]
    for dataset in loaded:  # every pair's masks are checked before any work
        load_masks(dataset, list(dataset.test), mask_size, empty_masks)
    for (checkpoint, data), dataset in zip(pairs, loaded):
        detector = Detector.from_pretrained(checkpoint, device=device)
        if detector.calibration is None:
            raise ValueError(f"checkpoint '{checkpoint}' is not calibrated; retrain or calibrate it.")
        label = dataset.category if dataset.category not in seen else f"{dataset.category} ({Path(checkpoint).name})"
        seen.add(label)
        log(f"{label}: {dataset.summary()}; {detector.describe()}")
        found = quality_benchmark(detector, dataset, methods, mask_size, batch_size, coreset_ratio,
                                  checkpoint=str(checkpoint), progress=progress, log=log, empty_masks=empty_masks)
        for row in found:
            row["dataset"] = label
        rows.extend(found)
        datasets.append({"dataset": label, "summary": dataset.summary(), "checkpoint": str(checkpoint),
                         "detector": detector.describe(), "image_size": detector.image_size,
                         "mask_size": mask_size, "training": detector.info.get("training", {}).get("seconds")})
    return {"rows": rows, "datasets": datasets}


def _example_images(location: str, image_size: int, n: int = 4) -> tuple[list[Any], str]:
    """Images to time the app on: every example of a bundled checkpoint, else `n` seeded noise
    textures."""
    from .registry import known_checkpoints

    for entry in known_checkpoints():
        if entry.bundled and Path(entry.location).resolve() == Path(location).resolve() and entry.examples():
            return [str(p) for p in entry.examples()], "the checkpoint's example images"
    x = _inputs(n, image_size)
    return list(((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()), "seeded noise images"


def run_speed(
    checkpoints: Sequence[str],
    device: Optional[str] = None,
    batch_sizes: Optional[Sequence[int]] = None,
    image_sizes: Optional[Sequence[int]] = None,
    repeats: int = 2,
    paper_scale: bool = True,
    paper_batch_sizes: Optional[Sequence[int]] = None,
    fast_path: Optional[bool] = None,
    gpu_batch_size: int = 32,
    compile_mode: Optional[str] = None,
    agreement: Optional[dict[str, Sequence[Any]]] = None,
    sweeps: bool = True,
    log: Callable[[str], None] = _log_nothing,
) -> dict[str, Any]:
    """App latency per checkpoint (on the path the app runs: on a CPU `cgdiff.runtime.CPU_DEFAULT`);
    batch/size sweep of the first; paper scale; the fast path against fp32
    eager: on a GPU autocast, channels_last and torch.compile; on a CPU also bf16 autocast and
    the CPU runtimes, with the allocator's page faults before and after `keep_freed_memory`.
    `agreement` maps a checkpoint (as given) to extra images (its test split) on which every CPU
    variant's verdicts and scores are compared with the reference."""
    from .detector import Detector
    from .images import to_batch
    from .runtime import keep_freed_memory

    result: dict[str, Any] = {"app": [], "sweeps": {}, "paper": None, "fast_path": None, "cpu_fast_path": None,
                              "allocator": None, "notes": []}
    loaded = []
    for checkpoint in checkpoints:
        detector = Detector.from_pretrained(checkpoint, device=device)
        if detector.calibration is None:
            raise ValueError(f"checkpoint '{checkpoint}' is not calibrated; retrain or calibrate it.")
        images, source = _example_images(str(checkpoint), detector.image_size)
        loaded.append((checkpoint, detector, images, source))
    if not loaded:
        return result
    cuda = loaded[0][1].device.type == "cuda"
    if fast_path is None:
        fast_path = True
    if not cuda and fast_path:
        log("allocator: U-Net calls before and after keep_freed_memory")
        before = [unet_call_time(loaded[0][1], size) for size in (128, 256)]
        applied = keep_freed_memory()
        after = [unet_call_time(loaded[0][1], size) for size in (128, 256)]
        result["allocator"] = {"applied": applied, "rows": [{"allocator": "glibc defaults", **r} for r in before]
                               + [{"allocator": "keep_freed_memory", **r} for r in after]}
    elif not cuda:  # the app's allocator setting (app.launch, the CLI): its latency is timed under it
        result["allocator"] = {"applied": keep_freed_memory(), "rows": []}
    from .runtime import describe_path, path_options

    for checkpoint, detector, images, source in loaded:
        detector.use_fast_path(**path_options("auto", detector.device))
        path = describe_path(detector.fast_path())
        log(f"app latency: {checkpoint} ({detector.describe()}), on {source}, path: {path}")
        row = app_speed(detector, images, repeats)
        row.update(checkpoint=str(checkpoint), images=source, path=path, within_1_second=row["seconds_per_image"] <= 1.0,
                   within_3_seconds=row["seconds_per_image"] <= 3.0, within_15_percent=row["outside_models_share"] < 0.15)
        result["app"].append(row)
        detector.use_fast_path()
    checkpoint, detector, images, _ = loaded[0]
    images = to_batch(images, detector.image_size)
    batch_sizes = tuple(batch_sizes or ((1, 8, 32, 64) if cuda else (1, 2, 4, 8)))
    image_sizes = tuple(image_sizes or (64, 128, 256))
    if sweeps:
        name = f"{Path(str(checkpoint)).name} (app settings, reference path)"
        log(f"sweep: {name}")
        result["sweeps"][name] = sweep(detector, batch_sizes, image_sizes, detector.sampler, repeats, images, log)
    paper = None
    if paper_scale:
        paper = paper_scale_detector(detector)
        result["paper"] = {"unet_parameters": sum(p.numel() for p in paper.unet.parameters()),
                           "sampler": PAPER_SAMPLER.to_dict(), "image_size": PAPER_IMAGE_SIZE}
        if sweeps:
            sizes = tuple(paper_batch_sizes or ((1, 8, 32, 64, 128) if cuda else (1,)))
            log("sweep: paper scale")
            result["sweeps"]["paper scale (reference path)"] = sweep(
                paper, sizes, (PAPER_IMAGE_SIZE,), PAPER_SAMPLER, repeats if cuda else 1, images, log)
    if not fast_path:
        return result
    if not cuda:
        import tempfile

        log("CPU fast path: every variant against fp32 eager (exports into a fresh cache, so warm-up includes them)")
        from .registry import resolve

        def where(checkpoint: Any) -> str:  # a registry name, a path with or without a trailing slash
            return str(Path(resolve(str(checkpoint))).resolve())

        extra = {where(k): v for k, v in (agreement or {}).items()}
        cases = [(Path(str(c)).name, d, imgs, list(extra.get(where(c), ()))) for c, d, imgs, _ in loaded]
        previous = os.environ.get("CGDIFF_CACHE")
        previous_inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        with tempfile.TemporaryDirectory(prefix="cgdiff-bench-cache-") as cache:
            os.environ["CGDIFF_CACHE"] = cache
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")  # compilation measured cold
            try:
                result["cpu_fast_path"] = cpu_fast_path_benchmark(
                    cases, cpu_variants(), paper=paper, paper_image=_inputs(1, PAPER_IMAGE_SIZE, images), log=log)
            finally:
                for name, value in (("CGDIFF_CACHE", previous), ("TORCHINDUCTOR_CACHE_DIR", previous_inductor)):
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        return result
    options = {"mode": compile_mode} if compile_mode else None
    log("fast path: the app checkpoint on its images")
    result["fast_path"] = {"app": fast_path_benchmark(detector, _inputs(min(gpu_batch_size, 8), detector.image_size, images),
                                                      gpu_variants(), detector.sampler, repeats, options, log)}
    if paper is not None:
        log("fast path: paper scale")
        rows = fast_path_benchmark(paper, _inputs(gpu_batch_size, PAPER_IMAGE_SIZE, images), gpu_variants(),
                                   PAPER_SAMPLER, repeats, options, log)
        result["fast_path"]["paper"] = rows
        best = max(rows, key=lambda r: r["images_per_second"])
        variant = dict(gpu_variants())[best["variant"]]
        if variant.get("compile") and options:
            variant = {**variant, "compile_options": options}
        paper.use_fast_path(**variant)
        try:
            log(f"sweep: paper scale, {best['variant']}")
            result["sweeps"][f"paper scale ({best['variant']})"] = sweep(
                paper, tuple(paper_batch_sizes or (1, 8, 32, 64, 128)), (PAPER_IMAGE_SIZE,), PAPER_SAMPLER,
                repeats, images, log)
        finally:
            paper.use_fast_path()
    return result


# ----------------------------------------------------------------------------- rendering


def render_quality(result: dict[str, Any]) -> str:
    parts = []
    for d in result["datasets"]:
        rows = [r for r in result["rows"] if r["dataset"] == d["dataset"]]
        parts.append(f"### {d['dataset']}\n\n{d['summary']}\n\nCheckpoint {d['checkpoint']}: {d['detector']}; "
                     f"maps compared with masks at {d['mask_size']} x {d['mask_size']}.\n\n"
                     + markdown_table(rows, QUALITY_COLUMNS))
    return "\n\n".join(parts)


APP_COLUMNS = [
    ("checkpoint", "checkpoint", "s"), ("path", "path", "s"), ("image_size", "px", "d"),
    ("unet_calls_per_image", "U-Net calls", ".0f"), ("unet_rows_per_image", "U-Net evaluations", ".0f"),
    ("seconds_per_image", "s / image", ".3f"), ("cpu_seconds_per_image", "CPU s / image", ".3f"),
    ("unet_seconds", "U-Net s", ".3f"), ("backbone_seconds", "backbone s", ".3f"), ("other_seconds", "other s", ".3f"),
    ("outside_models_share", "outside models", ".1%"), ("sampler_overhead_share", "sampler overhead", ".1%"),
    ("peak_memory_mib", "peak MiB", ".0f"), ("within_1_second", "<= 1 s", "s"), ("within_3_seconds", "<= 3 s", "s"),
    ("within_15_percent", "< 15 %", "s"),
]
CPU_UNET_COLUMNS = [
    ("variant", "variant", "s"), ("image_size", "px", "d"), ("ms_per_call", "ms / call", ".1f"),
    ("ratio", "/ fp32 eager", ".2f"), ("cpu_ms_per_call", "CPU ms / call", ".1f"),
    ("system_ms_per_call", "system ms / call", ".1f"), ("page_faults_per_call", "page faults / call", ".0f"),
]
ALLOCATOR_COLUMNS = [("allocator", "allocator", "s")] + CPU_UNET_COLUMNS[1:3] + CPU_UNET_COLUMNS[4:]
CPU_FAST_COLUMNS = [
    ("variant", "variant", "s"), ("checkpoint", "checkpoint", "s"), ("seconds_per_image", "s / image", ".3f"),
    ("cpu_seconds_per_image", "CPU s / image", ".3f"), ("speedup", "speed-up", ".2f"),
    ("warmup_seconds", "first call s", ".1f"), ("peak_memory_mib", "peak MiB", ".0f"),
    ("verdicts", "verdicts = reference", "s"), ("max_score_difference_rel_threshold", "max |score diff| / threshold", ".1e"),
    ("max_map_difference", "max |map diff|", ".1e"),
]
PAPER_CPU_COLUMNS = [
    ("variant", "variant", "s"), ("seconds_per_image", "s / image", ".2f"), ("cpu_seconds_per_image", "CPU s / image", ".2f"),
    ("speedup", "speed-up", ".2f"), ("warmup_seconds", "first call s", ".1f"),
    ("max_score_difference", "max |score diff|", ".1e"),
]
SWEEP_COLUMNS = [
    ("image_size", "px", "d"), ("batch_size", "batch", "d"), ("model_calls_per_image", "U-Net calls / image", "d"),
    ("seconds_per_batch", "s / batch", ".3f"), ("seconds_per_image", "s / image", ".3f"),
    ("cpu_seconds_per_image", "CPU s / image", ".3f"), ("images_per_second", "images / s", ".3g"), ("outside_unet_share", "outside U-Net", ".1%"),
    ("peak_memory_mib", "peak MiB", ".0f"),
]
FAST_COLUMNS = [
    ("variant", "variant", "s"), ("batch_size", "batch", "d"), ("image_size", "px", "d"),
    ("images_per_second", "images / s", ".4g"), ("speedup", "speed-up", ".2f"),
    ("warmup_seconds", "warm-up s", ".1f"), ("max_score_difference", "max |score diff|", ".2e"),
    ("max_score_difference_rel_threshold", "/ threshold", ".2e"), ("max_map_difference", "max |map diff|", ".2e"),
]


def _ratios(rows: Sequence[dict], value: str, group: Optional[str], name: str, invert: bool) -> list[dict]:
    """Each row's `value` against the first row of its group (the reference variant comes first):
    reference / value (a speed-up) when `invert`, else value / reference."""
    first: dict[Any, float] = {}
    out = []
    for r in rows:
        ref = first.setdefault(r.get(group) if group else None, r[value])
        out.append({**r, name: (ref / r[value] if invert else r[value] / ref) if r[value] and ref else None})
    return out


def _yes(rows: list[dict]) -> list[dict]:
    return [{**r, **{k: ("yes" if v else "no") for k, v in r.items() if isinstance(v, bool)}} for r in rows]


def render_speed(result: dict[str, Any]) -> str:
    parts = []
    if result["app"]:
        kind = result["app"][0]["memory_kind"]
        parts.append("### Latency at the app's settings (one image per call)\n\n" + markdown_table(_yes(result["app"]), APP_COLUMNS)
                     + f"\n\nPeak memory: {kind}. 'U-Net evaluations': images the U-Net denoised per inspected image "
                     "(K, 2K with blur guidance, times N; the N runs of an averaged reconstruction share calls). "
                     "'outside models': time not spent in the U-Net or the feature "
                     "backbone; 'sampler overhead': share of the reconstruction not spent in the U-Net.")
    for name, rows in result["sweeps"].items():
        parts.append(f"### Throughput: {name}\n\n" + markdown_table(rows, SWEEP_COLUMNS))
    if result.get("paper"):
        p = result["paper"]
        s = p["sampler"]
        parts.append(f"Paper scale: DDAD's U-Net ({p['unet_parameters'] / 1e6:.1f} M parameters) at {p['image_size']} px, "
                     f"t0={s['t0']}, K={s['steps']}, w={s['w']}, s={s['guidance_scale']} (blur guidance: 2 U-Net calls per step).")
    if result.get("allocator") and result["allocator"]["rows"]:
        parts.append("### Allocator: fp32 eager U-Net calls before and after `keep_freed_memory` (batch 1)\n\n"
                     + markdown_table(result["allocator"]["rows"], ALLOCATOR_COLUMNS))
    elif result.get("allocator"):
        parts.append("Allocator: `keep_freed_memory` " + ("applied" if result["allocator"]["applied"] else "refused by the C library")
                     + " before the timings, as the app and the CLI apply it (not compared: --no-fast-path).")
    cpu = result.get("cpu_fast_path")
    if cpu:
        parts.append("### CPU fast path: U-Net time per call (batch 1)\n\n" + markdown_table(_ratios(cpu["unet"], "ms_per_call", "image_size", "ratio", invert=False), CPU_UNET_COLUMNS))
        rows = [{**r, "verdicts": f"{r['verdicts_matching']}/{r['n_compared']}"} for r in cpu["rows"]]
        parts.append("### CPU fast path: end to end at each checkpoint's stored settings (one image per call)\n\n"
                     + markdown_table(_ratios(rows, "seconds_per_image", "checkpoint", "speedup", invert=True), CPU_FAST_COLUMNS)
                     + "\n\n'first call s': switching to the variant plus the first image (export "
                     "or compilation included: the ONNX exports and torch.compile's kernels went to fresh caches; the "
                     "first checkpoint's row also pays for that variant's first imports). Verdicts are compared on the "
                     "timed images (every bundled example) and the "
                     f"extra test images given. Chosen by the rule (fastest with every verdict equal and scores within "
                     f"1 % of the threshold): **{cpu['chosen']}**.")
        for f in cpu.get("failed", []):
            parts.append(f"Not measured: {f['variant']} ({f['error']}).")
        if cpu["paper"]:
            parts.append("### CPU fast path at paper scale (DDAD's U-Net, 256 px, one image)\n\n"
                         + markdown_table(_ratios(cpu["paper"], "seconds_per_image", None, "speedup", invert=True), PAPER_CPU_COLUMNS))
    fast = result.get("fast_path") or {}
    for scale, rows in fast.items():
        parts.append(f"### GPU fast path ({scale})\n\n" + markdown_table(rows, FAST_COLUMNS))
    parts.extend(result.get("notes", []))
    return "\n\n".join(parts)
