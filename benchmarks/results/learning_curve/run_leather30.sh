#!/bin/bash
# A leather-subset detector within 30 CPU minutes on one core: 21 minutes of training with the
# `cgdiff train` defaults (tiny U-Net, 256 px, 64 px crops) and 8 minutes of label-free tuning
# (`--tune`), then the full method and the PatchCore-style peer on the test split.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=../shared/data/mvtec_leather_mini/leather
OUT=${OUT:-runs/curve/leather30}  # OUT=... for another run of the same recipe
mkdir -p "$(dirname "$OUT")"
/usr/bin/time -v cgdiff train --data $D --out "$OUT" --image-size 256 --backbone efficientnet-lite0 \
  --max-minutes 21 --max-steps 100000 --tune --tune-minutes 8 --tune-min-removal 0 --no-progress > "$OUT.log" 2>&1
echo trained > "$OUT.trained"
