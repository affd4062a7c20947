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


# --------------------------------------------------------------------------- masks as the files say

import shutil  # noqa: E402

from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_auc_score  # noqa: E402


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """AUPRO by a plain threshold sweep, independent of cgdiff.metrics."""
    regions = []
    for m, a in zip(masks, maps):
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[labels == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(normal >= t)))
        pro.append(float(np.mean([np.mean(r >= t) for r in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    pro_at_limit = np.interp(limit, fpr, pro)
    keep = fpr <= limit
    x, y = np.append(fpr[keep], limit), np.append(pro[keep], pro_at_limit)
    return float(np.trapezoid(y, x) / limit)


def _copy(dataset, tmp_path):
    root = tmp_path / dataset.root.name
    shutil.copytree(dataset.root, root)
    return root


def _defect_samples(root):
    return sorted(p for p in (root / "test").glob("*/*.png") if p.parent.name != "good")


def test_pixel_metrics_read_masks_of_any_encoding_as_non_zero(tiny_detector, dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    files = sorted((root / "ground_truth").glob("*/*_mask.png"))
    truth = {f: np.asarray(Image.open(f)) > 127 for f in files}
    Image.fromarray(truth[files[0]].astype(np.uint8) * 100).save(files[0])  # grey level 100 (MVTec LOCO)
    Image.fromarray(truth[files[1]].astype(np.uint16)).save(files[1])  # 16-bit, value 1
    Image.fromarray(truth[files[2]]).save(files[2])  # mode 1
    ds = load_dataset(root)
    r = evaluate(tiny_detector, ds, mask_size=48)
    assert r["pixel_metrics_note"] is None and r["pixel_excluded"] == []
    # the same maps against the masks read independently (non-zero = defect), scikit-learn's metrics
    recs = reconstruct_dataset(tiny_detector, ds, mask_size=48)
    maps = resize_maps(score_reconstructions(tiny_detector, recs).maps, 48)
    masks = np.zeros(maps.shape, bool)
    for i, s in enumerate(ds.test):
        if s.label:
            m = Image.fromarray(truth[s.mask_path].astype(np.uint8)).resize((48, 48), Image.Resampling.NEAREST)
            masks[i] = np.asarray(m) > 0
    assert np.array_equal(recs.masks, masks)
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert r["pixel_f1_max"] == pytest.approx(f1, abs=1e-9)
    assert r["aupro"] == pytest.approx(_reference_aupro(masks, maps), abs=1e-6)


def test_an_empty_mask_stops_the_evaluation_or_is_left_out_of_the_pixel_metrics(tiny_detector, dataset, tmp_path,
                                                                                 monkeypatch):
    root = _copy(dataset, tmp_path)
    empty = sorted((root / "ground_truth").glob("*/*_mask.png"))[1]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty)
    ds = load_dataset(root)
    with monkeypatch.context() as m:
        m.setattr(tiny_detector, "reconstruct", lambda *a, **k: pytest.fail("should stop before reconstructing"))
        with pytest.raises(DatasetError, match=f"1 defect image.*empty mask.*{empty.name}.*--skip-empty-masks"):
            evaluate(tiny_detector, ds, mask_size=32)
    r = evaluate(tiny_detector, ds, mask_size=32, empty_masks="skip")
    left_out = [s.path for s in ds.test if s.mask_path == empty]
    assert r["pixel_excluded"] == [str(p) for p in left_out] and "left out of the pixel metrics" in r["pixel_metrics_note"]
    # pixel metrics over the other images only; image metrics over all of them
    recs = reconstruct_dataset(tiny_detector, ds, mask_size=32, empty_masks="skip")
    maps = resize_maps(score_reconstructions(tiny_detector, recs).maps, 32)
    keep = np.array([p not in left_out for p in recs.paths])
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(recs.masks[keep].ravel(), maps[keep].ravel()))
    assert r["aupro"] == pytest.approx(_reference_aupro(recs.masks[keep], maps[keep]), abs=1e-6)
    assert r["n_images"] == len(ds.test) and r["image_auroc"] == pytest.approx(
        roc_auc_score(recs.labels, [s["score"] for s in r["per_image"]]))


def test_a_defect_type_without_masks_gives_image_metrics_and_the_reason(tiny_detector, dataset, tmp_path, monkeypatch):
    root = _copy(dataset, tmp_path)
    kind = sorted(p.name for p in (root / "ground_truth").iterdir())[0]
    shutil.rmtree(root / "ground_truth" / kind)
    ds = load_dataset(root)
    r = evaluate(tiny_detector, ds, mask_size=32)
    assert r["image_auroc"] is not None and r["pixel_auroc"] is None and r["aupro"] is None
    assert f"no masks for the defect type(s) {kind}" in r["pixel_metrics_note"]
    monkeypatch.setattr(tiny_detector, "reconstruct", lambda *a, **k: pytest.fail("should stop before reconstructing"))
    with pytest.raises(DatasetError, match=f"pixel metrics were asked for, but no masks for the defect type.*{kind}"):
        evaluate(tiny_detector, ds, require_pixel_metrics=True)


def test_evaluate_measures_removal_on_the_clean_originals_the_texture_set_keeps(tiny_detector, dataset):
    from cgdiff.metrics import removal

    defects = [s for s in dataset.test if s.label]
    assert defects and all(s.clean_path is not None and s.clean_path.is_file() for s in defects)
    r = evaluate(tiny_detector, dataset, mask_size=48)
    assert r["removal_n_images"] == len(defects) and r["removal"] is not None and r["fidelity"] >= 0
    # The same number from the measure itself, on the detector's own reconstructions.
    recs = reconstruct_dataset(tiny_detector, dataset, mask_size=48)
    idx = [i for i, s in enumerate(dataset.test) if s.label]
    cleans = np.concatenate([tiny_detector.prepare([dataset.test[i].clean_path]).numpy() for i in idx])
    masks = np.stack([dataset.load_mask(dataset.test[i], 32) for i in idx])
    expected = removal((recs.inputs[idx].numpy() + 1) / 2, (recs.reconstructions[idx].numpy() + 1) / 2,
                       (cleans + 1) / 2, masks)
    assert r["removal"] == pytest.approx(expected["removal"]) and r["fidelity"] == pytest.approx(expected["fidelity"])
    per = {p["path"]: p for p in r["per_image"]}
    assert all("removal" in per[str(s.path)] for s in defects)
    assert not any("removal" in per[str(s.path)] for s in dataset.test if not s.label)


def test_without_clean_originals_removal_is_not_reported(tiny_detector, dataset, tmp_path):
    import shutil

    copy = tmp_path / "gravel"
    shutil.copytree(dataset.root, copy)
    shutil.rmtree(copy / "clean")
    r = evaluate(tiny_detector, load_dataset(copy), mask_size=48)
    assert r["removal"] is None and r["removal_n_images"] == 0
