"""The Gradio app, served on 127.0.0.1 and driven as users drive it: with gradio_client and
with a real browser (headless Chromium). Runs against the bundled checkpoints of the
registry ($CGDIFF_CHECKPOINTS points elsewhere)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgdiff.registry import known_checkpoints

REPO = Path(__file__).resolve().parents[1]
MAX_UPLOAD = "2mb"
FAST = 2  # denoising steps where a test is about plumbing, not detection quality

BUNDLED = [e for e in known_checkpoints() if e.bundled and e.examples()]
pytestmark = pytest.mark.skipif(not BUNDLED, reason="no bundled checkpoints with examples in the registry")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_module():
    sys.path.insert(0, str(REPO))
    try:
        import app
    finally:
        sys.path.remove(str(REPO))
    return app


@pytest.fixture(scope="module")
def server(app_module):
    config = app_module.AppConfig(host="127.0.0.1", port=_free_port(), concurrency=1, queue_size=16,
                                  max_upload=MAX_UPLOAD, max_batch=8)
    app_module.CONFIG.max_batch = config.max_batch
    _, url, _ = app_module.launch(config, prevent_thread_lock=True, quiet=True)
    yield url
    app_module.demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def _examples(entry, prefix: str) -> list[Path]:
    return [p for p in entry.examples() if p.name.startswith(prefix)]


def _controls(app, name: str) -> list:
    """A model's defaults as control values: t0, K, w, s, sigma, eta, v, threshold scale, seed."""
    d = app.model_defaults(name, app.MODELS.get(name))
    return [d[k] for k in ("t0", "steps", "w", "guidance_scale", "blur_sigma", "eta", "pixel_weight")] + [1.0, d["seed"]]


def _inspect(client, image, model, controls, **changes):
    from gradio_client import handle_file

    names = ["t0", "steps", "w", "guidance_scale", "blur_sigma", "eta", "pixel_weight", "threshold_scale", "seed"]
    values = dict(zip(names, controls))
    values.update(changes)
    out = client.predict(handle_file(str(image)), model, *[values[n] for n in names], api_name="/inspect")
    verdict_html, pictures, details = out[0], out[1:6], out[6]
    return verdict_html, pictures, details


def _value(output):
    """An output as the client returns it: a plain value, or an update dict holding one."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output.get("value")
    return output


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("entry", BUNDLED, ids=[e.name for e in BUNDLED])
def test_defect_examples_score_higher_and_normal_ones_pass(client, entry):
    from gradio_client import handle_file

    normals, defects = _examples(entry, "normal"), _examples(entry, "defect")
    assert normals and defects, f"{entry.name} ships examples of both kinds"
    normal = [client.predict(handle_file(str(p)), entry.name, api_name="/detect") for p in normals]
    defect = [client.predict(handle_file(str(p)), entry.name, api_name="/detect") for p in defects]
    # The examples are the first held-out tiles, not picked by score: a normal one may be a false
    # positive at the calibrated threshold (the model card gives the rate), but not all of them.
    assert any(r["verdict"] == "normal" for r in normal), normal
    assert max(r["score"] for r in defect) > max(r["score"] for r in normal)
    assert any(r["verdict"] == "anomalous" for r in defect), defect
    for r in defect:
        if r["verdict"] == "anomalous":
            assert 0 < r["defect_fraction"] < 0.5  # a region, not the whole image


def test_the_mask_covers_the_defect(client, app_module, tmp_path):
    """A defect with a known mask, made from a normal example: the predicted mask lies on it."""
    from cgdiff.data import SyntheticDefects

    entry = BUNDLED[0]
    base = np.asarray(Image.open(_examples(entry, "normal")[0]).convert("RGB"))
    image, truth = SyntheticDefects(seed=3, area=(0.08, 0.12)).apply(base, "texture")
    path = _png(tmp_path / "foreign_texture.png", image)
    verdict, pictures, details = _inspect(client, path, entry.name, _controls(app_module, entry.name))
    assert details["verdict"] == "anomalous" and 'data-verdict="anomalous"' in verdict
    predicted = np.asarray(Image.open(pictures[4]).convert("L")) > 127
    size = predicted.shape[0]
    truth = np.asarray(Image.fromarray(truth).resize((size, size), Image.Resampling.NEAREST))
    from scipy import ndimage

    near = ndimage.binary_dilation(truth, iterations=max(2, size // 32))
    assert predicted.any()
    assert (predicted & near).sum() / predicted.sum() > 0.6, "the predicted mask is mostly on the defect"
    assert (predicted & truth).sum() / truth.sum() > 0.2, "and covers a good part of it"
    heat = np.asarray(Image.open(pictures[2]).convert("L")).astype(float)
    assert heat[near].mean() > heat[~near].mean()


def test_controls_change_the_result_and_the_note_says_when_off_calibration(client, app_module):
    entry = BUNDLED[0]
    normal = _examples(entry, "normal")[0]
    # A defect example: with brick's second pass a normal tile's map is all but zero.
    defect = _examples(entry, "defect")[0]
    controls = _controls(app_module, entry.name)
    verdict, _, first = _inspect(client, defect, entry.name, controls, steps=FAST)
    assert first["settings"]["steps"] == FAST and "calibrated" in first["note"]
    # The verdict itself says so, for the settings panel may be closed.
    assert "Indicative only: K differs from the settings the threshold was calibrated at" in verdict
    _, _, no_w = _inspect(client, defect, entry.name, controls, steps=FAST, w=0.0)
    assert no_w["score"] != pytest.approx(first["score"], rel=1e-4)
    _, _, v0 = _inspect(client, defect, entry.name, controls, steps=FAST, pixel_weight=0.0)
    assert v0["score"] != pytest.approx(first["score"], rel=1e-4)
    _, _, seed = _inspect(client, defect, entry.name, controls, steps=FAST, seed=123)
    assert seed["score"] != pytest.approx(first["score"], rel=1e-6)
    _, _, base = _inspect(client, normal, entry.name, controls, steps=FAST)
    # The threshold control moves the decision, not the score.
    low = base["score"] / base["threshold"] * 0.5
    verdict, pictures, strict = _inspect(client, normal, entry.name, controls, steps=FAST, threshold_scale=max(low, 0.25))
    assert strict["score"] == pytest.approx(base["score"], rel=1e-6)
    assert strict["threshold"] < base["threshold"]
    if strict["score"] > strict["threshold"]:
        assert strict["verdict"] == "anomalous" and "ANOMALOUS" in verdict
        assert np.asarray(Image.open(pictures[4])).max() == 255
    # At the model's own settings there is no note.
    verdict, _, at_defaults = _inspect(client, normal, entry.name, controls)
    assert at_defaults["note"] == "" and at_defaults["settings"]["steps"] == controls[1]
    assert "Indicative only" not in verdict
    # The note also appears in the settings panel as the sliders move (no request needed).
    defaults = app_module.model_defaults(entry.name, app_module.MODELS.get(entry.name))
    assert app_module.note_for(defaults, *controls[:7]) == ""
    assert "calibrated" in app_module.note_for(defaults, controls[0] + 100, *controls[1:7])


def test_an_api_call_without_controls_runs_the_chosen_model_at_its_own_settings(client, app_module):
    """Leaving the controls out sends the page's start values (the first model's settings):
    another model must then run at its own stored settings, as /detect does."""
    from gradio_client import handle_file

    if len(BUNDLED) < 2:
        pytest.skip("needs two bundled models")
    first, other = BUNDLED[0], BUNDLED[-1]
    assert _controls(app_module, first.name) != _controls(app_module, other.name)
    image = _examples(other, "defect")[0]
    client.reset_session()  # the page's start state: the controls hold the first model's settings
    out = client.predict(handle_file(str(image)), other.name, api_name="/inspect")
    stored = client.predict(handle_file(str(image)), other.name, api_name="/detect")
    assert out[6]["note"] == "" and out[6]["score"] == pytest.approx(stored["score"], rel=1e-5)
    assert out[6]["verdict"] == stored["verdict"]
    sampler = app_module.MODELS.get(other.name).sampler  # the time line names K and N apart
    # Both name every setting they ran with, the same ones here: the model's stored settings.
    assert stored["settings"] == out[6]["settings"] and stored["settings"]["steps"] == sampler.steps
    assert stored["settings"]["w"] == sampler.w and "pixel_weight" in stored["settings"]
    assert f"K = {sampler.steps}" in out[0] and (sampler.samples == 1 or f"N = {sampler.samples}" in out[0])
    # A control moved by hand is a choice: every value then counts as given.
    page = app_module.model_defaults(first.name, app_module.MODELS.get(first.name))
    values = _controls(app_module, first.name)
    untouched = values[:7] + values[8:]
    assert app_module.own_settings(other.name, page, *untouched) == (None,) * 8
    moved = [untouched[0] + 1, *untouched[1:]]
    assert app_module.own_settings(other.name, page, *moved) == tuple(moved)
    assert app_module.own_settings(first.name, page, *untouched) == tuple(untouched)


def test_every_inference_runs_on_the_one_inference_thread(client, app_module, monkeypatch):
    """Requests arrive on Gradio's changing worker threads; torch work must not (each thread
    that runs torch gets its own OpenMP team, and the idle ones slow the next on a small CPU)."""
    from gradio_client import handle_file

    threads = []
    detect = app_module.Detector.detect

    def recording(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return detect(self, *args, **kwargs)

    monkeypatch.setattr(app_module.Detector, "detect", recording)
    entry = BUNDLED[0]
    image = handle_file(str(_examples(entry, "normal")[0]))
    for _ in range(2):
        client.predict(image, entry.name, api_name="/detect")
        _inspect(client, _examples(entry, "normal")[0], entry.name, _controls(app_module, entry.name), steps=FAST)
    assert len(threads) == 4 and all(name.startswith("cgdiff-inference") for name in threads), threads


def test_the_verdict_names_the_area_in_pixels_when_it_rounds_to_nothing(app_module):
    from cgdiff.detector import Detection
    from cgdiff.sampler import SamplerConfig

    def result(marked: int) -> Detection:
        anomaly_map = np.zeros((128, 128), np.float32)
        anomaly_map.flat[:marked] = 2.0
        image = np.zeros((128, 128, 3), np.uint8)
        return Detection(image, image, anomaly_map, float(anomaly_map.max()), 1.0, 0.5)

    sampler = SamplerConfig(steps=10, samples=4)
    assert "Predicted defect area: 3 pixels, 0.02% of the image." in app_module.describe_result(result(3), 1, 1, sampler)
    assert "1 pixel," in app_module.describe_result(result(1), 1, 1, sampler)
    assert "Predicted defect area: 25.0% of the image." in app_module.describe_result(result(4096), 1, 1, sampler)
    normal = app_module.describe_result(result(0), 1, 1, sampler)
    assert "Predicted defect area" not in normal and "&le; threshold" in normal
    assert "K = 10 in each of N = 4 averaged runs" in normal


def test_progress_follows_the_denoising_steps(client, app_module):
    from gradio_client import handle_file

    entry = BUNDLED[0]
    controls = _controls(app_module, entry.name)
    controls[1] = 6
    job = client.submit(handle_file(str(_examples(entry, "normal")[0])), entry.name, *controls, api_name="/inspect")
    seen = []
    while not job.done():
        status = job.status()
        seen += [(p.index, p.length, p.desc) for p in status.progress_data or []]
        time.sleep(0.02)
    assert job.result()[6]["verdict"] in ("normal", "anomalous")
    assert seen, "no progress was reported"
    sampler = app_module.MODELS.get(entry.name).sampler
    # K steps per averaged run (brick averages N = 2), then K2 steps of brick's second pass.
    total = 6 * sampler.samples + sampler.repaint_model_calls()
    assert {length for _, length, _ in seen} == {total} and all(desc == "Denoising" for *_, desc in seen)
    indexes = [i for i, _, _ in seen]
    assert indexes == sorted(indexes) and 1 <= indexes[-1] <= total


def test_models_load_once(client, app_module):
    entry = BUNDLED[0]
    normal = _examples(entry, "normal")[0]
    controls = _controls(app_module, entry.name)
    for _ in range(2):
        _inspect(client, normal, entry.name, controls, steps=1)
        for other in BUNDLED:
            client.predict(other.name, api_name="/select_model")
    loads = app_module.MODELS.loads
    for _ in range(2):
        for other in BUNDLED:
            client.predict(other.name, api_name="/select_model")
            _inspect(client, normal, entry.name, controls, steps=1)
    assert app_module.MODELS.loads == loads


def test_choosing_a_model_loads_its_defaults_into_the_controls(client, app_module):
    if len(BUNDLED) < 2:
        pytest.skip("needs two bundled models to switch between")
    client.reset_session()
    for entry in BUNDLED[1:] + BUNDLED[:1]:
        out = [_value(o) for o in client.predict(entry.name, api_name="/select_model")]
        expected = _controls(app_module, entry.name)
        assert out[1:8] == pytest.approx(expected[:7]) and out[8] == 1.0 and out[9] == expected[8]
        assert entry.name in out[11] and "Threshold" in out[11]  # the model card line


def test_an_unreachable_hub_model_says_why_and_the_bundled_ones_keep_working(client, monkeypatch):
    from gradio_client import handle_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server runs in this process
    client.reset_session()  # the picker starts on the default model
    out = client.predict("nobody-here/no-such-cgdiff-model", api_name="/select_model")
    model, status = _value(out[0]), out[12]
    assert model == BUNDLED[0].name, "the picker goes back to the working model"
    assert "Cannot use model 'nobody-here/no-such-cgdiff-model'" in status and "HF_HUB_OFFLINE" in status
    with pytest.raises(Exception, match="neither an existing checkpoint folder"):
        client.predict(handle_file(str(_examples(BUNDLED[0], "normal")[0])), "not a model", api_name="/detect")
    ok = client.predict(handle_file(str(_examples(BUNDLED[0], "normal")[0])), BUNDLED[0].name, api_name="/detect")
    assert ok["verdict"] == "normal"
    # A typed checkpoint folder works like a bundled name.
    folder = str(BUNDLED[-1].path)
    out = client.predict(folder, api_name="/select_model")
    assert _value(out[0]) in (None, folder) and out[12] == "" and "Threshold" in out[11]


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = np.asarray(Image.open(_examples(BUNDLED[0], "normal")[0]).convert("RGB"))
    files = {"not_an_image": d / "notes.png", "corrupted": d / "corrupted.png", "tiny": d / "tiny.png",
             "huge": d / "huge.png"}
    files["not_an_image"].write_text("this is a text file, not a picture\n")
    buffer = io.BytesIO()
    Image.fromarray(good).save(buffer, format="PNG")
    files["corrupted"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _png(files["tiny"], np.zeros((1, 1, 3), np.uint8))
    Image.new("L", (10000, 10000), 128).save(files["huge"])  # 100 MP, a small file
    rgba = np.dstack([good, np.full(good.shape[:2], 200, np.uint8)])
    files["rgba"] = _png(d / "rgba.png", rgba, "RGBA")
    grey16 = (good.mean(axis=2) * 257).astype(np.uint16)
    files["grey16"] = d / "grey16.png"
    Image.fromarray(grey16).save(files["grey16"])
    assert Image.open(files["grey16"]).mode.startswith("I;16") or Image.open(files["grey16"]).mode == "I"
    return files


@pytest.mark.parametrize(
    "kind, message",
    [
        ("not_an_image", "not an image file"),
        ("corrupted", "could not be decoded"),
        ("tiny", "too small to inspect"),
        ("huge", "above the 40 MP limit"),
        ("rgba", None),
        ("grey16", None),
    ],
)
def test_bad_uploads_get_a_readable_message_and_the_app_keeps_serving(client, app_module, bad_files, kind, message):
    entry = BUNDLED[0]
    controls = _controls(app_module, entry.name)
    verdict, pictures, details = _inspect(client, bad_files[kind], entry.name, controls, steps=1)
    if message is None:  # odd but valid images are converted and inspected
        assert details["verdict"] in ("normal", "anomalous") and all(pictures)
    else:
        assert details["verdict"] == "error" and message in details["error"], details
        assert 'data-verdict="error"' in verdict and message in verdict
        assert "/tmp/gradio" not in details["error"], "the message names the user's file, not a temp path"
        assert not any(pictures)
    _, _, after = _inspect(client, _examples(entry, "normal")[0], entry.name, controls, steps=1)
    assert after["verdict"] in ("normal", "anomalous")


def test_a_refused_api_call_tells_the_caller_and_logs_one_line_not_a_traceback(client, bad_files, capfd):
    from gradio_client import handle_file

    capfd.readouterr()
    with pytest.raises(Exception, match="not an image file"):
        client.predict(handle_file(str(bad_files["not_an_image"])), BUNDLED[0].name, api_name="/detect")
    with pytest.raises(Exception, match="neither an existing checkpoint folder"):
        client.predict(handle_file(str(_examples(BUNDLED[0], "normal")[0])), "not a model", api_name="/detect")
    log = capfd.readouterr().err
    assert log.count("app.py: refused a request: ") == 2, log
    assert "Traceback" not in log, log


def test_a_public_server_loads_no_folders_from_its_disk_and_does_not_say_which_exist(client, app_module, monkeypatch):
    from gradio_client import handle_file

    image = handle_file(str(_examples(BUNDLED[0], "normal")[0]))
    monkeypatch.setattr(app_module.MODELS, "local_folders", False)
    messages = []
    for name in (str(BUNDLED[0].path), "/etc", "/no/such/folder", "./checkpoints"):
        with pytest.raises(Exception, match="not a model this server offers") as caught:
            client.predict(image, name, api_name="/detect")
        messages.append(str(caught.value).replace(name, "NAME"))
    assert len(set(messages)) == 1, messages  # the same words whether the folder exists or not
    assert client.predict(image, BUNDLED[0].name, api_name="/detect")["verdict"] in ("normal", "anomalous")
    config = app_module.AppConfig
    assert app_module.serves_local_folders(config(host="127.0.0.1"))
    assert not app_module.serves_local_folders(config(host="127.0.0.1"), share=True)
    assert not app_module.serves_local_folders(config(host="0.0.0.0"))
    assert app_module.serves_local_folders(config(host="0.0.0.0", local_folders="yes"))
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert not app_module.serves_local_folders(config()) and app_module.serves_local_folders(config(host="127.0.0.1"))
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    monkeypatch.setenv("SPACE_ID", "someone/cgdiff")
    assert not app_module.serves_local_folders(config())


def test_uploads_over_the_size_limit_are_refused(client, server, tmp_path):
    import httpx
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with big.open("rb") as f:
        response = httpx.post(f"{server.rstrip('/')}/gradio_api/upload", files={"files": ("big.png", f, "image/png")})
    assert response.status_code == 413 and "maximum allowed size" in response.text
    still = client.predict(handle_file(str(_examples(BUNDLED[0], "normal")[0])), BUNDLED[0].name, api_name="/detect")
    assert still["verdict"] == "normal"


# -------------------------------------------------------------------------------- batch


def test_batch_gives_a_table_and_a_zip_of_maps(client, app_module, bad_files):
    from gradio_client import handle_file

    entry = BUNDLED[0]
    controls = _controls(app_module, entry.name)
    paths = [_examples(entry, "normal")[0], _examples(entry, "defect")[0], bad_files["not_an_image"]]
    controls[1] = FAST
    table, gallery, archive, status = client.predict([handle_file(str(p)) for p in paths], entry.name, *controls,
                                                     api_name="/batch")
    rows = table["data"]
    assert [r[0] for r in rows] == [p.name for p in paths]
    assert rows[0][1] in ("normal", "anomalous") and rows[1][1] in ("normal", "anomalous")
    assert rows[2][1] == "error" and "not an image file" in rows[2][7]
    assert len(gallery) == 2 and "2 images inspected" in status and "1 file(s) could not be read" in status
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        assert {"scores.csv", "000_normal_000/heatmap.png", "000_normal_000/anomaly_map.npy",
                "001_" + paths[1].stem + "/mask.png"} <= names
        amap = np.load(io.BytesIO(zf.read("000_normal_000/anomaly_map.npy")))
        assert amap.ndim == 2 and amap.dtype == np.float32
        assert float(amap.max()) == pytest.approx(rows[0][2], rel=1e-3, abs=1e-5)  # the table rounds to 5 places


def test_images_unlike_the_models_say_so_in_the_batch_and_the_api(client, app_module, tmp_path, bad_files):
    from gradio_client import handle_file

    entry = BUNDLED[0]
    noise = _png(tmp_path / "noise.png", np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    normal = _examples(entry, "normal")[0]
    paths = [normal, noise, bad_files["not_an_image"], bad_files["tiny"]]
    table, _, archive, status = client.predict([handle_file(str(p)) for p in paths], entry.name,
                                               *_controls(app_module, entry.name), api_name="/batch")
    rows = table["data"]
    assert rows[0][7] == "", "a normal example is not called unfamiliar"
    assert rows[1][1] in ("normal", "anomalous") and "unlike the" in rows[1][7] and "images this model knows" in rows[1][7]
    assert "1 of them is unlike the images this model knows" in status, status
    assert ".;" not in status and "could not be read" in status, status
    with zipfile.ZipFile(archive) as zf:
        readme = zf.read("README.txt").decode()
    assert "settings as stored in the checkpoint" in readme and "sampler {'t0': " in readme, readme
    for path, unfamiliar in ((normal, False), (noise, True)):
        out = client.predict(handle_file(str(path)), entry.name, api_name="/detect")
        assert out["unfamiliar"] is unfamiliar and 0 <= out["map_fraction_above_normal_level"] <= 1, out
        assert ("unlike the" in out["note"]) == unfamiliar, out  # a script reading the note learns it too
    # Away from the calibrated settings the normal scores say nothing: a pure-noise start makes
    # every map high, and the model's own example must not be called unlike its images.
    controls = _controls(app_module, entry.name)
    controls[0] = 999 if controls[0] < 999 else 500  # t0 = 999: all but pure noise
    out = client.predict(handle_file(str(_examples(entry, "defect")[0])), entry.name, *controls, api_name="/inspect")
    verdict, details = out[0], out[6]
    assert details["unfamiliar"] is None and details["map_fraction_above_normal_level"] is None, details
    assert 'data-verdict="unfamiliar"' not in verdict and "Indicative only" in verdict, verdict


def test_batch_size_is_limited(client, app_module):
    from gradio_client import handle_file

    entry = BUNDLED[0]
    paths = [handle_file(str(_examples(entry, "normal")[0]))] * 9  # the test server allows 8
    _, _, archive, status = client.predict(paths, entry.name, *_controls(app_module, entry.name), api_name="/batch")
    assert archive is None and "at most 8" in status


# ------------------------------------------------------------------------------ serving


def test_simultaneous_requests_wait_their_turn(server, app_module, monkeypatch):
    """The server runs with concurrency 1: inference requests never overlap. (The client leaves
    the result pictures on the server: identical requests write the same cached files, and a
    download racing a rewrite of its file could fail for reasons that are not the queue's.)"""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False, download_files=False)

    entry = BUNDLED[0]
    detector = app_module.MODELS.get(entry.name)
    original = detector.detect
    lock = __import__("threading").Lock()
    active, peak = [0], [0]

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.2)
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(detector, "detect", counting)
    image = handle_file(str(_examples(entry, "normal")[0]))
    jobs = [client.submit(image, entry.name, *_controls(app_module, entry.name)[:1], 1,
                          *_controls(app_module, entry.name)[2:], api_name="/inspect") for _ in range(3)]
    jobs.append(client.submit(image, entry.name, api_name="/detect"))
    results = [job.result(timeout=120) for job in jobs]
    assert all(r[6]["verdict"] in ("normal", "anomalous") for r in results[:3])
    assert results[3]["verdict"] in ("normal", "anomalous")
    assert peak[0] == 1, f"{peak[0]} inference requests ran at once"


def test_queue_and_upload_limits_are_configured(app_module, server):
    demo = app_module.demo
    assert demo._queue.default_concurrency_limit == 1 and demo._queue.max_size == 16
    assert demo.max_file_size == 2 * 1024 * 1024
    heavy = [fn for fn in demo.fns.values() if fn.api_name in ("inspect", "batch", "detect")]
    assert len(heavy) == 3 and {fn.concurrency_id for fn in heavy} == {"inference"}
    assert {fn.concurrency_limit for fn in heavy} == {"default"}  # i.e. the queue's limit


def test_requirements_for_spaces_cover_the_package_dependencies():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    required = {ln.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower().replace("_", "-")
                for ln in lines if ln and not ln.startswith("-")}
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower().replace("_", "-") for d in declared}
    assert names <= required, f"requirements.txt lacks {sorted(names - required)}"


# ------------------------------------------------------------------------------ browser

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.browser
def test_in_a_real_browser(server, bad_files, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium chromium-driver)")
    playwright = pytest.importorskip("playwright.sync_api")
    entry = BUNDLED[0]
    defect = _examples(entry, "defect")[0]
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("#run", timeout=30_000)
            assert entry.name in page.locator("#model-info").inner_text()

            upload = page.locator("#input-image input[type=file]")
            upload.set_input_files(str(defect))
            page.wait_for_selector("#input-image img", timeout=15_000)
            page.click("#run")
            verdict = page.locator(".cgdiff-verdict[data-verdict='anomalous'], .cgdiff-verdict[data-verdict='normal']")
            verdict.wait_for(timeout=60_000)
            text = verdict.inner_text()
            assert "ANOMALOUS" in text or "NORMAL" in text
            assert "Score" in text and "threshold" in text and "Time" in text
            page.wait_for_timeout(500)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("CGDIFF_SCREENSHOT"):  # keep it, e.g. for docs/app.png
                shutil.copy(shot, os.environ["CGDIFF_SCREENSHOT"])
            assert page.locator(".toast-body.error, .error-message").count() == 0, "the page shows an error"

            # A file that is not an image: a readable message on the page, and the app goes on.
            page.locator("#input-image button[aria-label='Remove Image']").first.click()
            upload.set_input_files(str(bad_files["not_an_image"]))
            page.wait_for_timeout(500)
            page.click("#run")
            page.locator(".cgdiff-verdict[data-verdict='error']").wait_for(timeout=30_000)
            assert "not an image file" in page.locator(".cgdiff-verdict").inner_text()

            # A file over the upload limit: the page says so before sending it.
            big = tmp_path / "big.png"
            big.write_bytes(os.urandom(3 * 1024 * 1024))
            page.locator("#input-image button[aria-label='Remove Image']").first.click()
            upload.set_input_files(str(big))
            toast = page.locator(".toast-body", has_text="exceed the maximum allowed size")
            toast.wait_for(timeout=10_000)
            assert "big.png" in toast.inner_text()
        finally:
            browser.close()
    assert not errors, errors


# ------------------------------------------------------------ teaching, strangers, page


def test_teaching_endpoint_shows_the_trajectory_and_the_ablations(client, app_module):
    from gradio_client import handle_file

    entry = BUNDLED[0]
    controls = _controls(app_module, entry.name)
    controls[1], controls[3] = 2, 0.5  # K = 2 with blur guidance on
    out = client.predict(handle_file(str(_examples(entry, "defect")[0])), entry.name, *controls, api_name="/teach")
    status, noisy, estimates, blurred, variants = out[0], out[1], out[2], _value(out[3]), out[4:]
    assert "2 steps" in status and entry.name in status
    assert len(noisy) == 3 and len(estimates) == 2 and len(blurred) == 2  # start + steps + result
    caption = noisy[-1]["caption"] if isinstance(noisy[-1], dict) else noisy[-1][1]
    # Not "t = 0": the last step starts there; brick's result comes after its second pass.
    second = app_module.MODELS.get(entry.name).sampler.repaint_t0
    runs = app_module.MODELS.get(entry.name).sampler.samples
    if second:
        assert caption.startswith("result (") and caption.endswith("2nd pass)")
    else:
        assert caption == (f"result (mean of {runs} runs)" if runs > 1 else "result, after the last step")
    assert len(caption) <= 27  # the gallery cut "result (2nd pass, t2 = 400 (the mean of 2 runs, ...)"
    assert ("Then a second pass" in status) == bool(second)
    lines = variants[0::3]
    assert [ln.split("**")[1] for ln in lines] == ["Full method", "Pure-noise start (t0 = 1000)",
                                                     "No conditioning (w = 0)", "No blur guidance (s = 0)"]
    assert all(variants[i] and variants[i + 1] for i in range(1, 12, 3))


def _screenshot_dir(tmp_path_factory) -> Path:
    """Where the browser tests keep their screenshots: $CGDIFF_SCREENSHOT_DIR, else a temp folder."""
    folder = Path(os.environ.get("CGDIFF_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium chromium-driver)")
    playwright = pytest.importorskip("playwright.sync_api")
    shots = _screenshot_dir(tmp_path_factory)
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.shots = shots
        yield page
        browser.close()
    assert not errors, errors


def _open(page, server):
    page.goto(server, wait_until="domcontentloaded")
    page.wait_for_selector("#run", timeout=30_000)
    page.wait_for_selector("#examples-" + BUNDLED[0].name + " img", timeout=30_000)


def _shot(page, name: str) -> Path:
    path = page.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _result(page):
    box = page.locator(".cgdiff-verdict[data-verdict='anomalous'], .cgdiff-verdict[data-verdict='normal'], "
                       ".cgdiff-verdict[data-verdict='unfamiliar'], .cgdiff-verdict[data-verdict='error']")
    box.wait_for(timeout=90_000)
    page.wait_for_timeout(400)
    return box


def _click_example(page, model: str, index: int) -> None:
    page.locator(f"#examples-{model} img").nth(index).click()
    page.wait_for_function(f"document.querySelector('#model input').value.startsWith('{model}')", timeout=15_000)
    page.wait_for_selector("#input-image img", timeout=15_000)
    page.wait_for_timeout(600)


def _picture(page, selector: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB")).astype(int)


@pytest.mark.browser
def test_browser_examples_grouped_by_model_and_the_texture_each_knows(page, server):
    _open(page, server)
    for entry in BUNDLED:
        gallery = page.locator(f"#examples-{entry.name}")
        assert entry.name in gallery.inner_text()  # the group's label names the model and its texture
        thumbs = gallery.locator("img")
        assert thumbs.count() == len(entry.examples())
        for i in range(thumbs.count()):  # every thumbnail is shown: no paging, nothing scrolled away
            box, frame = thumbs.nth(i).bounding_box(), gallery.bounding_box()
            assert box and box["width"] > 40 and frame["y"] <= box["y"] and box["y"] + box["height"] <= frame["y"] + frame["height"] + 1
    assert page.get_by_text("Pages:").count() == 0
    info = page.locator("#model-info").inner_text()
    name = BUNDLED[0].name
    assert f"{name}: {name}:" not in info and info.count(f"{name}:") <= 1
    assert f"Knows {name} texture" in info
    assert f"knows {name} texture" in page.locator("#model input").input_value()
    _shot(page, "examples_and_model_box")
    if len(BUNDLED) > 1:
        _click_example(page, BUNDLED[1].name, 0)
        assert f"Knows {BUNDLED[1].name} texture" in page.locator("#model-info").inner_text()


@pytest.mark.browser
def test_browser_one_progress_bar_and_no_stale_text_while_running(page, server):
    _open(page, server)
    entry = BUNDLED[-1]  # the slowest bundled model
    _click_example(page, entry.name, 0)
    page.click("#run")
    counted = []
    for _ in range(200):
        state = page.evaluate("""() => {
            const visible = e => e.offsetParent !== null && e.getBoundingClientRect().height > 0;
            const bars = [...document.querySelectorAll('*')].filter(e => e.children.length === 0 && visible(e)
                && /^processing/.test((e.textContent || '').trim()));
            const v = document.querySelector('.cgdiff-verdict');
            return [bars.length, v ? v.dataset.verdict : '', v ? v.innerText : ''];
        }""")
        if state[1] in ("anomalous", "normal", "unfamiliar"):
            break
        if state[0]:
            counted.append(state)
        page.wait_for_timeout(25)
    assert counted, "no progress was seen during the run"
    assert max(c[0] for c in counted) == 1, f"{max(c[0] for c in counted)} progress bars at once"
    assert not any("No result yet" in c[2] for c in counted), "stale text under the progress bar"
    _result(page)


# [label, whether its box meets the drawn image (not the frame's empty margins)] of every shown result picture.
_LABEL_OVER_PICTURE = """() => [...document.querySelectorAll('.cgdiff-pic')].flatMap(block => {
  const img = block.querySelector('img'), label = block.querySelector("[data-testid='block-label']");
  if (!img || !label || !img.naturalWidth || !img.offsetParent) return [];
  const r = img.getBoundingClientRect(), st = getComputedStyle(img);
  const pad = ['Top', 'Right', 'Bottom', 'Left'].map(k => parseFloat(st['padding' + k]) || 0);
  const cw = r.width - pad[1] - pad[3], ch = r.height - pad[0] - pad[2];
  const k = Math.min(cw / img.naturalWidth, ch / img.naturalHeight);
  const w = img.naturalWidth * k, h = img.naturalHeight * k;
  const left = r.left + pad[3] + (cw - w) / 2, top = r.top + pad[0] + (ch - h) / 2;
  const l = label.getBoundingClientRect();
  const meets = l.right > left && l.left < left + w && l.bottom > top && l.top < top + h;
  return [[label.innerText.trim(), meets]];
})"""


@pytest.mark.browser
def test_browser_result_shows_colour_bar_labels_and_ground_truth(page, server):
    _open(page, server)
    entry = BUNDLED[0]
    _click_example(page, entry.name, 0)  # a defect example
    page.click("#run")
    verdict = _result(page)
    assert verdict.get_attribute("data-model") == entry.name and f"model {entry.name}" in verdict.inner_text()
    bar = page.locator(".cgdiff-colorbar")
    assert "threshold" in bar.inner_text()
    mark, frame = page.locator(".cgdiff-threshold-mark").bounding_box(), bar.bounding_box()
    assert abs(mark["x"] + mark["width"] / 2 - (frame["x"] + frame["width"] / 2)) < frame["width"] * 0.05
    # Labels are whole: nothing is cut off.
    for label in ("Input (resized)", "Heat map", "Hit / miss / false alarm"):
        el = page.locator("[data-testid='block-label']", has_text=label).first
        assert el.inner_text().strip() == label
        assert page.evaluate("e => e.scrollWidth <= e.clientWidth + 1 && [...e.querySelectorAll('*')].every("
                             "c => c.scrollWidth <= c.clientWidth + 1)", el.element_handle())
    # No label lies over its picture: each label's box ends above the drawn image (object-fit: contain).
    checked = page.evaluate(_LABEL_OVER_PICTURE)
    assert len(checked) >= 8, checked  # the five result pictures and the three of the ground truth
    assert [name for name, meets in checked if meets] == [], checked
    # The ground truth beside the prediction.
    truth = page.locator("#truth")
    assert truth.is_visible() and "true defect found" in page.locator("#truth-caption").inner_text()
    hitmiss = _picture(page, "#pic-hitmiss img")
    green = (hitmiss[..., 1] > 150) & (hitmiss[..., 0] < 80)
    assert green.mean() > 0.005, "the hit / miss picture shows hits"
    _shot(page, "result_with_ground_truth")
    # An upload that is no example has no ground truth.
    page.locator("#input-image button[aria-label='Remove Image']").first.click()
    other = page.shots / "flipped_example.png"
    Image.fromarray(np.asarray(Image.open(entry.examples()[0]).convert("RGB"))[::-1].copy()).save(other)
    page.locator("#input-image input[type=file]").set_input_files(str(other))
    page.wait_for_selector("#input-image img", timeout=15_000)
    page.click("#run")
    _result(page)
    assert not page.locator("#truth").is_visible()


@pytest.mark.browser
def test_browser_verdict_letters_all_bold(page, server):
    _open(page, server)
    _click_example(page, BUNDLED[0].name, 0)
    page.click("#run")
    _result(page)
    title = page.locator(".cgdiff-title")
    # Ink per letter: each "A" of the title against the same letters in a regular-weight copy.
    ink = page.evaluate("""(el) => {
        const measure = (node, weight) => {
            const c = document.createElement('canvas'), s = getComputedStyle(node);
            const ctx = c.getContext('2d'); c.width = 400; c.height = 80;
            ctx.font = `${weight} ${s.fontSize} ${s.fontFamily}`; ctx.fillText('A', 10, 50);
            return ctx.getImageData(0, 0, 400, 80).data.filter((v, i) => i % 4 === 3 && v > 128).length;
        };
        return [measure(el, getComputedStyle(el).fontWeight), measure(el, 400)];
    }""", title.element_handle())
    assert ink[0] > 1.15 * ink[1], f"the title's 'A' is not bold ({ink})"
    # And on the page: the first letter carries as much ink per width as the rest of the word.
    shot = np.asarray(Image.open(io.BytesIO(title.screenshot())).convert("L")).astype(int)
    boxes = page.evaluate("""(el) => { const t = el.firstChild, r = document.createRange(), out = [];
        const base = el.getBoundingClientRect();
        for (let i = 0; i < 9; i++) { r.setStart(t, i); r.setEnd(t, i + 1); const b = r.getBoundingClientRect();
            out.push([b.left - base.left, b.right - base.left, t.textContent[i]]); }
        return out; }""", title.element_handle())
    background = np.median(shot)
    dark = np.abs(shot - background) > 60
    per_letter = {(ch, i): dark[:, max(0, int(a)):int(b)].mean() for i, (a, b, ch) in enumerate(boxes)}
    a_ink = [v for (ch, _), v in per_letter.items() if ch == "A"]
    others = [v for (ch, _), v in per_letter.items() if ch != "A"]
    assert a_ink and min(a_ink) > 0.55 * np.median(others), per_letter
    title.screenshot(path=str(page.shots / "verdict_title.png"))


@pytest.mark.browser
def test_browser_a_stranger_image_is_called_unfamiliar_with_score_and_framed_mask(page, server):
    _open(page, server)
    entry = BUNDLED[0]
    noise = page.shots / "noise.png"
    _png(noise, np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    page.locator("#input-image input[type=file]").set_input_files(str(noise))
    page.wait_for_selector("#input-image img", timeout=15_000)
    page.click("#run")
    verdict = _result(page)
    text = verdict.inner_text()
    assert verdict.get_attribute("data-verdict") == "unfamiliar", text
    assert "UNLIKE THE IMAGES THIS MODEL KNOWS" in text and f"knows {entry.name} texture" in text
    assert "Score" in text and "threshold" in text and "100% of the image" not in text.split("Score")[0]
    assert page.locator("#pic-heat img").is_visible()
    # The mask covers the whole image: its frame keeps it visible on the white page.
    mask = _picture(page, "#pic-mask img")
    h, w = mask.shape[:2]
    centre = mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    assert centre.min() > 240, "the mask covers the image"
    ring = np.concatenate([mask[:, :4].reshape(-1, 3), mask[:, -4:].reshape(-1, 3),
                           mask[:4].reshape(-1, 3), mask[-4:].reshape(-1, 3)])
    assert (ring.max(axis=1) < 200).mean() > 0.3, "a frame of another colour shows the mask's edge"
    _shot(page, "unfamiliar_image")


@pytest.mark.browser
def test_browser_switching_the_model_during_a_run_never_shows_the_old_result_under_the_new_name(page, server):
    if len(BUNDLED) < 2:
        pytest.skip("needs two bundled models")
    _open(page, server)
    first, second = BUNDLED[-1], BUNDLED[0]
    _click_example(page, first.name, 0)
    page.click("#run")
    page.wait_for_timeout(150)
    page.locator("#model input").click()
    page.get_by_role("option", name=re.compile(rf"^{second.name}\b")).click()
    page.wait_for_function(f"document.querySelector('#model input').value.startsWith('{second.name}')")
    page.wait_for_timeout(4000)  # past the end of the first run
    verdict = page.locator(".cgdiff-verdict")
    kind, model = verdict.get_attribute("data-verdict"), verdict.get_attribute("data-model")
    assert kind == "idle" or model == second.name, (kind, model)
    assert f"model {first.name}" not in verdict.inner_text()
    _shot(page, "model_switched_during_run")
    page.click("#run")
    assert _result(page).get_attribute("data-model") == second.name


@pytest.mark.browser
def test_browser_teaching_view_states_its_cost_then_shows_the_steps(page, server):
    _open(page, server)
    _click_example(page, BUNDLED[0].name, 0)
    page.get_by_role("tab", name="Step by step").click()
    cost = page.locator("#teach-cost")
    cost.get_by_text("denoiser evaluations").wait_for(timeout=15_000)
    assert "reconstructions" in cost.inner_text()
    # Every row is named before the first run.
    assert page.locator("#variant-0-line").inner_text().startswith("Full method")
    assert "Pure-noise start" in page.locator("#variant-1-line").inner_text()
    assert all("Run step by step" in page.locator(f"#variant-{i}-line").inner_text() for i in range(4))
    page.click("#run-teach")
    page.locator("#variant-3-line").get_by_text("denoiser evaluations").wait_for(timeout=120_000)
    page.wait_for_timeout(500)
    status = page.locator("#teach-status").inner_text()
    steps = int(re.search(r"(\d+) steps", status).group(1))
    assert page.locator("#teach-noisy img").count() == steps + 1
    assert page.locator("#teach-x0 img").count() == steps
    for i in range(4):
        assert page.locator(f"#variant-{i}-rec img").is_visible() and page.locator(f"#variant-{i}-heat img").is_visible()
    assert "Pure-noise start" in page.locator("#variant-1-line").inner_text()
    _shot(page, "teaching_view")
    # Another model: the old model's steps go, each row is named again, the last one by the new model's s.
    other = next((e for e in BUNDLED[1:] if _stored_s(e) != _stored_s(BUNDLED[0])), None)
    if other is not None:
        page.get_by_role("tab", name="Inspect an image").click()
        _click_example(page, other.name, 0)
        page.get_by_role("tab", name="Step by step").click()
        line = page.locator("#variant-3-line")
        line.get_by_text("Run step by step").wait_for(timeout=15_000)
        assert page.locator("#teach-noisy img").count() == 0
        want = "No blur guidance (s = 0)" if _stored_s(other) > 0 else "Blur guidance on"
        assert want in line.inner_text()
        assert not page.locator("#variant-0-rec img").is_visible()


def _stored_s(entry) -> float:
    """The blur-guidance scale s a bundled checkpoint stores."""
    return float(json.loads((Path(entry.path) / "cgdiff.json").read_text())["sampler"]["guidance_scale"])


@pytest.mark.browser
def test_browser_batch_table_keeps_words_whole_and_names_the_failed_files(page, server, bad_files):
    _open(page, server)
    page.get_by_role("tab", name="Batch").click()
    entry = BUNDLED[0]
    paths = [str(p) for p in entry.examples()] + [str(bad_files["not_an_image"])]
    page.locator("#batch-files input[type=file]").set_input_files(paths)
    page.wait_for_timeout(1500)
    page.click("#run-batch")
    status = page.locator("#batch-status")
    status.get_by_text("images inspected").wait_for(timeout=120_000)
    assert bad_files["not_an_image"].name in status.inner_text() and "not an image file" in status.inner_text()
    table = page.locator("#batch-table")
    for word in ("anomalous", "normal", "error"):
        cells = table.locator("td", has_text=re.compile(rf"^\s*{word}\s*$"))
        for i in range(cells.count()):
            lines = page.evaluate("""(td) => { const w = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
                let t = w.nextNode(); while (t && !t.textContent.trim()) t = w.nextNode();
                const r = document.createRange(); r.selectNodeContents(t);
                const tops = new Set([...r.getClientRects()].filter(b => b.width > 0).map(b => Math.round(b.top)));
                return tops.size; }""", cells.nth(i).element_handle())
            assert lines == 1, (f"'{word}' wraps over {lines} lines", cells.nth(i).inner_html()[:600])
    error_row = table.locator("tr", has_text=bad_files["not_an_image"].name).first
    box, frame = error_row.bounding_box(), table.bounding_box()
    assert box["y"] + box["height"] <= frame["y"] + frame["height"] + 1, "the error row is scrolled out of the table"
    _shot(page, "batch")


def test_model_info_names_the_threshold_rule(app_module, tiny_detector):
    from cgdiff.scorer import Calibration

    tiny_detector.calibration = Calibration(pixel_scale=1.0, threshold=0.2, score_mean=0.1, score_std=0.02,
                                            n_images=3, normal_scores=[0.1, 0.12, 0.08])
    assert "Threshold 0.2, calibrated on 3 normal images." in app_module.model_info("x", tiny_detector)
    tiny_detector.calibration.threshold_rule = "validation-f1"
    tiny_detector.calibration.anomalous_scores = [0.3, 0.25, 0.15]
    assert ("Threshold 0.2: the best F1 between 3 normal images and 3 with synthetic defects."
            in app_module.model_info("x", tiny_detector))
    # Where the checkpoint records which normals they were, the line names them: held out or in-sample.
    tiny_detector.info["tuning"] = {"calibration_normals": "3 holdout images (not used in training)"}
    assert ("Threshold 0.2: the best F1 between 3 holdout images (not used in training) and 3 with synthetic "
            "defects." in app_module.model_info("x", tiny_detector))
    tiny_detector.info["calibration_normals"] = "3 training-folder images (in-sample)"  # a later `cgdiff calibrate`
    assert "between 3 training-folder images (in-sample) and" in app_module.model_info("x", tiny_detector)


def test_model_info_and_card_say_how_much_of_a_defect_the_reconstruction_takes_out(app_module, tiny_detector):
    """A recorded removal below 0.5 (as printed) is said plainly in the app and the model card:
    the reconstruction keeps the defect; from 0.5, how much it takes out; nothing when unmeasured."""
    from cgdiff.card import removal_text, render_model_card

    def card():
        return render_model_card({**tiny_detector.info, "calibration": tiny_detector.calibration.to_dict()})

    assert "takes out" not in app_module.model_info("x", tiny_detector) and "takes out" not in card()
    tiny_detector.info["metrics"] = {"image_auroc": 0.95, "removal": 0.0173}
    info = app_module.model_info("x", tiny_detector)
    assert "takes out 2 % of the evaluated defects' difference from the clean image (removal 0.02" in info
    assert "keeps most of each defect" in info
    evaluation = card().split("## Evaluation", 1)[1].split("## Limits", 1)[0]
    assert "takes out 2 %" in evaluation and "keeps most of each defect" in evaluation
    tiny_detector.info["metrics"] = {"removal": 0.738}
    info = app_module.model_info("x", tiny_detector)
    assert "takes out 74 %" in info and "keeps most" not in info
    assert "takes out 74 %" in card() and "keeps most" not in card()
    # The sentence never contradicts the figure it prints, and below 0 it takes out nothing.
    assert "takes out 50 %" in removal_text({"removal": 0.4999}) and "keeps most" not in removal_text({"removal": 0.4999})
    assert "keeps most" in removal_text({"removal": 0.494})
    assert "takes out none of" in removal_text({"removal": -0.03}) and "(removal -0.03" in removal_text({"removal": -0.03})
    assert removal_text({"removal": True}) is None and removal_text({"removal": float("nan")}) is None


def test_whole_number_settings_refuse_a_fraction_instead_of_rounding_it(app_module):
    # The sliders send whole numbers; an API call can send K = 2.5, which used to run as K = 2.
    assert app_module.overrides_from(250, 10.0, 3, None, "", None, None, 0) == {"t0": 250, "steps": 10, "w": 3.0,
                                                                             "seed": 0}
    for args, name in [((250, 2.5, 3, None, None, None, None, 0), "K"),
                       ((250.4, 10, 3, None, None, None, None, 0), "t0"),
                       ((250, 10, 3, None, None, None, None, 1.5), "seed")]:
        with pytest.raises(ValueError, match=f"^{name} must be a whole number"):
            app_module.overrides_from(*args)


def test_the_api_names_every_input_and_output(client):
    # A script reads the API through view_api(): no generated names like value_40 for the verdict.
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/detect", "/inspect", "/teach", "/batch", "/select_model"} <= set(info)
    for name, endpoint in info.items():
        for item in endpoint["parameters"] + endpoint["returns"]:
            label = item.get("label") or item.get("parameter_name") or ""
            assert label and not label.startswith("value_"), (name, item)
    assert [r["label"] for r in info["/inspect"]["returns"]][:2] == ["Verdict", "Input (resized)"]
    teach_labels = {r["label"] for r in info["/teach"]["returns"]}
    assert {"Full method: reconstruction", "No conditioning: heat map"} <= teach_labels
    for name, endpoint in info.items():  # each output of an endpoint has a name of its own
        labels = [r["label"] for r in endpoint["returns"]]
        assert len(labels) == len(set(labels)), (name, labels)


@pytest.mark.browser
def test_browser_a_value_typed_out_of_a_sliders_range_logs_no_traceback(page, server, capfd):
    # The note follows the controls as they are typed; a value beyond a slider's range reaches it
    # before the page clamps the slider, and used to be refused by Gradio with a logged traceback.
    _open(page, server)
    page.get_by_text("Method settings").click()
    capfd.readouterr()
    box = page.locator("#t0 input[type=number]")
    box.wait_for(state="visible", timeout=15_000)
    changed = "document.querySelector('#calibration-note').innerText.includes('you changed t0')"
    for attempt in range(3):  # a freshly opened page may not take the first keystrokes yet
        box.fill("5000")
        box.press("Enter")
        try:
            page.wait_for_function(changed, timeout=8_000)
            break
        except Exception:
            if attempt == 2:
                raise
    page.wait_for_timeout(500)
    log = capfd.readouterr()
    assert "Traceback" not in log.err + log.out, log.err
    page.get_by_role("button", name="Reset to model defaults").click()
    page.wait_for_function("!document.querySelector('#calibration-note').innerText.includes('you changed')",
                           timeout=15_000)
