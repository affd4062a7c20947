#!/bin/bash
# Run from anywhere; needs data/textures (cgdiff build-textures --out data/textures).
# The noise levels alone: --max-timestep 500 without min-SNR weighting (run.sh changed both at
# once), 20 minutes on one core, against the defaults of run.sh.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p runs/ab
COMMON="--data data/textures/grass --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 --rotations --max-minutes 20 --max-steps 100000 --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 --no-progress --save-every 500"
cgdiff train $COMMON --max-timestep 500 --out runs/ab/grass_t500 > runs/ab/t500_only.log 2>&1
cgdiff evaluate --checkpoint runs/ab/grass_t500 --data data/textures/grass --json runs/ab/grass_t500.json --no-progress > runs/ab/grass_t500.eval.txt 2>&1
cgdiff evaluate --checkpoint runs/ab/grass_t500 --data data/textures/grass --w 0 --json runs/ab/grass_t500_w0.json --no-progress > runs/ab/grass_t500_w0.eval.txt 2>&1
echo done > runs/ab/done4
