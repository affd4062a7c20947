"""Label-free tuning: never reads the test split, keeps to its budget, deterministic for a seed,
stores its choice in the checkpoint; holdout images and stripes for training."""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cgdiff.cli import main
from cgdiff.data import build_texture_dataset
from cgdiff.train import RandomCrops
from cgdiff.tune import SCORER_SEARCHED, apply_result, pareto_front, select, split_holdout, tune, validation_set

# A small search: 2 normal + 4 defect images, two settings on top of the stored ones.
SMALL = dict(n_normal=2, n_anomalous=4, grids={"w": {"coarse": (0.0, 1.0), "fine": (0.0, 0.5, 1.0, 3.0)}},
             balances=((0.0, 1.0), (1.0, 1.0), (1.0, 0.0)))
TRAIN = ["--image-size", "32", "--crop-size", "16", "--batch-size", "2", "--save-every", "4", "--max-steps", "2",
         "--steps", "2", "--guidance-scale", "0", "--backbone", "efficientnet-lite0", "--no-progress"]

_WATCHED: list = []  # (forbidden folders, hits) while a test watches file access


def _audit(event, args):
    if not _WATCHED or event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    target = args[0]
    if isinstance(target, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(target))
        for folders, hits in _WATCHED:
            if any(path == f or path.startswith(f + os.sep) for f in folders):
                hits.append(path)


sys.addaudithook(_audit)


class _Watch:
    """Records every open / directory listing under the test split of `root`."""

    def __init__(self, root: Path):
        self.folders = [os.path.abspath(root / "test"), os.path.abspath(root / "ground_truth")]
        self.hits: list[str] = []

    def __enter__(self):
        _WATCHED.append((self.folders, self.hits))
        return self

    def __exit__(self, *exc):
        _WATCHED.pop()


@pytest.fixture(scope="module")
def gravel(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    return build_texture_dataset(root, textures=("gravel",), tile_size=64, train_stride=128,
                                 n_test_good=2, n_test_defect=1, seed=3)["gravel"]


def _rows(result):
    return [{k: v for k, v in r.items() if k != "seconds_per_image"} for r in result.table]


def test_tuning_never_reads_the_test_split_and_is_deterministic_for_a_seed(tiny_detector, gravel):
    with _Watch(gravel) as watch:
        first = tune(tiny_detector, gravel, budget_s=600, seed=5, apply=False, **SMALL)
        second = tune(tiny_detector, gravel, budget_s=600, seed=5, apply=False, **SMALL)
    assert watch.hits == []
    with _Watch(gravel) as check:  # the watch does see test files when they are read
        from cgdiff.data import load_dataset

        load_dataset(gravel)
    assert check.hits

    assert _rows(first) == _rows(second) and first.chosen == second.chosen
    np.testing.assert_array_equal(first.validation.images, second.validation.images)
    other = validation_set(tiny_detector, gravel, seed=6, n_normal=2, n_anomalous=4)
    assert not np.array_equal(other.masks, first.validation.masks)

    # The stored settings are evaluated first, and the choice is never worse than them.
    assert first.table[0]["stage"] == "start" and first.start["w"] == tiny_detector.sampler.w
    assert first.chosen_row["aupro"] >= first.start_row["aupro"] - 0.005
    assert {r["w"] for r in first.table} >= {0.0, 1.0, tiny_detector.sampler.w}
    # No test labels here: the detector's own training images, and the result says so.
    assert first.validation.in_sample and "in-sample" in first.validation.note()
    assert first.validation.labels.tolist().count(1) == 4
    assert all(m.any() for m in first.validation.masks[first.validation.labels == 1])
    # The clean originals of the painted defects: equal to the image outside each mask, so the
    # tuner's table can report how much of each defect a setting removes.
    v = first.validation
    outside = ~v.masks[..., None].repeat(3, axis=-1)
    np.testing.assert_array_equal(v.cleans[outside], v.images[outside])
    assert all(not np.array_equal(c, i) for c, i in zip(v.cleans[v.labels == 1], v.images[v.labels == 1]))
    complete = [r for r in first.table if r["complete"]]
    assert complete and all(r["removal"] is not None and r["removal"] <= 1 for r in complete)


def test_tuning_keeps_to_its_budget(tiny_detector, gravel):
    """A fake clock that advances one second per U-Net call: the search must stop in time."""
    clock = {"t": 0.0}
    eps = tiny_detector._eps

    def counting_eps(x, t):
        clock["t"] += 1.0
        return eps(x, t)

    tiny_detector._eps = counting_eps
    grids = {"w": {"coarse": (0.0, 0.5, 1.0, 2.0, 5.0, 8.0), "fine": (0.0, 1.0)}}
    budget = 3 * 2 * 6 + 10  # the stored settings (2 batches x 6 calls), then room for little more
    result = tune(tiny_detector, gravel, budget_s=budget, clock=lambda: clock["t"], apply=False,
                  **{**SMALL, "grids": grids})
    assert result.seconds <= budget
    assert result.stopped == "time budget spent"
    tried = {r["w"] for r in result.table}
    assert 1 <= len(tried) < 7  # not every setting fitted
    assert result.chosen["w"] in tried


def test_the_map_smoothing_is_searched_with_the_balance_and_becomes_the_detectors(tiny_detector, gravel):
    """Every reconstruction is scored at every (balance, map sigma) pair; the stored sigma is the
    reference row, and the chosen sigma is stored and used by the detector afterwards."""
    stored = tiny_detector.scorer.config.map_sigma
    result = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=0, map_sigmas=(1.0, 8.0),
                  **{**SMALL, "balances": ((1.0, 1.0), (4.0, 1.0))})
    rows = result.table
    assert {(r["pixel_weight"], r["map_sigma"]) for r in rows} == {
        (v, s) for v in (1.0, 4.0) for s in (1.0, 8.0, stored)}
    # The sigmas change the maps, so the rows differ (the search has something to choose from).
    assert len({r["aupro"] for r in rows}) > 1
    assert result.start_row["map_sigma"] == stored == result.start["map_sigma"]
    best = max(r["aupro"] for r in rows)
    assert result.chosen_row["aupro"] >= best - 0.005
    assert tiny_detector.scorer.config.map_sigma == result.chosen["map_sigma"] == result.chosen_row["map_sigma"]
    assert f"map sigma {result.chosen['map_sigma']:g}" in result.record["summary"]
    with pytest.raises(ValueError, match="map_sigma"):
        tune(tiny_detector, gravel, budget_s=600, map_sigmas=(-1.0,), apply=False, **SMALL)
    # Without map_sigmas the stored sigma stays (the search is asked for, not the default).
    plain = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=0, apply=False, **SMALL)
    assert {r["map_sigma"] for r in plain.table} == {tiny_detector.scorer.config.map_sigma}


def test_averaged_reconstructions_are_searched_at_their_cost(tiny_detector, gravel):
    """N (samples) is a searched sampler setting: its rows cost N times the model calls, and the
    choice is stored (and shown) only as the detector's own."""
    grids = {"samples": {"coarse": (1, 2), "fine": (1, 2, 3)}}
    result = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=1, refine_rounds=0,
                  **{**SMALL, "grids": grids})
    calls = {r["samples"]: r["model_calls"] for r in result.table}
    assert calls == {1: tiny_detector.sampler.replace(samples=1).model_calls(),
                     2: 2 * tiny_detector.sampler.replace(samples=1).model_calls()}
    assert tiny_detector.sampler.samples == result.chosen_row["samples"] == result.chosen.get("samples", 1)
    # A choice of N > 1 becomes the detector's own (and is stored with it).
    averaged = next(i for i, r in enumerate(result.table) if r["samples"] == 2)
    forced = dataclasses.replace(result, chosen={**result.table[averaged]["sampler"],
                                                 **{k: result.table[averaged][k] for k in SCORER_SEARCHED}})
    apply_result(tiny_detector, forced)
    assert tiny_detector.sampler.samples == 2


def test_a_cap_on_model_calls_leaves_the_dearer_settings_out(tiny_detector, gravel):
    per_run = tiny_detector.sampler.model_calls()
    grids = {"samples": {"coarse": (2, 4), "fine": (2, 3, 4)}}
    result = tune(tiny_detector, gravel, budget_s=600, seed=5, refine_rounds=1, max_model_calls=2 * per_run,
                  apply=False, **{**SMALL, "grids": grids})
    assert {r["samples"] for r in result.table} == {1, 2}  # 3 and 4 cost more than the cap: never run
    assert result.chosen_row["model_calls"] <= 2 * per_run
    assert result.record["search"]["max_model_calls"] == 2 * per_run and result.record["search"]["over_the_cap"] >= 1
    assert "left out" in result.record["summary"]
    # A stored setting over the cap: the search also starts from it brought under the cap.
    stored = tiny_detector.sampler
    tiny_detector.sampler = stored.replace(samples=4)
    try:
        result = tune(tiny_detector, gravel, budget_s=600, seed=5, refine_rounds=1, max_model_calls=2 * per_run,
                      apply=False, **SMALL)
    finally:
        tiny_detector.sampler = stored
    from cgdiff.sampler import SamplerConfig
    from cgdiff.tune import _under_cap

    assert _under_cap(SamplerConfig(steps=10, guidance_scale=0.25, samples=4), 40).samples == 2
    assert _under_cap(SamplerConfig(steps=10, guidance_scale=0.5, samples=4), 8).model_calls() == 8  # K = 4, N = 1
    under = [r for r in result.table if r["stage"] == "start, under the cap"]
    assert under and all(r["samples"] == 2 for r in under)
    assert {r["samples"] for r in result.table if r["stage"] != "start"} == {2}  # w swept around it, not around N = 4
    assert result.chosen_row["model_calls"] <= 2 * per_run
    rows = [{"aupro": 0.95, "model_calls": 40, "complete": True}, {"aupro": 0.90, "model_calls": 10, "complete": True}]
    assert select(rows) == 0 and select(rows, max_model_calls=20) == 1 and select(rows, max_model_calls=5) == 0
    with pytest.raises(ValueError, match="max_model_calls"):
        tune(tiny_detector, gravel, budget_s=600, max_model_calls=0, apply=False, **SMALL)


def test_further_starts_are_evaluated_in_full_and_the_search_moves_from_the_best(tiny_detector, gravel):
    """`starts` (`tune --start-from`): each further start is run in full after the stored
    settings (never raced), its second pass dropped, and the coarse sweep moves from the best of
    them all; one over the cap is brought under it, one already run is not run again."""
    stored = tiny_detector.sampler
    other = stored.replace(repaint_t0=300)  # K = 3: here it validates better than the stored K = 2, w = 2
    grids = {"w": {"coarse": (0.0,), "fine": (0.0, 0.5)}}
    tiny_detector.sampler = stored.replace(steps=2, w=2.0)
    try:
        # race_margin -1 would drop every searched setting on half the images: not a start.
        result = tune(tiny_detector, gravel, budget_s=600, seed=5, refine_rounds=0, starts=[other, stored],
                      race_margin=-1.0, apply=False, **{**SMALL, "grids": grids})
    finally:
        tiny_detector.sampler = stored
    started = [r for r in result.table if r["stage"] == "another start"]
    assert started and all(r["complete"] and r["steps"] == 3 and not r["repaint_t0"] for r in started)
    assert result.record["search"]["starts"] == [stored.to_dict()]  # run once, though given twice
    assert "1 further start(s) run in full" in result.record["summary"]
    firsts = [r for r in result.table if r["stage"] in ("start", "another start")]
    assert firsts[select(firsts)]["stage"] == "another start"
    swept = [r for r in result.table if r["stage"] == "coarse"]
    assert swept and all(r["w"] == 0.0 and r["steps"] == 3 for r in swept)  # around it, not the stored K = 2
    assert not any(r["complete"] for r in swept)  # raced, as searched settings are
    per_run = stored.model_calls()
    capped = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=1, starts=[stored.replace(samples=4)],
                  max_model_calls=2 * per_run, apply=False, **SMALL)
    assert {r["samples"] for r in capped.table if r["stage"] == "another start"} == {2}
    # A start counts among max_evaluations; one the denoiser never trained for, or not a sampler setting, is refused.
    none = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=0, starts=[other.replace(steps=2)],
                apply=False, **SMALL)
    assert [r["stage"] for r in none.table] == ["start"] * len(none.table)
    info = dict(tiny_detector.info)
    tiny_detector.info["training"] = {"config": {"max_timestep": 500}}
    try:
        with pytest.raises(ValueError, match="start number 1 of the search has t0 = 600"):
            tune(tiny_detector, gravel, budget_s=600, starts=[other.replace(t0=600)], apply=False, **SMALL)
    finally:
        tiny_detector.info.clear()
        tiny_detector.info.update(info)
    for bad in ([{"w": 3.0}], other, None):
        with pytest.raises(ValueError, match="SamplerConfig"):
            tune(tiny_detector, gravel, budget_s=600, starts=bad, apply=False, **SMALL)


def test_start_from_reads_the_sampler_settings_of_another_checkpoint(gravel, tmp_path, capsys):
    ckpt, other, empty = tmp_path / "ckpt", tmp_path / "other", tmp_path / "empty"
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), *TRAIN]) == 0
    shutil.copytree(ckpt, other)
    config = json.loads((other / "cgdiff.json").read_text())
    config["sampler"]["w"] = 1.5
    (other / "cgdiff.json").write_text(json.dumps(config))
    empty.mkdir()
    before = (ckpt / "cgdiff.json").read_text()
    capsys.readouterr()
    for bad, says in ((empty, "is not a cgdiff checkpoint (no cgdiff.json in it)"),
                      (tmp_path / "missing", "needs a local checkpoint folder or the name of a bundled one")):
        assert main(["tune", "--checkpoint", str(ckpt), "--data", str(gravel), "--start-from", str(bad),
                     "--dry-run"]) != 0
        assert says in capsys.readouterr().err
    code = main(["tune", "--checkpoint", str(ckpt), "--data", str(gravel), "--normal", "2", "--anomalous", "2",
                 "--max-evaluations", "1", "--min-removal", "0", "--start-from", str(other), "--dry-run",
                 "--json", str(tmp_path / "tuning.json"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "tuning.json").read_text())
    assert record["search"]["starts"][0]["w"] == 1.5 and record["search"]["starts_from"] == [str(other)]
    from cgdiff.card import model_card_section

    card = "\n".join(model_card_section(record))
    assert f"Further starts of the search: the sampler settings of {other}." in card
    assert {r["w"] for r in record["table"] if r["stage"] == "another start"} == {1.5}
    # The start counts among --max-evaluations 1: nothing else is searched.
    assert {r["stage"] for r in record["table"]} == {"start", "another start"}
    assert (ckpt / "cgdiff.json").read_text() == before
    # A start this denoiser never trained for is refused before --out is touched.
    limited, kept = tmp_path / "limited", tmp_path / "kept"
    shutil.copytree(ckpt, limited)
    config = json.loads((limited / "cgdiff.json").read_text())
    config["training"]["config"]["max_timestep"] = 200
    config["sampler"]["t0"] = 150
    (limited / "cgdiff.json").write_text(json.dumps(config))
    shutil.copytree(other, kept)  # an earlier tuned copy, say
    (kept / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert main(["tune", "--checkpoint", str(limited), "--data", str(gravel), "--start-from", str(other),
                 "--out", str(kept), "--overwrite"]) != 0
    assert f"start '--start-from {other}' of the search has t0 = 250" in capsys.readouterr().err
    assert (kept / "mine.txt").read_text() == "keep" and json.loads((kept / "cgdiff.json").read_text())["sampler"]["w"] == 1.5
    # Nor is --out replaced when the tuning itself fails (here on its own argument check).
    assert main(["tune", "--checkpoint", str(ckpt), "--data", str(gravel), "--min-removal", "2",
                 "--out", str(kept), "--overwrite"]) != 0
    assert "min_removal" in capsys.readouterr().err
    assert (kept / "mine.txt").read_text() == "keep" and json.loads((kept / "cgdiff.json").read_text())["sampler"]["w"] == 1.5


def test_below_the_removal_floor_the_best_setting_is_tried_with_the_second_pass(tiny_detector, gravel):
    """When no searched setting reaches min_removal, the best one is run again with the second
    pass from each t2 (outside the budget, in full, its own balance only), and the detector is
    left as it was; without a floor there is no such stage."""
    before = (tiny_detector.sampler, tiny_detector.scorer.config, tiny_detector.calibration.to_dict())
    result = tune(tiny_detector, gravel, budget_s=600, seed=5, refine_rounds=0,
                  min_removal=0.999, repaint_t0s=(300, 500), apply=False, **SMALL)
    second = [r for r in result.table if r["stage"] == "second pass"]
    assert [r["repaint_t0"] for r in second] == [300, 500] and all(r["complete"] for r in second)
    best = result.table[select([r for r in result.table if not r["repaint_t0"]])]
    for r in second:
        assert r["sampler"] == {**best["sampler"], "repaint_t0": r["repaint_t0"], "repaint_steps": 8}
        assert (r["pixel_weight"], r["feature_weight"], r["map_sigma"]) == (
            best["pixel_weight"], best["feature_weight"], best["map_sigma"])
        assert r["model_calls"] == best["model_calls"] + 8 and r["removal"] is not None
    assert (tiny_detector.sampler, tiny_detector.scorer.config, tiny_detector.calibration.to_dict()) == before
    plain = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=1, refine_rounds=0, apply=False, **SMALL)
    assert not any(r["repaint_t0"] for r in plain.table)
    # The stage's settings count among max_evaluations: two searched, then one t2 of the two.
    capped = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=3, refine_rounds=0,
                  min_removal=0.999, repaint_t0s=(300, 500), apply=False, **SMALL)
    assert [r["repaint_t0"] for r in capped.table if r["stage"] == "second pass"] == [300]
    assert capped.record["search"]["sampler_settings"] == 4
    # A chosen second pass becomes the detector's own, calibrated for it.
    forced = dataclasses.replace(result, chosen={**second[0]["sampler"], **{k: second[0][k] for k in SCORER_SEARCHED}})
    apply_result(tiny_detector, forced)
    assert tiny_detector.sampler.repaint_t0 == 300 and tiny_detector.calibration.mask_threshold > 0
    # Stored with a second pass and no other setting run: the stored row is the only one, no stage.
    again = tune(tiny_detector, gravel, budget_s=600, seed=5, max_evaluations=0, min_removal=0.999, apply=False,
                 **SMALL)
    assert [r["stage"] for r in again.table] == ["start"] and again.chosen["repaint_t0"] == 300


def test_the_command_line_tunes_for_removal_by_default():
    from cgdiff.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["tune", "--checkpoint", "c", "--data", "d"]).min_removal == 0.5
    assert parser.parse_args(["train", "--data", "d", "--out", "o"]).tune_min_removal == 0.5
    assert parser.parse_args(["tune", "--checkpoint", "c", "--data", "d", "--min-removal", "0"]).min_removal == 0


def test_selection_prefers_fewer_model_calls_within_the_tolerance():
    rows = [
        {"aupro": 0.950, "model_calls": 20, "seconds_per_image": 2.0, "complete": True},
        {"aupro": 0.948, "model_calls": 10, "seconds_per_image": 1.0, "complete": True},
        {"aupro": 0.990, "model_calls": 5, "seconds_per_image": 0.5, "complete": False},  # raced out
        {"aupro": 0.930, "model_calls": 5, "seconds_per_image": 0.6, "complete": True},
    ]
    assert select(rows, tie_tolerance=0.005) == 1
    assert select(rows, tie_tolerance=0.0) == 0
    assert select(rows, tie_tolerance=0.05) == 3
    assert pareto_front(rows) == [3, 1, 0]


def test_a_removal_floor_chooses_among_the_settings_that_take_the_defect_out_while_any_do():
    rows = [
        {"aupro": 0.970, "model_calls": 20, "removal": 0.06, "complete": True},
        {"aupro": 0.944, "model_calls": 20, "removal": 0.71, "complete": True},
        {"aupro": 0.943, "model_calls": 20, "removal": 0.60, "complete": True},
        {"aupro": 0.990, "model_calls": 5, "removal": 0.90, "complete": False},  # raced out
        {"aupro": 0.900, "model_calls": 20, "removal": None, "complete": True},  # no measure: not eligible
    ]
    assert select(rows) == 0 and select(rows, min_removal=0.0) == 0
    assert select(rows, min_removal=0.5) == 1
    assert select(rows, min_removal=0.65) == 1
    assert select(rows, min_removal=0.95) == 0  # none reaches it: by AUPRO alone
    # Where a row has a lower bound, the floor holds it against the bound.
    rows[1]["removal_low"], rows[2]["removal_low"] = 0.45, 0.55
    assert select(rows, min_removal=0.5) == 2


def test_holdout_split_and_stripe_crops(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(5)]
    kept, held = split_holdout(images, 2, seed=1)
    assert len(held) == 2 and sorted(kept + held) == images and split_holdout(images, 2, seed=1)[1] == held
    with pytest.raises(ValueError, match="at least one.*--holdout-stripe"):
        split_holdout(images, 5)
    # Crops never reach the held-out stripe (bottom 8 rows set to white).
    pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    pixels[:, :, 24:] = 255
    crops = RandomCrops(pixels, 16, 200, seed=0, flips=True, rotations=False, rows=24)
    assert all(bool((crops[i] == -1).all()) for i in range(len(crops)))
    assert any(bool((RandomCrops(pixels, 16, 50, 0, False, False)[i] > 0).any()) for i in range(50))


def test_holdout_of_overlapping_tiles_leaves_no_held_out_pixel_in_training(tmp_path):
    from argparse import Namespace
    from types import SimpleNamespace

    from cgdiff.cli import _holdout
    from cgdiff.data import iter_images, overlapping_tiles, training_tile_boxes
    from cgdiff.train import TrainConfig
    from cgdiff.tune import _validation_sources, unseen_holdout

    # 64-px tiles every 32 px: 11 rows x 15 columns of tiles, each overlapping its neighbours.
    root = build_texture_dataset(tmp_path, textures=("gravel",), tile_size=64, n_test_good=1, n_test_defect=1)["gravel"]
    images, boxes = iter_images(root / "train" / "good"), training_tile_boxes(root)
    assert set(boxes) == {p.name for p in images} and training_tile_boxes(tmp_path) == {}
    kept, held = split_holdout(images, 17, seed=0, boxes=boxes)
    # The last 17 tiles in the photo: its bottom row and the two right-most of the row above.
    assert sorted(boxes[p.name][:2] for p in held)[0] == sorted(boxes[p.name][:2] for p in images)[-17]
    covered = np.zeros((512, 512), bool)
    for p in kept:
        y, x, side = boxes[p.name]
        covered[y:y + side, x:x + side] = True
    for p in held:
        y, x, side = boxes[p.name]
        assert not covered[y:y + side, x:x + side].any()  # no held-out pixel is trained on
    assert not overlapping_tiles([p.name for p in kept], [p.name for p in held], boxes)
    # Every tile that does not touch a held-out one is still trained on.
    left_out = [p for p in images if p not in kept and p not in held]
    assert left_out and overlapping_tiles([p.name for p in left_out], [p.name for p in held], boxes) == {p.name for p in left_out}
    with pytest.raises(ValueError, match="overlap"):
        split_holdout(images, 150, boxes=boxes)
    # Holding out every tile: the advice is fewer tiles, not a stripe (in-sample on such a set).
    with pytest.raises(ValueError, match="at least one") as error:
        split_holdout(images, len(images), boxes=boxes)
    assert "--holdout N" in str(error.value) and "no unseen holdout" in str(error.value)
    # The CLI records the tiles left out beside the held-out ones and trains on neither.
    args = Namespace(resume=False, holdout=17, holdout_stripe=None, seed=0, data=str(root))
    train_on, record, _ = _holdout(args, {}, images, TrainConfig(image_size=64, crop_size=32))
    assert train_on == kept and record["images"] == [p.name for p in held]
    assert record["overlapping_left_out"] == [p.name for p in left_out]
    from cgdiff.card import render_model_card

    card = render_model_card({"training": {"holdout": record}})
    assert "- left out of training too, as they overlap the held-out tiles: " + ", ".join(record["overlapping_left_out"]) in card
    # A checkpoint whose held-out tiles overlap its training tiles (held out before this rule)
    # validates as in-sample and sets its threshold on the training folder, not on them.
    leaky = SimpleNamespace(image_size=64, info={"training": {
        "holdout": {"images": [held[0].name]}, "images": [p.name for p in images if p != held[0]]}})
    src = _validation_sources(leaky, root)
    assert src.source == "holdout tiles overlapping training" and src.in_sample and not src.calibration_unseen
    # So do records without the list of training images (every folder image not held or left out),
    # and a stripe of overlapping tiles (it lies in the trained part of the tile below).
    del leaky.info["training"]["images"]
    assert _validation_sources(leaky, root).in_sample
    clean = SimpleNamespace(image_size=64, info={"training": {"holdout": record}})
    assert _validation_sources(clean, root).source == "holdout images" and not _validation_sources(clean, root).in_sample
    stripe = SimpleNamespace(image_size=64, info={"training": {"holdout": {"stripe_rows": [48, 64], "image_size": 64}}})
    assert _validation_sources(stripe, root).in_sample
    assert unseen_holdout([p.name for p in held], [p.name for p in kept], root)
    assert not unseen_holdout([p.name for p in held], [p.name for p in kept + left_out], root)
    from cgdiff.tune import ValidationSet

    def note(source):
        return ValidationSet(images=np.zeros((2, 8, 8, 3), np.uint8), masks=np.zeros((2, 8, 8), bool),
                             labels=np.array([0, 1]), rows=(0, 8), source=source, in_sample=True,
                             normal_paths=[held[0]], kinds=["normal", "hole"], origins=[0, 0], seed=0).note()

    assert "training used parts of them" in note("holdout stripe") and "--holdout-stripe" not in note("holdout stripe")
    assert "training used all of them" in note("training images") and "--holdout-stripe F" in note("training images")
    # Another dataset's dataset.json is not a texture-set record.
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps({"name": "widgets"}))
    assert training_tile_boxes(other) == {}
    # Training-folder images training did not use count as unseen only where they overlap none it used.
    subset = SimpleNamespace(image_size=64, info={"training": {"images": [p.name for p in kept]}})
    src = _validation_sources(subset, root)
    assert src.source == "unseen training-folder images" and [p.name for p in src.paths] == [p.name for p in held]


def test_train_with_holdout_then_tune_stores_the_choice(gravel, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), "--holdout", "2", *TRAIN]) == 0
    config = json.loads((ckpt / "cgdiff.json").read_text())
    held = config["training"]["holdout"]["images"]
    assert len(held) == 2 and not set(held) & set(config["training"]["images"])
    assert config["training"]["n_images"] == 10
    # Two held-out normals are too few for a threshold of their own: all 12, and the card says so.
    assert config["calibration"]["n_images"] == 12 and "in-sample" in config["training"]["calibration_normals"]
    card = (ckpt / "README.md").read_text()
    assert "calibration on the 12 training images (in-sample" in card
    assert f"- held out of training, for tuning and the threshold: {', '.join(held)}" in card
    assert "left out of training too" not in card  # these tiles do not overlap

    with _Watch(gravel) as watch:
        code = main(["tune", "--checkpoint", str(ckpt), "--data", str(gravel), "--normal", "2", "--anomalous", "2",
                     "--max-evaluations", "1", "--min-removal", "0.99", "--json", str(tmp_path / "tuning.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert watch.hits == []
    assert "validation AUPRO" in out and "speed/quality front" in out
    tuned = json.loads((ckpt / "cgdiff.json").read_text())
    tuning = tuned["tuning"]
    # A floor this few-step denoiser does not reach: the choice falls back to AUPRO, and the record says so.
    assert tuning["search"]["min_removal"] == 0.99
    assert tuning["summary"].startswith("no setting reached 0.99 in validation removal (the lower end of its 80 % "
                                        "bootstrap interval), so chosen by AUPRO alone")
    assert tuning["validation_set"]["source"] == "holdout images" and not tuning["validation_set"]["in_sample"]
    assert sorted(tuning["validation_set"]["images"]) == sorted(held)
    assert {k: tuned["sampler"][k] for k in ("t0", "steps", "w")} == {k: tuning["chosen"][k] for k in ("t0", "steps", "w")}
    assert tuned["scorer"]["pixel_weight"] == tuning["chosen"]["pixel_weight"]
    assert tuning["calibrated_on"] == 12 and tuned["calibration"]["n_images"] == 12
    assert tuning["calibration_normals"] == "12 training-folder images (in-sample)"
    # The threshold: the F1-max cut against one synthetic defect per calibration normal.
    assert len(tuned["calibration"]["anomalous_scores"]) == 12
    _check_threshold_rule(tuned["calibration"])
    # The stored setting and one searched: --max-evaluations 1 leaves no room for the second pass.
    assert not [r for r in tuning["table"] if r["stage"] == "second pass"]
    assert len(tuning["table"]) >= 2 and tuning["search"]["sampler_settings"] == 2
    assert (ckpt / "tuning_front.png").read_bytes()[:4] == b"\x89PNG"
    card = (ckpt / "README.md").read_text()
    assert "Label-free tuning" in card and "tuning_front.png" in card
    assert json.loads((tmp_path / "tuning.json").read_text())["summary"] == tuning["summary"]
    assert (ckpt / "training_state").is_dir()  # the save keeps what was there


def _check_threshold_rule(cal):
    """The stored threshold is the F1-max cut of the stored scores, unless that cut would flag
    every normal image (a denoiser this briefly trained): then the normal-tail one."""
    from cgdiff.metrics import f1_max_threshold

    normal, anomalous = cal["normal_scores"], cal["anomalous_scores"]
    _, cut = f1_max_threshold([0] * len(normal) + [1] * len(anomalous), normal + anomalous)
    if cut < min(normal):
        scores = np.array(normal)
        assert cal["threshold_rule"] == "normal-tail"  # stored: the defect scores say validation-f1 was tried
        assert cal["threshold"] == pytest.approx(max(scores.max(), scores.mean() + 3 * scores.std(ddof=1)), rel=1e-4)
    else:
        assert cal["threshold_rule"] == "validation-f1" and cal["threshold"] == pytest.approx(cut, rel=1e-4)
        assert _f1_at(cal["threshold"], normal, anomalous) == pytest.approx(cal["validation_f1"], abs=1e-4)
    return cal["threshold_rule"]


def _f1_at(threshold, normal_scores, anomalous_scores):
    flagged_normal = sum(s > threshold for s in normal_scores)
    tp = sum(s > threshold for s in anomalous_scores)
    return 2 * tp / (2 * tp + flagged_normal + (len(anomalous_scores) - tp))


def test_calibrate_sets_the_threshold_by_the_chosen_rule_without_reading_the_test_split(gravel, tmp_path, capsys):
    from cgdiff.metrics import f1_max

    ckpt = tmp_path / "ckpt"
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), *TRAIN]) == 0
    before = (ckpt / "cgdiff.json").read_text()
    # train alone: normals only, written as older versions wrote it (no rule fields)
    assert "threshold_rule" not in json.loads(before)["calibration"]
    out = tmp_path / "f1"
    with _Watch(gravel) as watch:
        code = main(["calibrate", "--checkpoint", str(ckpt), "--data", str(gravel), "--out", str(out), "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert watch.hits == []
    assert (ckpt / "cgdiff.json").read_text() == before  # --out leaves the source alone
    cal = json.loads((out / "cgdiff.json").read_text())["calibration"]
    normal, anomalous = cal["normal_scores"], cal["anomalous_scores"]
    assert len(normal) == len(anomalous) == 12
    assert cal["validation_f1"] == pytest.approx(f1_max([0] * 12 + [1] * 12, normal + anomalous), abs=1e-4)
    rule = _check_threshold_rule(cal)
    assert f"-> {cal['threshold']:.4g} ({rule}" in printed
    card = (out / "README.md").read_text()
    assert ("the F1-max cut between the normal scores and 12 synthetic-defect images, seed 0" in card
            if rule == "validation-f1" else "would have flagged every normal image" in card)
    flagged = sum(v > cal["threshold"] for v in normal)
    assert f"it flags {flagged} of the 12 normal" in card
    assert "recalibrated with: `cgdiff calibrate" in card

    # The normal-tail rule from the same normals; an existing --out is kept without --overwrite.
    code = main(["calibrate", "--checkpoint", str(out), "--data", str(gravel), "--out", str(ckpt), "--no-progress",
                 "--threshold", "normal-tail"])
    assert code != 0 and "pass --overwrite" in capsys.readouterr().err
    # --overwrite replaces only a checkpoint folder, never the folder the checkpoint lies in.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for target, message in ((tmp_path / "notes", "no cgdiff checkpoint in it"), (tmp_path, "inside one another")):
        code = main(["calibrate", "--checkpoint", str(out), "--data", str(gravel), "--out", str(target), "--overwrite",
                     "--no-progress"])
        assert code != 0 and message in capsys.readouterr().err
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (out / "cgdiff.json").is_file()
    assert main(["calibrate", "--checkpoint", str(out), "--data", str(gravel), "--threshold", "normal-tail",
                 "--no-progress"]) == 0
    cal = json.loads((out / "cgdiff.json").read_text())["calibration"]
    scores = np.array(cal["normal_scores"])
    assert "threshold_rule" not in cal and "anomalous_scores" not in cal  # normal-tail, as older versions wrote it
    assert cal["threshold"] == pytest.approx(max(scores.max(), scores.mean() + 3 * scores.std(ddof=1)), rel=1e-4)
    capsys.readouterr()
    # --repaint-t0 stores a second pass and calibrates for it (its mask's threshold from the first).
    assert main(["calibrate", "--checkpoint", str(out), "--data", str(gravel), "--threshold", "normal-tail",
                 "--repaint-t0", "300", "--repaint-steps", "2", "--no-progress"]) == 0
    config = json.loads((out / "cgdiff.json").read_text())
    assert config["sampler"]["repaint_t0"] == 300 and config["sampler"]["repaint_steps"] == 2
    assert config["calibration"]["mask_threshold"] == pytest.approx(cal["threshold"], rel=1e-4)
    assert main(["calibrate", "--checkpoint", str(out), "--data", str(gravel), "--repaint-t0", "0", "--no-progress"]) == 0
    config = json.loads((out / "cgdiff.json").read_text())
    assert "repaint_t0" not in config["sampler"] and "mask_threshold" not in config["calibration"]
    capsys.readouterr()


def test_recalibrating_in_place_drops_verdict_rates_of_the_old_threshold(gravel, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), *TRAIN]) == 0
    config = json.loads((ckpt / "cgdiff.json").read_text())
    config["calibration"]["threshold"] *= 0.5  # a threshold set some other way, which calibrate replaces
    (ckpt / "cgdiff.json").write_text(json.dumps(config))
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(gravel), "--record", "--no-progress"]) == 0
    before = json.loads((ckpt / "cgdiff.json").read_text())
    assert before["metrics"]["at_threshold"] and "normal images flagged at the threshold" in (ckpt / "README.md").read_text()
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(gravel), "--no-progress"]) == 0
    after = json.loads((ckpt / "cgdiff.json").read_text())
    assert after["calibration"]["threshold"] != before["calibration"]["threshold"]
    # Same settings and c: the ranking metrics stay; the rates of the old threshold go.
    assert after["metrics"]["aupro"] == before["metrics"]["aupro"] and "at_threshold" not in after["metrics"]
    assert after["calibration_before"]["threshold"] == before["calibration"]["threshold"]
    assert "flagged at the threshold" not in (ckpt / "README.md").read_text()
    capsys.readouterr()


def test_the_validation_threshold_keeps_the_normal_tail_when_defects_score_no_higher(tiny_detector):
    from cgdiff.scorer import Calibration
    from cgdiff.tune import validation_threshold

    normals = [0.5, 0.6, 0.7]
    tiny_detector.calibration = Calibration(pixel_scale=1.0, threshold=0.8, score_mean=0.6, score_std=0.1,
                                            n_images=3, normal_scores=normals)
    tiny_detector.detect = lambda images, batch_size=4: [type("D", (), {"score": 0.1})() for _ in images]
    assert validation_threshold(tiny_detector, np.zeros((4, 32, 32, 3), np.uint8)) == 0.8
    cal = tiny_detector.calibration
    assert cal.threshold_rule == "normal-tail" and cal.anomalous_scores == [0.1] * 4
    tiny_detector.detect = lambda images, batch_size=4: [type("D", (), {"score": 0.9})() for _ in images]
    assert validation_threshold(tiny_detector, np.zeros((4, 32, 32, 3), np.uint8)) == pytest.approx(0.8)
    assert cal.threshold_rule == "validation-f1" and cal.validation_f1 == 1.0
    with pytest.raises(ValueError, match="no synthetic-defect images"):
        validation_threshold(tiny_detector, [])


def test_enough_held_out_normals_set_the_threshold_alone(gravel, tmp_path, capsys):
    from cgdiff.tune import MIN_HELDOUT_CALIBRATION

    ckpt = tmp_path / "held"
    n = MIN_HELDOUT_CALIBRATION
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), "--holdout", str(n), *TRAIN]) == 0
    config = json.loads((ckpt / "cgdiff.json").read_text())
    assert config["calibration"]["n_images"] == n
    assert config["training"]["calibration_normals"] == f"{n} held-out training images (not used in training)"
    assert f"calibration on {n} held-out training images" in (ckpt / "README.md").read_text()
    capsys.readouterr()


def test_a_start_the_denoiser_never_trained_is_refused(gravel, tmp_path, capsys):
    code = main(["train", "--data", str(gravel), "--out", str(tmp_path / "x"), "--max-timestep", "200", *TRAIN])
    assert code == 2 and "--t0 250 starts at a noise level that --max-timestep 200 never trains" in capsys.readouterr().err
    assert not (tmp_path / "x" / "cgdiff.json").exists()


def test_train_with_a_holdout_stripe_and_tune_at_the_end(gravel, tmp_path, capsys):
    ckpt = tmp_path / "stripe"
    code = main(["train", "--data", str(gravel), "--out", str(ckpt), "--holdout-stripe", "0.25", "--tune",
                 "--tune-minutes", "0.05", *TRAIN])
    out, err = capsys.readouterr()
    assert code == 0, err
    tuning = json.loads((ckpt / "cgdiff.json").read_text())["tuning"]
    vs = tuning["validation_set"]
    assert vs["source"] == "holdout stripe" and vs["rows"] == [24, 32] and not vs["in_sample"]
    assert "--tune" in tuning["command"]
    # The validation defects lie inside the stripe.
    from cgdiff import Detector

    detector = Detector.from_pretrained(ckpt, device="cpu")
    vset = validation_set(detector, gravel, seed=0, n_normal=2, n_anomalous=4)
    assert not vset.masks[:, :24].any() and vset.masks[:, 24:].any()


def test_holdout_stripe_record_is_what_train_and_tune_share():
    from cgdiff.tune import holdout_stripe

    rows, record = holdout_stripe(128, 0.25, 64)
    assert rows == 32 and record == {"stripe_fraction": 0.25, "stripe_rows": [96, 128], "image_size": 128}
    with pytest.raises(ValueError, match="fewer than the crop size"):
        holdout_stripe(64, 0.5, 64)


def test_the_validation_set_names_every_unreadable_training_image_at_once(tiny_detector, gravel, tmp_path):
    import shutil

    from cgdiff.data import DatasetError

    copy = tmp_path / "gravel"
    shutil.copytree(gravel, copy)
    good = sorted((copy / "train" / "good").glob("*.png"))
    for p in good[:2]:
        p.write_bytes(b"truncated")
    with pytest.raises(DatasetError) as info:
        validation_set(tiny_detector, copy, seed=0, n_normal=2, n_anomalous=4)
    message = str(info.value)
    assert f"2 of the {len(good)} training-folder image(s)" in message
    assert all(str(p) in message for p in good[:2])


def test_holdout_auto_keeps_a_tenth_out_from_80_images(tmp_path, capsys):
    from PIL import Image

    from cgdiff.tune import AUTO_HOLDOUT_MIN_IMAGES, MIN_HELDOUT_CALIBRATION, auto_holdout_count

    assert auto_holdout_count(AUTO_HOLDOUT_MIN_IMAGES - 1) == 0
    assert auto_holdout_count(AUTO_HOLDOUT_MIN_IMAGES) >= MIN_HELDOUT_CALIBRATION
    assert auto_holdout_count(245) == 24
    folder = tmp_path / "plain"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(AUTO_HOLDOUT_MIN_IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    ckpt = tmp_path / "auto"
    assert main(["train", "--data", str(folder), "--out", str(ckpt), *TRAIN]) == 0  # --holdout auto is the default
    config = json.loads((ckpt / "cgdiff.json").read_text())
    held = config["training"]["holdout"]["images"]
    assert len(held) == MIN_HELDOUT_CALIBRATION and not set(held) & set(config["training"]["images"])
    assert config["calibration"]["n_images"] == MIN_HELDOUT_CALIBRATION
    assert config["training"]["calibration_normals"].endswith("held-out training images (not used in training)")
    # The paper's recipe trains on every image unless --holdout N asks otherwise.
    from argparse import Namespace

    from cgdiff.cli import _holdout
    from cgdiff.train import TrainConfig

    images = sorted(folder.iterdir())
    paper = TrainConfig(unet_preset="paper", image_size=32, crop_size=32)
    for holdout, n_held in (("auto", 0), (5, 5)):
        args = Namespace(resume=False, holdout=holdout, holdout_stripe=None, seed=0, data=str(folder))
        kept, record, rows = _holdout(args, {}, images, paper)
        assert len(record.get("images", [])) == n_held and len(kept) == len(images) - n_held and rows == 0
    # --holdout 0 trains on all of them and says the threshold is in-sample.
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "none"), "--holdout", "0", *TRAIN]) == 0
    config = json.loads((tmp_path / "none" / "cgdiff.json").read_text())
    assert config["training"]["n_images"] == AUTO_HOLDOUT_MIN_IMAGES and "in-sample" in config["training"]["calibration_normals"]
    capsys.readouterr()


def test_holdout_auto_on_a_small_folder_says_the_threshold_is_in_sample(gravel, tmp_path, capsys):
    ckpt = tmp_path / "small"
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), *TRAIN]) == 0
    err = capsys.readouterr().err
    assert "12 training images, fewer than 80: none held out" in err
    assert "holdout" not in json.loads((ckpt / "cgdiff.json").read_text())["training"]
    assert main(["train", "--data", str(gravel), "--out", str(ckpt), "--holdout", "many", *TRAIN]) == 2
    assert "expected a whole number >= 0 or 'auto', got 'many'" in capsys.readouterr().err
