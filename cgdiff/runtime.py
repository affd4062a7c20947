"""The denoiser on CPU inference runtimes (ONNX Runtime, OpenVINO), and the allocator setting.

A reconstruction costs K to 2K U-Net calls, so on a CPU the U-Net is where the time goes. Plain
fp32 eager PyTorch is the reference path; this module runs the same weights through a runtime
made for CPU inference:

- `export_onnx(unet)` exports the U-Net once to ONNX (`torch.onnx.export`, dynamic batch and
  image size) into a cache folder outside the repository, keyed by a hash of the weights and
  the U-Net's config, so an edited or retrained checkpoint gets a new export (a stale one is
  never used) and a second process reuses the first one's export;
- `RuntimeUNet` runs that export with ONNX Runtime ("onnxruntime", fp32: the same arithmetic
  as the reference up to rounding) or OpenVINO ("openvino" fp32, "openvino-bf16" with bf16
  inference precision on CPUs that have it);
- `keep_freed_memory()` stops glibc's allocator from handing large freed buffers back to the
  kernel after every call, which made the eager path fault them in again each time (16,000 to
  23,000 page faults and 29 to 36 ms of kernel time, about an eighth of the CPU time, per U-Net
  call at 256 px in BENCHMARKS.md).

`Detector.use_fast_path(runtime=...)` switches a detector onto a runtime; `cgdiff bench --speed`
measures every variant against the reference (`BENCHMARKS.md`), and CPU_DEFAULT names the one
`detect`, `evaluate` and the app use. The runtimes are the optional extra `cgdiff[fast]`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .settings import CHOICES, RUNTIMES

# The CPU default of `detect`, `evaluate` and the app: channels-last PyTorch (fp32, no export, no
# extra package). `cgdiff bench --speed` (`cgdiff.bench.choose_cpu_default`) picks the fastest
# variant whose verdicts equal the reference's on every bundled example and test tile and whose
# scores stay within 1 % of the threshold. Which one depends on the CPU. On a Xeon without
# AVX512-BF16 every bf16 way took 2-3x as long as fp32 (see `native_bf16`). On one with it, with
# the bundled detectors averaging N = 4 runs, the rule
# picked OpenVINO bf16 (1.4-1.9x end to end, BENCHMARKS.md), which is not the default because it
# needs the optional packages of `cgdiff[fast]` and an ONNX export per checkpoint on first use
# (about 20 s each), which the rule does not weigh; PyTorch bf16 ("bf16") moved brick's scores
# by 2 % of its threshold. Before (grass and gravel at 20 calls, no averaging), every bf16
# variant moved some detector's scores by more than 1 %, and ONNX Runtime and torch.compile were
# within run-to-run variation of channels-last (10-20 %).
CPU_DEFAULT = "channels_last"
EXPORT_VERSION = 1  # bump when the export itself changes: older cache entries are then ignored
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}


def path_options(choice: str, device: torch.device | str = "cpu") -> dict:
    """`Detector.use_fast_path` keyword arguments for a --runtime choice: "reference" (plain fp32
    eager PyTorch), "auto" (CPU_DEFAULT on a CPU; the reference elsewhere), "channels_last",
    "bf16" (bf16 autocast with channels_last, PyTorch; for CPUs with AVX512-BF16 or AMX, where
    others emulate bf16 slowly), or a runtime of RUNTIMES. Raises ValueError for anything else."""
    if choice not in CHOICES:
        raise ValueError(f"unknown runtime {choice!r}; choose from {', '.join(CHOICES)}.")
    if choice == "auto":
        choice = CPU_DEFAULT if torch.device(device).type == "cpu" else "reference"
    if choice == "reference":
        return {}
    if choice == "channels_last":
        return {"channels_last": True}
    if choice == "bf16":
        return {"autocast_dtype": torch.bfloat16, "channels_last": True}
    return {"runtime": choice}


def native_bf16() -> Optional[bool]:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX), as torch's own CPU checks
    report it; None where this torch cannot tell, and on other CPUs. Elsewhere oneDNN emulates bf16, and a bf16 U-Net
    call ran 2.5-3x slower than fp32 channels-last (a Xeon with AVX512 but without AVX512-BF16,
    BENCHMARKS.md "Speed")."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):  # the checks below are x86 ones
        return None
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(check) for check in checks):
        return None
    try:
        return any(bool(check()) for check in checks)
    except Exception:  # noqa: BLE001 - a private check that fails says nothing either way
        return None


def describe_path(fast_path: dict) -> str:
    """'PyTorch fp32 (reference)', 'PyTorch fp32, channels_last', 'onnxruntime', ... from
    `Detector.fast_path()`."""
    if fast_path.get("runtime"):
        return str(fast_path["runtime"])
    parts = [k for k in ("channels_last", "compile") if fast_path.get(k)]
    dtype = fast_path.get("autocast_dtype") or "fp32"
    return f"PyTorch {dtype}" + (", " + ", ".join(parts) if parts else (" (reference)" if dtype == "fp32" else ""))


class RuntimeUnavailable(RuntimeError):
    """The runtime is not installed or cannot run this U-Net; the message says which and why."""


def available(runtime: str) -> bool:
    """Whether the runtime's package (and the ONNX exporter's) can be imported."""
    import importlib.util

    if runtime not in _MODULES:
        return False
    needed = (_MODULES[runtime], "onnx", "onnxscript")
    return all(importlib.util.find_spec(name) is not None for name in needed)


def cache_dir() -> Path:
    """Where exports are kept: $CGDIFF_CACHE, else $XDG_CACHE_HOME/cgdiff, else ~/.cache/cgdiff."""
    if os.environ.get("CGDIFF_CACHE"):
        return Path(os.environ["CGDIFF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cgdiff"


def weights_hash(unet: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 characters) of the U-Net's config and every weight's name, shape, dtype
    and bytes, with the versions of torch, diffusers, onnx and onnxscript and EXPORT_VERSION: the
    cache key of its export."""
    import diffusers

    h = hashlib.sha256()
    config = dict(getattr(unet, "config", {}) or {})
    h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    # The exported graph depends on the code that traced it, not only on the weights.
    versions = {name: _version(name) for name in ("onnx", "onnxscript")}
    h.update(f"torch {torch.__version__} diffusers {diffusers.__version__} {versions} export {EXPORT_VERSION}".encode())
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def is_exported(unet: torch.nn.Module, cache: Optional[Path] = None) -> bool:
    """Whether `export_onnx` would find this U-Net's export in the cache (no export needed)."""
    return (Path(cache or cache_dir()) / "onnx" / weights_hash(unet) / "unet.onnx").is_file()


class _EpsOnly(torch.nn.Module):
    """diffusers' UNet2DModel returns an output object; ONNX wants plain tensors."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def export_onnx(unet: torch.nn.Module, cache: Optional[Path] = None, key: Optional[str] = None) -> Path:
    """The U-Net as an ONNX file (inputs x: B x 3 x H x W float32, t: B int64; output the noise
    estimate, B x 3 x H x W), exported once per weights hash into `cache` (default `cache_dir()`)
    and reused afterwards. The file is written beside its final place and renamed into it when
    complete, so an interrupted export leaves nothing that a later run would load. `key`: the
    weights hash when the caller has it. Raises RuntimeUnavailable when the exporter is missing
    or fails, or the cache folder cannot be written."""
    from .model import downsampling_factor

    folder = Path(cache or cache_dir()) / "onnx" / (key or weights_hash(unet))
    path = folder / "unet.onnx"
    if path.is_file():
        return path
    for name in ("onnx", "onnxscript"):
        if _missing(name):
            raise RuntimeUnavailable(f"exporting the U-Net needs the '{name}' package: pip install 'cgdiff[fast]'.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    except OSError as e:
        raise RuntimeUnavailable(f"cannot write the export into '{folder}' ({e.strerror or e}); set CGDIFF_CACHE "
                                 "to a writable folder.") from None
    factor = downsampling_factor(unet)
    size = max(factor, 64 // factor * factor)
    device = next(unet.parameters()).device
    # Example batch 2 and a non-square example: torch.export would fix a dimension of size 1
    # (or two equal ones) in the exported graph.
    x = torch.zeros(2, 3, size, size + factor, device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    side = {d: factor * torch.export.Dim(d, min=1, max=4096 // factor) for d in ("h", "w")}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _EpsOnly(unet).eval(), (x, t), dynamo=True, input_names=["x", "t"], output_names=["eps"],
                dynamic_shapes={"x": {0: batch, 2: side["h"], 3: side["w"]}, "t": {0: batch}}, verbose=False,
            )
            program.save(str(tmp / "unet.onnx"), external_data=False)
        os.replace(tmp / "unet.onnx", path)
    except Exception as e:  # the exporter raises many types; the caller falls back to PyTorch
        raise RuntimeUnavailable(f"the ONNX export of the U-Net failed: {type(e).__name__}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class RuntimeUNet:
    """A callable eps(x, t) -> noise estimate (torch tensors, CPU, float32, same shapes as the
    U-Net's) backed by a CPU runtime. `warmup_seconds` is what loading cost (export included
    when the cache was cold); `exported` says whether this call exported."""

    def __init__(self, unet: torch.nn.Module, runtime: str, threads: Optional[int] = None,
                 cache: Optional[Path] = None):
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}.")
        if not available(runtime):
            raise RuntimeUnavailable(
                f"the '{runtime}' runtime is not installed (pip install 'cgdiff[fast]' brings ONNX Runtime and OpenVINO).")
        start = time.perf_counter()
        threads = int(threads or torch.get_num_threads())
        key = weights_hash(unet)
        path = Path(cache or cache_dir()) / "onnx" / key / "unet.onnx"
        if path.is_file() and not _valid_onnx(path):
            path.unlink(missing_ok=True)  # a damaged cache entry (a disk fault, an edit): export again
        cached = path.is_file()
        path = export_onnx(unet, cache, key)
        self.runtime, self.path, self.exported = runtime, path, not cached
        try:
            self._run = _onnxruntime(path, threads) if runtime == "onnxruntime" else _openvino(
                path, threads, "bf16" if runtime.endswith("bf16") else "f32")
        except Exception as e:  # the runtimes raise their own types
            raise RuntimeUnavailable(f"{runtime} cannot load the exported U-Net: {type(e).__name__}: {e}") from None
        self.warmup_seconds = time.perf_counter() - start

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self._run(x.detach().to("cpu", torch.float32).contiguous().numpy(),
                        t.detach().to("cpu", torch.int64).reshape(-1).expand(x.shape[0]).contiguous().numpy())
        return torch.from_numpy(out).to(x.device)


def _onnxruntime(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x, t: session.run(None, {"x": x, "t": t})[0]


def _openvino(path: Path, threads: int, precision: str):
    import openvino as ov

    import threading

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: callers from several threads (the app) take turns

    def run(x, t):
        with lock:
            request.infer({"x": x, "t": t})
            return request.get_output_tensor(0).data.copy()

    return run


def keep_freed_memory() -> bool:
    """Serve buffers up to 1 GiB from the heap instead of fresh mmaps (glibc's M_MMAP_THRESHOLD;
    where glibc refuses that, 32 MiB, the largest every 64-bit glibc takes) and keep up to 1 GiB
    of freed heap in the process (M_TRIM_THRESHOLD) instead of returning it to the kernel, so that
    the next U-Net call reuses it without page faults. Returns whether glibc took both settings
    (False elsewhere, e.g. macOS or musl). Affects the whole process: the CLI, the app and the
    benchmark call it; the library does not."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        mmap_ok = libc.mallopt(m_mmap_threshold, 1 << 30) or libc.mallopt(m_mmap_threshold, 32 << 20)
        return bool(mmap_ok) & bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def _valid_onnx(path: Path) -> bool:
    try:
        import onnx

        onnx.checker.check_model(str(path))
        return True
    except Exception:  # noqa: BLE001 - any failure to parse or check means: export again
        return False


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None
