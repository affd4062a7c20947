#!/bin/bash
# The anomaly map's smoothing, searched by the tuner (cgdiff 7824516 on):
# 1. the sigma sweep on the bundled detectors as they were before (commit fa85949: map sigma 4),
#    validation and test columns;
# 2. the bundled detectors re-tuned in place with the tuner that searches it (8 minutes each, as
#    they were first tuned), then evaluated and recorded, and their examples judged.
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
for t in brick grass gravel; do
  cgdiff tune --checkpoint checkpoints/$t --data data/textures/$t --minutes 8 --no-progress | tee $out/${t}_tune.txt
  cgdiff evaluate --checkpoint checkpoints/$t --data data/textures/$t --record --json $out/${t}_test.json --overwrite --no-progress
  cgdiff detect --checkpoint checkpoints/$t checkpoints/$t/examples --no-progress | tee $out/${t}_examples.txt
done
