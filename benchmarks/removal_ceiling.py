"""What removal a reconstruction can reach on a stochastic texture, measured without any model.

The removal measure (cgdiff.metrics.removal) compares the reconstruction with the *exact* clean
tile inside each defect: 1 - mean_D |rec - clean| / mean_D |input - clean|. A reconstruction
that replaces a defect with texture that is normal but not the very grain that was there
before is charged for the difference. This script puts numbers on that, per texture, on the
test split of `cgdiff build-textures` (the defect tiles and their clean originals), with
reconstructions that no denoiser made:

- "another normal tile": the reconstruction is a different normal test tile of the same
  texture (texture of the right kind, wrong grain): the removal a perfect generator of new
  normal texture would get if it ignored the input. Averaged over every normal tile.
- "clean, blurred (sigma)": the clean tile blurred by a Gaussian of that sigma (px): the
  defect gone exactly, the grain finer than sigma lost.
- "inpainted from the surroundings": the defect pixels filled from the pixels around them
  (scikit-image's biharmonic inpainting, told the mask, never the clean tile), everything
  else left as it is: a reconstruction that knows where the defect is but, like any
  reconstruction, not which grain lay beneath it.

Each row is also broken down by defect kind (the mean of the per-tile values, as `cgdiff
evaluate` reports them per image): a colour shift or a scratch leaves the grain below visible,
a hole or a foreign texture replaces it.

Usage:
    python benchmarks/removal_ceiling.py --textures data/textures --out benchmarks/results/removal_ceiling
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from skimage.restoration import inpaint_biharmonic

from cgdiff.data import load_dataset
from cgdiff.images import load_mask
from cgdiff.metrics import removal

SIGMAS = (1.0, 2.0, 4.0)


def _pixels(path: Path, size: int, blur: float = 0.0) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255.0


def ceiling(folder: Path) -> dict:
    dataset = load_dataset(folder, validate=False)
    defects = [s for s in dataset.test if s.label and s.clean_path is not None and s.mask_path is not None]
    normals = [s for s in dataset.test if not s.label]
    if not defects or not normals:
        raise SystemExit(f"{folder}: needs defect tiles with clean originals and normal tiles in its test split.")
    size = Image.open(defects[0].path).size[0]
    x = np.stack([_pixels(s.path, size) for s in defects])
    c = np.stack([_pixels(s.clean_path, size) for s in defects])
    m = np.stack([np.asarray(Image.fromarray(load_mask(s.mask_path)).resize((size, size), Image.Resampling.NEAREST))
                  for s in defects])
    kinds = sorted({s.defect_type for s in defects})

    def by_kind(rec: np.ndarray) -> dict[str, float]:
        return {k: removal(x[sel], rec[sel], c[sel], m[sel])["removal_mean"]
                for k in kinds for sel in [np.array([s.defect_type == k for s in defects])]}

    rows = []
    other_recs = [np.broadcast_to(_pixels(n.path, size), x.shape) for n in normals]
    others = [removal(x, o, c, m) for o in other_recs]
    other_kinds = [by_kind(o) for o in other_recs]
    rows.append({"reconstruction": "another normal tile (mean over %d)" % len(normals),
                 "removal": float(np.mean([o["removal"] for o in others])),
                 "removal_min": float(np.min([o["removal"] for o in others])),
                 "removal_max": float(np.max([o["removal"] for o in others])),
                 "fidelity": float(np.mean([o["fidelity"] for o in others])),
                 "by_kind": {k: float(np.mean([o[k] for o in other_kinds])) for k in kinds}})
    for sigma in SIGMAS:
        rec = np.stack([_pixels(s.clean_path, size, sigma) for s in defects])
        r = removal(x, rec, c, m)
        rows.append({"reconstruction": f"clean, blurred (sigma {sigma:g} px)", "removal": r["removal"],
                     "fidelity": r["fidelity"], "by_kind": by_kind(rec)})
    inpainted = np.stack([inpaint_biharmonic(img, mask != 0, channel_axis=0) if (mask != 0).any() else img
                          for img, mask in zip(x, m)])
    r = removal(x, inpainted, c, m)
    rows.append({"reconstruction": "inpainted from the surroundings (biharmonic)", "removal": r["removal"],
                 "fidelity": r["fidelity"], "by_kind": by_kind(inpainted)})
    return {"texture": dataset.category, "n_defect_tiles": len(defects), "n_normal_tiles": len(normals),
            "size": size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", type=Path, default=Path("data/textures"), help="cgdiff build-textures output")
    parser.add_argument("--names", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--out", type=Path, default=None, help="folder for ceiling.json and ceiling.md")
    args = parser.parse_args()
    results = [ceiling(args.textures / name) for name in args.names]
    kinds = sorted({k for res in results for row in res["rows"] for k in row["by_kind"]})
    lines = ["| texture | reconstruction | removal | " + " | ".join(kinds) + " | fidelity outside |",
             "|---|---|---|" + "---|" * len(kinds) + "---|"]
    for res in results:
        for row in res["rows"]:
            spread = (f" ({row['removal_min']:.2f} to {row['removal_max']:.2f})" if "removal_min" in row else "")
            per_kind = " | ".join(f"{row['by_kind'][k]:.2f}" if k in row["by_kind"] else "n/a" for k in kinds)
            lines.append(f"| {res['texture']} | {row['reconstruction']} | {row['removal']:.3f}{spread} | "
                         f"{per_kind} | {row['fidelity']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ceiling.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "ceiling.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
