#!/bin/bash
# The clean holdout on brick: the bundled brick recipe (4200 steps) with `--holdout 8` (the last
# 8 tiles held out, the 8 overlapping them left out, 19 trained on), then `cgdiff tune --minutes 8`
# at the CLI's defaults (as the bundled brick detector was re-tuned: --min-removal 0.5), the test
# split and the examples. Compare with the bundled brick detector (35 tiles, in-sample threshold).
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results/holdout
ckpt=runs/brick_holdout8_tiles
if [ ! -f $ckpt/cgdiff.json ]; then
  OMP_NUM_THREADS=1 cgdiff train --data data/textures/brick --out $ckpt --image-size 128 --crop-size 64 --preset tiny \
    --max-steps 4200 --max-minutes 40 --backbone efficientnet-lite0 --holdout 8 --no-progress
fi
[ "$1" = "--train-only" ] && exit 0
cgdiff tune --checkpoint $ckpt --data data/textures/brick --minutes 8 --no-progress > $out/brick_tiles_tune.txt 2>&1
cgdiff evaluate --checkpoint $ckpt --data data/textures/brick --json $out/brick_tiles_test.json --overwrite --no-progress > /dev/null 2>&1
cgdiff detect --checkpoint $ckpt checkpoints/brick/examples --no-progress > $out/brick_tiles_examples.txt 2>&1
