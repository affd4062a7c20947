"""Training: output, resume without losing progress, refusals, and data-parallel processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cgdiff.detector import Detector
from cgdiff.train import STATE_DIR, TrainConfig, TrainingError, train

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]


def config(**kw):
    base = dict(image_size=32, crop_size=16, batch_size=2, max_steps=8, save_every=4, log_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def weights(path):
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def test_training_writes_a_loadable_calibrated_checkpoint(images, tmp_path):
    out = tmp_path / "run"
    det = train(images, out, config(), progress_bar=False, info={"data": "three noise images"})
    assert det.calibration is not None and det.threshold > 0
    assert (out / STATE_DIR / "progress.json").is_file()
    log = (out / "training_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,learning_rate,seconds" and len(log) == 9
    saved = json.loads((out / "cgdiff.json").read_text())
    assert saved["training"]["steps"] == 8 and saved["training"]["data"] == "three noise images"
    loaded = Detector.from_pretrained(out, device="cpu")
    assert loaded.detect(images[0])[0].score == pytest.approx(det.detect(images[0])[0].score, rel=1e-5)


def test_resume_continues_exactly_where_it_stopped(images, tmp_path):
    straight = tmp_path / "straight"
    train(images, straight, config(), progress_bar=False)
    parts = tmp_path / "parts"
    train(images, parts, config(max_steps=4), progress_bar=False)
    assert json.loads((parts / STATE_DIR / "progress.json").read_text())["step"] == 4
    train(images, parts, config(max_steps=8), resume=True, progress_bar=False)
    a, b = weights(straight), weights(parts)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    losses = lambda p: [r.split(",")[1] for r in (p / "training_log.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert losses(straight) == losses(parts)


def test_cosine_schedule_with_warmup_follows_its_formula_and_resumes_exactly(images, tmp_path):
    import math
    import signal

    cfg = dict(max_steps=8, lr_schedule="cosine", warmup_steps=2)
    straight = tmp_path / "straight"
    train(images, straight, config(**cfg), progress_bar=False)
    rows = [r.split(",") for r in (straight / "training_log.csv").read_text().splitlines()[1:]]
    peak = TrainConfig().learning_rate
    # diffusers' cosine schedule: linear warm-up, then half a cosine from the peak to 0 at max_steps.
    expected = [peak * i / 2 if i < 2 else peak * 0.5 * (1 + math.cos(math.pi * (i - 2) / 6)) for i in range(8)]
    assert [float(r[2]) for r in rows] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert "- learning_rate: 0.0003 (cosine, 2 warm-up steps)" in (straight / "README.md").read_text()

    parts = tmp_path / "parts"

    def interrupt(status):  # as a Ctrl-C would, halfway through the schedule
        if status.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(images, parts, config(**cfg), progress_bar=False, callback=interrupt, callback_every=4)
    assert json.loads((parts / STATE_DIR / "progress.json").read_text())["step"] == 4
    train(images, parts, config(**cfg), resume=True, progress_bar=False)
    assert [
        r.split(",")[:3] for r in (parts / "training_log.csv").read_text().splitlines()[1:]
    ] == [r[:3] for r in rows]
    a, b = weights(straight), weights(parts)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for bad in (dict(lr_schedule="linear"), dict(warmup_steps=-1), dict(warmup_steps=8)):
        with pytest.raises(TrainingError, match="lr_schedule|warmup_steps"):
            config(**bad).validate()


def test_refuses_to_clobber_or_resume_nothing(images, tmp_path):
    out = tmp_path / "run"
    train(images, out, config(max_steps=2), progress_bar=False)
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        train(images, out, config(max_steps=2), progress_bar=False)
    with pytest.raises(TrainingError, match="no training state"):
        train(images, tmp_path / "empty", config(), resume=True, progress_bar=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="cannot write to output folder"):
        train(images, blocker / "run", config(), progress_bar=False)


def test_a_full_disk_is_reported_before_training(images, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(TrainingError, match="MB free"):
        train(images, tmp_path / "run", config(), progress_bar=False)
    assert not (tmp_path / "run" / STATE_DIR).exists()


def test_bad_settings_are_named():
    with pytest.raises(TrainingError, match="multiple of 8"):
        TrainConfig(image_size=60).validate()
    with pytest.raises(TrainingError, match="preset"):
        TrainConfig(unet_preset="huge").validate()
    with pytest.raises(TrainingError, match="crop_size"):
        TrainConfig(image_size=32, crop_size=64).validate()


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # `--multi_gpu` makes accelerate start a torchrun group; without GPUs it runs on gloo (MULTI_CPU).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "data_parallel_train.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "all 2 processes hold the same weights" in proc.stdout + proc.stderr
    saved = json.loads((out / "cgdiff.json").read_text())
    assert saved["training"]["device"] == "cpu x 2"
    assert saved["training"]["batch_size"] == 4  # 2 per process
    assert json.loads((out / STATE_DIR / "progress.json").read_text())["step"] == 6


def test_callback_sees_progress_and_ema_reconstructions_without_changing_training(images, tmp_path):
    calls = []

    def look(status):
        rec = status.reconstruct(images[:2])
        calls.append((status.step, status.interval_steps, status.loss, status.seconds, tuple(rec.shape)))

    train(images, tmp_path / "plain", config(), progress_bar=False)
    train(images, tmp_path / "watched", config(), progress_bar=False, callback=look, callback_every=3)
    assert [c[:2] for c in calls] == [(3, 3), (6, 3), (8, 2)]
    assert all(c[2] > 0 and c[4] == (2, 3, 32, 32) for c in calls)
    assert calls[0][3] <= calls[1][3] <= calls[2][3]
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "watched")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(TrainingError, match="callback_every"):
        train(images, tmp_path / "bad", config(), progress_bar=False, callback=look, callback_every=0)


def test_training_can_keep_to_the_noise_levels_the_sampler_uses_and_weight_by_min_snr(images, tmp_path, monkeypatch):
    drawn = []
    randint = torch.randint

    def recording(low, high, size, **kw):
        drawn.append(high)
        return randint(low, high, size, **kw)

    monkeypatch.setattr(torch, "randint", recording)
    out = tmp_path / "run"
    plain = train(images, tmp_path / "plain", config(max_steps=3), progress_bar=False)
    assert 1000 in drawn  # the timesteps' draws (crops draw their own, smaller ranges)
    drawn.clear()
    det = train(images, out, config(max_steps=3, max_timestep=500, snr_gamma=5.0), progress_bar=False)
    assert 500 in drawn and 1000 not in drawn
    saved = json.loads((out / "cgdiff.json").read_text())["training"]["config"]
    assert saved["max_timestep"] == 500 and saved["snr_gamma"] == 5.0
    # The weighting changes the loss, hence the weights (same seed, same crops, same noise).
    differs = [not torch.equal(a, b) for a, b in zip(weights(out).values(), weights(tmp_path / "plain").values())]
    assert any(differs) and det.threshold > 0 and plain.threshold > 0
    for bad in (dict(max_timestep=0), dict(max_timestep=1001), dict(snr_gamma=-1.0), dict(snr_gamma=float("nan"))):
        with pytest.raises(TrainingError, match="max_timestep|snr_gamma"):
            config(**bad).validate()


def test_noise_to_norm_corrupts_a_region_and_trains_towards_the_clean_crop(images, tmp_path):
    from cgdiff.train import RandomCrops, corrupt_crop, noise_to_norm_target

    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)[:, :, :32, :32].contiguous()
    crop = pixels[0, :, :16, :16].float() / 127.5 - 1
    changed = []
    for seed in range(20):
        out = corrupt_crop(crop, pixels, np.random.default_rng(seed))
        assert out.shape == crop.shape and out.min() >= -1 and out.max() <= 1
        changed.append((out != crop).any(dim=0).float().mean().item())
    # a region of 3-25 % of the crop, of its own size per seed
    assert all(0.02 < c < 0.3 for c in changed) and len(set(changed)) > 5

    # Pairs from the dataset: (clean, input), the input corrupted about as often as asked.
    ds = RandomCrops(pixels, 16, 200, seed=1, flips=True, rotations=False, noise_to_norm=0.5)
    pairs = torch.stack([ds[i] for i in range(200)])
    assert pairs.shape == (200, 2, 3, 16, 16)
    corrupted = (pairs[:, 0] != pairs[:, 1]).flatten(1).any(dim=1).float().mean().item()
    assert 0.35 < corrupted < 0.65
    assert RandomCrops(pixels, 16, 4, seed=1, flips=True, rotations=False)[0].shape == (3, 16, 16)
    assert torch.equal(ds[7], ds[7])  # an item is its seed's, however often it is drawn
    # The fill never comes from a held-out stripe: mark the stripe with NaN and look for it.
    marked = pixels.float()
    marked[:, :, 24:] = float("nan")
    fills = lambda rows: [corrupt_crop(crop, marked, np.random.default_rng(s), rows) for s in range(60)]  # noqa: E731
    assert not any(out.isnan().any() for out in fills(24))
    assert any(out.isnan().any() for out in fills(None))  # the whole height: the stripe is drawn

    # The target's x0-estimate is the clean crop; a normal crop keeps the plain noise target.
    clean, inputs = pairs[:4, 0], pairs[:4, 1]
    inputs[0] = clean[0]
    noise = torch.randn_like(clean)
    abar = torch.tensor([0.3, 0.6, 0.9, 0.999]).view(-1, 1, 1, 1)
    target, weight = noise_to_norm_target(noise, inputs, clean, abar)
    x_t = abar.sqrt() * inputs + (1 - abar).sqrt() * noise
    torch.testing.assert_close((x_t - (1 - abar).sqrt() * target) / abar.sqrt(), clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(target[0], noise[0])
    snr = (abar / (1 - abar)).flatten()
    is_corrupted = (inputs != clean).flatten(1).any(dim=1)
    expected = torch.where(is_corrupted, snr.clamp(max=5) / snr, torch.ones(4))
    torch.testing.assert_close(weight, expected)

    # Training with it runs, records the share and refuses a share out of range.
    train(images, tmp_path / "n2n", config(max_steps=3, noise_to_norm=0.5), progress_bar=False)
    saved = json.loads((tmp_path / "n2n" / "cgdiff.json").read_text())["training"]["config"]
    assert saved["noise_to_norm"] == 0.5
    assert "noise-to-norm: 0.5 of the training crops" in (tmp_path / "n2n" / "README.md").read_text()
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(TrainingError, match="noise_to_norm"):
            config(noise_to_norm=bad).validate()
