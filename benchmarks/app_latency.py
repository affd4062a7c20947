"""The app's latency as a visitor meets it, and why it runs every torch call on one thread.

1. End to end: starts `python app.py` (its own process, the default settings) and times the
   `/detect` endpoint with `gradio_client` for each bundled model, one request at a time: the
   seconds the detector reports (`seconds`, the U-Net and the scoring) and the round trip.
2. `--threads`: in this process, one detector's `detect` on one thread throughout, against the
   same calls spread over a pool of two threads (as Gradio's worker threads take requests), and
   then on the one thread again. Each thread that runs torch gets its own OpenMP team; on a
   2-core CPU the teams of earlier threads slow the next call, which `app.py` avoids by running
   every torch call on its one inference thread.

Time it alone on the machine (nothing else running):
    python benchmarks/app_latency.py --repeats 5
    python benchmarks/app_latency.py --threads --names grass --repeats 4
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_to_end(names: list[str], repeats: int) -> list[str]:
    from gradio_client import Client, handle_file

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = None
        for _ in range(240):  # up to 2 minutes for the app to start
            try:
                client = Client(f"http://127.0.0.1:{port}", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.5)
        if client is None:
            raise SystemExit("the app did not start within 2 minutes")
        lines = ["| model | detector s / image (median) | round trip s (median) | all detector s |", "|---|---|---|---|"]
        for name in names:
            image = handle_file(str(REPO / "checkpoints" / name / "examples" / "normal_000.png"))
            client.predict(image, name, api_name="/detect")  # load the model
            inner, outer = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                inner.append(client.predict(image, name, api_name="/detect")["seconds"])
                outer.append(time.perf_counter() - start)
            lines.append(f"| {name} | {statistics.median(inner):.2f} | {statistics.median(outer):.2f} | "
                         f"{', '.join(f'{s:.2f}' for s in inner)} |")
            print(lines[-1], flush=True)
        return lines
    finally:
        server.terminate()
        server.wait(timeout=30)


def threads(names: list[str], repeats: int) -> list[str]:
    from cgdiff.detector import Detector
    from cgdiff.runtime import keep_freed_memory

    keep_freed_memory()  # as the app does
    one, pool = ThreadPoolExecutor(1), ThreadPoolExecutor(2)
    lines = ["| model | one thread | a pool of two threads | one thread again |", "|---|---|---|---|"]
    for name in names:
        detector = one.submit(Detector.from_pretrained, str(REPO / "checkpoints" / name)).result()
        image = str(REPO / "checkpoints" / name / "examples" / "normal_000.png")

        def timed() -> float:
            start = time.perf_counter()
            detector.detect(image)
            return time.perf_counter() - start

        one.submit(timed).result()  # warm-up
        first = [one.submit(timed).result() for _ in range(repeats)]
        spread = [pool.submit(timed).result() for _ in range(repeats)]
        again = [one.submit(timed).result() for _ in range(repeats)]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median(s):.2f} ({', '.join(f'{x:.2f}' for x in s)})"
                                                for s in (first, spread, again)) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=["brick", "grass", "gravel"], help="bundled models")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model and way")
    parser.add_argument("--threads", action="store_true", help="the thread comparison instead of the app")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to OUT")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    missing = [n for n in args.names if not (REPO / "checkpoints" / n / "examples" / "normal_000.png").exists()]
    if missing:
        parser.error(f"no bundled model with examples named {', '.join(missing)}")
    lines = (threads if args.threads else end_to_end)(args.names, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
