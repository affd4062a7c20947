"""The numbers cgdiff is measured against, and the per-class settings used to reproduce them.

TABLE1 is the paper's Table 1 as DESIGN.md records it: image AUROC / pixel AUROC in percent
per class (DDAD's PRO in percent where published) for this paper and the methods it compares
with. `comparison_rows` and `comparison_table` put reproduced numbers (fractions, as
`cgdiff.evaluation.evaluate` returns them) beside them.

DDAD_W is DDAD's conditioning weight per MVTec class. DDAD chose it by looking at test
results, so numbers obtained with it are test-tuned; the label-free choice is `cgdiff.tune`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

__all__ = ["MVTEC_TEXTURES", "DTD_CLASSES", "DTD_PAPER_CLASSES", "PAPER_CLASSES", "METHODS", "THIS_PAPER",
           "TABLE1", "DDAD_W", "DDAD_ADAPTATION_EPOCHS", "ROTATIONS", "dataset_of", "comparison_rows",
           "comparison_table"]

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
# DTD-Synthetic (Aota et al., WACV 2023): all 12 classes, and the three the paper reports.
DTD_CLASSES = ("Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037",
               "Stratified_154", "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127")
DTD_PAPER_CLASSES = ("Mesh_114", "Stratified_154", "Blotchy_099")
PAPER_CLASSES = MVTEC_TEXTURES + DTD_PAPER_CLASSES

THIS_PAPER = "this paper"
METHODS = (THIS_PAPER, "DDAD", "PatchCore (WR50)", "SimpleNet", "DRAEM")

# class -> method -> (image AUROC, pixel AUROC[, PRO]) in percent.
TABLE1: dict[str, dict[str, tuple[float, ...]]] = {
    "carpet": {THIS_PAPER: (99.2, 98.9), "DDAD": (99.3, 98.7, 93.9), "PatchCore (WR50)": (98.6, 99.1),
               "SimpleNet": (99.7, 98.2), "DRAEM": (97.0, 95.5)},
    "grid": {THIS_PAPER: (100.0, 99.2), "DDAD": (100.0, 99.4, 97.3), "PatchCore (WR50)": (97.9, 98.8),
             "SimpleNet": (97.2, 98.8), "DRAEM": (99.9, 99.7)},
    "leather": {THIS_PAPER: (100.0, 99.3), "DDAD": (100.0, 99.4, 97.7), "PatchCore (WR50)": (100.0, 99.3),
                "SimpleNet": (100.0, 99.2), "DRAEM": (100.0, 98.6)},
    "tile": {THIS_PAPER: (100.0, 98.2), "DDAD": (100.0, 98.2, 93.1), "PatchCore (WR50)": (99.5, 95.7),
             "SimpleNet": (99.8, 97.0), "DRAEM": (99.6, 99.2)},
    "wood": {THIS_PAPER: (100.0, 98.2), "DDAD": (100.0, 95.0, 82.9), "PatchCore (WR50)": (99.1, 95.1),
             "SimpleNet": (100.0, 94.5), "DRAEM": (99.1, 96.4)},
    "Mesh_114": {THIS_PAPER: (99.8, 98.5), "SimpleNet": (99.2, 98.5), "DRAEM": (97.1, 98.0)},
    "Stratified_154": {THIS_PAPER: (100.0, 99.3), "SimpleNet": (100.0, 98.6), "DRAEM": (100.0, 99.3)},
    "Blotchy_099": {THIS_PAPER: (100.0, 99.4), "SimpleNet": (100.0, 99.0), "DRAEM": (100.0, 99.2)},
}

# DDAD's per-class settings on MVTec AD (chosen on test data): conditioning weight w and
# epochs of feature-extractor domain adaptation.
DDAD_W = {"carpet": 0.0, "grid": 4.0, "leather": 11.0, "tile": 4.0, "wood": 11.0}
DDAD_ADAPTATION_EPOCHS = {"carpet": 0, "grid": 6, "leather": 8, "tile": 0, "wood": 16}

# 90-degree rotations as training augmentation: only for textures that look the same rotated
# (a judgement from the images, not tuned). Grid and wood are not; woven, layered and mesh
# textures have directions too. Flips are always used.
ROTATIONS = {"carpet": False, "grid": False, "leather": True, "tile": True, "wood": False,
             "Blotchy_099": True, "Fibrous_183": False, "Marbled_078": True, "Matted_069": True,
             "Mesh_114": False, "Perforated_037": False, "Stratified_154": False, "Woven_001": False,
             "Woven_068": False, "Woven_104": False, "Woven_125": False, "Woven_127": False}


def dataset_of(name: str) -> Optional[str]:
    """'MVTec AD', 'DTD-Synthetic' or None for a class name."""
    if name in MVTEC_TEXTURES:
        return "MVTec AD"
    if name in DTD_CLASSES:
        return "DTD-Synthetic"
    return None


def _percent(value: Optional[float]) -> Optional[float]:
    return None if value is None else 100.0 * float(value)


def comparison_rows(results: Mapping[str, Mapping[str, Any]], classes: Optional[Iterable[str]] = None,
                    methods: Iterable[str] = (THIS_PAPER, "DDAD")) -> list[dict[str, Any]]:
    """One row per class: the published numbers of `methods` and the reproduced ones.

    results: class -> metrics with image_auroc, pixel_auroc, aupro as fractions (None or a
    missing class: not run). classes: default the paper's classes, then any other class in
    `results`. Every number in a row is in percent (None where unknown). Keys:
    class, dataset, "<method> image", "<method> pixel", "<method> PRO", "reproduced image",
    "reproduced pixel", "reproduced AUPRO"."""
    methods = tuple(methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}.")
    names = list(classes) if classes is not None else list(PAPER_CLASSES) + [c for c in results if c not in PAPER_CLASSES]
    rows = []
    for name in names:
        row: dict[str, Any] = {"class": name, "dataset": dataset_of(name)}
        for method in methods:
            ref = TABLE1.get(name, {}).get(method)
            row[f"{method} image"] = ref[0] if ref else None
            row[f"{method} pixel"] = ref[1] if ref else None
            row[f"{method} PRO"] = ref[2] if ref and len(ref) > 2 else None
        got = results.get(name) or {}
        row["reproduced image"] = _percent(got.get("image_auroc"))
        row["reproduced pixel"] = _percent(got.get("pixel_auroc"))
        row["reproduced AUPRO"] = _percent(got.get("aupro"))
        rows.append(row)
    return rows


def _pair(a: Optional[float], b: Optional[float], c: Optional[float] = None) -> str:
    if a is None and b is None:
        return "-"
    text = f"{'-' if a is None else format(a, '.1f')} / {'-' if b is None else format(b, '.1f')}"
    return text + (f" ({c:.1f})" if c is not None else "")


def comparison_table(results: Mapping[str, Mapping[str, Any]], classes: Optional[Iterable[str]] = None,
                     methods: Iterable[str] = (THIS_PAPER, "DDAD")) -> str:
    """A plain-text table: per class, image / pixel AUROC in percent of the published
    `methods` (PRO in brackets where published) and of the reproduction (AUPRO in brackets),
    with the mean over the classes that were reproduced."""
    methods = tuple(methods)
    rows = comparison_rows(results, classes, methods)
    header = ["class"] + list(methods) + ["reproduced (AUPRO)"]
    lines = [[r["class"]] + [_pair(r[f"{m} image"], r[f"{m} pixel"], r[f"{m} PRO"]) for m in methods]
             + [_pair(r["reproduced image"], r["reproduced pixel"], r["reproduced AUPRO"])] for r in rows]
    done = [r for r in rows if r["reproduced image"] is not None]
    if done:
        def mean(key: str, subset: list[dict]) -> Optional[float]:
            values = [r[key] for r in subset]
            return None if not values or any(v is None for v in values) else sum(values) / len(values)

        lines.append([f"mean of the {len(done)} reproduced"]
                     + [_pair(mean(f"{m} image", done), mean(f"{m} pixel", done)) for m in methods]
                     + [_pair(mean("reproduced image", done), mean("reproduced pixel", done),
                              mean("reproduced AUPRO", done))])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    out.append("image AUROC / pixel AUROC in percent; published numbers from the paper's Table 1 "
               "(DDAD's PRO in brackets), '-' where not published or not run.")
    return "\n".join(out)
