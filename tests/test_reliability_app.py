"""The app under load and under hostile uploads, served as a real process on 127.0.0.1 with a
tiny checkpoint (so the test does not depend on the bundled ones) and driven by gradio_client.

A burst of 20 clients x 3 requests, some of them hostile files, against concurrency 2 and a
queue of 4: every request gets a result, a clean "queue is full" answer or (for a bad file) a
message that names the problem; the peak memory of the app process is measured and bounded;
a second identical burst does not grow it (no leak); the app answers afterwards. Queue and
concurrency come from the environment here (CGDIFF_APP_*), the command line elsewhere."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLIENTS, PER_CLIENT, CONCURRENCY, QUEUE = 20, 3, 2, 4
PEAK_LIMIT_MB = 3000  # generous: the app with a tiny model peaks near 1 GB

pytest.importorskip("gradio_client")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb(pid: int) -> dict[str, float]:
    """Current and peak resident memory of a process (Linux /proc; psutil elsewhere)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    psutil = pytest.importorskip("psutil")
    rss = psutil.Process(pid).memory_info().rss / 2**20
    return {"VmRSS": rss, "VmHWM": rss}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, backbone) -> Path:
    from cgdiff.detector import Detector
    from cgdiff.model import build_unet
    from cgdiff.sampler import SamplerConfig
    from cgdiff.scorer import Scorer, ScorerConfig

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    det = Detector(build_unet("tiny", sample_size=32), Scorer(ScorerConfig(), backbone), SamplerConfig(steps=3), 32)
    det.calibrate(torch.rand(3, 3, 32, 32) * 2 - 1)
    det.save_pretrained(folder / "tiny")
    (folder / "registry.json").write_text(json.dumps({"checkpoints": [{"name": "tiny", "path": "tiny"}]}))
    return folder


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    port = _free_port()
    cache = tmp_path_factory.mktemp("gradio-cache")
    env = {**os.environ, "CGDIFF_CHECKPOINTS": str(checkpoints), "CGDIFF_APP_CONCURRENCY": str(CONCURRENCY),
           "CGDIFF_APP_QUEUE_SIZE": str(QUEUE), "CGDIFF_APP_MAX_UPLOAD": "2mb", "GRADIO_TEMP_DIR": str(cache),
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path_factory.mktemp("log") / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, "the app exited at start:\n" + log.read_text()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "the app did not start:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
    try:
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def unexpected_errors(log: Path) -> list[str]:
    """The server log's tracebacks other than Gradio's record of the input errors it finds
    itself (a slider value out of range), which it logs with their traceback. (The app's own
    refusals of bad input log one line each, without one.)"""
    blocks = log.read_text().split("Traceback (most recent call last):")[1:]
    last_lines = [next((ln for ln in reversed(b.strip().splitlines()) if not ln.startswith(" ")), "") for b in blocks]
    return [ln for ln in last_lines if not ln.startswith("gradio.exceptions.Error:")]


def test_the_start_up_lines_name_the_address_and_the_apps_own_share_switch(server):
    url, _, log = server
    deadline = time.monotonic() + 60  # the line follows the server's start, which the fixture waits for
    while "cgdiff app running on" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert f"cgdiff app running on {url}" in text and "app.py --share adds a public link" in text, text
    assert "share=True" not in text, text


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """Files to upload and the message each must get (None: a normal result)."""
    from test_reliability_inputs import EPS, float_tiff, jpeg_with_corrupt_exif, png_declaring

    d = tmp_path_factory.mktemp("uploads")
    texture = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    good_jpeg = _encode(Image.fromarray(texture), "JPEG")
    files = {
        "texture.png": (_encode(Image.fromarray(texture), "PNG"), None),
        "corrupt_exif.jpg": (jpeg_with_corrupt_exif(), None),
        "grey16.png": (_encode(Image.fromarray(texture[..., 0].astype(np.uint16) * 257), "PNG"), None),
        "cmyk.jpg": (_encode(Image.fromarray(texture).convert("CMYK"), "JPEG"), None),
        "notes.png": (b"not a picture\n" * 10, "not an image file"),
        "cut.jpg": (good_jpeg[: len(good_jpeg) // 3], "truncated or corrupt"),
        "bomb.png": (png_declaring(100_000, 100_000), "MP limit"),
        "nan.tif": (float_tiff(float("nan")), "NaN"),
        "drawing.eps": (EPS, "not an image file"),
        "line.png": (_encode(Image.new("RGB", (900, 20)), "PNG"), "aspect ratio"),
    }
    out = {}
    for name, (data, message) in files.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, message)
    return out


def _burst(url: str, uploads: dict, clients: int, per_client: int) -> Counter:
    """Every client sends its requests one after the other; all clients start together."""
    from gradio_client import Client, handle_file

    names = list(uploads)
    outcomes: Counter = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    pool = [Client(url, verbose=False) for _ in range(clients)]
    start = threading.Barrier(clients)

    def run(k: int) -> None:
        start.wait()
        for j in range(per_client):
            name = names[(k * per_client + j) % len(names)] if k % 2 else "texture.png"  # half the clients send odd files
            path, message = uploads[name]
            try:
                result = pool[k].predict(handle_file(str(path)), "tiny", api_name="/detect")
                outcome = "completed" if message is None and result["verdict"] in ("normal", "anomalous") else "wrong"
                if outcome == "wrong":
                    problems.append(f"{name}: {result}")
            except Exception as e:  # noqa: BLE001 - classified below
                text = str(e)
                if "Queue is full" in text:
                    outcome = "busy"
                elif message is not None and message in text and name in text and "Traceback" not in text:
                    outcome = "refused with a message"
                else:
                    outcome = "wrong"
                    problems.append(f"{name}: {type(e).__name__}: {text}")
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a request never came back"
    assert not problems, problems
    return outcomes


def test_bursts_of_clients_complete_or_get_a_clean_busy_answer_in_bounded_memory(server, uploads, capsys):
    from gradio_client import Client, handle_file

    url, proc, log = server
    before = _memory_mb(proc.pid)
    started = time.monotonic()
    first = _burst(url, uploads, CLIENTS, PER_CLIENT)
    seconds = time.monotonic() - started
    after_first = _memory_mb(proc.pid)
    second = _burst(url, uploads, CLIENTS, PER_CLIENT)
    after_second = _memory_mb(proc.pid)

    total = CLIENTS * PER_CLIENT
    for outcomes in (first, second):
        assert sum(outcomes.values()) == total and outcomes["wrong"] == 0, outcomes
        assert outcomes["completed"] >= CONCURRENCY, outcomes
    assert first["busy"] + second["busy"] > 0, "a queue of 4 must turn some of 20 simultaneous clients away"
    report = (f"\napp under load: {total} requests per burst from {CLIENTS} clients (concurrency {CONCURRENCY}, "
          f"queue {QUEUE}); first burst {dict(first)} in {seconds:.1f} s; second burst {dict(second)}; "
          f"resident memory {before['VmRSS']:.0f} MB before, {after_first['VmRSS']:.0f} MB after the first burst, "
          f"{after_second['VmRSS']:.0f} MB after the second; peak {after_second['VmHWM']:.0f} MB")
    with capsys.disabled():  # shown in every run, not only on failure
        print(report)
    assert after_second["VmHWM"] < PEAK_LIMIT_MB
    assert after_second["VmRSS"] < after_first["VmRSS"] + 300, "memory keeps growing from burst to burst"

    # Within the limits nobody is turned away, and the app still answers.
    calm = _burst(url, {"texture.png": uploads["texture.png"]}, QUEUE, 2)
    assert calm == Counter(completed=QUEUE * 2), calm
    result = Client(url, verbose=False).predict(handle_file(str(uploads["texture.png"][0])), "tiny", api_name="/detect")
    assert result["verdict"] in ("normal", "anomalous")
    assert proc.poll() is None and not unexpected_errors(log)


def test_hostile_uploads_get_their_message_through_the_inspect_tab(server, uploads):
    from gradio_client import Client, handle_file

    url, proc, _ = server
    client = Client(url, verbose=False)
    controls = [250, 2, 3.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0]  # t0, K, w, s, sigma, eta, v, threshold x, seed
    for name, (path, message) in uploads.items():
        out = client.predict(handle_file(str(path)), "tiny", *controls, api_name="/inspect")
        details = out[6]  # verdict, five pictures, details, then colour bar and ground truth
        if message is None:
            assert details["verdict"] in ("normal", "anomalous"), (name, details)
        else:
            assert details["verdict"] == "error" and message in details["error"], (name, details)
            assert name in details["error"] and "/tmp" not in details["error"], details["error"]
    # Settings outside the sliders' ranges, sent through the API, are refused too, naming the
    # control, with one log line instead of Gradio's traceback.
    with pytest.raises(Exception, match="Blur sigma: Value 10000.0 is greater than maximum"):
        client.predict(handle_file(str(uploads["texture.png"][0])), "tiny", 250, 2, 3.0, 0.5, 1e4, 0.0, 1.0, 1.0, 0,
                       api_name="/inspect")
    log = server[2].read_text()
    assert "app.py: refused a request: Blur sigma: Value 10000.0" in log and "gradio.exceptions.Error" not in log
    out = client.predict(handle_file(str(uploads["texture.png"][0])), "tiny", *controls[:8], 10**30, api_name="/inspect")
    assert out[6]["verdict"] == "error" and "64 bits" in out[6]["error"]
    assert proc.poll() is None and not unexpected_errors(server[2])


def test_serving_limits_are_read_from_the_environment_and_checked(monkeypatch):
    sys.path.insert(0, str(REPO))
    try:
        import app
    finally:
        sys.path.remove(str(REPO))
    for name, value in {"CONCURRENCY": "3", "QUEUE_SIZE": "7", "MAX_BATCH": "5", "MAX_MODELS": "2",
                        "CACHE_MINUTES": "15", "PORT": "7999"}.items():
        monkeypatch.setenv(f"CGDIFF_APP_{name}", value)
    config = app.AppConfig.from_env()
    assert (config.concurrency, config.queue_size, config.max_batch, config.max_models, config.cache_minutes,
            config.port) == (3, 7, 5, 2, 15, 7999)
    for name, value, message in [("CONCURRENCY", "0", "concurrency must be at least 1"),
                                 ("QUEUE_SIZE", "-1", "queue_size must be at least 0"),
                                 ("PORT", "http", "CGDIFF_APP_PORT must be a whole number"),
                                 ("PORT", "70000", "port must be in 1..65535")]:
        monkeypatch.setenv(f"CGDIFF_APP_{name}", value)
        with pytest.raises(SystemExit, match=message):
            app.AppConfig.from_env()
        monkeypatch.setenv(f"CGDIFF_APP_{name}", {"CONCURRENCY": "3", "QUEUE_SIZE": "7", "PORT": "7999"}[name])
    with pytest.raises(SystemExit, match="--concurrency or CGDIFF_APP_CONCURRENCY") as refused:
        app.main(["--concurrency", "0"])
    assert refused.value.code == 2  # a usage error, as argparse exits for a bad flag
    assert app.demo.delete_cache == (600, 60 * app.CONFIG.cache_minutes)  # old uploads and pictures go


def test_app_help_and_a_bad_flag_answer_before_gradio_and_torch_load():
    # `python app.py --help` used to wait about 10 s for gradio and torch before printing a line.
    code = ("import runpy, sys\n"
            "sys.argv = ['app.py'] + sys.argv[1:]\n"
            "try:\n"
            "    runpy.run_path('app.py', run_name='__main__')\n"
            "except SystemExit as exit_info:\n"
            "    print(exit_info.code, sorted(m for m in ('torch', 'gradio', 'numpy') if m in sys.modules))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for flags, code_and_modules, said in [(["--help"], "0 []", "--concurrency CONCURRENCY"),
                                          (["--concurrency", "0"], "2 []", "concurrency must be at least 1"),
                                          (["--runtime", "tensorrt"], "2 []", "invalid choice: 'tensorrt'")]:
        proc = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=120)
        assert proc.stdout.strip().splitlines()[-1] == code_and_modules, (flags, proc.stdout, proc.stderr)
        assert said in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, flags


def test_the_unet_path_is_chosen_by_the_environment_and_applied_to_loaded_models(monkeypatch):
    sys.path.insert(0, str(REPO))
    try:
        import app
    finally:
        sys.path.remove(str(REPO))
    monkeypatch.setenv("CGDIFF_APP_RUNTIME", "reference")
    assert app.AppConfig.from_env().runtime == "reference"
    monkeypatch.setenv("CGDIFF_APP_RUNTIME", "tensorrt")
    with pytest.raises(SystemExit, match="runtime must be one of auto, reference, channels_last"):
        app.AppConfig.from_env()
    cache = app.ModelCache(2, "auto")
    detector = cache.get(app.DEFAULT.name)
    assert detector.fast_path()["channels_last"]  # the measured CPU default
    cache.set_runtime("reference")
    assert detector.fast_path() == {"autocast_dtype": None, "channels_last": False, "compile": False, "runtime": None}
    assert cache.get(app.DEFAULT.name) is detector and cache.loads == 1
