#!/bin/sh
# Brick with the default recipe for 60 minutes on one core (the bundled brick trained 4200 steps),
# tuned like the bundled one and evaluated on the test split. The run's final save was redone
# with --resume --max-steps 13153 (no further training).
set -e
OMP_NUM_THREADS=1 cgdiff train --data data/textures/brick --out runs/brick60 --image-size 128 --crop-size 64 \
    --preset tiny --max-steps 100000 --max-minutes 60 --backbone efficientnet-lite0 --save-every 500 --no-progress \
    --t0 175 --steps 3 --w 3 --guidance-scale 0
cgdiff tune --checkpoint runs/brick60 --data data/textures/brick --out runs/brick60_tuned --minutes 8 --min-removal 0 --no-progress \
    | tee benchmarks/results/learning_curve/brick/tune_output.txt
cgdiff evaluate --checkpoint runs/brick60_tuned --data data/textures/brick \
    --json benchmarks/results/learning_curve/brick/brick60_tuned.json --no-progress
