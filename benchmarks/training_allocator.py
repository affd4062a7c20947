"""Training speed on one core with glibc's default allocator or with keep_freed_memory.

    OMP_NUM_THREADS=1 python benchmarks/training_allocator.py 0   # glibc's defaults
    OMP_NUM_THREADS=1 python benchmarks/training_allocator.py 1   # cgdiff.runtime.keep_freed_memory

300 steps of `cgdiff train`'s loop (tiny U-Net, 128 px images, 64 px crops, batch 8) on the grass
training tiles of `cgdiff build-textures --out data/textures`; prints steps per second (setup and
a two-image calibration included), kernel and user CPU time and page faults.
"""

import glob
import resource
import sys
import tempfile
import time

import torch

from cgdiff.runtime import keep_freed_memory
from cgdiff.train import TrainConfig, train

torch.set_num_threads(1)
if sys.argv[1:] == ["1"]:
    keep_freed_memory()
images = sorted(glob.glob("data/textures/grass/train/good/*.png"))
if not images:
    sys.exit("no data/textures/grass: run 'cgdiff build-textures --out data/textures' first")
config = TrainConfig(image_size=128, crop_size=64, batch_size=8, max_steps=300, save_every=10**6, log_every=50,
                     rotations=True)
r0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    train(images, out + "/run", config, progress_bar=False, calibration_images=images[:2])
r1, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
print(f"keep_freed_memory={sys.argv[1:] == ['1']}: {300 / seconds:.2f} steps/s, kernel {r1.ru_stime - r0.ru_stime:.1f} s, "
      f"user {r1.ru_utime - r0.ru_utime:.1f} s, page faults {r1.ru_minflt - r0.ru_minflt}")
