#!/bin/sh
# The two threshold rules on real defects: the leather-subset detector of
# benchmarks/results/learning_curve/run_leather30.sh (trained and tuned within 30 CPU minutes;
# tune sets validation-f1), then the same detector recalibrated with normal-tail into a copy.
set -e
D=../shared/data/mvtec_leather_mini/leather
out=benchmarks/results/threshold
tmp=${TMPDIR:-/tmp}/cgdiff-threshold
cgdiff evaluate --checkpoint runs/curve/leather30 --data $D --json $out/leather_validation_f1.json --overwrite --no-progress
cgdiff calibrate --checkpoint runs/curve/leather30 --data $D --threshold normal-tail --out $tmp/leather_normal_tail --overwrite --no-progress
cgdiff evaluate --checkpoint $tmp/leather_normal_tail --data $D --json $out/leather_normal_tail.json --overwrite --no-progress
