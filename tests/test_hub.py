"""Pushing to and loading from the Hub, against a local stand-in for its HTTP API."""

import huggingface_hub.constants
import pytest
import torch

from cgdiff.detector import Detector
from cgdiff.hub import CheckpointError, push_folder


def test_push_then_load_from_the_hub(tiny_detector, tmp_path, hub):
    url = tiny_detector.push_to_hub("someone/cgdiff-unit", endpoint=hub.url)
    files = hub.repos["someone/cgdiff-unit"]
    assert {"cgdiff.json", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pkl", ".pt")) for name in files)  # safetensors only
    assert b'Detector.from_pretrained("someone/cgdiff-unit")' in files["README.md"]
    assert "someone/cgdiff-unit" in url
    assert not hub.unhandled, hub.unhandled
    assert hub.validated and hub.validated[0].startswith("---")  # the card passed YAML validation

    loaded = Detector.from_pretrained("someone/cgdiff-unit", device="cpu", endpoint=hub.url,
                                      cache_dir=tmp_path / "cache")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loaded.detect(x)[0].score == pytest.approx(tiny_detector.detect(x)[0].score, rel=1e-5)


def test_pushing_a_folder_leaves_training_state_behind(tiny_detector, tmp_path, hub):
    folder = tiny_detector.save_pretrained(tmp_path / "ckpt")
    (folder / "training_state").mkdir()
    (folder / "training_state" / "optimizer.bin").write_bytes(b"pickle")
    (folder / "examples").mkdir()
    (folder / "examples" / "defect_000.png").write_bytes(b"\x89PNG")
    push_folder(folder, "someone/with-state", endpoint=hub.url)
    names = set(hub.repos["someone/with-state"])
    assert "examples/defect_000.png" in names
    assert not any(n.startswith("training_state") for n in names)


def test_a_missing_repo_is_named(tmp_path, hub):
    with pytest.raises(CheckpointError, match="does not exist or is private"):
        Detector.from_pretrained("someone/not-there", device="cpu", endpoint=hub.url, cache_dir=tmp_path)


def test_push_refuses_offline_and_incomplete_folders(tiny_detector, tmp_path, monkeypatch):
    folder = tiny_detector.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        push_folder(folder, "someone/x")
    (folder / "cgdiff.json").unlink()
    with pytest.raises(CheckpointError, match="missing cgdiff.json"):
        push_folder(folder, "someone/x")


def test_cgdiff_push_command(tiny_detector, tmp_path, hub, monkeypatch, capsys):
    from cgdiff.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    folder = tiny_detector.save_pretrained(tmp_path / "ckpt")
    assert main(["push", str(folder), "someone/pushed"]) == 0
    assert "pushed" in capsys.readouterr().out
    files = hub.repos["someone/pushed"]
    assert b'"hub_repo_id": "someone/pushed"' in files["cgdiff.json"]
    assert main(["push", str(folder), "not a repo id"]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err
