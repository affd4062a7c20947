"""The N runs of an averaged reconstruction in shared U-Net calls against one after another.

With `samples` = N > 1 the sampler batches the N runs of an image into the same U-Net calls
(`cgdiff.sampler.MAX_BATCH_PIXELS` bounds the rows x height x width of a call). This measures
what that buys, alone on the machine, the two ways interleaved round by round so that a
machine that drifts faster or slower drifts for both:

- U-Net milliseconds per call and per row at 1, 2, 4 and 8 rows (a checkpoint's U-Net, the
  app's path, 128 and 256 px);
- the app's latency (`Detector.detect` on one image per call, every bundled example) of each
  bundled checkpoint that averages (N > 1) at its stored settings, batched and sequential
  (MAX_BATCH_PIXELS = 0: one run per call), with the largest score difference between the two
  relative to the threshold and whether every verdict is the same.

Usage:
    python benchmarks/batched_runs.py --out benchmarks/results/batched_runs
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from pathlib import Path

import torch

import cgdiff.sampler as sampler
from cgdiff.detector import Detector
from cgdiff.registry import checkpoints_dir
from cgdiff.runtime import describe_path, keep_freed_memory, path_options


def unet_rows(detector: Detector, sizes=(128, 256), rows=(1, 2, 4, 8), calls: int = 10) -> list[dict]:
    out = []
    t = torch.tensor([200])
    with torch.no_grad():
        for size in sizes:
            for b in rows:
                x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
                for _ in range(2):
                    detector._eps(x, t.repeat(b))
                start = time.perf_counter()
                for _ in range(calls):
                    detector._eps(x, t.repeat(b))
                ms = 1e3 * (time.perf_counter() - start) / calls
                out.append({"image_size": size, "rows": b, "ms_per_call": ms, "ms_per_row": ms / b})
    return out


def app_latency(detector: Detector, files: list[str], rounds: int) -> dict:
    batched_limit = sampler.MAX_BATCH_PIXELS
    times = {"batched": [], "sequential": []}
    scores = {}
    detector.detect(files[0])  # warm-up
    try:
        for _ in range(rounds):
            for mode, limit in (("batched", batched_limit), ("sequential", 0)):
                sampler.MAX_BATCH_PIXELS = limit
                start = time.perf_counter()
                results = [detector.detect(f)[0] for f in files]
                times[mode].append((time.perf_counter() - start) / len(files))
                scores[mode] = results
    finally:
        sampler.MAX_BATCH_PIXELS = batched_limit
    a, b = scores["batched"], scores["sequential"]
    return {
        "median_s_per_image_batched": statistics.median(times["batched"]),
        "median_s_per_image_sequential": statistics.median(times["sequential"]),
        "ratio": statistics.median(times["batched"]) / statistics.median(times["sequential"]),
        "rounds": rounds, "times": times,
        "max_score_difference_rel_threshold": max(abs(x.score - y.score) for x, y in zip(a, b)) / detector.threshold,
        "verdicts_same": all(x.verdict == y.verdict for x, y in zip(a, b)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args()
    keep_freed_memory()  # as the app and the CLI
    lines, record = [], {"unet": None, "app": {}}
    for name in args.names:
        detector = Detector.from_pretrained(checkpoints_dir() / name)
        detector.use_fast_path(**path_options("auto", detector.device))
        if record["unet"] is None:
            record["unet"] = unet_rows(detector)
            lines += [f"U-Net of {name} ({describe_path(detector.fast_path())}), one call on `rows` images:", "",
                      "| px | rows | ms / call | ms / row | / one row |", "|---|---|---|---|---|"]
            one = {r["image_size"]: r["ms_per_row"] for r in record["unet"] if r["rows"] == 1}
            lines += [f"| {r['image_size']} | {r['rows']} | {r['ms_per_call']:.1f} | {r['ms_per_row']:.1f} | "
                      f"{r['ms_per_row'] / one[r['image_size']]:.2f} |" for r in record["unet"]]
        if detector.sampler.samples == 1:
            continue
        files = sorted(glob.glob(str(checkpoints_dir() / name / "examples" / "*.png")))
        r = app_latency(detector, files, args.rounds)
        record["app"][name] = {"samples": detector.sampler.samples, "model_calls": detector.sampler.model_calls(), **r}
    lines += ["", f"App latency (one image per call, {args.rounds} interleaved rounds, medians):", "",
              "| checkpoint | N | U-Net evaluations | s / image batched | s / image sequential | batched / sequential "
              "| max score diff / threshold | same verdicts |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['samples']} | {r['model_calls']} | {r['median_s_per_image_batched']:.3f} | "
              f"{r['median_s_per_image_sequential']:.3f} | {r['ratio']:.2f} | {r['max_score_difference_rel_threshold']:.1e} | "
              f"{'yes' if r['verdicts_same'] else 'no'} |" for n, r in record["app"].items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(record, indent=2))
        (args.out / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
