"""Anomaly-map smoothing: validation (label-free) and test metrics against the Gaussian sigma.

For each checkpoint, at its stored sampler settings and pixel/feature balance, the reconstructions
are made once (of the tuner's validation set, seed 0, and of the test split) and scored with the
map smoothed at each sigma (px at the working size); the rest of the method is unchanged. The
validation columns are what `cgdiff tune` sees (synthetic defects on normal training images);
the test columns are for reading, never for choosing.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/map_smoothing.py \\
        --pair brick data/textures/brick --pair grass data/textures/grass --pair gravel data/textures/gravel \\
        --out benchmarks/results/map_smoothing
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cgdiff import Detector
from cgdiff.bench import markdown_table
from cgdiff.data import AnomalyDataset, load_dataset
from cgdiff.evaluation import reconstruct_dataset, score_reconstructions
from cgdiff.tune import _write_validation, validation_set

SIGMAS = (0.0, 1.0, 2.0, 4.0, 8.0)
COLUMNS = [("checkpoint", "checkpoint", ""), ("map_sigma", "map sigma (px)", "g"),
           ("validation_image_auroc", "validation image AUROC", ".3f"), ("validation_aupro", "validation AUPRO", ".3f"),
           ("image_auroc", "test image AUROC", ".3f"), ("pixel_auroc", "test pixel AUROC", ".3f"),
           ("aupro", "test AUPRO", ".3f")]


def sweep(checkpoint: str, data: str, sigmas=SIGMAS) -> list[dict]:
    detector = Detector.from_pretrained(checkpoint)
    vset = validation_set(detector, data)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        samples = _write_validation(vset, Path(tmp))
        vdata = AnomalyDataset(root=Path(tmp), layout="validation", category="validation", train=[], test=samples)
        vrecs = reconstruct_dataset(detector, vdata, mask_size=vset.image_size)
        trecs = reconstruct_dataset(detector, load_dataset(data))
        for sigma in sigmas:
            v = score_reconstructions(detector, vrecs, {"map_sigma": sigma}).metrics
            t = score_reconstructions(detector, trecs, {"map_sigma": sigma}).metrics
            rows.append({"checkpoint": Path(checkpoint).name, "map_sigma": sigma, "stored_map_sigma": detector.scorer.config.map_sigma,
                         "validation_image_auroc": v["image_auroc"], "validation_aupro": v["aupro"],
                         "image_auroc": t["image_auroc"], "pixel_auroc": t["pixel_auroc"], "aupro": t["aupro"],
                         "sampler": detector.sampler.to_dict(), "pixel_weight": detector.scorer.config.pixel_weight})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("CKPT", "DATA"))
    parser.add_argument("--out", type=Path, default=None, help="folder for map_smoothing.json and .md")
    args = parser.parse_args()
    rows = [row for ckpt, data in args.pair for row in sweep(ckpt, data)]
    table = markdown_table(rows, COLUMNS)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "map_smoothing.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "map_smoothing.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
