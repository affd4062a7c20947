"""Two sampling variants measured against the stored settings, with the same denoiser.

Both ask whether the reconstruction, rather than the denoiser, keeps the defects:

- "mean of N reconstructions": the stored settings with `samples` = N (seeds 0 .. N-1, a
  different partial-diffusion noise each, the reconstructions averaged before scoring). It
  removes the sampler's own variance from the map; it cannot remove what every run keeps.
- "two-pass, masked re-start at t2": the stored settings' map marks the suspect pixels
  (m = clip((A / threshold - 0.6) / 0.3, 0, 1), grown by 2 px and blurred by sigma 2 px, with
  the calibrated threshold: no label is read), then a second K-step DDIM run from t2 fills
  them. Outside the mask every step's state is replaced by the input noised to that step, as
  in RePaint (Lugmayr et al., CVPR 2022), so the tile around a defect stays as it is; inside,
  the denoiser runs unconditioned (w = 0, s = 0) from a start noisy enough to hide the defect.
  The map is then scored on the second reconstruction. (Since measured, this is in cgdiff as
  `repaint_t0`; the script calls its `suspect_mask` and `repaint`, masked relative to the
  stored threshold and without a calibration for the second pass.) This is the "inpainting" reference of
  `removal_ceiling.py` with the denoiser as the filler and the first map as the mask.

Test split of `cgdiff build-textures` (removal needs the clean originals), the bundled
checkpoints' stored settings and scorer.

Usage:
    python benchmarks/sampling_variants.py --textures data/textures --out benchmarks/results/sampling_variants
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from cgdiff.data import load_dataset
from cgdiff.detector import Detector
from cgdiff.evaluation import _removal, reconstruct_dataset, score_reconstructions
from cgdiff.sampler import repaint, suspect_mask

KEYS = ("image_auroc", "pixel_auroc", "aupro", "removal", "fidelity")


def measure(name: str, textures: Path, seeds: int, restarts: list[int], steps: int) -> list[dict]:
    detector = Detector.from_pretrained(f"checkpoints/{name}")
    dataset = load_dataset(textures / name)
    samples = list(dataset.test)
    s = detector.sampler
    stored = f"t0={s.t0} K={s.steps} w={s.w:g} s={s.guidance_scale:g}"
    rows = []

    def row(variant: str, recs) -> None:
        metrics = score_reconstructions(detector, recs).metrics
        rows.append({"checkpoint": name, "variant": variant, **{k: metrics[k] for k in KEYS}})
        print(rows[-1], flush=True)

    first = reconstruct_dataset(detector, dataset)
    row(f"stored ({stored})", first)
    for n in sorted({2, seeds} - {1}):
        row(f"mean of {n} reconstructions (samples = {n})", reconstruct_dataset(detector, dataset, s.replace(samples=n)))

    m = suspect_mask(torch.from_numpy(score_reconstructions(detector, first).maps) / detector.threshold)
    for t2 in restarts:
        second = s.replace(repaint_t0=t2, repaint_steps=steps, seed=0)
        rec = torch.cat([repaint(detector._eps, first.inputs[b:b + 8], m[b:b + 8], detector.alphas_cumprod, second)
                         for b in range(0, len(first), 8)])
        row(f"two-pass, masked re-start at t2 = {t2} (K = {steps})", dataclasses.replace(
            first, reconstructions=rec, removal=_removal(detector, dataset, samples, first.inputs, rec),
            _distances={}))
    rows[-1]["mask_fraction"] = float((m > 0.5).float().mean())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", type=Path, default=Path("data/textures"), help="cgdiff build-textures output")
    parser.add_argument("--names", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--seeds", type=int, default=4, help="largest N averaged (2 and N are measured)")
    parser.add_argument("--restarts", type=int, nargs="+", default=[400, 600], help="t2 of the masked re-start")
    parser.add_argument("--steps", type=int, default=8, help="K of the masked re-start")
    parser.add_argument("--out", type=Path, default=None, help="folder for variants.json and variants.md")
    args = parser.parse_args()
    rows = [r for name in args.names for r in measure(name, args.textures, args.seeds, args.restarts, args.steps)]
    lines = ["| checkpoint | variant | image AUROC | pixel AUROC | AUPRO | removal | fidelity |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {r['variant']} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "variants.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "variants.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
