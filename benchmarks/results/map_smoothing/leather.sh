#!/bin/bash
# The leather subset's 30-minute detector (run_leather30.sh: 21 minutes of training, 8 of tuning)
# tuned again with the map smoothing searched as well (--map-sigmas 1 2 4 8): its trained weights, reset to the
# settings training left it with (the tuning record's "previous"), tuned for 8 minutes on one
# core as in run_leather30.sh, then the full method and the PatchCore-style peer on the test split.
set -e
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=../shared/data/mvtec_leather_mini/leather
R=runs/curve/leather30_sigma
rm -rf $R
python - <<'PY'
from cgdiff import Detector
from cgdiff.sampler import SamplerConfig
from cgdiff.scorer import ScorerConfig

det = Detector.from_pretrained("runs/curve/leather30")
prev = det.info["tuning"]["previous"]
det.sampler = SamplerConfig(**{k: v for k, v in prev.items() if k in SamplerConfig().to_dict()})
det.scorer.config = ScorerConfig(**{**det.scorer.config.to_dict(), "pixel_weight": prev["pixel_weight"],
                                    "feature_weight": prev["feature_weight"], "map_sigma": 4.0})
det.info.pop("tuning")
det.info.pop("metrics", None)
det.save_pretrained("runs/curve/leather30_sigma")
PY
cgdiff tune --checkpoint $R --data $D --minutes 8 --map-sigmas 1 2 4 8 --min-removal 0 --no-progress | tee benchmarks/results/map_smoothing/leather_tune.txt
cgdiff bench --quality --pair $R $D --methods full w0 pixel feature patchcore --out benchmarks/results/map_smoothing/leather
