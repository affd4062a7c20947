#!/bin/bash
# The bundled brick detector since it was replaced by the clean-holdout run continued to 8400
# steps (`brick_tiles.sh 8400`, bundled with scripts/bundle_checkpoint.py): the test split with
# and without its second pass, one strategy or term switched off, and its latency in the app.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results/holdout/brick_bundled
mkdir -p $out
cgdiff evaluate --checkpoint checkpoints/brick --data data/textures/brick --repaint-t0 0 --json $out/one_pass.json --overwrite --no-progress > $out/one_pass.txt 2>&1
cgdiff bench --quality --pair checkpoints/brick data/textures/brick --methods full s0 pixel patchcore --out $out/quality --overwrite --no-progress > /dev/null 2>&1
cgdiff bench --speed --no-sweeps --no-paper-scale --no-fast-path --checkpoint checkpoints/brick --repeats 3 --out $out/speed --overwrite --no-progress > /dev/null 2>&1
# The paper's defaults on the same denoiser (t0 250, K 10, w 3, s 0.5, v 1, map sigma 4, one pass),
# recalibrated at those settings on the held-out tiles as `cgdiff train` calibrates: the README's
# "paper defaults" column.
python - > $out/paper_defaults.txt 2>&1 <<'PY'
import json
from cgdiff import Detector
from cgdiff.data import load_dataset
from cgdiff.evaluation import evaluate
from cgdiff.sampler import SamplerConfig
from cgdiff.scorer import ScorerConfig
from cgdiff.tune import NORMAL_TAIL, recalibrate

detector = Detector.from_pretrained("checkpoints/brick", device="cpu")
detector.sampler = SamplerConfig()
detector.scorer.config = ScorerConfig(backbone=detector.scorer.config.backbone)
recalibrate(detector, "data/textures/brick", threshold=NORMAL_TAIL)
result = evaluate(detector, load_dataset("data/textures/brick"))
print(detector.describe())
print(json.dumps({k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "removal")}))
PY
