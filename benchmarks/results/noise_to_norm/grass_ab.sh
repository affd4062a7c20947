#!/bin/bash
# Run from anywhere; needs data/textures (cgdiff build-textures --out data/textures).
# Noise-to-norm A/B at equal CPU time: the `cgdiff train` defaults against --noise-to-norm 0.5,
# 20 minutes each, side by side on one core each (the same command as training_ab/run.sh), then
# both evaluated on the test split at the fixed settings (t0 250, K 10, s 0.5) with w = 11, 3, 0.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
T=${1:-grass}
R=runs/n2n; O=benchmarks/results/noise_to_norm
mkdir -p $R
COMMON="--data data/textures/$T --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 --rotations --max-minutes 20 --max-steps 100000 --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 --no-progress --save-every 500"
cgdiff train $COMMON --out $R/${T}_default > $R/${T}_default.log 2>&1 &
cgdiff train $COMMON --noise-to-norm 0.5 --out $R/${T}_n2n > $R/${T}_n2n.log 2>&1 &
wait
for r in ${T}_default ${T}_n2n; do
  for w in 11 3 0; do
    cgdiff evaluate --checkpoint $R/$r --data data/textures/$T --w $w --json $O/${r}_w$w.json --no-progress > $R/${r}_w$w.txt 2>&1 &
  done
  wait
done
echo done > $R/${T}.done
