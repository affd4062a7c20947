#!/bin/bash
# The clean holdout on gravel: the bundled gravel recipe (12,936 steps, rotations, the same start
# settings) with `--holdout 8` (the last 8 tiles held out, the 8 overlapping them left out, 19
# trained on), then `cgdiff tune --minutes 12 --min-removal 0` (as the bundled gravel detector was
# tuned), the test split and the examples. Compare with the bundled gravel detector (35 tiles,
# in-sample threshold).
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results/holdout
ckpt=runs/gravel_holdout8_tiles
if [ ! -f $ckpt/cgdiff.json ]; then
  OMP_NUM_THREADS=1 cgdiff train --data data/textures/gravel --out $ckpt --image-size 128 --crop-size 64 --preset tiny \
    --max-steps 12936 --backbone efficientnet-lite0 --rotations --t0 250 --steps 10 --w 11 --guidance-scale 0.5 \
    --pixel-weight 4 --holdout 8 --no-progress
fi
[ "$1" = "--train-only" ] && exit 0
cgdiff tune --checkpoint $ckpt --data data/textures/gravel --minutes 12 --min-removal 0 --no-progress > $out/gravel_tiles_tune.txt 2>&1
cgdiff evaluate --checkpoint $ckpt --data data/textures/gravel --json $out/gravel_tiles_test.json --overwrite --no-progress > /dev/null 2>&1
cgdiff detect --checkpoint $ckpt checkpoints/gravel/examples --no-progress > $out/gravel_tiles_examples.txt 2>&1
