#!/bin/sh
# The threshold rules on the bundled texture detectors: the test split's verdict rates
# (at_threshold in the JSON) with the normal-tail threshold, then recalibrated with the
# validation-f1 rule (cgdiff calibrate) and evaluated again (recorded in the checkpoint).
set -e
out=benchmarks/results/threshold
for t in ${TEXTURES:-grass gravel brick}; do
  cgdiff evaluate --checkpoint checkpoints/$t --data data/textures/$t --json $out/${t}_normal_tail.json --overwrite --no-progress
  cgdiff calibrate --checkpoint checkpoints/$t --data data/textures/$t --no-progress | tee $out/${t}_calibrate.txt
  cgdiff evaluate --checkpoint checkpoints/$t --data data/textures/$t --record --json $out/${t}_validation_f1.json --overwrite --no-progress
  cgdiff detect --checkpoint checkpoints/$t checkpoints/$t/examples --no-progress | tee $out/${t}_examples.txt
done
