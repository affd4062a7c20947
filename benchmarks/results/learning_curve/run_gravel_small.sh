#!/bin/bash
# Capacity on gravel, where longer training helped the tiny U-Net: the 4x larger U-Net
# (--preset small), otherwise the same command as run_gravel.sh, from scratch on one CPU core in
# 50-minute chunks with a snapshot after each (runs/curve/snap/gravel_small_M).
# Then: python benchmarks/learning_curve.py --data data/textures/gravel (see BENCHMARKS.md).
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=runs/curve/gravel_small
snapshot() { mkdir -p "$2"; for f in "$1"/*; do [ "$(basename "$f")" = training_state ] || cp -r "$f" "$2"/; done; }
mkdir -p runs/curve/snap
COMMON="--data data/textures/gravel --out $R --max-steps 100000 --max-minutes 50 --no-progress"
[ -d $R ] || cgdiff train $COMMON --image-size 128 --crop-size 64 --preset small --backbone efficientnet-lite0 \
  --save-every 500 --rotations --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 >> runs/curve/gravel_small.log 2>&1
snapshot $R runs/curve/snap/gravel_small_50
cgdiff train $COMMON --resume >> runs/curve/gravel_small.log 2>&1
snapshot $R runs/curve/snap/gravel_small_100
echo done > runs/curve/gravel_small.done
