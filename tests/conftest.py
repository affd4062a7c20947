import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Runtime exports (cgdiff.runtime) go to one folder per test session, never the user's cache;
# app servers the tests start inherit it.
if not os.environ.get("CGDIFF_CACHE"):
    import tempfile

    os.environ["CGDIFF_CACHE"] = tempfile.mkdtemp(prefix="cgdiff-test-cache-")
LEATHER = Path(os.environ.get("CGDIFF_LEATHER", REPO.parent / "shared" / "data" / "mvtec_leather_mini" / "leather"))



@pytest.fixture(scope="session")
def leather_root() -> Path:
    """The real MVTec AD leather subset (read in place, never copied into the repo)."""
    if not (LEATHER / "train" / "good").is_dir():
        pytest.skip(f"MVTec leather subset not found at {LEATHER} (set CGDIFF_LEATHER to its path)")
    return LEATHER


@pytest.fixture(scope="session")
def backbone():
    from cgdiff.scorer import build_backbone

    return build_backbone("efficientnet-lite0")


@pytest.fixture()
def tiny_detector(backbone):
    """An untrained tiny detector (random U-Net, real backbone) at 32 px, calibrated on noise."""
    from cgdiff.detector import Detector
    from cgdiff.model import build_unet
    from cgdiff.sampler import SamplerConfig
    from cgdiff.scorer import Scorer, ScorerConfig

    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=32)
    det = Detector(unet, Scorer(ScorerConfig(), backbone), SamplerConfig(steps=3), image_size=32)
    det.calibrate(torch.rand(3, 3, 32, 32) * 2 - 1)
    return det


@pytest.fixture()
def hub(monkeypatch):
    """The Hub client online (the suite runs with HF_HUB_OFFLINE=1), talking only to a local
    stand-in for the Hub's HTTP API (tests/hub_stub.py)."""
    import huggingface_hub.constants
    from hub_stub import HubStub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", "hf_stub_token")
    with HubStub() as stub:
        yield stub
