#!/bin/bash
# Label-free validation AUPRO of every snapshot at its stored settings (cgdiff tune's validation
# set: synthetic defects on training images; no test image is read), beside the learning curves.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
V=benchmarks/results/learning_curve/validation
val() { cgdiff tune --checkpoint "$1" --data "$2" --max-evaluations 0 --min-removal 0 --dry-run --json "$V/$3.json" --no-progress | grep '^validation AUPRO'; }
val grass data/textures/grass grass_bundled
val gravel data/textures/gravel gravel_bundled
for m in 20 40 60 80; do val runs/curve/snap/const_$m data/textures/grass grass_const_$m; done
for m in 20 40 60; do val runs/curve/snap/small_$m data/textures/grass grass_small_$m; done
for m in 20 40 60; do val runs/curve/snap/gravel_$m data/textures/gravel gravel_$m; done
