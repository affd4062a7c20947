"""Run by test_train.py under `accelerate launch --num_processes 2`: a few data-parallel steps."""

import sys

import numpy as np

from cgdiff.train import TrainConfig, train

rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
train(images, sys.argv[1], TrainConfig(image_size=32, crop_size=16, batch_size=2, max_steps=6, save_every=3),
      progress_bar=False)
