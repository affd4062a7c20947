"""The bundled detectors with and without the second pass (`--repaint-t0`), calibrated for it.

For each texture and each t2: the bundled checkpoint's settings with `repaint_t0` = t2 (K2 = 8),
recalibrated as `cgdiff calibrate` does (c and the mask's threshold from the first pass on the
calibration normals, the threshold by the validation-F1 rule; no test image read), then
evaluated on the test split of `cgdiff build-textures` (removal needs the clean originals) and
run on the bundled examples (the verdict each gets). t2 = 0: no second pass; the row of the
t2 a checkpoint ships with is that checkpoint as it is.
Writes a table (stdout and table.md), the JSON of every evaluation, and a picture per texture
of its bundled defect examples: input, reconstruction without and with the second pass, the
clean original.

Usage:
    python benchmarks/second_pass.py --textures data/textures --out benchmarks/results/second_pass
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cgdiff.data import load_dataset
from cgdiff.detector import Detector
from cgdiff.evaluation import evaluate
from cgdiff.images import load_image
from cgdiff.tune import recalibrate

KEYS = ("image_auroc", "pixel_auroc", "aupro", "removal", "fidelity", "seconds_per_image")


def examples(detector: Detector, folder: Path) -> tuple[int, int, list[str], list]:
    paths = sorted(folder.glob("*.png"))
    results = detector.detect(paths)
    wrong = [p.name for p, r in zip(paths, results) if r.is_anomalous != p.name.startswith("defect_")]
    return len(paths) - len(wrong), len(paths), wrong, list(zip(paths, results))


def picture(texture: str, rows: dict[int, list], folder: Path, out: Path) -> None:
    """Input | each t2's reconstruction | clean original, one row per defect example."""
    from PIL import Image, ImageDraw

    t2s = list(rows)
    defects = [(p, i) for i, (p, _) in enumerate(rows[t2s[0]]) if p.name.startswith("defect_")]
    size = rows[t2s[0]][0][1].image.shape[0]
    header = ["input"] + [("one pass" if t == 0 else f"second pass t2={t}") for t in t2s] + ["clean original"]
    canvas = Image.new("RGB", (size * len(header), 14 + size * len(defects)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(header):
        draw.text((j * size + 2, 1), title, fill="black")
    for r, (path, i) in enumerate(defects):
        tiles = [rows[t2s[0]][i][1].image] + [rows[t][i][1].reconstruction for t in t2s]
        clean = folder / "clean" / path.name
        tiles.append(np.asarray(load_image(clean).resize((size, size))) if clean.is_file() else tiles[0] * 0 + 255)
        for j, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (j * size, 14 + r * size))
    canvas.save(out / f"{texture}_examples.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--textures", type=Path, default=Path("data/textures"))
    parser.add_argument("--names", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--t2", type=int, nargs="+", default=[400, 600])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| texture | t2 | image AUROC | pixel AUROC | AUPRO | removal | fidelity | s / image (eval) "
             "| threshold | mask threshold | examples right |", "|---" * 11 + "|"]
    print("\n".join(lines), flush=True)
    for name in args.names:
        dataset = load_dataset(args.textures / name)
        rows = {}
        for t2 in [0] + args.t2:
            detector = Detector.from_pretrained(f"checkpoints/{name}", device="cpu")
            bundled = detector.sampler.repaint_t0 == t2
            if not bundled:
                detector.sampler = detector.sampler.replace(repaint_t0=t2)
                recalibrate(detector, args.textures / name)
            result = evaluate(detector, dataset)
            right, total, wrong, judged = examples(detector, Path(f"checkpoints/{name}/examples"))
            rows[t2] = judged
            cal = detector.calibration
            result.update(examples_right=right, examples=total, examples_wrong=wrong, threshold=cal.threshold,
                          mask_threshold=cal.mask_threshold, sampler=detector.sampler.to_dict())
            (args.out / f"{name}_t2_{t2}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
            mask = f"{cal.mask_threshold:.4g}" if cal.mask_threshold else "n/a"
            line = (f"| {name} | {t2 or 'none'}{' (as bundled)' if bundled else ''} | " + " | ".join(
                f"{result[k]:.3f}" if k != "fidelity" else f"{result[k]:.4f}" for k in KEYS)
                    + f" | {cal.threshold:.4g} | {mask} | {right} / {total}"
                    + (f" ({', '.join(wrong)} wrong)" if wrong else "") + " |")
            lines.append(line)
            print(line, flush=True)
        picture(name, rows, Path(f"checkpoints/{name}/examples"), args.out)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
