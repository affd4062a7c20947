#!/bin/bash
# Learning curve of the 4x larger U-Net (--preset small) on grass, one CPU core: continues the
# 20-minute A/B run (benchmarks/results/training_ab/run2.sh, runs/ab/grass_small) in 20-minute
# chunks, keeps a snapshot after each (runs/curve/snap/small_M) and evaluates it at the bundled
# grass detector's stored settings and with the conditioning off (w = 0).
# Then: python benchmarks/learning_curve.py (see BENCHMARKS.md, "Learning curve").
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=runs/curve/grass_small
snapshot() { mkdir -p "$2"; for f in "$1"/*; do [ "$(basename "$f")" = training_state ] || cp -r "$f" "$2"/; done; }
mkdir -p runs/curve/snap
[ -d $R ] || cp -r runs/ab/grass_small $R
[ -d runs/curve/snap/small_20 ] || snapshot runs/ab/grass_small runs/curve/snap/small_20
for chunk in 1 2 3; do
  cgdiff train --data data/textures/grass --out $R --resume --max-minutes 20 --max-steps 100000 --no-progress >> runs/curve/grass_small.log 2>&1
  m=$(( 20 + 20 * chunk ))
  snapshot $R runs/curve/snap/small_$m
done
echo done > runs/curve/small.done
