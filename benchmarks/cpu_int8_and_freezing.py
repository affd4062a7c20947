"""Two more CPU variants than `cgdiff bench --speed` measures: int8 and Inductor freezing.

    python benchmarks/cpu_int8_and_freezing.py [--threads 2] [--checkpoints brick grass gravel] [--json out.json]

Run it alone on the machine. It needs the bundled checkpoints, `data/textures`
(`cgdiff build-textures --out data/textures`), the `cgdiff[fast]` extra and `nncf`
(`pip install nncf`, not a dependency of cgdiff).

- **int8**: NNCF post-training quantisation (`nncf.quantize`, mixed preset) of the OpenVINO
  model that `cgdiff.runtime` exports. The calibration set is the U-Net's inputs while the
  detector reconstructs 12 of its training images at its stored settings. The first and last
  convolutions and the attention and time-embedding matrix products stay in float, as is usual
  for diffusion models. What stays float runs at fp32 or bf16 inference precision.
- **Inductor freezing**: `torch.compile` on the channels-last U-Net with
  `torch._inductor.config.freezing = True` (weights folded in and prepacked for oneDNN, Intel's
  advice for CPU inference), fp32 and with bf16 autocast.

It prints the same figures as `cgdiff bench --speed`'s U-Net table: ms per call at batch 1,
128 and 256 px, t = 200, 20 calls after 7 warm-up calls, on the first checkpoint's U-Net (all
three bundled U-Nets have the same shape). The ratios are against fp32 eager PyTorch timed at
the end of the run; it is also timed first, because a process's first timings can run slow.
For each bundled checkpoint it also gives the verdicts and the largest score difference
against the reference, over its 6 bundled examples and its 24 test tiles, and the first
call's cost (quantisation or compilation included). `--timing-only` skips that comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch._dynamo import config as dynamo_config
from torch._inductor import config as inductor_config

from cgdiff import Detector
from cgdiff.bench import _compare, _use_variant, markdown_table, unet_call_time
from cgdiff.data import iter_images, load_dataset
from cgdiff.runtime import RuntimeUNet, keep_freed_memory

CHECKPOINTS = ("brick", "grass", "gravel")


class Int8UNet:
    """eps(x, t) on an NNCF-quantised OpenVINO model of the detector's U-Net."""

    def __init__(self, detector: Detector, calibration_images, threads: int, precision: str):
        import nncf
        import openvino as ov

        start = time.perf_counter()
        model = ov.Core().read_model(str(RuntimeUNet(detector.unet, "openvino", threads=threads).path))
        samples = []
        original = detector._eps

        def record(x, t):
            t = t.reshape(-1).expand(x.shape[0])
            samples.extend({"x": x[i:i + 1].numpy().copy(), "t": t[i:i + 1].numpy().copy()} for i in range(x.shape[0]))
            return original(x, t)

        detector._eps = record
        try:
            detector.detect(list(calibration_images))
        finally:
            del detector._eps  # back to the class's method
        convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
        quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples),
                                  preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=nncf.IgnoredScope(names=[convs[0], convs[-1]], types=["MatMul"],
                                                                  validate=False))
        compiled = ov.Core().compile_model(quantized, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()
        self.runtime = f"openvino int8 ({precision} elsewhere)"
        self.calibration_samples = len(samples)
        self.warmup_seconds = time.perf_counter() - start

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]).to(torch.int64)
        self._request.infer({"x": x.float().contiguous().numpy(), "t": t.contiguous().numpy()})
        return torch.from_numpy(self._request.get_output_tensor(0).data.copy())


def variants():
    return [
        ("fp32 eager (reference)", {}),
        ("openvino-bf16", {"runtime": "openvino-bf16"}),
        ("openvino int8, fp32 elsewhere", {"int8": "f32"}),
        ("openvino int8, bf16 elsewhere", {"int8": "bf16"}),
        ("inductor freezing, fp32", {"channels_last": True, "compile": True}),
        ("inductor freezing, bf16", {"channels_last": True, "compile": True, "autocast_dtype": torch.bfloat16}),
    ]


def switch(detector: Detector, variant: str, options: dict, threads: int, calibration) -> None:
    """Put the detector on a variant (for int8: export and quantise)."""
    detector.use_fast_path()
    if "int8" in options:
        detector._runtime = Int8UNet(detector, calibration, threads, options["int8"])
    else:
        _use_variant(variant, options, detector)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", nargs="+", default=list(CHECKPOINTS), choices=CHECKPOINTS)
    parser.add_argument("--timing-only", action="store_true",
                        help="U-Net times only (the first checkpoint), without the score comparison")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    inductor_config.freezing = True
    dynamo_config.cache_size_limit = max(64, dynamo_config.cache_size_limit)

    cases = []
    for name in args.checkpoints:
        detector = Detector.from_pretrained(f"checkpoints/{name}", device="cpu")
        data = load_dataset(f"data/textures/{name}")
        images = sorted(iter_images(f"checkpoints/{name}/examples")) + [s.path for s in data.test]
        cases.append((name, detector, images, list(data.train)[:12]))

    unet_rows, score_rows, reference = [], [], {}
    # The reference is timed again at the end: the first timings of a process can run slow.
    again = variants()[0][0] + ", again at the end"
    for variant, options in variants() + [(again, {})]:
        print(f"{variant} ...", flush=True)
        compare = not args.timing_only and variant != again
        for name, detector, images, calibration in (cases if compare else cases[:1]):
            start = time.perf_counter()
            switch(detector, variant, options, args.threads, calibration)
            detector.detect(images[0])  # compilation happens at the first call
            setup = time.perf_counter() - start
            if compare:
                results = detector.detect(images)
                reference.setdefault(name, results)
                score_rows.append({"variant": variant, "checkpoint": name, "setup_seconds": setup,
                                   **_compare(reference[name], results, detector.threshold)})
            if name == cases[0][0]:
                for size in (128, 256):
                    x = torch.zeros(1, 3, size, size)
                    for _ in range(5):  # warm-up beyond unet_call_time's own two calls
                        detector._eps(x, torch.full((1,), 200))
                    unet_rows.append({"variant": variant, **unet_call_time(detector, size, calls=20)})
            detector.use_fast_path()

    eager = {r["image_size"]: r["ms_per_call"] for r in unet_rows if r["variant"] == again}
    for r in unet_rows:
        r["ratio"] = r["ms_per_call"] / eager[r["image_size"]]
    print()
    print(markdown_table(unet_rows, [("variant", "variant", ""), ("image_size", "px", ""),
                                     ("ms_per_call", "ms / call", ".1f"), ("ratio", "/ fp32 eager at the end", ".2f"),
                                     ("cpu_ms_per_call", "CPU ms / call", ".1f")]))
    if score_rows:
        print()
        print(markdown_table(score_rows, [("variant", "variant", ""), ("checkpoint", "checkpoint", ""),
                                      ("setup_seconds", "first call s", ".1f"),
                                      ("verdicts_matching", "verdicts = reference", ""),
                                      ("n_compared", "of", ""),
                                      ("max_score_difference_rel_threshold", "max |score diff| / threshold", ".1e"),
                                      ("max_map_difference", "max |map diff|", ".1e")]))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "unet": unet_rows, "scores": score_rows}, indent=1))


if __name__ == "__main__":
    main()
