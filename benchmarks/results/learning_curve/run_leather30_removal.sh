#!/bin/bash
# As run_leather30.sh, with the tuner choosing only among settings that remove at least half of
# each synthetic defect on its validation set (--tune-min-removal 0.5).
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=../shared/data/mvtec_leather_mini/leather
mkdir -p runs/curve
/usr/bin/time -v cgdiff train --data $D --out runs/curve/leather30_removal --image-size 256 --backbone efficientnet-lite0 \
  --max-minutes 21 --max-steps 100000 --tune --tune-minutes 8 --tune-min-removal 0.5 --no-progress \
  > runs/curve/leather30_removal.log 2>&1
echo trained > runs/curve/leather30_removal.trained
