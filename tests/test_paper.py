"""Reference numbers: the paper's Table 1 as DESIGN.md gives it, and the side-by-side table."""

import pytest

from cgdiff.paper import (DDAD_W, DTD_CLASSES, DTD_PAPER_CLASSES, MVTEC_TEXTURES, PAPER_CLASSES, ROTATIONS,
                          TABLE1, THIS_PAPER, comparison_rows, comparison_table, dataset_of)


def test_table1_holds_the_papers_numbers():
    assert set(TABLE1) == set(PAPER_CLASSES) and set(DTD_PAPER_CLASSES) <= set(DTD_CLASSES)
    assert TABLE1["carpet"][THIS_PAPER] == (99.2, 98.9) and TABLE1["wood"]["DDAD"] == (100.0, 95.0, 82.9)
    assert TABLE1["Mesh_114"][THIS_PAPER] == (99.8, 98.5)
    assert DDAD_W == {"carpet": 0.0, "grid": 4.0, "leather": 11.0, "tile": 4.0, "wood": 11.0}
    assert set(ROTATIONS) == set(MVTEC_TEXTURES) | set(DTD_CLASSES)
    assert not ROTATIONS["grid"] and not ROTATIONS["wood"]
    assert dataset_of("tile") == "MVTec AD" and dataset_of("Woven_001") == "DTD-Synthetic" and dataset_of("x") is None


def test_comparison_puts_reproduced_fractions_beside_published_percent():
    results = {"leather": {"image_auroc": 0.975, "pixel_auroc": 0.99, "aupro": 0.9},
               "brick": {"image_auroc": 1.0, "pixel_auroc": 0.95, "aupro": None}}
    rows = comparison_rows(results)
    assert [r["class"] for r in rows] == list(PAPER_CLASSES) + ["brick"]
    leather = rows[PAPER_CLASSES.index("leather")]
    assert leather[f"{THIS_PAPER} image"] == 100.0 and leather["DDAD PRO"] == 97.7
    assert leather["reproduced image"] == pytest.approx(97.5) and leather["reproduced AUPRO"] == pytest.approx(90.0)
    assert rows[0]["reproduced image"] is None and rows[-1]["dataset"] is None
    text = comparison_table(results)
    assert "97.5 / 99.0 (90.0)" in text and "100.0 / 99.3" in text
    assert "mean of the 2 reproduced" in text.splitlines()[-2]
    with pytest.raises(ValueError, match="unknown method"):
        comparison_rows(results, methods=("nope",))
