#!/bin/bash
# Removal of the denoiser's one-step estimate (K = 1: the DDIM step from t0 straight to x0, the
# posterior mean of the clean image given x_t0) against DDIM sampling (K = 10), without
# conditioning or blur guidance, on the bundled grass and gravel detectors' test splits.
cd "$(dirname "$0")/../../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
OUT=benchmarks/results/removal/onestep
for n in grass gravel; do
  for t0 in 125 250 500; do
    for k in 1 10; do
      cgdiff evaluate --checkpoint $n --data data/textures/$n --t0 $t0 --steps $k --w 0 --guidance-scale 0 \
        --json $OUT/${n}_t${t0}_k${k}.json --overwrite --no-progress > /dev/null
    done
  done
done
python - <<'PY'
import json
from pathlib import Path
out = Path("benchmarks/results/removal/onestep")
lines = ["| checkpoint | t0 | K | image AUROC | pixel AUROC | AUPRO | removal | fidelity |", "|---|---|---|---|---|---|---|---|"]
for n in ("grass", "gravel"):
    for t0 in (125, 250, 500):
        for k in (1, 10):
            d = json.loads((out / f"{n}_t{t0}_k{k}.json").read_text())
            lines.append(f"| {n} | {t0} | {k} | {d['image_auroc']:.3f} | {d['pixel_auroc']:.3f} | {d['aupro']:.3f} | "
                         f"{d['removal']:.3f} | {d['fidelity']:.3f} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
