"""Draw docs/method.png: the method on one image of a bundled checkpoint, step by step.

    HF_HUB_OFFLINE=1 python docs/make_figures.py [--checkpoint brick] [--image PATH] [--out docs/method.png]

Panels: the input, its partial-diffusion start x_t0, the reconstruction (with a second pass,
the first pass's and the second's), the pixel and the feature distances, the anomaly map (threshold-relative colours, as in the app) and the overlay
with the predicted mask. Everything is computed by cgdiff with the checkpoint's own settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cgdiff import Detector, viz  # noqa: E402
from cgdiff.detector import Detection  # noqa: E402
from cgdiff.images import to_uint8  # noqa: E402
from cgdiff.registry import known_checkpoints  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="brick", help="registry name or folder (default: brick)")
    p.add_argument("--image", default=None, help="image to show (default: the checkpoint's first defect example)")
    p.add_argument("--out", default="docs/method.png")
    args = p.parse_args()

    detector = Detector.from_pretrained(args.checkpoint, device="cpu")
    image = args.image
    if image is None:
        entry = next(e for e in known_checkpoints() if e.name == args.checkpoint)
        image = next(path for path in entry.examples() if "defect" in Path(path).name)

    x = detector.prepare(image)
    steps: list[dict] = []
    s = detector.sampler
    x_first = detector.reconstruct(x, s.replace(repaint_t0=0), trace=steps.append)
    x_rec = detector.reconstruct(x) if s.repaint_t0 else x_first
    d_pixel, d_feat = detector.scorer.distances(x, x_rec)
    amap = detector.score_maps(x, x_rec)[0].float().numpy()
    # The same result `detector.detect` gives, built from the pieces above instead of a second run.
    result = Detection(to_uint8(x)[0], to_uint8(x_rec)[0], amap, float(amap.max()), detector.threshold, 0.0)

    settings = f"K = {s.steps}, w = {s.w:g}, s = {s.guidance_scale:g}" + (f", N = {s.samples}" if s.samples > 1 else "")
    panels = [
        (result.image, "input $y$"),
        (to_uint8(steps[0]["x_t"].clamp(-1, 1))[0], f"start $x_{{t_0}}$, $t_0$ = {s.t0}"),
        *([(to_uint8(x_first)[0], f"first pass\n{settings}"),
           (result.reconstruction, f"second pass: suspect pixels\nre-painted from $t_2$ = {s.repaint_t0}")]
          if s.repaint_t0 else [(result.reconstruction, f"reconstruction\n{settings}")]),
        (d_pixel[0].numpy(), "pixel distance $D_p$"),
        (d_feat[0].numpy(), "feature distance $D_f$"),
        (viz.heatmap(amap, detector.threshold), "anomaly map $A$"),
        (viz.overlay(result.image, amap, detector.threshold), f"score {result.score:.3g} / thr. {result.threshold:.3g}\n{result.verdict}"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.7))
    for ax, (picture, title) in zip(axes, panels):
        ax.imshow(picture, cmap="gray" if np.ndim(picture) == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({Path(image).name}, {detector.describe()})")


if __name__ == "__main__":
    with torch.no_grad():
        main()
