"""How much of the gap to the best test-set setting does label-free tuning close?

For one checkpoint and its dataset, on the test split:
  1. the checkpoint's stored settings (the defaults);
  2. the settings `cgdiff.tune` chooses without labels (synthetic defects on normal training
     images; the test split is never read by it);
  3. an upper bound: the same search, with the same budget, picking by AUPRO on the test split
     itself (what publishing per-class settings chosen on test results amounts to).
Each is recalibrated on the normal training images and evaluated with cgdiff.evaluation
(maps against masks at 256 x 256). Nothing is written into the checkpoint.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/tuning_gap.py \\
        --checkpoint /path/to/ckpt --data /path/to/ROOT/CLASS --minutes 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cgdiff import Detector
from cgdiff.data import load_dataset
from cgdiff.evaluation import evaluate, load_masks
from cgdiff.images import to_uint8
from cgdiff.tune import ValidationSet, training_folder_images, tune

KEYS = ("image_auroc", "pixel_auroc", "aupro", "seconds_per_image")


def test_split_as_validation(detector, dataset) -> ValidationSet:
    """The labelled test split as a 'validation' set: for the upper bound only."""
    size = detector.image_size
    images = np.stack([to_uint8(detector.prepare(s.path).cpu())[0] for s in dataset.test])
    masks, _, _ = load_masks(dataset, list(dataset.test), size)  # an empty mask stops here, naming the files
    if masks is None:
        raise SystemExit(f"the upper bound needs a mask for every defect image: {dataset.no_masks_reason}")
    labels = dataset.test_labels()
    return ValidationSet(images=images, masks=masks, labels=labels, rows=(0, size), source="test split (upper bound)",
                         in_sample=False, normal_paths=[s.path for s in dataset.test if not s.label],
                         kinds=[s.defect_type for s in dataset.test], origins=list(range(len(labels))), seed=0,
                         calibration_paths=training_folder_images(dataset.root))


def measure(detector, dataset, mask_size: int) -> dict:
    r = evaluate(detector, dataset, mask_size=mask_size, per_image=False)
    return {k: r[k] for k in KEYS} | {"sampler": r["sampler"], "scorer": r["scorer"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--minutes", type=float, default=12.0, help="search budget, the same for both searches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-size", type=int, default=256)
    p.add_argument("--json", required=True)
    p.add_argument("--tuned", default=None, metavar="CKPT",
                   help="a copy of --checkpoint tuned by `cgdiff tune --out CKPT` (with --minutes): its settings are "
                        "measured instead of tuning again")
    args = p.parse_args()
    dataset = load_dataset(args.data)
    out: dict = {"checkpoint": args.checkpoint, "data": args.data, "minutes": args.minutes, "seed": args.seed,
                 "mask_size": args.mask_size}

    def log(message: str) -> None:
        print(message, flush=True)

    detector = Detector.from_pretrained(args.checkpoint, device="cpu")
    log(f"defaults: {detector.describe()}")
    out["defaults"] = measure(detector, dataset, args.mask_size)
    log(json.dumps(out["defaults"]))

    if args.tuned:
        detector = Detector.from_pretrained(args.tuned, device="cpu")
        record = detector.info["tuning"]
        out["tuned_checkpoint"] = args.tuned
        out["tuning_seconds"] = record["search"]["seconds"]  # the search (recalibration not included)
    else:
        t = time.perf_counter()
        record = tune(detector, args.data, budget_s=args.minutes * 60, seed=args.seed, log=log).record
        out["tuning_seconds"] = round(time.perf_counter() - t, 1)  # search + recalibration
    out["tuning"] = {k: v for k, v in record.items() if k != "table"}
    out["tuning_table"] = record["table"]
    out["tuned"] = measure(detector, dataset, args.mask_size)
    log(json.dumps(out["tuned"]))

    detector = Detector.from_pretrained(args.checkpoint, device="cpu")
    oracle = tune(detector, budget_s=args.minutes * 60, validation=test_split_as_validation(detector, dataset), log=log)
    out["upper_bound_search"] = {k: v for k, v in oracle.record.items() if k != "table"}
    out["upper_bound_table"] = oracle.record["table"]
    out["upper_bound"] = measure(detector, dataset, args.mask_size)
    log(json.dumps(out["upper_bound"]))

    gaps = {}
    for key in ("aupro", "pixel_auroc"):
        d, tu, ub = out["defaults"][key], out["tuned"][key], out["upper_bound"][key]
        gaps[key] = None if ub - d <= 1e-9 else round((tu - d) / (ub - d), 3)
    out["gap_closed"] = gaps
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    log(f"gap closed: {gaps}; tuning took {out['tuning_seconds']} s")


if __name__ == "__main__":
    main()
