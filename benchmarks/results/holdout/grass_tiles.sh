#!/bin/bash
# The held-out grass run again, now that `--holdout N` on a build-textures set also leaves out
# every training tile overlapping the held-out ones (tiles overlap by half; in grass.sh's run
# each "held-out" tile shared most of its pixels with tiles the denoiser trained on). 8 tiles
# held out (the last 8 in the photo: rows 192-384), 8 more left out as they overlap them, 19
# trained on. Training 5000 steps on one core, then `cgdiff tune --minutes 8` (two threads,
# alone), the test split and the examples, as grass.sh.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results/holdout
ckpt=runs/grass_holdout8_tiles
if [ ! -f $ckpt/cgdiff.json ]; then
  OMP_NUM_THREADS=1 cgdiff train --data data/textures/grass --out $ckpt --image-size 128 --crop-size 64 --preset tiny \
    --max-steps 5000 --max-minutes 40 --backbone efficientnet-lite0 --rotations --holdout 8 --no-progress
fi
[ "$1" = "--train-only" ] && exit 0
cgdiff tune --checkpoint $ckpt --data data/textures/grass --minutes 8 --min-removal 0 --no-progress > $out/grass_tiles_tune.txt 2>&1
cgdiff evaluate --checkpoint $ckpt --data data/textures/grass --json $out/grass_tiles_test.json --overwrite --no-progress > /dev/null 2>&1
cgdiff detect --checkpoint $ckpt checkpoints/grass/examples --no-progress > $out/grass_tiles_examples.txt 2>&1
