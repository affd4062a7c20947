"""Where does the second pass lose AUPRO? Other ways to put its reconstruction together, and
other masks.

On the test split of each texture, the bundled detector's first reconstruction, its anomaly
maps A1 and the suspect mask m drawn from them (relative to the mask threshold the detector
would use, `cgdiff.detector._mask_threshold`), then the second pass from each t2 as:
- "y-start": `cgdiff.sampler.repaint` of the input y, as cgdiff runs it (y outside the mask);
- "y-start, rec1 outside": the same, with the first reconstruction in place of y outside the
  mask, m * rec2 + (1 - m) * rec1: the map then keeps A1 where the mask missed a defect;
- "rec1-start": `repaint` of the first reconstruction instead of y;
- "mask not grown or blurred": cgdiff's y-start with the mask's ramp alone (0.6 to 0.9 times the
  threshold), without growing it by 2 px and blurring it by 2 px;
- "mask ramp 0.8-1.0": cgdiff's y-start with the ramp moved up (grown and blurred as in cgdiff);
- "fill-start": cgdiff's y-start, but noised from y with the masked pixels first filled from the
  surroundings (a normalised Gaussian convolution of y weighted by 1 - m, sigma `--fill-sigma`
  px; y itself kept outside the mask), so that the dark low frequencies of a hole are not what
  the second pass starts from;
- "y-start, mean of N" and "fill-start, mean of N": the same two runs made from N start noises
  (seeds seed to seed + N - 1, N = `--fills`) and averaged, as `samples` = N averages the first
  pass: new grain that differs from run to run averages towards the local mean, which the
  removal measure charges less than a single sample of grain ("How much removal a
  reconstruction can reach" in BENCHMARKS.md). N times the second pass's U-Net calls;
- "y-start, resampled": cgdiff's y-start with RePaint's resampling (Lugmayr et al., CVPR 2022,
  Algorithm 1, jump length one DDIM step): every step but the last is run `--resample` = r times,
  the result noised back to the step's level between runs, so that the fill can settle with
  the pixels kept around it; r times the second pass's U-Net calls (less the last step's);
- "fill alone (no denoiser)": the filled y of "fill-start" itself as the reconstruction, the
  reference any second pass should beat: a smooth fill from the surroundings, no new grain;
- "clean inside the mask (oracle)": m * clean + (1 - m) * y, with each defect tile's clean
  original (y itself for the normal tiles): the most removal any second pass with this mask
  can reach, as what the mask leaves out stays in the reconstruction.
`--k2` sets the second pass's steps K2 (default: the detector's stored `repaint_steps`); K2 = 1
is the denoiser's one-step estimate of the clean image from t2 (its posterior mean, smoother
than a K2-step sample, at one U-Net call).
Each is scored with the detector's stored scorer settings (and with `--also-pixel`, again with
the pixel distance alone, as `cgdiff bench`'s "pixel" method does: the same reconstructions, so
the second pass's mask still comes from the stored, combined first map; a detector stored with
`--feature-weight 0` would draw it from the pixel map). The metrics need no threshold, so no
recalibration is made; removal is measured on the reconstruction as put together.

Usage:
    python benchmarks/second_pass_variants.py --textures data/textures --names grass gravel --t2 400 800
    python benchmarks/second_pass_variants.py --names grass gravel --t2 400 600 --variants y-start fill-start
    python benchmarks/second_pass_variants.py --names brick grass gravel --t2 400 600 --fills 4 \
        --variants y-start "y-start, mean of N" fill-start "fill-start, mean of N"
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from cgdiff.bench import ablation_overrides
from cgdiff.data import load_dataset
from cgdiff.detector import Detector, _mask_threshold
from cgdiff.evaluation import _removal, reconstruct_dataset, score_reconstructions
from cgdiff.sampler import gaussian_blur, repaint, suspect_mask, timesteps

VARIANTS = ("y-start", "y-start, rec1 outside", "rec1-start", "mask not grown or blurred", "mask ramp 0.8-1.0",
            "fill-start", "y-start, mean of N", "fill-start, mean of N", "fill alone (no denoiser)",
            "clean inside the mask (oracle)", "y-start, resampled")

NO_SECOND_PASS = ("fill alone (no denoiser)", "clean inside the mask (oracle)")  # references, no t2


def filled(y: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """y (B x 3 x H x W) with the pixels of `mask` (B x 1 x H x W in [0, 1]) replaced by a
    normalised Gaussian convolution of the pixels outside it (Knutsson and Westin, 1993):
    blur(y (1 - m)) / blur(1 - m), the image's mean outside the mask where that weight vanishes."""
    keep = 1 - mask
    num, den = gaussian_blur(y * keep, sigma), gaussian_blur(keep, sigma)
    mean = (y * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1e-6)
    fill = torch.where(den > 1e-3, num / den.clamp_min(1e-3), mean)
    return mask * fill + keep * y


@torch.no_grad()
def repaint_resampled(eps_model, y, mask, alphas_cumprod, config, r: int) -> torch.Tensor:
    """`cgdiff.sampler.repaint` (y-start) with RePaint's resampling: each step t -> n but the
    last is repeated r times, x_n noised back to t (x_t = sqrt(abar_t / abar_n) x_n +
    sqrt(1 - abar_t / abar_n) z') between the repeats; the pixels outside the mask are the input
    noised to each level, as in `repaint`. Seeded by config.seed (one generator per call, so a
    batch's noise depends on the batch: a benchmark's shortcut). B x 3 x H x W in [-1, 1]."""
    abar = alphas_cumprod.to(dtype=torch.float64)
    g = torch.Generator().manual_seed(config.seed)
    z = torch.randn(y.shape, generator=g)
    schedule = timesteps(config.repaint_t0, config.repaint_steps, abar.shape[0])
    a2 = abar[schedule[0]].item()
    x = a2 ** 0.5 * y + (1 - a2) ** 0.5 * z
    for i, t in enumerate(schedule):
        a_t = abar[t].item()
        last = i + 1 == len(schedule)
        a_n = 1.0 if last else abar[schedule[i + 1]].item()
        repeats = 1 if last else r
        for u in range(repeats):
            e = eps_model(x, torch.full((y.shape[0],), t, dtype=torch.long))
            x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
            x_n = a_n ** 0.5 * x0 + (1 - a_n) ** 0.5 * e
            x_n = mask * x_n + (1 - mask) * (a_n ** 0.5 * y + (1 - a_n) ** 0.5 * z)
            if u + 1 < repeats:  # back to t for the next repeat
                x = (a_t / a_n) ** 0.5 * x_n + (1 - a_t / a_n) ** 0.5 * torch.randn(y.shape, generator=g)
            else:
                x = x_n
    return x.clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", type=Path, default=Path("data/textures"))
    parser.add_argument("--names", nargs="+", default=["grass", "gravel"])
    parser.add_argument("--t2", type=int, nargs="+", default=[400, 800])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--fill-sigma", type=float, default=8.0, help="px at the working size, for fill-start")
    parser.add_argument("--fills", type=int, default=4, help="N, the runs averaged by the 'mean of N' variants")
    parser.add_argument("--k2", type=int, default=None, help="the second pass's steps K2 (default: the stored ones)")
    parser.add_argument("--resample", type=int, default=4, help="r, the repeats per step of 'y-start, resampled'")
    parser.add_argument("--also-pixel", action="store_true", help="also score every row with the pixel distance alone")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to OUT/table.md")
    args = parser.parse_args()
    if not args.fill_sigma > 0:
        parser.error(f"--fill-sigma must be > 0 px, got {args.fill_sigma}")
    if args.fills < 1:
        parser.error(f"--fills must be at least 1, got {args.fills}")
    if args.resample < 1:
        parser.error(f"--resample must be at least 1, got {args.resample}")
    if args.k2 is not None and args.k2 < 1:
        parser.error(f"--k2 must be at least 1, got {args.k2}")
    lines = ["| texture | second pass | image AUROC | pixel AUROC | AUPRO | removal | fidelity |", "|---" * 7 + "|"]
    print("\n".join(lines), flush=True)

    def row(name, tag, detector, recs):
        scorers = [("", None)] + ([(", pixel distance only", ablation_overrides(detector)["pixel"])]
                                  if args.also_pixel else [])
        for suffix, scorer in scorers:
            m = score_reconstructions(detector, recs, scorer).metrics
            lines.append(f"| {name} | {tag}{suffix} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
                         f"{m['aupro']:.3f} | {m['removal']:.3f} | {m['fidelity']:.4f} |")
            print(lines[-1], flush=True)

    for name in args.names:
        dataset = load_dataset(args.textures / name)
        detector = Detector.from_pretrained(f"checkpoints/{name}", device="cpu")
        first = reconstruct_dataset(detector, dataset, detector.sampler.replace(repaint_t0=0))
        row(name, "none (first pass)", detector, first)
        relative = torch.as_tensor(score_reconstructions(detector, first).maps) / _mask_threshold(detector.calibration)
        mask = suspect_mask(relative)
        samples = list(dataset.test)
        cleans = torch.stack([detector.prepare([s.clean_path]).float().cpu()[0] if s.clean_path else first.inputs[i]
                              for i, s in enumerate(samples)])
        starts = {"y": None, "filled": filled(first.inputs, mask, args.fill_sigma)}  # what the second pass noises
        for t2 in args.t2:
            config = detector.sampler.replace(repaint_t0=t2, repaint_steps=args.k2 or detector.sampler.repaint_steps)

            def second(y, m=mask, start=None, seed=0):
                run = config.replace(seed=config.seed + seed)
                return torch.cat([repaint(detector._eps, y[i:i + 8], m[i:i + 8], detector.alphas_cumprod, run,
                                          start=None if start is None else start[i:i + 8])
                                  for i in range(0, len(first), 8)])

            runs = {}  # (start, k) -> the second pass from start noise k, shared by the variants

            def fill(start: str, k: int = 0) -> torch.Tensor:
                if (start, k) not in runs:
                    runs[start, k] = second(first.inputs, seed=k, start=starts[start])
                return runs[start, k]

            def mean_of_fills(start: str) -> torch.Tensor:
                return torch.stack([fill(start, k) for k in range(args.fills)]).mean(0)

            made = {
                "y-start": lambda: fill("y"),
                "y-start, rec1 outside": lambda: mask * fill("y") + (1 - mask) * first.reconstructions,
                "rec1-start": lambda: second(first.reconstructions),
                "mask not grown or blurred": lambda: second(first.inputs, suspect_mask(relative, grow=0, sigma=0)),
                "mask ramp 0.8-1.0": lambda: second(first.inputs, suspect_mask(relative, low=0.8, high=1.0)),
                "fill-start": lambda: fill("filled"),
                "y-start, mean of N": lambda: mean_of_fills("y"),
                "fill-start, mean of N": lambda: mean_of_fills("filled"),
                "fill alone (no denoiser)": lambda: starts["filled"],
                "y-start, resampled": lambda: torch.cat([
                    repaint_resampled(detector._eps, first.inputs[i:i + 8], mask[i:i + 8], detector.alphas_cumprod,
                                      config, args.resample) for i in range(0, len(first), 8)]),
                "clean inside the mask (oracle)": lambda: mask * cleans + (1 - mask) * first.inputs,
            }
            for variant in args.variants:
                if variant in NO_SECOND_PASS:
                    if t2 != args.t2[0]:
                        continue  # the same at every t2
                    tag = variant
                else:
                    k2 = f", K2={config.repaint_steps}" if args.k2 else ""
                    name_r = variant.replace(" N", f" {args.fills}").replace("resampled", f"resampled r={args.resample}")
                    tag = f"t2={t2}{k2}, {name_r}"
                rec = made[variant]()
                recs = dataclasses.replace(first, reconstructions=rec, _distances={})
                recs.removal = _removal(detector, dataset, samples, recs.inputs, rec)
                row(name, tag, detector, recs)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
