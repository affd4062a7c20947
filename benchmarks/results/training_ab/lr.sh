#!/bin/bash
# Run from anywhere; needs data/textures (cgdiff build-textures --out data/textures).
# The learning rate: the defaults' grass run of noise_to_norm/share.sh (2470 steps, one core, beside
# one other single-core job) repeated with --lr LR at the same number of steps, evaluated the same
# way (t0 250, K 10, s 0.5; w = 11, 3, 0).
#   lr.sh 1e-3   -> runs/lr/grass_lr_1e-3, benchmarks/results/training_ab/grass_lr_1e-3_w{11,3,0}.json
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
LR=${1:?learning rate}; STEPS=${2:-2470}
R=runs/lr; O=benchmarks/results/training_ab; r=grass_lr_$LR
mkdir -p $R
cgdiff train --data data/textures/grass --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 \
  --rotations --max-steps $STEPS --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 \
  --no-progress --save-every 500 --lr $LR --out $R/$r > $R/$r.log 2>&1
cp $R/$r/training_log.csv $O/${r}_training_log.csv
for w in 11 3 0; do
  cgdiff evaluate --checkpoint $R/$r --data data/textures/grass --w $w --json $O/${r}_w$w.json --no-progress > $R/${r}_w$w.txt 2>&1
done
echo done > $R/$r.done
