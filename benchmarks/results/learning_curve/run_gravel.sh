#!/bin/bash
# Learning curve of the default recipe on gravel, one CPU core: the bundled gravel detector's
# training command, in 20-minute chunks with a snapshot after each (runs/curve/snap/gravel_M).
# Then: python benchmarks/learning_curve.py --data data/textures/gravel (see BENCHMARKS.md).
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=runs/curve/gravel_const
snapshot() { mkdir -p "$2"; for f in "$1"/*; do [ "$(basename "$f")" = training_state ] || cp -r "$f" "$2"/; done; }
mkdir -p runs/curve/snap
COMMON="--data data/textures/gravel --out $R --max-steps 100000 --max-minutes 20 --no-progress"
[ -d $R ] || cgdiff train $COMMON --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 \
  --save-every 500 --rotations --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 >> runs/curve/gravel_const.log 2>&1
snapshot $R runs/curve/snap/gravel_20
for chunk in 1 2; do
  cgdiff train $COMMON --resume >> runs/curve/gravel_const.log 2>&1
  m=$(( 20 + 20 * chunk ))
  snapshot $R runs/curve/snap/gravel_$m
done
echo done > runs/curve/gravel.done
