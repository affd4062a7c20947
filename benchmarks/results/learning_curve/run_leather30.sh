#!/bin/bash
# A leather-subset detector within 30 CPU minutes on one core: 21 minutes of training with the
# `cgdiff train` defaults (tiny U-Net, 256 px, 64 px crops) and 8 minutes of label-free tuning
# (`--tune`), then the full method and the PatchCore-style peer on the test split.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=../shared/data/mvtec_leather_mini/leather
mkdir -p runs/curve
/usr/bin/time -v cgdiff train --data $D --out runs/curve/leather30 --image-size 256 --backbone efficientnet-lite0 \
  --max-minutes 21 --max-steps 100000 --tune --tune-minutes 8 --no-progress > runs/curve/leather30.log 2>&1
echo trained > runs/curve/leather30.trained
