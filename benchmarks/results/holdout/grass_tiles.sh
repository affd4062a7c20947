#!/bin/bash
# The held-out grass run again, now that `--holdout N` on a build-textures set also leaves out
# every training tile overlapping the held-out ones (tiles overlap by half; in grass.sh's run
# each "held-out" tile shared most of its pixels with tiles the denoiser trained on). 8 tiles
# held out (the last 8 in the photo: rows 192-384), 8 more left out as they overlap them, 19
# trained on. Training 5000 steps on one core, then `cgdiff tune --minutes 8` (two threads,
# alone), the test split and the examples, as grass.sh.
#   grass_tiles.sh                 5000 steps: runs/grass_holdout8_tiles, grass_tiles_*.{txt,json}
#   grass_tiles.sh 10000           that run continued to 10000 steps (--resume on a copy):
#                                  runs/grass_holdout8_tiles_10000, grass_tiles_10000_*.{txt,json}
#   grass_tiles.sh [STEPS] --train-only
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results/holdout
steps=5000
if [[ "$1" =~ ^[0-9]+$ ]]; then steps=$1; shift; fi
base=runs/grass_holdout8_tiles
if [ ! -f $base/cgdiff.json ]; then
  OMP_NUM_THREADS=1 cgdiff train --data data/textures/grass --out $base --image-size 128 --crop-size 64 --preset tiny \
    --max-steps 5000 --max-minutes 40 --backbone efficientnet-lite0 --rotations --holdout 8 --no-progress
fi
ckpt=$base tag=grass_tiles
if [ "$steps" != 5000 ]; then
  ckpt=${base}_$steps tag=grass_tiles_$steps
  if [ ! -f $ckpt/cgdiff.json ] || [ "$(python -c "import json;print(json.load(open('$ckpt/cgdiff.json'))['training']['steps'])")" != "$steps" ]; then
    [ -d $ckpt ] || cp -r $base $ckpt  # the 5000-step run tuned in place, so train again from its state
    OMP_NUM_THREADS=1 cgdiff train --data data/textures/grass --out $ckpt --resume --max-steps $steps --holdout 8 --no-progress
  fi
fi
[ "$1" = "--train-only" ] && exit 0
# The recorded runs tuned in place from the training settings; a tuned checkpoint would start the
# search elsewhere, so it is not tuned again.
python -c "import json, sys; sys.exit('tuning' in json.load(open('$ckpt/cgdiff.json')))" \
  || { echo "$ckpt is tuned already: train it again (remove it) to rerun the tuning" >&2; exit 1; }
cgdiff tune --checkpoint $ckpt --data data/textures/grass --minutes 8 --min-removal 0 --no-progress > $out/${tag}_tune.txt 2>&1
cgdiff evaluate --checkpoint $ckpt --data data/textures/grass --json $out/${tag}_test.json --overwrite --no-progress > /dev/null 2>&1
cgdiff detect --checkpoint $ckpt checkpoints/grass/examples --no-progress > $out/${tag}_examples.txt 2>&1
