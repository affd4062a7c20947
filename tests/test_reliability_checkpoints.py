"""Untrusted checkpoints: weights load from safetensors only (a pickle is never unpickled, from a
folder or from a Hub repo, and never downloaded), no code from a checkpoint is imported, and a
config with absurd sizes or values is refused with a message that names the field, before
anything big is allocated. Wrong types, missing keys and newer format versions: test_detector."""

from __future__ import annotations

import builtins
import json
import pickle
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cgdiff.detector import Detector
from cgdiff.hub import CheckpointError
from hub_stub import HubStub

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class _Armed:
    """Unpickling this creates the marker file: what a malicious pickle would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def armed_pickle(marker: Path) -> bytes:
    data = pickle.dumps({"conv_in.weight": _Armed(marker)})
    pickle.loads(data)["conv_in.weight"].close()  # it really is armed ...
    assert marker.exists()
    marker.unlink()  # ... and disarmed again for the test
    return data


@pytest.fixture()
def saved(tiny_detector, tmp_path) -> Path:
    return tiny_detector.save_pretrained(tmp_path / "ckpt")


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "pickle-was-executed"


def copy_of(saved: Path, name: str) -> Path:
    target = saved.parent / name
    shutil.copytree(saved, target)
    return target


def test_a_folder_with_pickle_weights_only_is_refused_and_the_pickle_never_runs(saved, marker):
    folder = copy_of(saved, "pickled")
    (folder / WEIGHTS).unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(armed_pickle(marker))
    with pytest.raises(CheckpointError, match="pickle weights are not loaded"):
        Detector.from_pretrained(folder, device="cpu")
    assert not marker.exists()


def test_pickles_beside_safetensors_and_code_in_a_folder_are_ignored(saved, marker):
    folder = copy_of(saved, "mixed")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(armed_pickle(marker))
    (folder / "training_state").mkdir()  # accelerate's pickles: only `train --resume` reads them
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (folder / "training_state" / name).write_bytes(armed_pickle(marker))
    (folder / "evil_unet.py").write_text(f"open({str(marker)!r}, 'w')\n")  # "remote code"
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["auto_map"] = {"UNet2DModel": "evil_unet.UNet2DModel"}
    config["_class_name"] = "EvilUNet"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    detector = Detector.from_pretrained(folder, device="cpu")
    assert np.isfinite(detector.detect(torch.zeros(1, 3, 32, 32))[0].score)
    assert not marker.exists()


def _publish(stub: HubStub, repo: str, files: dict[str, bytes]) -> None:
    stub.repos[repo] = dict(files)
    stub.commits[repo] = ["1" * 40]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fetched(stub: HubStub) -> list[str]:
    return [r.split("/resolve/", 1)[1].split("/", 1)[1] for r in stub.requests if "/resolve/" in r]


def test_a_hub_repo_with_pickle_weights_is_refused_without_downloading_them(saved, marker, hub, tmp_path):
    files = _files(saved)
    del files[WEIGHTS]
    files["unet/diffusion_pytorch_model.bin"] = armed_pickle(marker)
    files["pytorch_model.bin"] = armed_pickle(marker)
    files["modeling_unet.py"] = f"open({str(marker)!r}, 'w')\n".encode()
    _publish(hub, "mallory/cgdiff-pickled", files)
    with pytest.raises(CheckpointError, match=r"missing unet/diffusion_pytorch_model.safetensors"):
        Detector.from_pretrained("mallory/cgdiff-pickled", device="cpu", endpoint=hub.url, cache_dir=tmp_path / "cache")
    fetched = _fetched(hub)
    assert "cgdiff.json" in fetched
    assert not [f for f in fetched if f.endswith((".bin", ".py", ".pkl"))], fetched
    assert not list((tmp_path / "cache").rglob("*.bin")) and not list((tmp_path / "cache").rglob("*.py"))
    assert not marker.exists()


def test_a_hub_repo_downloads_only_the_checkpoint_files(saved, marker, hub, tmp_path):
    files = _files(saved)
    files["unet/diffusion_pytorch_model.bin"] = armed_pickle(marker)
    files["text_encoder/model.safetensors"] = b"\0" * 4096  # another model's weights, not ours to fetch
    files["pipeline.py"] = f"open({str(marker)!r}, 'w')\n".encode()
    _publish(hub, "someone/cgdiff-plus-extras", files)
    detector = Detector.from_pretrained("someone/cgdiff-plus-extras", device="cpu", endpoint=hub.url,
                                        cache_dir=tmp_path / "cache")
    assert np.isfinite(detector.detect(torch.zeros(1, 3, 32, 32))[0].score)
    assert set(_fetched(hub)) <= {"cgdiff.json", "unet/config.json", WEIGHTS, "scheduler/scheduler_config.json",
                                  "README.md"}, _fetched(hub)
    assert not marker.exists()


def _edit(folder: Path, name: str, changes: dict) -> None:
    config = json.loads((folder / name).read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (folder / name).write_text(json.dumps(config))


ABSURD_CONFIGS = {
    "blur sigma 10^4 (a 40 GB blur)": ({"sampler.blur_sigma": 1e4}, "blur_sigma must be > 0 and at most 64"),
    "map sigma 10^4": ({"scorer.map_sigma": 1e4}, "map_sigma must be >= 0 and at most 64"),
    "a 100-bit seed": ({"sampler.seed": 10**30}, "seed must be a whole number that fits in 64 bits"),
    "a negative threshold": ({"calibration.threshold": -1.0}, "calibration.threshold must be >= 0"),
    "a pixel scale of 1e308": ({"calibration.pixel_scale": 1e308}, "calibration.pixel_scale must be above 0"),
    "a zero pixel scale": ({"calibration.pixel_scale": 0.0}, "calibration.pixel_scale must be above 0"),
    "no calibration images": ({"calibration.n_images": 0}, "calibration.n_images must be a whole number"),
    "half a calibration image": ({"calibration.n_images": 2.5}, "calibration.n_images must be a whole number"),
    "a negative spread": ({"calibration.score_std": -1.0}, "calibration.score_std must be >= 0"),
    "an unknown threshold rule": ({"calibration.threshold_rule": "median"}, "calibration.threshold_rule must be one of"),
    "a string for K": ({"sampler.steps": "10"}, "sampler.steps must be a number"),
    "an image size of 0": ({"image_size": 0}, "image_size must be a whole number in"),
}

ABSURD_UNETS = {
    "a 10^7-wide time embedding (400 TB)": ({"time_embedding_dim": 10**7}, r"describes a U-Net of [\d,]+ M parameters"),
    "10^8 class embeddings": ({"num_class_embeds": 10**8}, r"describes a U-Net of [\d,]+ M parameters"),
    "eight levels of 2048 channels": (
        {"block_out_channels": [2048] * 8, "layers_per_block": 8, "down_block_types": ["DownBlock2D"] * 8,
         "up_block_types": ["UpBlock2D"] * 8, "norm_num_groups": 32}, r"describes a U-Net of [\d,]+ M parameters"),
    "a million channels": ({"block_out_channels": [10**6, 32, 64, 64]}, "block_out_channels"),
    "a string for a size": ({"layers_per_block": "2"}, "absurd U-Net size"),
    "zero attention heads": ({"attention_head_dim": 0}, "does not describe a valid U-Net"),
    "a block type that names a function": ({"down_block_types": ["os.system"] * 4}, "does not describe a valid U-Net"),
    "channels that groups do not divide": ({"norm_num_groups": 7}, "does not describe a valid U-Net"),
    "a one-channel denoiser": ({"in_channels": 1}, "3-channel"),
}


@pytest.mark.parametrize("name", list(ABSURD_CONFIGS) + list(ABSURD_UNETS))
def test_absurd_configs_are_refused_by_name_without_allocating(saved, name):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if name in ABSURD_CONFIGS:
        changes, message = ABSURD_CONFIGS[name]
        _edit(saved, "cgdiff.json", changes)
    else:
        changes, message = ABSURD_UNETS[name]
        _edit(saved, "unet/config.json", changes)
    with pytest.raises(CheckpointError, match=message):
        Detector.from_pretrained(saved, device="cpu")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 300, f"refusing it took {grown_mb:.0f} MB"


def test_weights_holding_nan_are_refused(saved):
    weights = load_file(saved / WEIGHTS)
    name = next(iter(weights))
    weights[name][..., 0] = float("nan")
    save_file(weights, saved / WEIGHTS)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        Detector.from_pretrained(saved, device="cpu")


def test_settings_that_make_the_map_nan_are_an_error_not_a_normal_verdict(tiny_detector):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(ValueError, match="came out NaN or infinite.*w=1e\\+30"):
        tiny_detector.detect(x, w=1e30)
    with pytest.raises(ValueError, match="blur_sigma must be > 0 and at most 64"):
        tiny_detector.detect(x, blur_sigma=1e4)
    with pytest.raises(ValueError, match="map_sigma"):
        tiny_detector.detect(x, map_sigma=1e6)
    assert np.isfinite(tiny_detector.detect(x)[0].score)  # and it still works
