"""Verdicts of the app's default CPU path (channels_last) against the fp32 reference at each
bundled detector's stored threshold, on its examples and its test split:

    python benchmarks/results/threshold/runtime_verdicts.py
"""
from pathlib import Path

from cgdiff import Detector
from cgdiff.runtime import path_options

for name in ("brick", "grass", "gravel"):
    images = sorted(Path(f"checkpoints/{name}/examples").glob("*.png")) + sorted(
        Path(f"data/textures/{name}/test").rglob("*.png"))
    runs = {}
    for runtime in ("reference", "auto"):
        detector = Detector.from_pretrained(name).use_fast_path(**path_options(runtime))
        runs[runtime] = detector.detect(images)
    same = sum(a.is_anomalous == b.is_anomalous for a, b in zip(runs["reference"], runs["auto"]))
    worst = max(abs(a.score - b.score) / a.threshold for a, b in zip(runs["reference"], runs["auto"]))
    closest = min(abs(a.score / a.threshold - 1) for a in runs["reference"])
    print(f"{name}: threshold {detector.threshold:.4g}, verdicts equal on {same} of {len(images)}, "
          f"largest |score difference| / threshold {worst:.1e}, closest score to the threshold {closest:.1%} away")
