#!/bin/bash
# After grass_tiles.sh: the held-out grass detector at the bundled grass detector's settings
# (t0 250, K 10, w 11, s 0.25, N 4, v 4, map sigma 2) instead of its tuned ones, recalibrated on its
# 8 held-out tiles (`cgdiff calibrate`), then the test split and the examples: separates what
# the smaller training set costs from what the held-out validation's choice of settings costs.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results/holdout
src=runs/grass_holdout8_tiles
ckpt=runs/grass_holdout8_tiles_w11
rm -rf $ckpt && cp -r $src $ckpt
python - "$ckpt" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "cgdiff.json"
config, bundled = json.loads(path.read_text()), json.loads(Path("checkpoints/grass/cgdiff.json").read_text())
config["sampler"], config["scorer"] = bundled["sampler"], bundled["scorer"]
config.pop("tuning", None)
path.write_text(json.dumps(config, indent=1))
PY
cgdiff calibrate --checkpoint $ckpt --data data/textures/grass --no-progress > $out/grass_tiles_w11_calibrate.txt 2>&1
cgdiff evaluate --checkpoint $ckpt --data data/textures/grass --json $out/grass_tiles_w11_test.json --overwrite --no-progress > /dev/null 2>&1
cgdiff detect --checkpoint $ckpt checkpoints/grass/examples --no-progress > $out/grass_tiles_w11_examples.txt 2>&1
