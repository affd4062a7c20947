#!/bin/bash
# Run from anywhere; needs data/textures (cgdiff build-textures --out data/textures).
# A/B at equal CPU time on one core each: the current default recipe vs t < 500 + min-SNR-5.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
COMMON="--data data/textures/grass --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 --rotations --max-minutes 20 --max-steps 100000 --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 --no-progress --save-every 500"
cgdiff train $COMMON --out runs/ab/grass_default > runs/ab/default.log 2>&1 &
cgdiff train $COMMON --max-timestep 500 --snr-gamma 5 --out runs/ab/grass_t500_snr5 > runs/ab/t500.log 2>&1 &
wait
for r in grass_default grass_t500_snr5; do
  cgdiff evaluate --checkpoint runs/ab/$r --data data/textures/grass --json runs/ab/$r.json --no-progress > runs/ab/$r.eval.txt 2>&1
done
echo done > runs/ab/done
