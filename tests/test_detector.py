"""Detector: scoring, calibration, batch independence, checkpoint format and bad checkpoints."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cgdiff.detector import FORMAT_VERSION, Detector
from cgdiff.hub import CheckpointError
from cgdiff.scorer import Scorer, ScorerConfig


def test_detect_returns_a_consistent_result_per_image(tiny_detector):
    images = [np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    results = tiny_detector.detect(images)
    assert len(results) == 3
    for r in results:
        assert r.image.shape == r.reconstruction.shape == (32, 32, 3) and r.image.dtype == np.uint8
        assert r.anomaly_map.shape == (32, 32) and r.anomaly_map.dtype == np.float32
        assert r.score == pytest.approx(float(r.anomaly_map.max()))
        assert r.is_anomalous == bool(r.mask.any())  # verdict and mask agree by construction
        assert r.verdict in ("normal", "anomalous")


def test_an_image_scores_the_same_alone_or_in_any_batch(tiny_detector):
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    together = tiny_detector.detect(x, batch_size=4)
    pairs = tiny_detector.detect(x.flip(0), batch_size=2)[::-1]
    for i in range(4):
        alone = tiny_detector.detect(x[i : i + 1])[0]
        for other in (together[i], pairs[i]):
            assert alone.score == pytest.approx(other.score, rel=1e-4, abs=1e-6)
            np.testing.assert_allclose(alone.anomaly_map, other.anomaly_map, rtol=1e-3, atol=1e-5)


def test_identical_images_give_a_zero_map_and_a_difference_is_localised(backbone):
    scorer = Scorer(ScorerConfig(map_sigma=2.0), backbone)
    y = torch.rand(1, 3, 64, 64) * 2 - 1
    d_p, d_f = scorer.distances(y, y.clone())
    assert d_p.abs().max() == 0 and d_f.abs().max() < 1e-5
    x_rec = y.clone()
    x_rec[..., 40:52, 8:20] = -y[..., 40:52, 8:20]
    amap = scorer.combine(*scorer.distances(y, x_rec), pixel_scale=1.0)[0]
    row, col = np.unravel_index(int(amap.argmax()), amap.shape)
    assert 36 <= row <= 56 and 4 <= col <= 24


def test_calibration_uses_normal_images_only_and_follows_its_definition(backbone):
    scorer = Scorer(ScorerConfig(), backbone)
    g = torch.Generator().manual_seed(0)
    d_p = torch.rand(5, 32, 32, generator=g) * 0.1
    d_f = torch.rand(5, 32, 32, generator=g) * 0.6
    cal = scorer.calibrate(d_p, d_f, threshold_sigmas=3.0)
    assert cal.pixel_scale == pytest.approx(float(d_f.max() / d_p.max()))
    scores = scorer.combine(d_p, d_f, cal.pixel_scale).flatten(1).amax(1)
    assert cal.n_images == 5
    assert cal.threshold >= float(scores.max()) - 1e-6  # known-good data is never flagged
    assert cal.threshold == pytest.approx(max(float(scores.max()), float(scores.mean() + 3 * scores.double().std())), rel=1e-5)


def test_per_call_overrides_change_the_result_and_unknown_ones_are_refused(tiny_detector):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    base = tiny_detector.detect(x)[0]
    assert tiny_detector.detect(x, w=0.0)[0].score != pytest.approx(base.score)
    assert tiny_detector.detect(x, pixel_weight=0.0)[0].score != pytest.approx(base.score)
    assert tiny_detector.detect(x)[0].score == pytest.approx(base.score)  # overrides do not stick
    with pytest.raises(ValueError, match="unknown setting"):
        tiny_detector.detect(x, noise_level=3)
    with pytest.raises(ValueError, match="steps"):
        tiny_detector.detect(x, steps=0)


def test_maps_are_comparable_with_the_calibration_only_at_the_stored_settings(tiny_detector):
    # An image is called unlike the normal images only where its map can be set beside theirs.
    d = tiny_detector
    assert d.calibrated_for(*d.settings())
    assert d.calibrated_for(*d.settings(seed=d.sampler.seed + 1, t0=d.sampler.t0))  # the seed aside
    assert not d.calibrated_for(*d.settings(t0=d.sampler.t0 + 1))
    assert not d.calibrated_for(*d.settings(pixel_weight=d.scorer.config.pixel_weight + 1))


def test_save_and_load_round_trip(tiny_detector, tmp_path):
    tiny_detector.info["metrics"] = {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7, "dataset": "unit"}
    path = tiny_detector.save_pretrained(tmp_path / "ckpt")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "scheduler" / "scheduler_config.json").is_file()
    config = json.loads((path / "cgdiff.json").read_text())
    assert config["format_version"] == 1 and config["image_size"] == 32  # format 2 only with a second pass
    assert config["sampler"]["steps"] == 3 and config["calibration"]["threshold"] > 0
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: cgdiff" in card and "aupro" in card
    loaded = Detector.from_pretrained(path, device="cpu")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = tiny_detector.detect(x), loaded.detect(x)
    for ra, rb in zip(a, b):
        assert ra.score == pytest.approx(rb.score, rel=1e-5)
        assert ra.threshold == rb.threshold


def test_averaged_reconstructions_are_stored_and_scored_as_their_mean(tiny_detector, tmp_path):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    runs = [tiny_detector.reconstruct(x, tiny_detector.sampler.replace(seed=k)) for k in (0, 1)]
    averaged = tiny_detector.sampler.replace(samples=2)
    torch.testing.assert_close(tiny_detector.reconstruct(x, averaged), torch.stack(runs).mean(0))
    steps = []
    (result,) = tiny_detector.detect(x[:1], samples=2, progress=lambda i, n: steps.append((i, n)))
    assert steps[-1] == (6, 6)  # K = 3 steps, twice
    tiny_detector.sampler = averaged
    path = tiny_detector.save_pretrained(tmp_path / "ckpt")
    assert json.loads((path / "cgdiff.json").read_text())["sampler"]["samples"] == 2
    loaded = Detector.from_pretrained(path, device="cpu")
    assert loaded.sampler.samples == 2
    assert loaded.detect(x[:1])[0].score == pytest.approx(result.score, rel=1e-5)


def test_a_new_calibration_drops_the_record_of_the_normals_an_earlier_one_used(tiny_detector):
    from cgdiff.card import calibration_normals, render_model_card

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tiny_detector.info.update(calibration_normals="3 training-folder images (in-sample)",
                              tuning={"calibration_normals": "8 holdout images (not used in training)"},
                              training={"calibration_normals": "8 held-out training images (not used in training)",
                                        "steps": 10})
    assert calibration_normals(tiny_detector.info) == "3 training-folder images (in-sample)"
    tiny_detector.calibrate(x)  # other images: no earlier note may name them
    assert calibration_normals(tiny_detector.info) is None
    assert tiny_detector.info["training"] == {"steps": 10}
    card = render_model_card({**tiny_detector.info, "calibration": tiny_detector.calibration.to_dict()})
    assert "calibration on 2 normal images (which ones is not recorded)" in card


def test_the_second_pass_is_calibrated_on_the_first_pass_and_stored(tiny_detector, tmp_path):
    """With repaint_t0 > 0, c and the mask's threshold come from the first pass on the normals
    and the threshold from the second; the settings and the mask's threshold are stored."""
    import copy

    normals = torch.rand(3, 3, 32, 32) * 2 - 1
    one_pass = tiny_detector.calibrate(normals)
    assert one_pass.mask_threshold is None and "mask_threshold" not in one_pass.to_dict()
    two = copy.deepcopy(tiny_detector)
    two.sampler = two.sampler.replace(repaint_t0=300, repaint_steps=4)
    seen = []
    cal = two.calibrate(normals, progress=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (6, 6)  # every image twice: once per pass
    assert cal.mask_threshold == pytest.approx(one_pass.threshold) and cal.pixel_scale == one_pass.pixel_scale
    # Asked for per call, the detector calibrated without it draws the same mask (its normal tail).
    torch.testing.assert_close(tiny_detector.reconstruct(normals, two.sampler), two.reconstruct(normals))
    # The second pass's maps are the ones its threshold was fitted on.
    scores = [d.score for d in two.detect(normals)]
    assert cal.normal_scores == pytest.approx(scores, abs=1e-5)
    steps = []
    (result,) = two.detect(normals[:1], progress=lambda i, n: steps.append((i, n)))
    assert steps[-1] == (7, 7)  # K = 3, then K2 = 4
    path = two.save_pretrained(tmp_path / "ckpt")
    config = json.loads((path / "cgdiff.json").read_text())
    assert config["sampler"]["repaint_t0"] == 300 and config["calibration"]["mask_threshold"] == cal.mask_threshold
    assert config["format_version"] == FORMAT_VERSION == 2  # an older cgdiff says to upgrade
    assert "a second pass paints the pixels the first map marks" in (path / "README.md").read_text()
    loaded = Detector.from_pretrained(path, device="cpu")
    assert loaded.sampler == two.sampler and loaded.calibration.mask_threshold == cal.mask_threshold
    assert loaded.detect(normals[:1])[0].score == pytest.approx(result.score, rel=1e-4)
    assert "t2=300" in loaded.describe()
    # The second pass needs the first map's threshold, so a calibration.
    two.calibration = None
    with pytest.raises(RuntimeError, match="calibrate"):
        two.reconstruct(normals[:1])


def test_save_never_overwrites_by_accident_and_keeps_extra_files(tiny_detector, tmp_path):
    path = tiny_detector.save_pretrained(tmp_path / "ckpt")
    (path / "training_state").mkdir()
    (path / "training_state" / "progress.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):
        tiny_detector.save_pretrained(path)
    tiny_detector.sampler = tiny_detector.sampler.replace(w=1.5)
    tiny_detector.save_pretrained(path, overwrite=True)
    assert json.loads((path / "cgdiff.json").read_text())["sampler"]["w"] == 1.5
    assert (path / "training_state" / "progress.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_an_interrupted_save_leaves_the_old_checkpoint_intact(tiny_detector, tmp_path, monkeypatch):
    path = tiny_detector.save_pretrained(tmp_path / "ckpt")
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("cgdiff.detector.render_model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_detector.save_pretrained(path, overwrite=True)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    Detector.from_pretrained(path, device="cpu")


@pytest.fixture()
def saved(tiny_detector, tmp_path):
    return tiny_detector.save_pretrained(tmp_path / "ckpt")


def _edit_config(path, **changes):
    config = json.loads((path / "cgdiff.json").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    (path / "cgdiff.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(format_version=FORMAT_VERSION + 1), "newer cgdiff"),
        (dict(format_version="1"), "format_version"),
        (dict(image_size="256"), "image_size"),
        (dict(image_size=10**6), "image_size"),
        (dict(sampler=KeyError), "missing sampler"),
        (dict(sampler__w="three"), "sampler.w"),
        (dict(sampler__steps=2.5), "sampler.steps"),
        (dict(sampler__samples=2.5), "sampler.samples"),
        (dict(sampler__samples=0), "samples must be"),
        (dict(sampler__repaint_t0=2.5), "sampler.repaint_t0"),
        (dict(calibration__mask_threshold=-1.0), "mask_threshold"),
        (dict(sampler__attention=1), "unknown sampler"),
        (dict(scorer__backbone=3), "backbone"),
        (dict(calibration__threshold=None), "calibration.threshold"),
        (dict(calibration__pixel_scale=KeyError), "calibration must hold"),
    ],
)
def test_bad_configs_are_refused_by_name(saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(CheckpointError, match=message):
        Detector.from_pretrained(saved, device="cpu")


def test_missing_files_invalid_json_absurd_unet_and_pickles_are_refused(saved, tmp_path):
    def fresh_copy():
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved, target)
        return target

    broken = fresh_copy()
    (broken / "cgdiff.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Detector.from_pretrained(broken, device="cpu")

    broken = fresh_copy()
    unet_cfg = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "block_out_channels": [100000, 2]}))
    with pytest.raises(CheckpointError, match="block_out_channels"):
        Detector.from_pretrained(broken, device="cpu")

    broken = fresh_copy()
    (broken / "unet" / "diffusion_pytorch_model.safetensors").rename(broken / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights are not loaded"):
        Detector.from_pretrained(broken, device="cpu")

    broken = fresh_copy()
    (broken / "cgdiff.json").unlink()
    with pytest.raises(CheckpointError, match="missing cgdiff.json"):
        Detector.from_pretrained(broken, device="cpu")


def test_corrupt_weights_are_reported(tiny_detector, tmp_path):
    path = tiny_detector.save_pretrained(tmp_path / "ckpt")
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot load the U-Net"):
        Detector.from_pretrained(path, device="cpu")


def test_hub_ids_fail_fast_and_clearly_when_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.time()
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1.*local checkpoint folder") as caught:
        Detector.from_pretrained("someone/no-such-detector")
    assert time.time() - start < 10
    # A relative folder path from another working folder looks like a repo id: the message says both.
    assert f"No folder 'someone/no-such-detector' exists under {Path.cwd()} either" in str(caught.value)
    assert "Registry names: brick, grass, gravel." in str(caught.value)
    with pytest.raises(CheckpointError, match="neither an existing checkpoint folder nor"):
        Detector.from_pretrained("./no/such/folder/at/all")
    # A mistyped registry name gets the names there are.
    with pytest.raises(CheckpointError, match="neither an existing.*Registry names: brick, grass, gravel"):
        Detector.from_pretrained("brik")


def test_backbone_adaptation_lowers_its_loss_and_survives_save_and_load(tmp_path):
    from cgdiff.model import build_unet
    from cgdiff.sampler import SamplerConfig
    from cgdiff.scorer import build_backbone

    torch.manual_seed(0)
    det = Detector(build_unet("tiny", sample_size=32), Scorer(ScorerConfig(), build_backbone()),
                   SamplerConfig(steps=2), image_size=32)
    normal = torch.rand(4, 3, 32, 32) * 2 - 1
    history = det.adapt_backbone(normal, epochs=3, batch_size=2)
    assert len(history) == 3 and history[-1] < history[0]
    assert det.calibration is not None and det.info["backbone_adaptation"]["epochs"] == 3
    path = det.save_pretrained(tmp_path / "adapted")
    assert (path / "backbone.safetensors").is_file()
    loaded = Detector.from_pretrained(path, device="cpu")
    assert getattr(loaded.scorer.backbone, "adapted", False)
    assert loaded.detect(normal[:1])[0].score == pytest.approx(det.detect(normal[:1])[0].score, rel=1e-5)
    pristine = Detector.from_pretrained(path, device="cpu")
    pristine.scorer.backbone = build_backbone()
    assert pristine.detect(normal[:1])[0].score != pytest.approx(det.detect(normal[:1])[0].score, rel=1e-3)
