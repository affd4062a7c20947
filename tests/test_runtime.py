"""The CPU runtimes (cgdiff.runtime): the exported U-Net computes what the PyTorch one does, the
export is cached by a hash of the weights and rebuilt when stale or damaged, a missing runtime
or a failed export falls back to the reference path with a warning, and the CLI's default
runs the runtime while --runtime reference does not."""

import json

import numpy as np
import pytest
import torch

from cgdiff import bench, runtime
from cgdiff.cli import main

needs_ort = pytest.mark.skipif(not runtime.available("onnxruntime"),
                               reason="the 'fast' extra (onnxruntime, onnx, onnxscript) is not installed")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CGDIFF_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def small_unet():
    """A two-level U-Net with attention: exported in a few seconds."""
    from cgdiff.model import build_unet

    torch.manual_seed(0)
    return build_unet("tiny", sample_size=16, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=4).eval()


@needs_ort
def test_the_exported_unet_computes_what_pytorch_does_at_any_batch_and_size(small_unet, cache):
    eps = runtime.RuntimeUNet(small_unet, "onnxruntime")
    assert eps.exported and eps.path.is_relative_to(cache) and eps.warmup_seconds > 0
    for batch, h, w in [(1, 16, 16), (3, 32, 24), (2, 48, 48)]:
        x = torch.randn(batch, 3, h, w)
        t = torch.randint(0, 1000, (batch,))
        with torch.no_grad():
            expected = small_unet(x, t).sample
        torch.testing.assert_close(eps(x, t), expected, atol=1e-4, rtol=1e-4)


@needs_ort
def test_the_export_is_reused_and_rebuilt_when_the_weights_change_or_the_file_is_damaged(small_unet, cache):
    first = runtime.RuntimeUNet(small_unet, "onnxruntime")
    again = runtime.RuntimeUNet(small_unet, "onnxruntime")
    assert first.exported and not again.exported and again.path == first.path
    changed = __import__("copy").deepcopy(small_unet)
    with torch.no_grad():
        changed.conv_in.weight.add_(0.5)
    other = runtime.RuntimeUNet(changed, "onnxruntime")
    assert other.exported and other.path != first.path  # never the stale export
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(other(x, t), changed(x, t).sample, atol=1e-4, rtol=1e-4)
    first.path.write_bytes(b"not an onnx file")  # a damaged cache entry
    repaired = runtime.RuntimeUNet(small_unet, "onnxruntime")
    assert repaired.exported
    with torch.no_grad():
        torch.testing.assert_close(repaired(x, t), small_unet(x, t).sample, atol=1e-4, rtol=1e-4)


def test_the_cache_key_follows_the_weights_and_config(small_unet):
    key = runtime.weights_hash(small_unet)
    assert key == runtime.weights_hash(small_unet) and len(key) == 16
    changed = __import__("copy").deepcopy(small_unet)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert runtime.weights_hash(changed) != key


@needs_ort
def test_detector_on_the_runtime_matches_the_reference_and_goes_back(tiny_detector, cache):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = tiny_detector.score_maps(x, tiny_detector.reconstruct(x))
    tiny_detector.use_fast_path(runtime="onnxruntime")
    assert tiny_detector.fast_path()["runtime"] == "onnxruntime"
    fast = tiny_detector.score_maps(x, tiny_detector.reconstruct(x))
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-3)
    tiny_detector.use_fast_path()
    assert tiny_detector.fast_path()["runtime"] is None
    torch.testing.assert_close(tiny_detector.score_maps(x, tiny_detector.reconstruct(x)), reference)


def test_the_runtime_choices_map_to_fast_path_options(tiny_detector):
    assert runtime.path_options("reference") == {}
    assert runtime.path_options("auto", "cpu") == runtime.path_options(runtime.CPU_DEFAULT)
    assert runtime.path_options("auto", "cuda") == {}  # the GPU keeps the reference until measured there
    assert runtime.path_options("channels_last") == {"channels_last": True}
    assert runtime.path_options("openvino") == {"runtime": "openvino"}
    assert runtime.path_options("bf16") == {"autocast_dtype": torch.bfloat16, "channels_last": True}
    with pytest.raises(ValueError, match="unknown runtime 'fast'"):
        runtime.path_options("fast")
    tiny_detector.use_fast_path(**runtime.path_options("auto"))
    assert runtime.describe_path(tiny_detector.fast_path()) == "PyTorch fp32, channels_last"
    tiny_detector.use_fast_path()
    assert runtime.describe_path(tiny_detector.fast_path()) == "PyTorch fp32 (reference)"


@needs_ort
def test_a_missing_runtime_or_failed_export_warns_and_keeps_the_reference(tiny_detector, cache, monkeypatch):
    monkeypatch.setattr(runtime, "available", lambda name: False)
    with pytest.warns(RuntimeWarning, match="not installed.*reference path"):
        tiny_detector.use_fast_path(runtime="onnxruntime")
    assert tiny_detector.fast_path()["runtime"] is None

    monkeypatch.undo()
    monkeypatch.setenv("CGDIFF_CACHE", str(cache))

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.warns(RuntimeWarning, match="ONNX export of the U-Net failed.*unsupported operator"):
        tiny_detector.use_fast_path(runtime="onnxruntime")
    assert tiny_detector.fast_path()["runtime"] is None
    assert not list(cache.rglob("*.onnx"))  # nothing half-written left to load later


def test_bf16_on_a_cpu_that_only_emulates_it_warns_and_still_runs(tiny_detector, monkeypatch):
    import warnings

    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="neither AVX512-BF16 nor AMX.*--runtime auto"):
        tiny_detector.use_fast_path(**runtime.path_options("bf16"))
    assert tiny_detector.fast_path()["autocast_dtype"] == "bfloat16"  # a warning, not a refusal
    monkeypatch.setattr(runtime, "available", lambda name: False)  # the warning comes before any export
    with pytest.warns(RuntimeWarning) as caught:
        tiny_detector.use_fast_path(runtime="openvino-bf16")
    assert [str(w.message)[:40] for w in caught] == ["this CPU has neither AVX512-BF16 nor AMX",
                                                      "the 'openvino-bf16' runtime is not insta"]
    for native in (True, None):  # a CPU with it, or a torch that cannot tell: nothing to say
        monkeypatch.setattr(runtime, "native_bf16", lambda: native)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tiny_detector.use_fast_path(**runtime.path_options("bf16"))
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_detector.use_fast_path(**runtime.path_options("auto"))  # fp32: nothing emulated
    tiny_detector.use_fast_path()
    assert runtime.native_bf16() in (True, False, None)
    assert bench.machine_info()["native_bf16"] in (True, False, None)


def test_bad_runtime_requests_are_refused_by_name(tiny_detector):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        tiny_detector.use_fast_path(runtime="tensorrt")
    with pytest.raises(ValueError, match="excludes autocast"):
        tiny_detector.use_fast_path(runtime="onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match="fp16 autocast is not for the CPU"):
        tiny_detector.use_fast_path(autocast_dtype=torch.float16)


@pytest.mark.skipif(not runtime.available("openvino"), reason="openvino is not installed")
def test_openvino_computes_what_pytorch_does(small_unet, cache):
    x, t = torch.randn(2, 3, 32, 16), torch.tensor([10, 900])
    with torch.no_grad():
        expected = small_unet(x, t).sample
    torch.testing.assert_close(runtime.RuntimeUNet(small_unet, "openvino")(x, t), expected, atol=1e-4, rtol=1e-4)
    bf16 = runtime.RuntimeUNet(small_unet, "openvino-bf16")(x, t)
    assert bf16.shape == expected.shape and (bf16 - expected).abs().max() < 0.1


def test_keep_freed_memory_applies_on_linux():
    import sys

    assert runtime.keep_freed_memory() == sys.platform.startswith("linux")


@needs_ort
def test_detect_runs_the_default_path_a_runtime_or_the_reference_on_request(tiny_detector, tmp_path, cache, capsys):
    ckpt = tiny_detector.save_pretrained(tmp_path / "ckpt")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    scores = {}
    said = {"auto": "U-Net on PyTorch fp32, channels_last", "reference": "U-Net on PyTorch fp32 (reference)",
            "onnxruntime": "U-Net on onnxruntime"}
    for choice, line in said.items():
        out = tmp_path / f"{choice}.json"
        assert main(["detect", str(image), "--checkpoint", str(ckpt), "--device", "cpu", "--runtime", choice,
                     "--json", str(out), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert line in err
        assert ("exporting the U-Net to ONNX" in err) == (choice == "onnxruntime")  # said while it takes its time
        scores[choice] = json.loads(out.read_text())
    first = lambda d: (d["results"] if isinstance(d, dict) else d)[0]["score"]  # noqa: E731
    assert first(scores["auto"]) == pytest.approx(first(scores["reference"]), abs=1e-4)
    assert first(scores["onnxruntime"]) == pytest.approx(first(scores["reference"]), abs=1e-4)


@needs_ort
def test_cpu_fast_path_benchmark_compares_every_variant_with_the_reference(tiny_detector, cache):
    images = [np.asarray((np.random.default_rng(i).random((32, 32, 3)) * 255).astype(np.uint8)) for i in range(2)]
    extra = [np.asarray((np.random.default_rng(9).random((32, 32, 3)) * 255).astype(np.uint8))]
    variants = [("fp32 eager (reference)", {}), ("channels_last", {"channels_last": True}),
                ("onnxruntime", {"runtime": "onnxruntime"})]
    result = bench.cpu_fast_path_benchmark([("tiny", tiny_detector, images, extra)], variants, unet_sizes=(32,))
    assert [r["variant"] for r in result["rows"]] == [v for v, _ in variants]
    assert [r["variant"] for r in result["unet"]] == [v for v, _ in variants]
    ref, cl, ort = result["rows"]
    assert ref["max_score_difference"] == 0 and ref["n_compared"] == 3 == ref["verdicts_matching"]
    assert ort["runtime"] == "onnxruntime" and ort["max_map_difference"] < 1e-3
    assert all(r["seconds_per_image"] > 0 and r["unet_calls_per_image"] == tiny_detector.sampler.model_calls()
               for r in result["rows"])
    assert result["chosen"] in {v for v, _ in variants}
    assert tiny_detector.fast_path()["runtime"] is None  # back on the reference path
    text = bench.render_speed({"app": [], "sweeps": {}, "cpu_fast_path": result})
    assert "| onnxruntime | tiny |" in text and "/ fp32 eager" in text


def test_the_default_is_the_fastest_variant_that_keeps_every_verdict_and_score():
    def row(variant, seconds, matching=4, rel=0.0):
        return {"variant": variant, "seconds_per_image": seconds, "verdicts_matching": matching, "n_compared": 4,
                "max_score_difference_rel_threshold": rel}

    rows = [row("reference", 1.0), row("fast but flips a verdict", 0.1, matching=3),
            row("fast but drifts", 0.2, rel=0.02), row("runtime", 0.5), row("runtime", 0.3), row("other", 0.45)]
    assert bench.choose_cpu_default(rows) == "runtime"  # mean 0.4 over its checkpoints
    assert bench.choose_cpu_default([row("flips", 0.1, matching=0)]) is None
