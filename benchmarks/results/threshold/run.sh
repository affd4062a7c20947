#!/bin/sh
# The threshold rules on the bundled texture detectors' test splits (at_threshold in the JSON):
# the normal-tail threshold (recalibrated into a copy), then the bundled folder recalibrated
# in place with the validation-f1 rule (cgdiff calibrate, seed 0), evaluated and recorded,
# and its examples inspected.
set -e
out=benchmarks/results/threshold
tmp=${TMPDIR:-/tmp}/cgdiff-threshold
for t in ${TEXTURES:-grass gravel}; do
  cgdiff calibrate --checkpoint checkpoints/$t --data data/textures/$t --threshold normal-tail --out $tmp/${t}_normal_tail --overwrite --no-progress
  cgdiff evaluate --checkpoint $tmp/${t}_normal_tail --data data/textures/$t --json $out/${t}_normal_tail.json --overwrite --no-progress
  cgdiff calibrate --checkpoint checkpoints/$t --data data/textures/$t --no-progress | tee $out/${t}_calibrate.txt
  cgdiff evaluate --checkpoint checkpoints/$t --data data/textures/$t --record --json $out/${t}_validation_f1.json --overwrite --no-progress
  cgdiff detect --checkpoint checkpoints/$t checkpoints/$t/examples --no-progress | tee $out/${t}_examples.txt
done
