"""Evaluation: metrics agree with the detector and cgdiff.metrics, reconstructions are reusable."""

import numpy as np
import pytest

from cgdiff.data import DatasetError, build_texture_dataset, load_dataset
from cgdiff.evaluation import evaluate, reconstruct_dataset, resize_maps, save_map_images, score_reconstructions
from cgdiff.metrics import evaluate as reference_metrics

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tex")
    folder = build_texture_dataset(root, textures=("gravel",), tile_size=64, train_stride=128,
                                   n_test_good=3, n_test_defect=1, seed=1)["gravel"]
    return load_dataset(folder)


def test_evaluate_reports_every_metric_as_a_fraction_with_its_settings(tiny_detector, dataset):
    r = evaluate(tiny_detector, dataset, mask_size=48)
    for key in METRICS:
        assert 0.0 <= r[key] <= 1.0, key
    assert r["n_images"] == len(dataset.test) == r["n_normal"] + r["n_anomalous"]
    assert r["mask_size"] == 48 and r["image_size"] == 32 and r["aupro_fpr_limit"] == 0.3
    assert r["seconds_per_image"] >= r["reconstruction_seconds_per_image"] > 0
    assert r["sampler"] == tiny_detector.sampler.to_dict()
    assert r["scorer"] == tiny_detector.scorer.config.to_dict()
    assert r["at_threshold"] is not None and r["overrides"] == {}
    # Per-image scores are exactly what Detector.detect reports for each image alone.
    first = r["per_image"][0]
    assert first["score"] == pytest.approx(tiny_detector.detect(first["path"])[0].score, rel=1e-5)


def test_metrics_are_cgdiffs_on_raw_maps_at_the_mask_size(tiny_detector, dataset):
    recs = reconstruct_dataset(tiny_detector, dataset, mask_size=48)
    scored = score_reconstructions(tiny_detector, recs)
    assert scored.maps.shape == (len(recs), 32, 32) and recs.masks.shape == (len(recs), 48, 48)
    expected = reference_metrics(recs.labels, scored.maps.max(axis=(1, 2)), recs.masks, resize_maps(scored.maps, 48))
    for key in METRICS:
        assert scored.metrics[key] == pytest.approx(expected[key]), key
    # No test-set normalisation: an image's map does not depend on the other test images.
    subset = load_dataset(dataset.root)
    subset.test = subset.test[-2:]
    alone = score_reconstructions(tiny_detector, reconstruct_dataset(tiny_detector, subset, mask_size=48))
    np.testing.assert_allclose(alone.maps, scored.maps[-2:], rtol=1e-4, atol=1e-6)


def test_scorer_sweeps_reuse_the_reconstructions(tiny_detector, dataset, monkeypatch):
    recs = reconstruct_dataset(tiny_detector, dataset, mask_size=32)
    base = score_reconstructions(tiny_detector, recs)
    monkeypatch.setattr(tiny_detector, "reconstruct", lambda *a, **k: pytest.fail("reconstructed again"))
    swept = score_reconstructions(tiny_detector, recs, {"pixel_weight": 0.25, "map_sigma": 2.0})
    assert swept.metrics["scorer"]["pixel_weight"] == 0.25 and swept.metrics["at_threshold"] is None
    assert not np.allclose(swept.maps, base.maps)
    # feature_smoothing changes the feature distances themselves (a fresh backbone pass).
    smooth1 = score_reconstructions(tiny_detector, recs, {"feature_smoothing": 1})
    assert not np.allclose(smooth1.maps, base.maps)
    again = score_reconstructions(tiny_detector, recs)
    np.testing.assert_allclose(again.maps, base.maps, rtol=1e-6)
    monkeypatch.undo()
    direct = evaluate(tiny_detector, dataset, mask_size=32, pixel_weight=0.25, map_sigma=2.0)
    assert direct["pixel_auroc"] == pytest.approx(swept.metrics["pixel_auroc"])
    assert direct["overrides"] == {"pixel_weight": 0.25, "map_sigma": 2.0}
    with pytest.raises(ValueError, match="reconstruct_dataset again"):
        score_reconstructions(tiny_detector, recs, {"w": 1.0})


def test_maps_are_saved_per_test_image(tiny_detector, dataset, tmp_path):
    recs = reconstruct_dataset(tiny_detector, dataset, mask_size=32)
    written = save_map_images(recs, score_reconstructions(tiny_detector, recs), tmp_path, tiny_detector.threshold)
    assert len(written) == 2 * len(recs) and all(p.is_file() for p in written)
    assert {p.parent.name for p in written} == set(recs.defect_types)


def test_a_test_set_without_both_classes_is_refused_before_any_work(tiny_detector, dataset, monkeypatch):
    normal_only = load_dataset(dataset.root)
    normal_only.test = [s for s in normal_only.test if not s.label]
    monkeypatch.setattr(tiny_detector, "reconstruct", lambda *a, **k: pytest.fail("should not run"))
    with pytest.raises(DatasetError, match="both normal and anomalous"):
        evaluate(tiny_detector, normal_only)
    normal_only.test = []
    with pytest.raises(DatasetError, match="no test images"):
        evaluate(tiny_detector, normal_only)
