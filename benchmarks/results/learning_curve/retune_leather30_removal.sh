#!/bin/bash
# The leather detector of run_leather30.sh (OUT=runs/curve/leather30_samples), its tuning redone
# with a removal floor: reset to the settings its training left it with, then
# `cgdiff tune --minutes 8 --min-removal 0.5` on one core (as the recipe's --tune), and the test
# split against the PatchCore-style peer.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=../shared/data/mvtec_leather_mini/leather
SRC=${SRC:-runs/curve/leather30_samples}
OUT=${OUT:-runs/curve/leather30_samples_removal}
rm -rf "$OUT" && cp -r "$SRC" "$OUT"
python - "$OUT/cgdiff.json" <<'PY'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
prev = config["tuning"]["previous"]
config["sampler"] = {k: prev[k] for k in ("t0", "steps", "w", "guidance_scale", "blur_sigma", "eta", "seed")}
config["scorer"].update({k: prev[k] for k in ("pixel_weight", "feature_weight", "map_sigma")})
for key in ("tuning", "metrics", "metrics_before_tuning"):
    config.pop(key, None)
json.dump(config, open(path, "w"), indent=2)
PY
/usr/bin/time -v cgdiff tune --checkpoint "$OUT" --data $D --minutes 8 --min-removal 0.5 --no-progress > "$OUT.tune.log" 2>&1
mkdir -p benchmarks/results/leather30_samples_removal && cp "$OUT.tune.log" benchmarks/results/leather30_samples_removal/tune.log
cgdiff bench --quality --pair "$OUT" $D --methods full w0 pixel patchcore --out benchmarks/results/leather30_samples_removal \
  --overwrite --no-progress
