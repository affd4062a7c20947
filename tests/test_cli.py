"""The `cgdiff` command end to end: build data, train, evaluate, detect; help; user errors."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cgdiff.cli import main

REPO = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
COMMANDS = ("train", "evaluate", "detect", "build-textures")
TRAIN = ["--image-size", "32", "--crop-size", "16", "--batch-size", "2", "--save-every", "2", "--steps", "2",
         "--backbone", "efficientnet-lite0", "--no-progress"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A texture set built by the CLI and a detector trained on it by the CLI (a few steps)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    assert main(["build-textures", "--out", str(data), "--textures", "gravel", "--tile-size", "64",
                 "--train-stride", "128", "--test-good", "3", "--test-defect", "1", "--seed", "2"]) == 0
    ckpt = root / "ckpt"
    assert main(["train", "--data", str(data / "gravel"), "--out", str(ckpt), "--max-steps", "4", "--w", "2",
                 "--samples", "2", *TRAIN]) == 0
    return data / "gravel", ckpt


def test_train_writes_a_checkpoint_that_records_how_it_was_made(trained):
    data, ckpt = trained
    config = json.loads((ckpt / "cgdiff.json").read_text())
    assert config["training"]["steps"] == 4 and config["image_size"] == 32
    assert config["training"]["command"].startswith("cgdiff train --data ")
    assert str(data) in config["training"]["data"]
    assert config["sampler"]["steps"] == 2 and config["sampler"]["w"] == 2.0  # stored defaults
    assert config["sampler"]["samples"] == 2  # two reconstructions averaged
    assert config["scorer"]["backbone"] == "efficientnet-lite0"
    assert config["scorer"]["map_sigma"] == 4 * 32 / 256  # DDAD's sigma 4 at 256 px, scaled to 32 px
    assert config["calibration"]["threshold"] > 0
    assert "cgdiff train" in (ckpt / "README.md").read_text()
    from cgdiff import Detector  # as the model card shows

    assert Detector.from_pretrained(ckpt, device="cpu").sampler.w == 2.0


def test_evaluate_prints_a_table_and_writes_json(trained, tmp_path, capsys):
    data, ckpt = trained
    out_json, maps = tmp_path / "eval.json", tmp_path / "maps"
    code, out, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--json", out_json, "--save-maps", maps,
                          "--mask-size", "64", "--no-progress"], capsys)
    assert code == 0, err
    assert "image AUROC" in out and "AUPRO" in out and "masks at 64 x 64" in out
    result = json.loads(out_json.read_text())
    for key in METRICS:
        assert 0.0 <= result[key] <= 1.0, key
    assert result["n_images"] == 7 and result["mask_size"] == 64 and result["seconds_per_image"] > 0
    assert result["sampler"]["w"] == 2.0 and result["overrides"] == {}
    assert result["command"].startswith("cgdiff evaluate")
    assert len(list(maps.rglob("*_heatmap.png"))) == len(list(maps.rglob("*_overlay.png"))) == 7

    # Never overwritten silently; --overwrite replaces it.
    before = out_json.read_text()
    code, _, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--json", out_json], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out_json.read_text() == before

    # Each ablation is one flag, for this run only.
    code, out, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--json", out_json, "--overwrite",
                          "--w", "0", "--guidance-scale", "0", "--map-sigma", "2", "--no-progress"], capsys)
    assert code == 0, err
    ablation = json.loads(out_json.read_text())
    assert ablation["sampler"]["w"] == 0 and ablation["sampler"]["guidance_scale"] == 0
    assert ablation["scorer"]["map_sigma"] == 2 and set(ablation["overrides"]) == {"w", "guidance_scale", "map_sigma"}
    assert "overridden here" in out
    assert json.loads((ckpt / "cgdiff.json").read_text())["sampler"]["w"] == 2.0  # the checkpoint is untouched


def test_detect_writes_pictures_and_prints_a_verdict_per_image(trained, tmp_path, capsys):
    data, ckpt = trained
    images = [data / "test" / "good" / "000.png", data / "test" / "hole" / "000.png"]
    out_dir, out_json = tmp_path / "det", tmp_path / "det.json"
    code, out, err = run(["detect", "--checkpoint", ckpt, *images, "--out", out_dir, "--json", out_json,
                          "--no-progress"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["image", "score"] and len(lines) == 3
    for line, stem in zip(lines[1:], ("good_000", "hole_000")):
        # both images are 000.png: the table names the pictures each one got
        line, pictures = line.split("  (pictures ")
        assert pictures == f"{stem}_*.png)"
        assert line.removesuffix(" (unfamiliar)").split()[-1] in ("normal", "anomalous")
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(f"{stem}_{kind}.png" for stem in ("good_000", "hole_000")
                           for kind in ("heatmap", "overlay", "reconstruction", "mask"))
    assert Image.open(out_dir / "hole_000_overlay.png").size == (32, 32)
    rows = json.loads(out_json.read_text())["results"]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    assert all(isinstance(r["unfamiliar"], bool) for r in rows)
    assert ("(unfamiliar)" in out) == any(r["unfamiliar"] for r in rows) == ("images this model knows" in err)
    # With an override the image is not judged familiar or not (the normal scores were made at the stored settings).
    code, out, err = run(["detect", "--checkpoint", ckpt, *images, "--t0", "1000", "--json", tmp_path / "noise.json",
                          "--no-progress"], capsys)
    assert code == 0 and "(unfamiliar)" not in out and "images this model knows" not in err, out + err
    assert [r["unfamiliar"] for r in json.loads((tmp_path / "noise.json").read_text())["results"]] == [None, None]

    # No silent overwrite; a folder stands for its images; an explicit threshold decides the verdict.
    code, out, err = run(["detect", "--checkpoint", ckpt, *images, "--out", out_dir, "--no-progress"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, out, err = run(["detect", "--checkpoint", ckpt, data / "test" / "good", "--threshold", "1e-9",
                          "--no-progress"], capsys)
    assert code == 0 and out.count("anomalous") == 3
    code, out, err = run(["detect", "--checkpoint", ckpt, images[0], "--w", "0", "--no-progress"], capsys)
    assert code == 0 and "with overrides (w=0.0, in place of the settings above) the verdict is only indicative" in err
    for bad in ("0", "-1"):  # no ratio to the threshold means anything there
        code, out, err = run(["detect", "--checkpoint", ckpt, images[0], "--threshold", bad, "--no-progress"], capsys)
        assert code == 2 and f"--threshold must be a number above 0, got {float(bad)}" in err and not out


def test_a_learning_rate_schedule_is_checked_before_any_work_and_resumes_say_what_it_does(trained, tmp_path, capsys):
    data, _ = trained
    ckpt = tmp_path / "run"
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--max-steps", "3", "--warmup-steps", "3", *TRAIN],
                       capsys)
    assert code == 2 and "--warmup-steps 3 must be smaller than --max-steps 3" in err and not ckpt.exists()
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--max-steps", "4", "--lr-schedule", "cosine",
                        "--warmup-steps", "2", *TRAIN], capsys)
    assert code == 0, err
    record = (ckpt / "train_args.json").read_text()
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--resume", "--max-steps", "2", "--no-progress"], capsys)
    assert code == 2 and "--max-steps 2 must be larger than the run's --warmup-steps 2" in err
    assert (ckpt / "train_args.json").read_text() == record  # the refused resume left no trace
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--resume", "--max-steps", "6", "--no-progress"], capsys)
    assert code == 0 and "cosine learning-rate schedule is re-targeted from 4 to 6 steps" in err
    import math

    rows = {int(r.split(",")[0]): float(r.split(",")[2]) for r in (ckpt / "training_log.csv").read_text().splitlines()[1:]}
    # Step 4 ran on the 4-step cosine, step 6 on the 6-step one it was re-targeted to.
    assert rows[4] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 1 / 2)), rel=1e-4)
    assert rows[6] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=1e-4)
    # Resuming a finished run trains nothing and says so (it used to read like a training that ran).
    code, out, err = run(["train", "--data", data, "--out", ckpt, "--resume", "--max-steps", "6", "--no-progress"],
                         capsys)
    assert code == 0 and "nothing left to train: max_steps = 6 had already been reached" in out + err
    assert "max_steps reached at step" not in out + err


def test_resume_keeps_the_stored_settings_and_record_fills_the_model_card(trained, tmp_path, capsys):
    data, _ = trained
    ckpt = tmp_path / "run"
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--max-steps", "2", "--w", "1", *TRAIN], capsys)
    assert code == 0, err
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--max-steps", "4", "--resume", "--no-progress"], capsys)
    assert code == 0, err
    config = json.loads((ckpt / "cgdiff.json").read_text())
    assert config["training"]["steps"] == 4
    assert config["sampler"]["w"] == 1.0 and config["sampler"]["steps"] == 2  # not reset to the defaults
    assert "--w 1" in config["training"]["command"] and "--resume" in config["training"]["resumed_with"][0]

    # A resume with a time budget only keeps the run's own step budget (4), not the default.
    code, _, err = run(["train", "--data", data, "--out", ckpt, "--resume", "--max-minutes", "1", "--no-progress"],
                       capsys)
    assert code == 0, err
    assert json.loads((ckpt / "cgdiff.json").read_text())["training"]["steps"] == 4

    code, _, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--record", "--w", "3"], capsys)
    assert code == 2 and "--record" in err
    code, _, err = run(["evaluate", "--checkpoint", ckpt, "--data", data, "--record", "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((ckpt / "cgdiff.json").read_text())["metrics"]
    assert 0 <= metrics["image_auroc"] <= 1 and metrics["mask_size"] == 256
    card = (ckpt / "README.md").read_text()
    assert "cgdiff evaluate" in card
    # The verdict rates at the stored threshold go with the metrics into the card.
    rates = metrics["at_threshold"]
    assert metrics["threshold"] > 0 and 0 <= rates["false_positive_rate"] <= 1
    flagged = round(rates["false_positive_rate"] * metrics["n_normal"])
    assert f"| normal images flagged at the threshold | {flagged} of {metrics['n_normal']} (" in card


def test_help_of_every_command_is_complete(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in COMMANDS)
    helps = {}
    for command in COMMANDS:
        code, helps[command], _ = run([command, "--help"], capsys)
        assert code == 0 and helps[command].startswith(f"usage: cgdiff {command}")
    flags = ("--t0", "--steps", "--w", "--guidance-scale", "--blur-sigma", "--eta", "--seed",
             "--pixel-weight", "--feature-weight", "--map-sigma")
    for command in ("evaluate", "detect"):
        assert all(f in helps[command] for f in flags), command
        assert "checkpoint's value" in helps[command]
    assert "--mask-size N" in helps["evaluate"] and "(default: 256)" in helps["evaluate"]
    for text in ("(default: 256)", "(default: tiny)", "(default: 0.0003)", "(default: 250)", "--resume",
                 "--max-minutes", "--rotations", "--no-flips", "--mixed-precision", "--backbone"):
        assert text in " ".join(helps["train"].split()), text
    assert "(default: brick grass gravel)" in " ".join(helps["build-textures"].split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--checkpoint", "{ckpt}", "--data", "{tmp}/nowhere"], "does not exist"),
        (["evaluate", "--checkpoint", "{tmp}/nowhere", "--data", "{data}"], "neither an existing checkpoint"),
        (["detect", "--checkpoint", "{tmp}", "{data}/test/good/000.png"], "missing cgdiff.json"),
        (["detect", "--checkpoint", "{ckpt}", "{tmp}/broken.png"], "not an image file"),
        (["detect", "--checkpoint", "{ckpt}", "{tmp}/absent.png"], "does not exist"),
        (["detect", "--checkpoint", "{ckpt}", "{data}/test/good/000.png", "--steps", "0"], "argument --steps: steps must be"),
        (["detect", "--checkpoint", "{ckpt}", "{data}/test/good/000.png", "--w", "nan"], "finite"),
        (["detect", "--checkpoint", "{ckpt}", "{data}/test/good/000.png", "--eta", "2"], "argument --eta: eta must be in"),
        (["train", "--data", "{data}", "--out", "{ckpt}"], "--resume"),
        (["train", "--data", "{data}", "--out", "{tmp}/new", "--image-size", "36"], "multiple of 8"),
        (["train", "--data", "{data}", "--out", "{tmp}/new", "--lr", "-1"], "must be > 0"),
        (["train", "--data", "{data}", "--out", "{tmp}/new", "--noise-to-norm", "1"], "must be below 1"),
        (["train", "--data", "{data}", "--out", "{tmp}/new", "--steps", "0"], "argument --steps: steps must be"),
        (["build-textures", "--out", "{data}/..", "--textures", "gravel"], "already exists"),
        (["evaluate", "--data", "{data}"], "required: --checkpoint"),
        (["explode"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_with_status_2(trained, tmp_path, capsys, argv, message):
    data, ckpt = trained
    (tmp_path / "broken.png").write_bytes(b"this is not a PNG")
    argv = [a.format(data=data, ckpt=ckpt, tmp=tmp_path) for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("cgdiff: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err + out


def test_python_m_cgdiff_help_works():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cgdiff", "--help"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "usage: cgdiff" in proc.stdout and not proc.stderr


def test_help_of_every_command_loads_neither_torch_nor_diffusers():
    # `cgdiff --help` is the first thing a user runs: the parser is built from cgdiff.settings
    # alone, and the method's modules load only when a command runs.
    commands = COMMANDS + ("tune", "calibrate", "push", "bench")
    code = ("import sys; from cgdiff.cli import main\n"
            f"for argv in [['--help']] + [[c, '--help'] for c in {commands!r}]:\n"
            "    assert main(argv) == 0, argv\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'numpy', 'gradio') if m in sys.modules))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_the_module_entry_point_exits_with_the_status(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    monkeypatch.setattr(sys, "argv", ["cgdiff", "detect", "--checkpoint", str(tmp_path), str(tmp_path / "broken.png")])
    sys.modules.pop("cgdiff.__main__", None)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("cgdiff", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cgdiff: error:") and len(err.splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- inputs (masks, splits, bad files)


def test_train_never_reads_the_test_split_and_evaluate_reports_image_metrics_without_masks(trained, tmp_path, capsys):
    import shutil

    data, ckpt = trained
    grid = tmp_path / "grid"
    shutil.copytree(data, grid)
    shutil.rmtree(grid / "ground_truth" / "scratch")  # test/scratch exists, ground_truth/scratch does not
    (grid / "test" / "hole" / "000.png").write_bytes(b"not read by train")
    code, out, err = run(["train", "--data", grid, "--out", tmp_path / "ckpt", "--max-steps", "1", *TRAIN], capsys)
    assert code == 0, err
    assert "test split not read" in err
    (grid / "test" / "hole" / "000.png").unlink()
    code, out, err = run(["evaluate", "--checkpoint", ckpt, "--data", grid, "--json", tmp_path / "e.json",
                          "--mask-size", "32", "--no-progress"], capsys)
    assert code == 0, err
    assert "warning: no masks for the defect type(s) scratch (1 image)" in err
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["image_auroc"] is not None and r["pixel_auroc"] is None and "scratch" in r["pixel_metrics_note"]
    assert "pixel AUROC             n/a" in out and "no masks for the defect type(s) scratch" in out
    code, out, err = run(["evaluate", "--checkpoint", ckpt, "--data", grid, "--require-pixel-metrics",
                          "--no-progress"], capsys)
    assert code == 2 and "cgdiff: error: pixel metrics were asked for, but no masks for the defect type(s) scratch" in err


def test_evaluate_stops_on_an_empty_mask_or_leaves_it_out_and_says_so(trained, tmp_path, capsys):
    import shutil

    import numpy as np

    data, ckpt = trained
    copy = tmp_path / "gravel"
    shutil.copytree(data, copy)
    empty = copy / "ground_truth" / "color" / "000_mask.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty)
    args = ["evaluate", "--checkpoint", ckpt, "--data", copy, "--mask-size", "32", "--no-progress"]
    code, out, err = run(args, capsys)
    assert code == 2 and "1 defect image(s) have an empty mask" in err and str(empty) in err
    code, out, err = run([*args, "--skip-empty-masks", "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["pixel_excluded"] == [str(copy / "test" / "color" / "000.png")] and r["pixel_auroc"] is not None
    assert "leaving out 1 defect image(s) with an empty mask" in out and "warning: 1 defect image(s)" in err


def test_detect_says_which_parts_of_a_folder_it_did_not_search(trained, tmp_path, capsys):
    import shutil

    data, ckpt = trained
    folder = tmp_path / "camera"
    (folder / "2026-12-04").mkdir(parents=True)
    shutil.copy(data / "test" / "good" / "000.png", folder / "a.png")
    shutil.copy(data / "test" / "good" / "000.png", folder / "2026-12-04" / "b.png")
    (folder / "notes.txt").write_text("shift log\n")
    code, out, err = run(["detect", "--checkpoint", ckpt, folder, "--no-progress"], capsys)
    assert code == 0 and "a.png" in out and "b.png" not in out
    assert "1 subfolder(s) (2026-12-04) and 1 file(s) of other types not searched" in err, err
    code, out, err = run(["detect", "--checkpoint", ckpt, tmp_path, "--no-progress"], capsys)
    assert code == 2 and "holds no images" in err and "not searched: 1 subfolder(s) (camera)." in err, err


def test_detect_names_every_bad_file_at_once_or_skips_them(trained, tmp_path, capsys):
    import shutil

    data, ckpt = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(data / "test" / "good" / "000.png", folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    (folder / "c.jpg").write_bytes(b"\xff\xd8\xff truncated")
    code, out, err = run(["detect", "--checkpoint", ckpt, folder, tmp_path / "absent.png", "--no-progress"], capsys)
    assert code == 2 and "3 of 4 image(s) unreadable" in err
    for name in ("b.png", "c.jpg", "absent.png"):
        assert name in err, name
    code, out, err = run(["detect", "--checkpoint", ckpt, folder, "--skip-unreadable", "--json", tmp_path / "d.json",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "warning: skipped 2 unreadable image(s)" in err
    r = json.loads((tmp_path / "d.json").read_text())
    assert [row["image"] for row in r["results"]] == [str(folder / "a.png")] and len(r["skipped_unreadable"]) == 2
