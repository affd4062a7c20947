"""cgdiff.teaching: the trajectory, the ablations, the ground truth of bundled examples and the
rule for images unlike the model's normal images, on the bundled brick checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cgdiff import teaching
from cgdiff.registry import known_checkpoints
from cgdiff.sampler import SamplerConfig
from cgdiff.scorer import Calibration

BUNDLED = {e.name: e for e in known_checkpoints() if e.bundled and e.examples()}
pytestmark = pytest.mark.skipif("brick" not in BUNDLED, reason="needs the bundled brick checkpoint")


@pytest.fixture(scope="module")
def brick():
    from cgdiff.detector import Detector

    return Detector.from_pretrained(str(BUNDLED["brick"].path), device="cpu")


def _calibration(mean: float, std: float) -> Calibration:
    return Calibration(pixel_scale=1.0, threshold=mean + 3 * std, score_mean=mean, score_std=std, n_images=10)


def test_the_rule_reads_the_calibration_not_the_image():
    cal = _calibration(0.4, 0.05)  # level 0.45
    local = np.full((32, 32), 0.2)
    local[:8, :8] = 2.0  # a strong but local defect
    assert not teaching.familiarity(local, cal).unfamiliar
    raised = np.full((32, 32), 0.5)  # the whole map above the level, though below the threshold 0.55
    f = teaching.familiarity(raised, cal)
    assert f.unfamiliar and f.fraction == 1.0 and f.level == pytest.approx(0.45)
    # The same map against normal images that score higher is familiar again.
    assert not teaching.familiarity(raised, _calibration(0.6, 0.05)).unfamiliar
    assert "unlike the brick images" in f.describe("brick")
    with pytest.raises(ValueError, match="calibrated detector"):
        teaching.familiarity(raised, None)
    with pytest.raises(ValueError, match="H x W"):
        teaching.familiarity(np.zeros(5), cal)


def test_foreign_images_are_unfamiliar_and_the_examples_are_not(brick):
    rng = np.random.default_rng(0)
    own = [str(p) for p in BUNDLED["brick"].examples()]
    foreign = [str(p) for name, e in BUNDLED.items() if name != "brick" for p in e.examples()[-2:]]
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    import skimage.data

    results = brick.detect(own + foreign + [noise, skimage.data.astronaut()])
    flags = [teaching.familiarity(r.anomaly_map, brick.calibration).unfamiliar for r in results]
    assert not any(flags[: len(own)]), "a bundled brick example (normal or defect) was called unfamiliar"
    assert all(flags[len(own):]), "another texture, noise or a portrait passed as brick"
    assert any(r.is_anomalous for r in results[: len(own)]), "the defect examples are still found as defects"


def test_the_trajectory_follows_the_sampler(brick):
    image = str(BUNDLED["brick"].examples()[0])
    one = dict(t0=175, samples=1)  # pinned: the test does not follow the bundled settings
    traj = teaching.trajectory(brick, image, steps=3, guidance_scale=0.5, **one)
    assert [s.t for s in traj.steps] == [175, 88, 0] and traj.steps[-1].next_t == -1
    assert all(s.x0_blurred is not None for s in traj.steps)
    assert all(s.x_t.shape == (128, 128, 3) and s.x_t.dtype == np.uint8 for s in traj.steps)
    # The start is the input noised: far from the input, and further than the last state.
    d = lambda a, b: np.abs(a.astype(float) - b.astype(float)).mean()  # noqa: E731
    assert d(traj.start, traj.detection.image) > 2 * d(traj.steps[-1].x_t, traj.detection.image)
    # The same reconstruction and score as detect() at these settings.
    same = brick.detect(image, steps=3, guidance_scale=0.5, **one)[0]
    assert traj.detection.score == pytest.approx(same.score, rel=1e-5)
    off = teaching.trajectory(brick, image, steps=2, guidance_scale=0.0, **one)
    assert len(off.steps) == 2 and all(s.x0_blurred is None for s in off.steps)
    # Averaged reconstructions: the steps of the first run, the score of the mean as detect() has it.
    mean = teaching.trajectory(brick, image, steps=2, guidance_scale=0.0, t0=175, samples=2)
    assert [s.t for s in mean.steps] == [s.t for s in off.steps]
    assert np.array_equal(mean.steps[0].x_t, off.steps[0].x_t)
    assert mean.detection.score == pytest.approx(
        brick.detect(image, steps=2, guidance_scale=0.0, t0=175, samples=2)[0].score, rel=1e-5)


def test_ablations_switch_off_one_strategy_each(brick):
    image = str(BUNDLED["brick"].examples()[0])
    seen = []
    # brick's second pass off and one run (not its N = 2): the paper's strategies.
    one_pass = dict(steps=2, guidance_scale=0.5, repaint_t0=0, samples=1)
    variants = teaching.ablations(brick, image, progress=lambda i, n: seen.append((i, n)), **one_pass)
    assert [v.key for v in variants] == ["full", "pure_noise", "no_conditioning", "no_guidance"]
    assert [v.changes for v in variants] == [{}, {"t0": 1000}, {"w": 0.0}, {"guidance_scale": 0.0}]
    cost = teaching.ablation_cost(brick, **one_pass)
    assert cost == {"reconstructions": 4, "model_calls": 4 + 4 + 4 + 2, "full_model_calls": 4}
    # With its second pass every variant keeps it, at K2 more calls each, and the full row says so.
    k2 = brick.sampler.repaint_model_calls()
    assert brick.sampler.repaint_t0 > 0 and teaching.ablation_cost(brick, steps=2, guidance_scale=0.5, samples=1) == {
        "reconstructions": 4, "model_calls": 14 + 4 * k2, "full_model_calls": 4 + k2}
    assert seen[-1] == (14, 14) and [i for i, _ in seen] == sorted(i for i, _ in seen)
    full, noise = variants[0].detection, variants[1].detection
    # A pure-noise start loses the image: its reconstruction is far further from the input.
    assert np.abs(noise.reconstruction.astype(float) - noise.image).mean() > \
        3 * np.abs(full.reconstruction.astype(float) - full.image).mean()
    assert all(v.line for v in variants) and "full method" in variants[1].line
    assert "more than the full method's" in variants[1].line  # the line compares what it measured
    # Where a variant changes nothing measurable, its line says so rather than claim an effect.
    same = teaching.describe_change("no_conditioning", full, full)
    assert "lets the reconstruction drift" in same and "about the same as the full method's" in same
    # At the model's own settings (s = 0) the last row switches blur guidance on instead.
    stored = teaching.ablations(brick, image, full=full, steps=2, repaint_t0=0, samples=1)
    assert stored[-1].key == "with_guidance" and stored[-1].changes == {"guidance_scale": teaching.GUIDANCE_DEMO_SCALE}
    assert stored[0].detection is full
    assert "then the second pass from t2 = " in teaching.describe_change("full", full, full, 400)


def test_bundled_examples_bring_their_ground_truth(tmp_path):
    examples = [p for e in BUNDLED.values() for p in e.examples()]
    defect = next(p for p in BUNDLED["brick"].examples() if p.name.startswith("defect"))
    copy = tmp_path / "upload.png"
    copy.write_bytes(defect.read_bytes())  # an upload of the same file, under another name
    truth = teaching.example_truth(copy, examples)
    assert truth is not None and truth.example == defect
    assert truth.mask.dtype == bool and 0 < truth.mask.mean() < 0.5
    image = np.asarray(Image.open(defect).convert("RGB")).astype(int)
    changed = np.abs(image - truth.clean).sum(axis=-1) > 0
    assert changed.any() and not (changed & ~truth.mask).any(), "the defect lies inside its mask"
    normal = teaching.example_truth(BUNDLED["brick"].examples()[-1], examples)
    assert normal is not None and not normal.mask.any()
    other = tmp_path / "other.png"
    Image.fromarray((image[::-1]).astype(np.uint8)).save(other)
    assert teaching.example_truth(other, examples) is None
    assert teaching.example_truth(tmp_path / "missing.png", examples) is None


def test_known_texture_comes_from_the_training_record(brick):
    assert teaching.known_texture(brick.info) == "brick"
    assert teaching.known_texture({"training": {"data": "/data/mvtec/leather/"}}) == "leather"
    assert teaching.known_texture({}) is None


def test_the_rows_fixed_names_follow_the_variants_in_order():
    # The app labels each row's pictures with these names before any run.
    for s in (0.0, 0.5):
        titles = [title for _, title, _ in teaching.variant_settings(SamplerConfig(guidance_scale=s))]
        assert len(titles) == len(teaching.VARIANT_ROWS)
        assert all(title.startswith(row) for title, row in zip(titles[:3], teaching.VARIANT_ROWS))
        assert "blur guidance" in titles[3].lower()
