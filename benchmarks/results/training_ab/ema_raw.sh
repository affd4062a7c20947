#!/bin/bash
# Run from anywhere after run.sh (needs runs/ab/grass_default with its training_state).
# The EMA's effect: the same 20-minute run sampled with its raw weights (the training state's
# model, no averaging) and with its EMA weights (what cgdiff samples from), at the stored
# settings and with the conditioning off.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
rm -rf runs/ab/grass_default_raw && mkdir runs/ab/grass_default_raw
cp -r runs/ab/grass_default/{README.md,cgdiff.json,scheduler,train_args.json,training_log.csv,unet} runs/ab/grass_default_raw/
cp runs/ab/grass_default/training_state/model.safetensors runs/ab/grass_default_raw/unet/diffusion_pytorch_model.safetensors
for r in grass_default grass_default_raw; do
  [ -f runs/ab/$r.json ] || cgdiff evaluate --checkpoint runs/ab/$r --data data/textures/grass --json runs/ab/$r.json --no-progress
  cgdiff evaluate --checkpoint runs/ab/$r --data data/textures/grass --w 0 --json runs/ab/${r}_w0.json --no-progress
done
