import time

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from cgdiff.metrics import aupro, evaluate, f1_max, f1_max_threshold, image_auroc, pixel_auroc, pro_curve


# --------------------------------------------------------------------------- hand-computed


def test_image_auroc_by_hand():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4,
    # lost 0.35<0.4 -> 3 / 4
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # a tie counts one half: 0.5>0.2, tie 0.5=0.5, 0.9>0.2, 0.9>0.5 -> 3.5 / 4
    assert image_auroc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)


def test_pixel_auroc_pools_all_images_by_hand():
    masks = np.zeros((2, 2, 2), bool)
    masks[1, 0, 0] = True
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.35, 0.0], [0.5, 0.05]]])
    # the one defect pixel (0.35) beats 0.1, 0.2, 0.3, 0.0, 0.05 out of 7 normal pixels
    assert pixel_auroc(masks, maps) == pytest.approx(5 / 7)


def test_f1_max_by_hand():
    # thresholds: >=0.8 P=1 R=.5 F1=.667; >=0.4 P=.5 R=.5 F1=.5; >=0.35 P=2/3 R=1 F1=.8;
    # >=0.1 P=.5 R=1 F1=.667 -> 0.8
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    assert f1_max([0, 1, 1], [0.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_f1_max_threshold_gives_the_best_f1_under_the_score_above_threshold_rule():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    f1, threshold = f1_max_threshold(labels, scores)
    assert f1 == pytest.approx(0.8)
    # the best cut flags 0.35, 0.4 and 0.8: halfway between 0.35 and the highest score below it
    assert threshold == pytest.approx((0.35 + 0.1) / 2)
    flagged = np.array(scores) > threshold
    assert (flagged == [False, True, True, True]).all()
    # every score flagged at the best cut: just under the lowest score
    f1, threshold = f1_max_threshold([1, 1, 0], [0.5, 0.7, 0.9])
    assert f1 == pytest.approx(0.8) and threshold < 0.5 and threshold == pytest.approx(0.5, rel=1e-2)
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        f1_max_threshold([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError):
        f1_max_threshold([1, 1], [0.1, 0.2])
    # all scores equal: the only cut flags everything
    f1, threshold = f1_max_threshold([0, 1, 1], [0.3, 0.3, 0.3])
    assert f1 == pytest.approx(0.8) and threshold < 0.3
    # ties: flagging {0.9} or {0.9, 0.5, 0.4, 0.3} both give F1 2/3; the higher cut wins
    f1, threshold = f1_max_threshold([1, 0, 0, 1], [0.9, 0.5, 0.4, 0.3])
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx((0.9 + 0.5) / 2)


def _two_region_case(b_score):
    # one image of 1 x 13 pixels: region A = pixels 0-1 (size 2), 10 normal pixels, region B = pixel 12
    mask = np.zeros((1, 1, 13), bool)
    mask[0, 0, [0, 1, 12]] = True
    normal = [0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02]
    amap = np.array([[[0.9, 0.5, *normal, b_score]]])
    return mask, amap


def test_aupro_by_hand_per_region_average():
    mask, amap = _two_region_case(b_score=0.7)
    # t=0.9: FPR 0,  PRO (1/2 + 0)/2 = .25     t=0.8: FPR .1, PRO .25
    # t=0.7: FPR .1, PRO (1/2 + 1)/2 = .75     t=0.6: FPR .2, PRO .75
    # t=0.5: FPR .2, PRO 1                     t=0.4: FPR .3, PRO 1
    # area up to .3 = .1*.25 + .1*.75 + .1*1 = .2, normalised: 2/3
    assert aupro(mask, amap) == pytest.approx(2 / 3)
    # up to .15: .1*.25 + .05*.75 = .0625 -> / .15
    assert aupro(mask, amap, fpr_limit=0.15) == pytest.approx(0.0625 / 0.15)
    # a pixel-pooled TPR would give 1/3 at t=0.9 instead of 1/4, so the value would differ
    fpr, pro = pro_curve(mask, amap)
    assert pro[1] == pytest.approx(0.25) and fpr[1] == 0


def test_aupro_by_hand_interpolates_at_the_limit():
    mask, amap = _two_region_case(b_score=0.8)  # B ties with the normal pixel at 0.8
    # curve: (0,0) -> (0,.25) -> (.1,.75) diagonal -> (.2,.75) -> (.2,1) -> (.3,1)
    # limit .05 lies on the diagonal: PRO(.05) = .5, area (.25+.5)/2*.05 -> / .05 = .375
    assert aupro(mask, amap, fpr_limit=0.05) == pytest.approx(0.375)
    # limit .3: (.25+.75)/2*.1 + .75*.1 + 1*.1 = .225 -> / .3 = .75
    assert aupro(mask, amap, fpr_limit=0.3) == pytest.approx(0.75)


def test_aupro_uses_eight_connectivity():
    # pixels (0,0), (1,1), (1,2) form ONE region with 8-connectivity (two with 4-connectivity)
    mask = np.zeros((1, 3, 3), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = True
    amap = np.zeros((1, 3, 3))
    amap[0, 0, 0] = 0.9
    amap[0][~mask[0]] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    # PRO jumps to 1/3 at FPR 0 and stays there until FPR 1 -> AUPRO 1/3 (4-conn would give 1/2)
    assert aupro(mask, amap) == pytest.approx(1 / 3)


def test_aupro_regions_never_merge_across_images():
    # image 0: region of 2 pixels scored high; image 1: a 1-pixel region at the same place scored
    # lowest. Two regions -> PRO (1 + 0)/2 = .5 over all FPR <= .3; a 3-D labelling would
    # merge them into one region of 3 pixels and give 2/3.
    mask = np.zeros((2, 3, 3), bool)
    mask[0, 0, :2] = True
    mask[1, 0, 0] = True
    amap = np.linspace(0.1, 0.8, 18).reshape(2, 3, 3)
    amap[0, 0, :2] = 0.9
    amap[1, 0, 0] = 0.0
    assert aupro(mask, amap) == pytest.approx(0.5)


# --------------------------------------------------------------------------- references


def _random_case(seed, n=6, size=24, ties=False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 8, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1, 1)) + masks * rng.uniform(0, 0.3)
    if ties:
        maps = np.round(maps, 1)
    return masks, maps


def _brute_force_aupro(masks, maps, limit):
    idx = [(i, ndimage.label(m, structure=np.ones((3, 3)))[0]) for i, m in enumerate(masks)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        xs.append(above[normal].sum() / normal.sum())
        overlaps = []
        for i, comp in idx:
            for j in range(1, comp.max() + 1):
                overlaps.append(above[i][comp == j].mean())
        ys.append(np.mean(overlaps))
    xs, ys = np.array(xs), np.array(ys)
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_aupro_matches_threshold_by_threshold_definition(seed, ties):
    masks, maps = _random_case(seed, ties=ties)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, maps, limit) == pytest.approx(_brute_force_aupro(masks, maps, limit), abs=1e-10)


def test_single_region_aupro_equals_sklearn_partial_roc():
    # With one region, the PRO curve is the ROC curve of that region against the normal pixels.
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 20, 20), bool)
    masks[2, 5:11, 4:9] = True
    maps = rng.random(masks.shape) + masks * 0.4
    y, s = masks.ravel(), maps.ravel()
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(roc_auc_score(y, s))
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s))
    # sklearn standardises the partial AUC (McClish); undo it to get the raw area up to 0.3
    limit = 0.3
    mcclish = roc_auc_score(y, s, max_fpr=limit)
    min_area, max_area = 0.5 * limit**2, limit
    raw = min_area + (2 * mcclish - 1) * (max_area - min_area)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(raw / limit)


def test_perfect_map_scores_one():
    masks, maps = _random_case(4)
    perfect = masks * 1.0 + np.random.default_rng(0).random(masks.shape) * 0.5
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert f1_max(masks, perfect) == pytest.approx(1.0)
    # an inverted map is the worst case
    assert aupro(masks, -perfect) == pytest.approx(0.0)


def test_aupro_independent_of_image_order_and_batching():
    masks, maps = _random_case(5, n=10)
    ref = aupro(masks, maps)
    perm = np.random.default_rng(0).permutation(len(masks))
    assert aupro(masks[perm], maps[perm]) == pytest.approx(ref, abs=1e-12)
    # maps produced in batches of different sizes, given as a list of batches
    cuts = [0, 3, 4, 10]
    mb = [masks[a:b] for a, b in zip(cuts, cuts[1:])]
    ab = [maps[a:b] for a, b in zip(cuts, cuts[1:])]
    assert aupro(mb, ab) == pytest.approx(ref, abs=1e-12)
    assert aupro(list(masks), list(maps)) == pytest.approx(ref, abs=1e-12)
    assert pixel_auroc(mb, ab) == pytest.approx(pixel_auroc(masks, maps))


def test_monotone_transform_changes_nothing():
    masks, maps = _random_case(6, ties=True)
    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    a = evaluate(labels, scores, masks, maps)
    b = evaluate(labels, np.exp(3 * scores) - 7, masks, np.exp(3 * maps) - 7)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k
    assert a["aupro"] < 1  # the case is not trivially perfect


# --------------------------------------------------------------------------- evaluate / errors


def test_evaluate_keys_and_ranges():
    masks, maps = _random_case(7)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    out = evaluate(labels, scores, masks, maps)
    assert set(out) == {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"}
    assert all(0 <= v <= 1 for v in out.values())
    assert out["aupro"] == pytest.approx(aupro(masks, maps))


def test_evaluate_refuses_anomalous_images_with_empty_masks():
    masks = np.zeros((4, 8, 8), bool)
    maps = np.random.default_rng(0).random((4, 8, 8))
    # anomalous images without any defect pixel would silently count as all-normal pixels
    with pytest.raises(ValueError, match=r"images \[2, 3\] are labelled anomalous but their masks are empty"):
        evaluate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], masks, maps)
    masks[2, 1:3, 1:3] = True
    with pytest.raises(ValueError, match=r"images \[3\] are labelled anomalous"):
        evaluate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], masks, maps)
    # without masks (not available): image metrics only
    out = evaluate([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert out["image_auroc"] == 1.0
    assert out["pixel_auroc"] is None and out["aupro"] is None and out["pixel_f1_max"] is None


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), "3 image labels but 2"),
        (lambda: image_auroc([1, 1], [0.1, 0.2]), "both normal and anomalous"),
        (lambda: image_auroc([0, 1], [np.nan, 0.2]), "1 NaN"),
        (lambda: image_auroc([0, 2], [0.1, 0.2]), "0 \\(normal\\) or 1"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 8, 8))), "differ in shape"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))), "both normal and anomalous"),
        (lambda: aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))), "at least one anomalous pixel"),
        (lambda: aupro(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4))), "needs normal pixels"),
        (lambda: aupro(np.eye(4, dtype=bool), np.full((4, 4), np.inf)), "infinite"),
        (lambda: aupro(np.eye(4) * 255, np.zeros((4, 4))), "0 \\(normal\\) or 1"),
        (lambda: aupro(np.eye(4, dtype=bool), np.zeros((4, 4)), fpr_limit=0), "fpr_limit"),
        (lambda: f1_max([0, 1], [0.3, 0.2, 0.1]), "2 labels but 3"),
        (
            lambda: evaluate([0, 1], [0.1, 0.2], np.stack([np.eye(3), np.eye(3)]).astype(bool), np.zeros((2, 3, 3))),
            "labelled normal but their masks",
        ),
        (lambda: evaluate([0, 1], [0.1, 0.2], np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3))), "2 image labels but 3"),
        (lambda: evaluate([0, 1], [0.1, 0.2], np.zeros((2, 3, 3), bool)), "both masks and maps"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_pixel_metrics_are_fast_at_benchmark_size():
    rng = np.random.default_rng(0)
    n = 100
    masks = np.zeros((n, 256, 256), bool)
    for i in range(n // 2, n):
        y, x = rng.integers(0, 200, 2)
        masks[i, y : y + 30, x : x + 40] = True
    maps = (rng.random(masks.shape) + masks * 0.8).astype(np.float32)
    t = time.perf_counter()
    value = aupro(masks, maps)
    elapsed = time.perf_counter() - t
    assert 0.5 < value < 1
    assert elapsed < 15, f"AUPRO over 6.5 M pixels took {elapsed:.1f} s"


def test_removal_is_one_when_the_defect_is_gone_and_zero_when_kept():
    from cgdiff.metrics import removal

    rng = np.random.default_rng(0)
    clean = rng.random((3, 3, 16, 16))
    mask = np.zeros((3, 16, 16), dtype=bool)
    mask[:, 4:8, 4:8] = True
    image = clean.copy()
    image[:, :, 4:8, 4:8] += 0.5  # the defect: +0.5 inside the mask
    halfway = clean + (image - clean) / 2  # a reconstruction that removes half of it
    noisy = clean + 0.01  # removes all of it, but changes every normal pixel by 0.01
    assert removal(image, clean, clean, mask)["removal"] == pytest.approx(1.0)
    assert removal(image, image, clean, mask)["removal"] == pytest.approx(0.0)
    r = removal(image, halfway, clean, mask)
    assert r["removal"] == pytest.approx(0.5) and r["removal_mean"] == pytest.approx(0.5)
    assert r["removal_per_image"] == pytest.approx([0.5] * 3) and r["fidelity"] == pytest.approx(0.0)
    r = removal(image, noisy, clean, mask)
    assert r["removal"] == pytest.approx(1 - 0.01 / 0.5) and r["fidelity"] == pytest.approx(0.01)
    # A reconstruction further from the clean image than the input: negative.
    assert removal(image, clean + 2 * (image - clean), clean, mask)["removal"] == pytest.approx(-1.0)


def test_the_removal_bound_is_below_a_removal_that_varies_and_equal_to_one_that_does_not():
    from cgdiff.metrics import removal, removal_lower_bound

    rng = np.random.default_rng(1)
    clean = rng.random((12, 3, 16, 16))
    mask = np.zeros((12, 16, 16), dtype=bool)
    mask[:, 4:10, 4:10] = True
    image = clean + 0.5 * mask[:, None]
    share = rng.uniform(0.1, 0.9, size=12)[:, None, None, None]  # each image removes its own share
    rec = image - share * (image - clean)
    pooled = removal(image, rec, clean, mask)["removal"]
    low = removal_lower_bound(image, rec, clean, mask)
    assert low < pooled - 0.02 and low == removal_lower_bound(image, rec, clean, mask)  # seeded
    assert removal_lower_bound(image, rec, clean, mask, quantile=0.5) == pytest.approx(pooled, abs=0.05)
    halfway = clean + (image - clean) / 2  # every image removes exactly half: no doubt about it
    assert removal_lower_bound(image, halfway, clean, mask) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="nothing to measure"):
        removal_lower_bound(clean, clean, clean, mask)


def test_removal_pools_pixels_and_names_bad_input():
    from cgdiff.metrics import removal

    clean = np.zeros((2, 8, 8))
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[0, :1] = True  # 8 pixels, fully removed
    mask[1, :3] = True  # 24 pixels, kept
    image = clean + mask
    rec = np.where(mask & (np.arange(2)[:, None, None] == 0), 0.0, image)
    r = removal(image, rec, clean, mask)
    assert r["removal"] == pytest.approx(8 / 32) and r["removal_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="nothing to measure removal on"):
        removal(clean, clean, clean, mask)
    with pytest.raises(ValueError, match="one shape"):
        removal(image, rec[:1], clean, mask)
