#!/bin/bash
# Learning curve of the default recipe (constant learning rate) on grass, one CPU core:
# continues the 20-minute A/B run (benchmarks/results/training_ab/run.sh, runs/ab/grass_default)
# in 20-minute chunks, keeps a snapshot of the checkpoint after each (runs/curve/snap/const_M)
# and evaluates it at the bundled grass detector's stored settings.
# Then: python benchmarks/learning_curve.py (see BENCHMARKS.md, "Learning curve").
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=runs/curve/grass_const
snapshot() { mkdir -p "$2"; for f in "$1"/*; do [ "$(basename "$f")" = training_state ] || cp -r "$f" "$2"/; done; }
mkdir -p runs/curve/snap
[ -d $R ] || cp -r runs/ab/grass_default $R
[ -d runs/curve/snap/const_20 ] || snapshot runs/ab/grass_default runs/curve/snap/const_20
for chunk in 1 2 3; do
  cgdiff train --data data/textures/grass --out $R --resume --max-minutes 20 --max-steps 100000 --no-progress >> runs/curve/grass_const.log 2>&1
  m=$(( 20 + 20 * chunk ))
  snapshot $R runs/curve/snap/const_$m
  cgdiff evaluate --checkpoint $R --data data/textures/grass --json runs/curve/grass_const_${m}min.json --no-progress > runs/curve/grass_const_${m}min.txt 2>&1
done
echo done > runs/curve/const.done
