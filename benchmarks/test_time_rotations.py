"""Averaged reconstructions from turned inputs instead of new start noise.

The grass and gravel detectors average N = 4 reconstructions, each from its own start noise
(`SamplerConfig.samples`). Both denoisers were trained on crops turned by multiples of 90
degrees (`cgdiff train --rotations`), so the same four runs can each denoise the input turned
by k x 90 degrees (k = 0..3, seed + k) and be turned back before they are averaged: the same
U-Net evaluations, with each run's errors tied to another orientation of the texture. A
denoiser that has learned its texture unevenly across orientations leaves less of that in the
mean ("test-time augmentation"). On the test split of each texture, at the bundled detector's
stored settings and scorer:
- "stored": the detector as it ships (N runs from N start noises);
- "turned": the same number of runs, run k on the input turned k x 90 degrees (seed + k), each
  turned back, then averaged (N a multiple of 4: N / 4 runs per turn, seeds as stored);
- "turned, 4 x N": every one of the 4 turns runs the stored N start noises, 16 runs averaged for
  N = 4 (four times the U-Net evaluations): does more averaging help at all.
With a second pass stored (brick), each turn runs both passes, as `Detector.reconstruct` does.
The metrics need no threshold, so no recalibration is made.

Usage (alone on the machine: about 3 minutes per texture for the first two rows):
    python benchmarks/test_time_rotations.py --names grass gravel brick --out benchmarks/results/test_time_rotations
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from cgdiff.data import load_dataset
from cgdiff.detector import Detector
from cgdiff.evaluation import _removal, reconstruct_dataset, score_reconstructions

VARIANTS = ("stored", "turned", "turned, 4 x N")


def turned(detector: Detector, inputs: torch.Tensor, runs_per_turn: int, batch: int = 4) -> torch.Tensor:
    """The mean of 4 x `runs_per_turn` reconstructions: for each turn k, the input turned k x 90
    degrees reconstructed with `runs_per_turn` averaged runs (seeds seed + k * runs_per_turn ..),
    turned back. inputs: B x 3 x S x S in [-1, 1]; returns the same shape."""
    total = torch.zeros_like(inputs)
    for k in range(4):
        sampler = detector.sampler.replace(samples=runs_per_turn, seed=detector.sampler.seed + k * runs_per_turn)
        for i in range(0, len(inputs), batch):
            x = torch.rot90(inputs[i:i + batch], k, dims=(-2, -1))
            with torch.no_grad():
                rec = detector.reconstruct(x.to(detector.device), sampler).cpu()
            total[i:i + batch] += torch.rot90(rec, -k, dims=(-2, -1))
    return total / 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", type=Path, default=Path("data/textures"))
    parser.add_argument("--names", nargs="+", default=["grass", "gravel"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:2]))
    parser.add_argument("--out", type=Path, default=None, help="also write the table to OUT/table.md")
    args = parser.parse_args()
    lines = ["| texture | reconstruction | runs averaged | image AUROC | pixel AUROC | AUPRO | removal | fidelity |",
             "|---" * 8 + "|"]
    print("\n".join(lines), flush=True)
    for name in args.names:
        dataset = load_dataset(args.textures / name)
        detector = Detector.from_pretrained(f"checkpoints/{name}", device="cpu")
        stored = reconstruct_dataset(detector, dataset)
        n = detector.sampler.samples
        samples = list(dataset.test)
        for variant in args.variants:
            if variant == "stored":
                recs, runs = stored, n
            else:
                if variant == "turned" and n % 4:
                    print(f"| {name} | {variant} | skipped: N = {n} is not a multiple of 4 |", flush=True)
                    continue
                per_turn = n // 4 if variant == "turned" else n
                rec = turned(detector, stored.inputs, per_turn)
                recs = dataclasses.replace(stored, reconstructions=rec, _distances={})
                recs.removal = _removal(detector, dataset, samples, recs.inputs, rec)
                runs = 4 * per_turn
            m = score_reconstructions(detector, recs).metrics
            lines.append(f"| {name} | {variant} | {runs} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                         f"{m['aupro']:.3f} | {m['removal']:.3f} | {m['fidelity']:.4f} |")
            print(lines[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
