"""Quality against training steps: evaluate snapshots of training runs on a test split.

    python benchmarks/learning_curve.py --data data/textures/grass \
        --run "constant LR" runs/curve/snap/const_20 runs/curve/snap/const_40 ... \
        --run "cosine LR" runs/curve/grass_cosine --out benchmarks/results/learning_curve \
        [--reuse benchmarks/results/learning_curve/curve.json]

Each snapshot is a checkpoint folder (`cgdiff train` output). Every snapshot is evaluated twice
with `cgdiff.evaluation.evaluate`, the code behind `cgdiff evaluate`: once at its stored
settings (the detector as shipped), and once with the conditioning switched off (w = 0), where
the reconstruction is the denoiser's alone, so removal there follows the denoiser's quality. The
output is one row per snapshot and setting: training steps, training seconds as the run recorded
them, image AUROC, pixel AUROC, AUPRO, removal and fidelity, in a Markdown table, `curve.json`
and `curve.png`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cgdiff import Detector
from cgdiff.bench import markdown_table
from cgdiff.data import load_dataset
from cgdiff.evaluation import evaluate

METRICS = (("image_auroc", "image AUROC"), ("aupro", "AUPRO"), ("removal", "removal"))
COLUMNS = [("run", "run", ""), ("setting", "setting", ""), ("steps", "steps", ""),
           ("training_minutes", "training min (as recorded)", ".1f"), ("image_auroc", "image AUROC", ".3f"),
           ("pixel_auroc", "pixel AUROC", ".3f"), ("aupro", "AUPRO", ".3f"), ("removal", "removal", ".3f"),
           ("fidelity", "fidelity", ".4f")]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for ax, (key, label) in zip(axes, METRICS):
        for i, (run, setting) in enumerate(dict.fromkeys((r["run"], r["setting"]) for r in rows)):
            sub = sorted((r for r in rows if (r["run"], r["setting"]) == (run, setting) and r[key] is not None),
                         key=lambda r: r["steps"])
            style = "o^sv"[i // 2 % 4] + ("-" if setting == "stored settings" else "--")
            ax.plot([r["steps"] for r in sub], [r[key] for r in sub], style, label=f"{run}, {setting}")
        ax.set_xlabel("training steps")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder of the category the runs trained on")
    parser.add_argument("--run", nargs="+", action="append", required=True, metavar=("LABEL", "CKPT"),
                        help="a label and the run's snapshot folders; repeatable")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", type=Path, action="append", default=[], metavar="CURVE_JSON",
                        help="a curve.json of an earlier run: its rows of the same snapshot (folder and steps) "
                        "and setting are taken instead of evaluated again; repeatable")
    args = parser.parse_args()
    if any(len(run) < 2 for run in args.run):
        parser.error("each --run needs a label and at least one checkpoint folder")
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    done = {(r["checkpoint"], r["steps"], r["setting"]): r
            for path in args.reuse for r in json.loads(path.read_text())["rows"]}
    rows = []
    for label, *snapshots in args.run:
        for folder in snapshots:
            detector = Detector.from_pretrained(folder, device="cpu")
            training = detector.info.get("training") or {}
            for setting, overrides in (("stored settings", {}), ("w = 0", {"w": 0.0})):
                earlier = done.get((str(folder), training.get("steps"), setting))
                if earlier is not None:
                    rows.append({**earlier, "run": label})
                    print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1] + "  (reused)", flush=True)
                    continue
                r = evaluate(detector, dataset, per_image=False, **overrides)
                rows.append({"run": label, "setting": setting, "checkpoint": str(folder),
                             "steps": training.get("steps"), "training_minutes": (training.get("seconds") or 0) / 60,
                             **{k: r[k] for k in ("image_auroc", "pixel_auroc", "aupro", "removal", "fidelity")},
                             "sampler": r["sampler"]})
                print(markdown_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps({"data": str(args.data), "rows": rows}, indent=1))
    plot(rows, args.out / "curve.png", f"{dataset.category}, test split ({len(dataset.test)} images)")
    table = markdown_table(rows, COLUMNS)
    (args.out / "curve.md").write_text(table + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
