"""Copy a trained texture checkpoint into checkpoints/NAME for shipping with the repository.

    python scripts/bundle_checkpoint.py --source RUN/brick --data BUILT/brick --name brick \\
        --as-data data/textures/brick --description "..."

- copies the checkpoint's own files (cgdiff.json, unet/, scheduler/, the train log and
  arguments, the tuning plot), never `training_state/` (Accelerate's pickles, for --resume only);
- records paths relative to the repository (and drops `--json FILE` from recorded commands): the dataset the run used was built by
  `cgdiff build-textures --out BUILT` and `cgdiff build-textures --out data/textures` builds the
  same files (same seed and defaults; the script checks that --data holds what that command
  writes), so the recorded commands become runnable from a fresh clone;
- adds examples/ from the held-out test split: the first normal tile(s) and the first tile of
  every defect kind (no choice by score), named normal_NNN.png and defect_KIND_NNN.png, with
  their ground-truth masks (examples/ground_truth/) and clean tiles (examples/clean/) under the
  same names (`--examples-only` rewrites just these for an existing bundled checkpoint);
- re-renders the model card, adds the entry to checkpoints/registry.json and checks the size.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cgdiff.card import render_model_card  # noqa: E402
from cgdiff.hub import atomic_replace_dir  # noqa: E402

KEEP = ("cgdiff.json", "unet", "scheduler", "training_log.csv", "train_args.json", "tuning_front.png")
MAX_MB = 15.0


def _replace_paths(value, mapping: dict[str, str]):
    if isinstance(value, str):
        # One pass, longest path first, whole paths only (not the tail of a longer one).
        pattern = "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
        value = re.sub(rf"(?<![\w/.-])(?:{pattern})(?![\w.-])", lambda m: mapping[m.group(0)], value)
        # Where a command wrote its JSON report is the builder's own business, not the result's.
        return re.sub(r" --json \S+", "", value) if value.startswith("cgdiff ") else value
    if isinstance(value, list):
        return [_replace_paths(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _replace_paths(v, mapping) for k, v in value.items()}
    return value


def write_examples(data: Path, info: dict, examples: Path, n_normal: int) -> None:
    """examples/: the first normal tile(s) and the first tile of every defect kind of the held-out
    test split, with each one's ground-truth mask in examples/ground_truth/ (all zero for a
    normal tile) and the clean tile (the photo at the same place, before the synthetic defect) in
    examples/clean/, both under the example's own file name."""
    import numpy as np
    from PIL import Image

    import skimage.data

    photo = getattr(skimage.data, data.name)()
    photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
    size = info["tile_size"]
    for sub in ("", "ground_truth", "clean"):
        (examples / sub).mkdir(parents=True, exist_ok=True)
    chosen = [(p, f"normal_{i:03d}.png", None)
              for i, p in enumerate(sorted((data / "test" / "good").glob("*.png"))[:n_normal])]
    for kind in info["defect_kinds"]:
        first = sorted((data / "test" / kind).glob("*.png"))[0]
        chosen.append((first, f"defect_{kind}_{first.stem}.png", kind))
    for path, name, kind in chosen:
        shutil.copy2(path, examples / name)
        tile = info["tiles"][path.relative_to(data).as_posix()]
        clean = photo[tile["y"]: tile["y"] + size, tile["x"]: tile["x"] + size]
        Image.fromarray(np.ascontiguousarray(clean)).save(examples / "clean" / name)
        if kind is None:
            if not np.array_equal(np.asarray(Image.open(path).convert("RGB")), clean):
                sys.exit(f"{path} is not the photo's tile at {tile}: the dataset does not match its dataset.json")
            Image.fromarray(np.zeros((size, size), np.uint8)).save(examples / "ground_truth" / name)
        else:
            shutil.copy2(data / tile["mask"], examples / "ground_truth" / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, type=Path, help="trained checkpoint folder")
    p.add_argument("--data", required=True, type=Path, help="the texture dataset folder it was trained on")
    p.add_argument("--name", required=True, help="registry name and folder under checkpoints/")
    p.add_argument("--as-data", required=True, help="the dataset path to record (relative to the repository)")
    p.add_argument("--description", required=True, help="one line for the registry and the app's model picker")
    p.add_argument("--also", action="append", default=[], metavar="PATH",
                   help="other paths this checkpoint had in the recorded commands (the training --out of a tuned "
                        "copy), recorded as checkpoints/NAME as well")
    p.add_argument("--normal-examples", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--examples-only", action="store_true",
                   help="only rewrite examples/ (tiles, ground truth, clean tiles) of the bundled checkpoint NAME")
    args = p.parse_args()

    info = json.loads((args.data / "dataset.json").read_text())
    if info.get("seed") != 0 or info.get("tile_size") != 128 or info.get("holdout_fraction") != 0.25:
        sys.exit(f"{args.data} was not built with build-textures' defaults; record its own command instead")
    target = REPO / "checkpoints" / args.name
    if args.examples_only:
        if not (target / "cgdiff.json").is_file():
            sys.exit(f"{target} is not a bundled checkpoint")
        shutil.rmtree(target / "examples", ignore_errors=True)
        write_examples(args.data, info, target / "examples", args.normal_examples)
        print(f"rewrote {target / 'examples'}")
        return
    if target.exists() and not args.overwrite:
        sys.exit(f"{target} exists (use --overwrite to replace it)")

    mapping = {str(args.source.resolve()): f"checkpoints/{args.name}", str(args.source): f"checkpoints/{args.name}",
               str(args.data.resolve()): args.as_data, str(args.data): args.as_data}
    for path in args.also:
        mapping[path] = mapping[str(Path(path).resolve())] = f"checkpoints/{args.name}"
    (REPO / "checkpoints").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "checkpoints") as tmp:
        staged = Path(tmp) / args.name
        staged.mkdir()
        for name in KEEP:
            src = args.source / name
            if src.is_dir():
                shutil.copytree(src, staged / name)
            elif src.is_file():
                shutil.copy2(src, staged / name)
        for name in ("cgdiff.json", "train_args.json"):
            path = staged / name
            if path.is_file():
                path.write_text(json.dumps(_replace_paths(json.loads(path.read_text()), mapping), indent=2) + "\n")

        config = json.loads((staged / "cgdiff.json").read_text())
        training = config.setdefault("training", {})
        resumed = json.loads((staged / "train_args.json").read_text()).get("resumed_with", [])
        training["description"] = (
            f"built offline with `cgdiff build-textures --out {Path(args.as_data).parent}` (scikit-image's "
            f"{args.name} photo, seed 0: rows {'-'.join(map(str, info['train_region']['rows']))} give the training "
            f"tiles, rows {'-'.join(map(str, info['test_region']['rows']))} are held out and give every test tile)"
            + (f"; the run was continued {len(resumed)} time(s) with: " + "; ".join(f"`{c}`" for c in resumed)
               if resumed else "")
            + f"; one uninterrupted run of the first command with `--max-steps {training.get('steps')}` trains "
            "the same number of steps"
        )
        (staged / "cgdiff.json").write_text(json.dumps(config, indent=2) + "\n")
        (staged / "README.md").write_text(render_model_card(config, args.name))

        write_examples(args.data, info, staged / "examples", args.normal_examples)

        size_mb = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file()) / 2**20
        if size_mb > MAX_MB:
            sys.exit(f"{args.name} is {size_mb:.1f} MB, above the {MAX_MB:g} MB a bundled checkpoint may take")
        atomic_replace_dir(staged, target, keep_extra=False)

    registry_path = REPO / "checkpoints" / "registry.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {"checkpoints": []}
    entries = [e for e in registry["checkpoints"] if e.get("name") != args.name]
    entries.append({"name": args.name, "path": args.name, "description": args.description})
    registry["checkpoints"] = sorted(entries, key=lambda e: (e.get("path") is None, e["name"]))
    registry_path.write_text(json.dumps(registry, indent=2) + "\n")
    print(f"bundled {args.source} as {target} ({size_mb:.1f} MB); registry: {registry_path}")


if __name__ == "__main__":
    main()
