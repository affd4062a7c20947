#!/bin/sh
# DDAD's domain adaptation on the bundled grass and gravel detectors: label-free validation
# AUPRO at the stored settings (tune --max-evaluations 0 --min-removal 0 --dry-run) and the test split,
# adapted and as bundled. Output: output.txt, NAME_e8.json.
set -e
here=benchmarks/results/adaptation
for t in grass gravel; do
  python $here/adapt.py $t 8
  cgdiff tune --checkpoint runs/da/${t}_e8 --data data/textures/$t --max-evaluations 0 --min-removal 0 --dry-run --no-progress 2>&1 | grep -i "validation AUPRO" | head -2
  cgdiff evaluate --checkpoint runs/da/${t}_e8 --data data/textures/$t --json $here/${t}_e8.json --overwrite --no-progress | tail -12
  cgdiff tune --checkpoint $t --data data/textures/$t --max-evaluations 0 --min-removal 0 --dry-run --no-progress 2>&1 | grep -i "validation AUPRO" | head -2
done
