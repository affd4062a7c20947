"""Benchmark plumbing at tiny size: every row and column is there, timers count what they claim,
the baselines do what they say, the fast path is switchable and measured against the reference.
The figures themselves live in BENCHMARKS.md, not here."""

import json

import numpy as np
import pytest
import torch

from cgdiff import bench
from cgdiff.baselines import AnoDDPM, PatchCore, greedy_coreset
from cgdiff.cli import main
from cgdiff.data import build_texture_dataset, load_dataset
from cgdiff.evaluation import evaluate


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchdata")
    build_texture_dataset(root, textures=("gravel", "grass"), tile_size=64, train_stride=128,
                          n_test_good=2, n_test_defect=1, seed=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, backbone):
    """A tiny untrained detector (32 px, K = 2, blur guidance on) saved as a checkpoint."""
    from cgdiff.detector import Detector
    from cgdiff.model import build_unet
    from cgdiff.sampler import SamplerConfig
    from cgdiff.scorer import Scorer, ScorerConfig

    torch.manual_seed(0)
    det = Detector(build_unet("tiny", sample_size=32), Scorer(ScorerConfig(), backbone),
                   SamplerConfig(steps=2, w=1.0, guidance_scale=0.5), image_size=32,
                   info={"training": {"seconds": 12.5}})
    det.calibrate(torch.rand(3, 3, 32, 32) * 2 - 1)
    return det.save_pretrained(tmp_path_factory.mktemp("ckpt") / "gravel")


@pytest.fixture()
def detector(checkpoint):
    from cgdiff.detector import Detector

    return Detector.from_pretrained(checkpoint, device="cpu")


def test_quality_has_every_row_and_the_full_row_is_cgdiff_evaluate(detector, data_root, checkpoint):
    dataset = load_dataset(data_root / "gravel")
    rows = bench.quality_benchmark(detector, dataset, mask_size=64, checkpoint=str(checkpoint))
    keys = [r["key"] for r in rows]
    assert keys[:8] == ["full", "t0", "w0", "s0", "pixel", "feature", "anoddpm", "patchcore"]
    assert keys[8:] and all(k.startswith("anomalib") for k in keys[8:])  # a row, or a row saying why not
    for row in rows[:8]:
        for key in bench.METRIC_KEYS:
            assert 0.0 <= row[key] <= 1.0, (row["key"], key)
        assert row["seconds_per_image"] > 0 and row["cpu_seconds_per_image"] > 0 and row["dataset"] == "gravel"
    by_key = {r["key"]: r for r in rows}
    assert by_key["full"]["fit_seconds"] == 12.5 and by_key["patchcore"]["fit_seconds"] > 0
    # Each ablation is the evaluate command with one flag, and gives what that command gives.
    assert by_key["t0"]["command"].endswith("--mask-size 64 --t0 1000")
    assert by_key["s0"]["model_calls_per_image"] == 2 and by_key["full"]["model_calls_per_image"] == 4
    direct = evaluate(detector, dataset, mask_size=64, w=0.0)
    for key in bench.METRIC_KEYS:
        assert by_key["w0"][key] == pytest.approx(direct[key]), key
    table = bench.markdown_table(rows, bench.QUALITY_COLUMNS)
    assert table.count("\n") == len(rows) + 1 and "| pixel AUROC |" in table


def test_an_ablation_equal_to_the_stored_settings_says_so(detector, data_root):
    detector.sampler = detector.sampler.replace(w=0.0)
    rows = bench.quality_benchmark(detector, load_dataset(data_root / "gravel"), methods=("full", "w0"), mask_size=32)
    assert rows[1]["note"] == "same settings as the full method"
    assert rows[1]["pixel_auroc"] == rows[0]["pixel_auroc"]


def test_patchcore_maps_are_nearest_neighbour_distances_to_normal_patches(backbone):
    g = torch.Generator().manual_seed(0)
    normal = torch.nn.functional.interpolate(torch.rand(3, 3, 16, 16, generator=g), size=64, mode="bilinear") * 2 - 1
    pc = PatchCore(backbone, 64, map_sigma=0).fit(normal)
    assert pc.memory.shape == (3 * 8 * 8, 40 + 112) and pc.fit_seconds > 0
    assert pc.maps(normal).abs().max() < 1e-3  # every patch of a training image is in the bank
    defect = normal[:1].clone()
    defect[..., 40:56, 8:24] = -1.0
    amap = pc.maps(defect)[0]
    row, col = np.unravel_index(int(amap.argmax()), amap.shape)
    assert 32 <= row <= 63 and 0 <= col <= 31 and amap.max() > 5 * amap[:16, 40:].mean()
    thin = PatchCore(backbone, 64, coreset_ratio=0.25).fit(normal)
    assert thin.memory.shape[0] == 48


def test_greedy_coreset_covers_every_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    chosen = greedy_coreset(points, 4, projection_dim=0)
    assert sorted(int(i) // 50 for i in chosen) == [0, 1, 2, 3]
    assert len(greedy_coreset(points, 500)) == 200


def test_anoddpm_is_the_sampler_without_conditioning_and_guidance(detector):
    base = AnoDDPM.from_detector(detector)
    assert base.sampler.w == 0 and base.sampler.guidance_scale == 0 and base.sampler.steps == detector.sampler.steps
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = detector.reconstruct(x, detector.sampler.replace(w=0.0, guidance_scale=0.0))
    torch.testing.assert_close(base.reconstruct(x), plain)
    base.map_sigma = 0
    torch.testing.assert_close(base.maps(x), (plain - x).abs().mean(1))


def test_app_speed_counts_every_unet_call_and_accounts_for_all_the_time(detector):
    images = [np.full((40, 40, 3), i * 60, dtype=np.uint8) for i in range(2)]
    r = bench.app_speed(detector, images, repeats=1)
    assert r["unet_calls_per_image"] == detector.sampler.model_calls() == 4
    assert r["unet_seconds"] + r["backbone_seconds"] + r["other_seconds"] == pytest.approx(r["seconds_per_image"])
    assert 0 <= r["outside_models_share"] < 1 and 0 <= r["sampler_overhead_share"] < 1
    assert r["unet_seconds"] > 0 and r["backbone_seconds"] > 0 and r["peak_memory_mib"] > 0
    assert r["cpu_seconds_per_image"] > 0
    # The wrappers are gone afterwards.
    assert "_eps" not in vars(detector) and "reconstruct" not in vars(detector)
    assert "forward" not in vars(detector.scorer.backbone)
    r = bench.app_speed(detector, images[:1], repeats=1, guidance_scale=0.0)
    assert r["unet_calls_per_image"] == r["unet_rows_per_image"] == 2
    # averaged runs share calls: N = 3 denoises 3 rows per call
    r = bench.app_speed(detector, images[:1], repeats=1, samples=3)
    assert r["unet_calls_per_image"] == 4 and r["unet_rows_per_image"] == detector.sampler.replace(samples=3).model_calls()


def test_sweep_has_a_row_per_size_and_batch(detector):
    rows = bench.sweep(detector, (1, 2), (32, 64), repeats=1)
    assert [(r["image_size"], r["batch_size"]) for r in rows] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    for r in rows:
        assert r["images_per_second"] == pytest.approx(r["batch_size"] / r["seconds_per_batch"])
        assert r["cpu_seconds_per_image"] > 0
        assert 0 <= r["outside_unet_share"] < 1
    with pytest.raises(ValueError, match="multiple of 8"):
        bench.sweep(detector, (1,), (36,), repeats=1)


def test_paper_scale_is_ddads_unet_with_blur_guidance(detector):
    paper = bench.paper_scale_detector(detector)
    assert tuple(paper.unet.config.block_out_channels) == (64, 64, 128, 128, 256, 256)
    assert paper.image_size == 256 and paper.sampler.steps == 10 and paper.sampler.model_calls() == 20


def test_fast_path_is_switchable_and_measured_against_the_reference(backbone):
    from cgdiff.detector import Detector
    from cgdiff.model import build_unet
    from cgdiff.sampler import SamplerConfig
    from cgdiff.scorer import Scorer, ScorerConfig

    torch.manual_seed(0)  # a two-level U-Net: torch.compile traces it in seconds
    unet = build_unet("tiny", sample_size=16, block_out_channels=(8, 16), attention_levels=(), norm_num_groups=4)
    detector = Detector(unet, Scorer(ScorerConfig(), backbone), SamplerConfig(steps=2), image_size=16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    detector.calibrate(x)
    reference = detector.score_maps(x, detector.reconstruct(x))
    variants = [("reference", {}), ("channels_last", {"channels_last": True}),
                ("compiled", {"compile": True}), ("cpu autocast", {"autocast_dtype": torch.bfloat16})]
    rows = bench.fast_path_benchmark(detector, x, variants, repeats=1, compile_options={"backend": "eager"})
    assert [r["variant"] for r in rows] == [v for v, _ in variants]
    assert rows[0]["speedup"] == 1 and rows[0]["max_score_difference"] == 0
    assert rows[1]["channels_last"] and rows[1]["max_map_difference"] < 1e-4
    assert rows[2]["compile"] and rows[2]["max_map_difference"] < 1e-5
    assert rows[3]["autocast_dtype"] == "bfloat16" and 0 < rows[3]["max_map_difference"] < 1  # bf16 on the CPU
    # Back on the reference path, with the reference weights untouched.
    assert detector.fast_path() == {"autocast_dtype": None, "channels_last": False, "compile": False, "runtime": None}
    assert all(p.is_contiguous() for p in detector.unet.parameters())
    torch.testing.assert_close(detector.score_maps(x, detector.reconstruct(x)), reference)


def test_pairs_expand_over_a_root_of_categories(data_root, checkpoint):
    pairs, notes = bench.expand_pairs(checkpoint.parent, data_root)
    assert pairs == [(str(checkpoint), data_root / "gravel")]
    assert len(notes) == 1 and notes[0].startswith("grass: skipped")
    assert bench.expand_pairs(checkpoint, data_root / "gravel") == ([(str(checkpoint), data_root / "gravel")], [])


def test_texture_pairs_use_the_bundled_checkpoint_of_each_texture(tmp_path, checkpoint, monkeypatch):
    registry = tmp_path / "checkpoints"
    registry.mkdir()
    (registry / "registry.json").write_text(json.dumps({"checkpoints": [{"name": "gravel", "path": str(checkpoint)}]}))
    monkeypatch.setenv("CGDIFF_CHECKPOINTS", str(registry))
    pairs, notes = bench.texture_pairs(tmp_path / "textures", textures=("gravel", "brick"))
    assert pairs == [(str(checkpoint), tmp_path / "textures" / "gravel")]
    assert notes == ["brick: skipped, no bundled checkpoint named 'brick'"]
    assert (tmp_path / "textures" / "brick" / "dataset.json").is_file()  # built, as build-textures would


def test_bench_command_prints_tables_and_writes_results(data_root, checkpoint, tmp_path, capsys, monkeypatch):
    import cgdiff.runtime

    calls = []  # the app's allocator setting, applied before its latency is timed even without --fast-path
    monkeypatch.setattr(cgdiff.runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    out = tmp_path / "out"
    code = main(["bench", "--quality", "--speed", "--pair", str(checkpoint), str(data_root / "gravel"),
                 "--methods", "full", "w0", "patchcore", "--mask-size", "32", "--checkpoint", str(checkpoint),
                 "--image-sizes", "32", "--batch-sizes", "1", "2", "--repeats", "1", "--no-paper-scale",
                 "--no-fast-path", "--device", "cpu", "--no-progress", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "| full method |" in stdout and "| no conditioning (w = 0) |" in stdout
    assert "| PatchCore-style (same backbone) |" in stdout and "outside models" in stdout
    results = json.loads((out / "bench.json").read_text())
    assert [r["key"] for r in results["quality"]["rows"]] == ["full", "w0", "patchcore"]
    assert len(results["speed"]["app"]) == 1 and len(next(iter(results["speed"]["sweeps"].values()))) == 2
    assert calls == [1] and "Allocator: `keep_freed_memory` applied before the timings" in stdout
    assert results["speed"]["allocator"] == {"applied": True, "rows": []}
    assert results["machine"]["torch_threads"] >= 1 and results["command"].startswith("cgdiff bench")
    assert (out / "quality.png").stat().st_size > 0 and (out / "speed.png").stat().st_size > 0
    assert (out / "bench.md").read_text().strip() == stdout.strip()


def test_bench_stops_on_an_empty_mask_before_any_work_or_leaves_it_out_and_names_it(data_root, checkpoint, tmp_path,
                                                                                     capsys, monkeypatch):
    import shutil

    from PIL import Image

    copy = tmp_path / "gravel"
    shutil.copytree(data_root / "gravel", copy)
    empty = sorted((copy / "ground_truth").rglob("*.png"))[0]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty)
    reconstructions = []
    args = ["bench", "--quality", "--pair", str(checkpoint), str(copy), "--methods", "patchcore", "full",
            "--mask-size", "32", "--device", "cpu", "--no-progress"]
    import cgdiff.evaluation as evaluation

    real = evaluation.reconstruct_dataset
    monkeypatch.setattr(evaluation, "reconstruct_dataset", lambda *a, **k: reconstructions.append(1) or real(*a, **k))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 defect image(s) have an empty mask" in err and str(empty) in err and not reconstructions
    assert main([*args, "--skip-empty-masks", "--out", str(tmp_path / "out")]) == 0
    stdout = capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["quality"]["rows"]
    left_out = str(copy / "test" / empty.parent.name / empty.name.replace("_mask", ""))
    assert [r["pixel_excluded"] for r in rows] == [[left_out], [left_out]]
    assert all(r["pixel_auroc"] is not None for r in rows) and left_out in stdout


def test_bench_command_needs_a_section_and_data(capsys):
    assert main(["bench"]) == 2
    assert "choose --quality, --speed or both" in capsys.readouterr().err
    assert main(["bench", "--quality"]) == 2
    assert "--quality needs data" in capsys.readouterr().err
