#!/bin/bash
# Run from anywhere; needs data/textures and ../shared/data/mvtec_leather_mini.
# Side by side, one core each:
#  - gravel with --noise-to-norm 0.5 for the 4270 steps of the defaults' 20-minute gravel run
#    (learning_curve/run_gravel.sh, snapshot gravel_20), evaluated as that run was (t0 250, K 10,
#    s 0.5, blur sigma 1) with w = 11, 3, 0;
#  - leather as learning_curve/run_leather30_removal.sh (21 minutes of training, 8 of
#    --tune --tune-min-removal 0.5), with --noise-to-norm 0.5.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=runs/n2n; O=benchmarks/results/noise_to_norm
D=../shared/data/mvtec_leather_mini/leather
mkdir -p $R
(
  cgdiff train --data data/textures/gravel --out $R/gravel_n2n --image-size 128 --crop-size 64 --preset tiny \
    --backbone efficientnet-lite0 --save-every 500 --rotations --t0 250 --steps 10 --w 11 --guidance-scale 0.5 \
    --pixel-weight 4 --max-steps 4270 --noise-to-norm 0.5 --no-progress > $R/gravel_n2n.log 2>&1
  for w in 11 3 0; do
    cgdiff evaluate --checkpoint $R/gravel_n2n --data data/textures/gravel --w $w --json $O/gravel_n2n_w$w.json \
      --no-progress > $R/gravel_n2n_w$w.txt 2>&1
  done
) &
/usr/bin/time -v cgdiff train --data $D --out $R/leather30_n2n --image-size 256 --backbone efficientnet-lite0 \
  --max-minutes 21 --max-steps 100000 --tune --tune-minutes 8 --tune-min-removal 0.5 --noise-to-norm 0.5 \
  --no-progress > $R/leather30_n2n.log 2>&1
wait
echo done > $R/gravel_leather.done
