"""Training faults: the trainer killed mid-run (SIGTERM, and SIGKILL in the middle of a state
write) and resumed, a state write that fails on a full disk, a replacement cut off between its
renames, outputs that cannot be written, a dataset with a corrupt image. The goal: nothing lost.

The kill tests run `python -m cgdiff train` as a real process on a folder of four 40 px images
(32 px working size, the tiny U-Net, a state save every 5 steps) and compare the resumed run
with an uninterrupted one: on a CPU a resume is exact, so the final EMA weights, the optimiser
state and the logged losses must match."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cgdiff import hub
from cgdiff.cli import main
from cgdiff.hub import atomic_replace_dir, recover_replaced_dir
from cgdiff.train import STATE_DIR, TrainConfig, TrainingError, _trim_log, check_output_folder, train

STEPS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CGDIFF_DEBUG": "", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("normal")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--image-size", "32", "--crop-size", "16",
            "--batch-size", "2", "--max-steps", str(STEPS), "--save-every", "5", "--seed", "1", "--steps", "2",
            "--guidance-scale", "0", "--backbone", "efficientnet-lite0", "--no-progress", *extra]


def start(args: list[str], prelude: str = "") -> subprocess.Popen:
    """`python -m cgdiff ARGS`, or the same CLI behind `prelude` (a patch) in one process."""
    if prelude:
        code = f"{prelude}\nimport sys\nfrom cgdiff.cli import main\nsys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "cgdiff", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def saved_step(out: Path) -> int:
    try:
        return json.loads((out / STATE_DIR / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError("the trainer ended before the fault was injected:\n" + "".join(proc.communicate()))
        assert time.monotonic() < deadline, "the trainer never reached the point of the fault"
        time.sleep(0.01)


def losses(out: Path) -> list[tuple[str, str]]:
    rows = (out / "training_log.csv").read_text().splitlines()[1:]
    return [tuple(r.split(",")[:2]) for r in rows]


def assert_same_training(a: Path, b: Path) -> None:
    """Same final EMA weights (the checkpoint), model, EMA and Adam state, and logged losses."""
    wa, wb = load_file(a / "unet" / "diffusion_pytorch_model.safetensors"), load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=f"EMA weight {k}")
    ma, mb = load_file(a / STATE_DIR / "model.safetensors"), load_file(b / STATE_DIR / "model.safetensors")
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-5, atol=1e-6, msg=f"model weight {k}")
    oa = torch.load(a / STATE_DIR / "optimizer.bin", weights_only=True)
    ob = torch.load(b / STATE_DIR / "optimizer.bin", weights_only=True)
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa["state"][i][key], ob["state"][i][key], rtol=1e-5, atol=1e-8)
    ea = torch.load(a / STATE_DIR / "custom_checkpoint_0.pkl", weights_only=True)
    eb = torch.load(b / STATE_DIR / "custom_checkpoint_0.pkl", weights_only=True)
    assert ea["optimization_step"] == eb["optimization_step"] == STEPS
    for x, y in zip(ea["shadow_params"], eb["shadow_params"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert losses(a) == losses(b) and len(losses(a)) == STEPS // 10
    assert json.loads((a / "cgdiff.json").read_text())["training"]["steps"] == STEPS


def leftovers(out: Path) -> list[str]:
    names = [p.name for p in out.iterdir()] + [p.name for p in out.parent.iterdir()]
    return [n for n in names if ".tmp-" in n or ".old-" in n]


class Reference:
    """The uninterrupted run, started at once and awaited only when compared with."""

    def __init__(self, data: Path, out: Path):
        self.out = out
        self.proc = start(train_args(data, out))

    @property
    def path(self) -> Path:
        if self.proc.returncode is None:
            code, log = finish(self.proc)
            assert code == 0, log
        return self.out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    ref = Reference(data, tmp_path_factory.mktemp("runs") / "straight")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.communicate()


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(data, reference, tmp_path):
    out = tmp_path / "sigterm"
    proc = start(train_args(data, out))
    wait_for(lambda: saved_step(out) >= 5, proc)
    proc.send_signal(signal.SIGSTOP)  # hold it still after a save, then terminate it
    stopped_at = saved_step(out)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    code, log = finish(proc)
    assert code == 130, log
    assert "state saved" in log and "--resume" in log
    step = saved_step(out)
    assert stopped_at <= step < STEPS, (stopped_at, step)  # saved at the end of the step it was on
    assert not (out / "cgdiff.json").exists()

    code, log = finish(start(train_args(data, out, "--resume")))
    assert code == 0, log
    assert f"resuming from step {step}" in log
    assert_same_training(reference.path, out)
    assert not leftovers(out)


KILL_DURING_THIRD_SAVE = """
import os, time
from pathlib import Path
import accelerate
real = accelerate.Accelerator.save_state
calls = []
def save_state(self, output_dir=None, **kwargs):
    result = real(self, output_dir, **kwargs)
    calls.append(output_dir)
    if len(calls) == 3:  # step 15: cut the optimiser file in half, as a kill mid-write would
        path = Path(output_dir) / "optimizer.bin"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        Path(os.environ["KILL_MARKER"]).write_text(output_dir)
        time.sleep(600)
    return result
accelerate.Accelerator.save_state = save_state
"""


def test_sigkill_in_the_middle_of_a_state_write_keeps_the_last_good_state(data, reference, tmp_path):
    out = tmp_path / "sigkill"
    marker = tmp_path / "writing"
    ENV["KILL_MARKER"] = str(marker)
    try:
        proc = start(train_args(data, out), prelude=KILL_DURING_THIRD_SAVE)
        wait_for(marker.exists, proc)
    finally:
        del ENV["KILL_MARKER"]
    before = {p.name: p.read_bytes() for p in (out / STATE_DIR).iterdir()}
    proc.send_signal(signal.SIGKILL)
    code, _ = finish(proc)
    assert code == -signal.SIGKILL
    half_written = Path(marker.read_text())
    assert half_written.is_dir() and half_written.parent == out  # the write that was cut off
    assert saved_step(out) == 10, "the state of the previous save is still the current one"
    assert {p.name: p.read_bytes() for p in (out / STATE_DIR).iterdir()} == before

    code, log = finish(start(train_args(data, out, "--resume")))
    assert code == 0, log
    assert "resuming from step 10" in log and "removed 1 unfinished folder" in log
    assert not half_written.exists() and not leftovers(out)
    assert_same_training(reference.path, out)


# ------------------------------------------------------------------ in-process fault injection


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]


def small(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(image_size=32, crop_size=16, batch_size=2, max_steps=8, save_every=4, log_every=1,
                                 seed=3), **kw})


def test_a_full_disk_during_a_save_keeps_the_last_state_and_resume_loses_nothing(images, tmp_path, monkeypatch):
    import accelerate

    straight = tmp_path / "straight"
    train(images, straight, small(), progress_bar=False)

    real = accelerate.Accelerator.save_state
    calls = []

    def disk_full_on_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # part of it got written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return real(self, output_dir, **kwargs)

    out = tmp_path / "full"
    monkeypatch.setattr(accelerate.Accelerator, "save_state", disk_full_on_second_save)
    with pytest.raises(TrainingError, match=r"could not save the training state of step 8.*No space left on "
                                            r"device.*MB free.*state of step 4 is kept.*--resume"):
        train(images, out, small(), progress_bar=False)
    assert saved_step(out) == 4 and not leftovers(out)
    monkeypatch.setattr(accelerate.Accelerator, "save_state", real)

    train(images, out, small(), resume=True, progress_bar=False)
    a, b = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors"), load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert losses(straight) == losses(out)


def test_a_disk_too_small_for_the_model_is_refused_before_training(images, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=500 * 2**20))
    train(images, tmp_path / "tiny", small(max_steps=1), progress_bar=False)  # 1.6 M parameters fit
    with pytest.raises(TrainingError, match=r"only 500 MB free.*need at least 1\d\d\d MB"):
        train(images, tmp_path / "paper", small(unet_preset="paper", image_size=64, crop_size=32), progress_bar=False)
    assert not (tmp_path / "paper" / STATE_DIR).exists() and not (tmp_path / "paper" / "training_log.csv").exists()


def test_an_unwritable_output_is_named_before_training(data, tmp_path, monkeypatch, capsys):
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert main(train_args(data, tmp_path / "ro")) == 2
    err = capsys.readouterr().err
    assert "cannot write to output folder" in err and "Read-only file system" in err and "Traceback" not in err
    assert not (tmp_path / "ro" / STATE_DIR).exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(train_args(data, blocker / "run")) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_a_replacement_cut_off_between_its_renames_is_recovered(images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(images, out, small(max_steps=4), progress_bar=False)
    good = {p.name: p.read_bytes() for p in (out / STATE_DIR).iterdir()}

    # Without an atomic exchange a failing second rename puts the old folder back at once.
    monkeypatch.setattr(hub, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(f".{STATE_DIR}.tmp-"):
            raise OSError(errno.EIO, "simulated failure")
        return real_rename(src, dst)

    new = hub.temp_dir_beside(out / STATE_DIR)
    (new / "progress.json").write_text("{}")
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="simulated"):
        atomic_replace_dir(new, out / STATE_DIR, keep_extra=False)
    monkeypatch.setattr(os, "rename", real_rename)
    assert {p.name: p.read_bytes() for p in (out / STATE_DIR).iterdir()} == good

    # A kill between the renames leaves the old folder aside: the next run puts it back.
    aside = out / f".{STATE_DIR}.old-12345678"
    os.rename(out / STATE_DIR, aside)
    check_output_folder(out, resume=True, overwrite=False)
    assert {p.name: p.read_bytes() for p in (out / STATE_DIR).iterdir()} == good
    assert not recover_replaced_dir(out / STATE_DIR)  # nothing left to recover
    train(images, out, small(max_steps=8), resume=True, progress_bar=False)
    assert saved_step(out) == 8 and not leftovers(out)


def test_the_atomic_exchange_swaps_whole_folders(tmp_path):
    target, new = tmp_path / "state", tmp_path / ".state.tmp-1"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    atomic_replace_dir(new, target, keep_extra=False)
    assert [p.name for p in target.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_a_log_cut_mid_row_is_trimmed_to_the_saved_step(tmp_path):
    log = tmp_path / "training_log.csv"
    log.write_text("step,loss,learning_rate,seconds\n1,0.5,0.0003,1.0\n2,0.4,0.0003,2.0\n3,0.3,0.0003,3.0\n4,0.2")
    _trim_log(log, 3)
    assert log.read_text() == "step,loss,learning_rate,seconds\n1,0.5,0.0003,1.0\n2,0.4,0.0003,2.0\n3,0.3,0.0003,3.0\n"
    log.write_text("")  # killed while the log was first written
    _trim_log(log, 3)
    assert log.read_text() == "step,loss,learning_rate,seconds\n"


# ------------------------------------------------------------------------------ data faults


def test_a_corrupt_image_in_the_middle_of_a_dataset_is_named_and_skipped_only_when_asked(data, tmp_path, capsys):
    folder = tmp_path / "with_a_bad_one"
    folder.mkdir()
    for i, p in enumerate(sorted(data.iterdir())):
        (folder / p.name).write_bytes(p.read_bytes())
    good = (folder / "img2.png").read_bytes()
    (folder / "img2.png").write_bytes(good[: len(good) // 2])  # cut short, as by a failed copy

    args = train_args(folder, tmp_path / "run")
    args[args.index("--max-steps") + 1] = "2"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "img2.png" in err and "truncated or corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "run" / STATE_DIR).exists()

    assert main(args + ["--skip-unreadable"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 1 unreadable file" in err and "img2.png" in err
    saved = json.loads((tmp_path / "run" / "cgdiff.json").read_text())
    assert saved["training"]["n_images"] == 3 and "img2.png" not in saved["training"]["images"]
