#!/bin/sh
# How much the validation-f1 threshold moves with the seed of the synthetic defects:
# recalibrated copies (never the bundled folders) with seeds 1 and 2, evaluated on the test split.
set -e
out=benchmarks/results/threshold
tmp=${TMPDIR:-/tmp}/cgdiff-threshold-seeds
for t in ${TEXTURES:-grass gravel}; do
  for seed in 1 2; do
    cgdiff calibrate --checkpoint checkpoints/$t --data data/textures/$t --seed $seed --out $tmp/${t}_seed$seed --overwrite --no-progress | tee $out/${t}_seed${seed}_calibrate.txt
    cgdiff evaluate --checkpoint $tmp/${t}_seed$seed --data data/textures/$t --json $out/${t}_validation_f1_seed$seed.json --overwrite --no-progress
  done
done
