#!/bin/bash
# The bundled brick, grass and gravel detectors re-tuned with the tuner's grids that now include
# N, the reconstructions averaged (samples 1, 2, 4): as benchmarks/results/map_smoothing/retune.sh
# did, each is reset to the settings its training left it with (the first tuning's "previous",
# commit fa85949, and map sigma 2), then `cgdiff tune --minutes 8` in place, evaluated on the test
# split and recorded, and its examples judged. The first texture runs beside the others, each on
# one core.
#   benchmarks/results/samples/retune.sh                                  -> uncapped/ (the bundled detectors)
#   MAX_CALLS=40 TEXTURES="grass gravel" benchmarks/results/samples/retune.sh  -> cap40/ (measured, not shipped)
# --max-model-calls 40 halves grass's and gravel's U-Net calls (brick's choice, 3 calls, is far inside the cap).
# Either run leaves its detectors in checkpoints/; `git checkout checkpoints` restores the bundled ones.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
TEXTURES=${TEXTURES:-brick grass gravel}
out=benchmarks/results/samples/${MAX_CALLS:+cap$MAX_CALLS}
out=${out%/}; [ -n "$MAX_CALLS" ] || out=$out/uncapped
mkdir -p $out
for t in $TEXTURES; do
  git show fa85949:checkpoints/$t/cgdiff.json > $out/${t}_before.json
  python - "$t" $out/${t}_before.json <<'PY'
import json, sys
from cgdiff.scorer import default_map_sigma
t = sys.argv[1]
before = json.load(open(sys.argv[2]))
path = f"checkpoints/{t}/cgdiff.json"
config = json.load(open(path))
prev = before["tuning"]["previous"]
config["sampler"] = {k: prev[k] for k in ("t0", "steps", "w", "guidance_scale", "blur_sigma", "eta", "seed")}
config["scorer"].update(pixel_weight=prev["pixel_weight"], feature_weight=prev["feature_weight"],
                        map_sigma=default_map_sigma(config["image_size"]))
for key in ("tuning", "metrics", "metrics_before_recalibration", "metrics_before_tuning", "calibration_before",
            "calibration_normals", "calibration_command"):
    config.pop(key, None)
json.dump(config, open(path, "w"), indent=2)
PY
  rm $out/${t}_before.json
done
one() {
  cgdiff tune --checkpoint checkpoints/$1 --data data/textures/$1 --minutes 8 --min-removal 0 ${MAX_CALLS:+--max-model-calls $MAX_CALLS} \
    --no-progress > $out/${1}_tune.txt 2>&1
  cgdiff evaluate --checkpoint checkpoints/$1 --data data/textures/$1 --record --json $out/${1}_test.json --overwrite --no-progress > /dev/null 2>&1
  cgdiff detect --checkpoint checkpoints/$1 checkpoints/$1/examples --no-progress > $out/${1}_examples.txt 2>&1
}
set -- $TEXTURES
(one $1) &
shift
for t in "$@"; do one $t; done
wait
