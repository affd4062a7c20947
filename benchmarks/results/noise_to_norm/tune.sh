#!/bin/bash
# Run from anywhere; after grass_ab.sh and share.sh. Each grass run of those tuned as a user
# would (`cgdiff tune --minutes 8`, the CLI's --min-removal 0.5, on a copy: runs/n2n/NAME_tuned),
# then the test split at the chosen settings and the bundled grass examples (chosen before any
# scoring) through `cgdiff detect`. One core:  tune.sh grass_n2n_0.9
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
r=${1:?run}; T=${r%%_*}
R=runs/n2n; O=benchmarks/results/noise_to_norm
cgdiff tune --checkpoint $R/$r --out $R/${r}_tuned --overwrite --data data/textures/$T --minutes 8 --no-progress > $O/${r}_tune.txt 2>&1
cgdiff evaluate --checkpoint $R/${r}_tuned --data data/textures/$T --json $O/${r}_tuned.json --overwrite --no-progress > /dev/null 2>&1
cgdiff detect --checkpoint $R/${r}_tuned checkpoints/$T/examples --no-progress > $O/${r}_tuned_examples.txt 2>&1
echo done > $R/${r}_tuned.done
