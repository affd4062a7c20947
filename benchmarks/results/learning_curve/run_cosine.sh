#!/bin/bash
# The A/B protocol of benchmarks/results/training_ab/run.sh (grass, one core, the default recipe)
# with a cosine learning-rate schedule and 250 warm-up steps over the 5186 steps the constant-rate
# run made in its 20 minutes; evaluated at the bundled grass detector's stored settings.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
COMMON="--data data/textures/grass --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 --rotations --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 --no-progress --save-every 500"
mkdir -p runs/curve
cgdiff train $COMMON --max-steps 5186 --max-minutes 45 --lr-schedule cosine --warmup-steps 250 --out runs/curve/grass_cosine > runs/curve/grass_cosine.log 2>&1
cgdiff evaluate --checkpoint runs/curve/grass_cosine --data data/textures/grass --json runs/curve/grass_cosine.json --no-progress > runs/curve/grass_cosine.txt 2>&1
echo done > runs/curve/cosine.done
