#!/bin/bash
# Run from anywhere; needs ../shared/data/mvtec_leather_mini. Leather as
# learning_curve/run_leather30_removal.sh (21 minutes of training on one core, then 8 of
# --tune --tune-min-removal 0.5), with --noise-to-norm P (0: the defaults, for a run under the
# same load); then the same bench as that run.
#   leather.sh 0.5   -> runs/n2n/leather30_n2n,      benchmarks/results/noise_to_norm/leather30
#   leather.sh 0     -> runs/n2n/leather30_default,  benchmarks/results/noise_to_norm/leather30_default
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
P=${1:-0.5}
D=../shared/data/mvtec_leather_mini/leather
R=runs/n2n; mkdir -p $R
if [ "$P" = 0 ]; then r=leather30_default o=leather30_default; else r=leather30_n2n o=leather30; fi
/usr/bin/time -v cgdiff train --data $D --out $R/$r --image-size 256 --backbone efficientnet-lite0 \
  --max-minutes 21 --max-steps 100000 --tune --tune-minutes 8 --tune-min-removal 0.5 --noise-to-norm $P \
  --no-progress > $R/$r.log 2>&1
cgdiff bench --quality --pair $R/$r $D --methods full w0 pixel feature patchcore \
  --out benchmarks/results/noise_to_norm/$o > $R/${r}_bench.log 2>&1
echo done > $R/$r.done
