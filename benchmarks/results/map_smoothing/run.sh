#!/bin/bash
# The anomaly map's smoothing:
# 1. the sigma sweep on the bundled detectors as they were before (commit fa85949: map sigma 4),
#    validation and test columns;
# 2. those detectors re-tuned for 8 minutes each with the map sigma searched as well
#    (`--map-sigmas 1 2 4 8`, into copies), evaluated, their examples judged (in search/).
# What ships is retune.sh (sigma 2, not searched); leather.sh is the leather subset's case.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
out=benchmarks/results/map_smoothing
before=${TMPDIR:-/tmp}/cgdiff-before-map-sigma
rm -rf "$before" && mkdir -p "$before"
git archive fa85949 checkpoints/brick checkpoints/grass checkpoints/gravel | tar -x -C "$before"
python benchmarks/map_smoothing.py --pair "$before/checkpoints/brick" data/textures/brick \
  --pair "$before/checkpoints/grass" data/textures/grass --pair "$before/checkpoints/gravel" data/textures/gravel \
  --out $out
[ "$1" = "--sweep-only" ] && exit 0
mkdir -p $out/search
for t in brick grass gravel; do
  cgdiff tune --checkpoint "$before/checkpoints/$t" --data data/textures/$t --out "$before/searched_$t" --overwrite \
    --minutes 8 --map-sigmas 1 2 4 8 --min-removal 0 --no-progress | tee $out/search/${t}_tune.txt
  cgdiff evaluate --checkpoint "$before/searched_$t" --data data/textures/$t --json $out/search/${t}_test.json --overwrite --no-progress
  cgdiff detect --checkpoint "$before/searched_$t" "$before/checkpoints/$t/examples" --no-progress | tee $out/search/${t}_examples.txt
done
