#!/bin/bash
# Run from anywhere; needs data/textures (cgdiff build-textures --out data/textures).
# Two more recipes at the same 20 minutes on one core each (run side by side), against the defaults of run.sh.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
COMMON="--data data/textures/grass --image-size 128 --crop-size 64 --backbone efficientnet-lite0 --rotations --max-minutes 20 --max-steps 100000 --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 --no-progress --save-every 500"
cgdiff train $COMMON --preset small --out runs/ab/grass_small > runs/ab/small.log 2>&1 &
cgdiff train $COMMON --preset tiny --batch-size 16 --out runs/ab/grass_batch16 > runs/ab/batch16.log 2>&1 &
wait
for r in grass_small grass_batch16; do
  cgdiff evaluate --checkpoint runs/ab/$r --data data/textures/grass --json runs/ab/$r.json --no-progress > runs/ab/$r.eval.txt 2>&1
done
echo done > runs/ab/done2
