#!/bin/bash
# Run from anywhere; needs data/textures. One noise-to-norm share on one texture, trained as
# grass_ab.sh (one core, beside one other single-core job) for 20 minutes or for STEPS steps, and
# evaluated the same way (t0 250, K 10, s 0.5; w = 11, 3, 0). Share 0: the defaults.
#   share.sh 0.9                -> runs/n2n/grass_n2n_0.9, grass_n2n_0.9_w{11,3,0}.json
#   share.sh 0.9 gravel 2400    -> runs/n2n/gravel_n2n_0.9 (2400 steps)
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
P=${1:?share}; T=${2:-grass}; STEPS=${3:-}
R=runs/n2n; O=benchmarks/results/noise_to_norm; r=${T}_n2n_$P
[ "$P" = 0 ] && r=${T}_default
if [ -n "$STEPS" ]; then r=${r}_$STEPS budget="--max-steps $STEPS"; else budget="--max-minutes 20 --max-steps 100000"; fi
mkdir -p $R
cgdiff train --data data/textures/$T --image-size 128 --crop-size 64 --preset tiny --backbone efficientnet-lite0 \
  --rotations $budget --t0 250 --steps 10 --w 11 --guidance-scale 0.5 --pixel-weight 4 \
  --no-progress --save-every 500 --noise-to-norm $P --out $R/$r > $R/$r.log 2>&1
for w in 11 3 0; do
  cgdiff evaluate --checkpoint $R/$r --data data/textures/$T --w $w --json $O/${r}_w$w.json --no-progress > $R/${r}_w$w.txt 2>&1
done
echo done > $R/$r.done
