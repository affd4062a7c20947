#!/bin/bash
# Run from anywhere; needs data/textures (cgdiff build-textures --out data/textures).
# Crop size at the same 20 minutes on one core each, against the defaults of run.sh (64-px crops):
# 128-px crops (the whole 128-px training tile, the size the detector samples at) and 96-px crops.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p runs/ab
COMMON="--data data/textures/grass --image-size 128 --preset tiny --backbone efficientnet-lite0 --rotations --max-minutes 20 --max-steps 100000 --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 --no-progress --save-every 500"
for c in 128 96; do
  cgdiff train $COMMON --crop-size $c --out runs/ab/grass_crop$c > runs/ab/crop$c.log 2>&1
done
for c in 128 96; do
  cgdiff evaluate --checkpoint runs/ab/grass_crop$c --data data/textures/grass --json runs/ab/grass_crop$c.json --no-progress > runs/ab/grass_crop$c.eval.txt 2>&1
  cgdiff evaluate --checkpoint runs/ab/grass_crop$c --data data/textures/grass --w 0 --json runs/ab/grass_crop${c}_w0.json --no-progress > runs/ab/grass_crop${c}_w0.eval.txt 2>&1
done
echo done > runs/ab/done3
